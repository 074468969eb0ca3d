"""Rank-aware, resumable, packed, weighted-mixture loader of SODA token windows.

A loader is the last step of the set-up's walk down: it takes a split opened once
(:class:`.split.OpenedSplit`: sources, weights, stream orders) and the run's resolved batch
geometry (:class:`soda_mega.run.resolved.ResolvedRun`), picks the plan and reads windows.
Given a bare config it opens the split itself (tools, tests).

Every rank computes the same global plan of windows from document lengths and keeps the
windows of its data-parallel replica: global batch ``g`` holds windows ``[g*B, (g+1)*B)``, and
DP rank ``r`` takes its contiguous ``B/dp`` of them, split into micro-batches. Split-packed
training uses the closed-form :class:`.steps.StepPlan` (a rank computes only its own steps;
the state is the step number); whole-document packing and validation the sequential
:class:`.mixture.MixturePlan`. So:

* DP replicas get disjoint windows; all TP ranks (and pipeline stages) of one replica compute
  identical batches without any communication; pipeline stages that need no tokens (the
  middle ones) plan but never read.
* The data order does not depend on the parallel layout or the number of loader workers, so a
  run resumed on another DP size or with other workers sees the same windows.
* ``state_dict()`` is the position at the last consumed global-batch boundary, in ``O(1)``
  (the step number; for whole-document packing the sequential plan's counters, advanced as
  steps are consumed), plus the identity of the datasets; loading it resumes the exact same
  sequence and refuses other datasets.

Worker processes (``torch.utils.data.DataLoader``) read every ``num_workers``-th micro-batch;
the DataLoader returns them round-robin, i.e. in order. Before a step's micro-batches are read,
the shards of the next step are prefetched into the node's cache (remote datasets).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from soda_mega.config.schema import SodaConfig
from soda_mega.data.read.mixture import PAD_STREAM, MixturePlan, Piece
from soda_mega.data.read.source import DatasetError, DocumentSource
from soda_mega.data.read.split import OpenedSplit, open_split
from soda_mega.data.read.steps import StepPlan
from soda_mega.errors import SodaUserError
from soda_mega.run.resolved import BatchGeometry, ResolvedRun
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils.lifetime import end_helpers_at_exit, helper_process_init

# BatchGeometry lives with the run's other resolved pieces; it is re-exported here for callers
# that build a loader's geometry by hand.
__all__ = ["BatchGeometry", "SodaDataLoader", "WindowAssembler"]


class WindowAssembler:
    """Turns planned windows into model inputs (tokens, labels, masks, modality, positions)."""

    def __init__(self, sources: Sequence[DocumentSource], layout: VocabLayout,
                 reset_at_document: bool) -> None:
        self.sources = sources
        self.layout = layout
        self.reset_at_document = reset_at_document

    def window(self, pieces: Sequence[Piece]) -> tuple[np.ndarray, ...]:
        tokens, masks, docs, pos = [], [], [], []
        for k, (s, d, a, b) in enumerate(pieces):
            if s == PAD_STREAM:  # whole-document packing: filler, never a label
                tokens.append(np.full(b - a, self.layout.eos_id, dtype=np.int32))
                masks.append(np.zeros(b - a, dtype=np.uint8))
            else:
                doc_tokens, doc_mask = self.sources[s].get(d)
                tokens.append(doc_tokens[a:b])
                masks.append(doc_mask[a:b])
            docs.append(np.full(b - a, k, dtype=np.int32))
            pos.append(np.arange(a, b, dtype=np.int64))
        return (np.concatenate(tokens), np.concatenate(masks), np.concatenate(docs),
                np.concatenate(pos))

    def prefetch(self, shards: Sequence[set[int]]) -> None:
        """Start fetching these shards (per source) into the node's cache, in the background."""
        for source, wanted in zip(self.sources, shards):
            if wanted:
                source.prefetch(sorted(wanted))

    def micro_batch(self, windows: Sequence[Sequence[Piece]]) -> dict[str, torch.Tensor]:
        parts = [self.window(w) for w in windows]
        tokens = torch.from_numpy(np.stack([p[0] for p in parts]).astype(np.int64))
        mask = torch.from_numpy(np.stack([p[1] for p in parts]))
        docs = torch.from_numpy(np.stack([p[2] for p in parts]))
        seq = tokens.shape[1] - 1
        labels = tokens[:, 1:].contiguous()
        batch = {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": labels,
            "loss_mask": mask[:, 1:].float().contiguous(),
            "modality": self.layout.modality(labels),
        }
        if self.reset_at_document:
            batch["position_ids"] = torch.from_numpy(np.stack([p[3][:-1] for p in parts]))
            d = docs[:, :-1]
            causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
            # Megatron convention: True = masked out. Attention stays inside each document.
            batch["attention_mask"] = ((d[:, :, None] != d[:, None, :]) | causal)[:, None]
        else:
            batch["position_ids"] = torch.arange(seq).expand(len(windows), seq).contiguous()
        return batch


class _WorkerFailure:
    """A user-facing data error raised in a DataLoader worker, sent to the trainer as an item.

    NOTE: torch re-raises a worker's exception as ``type(err)(text)`` where the text wraps the
    message in ~25 lines ("Caught DatasetError in DataLoader worker process 0", the worker's
    traceback); sent as data, the message arrives as it was raised: one line, exit 2."""

    def __init__(self, err: SodaUserError) -> None:
        self.kind = type(err)
        self.message = str(err)

    def error(self) -> SodaUserError:
        try:
            return self.kind(self.message)
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            return DatasetError(self.message)


class _MicroBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from ``start_micro`` on; worker k yields those with j % W == k."""

    def __init__(self, plan: MixturePlan | StepPlan, assembler: WindowAssembler,
                 geometry: BatchGeometry, start_micro: int, single_pass: bool, read: bool) -> None:
        super().__init__()
        self.plan = plan
        self.assembler = assembler
        self.geometry = geometry
        self.start_micro = start_micro
        self.single_pass = single_pass
        self.read = read

    def _windows(self, micro: int) -> Iterator[int]:
        g = self.geometry
        if self.single_pass:  # evaluation: micro-batches dealt round-robin over DP ranks
            first = (micro * g.dp_size + g.dp_rank) * g.micro_batch_size
        else:
            first = g.first_window(micro)
        return range(first, first + g.micro_batch_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self._batches(0, 1)
        return self._in_worker(info.id, info.num_workers)

    def _in_worker(self, worker: int, workers: int):
        try:
            yield from self._batches(worker, workers)
        except SodaUserError as err:
            yield _WorkerFailure(err)

    def _batches(self, worker: int, workers: int):
        if isinstance(self.plan, StepPlan):
            yield from self._steps(worker, workers)
            return
        plan = self.plan.clone()
        for micro in itertools.count(self.start_micro):
            wanted = self._windows(micro)
            if wanted.start < plan.state.window:
                raise RuntimeError(f"loader plan is past window {wanted.start} (at {plan.state.window})")
            plan.skip(wanted.start - plan.state.window)
            windows = [plan.next_window() for _ in wanted]
            if any(w is None for w in windows):
                return
            if micro % workers != worker:
                continue
            yield self.assembler.micro_batch(windows) if self.read else None

    def _steps(self, worker: int, workers: int):
        """Closed-form plan: micro-batch j of this rank is a fixed slice of step j // per_step."""
        g, plan = self.geometry, self.plan
        per_step = g.micro_batches_per_step
        per_replica = g.global_batch_size // g.dp_size
        prefetched = -1
        for micro in itertools.count(self.start_micro):
            if micro % workers != worker:
                continue
            step, m = divmod(micro, per_step)
            if not self.read:
                yield None
                continue
            if prefetched < step + 1:  # the next step's shards, while this one is read
                B = g.global_batch_size
                self.assembler.prefetch(plan.shards((step + 1) * B, (step + 2) * B))
                prefetched = step + 1
            first = step * g.global_batch_size + g.dp_rank * per_replica + m * g.micro_batch_size
            windows = [plan.window(k) for k in range(first, first + g.micro_batch_size)]
            yield self.assembler.micro_batch(windows)


class SodaDataLoader:
    """Iterates this rank's micro-batches forever (training) or once (``split='valid'``)."""

    PLAN_VERSION = 2  # the closed-form, shard-aware plan (states of version 1 cannot resume)

    def __init__(self, cfg: SodaConfig, split: str = "train", *, dp_rank: int | None = None,
                 dp_size: int | None = None, needs_data: bool | None = None,
                 num_workers: int | None = None, data: OpenedSplit | None = None,
                 run: ResolvedRun | None = None) -> None:
        """``data``: the split opened once by the caller (a trainer hands the same one to every
        validation loader); ``run``: the run's resolved vocabulary and batch geometry. Without
        them (tools, tests, evaluation) both are derived from ``cfg`` here."""
        if dp_rank is None or dp_size is None or needs_data is None:
            rank, size, needed = _parallel_coordinates()
            dp_rank = rank if dp_rank is None else dp_rank
            dp_size = size if dp_size is None else dp_size
            needs_data = needed if needs_data is None else needs_data
        if data is None:
            layout = run.vocab if run is not None else VocabLayout.from_config(cfg.vocab)
            data = open_split(cfg, split, layout)
        elif data.split != split:
            raise ValueError(f"a loader of the {split} split was handed the {data.split} split")
        if run is not None:
            if run.dp != dp_size:
                raise ValueError(f"the resolved run has data-parallel size {run.dp}, "
                                 f"this rank's parallel state {dp_size}")
            self.geometry = run.batch.for_rank(dp_rank)
        else:
            self.geometry = BatchGeometry(cfg.model.seq_length, cfg.training.micro_batch_size,
                                          cfg.training.global_batch_size, dp_rank, dp_size)
        self.data = data
        self.layout = data.layout
        self.sources = data.sources
        self.training = data.training
        self.weights = data.weights
        self.seed = cfg.training.seed
        self.shuffle_window = cfg.data.shuffle_window
        seq = self.geometry.seq_length
        whole = cfg.data.packing == "whole"
        orders = data.orders(self.seed, self.shuffle_window if self.training else 0,
                             shuffle=self.training)
        if self.training and not whole:
            self.plan: MixturePlan | StepPlan = StepPlan(
                orders, self.weights, seq, self.geometry.global_batch_size)
        else:
            self.plan = MixturePlan([s.lengths for s in self.sources], self.weights, seq + 1,
                                    seed=self.seed, shuffle=self.training,
                                    single_pass=not self.training, whole_documents=whole,
                                    orders=orders)
        self.too_long = 0  # documents whole-document packing leaves out
        if whole:
            self.too_long = data.too_long(seq + 1)
            if self.too_long:
                print(f"[soda-mega data] data.packing=whole: {self.too_long} of "
                      f"{data.num_documents} {split} documents are longer than model.seq_length "
                      f"+ 1 = {seq + 1} tokens and are left out", file=sys.stderr, flush=True)
        self.assembler = WindowAssembler(self.sources, self.layout, cfg.data.reset_at_document)
        self.num_workers = cfg.data.num_workers if num_workers is None else num_workers
        self.needs_data = needs_data
        self._start_micro = 0
        self._consumed = 0
        # Sequential plans: a copy advanced one global batch per consumed step, so that
        # state_dict() is a snapshot (O(1)), never a replay of the history.
        self._position = self.plan.clone() if isinstance(self.plan, MixturePlan) else None

    def epoch_tokens(self) -> int:
        """Tokens one pass over the training datasets takes: the documents' tokens, or with
        ``data.packing=whole`` the windows of one pass (padding included) x seq_length."""
        if isinstance(self.plan, StepPlan) or not self.plan.whole_documents:
            return self.data.num_tokens
        one_pass = MixturePlan(self.plan.lengths, self.weights, self.plan.window_tokens,
                               seed=0, shuffle=False, single_pass=True, whole_documents=True,
                               orders=self.data.orders(0, 0, shuffle=False))
        windows = 0
        while one_pass.next_window() is not None:
            windows += 1
        return windows * (self.plan.window_tokens - 1)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        """Micro-batches from the first one not yet consumed (a new iterator continues)."""
        dataset = _MicroBatches(self.plan, self.assembler, self.geometry,
                                self._start_micro + self._consumed,
                                single_pass=not self.training, read=self.needs_data)
        if self.num_workers > 0 and self.needs_data:
            iterable = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers,
                prefetch_factor=2, persistent_workers=False,
                pin_memory=torch.cuda.is_available(),
                # Workers end with this process and leave SIGTERM / SIGUSR1 to it (it saves).
                worker_init_fn=helper_process_init,
            )
            end_helpers_at_exit()
        else:
            iterable = dataset
        per_step = self.geometry.micro_batches_per_step
        batches = iter(iterable)
        try:
            for batch in batches:
                if isinstance(batch, _WorkerFailure):
                    raise batch.error()
                self._consumed += 1
                if self._position is not None and self.training and self._consumed % per_step == 0:
                    self._position.skip(self.geometry.global_batch_size)
                yield batch
        finally:
            # Workers end with this iterator (an error, close(), exhaustion), not whenever a
            # traceback that holds it is freed.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        """Let this process's background shard prefetches finish."""
        self.data.close()

    # ------------------------------------------------------------------ resume
    def datasets(self) -> list[dict]:
        """Identity of the loaded datasets (saved with the state, checked on resume)."""
        return self.data.datasets()

    def state_dict(self) -> dict:
        """Loader position at the last global-batch boundary (save only at step boundaries).

        ``O(1)``: the step number (closed-form plan) or a snapshot of the sequential plan's
        counters, which advance as steps are consumed; nothing is replayed."""
        per_step = self.geometry.micro_batches_per_step
        micro = self._start_micro + self._consumed
        if micro % per_step:
            raise RuntimeError(f"loader state is saved between optimizer steps "
                               f"({micro % per_step} of {per_step} micro-batches into a step)")
        if not self.training:
            raise RuntimeError("evaluation loaders are not resumable; rebuild them instead")
        state = {"version": self.PLAN_VERSION, "global_batch_size": self.geometry.global_batch_size,
                 "steps": micro // per_step, "weights": self.weights, "seed": self.seed,
                 "shuffle_window": self.shuffle_window, "seq_length": self.geometry.seq_length,
                 "datasets": self.datasets()}
        if self._position is not None:
            state["plan"] = self._position.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved step; the DP size and worker count may differ from the saving run."""
        if state.get("version") != self.PLAN_VERSION:
            raise DatasetError(
                "checkpoint loader state was saved by an older soda-mega data plan (version "
                f"{state.get('version', 1)}, this one is {self.PLAN_VERSION}); its data order "
                "cannot be continued exactly: resume with the soda-mega that saved it")
        if state["global_batch_size"] != self.geometry.global_batch_size:
            raise ValueError(
                f"training.global_batch_size: checkpoint loader state was saved with "
                f"{state['global_batch_size']}, this run uses {self.geometry.global_batch_size}"
            )
        for key, now in (("seq_length", self.geometry.seq_length), ("seed", self.seed),
                         ("shuffle_window", self.shuffle_window)):
            if state[key] != now:
                field = {"seq_length": "model.seq_length", "seed": "training.seed",
                         "shuffle_window": "data.shuffle_window"}[key]
                raise ValueError(f"{field}: checkpoint loader state was saved with {state[key]}, "
                                 f"this run uses {now}; the data order would differ")
        _check_same_datasets(state["datasets"], self.datasets())
        if not np.allclose(state["weights"], self.weights):
            raise ValueError(f"data mixture changed since the checkpoint: weights {state['weights']} "
                             f"-> {self.weights}; resume with the same data sections")
        if self._position is not None:
            self.plan.load_state_dict(state["plan"])
            self._position = self.plan.clone()
        # Count micro-batches from the first one of step `steps`.
        self._start_micro = state["steps"] * self.geometry.micro_batches_per_step
        self._consumed = 0


def _check_same_datasets(saved: list[dict], now: list[dict]) -> None:
    """Refuse to resume on other datasets, naming them (same paths with other contents too)."""
    if [d["index"] for d in saved] == [d["index"] for d in now]:
        return
    lines = []
    for i in range(max(len(saved), len(now))):
        a = saved[i] if i < len(saved) else None
        b = now[i] if i < len(now) else None
        if a is None or b is None or a["index"] != b["index"]:
            lines.append(f"#{i}: saved {a['name'] + ' (index ' + a['index'][:12] + ')' if a else 'nothing'}"
                         f", now {b['name'] + ' (index ' + b['index'][:12] + ')' if b else 'nothing'}")
    raise DatasetError("the checkpoint's loader state was saved with other datasets; resume with "
                       "the same data.train (same contents) or start a new run: " + "; ".join(lines))


def _parallel_coordinates() -> tuple[int, int, bool]:
    """(DP rank, DP size, needs data) from Megatron-core's parallel state, else one process."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return 0, 1, True
    if not ps.model_parallel_is_initialized():
        return 0, 1, True
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), first or last
