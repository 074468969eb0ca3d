"""Import mosaicml-streaming's MDS writer and dataset without its vision extras.

``import streaming`` runs ``streaming/__init__.py``, which eagerly imports
``streaming.vision`` and through it torchvision. soda-mega only uses ``streaming.base``
(``MDSWriter``, ``StreamingDataset``, ``Stream``), and the torchvision wheels on PyPI do not
match the CPU torch build this project runs on (they fail to import beside it). When
torchvision is missing we register ``streaming`` as a bare namespace package (its
``__path__`` only, no ``__init__`` side effects) and import ``streaming.base`` from it; with
torchvision present the normal import is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _bare_package(name: str) -> None:
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
    sys.modules[name] = module


def streaming_base():
    """The ``streaming.base`` module (MDSWriter, StreamingDataset, Stream, ...)."""
    if "streaming" not in sys.modules:
        try:
            importlib.import_module("torchvision")
            importlib.import_module("streaming")
        except (ImportError, RuntimeError, OSError):
            # No torchvision, or one that does not load beside this torch build.
            for name in [m for m in sys.modules if m == "streaming" or m.startswith("streaming.")]:
                del sys.modules[name]
            _bare_package("streaming")
    return importlib.import_module("streaming.base")


def streaming_version() -> str:
    streaming_base()
    return importlib.import_module("streaming._version").__version__


def streaming_module(name: str):
    """A submodule of ``streaming.base``, e.g. ``"format"`` or ``"compression"``."""
    streaming_base()
    return importlib.import_module(f"streaming.base.{name}")
