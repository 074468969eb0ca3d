"""Fixes for Megatron-core behaviour that is wrong on every device (not only on CPU).

1. ``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.x) copies every key of
   the inner optimizer's per-parameter state from the loaded checkpoint. With torch's AdamW
   (the optimizer Megatron uses when neither Transformer Engine nor apex is installed) that
   state holds a ``step`` tensor which the ``fully_reshardable`` checkpoint format does not
   store per parameter (Megatron restores it from the parameter groups just before), so every
   resume failed with ``KeyError: 'step'``. The patch copies only the keys the checkpoint has.
2. ``DistributedOptimizer.load_state_dict`` (0.16.x, torch AdamW) puts *one* ``step`` tensor
   object into the state of every parameter. AdamW increments each parameter's step in place,
   so after a resume the shared counter advanced once per parameter per step and Adam's bias
   correction was wrong (the loss trace left the uninterrupted one at the first step after a
   resume). The patch gives each parameter its own copy.

:func:`install` is idempotent and called by :func:`soda_mega.parallel.state.initialize`.
"""

from __future__ import annotations

import functools

import torch

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, src in tensors.items():
            dst[key].copy_(src)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    original_load = DistributedOptimizer.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()

    DistributedOptimizer.load_state_dict = load_state_dict
    _INSTALLED = True
