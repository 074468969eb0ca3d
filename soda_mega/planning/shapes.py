"""What the step-time model is told: the model's shape, the layout, and the software stack.

:class:`ModelShape` describes more decoders than soda-mega builds (GELU or squared-ReLU FFN,
multi-head attention, LayerNorm, dropout) so that published Megatron-core runs can be
predicted with the same arithmetic; :func:`shape_of` reads a soda-mega config.
:class:`Layout` holds the parallel layout, including context parallelism (``cp``), which
soda-mega itself does not run: it exists here only to describe published runs.
:class:`Stack` names the kernels and overlaps of the software that runs the step.
"""

from __future__ import annotations

from dataclasses import dataclass

FFN_KINDS = ("swiglu", "gelu", "squared_relu")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, as far as time and memory depend on it."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    #: FFN kind: swiglu (gate + up, ``2 ffn`` fc1 outputs), gelu or squared_relu (``ffn``)
    ffn_kind: str
    #: vocabulary rows of the embedding / output layer (before TP padding)
    vocab: int
    seq: int
    #: RMSNorm on each query / key head (Qwen3, soda-mega)
    qk_norm: bool = False
    #: rotary position embedding applied to q and k (an elementwise pass)
    rope: bool = True
    #: hidden / attention dropout (2022-era GPT); masks are kept for backward
    dropout: bool = False
    #: pad the vocabulary to a multiple of this x TP (Megatron's rule)
    vocab_multiple: int = 128

    @property
    def fc1_out(self) -> int:
        return self.ffn * (2 if self.ffn_kind == "swiglu" else 1)

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def padded_vocab(self, tp: int) -> int:
        step = self.vocab_multiple * tp
        return -(-self.vocab // step) * step

    def layer_params(self) -> int:
        """Matmul weights of one layer (norms and biases are negligible and not counted)."""
        h = self.hidden
        return h * self.qkv_out + self.heads * self.head_dim * h + h * self.fc1_out + self.ffn * h


@dataclass(frozen=True)
class Layout:
    """A parallel layout and batch split. ``dp`` is derived: GPUs / (tp x pp x cp)."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    vp: int = 1
    cp: int = 1
    sp: bool = False
    recompute: str = "none"
    distributed_optimizer: bool = True
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per replica per step."""
        return self.global_batch // (self.dp * self.micro_batch)

    def label(self) -> str:
        return (f"TP{self.tp} PP{self.pp}" + (f" VP{self.vp}" if self.vp > 1 else "")
                + (f" CP{self.cp}" if self.cp > 1 else "") + f" DP{self.dp}")

    def check(self, model: ModelShape) -> str | None:
        """Why this layout cannot run ``model`` (None when it can)."""
        if self.recompute not in RECOMPUTE:
            return f"recompute must be one of {RECOMPUTE}"
        for what, value in (("heads", model.heads), ("kv_heads", model.kv_heads),
                            ("ffn", model.ffn)):
            if value % self.tp:
                return f"TP {self.tp} does not divide {what}={value}"
        if model.layers % (self.pp * self.vp):
            return f"PP {self.pp} x VP {self.vp} does not divide {model.layers} layers"
        if self.vp > 1 and self.pp < 2:
            return "virtual pipeline needs PP >= 2"
        if self.sp and self.tp < 2:
            return "sequence parallelism needs TP >= 2"
        if self.global_batch % (self.dp * self.micro_batch):
            return (f"global batch {self.global_batch} is not a multiple of micro-batch "
                    f"{self.micro_batch} x DP {self.dp}")
        if self.vp > 1 and self.micro_batches % self.pp:
            return "the interleaved schedule needs micro-batches a multiple of PP"
        return None


@dataclass(frozen=True)
class Stack:
    """The software that runs the step: which kernels, which overlaps.

    ``attention``: ``cudnn`` (Transformer Engine's cuDNN / FA3-class flash attention), ``fa2``
    (flash-attn 2 or torch SDPA: soda-mega's), both skipping causal blocks, or ``unfused``
    (2022 Megatron: scores materialised, fused softmax, dropout). ``loss``:
    ``megatron`` (logits materialised, eager vocab-parallel cross-entropy), ``fused_ce``
    (logits materialised, one fused cross-entropy kernel: Megatron-core's
    ``cross_entropy_loss_fusion``) or ``soda_fused`` (soda-mega's fused linear + cross-entropy,
    the two designs of :mod:`soda_kernels.flce_roofline`).
    """

    name: str
    attention: str = "cudnn"
    loss: str = "megatron"
    #: TP collectives overlapped with GEMMs (Transformer Engine userbuffers)
    tp_overlap: bool = False
    #: DP gradient reduce-scatter overlapped with the last micro-batch's backward
    overlap_grad_reduce: bool = True
    #: DP parameter all-gather overlapped with the first micro-batch's forward
    overlap_param_gather: bool = True
    #: pipeline sends / receives overlapped with compute
    overlap_p2p: bool = True
    #: bytes per gradient element in the DP reduction (fp32 grads: 4)
    grad_reduce_bytes: int = 4
    #: pipeline sends split over the TP ranks and gathered after (2022 Megatron's
    #: scatter-gather); without it each TP rank sends the whole activation unless SP shards it
    p2p_scatter_gather: bool = False


#: Transformer Engine + Megatron-core with every overlap on (the published H100 runs).
TE_STACK = Stack("Megatron-core + Transformer Engine (cuDNN attention, TP/DP/PP overlap)",
                 tp_overlap=True)
#: soda-mega's own kernels (no Transformer Engine): flash / SDPA attention, Megatron's
#: unfused norms, the fused Triton loss; Megatron DDP overlap, no TP overlap.
SODA_STACK = Stack("soda-mega (flash/SDPA attention, Triton fused loss, no Transformer Engine)",
                   attention="fa2", loss="soda_fused")


def shape_of(cfg, vocab_size: int | None = None) -> ModelShape:
    """The :class:`ModelShape` of a soda-mega config (SwiGLU, GQA, RoPE, QK-norm, no dropout)."""
    from soda_mega.tokens.layout import VocabLayout

    m = cfg.model
    vocab = vocab_size or VocabLayout.from_config(cfg.vocab).size
    return ModelShape(m.name, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads,
                      m.head_dim, m.ffn_hidden_size, "swiglu", vocab, m.seq_length,
                      qk_norm=m.qk_norm, vocab_multiple=m.make_vocab_size_divisible_by)


def layout_of(cfg, gpus: int, gpus_per_node: int = 8) -> Layout:
    """The :class:`Layout` of a soda-mega config on ``gpus`` GPUs (ValueError if impossible)."""
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if gpus % (tp * pp):
        raise ValueError(f"{gpus} GPUs is not a multiple of TP {tp} x PP {pp}")
    return Layout(tp, pp, gpus // (tp * pp), t.micro_batch_size, t.global_batch_size,
                  vp=p.virtual_pipeline or 1, sp=p.sequence_parallel, recompute=t.recompute,
                  distributed_optimizer=p.distributed_optimizer, gpus_per_node=gpus_per_node)
