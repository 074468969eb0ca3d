"""``soda-mega eval nll CKPT --data DIR ...``: held-out NLL per token, per modality and codebook.

Runs in one process or under torchrun in any TP / PP / VP / DP layout (``--parallel.*``
overrides), whatever layout the checkpoint was saved in: ``dist_checkpointing`` reshards the
weights on load. The model comes from the checkpoint; the windows from ``--data``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from soda_mega.commands.argtypes import positive_int
from soda_mega.config.fields import ConfigError
from soda_mega.utils.terminal import printable

PREFIX = "soda-mega eval nll"

DESCRIPTION = """\
Held-out negative log-likelihood per token of a checkpoint: overall, per modality (text,
semantic, acoustic) and per Mimi codebook. Runs in one process or under torchrun in any
TP/PP/VP/DP layout, whatever layout the checkpoint was saved in (weights reshard on load).
"""

EPILOG = """\
output: a table of tokens, NLL (nats per predicted token), perplexity and bits per token for
overall, text, semantic (codebook 0), acoustic (codebooks 1..K-1) and every codebook. The text
bucket counts the special ids (<|text_start|> ...) with text, as the training loss groups do.
The z-loss term is excluded and tokens with loss mask 0 are not counted.

windows: --split valid reads the split once in file order (the whole split unless
--max-batches; several datasets are interleaved by the validation mixture), packed into
windows of --seq-length + 1 tokens with stride --seq-length, so every token is predicted once
(a trailing partial micro-batch is left out). --split train evaluates the first --max-batches
micro-batches of the training loader's seeded shuffle. Every parallel layout evaluates the
same windows.

config overrides: --parallel.tensor_parallel=2, --parallel.pipeline_parallel=2,
--parallel.virtual_pipeline=2, --kernels.loss=torch, --training.precision=fp32,
--data.reset_at_document=true ... (see `soda-mega config --fields`); the model and vocabulary
sections come from the checkpoint. Several processes:
  torchrun --nproc-per-node 2 -m soda_mega.cli eval nll CKPT --data DIR --parallel.tensor_parallel=2
"""


def register(tasks) -> argparse.ArgumentParser:
    p = tasks.add_parser(
        "nll", help="held-out NLL per token: overall, per modality and per codebook",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a step_N folder, a checkpoints/ folder or a run folder (any TP/PP layout)")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="dataset roots built by `soda-mega data build` / `data demo` (each with "
                        "train/ and valid/); several are mixed as in validation")
    p.add_argument("--split", default="valid", choices=("valid", "train"),
                   help="which split of each dataset (default: valid)")
    p.add_argument("--max-batches", type=positive_int, metavar="N",
                   help="evaluate the first N micro-batches over all data-parallel replicas "
                        "(default: the whole split; required with --split train)")
    p.add_argument("--micro-batch-size", type=positive_int, metavar="N",
                   help="windows per micro-batch (default: the checkpoint's training.micro_batch_size)")
    p.add_argument("--seq-length", type=positive_int, metavar="N",
                   help="predicted tokens per window (default: the checkpoint's model.seq_length)")
    p.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE (atomically)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def eval_config(ckpt_cfg, args):
    """The checkpoint's configuration with the data, window and layout of this evaluation."""
    from soda_mega.config.loader import apply_mapping, parse_overrides

    overrides = parse_overrides(args.overrides)
    for section in ("model", "vocab"):
        if section in overrides:
            key = next(iter(overrides[section]))
            hint = " (use --seq-length)" if (section, key) == ("model", "seq_length") else ""
            raise ConfigError(f"{section}.{key}: the model and its vocabulary come from the "
                              f"checkpoint and cannot be overridden{hint}")
    data_keys = {"train", "valid", "weights"} & set(overrides.get("data", {}))
    if data_keys:
        raise ConfigError(f"data.{sorted(data_keys)[0]}: give the datasets with --data")
    cfg = ckpt_cfg
    apply_mapping(cfg, overrides, "command line")
    cfg.data.train = [str(d) for d in args.data]
    cfg.data.valid, cfg.data.weights = [], []
    if args.micro_batch_size:
        cfg.training.micro_batch_size = args.micro_batch_size
    # Evaluation has no optimizer step: one global batch is one micro-batch per DP replica
    # (evaluate_nll sets the replica count once the layout exists).
    cfg.training.global_batch_size = cfg.training.micro_batch_size
    if args.seq_length:
        cfg.model.seq_length = args.seq_length
    return cfg.validate()


def _preflight(cfg, split: str, layout):
    """The split, opened once and before any process group or model is built, so missing
    folders, splits or a dataset of another vocabulary layout fail first; the evaluation reads
    this same opened split."""
    from soda_mega.data.read.source import DatasetError, EmptySplitError
    from soda_mega.data.read.split import open_split

    for root in cfg.data.train:
        if not Path(root).is_dir():
            raise DatasetError(f"--data {root}: no such folder")
    # NOTE: a small build's valid split can hold no documents (training leaves such a dataset
    # out of validation); here too it is left out and the others are evaluated. An absent
    # split still fails: that is a wrong folder more often than a small build.
    try:
        data = open_split(cfg, split, layout, skip_empty=True)
    except EmptySplitError as err:
        hint = (" (evaluate --split train --max-batches N, or build with a larger "
                "--data.valid_fraction)" if split == "valid" else "")
        raise DatasetError(f"nothing to evaluate: {err}{hint}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        for why in data.left_out:
            print(f"{PREFIX}: leaves out a dataset: {printable(why)}", file=sys.stderr)
    return data


def run(args) -> int:
    from soda_mega.checkpoint.errors import CheckpointError
    from soda_mega.checkpoint.layout import checkpoint_config, checkpoint_state, resolve_checkpoint
    from soda_mega.data.read.source import DatasetError
    from soda_mega.tokens.layout import VocabLayout

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        step_dir = resolve_checkpoint(args.checkpoint)
        saved = checkpoint_state(step_dir)
        cfg = eval_config(checkpoint_config(step_dir), args)
        # The checkpoint's vocabulary layout, derived once for the data checks, model and report.
        vocab = VocabLayout.from_config(cfg.vocab)
        data = _preflight(cfg, args.split, vocab)
        if args.split == "train" and not args.max_batches:
            raise DatasetError("--split train reads the training loader's endless shuffled order: "
                               "give --max-batches N")
    except (CheckpointError, DatasetError) as err:
        if rank0:
            print(f"{PREFIX}: {printable(err)}", file=sys.stderr)
        return 2
    checkpoint = {"path": str(step_dir), "step": saved.get("step"),
                  "weights_only": bool(saved.get("weights_only", False))}
    report = evaluate(cfg, step_dir, checkpoint, args.split, args.max_batches,
                      progress=not args.quiet and rank0, data=data)
    if report is None:
        return 2
    if rank0:
        emit(report, args.out, args.json)
    return 0


def evaluate(cfg, step_dir: Path, checkpoint: dict, split: str, max_batches: int | None,
             progress: bool, data=None) -> dict | None:
    """Build the layout and model, load the checkpoint, evaluate; None after a data error.
    ``data``: the split opened by the pre-flight (its layout is the checkpoint's vocabulary).

    A process group that exists already (a caller evaluating several layouts in the same
    processes) is kept; one created here is destroyed again.
    """
    import torch.distributed as dist

    from soda_mega.checkpoint.load import load_checkpoint
    from soda_mega.data.read.source import DatasetError
    from soda_mega.eval.nll import build_report, evaluate_nll, replicas_config
    from soda_mega.model.gpt import build_model
    from soda_mega.parallel import state
    from soda_mega.run.resolved import resolve_run

    owned = not dist.is_initialized()
    try:
        state.initialize(cfg.parallel, cfg.training.seed)
        rank0 = dist.get_rank() == 0
        if progress:
            print(f"[{PREFIX}] loading {step_dir}", file=sys.stderr, flush=True)
        # Evaluation has no optimizer step: one global batch is one micro-batch per replica.
        world = dist.get_world_size()
        resolved = resolve_run(replicas_config(cfg, state.current_layout().dp), world,
                               data.layout if data is not None else None)
        chunks = build_model(cfg, resolved=resolved)
        load_checkpoint(step_dir, chunks, optimizer=None, restore_rng=False)
        try:
            result = evaluate_nll(chunks, cfg, split, max_batches, progress=progress, data=data,
                                  run=resolved)
        except DatasetError as err:
            if rank0:
                print(f"{PREFIX}: {printable(err)}", file=sys.stderr)
            return None
        return build_report(result, cfg, checkpoint, split, max_batches, resolved.vocab)
    finally:
        state.shutdown(keep_process_group=not owned)


def emit(report: dict, out: str | None, as_json: bool) -> None:
    from soda_mega.eval.nll import format_report
    from soda_mega.utils.provenance import write_json

    if out:
        path = write_json(out, report)
        print(f"[{PREFIX}] wrote {path}", file=sys.stderr)
    print(json.dumps(report, indent=1) if as_json else format_report(report))
