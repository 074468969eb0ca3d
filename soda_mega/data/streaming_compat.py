"""Import the parts of mosaicml-streaming soda-mega uses, and nothing else.

``import streaming`` runs ``streaming/__init__.py``, which eagerly imports ``streaming.vision``
and through it torchvision (whose PyPI wheels do not load beside this project's CPU torch
build), and ``import streaming.base`` runs ``streaming/base/__init__.py``, which imports its
data loader and through it ``transformers`` (about a second of CPU in every process that
reads a shard: the trainer, each of its loader workers, each build worker). soda-mega only
needs a few submodules (``format`` for the MDS reader and writer, ``compression``,
``hashing``, ``storage``), so both packages are registered bare: their ``__path__`` only, no
``__init__`` side effects, and each submodule is imported on its own. ``streaming_base()``
completes ``streaming.base`` for the callers that want its whole namespace (``StreamingDataset``).
When another library has already imported ``streaming`` in full, that import is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types

_BARE = "_soda_mega_bare"  # set on a package registered without running its __init__
# NOTE: streaming's modules import each other in a circle (util -> format -> reader -> util).
# Two threads entering it at once (the shard prefetch threads) can each find the other's module
# half-initialised, as Python's per-module import locks let a circle through; one lock
# serialises the imports made here.
_IMPORTING = threading.RLock()


def _new_lock_in_child() -> None:
    global _IMPORTING
    _IMPORTING = threading.RLock()  # a fork may have copied it held by another thread


os.register_at_fork(after_in_child=_new_lock_in_child)


def _bare_package(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            f"{name} is not installed: run `bash scripts/bootstrap.sh install` "
            "(it installs mosaicml-streaming with --no-deps)"
        )
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    setattr(module, _BARE, True)
    sys.modules[name] = module
    return module


def _light_base() -> types.ModuleType:
    """``streaming.base`` as it is, or bare when nothing imported it yet."""
    if "streaming" not in sys.modules:
        _bare_package("streaming")
    base = sys.modules.get("streaming.base")
    if base is None:
        base = _bare_package("streaming.base")
        # NOTE: ``format`` first, as the package's own __init__ does: ``util`` imports
        # ``format``, whose reader imports names from ``util``; entered through ``util`` (as
        # ``storage`` does) that circle meets a half-initialised ``util``.
        importlib.import_module("streaming.base.format")
    return base


def streaming_base():
    """The whole ``streaming.base`` module (MDSWriter, StreamingDataset, Stream, ...)."""
    with _IMPORTING:
        base = _light_base()
        if getattr(base, _BARE, False):
            # Run the package's own __init__ in the module the submodules already hang from.
            base.__spec__.loader.exec_module(base)
            delattr(base, _BARE)
        return base


def streaming_version() -> str:
    with _IMPORTING:
        _light_base()
        return importlib.import_module("streaming._version").__version__


def streaming_module(name: str):
    """A submodule of ``streaming.base``, e.g. ``"format"`` or ``"compression"``, imported on
    its own."""
    with _IMPORTING:
        _light_base()
        return importlib.import_module(f"streaming.base.{name}")
