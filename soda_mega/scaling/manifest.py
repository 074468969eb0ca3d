"""The sweep manifest: the contract between ``scaling grid`` (writes it) and ``scaling sweep``.

``manifest.json`` holds the grid settings it was made from, the conventions of its numbers,
one :class:`ManifestRun` per run (with the path of the run's config file, relative to the
manifest's folder) and the candidate shapes that were dropped, with the reason. It carries the
provenance stamp of :func:`soda_mega.utils.provenance.write_json` (commit, versions, time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soda_mega.errors import SodaUserError
from soda_mega.utils import strict_json
from soda_mega.utils.provenance import write_json
from soda_mega.utils.shell import UnsafeValueError, plain_name, relative_plain_path

FORMAT = "soda-mega-scaling-manifest/1"

N_PARAMS_CONVENTION = ("n_params = non-embedding parameters + the untied output layer over the "
                       "unpadded vocabulary (SODA's size label); n_params_total adds the input "
                       "embedding")
FLOPS_CONVENTION = ("exact = matmul FLOPs per token with full (non-causal) attention at seq_length, "
                    "LM head over the unpadded vocabulary, training = 3 x forward; "
                    "6n = 6 * n_params per token")


class ManifestError(SodaUserError, ValueError):
    """A manifest file is missing, malformed or of another format."""


@dataclass(frozen=True)
class ManifestRun:
    """One IsoFLOP run: shape, hyper-parameters, tokens and FLOPs, where its files go."""

    run_id: str
    budget: float
    flops_mode: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    seq_length: int
    batch_size: int
    micro_batch_size: int
    steps: int
    tokens: int
    lr: float
    lr_uncapped: float
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    n_params: int
    n_params_total: int
    n_non_embedding: int
    tokens_per_param: float
    flops_per_token_exact: float
    flops_per_token_6n: float
    flops_exact: float
    flops_6n: float
    budget_error: float
    exact_over_6n: float
    config: str
    run_dir: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest; ``root`` is the folder the relative paths start from."""

    path: Path
    header: dict[str, Any]
    runs: list[ManifestRun]
    dropped: list[dict[str, Any]]

    @property
    def root(self) -> Path:
        return self.path.parent

    def config_path(self, run: ManifestRun) -> Path:
        return self.root / run.config

    def run_dir(self, run: ManifestRun) -> Path:
        return self.root / run.run_dir


def write_manifest(path: str | Path, header: dict[str, Any], runs: list[ManifestRun],
                   dropped: list[dict[str, Any]]) -> Path:
    """Write ``manifest.json`` atomically, stamped with provenance."""
    payload = {"format": FORMAT, **header, "n_params_convention": N_PARAMS_CONVENTION,
               "flops_convention": FLOPS_CONVENTION, "runs": [r.to_dict() for r in runs],
               "dropped": dropped}
    return write_json(path, payload)


def _kind(value: Any) -> str:
    return type(value).__name__


# The Python types a manifest's JSON may hold for each field type of ManifestRun.
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


def _checked_run(path: Path, i: int, run: ManifestRun) -> ManifestRun:
    """The run when every field has its type, its id is a plain name and its config and run
    folder are relative paths of plain names: they become file paths and torchrun / sbatch
    arguments, and a manifest may come from elsewhere."""
    for f in dataclasses.fields(ManifestRun):
        value = getattr(run, f.name)
        if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[str(f.type)]):
            raise ManifestError(f"{path}: runs[{i}].{f.name} must be {'a number' if f.type == 'float' else f.type}, "
                                f"got {type(value).__name__} {str(value)[:40]!r}")
    try:
        plain_name(run.run_id, f"runs[{i}].run_id")
        relative_plain_path(run.config, f"runs[{i}].config")
        relative_plain_path(run.run_dir, f"runs[{i}].run_dir")
    except UnsafeValueError as err:
        raise ManifestError(f"{path}: {err}") from None
    return run


def read_manifest(path: str | Path) -> Manifest:
    """Load and check a manifest; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest (make one with `soda-mega scaling grid --out DIR`)")
    try:
        data = strict_json.read_file(path)
    except strict_json.JSONProblem as err:
        raise ManifestError(f"{path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ManifestError(f"{path}: not a scaling manifest (format {found!r}, expected {FORMAT!r})")
    names = [f.name for f in dataclasses.fields(ManifestRun)]
    runs = []
    rows = data.get("runs", [])
    if not isinstance(rows, list):
        raise ManifestError(f"{path}: runs must be a list of run objects, got {_kind(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ManifestError(f"{path}: runs[{i}] must be an object, got {_kind(row)}")
        missing = [n for n in names if n not in row]
        if missing:
            raise ManifestError(f"{path}: run {i} lacks {', '.join(missing)}")
        runs.append(_checked_run(path, i, ManifestRun(**{n: row[n] for n in names})))
    ids = [r.run_id for r in runs]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ManifestError(f"{path}: run ids appear twice: {', '.join(duplicated)}")
    header = {k: v for k, v in data.items() if k not in ("runs", "dropped")}
    if not isinstance(header.get("grid", {}), dict):
        raise ManifestError(f"{path}: grid must be an object of grid settings, got {_kind(header['grid'])}")
    dropped = data.get("dropped", [])
    if not isinstance(dropped, list):
        raise ManifestError(f"{path}: dropped must be a list of dropped candidates, got {_kind(dropped)}")
    for i, row in enumerate(dropped):
        if not isinstance(row, dict):
            raise ManifestError(f"{path}: dropped[{i}] must be an object, got {_kind(row)}")
    return Manifest(path=path, header=header, runs=runs, dropped=dropped)
