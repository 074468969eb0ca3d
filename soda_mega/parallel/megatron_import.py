"""Importing Megatron-core without the two heavy imports it makes and soda-mega never uses.

``import megatron.core`` (0.16.x) costs about 3.5 s of CPU over torch's own import in every
process that builds, trains, evaluates or exports a model (``python -X importtime -c "import
megatron.core"``); about 1.8 s of that are two imports made at import time for code soda-mega
does not run there:

1. **TorchDynamo and Inductor (~1.3 s).** A dozen small functions (``bias_swiglu``,
   ``bias_geglu``, ``gelu_impl``, the attention output gate, ...) are decorated with
   ``megatron.core.jit.jit_fuser``, which is ``torch.compile``. ``torch.compile(fn)`` compiles
   nothing until ``fn`` is called but imports Dynamo on the spot. Here ``jit_fuser`` becomes
   :func:`compile_on_first_call`: the same ``torch.compile(fn)``, made at the function's first
   call. What runs, and how it is compiled, is unchanged. (A process that builds a torch
   optimizer still imports Dynamo then: torch's ``Optimizer.add_param_group`` does.)
2. **wandb (~0.5 s).** ``megatron.core.inference.contexts.dynamic_context`` imports it unused
   and ``megatron.core.timers`` for ``Timers.write(writer=wandb)``. Those two modules are
   loaded with ``wandb`` hidden, so they hold ``wandb = None``: Megatron's own W&B hooks (its
   timers and its dynamic inference engine's metrics), which soda-mega never calls, are off.
   ``wandb`` itself stays importable: soda-mega's W&B output
   (:mod:`soda_mega.training.wandb_log`) imports it when ``run.wandb_project`` is set.

:func:`install` puts a finder on ``sys.meta_path`` that loads those three modules with their
own loaders and applies the change; it is idempotent, imports nothing heavy and has no effect
on a ``megatron.core`` imported before it. ``soda_mega/__init__.py`` calls it, so it precedes
every ``megatron.core`` import of the package.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

JIT_MODULE = "megatron.core.jit"
#: Megatron-core modules that import wandb at import time for hooks soda-mega never calls
WANDB_HIDDEN_FROM = ("megatron.core.inference.contexts.dynamic_context", "megatron.core.timers")


def compile_on_first_call(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made when the returned function is first called. Called while an
    enclosing ``torch.compile`` traces, it is ``fn`` itself, traced into the enclosing graph
    (what TorchDynamo does with a compiled function it meets while tracing)."""
    import torch  # already loaded where Megatron decorates (its jit module imports it)

    compiled: Callable | None = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    call.soda_compile_on_first_call = True
    return call


def _lazy_jit_fuser(module) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and getattr(module, "jit_fuser", None) is torch.compile:
        module.jit_fuser = compile_on_first_call


class _Loader(importlib.abc.Loader):
    """Runs the module's own loader, then the change of this file for that module."""

    def __init__(self, inner: importlib.abc.Loader, name: str):
        self._inner, self._name = inner, name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        if self._name == JIT_MODULE:
            self._inner.exec_module(module)
            _lazy_jit_fuser(module)
            return
        hide = "wandb" not in sys.modules
        if hide:
            sys.modules["wandb"] = None  # `import wandb` raises ImportError in this module
        try:
            self._inner.exec_module(module)
        finally:
            if hide and sys.modules.get("wandb", 0) is None:
                del sys.modules["wandb"]

    def __getattr__(self, name):  # get_source, get_code, is_package ... for tracebacks
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE and fullname not in WANDB_HIDDEN_FROM:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


def install() -> None:
    """Load Megatron-core as described above (no effect on modules already imported)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
