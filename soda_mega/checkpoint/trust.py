"""Reading a checkpoint without running code it carries.

Checkpoints travel (shared folders, downloads, colleagues' runs), so every file of one is
treated as data from a stranger. Python's pickle can call any function while it loads, and
three kinds of file in a checkpoint are pickles:

- ``rng/rank<r>.pt`` (ours) and Megatron's ``common.pt``: ``torch.save`` files of tensors and
  plain containers, read with ``torch.load(weights_only=True)`` (no code, no arbitrary class);
- ``.metadata`` of ``torch.distributed.checkpoint``: a plain pickle that torch reads with
  ``pickle.load``. It is checked first with an unpickler that admits only the checkpoint
  metadata classes (dataclasses and enums of ``torch.distributed.checkpoint``), ``torch.Size``,
  dtypes and layouts; the same bytes then build only those objects when torch reads them;
- "bytes" entries inside ``.distcp`` files (Megatron's ``_extra_state`` objects), which torch
  reads with ``torch.load(weights_only=False)``: each is checked with ``weights_only=True``
  first. (Tensor entries torch already reads with ``weights_only=True``.)

``trainer_state.json`` and ``metadata.json`` are JSON. :func:`vet_checkpoint` runs these checks on
every file a load opens, before anything is loaded; a file that fails is refused with a
:class:`CheckpointError` that names it.

Every file a load opens, and every file ``manifest.json`` names, must also be a regular file
inside the checkpoint folder (:func:`inside_file`): no absolute or ``..`` paths, no symlink that
leads out, no device or FIFO (``/dev/zero`` would be hashed forever, a FIFO would block).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import pickle
from pathlib import Path, PurePosixPath

import torch

from soda_mega.checkpoint.errors import CheckpointError, DamagedCheckpoint
from soda_mega.utils import strict_json
from soda_mega.utils.files import kind_of, not_regular

DCP_METADATA = ".metadata"
COMMON_FILE = "common.pt"
MEGATRON_META = "metadata.json"
RNG_DIR = "rng"

_TRUST = ("soda-mega loads only tensors, plain values, JSON and checkpoint metadata from a "
          "checkpoint and never runs code stored in it")
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("collections", "OrderedDict")}


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if text.startswith("Weights only load failed"):
        # torch's advice in this message is to load with weights_only=False: not ours to give.
        found = [line.strip() for line in text.splitlines()
                 if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
        return found[0][:300] if found else "not a plain tensor file"
    return text.splitlines()[0][:300]


def clip(text: str, limit: int = 120) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters (names from a file in a message)."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + "...'"


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file of a checkpoint folder (relative, canonical, no ``..``), or
    None when it can."""
    if not isinstance(name, str) or not name:
        return f"is not a file name (a {type(name).__name__})"
    if "\x00" in name:
        return "holds a NUL character"
    pure = PurePosixPath(name)
    if pure.is_absolute():
        return "is an absolute path, outside the checkpoint folder"
    if ".." in pure.parts:
        return "climbs out of the checkpoint folder with '..'"
    if str(pure) != name or "." in pure.parts:
        return "is not a plain relative path ('.', '//' or a trailing '/')"
    return None


def inside_file(step_dir: Path, name: str, source: str = "file") -> Path | None:
    """``step_dir/name`` when it is a regular file inside ``step_dir`` (symlinks followed), None
    when it does not exist (a dangling link included); anything else (see :func:`name_problem`,
    a symlink leading out, a device, FIFO or folder) is refused with a :class:`CheckpointError`
    naming the checkpoint, ``source`` (what names it: "file", "manifest.json entry", ...) and
    the name."""
    step_dir = Path(step_dir)
    problem = name_problem(name)
    if problem is None:
        path = step_dir / name
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError):
            real, problem = None, "is a symlink loop or cannot be resolved"
        if real is not None:
            home = step_dir.resolve()
            if real != home and home not in real.parents:
                problem = f"leads out of the checkpoint folder (to {clip(str(real))})"
            elif kind := kind_of(os.stat(real).st_mode):
                problem = f"is {kind}, not a regular file"
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {step_dir}: {source} {clip(str(name))} {problem}; refused: a checkpoint "
            f"holds only regular files inside its folder; {_TRUST}")
    return path


def _regular(path: Path) -> None:
    """Refuse ``path`` when it exists but is not a regular file (a FIFO blocks, a device never
    ends)."""
    problem = not_regular(path)  # None when missing: the reader says so
    if problem:
        raise CheckpointError(f"{path}: refused: {problem} (a FIFO would block, a device never "
                              f"ends); {_TRUST}")


def read_json(path: Path) -> dict:
    """A JSON object file of a checkpoint; anything else is refused, naming the file."""
    _regular(Path(path))
    try:
        value = strict_json.read_file(path)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing; the checkpoint is incomplete") from None
    except strict_json.JSONProblem as err:
        raise DamagedCheckpoint(f"{path}: {err}; the file is damaged or was replaced; "
                                f"{_TRUST}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# trainer_state.json: field -> (what it must be, the test, required). The trainer writes all
# of them; a weights-only checkpoint (import hf) has step, tokens, weights_only, provenance
# and config.
_STATE_FIELDS = {
    "step": ("an integer >= 0", lambda v: type(v) is int and v >= 0, True),
    "config": ("an object (the run's configuration)", lambda v: isinstance(v, dict), True),
    "tokens": ("an integer >= 0", lambda v: type(v) is int and v >= 0, False),
    "bad_steps": ("an integer >= 0", lambda v: type(v) is int and v >= 0, False),
    "weights_only": ("true or false", lambda v: isinstance(v, bool), False),
    "previous": ("a checkpoint folder name or null", lambda v: v is None or isinstance(v, str), False),
    "loader": ("an object", lambda v: isinstance(v, dict), False),
    "provenance": ("an object", lambda v: isinstance(v, dict), False),
}


def check_state(state: dict, path: Path) -> dict:
    """``state`` (``trainer_state.json`` at ``path``) when each field soda-mega reads has its
    type; otherwise :class:`DamagedCheckpoint` naming the file and the field."""
    for name, (what, ok, required) in _STATE_FIELDS.items():
        if name not in state:
            if required:
                raise DamagedCheckpoint(f"{path}: has no {name!r} field; the file is damaged or "
                                        f"was replaced")
            continue
        if not ok(state[name]):
            shown = (repr(state[name])[:60] if isinstance(state[name], (str, int, float, bool))
                     else f"a {type(state[name]).__name__}")
            raise DamagedCheckpoint(f"{path}: {name} must be {what}, got {shown}; the file is "
                                    f"damaged or was replaced")
    return state


def load_plain(path: Path, source=None, hint: str = ""):
    """``torch.load(weights_only=True)`` of ``path`` (or of ``source``, bytes read from it)."""
    if source is None:
        _regular(Path(path))
    try:
        return torch.load(source if source is not None else path, map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as err:
        if not str(err).startswith("Weights only load failed"):
            raise DamagedCheckpoint(f"{path}: damaged or truncated ({_first_line(err)})") from None
        raise CheckpointError(
            f"{path}: refused: it holds a pickle that would build objects other than tensors and "
            f"plain values, or run code, when loaded ({_first_line(err)}); {_TRUST}{hint}") from None
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing; the checkpoint is incomplete") from None
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        raise DamagedCheckpoint(f"{path}: damaged or truncated ({_first_line(err)})") from None


def _admitted(module: str, name: str) -> bool:
    if (module, name) in _DCP_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    return False


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something that is not checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _admitted(module, name):
            raise _Refused(f"global {module}.{name} is not checkpoint metadata")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not checkpoint metadata")


def read_dcp_metadata(step_dir: Path):
    """The ``torch.distributed.checkpoint`` metadata of ``step_dir``, read without running code."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(step_dir) / DCP_METADATA
    inside_file(step_dir, DCP_METADATA)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing; the checkpoint is incomplete") from None
    except _Refused as err:
        raise CheckpointError(f"{path}: refused: not plain checkpoint metadata ({err}); "
                              f"{_TRUST}") from None
    except Exception as err:  # noqa: BLE001 - any other failure of a damaged pickle stream
        raise DamagedCheckpoint(f"{path}: damaged or truncated ({_first_line(err)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: refused: holds a {type(metadata).__name__}, not checkpoint "
                              f"metadata")
    return metadata


def check_dcp_objects(step_dir: Path, metadata) -> None:
    """Check each non-tensor ("bytes") entry of the ``.distcp`` files as torch will read it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step_dir = Path(step_dir)
    byte_keys = {k for k, v in metadata.state_dict_metadata.items()
                 if isinstance(v, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        name = Path(info.relative_path) if isinstance(info.relative_path, str) else None
        if name is None or name.name != info.relative_path or name.name in ("", ".", ".."):
            raise CheckpointError(f"{step_dir / DCP_METADATA}: refused: names the data file "
                                  f"{clip(str(info.relative_path))} outside the checkpoint folder")
        inside_file(step_dir, info.relative_path, f"{DCP_METADATA} data file")
        if index.fqn not in byte_keys:
            continue
        path = step_dir / name
        if info.transform_descriptors:
            raise CheckpointError(f"{path}: refused: entry {index.fqn} is stored with transforms "
                                  f"{info.transform_descriptors}, which soda-mega never writes")
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as err:
            raise DamagedCheckpoint(f"{path}: unreadable ({err})") from None
        if len(data) != info.length:
            raise DamagedCheckpoint(f"{path}: truncated (entry {index.fqn} ends past the end of the "
                                  f"file)")
        load_plain(path, io.BytesIO(data))


def rng_files(step_dir: Path) -> list[Path]:
    folder = Path(step_dir) / RNG_DIR
    return sorted(folder.glob("rank*.pt")) if folder.is_dir() else []


RNG_HINT = ("; if this is a checkpoint you trust from an older soda-mega, delete its rng/ folder: "
            "the RNG state is only restored in the same layout, and SODA's recipe has no dropout")


def vet_checkpoint(step_dir: Path, state_file: str, files: list[Path] | None = None) -> None:
    """Refuse ``step_dir`` if any file a load opens is not plain data (see the module docstring).

    ``files`` limits the per-rank files (``rng/``) to those given (each rank checks a share).
    """
    step_dir = Path(step_dir)
    for name in (state_file, MEGATRON_META, COMMON_FILE):
        inside_file(step_dir, name)
    for path in rng_files(step_dir) if files is None else files:
        inside_file(step_dir, str(Path(path).relative_to(step_dir)))
    read_json(step_dir / state_file)
    if (step_dir / MEGATRON_META).exists():
        read_json(step_dir / MEGATRON_META)
    check_dcp_objects(step_dir, read_dcp_metadata(step_dir))
    if (step_dir / COMMON_FILE).exists():
        load_plain(step_dir / COMMON_FILE)
    for path in rng_files(step_dir) if files is None else files:
        load_plain(path, hint=RNG_HINT)
