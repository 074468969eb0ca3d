"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, at
import time, before any test module imports ``soda_kernels``. It is set only when there is no
GPU (with one, the same tests run the compiled kernels on CUDA tensors) and only if the user
has not chosen a value. Other test folders are unaffected: on CPU nothing else can run a
Triton kernel, and torch.compile's CPU backend generates C++, not Triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
