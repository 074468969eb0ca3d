"""YAML from users' files, read so that a small file stays a small value, and short quotes of it.

soda-mega's YAML files (configs, ``--key=[...]`` overrides, scaling grids) are plain trees of
mappings, lists and scalars. YAML aliases (``*name``, and ``<<: *name`` merges) let a few
hundred bytes stand for billions of values ("billion laughs"): every later walk of the tree
(validation, a message quoting the value, a copy) pays for them, and an issue measured 47 s,
6.2 GB and a 2 GB error line for 300 bytes. soda-mega never needs them, so :func:`load_yaml`
refuses any alias, naming the file and line. Nesting deeper than the parser's recursion is
refused too. (:func:`soda_mega.config.fields.short` is how every configuration message quotes a
user's value.)
"""

from __future__ import annotations

from typing import Any

import yaml

from soda_mega.config.fields import ConfigError, clip


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark | None, anchor: str) -> None:
        line = f"line {mark.line + 1}: " if mark is not None else ""
        super().__init__(f"{line}YAML alias *{anchor[:40]} refused: soda-mega files are plain "
                         "values; write the value out instead of referring to an anchor")


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops at the first alias, before it is resolved."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.start_mark, event.anchor)
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str) -> Any:
    """The value of the YAML document ``text`` (from ``source``, named in errors); aliases,
    merges and too-deep nesting are refused with a :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as err:
        raise ConfigError(f"{source}: {clip(str(err))}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: is not valid YAML: {clip(str(err))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a soda-mega file") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit limit
        raise ConfigError(f"{source}: is not valid YAML: {clip(str(err))}") from None
