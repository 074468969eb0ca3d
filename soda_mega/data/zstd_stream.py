"""Streaming zstd decompression through the system's libzstd, a chunk of output at a time.

The ``zstd`` Python package soda-mega depends on (mosaicml-streaming's choice) only decompresses
a frame whole, into one buffer of the frame's declared content size: a shard archive of a few
KB that declares 1 GiB would take 1 GiB of memory before a byte of it is checked. libzstd's
streaming API (``ZSTD_decompressStream``) writes into a buffer of our size instead, and keeps
only the frame's window (at most 2^27 bytes: frames that ask for more are refused by the
library, ``ZSTD_d_windowLogMax``). libzstd (``libzstd.so.1``) is part of every Debian/Ubuntu
base system and of conda environments; :func:`available` says whether it was found.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import BinaryIO

# ZSTD_d_windowLogMax (zstd.h): the largest window a frame may ask the decoder to allocate.
_D_WINDOW_LOG_MAX = 100
WINDOW_LOG_MAX = 27  # libzstd's own default limit (128 MiB), stated here so it cannot drift


class _Buffer(ctypes.Structure):
    """``ZSTD_inBuffer`` / ``ZSTD_outBuffer``: {pointer, size, pos}."""

    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class ZstdError(ValueError):
    """libzstd refused the data (the message is libzstd's)."""


@functools.lru_cache(maxsize=1)
def _lib():
    for name in ("libzstd.so.1", ctypes.util.find_library("zstd")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer),
                                              ctypes.POINTER(_Buffer)]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        return lib
    return None


def available() -> bool:
    return _lib() is not None


def _check(lib, code: int) -> int:
    if lib.ZSTD_isError(code):
        raise ZstdError(lib.ZSTD_getErrorName(code).decode(errors="replace"))
    return code


def decompress_stream(src: BinaryIO, write: Callable[[memoryview], None], chunk: int = 1 << 20) -> None:
    """Every zstd frame of ``src`` (read ``chunk`` bytes at a time), handed to ``write`` at most
    ``chunk`` bytes at a time (a view valid only during the call). :class:`ZstdError` for
    damaged data, :class:`EOFError` for an archive that ends inside a frame."""
    lib = _lib()
    if lib is None:
        raise OSError("libzstd is not installed")
    dctx = lib.ZSTD_createDCtx()
    if not dctx:
        raise MemoryError("ZSTD_createDCtx failed")
    try:
        _check(lib, lib.ZSTD_DCtx_setParameter(dctx, _D_WINDOW_LOG_MAX, WINDOW_LOG_MAX))
        inbuf, outbuf = bytearray(chunk), bytearray(chunk)
        in_addr = ctypes.addressof((ctypes.c_char * chunk).from_buffer(inbuf))
        out_addr = ctypes.addressof((ctypes.c_char * chunk).from_buffer(outbuf))
        out = _Buffer(out_addr, chunk, 0)
        view = memoryview(outbuf)
        pending = 0  # 0: at a frame boundary (libzstd's return value)
        while True:
            n = src.readinto(inbuf)
            inp = _Buffer(in_addr, n or 0, 0)
            # Go on while input is left, or while the last call filled the output (more may wait).
            while inp.pos < inp.size or out.pos == out.size:
                out.pos = 0
                pending = _check(lib, lib.ZSTD_decompressStream(dctx, ctypes.byref(out),
                                                                ctypes.byref(inp)))
                if out.pos:
                    write(view[:out.pos])
                elif inp.pos == inp.size:
                    break
            if not n:
                break
        if pending:
            raise EOFError("the archive ends inside a zstd frame")
    finally:
        lib.ZSTD_freeDCtx(dctx)
