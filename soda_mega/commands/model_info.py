"""``soda-mega model``: parameters, FLOPs per token and memory per rank, without building the model.

Everything is computed from the resolved configuration by :mod:`soda_mega.model.accounting`,
so it runs instantly for any size. ``--tp`` / ``--pp`` are shorthands for the overrides
``--parallel.tensor_parallel=N`` / ``--parallel.pipeline_parallel=N`` and are validated the
same way (a bad value fails naming the field, exit code 2). ``--dp`` only affects the
optimizer-state shard of the memory estimate.

``--json`` prints one object with these keys:

* ``model``: the ``model`` config section (shape, ``seq_length`` ...).
* ``vocab``: ``size`` (real ids), ``padded_size`` (for this TP), ``divisible_by``.
* ``parallel``: ``tensor_parallel``, ``pipeline_parallel``, ``data_parallel``,
  ``distributed_optimizer``, ``precision``.
* ``parameters``: :class:`~soda_mega.model.accounting.ParamCounts` as a dict
  (``total``, ``non_embedding``, ``size_label``, ``embedding``, ``output_layer``, ... and the
  ``*_unpadded`` twins).
* ``per_rank``: one dict per pipeline stage, parameters of one TP rank of that stage
  (see :func:`~soda_mega.model.accounting.per_rank_parameters`).
* ``flops_per_token``: :class:`~soda_mega.model.accounting.FlopsBreakdown` as a dict
  (forward terms, ``forward``, ``training``, ``six_n``, ``ratio_to_six_n``), full-sequence
  attention convention.
* ``flops_per_token_causal``: the same with causal attention (attention terms halved).
* ``memory_per_rank``: :func:`~soda_mega.model.accounting.memory_per_rank` (bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from soda_mega.commands.argtypes import positive_int
from soda_mega.commands.show_config import add_config_arguments
from soda_mega.config import load_config
from soda_mega.model.accounting import (
    FlopsBreakdown,
    count_parameters,
    flops_per_token,
    memory_per_rank,
    per_rank_parameters,
)
from soda_mega.tokens.layout import VocabLayout


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "model",
        help="parameters, FLOPs per token and memory per rank of a configured model",
        description="Print parameter counts, exact training FLOPs per token next to 6N, and "
                    "bytes of weights / grads / optimizer state per rank, without building the model.",
    )
    add_config_arguments(p)
    # NOTE: plain ints here (no range check) so that a bad TP/PP size reaches load_config and
    # fails with the field's own message, e.g. "parallel.tensor_parallel: 3 must divide ...".
    p.add_argument("--tp", type=int, metavar="N",
                   help="tensor-parallel size (= --parallel.tensor_parallel=N)")
    p.add_argument("--pp", type=int, metavar="N", help="pipeline stages (= --parallel.pipeline_parallel=N)")
    p.add_argument("--dp", type=positive_int, default=1, metavar="N",
                   help="data-parallel size, shards optimizer state with parallel.distributed_optimizer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def report(cfg, dp: int = 1) -> dict:
    """The whole report as a JSON-able dict (keys documented in the module docstring)."""
    layout = VocabLayout.from_config(cfg.vocab)
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    counts = count_parameters(cfg.model, layout, tp)
    return {
        "model": dataclasses.asdict(cfg.model),
        "vocab": {"size": layout.size, "padded_size": counts.padded_vocab_size,
                  "divisible_by": cfg.model.make_vocab_size_divisible_by},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                     "distributed_optimizer": cfg.parallel.distributed_optimizer,
                     "precision": cfg.training.precision},
        "parameters": counts.to_dict(),
        "per_rank": per_rank_parameters(cfg.model, layout, tp, pp),
        "flops_per_token": flops_per_token(cfg.model, layout.size).to_dict(),
        "flops_per_token_causal": flops_per_token(cfg.model, layout.size, causal=True).to_dict(),
        "memory_per_rank": memory_per_rank(cfg, dp),
    }


def _params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gflop(x: float) -> str:
    return f"{x / 1e9:.4f} GFLOP"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_table(rep: dict) -> str:
    """The report as aligned text with units."""
    m, v, par, c = rep["model"], rep["vocab"], rep["parallel"], rep["parameters"]
    f, fc, mem = rep["flops_per_token"], rep["flops_per_token_causal"], rep["memory_per_rank"]
    lines = [
        f"model {m['name']}: d={m['hidden_size']} L={m['num_layers']} heads={m['num_attention_heads']}/"
        f"{m['num_kv_heads']} head_dim={m['head_dim']} ffn={m['ffn_hidden_size']} seq={m['seq_length']}",
        f"vocab {v['size']:,} ids, padded to {v['padded_size']:,} "
        f"(multiple of {v['divisible_by']} x TP {par['tensor_parallel']})",
        "",
        "parameters                    padded       unpadded",
    ]

    def row(label: str, a: float, b: float | None = None) -> str:
        return f"  {label:<24}{_params(a):>12}   {_params(b) if b is not None else '':>12}"

    lines += [
        row("total", c["total"], c["total_unpadded"]),
        row("non-embedding", c["non_embedding"]),
        row("  per layer", c["per_layer"]),
        row("embedding", c["embedding"], c["embedding_unpadded"]),
        row("output layer", c["output_layer"], c["output_layer_unpadded"]),
        row("SODA size label", c["size_label"], c["size_label_unpadded"]),
        "",
        f"per rank (TP {par['tensor_parallel']} x PP {par['pipeline_parallel']}; one TP rank per stage, "
        "norms replicated)",
    ]
    for r in rep["per_rank"]:
        last = r["first_layer"] + r["num_layers"] - 1
        parts = [f"layers {r['first_layer']}-{last}"]
        if r["embedding"]:
            parts.append(f"embedding {_params(r['embedding'])}")
        if r["output_layer"]:
            parts.append(f"output layer {_params(r['output_layer'])}")
        lines.append(f"  stage {r['stage']:<3}{_params(r['total']):>12}   ({', '.join(parts)})")

    fields = [x.name for x in dataclasses.fields(FlopsBreakdown)]
    terms = [k for k in fields if k not in ("seq_length", "causal", "six_n")]

    def frow(label: str, a: str, b: str) -> str:
        return f"  {label:<26}{a:>16}{b:>16}"

    lines += ["", f"{'FLOPs per token, seq ' + str(f['seq_length']):<28}{'full attention':>16}{'causal':>16}"]
    lines += [frow(f"forward {k}", _gflop(f[k]), _gflop(fc[k])) for k in terms]
    lines += [
        frow("forward total", _gflop(f["forward"]), _gflop(fc["forward"])),
        frow("training (3x forward)", _gflop(f["training"]), _gflop(fc["training"])),
        frow("6N (N = unpadded label)", _gflop(f["six_n"]), _gflop(fc["six_n"])),
        # NOTE: the ratio is padded by len(" GFLOP") so its digits line up with the column above.
        frow("training / 6N", f"{f['ratio_to_six_n']:.4f}      ", f"{fc['ratio_to_six_n']:.4f}      "),
        "",
        f"memory per rank (largest: stage {mem['stage']}, {_params(mem['parameters'])} params, "
        f"{par['precision']}, DP {mem['data_parallel']}, "
        f"optimizer sharded over {mem['optimizer_sharded_over']})",
        f"  weights                 {_gib(mem['weights_bytes']):>12}",
        f"  grads (fp32 main_grad)  {_gib(mem['grads_bytes']):>12}",
        f"  optimizer state         {_gib(mem['optimizer_state_bytes']):>12}"
        f"   (fp32 master {_gib(mem['master_weights_bytes'])}, "
        f"Adam moments {_gib(mem['adam_moments_bytes'])})",
        f"  total                   {_gib(mem['total_bytes']):>12}   (activations not included)",
    ]
    return "\n".join(line.rstrip() for line in lines)


def run(args) -> int:
    overrides = list(args.overrides)
    # NOTE: appended last so --tp/--pp win over any --parallel.* override given alongside.
    if args.tp is not None:
        overrides.append(f"--parallel.tensor_parallel={args.tp}")
    if args.pp is not None:
        overrides.append(f"--parallel.pipeline_parallel={args.pp}")
    cfg = load_config(args.config, args.preset, overrides)
    rep = report(cfg, args.dp)
    print(json.dumps(rep, indent=2) if args.json else format_table(rep))
    return 0
