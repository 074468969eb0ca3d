"""The flat SODA vocabulary (soda_mega.tokens.layout.VocabLayout).

Expected ids are written out by hand from SODA_SPEC section 1 (never derived from the
properties under test), so an off-by-one in any range shows up as a mismatch here.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from soda_mega.config import ConfigError, VocabConfig, load_config
from soda_mega.tokens import LOSS_GROUPS, Modality, VocabLayout, modality_names

SODA = VocabLayout.soda_default()
SPECIALS = ("<|text_start|>", "<|text_end|>", "<|audio_start|>", "<|audio_end|>")

# Start of codebook k in the default layout: 128260 + 2048 * k, written out.
CODEBOOK_STARTS = [128260, 130308, 132356, 134404, 136452, 138500, 140548, 142596]

# id -> (modality code, loss group, codebook) for every range boundary of the default layout.
# Modality codes: PAD -1, TEXT 0, SPECIAL 1, SEMANTIC 2, acoustic codebook k: 3 + k - 1.
BOUNDARY_TABLE = {
    -100: (-1, -1, -1),
    -1: (-1, -1, -1),
    0: (0, 0, -1),
    1: (0, 0, -1),
    128000: (0, 0, -1),      # BOS
    128001: (0, 0, -1),      # EOS
    128255: (0, 0, -1),      # last text id
    128256: (1, 0, -1),      # <|text_start|>
    128257: (1, 0, -1),      # <|text_end|>
    128258: (1, 0, -1),      # <|audio_start|>
    128259: (1, 0, -1),      # <|audio_end|>
    128260: (2, 1, 0),       # codebook 0 (semantic) first
    130307: (2, 1, 0),       # codebook 0 last
    130308: (3, 2, 1),       # codebook 1 first
    132355: (3, 2, 1),
    132356: (4, 2, 2),
    134403: (4, 2, 2),
    134404: (5, 2, 3),
    136451: (5, 2, 3),
    136452: (6, 2, 4),
    138499: (6, 2, 4),
    138500: (7, 2, 5),
    140547: (7, 2, 5),
    140548: (8, 2, 6),
    142595: (8, 2, 6),
    142596: (9, 2, 7),       # codebook 7 first
    144643: (9, 2, 7),       # last real id
    144644: (-1, -1, -1),    # first TP padding row
    144767: (-1, -1, -1),    # last padding row at tp=1
    145407: (-1, -1, -1),    # last padding row at tp=8
    10**9: (-1, -1, -1),
}


# ----------------------------------------------------------------------------- SODA default
def test_soda_default_ranges():
    v = SODA
    assert v.size == 144_644
    assert v.text_vocab_size == 128_256  # text ids 0..128255
    assert (v.bos_id, v.eos_id) == (128_000, 128_001)
    assert v.special_tokens == SPECIALS
    assert v.special_base == 128_256
    assert (v.text_start, v.text_end, v.audio_start, v.audio_end) == (128_256, 128_257, 128_258, 128_259)
    assert [v.special_id(n) for n in SPECIALS] == [128_256, 128_257, 128_258, 128_259]
    assert v.audio_base == 128_260
    assert v.codebook_range(0) == (128_260, 130_308)  # 128260..130307 inclusive
    assert v.codebook_range(7) == (142_596, 144_644)  # last id 144643
    assert [v.codebook_range(k)[0] for k in range(8)] == CODEBOOK_STARTS


def test_soda_default_matches_the_default_config():
    assert VocabLayout.from_config(VocabConfig()) == SODA
    assert VocabLayout.from_config(load_config(preset="soda-135m").vocab) == SODA


def test_tiny_preset_layout():
    v = VocabLayout.from_config(load_config(preset="tiny").vocab)
    assert (v.text_vocab_size, v.audio_base, v.size) == (258, 262, 262 + 8 * 2048)


def test_describe_covers_every_id_once():
    rows = SODA.describe()
    assert rows[0] == ("text", 0, 128_256)
    assert rows[1:5] == [(n, 128_256 + i, 128_257 + i) for i, n in enumerate(SPECIALS)]
    assert rows[5] == ("codebook 0 (semantic)", 128_260, 130_308)
    assert rows[-1] == ("codebook 7 (acoustic)", 142_596, 144_644)
    assert all(prev[2] == nxt[1] for prev, nxt in zip(rows, rows[1:]))
    assert rows[-1][2] == SODA.size


@pytest.mark.parametrize("name", ["<|pad|>", "text_start", ""])
def test_unknown_special_name(name):
    with pytest.raises(KeyError):
        SODA.special_id(name)


@pytest.mark.parametrize("k", [-1, 8, 100])
def test_codebook_range_out_of_bounds(k):
    with pytest.raises(IndexError):
        SODA.codebook_range(k)


# ----------------------------------------------------------------------------- modality maps
def test_modality_of_boundary_ids():
    ids = torch.tensor(list(BOUNDARY_TABLE))
    expected = torch.tensor([m for m, _, _ in BOUNDARY_TABLE.values()], dtype=torch.int8)
    got = SODA.modality(ids)
    assert got.dtype == torch.int8
    assert got.tolist() == expected.tolist()


def test_loss_group_of_boundary_ids():
    ids = torch.tensor(list(BOUNDARY_TABLE))
    expected = [g for _, g, _ in BOUNDARY_TABLE.values()]
    assert SODA.loss_group(ids).tolist() == expected
    assert LOSS_GROUPS == ("text", "semantic", "acoustic")


def test_codebook_of_boundary_ids():
    ids = torch.tensor(list(BOUNDARY_TABLE))
    expected = [c for _, _, c in BOUNDARY_TABLE.values()]
    assert SODA.codebook_of(ids).tolist() == expected


def test_modality_enum_values():
    assert (Modality.PAD, Modality.TEXT, Modality.SPECIAL, Modality.SEMANTIC, Modality.ACOUSTIC) == (
        -1, 0, 1, 2, 3)
    assert list(modality_names(8)) == ["text", "special", "semantic"] + [f"acoustic{k}" for k in range(1, 8)]


def test_modality_keeps_shape_and_accepts_int32():
    ids = torch.tensor([[0, 128_256], [128_260, 144_644]], dtype=torch.int32)
    assert SODA.modality(ids).tolist() == [[0, 1], [2, -1]]
    assert SODA.loss_group(ids).tolist() == [[0, 0], [1, -1]]
    assert SODA.codebook_of(ids).tolist() == [[-1, -1], [0, -1]]


def test_modality_every_id_of_a_small_layout():
    # Exhaustive check on a small layout: text 5, 4 specials, 3 codebooks of 2.
    v = VocabLayout(text_vocab_size=5, num_codebooks=3, codebook_size=2, bos_id=0, eos_id=1)
    ids = torch.arange(-2, 17)
    assert v.modality(ids).tolist() == (
        [-1, -1] + [0] * 5 + [1] * 4 + [2, 2, 3, 3, 4, 4] + [-1, -1]
    )
    assert v.loss_group(ids).tolist() == [-1, -1] + [0] * 9 + [1, 1, 2, 2, 2, 2] + [-1, -1]
    assert v.codebook_of(ids).tolist() == [-1] * 11 + [0, 0, 1, 1, 2, 2] + [-1, -1]


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("tp, expected", [(1, 144_768), (2, 144_896), (4, 144_896), (8, 145_408)])
def test_padded_size(tp, expected):
    padded = SODA.padded_size(tensor_parallel=tp, divisible_by=128)
    assert padded == expected
    assert padded % (128 * tp) == 0 and padded - SODA.size < 128 * tp


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_rows_map_to_pad(tp):
    padded = SODA.padded_size(tensor_parallel=tp)
    pad_ids = torch.arange(SODA.size, padded)
    assert pad_ids.numel() > 0
    assert (SODA.modality(pad_ids) == Modality.PAD).all()
    assert (SODA.loss_group(pad_ids) == -1).all()
    assert (SODA.codebook_of(pad_ids) == -1).all()
    assert SODA.modality(torch.tensor([SODA.size - 1])).item() != Modality.PAD


def test_padded_size_when_already_divisible():
    v = VocabLayout(text_vocab_size=124, num_codebooks=1, codebook_size=128, bos_id=0, eos_id=1)
    assert v.size == 256
    assert v.padded_size(1, 128) == 256
    assert v.padded_size(2, 128) == 256
    assert v.padded_size(4, 128) == 512


# ----------------------------------------------------------------------------- flattening
def test_codes_to_ids_hand_example():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])  # [K'=2 codebooks, T=3 frames]
    ids = SODA.codes_to_ids(codes)
    # Frame-major: c0[0], c1[0], c0[1], c1[1], c0[2], c1[2]; c1 starts at 130308.
    assert ids.tolist() == [128_261, 130_312, 128_262, 130_313, 128_263, 130_314]
    assert torch.equal(SODA.ids_to_codes(ids, num_codebooks=2), codes)


def test_codes_to_ids_extreme_codes():
    codes = torch.tensor([[0, 2047]] * 8)  # [8 codebooks, 2 frames]
    ids = SODA.codes_to_ids(codes)
    assert ids.tolist() == CODEBOOK_STARTS + [s + 2047 for s in CODEBOOK_STARTS]
    assert ids.max().item() == 144_643


@pytest.mark.parametrize("num_codebooks", [1, 3, 8, 32])
@pytest.mark.parametrize("codebook_size", [2, 1024, 4096])
def test_round_trip_random_codes(num_codebooks, codebook_size):
    v = VocabLayout(num_codebooks=num_codebooks, codebook_size=codebook_size)
    gen = torch.Generator().manual_seed(1000 * num_codebooks + codebook_size)
    for frames in (1, 7, 50):
        codes = torch.randint(0, codebook_size, (num_codebooks, frames), generator=gen)
        ids = v.codes_to_ids(codes)
        assert ids.shape == (num_codebooks * frames,)
        # Slot j of each frame belongs to codebook j.
        assert torch.equal(v.codebook_of(ids).view(frames, num_codebooks),
                           torch.arange(num_codebooks).expand(frames, -1))
        assert (v.modality(ids) >= Modality.SEMANTIC).all()
        back = v.ids_to_codes(ids)
        assert torch.equal(back, codes)
        # Fewer codebooks than the layout holds (e.g. semantic-only documents).
        kp = max(1, num_codebooks // 2)
        assert torch.equal(v.ids_to_codes(v.codes_to_ids(codes[:kp]), num_codebooks=kp), codes[:kp])


def test_semantic_only_codes():
    codes = torch.tensor([[0, 5, 2047]])
    ids = SODA.codes_to_ids(codes)
    assert ids.tolist() == [128_260, 128_265, 130_307]
    assert torch.equal(SODA.ids_to_codes(ids, num_codebooks=1), codes)


def test_empty_codes():
    ids = SODA.codes_to_ids(torch.zeros(8, 0, dtype=torch.long))
    assert ids.numel() == 0
    assert SODA.ids_to_codes(ids).shape == (8, 0)


@pytest.mark.parametrize("bad", [-1, 2048, 10_000])
def test_codes_out_of_range_raise(bad):
    codes = torch.zeros(8, 4, dtype=torch.long)
    codes[3, 2] = bad
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        SODA.codes_to_ids(codes)


@pytest.mark.parametrize("shape", [(16,), (1, 8, 2), (0, 4), (9, 4)])
def test_codes_wrong_shape_raise(shape):
    with pytest.raises(ValueError):
        SODA.codes_to_ids(torch.zeros(shape, dtype=torch.long))


def test_ids_wrong_slot_raise():
    ids = SODA.codes_to_ids(torch.randint(0, 2048, (8, 3), generator=torch.Generator().manual_seed(0)))
    swapped = ids.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # codebook 1 id in slot 0 and vice versa
    with pytest.raises(ValueError, match="wrong slot"):
        SODA.ids_to_codes(swapped)
    # A frame that starts one slot late is wrong everywhere.
    with pytest.raises(ValueError):
        SODA.ids_to_codes(ids[1:17], num_codebooks=8)


@pytest.mark.parametrize("bad_id", [0, 128_000, 128_258, 144_644, -1])
def test_ids_non_audio_raise(bad_id):
    ids = SODA.codes_to_ids(torch.zeros(8, 2, dtype=torch.long))
    ids[8] = bad_id
    with pytest.raises(ValueError):
        SODA.ids_to_codes(ids)


def test_ids_wrong_shape_raise():
    ids = SODA.codes_to_ids(torch.zeros(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 8"):
        SODA.ids_to_codes(ids[:-1])
    with pytest.raises(ValueError):
        SODA.ids_to_codes(ids.view(2, 8))


@pytest.mark.parametrize("k", [0, -1, 9, 32])
def test_ids_to_codes_rejects_bad_num_codebooks(k):
    ids = SODA.codes_to_ids(torch.zeros(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_codebooks"):
        SODA.ids_to_codes(ids, num_codebooks=k)


# ----------------------------------------------------------------------------- other layouts
def test_byte_text_single_codebook_layout():
    v = VocabLayout(text_vocab_size=258, num_codebooks=1, bos_id=256, eos_id=257)
    assert (v.special_base, v.audio_base, v.size) == (258, 262, 2310)
    assert v.codebook_range(0) == (262, 2310)
    with pytest.raises(IndexError):
        v.codebook_range(1)
    ids = torch.tensor([255, 256, 257, 258, 261, 262, 2309, 2310])
    assert v.modality(ids).tolist() == [0, 0, 0, 1, 1, 2, 2, -1]
    assert v.loss_group(ids).tolist() == [0, 0, 0, 0, 0, 1, 1, -1]
    assert v.padded_size(1, 128) == 2432  # 19 * 128


def test_thirty_two_codebook_layout():
    v = VocabLayout(num_codebooks=32)
    assert v.size == 128_260 + 32 * 2048 == 193_796
    assert v.codebook_range(31) == (191_748, 193_796)
    ids = torch.tensor([130_307, 130_308, 191_747, 191_748, 193_795, 193_796])
    assert v.modality(ids).tolist() == [2, 3, 32, 33, 33, -1]
    assert v.codebook_of(ids).tolist() == [0, 1, 30, 31, 31, -1]
    assert v.loss_group(ids).tolist() == [1, 2, 2, 2, 2, -1]
    assert len(modality_names(32)) == int(v.modality(torch.tensor([193_795])).item()) + 1


def test_extra_and_reordered_special_tokens_shift_the_audio_base():
    names = ("<|audio_start|>", "<|audio_end|>", "<|text_start|>", "<|text_end|>", "<|pad|>")
    v = VocabLayout(special_tokens=names)
    assert (v.audio_start, v.audio_end, v.text_start, v.text_end) == (128_256, 128_257, 128_258, 128_259)
    assert v.special_id("<|pad|>") == 128_260
    assert v.audio_base == 128_261 and v.size == 144_645
    assert v.modality(torch.tensor([128_260, 128_261])).tolist() == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(text_vocab_size=258, num_codebooks=1, bos_id=256, eos_id=257),
        dict(num_codebooks=32, codebook_size=1024),
        dict(text_vocab_size=32_000, num_codebooks=4, codebook_size=4096, bos_id=1, eos_id=2),
        dict(num_codebooks=3, codebook_size=2),
    ],
)
def test_ranges_are_contiguous_and_consistent(kwargs):
    v = VocabLayout(**kwargs)
    rows = v.describe()
    assert rows[0][1] == 0 and rows[-1][2] == v.size
    assert all(prev[2] == nxt[1] for prev, nxt in zip(rows, rows[1:]))
    ids = torch.arange(v.size)
    mod = v.modality(ids).long()
    assert (mod != Modality.PAD).all()
    counts = torch.bincount(mod)
    assert counts.tolist() == [v.text_vocab_size, len(v.special_tokens)] + [v.codebook_size] * v.num_codebooks
    cb = v.codebook_of(ids)
    assert (cb[: v.audio_base] == -1).all()
    assert torch.equal(cb[v.audio_base:], torch.arange(v.num_codebooks).repeat_interleave(v.codebook_size))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_codebooks=0), r"^vocab\.num_codebooks"),
        (dict(num_codebooks=33), r"^vocab\.num_codebooks"),
        (dict(codebook_size=1), r"^vocab\.codebook_size"),
        (dict(text_vocab_size=0, bos_id=0, eos_id=0), r"^vocab\.text_vocab_size"),
        (dict(bos_id=128_256), r"^vocab\.bos_id"),
        (dict(eos_id=-1), r"^vocab\.eos_id"),
        (dict(eos_id=128_000), r"^vocab\.eos_id: must differ from vocab\.bos_id"),
        (dict(special_tokens=SPECIALS[:3]), r"^vocab\.special_tokens: must include <\|audio_end\|>"),
        (dict(special_tokens=SPECIALS + ("<|text_end|>",)),
         r"^vocab\.special_tokens: .*unique.*<\|text_end\|>"),
        (dict(special_tokens=SPECIALS + ("<|x|>", "<|x|>")), r"^vocab\.special_tokens: .*unique.*<\|x\|>"),
    ],
)
def test_invalid_layouts_raise_config_error(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        VocabLayout(**kwargs)


# ----------------------------------------------------------------------------- identity
# NOTE: the fingerprint is stored next to datasets and checkpoints, so its value for the SODA
# layout must never change by accident (a change would orphan every tokenized dataset).
SODA_FINGERPRINT = "a3888a7f866508a0"


def test_fingerprint_is_stable():
    assert SODA.fingerprint() == SODA_FINGERPRINT
    assert VocabLayout().fingerprint() == VocabLayout.from_config(VocabConfig()).fingerprint()
    assert len(SODA_FINGERPRINT) == 16


@pytest.mark.parametrize(
    "change",
    [
        dict(text_vocab_size=128_257),
        dict(special_tokens=SPECIALS[::-1]),
        dict(special_tokens=SPECIALS + ("<|pad|>",)),
        dict(num_codebooks=7),
        dict(codebook_size=1024),
        dict(bos_id=1),
        dict(eos_id=2),
    ],
)
def test_fingerprint_changes_with_every_field(change):
    other = dataclasses.replace(SODA, **change)
    assert other != SODA
    assert other.fingerprint() != SODA.fingerprint()


def test_every_field_is_covered_by_the_fingerprint_cases():
    changed = {"text_vocab_size", "special_tokens", "num_codebooks", "codebook_size", "bos_id", "eos_id"}
    assert {f.name for f in dataclasses.fields(VocabLayout)} == changed


@pytest.mark.parametrize(
    "layout",
    [SODA, VocabLayout(text_vocab_size=258, num_codebooks=1, bos_id=256, eos_id=257),
     VocabLayout(special_tokens=SPECIALS + ("<|pad|>",), num_codebooks=32, codebook_size=4096)],
)
def test_to_dict_from_dict_round_trip(layout):
    data = layout.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(VocabLayout)}
    restored = VocabLayout.from_dict(json.loads(json.dumps(data)))  # survives JSON
    assert restored == layout
    assert restored.fingerprint() == layout.fingerprint()
    assert isinstance(restored.special_tokens, tuple)
