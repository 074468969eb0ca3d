"""Progress lines for long builds: records done / total, rate, audio hours and rate, ETA, skipped.

The counting, timing, rate, ETA and terminal handling are tqdm's (``tqdm.tqdm``): on a
terminal one line is rewritten in place at most twice a second and trimmed to the terminal
width. In a log (the stream is not a TTY: CI, ``nohup``, SLURM output files) the same text is
printed as a plain line at most every ``log_every`` seconds, with no carriage returns, so build
logs stay readable.

A line reads::

    [speech train] 120/400 records (30%) | 4.21 rec/s | 0.33 h audio, 42.1 s audio/s | ETA 01:06 | skipped 2

The audio part appears once audio was counted, the skipped part once a record was skipped.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

#: tqdm ``bar_format`` of every line: ``rate_noinv_fmt`` and ``remaining`` are tqdm's rate and
#: ETA; ``done``, ``of``, ``pct``, ``audio`` and ``skipped`` are filled in by :func:`_extras`.
LINE_FORMAT = "{desc} {done}/{of} records ({pct:.0f}%) | {rate_noinv_fmt} | {audio}ETA {remaining}{skipped}"


def _extras(progress: Progress, elapsed: float) -> dict[str, Any]:
    """The fields tqdm does not have: counts as integers, audio hours and rate, skipped."""
    elapsed = max(elapsed, 1e-9)
    pct = 100.0 * progress.done / progress.total if progress.total else 100.0
    audio = ""
    if progress.audio_seconds:
        audio = (f"{progress.audio_seconds / 3600:.2f} h audio, "
                 f"{progress.audio_seconds / elapsed:.1f} s audio/s | ")
    skipped = f" | skipped {progress.skipped}" if progress.skipped else ""
    return dict(done=progress.done, of=progress.total, pct=pct, audio=audio, skipped=skipped)


class _Bar(tqdm):
    """tqdm bar whose line carries :class:`Progress`'s extra fields; in ``plain`` mode (not a
    terminal) each refresh prints one whole line instead of rewriting the current one."""

    # NOTE: no tqdm monitor thread: the build forks/spawns worker pools while a bar is open.
    monitor_interval = 0

    def __init__(self, progress: Progress, plain: bool, **kwargs: Any) -> None:
        self._progress, self._plain = progress, plain
        super().__init__(**kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d.update(_extras(self._progress, d.get("elapsed") or 0.0))
        return d

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._plain:
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing the line: nothing to clear in a log
            return False
        print(self.__str__() if msg is None else msg, file=self.fp, flush=True)
        return True

    def close(self) -> None:
        if self._plain and not self.disable:
            if self.n != self.last_print_n:  # the last line printed did not show this count
                self.display()
                self.last_print_n = self.n
            self.leave = False  # (tqdm would otherwise end the line it rewrote with a newline)
        super().close()


class Progress:
    """Counts records (recordings or text documents) and audio seconds as workers report them.

    ``done`` records are already built when it starts (a resumed build): the rate and ETA count
    only the new ones. ``enabled=False`` (``--quiet``) prints nothing; :meth:`line` still works.
    """

    def __init__(self, label: str, total: int, done: int = 0, stream: TextIO | None = None,
                 log_every: float = 10.0, enabled: bool = True) -> None:
        self.label, self.total, self.done = label, total, done
        self.start_done = done
        self.audio_seconds = 0.0
        self.skipped = 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else log_every
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._bar = _Bar(self, plain=not self.tty, total=total, initial=done, desc=f"[{label}]",
                         unit=" rec", unit_scale=True, file=self.stream, mininterval=self.every,
                         miniters=0, smoothing=0, bar_format=LINE_FORMAT, dynamic_ncols=self.tty,
                         disable=not enabled)

    def advance(self, records: int = 1, audio_seconds: float = 0.0, skipped: int = 0) -> None:
        self.done += records
        self.audio_seconds += audio_seconds
        self.skipped += skipped
        self._bar.update(records)

    def line(self) -> str:
        """The current line, as the terminal or the log shows it (without trimming)."""
        elapsed = time.monotonic() - self.t0
        return tqdm.format_meter(self.done, self.total, elapsed, prefix=f"[{self.label}]", unit=" rec",
                                 unit_scale=True, initial=self.start_done, bar_format=LINE_FORMAT,
                                 **_extras(self, elapsed))

    def finish(self) -> None:
        """Print the final line (in a log: unless the last line printed already showed this
        count) and close the bar."""
        self._bar.close()
