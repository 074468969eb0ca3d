"""``soda-mega eval nll``: against an fp64 reference, across parallel layouts, and on bad inputs.

The reference scores the same windows with the plain-PyTorch decoder in fp64
(:class:`~soda_mega.inference.decoder.SodaDecoder`, itself tested against the Megatron model),
cutting the windows straight from the documents written to disk, so neither the loader, nor
Megatron's loss, nor the bucket code is trusted by it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_helpers import random_full_weights, tiny_config
from launch_env import clean_env
from soda_mega.checkpoint.weights import save_full_weights
from soda_mega.cli import main
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.eval.nll import bucket_names, bucket_stats
from soda_mega.inference.decoder import SodaDecoder
from soda_mega.tokens import VocabLayout
from tolerances import PARALLEL_FP32, REFERENCE_NLL_FP32

SEED = 3
# Larger random weights than the default: per-token losses spread widely (NLL ~12 nats).
STD = 2.0
# A large z-loss weight: if the evaluation counted it, every NLL would move by ~1 nat.
CKPT_OVERRIDES = ("--training.z_loss=0.01",)
SEQ, MICRO = 128, 2  # the tiny preset's window and micro-batch


def _layout() -> VocabLayout:
    return VocabLayout.from_config(tiny_config().vocab)


def mixed_docs(layout: VocabLayout, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Interleaved documents (text, special ids, frame-major audio) with masked text prompts."""
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for i in range(n):
        text = [layout.text_start, *rng.integers(0, 256, int(rng.integers(4, 40))), layout.text_end]
        codes = torch.from_numpy(rng.integers(0, layout.codebook_size,
                                              (layout.num_codebooks, int(rng.integers(2, 14)))))
        audio = [layout.audio_start, *layout.codes_to_ids(codes).tolist(), layout.audio_end]
        body = text + audio if i % 2 else audio + text
        doc = np.array([layout.bos_id, *body, layout.eos_id], np.int32)
        mask = np.ones(len(doc), np.uint8)
        if i % 3 == 0:  # a text prompt that is not scored
            start = 1 if i % 2 else 1 + len(audio)
            mask[start:start + len(text)] = 0
        docs.append(doc)
        masks.append(mask)
    return docs, masks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = tiny_config(*CKPT_OVERRIDES)
    return save_full_weights(tmp_path_factory.mktemp("ckpt"), cfg, random_full_weights(cfg, SEED, STD),
                             {"test_seed": SEED})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """``root/mixed`` (interleaved, masked; the reference reads its docs) and ``root/text``."""
    root = tmp_path_factory.mktemp("corpus")
    layout = _layout()
    docs, masks = mixed_docs(layout, 30, seed=1)
    write_split(root / "mixed" / "valid", layout, docs, "speech", split="valid", masks=masks)
    train_docs, train_masks = mixed_docs(layout, 20, seed=2)
    write_split(root / "mixed" / "train", layout, train_docs, "speech", masks=train_masks)
    write_split(root / "text" / "valid", layout, random_docs(layout, 8, 20, 300, 4, "text"), "text",
                split="valid")
    write_split(root / "text" / "train", layout, random_docs(layout, 8, 20, 300, 5, "text"), "text")
    return root, docs, masks


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["eval", "nll", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def reference_buckets(docs, masks) -> dict[str, tuple[float, int]]:
    """fp64 NLL sums and counts per bucket over the windows one pass of the loader cuts."""
    cfg = tiny_config(*CKPT_OVERRIDES)
    layout = VocabLayout.from_config(cfg.vocab)
    stream, mask = np.concatenate(docs), np.concatenate(masks)
    windows = (len(stream) - 1) // SEQ // MICRO * MICRO
    x = torch.from_numpy(np.stack([stream[w * SEQ:w * SEQ + SEQ + 1] for w in range(windows)])).long()
    m = torch.from_numpy(np.stack([mask[w * SEQ + 1:w * SEQ + SEQ + 1] for w in range(windows)])) > 0
    decoder = SodaDecoder(cfg, random_full_weights(cfg, SEED, std=STD), dtype=torch.float64).eval()
    with torch.no_grad():
        logp = torch.log_softmax(decoder(x[:, :-1]).double(), dim=-1)
    labels = x[:, 1:]
    nll = -logp.gather(-1, labels[..., None])[..., 0]
    audio = labels - layout.audio_base
    codebook = torch.where(audio >= 0, audio // layout.codebook_size, -1)
    select = {"text": labels < layout.audio_base, "semantic": codebook == 0, "acoustic": codebook >= 1}
    select.update({f"codebook_{k}": codebook == k for k in range(layout.num_codebooks)})
    out = {name: (float(nll[sel & m].sum()), int((sel & m).sum())) for name, sel in select.items()}
    out["overall"] = (float(nll[m].sum()), int(m.sum()))
    out["_windows"] = (0.0, windows)
    return out


def test_bucket_stats_of_hand_made_labels():
    layout = _layout()
    a, c = layout.audio_base, layout.codebook_size
    labels = torch.tensor([[5, layout.text_end, a + 3, a + c + 1, a + 7 * c, a + 2 * c,
                            layout.size + 1, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 1]])
    loss = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]])
    stats = bucket_stats(layout, labels, mask, loss)
    got = dict(zip(bucket_names(layout.num_codebooks), zip(stats[0].tolist(), stats[1].tolist())))
    assert got["text"] == (131.0, 3)       # text ids 5 and 9 and the special <|text_end|>
    assert got["semantic"] == (4.0, 1)
    assert got["acoustic"] == (24.0, 2)  # codebook 2 is masked; an id past the vocabulary never counts
    assert (got["codebook_0"], got["codebook_1"], got["codebook_7"]) == ((4.0, 1), (8.0, 1), (16.0, 1))
    assert got["codebook_2"] == (0.0, 0)


def test_matches_the_fp64_reference(checkpoint, corpus, tmp_path, capsys):
    root, docs, masks = corpus
    rc, out, err = _eval(capsys, str(checkpoint), "--data", str(root / "mixed"),
                         "--out", str(tmp_path / "report.json"))
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    ref = reference_buckets(docs, masks)
    assert report["windows"] == ref.pop("_windows")[1]
    for name, (loss_sum, count) in ref.items():
        got = report["buckets"][name]
        assert got["tokens"] == count, name
        assert got["nll"] == pytest.approx(loss_sum / count, rel=REFERENCE_NLL_FP32), name
        assert got["bits_per_token"] == pytest.approx(got["nll"] / np.log(2))
        assert got["perplexity"] == pytest.approx(np.exp(got["nll"]))
    k = _layout().num_codebooks
    b = report["buckets"]
    tokens = {name: m["tokens"] for name, m in b.items()}
    assert sum(tokens[f"codebook_{i}"] for i in range(k)) == tokens["semantic"] + tokens["acoustic"]
    assert tokens["overall"] == tokens["text"] + tokens["semantic"] + tokens["acoustic"]
    assert report["checkpoint"] == {"path": str(checkpoint), "step": 0, "weights_only": True}
    assert report["data"]["vocab_fingerprint"] == _layout().fingerprint()
    assert report["data"]["datasets"][0]["path"] == str(root / "mixed")
    assert "provenance" in report and "special ids" in report["note"]
    # The printed table carries the same numbers.
    assert f"{b['overall']['nll']:.4f}" in out and "codebook 7 (acoustic)" in out


def test_max_batches_and_json_output(checkpoint, corpus, capsys):
    root, docs, masks = corpus
    rc, out, err = _eval(capsys, str(checkpoint), "--data", str(root / "mixed"), "--max-batches", "2",
                         "--micro-batch-size", "1", "--seq-length", "64", "--json", "--quiet")
    assert rc == 0, err
    report = json.loads(out)
    assert report["windows"] == 2 and report["settings"]["seq_length"] == 64
    assert 0 < report["buckets"]["overall"]["tokens"] <= 128


@pytest.mark.distributed
def test_parallel_layouts_give_the_one_process_report(checkpoint, corpus, tmp_path, capsys):
    """TP=2, PP=2, PP=2 x VP=2 and DP=2 (2 gloo processes) against one process, valid and train.

    A micro-batch of 3 windows makes the micro-batch count odd: DP replicas run different
    numbers of micro-batches and the interleaved schedule gets a padded group.
    """
    root = corpus[0]
    common = [str(checkpoint), "--data", str(root / "mixed"), str(root / "text"),
              "--micro-batch-size", "3"]
    train = ["--split", "train", "--max-batches", "3"]
    layouts = {"tp2": "--parallel.tensor_parallel=2", "pp2": "--parallel.pipeline_parallel=2",
               "vp2": "--parallel.pipeline_parallel=2 --parallel.virtual_pipeline=2",
               "dp2": "", "dp2_train": " ".join(train)}
    reference = {}
    for name, extra in (("valid", []), ("train", train)):
        rc, out, err = _eval(capsys, *common, *extra, "--json", "--quiet")
        assert rc == 0, err
        reference[name] = json.loads(out)
    assert reference["valid"]["windows"] % 3 == 0 and reference["valid"]["windows"] // 3 % 2 == 1
    env = clean_env()
    worker = Path(__file__).with_name("nll_layouts_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(tmp_path), *(f"{n}={a}" for n, a in layouts.items()), "--",
           "eval", "nll", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for name in layouts:
        got = json.loads((tmp_path / f"{name}.json").read_text())
        want = reference["train" if name.endswith("train") else "valid"]
        assert got["windows"] == want["windows"], name
        for bucket, metrics in want["buckets"].items():
            assert got["buckets"][bucket]["tokens"] == metrics["tokens"], (name, bucket)
            if metrics["tokens"]:
                assert got["buckets"][bucket]["nll"] == pytest.approx(
                    metrics["nll"], rel=PARALLEL_FP32["loss_rtol"]), (name, bucket)
    assert json.loads((tmp_path / "vp2.json").read_text())["settings"]["layout"] == {
        "tp": 1, "pp": 2, "vp": 2, "dp": 1}


def test_not_a_checkpoint(corpus, tmp_path, capsys):
    rc, _, err = _eval(capsys, str(tmp_path), "--data", str(corpus[0] / "mixed"))
    assert rc == 2
    assert "not a soda-mega checkpoint" in err


def test_dataset_of_another_vocabulary_layout(checkpoint, tmp_path, capsys):
    other = VocabLayout.from_config(tiny_config("--vocab.num_codebooks=4").vocab)
    write_split(tmp_path / "k4" / "valid", other, random_docs(other, 4, 20, 100, 0, "speech"),
                "speech", split="valid")
    rc, _, err = _eval(capsys, str(checkpoint), "--data", str(tmp_path / "k4"))
    assert rc == 2
    assert "another vocabulary layout" in err and "num_codebooks: dataset 4 != model 8" in err


def test_dataset_without_the_split(checkpoint, corpus, tmp_path, capsys):
    layout = _layout()
    write_split(tmp_path / "only_train" / "train", layout, random_docs(layout, 4, 20, 100, 0, "text"),
                "text")
    rc, _, err = _eval(capsys, str(checkpoint), "--data", str(tmp_path / "only_train"))
    assert rc == 2
    assert "has no 'valid' split" in err
    rc, _, err = _eval(capsys, str(checkpoint), "--data", str(tmp_path / "missing"))
    assert rc == 2 and "no such folder" in err


def test_refuses_model_overrides_and_an_unbounded_train_split(checkpoint, corpus, capsys):
    data = str(corpus[0] / "mixed")
    rc, _, err = _eval(capsys, str(checkpoint), "--data", data, "--model.num_layers=2")
    assert rc == 2 and "model.num_layers" in err and "come from the checkpoint" in err
    rc, _, err = _eval(capsys, str(checkpoint), "--data", data, "--split", "train")
    assert rc == 2 and "--max-batches" in err


def test_a_dataset_with_an_empty_valid_split(checkpoint, corpus, tmp_path, capsys):
    """Issue 33 (item 2, for eval nll): a small build's empty valid split is left out, said once,
    and the other datasets are evaluated as without it; with nothing else there is nothing to
    evaluate: one line, exit 2 (as `data inspect --split valid` on such a dataset)."""
    layout = _layout()
    small = tmp_path / "small"
    write_split(small / "train", layout, random_docs(layout, 4, 20, 100, 0, "text"), "text")
    write_split(small / "valid", layout, [], "text", split="valid")
    text = str(corpus[0] / "text")
    rc, alone, _ = _eval(capsys, str(checkpoint), "--data", text, "--max-batches", "1", "--quiet",
                       "--json")
    assert rc == 0
    rc, out, err = _eval(capsys, str(checkpoint), "--data", str(small), text, "--max-batches", "1",
                       "--quiet", "--json")
    assert rc == 0, err
    assert json.loads(out)["buckets"] == json.loads(alone)["buckets"]
    assert err.count(f"{small}/valid: the valid split holds no documents") == 1, err
    assert "leaves out" in err
    rc, out, err = _eval(capsys, str(checkpoint), "--data", str(small), "--quiet")
    assert rc == 2 and out == ""
    assert err.splitlines() == [
        f"soda-mega eval nll: nothing to evaluate: {small}/valid: the valid split holds no "
        "documents (evaluate --split train --max-batches N, or build with a larger "
        "--data.valid_fraction)"], err
