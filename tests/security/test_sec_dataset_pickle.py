"""Issue 21 item 1: a split whose index declares a ``pkl`` column (or any column the soda-mega
writer does not write) never reaches streaming's decoders. Before the reader contract,
``data inspect``, ``data inspect --verify`` (which said "OK"), ``train`` (and its loader
workers) and ``eval nll`` unpickled it: the planted object created a marker file and the
commands exited 0."""

from __future__ import annotations

import pytest

from sec_dataset_helpers import (
    assert_refused,
    cli,
    edit_index,
    main_in_process,
    plain_split,
    tiny_layout,
    write_pickle_split,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``root/extra`` (a ``payload: pkl`` column in train and valid), ``root/record_id``
    (``record_id`` re-declared ``pkl``); the marker is what unpickling creates."""
    root = tmp_path_factory.mktemp("pickle")
    marker = root / "PWNED"
    layout = tiny_layout()
    for mode in ("extra", "record_id"):
        for split in ("train", "valid"):
            write_pickle_split(root / mode / split, layout, marker, split=split, mode=mode)
    return root, marker


@pytest.mark.parametrize("mode", ["extra", "record_id"])
@pytest.mark.parametrize("verify", [False, True], ids=["inspect", "verify"])
def test_inspect_refuses_a_pickle_column(planted, mode, verify):
    root, marker = planted
    marker.unlink(missing_ok=True)  # each command is judged on its own
    proc = cli("data", "inspect", str(root / mode), *(["--verify"] if verify else []))
    assert not marker.exists(), "the dataset's pickle ran"
    line = assert_refused(proc, str(root / mode), "shard.00000.mds", "pkl")
    assert "train" in line


@pytest.mark.parametrize("change, field", [
    (lambda s: s["column_encodings"].__setitem__(s["column_names"].index("tokens"), "json"),
     "column_encodings"),
    (lambda s: (s["column_names"].append("extra"), s["column_encodings"].append("json"),
                s["column_sizes"].append(None)), "column_names"),
    (lambda s: s.__setitem__("format", "json"), "format"),
    (lambda s: s.__setitem__("column_names", ["doc_type", "loss_mask", "record", "tokens"]),
     "column_names"),
])
def test_inspect_refuses_columns_the_writer_does_not_write(tmp_path, capsys, change, field):
    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout())
    edit_index(root / "train", lambda idx: [change(s) for s in idx["shards"]] and None)
    assert_refused(main_in_process(capsys, "data", "inspect", str(root)), str(root / "train"),
                   "shard.00000.mds", field)


def test_train_with_loader_workers_refuses_a_pickle_column(planted, tmp_path):
    root, marker = planted
    marker.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    proc = cli("train", "--preset", "tiny", f"--data.train={root / 'extra'}", f"--run.dir={run_dir}",
               "--run.max_steps=1", "--run.eval_interval=0", "--run.tensorboard=false",
               "--data.num_workers=2", "--model.seq_length=64")
    assert not marker.exists(), "the dataset's pickle ran"
    assert_refused(proc, str(root / "extra"), "shard.00000.mds", "pkl")


def test_eval_nll_refuses_a_pickle_column(planted, tmp_path):
    from checkpoint_helpers import make_tiny_checkpoint

    root, marker = planted
    marker.unlink(missing_ok=True)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    proc = cli("eval", "nll", str(ckpt), "--data", str(root / "record_id"), "--max-batches", "1")
    assert not marker.exists(), "the dataset's pickle ran"
    assert_refused(proc, str(root / "record_id"), "shard.00000.mds", "pkl")
