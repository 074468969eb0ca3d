"""Typed configuration sections of a soda-mega run.

A run is one :class:`SodaConfig`: a preset (``soda-135m`` ... ``soda-4b``, ``tiny``), a config
file that may override any field, and ``--section.key=value`` overrides on the command line.
Each field carries a one-line help text and its allowed values (see :mod:`.fields`);
:func:`soda_mega.config.loader.finalize` checks everything at load time, so a bad value fails
before any model is built, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from soda_mega.config.fields import ConfigError, fld, validate_section

# Defaults of the data budgets, also used by readers opened without a config (`data inspect`).
MAX_DATASET_BYTES = 1 << 40
MAX_INFLATE_RATIO = 64.0
MAX_RECORD_AUDIO_BYTES = 1 << 30

SODA_SPECIAL_TOKENS = ("<|text_start|>", "<|text_end|>", "<|audio_start|>", "<|audio_end|>")

# Upper bounds on the sizes a configuration (or a checkpoint, dataset or HF folder from
# elsewhere) may declare. NOTE: they are far above any real model (SODA_SPEC: 144,644 ids,
# 2048-entry codebooks, soda-4b has d=2560, 36 layers, 4096 tokens; the largest open models
# have 256k-id vocabularies, 64k-entry codec codebooks, d=16384, 126 layers, 1M-token contexts)
# and exist so that a 2-KB file cannot make soda-mega build a two-billion-id tokenizer or spin
# on a 1e15-token context before anything else is checked.
MAX_TEXT_VOCAB = 1 << 21       # 2,097,152 text ids
MAX_CODEBOOK_SIZE = 1 << 18    # 262,144 entries per codebook
MAX_VOCAB = 1 << 22            # 4,194,304 ids in all (text + special + audio)
MAX_HIDDEN = 1 << 16           # 65,536
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FFN = 1 << 20              # 1,048,576
MAX_SEQ_LENGTH = 1 << 24       # 16,777,216 tokens


@dataclass
class VocabConfig:
    """Layout of the one flat vocabulary: text ids, special ids, then audio codebooks."""

    text_vocab_size: int = fld(128256, "ids taken by the text tokenizer, placed first", ge=1,
                              le=MAX_TEXT_VOCAB)
    bos_id: int = fld(128000, "beginning-of-document id (inside the text range)", ge=0)
    eos_id: int = fld(128001, "end-of-document id (inside the text range)", ge=0)
    special_tokens: list[str] = fld(
        help="names of the special ids placed right after the text ids, in order",
        default_factory=lambda: list(SODA_SPECIAL_TOKENS),
    )
    num_codebooks: int = fld(8, "Mimi codebooks kept per frame (codebook 0 is semantic)", ge=1, le=32)
    codebook_size: int = fld(2048, "entries per codebook", ge=2, le=MAX_CODEBOOK_SIZE)

    def check(self) -> None:
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if value >= self.text_vocab_size:
                raise ConfigError(
                    f"vocab.{name}: {value} is outside the text range [0, {self.text_vocab_size})"
                )
        if self.bos_id == self.eos_id:
            raise ConfigError(
                f"vocab.eos_id: must differ from vocab.bos_id (both are {self.eos_id}); "
                "document boundaries would be ambiguous"
            )
        missing = [t for t in SODA_SPECIAL_TOKENS if t not in self.special_tokens]
        if missing:
            raise ConfigError(f"vocab.special_tokens: must include {', '.join(missing)}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError("vocab.special_tokens: names must be unique")
        if self.size > MAX_VOCAB:
            raise ConfigError(
                f"vocab.codebook_size: the vocabulary would hold {self.size:,} ids (text_vocab_size "
                f"+ special tokens + num_codebooks x codebook_size); at most {MAX_VOCAB:,} are allowed")

    @property
    def size(self) -> int:
        """Number of real ids: text, special, then audio (``VocabLayout.size``)."""
        return self.text_vocab_size + len(self.special_tokens) + self.num_codebooks * self.codebook_size


@dataclass
class ModelConfig:
    """Shape of the Qwen3-style decoder (RMSNorm, SwiGLU, RoPE, QK-norm, GQA, no biases)."""

    name: str = fld("custom", "label of the model shape, e.g. the preset it came from")
    hidden_size: int = fld(512, "model width d", ge=1, le=MAX_HIDDEN)
    num_layers: int = fld(15, "number of transformer blocks", ge=1, le=MAX_LAYERS)
    num_attention_heads: int = fld(8, "query heads", ge=1, le=MAX_HEADS)
    num_kv_heads: int = fld(8, "key/value heads (grouped-query attention)", ge=1, le=MAX_HEADS)
    head_dim: int = fld(64, "channels per attention head", ge=1, le=MAX_HEAD_DIM)
    ffn_hidden_size: int = fld(1792, "SwiGLU inner width (each of the gate and up projections)", ge=1,
                              le=MAX_FFN)
    seq_length: int = fld(4096, "training context length in tokens", ge=1, le=MAX_SEQ_LENGTH)
    rope_theta: float = fld(1_000_000.0, "RoPE base frequency (Qwen3 uses 1e6)", gt=0)
    norm_eps: float = fld(1e-6, "RMSNorm epsilon", gt=0)
    qk_norm: bool = fld(True, "RMSNorm on each query and key head before RoPE (Qwen3)")
    init_std: float = fld(0.02, "std of the normal init of weight matrices", gt=0)
    make_vocab_size_divisible_by: int = fld(
        128, "pad the vocabulary to a multiple of this times the TP size (padded ids never predicted)", ge=1,
        le=1 << 16)

    def check(self) -> None:
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads: {self.num_kv_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )


@dataclass
class ParallelConfig:
    """How the model is split over GPUs; data parallelism takes the remaining ranks."""

    tensor_parallel: int = fld(1, "tensor-parallel size (heads, FFN and vocabulary split)", ge=1)
    pipeline_parallel: int = fld(1, "pipeline-parallel stages (layers split)", ge=1)
    virtual_pipeline: int | None = fld(
        None, "model chunks per pipeline stage for the interleaved schedule (none = plain 1F1B)", ge=2
    )
    sequence_parallel: bool = fld(False, "shard norms/dropout activations over the TP group (needs TP > 1)")
    distributed_optimizer: bool = fld(True, "shard optimizer state over data-parallel ranks (ZeRO-1)")
    overlap_grad_reduce: bool = fld(True, "overlap the data-parallel gradient reduction with backward")
    init_timeout_s: float = fld(
        1800.0, "seconds every rank waits at start-up for the others to join torch.distributed "
                "(rendezvous and process-group creation)", gt=0)
    collective_timeout_s: float = fld(
        1800.0, "seconds a collective (all-reduce, all-gather, barrier, ...) may wait for the other "
                "ranks before it fails (torch.distributed and Megatron's process groups)", gt=0)

    def check(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        for field_name, value in (("num_attention_heads", model.num_attention_heads),
                                  ("num_kv_heads", model.num_kv_heads),
                                  ("ffn_hidden_size", model.ffn_hidden_size)):
            if value % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel: {tp} must divide model.{field_name}={value}"
                )
        stages = pp * (self.virtual_pipeline or 1)
        if model.num_layers % stages:
            raise ConfigError(
                f"parallel.pipeline_parallel: {pp} stages x {self.virtual_pipeline or 1} chunks "
                f"must divide model.num_layers={model.num_layers}"
            )
        if self.virtual_pipeline is not None and pp < 2:
            raise ConfigError("parallel.virtual_pipeline: needs parallel.pipeline_parallel >= 2")
        if self.sequence_parallel and tp < 2:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor_parallel >= 2")
        if self.sequence_parallel and model.seq_length % tp:
            raise ConfigError(
                f"parallel.sequence_parallel: model.seq_length={model.seq_length} must be a multiple "
                f"of parallel.tensor_parallel={tp} (each TP rank holds an equal slice of the sequence)"
            )


@dataclass
class TrainingConfig:
    """Optimisation settings (SODA_SPEC section 3 defaults)."""

    seed: int = fld(1234, "random seed for weights, data order and dropout", ge=0)
    micro_batch_size: int = fld(1, "sequences per micro-batch on one GPU", ge=1)
    global_batch_size: int = fld(512, "sequences per optimizer step over all data-parallel ranks", ge=1)
    train_tokens: float = fld(500e9, "total training tokens (sets the number of steps unless "
                                     "training.epochs is set)", gt=0)
    epochs: float | None = fld(
        None, "passes over the tokens of the data.train datasets; when set, steps = ceil(epochs x "
              "their tokens / (global_batch_size x seq_length)) instead of train_tokens", gt=0)
    init_from: str | None = fld(
        None, "checkpoint (step_N, checkpoints/ or run folder) whose weights start this run "
              "(fine-tuning): optimizer, step, schedule and data start fresh; it must be the same "
              "model and vocabulary (the context length may differ); unused when run.dir holds a "
              "checkpoint to resume")
    lr: float | None = fld(None, "peak learning rate; none = SODA rule 0.003*sqrt(B/256)*sqrt(1024/d)", gt=0)
    min_lr: float = fld(0.0, "learning rate at the end of the decay", ge=0)
    lr_schedule: str = fld("wsd", "learning-rate schedule", choices=("wsd", "cosine", "constant"))
    warmup_fraction: float = fld(0.1, "fraction of steps in linear warmup", ge=0, le=1)
    decay_fraction: float = fld(0.2, "fraction of steps in the final decay (WSD)", ge=0, le=1)
    decay_shape: str = fld("linear", "shape of the WSD decay", choices=("linear", "cosine", "1-sqrt"))
    weight_decay: float = fld(0.033, "decoupled weight decay (norm weights excluded)", ge=0)
    adam_beta1: float = fld(0.98, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = fld(0.98, "Adam beta2", ge=0, lt=1)
    adam_eps: float = fld(1e-16, "Adam epsilon", gt=0)
    cautious: bool = fld(False, "cautious Adam: mask update components whose sign disagrees with the gradient")
    clip_grad: float = fld(1.0, "global gradient-norm clip (0 = off)", ge=0)
    z_loss: float = fld(1e-4, "z-loss weight on logsumexp^2", ge=0)
    precision: str = fld("bf16", "parameter/activation dtype (fp32 master weights either way)",
                         choices=("bf16", "fp32"))
    recompute: str = fld("none", "activation recomputation", choices=("none", "selective", "full"))

    def check(self) -> None:
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ConfigError(
                "training.decay_fraction: warmup_fraction + decay_fraction must be <= 1, got "
                f"{self.warmup_fraction} + {self.decay_fraction}"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size: {self.global_batch_size} must be a multiple of "
                f"training.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class DataConfig:
    """Where the token streams come from and how they are mixed."""

    train: list[str] = fld(help="dataset roots for training (built by `soda-mega data build` or `soda-mega data demo`)",
                           default_factory=list)
    valid: list[str] = fld(help="MDS dataset folders held out for validation", default_factory=list)
    weights: list[float] = fld(help="mixture weight per training folder (empty = by token count)",
                               default_factory=list)
    text_fraction: float = fld(0.05, "share of text-only tokens in the mixture (SODA: 5%)", ge=0, le=1)
    reset_at_document: bool = fld(False, "reset positions and block attention at document boundaries")
    packing: str = fld("split", "how documents fill the seq_length+1 windows: split (concatenated and "
                                "cut, every token used: pretraining) or whole (a document is never cut; "
                                "windows are padded, longer documents left out: fine-tuning)",
                       choices=("split", "whole"))
    num_workers: int = fld(2, "loader worker processes per rank", ge=0)
    shuffle_window: int = fld(
        64, "training order: shards are shuffled, and documents are shuffled within blocks of this "
            "many consecutive shards (per dataset), so a node reads from a window of shards at a "
            "time and a cache a fraction of the dataset's size serves a whole run; 0 = one global "
            "shuffle of all documents (needs memory per rank in proportion to the documents)", ge=0)
    cache_dir: str | None = fld(
        None, "node-local folder caching remote shards (s3://, gs://, oci://, hf:// datasets) and "
              "decompressed shards, shared by the node's ranks and workers; it must be yours and "
              "writable by nobody else (none = $SODA_MEGA_CACHE, else "
              "$TMPDIR/soda-mega-<uid>/data-cache); never taken from a checkpoint")
    cache_limit: int = fld(0, "bytes of shards the node cache may hold before the least recently "
                              "used are evicted (0 = no limit); keep it above a few shuffle "
                              "windows of shards", ge=0)
    max_dataset_bytes: int = fld(
        MAX_DATASET_BYTES, "the most bytes one dataset split may put in the node cache: the "
                           "raw_data.bytes of its remote or compressed shards, summed (checked at "
                           "open, before anything is fetched); raise it for a larger dataset", ge=1)
    max_inflate_ratio: float = fld(
        MAX_INFLATE_RATIO, "the most a compressed shard may inflate, as a multiple of its archive's "
                           "size (token shards compress 2-4x; a few KB declaring a GB are a "
                           "decompression bomb, refused at open)", ge=1)
    download_timeout: float = fld(60.0, "seconds one attempt to download a remote file may take", gt=0)
    download_retries: int = fld(3, "further attempts after a failed download (with back-off); a "
                                   "file missing on the server fails at once", ge=0)
    prefetch_threads: int = fld(2, "background threads per loader process that fetch the shards "
                                   "of the next step into the node cache (0 = fetch on first read)",
                                ge=0)
    skip_bad_documents: bool = fld(
        False, "a damaged shard or document (hash mismatch, ids outside the vocabulary, mask not "
               "0/1, unreadable) is replaced by masked-out filler and counted, instead of stopping "
               "the run with exit 2")
    # --- `soda-mega data build` (soda_mega/data/write/builder.py) ---
    tokenizer: str | None = fld(
        None, "local HuggingFace tokenizer.json for text (none = the embedded byte-level tokenizer)")
    mimi_weights: str | None = fld(
        None, "local Mimi weights file (.safetensors only, never a pickle); none = seeded random "
              "init, marked random_init in the shards (never real tokens); nothing is downloaded")
    mimi_seed: int = fld(0, "seed of the random Mimi used when data.mimi_weights is none", ge=0)
    doc_types: list[str] = fld(
        help="documents built from each recording: audio_first, text_first (need a transcript), "
             "speech_only, semantic_only (codebook 0)",
        default_factory=lambda: ["audio_first", "text_first"])
    valid_fraction: float = fld(0.01, "share of recordings / text documents held out in the valid split "
                                      "(by a hash of the recording, or speaker group; text by id)",
                                ge=0, lt=1)
    split_by: str = fld("recording", "what never appears in both splits: each recording (all its "
                                     "segments / cuts in one split), or each speaker too",
                        choices=("recording", "speaker"))
    build_workers: int = fld(2, "worker processes reading, encoding and tokenizing (0 = in the "
                                "building process)", ge=0)
    build_unit_recordings: int = fld(32, "recordings per resumable work unit of a speech build", ge=1)
    build_unit_text_docs: int = fld(2048, "documents per resumable work unit of a text build", ge=1)
    shard_size_limit: int = fld(1 << 26, "bytes per MDS shard file before the writer starts the next",
                                ge=1 << 12)
    text_split: str = fld("paragraph", "plain-text corpus: one document per blank-line-separated "
                                       "paragraph, or per line", choices=("paragraph", "line"))
    codec_device: str = fld("auto", "device that runs Mimi (auto = cuda when available)",
                            choices=("auto", "cpu", "cuda"))
    codec_devices: list[str] = fld(
        help="devices that run Mimi in a build, one codec worker each, fed by CPU processes that decode "
             "and resample audio (empty = every visible GPU when codec_device allows, else the CPU "
             "path of build_workers); e.g. [cuda:0, cuda:1]; cpu:N names run that path on CPU",
        default_factory=list)
    max_record_audio_bytes: int = fld(
        MAX_RECORD_AUDIO_BYTES, "the most decoded audio one recording may take in `data build` "
                                "(4 bytes x rate x channels x seconds; 1 GiB = 93 min of 48 kHz "
                                "mono): longer recordings are skipped, named, before decoding, "
                                "and decoding stops there whatever the file's header says", ge=1 << 16)
    encode_batch_size: int = fld(8, "recordings Mimi encodes together in one padded batch on GPU "
                                    "(CPU encodes one at a time)", ge=1)
    encode_chunk_seconds: float = fld(10.0, "audio per Mimi streaming step (bounds memory on long "
                                            "recordings; rounded to whole 80 ms frames)", gt=0)

    def check(self) -> None:
        if self.weights and len(self.weights) != len(self.train):
            raise ConfigError(
                f"data.weights: {len(self.weights)} weights for {len(self.train)} data.train folders"
            )
        buildable = ("audio_first", "text_first", "speech_only", "semantic_only")
        bad = [t for t in self.doc_types if t not in buildable]
        if bad or not self.doc_types:
            raise ConfigError(
                f"data.doc_types: {', '.join(map(repr, bad)) or 'empty list'} not allowed; "
                f"choose one or more of {', '.join(buildable)}"
            )
        if len(set(self.doc_types)) != len(self.doc_types):
            raise ConfigError("data.doc_types: each type may appear once")
        bad = [d for d in self.codec_devices if not re.match(r"^(cpu|cuda)(:\d+)?$", str(d))]
        if bad:
            raise ConfigError(f"data.codec_devices: {', '.join(map(repr, bad))} is not a device; "
                              "use cuda:N (or cpu:N to run the device path on CPU)")


@dataclass
class KernelsConfig:
    """Which implementation runs each hot op; the plain PyTorch / Megatron path is always there."""

    attention: str = fld("auto", "core attention: flash-attn if installed (auto), else torch SDPA",
                         choices=("auto", "flash", "sdpa"))
    # NOTE: "auto" picks the Triton kernels when CUDA is present. It is not the default yet:
    # the kernels have only run under Triton's CPU interpreter so far (see kernels/).
    loss: str = fld(
        "megatron",
        "output layer + cross-entropy with z-loss: megatron (full logits + vocab_parallel_cross_entropy), "
        "torch (chunked, no full logits), triton (fused kernel; CUDA, or TRITON_INTERPRET=1 on CPU), "
        "auto (triton on CUDA, else megatron)",
        choices=("auto", "triton", "torch", "megatron"),
    )
    loss_plan: str = fld(
        "auto",
        "design of the fused loss's training path (kernels.loss=torch/triton): auto (GPU: measure, "
        "unless a cached answer exists; CPU: roofline, so CPU runs stay reproducible), measure (time "
        "both designs x GEMM engines on the first micro-batch of each shape on this device and cache "
        "the winner in $SODA_KERNELS_CACHE, else $TMPDIR/soda-mega-<uid>/kernel-cache), roofline "
        "(the computed model's choice; CPU: three_matmul), recompute (4 matmuls), three_matmul "
        "(gradients in the forward)",
        choices=("auto", "measure", "roofline", "recompute", "three_matmul"),
    )
    gemm_engine: str = fld(
        "auto",
        "engine of the fused Triton loss's plain GEMMs (grad_W into main_grad, grad_h, the "
        "three-matmul logits): triton (the project's matmul kernel), torch (cuBLAS through torch, "
        "fp32 accumulation), auto (measured with the loss plan when it measures, else triton)",
        choices=("auto", "triton", "torch"),
    )
    embedding: str = fld(
        "torch",
        "input embedding: torch (Megatron's VocabParallelEmbedding; megatron is an alias), triton "
        "(fused lookup + modality ids, deterministic backward), auto (triton on CUDA, else torch)",
        choices=("auto", "triton", "torch", "megatron"),
    )


@dataclass
class RunConfig:
    """Where a run writes, how often it logs, validates and saves, and when it stops."""

    dir: str = fld("runs/soda", "run folder: checkpoints/, metrics.jsonl, tensorboard/, config.yaml")
    max_steps: int | None = fld(None, "stop after this many optimizer steps (none = the whole token budget)", ge=1)
    log_interval: int = fld(10, "optimizer steps between log lines", ge=1)
    eval_interval: int = fld(500, "steps between validation passes (0 = never)", ge=0)
    eval_batches: int = fld(50, "micro-batches per validation pass over all DP replicas (0 = the whole split)", ge=0)
    save_interval: int = fld(1000, "steps between checkpoints (0 = only at the end)", ge=0)
    keep_checkpoints: int = fld(3, "newest checkpoints to keep", ge=1)
    async_save: bool = fld(True, "write checkpoints in a background process: the loop blocks only "
                           "while the state is handed over (a copy to host memory); the checkpoint "
                           "is published once every rank's write has finished (false = the loop "
                           "waits for the whole save)")
    resume: bool = fld(True, "continue from the newest checkpoint in run.dir when there is one")
    overwrite: bool = fld(False, "with resume=false: move run.dir's checkpoints, metrics and "
                          "tensorboard files to run.dir/replaced/<time>/ and start over "
                          "(without it, resume=false over existing checkpoints is refused)")
    max_bad_steps: int = fld(5, "stop after this many consecutive steps with non-finite loss/gradients", ge=1)
    peak_tflops: float | None = fld(None, "per-GPU peak bf16 TFLOP/s for MFU (none = look up the GPU model)", gt=0)
    tensorboard: bool = fld(True, "also write TensorBoard event files")
    wandb_project: str | None = fld(None, "Weights & Biases project to log the metric records to "
                                       "(none = no W&B; needs the `wandb` package; WANDB_MODE=offline "
                                       "logs under run.dir/wandb without network)")
    wandb_entity: str | None = fld(None, "W&B entity (team or user) of the project (none = your default)")
    wandb_name: str | None = fld(None, "W&B display name of the run (none = W&B picks one)")
    wandb_tags: list[str] = fld(help="W&B tags of the run", default_factory=list)
    step_timeout_s: float | None = fld(
        1800.0, "watchdog: seconds one loop iteration (data, step, logging, validation, checkpoint), "
                "or the set-up before the first (checkpoint load), may take; past it every rank writes its "
                "Python stacks to run.dir/stacks/ and the "
                "run exits with code 5 so the launcher restarts it (none = no watchdog)", gt=0)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "vocab": VocabConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "kernels": KernelsConfig,
    "run": RunConfig,
}


@dataclass
class SodaConfig:
    """A whole run: one instance of each section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vocab: VocabConfig = dataclasses.field(default_factory=VocabConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    kernels: KernelsConfig = dataclasses.field(default_factory=KernelsConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def validate(self) -> SodaConfig:
        """Coerce every field to its type, check allowed values, then cross-field rules."""
        for name in SECTIONS:
            validate_section(name, getattr(self, name))
        self.vocab.check()
        self.model.check()
        self.parallel.check(self.model)
        self.training.check()
        self.data.check()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_run_layout(cfg: SodaConfig, world_size: int) -> None:
    """Checks that need the number of ranks (known at launch, not in the config): TP x PP must
    divide it, and the global batch must split into whole micro-batches per data-parallel
    replica."""
    p, t = cfg.parallel, cfg.training
    model_ranks = p.tensor_parallel * p.pipeline_parallel
    if world_size < 1 or world_size % model_ranks:
        raise ConfigError(
            f"parallel.tensor_parallel x parallel.pipeline_parallel: world size {world_size} is not "
            f"a multiple of TP x PP = {model_ranks}")
    dp = world_size // model_ranks
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} must be a multiple of "
            f"training.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} "
            f"(world {world_size} / TP x PP {model_ranks})")
