"""Shared pytest set-up: GPU-marked tests skip cleanly on machines without CUDA; on CPU,
Triton kernels run through Triton's interpreter."""

from __future__ import annotations

import os
import sys

from soda_mega.utils.startup import import_torch_frozen

# A pytest process (the controller, each xdist worker) imports torch here first: frozen, the
# collector never walks its objects again (~1 s of CPU less per process, soda_mega/utils/startup.py).
import_torch_frozen()
import torch  # noqa: E402

# NOTE: Triton decides at import time whether its own language functions (tl.zeros, ...) are
# interpreted; test modules of other folders import triton (through Megatron-core) while they
# are collected, before tests/kernels/conftest.py is read. So the interpreter is chosen here,
# before anything imports triton. Nothing but the Triton kernels can run Triton on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Test helper modules (tolerances, workers) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))


# pytest-xdist workers (scripts/bootstrap.sh runs three on the 2 cores of CI) compute on one
# thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The test modules of the real Slurm (tests marked ``slurm``): one worker runs them all, in turn,
# as they share one session cluster (its slurmd ports, tests/slurm_cluster.py).
_SLURM_MODULES = (
    "tests/data/test_build_slurm.py",
    "tests/launchers/test_slurm_train.py",
    "tests/scaling/test_sweep_slurm.py",
)
# The work units that take longest (seconds in a one-process run on the 2-core CI machine). They
# start first, so that the workers end together instead of one finishing a long module
# alone at the end. Only the wall time depends on this list.
_LONGEST_FIRST = (
    "slurm",  # 210 s, mostly waiting for Slurm's time limits and requeues
    "tests/checkpoint/test_stop_during_save.py",  # 260 s, mostly waiting for signals and writes
    "tests/training/test_runtime_faults.py",  # 128 s
    "tests/training/test_train_runs.py",  # 126 s
    "tests/checkpoint/test_recovery.py",  # 122 s
    "tests/benchmarks/test_gpu_campaign.py",  # 65 s
    "tests/benchmarks/test_bench_kernels.py",  # 41 s
    "tests/training/test_train_remote.py",  # 35 s
    "tests/kernels/test_compile_check.py",  # 33 s
    "tests/data/test_empty_valid.py",  # 60 s
    "tests/launchers/test_launchers.py",  # 60 s
)


def work_unit(nodeid: str) -> str:
    """What one pytest-xdist worker runs as a whole: a test module, so that its module fixtures
    are built once, or all the Slurm modules together."""
    module = nodeid.split("::", 1)[0]
    return "slurm" if module in _SLURM_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules to each worker (pytest-xdist's ``loadscope`` with ``work_unit`` for scope),
    handed out in collection order: the longest first."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    strays = sorted({item.nodeid.split("::", 1)[0] for item in items
                     if item.get_closest_marker("slurm") and work_unit(item.nodeid) != "slurm"})
    if strays:
        raise pytest.UsageError(f"tests/conftest.py: add {strays} to _SLURM_MODULES (their tests "
                                "are marked slurm and must share the Slurm worker)")
    rank = {unit: i for i, unit in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_SESSION_LAYOUT: list = []  # the layout megatron_one_process set up, once it has


@pytest.fixture(scope="session")
def megatron_one_process():
    """Megatron-core parallel state for TP=PP=DP=1 inside the pytest process (gloo, 1 rank)."""
    from soda_mega.config.schema import ParallelConfig
    from soda_mega.parallel import state

    layout = state.initialize(ParallelConfig(), seed=1234)
    _SESSION_LAYOUT.append(layout)
    yield layout
    _SESSION_LAYOUT.clear()
    state.shutdown()


@pytest.fixture(autouse=True)
def _megatron_one_process_kept():
    """An in-process command (``eval nll``, ``train``) sets up its own layout and tears it down
    when it ends; the session's TP=PP=DP=1 state is put back for the tests that come after."""
    yield
    if not _SESSION_LAYOUT:
        return
    from megatron.core import parallel_state as ps

    from soda_mega.config.schema import ParallelConfig
    from soda_mega.parallel import state

    if not ps.model_parallel_is_initialized() or state.current_layout() != _SESSION_LAYOUT[0]:
        state.initialize(ParallelConfig(), seed=1234)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto, its own process) on 127.0.0.1 for the whole session.

    The endpoint and dummy credentials are exported into this process's environment (which
    mosaicml-streaming and boto3 read) and given to subprocesses by ``s3_server.env()``."""
    from s3_server import serving

    with serving() as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """The data loader's node cache (decompressed shards, remote files, shard token totals) in
    the session's temporary folder, also for the subprocesses tests launch."""
    if "SODA_MEGA_CACHE" in os.environ:
        yield
        return
    os.environ["SODA_MEGA_CACHE"] = str(tmp_path_factory.mktemp("soda-mega-cache"))
    yield
    os.environ.pop("SODA_MEGA_CACHE", None)


def tree_fingerprint(root) -> dict:
    """{relative path: (size, sha256)} of every file under ``root``: a shared fixture compares
    it at the end of the session, so a test that changed what others read fails instead of
    passing its change on."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def golden_corpus(tmp_path_factory):
    """The golden tiny run's corpus (tests/tiny_golden.py), written once for every test that
    trains on it (the training runs, the runtime faults, the Slurm launcher and sweep). READ
    ONLY: copy it before changing anything; a change fails the session's last user."""
    from tiny_golden import write_corpus

    root = write_corpus(tmp_path_factory.mktemp("golden-corpus"))
    before = tree_fingerprint(root)
    yield root
    assert tree_fingerprint(root) == before, f"a test changed the shared corpus {root}"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node Slurm cluster on this machine for the whole session (tests marked
    ``slurm``): installed with apt-get when missing (root only), otherwise the tests skip saying
    why. Its daemons are stopped at the end of the session (tests/slurm_cluster.py)."""
    import shutil
    import tempfile
    from pathlib import Path

    from slurm_cluster import SlurmUnavailable, ensure_installed, running_cluster

    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    # NOTE: a short folder: slurmd's step sockets live there, and socket paths have 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    try:
        with running_cluster(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """End what the tests left running, and say so.

    A process a test leaves behind (a DataLoader worker of an iterator a traceback kept alive, a
    server) keeps the session from ending: pytest's exit waits for its multiprocessing children,
    and any process holding the output pipe keeps CI waiting. This ends them and names them; the
    test that started one has a bug to fix. Under pytest-xdist each worker ends its own; the
    controller's children are the workers themselves, which xdist ends."""
    import psutil

    if session.config.pluginmanager.has_plugin("dsession"):  # the xdist controller
        return
    me = psutil.Process()
    left = []
    for child in me.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.resource_tracker" in cmd:  # ends by itself with this process
            continue
        left.append((child, cmd))
    if not left:
        return
    _, alive = psutil.wait_procs([c for c, _ in left], timeout=5)  # some are just ending
    for child in alive:
        child.kill()
    if alive:
        names = "\n".join(f"  pid {c.pid}: {cmd[:200]}" for c, cmd in left if c in alive)
        text = f"\nconftest: {len(alive)} process(es) outlived their tests and were killed:\n{names}"
        worker_output = getattr(session.config, "workeroutput", None)
        if worker_output is not None:  # an xdist worker: the controller prints it
            worker_output["outlived"] = text
        else:
            session.config.get_terminal_writer().line(text, yellow=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The xdist controller prints what a worker's ``pytest_sessionfinish`` had to end."""
    text = getattr(node, "workeroutput", {}).get("outlived")
    if text:
        node.config.get_terminal_writer().line(f"\n[{node.gateway.id}] {text.lstrip()}", yellow=True)
