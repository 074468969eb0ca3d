"""Fused vocab-parallel embedding: lookup, modality ids, deterministic fp32-accumulated backward."""

from __future__ import annotations

import pytest
import torch

from soda_kernels.interleaved_embedding import (
    embedding_backward_triton,
    interleaved_embedding,
    interleaved_embedding_reference,
)
from soda_mega.tokens import VocabLayout
from tolerances import EMBEDDING_BF16_REL

SMALL = VocabLayout(text_vocab_size=258, bos_id=256, eos_id=257, codebook_size=16)  # 390 ids


def _kw(layout: VocabLayout) -> dict:
    return dict(text_vocab_size=layout.text_vocab_size, audio_base=layout.audio_base,
                codebook_size=layout.codebook_size, num_codebooks=layout.num_codebooks)


def _ids(layout, shape, seed=0, device="cpu"):
    """Ids over the whole range plus every boundary and some outside values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2, layout.size + 5, shape, generator=g)
    edges = [0, layout.text_vocab_size - 1, layout.text_vocab_size, layout.audio_base - 1,
             layout.audio_base, layout.audio_base + layout.codebook_size, layout.size - 1,
             layout.size, -1]
    flat = ids.view(-1)
    flat[:len(edges)] = torch.tensor(edges)
    return ids.to(device)


@pytest.mark.parametrize("vocab_start, rows", [(0, 448), (150, 101), (300, 148)])
def test_matches_reference(device, vocab_start, rows):
    """Odd H (40) and N (3 x 23); shards that cut through text, special and audio ranges."""
    ids = _ids(SMALL, (3, 23), device=device)
    ids[0, 10:20] = vocab_start + 3  # a repeated id in this shard
    weight = torch.randn(rows, 40, device=device)
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = interleaved_embedding(ids, w1, vocab_start=vocab_start, **_kw(SMALL))
    ref = interleaved_embedding_reference(ids, w2, vocab_start=vocab_start, **_kw(SMALL))
    assert ours.embeddings.shape == (3, 23, 40)
    torch.testing.assert_close(ours.embeddings, ref.embeddings, rtol=0, atol=0)
    outside = ((ids < vocab_start) | (ids >= vocab_start + rows))
    assert (ours.embeddings[outside] == 0).all()
    assert torch.equal(ours.modality, SMALL.modality(ids))
    grad = torch.randn_like(ref.embeddings)
    ours.embeddings.backward(grad)
    ref.embeddings.backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [
    VocabLayout.soda_default(),
    VocabLayout(text_vocab_size=100, bos_id=0, eos_id=1, num_codebooks=1, codebook_size=7),
    VocabLayout(text_vocab_size=50, bos_id=0, eos_id=1, num_codebooks=32, codebook_size=3),
], ids=["soda", "one_codebook", "32_codebooks"])
def test_modality_ids_match_the_layout(device, layout):
    ids = _ids(layout, (97,), seed=3, device=device)
    weight = torch.zeros(16, 8, device=device)  # the lookup is irrelevant here
    out = interleaved_embedding(ids, weight, **_kw(layout))
    assert torch.equal(out.modality, layout.modality(ids))


def test_bf16_backward_accumulates_in_fp32_deterministically(device):
    n, h, rows = 600, 24, 64
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, rows, (n,), generator=g)
    ids[:400] = 7  # one long run: bf16 accumulation would lose most of it
    grad = (torch.rand(n, h, generator=g) + 0.5).to(torch.bfloat16).to(device)
    ids = ids.to(device)
    exact = torch.zeros(rows, h, dtype=torch.float64, device=device)
    exact.index_add_(0, ids, grad.double())
    ours = embedding_backward_triton(grad, ids, 0, rows)
    again = embedding_backward_triton(grad, ids, 0, rows)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, again)
    err = (ours.double() - exact).abs()
    assert (err <= EMBEDDING_BF16_REL * exact.abs() + 1e-12).all()
    # The fp32-oracle rule against the same-dtype torch path (bf16 autograd of the reference).
    w = torch.zeros(rows, h, dtype=torch.bfloat16, device=device, requires_grad=True)
    ref = interleaved_embedding_reference(ids, w, **_kw(SMALL)).embeddings
    ref.backward(grad)
    assert err.max() <= (w.grad.double() - exact).abs().max()


def test_ids_of_other_ranks_get_no_gradient(device):
    ids = torch.tensor([0, 5, 99, 100, 101, 150, 199, 200, 250], device=device)
    grad = torch.ones(9, 4, device=device)
    out = embedding_backward_triton(grad, ids, 100, 100)
    assert out[[0, 1, 50, 99]].eq(1).all()
    assert out.sum() == 4 * 4


def test_torch_compile_traces_without_graph_break(device):
    weight = torch.randn(448, 40, device=device, requires_grad=True)
    ids = _ids(SMALL, (2, 19), device=device).clamp(0, 447)

    def f(ids, weight):
        out = interleaved_embedding(ids, weight, **_kw(SMALL))
        return (out.embeddings * out.modality[..., None].float()).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, weight)
    (grad,) = torch.autograd.grad(loss, weight)
    (eager_grad,) = torch.autograd.grad(f(ids, weight), weight)
    torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)


@pytest.mark.gpu
def test_soda_shapes_on_gpu():
    """16k bf16 tokens, the full SODA table at H = 2048: exact lookup, deterministic backward."""
    layout = VocabLayout.soda_default()
    ids = _ids(layout, (4, 4096), device="cuda")
    weight = torch.randn(layout.size, 2048, device="cuda", dtype=torch.bfloat16)
    out = interleaved_embedding(ids, weight, **_kw(layout))
    ref = interleaved_embedding_reference(ids, weight, **_kw(layout))
    assert torch.equal(out.embeddings, ref.embeddings) and torch.equal(out.modality, ref.modality)
    grad = torch.randn(ids.numel(), 2048, device="cuda", dtype=torch.bfloat16)
    first = embedding_backward_triton(grad, ids.view(-1), 0, layout.size)
    assert torch.equal(first, embedding_backward_triton(grad, ids.view(-1), 0, layout.size))


def test_one_id_repeated_20000_times_is_split_into_bounded_pieces(device):
    """A silence-code-like id 20,000 times among 500 others: the pieces kernel and the
    ordered merge give the exact sum (fp32 rounding only), the same bits twice, and the same
    result whatever the piece size (only rounding differs)."""
    n, h, rows = 20_500, 24, 300
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, rows, (n,), generator=g)
    ids[torch.randperm(n, generator=g)[:20_000]] = 17
    ids[:3] = torch.tensor([-1, rows, rows + 5])  # outside this shard: no gradient
    grad = torch.randn(n, h, generator=g).to(device)
    ids = ids.to(device)
    exact = torch.zeros(rows, h, dtype=torch.float64, device=device)
    inside = (ids >= 0) & (ids < rows)
    exact.index_add_(0, ids[inside], grad[inside].double())
    ours = embedding_backward_triton(grad, ids, 0, rows)
    assert torch.equal(ours, embedding_backward_triton(grad, ids, 0, rows))
    small = embedding_backward_triton(grad, ids, 0, rows, piece=128)  # 161 pieces
    scale = exact.abs().max()
    for out in (ours, small):
        assert float((out.double() - exact).abs().max() / scale) < 1e-6
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    untouched[ids[inside]] = False
    assert (ours[untouched] == 0).all()


@pytest.mark.parametrize("piece", [16, 32])
def test_runs_crossing_piece_boundaries(device, piece):
    """Runs that start, end or sit exactly on piece boundaries, sentinel ids at the end."""
    lengths = [1, piece - 1, piece, piece + 1, 2 * piece, 3, 3 * piece + 2, 1]
    ids = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)])
    ids = torch.cat([ids, torch.full((piece + 3,), 99)])  # another rank's ids, sorted last
    grad = torch.rand(ids.numel(), 20, generator=torch.Generator().manual_seed(1)) + 0.5
    ids, grad = ids.to(device), grad.to(device)
    out = embedding_backward_triton(grad, ids, 0, len(lengths), piece=piece)
    exact = torch.zeros(len(lengths), 20, dtype=torch.float64, device=device)
    exact.index_add_(0, ids[ids < len(lengths)], grad[ids < len(lengths)].double())
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
