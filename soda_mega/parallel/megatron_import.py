"""Megatron-core's fusion decorator, compiled on first call instead of at import.

Megatron-core (0.16.x) decorates a dozen small functions (``bias_swiglu``, ``bias_geglu``,
``gelu_impl``, the attention output gate, ...) with ``megatron.core.jit.jit_fuser``, which is
``torch.compile``. ``torch.compile(fn)`` compiles nothing until ``fn`` is called, but it
imports TorchDynamo and Inductor on the spot, so every process that imports
``megatron.core`` paid about 1.3 s of CPU for them (``python -X importtime -c "import
megatron.core"``) even when none of those functions ever runs: CPU runs, data workers, the
tests' 2-rank launches, ``soda-mega`` commands that only read a checkpoint.

:func:`install` puts a finder on ``sys.meta_path`` that loads ``megatron.core.jit`` as usual
and then swaps its ``jit_fuser`` for :func:`compile_on_first_call`: the same
``torch.compile(fn)``, made at the function's first call. What runs, and how it is compiled,
is unchanged; only the import moves to the first fused call. A ``jit_fuser`` that Megatron
set to anything other than ``torch.compile`` (``disable_jit_fuser``, old torch) is left as it
is. :func:`install` is idempotent and imports nothing heavy; ``soda_mega/__init__.py`` calls
it so that it precedes every ``megatron.core`` import of the package.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Callable

JIT_MODULE = "megatron.core.jit"


def compile_on_first_call(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made when the returned function is first called."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    call.soda_compile_on_first_call = True
    return call


class _PatchedJitLoader(importlib.abc.Loader):
    """Runs the real loader of ``megatron.core.jit``, then makes its fuser lazy."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        torch = sys.modules.get("torch")
        if torch is not None and getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = compile_on_first_call

    def __getattr__(self, name):  # get_source, get_code, is_package ... for tracebacks
        return getattr(self._inner, name)


class _JitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchedJitLoader(spec.loader)
        return spec


def install() -> None:
    """Make Megatron's ``jit_fuser`` compile on first call (no effect if already imported)."""
    if not any(isinstance(f, _JitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFinder())
