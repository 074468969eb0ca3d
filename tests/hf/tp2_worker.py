"""torchrun worker: re-save a one-process checkpoint as a TP=2 checkpoint (2 gloo ranks).

Each rank builds its TP=2 shard of the model, loads the source checkpoint into it
(``dist_checkpointing`` reshards on load) and the two ranks save it together, so the output
is a genuine TP=2 layout (vocabulary padded for TP=2, every matrix split over two ranks)
whose configuration says ``parallel.tensor_parallel: 2``.

Usage: ``torchrun --nproc-per-node 2 tp2_worker.py SOURCE_STEP_DIR OUT_ROOT``
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace


def main(source: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    from soda_mega.checkpoint.layout import checkpoint_config, checkpoint_state
    from soda_mega.checkpoint.load import load_checkpoint
    from soda_mega.checkpoint.save import save_checkpoint
    from soda_mega.model.gpt import build_model
    from soda_mega.parallel import state

    cfg = checkpoint_config(source)
    cfg = replace(cfg, parallel=replace(cfg.parallel, tensor_parallel=2,
                                        distributed_optimizer=False)).validate()
    state.initialize(cfg.parallel, cfg.training.seed)
    try:
        chunks = build_model(cfg)
        load_checkpoint(source, chunks, restore_rng=False)
        trainer_state = {**checkpoint_state(source), "config": cfg.to_dict()}
        save_checkpoint(out, int(trainer_state["step"]), chunks, None, trainer_state, keep_last=1)
    finally:
        state.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
