"""The fused loss's training design and GEMM engine, chosen by measuring on the device.

The roofline of :mod:`.flce_roofline` rates the two designs (three matmuls with the gradient
in the forward; recompute with four) with datasheet peaks and *assumed* efficiencies, and at
H = 2048 / 2560 the two are within 10-15% of each other in the model: too close for a model
to call. ``loss_plan`` (``kernels.loss_plan``) decides how the choice is made:

============  ==============================================================================
roofline      :func:`~.flce_plan.choose_train_plan`: on a GPU the computed roofline, on CPU
              and under Triton's interpreter three matmuls (the measured CPU choice)
recompute,    that design (three matmuls at the plan's chunk / group heights)
three_matmul
measure       time every candidate (design x GEMM engine, :mod:`.gemm_engine`) forward +
              backward on the first micro-batch of each new shape, on this device: one
              warm-up run (it also pays Triton's autotuning), then the median of
              :data:`REPS`; the winner is cached on disk and used from then on
auto          on a GPU ``measure`` (a cached answer is used when there is one); on CPU and
              under the interpreter ``roofline``. NOTE: on CPU a measured choice would hang
              on the timing noise of a shared machine, and the two designs round
              differently, so a CPU run (CI's golden loss trace) would no longer be
              reproducible; the CPU measure of ``bench_kernels`` has three matmuls ahead.
============  ==============================================================================

``gemm_engine`` (``auto`` / ``triton`` / ``torch``) fixes the engine of the plain GEMMs or,
with ``auto``, lets a measuring plan measure both (otherwise ``auto`` is ``triton``). With
``impl="torch"`` every GEMM already runs in torch and only the designs are candidates.

Measuring runs the public function itself on the same inputs, with the weight's gradient
going to a scratch fp32 buffer (a weight-sized allocation while it runs, freed afterwards):
the real ``main_grad`` and the autograd graph are untouched. Under tensor parallelism every
rank must take the same path (the designs' collectives differ): the ranks first agree on
whether all of them hold the same cached answer (one small MAX all-reduce); if not, all of
them measure, take the MAX over ranks of each candidate's time (the step waits for the
slowest rank) and so pick the same winner. Data-parallel replicas decide on their own; both
designs compute the same gradients up to rounding.

The cache (like Triton's autotune cache) is one small JSON file per key in
``$SODA_KERNELS_CACHE``, else ``<$TMPDIR or /tmp>/soda-mega-<uid>/kernel-cache`` (beside the
data cache's default ``data-cache``). The key: device name (CPU model and thread count on
CPU), torch and Triton versions, the soda_kernels version and a hash of its sources, the
shape (N, H, V_local, TP size), dtype, ``impl``, ``main_grad``, the slice / chunk sizes and
the candidate list. Files are written atomically (a unique temporary file, then a rename); a
file that cannot be read, does not parse, belongs to another user or holds another key is
ignored with one warning and measured again. Each decision is logged once at INFO on the
``soda_kernels.flce`` logger, beside the roofline's prediction::

    loss plan for (N=8192, H=2048, V=144644, tp=1): measured recompute/triton 51.2 ms,
    recompute/torch 49.8 ms, ... -> recompute/torch (roofline predicted three_matmul)

(times invented for the example: this module has made no GPU measurement yet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

from soda_kernels._vocab_parallel import group_rank_size, interpreting
from soda_kernels.flce_roofline import TrainPlan
from soda_kernels.gemm_engine import ENGINES

LOG = logging.getLogger("soda_kernels.flce")
DESIGNS = ("recompute", "three_matmul")
MODES = ("auto", "measure", "roofline") + DESIGNS
ENGINE_CHOICES = ("auto",) + ENGINES
#: Untimed runs before timing (the first pays Triton's autotuning and compilation).
WARMUP = 1
#: Timed forward + backward runs per candidate; the median counts.
REPS = 3
CACHE_FORMAT = "soda_kernels loss plan v1"


@dataclass
class Decision:
    """One choice made in this process: ``source`` is ``measured`` or ``cache``."""

    key: dict
    choice: tuple[str, str]
    source: str
    times_s: dict = field(default_factory=dict)  # candidate label -> seconds (max over ranks)
    prior: str = ""
    path: str | None = None

    def line(self) -> str:
        k = self.key
        shape = f"(N={k['tokens']}, H={k['hidden']}, V={k['vocab_local']}, tp={k['tp']})"
        times = ", ".join(f"{name} {t * 1e3:.3g} ms" for name, t in self.times_s.items())
        return (f"loss plan for {shape}: {self.source} {times} -> {_label(self.choice, k)} "
                f"({self.prior})")


#: Every decision of this process, in order (tests count ``measured`` ones; benchmarks read
#: the last).
DECISIONS: list[Decision] = []
_MEMO: dict = {}
_WARNED: set = set()


def forget() -> None:
    """Drop this process's remembered choices (the view of a fresh process; tests)."""
    _MEMO.clear()


def check_choices(loss_plan: str, gemm_engine: str) -> None:
    if loss_plan not in MODES:
        raise ValueError(f"loss_plan must be one of {', '.join(MODES)}, got {loss_plan!r}")
    if gemm_engine not in ENGINE_CHOICES:
        raise ValueError(f"gemm_engine must be one of {', '.join(ENGINE_CHOICES)}, got "
                         f"{gemm_engine!r}")


def default_engine(gemm_engine: str, impl: str) -> str:
    """The engine when nothing is measured: the one asked for, else Triton's matmul
    (``impl="torch"`` runs torch GEMMs whatever this says)."""
    if impl == "torch":
        return "torch"
    return "triton" if gemm_engine == "auto" else gemm_engine


def measures(mode: str, device: torch.device) -> bool:
    """Whether ``mode`` measures on ``device`` (``auto``: on a GPU, not in the interpreter)."""
    gpu = device.type == "cuda" and not interpreting()
    return mode == "measure" or (mode == "auto" and gpu)


def candidates(mode: str, gemm_engine: str, impl: str) -> list[tuple[str, str]]:
    designs = [mode] if mode in DESIGNS else list(DESIGNS)
    engines = ["torch"] if impl == "torch" else (
        list(ENGINES) if gemm_engine == "auto" else [gemm_engine])
    return [(d, e) for d in designs for e in engines]


def _label(choice: tuple[str, str], key: dict) -> str:
    """``design`` where the engine was not a candidate, else ``design/engine``."""
    engines = {c.split("/")[1] for c in key["candidates"]}
    return choice[0] if len(engines) == 1 else f"{choice[0]}/{choice[1]}"


# ============================================================================ the choice
def resolve_loss_plan(plan: TrainPlan, mode: str, gemm_engine: str, impl: str, call: dict,
                      fuse: bool, sizes_given: bool = False) -> tuple[TrainPlan, str]:
    """The design (``plan`` with its path set) and GEMM engine of one training-path call.

    ``plan``: :func:`~.flce_plan.choose_train_plan`'s (the prior, and the three-matmul
    sizes). ``call``: the keyword arguments of this :func:`fused_linear_cross_entropy` call
    (measuring re-runs it). ``sizes_given``: the caller fixed ``row_chunk`` / ``group_rows``,
    which forces three matmuls unless ``mode`` names a design."""
    engine = default_engine(gemm_engine, impl)
    if mode in DESIGNS:
        plan = _with_path(plan, mode, f"loss_plan={mode}")
    hidden = call["hidden"]
    if sizes_given or not measures(mode, hidden.device) or torch.compiler.is_compiling():
        return plan, engine
    cands = candidates(mode, gemm_engine, impl)
    if len(cands) == 1:
        return plan, engine
    weight, tp_group = call["weight"], call["tp_group"]
    _, tp = group_rank_size(tp_group)
    memo = (tuple(hidden.shape), tuple(weight.shape), weight.dtype, hidden.device, tp, impl,
            fuse, call["vocab_slice"], call["grad_h_slices"], plan.row_chunk, plan.group_rows,
            tuple(cands))
    if memo not in _MEMO:
        _MEMO[memo] = _decide(plan, cands, impl, call, fuse, tp)
    design, engine = _MEMO[memo]
    return _with_path(plan, design, f"loss_plan={mode}: {design}/{engine}"), engine


def _with_path(plan: TrainPlan, path: str, reason: str) -> TrainPlan:
    return plan if plan.path == path else dataclasses.replace(plan, path=path, reason=reason)


def _decide(plan: TrainPlan, cands: list, impl: str, call: dict, fuse: bool,
            tp: int) -> tuple[str, str]:
    hidden, weight = call["hidden"], call["weight"]
    group = call["tp_group"] if tp > 1 else None
    key = cache_key(hidden, weight, tp, impl, fuse, call, plan, cands)
    path = cache_dir() / f"flce-plan-{_digest(key)[:24]}.json"
    cached = _read(path, key, cands)
    index = cands.index(cached) if cached is not None else -1
    measure, agreed = _agree(index, group, hidden.device)
    prior = (f"roofline predicted {plan.path}" if plan.predicted
             else f"no roofline here; static choice {plan.path}")
    if not measure:
        decision = Decision(key, cands[agreed], "cache", _read_times(path), prior, str(path))
    else:
        times = _measure(cands, call, fuse, hidden.device, group)
        labels = [_label(c, key) for c in cands]
        best = min(range(len(cands)), key=lambda i: times[i])  # ties: the first, on every rank
        choice = cands[best] if times[best] < float("inf") else (plan.path, cands[0][1])
        decision = Decision(key, choice, "measured", dict(zip(labels, times)), prior, str(path))
        if times[best] < float("inf"):
            _write(path, decision)
    DECISIONS.append(decision)
    rank, _ = group_rank_size(group)
    if rank == 0:
        LOG.info(decision.line())
    return decision.choice


def _agree(index: int, group, device: torch.device) -> tuple[bool, int]:
    """``(measure, agreed index)``: measure unless every rank holds the same cached answer."""
    if group is None:
        return index < 0, index
    flags = torch.tensor([int(index < 0), index, -index], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    miss, high, neg_low = flags.tolist()  # NOTE: one host sync per new shape, not per step
    return bool(miss) or high != -neg_low, high


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(cands: list, call: dict, fuse: bool, device: torch.device, group) -> list[float]:
    """Median seconds of one forward + backward per candidate, the MAX over the TP ranks."""
    run = _runner(call, fuse)
    times = []
    for design, engine in cands:
        try:
            for _ in range(WARMUP):
                run(design, engine)
            reps = []
            for _ in range(REPS):
                _sync(device)
                t0 = time.perf_counter()
                run(design, engine)
                _sync(device)
                reps.append(time.perf_counter() - t0)
            times.append(statistics.median(reps))
        except torch.OutOfMemoryError:  # NOTE: a design that does not fit is not a choice
            LOG.warning("loss plan: %s/%s ran out of memory while measured; left out",
                        design, engine)
            times.append(float("inf"))
    if group is not None:
        t = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times = t.tolist()
    return times


def _runner(call: dict, fuse: bool) -> Callable[[str, str], None]:
    """One forward + backward of this call with a fixed design and engine, on the same
    inputs (detached: the caller's graph is untouched) and a scratch weight gradient."""
    from soda_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    hidden, weight, known = call["hidden"], call["weight"], call["known_grad"]
    h = hidden.detach().requires_grad_(hidden.requires_grad)
    if fuse:  # as Megatron DDP leaves it, with a scratch main_grad
        w = torch.nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
        w.main_grad = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    else:
        w = weight.detach().requires_grad_(weight.requires_grad)

    def run(design: str, engine: str) -> None:
        h.grad = w.grad = None
        if fuse:
            w.grad_added_to_main_grad = False
        out = fused_linear_cross_entropy(**dict(call, hidden=h, weight=w, loss_plan=design,
                                                gemm_engine=engine))
        out.loss.backward(known.detach().to(out.loss.dtype))

    return run


# ============================================================================ the cache
def cache_dir() -> Path:
    """``$SODA_KERNELS_CACHE``, else ``<$TMPDIR or /tmp>/soda-mega-<uid>/kernel-cache``."""
    env = os.environ.get("SODA_KERNELS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"soda-mega-{os.getuid()}" / "kernel-cache"


def device_label(device: torch.device) -> str:
    """The device name a measurement holds for: the GPU's name, or the CPU's model and the
    thread count (and Triton's interpreter, whose times are another thing again)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu {_cpu_model()} x{torch.get_num_threads()} threads"
            + (" (triton interpreter)" if interpreting() else ""))


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def source_version() -> str:
    """The soda-mega version and a hash of this package's sources (a code change re-measures)."""
    try:
        from importlib.metadata import version

        ver = version("soda-mega")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        ver = "source"
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{ver}+{digest.hexdigest()[:12]}"


def cache_key(hidden, weight, tp: int, impl: str, fuse: bool, call: dict, plan: TrainPlan,
              cands: list) -> dict:
    import triton

    return {"device": device_label(hidden.device), "torch": torch.__version__,
            "triton": triton.__version__, "soda_kernels": source_version(),
            "tokens": hidden.shape[0], "hidden": hidden.shape[1], "vocab_local": weight.shape[0],
            "num_real_vocab": call["num_real_vocab"],
            "dtype": str(weight.dtype).replace("torch.", ""), "tp": tp, "impl": impl,
            "main_grad": fuse, "vocab_slice": call["vocab_slice"],
            "grad_h_slices": call["grad_h_slices"], "row_chunk": plan.row_chunk,
            "group_rows": plan.group_rows, "candidates": [f"{d}/{e}" for d, e in cands]}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        LOG.warning("loss plan cache %s: %s", path, why)


def _read(path: Path, key: dict, cands: list) -> tuple[str, str] | None:
    """The cached choice for ``key``, or None (absent, or ignored with one warning)."""
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # no cache (yet): nothing to warn about
        return None
    except OSError as err:
        _warn_once(path, f"cannot be read ({err}); measuring again")
        return None
    try:
        if st.st_uid != os.getuid():
            raise ValueError(f"belongs to uid {st.st_uid}, not to this user")
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("key") != key:
            raise ValueError("another format or key")
        choice = (data["choice"]["design"], data["choice"]["engine"])
        if choice not in cands:
            raise ValueError(f"choice {choice} is not a candidate")
        return choice
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _warn_once(path, f"ignored ({type(err).__name__}: {err}); measuring again")
        return None


def _read_times(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()).get("times_s", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _write(path: Path, decision: Decision) -> None:
    """Atomically: a unique temporary file beside ``path``, then a rename (ranks of one node
    that measured the same key write the same answer; the last rename wins)."""
    design, engine = decision.choice
    text = json.dumps({"format": CACHE_FORMAT, "key": decision.key,
                       "choice": {"design": design, "engine": engine},
                       "times_s": decision.times_s, "prior": decision.prior,
                       "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                      indent=1)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}."
                         f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        _warn_once(path, f"cannot be written ({err}); the choice holds for this process only")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
