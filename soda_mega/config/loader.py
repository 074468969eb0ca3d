"""Build a :class:`SodaConfig` from a preset, a config file and ``--section.key=value`` overrides.

Order of precedence (later wins): dataclass defaults < preset < config file < overrides.
A config file may name its own base preset with a top-level ``preset: NAME`` key. YAML
(``.yaml``/``.yml``) and TOML (``.toml``) files are accepted.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from soda_mega.config.fields import ConfigError, clip, did_you_mean, short
from soda_mega.config.schema import SECTIONS, SodaConfig
from soda_mega.config.yaml_io import load_yaml

_PRESET_PACKAGE = "soda_mega.config.presets"


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason})") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError, ValueError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid: "
                              f"{clip(str(err) or type(err).__name__)}") from None
    else:
        data = load_yaml(text, f"config file {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def load_preset(name: str) -> dict:
    """The raw mapping of a shipped preset."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset: {name!r} is unknown; choose one of {', '.join(names)}")
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return load_yaml(text, f"preset {name}") or {}


def apply_mapping(cfg: SodaConfig, data: Mapping[str, Any], source: str) -> None:
    """Set the fields named in a ``{section: {key: value}}`` mapping."""
    for section_name, values in data.items():
        if section_name == "preset":
            continue
        if section_name not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {short(section_name)}"
                f"{did_you_mean(section_name, SECTIONS)}; "
                f"sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {short(section_name)} must be a mapping of "
                              "fields")
        section = getattr(cfg, section_name)
        names = [f.name for f in dataclasses.fields(section)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{source}: unknown field {section_name}.{clip(str(key), 100)}"
                                  f"{did_you_mean(key, names)}")
            setattr(section, key, value)


def parse_overrides(args: Iterable[str]) -> dict:
    """Turn ``["--model.hidden_size=512", "training.lr=1e-3"]`` into a nested mapping."""
    out: dict[str, dict[str, Any]] = {}
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(f"override {short(arg)} must look like --section.key=value")
        key, value = text.split("=", 1)
        section, name = key.split(".", 1)
        # NOTE: list and mapping values may be written as YAML ("[a, b]"); scalars stay strings
        # and are converted by the field's declared type, so "1e-3" never becomes a str field.
        parsed: Any = value
        if value.startswith(("[", "{")):
            parsed = load_yaml(value, f"override {short(arg)}")
        out.setdefault(section, {})[name] = parsed
    return out


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: Iterable[str] = (),
) -> SodaConfig:
    """Resolve and validate a run's configuration."""
    file_data = _read_mapping(Path(path)) if path is not None else {}
    base = preset or file_data.get("preset")
    cfg = SodaConfig()
    if base:
        apply_mapping(cfg, load_preset(str(base)), f"preset {base}")
    if file_data:
        apply_mapping(cfg, file_data, str(path))
    apply_mapping(cfg, parse_overrides(overrides), "command line")
    return cfg.validate()


def dump_config(cfg: SodaConfig) -> str:
    """The resolved configuration as YAML, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
