"""The inference decoder against the Megatron model, and its KV cache against full forwards."""

from __future__ import annotations

import pytest
import torch

from checkpoint_helpers import make_tiny_checkpoint
from soda_mega.checkpoint.weights import load_full_weights
from soda_mega.inference.decoder import SodaDecoder, left_pad
from tolerances import DECODER_FP32

TOL = dict(atol=DECODER_FP32["logits_atol"], rtol=DECODER_FP32["logits_rtol"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 5)


@pytest.fixture(scope="module")
def decoder(checkpoint):
    return SodaDecoder.from_checkpoint(checkpoint)


def _tokens(layout, batch, length, seed=0):
    return torch.randint(0, layout.size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_the_megatron_model(checkpoint, decoder):
    from soda_mega.checkpoint.load import load_checkpoint
    from soda_mega.checkpoint.weights import _OneProcess, single_process_config
    from soda_mega.model.gpt import build_model

    cfg, _ = load_full_weights(checkpoint)
    tokens = _tokens(decoder.layout, 2, 48)
    with _OneProcess(0):
        model = build_model(single_process_config(cfg))[0]
        load_checkpoint(checkpoint, [model], restore_rng=False)
        model.eval()
        with torch.no_grad():
            ref = model(tokens, torch.arange(48).expand(2, 48), None)
    with torch.no_grad():
        got = decoder(tokens)
    real = decoder.layout.size
    assert torch.isinf(ref[..., real:]).all()  # padded ids: never predicted, and not in ours
    assert got.shape == (2, 48, real)
    torch.testing.assert_close(got, ref[..., :real], **TOL)
    assert got.std() > 0.3  # weights far from uniform: the comparison is not vacuous


def test_kv_cache_continuation_equals_one_forward(decoder):
    tokens = _tokens(decoder.layout, 3, 40, seed=1)
    with torch.no_grad():
        full = decoder(tokens)
        cache = decoder.new_cache(torch.zeros(3, dtype=torch.long), 64)
        parts = [decoder(tokens[:, :17], cache=cache)]
        parts += [decoder(tokens[:, i:i + 1], cache=cache) for i in range(17, 33)]
        parts.append(decoder(tokens[:, 33:], cache=cache))  # a multi-token chunk after decoding
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
    assert cache.length == 40


def test_left_padded_batch_equals_each_row_alone(decoder):
    tokens = _tokens(decoder.layout, 3, 30, seed=2)
    seqs = [tokens[0, :9].tolist(), tokens[1].tolist(), tokens[2, :21].tolist()]
    batch, pad = left_pad(seqs, decoder.layout.eos_id)
    assert pad.tolist() == [21, 0, 9]
    with torch.no_grad():
        got = decoder(batch, pad)
        for row, seq in enumerate(seqs):
            alone = decoder(torch.tensor([seq]))[0]
            torch.testing.assert_close(got[row, int(pad[row]):], alone, **TOL)


def test_token_logprobs_are_the_next_token_log_softmax(decoder):
    seqs = [[decoder.layout.bos_id, 5, 7, 9, 300], [decoder.layout.bos_id, 11]]
    got = decoder.token_logprobs(seqs)
    for seq, lp in zip(seqs, got):
        with torch.no_grad():
            logp = torch.log_softmax(decoder(torch.tensor([seq]))[0].double(), -1)
        want = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].float()
        torch.testing.assert_close(lp, want, **TOL)
        assert lp.shape == (len(seq) - 1,)


def test_cache_overflow_is_refused(decoder):
    cache = decoder.new_cache(torch.zeros(1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        decoder(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.gpu
def test_bf16_on_cuda_matches_fp32_and_generates_in_slot(checkpoint):
    from soda_mega.inference.generate import generate
    from soda_mega.inference.sampling import Sampling
    from soda_mega.inference.structure import violations
    from tolerances import DECODER_BF16_LOGPROB_ATOL

    cfg, full = load_full_weights(checkpoint)
    cpu = SodaDecoder(cfg, full).eval()
    gpu = SodaDecoder(cfg, full, device="cuda", dtype=torch.bfloat16).eval()
    tokens = _tokens(cpu.layout, 4, 64, seed=3)
    with torch.no_grad():
        want = torch.log_softmax(cpu(tokens).double(), -1)
        got = torch.log_softmax(gpu(tokens).double(), -1).cpu()
    assert (got - want).abs().max() < DECODER_BF16_LOGPROB_ATOL
    lay = cpu.layout
    prompt = [lay.bos_id, lay.audio_start]
    for g in generate(gpu, [prompt] * 8, 160, Sampling(temperature=2.0), seed=0):
        assert not violations(lay, prompt + g.tokens)
