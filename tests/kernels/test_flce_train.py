"""The fused loss's training path (soda_kernels.flce_train): gradients computed in the forward
with three matmuls when the downstream gradient is known, against the fp64 oracle; the
backward's check of the incoming gradient; the dispatch that keeps the recompute path for
every other use; Megatron's main_grad; bounded memory."""

from __future__ import annotations

import pytest
import torch

from flce_cases import errors, make_case, run_reference, run_train, upstream_of
from soda_kernels.flce_backward import compacts_rows
from soda_kernels.flce_train import default_row_chunk, flce_train_reference, train_extra_bytes
from soda_kernels.fused_linear_cross_entropy import WORK, fused_linear_cross_entropy, row_multiple
from test_flce_backward_plan import _cpu_peak_bytes
from tolerances import KERNEL_ORACLE, KERNEL_REORDER_FP32


def _work_by_name() -> dict:
    out: dict = {}
    for name, m, n, k in WORK.calls:
        out[name] = out.get(name, 0) + 2 * m * n * k
    return out


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("rows", [16, 4096], ids=["chunks", "one_chunk"])
def test_three_matmuls_match_the_fp64_oracle(device, impl, rows):
    """Odd shapes (61 rows, H 40, V 300 with 10 padded ids), 20% masked rows, z-loss, a random
    upstream gradient: the forward launches exactly the three 2 N_a H V matmuls, the backward
    none, and loss and gradients are as close to the fp64 oracle as the fp32 reference."""
    case = make_case(61, 40, 300, n_real=290, device=device, scale=3.0)
    n_a = int(((case["loss_mask"] != 0) & (case["loss_groups"] >= 0)).sum())
    known = upstream_of(61, device)
    WORK.reset()
    result = run_train(case, impl, known, z_loss=1e-2, row_chunk=rows)
    work = _work_by_name()
    assert set(work) == {"logits", "grad_hidden", "grad_weight"}
    seen = n_a if compacts_rows(torch.device(device)) else 61  # a GPU masks, CPU compacts
    rows_run = seen + (-seen % row_multiple(torch.device(device), impl))  # CUDA pads to 64
    assert all(f == 2 * rows_run * 40 * 290 for f in work.values()), work  # padded ids never
    oracle = run_reference(case, torch.float64, z_loss=1e-2)  # the same upstream (seed 1)
    plain = run_reference(case, torch.float32, z_loss=1e-2)
    ours, theirs = errors(result, oracle), errors(plain, oracle)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["fp32"][key], (key, err, theirs[key])
    inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
    assert (result["grad_hidden"][inactive] == 0).all() and (result["loss"][inactive] == 0).all()
    assert (result["grad_weight"][290:] == 0).all()


def _bf16_micro_batches(impl, known_grad: bool, device, **kwargs):
    """Two bf16 micro-batches into a fresh fp32 main_grad: per-step errors vs the fp64 oracle
    (loss, grad_hidden) and the accumulated main_grad's error."""
    n, h, v = 45, 32, 150
    weight = torch.nn.Parameter(make_case(n, h, v, dtype=torch.bfloat16, device=device,
                                          scale=3.0)["weight"])
    weight.main_grad = torch.zeros(v, h, device=device)
    weight.grad_added_to_main_grad = False
    expected = torch.zeros(v, h, dtype=torch.float64, device=device)
    errs = {"loss": 0.0, "grad_hidden": 0.0}
    for step in range(2):
        case = make_case(n, h, v, seed=20 + step, dtype=torch.bfloat16, device=device, scale=3.0)
        known = case["loss_mask"].float()
        hidden = case["hidden"].clone().requires_grad_()
        out = fused_linear_cross_entropy(hidden, weight, case["labels"], case["loss_mask"],
                                         case["loss_groups"], z_loss=1e-2, impl=impl,
                                         known_grad=known if known_grad else None, row_chunk=16,
                                         **kwargs)
        assert weight.grad_added_to_main_grad == (step > 0)  # DDP learns of it in backward
        (out.loss * known).sum().backward()
        assert weight.grad_added_to_main_grad
        assert weight.grad.data_ptr() == weight.data_ptr()  # the placeholder alias
        weight.grad = None
        ref, ref_h, ref_w = flce_train_reference(
            case["hidden"].double(), weight.detach().double(), case["labels"], known.double(),
            case["loss_mask"], case["loss_groups"], z_loss=1e-2, compute_dtype=torch.float64)
        expected += ref_w
        errs["loss"] = max(errs["loss"], float((out.loss.double() - ref.loss).abs().max()))
        errs["grad_hidden"] = max(errs["grad_hidden"], float(
            (hidden.grad.double() - ref_h).abs().max() / ref_h.abs().max()))
    errs["grad_weight"] = float((weight.main_grad.double() - expected).abs().max()
                                / expected.abs().max())
    return errs


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bf16_into_main_grad_matches_the_oracle(device, impl):
    """bf16 weights with Megatron's fp32 main_grad, two micro-batches, rows in chunks: errors
    vs the fp64 oracle within the bf16 row of the tolerance table above the bf16 recompute
    path's own errors (cut-cross-entropy's rule)."""
    ours = _bf16_micro_batches(impl, True, device)
    theirs = _bf16_micro_batches("torch", False, device)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["bf16"][key], (key, err, theirs[key])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_another_incoming_gradient_is_still_exact(device, impl):
    """The backward gets a gradient other than the announced one (2x, or random): it adds the
    recompute path's gradients for the difference, so the result is still the oracle's."""
    case = make_case(37, 24, 130, n_real=120, device=device, scale=3.0)
    known = case["loss_mask"].float()
    for upstream in (2 * known, upstream_of(37, device, seed=1)):
        WORK.reset()
        result = run_train(case, impl, known, upstream=upstream, z_loss=1e-2, row_chunk=16)
        assert "dlogits" in _work_by_name()  # the recompute ran for the difference
        _, ref_h, ref_w = flce_train_reference(
            case["hidden"].double(), case["weight"].double(), case["labels"], upstream.double(),
            case["loss_mask"], case["loss_groups"], num_real_vocab=120, z_loss=1e-2,
            compute_dtype=torch.float64)
        for key, ref in (("grad_hidden", ref_h), ("grad_weight", ref_w)):
            err = float((result[key].double() - ref).abs().max() / ref.abs().max())
            assert err <= 1e-5, (key, err)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bitwise_repeatable_and_chunking_only_reorders(device, impl):
    case = make_case(70, 40, 203, n_real=190, device=device, scale=3.0)
    known = case["loss_mask"].float()
    first = run_train(case, impl, known, z_loss=1e-2, row_chunk=16)
    again = run_train(case, impl, known, z_loss=1e-2, row_chunk=16)
    for key in ("loss", "lse", "grad_hidden", "grad_weight"):
        assert torch.equal(first[key], again[key]), key
    whole = run_train(case, impl, known, z_loss=1e-2, row_chunk=1024)
    recompute = run_train(case, impl, None, upstream=known, z_loss=1e-2)
    for other in (whole, recompute):
        for key in ("loss", "lse", "grad_hidden", "grad_weight"):
            torch.testing.assert_close(first[key], other[key], **KERNEL_REORDER_FP32)


def test_every_other_use_keeps_the_recompute_path(device):
    """No gradient recorded (eval), no known gradient, bf16 without main_grad: the recompute
    path (its forward 'lse' pass), and no gradient computed in the forward."""
    case = make_case(20, 16, 64, device=device)
    known = case["loss_mask"].float()
    args = (case["labels"], case["loss_mask"], case["loss_groups"])
    WORK.reset()
    with torch.no_grad():
        fused_linear_cross_entropy(case["hidden"], case["weight"].requires_grad_(), *args,
                                   impl="torch", known_grad=known)
    low = make_case(20, 16, 64, dtype=torch.bfloat16, device=device)
    fused_linear_cross_entropy(low["hidden"].requires_grad_(), low["weight"].requires_grad_(),
                               *args, impl="torch", known_grad=known)
    fused_linear_cross_entropy(case["hidden"].requires_grad_(), case["weight"], *args,
                               impl="torch")
    assert [c[0] for c in WORK.calls] == ["lse"] * 3
    with pytest.raises(ValueError, match="known_grad must be"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], *args, impl="torch",
                                   known_grad=known[:5])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_frozen_weight_or_hidden_skips_its_matmul(device, impl):
    case = make_case(30, 16, 90, device=device)
    known = case["loss_mask"].float()
    args = (case["labels"], case["loss_mask"], case["loss_groups"])
    for needs_h, needs_w, skipped in ((True, False, "grad_weight"), (False, True, "grad_hidden")):
        hidden = case["hidden"].clone().requires_grad_(needs_h)
        weight = case["weight"].clone().requires_grad_(needs_w)
        WORK.reset()
        out = fused_linear_cross_entropy(hidden, weight, *args, impl=impl, known_grad=known)
        (out.loss * known).sum().backward()
        assert skipped not in _work_by_name() and len(_work_by_name()) == 2
        assert (hidden.grad is not None) == needs_h and (weight.grad is not None) == needs_w


def test_training_memory_is_bounded_by_the_stated_extra(tmp_path):
    """Forward + backward peak (CPU allocator) into an fp32 main_grad <= kept grad_h + stated
    temporaries + grad_hidden, far below one [V, H] buffer; the default chunk keeps the buffer
    within 15% of W + main_grad."""
    n, h, v = 80, 160, 3000
    case = make_case(n, h, v, mask_fraction=0.0)
    case["loss_groups"] = case["loss_groups"].clamp_min(0)
    weight = torch.nn.Parameter(case["weight"])
    weight.main_grad = torch.zeros(v, h)
    weight.grad_added_to_main_grad = False
    hidden = case["hidden"].clone().requires_grad_()
    known = torch.ones(n)
    rows = default_row_chunk(h, v, torch.float32, torch.device("cpu"), main_grad=True)
    assert rows * v * 4 <= 0.15 * v * h * (4 + 4) and rows < n  # several chunks
    args = (case["labels"], case["loss_mask"], case["loss_groups"])

    def step():
        out = fused_linear_cross_entropy(hidden, weight, *args, impl="torch", known_grad=known)
        out.loss.sum().backward()
        del out
        hidden.grad = weight.grad = None

    step()  # one-time initialisations outside the profiler
    peak = _cpu_peak_bytes(step, tmp_path)
    bound = train_extra_bytes(n, h, v, rows, torch.float32) + 4 * n * h + 64 * n
    assert peak <= bound < v * h * 4 / 2, (peak, bound)


def test_chunk_kernels_match_torch_with_column_splits(device):
    """The two Triton kernels of the chunk (statistics over 3 column splits, a ragged last
    tile, a row whose target is on another rank; dlogits in place and into bf16) against the
    same maths in torch."""
    from soda_kernels.flce_train import _softmax_grad_, chunk_dlogits_triton, chunk_stats_triton

    g = torch.Generator().manual_seed(4)
    c, v, start = 37, 203, 100
    x = (torch.randn(c, v, generator=g) * 3).to(device)
    labels = torch.randint(start - 20, start + v, (c,), generator=g).to(device)
    grad = torch.rand(c, generator=g).to(device)
    grad[3] = 0.0
    m, s, t = chunk_stats_triton(x, labels, start, splits=3)
    local = labels - start
    inside = (local >= 0) & (local < v)
    torch.testing.assert_close(m, x.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(s, torch.exp(x - x.amax(1, keepdim=True)).sum(1))
    picked = x.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(t, torch.where(inside, picked, 0.0), rtol=0, atol=0)
    expected = x.clone()
    lse, _ = _softmax_grad_(expected, labels, grad, start, 1e-2, None)
    low = torch.empty(c, v, dtype=torch.bfloat16, device=device)
    chunk_dlogits_triton(x.clone(), low, labels, lse, grad, start, 1e-2)
    torch.testing.assert_close(low, expected.to(torch.bfloat16), rtol=2.0 ** -8, atol=1e-6)
    same = x.clone()
    chunk_dlogits_triton(same, same, labels, lse, grad, start, 1e-2)
    torch.testing.assert_close(same, expected, **KERNEL_REORDER_FP32)
    assert (same[3] == 0).all()
