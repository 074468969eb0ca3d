"""A checkpoint or a scaling manifest cannot choose this machine's cache folder (issue 32, item 1).

Before the fix, a ``trainer_state.json`` whose config set ``data.cache_dir`` to any folder and
``data.cache_limit=1`` made ``eval nll CKPT --data ...`` exit 0 after cache eviction had deleted
every ``shard.*`` file under that folder (an unrelated ``project/src/shard.py`` too). A scaling
manifest's run configs could set the same fields for every run of a sweep. Such settings name
places of this machine: they come from the user's command line (or defaults), never from a file
made elsewhere; and eviction deletes only files the cache wrote itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sec_ckpt_helpers import hostile_copy, replace_file, run_cli_cases, tiny_checkpoint, tiny_dataset

pytestmark = pytest.mark.distributed  # launches the CLI in a subprocess

VICTIMS = ("shard.00000.mds", "shard.notes.txt", "project/src/shard.py", "project/shard.00001.mds")


def _victim_folder(root: Path) -> dict[str, bytes]:
    files = {}
    for rel in VICTIMS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"precious {rel}\n".encode())
        files[rel] = path.read_bytes()
    return files


def _with_data_fields(source: Path, dest: Path, **fields) -> Path:
    """A copy of the checkpoint ``source`` whose configuration's data section has ``fields``
    (what someone else's checkpoint may record), its manifest signed again."""
    from soda_mega.checkpoint.manifest import write_manifest

    step = hostile_copy(source, dest)
    state = json.loads((step / "trainer_state.json").read_text())
    state["config"]["data"].update(fields)
    replace_file(step / "trainer_state.json", json.dumps(state))
    replace_file(step / "manifest.json", b"")
    write_manifest(step)
    return step


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_checkpoint_cache_settings_are_not_used(tmp_path_factory, tmp_path):
    victim = tmp_path / "victim"
    files = _victim_folder(victim)
    before = _listing(victim)
    step = _with_data_fields(tiny_checkpoint(tmp_path_factory), tmp_path / "run" / "step_00000000",
                             cache_dir=str(victim), cache_limit=1)
    data = tiny_dataset(tmp_path / "data")
    own = tmp_path / "own-cache"
    [result] = run_cli_cases([["eval", "nll", str(step), "--data", str(data), "--quiet"]],
                             tmp_path, each=300, env={"SODA_MEGA_CACHE": str(own)})
    err = result["stderr"]
    assert result["rc"] == 0, err[-3000:]
    # Nothing deleted, changed or added in the folder the checkpoint named.
    assert _listing(victim) == before, (before, _listing(victim))
    assert all((victim / rel).read_bytes() == body for rel, body in files.items())
    # The user's cache (here $SODA_MEGA_CACHE) served the evaluation instead, and one line says so.
    assert own.is_dir() and any(own.iterdir())
    notices = [line for line in err.splitlines() if "data.cache_dir" in line]
    # (a long path is quoted abbreviated in the middle: its end names the folder)
    assert len(notices) == 1 and f"{victim.name}'" in notices[0] and "not used" in notices[0], \
        err[-3000:]


def _train_config(argv: list[str]):
    """The configuration ``soda-mega train`` resolves from a sweep's command line."""
    from soda_mega.config import load_config

    train = argv[argv.index("train") + 1:]
    config = train[train.index("--config") + 1]
    overrides = [a for a in train if a.startswith("--") and a != "--config"]
    return load_config(config, None, overrides)


def test_manifest_run_configs_cannot_set_cache_or_run_folders(tmp_path, capsys):
    from soda_mega.scaling.grid import base_config, load_grid, plan_grid, write_grid
    from soda_mega.scaling.manifest import read_manifest
    from soda_mega.scaling.sweep import train_command

    spec = load_grid("micro", {"budgets": [1e12]})
    manifest = read_manifest(write_grid(plan_grid(spec, base_config(spec)), tmp_path / "sweep",
                                        {"config": None}))
    victim = tmp_path / "victim"
    run = manifest.runs[0]
    config = manifest.config_path(run)
    text = yaml.safe_load(config.read_text())
    text.setdefault("data", {}).update(cache_dir=str(victim), cache_limit=1)
    text.setdefault("run", {})["dir"] = str(victim / "run")
    config.write_text(yaml.safe_dump(text))

    cfg = _train_config(train_command(manifest, run))
    assert cfg.data.cache_dir is None and cfg.data.cache_limit == 0
    assert Path(cfg.run.dir) == manifest.run_dir(run).resolve()
    # The user's own values (the sweep's overrides) still apply.
    mine = tmp_path / "mine"
    cfg = _train_config(train_command(manifest, run, overrides=[f"--data.cache_dir={mine}",
                                                                 "--data.cache_limit=4096"]))
    assert cfg.data.cache_dir == str(mine) and cfg.data.cache_limit == 4096
    assert not victim.exists()


def test_sweep_dry_run_says_which_manifest_settings_are_ignored(tmp_path, capsys):
    from soda_mega.cli import main
    from soda_mega.scaling.grid import base_config, load_grid, plan_grid, write_grid
    from soda_mega.scaling.manifest import read_manifest

    spec = load_grid("micro", {"budgets": [1e12]})
    path = write_grid(plan_grid(spec, base_config(spec)), tmp_path / "sweep", {"config": None})
    manifest = read_manifest(path)
    config = manifest.config_path(manifest.runs[0])
    text = yaml.safe_load(config.read_text())
    text.setdefault("data", {})["cache_dir"] = "/somewhere/else"
    config.write_text(yaml.safe_dump(text))
    assert main(["scaling", "sweep", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "data.cache_dir" in line]
    assert len(lines) == 1 and str(config) in lines[0] and "/somewhere/else" in lines[0], err
    assert os.path.basename(str(config)) in lines[0]
    # A setting the user gives the sweep is theirs: nothing to say about it.
    assert main(["scaling", "sweep", str(path), "--dry-run", "--data.cache_dir=/mine"]) == 0
    assert "data.cache_dir" not in capsys.readouterr().err


def test_eviction_deletes_only_files_the_cache_wrote(tmp_path):
    """A cache folder that also holds other files (a user's mistake, or an old cache): eviction
    removes only entries of the cache's own index, never a file because of its name."""
    from soda_mega.data.read.cache import NodeCache

    root = tmp_path / "cache"
    files = _victim_folder(root)
    cache = NodeCache(root, limit=150)
    for i in range(3):
        cache.publish(root / "d" / f"shard.{i:05d}.mds", lambda t: t.write_bytes(b"y" * 100))
    assert all((root / rel).read_bytes() == body for rel, body in files.items())
    assert sorted(p.name for p in (root / "d").glob("shard.*.mds")) == ["shard.00002.mds"]
    assert cache.evicted == 2 and cache.usage() == 100
