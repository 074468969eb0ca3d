"""The checkpoint package sits below its users: it never imports training, inference, eval,
hf or commands (they import it)."""

from __future__ import annotations

import ast
from pathlib import Path

import soda_mega.checkpoint

ABOVE = ("soda_mega.training", "soda_mega.inference", "soda_mega.eval", "soda_mega.hf",
         "soda_mega.commands", "soda_mega.cli", "soda_mega.scaling")


def test_checkpoint_package_imports_nothing_above_it():
    root = Path(soda_mega.checkpoint.__file__).parent
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.startswith(ABOVE)]
    assert not bad, bad


def test_users_import_checkpoints_from_the_package():
    pkg = Path(soda_mega.checkpoint.__file__).parent.parent
    assert not (pkg / "training" / "checkpoint.py").exists()
    assert not (pkg / "inference" / "weights.py").exists()
