"""The ground floors of soda_mega: `config` imports nothing of soda_mega but itself and
`errors`; `tokens` stands on `config`; the resolved run (`soda_mega/run/`) stands on both and
below `data` and `model`, which use it. A lower floor never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import soda_mega

PKG = Path(soda_mega.__file__).parent


def _soda_imports(package: str) -> list[str]:
    """`file: module` for every soda_mega module imported by ``soda_mega.<package>``."""
    found = []
    for path in sorted((PKG / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}: relative import"
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.relative_to(PKG)}: {n}" for n in names if n.startswith("soda_mega")]
    return found


def _outside(package: str, allowed: tuple[str, ...]) -> list[str]:
    return [line for line in _soda_imports(package)
            if not line.split(": ")[1].startswith(tuple(f"soda_mega.{a}" for a in allowed))]


def test_config_imports_only_itself():
    assert not _outside("config", ("config", "errors"))


def test_tokens_stand_on_config():
    assert not _outside("tokens", ("tokens", "config", "errors"))


def test_resolved_run_stands_on_config_and_tokens():
    assert (PKG / "run" / "resolved.py").is_file()
    assert not _outside("run", ("run", "config", "tokens", "errors"))
