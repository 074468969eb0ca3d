"""The packed, weighted-mixture loader: packing, proportions, ranks, resume, validation, errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from soda_mega.config import load_config
from soda_mega.data.read.loader import BatchGeometry, SodaDataLoader
from soda_mega.data.read.mixture import MixturePlan
from soda_mega.data.read.source import DatasetError
from soda_mega.data.write.synthetic import random_docs, write_split
from soda_mega.tokens import VocabLayout

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two speech datasets and one text dataset, each with train and valid splits."""
    root = tmp_path_factory.mktemp("corpus")
    cfg = load_config(preset="tiny")
    layout = VocabLayout.from_config(cfg.vocab)
    docs = {}
    for name, kind, n, lo, hi, seed in (("speechA", "speech", 60, 20, 200, 1),
                                        ("speechB", "speech", 40, 50, 150, 2),
                                        ("text", "text", 80, 5, 60, 3)):
        docs[name] = random_docs(layout, n, lo, hi, seed, kind)
        write_split(root / name / "train", layout, docs[name], kind)
        write_split(root / name / "valid", layout, random_docs(layout, 6, lo, hi, seed + 10, kind),
                    kind, split="valid")
    return root, layout, docs


def _cfg(corpus, *extra, gbs=8, mbs=2, workers=0):
    root, _, _ = corpus
    train = ",".join(str(root / n) for n in ("speechA", "speechB", "text"))
    return load_config(preset="tiny", overrides=[
        f"--data.train={train}", f"--model.seq_length={SEQ}", f"--training.global_batch_size={gbs}",
        f"--training.micro_batch_size={mbs}", f"--data.num_workers={workers}", *extra])


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _stream(batches):
    """Concatenate windows back into the packed token stream (windows overlap by one token)."""
    parts = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            parts.append(b["tokens"][row].numpy())
    last = batches[-1]["labels"][-1, -1:].numpy()
    return np.concatenate(parts + [last])


def _documents_in(stream, layout, docs):
    """Split at BOS and identify each complete document by content."""
    index = {d.tobytes(): (name, i) for name, ds in docs.items() for i, d in enumerate(ds)}
    starts = np.flatnonzero(stream == layout.bos_id)
    found = []
    for a, b in zip(starts[:-1], starts[1:]):
        found.append(index.get(stream[a:b].astype(np.int32).tobytes()))
    return found


def test_windows_pack_whole_documents_in_order(corpus):
    _, layout, docs = corpus
    loader = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    batches = _take(loader, 40)
    for b in batches:
        assert b["tokens"].shape == (2, SEQ) and b["labels"].shape == (2, SEQ)
        assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])
        assert torch.equal(b["modality"], layout.modality(b["labels"]))
        assert torch.equal(b["position_ids"][0], torch.arange(SEQ))
    # Consecutive windows share exactly one token: row r's last label is row r+1's first token.
    flat_tokens = torch.cat([b["tokens"] for b in batches])
    flat_labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(flat_labels[:-1, -1], flat_tokens[1:, 0])
    found = _documents_in(_stream(batches), layout, docs)
    assert found and None not in found, "every complete document must be a source document, whole"
    assert len(set(found)) == len(found), "no document repeats within its first epoch"


def test_mixture_proportions_within_one_percent(corpus):
    cfg = _cfg(corpus, "--data.weights=[0.6,0.3,0.1]", gbs=16, mbs=4)
    loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=False)
    plan = loader.plan
    counts = np.zeros(3)
    longest = max(int(np.asarray(s.lengths).max()) for s in loader.sources)
    for w in range(3000):
        pieces = plan.window(w)
        for s, _, a, b in pieces:
            counts[s] += b - a
        counts[pieces[-1][0]] -= 1  # the overlap token is counted again in the next window
        if (w + 1) % 16 == 0:  # at every global step: within about one document per stream
            target = np.array([0.6, 0.3, 0.1]) * counts.sum()
            assert np.abs(counts - target).max() <= 2 * longest, (w, counts, target)
    shares = counts / counts.sum()
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.01, shares


def test_default_mixture_gives_text_fraction(corpus):
    loader = SodaDataLoader(_cfg(corpus, "--data.text_fraction=0.05"), dp_rank=0, dp_size=1,
                            needs_data=False)
    kinds = [s.kind for s in loader.sources]
    text_weight = sum(w for w, k in zip(loader.weights, kinds) if k == "text") / sum(loader.weights)
    assert text_weight == pytest.approx(0.05)
    speech = [(w, s.num_tokens) for w, s in zip(loader.weights, loader.sources) if s.kind != "text"]
    assert speech[0][0] / speech[1][0] == pytest.approx(speech[0][1] / speech[1][1])


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_ranks_split_the_global_batch(corpus, dp_size):
    single = _take(SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True), 8)
    per_rank = [_take(SodaDataLoader(_cfg(corpus), dp_rank=r, dp_size=dp_size, needs_data=True),
                      8 // dp_size) for r in range(dp_size)]
    # Step s: rank r's micro-batches are its contiguous slice of the one-process global batch.
    for step in range(2):
        whole = torch.cat([b["tokens"] for b in single[step * 4:(step + 1) * 4]])
        n = 4 // dp_size
        parts = torch.cat([torch.cat([b["tokens"] for b in per_rank[r][step * n:(step + 1) * n]])
                           for r in range(dp_size)])
        assert torch.equal(parts, whole)
    seen = [{tuple(row.tolist()) for b in batches for row in b["tokens"]} for batches in per_rank]
    assert all(not (a & b) for a, b in itertools.combinations(seen, 2)), "DP replicas overlap"


def test_stages_without_data_do_not_read(corpus):
    loader = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=False)
    assert _take(loader, 3) == [None, None, None]


@pytest.mark.parametrize("workers_after", [0, 2])
def test_exact_resume_twice_and_with_other_workers(corpus, workers_after):
    cfg = _cfg(corpus)
    reference = _take(SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True), 12)

    first = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    got = _take(first, 4)
    state = first.state_dict()
    second = SodaDataLoader(_cfg(corpus, workers=workers_after), dp_rank=0, dp_size=1, needs_data=True)
    second.load_state_dict(state)
    got += _take(second, 4)
    third = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    third.load_state_dict(second.state_dict())
    got += _take(third, 4)
    for a, b in zip(reference, got, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_resume_on_another_data_parallel_size(corpus):
    cfg = _cfg(corpus)
    one = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    _take(one, 4)  # one step of 4 micro-batches
    state = one.state_dict()
    reference = _take(one, 4)  # step 2 on one process
    halves = []
    for rank in range(2):
        loader = SodaDataLoader(cfg, dp_rank=rank, dp_size=2, needs_data=True)
        loader.load_state_dict(state)
        halves += _take(loader, 2)
    assert torch.equal(torch.cat([b["tokens"] for b in halves]),
                       torch.cat([b["tokens"] for b in reference]))


def test_state_is_rank_independent_and_json_able(corpus):
    states = []
    for rank in range(2):
        loader = SodaDataLoader(_cfg(corpus), dp_rank=rank, dp_size=2, needs_data=True)
        _take(loader, 4)
        states.append(loader.state_dict())
    assert states[0] == states[1]
    assert json.loads(json.dumps(states[0])) == states[0]
    assert states[0]["steps"] == 2 and "plan" not in states[0]  # closed form: the step number
    loader = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    _take(loader, 3)
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        loader.state_dict()


def test_resume_refuses_changed_batch_or_mixture(corpus):
    loader = SodaDataLoader(_cfg(corpus), dp_rank=0, dp_size=1, needs_data=True)
    state = loader.state_dict()
    other = SodaDataLoader(_cfg(corpus, gbs=16), dp_rank=0, dp_size=1, needs_data=True)
    with pytest.raises(ValueError, match="training.global_batch_size"):
        other.load_state_dict(state)
    mixed = SodaDataLoader(_cfg(corpus, "--data.weights=[1,1,1]"), dp_rank=0, dp_size=1, needs_data=True)
    with pytest.raises(ValueError, match="mixture changed"):
        mixed.load_state_dict(state)


def test_validation_reads_each_valid_token_once(corpus):
    root, layout, _ = corpus
    cfg = _cfg(corpus, gbs=2, mbs=1)
    loader = SodaDataLoader(cfg, split="valid", dp_rank=0, dp_size=1, needs_data=True)
    batches = list(loader)
    total = sum(int(np.sum(s.lengths)) for s in loader.sources)
    assert len(batches) == (total - 1) // SEQ  # every full window of the single pass
    train = {tuple(r.tolist()) for b in _take(SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True), 50)
             for r in b["tokens"]}
    assert not train & {tuple(r.tolist()) for b in batches for r in b["tokens"]}
    # Two DP ranks split the validation windows without overlap or loss.
    shards = [list(SodaDataLoader(cfg, split="valid", dp_rank=r, dp_size=2, needs_data=True))
              for r in range(2)]
    assert sum(len(s) for s in shards) in (len(batches), len(batches) - 1)


def test_document_reset_positions_and_mask(corpus):
    _, layout, _ = corpus
    loader = SodaDataLoader(_cfg(corpus, "--data.reset_at_document=true"), dp_rank=0, dp_size=1,
                            needs_data=True)
    batch = _take(loader, 1)[0]
    tokens, pos, mask = batch["tokens"][0], batch["position_ids"][0], batch["attention_mask"][0, 0]
    starts = (tokens == layout.bos_id).nonzero().flatten().tolist()
    assert starts, "need a document start in the window"
    for s in starts:
        assert pos[s] == 0
        if s > 0:
            assert mask[s, s - 1], "attention must not cross into the previous document"
            assert not mask[s, s]
    assert mask[torch.ones_like(mask).triu(1)].all(), "causal"


def test_layout_mismatch_is_refused_with_fields(corpus):
    cfg = _cfg(corpus, "--vocab.num_codebooks=4")
    with pytest.raises(DatasetError, match="num_codebooks: dataset 8 != model 4"):
        SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)


def test_missing_dataset_and_bad_geometry(tmp_path, corpus):
    cfg = load_config(preset="tiny", overrides=[f"--data.train={tmp_path}"])
    with pytest.raises(DatasetError, match="has no .train. split"):
        SodaDataLoader(cfg, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchGeometry(SEQ, 2, 8, 0, 3)


def test_compressed_shards_are_read(tmp_path, corpus):
    _, layout, _ = corpus
    docs = random_docs(layout, 10, 10, 40, 5, "speech")
    write_split(tmp_path / "z" / "train", layout, docs, "speech", compression="zstd")
    cfg = load_config(preset="tiny", overrides=[f"--data.train={tmp_path / 'z'}",
                                                f"--model.seq_length={SEQ}",
                                                "--training.global_batch_size=2"])
    batch = _take(SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True), 1)[0]
    assert batch["tokens"].shape == (2, SEQ)


def test_plan_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        MixturePlan([np.array([3, 4])], [-1.0], 8, seed=0)
    with pytest.raises(ValueError, match="no tokens"):
        MixturePlan([np.array([3]), np.array([], dtype=np.int64)], [1.0, 1.0], 8, seed=0)


# ------------------------------------------------------------------ whole-document packing
def test_whole_packing_never_cuts_a_document_and_pads_with_masked_filler():
    lengths = [np.array([5, 9, 3, 12, 4, 4, 20, 2])]
    plan = MixturePlan(lengths, [1.0], 10, seed=0, shuffle=False, single_pass=True,
                       whole_documents=True)
    windows = []
    while (w := plan.next_window()) is not None:
        windows.append(w)
    for w in windows:
        assert sum(b - a for _, _, a, b in w) == 10
        assert all(a == 0 and b == lengths[0][d] for s, d, a, b in w if s >= 0)  # whole docs
    kept = [d for w in windows for s, d, _, _ in w if s >= 0]
    assert kept == [0, 1, 2, 4, 5, 7]  # each document that fits, once, in order; 12 and 20 left out


def test_whole_packing_loader_masks_padding_resumes_and_counts_epochs(corpus, capsys):
    root, layout, docs = corpus
    cfg = _cfg(corpus, "--data.packing=whole", "--data.reset_at_document=true",
               f"--data.train={root / 'speechA'}")
    loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    too_long = sum(len(d) > SEQ + 1 for d in docs["speechA"])
    assert loader.too_long == too_long > 0
    assert f"{too_long} of 60 train documents are longer" in capsys.readouterr().err
    batches = _take(loader, 8)  # two optimizer steps of 4 micro-batches
    whole = {tuple(d) for d in docs["speechA"]}
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            tokens = torch.cat([b["tokens"][row, :1], b["labels"][row]]).numpy()
            mask = b["loss_mask"][row].numpy()
            # the window is whole documents (BOS ... EOS) then EOS filler with loss mask 0
            starts = np.flatnonzero(tokens == layout.bos_id)
            ends = [int(np.flatnonzero(tokens[s:] == layout.eos_id)[0]) + s for s in starts]
            for s, e in zip(starts, ends):
                assert tuple(tokens[s:e + 1]) in whole
            filler = ends[-1] + 1  # mask[j] belongs to label tokens[j + 1]
            assert (tokens[filler:] == layout.eos_id).all()
            assert (mask[filler - 1:] == 0).all() and (mask[:filler - 1] == 1).all()
    state = loader.state_dict()
    again = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    again.load_state_dict(state)
    reference = _take(SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True), 10)
    for a, b in zip(reference[8:], _take(again, 2), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # one epoch = the windows of one pass, padding included
    windows = MixturePlan([loader.sources[0].lengths], [1.0], SEQ + 1, 0, shuffle=False,
                          single_pass=True, whole_documents=True)
    count = 0
    while windows.next_window() is not None:
        count += 1
    fitting = sum(len(d) for d in docs["speechA"] if len(d) <= SEQ + 1)
    assert loader.epoch_tokens() == count * SEQ and count * (SEQ + 1) >= fitting > (count - 1) * (SEQ + 1) / 2
