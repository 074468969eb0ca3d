"""The measured choice of the fused loss's design (soda_kernels.flce_measure), for real on CPU
with both designs in torch at tiny shapes: the cache written, reused by a fresh process view
without timing, keyed so another shape or dtype measures again, a corrupt, foreign or
unwritable cache survived with one warning; measuring leaves the gradients as the chosen
design computes them. TP2 agreement: tests/kernels/test_tensor_parallel.py."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from flce_cases import make_case, run_train, upstream_of
from soda_kernels import flce_measure
from soda_kernels.flce_measure import DECISIONS, candidates, measures
from soda_kernels.fused_linear_cross_entropy import WORK


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SODA_KERNELS_CACHE", str(tmp_path / "kernel-cache"))
    monkeypatch.setattr(flce_measure, "WARMUP", 0)  # tiny shapes: the choice is not the point
    monkeypatch.setattr(flce_measure, "REPS", 1)
    flce_measure.forget()
    yield tmp_path / "kernel-cache"
    flce_measure.forget()


def _run(n=24, dtype=torch.float32, plan="measure", seed=0):
    case = make_case(n, 16, 70, seed=seed, scale=3.0)
    before = len(DECISIONS)
    out = run_train(case, "torch", upstream_of(n), z_loss=1e-2, loss_plan=plan)
    return out, DECISIONS[before:]


def test_measure_writes_the_cache_and_a_fresh_process_reuses_it(cache, caplog):
    with caplog.at_level(logging.INFO, logger="soda_kernels.flce"):
        out, new = _run()
    (decision,) = new
    assert decision.source == "measured" and set(decision.times_s) == {"recompute", "three_matmul"}
    assert all(t > 0 for t in decision.times_s.values())
    line = [r.getMessage() for r in caplog.records if "loss plan for" in r.getMessage()]
    assert len(line) == 1 and re.fullmatch(
        r"loss plan for \(N=24, H=16, V=70, tp=1\): measured recompute [\d.e+]+ ms, "
        r"three_matmul [\d.e+]+ ms -> (recompute|three_matmul) \(no roofline here; static "
        r"choice three_matmul\)", line[0]), line
    (path,) = cache.glob("flce-plan-*.json")
    data = json.loads(path.read_text())
    key = data["key"]
    assert (key["tokens"], key["hidden"], key["vocab_local"], key["dtype"], key["tp"]) == \
        (24, 16, 70, "float32", 1)
    assert key["torch"] == torch.__version__ and key["device"].startswith("cpu ")
    assert "triton" in key and "+" in key["soda_kernels"]
    design = decision.choice[0]
    assert data["choice"]["design"] == design
    # Measuring did not touch the result: it is the chosen design's, bit for bit.
    fixed, none = _run(plan=design)
    assert not none
    for name in ("loss", "grad_hidden", "grad_weight"):
        assert torch.equal(out[name], fixed[name]), name
    # A fresh process (nothing remembered) reads the file and times nothing; the file decides:
    # with the other design written in it, that one runs.
    other = "recompute" if design == "three_matmul" else "three_matmul"
    data["choice"]["design"] = other
    path.write_text(json.dumps(data))
    flce_measure.forget()
    WORK.reset()
    _, new = _run()
    assert [(d.source, d.choice[0]) for d in new] == [("cache", other)]
    assert ("dlogits" in {c[0] for c in WORK.calls}) == (other == "recompute")
    _, new = _run()  # remembered in this process: not even the file is read again
    assert not new and len(list(cache.glob("flce-plan-*.json"))) == 1


def test_another_shape_or_dtype_measures_again(cache):
    _, first = _run(n=24)
    _, again = _run(n=24, seed=3)  # another batch of the same shape: remembered
    _, rows = _run(n=40)
    assert [d.source for d in first + again + rows] == ["measured", "measured"]
    # bf16 weights with Megatron's fp32 main_grad (the training path's 16-bit case)
    case = make_case(24, 16, 70, dtype=torch.bfloat16, scale=3.0)
    weight = torch.nn.Parameter(case["weight"])
    weight.main_grad = torch.zeros(70, 16)
    weight.grad_added_to_main_grad = False
    before = len(DECISIONS)
    hidden = case["hidden"].clone().requires_grad_()
    from soda_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    out = fused_linear_cross_entropy(hidden, weight, case["labels"], case["loss_mask"],
                                     impl="torch", known_grad=case["loss_mask"],
                                     loss_plan="measure")
    (out.loss * case["loss_mask"]).sum().backward()
    assert [d.source for d in DECISIONS[before:]] == ["measured"]
    assert DECISIONS[-1].key["dtype"] == "bfloat16" and DECISIONS[-1].key["main_grad"]
    assert (weight.main_grad != 0).any()  # the real step's gradient, once
    assert len(list(cache.glob("flce-plan-*.json"))) == 3


@pytest.mark.parametrize("damage", ["corrupt", "foreign_key", "not_a_candidate"])
def test_a_bad_cache_file_is_ignored_with_one_warning(cache, caplog, damage):
    _run()
    (path,) = cache.glob("flce-plan-*.json")
    data = json.loads(path.read_text())
    if damage == "corrupt":
        path.write_text('{"format": "soda_kernels loss plan v1", "key": {')
    elif damage == "foreign_key":
        data["key"]["device"] = "NVIDIA H100 80GB HBM3"
        path.write_text(json.dumps(data))
    else:
        data["choice"]["engine"] = "cublas"
        path.write_text(json.dumps(data))
    flce_measure.forget()
    with caplog.at_level(logging.WARNING, logger="soda_kernels.flce"):
        _, first = _run()
        flce_measure.forget()
        if damage == "corrupt":
            path.write_text("garbage")
        _, second = _run()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage(), warnings
    assert [d.source for d in first] == ["measured"]
    assert [d.source for d in second] == ["measured" if damage == "corrupt" else "cache"]
    assert json.loads(path.read_text())["key"] == data["key"] or damage == "foreign_key"


def test_an_unwritable_cache_warns_and_the_run_goes_on(cache, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SODA_KERNELS_CACHE", str(blocker / "kernel-cache"))
    flce_measure.forget()
    with caplog.at_level(logging.WARNING, logger="soda_kernels.flce"):
        _, new = _run()
    assert [d.source for d in new] == ["measured"]
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
    flce_measure.forget()


def test_auto_measures_on_a_gpu_only(cache, monkeypatch):
    """On CPU (and in Triton's interpreter) ``auto`` is the static choice and times nothing:
    CPU runs stay reproducible. On a GPU it measures."""
    WORK.reset()
    _, new = _run(plan="auto")
    assert not new and "dlogits" not in {c[0] for c in WORK.calls}  # three matmuls
    assert not measures("auto", torch.device("cpu")) and measures("measure", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert measures("auto", torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not measures("auto", torch.device("cuda"))


def test_candidates_are_designs_times_engines():
    both = [("recompute", "triton"), ("recompute", "torch"), ("three_matmul", "triton"),
            ("three_matmul", "torch")]
    assert candidates("measure", "auto", "triton") == both
    assert candidates("auto", "torch", "triton") == [("recompute", "torch"),
                                                     ("three_matmul", "torch")]
    assert candidates("recompute", "auto", "triton") == both[:2]
    assert candidates("measure", "auto", "torch") == [("recompute", "torch"),
                                                      ("three_matmul", "torch")]
    with pytest.raises(ValueError, match="loss_plan must be one of"):
        _run(plan="fastest")


def test_the_config_reaches_the_loss(megatron_one_process, cache):
    """``--kernels.loss_plan=measure`` in a tiny model's training step: the first micro-batch
    measures, the second reuses the choice."""
    from soda_mega.config import load_config
    from soda_mega.model.gpt import build_model
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp
    from test_model_kernels import SMALL, _batch

    cfg = load_config(preset="tiny", overrides=[*SMALL, "--kernels.loss=torch",
                                                "--kernels.loss_plan=measure"])
    model = wrap_ddp(build_model(cfg), cfg)
    before = len(DECISIONS)
    forward_backward(model, [_batch(cfg, seed=s) for s in range(2)], 2, 32, 2)
    assert [d.source for d in DECISIONS[before:]] == ["measured"]
    assert model[0].module.loss_plan == "measure" and cfg.kernels.gemm_engine == "auto"
