"""The distributed optimizer's state for a save, as views instead of gathered copies.

Megatron-core's ``fully_reshardable`` save (``sharded_param_state_fully_reshardable``) first
copies every rank's fp32 main parameters and Adam moments into new flat CPU buffers, gathers
them on DP rank 0, then slices those buffers into one tensor per parameter. When the
data-parallel group has one rank, that rank's shard of every parameter *is* the whole
parameter: the gather moves nothing and the per-parameter tensors can be views of the
optimizer's own tensors. The copy of 3 x 4 bytes per parameter was most of the time a save
blocked the training loop (issue 31: 6.9 s of 9.2 s for soda-135m on CPU).

:func:`optimizer_state_views` builds the same sharded state dict (keys, global shapes,
replica ids, dtype, values) from views, for the optimizers where that holds, and leaves the
others (DP > 1, precision-aware optimizers with low-precision moments, an optimizer that has
not stepped yet) to Megatron. The checkpoint on disk is the same either way, so loading is
unchanged and older checkpoints stay readable.

A view is safe to hand over: a synchronous save writes it before the loop goes on; an
asynchronous one copies it to host memory (GPU) or forks a copy-on-write snapshot (CPU) before
:meth:`AsyncSaver.start` returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

# What Megatron's fully_reshardable format stores per parameter (its world-tensor keys).
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
PREFIX = "optimizer.state"


def inner_optimizers(optimizer) -> list:
    """The optimizers a (possibly chained) Megatron optimizer holds."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _tensors(opt, model_param) -> dict[str, torch.Tensor] | None:
    tensors = opt._get_main_param_and_optimizer_states(model_param)
    picked = {k: tensors.get(k) for k in STATE_KEYS}
    ok = all(isinstance(t, torch.Tensor) and t.dtype == torch.float32
             and t.numel() == model_param.numel() for t in picked.values())
    return picked if ok else None


def viewable(opt) -> bool:
    """Whether ``opt`` is a distributed optimizer whose save can use views: one data-parallel
    rank, fp32 main parameters and moments, state present for every parameter."""
    if not hasattr(opt, "gbuf_ranges") or not hasattr(opt, "buffers"):
        return False
    if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return False  # moments kept in low precision: Megatron's copy upcasts them
    if opt.data_parallel_group.size() != 1:
        return False
    return all(_tensors(opt, p) is not None
               for buffer in opt.buffers for p in buffer.param_index_map)


def param_state_views(opt, model_sharded_state_dict) -> dict[int, dict]:
    """What ``sharded_param_state_fully_reshardable`` returns on a save, built from views:
    parameter index (Megatron's order: buffers, then each buffer's ``param_index_map``) ->
    state key -> ShardedTensor whose key, shape and replica id are the model parameter's."""
    metadata_of = {}
    tensors_only, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    for sharded in nested_values(tensors_only):
        metadata_of[sharded.data] = sharded
    state: dict[int, dict] = {}
    for buffer in opt.buffers:
        for model_param in buffer.param_index_map:
            meta = metadata_of[model_param]
            tensors = _tensors(opt, model_param)
            assert tensors is not None, "viewable(opt) is checked first"
            state[len(state)] = {
                key: _like(meta, f"{PREFIX}.{key}.{meta.key}",
                           tensors[key].detach().view(meta.data.shape))
                for key in STATE_KEYS}
    return state


def _like(meta, key: str, data: torch.Tensor):
    kwargs = dict(key=key, data=data, dtype=data.dtype, replica_id=meta.replica_id)
    if isinstance(meta, ShardedTensorFactory):
        kwargs.pop("dtype")
    out = replace(meta, **kwargs)
    out.validate_metadata_integrity()
    return out


@contextlib.contextmanager
def optimizer_state_views(optimizer):
    """Within the block, ``optimizer.sharded_state_dict(..., is_loading=False)`` builds the
    fully_reshardable state of every viewable inner optimizer from views (see the module)."""
    patched = []
    for opt in inner_optimizers(optimizer) if optimizer is not None else []:
        if viewable(opt):
            original = opt.sharded_param_state_fully_reshardable

            def views(model_sharded_state_dict, is_loading=False, metadata=None,
                      _opt=opt, _original=original):
                if is_loading:
                    return _original(model_sharded_state_dict, is_loading, metadata)
                return param_state_views(_opt, model_sharded_state_dict)

            opt.sharded_param_state_fully_reshardable = views  # shadows the method, this save only
            patched.append(opt)
    try:
        yield len(patched)
    finally:
        for opt in patched:
            del opt.sharded_param_state_fully_reshardable
