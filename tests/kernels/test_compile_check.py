"""The Triton kernels' sm_90a code, compiled ahead of time on the CPU with the production
arguments (soda_kernels.compile_check; Triton's wheel ships ptxas, cuobjdump, nvdisasm): for
bf16, every autotune config of every kernel, the full and the ragged last vocabulary slice,
multiplies on wgmma, has no spills in its main loop and loads every operand of its main loop
asynchronously with 16-byte copies; the training path's chunk and group launches too, its
memory-bound passes with 16-byte loads and stores. Says nothing about speed: that needs a
GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch_env import clean_env
from soda_kernels.compile_check import problems

ENV = dict(clean_env(), TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The records (JSON) and the report (markdown, with the waves table) of one bf16 run."""
    folder = tmp_path_factory.mktemp("codegen")
    out, md = folder / "sm90.json", folder / "sm90.md"
    proc = subprocess.run([sys.executable, "-m", "soda_kernels.compile_check", "--json", str(out),
                           "--markdown", str(md)],
                          env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


@pytest.fixture(scope="module")
def bf16_records(bf16_run):
    return bf16_run[0]


def test_every_kernel_config_and_slice_is_compiled(bf16_records):
    import soda_kernels.fused_linear_cross_entropy as flce

    seen = {(r["kernel"], r["slice"]) for r in bf16_records}
    for kernel in ("grad_logits", "matmul_grad_weight", "matmul_grad_hidden"):
        assert {(kernel, "full"), (kernel, "last")} <= seen
    assert {("lse_partials", "all"), ("embedding_pieces", "all"), ("embedding_merge", "all")} <= seen
    for kernel, role in (("lse_partials", "lse"), ("matmul_grad_weight", "grad_weight"),
                         ("matmul_grad_hidden", "grad_hidden"), ("grad_logits", "dlogits")):
        configs = [r["config"] for r in bf16_records if r["kernel"] == kernel
                   and r["slice"] in ("all", "full", "last")]
        assert len(configs) == len(flce.CONFIGS[role]) * (1 if kernel == "lse_partials" else 2)
    # The three-matmul training path: per chunk and per group, every config of its matmuls.
    assert {("matmul_logits", "chunk"), ("chunk_stats", "chunk"), ("chunk_dlogits", "chunk"),
            ("matmul_grad_hidden", "group"), ("matmul_grad_weight", "group")} <= seen
    for kernel, role in (("matmul_logits", "logits"), ("matmul_grad_weight", "grad_weight"),
                         ("matmul_grad_hidden", "grad_hidden")):
        configs = [r for r in bf16_records if r["kernel"] == kernel
                   and r["slice"] in ("chunk", "group")]
        assert len(configs) == len(flce.CONFIGS[role])


def test_training_path_is_vectorised_and_spill_free(bf16_records):
    """The memory-bound passes over a chunk read its fp32 logits with 16-byte loads and write
    dlogits with 16-byte stores (bounds padded to 16 columns), the logits matmul stores its
    padded fp32 chunk with 16-byte stores, and none of them spills."""
    train = {r["kernel"]: r for r in bf16_records if r["slice"] == "chunk"}
    for kernel in ("chunk_stats", "chunk_dlogits"):
        r = train[kernel]
        assert r["mma"] == "none" and r["spill_bytes"] == 0 and r["narrow_loads_in_loops"] == 0, r
    assert train["chunk_dlogits"]["narrow_stores"] == 0, train["chunk_dlogits"]
    logits = [r for r in bf16_records if r["kernel"] == "matmul_logits"]
    assert logits and all(r["narrow_stores"] == 0 and r["spill_bytes"] == 0 for r in logits), logits


def _merge_walk_only(r: dict, found: list[str]) -> bool:
    """embedding_merge's one loop walks a run that crosses piece boundaries, one piece per
    step: the next sort key (one int64) and one fp32 of the piece's partial row per thread
    (BLOCK_H = 64 on 128 threads). Only programs whose run crosses a boundary enter it, so
    it is no streaming pass; its two narrow loads are accepted, nothing else is. NOTE: the
    line-based reader never saw this loop (it closes with ``@!P0 BRA P2, target``)."""
    return (r["kernel"] == "embedding_merge" and r["narrow_loads_in_loops"] <= 2
            and found == [f"{r['narrow_loads_in_loops']} narrow global loads in a loop (no tl.dot)"])


def test_bf16_code_is_wgmma_spill_free_and_asynchronous(bf16_records):
    production = [r for r in bf16_records if not r["kernel"].endswith("_tma")]
    bad = {f"{r['kernel']}/{r['slice']} {r['config']}": problems(r) for r in production
           if problems(r) and not _merge_walk_only(r, problems(r))}
    assert not bad, json.dumps(bad, indent=1)
    for r in production:
        if r["kernel"] not in ("embedding_merge", "chunk_stats", "chunk_dlogits"):  # no tl.dot
            assert r["mma"] == "wgmma", r
        if r["main_loops"]:
            assert r["async_copy_bytes"] == 16 and r["async_copies"] >= 2, r
        assert r["ctas_per_sm"] >= 1 and r["smem_bytes"] <= 227 * 1024, r
        if r["kernel"] == "embedding_pieces":  # was 255 registers, 648 B of stack, FMA
            assert r["spill_bytes"] == 0, r
        if r["kernel"] == "lse_partials":  # V and H tiles in one pipelined loop
            assert r["main_loops"] == 1 and not r["main_loop_nested"], r


def test_opt_in_tma_matmuls_compile_to_tma_and_wgmma(bf16_records):
    """The TMA variant (off by default, not timed) lowers to TMA copies feeding wgmma, and
    its main loop -- read from the control-flow graph, with the mbarrier retry stubs that
    ptxas places after EXIT (test_sass_reader.py) -- is a short loop without spills: the
    epilogue's spills (the same stack frame as the cp.async variant's) are outside it."""
    tma = [r for r in bf16_records if r["kernel"].endswith("_tma")]
    assert {r["kernel"] for r in tma} == {"matmul_grad_weight_tma", "matmul_grad_hidden_tma"}
    for r in tma:
        assert "error" not in r and r["tma"] and r["mma"] == "wgmma", r
        assert r["sync_loads"] == 0 and r["async_copies"] >= 2 and not r["main_loop_nested"], r
        assert not problems(r), (r, problems(r))
        assert 0 < r["main_loop_instructions"] < 200, r
    assert any(r["spill_bytes"] for r in tma)  # spills exist, in the epilogue


def test_the_check_sees_a_ragged_slice_that_is_not_padded():
    """The reading is not blind: grad_W's A operand bounded by the true last-slice width
    (5380, not a multiple of 16; what the backward did before padded_width) compiles to
    synchronous scalar loads inside the main loop, and the check reports it."""
    code = """
import dataclasses, json, torch
from soda_kernels import compile_check as cc
part, launch = [x for x in cc.production_launches(torch.bfloat16)
                if x[0] == "last" and x[1].role == "grad_weight"][0]
named = launch.named
assert named["A_M"] % 16 == 0 and named["M"] % 16 != 0, named
args = tuple(named["M"] if name == "A_M" else v for name, v in named.items())
ragged = dataclasses.replace(launch, args=args)
config = cc.configs_of(launch)[2]
row = cc.analyse(cc.compile_launch(ragged, config), config["num_warps"])
row.update(fits=True, dtype="bf16")
print(json.dumps({"row": row, "problems": cc.problems(row)}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["row"]["sync_loads"] >= 1 and result["row"]["narrow_loads_in_main_loop"] > 0
    assert any("synchronous" in p for p in result["problems"]), result


def test_waves_table_has_every_soda_shape_and_the_compiled_occupancy(bf16_run):
    """The report's waves table: one lse row per SODA shape, its programs those of the
    wave-sized grid (flce_ops.wave_splits) and its waves programs / (132 x the CTAs per SM
    the compile found for that config)."""
    import math

    from soda_kernels.compile_check import SODA_SHAPES
    from soda_kernels.flce_ops import wave_splits
    from soda_kernels.flce_tuning import CONFIGS

    records, report = bf16_run
    ctas = [next(r["ctas_per_sm"] for r in records if r["kernel"] == "lse_partials"
                 and r["config"]["BLOCK_N"] == c.kwargs["BLOCK_N"]
                 and r["config"]["BLOCK_V"] == c.kwargs["BLOCK_V"]) for c in CONFIGS["lse"]]
    tiles = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in CONFIGS["lse"]]
    rows = [line.split(" | ") for line in report.splitlines() if "| lse_partials | all | " in line
            and " bf16 " not in line]
    assert len(rows) == len(SODA_SHAPES), rows
    for shape in SODA_SHAPES:
        n, v = shape.tokens, shape.vocab
        first = max(1, min(math.ceil(4 * 132 / math.ceil(n / 128)), math.ceil(v / 128)))
        splits = wave_splits(n, v, 132, first, tiles, math.ceil(v / 128))
        programs = [math.ceil(n / t[0]) * splits for t in tiles]
        row = next(r for r in rows if r[0] == f"| {n}" and r[1] == str(shape.hidden)
                   and r[2] == str(v))
        assert row[5] == " / ".join(map(str, programs)), row
        assert row[6] == " / ".join(map(str, ctas)), row
        assert row[7].rstrip(" |") == " / ".join(str(round(p / (132 * c), 2))
                                                for p, c in zip(programs, ctas)), row
