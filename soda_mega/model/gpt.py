"""Build the SODA decoder as a Megatron-core ``GPTModel`` from a :class:`SodaConfig`.

The model is Megatron-core's ``GPTModel`` with the Qwen3 layer spec of :mod:`.spec`, RoPE,
an untied output layer and a vocabulary padded for tensor-parallel divisibility. Padded rows
are never predicted: their logits are set to -inf by a hook on the output layer, so they get
zero probability in the loss, zero gradient, and are never sampled.

Called with ``labels`` and ``loss_mask``, the model returns :class:`~.lm_head.LMLoss` (per-token
loss with z-loss, per-modality sums and counts) from the loss path of ``kernels.loss``; with
``labels`` alone, Megatron's per-token cross-entropy ``[b, s]``; with neither, the logits.

Call :func:`soda_mega.parallel.state.initialize` first; :func:`build_model` returns one module
per virtual pipeline chunk held by this rank (a list of length 1 without interleaving), with
weights that depend only on the seed and the model shape (:mod:`soda_mega.model.init`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from soda_mega.config.schema import SodaConfig
from soda_mega.model.init import initialize_weights
from soda_mega.model.lm_head import InterleavedVocabParallelEmbedding, language_model_loss, resolve_impl
from soda_mega.model.norm import RMSNorm
from soda_mega.model.spec import qwen3_layer_spec
from soda_mega.run.resolved import ResolvedRun, padded_vocab
from soda_mega.tokens.layout import VocabLayout


def params_dtype(cfg: SodaConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32


def transformer_config(cfg: SodaConfig, **extra) -> TransformerConfig:
    """Megatron-core ``TransformerConfig`` for this run (``extra`` overrides any field)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(cfg)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        qk_layernorm=m.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # NOTE: Megatron's own init depends on the layout; soda_mega.model.init overwrites the
        # weights afterwards (same seed -> same model on any TP/PP/VP). Megatron's init still
        # runs because it is also where the tensor-parallel attributes (tensor_model_parallel,
        # partition_dim) are set, which the gradient-norm and clipping code relies on.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fusions that need CUDA kernels; Megatron's unfused paths are used on CPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        # NOTE: with gloo, batched isend/irecv between the same two ranks are matched in issue
        # order; in interleaved PP=2 each rank is both the previous and the next stage of the
        # other, and the batched order (send_prev, recv_prev, send_next, recv_next) then pairs
        # activations with gradients. Megatron's unbatched path orders ops by rank parity.
        batch_p2p_comm=on_gpu,
        recompute_granularity=None if t.recompute == "none" else t.recompute,
        recompute_method="uniform" if t.recompute == "full" else None,
        recompute_num_layers=1 if t.recompute == "full" else None,
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


class SodaGPTModel(GPTModel):
    """``GPTModel`` whose padded vocabulary rows are never predicted, with selectable
    embedding and loss implementations (:mod:`.lm_head`)."""

    def __init__(self, *args, layout: VocabLayout, loss_impl: str = "megatron",
                 embedding_impl: str = "torch", z_loss: float = 0.0, loss_plan: str = "auto",
                 gemm_engine: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layout = layout
        self.loss_impl, self.z_loss = loss_impl, z_loss
        self.loss_plan, self.gemm_engine = loss_plan, gemm_engine  # kernels.loss_plan / gemm_engine
        #: Set while a training schedule back-propagates sum(token_loss * loss_mask) times this
        #: scale (lm_head then uses the fused loss's three-matmul training path); None: unknown.
        self.known_loss_grad_scale: float | None = None
        if self.pre_process and embedding_impl == "triton":
            self.embedding.word_embeddings = InterleavedVocabParallelEmbedding.replacing(
                self.embedding.word_embeddings, self.config, layout)
        if self.post_process:
            self.output_layer.register_forward_hook(self._mask_padded_logits)

    def _postprocess(self, hidden_states, **kwargs):
        labels, loss_mask = kwargs.get("labels"), kwargs.get("loss_mask")
        inference = kwargs.get("inference_context") is not None and not self.training
        if (not self.post_process or labels is None or loss_mask is None or inference
                or kwargs.get("mtp_in_postprocess")):
            return super()._postprocess(hidden_states, **kwargs)
        return language_model_loss(self, hidden_states, labels, loss_mask)

    def _mask_padded_logits(self, module, inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        first = ps.get_tensor_model_parallel_rank() * local if self.parallel_output else 0
        pad_from = self.layout.size - first
        if pad_from >= local:
            return output
        keep = torch.arange(local, device=logits.device) < max(pad_from, 0)
        return logits.masked_fill(~keep, float("-inf")), bias


def build_model(cfg: SodaConfig, *, resolved: ResolvedRun | None = None,
                **config_overrides) -> list[SodaGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), in ``params_dtype``.

    ``resolved``: the run's vocabulary layout and padded vocabulary, computed once by the
    command (:func:`soda_mega.run.resolved.resolve_run`); derived from ``cfg`` without it."""
    tcfg = transformer_config(cfg, **config_overrides)
    if resolved is not None:
        if resolved.tensor_parallel != cfg.parallel.tensor_parallel:
            raise ValueError(f"the resolved run pads the vocabulary for TP {resolved.tensor_parallel}, "
                             f"parallel.tensor_parallel is {cfg.parallel.tensor_parallel}")
        layout, padded = resolved.vocab, resolved.padded_vocab
    else:
        layout = VocabLayout.from_config(cfg.vocab)
        padded = padded_vocab(layout, cfg)
    layer_spec = qwen3_layer_spec(cfg.model.qk_norm, cfg.kernels.attention)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        block = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(tcfg, vp_stage=stage),
            layer_norm=RMSNorm,
        )
        model = SodaGPTModel(
            config=tcfg,
            transformer_layer_spec=block,
            vocab_size=padded,
            max_sequence_length=cfg.model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=cfg.model.rope_theta,
            vp_stage=stage,
            layout=layout,
            loss_impl=resolve_impl("loss", cfg.kernels.loss),
            embedding_impl=resolve_impl("embedding", cfg.kernels.embedding),
            z_loss=cfg.training.z_loss,
            loss_plan=cfg.kernels.loss_plan,
            gemm_engine=cfg.kernels.gemm_engine,
        )
        chunks.append(model)
    initialize_weights(chunks, cfg, vocab_size=layout.size)
    return chunks

