"""Checkpoints: one home for writing, finding, verifying and reading them.

Below training, inference, eval and hf, which all use it; above model and parallel.

- ``layout``: the folder layout and what a path stands for;
- ``save`` / ``load``: a checkpoint of any TP / PP / DP layout, published atomically;
- ``manifest``: per-file checksums written before the publish and verified on load;
- ``trust``: every pickled file is checked to hold plain data before anything is loaded;
- ``resume``: which checkpoint a run continues from (falling back past damaged ones),
  whether it is this run's, and starting over in a folder that holds checkpoints;
- ``weights``: whole-model weights in one process (eval, generation, HF export / import).
"""

from soda_mega.checkpoint.errors import CheckpointError, DamagedCheckpoint

__all__ = ["CheckpointError", "DamagedCheckpoint"]
