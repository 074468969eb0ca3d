"""Parameter, FLOP and memory accounting for the SODA decoder, from the config alone.

Everything here is integer arithmetic on :class:`~soda_mega.config.ModelConfig` and
:class:`~soda_mega.tokens.VocabLayout`: no module is built and no tensor is allocated, so the
numbers can be printed for a 4B model on a laptop (``soda-mega model``) and used by the
scaling-law code to place IsoFLOP runs.

Shapes (Qwen3-style, SODA_SPEC section 2), with ``h`` = hidden size, ``H`` = query heads,
``G`` = key/value heads, ``d`` = head dim, ``F`` = SwiGLU width, ``L`` = layers::

    qkv_out   = H*d + 2*G*d                       fused Q, K, V output width
    per layer = h                                 input RMSNorm
              + h * qkv_out                       QKV projection (no bias)
              + 2*d           (if model.qk_norm)  q_norm, k_norm (one weight per head channel)
              + H*d * h                           attention output projection
              + h                                 pre-MLP RMSNorm
              + h * 2F + F * h                    SwiGLU fc1 (gate+up fused) and fc2
    final norm = h
    embedding = V_pad * h,  output layer = V_pad * h   (untied)

``V`` is :attr:`VocabLayout.size`; ``V_pad`` is ``layout.padded_size(tp,
model.make_vocab_size_divisible_by)``, so the padded counts depend on the TP size. The SODA
size label is ``non_embedding + output_layer``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import ModelConfig, SodaConfig
from soda_mega.tokens.layout import VocabLayout

#: Bytes per element of the dtypes the memory model uses.
BYTES = {"bf16": 2, "fp32": 4}


# ----------------------------------------------------------------------------- parameters
def qkv_out_features(model: ModelConfig) -> int:
    """Output width of the fused QKV projection: ``H*d + 2*G*d``."""
    return (model.num_attention_heads + 2 * model.num_kv_heads) * model.head_dim


def layer_norm_parameters(model: ModelConfig) -> int:
    """Norm weights of one layer, replicated on every TP rank: ``2h (+ 2d with QK-norm)``."""
    return 2 * model.hidden_size + (2 * model.head_dim if model.qk_norm else 0)


def layer_matmul_parameters(model: ModelConfig) -> int:
    """Weights of one layer split by TP: QKV, output projection, fc1 and fc2."""
    h, f = model.hidden_size, model.ffn_hidden_size
    attn_out = model.num_attention_heads * model.head_dim
    return h * qkv_out_features(model) + attn_out * h + h * 2 * f + f * h


def non_embedding_parameters(model: ModelConfig) -> int:
    """Every parameter but the input embedding and the output layer: the layers and the final
    norm (no vocabulary needed)."""
    return model.num_layers * (layer_norm_parameters(model) + layer_matmul_parameters(model)) \
        + model.hidden_size


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the whole model (all ranks together).

    Fields without a suffix use the vocabulary padded for ``tensor_parallel`` (what is
    allocated); the ``*_unpadded`` fields use the real vocabulary size ``V`` (what the model
    can use, and what the SODA size label means). ``per_layer``, ``final_norm`` and
    ``non_embedding`` do not depend on the vocabulary.
    """

    tensor_parallel: int
    vocab_size: int
    padded_vocab_size: int
    per_layer: int
    layers: int
    final_norm: int
    non_embedding: int
    embedding: int
    output_layer: int
    total: int
    size_label: int
    embedding_unpadded: int
    output_layer_unpadded: int
    total_unpadded: int
    size_label_unpadded: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(model: ModelConfig, layout: VocabLayout, tp: int = 1) -> ParamCounts:
    """Count the decoder's parameters (formulas in the module docstring).

    ``total = embedding + non_embedding + output_layer`` and
    ``size_label = non_embedding + output_layer``, each with ``V_pad`` for this ``tp``; the
    ``*_unpadded`` twins use ``V``.
    """
    if tp < 1:
        raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {tp}")
    h = model.hidden_size
    vocab = layout.size
    padded = layout.padded_size(tp, model.make_vocab_size_divisible_by)
    per_layer = layer_norm_parameters(model) + layer_matmul_parameters(model)
    layers = model.num_layers * per_layer
    non_embedding = non_embedding_parameters(model)
    return ParamCounts(
        tensor_parallel=tp,
        vocab_size=vocab,
        padded_vocab_size=padded,
        per_layer=per_layer,
        layers=layers,
        final_norm=h,
        non_embedding=non_embedding,
        embedding=padded * h,
        output_layer=padded * h,
        total=non_embedding + 2 * padded * h,
        size_label=non_embedding + padded * h,
        embedding_unpadded=vocab * h,
        output_layer_unpadded=vocab * h,
        total_unpadded=non_embedding + 2 * vocab * h,
        size_label_unpadded=non_embedding + vocab * h,
    )


def _check_tp(model: ModelConfig, tp: int) -> None:
    for name in ("num_attention_heads", "num_kv_heads", "ffn_hidden_size"):
        value = getattr(model, name)
        if tp < 1 or value % tp:
            raise ConfigError(f"parallel.tensor_parallel: {tp} must divide model.{name}={value}")


def per_rank_parameters(model: ModelConfig, layout: VocabLayout, tp: int, pp: int) -> list[dict[str, Any]]:
    """Parameters held by ONE tensor-parallel rank of each pipeline stage.

    Layers are split evenly (``L / pp`` per stage). Stage 0 also holds the input embedding,
    the last stage the final norm and the output layer (with ``pp == 1`` one stage holds
    all three). TP splits the QKV, output-projection, fc1, fc2, embedding and output-layer
    weights by ``tp`` (vocabulary-parallel rows ``V_pad / tp``); every RMSNorm weight
    (input, pre-MLP, q_norm, k_norm, final) is replicated on each TP rank, reported as
    ``replicated``. Hence, for the whole model::

        sum over stages of (total - replicated) * tp + replicated == count_parameters(...).total

    Each dict has ``stage``, ``first_layer``, ``num_layers``, ``embedding``, ``layers``,
    ``final_norm``, ``output_layer``, ``replicated`` and ``total``.
    """
    _check_tp(model, tp)
    if pp < 1 or model.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_parallel: {pp} stages must divide model.num_layers={model.num_layers}"
        )
    h = model.hidden_size
    vocab_shard = layout.padded_size(tp, model.make_vocab_size_divisible_by) // tp * h
    norms = layer_norm_parameters(model)
    layer_rank = layer_matmul_parameters(model) // tp + norms
    per_stage = model.num_layers // pp
    stages = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        row = {
            "stage": s,
            "first_layer": s * per_stage,
            "num_layers": per_stage,
            "embedding": vocab_shard if first else 0,
            "layers": per_stage * layer_rank,
            "final_norm": h if last else 0,
            "output_layer": vocab_shard if last else 0,
            "replicated": per_stage * norms + (h if last else 0),
        }
        row["total"] = row["embedding"] + row["layers"] + row["final_norm"] + row["output_layer"]
        stages.append(row)
    return stages


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsBreakdown:
    """Matmul FLOPs per token of one forward pass, summed over all layers.

    One multiply-add counts 2 FLOPs. Per layer, at sequence length ``s``:

    * ``qkv``               = 2 * h * qkv_out
    * ``attention_scores``  = 2 * s * H * d        (Q K^T)
    * ``attention_values``  = 2 * s * H * d        (softmax(.) V)
    * ``attention_output``  = 2 * H * d * h
    * ``mlp``               = 2 * h * 2F + 2 * F * h
    * ``lm_head``           = 2 * h * V            (once, unpadded V: model FLOPs, not
                                                    the hardware FLOPs of padded rows)

    The two attention terms use the full ``s`` (Chinchilla convention) unless ``causal``,
    which halves them. The embedding lookup is a gather and counts 0. ``training`` is
    ``3 * forward`` (backward = 2x forward). ``six_n`` is the naive ``6 * N`` with
    ``N = non_embedding + output_layer (unpadded)``.
    """

    seq_length: int
    causal: bool
    qkv: float
    attention_scores: float
    attention_values: float
    attention_output: float
    mlp: float
    lm_head: float
    six_n: float

    @property
    def forward(self) -> float:
        return (self.qkv + self.attention_scores + self.attention_values
                + self.attention_output + self.mlp + self.lm_head)

    @property
    def training(self) -> float:
        return 3 * self.forward

    @property
    def ratio_to_six_n(self) -> float:
        """Exact training FLOPs over ``6N``."""
        return self.training / self.six_n

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(forward=self.forward, training=self.training, ratio_to_six_n=self.ratio_to_six_n)
        return out


def flops_per_token(
    model: ModelConfig, vocab_size: int, seq_length: int | None = None, causal: bool = False
) -> FlopsBreakdown:
    """Exact matmul FLOPs per token (see :class:`FlopsBreakdown` for the formulas).

    ``vocab_size`` is the real (unpadded) vocabulary ``V``; ``seq_length`` defaults to
    ``model.seq_length``.
    """
    s = model.seq_length if seq_length is None else seq_length
    if s < 1:
        raise ValueError(f"seq_length must be >= 1, got {s}")
    h, f, n_layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    attn_width = model.num_attention_heads * model.head_dim
    attn_factor = 0.5 if causal else 1.0
    non_embedding = n_layers * (layer_norm_parameters(model) + layer_matmul_parameters(model)) + h
    return FlopsBreakdown(
        seq_length=s,
        causal=causal,
        qkv=float(n_layers * 2 * h * qkv_out_features(model)),
        attention_scores=n_layers * 2 * s * attn_width * attn_factor,
        attention_values=n_layers * 2 * s * attn_width * attn_factor,
        attention_output=float(n_layers * 2 * attn_width * h),
        mlp=float(n_layers * (2 * h * 2 * f + 2 * f * h)),
        lm_head=float(2 * h * vocab_size),
        six_n=float(6 * (non_embedding + vocab_size * h)),
    )


# ----------------------------------------------------------------------------- memory
def memory_per_rank(cfg: SodaConfig, dp: int = 1) -> dict[str, Any]:
    """Bytes of weights, gradients and optimizer state on the largest rank.

    The rank is the one TP rank of the pipeline stage with the most parameters ``n``
    (:func:`per_rank_parameters` with ``cfg.parallel``). Assumptions, following Megatron-core's
    DDP + (distributed) optimizer with Adam:

    * ``training.precision == 'bf16'``: weights ``2n`` bytes; the optimizer keeps an fp32
      master copy, ``4n``.
    * ``training.precision == 'fp32'``: weights ``4n``; no separate master copy (0).
    * gradients are accumulated in an fp32 ``main_grad`` buffer, ``4n``, never sharded
      (ZeRO-1 shards only optimizer state).
    * Adam's two moments, ``2 * 4n``.
    * ``parallel.distributed_optimizer``: master copy and moments are divided by ``dp``
      (rounded up, as Megatron pads its buffers to a multiple of ``dp``).

    Activations, communication buffers and the CUDA context are not counted.
    """
    if dp < 1:
        raise ConfigError(f"dp: data-parallel size must be >= 1, got {dp}")
    layout = VocabLayout.from_config(cfg.vocab)
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    stages = per_rank_parameters(cfg.model, layout, tp, pp)
    worst = max(stages, key=lambda row: row["total"])
    n = worst["total"]
    bf16 = cfg.training.precision == "bf16"
    shard = dp if cfg.parallel.distributed_optimizer else 1
    weights = n * BYTES[cfg.training.precision]
    master = math.ceil(n * BYTES["fp32"] / shard) if bf16 else 0
    grads = n * BYTES["fp32"]
    moments = math.ceil(2 * n * BYTES["fp32"] / shard)
    return {
        "stage": worst["stage"],
        "parameters": n,
        "data_parallel": dp,
        "optimizer_sharded_over": shard,
        "weights_bytes": weights,
        "grads_bytes": grads,
        "master_weights_bytes": master,
        "adam_moments_bytes": moments,
        "optimizer_state_bytes": master + moments,
        "total_bytes": weights + grads + master + moments,
    }
