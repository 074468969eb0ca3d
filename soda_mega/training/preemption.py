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
A set-up that does not reach that agreement within :data:`SETUP_STOP_GRACE_S` of the signal
(stuck in a read from a hung file system, or on a rank that waits for a stuck one) ends the
process there and then with the same exit code: before the first step there is nothing to
lose, and the scheduler that sent the signal wants the job gone.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from soda_mega.errors import EXIT_PREEMPTED, write_status
from soda_mega.utils import stop_signals
from soda_mega.utils.stop_signals import STOP_SIGNALS

# Seconds a set-up may go on after a stop signal before the process ends without it: long
# enough for a healthy set-up to reach the ranks' agreement (all ranks then stop together),
# well inside the launchers' SHUTDOWN_TIMEOUT (240-300 s).
SETUP_STOP_GRACE_S = 60.0


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
        self._in_setup = True
        self._deadline: threading.Timer | None = None

    def install(self) -> PreemptionFlag:
        # NOTE: Python only lets the main thread install handlers; elsewhere (a library caller
        # driving the trainer from a thread) the signals keep their current meaning.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
            for signum in stop_signals.claim():  # arrived while soda-mega was starting up
                self._record(signum, None)
        return self

    def restore(self) -> None:
        self.setup_done()
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
            if self._in_setup:
                self._deadline = threading.Timer(SETUP_STOP_GRACE_S, self._end_setup, (signum,))
                self._deadline.daemon = True
                self._deadline.start()

    def setup_done(self) -> None:
        """The ranks agreed on the set-up's signals (or the run ended): a stop signal from now
        on finishes its step; a pending set-up deadline is cancelled."""
        self._in_setup = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _end_setup(self, signum: int) -> None:
        """A stop signal's grace ran out during the set-up: exit 4 now (nothing to save)."""
        name = signal.Signals(signum).name
        os.write(2, f"soda-mega: preempted: stopped by {name} before this run's first step; "
                    f"nothing new to save (the set-up was still running {SETUP_STOP_GRACE_S:g} s "
                    f"after the signal); run the same command again to start or resume (exit "
                    f"code {EXIT_PREEMPTED})\n".encode())
        write_status(EXIT_PREEMPTED)
        os._exit(EXIT_PREEMPTED)

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
