"""Generation: KV-cache decoding vs. recomputation, sampling filters, structure-aware decoding."""

from __future__ import annotations

import pytest
import torch

from checkpoint_helpers import make_tiny_checkpoint
from soda_mega.inference.decoder import SodaDecoder
from soda_mega.inference.generate import generate
from soda_mega.inference.sampling import GREEDY, Sampling, filter_logits
from soda_mega.inference.structure import StructureTracker, violations


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return SodaDecoder.from_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 7))


@pytest.fixture(scope="module")
def layout(decoder):
    return decoder.layout


def _audio(layout, frames, seed=0):
    codes = torch.randint(0, layout.codebook_size, (layout.num_codebooks, frames),
                          generator=torch.Generator().manual_seed(seed))
    return layout.codes_to_ids(codes).tolist()


def _prompts(layout):
    """Prompts that end between spans, inside a text span, and mid-frame in an audio span."""
    text = [72, 101, 108, 108, 111]
    return [
        [layout.bos_id, layout.audio_start, *_audio(layout, 3), layout.audio_end],
        [layout.bos_id, layout.text_start, *text],
        [layout.bos_id, layout.audio_start, *_audio(layout, 2, 1), *_audio(layout, 1, 2)[:3]],
    ]


def _greedy_by_recomputation(decoder, prompt, steps, layout):
    """Reference: no cache, full forward each step, the same structure mask."""
    seq = list(prompt)
    tracker = StructureTracker(layout, 1)
    for tok in prompt:
        tracker.observe(torch.tensor([tok]))
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = decoder(torch.tensor([seq]))[0, -1]
        tok = int(logits.masked_fill(~tracker.allowed()[0], float("-inf")).argmax())
        out.append(tok)
        seq.append(tok)
        tracker.observe(torch.tensor([tok]))
        if tok == layout.eos_id:
            break
    return out


def test_greedy_with_cache_equals_recomputation_in_a_padded_batch(decoder, layout):
    prompts = _prompts(layout)
    got = generate(decoder, prompts, max_new_tokens=12, sampling=GREEDY)
    for prompt, gen in zip(prompts, got):
        assert gen.tokens == _greedy_by_recomputation(decoder, prompt, 12, layout)[:len(gen.tokens)]


def test_structured_sampling_never_leaves_its_slot(decoder, layout):
    prompts = _prompts(layout) * 3
    # a hot, unfiltered distribution: every id is likely somewhere
    hot = Sampling(temperature=3.0)
    got = generate(decoder, prompts, max_new_tokens=120, sampling=hot, seed=3)
    emitted = set()
    for prompt, gen in zip(prompts, got):
        problems = violations(layout, prompt + gen.tokens)
        assert not problems, problems[:5]
        emitted |= set(layout.modality(torch.tensor(gen.tokens)).tolist())
    assert len(emitted) >= 3  # text, special and audio ids were all drawn
    assert all(not violations(layout, p) for p in prompts)  # the checker sees the prompts' state
    # negative control: the same sampling without the tracker breaks the grammar
    free = generate(decoder, prompts[:3], max_new_tokens=120, sampling=hot, seed=3, structured=False)
    assert any(violations(layout, p + g.tokens) for p, g in zip(prompts, free))


def test_tracker_agrees_with_the_independent_checker_on_random_streams(layout):
    gen = torch.Generator().manual_seed(0)
    special = [layout.text_start, layout.text_end, layout.audio_start, layout.audio_end,
               layout.eos_id]
    for trial in range(30):
        tracker = StructureTracker(layout, 1)
        stream = []
        for i in range(60):
            allowed = tracker.allowed()[0]
            # mostly legal moves (random walk through the grammar), sometimes any id
            if torch.rand(1, generator=gen) < 0.97:
                ids = allowed.nonzero()[:, 0]
                if torch.rand(1, generator=gen) < 0.3:  # favour markers so spans open and close
                    legal = [s for s in special if allowed[s]]
                    ids = torch.tensor(legal) if legal else ids
                tok = int(ids[torch.randint(len(ids), (1,), generator=gen)])
            else:
                tok = int(torch.randint(layout.size, (1,), generator=gen))
            stream.append(tok)
            legal = bool(allowed[tok])
            problems = violations(layout, stream)
            assert legal == (not problems), (trial, i, stream[-5:], problems)
            if not legal:
                break
            tracker.observe(torch.tensor([tok]))


def test_plan_forces_span_order_then_eos(decoder, layout):
    prompt = [layout.bos_id, layout.audio_start, *_audio(layout, 2), layout.audio_end]
    gen = generate(decoder, [prompt], max_new_tokens=400, sampling=Sampling(temperature=1.0),
                   plan=["text", "text", "audio"], seed=1)[0]
    openers = [t for t in gen.tokens if t in (layout.text_start, layout.audio_start)]
    assert gen.tokens[0] == layout.text_start
    assert openers == [layout.text_start, layout.text_start, layout.audio_start][:len(openers)]
    if gen.stop_reason == "eos":
        assert len(openers) == 3 and gen.tokens[-2] == layout.audio_end
    assert not violations(layout, gen.tokens)


def test_stop_ids_end_rows_independently(decoder, layout):
    prompts = [[layout.bos_id, layout.text_start, 65], [layout.bos_id, layout.text_start, 66, 67]]
    got = generate(decoder, prompts, max_new_tokens=300, sampling=Sampling(temperature=2.0),
                   stop_ids=[layout.text_end], seed=0)
    for gen in got:
        if gen.stop_reason == "stop_id":
            assert gen.tokens[-1] == layout.text_end
            assert layout.text_end not in gen.tokens[:-1]
        else:
            assert gen.stop_reason == "max_new_tokens" and len(gen.tokens) == 300
    assert any(g.stop_reason == "stop_id" for g in got)


def test_filters_keep_exactly_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda s, allowed=None: torch.isfinite(filter_logits(logits, s, allowed))[0].tolist()  # noqa: E731
    assert keep(Sampling(top_k=2)) == [True, True, False, False, False]
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is still needed; 0.85 >= 0.8 stops there
    assert keep(Sampling(top_p=0.8)) == [True, True, True, False, False]
    assert keep(Sampling(top_p=0.5)) == [True, False, False, False, False]
    assert keep(Sampling(top_p=0.01)) == [True, False, False, False, False]
    mask = torch.tensor([[False, True, True, True, True]])
    assert keep(Sampling(top_k=1), mask) == [False, True, False, False, False]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_sampling_is_seeded_and_follows_the_distribution(decoder, layout):
    prompts = [[layout.bos_id, layout.text_start, 65]] * 4
    a = generate(decoder, prompts, 8, Sampling(temperature=1.0), seed=11)
    b = generate(decoder, prompts, 8, Sampling(temperature=1.0), seed=11)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert len({tuple(g.tokens) for g in a}) > 1  # rows draw independently
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    from soda_mega.inference.sampling import choose
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([choose(logits, Sampling(temperature=1.0), generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=3).double() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.03, rtol=0)


def test_max_text_tokens_closes_runaway_text_spans(decoder, layout):
    from soda_mega.inference.spans import split_spans

    prompt = [layout.bos_id, layout.audio_start, *_audio(layout, 2), layout.audio_end]
    gen = generate(decoder, [prompt] * 3, max_new_tokens=200, sampling=Sampling(temperature=1.0),
                   plan=["text", "text", "audio"], seed=5, max_text_tokens=4)
    for g in gen:
        spans = split_spans(layout, g.tokens)
        texts = [ids for kind, ids in spans if kind == "text"]
        assert len(texts) == 2 and all(len(t) <= 4 for t in texts)
        assert spans[2][0] == "audio" and not violations(layout, prompt + g.tokens)
    with pytest.raises(ValueError, match="max_text_tokens"):
        StructureTracker(layout, 1, max_text_tokens=0)
