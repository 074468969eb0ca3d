"""The one exception type of the checkpoint package."""

from __future__ import annotations

from soda_mega.errors import SodaUserError


class CheckpointError(SodaUserError, ValueError):
    """A checkpoint that cannot be used as asked: missing, damaged, untrusted, of another model
    or run, or one that could not be written. The message names the file or field and says
    what to do; the ``soda-mega`` command prints it without a traceback and exits with 2."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or changed since they were written.
    Resume falls back to an older intact checkpoint; other commands stop and name the file."""
