"""The torch (cuBLAS) engine of the fused loss's plain GEMMs (soda_kernels.gemm_engine): the
same contract as the Triton matmul (padded operands, fp32 accumulation into main_grad), the
fp64 oracle rule of both designs with the Triton kernels around it, bitwise repeatability.
TP2: tests/kernels/test_tensor_parallel.py (``*_torchgemm`` rows)."""

from __future__ import annotations

import pytest
import torch

from flce_cases import errors, make_case, run_reference, run_train, upstream_of
from soda_kernels import gemm_engine
from soda_kernels.fused_linear_cross_entropy import WORK, row_multiple
from soda_kernels.gemm_engine import gemm, matmul_cublas
from test_flce_train import _bf16_micro_batches
from tolerances import KERNEL_ORACLE


@pytest.mark.parametrize("dtype, block", [(torch.float32, 1024), (torch.bfloat16, 1024),
                                          (torch.bfloat16, 16)],
                         ids=["fp32", "bf16", "bf16_blocks"])
def test_matmul_cublas_keeps_the_matmul_contract(device, dtype, block, monkeypatch):
    """``a`` with zero padding rows / columns, ``c`` wider than ``b`` (zeros there), stored
    then accumulated into fp32; bf16 operands accumulate in fp32 (exact products: as close to
    the fp64 product as fp32 sums allow), also when upcast block by block along M, N or K."""
    monkeypatch.setattr(gemm_engine, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((40, 70, 24), (70, 24, 40), (24, 40, 70)):  # K, M, N the longest
        a = torch.zeros(m + 3, k + 5)
        a[:m, :k] = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        a, b = a.to(device, dtype), b.to(device, dtype)
        exact = a[:m, :k].double() @ b.double()
        c = torch.full((m, n + 7), float("nan"), device=device)  # beta = 0 ignores NaN
        WORK.reset()
        matmul_cublas(a, b, c, False, name="grad_weight")
        assert WORK.calls == [("grad_weight", m, n, k)]
        assert (c[:, n:] == 0).all()
        torch.testing.assert_close(c[:, :n].double(), exact, rtol=1e-5, atol=1e-5)
        acc = c[:, :n].clone()
        matmul_cublas(a, b, acc, True)
        torch.testing.assert_close(acc.double(), 2 * exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matmul_cublas"):
        matmul_cublas(a, b, torch.zeros(m, n + 1, device=device), True)


def test_both_engines_agree_on_a_padded_slice(device):
    """The same call on either engine (a padded dlogits slice times W into fp32 grad_h)."""
    g = torch.Generator().manual_seed(1)
    dl = torch.zeros(33, 48)
    dl[:, :37] = torch.randn(33, 37, generator=g)
    w = torch.randn(37, 20, generator=g)
    out = {e: torch.empty(33, 20, device=device) for e in ("triton", "torch")}
    for engine, c in out.items():
        gemm(dl.to(device), w.to(device), c, False, engine=engine, name="grad_hidden")
    torch.testing.assert_close(out["torch"], out["triton"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", ["recompute", "three_matmul"])
def test_torch_engine_matches_the_fp64_oracle(device, plan):
    """Both designs with the Triton kernels and torch GEMMs, odd shapes (37 rows, H 24, V 130
    with 10 padded ids), masked rows, z-loss, chunks of 16 rows: within the fp32 oracle rule,
    each matmul of the design exactly once on the active rows, padded ids without gradient."""
    case = make_case(37, 24, 130, n_real=120, device=device, scale=3.0)
    n_a = int(((case["loss_mask"] != 0) & (case["loss_groups"] >= 0)).sum())
    known = upstream_of(37, device)
    WORK.reset()
    ours = run_train(case, "triton", known, gemm_engine="torch", z_loss=1e-2, loss_plan=plan,
                     row_chunk=16 if plan == "three_matmul" else None)
    flops: dict = {}
    for name, m, n, k in WORK.calls:
        flops[name] = flops.get(name, 0) + 2 * m * n * k
    names = {"logits"} if plan == "three_matmul" else {"lse", "dlogits"}
    rows = n_a + (-n_a % row_multiple(torch.device(device), "triton"))
    assert set(flops) == names | {"grad_hidden", "grad_weight"}
    assert all(f in (2 * rows * 24 * 120, 2 * n_a * 24 * 120) for f in flops.values()), flops
    oracle = run_reference(case, torch.float64, z_loss=1e-2)
    plain = run_reference(case, torch.float32, z_loss=1e-2)
    mine, theirs = errors(ours, oracle), errors(plain, oracle)
    for key, err in mine.items():
        assert err <= theirs[key] + KERNEL_ORACLE["fp32"][key], (key, err, theirs[key])
    assert (ours["grad_weight"][120:] == 0).all()


def test_torch_engine_bf16_into_main_grad(device):
    """bf16 weights, two micro-batches added into an fp32 main_grad through torch GEMMs:
    within the bf16 row of the tolerance table above the bf16 recompute path's errors."""
    ours = _bf16_micro_batches("triton", True, device, gemm_engine="torch",
                               loss_plan="three_matmul")
    theirs = _bf16_micro_batches("torch", False, device)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["bf16"][key], (key, err, theirs[key])


def test_torch_engine_is_bitwise_repeatable(device):
    case = make_case(45, 24, 130, n_real=120, device=device, scale=3.0)
    known = case["loss_mask"].float()
    runs = [run_train(case, "triton", known, gemm_engine="torch", row_chunk=16)
            for _ in range(2)]
    for key in ("loss", "lse", "grad_hidden", "grad_weight"):
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_an_unknown_engine_is_refused(device):
    case = make_case(8, 16, 20, device=device)
    with pytest.raises(ValueError, match="gemm_engine must be one of auto, triton, torch"):
        run_train(case, "triton", case["loss_mask"].float(), gemm_engine="cublas")
