"""The run's resolved pieces (vocabulary layout, padded vocabulary, batch geometry), computed
once from the config and the world size, and what the model built from them holds."""

from __future__ import annotations

import pytest

from soda_mega.config import ConfigError, load_config
from soda_mega.run.resolved import BatchGeometry, resolve_run
from soda_mega.tokens.layout import VocabLayout


def test_one_process_run():
    cfg = load_config(preset="tiny")
    run = resolve_run(cfg, 1)
    assert run.vocab == VocabLayout.from_config(cfg.vocab)
    multiple = cfg.model.make_vocab_size_divisible_by
    assert run.padded_vocab % multiple == 0
    assert run.vocab.size <= run.padded_vocab < run.vocab.size + multiple
    t = cfg.training
    assert (run.dp, run.world_size) == (1, 1)
    assert run.grad_accum == t.global_batch_size // t.micro_batch_size
    assert run.batch.tokens_per_step == t.global_batch_size * cfg.model.seq_length


def test_tensor_parallel_pads_for_tp_and_leaves_the_rest_to_dp():
    cfg = load_config(preset="tiny", overrides=["--parallel.tensor_parallel=2",
                                                "--training.global_batch_size=8",
                                                "--training.micro_batch_size=2"])
    run = resolve_run(cfg, 4)
    assert (run.tensor_parallel, run.dp, run.grad_accum) == (2, 2, 2)
    assert run.padded_vocab % (2 * cfg.model.make_vocab_size_divisible_by) == 0
    assert run.batch.for_rank(1).first_window(1) == 4 + 2  # replica 1's second micro-batch


def test_impossible_layouts_fail_naming_the_field():
    cfg = load_config(preset="tiny", overrides=["--parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        resolve_run(cfg, 3)
    cfg = load_config(preset="tiny", overrides=["--training.global_batch_size=6",
                                                "--training.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        resolve_run(cfg, 2)
    with pytest.raises(ValueError, match="rank 2"):
        BatchGeometry(16, 2, 8, 0, 2).for_rank(2)


def test_model_takes_its_vocabulary_from_the_resolved_run(megatron_one_process):
    from soda_mega.model.gpt import build_model

    cfg = load_config(preset="tiny")
    run = resolve_run(cfg, 1)
    chunk = build_model(cfg, resolved=run)[0]
    assert chunk.layout is run.vocab
    assert chunk.embedding.word_embeddings.weight.shape[0] == run.padded_vocab
    assert chunk.output_layer.weight.shape[0] == run.padded_vocab
    other = resolve_run(load_config(preset="tiny", overrides=["--parallel.tensor_parallel=2"]), 2)
    with pytest.raises(ValueError, match="TP 2"):
        build_model(cfg, resolved=other)
