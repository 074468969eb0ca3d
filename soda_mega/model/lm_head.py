"""The two vocabulary-sized ends of the model, with the implementation chosen by ``cfg.kernels``.

Loss (``kernels.loss``), from the final hidden states ``[s, b, h]`` and labels / loss mask
``[b, s]``, always per token ``lse - logit[label] + z * lse^2`` (z = ``training.z_loss``):

=========  ==========================================================================
megatron   ``output_layer`` -> full logits ``[s, b, V_local]`` (padded rows at -inf) ->
           Megatron's ``vocab_parallel_cross_entropy``; the z-term from a vocab-parallel
           logsumexp of the same logits
torch      :func:`soda_kernels.fused_linear_cross_entropy` with ``impl="torch"``: the same
           plan in plain PyTorch (vocabulary slices), never the full logits
triton     the same function with the fused Triton kernels
auto       triton when CUDA is available, else megatron
=========  ==========================================================================

Embedding (``kernels.embedding``): ``torch`` (alias ``megatron``) is Megatron's
``VocabParallelEmbedding``; ``triton`` swaps in :class:`InterleavedVocabParallelEmbedding`,
same parameter and reductions, lookup by :func:`soda_kernels.interleaved_embedding`.

The fused paths (``torch`` / ``triton``) skip tokens with loss mask 0 before any matmul, and
under Megatron DDP add the output layer's weight gradient straight into its fp32
``main_grad`` (gradient-accumulation fusion: no bf16 gradient, no second weight-sized buffer;
the ``megatron`` path keeps Megatron's ``ColumnParallelLinear`` behaviour). When the model's
``known_loss_grad_scale`` is set (the training schedule does, see
:func:`soda_mega.training.forward_backward.known_loss_gradient`), the downstream gradient of
each token's loss is ``loss_mask * scale`` and the fused loss computes its gradients in the
forward with three matmuls (:mod:`soda_kernels.flce_train`), or keeps the recompute design,
as ``kernels.loss_plan`` decides (on a GPU by default: measured on the first micro-batch of
each shape, cached on disk; :mod:`soda_kernels.flce_measure`); ``kernels.gemm_engine`` runs the
plain GEMMs on the Triton matmul or on cuBLAS. See
:mod:`soda_kernels.fused_linear_cross_entropy` for the plan, memory and precision policy.

Every loss path returns :class:`LMLoss`: the masked per-token loss and, per loss group
(text, semantic, acoustic: :data:`soda_mega.tokens.LOSS_GROUPS`, from the labels' ids), the
loss sum and token count. Under tensor parallelism these are identical on every TP rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from soda_kernels._vocab_parallel import interpreting
from soda_kernels.fused_linear_cross_entropy import (
    active_tokens,
    fused_linear_cross_entropy,
    loss_group_stats,
)
from soda_kernels.interleaved_embedding import interleaved_embedding
from soda_mega.config.fields import ConfigError
from soda_mega.tokens.layout import VocabLayout


class LMLoss(NamedTuple):
    """What the model's forward returns when given labels and a loss mask."""

    token_loss: torch.Tensor    # [b, s] fp32, loss incl. z-loss, 0 where not counted
    group_loss: torch.Tensor    # [3] fp32 sum of token_loss per loss group
    group_tokens: torch.Tensor  # [3] int64 counted tokens per loss group


def resolve_impl(field: str, choice: str) -> str:
    """Concrete implementation for ``kernels.<field>``; fails early if Triton cannot run."""
    plain = "megatron" if field == "loss" else "torch"
    if choice == "auto":
        choice = "triton" if torch.cuda.is_available() else plain
    if field == "embedding" and choice == "megatron":
        choice = "torch"
    if choice == "triton" and not torch.cuda.is_available() and not interpreting():
        raise ConfigError(
            f"kernels.{field}: triton needs a CUDA GPU (or TRITON_INTERPRET=1 set before triton is "
            f"imported, which runs the kernels slowly on CPU); use kernels.{field}={plain} or auto"
        )
    return choice


def _tp_group(model):
    group = model.pg_collection.tp
    return group if dist.get_world_size(group) > 1 else None


def _vocab_parallel_lse(logits: torch.Tensor, group) -> torch.Tensor:
    """logsumexp over the full vocabulary of vocab-parallel logits ``[..., V_local]``."""
    x = logits.float()
    big = x.detach().amax(-1)
    if group is not None:
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(x - big.unsqueeze(-1)).sum(-1)
    if group is not None:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=group)
    return big + torch.log(sum_exp)


def language_model_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor,
                        loss_mask: torch.Tensor) -> LMLoss:
    """Loss of ``model`` (a :class:`~soda_mega.model.gpt.SodaGPTModel` last stage)."""
    layout: VocabLayout = model.layout
    group = _tp_group(model)
    # NOTE: labels / mask are [b, s] and hidden states [s, b, h]: transpose the small ones.
    labels_sb = labels.t().contiguous()
    groups_sb = layout.loss_group(labels_sb)
    mask_sb = loss_mask.t().contiguous()
    if model.loss_impl == "megatron":
        logits, _ = model.output_layer(hidden_states)
        lse = _vocab_parallel_lse(logits, group) if model.z_loss else None
        # NOTE: vocab_parallel_cross_entropy edits fp32 logits in place, so the z-term above
        # must be taken first (its graph keeps exp(...), not the logits).
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_sb).float()
        if lse is not None:
            loss = loss + model.z_loss * lse * lse
        active = active_tokens(labels_sb, mask_sb, groups_sb, layout.size)
        loss = torch.where(active, loss, torch.zeros_like(loss))
        sums, counts = loss_group_stats(loss.reshape(-1), groups_sb.reshape(-1), active.reshape(-1))
        return LMLoss(loss.t(), sums, counts)
    if model.config.sequence_parallel:
        # The fused op all-reduces its hidden-state gradient over TP, so the gather's backward
        # only has to take this rank's slice.
        hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=model.pg_collection.tp)
    s, b, h = hidden_states.shape
    known_grad = None
    scale = getattr(model, "known_loss_grad_scale", None)
    if scale is not None and model.training and torch.is_grad_enabled():
        # The schedule back-propagates sum(token_loss * loss_mask) (times ``scale``): the
        # fused loss can compute its gradients in the forward (soda_kernels.flce_train).
        known_grad = mask_sb.reshape(-1).float() * scale
    out = fused_linear_cross_entropy(
        hidden_states.reshape(s * b, h), model.output_layer.weight, labels_sb.reshape(-1),
        mask_sb.reshape(-1), groups_sb.reshape(-1), z_loss=model.z_loss,
        num_real_vocab=layout.size, tp_group=group, impl=model.loss_impl, fuse_main_grad=True,
        known_grad=known_grad, loss_plan=model.loss_plan, gemm_engine=model.gemm_engine)
    return LMLoss(out.loss.view(s, b).t(), out.group_loss, out.group_tokens)


class InterleavedVocabParallelEmbedding(VocabParallelEmbedding):
    """Megatron's ``VocabParallelEmbedding`` with the fused lookup kernel.

    Same parameter (name, shape, sharding) and the same TP reduction (all-reduce, or
    reduce-scatter to the sequence-parallel region); the kernel does the range check, gather
    and zero fill in one pass, with a deterministic backward. The kernel's per-position
    modality ids are not consumed by the model yet (the loss groups come from the labels).
    """

    def __init__(self, *args, layout: VocabLayout, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layout = layout

    def forward(self, input_):
        lay = self.layout
        output_parallel = interleaved_embedding(
            input_, self.weight, vocab_start=self.vocab_start_index,
            text_vocab_size=lay.text_vocab_size, audio_base=lay.audio_base,
            codebook_size=lay.codebook_size, num_codebooks=lay.num_codebooks).embeddings
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()
            return reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)

    @classmethod
    def replacing(cls, old: VocabParallelEmbedding, config, layout: VocabLayout):
        """A fresh module shaped like ``old`` (weights are filled later by the model init)."""
        return cls(old.num_embeddings, old.embedding_dim, init_method=config.embedding_init_method,
                   reduce_scatter_embeddings=old.reduce_scatter_embeddings, config=config,
                   tp_group=old.tp_group, layout=layout)
