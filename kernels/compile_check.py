"""sm_90a code of every kernel, compiled ahead of time without a GPU and read as PTX / SASS.

Triton's wheel ships ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so ``triton.compile`` lowers a
kernel to an sm_90a cubin on a CPU-only machine and the result can be read. That catches what
the CPU interpreter cannot -- code that does not lower, tiles that overflow shared memory,
spills, loads that are not pipelined, matmuls off the tensor cores -- and says nothing about
speed.

    TRITON_INTERPRET=0 python -m soda_kernels.compile_check                 # bf16, every config
    TRITON_INTERPRET=0 python -m soda_kernels.compile_check --all --json FILE --markdown MD

**Production arguments.** The launchers of :mod:`.fused_linear_cross_entropy` and
:mod:`.interleaved_embedding` are called on ``meta`` tensors of a production shape
(:data:`SCENARIO`: TP1, V = 144,644, H = 2048, 8192 tokens) under
:func:`soda_kernels._launch.record_launches`, so each kernel is compiled with the arguments
production passes -- in particular Triton's JIT specialisation of every integer argument (a
multiple of 16, equal to 1, or neither) -- for a full vocabulary slice and for the ragged last
one (5380 columns, not a multiple of 16). The opt-in TMA variant of the backward matmuls
(``*_tma``, ``matmul_triton(tma=True)``) is compiled too, and so is the training path of
:mod:`.flce_train` (``chunk``: the logits matmul and the two memory-bound passes over a
chunk; ``group``: the ``grad_h`` and ``grad_W`` matmuls of a group) at the chunk and group
heights its plan picks for an H100 (:func:`~.flce_plan.plan_for_peak`).

One record per (kernel, slice, dtype, config): ``regs`` and ``spill_bytes`` (the stack frame;
cuobjdump), ``main_loop_instructions`` (SASS instructions of the main loops),
``spills_in_main_loop`` (local loads / stores inside the main loop's SASS),
``smem_bytes``, ``ctas_per_sm`` (H100 limits: registers, shared memory, threads), ``mma``
(``wgmma`` / ``mma.sync`` / ``fma``; ``none`` without a ``tl.dot``), ``async_copies`` and
``main_loop_nested`` (the main loop runs inside another loop, so its software pipeline
drains and refills at every outer iteration), ``async_copies`` and
``sync_loads`` (tensor loads inside the main loops: asynchronous copies vs plain loads, read
from the pipelined TTGIR), ``narrow_loads_in_main_loop`` (global loads narrower than 16 bytes
in the main loop's SASS), ``narrow_stores`` (global stores narrower than 16 bytes anywhere),
``narrow_loads_in_loops`` (for kernels without a ``tl.dot``, the memory-bound ones: global
loads narrower than 16 bytes inside any loop), ``async_copy_bytes`` (the narrowest
``cp.async``) and ``tma``. A main loop is a loop that contains a ``tl.dot``; in the SASS, a
natural loop of the control-flow graph (:mod:`.sass_cfg`) holding a matrix instruction, so
the mbarrier retry stubs ptxas places after ``EXIT`` count with the loop they serve and the
epilogue does not.

**Waves.** :func:`waves` gives, at every SODA shape (:data:`SODA_SHAPES`), the programs of
each production grid and its waves on an H100's 132 SMs for each config (resident CTAs per
SM from the records); ``--markdown`` appends that table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from soda_kernels import sass_cfg

SMEM_PER_BLOCK_SM90 = 227 * 1024  # H100 / H200: opt-in shared memory per thread block
SMEM_PER_SM_SM90 = 228 * 1024     # per SM; each resident block also reserves 1 KB
REGS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 2048, 32


@dataclass(frozen=True)
class Scenario:
    """The production shape whose launches are compiled (one TP rank's problem)."""

    tokens: int = 8192
    hidden: int = 2048
    vocab: int = 144_644  # SODA: 128,000 text ids + specials + audio codes; 144,644 % 16 = 4


SCENARIO = Scenario()
SMS_H100 = 132  # H100 SXM streaming multiprocessors (H200: 132 too)
#: One TP rank's problem at each SODA shape, the GPU campaign's kernel grid
#: (benchmarks/gpu_campaign.py ``kernel_shapes``): 8192 and 16384 tokens, the presets' hidden
#: sizes, TP1 (V = 144,644) and TP2 (the vocabulary padded to 2 x 128, halved: 72,448).
#: Data, not read from soda_mega (a lower layer); tests/kernels/test_compile_waves.py checks it
#: against the presets and the vocabulary layout.
SODA_SHAPES = tuple(Scenario(n, h, v) for v in (144_644, 72_448) for n in (8192, 16384)
                    for h in (512, 1024, 2048, 2560))


# ============================================================================ production launches
def production_launches(dtype, scenario: Scenario = SCENARIO) -> list[tuple[str, object]]:
    """``(slice, Launch)`` of one forward + backward of every kernel at ``scenario``, recorded
    from the real launchers on ``meta`` tensors. ``slice``: ``all`` (the forward, the
    embedding), ``full`` / ``last`` (the recompute backward's first and last launch of each
    role: a full vocabulary slice / ``grad_h`` pass, and the ragged last one), ``chunk`` /
    ``group`` (the training path's per-chunk and per-group launches at the sizes its plan
    chooses for an H100)."""
    import torch

    import soda_kernels.flce_train as train
    import soda_kernels.fused_linear_cross_entropy as flce
    import soda_kernels.interleaved_embedding as emb
    from soda_kernels._launch import record_launches
    from soda_kernels.flce_plan import plan_for_peak
    from soda_kernels.flce_roofline import PEAKS

    meta = torch.device("meta")
    n, h, v = scenario.tokens, scenario.hidden, scenario.vocab
    out: list[tuple[str, object]] = []
    with record_launches() as calls:
        hidden = torch.empty(n, h, dtype=dtype, device=meta)
        weight = torch.empty(v, h, dtype=dtype, device=meta)
        labels = torch.empty(n, dtype=torch.long, device=meta)
        flce.lse_partials_triton(hidden, weight, labels, 0, v)
        out += [("all", c) for c in calls]
        calls.clear()
        vocab_slice = flce.default_vocab_slice(h, v, meta)
        slices = flce.default_grad_h_slices(n, h, vocab_slice, v, dtype, meta, "triton", True)
        lse, g = torch.empty(n, device=meta), torch.empty(n, device=meta)
        acc = torch.empty(n, h, device=meta)
        main_grad = torch.empty(v, h, device=meta)
        for tma in (False, True):  # TMA: the opt-in variant of the two matmuls
            flce.backward_slices(hidden, weight, labels, lse, g, main_grad, True, acc, 0.0, 0, v,
                                 "triton", vocab_slice, tma=tma, grad_h_slices=slices)
            keep = [c for c in calls if c.role != "dlogits"] if tma else list(calls)
            roles = list(dict.fromkeys(c.role for c in keep))
            out += [("full", next(c for c in keep if c.role == r)) for r in roles]
            out += [("last", [c for c in keep if c.role == r][-1]) for r in roles]
            calls.clear()
        plan = plan_for_peak(n, h, v, dtype, PEAKS["H100"], 64, True, vocab_slice, slices)
        rows = plan.group_rows if dtype != torch.float32 else plan.row_chunk
        h_a = torch.empty(rows, h, dtype=dtype, device=meta)
        grad_h = torch.empty(rows, h, device=meta)
        train.train_rows(h_a, weight, labels[:rows], g[:rows], grad_h, main_grad, True, 0.0, 0,
                         None, "triton", plan.row_chunk, plan.group_rows, vocab_slice)
        out += [("chunk", c) for c in calls[:3]] + [("group", c) for c in calls[-2:]]
        calls.clear()
        ids = torch.empty(n, dtype=torch.long, device=meta)
        emb.embedding_backward_triton(torch.empty(n, h, dtype=dtype, device=meta), ids, 0, v)
        out += [("all", c) for c in calls]
    return out


def configs_of(launch) -> list[dict]:
    """Tile configurations to compile: the autotune space of a tuned launch (less what its
    shared-memory pruning drops), else the fixed one (``{"kwargs", "num_warps", "num_stages"}``)."""
    import soda_kernels.fused_linear_cross_entropy as flce

    if launch.tuned:  # what the autotuner's pruning keeps for this dtype (fp32 drops some)
        elt = next(a.element_size() for a in launch.args if hasattr(a, "element_size"))
        return [dict(kwargs=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
                for c in flce.CONFIGS[launch.role]
                if flce.smem_estimate(launch.role, c, elt) <= flce._SMEM_BUDGET]
    blocks = {k: v for k, v in launch.consts.items() if k.isupper() and k.startswith(("BLOCK", "PIECE"))}
    return [dict(kwargs=blocks, num_warps=launch.consts.get("num_warps", 4),
                 num_stages=launch.consts.get("num_stages", 1))]


class _Pointer:
    """What Triton's JIT specialises a tensor argument on: its dtype and its address (a meta
    tensor has none: a 256-byte aligned base plus the view's offset, as a CUDA allocation)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 32) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def compile_launch(launch, config: dict, arch: int = 90):
    """``triton.compile`` ``launch``'s kernel with its recorded arguments and ``config``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = dict(launch.consts, **config["kwargs"], num_warps=config["num_warps"],
                  num_stages=config["num_stages"])
    if kwargs.get("PRECISION") == "ieee" and any(getattr(a, "dtype", None) == torch.float32
                                                 for a in launch.args[:2]):
        kwargs["PRECISION"] = "tf32"  # fp32 training runs with TF32 matmuls (dot_precision)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


# ============================================================================ reading the code
def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_tools(cubin: bytes) -> tuple[dict, str]:
    """(resource usage of the kernel function, SASS) via the wheel's cuobjdump / nvdisasm."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}, sass


def _ttgir_loops(ttgir: str) -> list[dict]:
    """Per ``scf.for`` with a dot in its own body: dots, tensor ``tt.load``s, async copies."""
    loops, stack, depth = [], [], 0
    for line in ttgir.splitlines():
        if "scf.for" in line:
            stack.append((depth, {"dots": 0, "sync_loads": 0, "async_copies": 0,
                                  "nested": bool(stack)}))
        if stack:
            body = stack[-1][1]
            if "tt.dot " in line or "warp_group_dot " in line:
                body["dots"] += 1
            if re.search(r"= tt\.load .*: tensor<", line):
                body["sync_loads"] += 1
            if "async_copy_global_to_local" in line or "async_tma_copy" in line or "tt.descriptor_load" in line:
                body["async_copies"] += 1
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            loops.append(stack.pop()[1])
    return [loop for loop in loops if loop["dots"]]


def _sass_loops(sass: str) -> list[list[str]]:
    """SASS instruction lines of each loop: the natural loops of the control-flow graph
    reachable from the entry (:mod:`.sass_cfg`; code after ``EXIT`` that only a retry stub
    branches from belongs to no loop but the stub's)."""
    return sass_cfg.loops(sass)


def _sass_main_loops(sass: str) -> list[list[str]]:
    """SASS instruction lines of each loop holding a matrix instruction (HGMMA / HMMA) or,
    without one, an FFMA."""
    loops = _sass_loops(sass)
    mma = [b for b in loops if any(("HGMMA" in ln or "HMMA" in ln) for ln in b)]
    return mma or [b for b in loops if any("FFMA" in ln for ln in b)]


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident blocks per H100 SM: registers (256 per warp granule), shared memory, threads."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM_SM90 // (smem + 1024)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, BLOCKS_PER_SM))


def sass_facts(sass: str, has_dot: bool) -> dict:
    """The record's facts read from the SASS alone (``nvdisasm -c`` text): size of, spills and
    narrow loads in the main loops (the loops holding a matrix instruction), narrow loads in
    any loop for a kernel without a ``tl.dot``, and narrow stores anywhere. An instruction in
    several loops (an inner loop, a retry stub) counts once."""
    main = list(dict.fromkeys(ln for loop in _sass_main_loops(sass) for ln in loop)) if has_dot else []
    loops = [] if has_dot else list(dict.fromkeys(ln for loop in _sass_loops(sass) for ln in loop))
    narrow_load = re.compile(r"\bLDG\.E(?!\.(128|ENL2\.256))")
    return {
        "main_loop_instructions": len(main),
        "spills_in_main_loop": sum(1 for ln in main if re.search(r"\b(LDL|STL)\b", ln)),
        "narrow_loads_in_main_loop": sum(1 for ln in main if narrow_load.search(ln)),
        "narrow_stores": sum(1 for ln in sass.splitlines()
                             if re.search(r"\bSTG\.E(?!\.(128|ENL2\.256))", ln)),
        "narrow_loads_in_loops": sum(1 for ln in loops if narrow_load.search(ln)),
    }


def analyse(kernel, num_warps: int) -> dict:
    """The record's code facts of one compiled kernel."""
    usage, sass = _cubin_tools(kernel.asm["cubin"])
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    has_dot = "tt.dot" in kernel.asm["ttir"]
    mma = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx
           else "fma" if has_dot else "none")
    loops = _ttgir_loops(ttgir)
    facts = sass_facts(sass, has_dot)
    widths = [int(w, 16) for w in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*, (0x[0-9a-f]+)", ptx)]
    smem = kernel.metadata.shared
    return {
        "regs": usage["REG"], "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0),
        "main_loop_instructions": facts["main_loop_instructions"],
        "spills_in_main_loop": facts["spills_in_main_loop"],
        "smem_bytes": smem, "ctas_per_sm": ctas_per_sm(usage["REG"], smem, num_warps),
        "mma": mma, "main_loops": len(loops),
        "main_loop_nested": any(loop["nested"] for loop in loops),
        "async_copies": sum(loop["async_copies"] for loop in loops),
        "sync_loads": sum(loop["sync_loads"] for loop in loops),
        "narrow_loads_in_main_loop": facts["narrow_loads_in_main_loop"],
        "narrow_stores": facts["narrow_stores"],
        "narrow_loads_in_loops": facts["narrow_loads_in_loops"],
        "async_copy_bytes": min(widths) if widths else None,
        "tma": "cp.async.bulk.tensor" in ptx,
    }


# ============================================================================ waves
def grid_programs(launch, config: dict) -> int:
    """Programs of ``launch``'s grid under ``config`` (the autotuner's grid function gets the
    config's block sizes)."""
    grid = launch.grid
    if callable(grid):
        grid = grid(dict(config["kwargs"], num_warps=config["num_warps"],
                         num_stages=config["num_stages"]))
    out = 1
    for g in grid:
        out *= int(g)
    return out


def waves(rows: list[dict], shapes=SODA_SHAPES, sms: int = SMS_H100) -> list[dict]:
    """Per SODA shape and production launch (the ``last`` slice and the TMA variant left
    out): programs of each config's grid, the resident CTAs per SM of that config (from
    ``rows``, the bf16 records compiled at :data:`SCENARIO`; registers and shared memory do
    not depend on the sizes) and waves = programs / (SMs x CTAs per SM). A fractional last
    wave runs the GPU partly empty (4.36 waves: the fifth is 36% full)."""
    import torch

    ctas = {(r["kernel"], r["slice"], json.dumps(r["config"], sort_keys=True)): r.get("ctas_per_sm")
            for r in rows if r["dtype"] == "bf16"}
    out = []
    for shape in shapes:
        for part, launch in production_launches(torch.bfloat16, shape):
            if part == "last" or launch.role.endswith("_tma"):
                continue
            name = KERNEL_NAMES.get(launch.role, launch.role)
            item = {"tokens": shape.tokens, "hidden": shape.hidden, "vocab_local": shape.vocab,
                    "kernel": name, "slice": part, "programs": [], "ctas_per_sm": [], "waves": []}
            for config in configs_of(launch):
                key = json.dumps(dict(config["kwargs"], num_warps=config["num_warps"],
                                      num_stages=config["num_stages"]), sort_keys=True)
                programs, per_sm = grid_programs(launch, config), ctas.get((name, part, key))
                item["programs"].append(programs)
                item["ctas_per_sm"].append(per_sm)
                item["waves"].append(round(programs / (sms * per_sm), 2) if per_sm else None)
            out.append(item)
    return out


def waves_markdown(items: list[dict], sms: int = SMS_H100) -> str:
    lines = ["", f"## Waves of the production grids ({sms} SMs, an H100 SXM)", "",
             "Programs / (SMs x resident CTAs per SM) of each kernel's grid at every SODA "
             "shape, one value per autotune config (in the order of the table above); the "
             "autotuner picks one on the GPU. Computed from the grids, not measured.", "",
             "| tokens | hidden | vocab_local | kernel | slice | programs | ctas_per_sm | waves |",
             "|---|---|---|---|---|---|---|---|"]
    join = lambda xs: " / ".join("?" if x is None else str(x) for x in xs)  # noqa: E731
    lines += [f"| {w['tokens']} | {w['hidden']} | {w['vocab_local']} | {w['kernel']} | "
              f"{w['slice']} | {join(w['programs'])} | {join(w['ctas_per_sm'])} | "
              f"{join(w['waves'])} |" for w in items]
    return "\n".join(lines) + "\n"


# ============================================================================ records
KERNEL_NAMES = {"lse": "lse_partials", "dlogits": "grad_logits", "grad_weight": "matmul_grad_weight",
                "logits": "matmul_logits", "chunk_stats": "chunk_stats",
                "chunk_dlogits": "chunk_dlogits",
                "grad_hidden": "matmul_grad_hidden", "grad_weight_tma": "matmul_grad_weight_tma",
                "grad_hidden_tma": "matmul_grad_hidden_tma", "embedding_pieces": "embedding_pieces",
                "embedding_merge": "embedding_merge"}


def _jobs(dtypes, only_first: bool) -> list[tuple[str, int, int]]:
    """``(dtype, launch index, config index)`` of every record to compile."""
    import torch

    out = []
    for dt in dtypes:
        for i, (_, launch) in enumerate(production_launches(_DTYPES[dt](torch))):
            out += [(dt, i, j) for j in range(1 if only_first else len(configs_of(launch)))]
    return out


_DTYPES = {"bf16": lambda torch: torch.bfloat16, "fp32": lambda torch: torch.float32}


def record(job: tuple[str, int, int], arch: int = 90) -> dict:
    """Compile and read one ``(dtype, launch index, config index)``; ``error`` if it fails."""
    import torch

    dt, i, j = job
    part, launch = production_launches(_DTYPES[dt](torch))[i]
    config = configs_of(launch)[j]
    row = {"kernel": KERNEL_NAMES.get(launch.role, launch.role), "slice": part, "dtype": dt,
           "config": dict(config["kwargs"], num_warps=config["num_warps"],
                          num_stages=config["num_stages"])}
    try:
        row.update(analyse(compile_launch(launch, config, arch), config["num_warps"]))
        row["fits"] = row["smem_bytes"] <= SMEM_PER_BLOCK_SM90
    except Exception as err:  # noqa: BLE001 - reported per kernel
        row["error"] = f"{type(err).__name__}: {err}"[:500]
    return row


def records(dtypes=("bf16",), arch: int = 90, only_first: bool = False, jobs: int = 1):
    """Every record, in a fixed order; ``jobs`` processes compile in parallel."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    todo = _jobs(dtypes, only_first)
    if jobs <= 1:
        yield from map(partial(record, arch=arch), todo)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(partial(record, arch=arch), todo)


def problems(row: dict) -> list[str]:
    """What the CI test refuses in a bf16 record (empty: the code is as intended)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if not row["fits"]:
        out.append(f"shared memory {row['smem_bytes']} > {SMEM_PER_BLOCK_SM90}")
    if row["mma"] not in ("wgmma", "none"):
        out.append(f"tl.dot lowers to {row['mma']}, not wgmma")
    if row.get("main_loop_nested"):
        out.append("main loop nested in another loop: its pipeline drains every outer step")
    if row["spills_in_main_loop"]:
        out.append(f"{row['spills_in_main_loop']} spill instructions in the main loop")
    if row["main_loops"] and (row["sync_loads"] or not row["async_copies"]):
        out.append(f"main loop: {row['sync_loads']} synchronous tensor loads, "
                   f"{row['async_copies']} async copies")
    if row["narrow_loads_in_main_loop"]:
        out.append(f"{row['narrow_loads_in_main_loop']} narrow global loads in the main loop")
    if row.get("narrow_loads_in_loops"):
        out.append(f"{row['narrow_loads_in_loops']} narrow global loads in a loop (no tl.dot)")
    return out


_COLUMNS = ("kernel", "slice", "dtype", "config", "regs", "spill_bytes", "main_loop_instructions",
            "spills_in_main_loop",
            "smem_bytes", "ctas_per_sm", "mma", "main_loop_nested", "async_copies", "sync_loads",
            "narrow_loads_in_main_loop", "narrow_loads_in_loops", "narrow_stores",
            "async_copy_bytes", "tma")


def markdown(rows: list[dict], command: str) -> str:
    def cell(row, key):
        v = row.get(key, "")
        if key == "config":
            return " ".join(f"{k.replace('BLOCK_', '')}={x}" for k, x in v.items())
        return str(v)

    head = ["# sm_90a code of the Triton kernels (generated, do not edit)", "",
            f"Generated by `{command}` (no GPU: compiled for sm_90a with the ptxas, cuobjdump",
            "and nvdisasm of Triton's wheel; production arguments of TP1, V = 144,644, H = 2048,",
            "8192 tokens; `last` = the ragged last vocabulary slice / grad_h pass; `chunk` and",
            "`group` = the three-matmul training path at its H100 plan). Code facts, not timings:",
            "see `soda_kernels/compile_check.py` for each column.", "",
            "| " + " | ".join(_COLUMNS) + " | problems |", "|" + "---|" * (len(_COLUMNS) + 1)]
    body = ["| " + " | ".join(cell(r, k) for k in _COLUMNS) + " | "
            + ("; ".join(problems(r)) if r["dtype"] == "bf16" else "") + " |" for r in rows]
    return "\n".join(head + body) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="bf16 and fp32 (default: bf16)")
    parser.add_argument("--first", action="store_true", help="only each kernel's first config")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    parser.add_argument("--json", metavar="FILE", help="write every record as a JSON list")
    parser.add_argument("--markdown", metavar="FILE", help="write the records as a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for row in records(("bf16", "fp32") if args.all else ("bf16",), args.arch, args.first,
                       args.jobs):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        flags = ["--all"] * args.all + ["--first"] * args.first + [f"--arch {args.arch}"] * (args.arch != 90)
        cmd = " ".join(["TRITON_INTERPRET=0 python -m soda_kernels.compile_check", *flags,
                        "--markdown", args.markdown])
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, cmd) + waves_markdown(waves(rows)))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
