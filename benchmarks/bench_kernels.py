"""Fused linear cross-entropy and interleaved embedding vs. their baselines (issue 4, item 6).

For each shape, every implementation runs in this process on the same inputs; the script
records forward, backward and forward+backward time (median over ``--iters``) and, on CUDA,
the peak memory above the inputs, checks each loss against the plain-PyTorch reference the
tests use, and reports time ratios against the Triton kernel.

Loss implementations: ``reference`` (fp32 materialised logits, the tests' oracle path),
``torch_eager`` (logits + ``F.cross_entropy``), ``torch_compile`` (the same, compiled),
``megatron`` (logits + Megatron-core ``vocab_parallel_cross_entropy``), ``liger`` and ``cce``
(Liger-Kernel / cut-cross-entropy, when installed; never installed by this script),
``soda_torch`` (chunked PyTorch) and ``soda_triton``. Embedding: ``reference``, ``torch``
(``F.embedding``), ``megatron`` (``VocabParallelEmbedding``), ``soda_triton``. All losses are
computed without z-loss, which not every baseline supports.

Shapes (SODA, issue 4): N in {8192, 16384} tokens, H in {512, 1024, 2048, 2560}, V = 144,644
and the TP=2 / TP=4 shards of the padded vocabulary (rank 0: all rows real).

    python benchmarks/bench_kernels.py                # GPU, full grid, bf16
    python benchmarks/bench_kernels.py --smoke        # seconds on CPU (Triton interpreter)

Writes ``bench_kernels_<device>[_smoke].json`` (stamped with device, driver, versions and
commit), a markdown table and, if matplotlib is importable, a plot into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SODA_VOCAB = 144_644


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets (H100): loss fwd+bwd >= 2x torch_eager and >= 1.3x "
                                       "the best of liger/cce; embedding bwd >= 2x torch.")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 1 iteration, CPU-friendly (sets TRITON_INTERPRET=1 without CUDA)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], help="N values")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048, 2560], help="H values")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4],
                   help="vocabulary shards: TP sizes whose rank-0 shard is benchmarked")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", choices=["loss", "embedding"], help="run one of the two benchmarks")
    p.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.tp, args.iters, args.warmup = [96], [48], [1, 2], 1, 0
        args.dtype = "fp32"
    return args


# ----------------------------------------------------------------------------- timing
def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(torch, forward, backward_input, iters: int, warmup: int) -> dict:
    """Median fwd / bwd / fwd+bwd seconds of ``forward()`` -> scalar, and CUDA peak bytes."""
    cuda = torch.cuda.is_available()
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    peak = None
    for i in range(warmup + iters):
        for t in backward_input:
            t.grad = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(torch)
        t0 = time.perf_counter()
        loss = forward()
        _sync(torch)
        t1 = time.perf_counter()
        loss.backward()
        _sync(torch)
        t2 = time.perf_counter()
        if i >= warmup:
            times["fwd"].append(t1 - t0)
            times["bwd"].append(t2 - t1)
            times["fwd_bwd"].append(t2 - t0)
            if cuda:
                peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
        value = float(loss.detach())
        del loss
    out = {k: statistics.median(v) for k, v in times.items()}
    out["peak_bytes"] = peak
    out["value"] = value
    return out


# ----------------------------------------------------------------------------- loss methods
def loss_methods(torch, skip):
    import torch.nn.functional as F

    from soda_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )

    def eager(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")

    methods = {
        "reference": lambda h, w, y: fused_linear_cross_entropy_reference(h, w, y).loss.sum(),
        "torch_eager": eager,
        "soda_torch": lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl="torch").loss.sum(),
        "soda_triton": lambda h, w, y: fused_linear_cross_entropy(h, w, y, impl="triton").loss.sum(),
    }
    notes = {}
    try:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        methods["megatron"] = lambda h, w, y: vocab_parallel_cross_entropy(
            (h @ w.t())[:, None, :], y[:, None]).sum()
    except ImportError as err:
        notes["megatron"] = f"not importable: {err}"
    if "torch_compile" not in skip:
        if torch.cuda.is_available():
            methods["torch_compile"] = torch.compile(eager)
        else:
            notes["torch_compile"] = "skipped on CPU (inductor's C++ build takes minutes; run on GPU)"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, y):
            out = liger_fused_linear_cross_entropy(h, w, y, reduction="sum")
            return out[0] if isinstance(out, tuple) else out  # newer versions add z-loss

        methods["liger"] = liger
    except ImportError:
        notes["liger"] = "liger-kernel not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy

        methods["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum")
    except ImportError:
        notes["cce"] = "cut-cross-entropy not installed"
    for name in skip:
        methods.pop(name, None)
    return methods, notes


def run_loss(torch, args, dtype, device) -> tuple[list[dict], dict]:
    from soda_mega.tokens import VocabLayout

    from soda_kernels.fused_linear_cross_entropy import default_chunk_rows

    methods, notes = loss_methods(torch, args.skip)
    rows = []
    vocab = 190 if args.smoke else SODA_VOCAB
    layout_pad = VocabLayout.soda_default()
    for tp in args.tp:
        if args.smoke:
            v_local = -(-vocab // tp)
        elif tp == 1:
            v_local = vocab
        else:
            v_local = layout_pad.padded_size(tp, 128) // tp
        for n in args.tokens:
            for h in args.hidden:
                g = torch.Generator(device="cpu").manual_seed(0)
                hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
                weight = (torch.randn(v_local, h, generator=g) / h ** 0.5).to(device, dtype)
                weight.requires_grad_()
                labels = torch.randint(0, v_local, (n,), generator=g).to(device)
                shape = {"tokens": n, "hidden": h, "vocab_local": v_local, "tp": tp}
                ref_value = None
                for name, fn in methods.items():
                    try:
                        m = measure(torch, lambda: fn(hidden, weight, labels), (hidden, weight),
                                    args.iters, args.warmup)
                    except Exception as err:  # noqa: BLE001 - a failing baseline is recorded, not fatal
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        rows.append({"op": "loss", **shape, "impl": name,
                                     "error": f"{type(err).__name__}: {err}"[:300]})
                        continue
                    if name == "reference":
                        ref_value = m["value"]
                    m["loss_rel_diff_vs_reference"] = (
                        None if ref_value is None else abs(m["value"] - ref_value) / abs(ref_value))
                    rows.append({"op": "loss", **shape, "impl": name, **m})
                # Peak is measured above the inputs (weights, hidden) already allocated, so the
                # issue's "weights + gradients + one chunk" becomes: gradients + one dlogits
                # chunk + the fp32 grad_W accumulator (non-fp32 weights only).
                elt = torch.finfo(dtype).bits // 8
                chunk = default_chunk_rows(n, h, v_local) * v_local * elt
                budget = (v_local + n) * h * elt + chunk
                budget += v_local * h * 4 if dtype != torch.float32 else 0
                rows.append({"op": "loss_memory_budget", **shape, "budget_above_inputs_bytes": budget})
                del hidden, weight, labels
    return rows, notes


# ----------------------------------------------------------------------------- embedding
def run_embedding(torch, args, dtype, device) -> tuple[list[dict], dict]:
    import torch.nn.functional as F

    from soda_kernels.interleaved_embedding import interleaved_embedding, interleaved_embedding_reference
    from soda_mega.tokens import VocabLayout

    layout = VocabLayout(text_vocab_size=258, bos_id=256, eos_id=257, codebook_size=16) \
        if args.smoke else VocabLayout.soda_default()
    kw = dict(text_vocab_size=layout.text_vocab_size, audio_base=layout.audio_base,
              codebook_size=layout.codebook_size, num_codebooks=layout.num_codebooks)
    methods = {
        "reference": lambda ids, w: interleaved_embedding_reference(ids, w, **kw).embeddings,
        "torch": lambda ids, w: F.embedding(ids, w),
        "soda_triton": lambda ids, w: interleaved_embedding(ids, w, **kw).embeddings,
    }
    notes = {}
    try:
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

        def megatron(ids, w, _cache={}):
            key = w.data_ptr()
            if key not in _cache:
                cfg = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False,
                                          params_dtype=w.dtype)
                mod = VocabParallelEmbedding(w.shape[0], w.shape[1], init_method=None, config=cfg)
                mod.weight = w
                _cache.clear()
                _cache[key] = mod
            return _cache[key](ids)

        methods["megatron"] = megatron
    except ImportError as err:
        notes["megatron"] = f"not importable: {err}"
    for name in args.skip:
        methods.pop(name, None)
    rows = []
    for n in args.tokens:
        for h in args.hidden:
            g = torch.Generator(device="cpu").manual_seed(1)
            ids = torch.randint(0, layout.size, (n,), generator=g).to(device)
            weight = torch.nn.Parameter(torch.randn(layout.size, h, generator=g).to(device, dtype))
            grad = torch.randn(n, h, generator=g).to(device, dtype)
            for name, fn in methods.items():
                try:
                    m = measure(torch, lambda: (fn(ids, weight) * grad).sum(), (weight,),
                                args.iters, args.warmup)
                except Exception as err:  # noqa: BLE001
                    rows.append({"op": "embedding", "tokens": n, "hidden": h,
                                 "vocab_local": layout.size, "impl": name,
                                 "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                rows.append({"op": "embedding", "tokens": n, "hidden": h,
                             "vocab_local": layout.size, "impl": name, **m})
    return rows, notes


# ----------------------------------------------------------------------------- reporting
def add_ratios(rows: list[dict]) -> None:
    """``speedup_of_triton`` = this implementation's time / soda_triton's time (same shape)."""
    key = lambda r: (r["op"], r.get("tokens"), r.get("hidden"), r.get("vocab_local"), r.get("tp"))
    triton_rows = {key(r): r for r in rows if r.get("impl") == "soda_triton" and "fwd" in r}
    for r in rows:
        t = triton_rows.get(key(r))
        if t is not None and "fwd" in r:
            r["speedup_of_triton"] = {k: r[k] / t[k] for k in ("fwd", "bwd", "fwd_bwd") if t[k] > 0}


def check_targets(rows: list[dict], on_gpu: bool) -> list[dict]:
    """Issue 4 targets per shape (evaluated only on a GPU; CPU times are interpreter times)."""
    if not on_gpu:
        return [{"note": "targets are not evaluated on CPU"}]
    out = []
    by_shape: dict = {}
    for r in rows:
        if "fwd_bwd" in r or r["op"] == "loss_memory_budget":
            key = (r["op"].replace("_memory_budget", ""), r.get("tokens"), r.get("hidden"),
                   r.get("vocab_local"))
            by_shape.setdefault(key, {})[r.get("impl", "budget")] = r
    for (op, n, h, v), impls in sorted(by_shape.items()):
        tri = impls.get("soda_triton")
        if tri is None:
            continue
        item = {"op": op, "tokens": n, "hidden": h, "vocab_local": v}
        if op == "loss":
            if "torch_eager" in impls:
                item["vs_torch_eager"] = impls["torch_eager"]["fwd_bwd"] / tri["fwd_bwd"]
                item["eager_2x_met"] = item["vs_torch_eager"] >= 2.0
            best = [impls[k]["fwd_bwd"] for k in ("liger", "cce") if k in impls]
            if best:
                item["vs_best_liger_cce"] = min(best) / tri["fwd_bwd"]
                item["liger_cce_1.3x_met"] = item["vs_best_liger_cce"] >= 1.3
            budget = impls.get("budget", {}).get("budget_above_inputs_bytes")
            if budget and tri["peak_bytes"] is not None:
                item["peak_over_budget"] = tri["peak_bytes"] / budget
                item["memory_within_10pct_met"] = item["peak_over_budget"] <= 1.1
        elif "torch" in impls:
            item["bwd_vs_torch"] = impls["torch"]["bwd"] / tri["bwd"]
            item["embedding_bwd_2x_met"] = item["bwd_vs_torch"] >= 2.0
        out.append(item)
    return out


def markdown(payload: dict) -> str:
    prov = payload["provenance"]
    lines = [f"# bench_kernels ({'smoke, ' if payload['smoke'] else ''}{prov['device']['kind']}: "
             f"{prov['device']['name']})", "",
             f"commit `{prov['commit']}`, torch {prov['versions'].get('torch')}, "
             f"triton {prov['versions'].get('triton')}, dtype {payload['dtype']}", ""]
    if prov["device"]["kind"] != "cuda":
        lines += ["CPU run: Triton kernels ran in the interpreter; these times say nothing about "
                  "GPU performance.", ""]
    lines += ["| op | N | H | V_local | impl | fwd ms | bwd ms | fwd+bwd ms | peak MiB | "
              "triton speedup (fwd+bwd) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["op"] not in ("loss", "embedding"):
            continue
        if "error" in r:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['hidden']} | {r.get('vocab_local', '')} | "
                         f"{r['impl']} | error: {r['error'][:60]} | | | | |")
            continue
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        ratio = r.get("speedup_of_triton", {}).get("fwd_bwd")
        lines.append(f"| {r['op']} | {r['tokens']} | {r['hidden']} | {r['vocab_local']} | {r['impl']} | "
                     f"{r['fwd'] * 1e3:.2f} | {r['bwd'] * 1e3:.2f} | {r['fwd_bwd'] * 1e3:.2f} | {peak} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    targets = [t for t in payload["targets"] if "op" in t]
    if targets:
        lines += ["", "Targets (issue 4):", ""] + [f"- {t}" for t in targets]
    if payload["notes"]:
        lines += ["", "Notes:"] + [f"- {k}: {v}" for k, v in payload["notes"].items()]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> str:
    from soda_mega.utils.plotting import NOT_INSTALLED, pyplot

    plt = pyplot()
    if plt is None:
        return NOT_INSTALLED
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, op in zip(axes, ("loss", "embedding")):
        rows = [r for r in payload["rows"] if r["op"] == op and "fwd_bwd" in r]
        labels = sorted({(r["tokens"], r["hidden"], r.get("vocab_local")) for r in rows})
        impls = sorted({r["impl"] for r in rows})
        for i, impl in enumerate(impls):
            vals = [next((r["fwd_bwd"] * 1e3 for r in rows if r["impl"] == impl and
                          (r["tokens"], r["hidden"], r.get("vocab_local")) == lab), 0) for lab in labels]
            ax.bar([x + i / (len(impls) + 1) for x in range(len(labels))], vals,
                   width=1 / (len(impls) + 1), label=impl)
        ax.set_xticks(range(len(labels)), [f"{n}x{h}\nV{v}" for n, h, v in labels], fontsize=6)
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # noqa: F401 - imported here so --help stays fast

    if not torch.cuda.is_available():
        if not args.smoke:
            print("no CUDA GPU: only --smoke runs on CPU (Triton interpreter)", file=sys.stderr)
            return 2
        # NOTE: must precede the first import of soda_kernels (Triton reads it at definition).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from soda_mega.config.schema import ParallelConfig
    from soda_mega.parallel import state
    from soda_mega.utils.provenance import write_json

    state.initialize(ParallelConfig(), seed=0)  # Megatron baselines need the (1-rank) TP group
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows, notes = [], {}
    if args.only in (None, "loss"):
        r, n = run_loss(torch, args, dtype, device)
        rows += r
        notes.update(n)
    if args.only in (None, "embedding"):
        r, n = run_embedding(torch, args, dtype, device)
        rows += r
        notes.update({f"embedding/{k}": v for k, v in n.items()})
    add_ratios(rows)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_kernels_{device.type}{'_smoke' if args.smoke else ''}"
    notes["plot"] = plot({"rows": rows}, out_dir / f"{stem}.png")
    payload = {"smoke": args.smoke, "dtype": args.dtype, "iters": args.iters, "rows": rows,
               "targets": check_targets(rows, device.type == "cuda"), "notes": notes}
    path = write_json(out_dir / f"{stem}.json", payload)
    import json

    (out_dir / f"{stem}.md").write_text(markdown(json.loads(path.read_text())))
    print(f"wrote {path} and {stem}.md")
    state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
