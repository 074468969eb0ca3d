"""Malformed JSON inputs end with exit 2 and one line naming the file and field (issue 32, item 7).

A file from elsewhere can be nested 100,000 levels deep (``RecursionError`` in ``json``), hold an
integer of 5,000 digits (``ValueError``: Python's 4,300-digit limit), not be UTF-8, be a list
where an object belongs, or hold a field of the wrong type or out of range. Each row of
:data:`CASES` plants one such file (an HF ``config.json`` or ``model.safetensors.index.json``, a
dataset's ``soda_meta.json``, a scaling ``manifest.json``, a checkpoint's
``trainer_state.json``) and runs the command that reads it; all rows run in one fresh process
(:func:`run_cli_cases`, one Megatron import), each under its own alarm. A JSONL line of a
``data build`` input nested too deeply is a bad record like any other: skipped and named, the
other lines kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sec_ckpt_helpers import hostile_copy, replace_file, run_cli_cases, tiny_checkpoint, tiny_dataset

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" + "0" * 5000
INDEX = "model.safetensors.index.json"


def _hf_config(**changes) -> dict:
    from checkpoint_helpers import tiny_config
    from soda_mega.hf.hf_config import export_config
    from soda_mega.tokens.layout import VocabLayout

    cfg = tiny_config()
    layout = VocabLayout.from_config(cfg.vocab)
    config = export_config(cfg, layout, "fp32", {"vocab_layout": layout.to_dict()})
    config.update(changes)
    return config


def _hf(folder: Path, config: str | bytes | dict, **files) -> list[str]:
    folder.mkdir(parents=True)
    if isinstance(config, dict):
        config = json.dumps(config)
    (folder / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_text(data)
    return ["import", "hf", str(folder), str(folder.parent / "out")]


def _hf_case(config, needles, **files):
    return lambda tmp: (_hf(tmp / "hf", config, **files), ["config.json", *needles]
                        if not files else needles)


def _sweep(tmp: Path, text: str | bytes) -> list[str]:
    path = tmp / "grid" / "manifest.json"
    path.parent.mkdir()
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return ["scaling", "sweep", str(path), "--dry-run"]


def _manifest_case(text, needles):
    return lambda tmp: (_sweep(tmp, text), ["manifest.json", *needles])


def _linked_out(index: bool):
    """An HF folder whose weight file (named by the index, or the single ``model.safetensors``)
    is a symlink to real weights outside the folder: it must not be read."""
    def make(tmp: Path):
        import shutil

        outside = tmp / "elsewhere" / "weights.safetensors"
        outside.parent.mkdir()
        shutil.copy(_HF[0] / "model.safetensors", outside)
        folder = tmp / "hf"
        folder.mkdir()
        shutil.copy(_HF[0] / "config.json", folder / "config.json")
        name = "model-00001-of-00001.safetensors" if index else "model.safetensors"
        (folder / name).symlink_to(outside)
        if index:
            from safetensors import safe_open

            with safe_open(str(outside), framework="pt") as f:
                weight_map = {k: name for k in f.keys()}
            (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return (["import", "hf", str(folder), str(tmp / "out")],
                [INDEX if index else "model.safetensors", name, "leads out of the model folder"])
    return make


def _hub_snapshot(tmp: Path):
    """A HuggingFace hub cache snapshot: its files are links into the repository's ``blobs/``
    (outside the snapshot folder, inside the repository): imported as usual."""
    import shutil

    repo = tmp / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(_HF[0] / name, repo / "blobs" / f"blob-{name}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", f"blob-{name}"))
    return ["import", "hf", str(snapshot), str(tmp / "out")], None


def _meta(tmp: Path, text: str) -> list[str]:
    root = tiny_dataset(tmp / "data", num_docs=1)
    replace_file(root / "train" / "soda_meta.json", text)
    return ["data", "inspect", str(root / "train")]


def _meta_case(text, needles):
    return lambda tmp: (_meta(tmp, text), ["soda_meta.json", *needles])


def _state_case(edit, needles):
    """``export hf`` of the tiny checkpoint with ``trainer_state.json`` replaced by
    ``edit(state)`` (a dict, or the file's text), its manifest signed again."""
    def make(tmp: Path):
        from soda_mega.checkpoint.manifest import write_manifest

        step = hostile_copy(_STEP[0], tmp / "ckpt" / "step_00000000")
        state = json.loads((step / "trainer_state.json").read_text())
        new = edit(state)
        replace_file(step / "trainer_state.json", new if isinstance(new, str) else json.dumps(new))
        replace_file(step / "manifest.json", b"")
        write_manifest(step)
        return ["export", "hf", str(step), str(tmp / "out")], ["trainer_state.json", *needles]
    return make


def _without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _with(key, value):
    return lambda state: {**state, key: value}


CASES = {  # name -> make(tmp) -> (argv, texts the error line must hold)
    # HuggingFace config.json (import hf)
    "hf_config_deep": _hf_case('{"model_type": "qwen3", "x": ' + DEEP + "}", ["nested"]),
    "hf_config_huge_int": _hf_case('{"model_type": "qwen3", "hidden_size": ' + HUGE_INT + "}",
                                   ["4300 digits"]),
    "hf_config_not_utf8": _hf_case(b'{"model_type": "qwen3\xff\xfe"}', ["UTF-8"]),
    "hf_config_list": _hf_case("[1, 2]", ["JSON object"]),
    "hf_heads_zero": _hf_case(_hf_config(num_attention_heads=0), ["num_attention_heads"]),
    "hf_heads_bool": _hf_case(_hf_config(num_attention_heads=True), ["num_attention_heads"]),
    "hf_kv_heads_str": _hf_case(_hf_config(num_key_value_heads="8"), ["num_key_value_heads"]),
    "hf_rope_theta_str": _hf_case(_hf_config(rope_theta="abc"), ["rope_theta"]),
    "hf_eps_list": _hf_case(_hf_config(rms_norm_eps=[1]), ["rms_norm_eps"]),
    "hf_head_dim_negative": _hf_case(_hf_config(head_dim=-4), ["head_dim"]),
    "hf_soda_block_list": _hf_case(_hf_config(soda_mega=[1]), ["soda_mega"]),
    # model.safetensors.index.json (import hf)
    "hf_index_deep": _hf_case(_hf_config(), [INDEX, "nested"],
                              model__safetensors__index__json='{"weight_map": ' + DEEP + "}"),
    "hf_index_huge_int": _hf_case(_hf_config(), [INDEX, "4300 digits"],
                                  model__safetensors__index__json='{"x": ' + HUGE_INT + "}"),
    "hf_index_symlink_out": _linked_out(index=True),
    "hf_single_symlink_out": _linked_out(index=False),
    # soda_meta.json of a dataset split (data inspect)
    "soda_meta_deep": _meta_case('{"format": ' + DEEP + "}", ["nested"]),
    "soda_meta_huge_int": _meta_case('{"num_docs": ' + HUGE_INT + "}", ["4300 digits"]),
    # scaling manifest.json (scaling sweep)
    "manifest_deep": _manifest_case('{"runs": ' + DEEP + "}", ["nested"]),
    "manifest_huge_int": _manifest_case('{"runs": ' + HUGE_INT + "}", ["4300 digits"]),
    "manifest_not_utf8": _manifest_case(b'{"format": "\xff"}', ["UTF-8"]),
    "manifest_dropped_int": _manifest_case(
        json.dumps({"format": "soda-mega-scaling-manifest/1", "runs": [], "dropped": 5}),
        ["dropped"]),
    "manifest_dropped_rows": _manifest_case(
        json.dumps({"format": "soda-mega-scaling-manifest/1", "runs": [], "dropped": [5]}),
        ["dropped[0]"]),
    # trainer_state.json of a checkpoint (export hf)
    "state_no_config": _state_case(_without("config"), ["config"]),
    "state_no_step": _state_case(_without("step"), ["step"]),
    "state_step_str": _state_case(_with("step", "abc"), ["step"]),
    "state_step_negative": _state_case(_with("step", -1), ["step"]),
    "state_config_list": _state_case(_with("config", [1]), ["config"]),
    "state_model_list": _state_case(lambda s: {**s, "config": {**s["config"], "model": [1]}},
                                    ["model"]),
    "state_tokens_str": _state_case(_with("tokens", "many"), ["tokens"]),
    "state_weights_only_str": _state_case(_with("weights_only", "yes"), ["weights_only"]),
    "state_huge_int": _state_case(lambda s: '{"step": ' + HUGE_INT + "}", ["4300 digits"]),
}

ACCEPTED = {  # name -> make(tmp) -> (argv, None): inputs that must still work (exit 0)
    "hf_hub_snapshot_links": _hub_snapshot,
}

_STEP: list[Path] = []  # the tiny checkpoint
_HF: list[Path] = []  # its HF export


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case of :data:`CASES` run once, in one fresh process: name -> (result, needles)."""
    _STEP.append(tiny_checkpoint(tmp_path_factory))
    tmp = tmp_path_factory.mktemp("malformed")
    _HF.append(tmp / "hf-export")
    (tmp / "export").mkdir()
    run = run_cli_cases([["export", "hf", str(_STEP[0]), str(_HF[0]), "--dtype", "fp32"]],
                        tmp / "export", each=120)
    assert run[0]["rc"] == 0, run[0]["stderr"][-3000:]
    made = {}
    for name, make in {**CASES, **ACCEPTED}.items():
        (tmp / name).mkdir()
        made[name] = make(tmp / name)
    out = run_cli_cases([argv for argv, _ in made.values()], tmp, each=60, timeout=600)
    return {name: (res, needles) for (name, (_, needles)), res in zip(made.items(), out)}


@pytest.mark.parametrize("name", list(CASES))
def test_sec_malformed_input_names_file_and_field(results, name):
    result, needles = results[name]
    err = result["stderr"]
    assert result["rc"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert all(n in last for n in needles), (needles, err[-3000:])
    assert len(last) < 1000, last[:2000]


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_sec_well_formed_input_still_works(results, name):
    result, _ = results[name]
    assert result["rc"] == 0, result["stderr"][-3000:]


@pytest.mark.parametrize("line,reason", [
    ('{"id": "deep", "audio": "a.wav", "x": ' + DEEP + "}", "nested"),
    ('{"id": "big", "audio": "a.wav", "x": ' + HUGE_INT + "}", "4300 digits"),
])
def test_sec_jsonl_line_that_breaks_json_is_one_bad_record(tmp_path, line, reason):
    """One hostile line of a recordings manifest or a text JSONL is skipped and named; the
    lines around it are read (the builder's rule for every bad line)."""
    from soda_mega.data.write.inputs import TextRange, read_manifest, read_text_range

    good = json.dumps({"id": "good", "audio": "a.wav"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([good, line, good.replace("good", "good2")]) + "\n")
    records, skipped = read_manifest(manifest)
    assert [r.record_id for r in records] == ["good", "good2"]
    assert [s.record for s in skipped] == ["m.jsonl:2"] and reason in skipped[0].reason

    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(['{"text": "one"}', line, '{"text": "three"}']) + "\n")
    size = text.stat().st_size
    docs = list(read_text_range(TextRange(str(text), "jsonl", 0, size, 1, 3)))
    assert [getattr(d, "text", None) for d in docs] == ["one", None, "three"]
    assert docs[1].record == "t.jsonl:2" and reason in docs[1].reason


@pytest.mark.parametrize("line,reason", [
    ('{"id": "deep", "text": ' + DEEP + "}", "nested"),
    ('{"id": "big", "text": ' + HUGE_INT + "}", "4300 digits"),
    (b'{"id": "latin1", "text": "caf\xe9"}', "UTF-8"),
])
def test_sec_eval_manifest_line_that_breaks_json_is_one_bad_item(tmp_path, line, reason):
    """The same for an evaluation manifest: the line is a bad item, named (and skipped with
    ``skip_bad``), never a traceback."""
    from soda_mega.eval.manifest import ManifestError, read_manifest

    manifest = tmp_path / "eval.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    manifest.write_bytes(b'{"id": "a", "text": "one"}\n' + line + b'\n{"id": "c", "text": "x"}\n')
    with pytest.raises(ManifestError, match=f"eval.jsonl:2 \\(line 2\\): .*{reason}"):
        read_manifest(manifest, ["text"])
    kept = read_manifest(manifest, ["text"], skip_bad=True)
    assert [i.id for i in kept.items] == ["a", "c"]
    assert [s["where"] for s in kept.skipped] == [f"{manifest}:2"] and reason in kept.skipped[0]["reason"]
