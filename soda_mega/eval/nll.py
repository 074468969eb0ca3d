"""Held-out negative log-likelihood per token: overall, per modality and per Mimi codebook.

The NLL is the model's plain next-token cross-entropy (nats; the training z-loss term is
switched off) over the predicted tokens of packed windows, exactly as training validation
computes it: the same loader (:class:`~soda_mega.data.read.loader.SodaDataLoader`), the same
Megatron schedules in any TP / PP / VP / DP layout, the same per-token losses from the model's
loss path (:class:`~soda_mega.model.lm_head.LMLoss`). Only Megatron's ``loss_func`` is our
own: it also receives the labels and sums loss and token count per *bucket*:

* ``text``: text ids *and* the special ids (``<|text_start|>`` ...), grouped as the training
  loss groups do (:meth:`VocabLayout.loss_group`);
* ``semantic``: Mimi codebook 0; ``acoustic``: codebooks 1..K-1;
* ``codebook_k`` for every k (so ``codebook_0`` equals ``semantic``).

Tokens whose loss mask is 0 are not counted. Which windows are evaluated does not depend on the
layout: ``valid`` is one pass over the split in file order, micro-batches dealt round-robin over
data-parallel replicas (a trailing partial micro-batch is left out); ``train`` is the first
``max_batches`` micro-batches of the training loader's seeded shuffle. Sums are reduced over
the ranks that hold losses (the last pipeline stage's first TP rank of every DP replica).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist

from soda_mega.config.schema import SodaConfig
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.source import DatasetError
from soda_mega.data.read.split import OpenedSplit
from soda_mega.parallel import state
from soda_mega.run.resolved import ResolvedRun
from soda_mega.tokens.layout import LOSS_GROUPS, VocabLayout
from soda_mega.training.forward_backward import evaluation_mode, lm_forward_step, run_schedule

SPLITS = ("valid", "train")
#: Micro-batches per schedule call, per pipeline stage: enough to fill a pipeline, few enough
#: to keep only a handful of batches in memory and report progress often.
MICRO_BATCHES_PER_CALL = 8
#: Name of the per-bucket report in the loss function's output.
REPORT_KEY = "nll buckets"
TEXT_NOTE = ("text counts the special ids (<|text_start|>, <|text_end|>, <|audio_start|>, "
             "<|audio_end|>, ...) with the text ids, as the training loss groups do")


def bucket_names(num_codebooks: int) -> list[str]:
    """``text, semantic, acoustic, codebook_0 .. codebook_{K-1}``: the columns of the stats."""
    return [*LOSS_GROUPS, *(f"codebook_{k}" for k in range(num_codebooks))]


def bucket_stats(layout: VocabLayout, labels: torch.Tensor, loss_mask: torch.Tensor,
                 token_loss: torch.Tensor) -> torch.Tensor:
    """``[2, 3 + K]`` fp64: per bucket the sum of per-token losses (row 0) and the token count.

    A token counts when its mask is non-zero and its label is a real vocabulary id; it adds to
    its loss group and, for audio, to its codebook. A one-hot reduction: deterministic on GPU.
    """
    labels = labels.reshape(-1)
    groups = layout.loss_group(labels).long()
    codebooks = layout.codebook_of(labels)
    active = (loss_mask.reshape(-1) != 0) & (groups >= 0)
    buckets = torch.arange(len(LOSS_GROUPS) + layout.num_codebooks, device=labels.device)
    in_group = groups[:, None] == buckets
    in_codebook = (codebooks[:, None] >= 0) & (codebooks[:, None] + len(LOSS_GROUPS) == buckets)
    member = (in_group | in_codebook) & active[:, None]
    loss = torch.where(active, token_loss.reshape(-1).double(), 0.0)
    return torch.stack([(loss[:, None] * member).sum(0), member.sum(0).double()])


def bucket_loss(layout: VocabLayout, labels: torch.Tensor, loss_mask: torch.Tensor, output):
    """Megatron ``loss_func`` of one micro-batch: (loss sum, token count, {buckets: stats}).

    ``output`` is the model's :class:`~soda_mega.model.lm_head.LMLoss` (its per-token loss is
    already 0 where not counted); the loss sum only matters to the schedule's bookkeeping.
    """
    token_loss = output[0] if isinstance(output, tuple) else output
    stats = bucket_stats(layout, labels, loss_mask, token_loss.detach())
    total = stats[:, :len(LOSS_GROUPS)].sum(1)
    return total[0].float(), total[1].to(torch.int), {REPORT_KEY: stats}


def _loss_for(layout: VocabLayout, batch: dict) -> Callable:
    return partial(bucket_loss, layout, batch["labels"], batch["loss_mask"])


@dataclass
class NLLResult:
    """Summed NLL and token counts per bucket over every evaluated window (all ranks)."""

    names: list[str]
    loss_sums: list[float]
    counts: list[int]
    windows: int
    #: what was read: path, split folder, kind, documents and tokens of each dataset
    datasets: list[dict]
    #: the parallel layout that ran the evaluation
    layout: dict

    def bucket(self, name: str) -> tuple[float, int]:
        i = self.names.index(name)
        return self.loss_sums[i], self.counts[i]

    def overall(self) -> tuple[float, int]:
        groups = [self.bucket(g) for g in LOSS_GROUPS]
        return sum(s for s, _ in groups), sum(c for _, c in groups)


def bucket_metrics(loss_sum: float, tokens: int) -> dict:
    """Tokens, NLL (nats / token), perplexity and bits / token; None where nothing counted."""
    if tokens == 0:
        return {"tokens": 0, "nll": None, "perplexity": None, "bits_per_token": None}
    nll = loss_sum / tokens
    ppl = math.exp(nll) if nll < 700 else float("inf")
    return {"tokens": tokens, "nll": nll, "perplexity": ppl, "bits_per_token": nll / math.log(2)}


class _Progress:
    """Micro-batches done / total with throughput and ETA on stderr, every ``every`` seconds."""

    def __init__(self, total: int | None, tokens_per_micro: int, enabled: bool,
                 every: float = 10.0) -> None:
        self.total, self.tokens_per_micro = total, tokens_per_micro
        self.enabled, self.every = enabled, every
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def advance(self, micro_batches: int, final: bool = False) -> None:
        self.done += micro_batches
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.every):
            return
        self.last = now
        # NOTE: rank 0 counts its own micro-batches times the DP size: at most DP - 1 too many.
        done = min(self.done, self.total) if self.total else self.done
        rate = done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        eta = f" | ETA {int((self.total - done) / rate)} s" if self.total and rate > 0 else ""
        print(f"[soda-mega eval nll] {done}{of} micro-batches | "
              f"{rate * self.tokens_per_micro:,.0f} tokens/s{eta}", file=sys.stderr, flush=True)


def _per_rank_limit(max_batches: int | None, dp_rank: int, dp: int) -> int | None:
    """This replica's share of the first ``max_batches`` micro-batches (dealt round-robin)."""
    if max_batches is None:
        return None
    return len(range(dp_rank, max_batches, dp))


def planned_micro_batches(loader: SodaDataLoader, split: str, max_batches: int | None) -> int:
    """Micro-batches the evaluation will run over all replicas (for progress and errors).

    A single pass packs every document of every source into one stream cut into windows of
    ``S + 1`` tokens with stride ``S``: ``floor((T - 1) / S)`` windows from ``T`` tokens.
    """
    if split == "train":
        return int(max_batches or 0)
    g = loader.geometry
    tokens = sum(s.num_tokens for s in loader.sources)
    windows = max(0, (tokens - 1) // g.seq_length)
    micro = windows // g.micro_batch_size
    return min(micro, max_batches) if max_batches else micro


def replicas_config(cfg: SodaConfig, dp: int) -> SodaConfig:
    """``cfg`` whose global batch is one micro-batch per data-parallel replica: the loader's
    windows are then dealt round-robin in both the single-pass (valid) and the training order."""
    return replace(cfg, training=replace(cfg.training,
                                         global_batch_size=cfg.training.micro_batch_size * dp))


def evaluate_nll(chunks: Sequence[torch.nn.Module], cfg: SodaConfig, split: str = "valid",
                 max_batches: int | None = None, progress: bool = True, *,
                 data: OpenedSplit | None = None, run: ResolvedRun | None = None) -> NLLResult:
    """NLL per bucket of ``chunks`` (this rank's model chunks, weights loaded) on ``cfg.data``.

    Needs the parallel state of ``cfg.parallel`` (:func:`soda_mega.parallel.state.initialize`);
    every rank returns the same reduced result. ``max_batches`` counts micro-batches over all
    data-parallel replicas; ``split="train"`` needs it (the training order never ends).
    ``data``: the split opened once by the caller (else opened here); ``run``: the resolved
    run of :func:`replicas_config`'s config (its global batch is one micro-batch per replica).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "train" and not max_batches:
        raise ValueError("the train split is read in the training loader's endless shuffled order: "
                         "give --max-batches")
    lay = state.current_layout()
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    cfg = replicas_config(cfg, lay.dp)
    if run is not None and run.batch.global_batch_size != cfg.training.global_batch_size:
        raise ValueError(f"the resolved run's global batch is {run.batch.global_batch_size}, "
                         f"evaluation takes one micro-batch per replica ({mbs} x {lay.dp})")
    loader = SodaDataLoader(cfg, split, num_workers=0, data=data, run=run)
    vocab = loader.layout
    planned = planned_micro_batches(loader, split, max_batches)
    if planned == 0:
        tokens = sum(s.num_tokens for s in loader.sources)
        raise DatasetError(
            f"the {split} split of {', '.join(s.name for s in loader.sources)} holds {tokens} tokens: "
            f"not one micro-batch of {mbs} windows of {seq + 1} tokens; lower --micro-batch-size or "
            "--seq-length")
    limit = _per_rank_limit(max_batches, lay.dp_rank, lay.dp)
    reporter = lay.is_last_stage and lay.tp_rank == 0
    names = bucket_names(vocab.num_codebooks)
    stats = torch.zeros(2, len(names), dtype=torch.float64)
    windows = 0
    step = partial(lm_forward_step, loss_for=partial(_loss_for, vocab))
    per_call = MICRO_BATCHES_PER_CALL * lay.pp
    meter = _Progress(planned, mbs * seq, enabled=progress and dist.get_rank() == 0)

    def flush(batches: list) -> None:
        nonlocal stats, windows
        if not batches:
            return
        real = len(batches)
        if lay.vp and real % lay.pp:
            # The interleaved schedule runs micro-batches in groups of PP: fill the last group
            # with copies whose loss mask is 0 (they count nothing).
            fill = batches[-1] if batches[-1] is None else {
                **batches[-1], "loss_mask": torch.zeros_like(batches[-1]["loss_mask"])}
            batches = batches + [fill] * (lay.pp - real % lay.pp)
        for report in run_schedule(chunks, batches, step, seq, mbs, forward_only=True):
            stats += report[REPORT_KEY].detach().double().cpu()
        windows += real * mbs
        meter.advance(real * lay.dp)

    with evaluation_mode(chunks):
        pending: list = []
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            pending.append(batch)
            if len(pending) == per_call:
                flush(pending)
                pending = []
        flush(pending)
    meter.advance(0, final=True)
    sums, counts, windows = _reduce(stats, windows, reporter)
    datasets = [{"path": s.name, "split_dir": str(s.split_dir), "kind": s.kind,
                 "documents": len(s), "tokens": s.num_tokens} for s in loader.sources]
    return NLLResult(names, sums, counts, windows, datasets,
                     {"tp": lay.tp, "pp": lay.pp, "vp": lay.vp, "dp": lay.dp})


def _reduce(stats: torch.Tensor, windows: int, reporter: bool) -> tuple[list[float], list[int], int]:
    """Sum the reporting ranks' stats (one per DP replica; the others hold zeros or copies)."""
    vec = torch.cat([stats.reshape(-1), torch.tensor([float(windows)], dtype=torch.float64)])
    if not reporter:
        vec = torch.zeros_like(vec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vec = vec.to(device)
    dist.all_reduce(vec)
    vec = vec.cpu()
    n = stats.shape[1]
    return vec[:n].tolist(), [int(round(c)) for c in vec[n:2 * n].tolist()], int(vec[-1])


# ----------------------------------------------------------------------------- report
def build_report(result: NLLResult, cfg: SodaConfig, checkpoint: dict, split: str,
                 max_batches: int | None, vocab: VocabLayout | None = None) -> dict:
    """The JSON report: per-bucket metrics plus what was evaluated and how (``vocab``: the
    layout of ``cfg.vocab`` when the caller has it)."""
    vocab = vocab or VocabLayout.from_config(cfg.vocab)
    buckets = {"overall": bucket_metrics(*result.overall())}
    for name in result.names:
        buckets[name] = bucket_metrics(*result.bucket(name))
    return {
        "task": "nll",
        "checkpoint": checkpoint,
        "data": {
            "split": split,
            "datasets": result.datasets,
            "vocab_fingerprint": vocab.fingerprint(),
            "vocab_layout": vocab.to_dict(),
        },
        "settings": {
            "seq_length": cfg.model.seq_length,
            "micro_batch_size": cfg.training.micro_batch_size,
            "max_batches": max_batches,
            "reset_at_document": cfg.data.reset_at_document,
            "precision": cfg.training.precision,
            "kernels_loss": cfg.kernels.loss,
            "layout": result.layout,
        },
        "windows": result.windows,
        "units": "nats per predicted token (z-loss excluded; tokens with loss mask 0 not counted); "
                 "bits_per_token = nll / ln 2; perplexity = exp(nll)",
        "note": TEXT_NOTE,
        "buckets": buckets,
    }


def format_report(report: dict) -> str:
    """A readable table of the report (what ``soda-mega eval nll`` prints)."""
    ck, data, st = report["checkpoint"], report["data"], report["settings"]
    lay = st["layout"]
    lines = [
        f"checkpoint  {ck['path']} (step {ck['step']})",
        f"data        {', '.join(d['path'] for d in data['datasets'])} ({data['split']} split, "
        f"vocabulary layout {data['vocab_fingerprint']})",
        f"windows     {report['windows']} x {st['seq_length']} tokens (micro-batch "
        f"{st['micro_batch_size']}, {st['precision']}, TP{lay['tp']} PP{lay['pp']}"
        + (f" VP{lay['vp']}" if lay["vp"] else "") + f" DP{lay['dp']})",
        "",
        f"{'bucket':<24}{'tokens':>12}{'NLL (nats)':>13}{'perplexity':>14}{'bits/token':>12}",
    ]
    k = data["vocab_layout"]["num_codebooks"]
    for name, m in report["buckets"].items():
        label = name
        if name.startswith("codebook_"):
            idx = int(name.split("_")[1])
            label = f"  codebook {idx} ({'semantic' if idx == 0 else 'acoustic'})"
        if m["tokens"] == 0:
            lines.append(f"{label:<24}{0:>12}{'-':>13}{'-':>14}{'-':>12}")
            continue
        lines.append(f"{label:<24}{m['tokens']:>12,}{m['nll']:>13.4f}{m['perplexity']:>14.4g}"
                     f"{m['bits_per_token']:>12.4f}")
    lines += ["", f"NLL in {report['units']}.", f"Note: {report['note']}; "
              f"semantic = codebook 0, acoustic = codebooks 1..{k - 1}."]
    return "\n".join(lines)
