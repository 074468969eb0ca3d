"""Detection of optional accelerators: flash-attn and NVIDIA apex.

Neither is required. flash-attn ships no wheel on PyPI (``pip install soda-mega[flash]``
builds it against the local CUDA toolkit); NVIDIA apex is not on PyPI at all, and the PyPI
package called ``apex`` is an unrelated project, so apex is only trusted when its CUDA
extension modules import.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def flash_attn_func():
    """``flash_attn.flash_attn_func`` when flash-attn (v2+) is installed, else None."""
    try:
        module = importlib.import_module("flash_attn")
        return getattr(module, "flash_attn_func")
    except (ImportError, AttributeError, OSError):
        return None


@functools.cache
def apex_fused_rms_norm():
    """apex's ``fused_rms_norm_affine(x, weight, shape, eps)`` when NVIDIA apex is present."""
    try:
        importlib.import_module("fused_layer_norm_cuda")  # NVIDIA apex's compiled extension
        module = importlib.import_module("apex.normalization.fused_layer_norm")
        return getattr(module, "fused_rms_norm_affine")
    except (ImportError, AttributeError, OSError):
        return None


def summary() -> dict[str, bool]:
    """Which optional accelerators this process can use."""
    return {"flash_attn": flash_attn_func() is not None, "apex": apex_fused_rms_norm() is not None}
