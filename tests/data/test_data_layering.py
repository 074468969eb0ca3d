"""soda_mega/data is two houses on one floor: `data/write` (inputs -> codec -> documents ->
shards) and `data/read` (opening, cache, order, steps, mixture, loader, inspect), with the format
both share (schema, shard contract, streaming compatibility, codec and tokenizer) at `data/`.
Reading never imports writing, the shared floor imports neither, and no part of data imports
training or anything above it. No package is named `build`: that is the name tools skip as build
output (ruff's and black's excludes, pytest's norecursedirs, the usual `.gitignore`)."""

from __future__ import annotations

import ast
from pathlib import Path

import soda_mega.data

DATA = Path(soda_mega.data.__file__).parent
ABOVE = ("soda_mega.training", "soda_mega.inference", "soda_mega.eval", "soda_mega.hf",
         "soda_mega.commands", "soda_mega.cli", "soda_mega.scaling", "soda_mega.perf")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = path.parent.relative_to(DATA.parent.parent).parts
                base = base[: len(base) - node.level + 1]
                names.append(".".join((*base, node.module or "")).rstrip("."))
            else:
                names.append(node.module or "")
    return names


def _offenders(files, forbidden) -> list[str]:
    return [f"{p.relative_to(DATA)}: {n}" for p in files for n in _imports(p)
            if n.startswith(forbidden)]


def test_read_never_imports_write():
    assert not _offenders(sorted((DATA / "read").glob("*.py")), ("soda_mega.data.write",))


def test_shared_format_imports_neither_side():
    assert not _offenders(sorted(DATA.glob("*.py")), ("soda_mega.data.write", "soda_mega.data.read"))


def test_no_data_module_imports_training_or_above():
    assert not _offenders(sorted(DATA.rglob("*.py")), ABOVE)


def test_every_data_module_sits_in_a_house():
    """New modules go to write/, read/ or (the shared format) data/ itself: nothing deeper."""
    deeper = [p for p in DATA.rglob("*.py") if len(p.relative_to(DATA).parts) > 2]
    assert not deeper, deeper


def test_no_package_is_named_like_build_output():
    """`build/` is ignored by git (`.gitignore`) and skipped by ruff and pytest: a package of
    that name would be neither committed nor checked."""
    import soda_kernels

    roots = (DATA.parent, Path(soda_kernels.__file__).parent)
    named_build = [p for root in roots for p in root.rglob("build") if p.is_dir()]
    assert not named_build, named_build
