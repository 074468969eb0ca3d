"""The environment soda-mega runs in: every runtime import works beside the machine's torch.

``moshi`` and ``mosaicml-streaming`` are installed with ``--no-deps`` (requirements/nodeps.txt),
so nothing but these tests proves that their runtime imports are present and that they work
against the torch that is there. Each import is its own test case, so a failure names the
package. The MDS round trip at the end proves the torchvision-free streaming import path
(soda_mega.data.streaming_compat) works end to end.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version

from launch_env import clean_env

REPO = Path(__file__).resolve().parents[1]

# (test id = the package that must be installed, module to import, attributes soda-mega uses)
IMPORTS = [
    ("torch", "torch", ("Tensor", "autograd")),
    ("triton", "triton.language", ("program_id", "load", "store")),
    ("megatron-core", "megatron.core.transformer", ("TransformerConfig",)),
    ("moshi", "moshi", ()),
    ("moshi-mimi", "moshi.models.loaders", ("get_mimi", "MimiModel")),  # Mimi codec
    ("moshi-compression", "moshi.models.compression", ("MimiModel",)),
    ("nvidia-ml-py", "pynvml", ("nvmlInit", "nvmlDeviceGetCount")),
    ("pyyaml", "yaml", ("safe_load", "safe_dump")),
    ("tensorboard", "torch.utils.tensorboard", ("SummaryWriter",)),  # imports `tensorboard`
    ("safetensors", "safetensors.torch", ("save_file", "load_file")),
    ("tokenizers", "tokenizers", ("Tokenizer",)),
    ("sphn", "sphn", ("read", "write_wav")),
    ("soda_kernels", "soda_kernels", ()),
    ("soda_mega", "soda_mega", ()),
]


@pytest.mark.parametrize("module_name, attrs", [pytest.param(m, a, id=i) for i, m, a in IMPORTS])
def test_import(module_name, attrs):
    module = importlib.import_module(module_name)
    missing = [attr for attr in attrs if not hasattr(module, attr)]
    assert not missing, f"{module_name} lacks {missing}"


def test_torch_is_the_installed_build():
    import torch

    # The imported torch is the installed distribution (no shadowing copy on sys.path) and at
    # least the version setup.py requires (torch>=2.6).
    assert torch.__version__ == metadata.version("torch")
    assert Version(torch.__version__) >= Version("2.6")


def test_megatron_core_version():
    assert Version(metadata.version("megatron-core")) >= Version("0.16.1")
    import megatron.core

    assert megatron.core.__version__ == metadata.version("megatron-core")


def test_pynvml_comes_from_nvidia_ml_py():
    import pynvml

    files = {str(f) for f in metadata.files("nvidia-ml-py") or ()}
    assert "pynvml.py" in files
    assert Path(pynvml.__file__).name == "pynvml.py"


def test_soda_kernels_is_the_repository_folder():
    import soda_kernels

    assert Path(soda_kernels.__file__).resolve().parent == REPO / "kernels"


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__", "find_spec"
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize(
    "line",
    ["import kernels", "import kernels.rmsnorm as rms", "from kernels import rmsnorm",
     "from kernels.rmsnorm import f", "mod = importlib.import_module('kernels.rmsnorm')"],
)
def test_import_scanner_sees_kernels(tmp_path, line):
    # The scanner used below must be able to catch each form of the mistake it looks for.
    probe = tmp_path / "probe.py"
    probe.write_text(f"import os\n{line}\n")
    assert "kernels" in _imported_top_levels(probe)
    probe.write_text("import soda_kernels\nfrom soda_kernels import x\nfrom . import kernels\n")
    assert "kernels" not in _imported_top_levels(probe)


def test_pypi_kernels_package_is_not_used():
    """``kernels`` on PyPI is an unrelated package; ours is imported as ``soda_kernels``."""
    sources = [p for folder in ("soda_mega", "kernels", "benchmarks", "launchers", "scripts", "tests")
               for p in (REPO / folder).rglob("*.py")]
    sources.append(REPO / "setup.py")
    assert len(sources) > 10
    offenders = sorted(str(p.relative_to(REPO)) for p in sources if "kernels" in _imported_top_levels(p))
    assert not offenders, f"these files import `kernels` (use `soda_kernels`): {offenders}"
    for req in (REPO / "requirements").glob("*.txt"):
        names = {re.split(r"[<>=!~\[;\s]", ln.split("#")[0].strip())[0].lower()
                 for ln in req.read_text().splitlines()}
        assert "kernels" not in names, f"{req.name} lists the PyPI package `kernels`"


# ----------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def streaming():
    from soda_mega.data.streaming_compat import streaming_base

    return streaming_base()


def test_streaming_base_exports(streaming):
    for attr in ("MDSWriter", "StreamingDataset", "Stream"):
        assert hasattr(streaming, attr), attr
    if importlib.util.find_spec("torchvision") is None:
        # The compat path must not have run streaming/__init__.py (which imports the vision extras).
        assert "streaming.vision" not in sys.modules


def test_writing_and_reading_shards_imports_only_the_streaming_parts_used(tmp_path):
    """A shard writer and reader (the trainer, each loader worker, each build worker) import
    ``streaming.base.format`` alone: not ``streaming.base``'s data loader and, through it,
    ``transformers`` (about 1 s of CPU per process). The whole namespace is still there for
    whoever asks for it afterwards."""
    code = f"""
import sys
from pathlib import Path
from soda_mega.config import load_config
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.data.read.source import DocumentSource
from soda_mega.tokens import VocabLayout

layout = VocabLayout.from_config(load_config(preset="tiny").vocab)
docs = random_docs(layout, 5, 20, 40, 1, "text")
root = Path({str(tmp_path)!r})
write_split(root / "train", layout, docs, "text")
source = DocumentSource(root, "train", layout)
assert [list(source.get(i)[0]) for i in range(5)] == [list(d) for d in docs]
heavy = sorted(m for m in ("transformers", "streaming.base.dataloader", "streaming.base.dataset",
                           "streaming.vision") if m in sys.modules)
from soda_mega.data.streaming_compat import streaming_base
print(heavy, hasattr(streaming_base(), "StreamingDataset"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "True"], proc.stdout


@pytest.mark.parametrize("first", ["storage"])
def test_a_process_may_enter_streaming_through_any_module(first):
    """A fresh process whose first shard access is a download (``storage``) or a hash check
    imports that module first; streaming's util -> format -> reader -> util circle must not
    meet a half-initialised module there (a spawned loader process did, before the fix)."""
    code = (f"from soda_mega.data.streaming_compat import streaming_module\n"
            f"streaming_module({first!r}); print(streaming_module('format').MDSWriter.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 0 and proc.stdout.split() == ["MDSWriter"], proc.stderr[-3000:]


def test_streaming_version():
    from soda_mega.data.streaming_compat import streaming_version

    assert streaming_version() == metadata.version("mosaicml-streaming")


def test_mds_write_read_round_trip(streaming, tmp_path):
    from streaming.base.util import clean_stale_shared_memory

    out = tmp_path / "mds"
    samples = [np.arange(i, i + 2 + i % 3, dtype=np.int32) for i in range(10)]  # ragged lengths
    with streaming.MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}) as writer:
        for sample in samples:
            writer.write({"tokens": sample})
    assert (out / "index.json").is_file()

    clean_stale_shared_memory()
    dataset = streaming.StreamingDataset(local=str(out), batch_size=1, shuffle=False)
    try:
        assert len(dataset) == 10
        got = [dataset[i]["tokens"] for i in range(10)]
        assert all(g.dtype == np.int32 for g in got)
        assert [g.tolist() for g in got] == [s.tolist() for s in samples]
        iterated = sorted(tuple(s["tokens"].tolist()) for s in dataset)
        assert iterated == sorted(tuple(s.tolist()) for s in samples)
    finally:
        del dataset
        clean_stale_shared_memory()
