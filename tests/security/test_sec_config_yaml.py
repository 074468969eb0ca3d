"""Config and grid YAML from elsewhere cannot exhaust the machine or flood the terminal (issue 21).

A few hundred bytes of nested YAML aliases ("billion laughs") expand to billions of values once
anything walks them: before the fix a config took 47 s and 6.2 GB and printed a 2 GB error
line. Aliases (and so anchors' reuse and ``<<`` merges) are refused in every YAML file
soda-mega reads from a user (configs, ``--key=[...]`` overrides, scaling grids); nesting too
deep for the parser is refused, and every message that quotes a user's value is cut short.
"""

from __future__ import annotations

import time

import pytest

from sec_ckpt_helpers import run_cli
from soda_mega.config import load_config
from soda_mega.config.fields import ConfigError


def _laughs(levels: int) -> str:
    """A config whose one field holds ``9 ** levels`` strings through nested aliases."""
    lines = ["model:", "  hidden_size:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", '
             '"lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_config_is_refused_at_once(tmp_path):
    path = tmp_path / "laughs.yaml"
    # ~400 bytes; 531,441 strings once expanded (the 9 levels took 47 s and 6.2 GB
    # before the fix: too much to run on a shared CI machine, should the fix regress)
    path.write_text(_laughs(6))
    start = time.monotonic()
    proc = run_cli(["config", "--config", str(path)], timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr) < 2000, f"{len(proc.stderr):,} characters of error"
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "alias" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 60


def test_aliases_and_merges_are_refused_in_overrides_and_grids(tmp_path):
    from soda_mega.scaling.grid import load_grid

    with pytest.raises(ConfigError, match="alias"):
        load_config(preset="tiny", overrides=["--data.doc_types=[&a text_only, *a]"])
    grid = tmp_path / "grid.yaml"
    grid.write_text("budgets: [1.0e+15]\nwidths: &w [64, 128]\nname: *w\n")
    with pytest.raises(ConfigError, match=f"{grid}.*alias"):
        load_grid(str(grid))
    merged = tmp_path / "merged.yaml"
    merged.write_text("model: &m {hidden_size: 64}\ntraining:\n  <<: *m\n")
    with pytest.raises(ConfigError, match="alias"):
        load_config(merged)


def test_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model:\n  hidden_size: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(preset="tiny", overrides=["--data.doc_types=" + "[" * 5000 + "]" * 5000])


def test_messages_quoting_values_are_cut(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(f"model:\n  hidden_size: {'9' * 100_000}x\n")
    with pytest.raises(ConfigError, match="model.hidden_size") as err:
        load_config(path)
    assert len(str(err.value)) < 500
    path.write_text(f"model:\n  {'k' * 1000}: 1\n")
    with pytest.raises(ConfigError, match="unknown field") as err:
        load_config(path)
    assert len(str(err.value)) < 500
    path.write_text(f"{'s' * 1000}:\n  a: 1\n")
    with pytest.raises(ConfigError, match="unknown section") as err:
        load_config(path)
    assert len(str(err.value)) < 500
    path.write_text("model: [" + ", ".join(["1"] * 100_000) + "]\n")
    with pytest.raises(ConfigError, match="model") as err:
        load_config(path)
    assert len(str(err.value)) < 500
    path.write_text(f"model:\n  hidden_size: 64\n  name: 'x\n  bad: {'y' * 100_000}\n")
    with pytest.raises(ConfigError, match="not valid") as err:
        load_config(path)
    assert len(str(err.value)) < 1000
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[f"--run.dir_{'z' * 100_000}=1"])
    assert len(str(err.value)) < 500
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[f"--training.precision={'p' * 100_000}"])
    assert len(str(err.value)) < 500
