"""The step-time model's arithmetic: its FLOP count is the project's, and each mechanism moves
the prediction the way the physics says (bubble, interleaving, TP across nodes, recompute,
DP overlap, datasheet ratios). Pure arithmetic, no GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest

from soda_mega.config import load_config
from soda_mega.model.accounting import flops_per_token
from soda_mega.planning.hardware import gpu_spec
from soda_mega.planning.search import rank_layouts
from soda_mega.planning.shapes import SODA_STACK, TE_STACK, Layout, shape_of
from soda_mega.planning.steptime import model_flops_per_token, step_time
from soda_mega.tokens.layout import VocabLayout

SODA = ("soda-135m", "soda-600m", "soda-1.7b", "soda-4b")


def test_model_flops_are_the_accounting_modules():
    for preset in SODA:
        cfg = load_config(None, preset, [])
        vocab = VocabLayout.from_config(cfg.vocab).size
        assert model_flops_per_token(shape_of(cfg, vocab)) == pytest.approx(
            flops_per_token(cfg.model, vocab).training, rel=1e-12)


def test_each_mechanism_moves_the_step_the_right_way():
    cfg = load_config(None, "soda-4b", [])
    m, h100 = shape_of(cfg), gpu_spec("h100-sxm")
    base = Layout(tp=2, pp=4, dp=8, micro_batch=1, global_batch=512, sp=True)
    t = lambda lay, gpu=h100, stack=SODA_STACK: step_time(m, lay, gpu, stack)  # noqa: E731
    one = t(base)
    assert one.parts["pipeline bubble"] > 0
    inter = t(replace(base, vp=3))  # interleaving divides the bubble by the virtual stages
    assert inter.parts["pipeline bubble"] == pytest.approx(one.parts["pipeline bubble"] / 3, rel=0.01)
    # TP 8 over nodes of 4 GPUs goes over InfiniBand (4 NICs of 50 GB/s per node against
    # NVLink's 450): collectives 450 / 200 = 2.25x slower than inside one node of 8
    wide = replace(base, tp=8, dp=2)
    assert t(replace(wide, gpus_per_node=4)).parts["layer tp_comm_fwd"] == pytest.approx(
        2.25 * t(wide).parts["layer tp_comm_fwd"], rel=1e-6)
    # full recompute repeats the forward; selective only the attention's
    full, sel = t(replace(base, recompute="full")), t(replace(base, recompute="selective"))
    assert one.seconds < sel.seconds < full.seconds
    # a DP reduction that cannot hide under the last micro-batch's backward shows up
    no_overlap = replace(SODA_STACK, overlap_grad_reduce=False)
    assert t(base, stack=no_overlap).parts["dp grad reduce"] > one.parts["dp grad reduce"]
    # Transformer Engine's attention and TP overlap are faster than soda-mega's kernels
    # (same loss); Megatron's eager cross-entropy is slower than the fused loss
    te = t(base, stack=replace(TE_STACK, loss="soda_fused"))
    assert te.parts["layer attention_bwd"] < one.parts["layer attention_bwd"]
    assert te.parts["layer tp_comm_fwd"] < one.parts["layer tp_comm_fwd"] and te.seconds < one.seconds
    assert t(base, stack=replace(SODA_STACK, loss="megatron")).seconds > one.seconds
    # a faster GPU is faster; the H200 only by its bandwidth-bound parts
    assert t(base, gpu_spec("h200")).seconds < one.seconds < t(base, gpu_spec("h100-pcie")).seconds
    with pytest.raises(ValueError, match="does not divide"):
        t(replace(base, tp=3))


@pytest.mark.parametrize(("gpu", "gpus"), [("h100-sxm", 8), ("h200", 256)])
def test_every_soda_preset_plans_on_8_and_256_gpus(gpu, gpus):
    for preset in SODA:
        ranked = rank_layouts(load_config(None, preset, []), gpus, gpu_spec(gpu))
        assert ranked, (preset, gpus)
        assert 0.05 < ranked[0].time.mfu < 0.8, (preset, gpus, ranked[0].time.mfu)
