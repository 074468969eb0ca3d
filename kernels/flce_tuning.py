"""Tile configurations of the fused linear cross-entropy: precision policy, autotune spaces
and keys, the CPU interpreter's fixed tiles, pinned configs, and the one launch helper.

On CUDA each kernel is a ``triton.autotune`` over a small pruned Hopper-oriented space keyed
on ``(H, V_local, dtypes)`` (not on N, which changes with the mask); the two backward matmuls
are separate roles with their own spaces and entries (``KEY_ROLE``: Triton's autotuner and
its disk cache would otherwise hand grad_h the config tuned for grad_W). Under
``TRITON_INTERPRET`` (CPU) the kernels run with one fixed small configuration, or any GPU
config through :func:`pinned_configs` (the tests run every one). A tuned config is chosen per
process (``cache_results`` keeps it on disk): bits are repeatable for a fixed config, not
across a re-tune that picks another tile shape.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import triton

from soda_kernels._launch import gpu_like, launch
from soda_kernels._vocab_parallel import interpreting
from soda_kernels.flce_kernels import (
    _grad_logits_kernel,
    _lse_partials_kernel,
    _matmul_kernel,
    _matmul_tma_kernel,
)


# ============================================================================ precision policy
def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` ``input_precision`` for ``dtype`` operands, the module's one policy.

    fp32 on CUDA: ``"tf32"`` when torch's CUDA matmuls may use TF32
    (``torch.backends.cuda.matmul.allow_tf32`` or ``fp32_precision == "tf32"``), else
    ``"ieee"``; the torch path gets the same from cuBLAS. CPU: ``"ieee"``. bf16 / fp16:
    Triton's default ``"tf32"``, which only governs fp32 operands: 16-bit operands always
    multiply on tensor cores with fp32 accumulation (the interpreter's upcast bf16 values fit
    TF32 exactly).
    """
    if dtype != torch.float32:
        return "tf32"
    if device.type != "cuda":
        return "ieee"
    m = torch.backends.cuda.matmul
    tf32 = bool(m.allow_tf32) or getattr(m, "fp32_precision", "none") == "tf32"
    return "tf32" if tf32 else "ieee"



# ============================================================================ tuning
def _space(names: str, rows: list[tuple], **fixed) -> list[triton.Config]:
    """One config per ``(num_warps, num_stages, *block sizes)`` row; the block sizes are named
    by ``names`` (space-separated), ``fixed`` adds the same constexprs to every config."""
    keys = names.split()
    return [triton.Config(dict(zip(keys, row[2:]), **fixed), num_warps=row[0], num_stages=row[1])
            for row in rows]


# NOTE: Hopper-oriented spaces, kept small (each distinct key benchmarks every surviving
# config once). Not timed in the session that wrote them (no GPU): their sm_90a code
# (registers, spills, shared memory, CTAs per SM, wgmma, async copies) is what
# ``python -m soda_kernels.compile_check`` reports (benchmarks/results/sm90_codegen.md); the
# GPU campaign (benchmarks/gpu_campaign.sh) is where they are timed and pruned further.
# Rows: (num_warps, num_stages, block sizes...).
_LSE_CONFIGS = _space("BLOCK_N BLOCK_V BLOCK_H", [
    (8, 3, 128, 128, 64), (4, 4, 64, 128, 64), (8, 3, 64, 256, 64), (4, 4, 128, 64, 64)])
_DLOGITS_CONFIGS = _space("BLOCK_N BLOCK_V BLOCK_H", [
    (8, 3, 128, 128, 64), (8, 3, 128, 256, 64), (4, 4, 64, 128, 64), (4, 4, 128, 128, 32)],
    GROUP_M=8)
# grad_W = dlogits^T @ h_a: M = slice width, N = H, K = active rows; A is column-major.
_GRAD_W_CONFIGS = _space("BLOCK_M BLOCK_N BLOCK_K", [
    (8, 3, 128, 256, 64), (8, 3, 256, 128, 64), (8, 3, 128, 128, 64), (4, 4, 128, 128, 32),
    (4, 4, 64, 128, 64)], GROUP_M=8)
# grad_h += dlogits @ W[slice]: M = active rows, N = H, K = slice width; A is row-major. Also
# the training path's logits chunk (M = chunk rows, N = V_local, K = H).
_GRAD_H_CONFIGS = _space("BLOCK_M BLOCK_N BLOCK_K", [
    (8, 3, 128, 256, 64), (8, 4, 128, 256, 32), (8, 3, 256, 128, 64), (8, 3, 128, 128, 64),
    (4, 4, 64, 128, 64)], GROUP_M=8)
#: Autotune space of each launch role (the ``role`` of :func:`soda_kernels._launch.launch`).
CONFIGS = {"lse": _LSE_CONFIGS, "dlogits": _DLOGITS_CONFIGS, "grad_weight": _GRAD_W_CONFIGS,
           "grad_hidden": _GRAD_H_CONFIGS, "matmul": _GRAD_H_CONFIGS,
           "logits": _GRAD_H_CONFIGS,
           "grad_weight_tma": _GRAD_W_CONFIGS, "grad_hidden_tma": _GRAD_H_CONFIGS,
           "matmul_tma": _GRAD_H_CONFIGS}
#: ``KEY_ROLE`` of each matmul role: Triton's autotuner (and its on-disk cache) keys on the
#: wrapped kernel, the configs and the key values, so without it grad_W and grad_h (same
#: kernel, same H, V, ACCUMULATE) would share one entry and one tuned config.
_MATMUL_ROLE_KEYS = {"matmul": 0, "grad_weight": 1, "grad_hidden": 2, "logits": 3}
_TUNE_KEYS = {"lse": ["H", "n_valid"], "dlogits": ["H", "KEY_V"],
              "matmul": ["KEY_H", "KEY_V", "KEY_ROLE", "ACCUMULATE"],
              "matmul_tma": ["KEY_H", "KEY_V", "KEY_ROLE", "ACCUMULATE"]}
_SMEM_BUDGET = 200 * 1024  # H100 / H200: 228 KB of shared memory per SM, leave room
_TILE_DIMS = {"lse": ("BLOCK_N", "BLOCK_H", "BLOCK_V"), "dlogits": ("BLOCK_N", "BLOCK_H", "BLOCK_V"),
              "matmul": ("BLOCK_M", "BLOCK_K", "BLOCK_N"), "matmul_tma": ("BLOCK_M", "BLOCK_K", "BLOCK_N")}


def _kind(role: str) -> str:
    if role in ("lse", "dlogits"):
        return role
    return "matmul_tma" if role.endswith("_tma") else "matmul"


def smem_estimate(role: str, config: triton.Config, elt: int) -> int:
    """Bytes of the pipelined operand tiles of ``config`` (``elt`` bytes per element)."""
    a_m, a_k, b_n = _TILE_DIMS[_kind(role)]
    return (config.kwargs[a_m] + config.kwargs[b_n]) * config.kwargs[a_k] * elt * config.num_stages


def _prune(role: str):
    """Drop configs whose pipelined operand tiles overflow shared memory (fp32 tiles double)."""

    def prune(configs, named_args, **kwargs):
        elt = next(v.element_size() for v in named_args.values() if hasattr(v, "element_size"))
        if named_args.get("UPCAST") or kwargs.get("UPCAST"):
            elt = 4
        keep = [c for c in configs if smem_estimate(role, c, elt) <= _SMEM_BUDGET]
        return keep or configs[-1:]

    return prune


_KERNELS = {"lse": _lse_partials_kernel, "dlogits": _grad_logits_kernel, "matmul": _matmul_kernel,
            "matmul_tma": _matmul_tma_kernel}
_TUNED = {}


def autotuner(role: str):
    """The ``triton.autotune`` wrapper of ``role``'s kernel (one per role, built on first use)."""
    if role not in _TUNED:
        kind = _kind(role)
        _TUNED[role] = triton.autotune(
            configs=CONFIGS[role], key=_TUNE_KEYS[kind],
            restore_value=["c_ptr"] if kind.startswith("matmul") else None,
            prune_configs_by={"early_config_prune": _prune(role)}, cache_results=True,
        )(_KERNELS[kind])
    return _TUNED[role]


# Fixed configurations: the CPU interpreter (cost grows with the number of programs, so tiles
# are kept few), or a caller's explicit ``blocks``.
_CPU = {"lse": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32),
        "dlogits": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, GROUP_M=4),
        "matmul": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)}


_PINNED: dict = {}


@contextmanager
def pinned_configs(configs: dict):
    """Within the block, launches of each role in ``configs`` (``lse``, ``dlogits``,
    ``grad_weight``, ``grad_hidden``, ``logits``, and the fixed tiles of ``chunk_stats`` /
    ``chunk_dlogits``; a ``triton.Config`` or its block sizes) use that tile
    configuration instead of the autotuner's or the CPU's. Tests run every GPU config through
    the interpreter with it; on a GPU it reproduces one config's bits without a re-tune."""
    saved = dict(_PINNED)
    _PINNED.update({role: dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    if isinstance(c, triton.Config) else dict(c) for role, c in configs.items()})
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(saved)


def _flags(x: torch.Tensor) -> dict:
    return dict(UPCAST=interpreting() and x.dtype != torch.float32,
                PRECISION=dot_precision(x.dtype, x.device))


def _use_tuner(device: torch.device, blocks: dict | None) -> bool:
    return gpu_like(device) and blocks is None and not interpreting()


def _run(role: str, device: torch.device, grid, args: tuple, consts: dict,
         blocks: dict | None) -> None:
    """Launch ``role``'s kernel: autotuned on a GPU, else with ``blocks`` or the CPU tiles.
    ``grid`` maps the tile configuration to the launch grid."""
    kernel = _KERNELS[_kind(role)]
    blocks = blocks or _PINNED.get(role)
    if _use_tuner(device, blocks):
        launch(role, kernel, lambda meta: grid(meta), args, consts, tuner=lambda: autotuner(role))
    else:
        cfg = dict(blocks or _CPU[_kind(role)])
        launch(role, kernel, grid(cfg), args, {**consts, **cfg})
