"""Let Megatron-core (0.16.x) run on CPU with the gloo backend, for tests and the CPU demo.

Megatron-core assumes CUDA in a few places that have nothing to do with the maths: the
model-parallel RNG tracker reads CUDA generator states, buffers are placed on
``torch.cuda.current_device()``, some scalars are created with a hard-coded ``device="cuda"``,
and p2p communication calls ``torch.cuda.synchronize()``. :func:`install` patches exactly those
spots so the same Megatron code paths (schedules, DDP, finalize_model_grads, tensor-parallel
layers) run on CPU tensors:

1. RNG tracker: the "CUDA" RNG states become CPU generator states (``fork()`` swaps the CPU
   generator), so dropout / init forks behave as they do on GPU.
2. ``torch.cuda.current_device()`` returns the CPU device and ``torch.cuda.synchronize()`` is a
   no-op (there is nothing to synchronise).
3. Modules with hard-coded ``device="cuda"`` tensors see a ``torch`` whose factory functions
   map a CUDA device to the CPU.
4. Megatron's optimizers accept parameters by their ``Tensor.type()`` name
   (``torch.cuda.FloatTensor`` ...); :func:`cuda_type_names` reports CPU tensors under those
   names, only while an optimizer is being built or clips gradients.

It is a no-op when CUDA is available, so GPU runs use Megatron-core untouched. Import-order
note: call :func:`install` before building models; it is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_INSTALLED = False

# Modules that create tensors with a literal device="cuda" (megatron-core 0.16.x).
_HARDCODED_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True
    return str(device).startswith("cuda")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """A view of ``torch`` whose tensor factories never place tensors on CUDA."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def needed() -> bool:
    """True when this process has no usable CUDA device."""
    return not torch.cuda.is_available()


def install() -> bool:
    """Apply the CPU patches if CUDA is unavailable; returns whether they are active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not needed():
        return False

    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def _tracker_add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None

    # Gradient clipping asserts the CUDA type name of every gradient.
    from megatron.core.optimizer import optimizer as moptimizer

    clip = moptimizer.clip_grad_by_total_norm_fp32

    @functools.wraps(clip)
    def _clip(*args, **kwargs):
        with cuda_type_names():
            return clip(*args, **kwargs)

    moptimizer.clip_grad_by_total_norm_fp32 = _clip

    cpu_torch = _CpuTorch()
    for module_name in _HARDCODED_CUDA_MODULES:
        module = importlib.import_module(module_name)
        module.torch = cpu_torch

    _INSTALLED = True
    return True


@contextlib.contextmanager
def cuda_type_names():
    """While active (CPU only), ``tensor.type()`` names CPU tensors like CUDA ones."""
    if not needed():
        yield
        return
    original = torch.Tensor.type

    def patched(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = patched
    try:
        yield
    finally:
        torch.Tensor.type = original
