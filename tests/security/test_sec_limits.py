"""Memory and time bombs are refused before anything is built (issue 32, item 3).

A 20 KB checkpoint folder (only ``trainer_state.json``, hidden size 8192) made ``eval nll`` and
``export hf`` build the whole model before finding that no weights exist; ``vocab.codebook_size
= 2^31-1`` built a tokenizer of two billion ids; an HF ``config.json`` with ``num_hidden_layers
= 1e8`` built 2e8 tensor names before the weights were read, and ``max_position_embeddings =
1e15`` made a configuration that later commands spin on. Now a configuration is checked against
sane bounds (``soda_mega/config/schema.py``) and against the files actually present (tensor
shapes in the checkpoint's ``.metadata`` and the bytes behind them, safetensors headers) first.

All cases run in one fresh process whose address space is capped (``RLIMIT_AS``) and each
under an alarm, so a regression fails at once instead of eating the machine or hanging.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sec_ckpt_helpers import hostile_copy, replace_file, run_cli_cases, tiny_checkpoint, tiny_dataset

MEMORY_LIMIT = 6 << 30  # a soda-mega process needs some 2.5 GB of address space; the bombs, 16+ GB
BIG_MODEL = {"hidden_size": 8192, "num_layers": 16, "num_attention_heads": 64, "num_kv_heads": 8,
             "head_dim": 128, "ffn_hidden_size": 28672}  # 14e9 parameters: 55 GB in fp32


def _state(step: Path) -> dict:
    return json.loads((step / "trainer_state.json").read_text())


def _resigned(source: Path, dest: Path, edit) -> Path:
    """A copy of the checkpoint ``source`` whose ``trainer_state.json`` is ``edit(state)``,
    its manifest signed again (what a forger does)."""
    from soda_mega.checkpoint.manifest import write_manifest

    step = hostile_copy(source, dest)
    replace_file(step / "trainer_state.json", json.dumps(edit(_state(step))))
    replace_file(step / "manifest.json", b"")
    write_manifest(step)
    return step


def _only_state(source: Path, dest: Path) -> Path:
    """A checkpoint folder holding nothing but a ``trainer_state.json`` of a huge model."""
    state = _state(source)
    state["config"]["model"].update(BIG_MODEL)
    dest.mkdir(parents=True)
    (dest / "trainer_state.json").write_text(json.dumps(state))
    return dest


def _model(**changes):
    def edit(state):
        state["config"]["model"].update(changes)
        return state
    return edit


def _vocab(**changes):
    def edit(state):
        state["config"]["vocab"].update(changes)
        return state
    return edit


def _forged_metadata(source: Path, dest: Path, edit) -> Path:
    """A copy of the checkpoint ``source`` whose ``.metadata`` is ``edit(metadata)`` (pickled
    again with the same classes), its manifest signed again."""
    import pickle

    from soda_mega.checkpoint.manifest import write_manifest
    from soda_mega.checkpoint.trust import read_dcp_metadata

    step = hostile_copy(source, dest)
    metadata = read_dcp_metadata(step)
    edit(metadata)
    replace_file(step / ".metadata", pickle.dumps(metadata))
    replace_file(step / "manifest.json", b"")
    write_manifest(step)
    return step


def _claim_float64(metadata) -> None:
    """Every model tensor claims twice the bytes its entries hold."""
    import dataclasses

    import torch

    for fqn, md in metadata.state_dict_metadata.items():
        if fqn.startswith("decoder.") and hasattr(md, "properties"):
            md.properties = dataclasses.replace(md.properties, dtype=torch.float64)


def _length_not_a_number(metadata) -> None:
    import dataclasses

    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = dataclasses.replace(info, length="many")


def _hf(source: Path, dest: Path, **changes) -> Path:
    """A copy of the HF folder ``source`` with ``config.json`` fields changed."""
    import shutil

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every bomb, run once in one capped process: name -> (result, texts its error line holds)."""
    step = tiny_checkpoint(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("limits")
    data = tiny_dataset(tmp / "data", num_docs=1)
    hf = tmp / "hf"
    (tmp / "export").mkdir()
    run = run_cli_cases([["export", "hf", str(step), str(hf), "--dtype", "fp32"]], tmp / "export",
                        each=120)
    assert run[0]["rc"] == 0, run[0]["stderr"][-3000:]
    bomb = _only_state(step, tmp / "bomb" / "step_00000000")
    cases = {
        "eval_nll_of_state_only": (["eval", "nll", str(bomb), "--data", str(data)],
                                   [".metadata", "missing"]),
        "export_of_state_only": (["export", "hf", str(bomb), str(tmp / "o1")],
                                 [".metadata", "missing"]),
        "export_hidden_lies": (
            ["export", "hf", str(_resigned(step, tmp / "c1" / "step_00000000",
                                           _model(**BIG_MODEL))), str(tmp / "o2")],
            [".metadata", "model.hidden_size"]),
        "eval_layers_lie": (
            ["eval", "nll", str(_resigned(step, tmp / "c2" / "step_00000000", _model(num_layers=8))),
             "--data", str(data)],
            [".metadata", "model.num_layers"]),
        "export_dtype_lies": (
            ["export", "hf", str(_forged_metadata(step, tmp / "c4" / "step_00000000",
                                                  _claim_float64)), str(tmp / "o9")],
            [".metadata", "bytes, its entries hold"]),
        "export_length_not_a_number": (
            ["export", "hf", str(_forged_metadata(step, tmp / "c5" / "step_00000000",
                                                  _length_not_a_number)), str(tmp / "o10")],
            [".metadata", "damaged"]),
        "export_codebook_2e31": (
            ["export", "hf", str(_resigned(step, tmp / "c3" / "step_00000000",
                                           _vocab(codebook_size=2 ** 31 - 1))), str(tmp / "o3")],
            ["trainer_state.json", "vocab.codebook_size"]),
        "config_codebook_2e31": (["config", "--preset", "tiny", "--vocab.codebook_size=2147483647"],
                                 ["vocab.codebook_size"]),
        "config_text_vocab_2e31": (["config", "--preset", "tiny", "--vocab.text_vocab_size=2147483647"],
                                   ["vocab.text_vocab_size"]),
        "config_seq_1e15": (["config", "--preset", "tiny", "--model.seq_length=1000000000000000"],
                            ["model.seq_length"]),
        "import_layers_1e8": (["import", "hf", str(_hf(hf, tmp / "h1", num_hidden_layers=10 ** 8)),
                               str(tmp / "o4")], ["config.json", "num_hidden_layers"]),
        "import_layers_vs_weights": (
            ["import", "hf", str(_hf(hf, tmp / "h2", num_hidden_layers=512)), str(tmp / "o5")],
            ["num_hidden_layers", "model.safetensors"]),
        "import_hidden_vs_weights": (
            ["import", "hf", str(_hf(hf, tmp / "h3", hidden_size=8192, head_dim=16)), str(tmp / "o6")],
            ["hidden_size", "model.safetensors"]),
        "import_positions_1e15": (
            ["import", "hf", str(_hf(hf, tmp / "h4", max_position_embeddings=10 ** 15)),
             str(tmp / "o7")], ["config.json", "max_position_embeddings"]),
        "import_vocab_2e40": (["import", "hf", str(_hf(hf, tmp / "h5", vocab_size=2 ** 40)),
                               str(tmp / "o8")], ["config.json", "vocab_size"]),
    }
    out = run_cli_cases([argv for argv, _ in cases.values()], tmp, each=30, timeout=400,
                        env={"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"},
                        memory_limit=MEMORY_LIMIT)
    return {name: (res, needles) for (name, (_, needles)), res in zip(cases.items(), out)}


CASE_NAMES = ["eval_nll_of_state_only", "export_of_state_only", "export_hidden_lies",
              "eval_layers_lie", "export_dtype_lies", "export_length_not_a_number",
              "export_codebook_2e31", "config_codebook_2e31",
              "config_text_vocab_2e31", "config_seq_1e15", "import_layers_1e8",
              "import_layers_vs_weights", "import_hidden_vs_weights", "import_positions_1e15",
              "import_vocab_2e40"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sec_bomb_is_refused_before_anything_is_built(results, name):
    result, needles = results[name]
    err = result["stderr"]
    assert result["rc"] == 2, (result["rc"], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert all(n in last for n in needles), (needles, err[-3000:])
    assert len(last) < 1000, last[:2000]
