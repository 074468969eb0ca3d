"""A save's optimizer state built from views is Megatron's own fully_reshardable state.

``soda_mega.checkpoint.optimizer_views`` replaces Megatron-core's copy-and-gather of the
distributed optimizer's state (one data-parallel rank) by views of the optimizer's tensors.
The checkpoint must not change: the same keys, shapes, offsets, replica ids, dtypes and values
as Megatron's path, and no copy of the state (the views share the optimizer's memory).
Trained in a subprocess: it initialises torch.distributed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch_env import clean_env

pytestmark = pytest.mark.distributed

SCRIPT = r"""
import json, sys
from pathlib import Path
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from soda_mega.config import load_config
from soda_mega.checkpoint.optimizer_views import inner_optimizers, optimizer_state_views, viewable
from soda_mega.checkpoint.sharded import model_sharded_state_dict, optimizer_metadata, unwrap
from soda_mega.training.trainer import Trainer

corpus, run_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config(preset="tiny", overrides=[
    f"data.train={corpus}", f"run.dir={run_dir}", "run.eval_interval=0",
    "run.tensorboard=false", "data.num_workers=0", *overrides])
trainer = Trainer(cfg)
data = iter(trainer.loader)
trainer.train_step([next(data) for _ in range(trainer.micro_per_step)])
opt = trainer.optimizer

def param_state():
    model_sd = model_sharded_state_dict(unwrap(trainer.model))
    state = opt.sharded_state_dict(model_sd, is_loading=False, metadata=optimizer_metadata())
    return {t.key: t for t in nested_values(state) if isinstance(t, ShardedTensor)}

megatron = param_state()
with optimizer_state_views(opt) as used:
    views = param_state()
owned = {t.untyped_storage().data_ptr() for o in inner_optimizers(opt)
         for p in o.optimizer.param_groups for t in p["params"]}
owned |= {t.untyped_storage().data_ptr() for o in inner_optimizers(opt)
          for s in o.optimizer.state.values() for t in s.values() if t.dim() > 0}
diff = [k for k in megatron if k not in views
        or (megatron[k].global_shape, megatron[k].global_offset, megatron[k].replica_id,
            megatron[k].dtype) != (views[k].global_shape, views[k].global_offset,
                                   views[k].replica_id, views[k].dtype)
        or not megatron[k].data.equal(views[k].data)]
opt_keys = [k for k in views if k.startswith("optimizer.state.")]
print("RESULT", json.dumps({
    "used": used, "viewable": [viewable(o) for o in inner_optimizers(opt)],
    "keys": len(megatron), "opt_keys": len(opt_keys), "extra": sorted(set(views) - set(megatron)),
    "diff": diff,
    "shared": sum(views[k].data.untyped_storage().data_ptr() in owned for k in opt_keys),
    "patched_after": any("sharded_param_state_fully_reshardable" in vars(o)
                         for o in inner_optimizers(opt))}))
"""


def _run(corpus, tmp_path, *overrides) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(corpus / "speech"),
                           str(tmp_path / "run"), *overrides],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("precision", ["bf16"])  # main params apart from the model's
def test_views_give_megatrons_state_without_copying_it(corpus, tmp_path, precision):
    got = _run(corpus, tmp_path, f"training.precision={precision}")
    assert got["viewable"] and all(got["viewable"]), got
    assert got["used"] == len(got["viewable"])
    assert got["opt_keys"] > 0 and got["opt_keys"] % 3 == 0  # param, exp_avg, exp_avg_sq
    assert got["diff"] == [] and got["extra"] == [], got
    assert got["shared"] == got["opt_keys"], got  # every optimizer tensor is a view, not a copy
    assert not got["patched_after"]  # the optimizer is itself again after the save
