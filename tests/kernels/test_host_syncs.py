"""No host synchronisation per micro-batch in the fused loss or the fused embedding.

Counted on CPU with :class:`host_syncs.HostSyncCounter` (the torch operations that make the
host wait for a GPU: ``nonzero``, ``item``, ``equal``, ``tolist``, ``.cpu()``, boolean-mask
indexing, ``unique`` ...; the torch code around the kernels, not what Triton's interpreter
does while it runs one). The GPU's policy for inactive rows (masked, not compacted:
:func:`soda_kernels.flce_backward.compacts_rows`) is forced with ``row_policy("mask")``, so
the code a GPU runs is what is counted; under the CPU's policy the same counter finds the
``nonzero`` of the compaction (which costs nothing where the host is the device), so it can
fail. The three-matmul path's check of the incoming gradient is one read per step
(:func:`soda_kernels.flce_train.checked_per_step`).
"""

from __future__ import annotations

import pytest
import torch

from flce_cases import errors, make_case, run_fused, run_reference, run_train, upstream_of
from host_syncs import HostSyncCounter
from soda_kernels.flce_backward import compacts_rows, row_policy
from soda_kernels.flce_train import checked_per_step
from soda_kernels.interleaved_embedding import interleaved_embedding
from tolerances import KERNEL_ORACLE, KERNEL_REORDER_FP32

N, H, V, N_REAL = 37, 40, 203, 190


@pytest.fixture(scope="module")
def case():
    return make_case(N, H, V, n_real=N_REAL, scale=3.0, mask_fraction=0.3)


@pytest.fixture(scope="module")
def oracle(case):
    return run_reference(case, torch.float64, z_loss=1e-2), run_reference(case, torch.float32,
                                                                         z_loss=1e-2)


def _oracle_rule(result, oracle):
    exact, plain = oracle
    ours, theirs = errors(result, exact), errors(plain, exact)
    for key, err in ours.items():
        assert err <= theirs[key] + KERNEL_ORACLE["fp32"][key], (key, err, theirs[key])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_recompute_path_makes_no_host_sync(case, oracle, impl):
    with row_policy("mask"), HostSyncCounter() as syncs:
        masked = run_fused(case, impl, z_loss=1e-2)
    assert syncs.total == 0, dict(syncs.glue)
    _oracle_rule(masked, oracle)
    inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
    for key in ("loss", "lse", "grad_hidden"):
        assert (masked[key][inactive] == 0).all(), key
    with row_policy("compact"), HostSyncCounter() as syncs:
        compacted = run_fused(case, impl, z_loss=1e-2)
    assert syncs.glue["nonzero"] == 2, dict(syncs.glue)  # the counter sees what a GPU would
    for key in ("loss", "lse", "grad_hidden", "grad_weight"):
        torch.testing.assert_close(masked[key], compacted[key], **KERNEL_REORDER_FP32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_three_matmul_path_syncs_once_per_step(case, oracle, impl):
    known = upstream_of(N)
    with row_policy("mask"), HostSyncCounter() as syncs:
        with checked_per_step() as check:
            with HostSyncCounter() as per_micro_batch:
                results = [run_train(case, impl, known, z_loss=1e-2, row_chunk=16)
                           for _ in range(2)]
            assert per_micro_batch.total == 0, dict(per_micro_batch.glue)
    assert check.calls == 2
    assert dict(syncs.glue) == {"_local_scalar_dense": 1}  # the step's one read of the flag
    for result in results:
        _oracle_rule(result, oracle)
    if impl == "torch":  # the same glue for both: without the per-step check each backward
        with row_policy("mask"), HostSyncCounter() as syncs:  # compares on the host
            run_train(case, impl, known, z_loss=1e-2, row_chunk=16)
        assert dict(syncs.glue) == {"equal": 1}


def test_another_gradient_fails_the_step_instead_of_passing_silently(case):
    known = upstream_of(N)
    with row_policy("mask"), pytest.raises(RuntimeError, match="another gradient"):
        with checked_per_step():
            run_train(case, "torch", known, upstream=known * 0.5, z_loss=1e-2, row_chunk=16)
    with row_policy("mask"), checked_per_step():  # inactive rows may receive anything
        inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
        run_train(case, "torch", known, upstream=torch.where(inactive, 7.0, known),
                  z_loss=1e-2, row_chunk=16)


def test_embedding_makes_no_host_sync():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-3, 330, (4, 33), generator=g)
    weight = torch.randn(300, 24, generator=g, requires_grad=True)
    with HostSyncCounter() as syncs:
        out = interleaved_embedding(ids, weight, text_vocab_size=100, audio_base=110,
                                    codebook_size=50, num_codebooks=4, vocab_start=10)
        out.embeddings.sum().backward()
    assert syncs.total == 0, dict(syncs.glue)


def test_a_gpu_masks_rows_and_the_cpu_compacts_them():
    assert not compacts_rows(torch.device("cuda")) and compacts_rows(torch.device("cpu"))
    with row_policy("mask"):
        assert not compacts_rows(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_gpu_step_never_waits_for_the_device(impl):
    """On a GPU, CUDA's own detector (``set_sync_debug_mode("error")``) raises on any
    synchronising call: forward + backward of both paths and the embedding, inputs already on
    the device, after a warm-up (the autotuner synchronises while it benchmarks)."""
    from soda_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    case = make_case(512, 256, 1000, device="cuda", scale=3.0, mask_fraction=0.3)
    known = upstream_of(512, "cuda")
    ids = torch.randint(0, 300, (4, 64), device="cuda")
    table = torch.randn(300, 256, device="cuda", requires_grad=True)

    def step():
        for kg in (None, known):
            hidden = case["hidden"].detach().clone().requires_grad_()
            weight = case["weight"].detach().clone().requires_grad_()
            out = fused_linear_cross_entropy(hidden, weight, case["labels"], case["loss_mask"],
                                             case["loss_groups"], num_real_vocab=case["n_real"],
                                             impl=impl, z_loss=1e-2, known_grad=kg)
            (out.loss * known).sum().backward()
        emb = interleaved_embedding(ids, table, text_vocab_size=100, audio_base=110,
                                    codebook_size=50, num_codebooks=4)
        emb.embeddings.sum().backward()

    with checked_per_step():
        step()  # warm-up
    check = checked_per_step()
    check.__enter__()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check.__exit__(None, None, None)


@pytest.mark.parametrize("path", ["recompute", "three_matmul"])
def test_masked_rows_holding_nan_change_nothing(case, path):
    """Masked rows go through the matmuls on a GPU: whatever their hidden state holds (here
    NaN) must not reach the loss or either gradient."""
    inactive = (case["loss_mask"] == 0) | (case["loss_groups"] < 0)
    poisoned = dict(case, hidden=case["hidden"].masked_fill(inactive[:, None], float("nan")))
    known = upstream_of(N)

    def run(c):
        if path == "recompute":
            return run_fused(c, "torch", z_loss=1e-2)
        return run_train(c, "torch", known, z_loss=1e-2, row_chunk=16)

    with row_policy("mask"):
        clean, dirty = run(case), run(poisoned)
    for key in ("loss", "lse", "grad_hidden", "grad_weight"):
        assert torch.equal(dirty[key], clean[key]), key
