"""Where a training step's time goes: a ``torch.profiler`` trace of real steps, classified.

:func:`record_trace` runs untimed warm-up steps, then ``steps`` calls of
:meth:`Trainer.train_step` under ``torch.profiler`` (CPU, plus CUDA on a GPU) and writes a
Chrome / Perfetto trace (open it in https://ui.perfetto.dev or chrome://tracing). Each step is
the range ``soda/step``; forward hooks mark the model's parts with ranges ``soda/<category>``
(below), and the optimizer update with ``soda/optimizer``.

:func:`breakdown` reads the trace file back (so any saved trace can be re-analysed) and splits
the profiled wall time (the union of the ``soda/step`` ranges) into categories:

==============  =============================================================================
matmul          the transformer layers' linear layers (QKV, output projection, fc1, fc2)
attention       core attention (SDPA / flash-attn) and its backward
loss            output layer + cross-entropy + z-loss (any ``kernels.loss``) and backward
embedding       input embedding and its backward
norm            every RMSNorm (input, pre-MLP, QK-norm, final) and its backward
optimizer       the guarded update (gradient norm, clipping, Adam, parameter copies) and the
                accumulation of gradients into DDP's fp32 ``main_grad`` buffers
communication   collectives and point-to-point ops (NCCL / gloo), wherever they run
other           everything else: RoPE, SwiGLU activation, residual adds, layout copies, the
                schedules' bookkeeping (the top op names are listed)
idle            GPU: time no kernel runs. CPU: time inside the step but outside any op
==============  =============================================================================

Rules, in order, for one profiled op (a CPU op; on a GPU, the CPU op that launched a kernel):

1. its own name is a communication op (``nccl``, ``gloo``, ``c10d::``, ``all_reduce``,
   ``all_gather``, ``reduce_scatter``, ``broadcast``, ``send``/``recv``) -> communication;
2. the innermost enclosing ``soda/<category>`` range (or communication range) decides;
3. in the backward (inside ``autograd::engine::evaluate_function: <Node>``), the category of
   the forward op with the node's sequence number (how the profiler links forward and
   backward); ``AccumulateGrad`` -> optimizer;
4. name patterns (:data:`NAME_RULES`) on the op, then on its enclosing ops;
5. otherwise ``other``.

On a GPU only kernel time counts (memcpy/memset too), attributed through the launch's
correlation id; overlapping kernels (communication on its own stream) can make the shares
add to more than 100%: the overlap is reported. On a CPU the host does the work: an op's self
time (its duration minus its children's) counts to its category, and a range's time outside
any op counts to the range's category. Only the threads that run the steps count: ops of other
threads (data prefetch, gloo's workers) run beside them and are reported apart
(``other_threads_seconds``), so the shares add to 100%.
"""

from __future__ import annotations

import bisect
import collections
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

CATEGORIES = ("matmul", "attention", "loss", "embedding", "norm", "optimizer", "communication",
              "other", "idle")
STEP = "soda/step"
SCOPE = "soda/"
BACKWARD = "autograd::engine::evaluate_function: "

_COMM = re.compile(r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_?scatter|"
                   r"broadcast(?!_tensors|_to|_shapes)|"
                   r"record_param_comms|(^|[^a-z])(send|recv|isend|irecv)([^a-z]|$)", re.I)

#: (pattern, category) tried in order on op and kernel names when no range decides.
NAME_RULES = [
    (re.compile(r"scaled_dot_product|flash|fmha|efficient_attention|cudnn.*attention|sdpa", re.I),
     "attention"),
    (re.compile(r"cross_?entropy|log_softmax|nll_loss|flce|logsumexp", re.I), "loss"),
    (re.compile(r"embedding", re.I), "embedding"),
    (re.compile(r"rms_?norm|layer_?norm", re.I), "norm"),
    (re.compile(r"Optimizer\.step|adam|_foreach_|multi_tensor|AccumulateGrad|clip_grad", re.I),
     "optimizer"),
    (re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$|gemm|cublas|cutlass|xmma|nvjet|"
                r"^LinearWith", re.I), "matmul"),
]

# Module names (the last part of the qualified name) whose forward opens a range.
_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def name_rule(name: str) -> str | None:
    if _COMM.search(name):
        return "communication"
    for pattern, category in NAME_RULES:
        if pattern.search(name):
            return category
    return None


# ----------------------------------------------------------------------------- recording
def module_category(qualified_name: str, module) -> str | None:
    """The ``soda/<category>`` range a model submodule's forward opens (None: no range)."""
    from soda_mega.model.norm import RMSNorm

    last = qualified_name.rsplit(".", 1)[-1]
    if isinstance(module, RMSNorm):
        return "norm"
    if last == "core_attention":
        return "attention"
    if last in _LINEARS:
        return "matmul"
    if last == "embedding":
        return "embedding"
    return None


@contextmanager
def annotated(trainer):
    """Mark the trainer's model parts and optimizer update with profiler ranges."""
    from torch.profiler import record_function

    handles, open_ranges = [], []

    def enter(label):
        def hook(module, args, kwargs=None):
            rf = record_function(f"{SCOPE}{label}")
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, output):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    saved = []
    for chunk in trainer.model:
        inner = getattr(chunk, "module", chunk)
        for name, module in inner.named_modules():
            label = module_category(name, module)
            if label:
                handles.append(module.register_forward_pre_hook(enter(label)))
                handles.append(module.register_forward_hook(leave))
        if getattr(inner, "post_process", False):
            # NOTE: the output layer + loss run inside GPTModel._postprocess for every
            # kernels.loss (the fused paths never call output_layer), so that method is wrapped
            # on this instance; the class and other instances are untouched.
            original = inner._postprocess

            def postprocess(*args, _original=original, **kwargs):
                with record_function(f"{SCOPE}loss"):
                    return _original(*args, **kwargs)

            inner._postprocess = postprocess
            saved.append((inner, "_postprocess"))
    update = trainer._guarded_update

    def guarded_update(*args, **kwargs):
        with record_function(f"{SCOPE}optimizer"):
            return update(*args, **kwargs)

    trainer._guarded_update = guarded_update
    saved.append((trainer, "_guarded_update"))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, attr in saved:
            obj.__dict__.pop(attr, None)


def record_trace(trainer, batch_sets: Sequence[list], steps: int, warmup: int, out: Path) -> Path:
    """Warm up, then profile ``steps`` training steps into the Chrome trace ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with annotated(trainer):
        for i in range(warmup):
            trainer.train_step(batch_sets[i % len(batch_sets)])
        with profile(activities=activities) as prof:
            for i in range(steps):
                with record_function(STEP):
                    trainer.train_step(batch_sets[(warmup + i) % len(batch_sets)])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    return out


# ----------------------------------------------------------------------------- analysis
class _Event:
    __slots__ = ("name", "cat", "tid", "ts", "end", "args", "parent", "child_time")

    def __init__(self, raw: dict) -> None:
        self.name = raw.get("name", "")
        self.cat = raw.get("cat", "")
        self.tid = (raw.get("pid"), raw.get("tid"))
        self.ts = float(raw["ts"])
        self.end = self.ts + float(raw.get("dur", 0.0))
        self.args = raw.get("args") or {}
        self.parent: _Event | None = None
        self.child_time = 0.0

    @property
    def dur(self) -> float:
        return self.end - self.ts

    def chain(self):
        e = self
        while e is not None:
            yield e
            e = e.parent


_HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _nest(events: list[_Event]) -> None:
    """Set parent pointers and children's total time by time nesting on each thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e.tid].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.ts, -e.dur))
        stack: list[_Event] = []
        for e in evs:
            while stack and stack[-1].end <= e.ts + 1e-3:
                stack.pop()
            if stack and e.end <= stack[-1].end + 1e-3:
                e.parent = stack[-1]
                stack[-1].child_time += e.dur
            stack.append(e)


def _scope_of(e: _Event) -> str | None:
    for a in e.chain():
        if a.name.startswith(SCOPE) and a.name != STEP:
            return a.name[len(SCOPE):]
        if _COMM.search(a.name):
            return "communication"
    return None


def _in_backward(e: _Event) -> _Event | None:
    for a in e.chain():
        if a.name.startswith(BACKWARD):
            return a
    return None


class Classifier:
    """Applies the module docstring's rules to the host events of one trace."""

    def __init__(self, host: list[_Event]) -> None:
        self.forward: dict[int, tuple[float, str | None]] = {}
        for e in host:
            seq = e.args.get("Sequence number")
            if e.cat != "cpu_op" or seq is None or _in_backward(e) is not None:
                continue
            seen = self.forward.get(seq)
            if seen is None or e.ts >= seen[0]:
                self.forward[seq] = (e.ts, _scope_of(e))

    def category(self, e: _Event) -> str:
        if _COMM.search(e.name):
            return "communication"
        scope = _scope_of(e)
        if scope:
            return scope
        node = _in_backward(e)
        if node is not None:
            fwd = self.forward.get(node.args.get("Sequence number"))
            if fwd is not None and fwd[1]:
                return fwd[1]
            rule = name_rule(node.name[len(BACKWARD):])
            if rule:
                return rule
        for a in e.chain():
            rule = name_rule(a.name)
            if rule:
                return rule
        return "other"


def _union(intervals: Iterable[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _clip(s: float, e: float, windows: list[tuple[float, float]], starts: list[float]):
    """The parts of [s, e) inside the (disjoint, sorted) windows."""
    i = max(0, bisect.bisect_right(starts, s) - 1)
    parts = []
    while i < len(windows) and windows[i][0] < e:
        lo, hi = max(s, windows[i][0]), min(e, windows[i][1])
        if hi > lo:
            parts.append((lo, hi))
        i += 1
    return parts


def breakdown(trace: dict | str | Path) -> dict:
    """Seconds and shares per category of the profiled steps in a Chrome trace (see module doc)."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    raw = [r for r in trace.get("traceEvents", []) if r.get("ph") == "X" and "ts" in r]
    host = [_Event(r) for r in raw if r.get("cat") in _HOST_CATS]
    device = [_Event(r) for r in raw if r.get("cat") in _DEVICE_CATS]
    _nest(host)
    steps = sorted((e.ts, e.end) for e in host if e.name == STEP)
    if not steps:
        raise ValueError(f"no '{STEP}' ranges in the trace: record it with `soda-mega profile`")
    window = _union(steps)
    starts = [s for s, _ in steps]
    clf = Classifier(host)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    other_ops: collections.Counter = collections.Counter()
    overlap = other_threads = 0.0
    if device:
        launches = {e.args.get("correlation"): e for e in host
                    if e.cat in ("cuda_runtime", "cuda_driver")}
        spans = []
        for k in device:
            parts = _clip(k.ts, k.end, steps, starts)
            inside = sum(hi - lo for lo, hi in parts)
            if inside <= 0:
                continue
            spans += parts
            launch = launches.get(k.args.get("correlation"))
            owner = launch.parent if launch is not None and launch.parent is not None else None
            if owner is not None:
                cat = clf.category(owner)
            else:
                cat = name_rule(k.name) or "other"
            seconds[cat] += inside
            if cat == "other":
                other_ops[owner.name if owner is not None else k.name] += inside
        busy = _union(spans)
        seconds["idle"] = max(0.0, window - busy)
        overlap = sum(seconds[c] for c in CATEGORIES if c != "idle") - busy
        basis = "device kernels"
    else:
        step_threads = {e.tid for e in host if e.name == STEP}
        for e in host:
            if e.name == STEP or e.cat not in ("cpu_op", "user_annotation"):
                continue
            own = max(0.0, e.dur - e.child_time)
            inside = sum(hi - lo for lo, hi in _clip(e.ts, e.ts + own, steps, starts))
            if inside <= 0:
                continue
            if e.tid not in step_threads:  # runs beside the step (prefetch, gloo): not its time
                other_threads += inside
                continue
            cat = clf.category(e)
            seconds[cat] += inside
            if cat == "other":
                other_ops[e.name] += inside
        seconds["idle"] = max(0.0, window - sum(seconds.values()))
        basis = "host ops (self time)"
    seconds = {k: v / 1e6 for k, v in seconds.items()}  # trace times are microseconds
    total = window / 1e6
    return {
        "basis": basis,
        "steps": len(steps),
        "window_seconds": total,
        "seconds": seconds,
        "share": {k: v / total for k, v in seconds.items()},
        "overlap_seconds": overlap / 1e6,
        "other_threads_seconds": other_threads / 1e6,
        "other_top": [(name, t / 1e6) for name, t in other_ops.most_common(8)],
    }


def format_breakdown(result: dict) -> str:
    lines = [f"{result['steps']} step(s), {result['window_seconds']:.3f} s profiled "
             f"(basis: {result['basis']})", "",
             f"{'category':<15}{'seconds':>10}{'share':>9}"]
    for cat in CATEGORIES:
        lines.append(f"{cat:<15}{result['seconds'][cat]:>10.4f}{result['share'][cat]:>9.1%}")
    if result["overlap_seconds"] > 0:
        lines.append(f"(kernels overlapped for {result['overlap_seconds']:.4f} s: shares add to "
                     "more than 100%)")
    if result["other_top"]:
        lines += ["", "largest 'other' ops: " + ", ".join(
            f"{name} {t * 1e3:.1f} ms" for name, t in result["other_top"][:5])]
    return "\n".join(lines)
