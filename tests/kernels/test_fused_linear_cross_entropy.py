"""Fused linear cross-entropy: accuracy against an fp64 oracle, masking, padding, statistics.

Shapes are odd on purpose: N, H and V are not multiples of the CPU block sizes (32 x 64 x 32),
and the real vocabulary stops short of the weight rows (padding). The TP=2 equality is in
test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from flce_cases import errors, make_case, run_fused, run_reference
from soda_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    grad_logits_torch,
    grad_logits_triton,
    lse_partials_torch,
    lse_partials_triton,
)
from tolerances import KERNEL_ORACLE, KERNEL_REORDER_FP32

SHAPES = {  # name: (N, H, V rows, real ids)
    "odd": (37, 40, 203, 190),
    "block_multiples": (64, 32, 128, 128),
    "tiny": (5, 16, 70, 69),
}


def _assert_oracle_rule(result, same_dtype_torch, oracle, tol):
    ours, theirs = errors(result, oracle), errors(same_dtype_torch, oracle)
    for key, err in ours.items():
        assert err <= theirs[key] + tol[key], (
            f"{key}: kernel error {err:.3e} > torch error {theirs[key]:.3e} + {tol[key]:.0e}")


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_against_fp64_oracle(device, shape, z_loss):
    n, h, v, n_real = SHAPES[shape]
    case = make_case(n, h, v, n_real=n_real, device=device, scale=3.0)
    oracle = run_reference(case, torch.float64, z_loss=z_loss)
    plain = run_reference(case, torch.float32, z_loss=z_loss)
    for impl in ("triton", "torch"):
        result = run_fused(case, impl, z_loss=z_loss)
        _assert_oracle_rule(result, plain, oracle, KERNEL_ORACLE["fp32"])
        torch.testing.assert_close(result["group_loss"].double(), oracle["group_loss"],
                                   rtol=1e-5, atol=1e-4)
        assert torch.equal(result["group_tokens"], oracle["group_tokens"])


def test_bf16_against_fp64_oracle(device):
    case = make_case(45, 72, 150, n_real=141, dtype=torch.bfloat16, device=device, scale=4.0)
    oracle = run_reference(case, torch.float64, z_loss=1e-3)  # exact maths on the bf16 values
    same_dtype = run_fused(case, "torch", z_loss=1e-3)        # bf16 logits, as Megatron's path
    result = run_fused(case, "triton", z_loss=1e-3)
    assert result["grad_hidden"].dtype == result["grad_weight"].dtype == torch.bfloat16
    _assert_oracle_rule(result, same_dtype, oracle, KERNEL_ORACLE["bf16"])


def test_z_loss_adds_z_times_lse_squared(device):
    case = make_case(37, 40, 203, n_real=190, device=device)
    base = run_fused(case, "triton", z_loss=0.0)
    with_z = run_fused(case, "triton", z_loss=0.05)
    active = base["loss"] != 0
    expected = base["loss"] + 0.05 * base["lse"] ** 2
    torch.testing.assert_close(with_z["loss"][active], expected[active], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(with_z["grad_weight"], base["grad_weight"], rtol=1e-3, atol=0)


def test_masked_tokens_have_no_loss_and_no_gradient(device):
    case = make_case(37, 40, 203, n_real=190, device=device, mask_fraction=0.5)
    inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
    assert 0 < int(inactive.sum()) < 37
    first = run_fused(case, "triton", z_loss=1e-2)
    assert (first["loss"][inactive] == 0).all() and (first["loss"][~inactive] > 0).all()
    assert (first["grad_hidden"][inactive] == 0).all()
    # Changing what the inactive tokens look like changes nothing.
    scrambled = dict(case, hidden=case["hidden"].clone())
    scrambled["hidden"][inactive] = torch.randn_like(scrambled["hidden"][inactive]) * 10
    second = run_fused(scrambled, "triton", z_loss=1e-2)
    torch.testing.assert_close(second["loss"], first["loss"], rtol=0, atol=0)
    torch.testing.assert_close(second["grad_weight"], first["grad_weight"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_masked_gives_zero_loss_and_gradients(device, impl):
    case = make_case(20, 24, 90, device=device)
    case["loss_mask"] = torch.zeros_like(case["loss_mask"])
    result = run_fused(case, impl, z_loss=1e-2)
    for key in ("loss", "grad_hidden", "grad_weight", "group_loss"):
        assert torch.isfinite(result[key]).all() and (result[key] == 0).all(), key
    assert (result["group_tokens"] == 0).all()


def test_padded_rows_are_never_predicted(device):
    case = make_case(37, 40, 203, n_real=190, device=device)
    case["weight"][190:] = 50.0  # would dominate the softmax if it were included
    case["labels"][:3] = torch.tensor([190, 202, -5])  # labels outside the real range: ignored
    padded = run_fused(case, "triton", z_loss=1e-3)
    trimmed = run_fused(dict(case, weight=case["weight"][:190].clone()), "triton", z_loss=1e-3)
    assert (padded["grad_weight"][190:] == 0).all()
    assert (padded["loss"][:3] == 0).all()
    torch.testing.assert_close(padded["loss"], trimmed["loss"], rtol=0, atol=0)
    torch.testing.assert_close(padded["grad_weight"][:190], trimmed["grad_weight"], rtol=0, atol=0)


def test_group_statistics(device):
    case = make_case(64, 32, 128, device=device, mask_fraction=0.3)
    result = run_fused(case, "triton", z_loss=1e-2)
    active = (case["loss_mask"] != 0) & (case["loss_groups"] >= 0)
    for g in range(3):
        sel = active & (case["loss_groups"] == g)
        assert int(result["group_tokens"][g]) == int(sel.sum())
        torch.testing.assert_close(result["group_loss"][g], result["loss"][sel].sum())
    torch.testing.assert_close(result["group_loss"].sum(), result["loss"].sum())


def test_vocab_splits_and_slices_are_exact_rearrangements(device):
    case = make_case(37, 40, 203, n_real=190, device=device)
    h, w, y = case["hidden"], case["weight"], case["labels"]
    small = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
    one = lse_partials_triton(h, w, y, 0, 190, splits=1)
    many = lse_partials_triton(h, w, y, 0, 190, splits=5, blocks=small)
    plain = lse_partials_torch(h, w, y, 0, 190, vocab_slice=48)
    for a, b, c in zip(one, many, plain):
        torch.testing.assert_close(a, b, **KERNEL_REORDER_FP32)
        torch.testing.assert_close(a, c, **KERNEL_REORDER_FP32)
    # A vocabulary offset (as on TP rank > 0): labels are global ids.
    shifted = lse_partials_triton(h, w, y + 1000, 1000, 190)
    torch.testing.assert_close(shifted[2], one[2], rtol=0, atol=0)
    whole = run_fused(case, "triton", z_loss=1e-2)
    for impl in ("triton", "torch"):
        sliced = run_fused(case, impl, z_loss=1e-2, vocab_slice=48)  # 4 slices, the last short
        for key in ("loss", "grad_hidden", "grad_weight"):
            torch.testing.assert_close(sliced[key], whole[key], **KERNEL_REORDER_FP32)


def test_grad_logits_kernel_matches_torch(device):
    case = make_case(37, 40, 203, n_real=190, device=device)
    h, w, y = case["hidden"], case["weight"], case["labels"]
    m, s, _ = lse_partials_torch(h, w, y, 0, 190, vocab_slice=64)
    lse = m + torch.log(s)
    g = torch.rand(37) * (case["loss_mask"] != 0)
    # The slice [50, 150) of the weight: labels are compared with global ids.
    a = grad_logits_triton(h, w[50:150], y, lse, g, 50, 0.03, torch.empty(37, 100))
    b = grad_logits_torch(h, w[50:150], y, lse, g, 50, 0.03, torch.empty(37, 100))
    torch.testing.assert_close(a, b, **KERNEL_REORDER_FP32)
    assert (a[g == 0] == 0).all()
    hit = (y >= 50) & (y < 150) & (g != 0)
    assert (a[hit, (y[hit] - 50)] < 0).all()


def test_matches_megatron_vocab_parallel_cross_entropy(megatron_one_process, device):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    case = make_case(37, 40, 203, n_real=190, device=device, mask_fraction=0.0)
    case["loss_groups"] = case["loss_groups"].clamp_min(0)
    logits = case["hidden"] @ case["weight"].t()
    logits[:, 190:] = float("-inf")  # what SodaGPTModel's output-layer hook does
    megatron = vocab_parallel_cross_entropy(logits[:, None, :].clone(), case["labels"][:, None])[:, 0]
    ours = run_fused(case, "triton")["loss"]
    torch.testing.assert_close(ours, megatron, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_torch_compile_traces_without_graph_break(device, impl):
    """fullgraph=True fails on any graph break; aot_eager runs AOTAutograd (fake tensors, the
    registered fake functions, the traced backward) without a C++ compiler."""
    case = make_case(37, 40, 203, n_real=190, device=device)

    def f(hidden, weight):
        out = fused_linear_cross_entropy(hidden, weight, case["labels"], case["loss_mask"],
                                         case["loss_groups"], z_loss=1e-2, num_real_vocab=190,
                                         impl=impl)
        return out.loss.sum() / out.group_tokens.sum(), out.group_loss

    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss, groups = compiled(hidden, weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    eager_loss, eager_groups = f(hidden, weight)
    eager_grads = torch.autograd.grad(eager_loss, (hidden, weight))
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(groups, eager_groups, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rejects_bad_inputs(device):
    case = make_case(8, 16, 32, device=device)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_cross_entropy(case["hidden"], case["weight"].double(), case["labels"])
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"][:3])
    with pytest.raises(ValueError, match="impl"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"], impl="cuda")


def test_cpu_tensors_without_interpreter_fail_with_a_hint(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(8, 16, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lse_partials_triton(case["hidden"], case["weight"], case["labels"], 0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [512, 2560])
@pytest.mark.parametrize("v", [144_644, 72_322])
def test_bf16_soda_shapes_on_gpu(h, v):
    """Full SODA shapes (N = 8192; the whole vocabulary and its TP=2 shard) in bf16."""
    case = make_case(8192, h, v, dtype=torch.bfloat16, device="cuda", scale=4.0)
    oracle = run_reference(case, torch.float64, z_loss=1e-4)
    same_dtype = run_fused(case, "torch", z_loss=1e-4)
    result = run_fused(case, "triton", z_loss=1e-4)
    _assert_oracle_rule(result, same_dtype, oracle, KERNEL_ORACLE["bf16"])
