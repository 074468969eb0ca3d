"""Shared pieces of the hostile-input tests (checkpoints, codec weights, configs, HF folders).

* :func:`tiny_checkpoint`: one seeded tiny checkpoint per test session (built once, under
  pytest's base temporary folder); :func:`hostile_copy` gives a test its own copy (hard links,
  so a planted file must replace its link, never write through it).
* :class:`Evil`: a pickle whose ``__reduce__`` creates a marker file when it is loaded.
* :func:`run_cli`: ``soda-mega ARGV`` in a fresh process with a timeout, so a regression that
  hangs (hashing ``/dev/zero``, reading a FIFO) fails the test instead of stalling the suite;
  :func:`run_cli_cases` runs many commands in one fresh process (one Megatron import), each
  under its own alarm (run as a script, this file is that process).
* :func:`tiny_dataset`: a one-split synthetic speech dataset (audio documents), cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np


class Evil:
    """Loading this pickle runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_checkpoint(tmp_path_factory) -> Path:
    """The ``step_00000000`` folder of a tiny weights-only checkpoint, shared by the session."""
    from checkpoint_helpers import make_tiny_checkpoint

    root = tmp_path_factory.getbasetemp() / "sec-tiny-checkpoint"
    step = root / "step_00000000"
    if not (step / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_tiny_checkpoint(root, 0)
    return step


def hostile_copy(step: Path, dest: Path) -> Path:
    """A copy of the checkpoint folder ``step`` at ``dest`` (files hard-linked)."""
    shutil.copytree(step, dest, copy_function=os.link)
    return dest


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` without touching the file it may be a hard link of."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def with_data_field(source: Path, dest: Path, field: str, value: str) -> Path:
    """A copy of the checkpoint ``source`` whose configuration's ``data.<field>`` is ``value``
    (what someone else's checkpoint may record), its manifest signed again."""
    from soda_mega.checkpoint.manifest import write_manifest

    step = hostile_copy(source, dest)
    state = json.loads((step / "trainer_state.json").read_text())
    state["config"]["data"][field] = value
    replace_file(step / "trainer_state.json", json.dumps(state))
    replace_file(step / "manifest.json", b"")
    write_manifest(step)
    return step


def edit_manifest(step: Path, edit) -> None:
    """Apply ``edit(manifest_dict)`` to ``step/manifest.json``."""
    manifest = json.loads((step / "manifest.json").read_text())
    edit(manifest)
    replace_file(step / "manifest.json", json.dumps(manifest))


def _child_env() -> dict:
    from launch_env import clean_env

    return clean_env()


def run_cli(argv: list[str], timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``soda-mega ARGV`` in a fresh process; raises ``subprocess.TimeoutExpired`` (the child is
    killed) when it runs past ``timeout`` seconds."""
    full_env = {**_child_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "soda_mega.cli", *argv], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


def _address_space_limit(limit: int):
    """A ``preexec_fn`` capping the child's address space at ``limit`` bytes."""
    def cap() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return cap


def run_cli_cases(argvs: list[list[str]], tmp: Path, each: float = 60,
                  timeout: float = 600, env: dict | None = None,
                  memory_limit: int | None = None) -> list[dict]:
    """Run each ``soda-mega ARGV`` of ``argvs`` in one fresh process; each result is
    ``{"rc": int or "timeout", "stderr": str}`` (a case past ``each`` seconds is interrupted).
    ``memory_limit``: the process's address space in bytes (RLIMIT_AS), so that a regression
    that allocates a huge model fails at once instead of eating the machine."""
    cases, results = tmp / "cases.json", tmp / "results.json"
    cases.write_text(json.dumps({"each": each, "argvs": argvs}))
    proc = subprocess.run([sys.executable, __file__, str(cases), str(results)],
                          capture_output=True, text=True, env={**_child_env(), **(env or {})},
                          timeout=timeout,
                          preexec_fn=_address_space_limit(memory_limit) if memory_limit else None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(results.read_text())


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error`` line of a refused command (asserts there is no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()
             or "refused" in line.lower()]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


def tiny_dataset(root: Path, num_docs: int = 4) -> Path:
    """A synthetic speech dataset (``train`` and ``valid``) of the tiny preset's vocabulary."""
    from checkpoint_helpers import tiny_config
    from soda_mega.data.write.synthetic import write_split
    from soda_mega.tokens.layout import VocabLayout

    layout = VocabLayout.from_config(tiny_config().vocab)
    for split in ("train", "valid"):
        # whole frames, codebooks 0..K-1 in order (frame-major), so a document's audio decodes
        body = np.asarray([layout.audio_base + k * layout.codebook_size + (i % 7)
                           for i in range(16) for k in range(layout.num_codebooks)], np.int32)
        docs = [np.concatenate([[layout.bos_id], body, [layout.eos_id]]).astype(np.int32)
                for _ in range(num_docs)]
        write_split(root / split, layout, docs, "speech", split=split)
    return root


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """A short mono 16-bit WAV of a tone."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


class _Alarm(BaseException):
    """A case ran past its time (BaseException: no ``except Exception`` of the code swallows it)."""


def _worker(cases_path: str, results_path: str) -> None:
    import contextlib
    import io
    import signal
    import traceback

    from soda_mega.cli import main as cli

    spec = json.loads(Path(cases_path).read_text())

    def alarm(*_):
        raise _Alarm()

    signal.signal(signal.SIGALRM, alarm)
    results = []
    for argv in spec["argvs"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            signal.alarm(int(spec["each"]))
            try:
                rc = cli(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except _Alarm:
                rc = "timeout"
            except BaseException:  # noqa: BLE001 - reported to the test, which names the case
                traceback.print_exc()
                rc = 1
            finally:
                signal.alarm(0)
        results.append({"rc": rc, "stderr": err.getvalue()})
        try:
            from soda_mega.parallel import state

            state.shutdown()
        except Exception:  # noqa: BLE001 - nothing was initialised
            pass
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: launch_env
    _worker(sys.argv[1], sys.argv[2])
