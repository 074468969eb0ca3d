"""The pretraining loop: Megatron-core model, schedules, DDP and optimizer; data; checkpoints.

One optimizer step = one global batch of ``training.global_batch_size`` sequences, split into
micro-batches of ``training.micro_batch_size`` per data-parallel replica (gradient
accumulation), run through Megatron-core's ``forward_backward_func`` (no pipelining, 1F1B or
interleaved, chosen from the parallel layout). Before each update the global loss and
gradient norm are checked: a non-finite step is skipped and reported, and ``run.max_bad_steps``
of them in a row stop the run with an error.

Everything a resume needs is in the checkpoint (weights, optimizer, loader position, step),
and weights, data order and schedule are functions of (seed, step) only, so a run killed at
any moment and restarted from its newest checkpoint continues the same loss trace, also on
another TP / PP / DP layout.

Fine-tuning (``training.init_from``) starts a new run from another run's weights: only the
model weights are taken (any layout, also weights-only checkpoints); optimizer moments, step,
schedule and data position start fresh. Once the fine-tune has saved a checkpoint of its own,
a restart resumes from that, never from the initial weights again. ``training.epochs`` sizes a
run by passes over its datasets instead of a token budget.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist

from soda_mega.checkpoint.async_save import AsyncSaver, SaveReport
from soda_mega.checkpoint.errors import CheckpointError
from soda_mega.checkpoint.layout import (
    STATE_FILE,
    checkpoint_config,
    checkpoint_state,
    read_state,
    resolve_checkpoint,
    step_dir,
)
from soda_mega.checkpoint.load import load_checkpoint
from soda_mega.checkpoint.resume import check_resumable, find_resume_checkpoint, has_checkpoints, start_over
from soda_mega.checkpoint.save import save_checkpoint
from soda_mega.checkpoint.weights import check_same_model
from soda_mega.config.loader import dump_config
from soda_mega.config.schema import SodaConfig
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.source import MissingSplitError
from soda_mega.data.read.split import OpenedSplit, open_split
from soda_mega.model.accounting import flops_per_token
from soda_mega.model.gpt import build_model
from soda_mega.parallel import state
from soda_mega.run.resolved import ResolvedRun, resolve_run
from soda_mega.tokens.layout import LOSS_GROUPS
from soda_mega.training import faults
from soda_mega.training.forward_backward import StepResult, evaluation_mode, forward_backward, wrap_ddp
from soda_mega.training.metrics import MetricsSink, memory_gib, peak_tflops
from soda_mega.training.optimizer import build_optimizer, inner_optimizers, set_hyperparameters
from soda_mega.training.preemption import PreemptionFlag, TrainingPreempted
from soda_mega.training.run_lock import hold_run_folder
from soda_mega.training.schedule import LRSchedule, soda_peak_lr
from soda_mega.training.watchdog import StepWatchdog
from soda_mega.utils.telemetry import GpuTelemetry
from soda_mega.utils.terminal import printable


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def dataset_tokens(cfg: SodaConfig) -> int:
    """Tokens of one pass over the train splits of ``data.train`` (document lengths only;
    with ``data.packing=whole`` the padded windows, see :meth:`SodaDataLoader.epoch_tokens`)."""
    loader = SodaDataLoader(cfg, "train", dp_rank=0, dp_size=1, needs_data=False, num_workers=0)
    return loader.epoch_tokens()


def total_steps(cfg: SodaConfig, train_tokens: int | None = None) -> int:
    """Optimizer steps of the run (at least one): ``training.train_tokens`` worth, or with
    ``training.epochs`` that many passes over the datasets' ``train_tokens`` (read from
    ``data.train`` when not given)."""
    per_step = cfg.training.global_batch_size * cfg.model.seq_length
    epochs = cfg.training.epochs
    if epochs is None:
        return max(1, math.ceil(cfg.training.train_tokens / per_step))
    if train_tokens is None:
        train_tokens = dataset_tokens(cfg)
    # NOTE: exact rational arithmetic: 5 epochs of exactly 10 steps' worth is 50 steps, not 51.
    return max(1, math.ceil(Fraction(str(epochs)) * train_tokens / per_step))


def initial_checkpoint(path: str, cfg: SodaConfig) -> Path:
    """The ``step_N`` folder ``training.init_from`` stands for, once it is known to hold this
    run's model: refuses another model or vocabulary, naming the fields. The context length
    (``model.seq_length``: RoPE has no weights) and ``model.init_std`` may differ: SODA
    fine-tunes at 2048 tokens a model pretrained at 4096."""
    step_dir = resolve_checkpoint(path)
    source = checkpoint_config(step_dir)
    expected = dataclasses.replace(source, model=dataclasses.replace(
        source.model, seq_length=cfg.model.seq_length, init_std=cfg.model.init_std))
    try:
        check_same_model(cfg, expected, f"training.init_from={path}")
    except CheckpointError as err:
        raise CheckpointError(f"{err} (this run's value != the checkpoint's); start from a checkpoint "
                              f"of this model, or set the model and vocab sections to the "
                              f"checkpoint's ({step_dir / STATE_FILE})") from None
    return step_dir


def load_initial_weights(path: str, cfg: SodaConfig, model, optimizer) -> str:
    """Weights of checkpoint ``path`` (see :func:`initial_checkpoint`) into ``model`` (this
    run's TP / PP layout), then into the optimizer's fp32 main weights; returns a line saying
    where they came from.

    NOTE: a mixed-precision optimizer keeps fp32 main copies of bf16 weights (the distributed
    optimizer: fp32 shards of every weight); loading the model alone would leave them at the
    random init, and the first update would copy them back over the loaded weights.
    ``reload_model_params`` copies the loaded weights into them (for bf16 weights they are
    the bf16 values, as Megatron-LM's ``--finetune`` does; with fp32 weights they are exact).
    """
    step_dir = initial_checkpoint(path, cfg)
    load_checkpoint(step_dir, model, optimizer=None, restore_rng=False)
    optimizer.reload_model_params()
    saved = checkpoint_state(step_dir)
    if saved.get("weights_only"):
        origin = "weights-only checkpoint"
        provenance = saved.get("provenance") or {}
        if provenance:
            # NOTE: the checkpoint's own record (it may come from elsewhere): shown escaped.
            origin += " (" + ", ".join(f"{printable(k, 80)} {printable(v, 300)}"
                                       for k, v in sorted(provenance.items())) + ")"
    else:
        origin = f"step {saved['step']} ({saved['tokens']:,} tokens) of a {cfg.model.name} run"
    return (f"initialised the weights from {step_dir}: {origin}; optimizer, step, schedule and "
            f"data start fresh")


def peak_learning_rate(cfg: SodaConfig) -> float:
    return cfg.training.lr or soda_peak_lr(cfg.training.global_batch_size, cfg.model.hidden_size)


def _stats_vector(result: StepResult) -> torch.Tensor:
    values = [result.loss_sum, float(result.num_tokens)]
    for name in LOSS_GROUPS:
        loss, count = result.groups.get(name, (0.0, 0))
        values += [loss, float(count)]
    return torch.tensor(values, dtype=torch.float64)


def _stats_dict(vec: torch.Tensor, prefix: str = "") -> dict:
    out = {f"{prefix}loss": float(vec[0] / vec[1]) if vec[1] > 0 else float("nan"),
           f"{prefix}tokens": int(vec[1])}
    for i, name in enumerate(LOSS_GROUPS):
        loss, count = float(vec[2 + 2 * i]), float(vec[3 + 2 * i])
        if count > 0:
            out[f"{prefix}loss_{name}"] = loss / count
    return out


class Trainer:
    """Builds everything for a run and drives it; ``run()`` trains to the end (or max_steps).

    The set-up walks down once: the run's resolved pieces (``resolved``: vocabulary layout,
    padded vocabulary, batch geometry; computed by the command, else here from the world size)
    go to the model and the loaders; each split is opened once (:func:`open_split`) and handed
    to its loader, the valid split to a fresh loader at every validation."""

    def __init__(self, cfg: SodaConfig, resolved: ResolvedRun | None = None) -> None:
        self.cfg = cfg
        self.layout = state.initialize(cfg.parallel, cfg.training.seed)
        faults.inject(0, dist.get_rank())  # step 0: set-up
        self.resolved = resolved or resolve_run(cfg, dist.get_world_size())
        if (self.resolved.dp, self.resolved.tensor_parallel) != (self.layout.dp, self.layout.tp):
            raise ValueError(f"the run was resolved for DP {self.resolved.dp} x TP "
                             f"{self.resolved.tensor_parallel}, the process groups are DP "
                             f"{self.layout.dp} x TP {self.layout.tp}")
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # One run per run folder, taken before anything in it is read, moved or written.
        self.run_lock = hold_run_folder(self.run_dir)
        # The watchdog times the whole set-up (the data is opened here; a stuck read hangs too).
        self.watchdog = StepWatchdog(cfg.run.step_timeout_s, self.run_dir, dist.get_rank())
        self.watchdog.arm(0, phase="setup")
        try:
            self._set_up()
        except BaseException:
            self.release()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        start_over(self.run_dir, self.ckpt_dir, cfg.run.resume, cfg.run.overwrite)
        if cfg.training.init_from and not (cfg.run.resume and has_checkpoints(self.ckpt_dir)):
            initial_checkpoint(cfg.training.init_from, cfg)  # a wrong model fails before any work
        self.model = wrap_ddp(build_model(cfg, resolved=self.resolved), cfg)
        vocab = self.resolved.vocab
        self.loader = SodaDataLoader(cfg, "train", data=open_split(cfg, "train", vocab),
                                     run=self.resolved)
        data_tokens = self.loader.epoch_tokens()  # with data.packing=whole: padded windows
        self.steps_total = total_steps(cfg, data_tokens)
        if cfg.training.epochs is not None and dist.get_rank() == 0:
            print(f"soda-mega: {cfg.training.epochs:g} epochs of {data_tokens:,} tokens = "
                  f"{self.steps_total} steps of {cfg.training.global_batch_size} x "
                  f"{cfg.model.seq_length} tokens", flush=True)
        self.peak_lr = peak_learning_rate(cfg)
        self.schedule = LRSchedule.from_config(cfg.training, self.steps_total, self.peak_lr)
        self.optimizer = build_optimizer(self.model, cfg, self.peak_lr)
        self.has_valid = True
        self.valid_data: OpenedSplit | None = None
        if cfg.run.eval_interval:
            try:
                # NOTE: a dataset without valid documents (no valid/, or an empty one: a small
                # build) is left out of validation, said here once; any other data error (e.g. a
                # vocabulary) stops the run.
                self.valid_data = open_split(cfg, "valid", vocab, skip_missing=True)
            except MissingSplitError as err:
                self.has_valid = False
                if dist.get_rank() == 0:
                    print(f"soda-mega: validation is off: {err}", flush=True)
            else:
                if dist.get_rank() == 0:
                    for why in self.valid_data.left_out:
                        print(f"soda-mega: validation leaves out a dataset: {why}", flush=True)
                self._valid_loader()  # a plan that cannot be made fails at set-up, not at step N
        self.micro_per_step = self.resolved.grad_accum
        self.flops_per_token = flops_per_token(cfg.model, vocab.size).training
        self.peak_tflops = peak_tflops(cfg.run.peak_tflops)
        self.step = 0
        self.tokens = 0
        self.bad_steps = 0
        rank = dist.get_rank()
        # The last pipeline stage's first TP rank of DP replica 0 holds the loss: it logs.
        self.is_logger = (self.layout.is_last_stage and self.layout.tp_rank == 0
                          and self.layout.dp_rank == 0)
        self.is_reporter = self.layout.is_last_stage and self.layout.tp_rank == 0
        self.saver = (AsyncSaver(self.ckpt_dir, cfg.run.keep_checkpoints) if cfg.run.async_save
                      else None)
        self.sink = MetricsSink(self.run_dir, self.is_logger, cfg.run.tensorboard, self.steps_total)
        # NVML samples of the logging rank's GPU, added to the records every log interval; a
        # one-line notice and no keys where there is no NVIDIA driver. Started by run().
        self.telemetry = GpuTelemetry(interval_s=1.0) if self.is_logger else None
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))

    # ------------------------------------------------------------------ helpers
    def _valid_loader(self) -> SodaDataLoader:
        """A fresh loader (first window on) over the valid split opened at set-up."""
        if self.valid_data is None:
            self.valid_data = open_split(self.cfg, "valid", self.resolved.vocab, skip_missing=True)
        return SodaDataLoader(self.cfg, "valid", num_workers=0, data=self.valid_data,
                              run=self.resolved)

    def _global_stats(self, result: StepResult) -> torch.Tensor:
        """Loss sums/counts of the whole global batch, known on every rank."""
        vec = _stats_vector(result) if self.is_reporter else torch.zeros(8, dtype=torch.float64)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        vec = vec.to(device)
        dist.all_reduce(vec)
        return vec.cpu()

    def _guarded_update(self, loss_finite: bool) -> tuple[bool, float]:
        """Clip and apply the update unless the loss or the gradient norm is non-finite."""
        from megatron.core.optimizer import optimizer as moptimizer

        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if found_inf or not loss_finite or not math.isfinite(grad_norm):
            return False, grad_norm
        clip = self.cfg.training.clip_grad
        if clip > 0:
            for opt in inner_optimizers(self.optimizer):
                params = opt.get_parameters()
                if params:
                    # Looked up at call time: the CPU shims wrap this function.
                    moptimizer.clip_grad_by_total_norm_fp32(params, max_norm=clip,
                                                            total_norm=grad_norm)
        return bool(self.optimizer.step_with_ready_grads()), grad_norm

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "bad_steps": self.bad_steps,
            "loader": self.loader.state_dict(),
            "schedule": {"peak_lr": self.peak_lr, "total_steps": self.steps_total},
            "layout": dataclasses.asdict(self.layout),
            "config": self.cfg.to_dict(),
        }

    def save(self, wait: bool = False) -> Path:
        """Checkpoint this step: in the background with ``run.async_save`` (``wait``: until it
        is published), else now. Returns the ``step_N`` folder it is (or will be) published as."""
        writer_init = functools.partial(faults.writer_fault, self.step, dist.get_rank())
        if self.saver is None:
            started = time.perf_counter()
            path = save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                   self.trainer_state(), keep_last=self.cfg.run.keep_checkpoints,
                                   writer_init=writer_init)
            self._saved(SaveReport.of(self.step, path, started))
            return path
        self.finish_save(before=self.step)
        self.saver.start(self.step, self.model, self.optimizer, self.trainer_state(),
                         writer_init=writer_init)
        self._say(f"saving step {self.step} in the background")
        if wait:
            self.finish_save()
        return step_dir(self.ckpt_dir, self.step)

    def finish_save(self, before: int | None = None) -> None:
        """Wait for the save in flight (if any) and publish it; ``before``: the step whose save
        had to wait for it (logged with the time waited)."""
        if self.saver is None or self.saver.in_flight is None:
            return
        started = time.perf_counter()
        report = self.saver.wait()
        if before is not None:
            self._say(f"the save of step {before} waited {time.perf_counter() - started:.2f} s "
                      f"for the write of step {report.step} to finish (at most one in flight)")
        self._saved(report)

    def _saved(self, report: SaveReport | None) -> None:
        if report is not None:
            self._say(report.line())

    def _say(self, line: str) -> None:
        if self.is_logger:
            print(f"soda-mega: {line}", flush=True)

    def maybe_resume(self) -> bool:
        path = find_resume_checkpoint(self.ckpt_dir) if self.cfg.run.resume else None
        if path is None:
            return False
        saved = read_state(path)
        check_resumable(saved["config"], self.cfg.to_dict(), path)
        faults.inject("load", dist.get_rank())
        trainer_state = load_checkpoint(path, self.model, self.optimizer, verified=True)
        self.step = trainer_state["step"]
        self.tokens = trainer_state["tokens"]
        self.bad_steps = trainer_state["bad_steps"]
        self.loader.load_state_dict(trainer_state["loader"])
        if self.is_logger:
            unused = (f" (training.init_from={self.cfg.training.init_from} is not used: the run "
                      f"continues from its own checkpoint)" if self.cfg.training.init_from else "")
            print(f"soda-mega: resumed from {path} at step {self.step}{unused}", flush=True)
        return True

    def maybe_init_from(self) -> bool:
        """Start from ``training.init_from``'s weights (a fresh run only: see :meth:`run`)."""
        path = self.cfg.training.init_from
        if not path:
            return False
        line = load_initial_weights(path, self.cfg, self.model, self.optimizer)
        if self.is_logger:
            print(f"soda-mega: {line}", flush=True)
        return True

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: list) -> dict:
        lr = self.schedule.lr_at(self.step)
        set_hyperparameters(self.optimizer, lr, self.cfg.training.weight_decay)
        start = time.perf_counter()
        batch = self.resolved.batch
        result = forward_backward(self.model, batches, self.micro_per_step, batch.seq_length,
                                  batch.micro_batch_size)
        stats = self._global_stats(result)
        loss_finite = bool(torch.isfinite(stats).all())
        updated, grad_norm = self._guarded_update(loss_finite)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        step_tokens = batch.tokens_per_step
        self.step += 1
        self.tokens += step_tokens
        tokens_per_s = step_tokens / seconds
        tflops = self.flops_per_token * tokens_per_s / dist.get_world_size() / 1e12
        record = {"kind": "train", "step": self.step, **_stats_dict(stats), "grad_norm": grad_norm,
                  "lr": lr, "skipped": not updated, "consumed_tokens": self.tokens,
                  "step_seconds": seconds, "tokens_per_s": tokens_per_s,
                  "tflops_per_gpu": tflops, **memory_gib()}
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        return record

    def validate(self) -> dict:
        """Held-out NLL per token, overall and per loss group (z-loss excluded)."""
        loader = self._valid_loader()
        # run.eval_batches counts micro-batches over all replicas, dealt round-robin, so every
        # layout evaluates the same windows.
        limit = max(1, self.cfg.run.eval_batches // self.layout.dp) if self.cfg.run.eval_batches else None
        totals = StepResult(0.0, 0, {})
        with evaluation_mode(self.model):
            batches = []
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                batches.append(batch)
            # NOTE: every rank must run the same number of micro-batches: use the shortest.
            count = torch.tensor([len(batches)], dtype=torch.long)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            batches = batches[:int(count)]
            if batches:
                totals = forward_backward(self.model, batches, len(batches),
                                          self.cfg.model.seq_length,
                                          self.cfg.training.micro_batch_size, forward_only=True)
        stats = self._global_stats(totals)
        return {"kind": "valid", "step": self.step, **_stats_dict(stats, prefix="valid_")}

    # ------------------------------------------------------------------ loop
    def run(self, preemption: PreemptionFlag | None = None) -> list[dict]:
        """Train until the token budget (or ``run.max_steps``) is spent; returns the records.

        SIGUSR1 / SIGTERM stop it after the current step with a checkpoint
        (:class:`TrainingPreempted`); an iteration longer than ``run.step_timeout_s`` ends the
        process (:mod:`.watchdog`). ``preemption``: a flag installed before this trainer was
        built (it also records signals of the set-up); by default one is installed here."""
        own = preemption is None
        preemption = PreemptionFlag().install() if own else preemption
        try:
            return self._train(preemption, self.watchdog)
        finally:
            self.release()
            if own:
                preemption.restore()

    def release(self) -> None:
        """Stop the watchdog and give the run folder back (the end of the run, or of a set-up
        that failed)."""
        self.watchdog.stop()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _train(self, preemption: PreemptionFlag, watchdog: StepWatchdog) -> list[dict]:
        cfg = self.cfg.run
        watchdog.arm(self.step, phase="setup")  # a load from a stuck file system hangs too
        if not self.maybe_resume():
            self.maybe_init_from()
        self.sink.start(self.step)  # metrics.jsonl cut back to the step this run starts from
        end = min(self.steps_total, cfg.max_steps or self.steps_total)
        signal_name = preemption.agreed() if self.step < end else None
        preemption.setup_done()
        if signal_name:
            self.sink.close()  # a signal during set-up or resume: the state is a checkpoint's
            raise TrainingPreempted(signal_name, self.step, None)
        records: list[dict] = []
        data = iter(self.loader)
        # After the loader's worker processes are forked: wandb must not be inherited by them.
        self.sink.open_wandb(cfg, self.cfg.to_dict(), resumed=self.step > 0)
        done_this_run = 0
        if self.telemetry is not None:
            self.telemetry.start()
        while self.step < end:
            watchdog.arm(self.step + 1)
            batches = [next(data) for _ in range(self.micro_per_step)]
            faults.inject(self.step + 1, dist.get_rank())
            record = self.train_step(batches)
            done_this_run += 1
            records.append(record)
            if record["skipped"]:
                self.bad_steps += 1
                self.sink.console(self.step, f"SKIPPED step: non-finite loss or gradient norm "
                                  f"(loss {record['loss']}, grad norm {record['grad_norm']}); "
                                  f"{self.bad_steps} in a row", done_this_run)
                if self.bad_steps >= cfg.max_bad_steps:
                    self.sink.write(record)
                    self.finish_save()  # the last good checkpoint may still be in flight
                    raise TrainingDiverged(
                        f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm "
                        f"(last at step {self.step}); lower training.lr, check the data, or resume "
                        f"from an earlier checkpoint in {self.ckpt_dir}")
            else:
                self.bad_steps = 0
            log_now = self.step % cfg.log_interval == 0 or self.step == end
            if log_now and self.telemetry is not None:
                record.update(self.telemetry.window())
            self.sink.write(record)
            if log_now:
                self.sink.console(self.step, _format(record), done_this_run)
            if self.has_valid and cfg.eval_interval and (
                    self.step % cfg.eval_interval == 0 or self.step == end):
                valid = self.validate()
                self.sink.write(valid)
                self.sink.console(self.step, _format(valid), done_this_run)
                records.append(valid)
            if self.saver is not None:
                self._saved(self.saver.poll())  # publishes a finished background save
            if (cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == end:
                self.save(wait=self.step == end)
            if self.step < end and (signal_name := preemption.agreed()):
                self._stop_on_signal(signal_name, saved=bool(
                    cfg.save_interval and self.step % cfg.save_interval == 0))
        if self.telemetry is not None:
            summary = self.telemetry.stop()
            if summary:
                self.sink.write({"kind": "telemetry", "step": self.step, **summary})
        self.sink.close()
        return records

    def _stop_on_signal(self, signal_name: str, saved: bool) -> None:
        """Every rank agreed to stop after this step: save it (unless just saved), then raise."""
        if saved:
            self.finish_save()
            path = step_dir(self.ckpt_dir, self.step)
        else:
            path = self.save(wait=True)
        if self.telemetry is not None:
            self.telemetry.stop()
        self.sink.close()
        raise TrainingPreempted(signal_name, self.step, path)


def _format(record: dict) -> str:
    keys = ("loss", "loss_text", "loss_semantic", "loss_acoustic", "valid_loss", "valid_loss_text",
            "valid_loss_semantic", "valid_loss_acoustic", "grad_norm", "lr", "tokens_per_s",
            "tflops_per_gpu", "mfu", "gpu_peak_alloc_gib", "host_rss_gib", "gpu_util", "gpu_power_w",
            "gpu_sm_clock_mhz")
    parts = []
    for key in keys:
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
