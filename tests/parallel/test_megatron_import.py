"""Importing ``megatron.core`` through soda-mega leaves out TorchDynamo / Inductor and wandb:
the fused functions still go through ``torch.compile`` (once each, at their first call), and
wandb stays importable for soda-mega's own W&B output."""

from __future__ import annotations

import subprocess
import sys

import torch

from launch_env import clean_env
from soda_mega.parallel.megatron_import import compile_on_first_call


def test_importing_megatron_through_soda_mega_leaves_dynamo_and_wandb_out():
    code = """
import sys
import soda_mega.model.gpt, soda_mega.training.trainer
import megatron.core.jit as jit, megatron.core.timers as timers
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu
print(sorted(m for m in ("torch._dynamo", "torch._inductor", "wandb") if m in sys.modules),
      jit.jit_fuser.__name__, getattr(bias_swiglu, "soda_compile_on_first_call", False),
      timers.wandb)
import wandb
print(callable(wandb.init))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "compile_on_first_call", "True", "None", "True"], proc.stdout


def test_the_fused_function_is_compiled_at_its_first_call_only(monkeypatch):
    made = []

    def record(fn):
        made.append(fn)
        return lambda *a, **k: fn(*a, **k) + 0  # a distinct callable, same maths

    def swish(x, beta=1.0):
        return x * torch.sigmoid(beta * x)

    fused = compile_on_first_call(swish)
    assert fused.__name__ == "swish" and fused.__wrapped__ is swish
    monkeypatch.setattr(torch, "compile", record)
    assert made == []
    x = torch.randn(7)
    torch.testing.assert_close(fused(x), swish(x), rtol=0, atol=0)
    torch.testing.assert_close(fused(x, beta=2.0), swish(x, 2.0), rtol=0, atol=0)
    assert made == [swish]


def test_inside_an_enclosing_compile_the_function_is_traced_not_compiled_again(monkeypatch):
    def swish(x):
        return x * torch.sigmoid(x)

    fused = compile_on_first_call(swish)
    made = []
    real_compile = torch.compile

    def outer(x):
        return fused(x) + 1

    outer_compiled = real_compile(outer, backend="eager", fullgraph=True)  # no graph break
    monkeypatch.setattr(torch, "compile", lambda fn: made.append(fn) or fn)
    x = torch.randn(5)
    torch.testing.assert_close(outer_compiled(x), swish(x) + 1, rtol=0, atol=0)
    assert made == []  # traced into the enclosing graph
    fused(x)
    assert made == [swish]  # an eager call still compiles it, once
