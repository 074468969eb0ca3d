"""Worker for tests/parallel/test_equivalence.py (run as a script, 1 or 2 processes, gloo).

``--reference``: one process, TP=PP=DP=1: builds the ``tiny`` model, runs one global batch
(4 micro-batches of 2 sequences) and saves the full weights, the batch, the loss and the full
gradients.

Otherwise (under torchrun with 2 processes): for each case, build the model in that layout,
load the reference weights, run the same global batch and compare the loss and every local
gradient shard with the matching slice of the reference gradient. No weights are copied: the
same seed must give the same model in every layout (soda_mega.model.init), which is checked. Each rank writes one JSON
file with the per-case errors; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

from soda_mega.utils.startup import import_torch_frozen  # noqa: E402

import_torch_frozen()  # a process of its own (a no-op where a test module imports this one)
import torch  # noqa: E402

from soda_mega.config import load_config  # noqa: E402
from soda_mega.parallel import state  # noqa: E402

MICRO_BATCH = 2
NUM_MICRO = 4
SEQ = 32
# vocab.codebook_size=16 keeps the vocabulary small (390 ids) and not a multiple of the
# padding unit, so every TP layout pads and must keep padded rows out of the softmax.
BASE = ["--vocab.codebook_size=16", f"--model.seq_length={SEQ}"]

CASES = {
    # name: (overrides, how the global batch is split, expect_match)
    "tp2": (["--parallel.tensor_parallel=2"], "full", True),
    "tp2_sp": (["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"], "full", True),
    "pp2_1f1b": (["--parallel.pipeline_parallel=2"], "full", True),
    "pp2_interleaved": (["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2"], "full", True),
    "dp2": (["--parallel.distributed_optimizer=false"], "dp", True),
    # The fused loss's training path (gradients in the forward, soda_kernels.flce_train) under
    # pipelining, with activation recompute, and under TP (the reference runs Megatron's loss).
    "pp2_1f1b_fused_loss": (["--parallel.pipeline_parallel=2", "--kernels.loss=torch",
                             "--training.recompute=full"], "full", True),
    "pp2_interleaved_fused_loss": (["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2",
                                    "--kernels.loss=torch"], "full", True),
    "tp2_fused_loss": (["--parallel.tensor_parallel=2", "--kernels.loss=torch",
                        "--training.recompute=selective"], "full", True),
    # Negative control: sequence parallelism with norm weights NOT marked sequence_parallel, so
    # finalize_model_grads skips their TP all-reduce. Must be detected as a mismatch.
    "tp2_sp_broken": (["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"], "full", False),
}


def make_batches(layout_size: int, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MICRO):
        ids = torch.randint(0, layout_size, (MICRO_BATCH, SEQ + 1), generator=g)
        mask = (torch.rand(MICRO_BATCH, SEQ, generator=g) > 0.15).float()
        batches.append({
            "tokens": ids[:, :-1].contiguous(),
            "labels": ids[:, 1:].contiguous(),
            "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
        })
    return batches


def split_for_dp(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """DP rank r takes its contiguous share of the global batch's sequences."""
    flat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    per_rank = flat["tokens"].shape[0] // dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in flat.items()}
    return [{k: v[i:i + MICRO_BATCH] for k, v in mine.items()} for i in range(0, per_rank, MICRO_BATCH)]


def global_grad_norm(model, cfg) -> float:
    """The optimizer's gradient norm (what clipping uses), reduced over all ranks."""
    from soda_mega.training.optimizer import build_optimizer

    optimizer = build_optimizer(model, cfg, peak_lr=1e-3)
    optimizer.prepare_grads()
    return float(optimizer.get_grad_norm())


def run_reference(path: str) -> None:
    from soda_mega.model.gpt import build_model
    from soda_mega.parallel.sharding import full_weights_single_process, named_local_params
    from soda_mega.tokens import VocabLayout
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp

    cfg = load_config(preset="tiny", overrides=BASE)
    state.initialize(cfg.parallel, cfg.training.seed)
    model = wrap_ddp(build_model(cfg), cfg)
    weights = full_weights_single_process(model)
    batches = make_batches(VocabLayout.from_config(cfg.vocab).size)
    result = forward_backward(model, batches, NUM_MICRO, SEQ, MICRO_BATCH)
    grads = {g: p.main_grad.detach().clone() for g, _, p in named_local_params(model)}
    torch.save({"weights": weights, "grads": grads, "batches": batches, "loss": result.loss,
                "tokens": result.num_tokens, "grad_norm": global_grad_norm(model, cfg)}, path)
    state.shutdown()


def compare_case(name: str, ref: dict) -> dict:
    from soda_mega.model.gpt import build_model
    from soda_mega.parallel.sharding import local_slice, named_local_params
    from soda_mega.training.forward_backward import forward_backward, wrap_ddp

    overrides, split, expect_match = CASES[name]
    cfg = load_config(preset="tiny", overrides=BASE + overrides)
    layout = state.initialize(cfg.parallel, cfg.training.seed)
    chunks = build_model(cfg)
    if name == "tp2_sp_broken":
        for chunk in chunks:
            for pname, param in chunk.named_parameters():
                if pname.endswith("norm.weight"):
                    param.sequence_parallel = False
    # Same seed: the freshly built shards must already be slices of the one-process weights
    # (rows past the vocabulary are padding, whose count depends on TP, and are zero).
    init_err = 0.0
    for gname, _, param in named_local_params(chunks):
        expected = local_slice(gname, ref["weights"][gname], layout.tp_rank, layout.tp, param.shape)
        init_err = max(init_err, float((param - expected).abs().max()))
    model = wrap_ddp(chunks, cfg)
    batches = ref["batches"]
    if split == "dp":
        batches = split_for_dp(batches, layout.dp_rank, layout.dp)
    from soda_kernels.fused_linear_cross_entropy import WORK

    WORK.reset()
    result = forward_backward(model, batches, len(batches), SEQ, MICRO_BATCH)
    loss_matmuls = sorted({call[0] for call in WORK.calls})
    grad_norm = global_grad_norm(model, cfg)
    grad_errors = {}
    for gname, _, param in named_local_params(model):
        expected = local_slice(gname, ref["grads"][gname], layout.tp_rank, layout.tp, param.shape)
        scale = float(expected.abs().max().clamp_min(1e-12))
        grad_errors[gname] = float((param.main_grad - expected).abs().max()) / scale
    out = {
        "case": name,
        "expect_match": expect_match,
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vp": layout.vp,
                   "tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank, "dp_rank": layout.dp_rank},
        "is_last_stage": layout.is_last_stage,
        "loss_sum": result.loss_sum,
        "num_tokens": result.num_tokens,
        "grad_rel_err": grad_errors,
        "init_rel_err": init_err,
        "grad_norm": grad_norm,
        "loss_matmuls": loss_matmuls,
    }
    state.shutdown(keep_process_group=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--ref-file", required=True)
    parser.add_argument("--out-dir")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if args.reference:
        run_reference(args.ref_file)
        return 0
    ref = torch.load(args.ref_file, weights_only=False)
    rank = int(os.environ["RANK"])
    results = []
    for name in args.cases.split(","):
        results.append(compare_case(name, ref))
        print(f"[rank {rank}] {name} done", flush=True)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"reference_loss": ref["loss"], "reference_tokens": ref["tokens"],
                   "reference_grad_norm": ref["grad_norm"],
                   "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
