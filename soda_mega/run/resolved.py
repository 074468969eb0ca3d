"""What one run's configuration comes to once the world size is known, computed once.

A run's set-up needs a few values derived from the config: the vocabulary layout, the padded
vocabulary of the output layer and embedding (a multiple of TP x ``make_vocab_size_divisible_by``),
and the batch geometry (sequence length, micro-batch, global batch, data-parallel size,
micro-batches per step). :func:`resolve_run` computes them once, in the command, and the
trainer, the model and the loader receive the :class:`ResolvedRun` instead of deriving them
again from the config at every level. ``VocabLayout.from_config`` stays for the places that
truly start from a bare config (tools, evaluating a checkpoint).

NOTE: it needs both the config and the vocabulary layout of ``tokens`` (which itself stands on
``config``), so it lives on its own floor above the two (``tests/config/test_floor_layering.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from soda_mega.config.schema import SodaConfig, check_run_layout
from soda_mega.tokens.layout import VocabLayout


@dataclass(frozen=True)
class BatchGeometry:
    """Which windows belong to a rank: sizes of the global batch and of one replica's share."""

    seq_length: int
    """predicted tokens per window (``model.seq_length``)"""
    micro_batch_size: int
    """windows per micro-batch of one replica"""
    global_batch_size: int
    """windows per optimizer step, all replicas together"""
    dp_rank: int = 0
    """the data-parallel replica this geometry is seen from"""
    dp_size: int = 1
    """data-parallel replicas"""

    def __post_init__(self) -> None:
        per_replica, rem = divmod(self.global_batch_size, self.dp_size)
        if rem or per_replica % self.micro_batch_size:
            raise ValueError(
                f"training.global_batch_size={self.global_batch_size} must be a multiple of "
                f"training.micro_batch_size={self.micro_batch_size} x data-parallel size {self.dp_size}"
            )

    @property
    def micro_batches_per_step(self) -> int:
        """Gradient-accumulation steps: micro-batches of one replica per optimizer step."""
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch (all replicas)."""
        return self.global_batch_size * self.seq_length

    def first_window(self, micro: int) -> int:
        """Global index of the first window of this rank's ``micro``-th micro-batch."""
        step, m = divmod(micro, self.micro_batches_per_step)
        per_replica = self.global_batch_size // self.dp_size
        return step * self.global_batch_size + self.dp_rank * per_replica + m * self.micro_batch_size

    def for_rank(self, dp_rank: int) -> BatchGeometry:
        """The same geometry seen from data-parallel rank ``dp_rank``."""
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside 0..{self.dp_size - 1}")
        return dataclasses.replace(self, dp_rank=dp_rank)


@dataclass(frozen=True)
class ResolvedRun:
    """The derived pieces of one run, shared by its trainer, model and loaders."""

    vocab: VocabLayout
    """the vocabulary layout of the ``vocab`` section (text, special and audio ids)"""
    padded_vocab: int
    """rows of the embedding and output layer: ``vocab.size`` padded for TP"""
    tensor_parallel: int
    """TP size (the padding depends on it)"""
    pipeline_parallel: int
    """PP size"""
    batch: BatchGeometry
    """sequence length, micro / global batch and DP size (seen from DP rank 0)"""

    @property
    def dp(self) -> int:
        return self.batch.dp_size

    @property
    def grad_accum(self) -> int:
        """Micro-batches of one replica per optimizer step."""
        return self.batch.micro_batches_per_step

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.dp


def padded_vocab(vocab: VocabLayout, cfg: SodaConfig) -> int:
    """Rows of the embedding and output layer: ``vocab.size`` padded to a multiple of
    ``model.make_vocab_size_divisible_by`` x TP (Megatron's rule; the rows past the layout are
    never predicted)."""
    return vocab.padded_size(cfg.parallel.tensor_parallel, cfg.model.make_vocab_size_divisible_by)


def resolve_run(cfg: SodaConfig, world_size: int, vocab: VocabLayout | None = None) -> ResolvedRun:
    """The run's vocabulary, padded vocabulary and batch geometry on ``world_size`` ranks;
    a layout that does not divide fails naming the field (:class:`ConfigError`). ``vocab``:
    the layout of ``cfg.vocab`` when the caller derived it already (a command's pre-flight)."""
    check_run_layout(cfg, world_size)
    p, t, m = cfg.parallel, cfg.training, cfg.model
    vocab = vocab or VocabLayout.from_config(cfg.vocab)
    dp = world_size // (p.tensor_parallel * p.pipeline_parallel)
    return ResolvedRun(
        vocab=vocab,
        padded_vocab=padded_vocab(vocab, cfg),
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        batch=BatchGeometry(m.seq_length, t.micro_batch_size, t.global_batch_size, 0, dp),
    )
