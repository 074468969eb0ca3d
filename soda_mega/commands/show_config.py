"""``soda-mega config``: print a resolved configuration, or the fields of every section."""

from __future__ import annotations

import argparse

from soda_mega.config import dump_config, load_config, preset_names
from soda_mega.config.fields import field_help
from soda_mega.config.schema import SECTIONS


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The --config / --preset pair shared by commands that resolve a configuration."""
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML config file")
    parser.add_argument("--preset", metavar="NAME", help=f"base preset: {', '.join(preset_names())}")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "config",
        help="print the resolved configuration (or --fields: every field with its help)",
        description="Resolve preset + file + --section.key=value overrides, validate, print YAML.",
    )
    add_config_arguments(p)
    p.add_argument("--fields", action="store_true", help="list every section's fields instead")
    return p


def run(args) -> int:
    if args.fields:
        for name, cls in SECTIONS.items():
            print(f"[{name}]  {cls.__doc__.strip()}")
            for field, tp, default, text in field_help(cls):
                print(f"  --{name}.{field}={default!r}  ({tp})  {text}")
            print()
        return 0
    print(dump_config(load_config(args.config, args.preset, args.overrides)), end="")
    return 0
