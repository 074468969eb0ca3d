"""Checkpoints: one home for writing, finding, verifying and reading them.

Below training, inference, eval and hf, which all use it; above model and parallel.
"""

from soda_mega.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
