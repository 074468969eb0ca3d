"""The fused loss's execution plan: masked rows compacted away, bounded backward memory (no
weight-sized temporaries), gradients added into Megatron's fp32 ``main_grad``, one precision
policy. Accuracy against the oracle is in test_fused_linear_cross_entropy.py."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from flce_cases import errors, make_case, run_fused, run_reference
from soda_kernels.flce_backward import row_policy
from soda_kernels.fused_linear_cross_entropy import (
    WORK,
    backward_extra_bytes,
    dot_precision,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    row_multiple,
)
from tolerances import KERNEL_ORACLE, KERNEL_REORDER_FP32


def _cpu_peak_bytes(fn, tmp_path) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what was held before
    (the profiler's allocator events, as in tests/training/test_memory_plan.py).

    ``fn`` must free what it allocates before it returns: the profiler's running total only
    counts frees that happen while it profiles, so a tensor allocated here and freed later
    would stay in the total of every later profiling session of this process.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        gc.collect()  # the Triton interpreter leaves reference cycles holding small tensors
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    assert events, "the profiler recorded no CPU allocations"
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_ninety_percent_masked_rows_never_reach_a_matmul(device, impl):
    n, h, v = 200, 24, 150
    case = make_case(n, h, v, device=device, scale=3.0)
    case["loss_groups"] = case["loss_groups"].clamp_min(0)
    mask = torch.zeros(n, device=device)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20]] = 1.0
    case["loss_mask"] = mask
    WORK.reset()
    with row_policy("compact"):  # a GPU masks rows by default (no host sync): compaction here
        result = run_fused(case, impl, z_loss=1e-2, vocab_slice=64)
    names = [c[0] for c in WORK.calls]
    assert names.count("lse") == 1 and names.count("dlogits") == 3  # 150 columns, 3 slices
    padded = 20 + (-20 % row_multiple(torch.device(device), impl))  # 64 on CUDA, else 20
    for name, m, cols, k in WORK.calls:
        rows = k if name == "grad_weight" else m  # grad_W = dlogits^T h: rows are the K dim
        assert rows == (20 if name == "lse" else padded), (name, m, cols, k)
    assert WORK.flops == 2 * 20 * h * v + 6 * padded * h * v  # 10% of the rows (+ padding)
    oracle = run_reference(case, torch.float64, z_loss=1e-2)
    plain = run_reference(case, torch.float32, z_loss=1e-2)
    ours, theirs = errors(result, oracle), errors(plain, oracle)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["fp32"][key], key
    inactive = mask == 0
    assert (result["grad_hidden"][inactive] == 0).all() and (result["loss"][inactive] == 0).all()
    assert (result["lse"][inactive] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_backward_memory_is_bounded_by_the_stated_extra(impl, tmp_path):
    """Backward peak (CPU allocator) <= grad_hidden + grad_W + backward_extra_bytes, and the
    stated extra is far below one [V, H] weight-sized buffer."""
    n, h, v, cols = 48, 32, 3000, 128
    case = make_case(n, h, v, mask_fraction=0.0)
    case["loss_groups"] = case["loss_groups"].clamp_min(0)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    kwargs = dict(impl=impl, vocab_slice=cols)
    args = (case["labels"], case["loss_mask"], case["loss_groups"])
    # A first pass outside the profiler: one-time initialisations are not measured.
    fused_linear_cross_entropy(hidden, weight, *args, **kwargs).loss.sum().backward()
    hidden.grad = weight.grad = None
    loss = fused_linear_cross_entropy(hidden, weight, *args, **kwargs).loss.sum()

    def backward():
        loss.backward()
        hidden.grad = weight.grad = None  # freed inside the profiled region (see above)

    peak = _cpu_peak_bytes(backward, tmp_path)
    extra = backward_extra_bytes(n, h, cols, torch.float32, impl)
    outputs = 4 * (n * h + v * h)
    assert extra < v * h * 4 / 4
    assert outputs <= peak <= outputs + extra, (peak, outputs, extra)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gradient_accumulates_into_main_grad_over_four_micro_batches(impl, tmp_path):
    """A weight carrying Megatron DDP's attributes: dloss/dW of 4 micro-batches lands in the
    fp32 main_grad (on top of what was there), .grad stays a zero-cost alias, and the
    backward allocates no weight-sized buffer."""
    n, h, v = 33, 24, 2000
    weight = torch.nn.Parameter(make_case(n, h, v)["weight"])
    start = torch.randn(v, h, generator=torch.Generator().manual_seed(9))
    weight.main_grad = start.clone()
    weight.grad_added_to_main_grad = False
    expected = start.double()
    peaks = []
    for step in range(4):
        case = make_case(n, h, v, seed=100 + step, scale=2.0)
        ref_w = case["weight"].double().requires_grad_()
        ref_w.data.copy_(weight.data)
        ref = fused_linear_cross_entropy_reference(
            case["hidden"].double(), ref_w, case["labels"], case["loss_mask"],
            case["loss_groups"], z_loss=1e-2)
        ref.loss.sum().backward()
        expected += ref_w.grad
        out = fused_linear_cross_entropy(case["hidden"], weight, case["labels"],
                                         case["loss_mask"], case["loss_groups"], z_loss=1e-2,
                                         impl=impl, vocab_slice=128)
        loss = out.loss.sum()
        seen = []

        def backward():  # run within this iteration (below): loss and seen are this step's
            loss.backward()  # noqa: B023
            # What DDP's post-accumulate hook does: add nothing (flag set), drop .grad.
            seen.append(weight.grad is not None and weight.grad.data_ptr() == weight.data_ptr())  # noqa: B023
            weight.grad = None

        if step == 0:  # one-time initialisations outside the profiler
            backward()
        else:
            peaks.append(_cpu_peak_bytes(backward, tmp_path))
        assert weight.grad_added_to_main_grad and seen == [True]
    assert weight.main_grad.dtype == torch.float32
    err = (weight.main_grad.double() - expected).abs().max() / expected.abs().max()
    assert err <= KERNEL_REORDER_FP32["rtol"], err
    bound = 4 * n * h + backward_extra_bytes(n, h, 128, torch.float32, impl)  # grad_h + extra
    assert max(peaks) <= bound < v * h * 4 / 2, (peaks, bound)  # no [V, H] buffer at all


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_backward_is_bitwise_repeatable_and_slicing_only_reorders(device, impl):
    case = make_case(61, 40, 300, n_real=290, device=device, scale=3.0)
    first = run_fused(case, impl, z_loss=1e-2, vocab_slice=64)
    again = run_fused(case, impl, z_loss=1e-2, vocab_slice=64)
    for key in ("loss", "lse", "grad_hidden", "grad_weight"):
        assert torch.equal(first[key], again[key]), key
    one_slice = run_fused(case, impl, z_loss=1e-2, vocab_slice=300)
    for key in ("grad_hidden", "grad_weight"):
        torch.testing.assert_close(first[key], one_slice[key], **KERNEL_REORDER_FP32)
    assert (first["grad_weight"][290:] == 0).all()


def test_padding_the_compacted_rows_changes_nothing(device, monkeypatch):
    """On CUDA the compacted rows are padded with zero rows (row_multiple); forced here."""
    import soda_kernels.flce_backward as flce_backward

    case = make_case(37, 40, 203, n_real=190, device=device, scale=3.0)
    with row_policy("compact"):
        plain = run_fused(case, "triton", z_loss=1e-2, vocab_slice=64)
        monkeypatch.setattr(flce_backward, "row_multiple", lambda device, impl: 16)
        WORK.reset()
        padded = run_fused(case, "triton", z_loss=1e-2, vocab_slice=64)
    n_a = int(((case["loss_mask"] != 0) & (case["loss_groups"] >= 0)).sum())
    assert [c[3] for c in WORK.calls if c[0] == "grad_weight"] == [n_a + (-n_a % 16)] * 3
    for key in ("loss", "grad_hidden", "grad_weight"):
        torch.testing.assert_close(padded[key], plain[key], rtol=0, atol=0)


def test_main_grad_fusion_can_be_turned_off():
    n, h, v = 16, 8, 40
    case = make_case(n, h, v)
    weight = torch.nn.Parameter(case["weight"])
    weight.main_grad = torch.zeros(v, h)
    weight.grad_added_to_main_grad = False
    fused_linear_cross_entropy(case["hidden"], weight, case["labels"], impl="torch",
                               fuse_main_grad=False).loss.sum().backward()
    assert not weight.grad_added_to_main_grad and (weight.main_grad == 0).all()
    assert weight.grad.abs().sum() > 0


def test_one_precision_policy():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    m = torch.backends.cuda.matmul
    saved = m.allow_tf32, getattr(m, "fp32_precision", None)
    try:
        m.allow_tf32 = False
        assert dot_precision(torch.float32, cuda) == "ieee"
        m.allow_tf32 = True
        assert dot_precision(torch.float32, cuda) == "tf32"
        assert dot_precision(torch.float32, cpu) == "ieee"  # CPU matmuls never use TF32
        assert dot_precision(torch.bfloat16, cuda) == "tf32"  # only governs fp32 operands
    finally:
        m.allow_tf32 = saved[0]
        if saved[1] is not None:
            m.fp32_precision = saved[1]
    assert (m.allow_tf32, getattr(m, "fp32_precision", None)) == saved


@pytest.mark.gpu
def test_bf16_main_grad_on_gpu_accumulates_in_fp32_and_repeats():
    """A TP=2 SODA shard (V = 72,322, H = 512), 4096 tokens with half masked, bf16 weights on
    the autotuned CUDA path: main_grad after 2 micro-batches is within one bf16 rounding of
    the fp64 sum of the oracle's gradients, and a second run gives the same bits."""
    n, h, v = 4096, 512, 72_322

    def run_once():
        weight = torch.nn.Parameter(make_case(8, h, v, dtype=torch.bfloat16, device="cuda",
                                              scale=4.0)["weight"])
        weight.main_grad = torch.zeros(v, h, device="cuda")
        weight.grad_added_to_main_grad = False
        expected = torch.zeros(v, h, dtype=torch.float64, device="cuda")
        for step in range(2):
            case = make_case(n, h, v, seed=step, dtype=torch.bfloat16, device="cuda", scale=4.0,
                             mask_fraction=0.5)
            args = (case["labels"], case["loss_mask"], case["loss_groups"])
            fused_linear_cross_entropy(case["hidden"], weight, *args,
                                       z_loss=1e-4).loss.sum().backward()
            assert weight.grad_added_to_main_grad
            weight.grad = None
            ref_w = weight.detach().double().requires_grad_()
            fused_linear_cross_entropy_reference(case["hidden"].double(), ref_w, *args,
                                                 z_loss=1e-4).loss.sum().backward()
            expected += ref_w.grad
        return weight.main_grad.clone(), expected

    first, expected = run_once()
    again, _ = run_once()
    assert torch.equal(first, again)
    err = float((first.double() - expected).abs().max() / expected.abs().max())
    assert err <= KERNEL_ORACLE["bf16"]["grad_weight"], err
