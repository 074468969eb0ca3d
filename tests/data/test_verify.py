"""Verified data on read and data errors that name what is wrong (issue 14 items 3 and 7,
issue 12 item 6): each of these failed on the previous loader with a bare traceback, a wrong
file, or silently trained on damaged data."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from soda_mega.config import load_config
from soda_mega.data.read.loader import SodaDataLoader
from soda_mega.data.read.source import DatasetError, DocumentSource, MissingSplitError
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

SEQ = 32


@pytest.fixture(scope="module")
def layout():
    return VocabLayout.from_config(load_config(preset="tiny").vocab)


@pytest.fixture
def dataset(tmp_path, layout):
    def make(name="ds", n=30, hashes=None, docs=None, masks=None, **kw):
        docs = docs if docs is not None else random_docs(layout, n, 10, 60, 3, "speech")
        write_split(tmp_path / name / "train", layout, docs, "speech", masks=masks, hashes=hashes, **kw)
        return tmp_path / name
    return make


def _cfg(*roots, extra=(), workers=0):
    return load_config(preset="tiny", overrides=[
        f"--data.train={','.join(map(str, roots))}", f"--model.seq_length={SEQ}",
        "--training.global_batch_size=2", "--training.micro_batch_size=2",
        f"--data.num_workers={workers}", *extra])


def _read_all(root, extra=(), workers=0, batches=60):
    loader = SodaDataLoader(_cfg(root, extra=extra, workers=workers), dp_rank=0, dp_size=1,
                            needs_data=True)
    return loader, list(itertools.islice(iter(loader), batches))


def test_truncated_meta_and_lengths_are_named(dataset):
    root = dataset()
    meta = root / "train" / "soda_meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(DatasetError, match=r"soda_meta\.json is not valid JSON"):
        DocumentSource(root)
    root2 = dataset("b")
    lengths = root2 / "train" / "doc_lengths.npy"
    lengths.write_bytes(lengths.read_bytes()[:150])
    with pytest.raises(DatasetError, match=r"doc_lengths\.npy is not a valid \.npy array"):
        DocumentSource(root2)


def test_deleted_shard_is_named_at_open(dataset):
    root = dataset()
    (root / "train" / "shard.00001.mds").unlink()
    with pytest.raises(DatasetError, match=r"shard\.00001\.mds .*missing"):
        DocumentSource(root)


def test_empty_dataset_and_no_dataset(dataset, tmp_path):
    root = dataset(docs=[])
    with pytest.raises(DatasetError, match="holds no documents"):
        DocumentSource(root)
    with pytest.raises(DatasetError, match="no datasets given"):
        SodaDataLoader(load_config(preset="tiny"), dp_rank=0, dp_size=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_garbled_shard_without_hashes_is_named(dataset, workers):
    root = dataset()
    shard = root / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"ds \(train\), shard shard\.00001\.mds, document \d+"):
        _read_all(root, workers=workers)


def test_truncated_shard_is_named(dataset):
    root = dataset()
    shard = root / "train" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"shard shard\.00000\.mds, document \d+"):
        _read_all(root)


def test_local_shard_hash_mismatch_is_named(dataset):
    root = dataset(hashes=["xxh64"])
    shard = root / "train" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard shard\.00000\.mds: .*xxh64 hash"):
        _read_all(root)


def test_bad_ids_and_masks_stop_the_run_or_are_skipped_and_counted(dataset, layout):
    docs = random_docs(layout, 30, 10, 60, 3, "speech")
    masks = [np.ones(len(d), np.uint8) for d in docs]
    docs[4] = docs[4].copy()
    docs[4][3] = layout.size + 5  # an id past the layout
    masks[7] = masks[7].copy()
    masks[7][2] = 120             # a loss-mask byte that would weight a token 120 times
    root = dataset(docs=docs, masks=masks)
    with pytest.raises(DatasetError, match=r"document (4|7)"):
        _read_all(root)
    loader, batches = _read_all(root, extra=["--data.skip_bad_documents=true"])
    assert loader.sources[0].bad_documents == 2
    for b in batches:
        assert int(b["tokens"].max()) < layout.size and float(b["loss_mask"].max()) <= 1.0


def test_resume_with_other_datasets_is_refused_naming_them(dataset, layout):
    a = dataset("a")
    b = dataset("b", docs=random_docs(layout, 30, 10, 60, 9, "speech"))
    weights = ["--data.weights=[1.0]"]
    saved = SodaDataLoader(_cfg(a, extra=weights), dp_rank=0, dp_size=1, needs_data=True).state_dict()
    other = SodaDataLoader(_cfg(b, extra=weights), dp_rank=0, dp_size=1, needs_data=True)
    with pytest.raises(DatasetError, match=r"other datasets.*saved .*/a .*now .*/b"):
        other.load_state_dict(saved)
    # the same path with other contents is refused too
    shutil.rmtree(a)
    dataset("a", docs=random_docs(layout, 30, 10, 60, 11, "speech"))
    again = SodaDataLoader(_cfg(a, extra=weights), dp_rank=0, dp_size=1, needs_data=True)
    with pytest.raises(DatasetError, match="other datasets"):
        again.load_state_dict(saved)


def test_valid_split_of_another_vocabulary_is_an_error_not_a_missing_split(dataset, tmp_path):
    root = dataset()
    other = VocabLayout.from_config(load_config(preset="tiny", overrides=["--vocab.num_codebooks=4"]).vocab)
    write_split(root / "valid", other, random_docs(other, 5, 10, 40, 1, "speech"), "speech",
                split="valid")
    with pytest.raises(DatasetError, match="another vocabulary layout") as err:
        SodaDataLoader(_cfg(root), "valid", dp_rank=0, dp_size=1, num_workers=0)
    assert not isinstance(err.value, MissingSplitError)
    with pytest.raises(MissingSplitError):
        SodaDataLoader(_cfg(dataset("novalid")), "valid", dp_rank=0, dp_size=1, num_workers=0)


def test_compressed_local_shards_are_decompressed_into_the_cache_only(dataset, tmp_path):
    root = dataset(compression="zstd", hashes=["xxh64"])
    before = sorted(p.name for p in (root / "train").iterdir())
    loader, batches = _read_all(root, extra=[f"--data.cache_dir={tmp_path / 'cache'}"], batches=10)
    assert sorted(p.name for p in (root / "train").iterdir()) == before
    assert list((tmp_path / "cache").rglob("shard.*.mds"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    index = json.loads((root / "train" / "index.json").read_text())
    assert index["shards"][0]["raw_data"]["hashes"]


def test_inspect_verify_names_every_damaged_shard_and_document(dataset, layout, capsys):
    from soda_mega.cli import main

    good = dataset("good", hashes=["xxh64"])
    assert main(["data", "inspect", str(good), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    docs = random_docs(layout, 30, 10, 60, 3, "speech")
    docs[5] = docs[5].copy()
    docs[5][1] = -3
    bad = dataset("bad", docs=docs, hashes=["xxh64"])
    shard = bad / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "inspect", str(bad), "--verify"]) == 2
    out = capsys.readouterr().out
    assert "shard shard.00000.mds, document 5: token id -3" in out
    assert "shard shard.00001.mds" in out and "xxh64" in out
    assert "2 problem(s) found" in out


def test_training_on_a_damaged_document_exits_2_naming_it(dataset, layout, tmp_path):
    import subprocess
    import sys

    from launch_env import clean_env

    docs = random_docs(layout, 30, 10, 60, 3, "speech")
    masks = [np.ones(len(d), np.uint8) for d in docs]
    masks[6] = masks[6].copy()
    masks[6][1] = 7
    root = dataset(docs=docs, masks=masks)
    cmd = [sys.executable, "-m", "soda_mega.cli", "train", "--preset", "tiny", f"--data.train={root}",
           f"--run.dir={tmp_path / 'run'}", "--run.max_steps=12", "--run.eval_interval=0",
           "--run.save_interval=0", "--run.tensorboard=false", f"--model.seq_length={SEQ}",
           "--training.global_batch_size=8", "--training.micro_batch_size=2", "--data.num_workers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "shard shard.00000.mds, document 6: loss mask value 7" in proc.stderr
