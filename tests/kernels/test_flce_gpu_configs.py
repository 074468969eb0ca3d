"""Every GPU autotune config of the fused loss runs under the interpreter (the index math of
the configs the GPU may pick: grouped program order, several row / column / H tiles, masked
rows, the ragged last vocabulary slice and its 16-column padding), forward and backward
against the fp64 oracle; the TP=2 run of the same configs is in test_tensor_parallel.py. And
the two backward matmuls never share an autotune entry."""

from __future__ import annotations

import pytest
import torch

from flce_cases import errors, make_case, run_fused, run_reference
from soda_kernels._launch import record_launches
from soda_kernels.fused_linear_cross_entropy import (
    CONFIGS,
    WORK,
    autotuner,
    backward_slices,
    padded_width,
    pinned_configs,
)
from tolerances import KERNEL_ORACLE

ROLES = ("lse", "dlogits", "grad_weight", "grad_hidden")
NUM_CONFIGS = max(len(CONFIGS[r]) for r in ROLES)
# At least two tiles along every tiled dimension for the largest blocks (256 rows / columns,
# 64-wide H steps): ~300 active rows, H = 264, 430 real ids in vocabulary slices of 272 (the
# last one 158 wide: padded to 160). Just above the tile sizes: the interpreter pays per
# program and per op.
N, H, V, N_REAL, SLICE = 440, 264, 440, 430, 272


def pinned(index: int) -> dict:
    """Config ``index`` of every role (cycled where a role has fewer)."""
    return {role: CONFIGS[role][index % len(CONFIGS[role])] for role in ROLES}


@pytest.fixture(scope="module")
def case():
    return make_case(N, H, V, n_real=N_REAL, seed=3, scale=3.0, mask_fraction=0.1)


@pytest.fixture(scope="module")
def oracle(case):
    return run_reference(case, torch.float64, z_loss=1e-2), run_reference(case, torch.float32,
                                                                         z_loss=1e-2)


@pytest.mark.parametrize("index", range(NUM_CONFIGS))
def test_every_gpu_config_matches_the_fp64_oracle(case, oracle, index):
    exact, plain = oracle
    WORK.reset()
    with pinned_configs(pinned(index)):
        result = run_fused(case, "triton", z_loss=1e-2, vocab_slice=SLICE)
    slices = [c for c in WORK.calls if c[0] == "dlogits"]
    assert [c[2] for c in slices] == [272, 158]  # the ragged last slice ran
    ours, theirs = errors(result, exact), errors(plain, exact)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["fp32"][key], (index, key, err, theirs[key])
    inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
    assert (result["grad_hidden"][inactive] == 0).all() and (result["loss"][inactive] == 0).all()
    assert (result["grad_weight"][N_REAL:] == 0).all()


def test_gpu_configs_really_have_several_tiles(case):
    """The shapes above give every config at least two tiles along each dimension it tiles
    (otherwise the grouped order and the tile offsets would go untested)."""
    n_a = int(((case["loss_mask"] != 0) & (case["loss_groups"] >= 0)).sum())
    dims = {"lse": {"BLOCK_N": n_a, "BLOCK_V": N_REAL, "BLOCK_H": H},
            "dlogits": {"BLOCK_N": n_a, "BLOCK_V": SLICE, "BLOCK_H": H},
            "grad_weight": {"BLOCK_M": SLICE, "BLOCK_N": H, "BLOCK_K": n_a},
            "grad_hidden": {"BLOCK_M": n_a, "BLOCK_N": H, "BLOCK_K": SLICE}}
    for role, sizes in dims.items():
        for c in CONFIGS[role]:
            for block, size in sizes.items():
                assert -(-size // c.kwargs[block]) >= 2, (role, c, block, size)


def _matmul_launches(accumulate_main_grad: bool):
    """The recorded launches of a two-slice backward on meta tensors (the GPU plan)."""
    meta = torch.device("meta")
    n, h, v, s = 128, 64, 300, 160
    with record_launches() as calls:
        h_a = torch.empty(n, h, dtype=torch.bfloat16, device=meta)
        w = torch.empty(v, h, dtype=torch.bfloat16, device=meta)
        vec = torch.empty(n, device=meta)
        backward_slices(h_a, w, torch.empty(n, dtype=torch.long, device=meta), vec, vec,
                        torch.empty(v, h, device=meta), accumulate_main_grad,
                        torch.empty(n, h, device=meta), 0.0, 0, v, "triton", s)
    return calls


def _tuning_identity(launch):
    """What Triton's autotuner keys a launch's tuned config on, in memory and on disk: the
    wrapped kernel, its configs, the key arguments' values and every tensor's dtype."""
    tuner = autotuner(launch.role)
    values = dict(launch.named, **launch.consts)
    key = [values[k] for k in tuner.keys] + [str(a.dtype) for a in launch.args if hasattr(a, "dtype")]
    return launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel, \
        tuple(str(c) for c in tuner.configs), tuple(key)


def test_grad_weight_and_grad_hidden_have_separate_autotune_entries():
    calls = _matmul_launches(accumulate_main_grad=True)
    second = [c for c in calls if c.role in ("grad_weight", "grad_hidden")][2:]  # slice 2: both accumulate
    by_role = {c.role: c for c in second}
    assert set(by_role) == {"grad_weight", "grad_hidden"}
    assert by_role["grad_weight"].consts["ACCUMULATE"] == by_role["grad_hidden"].consts["ACCUMULATE"]
    assert autotuner("grad_weight") is not autotuner("grad_hidden")
    ident_w, ident_h = (_tuning_identity(by_role[r]) for r in ("grad_weight", "grad_hidden"))
    assert ident_w[2] != ident_h[2], "same key values: the on-disk cache entry would be shared"


def test_ragged_slice_keeps_16_divisible_matmul_bounds():
    calls = _matmul_launches(accumulate_main_grad=False)
    last = [c for c in calls][-3:]  # dlogits, grad_weight, grad_hidden of the 140-wide slice
    dl, gw, gh = (c.named for c in last)
    assert dl["n_cols"] == 140 and dl["n_store"] == padded_width(140) == 144
    assert gw["M"] == 140 and gw["A_M"] == 144 and gw["stride_ak"] % 16 == 0
    assert gh["K"] == 140 and gh["A_K"] == 144 and gh["stride_am"] % 16 == 0


@pytest.mark.parametrize("role", ["grad_weight", "grad_hidden"])
def test_tma_matmul_variant_equals_the_pointer_matmul(role):
    """The opt-in TMA kernel (descriptors made on the device; out-of-bounds rows zero-filled
    by the copy engine) on a ragged, padded slice, both A layouts, every config's tiles."""
    from soda_kernels.fused_linear_cross_entropy import matmul_triton

    g = torch.Generator().manual_seed(0)
    n_a, h, width = 300, 264, 158
    dl_buf = torch.randn(n_a, padded_width(272), generator=g)
    dl = dl_buf[:, :padded_width(width)]
    dl[:, width:] = 0.0  # the padding the dlogits kernel writes
    h_a, w_s = torch.randn(n_a, h, generator=g), torch.randn(width, h, generator=g)
    for config in CONFIGS[role]:
        if role == "grad_weight":
            a, b, c0 = dl.t(), h_a, torch.randn(width, h, generator=g)
        else:
            a, b, c0 = dl, w_s, torch.randn(n_a, h, generator=g)
        plain, tma = c0.clone(), c0.clone()
        matmul_triton(a, b, plain, True, name=role, blocks=config.kwargs)
        matmul_triton(a, b, tma, True, name=role, blocks=config.kwargs, tma=True)
        expected = c0.double() + a[:c0.shape[0], :b.shape[0]].double() @ b.double()
        torch.testing.assert_close(tma, plain, rtol=0, atol=0)
        torch.testing.assert_close(tma.double(), expected, rtol=1e-5, atol=1e-4)
