"""Worker for test_tensor_parallel.py: 2 gloo processes, every TP=2 case in one torchrun launch.

Each rank computes the TP=1 result itself (the same seed gives the same full inputs on both
ranks), then the TP=2 result on its vocabulary shard, and writes the differences to
``rank<r>.json``:

* fused linear cross-entropy, triton and torch, with z-loss: loss, lse, group statistics,
  hidden gradient (all-reduced) and weight-gradient shard vs TP=1, for the recompute path and
  the training path (gradients in the forward, ``known_grad``); the TP=2 reference; and
  Megatron-core's ``vocab_parallel_cross_entropy`` on this rank's logits (no z-loss). Two
  vocabularies: 203 real ids over 2 x 102 rows (rank 1 holds one padded row) and 100 real ids
  over 2 x 102 rows (rank 1 holds only padding).
  The Triton kernels also run with the torch (cuBLAS) GEMM engine (``*_torchgemm``).
* the measured loss plan: both ranks take the same design whatever their caches hold.
* the fused embedding: output and weight-gradient shard vs TP=1.
* every GPU autotune config of the fused loss (pinned, run by the interpreter) at TP=2 vs the
  fp64 oracle.
* the ``tiny`` model (TP=1, megatron loss, torch embedding) vs TP=2 with both Triton kernels,
  and vs TP=2 + sequence parallelism with the torch loss and the Triton embedding: loss,
  per-modality statistics and every gradient shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from soda_mega.utils.startup import import_torch_frozen

import_torch_frozen()  # a process of its own (a no-op where a test module imports this one)
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tolerances
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402

from flce_cases import make_case, run_fused, run_reference, run_train, upstream_of  # noqa: E402
from soda_mega.config import load_config  # noqa: E402
from soda_mega.config.schema import ParallelConfig  # noqa: E402
from soda_mega.parallel import state  # noqa: E402

FLCE_CASES = {"uneven": (37, 40, 203, 102), "rank1_all_padding": (21, 24, 100, 102)}
MODEL_BASE = ["--vocab.codebook_size=16", "--model.seq_length=32", "--training.z_loss=1e-2"]
MODEL_CASES = {
    "tp2_triton": ["--parallel.tensor_parallel=2", "--kernels.loss=triton", "--kernels.embedding=triton"],
    "tp2_sp_torch": ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true",
                     "--kernels.loss=torch", "--kernels.embedding=triton"],
}


def _max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _rel(a, b) -> float:
    return _max_abs(a, b) / max(float(b.double().abs().max()), 1e-30)


def flce_cases(group, rank: int) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    out = {}
    for name, (n, h, n_real, v_local) in FLCE_CASES.items():
        case = make_case(n, h, 2 * v_local, n_real=n_real, seed=11, scale=3.0)
        rows = slice(rank * v_local, (rank + 1) * v_local)
        shard = dict(case, weight=case["weight"][rows].clone())
        for impl, label, kw in (("triton", "triton", {}), ("torch", "torch", {}),
                                ("triton", "triton_torchgemm", {"gemm_engine": "torch"})):
            one = run_fused(case, impl, z_loss=1e-2, **kw)
            two = run_fused(shard, impl, z_loss=1e-2, tp_group=group, **kw)
            out[f"{name}/{label}"] = {
                "loss": _max_abs(two["loss"], one["loss"]),
                "lse": _max_abs(two["lse"], one["lse"]),
                "group_loss": _max_abs(two["group_loss"], one["group_loss"]),
                "group_tokens_equal": bool(torch.equal(two["group_tokens"], one["group_tokens"])),
                "grad_hidden": _rel(two["grad_hidden"], one["grad_hidden"]),
                "grad_weight": _rel(two["grad_weight"], one["grad_weight"][rows]),
            }
        # The training path (gradients in the forward, row chunks of 16): the TP=2 shards
        # against one process, with the announced gradient = the backward's.
        known = upstream_of(n)
        for impl, label, kw in (("triton", "triton", {}), ("torch", "torch", {}),
                                ("triton", "triton_torchgemm", {"gemm_engine": "torch"})):
            one = run_train(case, impl, known, z_loss=1e-2, row_chunk=16, **kw)
            two = run_train(shard, impl, known, z_loss=1e-2, row_chunk=16, tp_group=group, **kw)
            out[f"{name}/{label}_train"] = {
                "loss": _max_abs(two["loss"], one["loss"]),
                "lse": _max_abs(two["lse"], one["lse"]),
                "group_loss": _max_abs(two["group_loss"], one["group_loss"]),
                "group_tokens_equal": bool(torch.equal(two["group_tokens"], one["group_tokens"])),
                "grad_hidden": _rel(two["grad_hidden"], one["grad_hidden"]),
                "grad_weight": _rel(two["grad_weight"], one["grad_weight"][rows]),
            }
        ref = run_reference(shard, torch.float32, z_loss=1e-2, tp_group=group)
        one = run_fused(case, "triton", z_loss=1e-2)
        out[f"{name}/reference"] = {"loss": _max_abs(ref["loss"], one["loss"]),
                                    "grad_hidden": _rel(ref["grad_hidden"], one["grad_hidden"]),
                                    "grad_weight": _rel(ref["grad_weight"], one["grad_weight"][rows])}
        # Megatron on this rank's logits, padded columns at -inf (SodaGPTModel's hook), no z-loss.
        logits = shard["hidden"] @ shard["weight"].t()
        logits[:, torch.arange(v_local) + rank * v_local >= n_real] = float("-inf")
        full = dict(case, loss_mask=torch.ones(n), loss_groups=case["loss_groups"].clamp_min(0))
        megatron = vocab_parallel_cross_entropy(logits[:, None, :], case["labels"][:, None])[:, 0]
        ours = run_fused(dict(full, weight=shard["weight"]), "triton", tp_group=group)["loss"]
        out[f"{name}/megatron"] = {"loss": _max_abs(ours, megatron)}
    return out


def gpu_config_cases(group, rank: int) -> dict:
    """Every GPU autotune config pinned (see test_flce_gpu_configs.py), TP=2 on this rank's
    shard vs the fp64 oracle of the whole problem: each rank's one vocabulary slice is ragged
    (220 and 210 real columns)."""
    from flce_cases import errors
    from soda_kernels.fused_linear_cross_entropy import pinned_configs
    from test_flce_gpu_configs import N_REAL, NUM_CONFIGS, SLICE, H, N, V, pinned

    case = make_case(N, H, V, n_real=N_REAL, seed=3, scale=3.0, mask_fraction=0.1)
    v_local = V // 2
    rows = slice(rank * v_local, (rank + 1) * v_local)
    shard = dict(case, weight=case["weight"][rows].clone())
    exact = run_reference(case, torch.float64, z_loss=1e-2)
    plain = run_reference(case, torch.float32, z_loss=1e-2)
    exact["grad_weight"], plain["grad_weight"] = exact["grad_weight"][rows], plain["grad_weight"][rows]
    out = {}
    for index in range(NUM_CONFIGS):
        with pinned_configs(pinned(index)):
            two = run_fused(shard, "triton", z_loss=1e-2, tp_group=group, vocab_slice=SLICE)
        out[f"gpu_config{index}"] = {"ours": errors(two, exact), "torch_fp32": errors(plain, exact)}
    return out


def measure_cases(group, rank: int, out_dir: str) -> dict:
    """The measured loss plan (impl torch, tiny shapes) with a cache folder per rank, so the
    ranks' caches can disagree: (a) nothing cached, (b) only rank 0 cached, (c) both cached
    with different answers -- each rank measures, none waits for a collective the other never
    makes, and both take the same design; (d) both cached alike: both read it, time nothing."""
    from soda_kernels import flce_measure

    cache = os.path.join(out_dir, f"cache{rank}")
    os.environ["SODA_KERNELS_CACHE"] = cache
    flce_measure.WARMUP, flce_measure.REPS = 0, 1
    n, h, n_real, v_local = FLCE_CASES["uneven"]
    case = make_case(n, h, 2 * v_local, n_real=n_real, seed=11, scale=3.0)
    shard = dict(case, weight=case["weight"][rank * v_local:(rank + 1) * v_local].clone())
    known = upstream_of(n)

    def step() -> dict:
        flce_measure.forget()  # each scenario is a fresh process's view
        before = len(flce_measure.DECISIONS)
        run_train(shard, "torch", known, z_loss=1e-2, tp_group=group, loss_plan="measure")
        (d,) = flce_measure.DECISIONS[before:]
        return {"source": d.source, "design": d.choice[0], "times": d.times_s}

    out = {"none_cached": step()}
    path = next(os.path.join(cache, f) for f in os.listdir(cache))
    if rank == 1:
        os.remove(path)
    out["rank0_cached"] = step()
    data = json.load(open(path))
    data["choice"]["design"] = ("recompute", "three_matmul")[rank]
    with open(path, "w") as f:
        json.dump(data, f)
    out["caches_disagree"] = step()
    out["both_cached"] = step()
    return {"measure": out}


def embedding_case(group, rank: int) -> dict:
    from soda_kernels.interleaved_embedding import interleaved_embedding

    kw = dict(text_vocab_size=258, audio_base=262, codebook_size=16, num_codebooks=8)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 2 * 195 + 3, (3, 29), generator=g)
    weight = torch.randn(2 * 195, 40, generator=g)
    grad = torch.randn(3, 29, 40, generator=g)
    rows = slice(rank * 195, (rank + 1) * 195)
    w1, w2 = weight.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    one = interleaved_embedding(ids, w1, **kw)
    two = interleaved_embedding(ids, w2, tp_group=group, **kw)
    one.embeddings.backward(grad)
    two.embeddings.backward(grad)
    return {"embedding": {"out": _max_abs(two.embeddings, one.embeddings),
                          "grad_weight": _max_abs(w2.grad, w1.grad[rows]),
                          "modality_equal": bool(torch.equal(two.modality, one.modality))}}


def _model_run(overrides: list[str], batch: dict):
    from megatron.core import parallel_state as ps

    from soda_mega.model.gpt import build_model
    from soda_mega.parallel.sharding import named_local_params

    cfg = load_config(preset="tiny", overrides=MODEL_BASE + overrides)
    layout = state.initialize(cfg.parallel, cfg.training.seed)
    (model,) = build_model(cfg)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                loss_mask=batch["loss_mask"])
    mask = batch["loss_mask"]
    ((out.token_loss * mask).sum() / mask.sum()).backward()
    grads = {}
    for gname, _, param in named_local_params([model]):
        grad = param.grad
        # What finalize_model_grads does: TP-replicated norms hold partial gradients.
        if ((cfg.parallel.sequence_parallel and getattr(param, "sequence_parallel", False))
                or "q_layernorm" in gname or "k_layernorm" in gname):
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        grads[gname] = grad
    state.shutdown(keep_process_group=True)
    return out, grads, layout


def model_cases() -> dict:
    from soda_mega.parallel.sharding import local_slice
    from soda_mega.tokens import VocabLayout

    cfg = load_config(preset="tiny", overrides=MODEL_BASE)
    size = VocabLayout.from_config(cfg.vocab).size
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, size, (2, 33), generator=g)
    batch = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "loss_mask": (torch.rand(2, 32, generator=g) > 0.2).float(),
             "position_ids": torch.arange(32).expand(2, 32).contiguous()}
    ref_out, ref_grads, _ = _model_run([], batch)
    results = {}
    for name, overrides in MODEL_CASES.items():
        out, grads, layout = _model_run(overrides, batch)
        errs = {gname: _rel(grad, local_slice(gname, ref_grads[gname], layout.tp_rank, layout.tp,
                                              grad.shape))
                for gname, grad in grads.items()}
        results[name] = {
            "token_loss": _max_abs(out.token_loss, ref_out.token_loss),
            "group_loss": _max_abs(out.group_loss, ref_out.group_loss),
            "group_tokens_equal": bool(torch.equal(out.group_tokens, ref_out.group_tokens)),
            "grad_rel": max(errs.values()), "worst": max(errs, key=errs.get), "params": len(errs),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    state.initialize(ParallelConfig(tensor_parallel=2), seed=1234)
    from megatron.core import parallel_state as ps

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    results = {**flce_cases(group, rank), **embedding_case(group, rank),
               **gpu_config_cases(group, rank), **measure_cases(group, rank, args.out_dir)}
    state.shutdown(keep_process_group=True)
    results.update(model_cases())
    with open(os.path.join(args.out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
