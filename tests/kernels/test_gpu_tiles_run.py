"""Every GPU tile that compile_check compiles for a production kernel also runs, under the
interpreter, against an fp64 oracle, with bf16 inputs as well as fp32, TP1 and TP2.

The list is compile_check's own (:func:`~soda_kernels.compile_check.production_launches` and
:func:`~soda_kernels.compile_check.configs_of` per dtype: the autotune spaces after their
shared-memory pruning, the chunk kernels' fixed GPU tiles, the embedding backward's GPU piece;
the opt-in ``*_tma`` variants are left out, as compile_check's production checks do, and are
run in test_flce_gpu_configs.py). Each config is pinned and run through its real launcher with
the production call form (padded ragged slices, transposed operands, ``main_grad``
accumulation), at the smallest shape that still has one full tile and a ragged edge along
every tiled dimension; the launches that really ran are observed
(:func:`soda_kernels._launch.observe_launches`) and the test fails on any listed config that
did not.

TP2: rank 1's shard of a two-rank vocabulary (``vocab_start`` > 0, labels / ids on both
ranks, padded vocabulary rows), in this process, for the kernels whose code TP changes (the
forward statistics, the recomputed and chunk dlogits, the chunk statistics, the embedding
backward). The matmuls see only other shapes under TP (the same code path), so they run at
TP1. The collectives around the kernels are torch code, covered by test_tensor_parallel.py's
two-process run.

Accuracy rule (cut-cross-entropy's, as everywhere in tests/kernels): the kernel's error
against the fp64 oracle may exceed the same-dtype PyTorch twin's error by at most
``KERNEL_ORACLE[dtype]``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import triton

from soda_kernels._launch import observe_launches
from soda_kernels._vocab_parallel import merge_partials
from soda_kernels.compile_check import configs_of, production_launches
from soda_kernels.flce_ops import (
    chunk_dlogits_triton,
    chunk_stats_triton,
    grad_logits_torch,
    grad_logits_triton,
    lse_partials_torch,
    lse_partials_triton,
    matmul_torch,
    matmul_triton,
    padded_width,
)
from soda_kernels.flce_tuning import pinned_configs
from soda_kernels.interleaved_embedding import embedding_backward_triton
from tolerances import EMBEDDING_BF16_REL, KERNEL_ORACLE

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Roles whose kernel code TP changes (vocabulary offsets, labels and ids of other ranks).
TP_ROLES = {"lse", "dlogits", "chunk_stats", "chunk_dlogits", "embedding_pieces",
            "embedding_merge"}
RAGGED = 7  # added to a block size: one full tile and a ragged one, not 16-divisible


def _key(role: str, config: dict) -> tuple:
    blocks = tuple(sorted((k, v) for k, v in config["kwargs"].items()
                          if k.startswith(("BLOCK", "PIECE"))))
    return role, blocks, config["num_warps"], config["num_stages"]


@functools.cache
def _listed(dtype: torch.dtype) -> tuple:
    # NOTE: compile_check records (never runs) the launches a GPU makes; the launchers read
    # TRITON_INTERPRET when called, so it is switched off while they are recorded.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        launches = production_launches(dtype)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return tuple((_key(launch.role, c), c) for _, launch in launches
                 if not launch.role.endswith("_tma") for c in configs_of(launch))


def listed(dtype: torch.dtype) -> dict[tuple, dict]:
    """compile_check's production configs for ``dtype``: ``{key: config}``."""
    return dict(_listed(dtype))


def _pin(config: dict) -> dict:
    return dict(config["kwargs"], num_warps=config["num_warps"], num_stages=config["num_stages"])


# ============================================================================ errors
def _abs(x, ref) -> float:
    return float((x.double() - ref).abs().max())


def _rel(x, ref) -> float:
    return _abs(x, ref) / max(float(ref.abs().max()), 1e-30)


def _rule(ours: float, theirs: float, tol: float, what: str) -> None:
    assert ours <= theirs + tol, f"{what}: kernel error {ours:.3e} > torch {theirs:.3e} + {tol:.0e}"


# ============================================================================ one run per role
def _inputs(g, rows: int, h: int, v: int, dtype, scale: float = 3.0):
    hidden = torch.randn(rows, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (scale / h ** 0.5)).to(dtype)
    return hidden, weight


def _labels(g, rows: int, start: int, cols: int, tp: bool) -> torch.Tensor:
    """Labels in this shard (TP1), or on both sides of it (TP2: other ranks' ids), and a -1."""
    lo, hi = (start - 20, start + cols + 20) if tp else (start, start + cols)
    labels = torch.randint(max(lo, 0), hi, (rows,), generator=g)
    labels[0] = -1
    return labels


def run_lse(config, dtype, tp, g):
    bn, bv, bh = (config["kwargs"][k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    rows, n_valid, h = bn + RAGGED, bv + RAGGED, bh + RAGGED
    start = 40 if tp else 0
    hidden, weight = _inputs(g, rows, h, n_valid + 3, dtype)  # 3 padded vocabulary rows
    labels = _labels(g, rows, start, n_valid, tp)
    x = hidden.double() @ weight[:n_valid].double().t()
    exact_lse = torch.logsumexp(x, 1)
    local = labels - start
    inside = (local >= 0) & (local < n_valid)
    exact_t = torch.where(inside, x.gather(1, local.clamp(0, n_valid - 1)[:, None])[:, 0], 0.0)

    def lse_of(m, s, t):
        m, s, t = merge_partials(m[None], s[None], t[None])
        return m + torch.log(s), t

    ours = lse_of(*lse_partials_triton(hidden, weight, labels, start, n_valid))
    theirs = lse_of(*lse_partials_torch(hidden, weight, labels, start, n_valid, 64))
    tol = KERNEL_ORACLE[_name(dtype)]["loss"]
    _rule(_abs(ours[0], exact_lse), _abs(theirs[0], exact_lse), tol, "lse")
    _rule(_abs(ours[1], exact_t), _abs(theirs[1], exact_t), tol, "target logit")


def _dlogits_oracle(hidden, w_slice, labels, lse, grad, col_start, z):
    x = hidden.double() @ w_slice.double().t()
    d = torch.exp(x - lse.double()[:, None]) * (1 + 2 * z * lse.double())[:, None]
    local = labels - col_start
    hit = (local[:, None] == torch.arange(w_slice.shape[0])[None, :])
    return torch.where(grad[:, None] != 0, (d - hit.double()) * grad.double()[:, None], 0.0)


def run_dlogits(config, dtype, tp, g):
    bn, bv, bh = (config["kwargs"][k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    rows, cols, h = bn + RAGGED, bv + RAGGED, bh + RAGGED
    col_start = 300 if tp else 0  # a later slice, or rank 1's first one
    hidden, w_slice = _inputs(g, rows, h, cols, dtype)
    labels = _labels(g, rows, col_start, cols, tp)
    lse = (torch.logsumexp(hidden.double() @ w_slice.double().t(), 1) + 0.5).float()
    grad = torch.rand(rows, generator=g)
    grad[1] = 0.0
    exact = _dlogits_oracle(hidden, w_slice, labels, lse, grad, col_start, 1e-2)
    width = padded_width(cols)
    buf = torch.full((rows, width + 16), float("nan"), dtype=dtype)  # a wider pass buffer
    grad_logits_triton(hidden, w_slice, labels, lse, grad, col_start, 1e-2, buf[:, :width])
    assert (buf[:, cols:width] == 0).all(), "the 16-column padding must hold zeros"
    twin = torch.empty(rows, cols, dtype=dtype)
    grad_logits_torch(hidden, w_slice, labels, lse, grad, col_start, 1e-2, twin)
    _rule(_rel(buf[:, :cols], exact), _rel(twin, exact),
          KERNEL_ORACLE[_name(dtype)]["grad_hidden"], "dlogits")


def _dl_buffer(g, rows: int, cols: int, dtype):
    """A padded dlogits slice as backward_slices makes it: zeros past ``cols``, inside a wider
    buffer (row stride of a whole pass)."""
    width = padded_width(cols)
    buf = torch.zeros(rows, width + 32, dtype=dtype)
    buf[:, :cols] = (torch.randn(rows, cols, generator=g) * 0.1).to(dtype)
    return buf[:, :width], buf[:, :cols]


def _matmul_check(a, b, c0, accumulate, dtype, role, a_real):
    exact = (c0.double() if accumulate else 0) + a_real.double() @ b.double()
    ours, twin = c0.clone(), c0.clone()
    matmul_triton(a, b, ours, accumulate, name=role)
    matmul_torch(a, b, twin, accumulate, name=role)
    _rule(_rel(ours, exact), _rel(twin, exact), KERNEL_ORACLE[_name(dtype)]["grad_weight"], role)
    return ours


def run_grad_weight(config, dtype, tp, g):
    """``main_grad[slice] += dlogits^T @ h_a`` (M = slice width, N = H, K = rows)."""
    bm, bn, bk = (config["kwargs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    cols, h, rows = bm + RAGGED, bn + RAGGED, bk + RAGGED
    dl, dl_real = _dl_buffer(g, rows, cols, dtype)
    h_a = torch.randn(rows, h, generator=g).to(dtype)
    main_grad = torch.randn(cols + 5, h, generator=g)[:cols]
    _matmul_check(dl.t(), h_a, main_grad, True, dtype, "grad_weight", dl_real.t())


def run_grad_hidden(config, dtype, tp, g):
    """``acc (+)= dlogits @ W[slice]`` (M = rows, N = H, K = slice width)."""
    bm, bn, bk = (config["kwargs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    rows, h, cols = bm + RAGGED, bn + RAGGED, bk + RAGGED
    dl, dl_real = _dl_buffer(g, rows, cols, dtype)
    weight = torch.randn(cols + 9, h, generator=g).to(dtype)
    acc = torch.randn(rows, h, generator=g)
    for accumulate in (False, True):  # a pass's first slice, and a later one
        _matmul_check(dl, weight[:cols], acc, accumulate, dtype, "grad_hidden", dl_real)


def run_logits(config, dtype, tp, g):
    """The training path's ``x[:, :store] = h_c @ W^T`` (M = chunk rows, N = V, K = H) into
    the fp32 chunk buffer (rows padded to 64 elements), padding columns zeroed."""
    bm, bn, bk = (config["kwargs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    rows, n_valid, h = bm + RAGGED, bn + RAGGED, bk + RAGGED
    h_c, weight = _inputs(g, rows, h, n_valid, dtype)
    store = padded_width(n_valid)
    buf = torch.full((rows, n_valid + (-n_valid % 64)), float("nan"))
    x = buf[:, :store]
    matmul_triton(h_c, weight.t(), x, False, name="logits")
    assert (x[:, n_valid:] == 0).all(), "the 16-column padding must hold zeros"
    exact = h_c.double() @ weight.double().t()
    twin = torch.empty(rows, n_valid)
    matmul_torch(h_c, weight.t(), twin, False)
    _rule(_rel(x[:, :n_valid], exact), _rel(twin, exact),
          KERNEL_ORACLE[_name(dtype)]["grad_hidden"], "logits")


def _chunk(g, config, tp):
    bn, bv = config["kwargs"]["BLOCK_N"], config["kwargs"]["BLOCK_V"]
    rows, n_valid = bn + 3, bv + RAGGED
    start = 500 if tp else 0
    buf = torch.randn(rows, n_valid + (-n_valid % 64), generator=g) * 3
    return buf[:, :padded_width(n_valid)], n_valid, _labels(g, rows, start, n_valid, tp), start


def run_chunk_stats(config, dtype, tp, g):
    """Statistics of a chunk's fp32 logits (the same code for both weight dtypes)."""
    x, n_valid, labels, start = _chunk(g, config, tp)
    m, s, t = chunk_stats_triton(x, labels, start, n_cols=n_valid)
    exact = x[:, :n_valid].double()
    local = labels - start
    inside = (local >= 0) & (local < n_valid)
    exact_t = torch.where(inside, exact.gather(1, local.clamp(0, n_valid - 1)[:, None])[:, 0], 0.0)
    tol = KERNEL_ORACLE["fp32"]["loss"]
    _rule(_abs(m + torch.log(s), torch.logsumexp(exact, 1)), 0.0, tol, "chunk lse")
    _rule(_abs(t, exact_t), 0.0, 0.0, "chunk target (a copy)")


def run_chunk_dlogits(config, dtype, tp, g):
    """dlogits of a chunk, in place (fp32 weights) or into the 16-bit group buffer."""
    x, n_valid, labels, start = _chunk(g, config, tp)
    exact_x = x[:, :n_valid].double()
    lse = torch.logsumexp(exact_x, 1).float()
    grad = torch.rand(x.shape[0], generator=g)
    grad[1] = 0.0
    d = torch.exp(exact_x - lse.double()[:, None]) * (1 + 2e-2 * lse.double())[:, None]
    hit = (labels - start)[:, None] == torch.arange(n_valid)[None, :]
    exact = torch.where(grad[:, None] != 0, (d - hit.double()) * grad.double()[:, None], 0.0)
    dl = x if dtype == torch.float32 else torch.full(x.shape, float("nan"), dtype=dtype)
    chunk_dlogits_triton(x, dl, labels, lse, grad, start, 1e-2, n_valid)
    assert (dl[:, n_valid:] == 0).all(), "the 16-column padding must hold zeros"
    # The only rounding beyond fp32 is the store in the weight dtype (2^-8 for bf16).
    tol = KERNEL_ORACLE[_name(dtype)]["grad_hidden"] + KERNEL_ORACLE["fp32"]["grad_hidden"]
    _rule(_rel(dl[:, :n_valid], exact), 0.0, tol, "chunk dlogits")


def run_embedding(config, dtype, tp, g):
    """The embedding backward at its GPU piece: runs shorter than, equal to and across
    pieces, ids of other ranks (TP2), one whole piece of one id."""
    piece, block_h = config["kwargs"]["PIECE"], config["kwargs"]["BLOCK_H"]
    rows, h = 40, block_h + RAGGED
    start = rows if tp else 0
    lengths = [1, piece - 1, piece + 1, 2 * piece + 3, 5]
    ids = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)]) + start
    if tp:
        ids = torch.cat([ids, torch.randint(0, start, (9,), generator=g),
                         torch.randint(start + rows, 3 * rows, (9,), generator=g)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    grad = (torch.rand(ids.numel(), h, generator=g) + 0.5).to(dtype)
    ours = embedding_backward_triton(grad, ids, start, rows, block_h=block_h, piece=piece)
    local = ids - start
    inside = (local >= 0) & (local < rows)
    exact = torch.zeros(rows, h, dtype=torch.float64).index_add_(0, local[inside],
                                                                 grad[inside].double())
    tol = EMBEDDING_BF16_REL if dtype != torch.float32 else 1e-6
    assert _rel(ours, exact) <= tol, ("embedding", _rel(ours, exact))


RUNS = {"lse": run_lse, "dlogits": run_dlogits, "grad_weight": run_grad_weight,
        "grad_hidden": run_grad_hidden, "logits": run_logits, "chunk_stats": run_chunk_stats,
        "chunk_dlogits": run_chunk_dlogits, "embedding_pieces": run_embedding,
        "embedding_merge": run_embedding}


def _name(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "bf16"


# ============================================================================ the tests
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_listed_gpu_tile_runs_against_the_fp64_oracle(dtype, tp):
    expected = {k: c for k, c in listed(DTYPES[dtype]).items()
                if tp == 1 or k[0] in TP_ROLES}
    assert expected, "compile_check lists no production config"
    unknown = {k[0] for k in expected} - set(RUNS)
    assert not unknown, f"compile_check lists kernels this test cannot run yet: {unknown}"
    g = torch.Generator().manual_seed(0)
    seen: set = set()
    with observe_launches() as ran:
        for key, config in expected.items():
            if key in seen:  # already run by another role's call (the embedding's two kernels)
                continue
            with pinned_configs({key[0]: _pin(config)}):
                RUNS[key[0]](config, DTYPES[dtype], tp == 2, g)
            seen |= {_key(c.role, cfg) for c in ran for cfg in configs_of(c)}
    assert not any(c.tuned for c in ran), "a launch went to the autotuner, not the pinned tile"
    missing = sorted(str(k) for k in set(expected) - seen)
    assert not missing, "listed by compile_check but never run:\n" + "\n".join(missing)


def test_the_comparison_can_fail():
    """The set comparison sees a tile that did not run: the CPU interpreter's own tiles are
    not the GPU's, so an unpinned run covers none of the listed matmul configs."""
    g = torch.Generator().manual_seed(0)
    with observe_launches() as ran:
        run_grad_hidden({"kwargs": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)}, torch.float32,
                        False, g)
    seen = {_key(c.role, cfg) for c in ran for cfg in configs_of(c)}
    listed_h = {k for k in listed(torch.float32) if k[0] == "grad_hidden"}
    assert listed_h and not listed_h & seen
    assert triton.cdiv(16 + RAGGED, 16) == 2  # one full tile and a ragged one
