"""Count the torch operations that make the host wait for a GPU, on CPU tensors.

On a GPU these operations copy a device value to the host, so the CPU stops queueing work
until every kernel before them has finished: a data-dependent output shape (``nonzero``,
``masked_select``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without
``output_size``, ``bincount``), a Python value of a tensor (``item``, ``__bool__``,
``is_nonzero``, ``tolist``, ``equal``, ``allclose``) or a copy to the host (``.cpu()``,
``.numpy()``, a ``to``/``copy_`` onto the CPU). On CPU tensors they cost nothing, but the same
calls happen: :class:`HostSyncCounter` counts them where they are made, at both levels
(``__torch_function__`` for the tensor methods, ``__torch_dispatch__`` for the aten ops) and
inside the ``soda_kernels`` custom ops (whose Python bodies it enters itself: a mode does not
see through an op boundary).

What is counted: the torch code of the ops (the glue around the kernels). Operations made by
Triton's CPU interpreter while it runs a kernel (it moves tensors to numpy) are not syncs on
a GPU, where the kernel launch is asynchronous: they are tallied apart, in ``interpreter``.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: aten ops that need a device value on the host (their packet, any overload).
#: (``item``, ``__bool__``, ``int()``, ``allclose`` ... all end in ``_local_scalar_dense``.)
SYNC_OPS = {aten.nonzero, aten.argwhere, aten._local_scalar_dense, aten.equal,
            aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
            aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount, aten.histc}
#: Tensor methods that copy to the host without an aten op a CPU run would show.
HOST_METHODS = {"cpu", "numpy", "tolist"}


def _from_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "triton" in frame.f_code.co_filename and "interpreter" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices if i is not None)


def _custom_body(func):
    """The Python body of a ``soda_kernels`` custom op, or None."""
    if isinstance(func, torch._ops.OpOverload):
        name = func.name().split(".")[0]
    elif isinstance(func, torch._ops.OpOverloadPacket):
        name = func._qualified_op_name
    else:
        return None
    opdef = OPDEFS.get(name) if name.startswith("soda_kernels::") else None
    return opdef._init_fn if opdef is not None else None


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_body(func)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        packet = func.overloadpacket
        name = None
        if packet in SYNC_OPS:
            name = str(packet).removeprefix("aten.")
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) \
                and _bool_index(args[1]):
            name = f"{packet.__name__}(bool mask)"
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None \
                and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            name = "repeat_interleave"
        elif packet in (aten._to_copy, aten.copy_):
            src = args[1] if packet is aten.copy_ else args[0]
            dst = args[0].device if packet is aten.copy_ else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                name = "copy to host"
        if name is not None:
            self.owner.add(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_body(func)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS and args and isinstance(args[0], torch.Tensor):
            self.owner.add(f"Tensor.{name}")
        return func(*args, **kwargs)


class HostSyncCounter:
    """``with HostSyncCounter() as syncs: ...``; ``syncs.glue`` counts the host syncs of the
    torch code by kind, ``syncs.interpreter`` those made inside Triton's interpreter."""

    def __init__(self):
        self.glue: Counter = Counter()
        self.interpreter: Counter = Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def add(self, name: str) -> None:
        (self.interpreter if _from_interpreter() else self.glue)[name] += 1

    @property
    def total(self) -> int:
        return sum(self.glue.values())

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
