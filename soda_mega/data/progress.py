"""Progress lines for long builds: records done / total, rate, audio rate, ETA, skipped.

On a terminal one line is rewritten in place twice a second; in a log (stderr not a TTY) a
line is printed at most every ``log_every`` seconds, so build logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts records (recordings or text documents) and audio seconds as workers report them."""

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
        self._last = 0.0
        self._printed = -1

    def advance(self, records: int = 1, audio_seconds: float = 0.0, skipped: int = 0) -> None:
        self.done += records
        self.audio_seconds += audio_seconds
        self.skipped += skipped
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        new = self.done - self.start_done
        rate = new / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        parts = [f"[{self.label}] {self.done}/{self.total} records ({pct:.0f}%)", f"{rate:.1f} rec/s"]
        if self.audio_seconds:
            parts.append(f"{self.audio_seconds / elapsed:.1f} s audio/s")
        parts.append(f"ETA {_clock(eta) if eta == eta else '?'}")
        if self.skipped:
            parts.append(f"skipped {self.skipped}")
        return " | ".join(parts)

    def _print(self, final: bool = False) -> None:
        if not self.enabled:
            return
        self._printed = self.done
        if self.tty:
            end = "\n" if final else ""
            print("\r" + self.line().ljust(100), end=end, file=self.stream, flush=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def finish(self) -> None:
        """Print the final line (unless the last line printed already showed this count)."""
        if self._printed != self.done or self.tty:
            self._print(final=True)
