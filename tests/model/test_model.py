"""The SODA decoder built on Megatron-core, checked against independent implementations."""

from __future__ import annotations

import math

import pytest
import torch

from soda_mega.config import load_config
from soda_mega.model.accounting import count_parameters
from soda_mega.tokens import VocabLayout
from tolerances import BF16_LOSS_RTOL, REFERENCE_MODEL_FP32

SMALL_VOCAB = ["--vocab.codebook_size=16", "--model.seq_length=32"]


def _build(overrides=(), preset="tiny"):
    from soda_mega.model.gpt import build_model

    cfg = load_config(preset=preset, overrides=[*SMALL_VOCAB, *overrides])
    (model,) = build_model(cfg)
    return cfg, model


def _batch(layout: VocabLayout, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.size, (b, s + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.arange(s).expand(b, s)


def test_parameter_count_matches_accounting(megatron_one_process):
    cfg, model = _build()
    layout = VocabLayout.from_config(cfg.vocab)
    counted = count_parameters(cfg.model, layout, tp=1)
    assert sum(p.numel() for p in model.parameters()) == counted.total
    # And the hand formula for the tiny shape, written out.
    m = cfg.model
    per_layer = (m.hidden_size * (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim
                 + m.num_attention_heads * m.head_dim * m.hidden_size
                 + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size + 2 * m.head_dim)
    padded = layout.padded_size(1, m.make_vocab_size_divisible_by)
    assert counted.total == m.num_layers * per_layer + m.hidden_size + 2 * padded * m.hidden_size


def test_qwen3_structure(megatron_one_process):
    cfg, model = _build()
    m = cfg.model
    names = dict(model.named_parameters())
    assert not [n for n in names if n.endswith("bias")], "Qwen3 blocks have no biases"
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim, m.hidden_size)
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (m.head_dim,)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * m.ffn_hidden_size, m.hidden_size)
    assert names["output_layer.weight"].data_ptr() != names["embedding.word_embeddings.weight"].data_ptr()
    no_qk = _build(["--model.qk_norm=false"])[1]
    assert not [n for n, _ in no_qk.named_parameters() if "q_layernorm" in n]


def test_padded_vocabulary_is_never_predicted(megatron_one_process):
    cfg, model = _build()
    layout = VocabLayout.from_config(cfg.vocab)
    tokens, labels, pos = _batch(layout)
    logits = model(tokens, pos, None)
    assert logits.shape[-1] > layout.size, "the test needs padding rows"
    assert torch.isneginf(logits[..., layout.size:]).all()
    assert torch.isfinite(logits[..., :layout.size]).all()
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    grad = model.output_layer.weight.grad
    assert grad[layout.size:].abs().max() == 0
    assert grad[:layout.size].abs().max() > 0


def test_matches_huggingface_qwen3(megatron_one_process):
    """Same weights in transformers' Qwen3ForCausalLM give the same logits and loss."""
    transformers = pytest.importorskip("transformers")
    from soda_mega.model.qwen3_mapping import from_hf, hf_config_dict, to_hf
    from soda_mega.parallel.sharding import full_weights_single_process

    cfg, model = _build()
    layout = VocabLayout.from_config(cfg.vocab)
    full = full_weights_single_process([model])
    vocab = full["output_layer.weight"].shape[0]
    hf_cfg = transformers.Qwen3Config(**hf_config_dict(cfg, vocab), attn_implementation="eager")
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf(full, cfg), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]

    tokens, labels, pos = _batch(layout)
    model.eval()
    with torch.no_grad():
        ours = model(tokens, pos, None)[..., :layout.size]
        theirs = hf(input_ids=tokens).logits[..., :layout.size]
    torch.testing.assert_close(ours, theirs, atol=REFERENCE_MODEL_FP32["logits_atol"],
                               rtol=REFERENCE_MODEL_FP32["logits_rtol"])
    back = from_hf(to_hf(full, cfg), cfg)
    assert all(torch.equal(back[k], full[k]) for k in full)


def _naive_attention(q, k, v, mask=None):
    """[s, b, h, d] math attention with GQA by repetition; causal unless a mask is given."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    if mask is None:
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(s, b, h * d)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_core_attention_matches_math(megatron_one_process, heads, kv_heads):
    from soda_mega.model.attention import SodaCoreAttention
    from soda_mega.model.gpt import transformer_config

    cfg = load_config(preset="tiny", overrides=[f"--model.num_attention_heads={heads}",
                                                f"--model.num_kv_heads={kv_heads}"])
    attn = SodaCoreAttention(transformer_config(cfg), 1, None, "self", backend="sdpa")
    g = torch.Generator().manual_seed(1)
    s, b, d = 13, 2, cfg.model.head_dim
    q = torch.randn(s, b, heads, d, generator=g)
    k = torch.randn(s, b, kv_heads, d, generator=g)
    v = torch.randn(s, b, kv_heads, d, generator=g)
    torch.testing.assert_close(attn(q, k, v, None), _naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # Megatron convention: True = masked out. A block-diagonal (document) mask.
    doc = torch.zeros(s, dtype=torch.long)
    doc[6:] = 1
    mask = (doc[:, None] != doc[None, :]) | torch.ones(s, s, dtype=torch.bool).triu(1)
    mask = mask[None, None].expand(b, 1, s, s)
    torch.testing.assert_close(attn(q, k, v, mask), _naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_flash_backend_requires_flash_attn():
    from soda_mega.model.attention import resolve_backend
    from soda_mega.utils.optional import flash_attn_func

    assert resolve_backend("sdpa") == "sdpa"
    if flash_attn_func() is None:
        assert resolve_backend("auto") == "sdpa"
        with pytest.raises(RuntimeError, match="flash-attn is not installed"):
            resolve_backend("flash")


def test_rmsnorm_formula(megatron_one_process):
    from soda_mega.model.gpt import transformer_config
    from soda_mega.model.norm import RMSNorm

    cfg = load_config(preset="tiny")
    norm = RMSNorm(transformer_config(cfg), 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


def test_load_full_weights_round_trip(megatron_one_process):
    from soda_mega.parallel.sharding import full_weights_single_process, load_full_weights

    _, a = _build()
    _, b = _build(["--training.seed=99"])
    assert not torch.equal(a.output_layer.weight, b.output_layer.weight)
    load_full_weights([b], full_weights_single_process([a]))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.gpu
def test_bf16_model_on_gpu_matches_fp32(megatron_one_process):
    """bf16 forward/backward on the GPU, loss within BF16_LOSS_RTOL of the fp32 run."""
    from soda_mega.model.gpt import build_model

    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(preset="tiny", overrides=[f"--training.precision={precision}"])
        (model,) = build_model(cfg)
        model = model.cuda()
        layout = VocabLayout.from_config(cfg.vocab)
        tokens, labels, pos = (t.cuda() for t in _batch(layout, b=4, s=cfg.model.seq_length))
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[precision] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=BF16_LOSS_RTOL)


def test_threaded_init_draws_the_same_weights(megatron_one_process, monkeypatch):
    """The layout-free init draws parameters in threads; the values must not depend on how many."""
    from soda_mega.model import init as model_init
    from soda_mega.model.init import full_shape, init_full_tensor

    monkeypatch.setattr(model_init, "_draw_threads", lambda: 1)
    _, one = _build()
    monkeypatch.setattr(model_init, "_draw_threads", lambda: 3)
    cfg, three = _build()
    named = dict(three.named_parameters())
    assert len(named) > 5
    for name, param in one.named_parameters():
        assert torch.equal(param, named[name]), name
    # and both are the per-parameter draw itself (not, e.g., one shared stream)
    word = "embedding.word_embeddings.weight"
    full = init_full_tensor(word, full_shape(word, named[word].shape, cfg), cfg)
    assert torch.equal(named[word][:full.shape[0]], full)
