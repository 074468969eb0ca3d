"""Safetensors shard files of an export (planned by huggingface_hub, as transformers plans
them): file names, which tensor goes where, and the index, for small hand-sized tensors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from soda_mega.hf.safetensors_io import INDEX, SINGLE, read_weights, write_weights


def _index(folder) -> dict:
    return json.loads((folder / INDEX).read_text())


def test_shards_fill_in_natural_order_and_the_index_names_each_tensor(tmp_path):
    # five 1 KB tensors, 2.6 KB per file: 2 + 2 + 1, "layers.10" after "layers.3"
    tensors = {f"layers.{i}.w": torch.full((256,), float(i)) for i in [0, 1, 2, 10, 3]}
    files = write_weights(tensors, tmp_path, 2600)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == names + [INDEX]
    assert not (tmp_path / SINGLE).exists()
    index = _index(tmp_path)
    assert index == {"metadata": {"total_size": 5 * 1024}, "weight_map": {
        "layers.0.w": names[0], "layers.1.w": names[0], "layers.2.w": names[1],
        "layers.3.w": names[1], "layers.10.w": names[2]}}
    assert list(load_file(str(tmp_path / names[1]))) == ["layers.2.w", "layers.3.w"]
    assert (tmp_path / INDEX).read_text().endswith("}\n")
    back, _ = read_weights(tmp_path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_file_is_filled_up_to_the_limit_exactly(tmp_path):
    tensors = {f"t{i}": torch.zeros(250) for i in range(4)}  # 1000 bytes each
    assert write_weights(tensors, tmp_path, 2000) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX]
    assert set(_index(tmp_path)["weight_map"].items()) == {
        ("t0", "model-00001-of-00002.safetensors"), ("t1", "model-00001-of-00002.safetensors"),
        ("t2", "model-00002-of-00002.safetensors"), ("t3", "model-00002-of-00002.safetensors")}


def test_weights_under_the_limit_are_one_file_without_index(tmp_path):
    tensors = {f"t{i}": torch.zeros(250, dtype=torch.bfloat16) for i in range(4)}
    assert write_weights(tensors, tmp_path, 5 * 10**9) == [SINGLE]
    assert not (tmp_path / INDEX).exists()
    assert sorted(load_file(str(tmp_path / SINGLE))) == ["t0", "t1", "t2", "t3"]


def test_views_of_one_storage_count_their_own_bytes(tmp_path):
    """q/k/v cut from one fused weight are three tensors of 4 KB each in the files, not one
    12 KB storage placed together."""
    fused = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    tensors = {"q": fused[:32], "k": fused[32:64], "v": fused[64:], "o": torch.zeros(32, 32)}
    files = write_weights(tensors, tmp_path, 9000)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX]
    index = _index(tmp_path)
    assert index["metadata"] == {"total_size": 4 * 4096}
    assert index["weight_map"] == {"k": files[0], "o": files[0], "q": files[1], "v": files[1]}
    back, _ = read_weights(tmp_path)
    assert torch.equal(back["k"], fused[32:64]) and torch.equal(back["v"], fused[64:])


def test_a_tensor_over_the_limit_gets_a_file_of_its_own(tmp_path):
    """huggingface_hub's (and transformers') rule: the oversized tensor takes the next file
    number and the others keep filling theirs."""
    tensors = {"a": torch.zeros(50), "big": torch.zeros(300), "c": torch.zeros(100)}
    files = write_weights(tensors, tmp_path, 1000)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX]
    assert _index(tmp_path)["weight_map"] == {"a": files[1], "big": files[0], "c": files[1]}
