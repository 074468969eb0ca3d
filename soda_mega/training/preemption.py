"""Save on preemption: SIGUSR1 or SIGTERM finish the current step, save, and exit with code 4.

SLURM sends SIGUSR1 before a job's time limit (``#SBATCH --signal``) and SIGTERM when it
preempts or cancels a job; torchrun forwards the signals it handles to its workers. The
trainer answers by finishing the step it is in, saving a checkpoint and exiting with
:data:`~soda_mega.errors.EXIT_PREEMPTED`; ``launchers/slurm.sbatch`` requeues the job on that code
and the requeued job resumes from the checkpoint, so nothing since the last periodic save is
lost.

The signal handler only records the signal: it may run at any point of the step, also inside a
collective. At the end of every step the ranks agree in one all-reduce (MAX) of that record over
the world group, so they all stop after the same step even when the signal reached them at
different times, or only some of them (one node's torchrun forwards it to its own workers only).
The cost is one 4-byte all-reduce per step.

``soda-mega train`` installs the handler before it builds anything, so a signal during set-up
(Megatron's initialisation, the model, the checkpoint load: minutes at scale) is recorded too;
the ranks agree on it once before the first step and stop without training (nothing to save).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from soda_mega.utils import stop_signals
from soda_mega.utils.stop_signals import STOP_SIGNALS



class TrainingPreempted(Exception):
    """The run stopped on a signal after saving the step it had reached (``checkpoint``), or
    before its first step (``checkpoint=None``: nothing new to save)."""

    def __init__(self, signal_name: str, step: int, checkpoint) -> None:
        if checkpoint is None:
            again = f"resume from step {step}" if step else "start"
            super().__init__(f"stopped by {signal_name} before this run's first step; nothing "
                             f"new to save; run the same command again to {again}")
        else:
            super().__init__(f"stopped by {signal_name} after step {step}; saved {checkpoint}; "
                             "run the same command again to resume from it")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class PreemptionFlag:
    """Records SIGUSR1 / SIGTERM while installed; :meth:`agreed` turns it into one decision."""

    def __init__(self) -> None:
        self.code = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        # NOTE: Python only lets the main thread install handlers; elsewhere (a library caller
        # driving the trainer from a thread) the signals keep their current meaning.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
            for signum in stop_signals.claim():  # arrived while soda-mega was starting up
                self._record(signum, None)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame) -> None:
        code = STOP_SIGNALS.index(signal.Signals(signum)) + 1
        first = self.code == 0
        self.code = max(self.code, code)
        if first:
            # NOTE: os.write, not print: the handler may interrupt a print of the main thread.
            os.write(2, f"soda-mega: {signal.Signals(signum).name} received (rank "
                        f"{os.environ.get('RANK', '0')}): finishing this step, then saving and "
                        f"exiting\n".encode())

    def agreed(self) -> str | None:
        """The stop signal's name when any rank has seen one, else None; the same on every rank
        (a collective: every rank calls it at the same point of every step)."""
        code = self.code
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return STOP_SIGNALS[code - 1].name if code else None
