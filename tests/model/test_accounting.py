"""Parameter / FLOP / memory accounting (soda_mega.model.accounting) and ``soda-mega model``.

The soda-135m numbers below are written out by hand from SODA_SPEC section 2 so that they
do not share a formula with the module under test.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.model.accounting import (
    count_parameters,
    flops_per_token,
    memory_per_rank,
    per_rank_parameters,
)
from soda_mega.tokens import VocabLayout

PRESET_LABELS = {"soda-135m": 135e6, "soda-600m": 600e6, "soda-1.7b": 1.7e9, "soda-4b": 4e9}

# soda-135m: h=512, L=15, H=G=8, d=64, F=1792, V=144,644, V_pad(tp=1)=1131*128=144,768.
V = 144_644
V_PAD_TP1 = 144_768
PER_LAYER_135M = (
    512                   # input RMSNorm
    + 512 * 1_536         # QKV: 8*64 + 2*8*64 = 1536 outputs
    + 64 + 64             # q_norm, k_norm
    + 512 * 512           # output projection
    + 512                 # pre-MLP RMSNorm
    + 512 * 3_584         # fc1, gate+up fused
    + 1_792 * 512         # fc2
)
NON_EMBEDDING_135M = 15 * 3_802_240 + 512  # 57,034,112


def _cfg(preset: str, *overrides: str):
    return load_config(preset=preset, overrides=overrides)


def _layout(cfg) -> VocabLayout:
    return VocabLayout.from_config(cfg.vocab)


@pytest.mark.parametrize("preset", sorted(PRESET_LABELS))
def test_size_label_matches_preset_name(preset):
    cfg = _cfg(preset)
    counts = count_parameters(cfg.model, _layout(cfg))
    label = PRESET_LABELS[preset]
    assert abs(counts.size_label_unpadded - label) / label < 0.05
    assert abs(counts.size_label - label) / label < 0.05
    assert counts.size_label == counts.non_embedding + counts.output_layer
    assert counts.total == counts.embedding + counts.non_embedding + counts.output_layer


def test_soda_135m_parameters_by_hand():
    assert PER_LAYER_135M == 3_802_240
    cfg = _cfg("soda-135m")
    c = count_parameters(cfg.model, _layout(cfg), tp=1)
    assert c.vocab_size == V
    assert c.padded_vocab_size == V_PAD_TP1
    assert c.per_layer == 3_802_240
    assert c.final_norm == 512
    assert c.non_embedding == 57_034_112 == NON_EMBEDDING_135M
    assert c.embedding == c.output_layer == 74_121_216              # 144,768 * 512
    assert c.embedding_unpadded == c.output_layer_unpadded == 74_057_728  # 144,644 * 512
    assert c.total == 205_276_544
    assert c.total_unpadded == 205_149_568
    assert c.size_label == 131_155_328
    assert c.size_label_unpadded == 131_091_840


def test_qk_norm_off_drops_two_head_dims_per_layer():
    cfg = _cfg("soda-135m", "--model.qk_norm=false")
    c = count_parameters(cfg.model, _layout(cfg))
    assert c.per_layer == 3_802_240 - 128


def test_soda_135m_flops_by_hand():
    cfg = _cfg("soda-135m")
    f = flops_per_token(cfg.model, V)
    assert f.seq_length == 4096 and not f.causal
    assert f.qkv == 15 * 2 * 512 * 1_536 == 23_592_960
    assert f.attention_scores == 15 * 2 * 4096 * 512 == 62_914_560
    assert f.attention_values == 62_914_560
    assert f.attention_output == 15 * 2 * 512 * 512 == 7_864_320
    assert f.mlp == 15 * (2 * 512 * 3_584 + 2 * 1_792 * 512) == 82_575_360
    assert f.lm_head == 2 * 512 * V == 148_115_456   # unpadded vocabulary
    assert f.forward == 387_977_216
    assert f.training == 3 * 387_977_216
    assert f.six_n == 6 * 131_091_840
    assert f.ratio_to_six_n == pytest.approx(1_163_931_648 / 786_551_040)


def test_seq_length_argument_overrides_config():
    cfg = _cfg("soda-135m")
    f = flops_per_token(cfg.model, V, seq_length=1024)
    assert f.seq_length == 1024
    assert f.attention_scores == 15 * 2 * 1024 * 512


@pytest.mark.parametrize("preset", sorted(PRESET_LABELS))
def test_causal_halves_only_attention_terms(preset):
    cfg = _cfg(preset)
    full = flops_per_token(cfg.model, V)
    causal = flops_per_token(cfg.model, V, causal=True)
    assert causal.attention_scores == full.attention_scores / 2
    assert causal.attention_values == full.attention_values / 2
    for name in ("qkv", "attention_output", "mlp", "lm_head", "six_n"):
        assert getattr(causal, name) == getattr(full, name), name
    assert full.forward - causal.forward == (full.attention_scores + full.attention_values) / 2


def test_padding_depends_on_tensor_parallel():
    cfg = _cfg("soda-135m")
    layout = _layout(cfg)
    padded = {tp: count_parameters(cfg.model, layout, tp).padded_vocab_size for tp in (1, 2, 4, 8)}
    # multiples of 128, 256, 512, 1024 at or above 144,644
    assert padded == {1: 144_768, 2: 144_896, 4: 144_896, 8: 145_408}
    c1, c8 = count_parameters(cfg.model, layout, 1), count_parameters(cfg.model, layout, 8)
    assert c8.embedding - c1.embedding == (145_408 - 144_768) * 512
    assert c8.non_embedding == c1.non_embedding
    assert c8.size_label_unpadded == c1.size_label_unpadded


@pytest.mark.parametrize(
    "preset,tp,pp",
    [("soda-135m", 1, 1), ("soda-135m", 2, 3), ("soda-135m", 8, 5), ("soda-600m", 4, 7),
     ("soda-1.7b", 2, 4), ("soda-4b", 8, 4), ("soda-4b", 4, 1), ("tiny", 2, 2)],
)
def test_per_rank_sums_to_total(preset, tp, pp):
    """Replicated on every TP rank: each layer's input norm (h), pre-MLP norm (h), q_norm and
    k_norm (d each, with model.qk_norm) and the final norm (h). Everything else is split by tp."""
    cfg = _cfg(preset)
    m, layout = cfg.model, _layout(cfg)
    stages = per_rank_parameters(m, layout, tp, pp)
    assert len(stages) == pp
    replicated = m.num_layers * (2 * m.hidden_size + 2 * m.head_dim) + m.hidden_size
    assert sum(s["replicated"] for s in stages) == replicated
    whole = sum((s["total"] - s["replicated"]) * tp + s["replicated"] for s in stages)
    assert whole == count_parameters(m, layout, tp).total
    assert sum(s["num_layers"] for s in stages) == m.num_layers
    vocab_shard = layout.padded_size(tp, m.make_vocab_size_divisible_by) // tp * m.hidden_size
    assert stages[0]["embedding"] == vocab_shard and stages[-1]["output_layer"] == vocab_shard
    assert all(s["embedding"] == 0 for s in stages[1:])
    assert all(s["output_layer"] == 0 and s["final_norm"] == 0 for s in stages[:-1])


def test_per_rank_135m_tp2_by_hand():
    cfg = _cfg("soda-135m")
    (stage,) = per_rank_parameters(cfg.model, _layout(cfg), tp=2, pp=1)
    per_layer_rank = (3_802_240 - 1_152) // 2 + 1_152  # norms 2*512 + 2*64 = 1152 kept whole
    assert stage["layers"] == 15 * per_layer_rank
    assert stage["embedding"] == stage["output_layer"] == 144_896 // 2 * 512
    assert stage["total"] == 15 * per_layer_rank + 2 * 72_448 * 512 + 512


def test_per_rank_rejects_uneven_pipeline():
    cfg = _cfg("soda-135m")
    with pytest.raises(ValueError, match="parallel.pipeline_parallel"):
        per_rank_parameters(cfg.model, _layout(cfg), tp=1, pp=2)  # 15 layers
    with pytest.raises(ValueError, match="parallel.tensor_parallel"):
        per_rank_parameters(cfg.model, _layout(cfg), tp=3, pp=1)


def test_memory_per_rank_by_hand():
    n = 205_276_544  # soda-135m, tp=1, pp=1: the only rank holds everything
    cfg = _cfg("soda-135m")
    mem = memory_per_rank(cfg, dp=4)
    assert mem["parameters"] == n
    assert mem["weights_bytes"] == 2 * n
    assert mem["grads_bytes"] == 4 * n
    assert mem["master_weights_bytes"] == 4 * n // 4
    assert mem["adam_moments_bytes"] == 8 * n // 4
    assert mem["optimizer_state_bytes"] == 3 * n
    assert mem["total_bytes"] == 9 * n

    unsharded = memory_per_rank(_cfg("soda-135m", "--parallel.distributed_optimizer=false"), dp=4)
    assert unsharded["optimizer_state_bytes"] == 12 * n

    fp32 = memory_per_rank(_cfg("soda-135m", "--training.precision=fp32"), dp=1)
    assert fp32["weights_bytes"] == 4 * n and fp32["master_weights_bytes"] == 0
    assert fp32["total_bytes"] == (4 + 4 + 8) * n


def test_memory_picks_largest_stage():
    cfg = _cfg("soda-4b", "--parallel.tensor_parallel=4", "--parallel.pipeline_parallel=4")
    stages = per_rank_parameters(cfg.model, _layout(cfg), 4, 4)
    mem = memory_per_rank(cfg)
    assert mem["parameters"] == max(s["total"] for s in stages)
    assert mem["stage"] == 3  # final norm + output shard outweigh the input-embedding shard


def test_cli_json_round_trip(capsys):
    assert main(["model", "--preset", "soda-4b", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) == {"model", "vocab", "parallel", "parameters", "per_rank",
                        "flops_per_token", "flops_per_token_causal", "memory_per_rank"}
    cfg = _cfg("soda-4b")
    counts = count_parameters(cfg.model, _layout(cfg))
    assert rep["parameters"] == dataclasses.asdict(counts)
    assert abs(rep["parameters"]["size_label"] - 4e9) / 4e9 < 0.05
    flops = rep["flops_per_token"]
    assert flops["training"] == pytest.approx(3 * flops["forward"])
    assert flops["ratio_to_six_n"] == pytest.approx(flops["training"] / flops["six_n"])
    assert rep["per_rank"][0]["total"] == counts.total
    assert rep["memory_per_rank"]["parameters"] == counts.total


def test_cli_parallel_flags_become_overrides(capsys):
    assert main(["model", "--preset", "soda-135m", "--tp", "2", "--pp", "3", "--dp", "8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["vocab"]["padded_size"] == 144_896
    assert [s["num_layers"] for s in rep["per_rank"]] == [5, 5, 5]
    assert rep["memory_per_rank"]["optimizer_sharded_over"] == 8


def test_cli_table_has_units(capsys):
    assert main(["model", "--preset", "soda-135m"]) == 0
    out = capsys.readouterr().out
    assert "SODA size label" in out and "131.16 M" in out
    assert "GFLOP" in out and "GiB" in out


def test_cli_bad_tp_names_the_field(capsys):
    assert main(["model", "--preset", "soda-135m", "--tp", "3"]) == 2
    assert "parallel.tensor_parallel" in capsys.readouterr().err
