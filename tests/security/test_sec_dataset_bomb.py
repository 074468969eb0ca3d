"""Issue 21 item 3: a compressed shard is inflated only up to the size its index declares,
and that size must fit the documents ``doc_lengths.npy`` says the shard holds. Before the
reader contract a few-KB zstd shard that inflated to many MB (hashes correct) was accepted,
decompressed whole in memory and left in the node cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import zstd

from sec_dataset_helpers import REPO, edit_index, plain_split, tiny_layout, xxh64

INFLATED = 96 << 20  # bytes the planted shard inflates to (real shards here are a few KB)


def _peak_rss_mb(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``soda-mega ARGS`` from a small wrapper that reports its child's peak RSS."""
    code = ("import resource, subprocess, sys; "
            "p = subprocess.run([sys.executable, '-m', 'soda_mega.cli', *sys.argv[1:]]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(p.returncode)")
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(REPO))
    peak = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("PEAK ")][0] / 1024
    return proc, peak


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """A clean zstd split, and two bombs of it: shard 0 padded with zeros to INFLATED bytes
    (xxh64 of the inflated bytes recorded), its index declaring the true size ("honest") or
    the original size ("lying")."""
    base = tmp_path_factory.mktemp("bomb")
    layout = tiny_layout()
    out = {}
    for name in ("clean", "honest", "lying"):
        split = plain_split(base / name / "train", layout, compression="zstd", n=6)
        if name != "clean":
            raw = zstd.decompress((split / "shard.00000.mds.zstd").read_bytes())
            inflated = raw + bytes(INFLATED - len(raw))
            packed = zstd.compress(inflated, 19)
            (split / "shard.00000.mds.zstd").write_bytes(packed)
            digest, packed_digest = xxh64(inflated), xxh64(packed)

            def change(index, name=name, digest=digest, packed_digest=packed_digest, packed=packed):
                shard = index["shards"][0]
                shard["raw_data"]["hashes"]["xxh64"] = digest
                shard["zip_data"]["hashes"]["xxh64"] = packed_digest
                shard["zip_data"]["bytes"] = len(packed)
                if name == "honest":
                    shard["raw_data"]["bytes"] = INFLATED
            edit_index(split, change)
            assert len(packed) < 64 << 10
        out[name] = base / name
    return out


def test_clean_split_is_read(bombs, tmp_path):
    env = dict(os.environ, SODA_MEGA_CACHE=str(tmp_path / "cache"))
    proc, _ = _peak_rss_mb(["data", "inspect", str(bombs["clean"])], env)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name, needle", [("honest", "raw_data.bytes"), ("lying", "raw_data.bytes")])
def test_bomb_is_refused_without_inflating_it(bombs, tmp_path, name, needle):
    env = dict(os.environ, SODA_MEGA_CACHE=str(tmp_path / "cache"))
    _, clean_peak = _peak_rss_mb(["data", "inspect", str(bombs["clean"])], env)
    proc, peak = _peak_rss_mb(["data", "inspect", str(bombs[name])], env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    lines = [x for x in text.splitlines() if str(bombs[name] / "train") in x and needle in x
             and "shard.00000.mds" in x]
    assert lines, text[-3000:]
    # Never inflated: no more memory than reading the clean split (plus a margin far below the bomb).
    assert peak < clean_peak + 32, (peak, clean_peak)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    assert not cached, f"inflated bytes left in the cache: {cached}"
