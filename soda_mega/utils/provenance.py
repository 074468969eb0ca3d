"""Where a measurement came from: device, driver, library versions and git commit.

Every benchmark result file carries this stamp, so a number can always be traced to the
machine and code that produced it (and a CPU smoke run can never pass for a GPU figure).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

_PACKAGES = ("torch", "triton", "megatron-core", "numpy", "mosaicml-streaming", "moshi",
             "nvidia-ml-py", "flash-attn", "liger-kernel", "cut-cross-entropy")


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """Commit hash of the working tree (with ``-dirty`` when it has changes), or ``unknown``."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _device() -> dict:
    if not torch.cuda.is_available():
        return {"kind": "cpu", "name": platform.processor() or platform.machine(),
                "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    info = {"kind": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - a missing driver library only loses this one field
        info["driver"] = "unknown"
    return info


def stamp() -> dict:
    """Provenance record for a result file."""
    return {
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": _device(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` plus the provenance stamp atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"provenance": stamp(), **payload}, indent=1))
    os.replace(tmp, path)
    return path
