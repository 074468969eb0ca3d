"""torchrun for the launchers: the same agent, and one line where torchrun printed a report.

``python -m soda_mega.parallel.torchrun ARGS`` takes torchrun's own arguments and runs its
agent (``torch.distributed.run``) unchanged: rendezvous, signals passed on to the workers,
``--shutdown-timeout``. What differs is how the end is told. torchrun counts any worker exit
code but 0 as a failure, so a run that stopped as planned (2 a configuration error, 3 diverged,
4 stopped by SIGUSR1 / SIGTERM after saving, 5 a hung step: the worker said why) ended in
~35 lines per node: an agent log line per worker, a Python traceback of torchrun itself and a
table of the workers; a stop signal sent to torchrun ended in its ``SignalException``
traceback. Here:

- an expected exit prints nothing more (the worker said why; the launcher ends with one
  summary line from the status file, :func:`soda_mega.errors.write_status`), except the user
  errors of local ranks other than 0 that differ from local rank 0's (those ranks record
  instead of printing them: one line per node, not one per process);
- a crash prints one line naming the rank that failed first, its host, pid, exit code and
  error (from the torchrun error file the worker wrote, :func:`soda_mega.errors.record_error`;
  its traceback is above), and how the other ranks ended;
- the agent's log lines that only restate this (a worker's exit code, the stop signal sent to
  the others, the signal it received) are left out; its other warnings and errors are kept.

Without ``--max-restarts``, the rendezvous is not closed at the end (:func:`keep_the_rendezvous_open`:
closing it raced the exit of the agent that hosts its store, a stack trace per node).

The exit code is 0 when every worker finished, the first failing worker's own when it is one
of those codes, else 1, as torchrun's (a crash, a worker killed by a signal, the agent stopped
by one): the launchers restart a run on 1 when rank 0 left no status file.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

from soda_mega.errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_HUNG, EXIT_PREEMPTED, EXIT_USER_ERROR

# Codes a worker exits with after saying why itself.
EXPECTED = (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_HUNG)
# The agent's log messages (their format strings in torch 2.13; one worded otherwise in another
# torch is simply printed) that the summary replaces.
RESTATED = ("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s",
            "Sending process %s closing signal %s",
            "Received %s death signal, shutting down workers")
# Signals the agent sends its workers to stop them (after another worker failed, or passed on).
AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api")


class _Restated(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in RESTATED


def quiet_agent_logs() -> None:
    for name in AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_Restated())


def keep_the_rendezvous_open() -> None:
    """At the end, stop this agent's rendezvous heartbeats but do not close the rendezvous.

    NOTE: the agent that hosts the c10d rendezvous store leaves as soon as its workers have; an
    agent on another node that was still closing the rendezvous in that store then printed a
    ~25-line C++ stack (TCPStore "Connection was likely closed") and a RendezvousConnectionError
    warning, after every stop and often after a finished run. Closing only tells agents that
    would rendezvous again (``--max-restarts`` > 0) not to wait: the launchers restart whole
    torchrun runs themselves, with a new rendezvous id, and pass no ``--max-restarts``."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    if not hasattr(DynamicRendezvousHandler, "_stop_heartbeats"):
        return  # another torch: its own shutdown

    def shutdown(self) -> bool:
        self._stop_heartbeats()
        return True

    DynamicRendezvousHandler.shutdown = shutdown


def _recorded(failure) -> dict:
    """The message and precise time a worker recorded (errors.record_error), else {}."""
    message = failure.error_file_data.get("message")
    if not isinstance(message, dict):
        return {}
    return {"message": str(message.get("message", "")),
            "time_ns": message.get("extraInfo", {}).get("time_ns")}


def _order(failures: dict) -> list[int]:
    """Ranks, the cause first: a rank that died of a signal the agent sends to stop the others
    (SIGTERM, or the stop signal it passed on) last; else by when it failed (a recorded error's
    own time; for none, the second the agent saw it, which sorts a rank killed outright, e.g. by
    the OOM killer, before those whose collectives failed because of it); then by rank."""
    def key(rank):
        failure, info = failures[rank], _recorded(failures[rank])
        when = info.get("time_ns")
        stopped = failure.exitcode < 0 and -failure.exitcode in AGENT_SIGNALS
        return (stopped, when if isinstance(when, int) else failure.timestamp * 10**9, rank)
    return sorted(failures, key=key)


def _code(failure) -> int:
    return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode


def _how(failure, short: bool = False) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()} (exit {_code(failure)})"
    message = _recorded(failure).get("message")
    if short:
        return f"exit {failure.exitcode}" + (f" ({message[:120]})" if message else "")
    if message:
        return f"crashed (exit {failure.exitcode}): {message} (its traceback is above)"
    return f"crashed (exit {failure.exitcode}; its output is above)"


def summarise(failures: dict, out=sys.stderr) -> int:
    """Print what :mod:`this module's docstring <soda_mega.parallel.torchrun>` says for the failed
    workers of this node (``ChildFailedError.failures``: global rank -> ProcessFailure);
    returns the exit code."""
    order = _order(failures)
    first = failures[order[0]]
    if first.exitcode in EXPECTED:
        said = {_recorded(f).get("message") for f in failures.values() if f.local_rank == 0}
        for rank in order:
            message = _recorded(failures[rank]).get("message")
            if failures[rank].exitcode == EXIT_USER_ERROR and message and message not in said:
                said.add(message)
                print(f"soda-mega: {message} (rank {rank})", file=out, flush=True)
        return first.exitcode
    host = socket.gethostname()
    line = (f"soda-mega: rank {order[0]} (local rank {first.local_rank} on {host}, pid "
            f"{first.pid}) {_how(first)}")
    groups: dict[str, list[int]] = {}
    for rank in order[1:]:
        groups.setdefault(_how(failures[rank], short=True), []).append(rank)
    if groups:
        line += "; then " + "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {how}"
            for how, ranks in groups.items())
    print(line, file=out, flush=True)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet_agent_logs()
    args = torchrun.parse_args(argv)
    if not args.max_restarts:
        keep_the_rendezvous_open()
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        return summarise(err.failures)
    except SignalException:
        # The agent passed the signal on to its workers and waited for them (--shutdown-timeout):
        # they said what they did; the launcher reads rank 0's code from its status file.
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
