"""``soda-mega export hf`` / ``import hf`` against transformers, ByteTokenizer and the original weights.

One random tiny checkpoint is exported once (fp32, sharded small so the index path runs) and
shared: transformers must reproduce the Megatron model's logits from the folder alone, its
tokenizer must spell every id of the layout, a TP=2 copy of the checkpoint must export to the
same tensors bit for bit, and import -> export must give the original weights back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import make_tiny_checkpoint
from launch_env import clean_env
from soda_mega.checkpoint.layout import checkpoint_config
from soda_mega.checkpoint.weights import load_full_weights
from soda_mega.cli import main as cli
from soda_mega.config import load_config
from soda_mega.data.tokenizer import ByteTokenizer, load_tokenizer
from soda_mega.hf.export import export_hf
from soda_mega.hf.importer import import_hf
from soda_mega.hf.tokenizer_files import audio_token, build_tokenizer, write_tokenizer_files
from soda_mega.tokens.layout import VocabLayout
from tolerances import HF_EXPORT_FP32

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TP2_WORKER = Path(__file__).with_name("tp2_worker.py")
TEXT = "Grüße, 世界! naïve café 🎵\n\ttabs  and  spaces."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 11)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    return export_hf(ckpt, tmp_path_factory.mktemp("hf") / "out", dtype="fp32", max_shard_size="4MB")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _mixed_ids(layout: VocabLayout) -> torch.Tensor:
    """BOS, a text segment, then an audio segment of 5 random frames, then EOS."""
    codes = torch.randint(0, layout.codebook_size, (layout.num_codebooks, 5),
                          generator=torch.Generator().manual_seed(3))
    ids = ([layout.bos_id, layout.text_start] + ByteTokenizer().encode(TEXT)
           + [layout.text_end, layout.audio_start] + layout.codes_to_ids(codes).tolist()
           + [layout.audio_end, layout.eos_id])
    return torch.tensor([ids])


def test_transformers_logits_equal_the_megatron_model(ckpt, exported):
    from soda_mega.checkpoint.load import load_checkpoint
    from soda_mega.checkpoint.weights import _OneProcess, single_process_config
    from soda_mega.model.gpt import build_model

    cfg = checkpoint_config(ckpt)
    layout = VocabLayout.from_config(cfg.vocab)
    assert (exported / "model.safetensors.index.json").is_file()  # 4MB shards: the index path
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == layout.size and config["soda_mega"]["vocab_layout"] == layout.to_dict()
    ids = _mixed_ids(layout)
    with _OneProcess(0):
        model = build_model(single_process_config(cfg))[0]
        load_checkpoint(ckpt, [model], restore_rng=False)
        model.eval()
        with torch.no_grad():
            ref = model(ids, torch.arange(ids.shape[1])[None], None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.dtype == torch.float32
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert got.shape[-1] == layout.size < ref.shape[-1]  # padding rows dropped
    torch.testing.assert_close(got, ref[..., :layout.size], atol=HF_EXPORT_FP32["logits_atol"],
                               rtol=HF_EXPORT_FP32["logits_rtol"])
    assert got.std() > 0.3  # random weights far from uniform: the comparison is not vacuous


def test_tokenizer_spells_every_id_and_encodes_like_the_byte_tokenizer(ckpt, exported):
    layout = VocabLayout.from_config(checkpoint_config(ckpt).vocab)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert len(tok) == layout.size
    assert (tok.bos_token_id, tok.eos_token_id) == (layout.bos_id, layout.eos_id)
    for name in layout.special_tokens:
        assert tok.convert_tokens_to_ids(name) == layout.special_id(name)
    for k, x in [(0, 0), (0, 2047), (3, 17), (7, 0), (7, 2047)]:
        assert tok.convert_tokens_to_ids(audio_token(k, x)) == layout.codebook_range(k)[0] + x
    byte = ByteTokenizer()
    # BOS first, as every training document starts (soda_mega/data/documents.py).
    assert tok(TEXT)["input_ids"] == [layout.bos_id] + byte.encode(TEXT)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == byte.encode(TEXT)
    assert tok.decode(byte.encode(TEXT)) == TEXT
    cut = byte.encode("日本")[:-1]  # an incomplete UTF-8 sequence decodes to U+FFFD in both
    assert tok.decode(cut) == byte.decode(cut)
    ids = _mixed_ids(layout)[0].tolist()
    prompt = tok.decode(ids)
    # special and audio names parse back to their ids
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT


def test_exported_folder_works_with_the_usual_transformers_idioms(ckpt, exported):
    """Issue 33.9: `model.generate(**tok(s, return_tensors="pt"))` (no token_type_ids the model
    would refuse), `tok([...], padding=True)` (a pad token), prompts that start with BOS like
    the training documents, and batched generation equal to one prompt at a time."""
    layout = VocabLayout.from_config(checkpoint_config(ckpt).vocab)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    prompts = ["hi", "a longer prompt, of bytes"]
    single = tok(prompts[1], return_tensors="pt")
    assert sorted(single) == ["attention_mask", "input_ids"]
    assert single["input_ids"][0].tolist() == [layout.bos_id] + ByteTokenizer().encode(prompts[1])
    out = model.generate(**single, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, single["input_ids"].shape[1] + 4)

    assert tok.pad_token_id == layout.eos_id == model.generation_config.pad_token_id
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).tolist() == [3, 1 + len(prompts[1])]
    together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert together[row].tolist() == alone[0, -4:].tolist(), prompt


def _word_tokenizer(path: Path):
    """A 43-id WordLevel text tokenizer: [UNK], <s>, </s>, w0 .. w39."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def test_hf_text_tokenizer_is_extended_at_the_layout_ids(tmp_path):
    path = tmp_path / "text.json"
    text_tok = _word_tokenizer(path)
    # 48 text ids for a 43-word tokenizer: 43..47 are reserved; 3 codebooks of 5 codes.
    layout = VocabLayout(text_vocab_size=48, num_codebooks=3, codebook_size=5, bos_id=1, eos_id=2)
    tok, info = build_tokenizer(layout, path)
    assert info["kind"] == "hf"
    out = tmp_path / "hf"
    out.mkdir()
    write_tokenizer_files(out, tok, layout, max_length=64)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert len(auto) == layout.size
    assert auto("w3 w17 w0")["input_ids"] == [1] + text_tok.encode("w3 w17 w0").ids  # <s> first
    assert auto.convert_ids_to_tokens([43, 47]) == ["<|reserved_text_43|>", "<|reserved_text_47|>"]
    assert auto.convert_tokens_to_ids(["<s>", "<|text_start|>", audio_token(2, 4)]) == [1, 48, 52 + 14]
    assert (auto.bos_token, auto.eos_token) == ("<s>", "</s>")

    too_small = VocabLayout(text_vocab_size=40, num_codebooks=1, codebook_size=4, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="ids reach 42, beyond the checkpoint's text range"):
        build_tokenizer(too_small, path)


def test_run_with_an_hf_tokenizer_exports_and_imports_it(tmp_path, capsys):
    original = tmp_path / "run_tokenizer.json"
    text_tok = _word_tokenizer(original)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", 2, "--vocab.text_vocab_size=48", "--vocab.bos_id=1",
                                "--vocab.eos_id=2", f"--data.tokenizer={original}")
    moved = tmp_path / "elsewhere.json"
    original.rename(moved)  # the checkpoint came from another machine
    rc, err = _run_cli(capsys, "export", "hf", str(ckpt), str(tmp_path / "hf"))
    assert rc == 2 and "no such file" in err and "--tokenizer PATH" in err
    rc, err = _run_cli(capsys, "export", "hf", str(ckpt), str(tmp_path / "hf"), "--tokenizer", str(moved))
    assert rc == 0, err
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("w5 w39")["input_ids"] == [1] + text_tok.encode("w5 w39").ids
    assert auto.convert_tokens_to_ids(["<|text_start|>", audio_token(0, 0)]) == [48, 52]

    out = import_hf(tmp_path / "hf", tmp_path / "imported")
    cfg = checkpoint_config(out)
    assert cfg.data.tokenizer == str((out / "text_tokenizer.json").resolve())
    layout = VocabLayout.from_config(cfg.vocab)
    imported_tok = load_tokenizer(cfg.data.tokenizer, layout, announce=False)
    assert imported_tok.vocab_size == 48  # the text range only: 43 words + 5 reserved ids
    assert imported_tok.encode("w5 w39 w0") == text_tok.encode("w5 w39 w0").ids


@pytest.mark.distributed
def test_tp2_checkpoint_exports_the_same_tensors(ckpt, exported, tmp_path):
    env = clean_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TP2_WORKER), str(ckpt), str(tmp_path / "tp2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    tp2 = tmp_path / "tp2"
    assert checkpoint_config(tp2).parallel.tensor_parallel == 2
    assert len(list((tp2 / "step_00000000").glob("__1_*.distcp"))) > 0  # rank 1 wrote its shards
    out = export_hf(tp2, tmp_path / "hf", dtype="fp32")
    ours, ref = _tensors(out), _tensors(exported)
    assert ours.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not bad, f"tensors differ after TP=2 -> export: {bad[:5]}"


def test_import_round_trip(ckpt, exported, tmp_path):
    cfg0, full0 = load_full_weights(ckpt)
    layout = VocabLayout.from_config(cfg0.vocab)
    imported = import_hf(exported, tmp_path / "imported", preset="tiny")
    cfg, full = load_full_weights(imported)
    assert cfg.model == cfg0.model and cfg.vocab == cfg0.vocab
    assert cfg.data.tokenizer is None  # the byte-level run stays byte-level
    for name, value in full0.items():
        got = full[name]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert torch.equal(got[:layout.size], value[:layout.size]), name
            assert not got[layout.size:].any(), f"{name}: padded rows must be zero"
        else:
            assert torch.equal(got, value), name
    again = export_hf(imported, tmp_path / "again", dtype="fp32")
    assert (again / "model.safetensors").is_file()  # one file under the default 5GB
    first, second = _tensors(exported), _tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # config.yaml: the tiny preset's training settings around the imported model, starting
    # from the imported weights.
    yaml_cfg = load_config(imported / "config.yaml")
    assert yaml_cfg.model == cfg0.model
    assert yaml_cfg.training.init_from == str(imported.resolve())
    tiny = load_config(preset="tiny", overrides=[f"--training.init_from={imported.resolve()}"])
    assert yaml_cfg.training == tiny.training


def test_import_without_soda_block_reads_the_tokenizer_and_unties(exported, tmp_path, capsys):
    src = tmp_path / "plain"
    src.mkdir()
    config = json.loads((exported / "config.json").read_text())
    del config["soda_mega"]
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(exported / name, src / name)
    weights = _tensors(exported)
    del weights["lm_head.weight"]
    from safetensors.torch import save_file
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})

    out = import_hf(src, tmp_path / "imported", seq_length=64)
    text = capsys.readouterr().out
    assert "vocabulary from special and <|audio_k_x|> tokens of tokenizer.json" in text
    assert "tie_word_embeddings is true" in text
    cfg, full = load_full_weights(out)
    block = json.loads((exported / "config.json").read_text())["soda_mega"]
    layout = VocabLayout.from_dict(block["vocab_layout"])
    assert VocabLayout.from_config(cfg.vocab) == layout
    assert cfg.model.seq_length == 64 and cfg.model.name == "hf-plain"
    assert torch.equal(full["output_layer.weight"], full["embedding.word_embeddings.weight"])
    # Without the block the tokenizer counts as an HF one: its text range becomes data.tokenizer.
    assert cfg.data.tokenizer == str((out / "text_tokenizer.json").resolve())
    text_tok = load_tokenizer(cfg.data.tokenizer, layout, announce=False)
    assert text_tok.vocab_size == layout.text_vocab_size
    assert text_tok.encode(TEXT) == ByteTokenizer().encode(TEXT)


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli(list(argv))
    return rc, capsys.readouterr().err


def test_bad_inputs_are_named(ckpt, exported, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _run_cli(capsys, "import", "hf", str(empty), str(tmp_path / "o1"))
    assert rc == 2 and "has no config.json" in err

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    rc, err = _run_cli(capsys, "import", "hf", str(llama), str(tmp_path / "o2"))
    assert rc == 2 and "model_type is 'llama'" in err

    rc, err = _run_cli(capsys, "import", "hf", str(exported), str(tmp_path / "o3"), "--preset", "soda-135m")
    assert rc == 2 and "another preset than soda-135m" in err
    assert "model.hidden_size: 64 here, 512 in the preset" in err and "model.num_layers" in err
    assert not (tmp_path / "o3").exists()

    rc, err = _run_cli(capsys, "import", "hf", str(exported), str(tmp_path / "o4"), "--vocab.num_codebooks=4")
    assert rc == 2 and "--vocab.num_codebooks: set by the HF model" in err

    rc, err = _run_cli(capsys, "import", "hf", str(exported), str(exported))
    assert rc == 2 and "is not empty" in err

    rc, err = _run_cli(capsys, "export", "hf", str(ckpt), str(exported))
    assert rc == 2 and "is not empty; choose a new path or pass --overwrite" in err

    rc, err = _run_cli(capsys, "export", "hf", str(empty), str(tmp_path / "o5"))
    assert rc == 2 and "not a soda-mega checkpoint" in err

    rc, err = _run_cli(capsys, "export", "hf", str(ckpt), str(tmp_path / "o6"),
                       "--max-shard-size", "5 parsecs")
    assert rc == 2 and "size '5 parsecs'" in err
    assert not list(tmp_path.glob("*.tmp-*")), "a failed conversion must not leave a staging folder"


def test_overwrite_replaces_the_folder_in_bf16(ckpt, exported, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    rc, err = _run_cli(capsys, "export", "hf", str(ckpt), str(out), "--overwrite")
    assert rc == 0, err
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob("out.*"))
    ours, ref = _tensors(out), _tensors(exported)
    assert all(v.dtype == torch.bfloat16 for v in ours.values())
    assert all(torch.equal(ours[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
