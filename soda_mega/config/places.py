"""Settings that name places of this machine come from its user, never from a file made elsewhere.

A checkpoint's ``trainer_state.json`` records the whole configuration of the run that wrote it,
and a scaling manifest comes with one config file per run; either may come from another machine
or another person. A few fields name places of the machine that reads them: ``data.cache_dir``
and ``data.cache_limit`` decide which folder the node's data cache writes into and evicts from,
``run.dir`` where a run writes (and moves aside) checkpoints and logs. Taken from such a file,
they would let it write or delete files here. So a checkpoint's configuration is read without
them (:func:`without_node_settings`) and a sweep pins them on each run's command line
(:func:`node_setting_overrides`): the user's command line, else the defaults, decide them, and
one line says what was left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from soda_mega.config.fields import short
from soda_mega.config.schema import SodaConfig

#: (section, field) of every setting that names a place or a budget of this machine.
NODE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("data", "cache_dir"),
    ("data", "cache_limit"),
    ("run", "dir"),
)


def _default(section: str, key: str) -> Any:
    return getattr(getattr(SodaConfig(), section), key)


def without_node_settings(data: Mapping[str, Any]) -> tuple[dict, dict[str, Any]]:
    """(``data``, a ``{section: {key: value}}`` mapping, without the node settings; those of
    them it set to something other than the default, by ``section.key``)."""
    kept = {name: dict(values) if isinstance(values, Mapping) else values
            for name, values in data.items()}
    dropped: dict[str, Any] = {}
    for section, key in NODE_SETTINGS:
        values = kept.get(section)
        if isinstance(values, dict) and key in values:
            value = values.pop(key)
            if value != _default(section, key):
                dropped[f"{section}.{key}"] = value
    return kept, dropped


def node_settings_of(cfg: SodaConfig) -> dict[str, Any]:
    """The node settings ``cfg`` sets to something other than the default, by ``section.key``."""
    return {f"{section}.{key}": getattr(getattr(cfg, section), key)
            for section, key in NODE_SETTINGS
            if getattr(getattr(cfg, section), key) != _default(section, key)}


def node_setting_overrides(skip: Iterable[str] = ()) -> list[str]:
    """``--section.key=DEFAULT`` for every node setting but those named in ``skip``: put before
    the user's own overrides, they replace whatever a config file made elsewhere set."""
    skipped = set(skip)
    out = []
    for section, key in NODE_SETTINGS:
        if f"{section}.{key}" not in skipped:
            value = _default(section, key)
            out.append(f"--{section}.{key}={'none' if value is None else value}")
    return out


# NOTE: every checkpoint and every run config of a grid records its run folder, and no command
# that reads one uses it (evaluations write no run folder, a sweep passes its own --run.dir):
# naming it each time would be noise, so notices leave it out.
_SILENT = ("run.dir",)


def ignored_notice(source: str, dropped: Mapping[str, Any]) -> str | None:
    """One line: ``source`` set these node settings, which are not used (None when there is
    nothing worth saying)."""
    dropped = {name: value for name, value in dropped.items() if name not in _SILENT}
    if not dropped:
        return None
    shown = ", ".join(f"{name}={short(value, 200)}" for name, value in dropped.items())
    flags = " ".join(f"--{name}=..." for name in dropped)
    return (f"{source} sets {shown}: not used (settings that name places of this machine come "
            f"only from your command line, e.g. {flags}, else the defaults)")
