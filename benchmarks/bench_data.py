"""Loader throughput vs. what a training run consumes (issue 3 item 9, issue 12 items 2, 4, 5, 8).

Measures tokens/s of :class:`soda_mega.data.read.loader.SodaDataLoader` (packing, mixing, reading
MDS shards, assembling micro-batches, with loader worker processes), and sets it next to the
tokens/s one GPU of a ``--preset`` run consumes::

    consumed tokens/s per GPU = peak FLOP/s x assumed MFU / training FLOPs per token

using the exact FLOPs per token of ``soda-mega model``. The peak and MFU are stated inputs
(defaults: H100 SXM dense bf16 989 TFLOP/s at 50% MFU), not measurements. Target: >= 10x
headroom. Without ``--dataset`` a synthetic corpus of SODA-like documents (10-40 s speech
documents of 8 codebooks + 5% text) is written first, so the numbers include real MDS reads.

It also reports, in the same run:

* ``state_dict`` time and planning work when the loader stands at steps 1e2, 1e4 and 1e6
  (closed-form plan: constant);
* peak RSS of a rank and of a forked loader worker planning windows over a synthetic split of
  ``--memory-docs`` documents (lengths only, memory-mapped), in a fresh process;
* the shuffle quality of the shard-window order next to the global shuffle;
* tokens/s reading the same corpus from a local S3 server (moto, 127.0.0.1, started here) and
  from local disk, with the node cache's hit rate (``--no-remote`` to skip).

    python benchmarks/bench_data.py                 # full run, writes benchmarks/results/
    python benchmarks/bench_data.py --smoke         # seconds; shapes tiny; for the test suite
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if "--memory-child" not in sys.argv:  # the memory probe imports numpy and the plan only
    from soda_mega.config import load_config
    from soda_mega.data.read.loader import SodaDataLoader
    from soda_mega.data.write.synthetic import write_split
    from soda_mega.model.accounting import flops_per_token
    from soda_mega.tokens import VocabLayout
    from soda_mega.utils.provenance import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def synth_corpus(root: Path, layout: VocabLayout, speech_docs: int, text_docs: int,
                 frames: tuple[int, int], seed: int = 0) -> list[str]:
    """Write one speech and one text dataset of random SODA-shaped documents."""
    rng = np.random.default_rng(seed)
    speech = []
    for _ in range(speech_docs):
        n = int(rng.integers(*frames)) * layout.num_codebooks
        body = layout.audio_base + rng.integers(0, layout.codebook_size * layout.num_codebooks, n)
        speech.append(np.concatenate([[layout.bos_id, layout.audio_start], body,
                                      [layout.audio_end, layout.eos_id]]).astype(np.int32))
    text = [np.concatenate([[layout.bos_id], rng.integers(0, min(256, layout.text_vocab_size),
                                                           int(rng.integers(200, 2000))),
                            [layout.eos_id]]).astype(np.int32) for _ in range(text_docs)]
    # 4 MB shards: the small corpus still spans several shards (cache, prefetch, eviction)
    write_split(root / "speech" / "train", layout, speech, "speech", size_limit=1 << 22,
                hashes=["xxh64"])
    write_split(root / "text" / "train", layout, text, "text", size_limit=1 << 22, hashes=["xxh64"])
    return [str(root / "speech"), str(root / "text")]


def measure_plan(cfg, windows: int) -> dict:
    """Planning alone (lengths only): windows/s of the closed-form plan, computed in order."""
    plan = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=False).plan
    start = time.perf_counter()
    for w in range(windows):
        plan.window(w)
    seconds = time.perf_counter() - start
    tokens = windows * (cfg.model.seq_length)
    return {"windows": windows, "seconds": seconds, "tokens_per_s": tokens / seconds}


def measure_state_dict(cfg, steps=(100, 10_000, 1_000_000)) -> list[dict]:
    """state_dict() time and planning work at far-apart steps (must not grow with the step)."""
    rows = []
    base = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=False).state_dict()
    for step in steps:
        loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=False)
        loader.load_state_dict({**base, "steps": step})
        start = time.perf_counter()
        for _ in range(100):
            loader.state_dict()
        saved = (time.perf_counter() - start) / 100
        before = loader.plan.steps_built
        start = time.perf_counter()
        for k in range(cfg.training.global_batch_size):  # the whole next global batch
            loader.plan.window(step * cfg.training.global_batch_size + k)
        rows.append({"step": step, "state_dict_seconds": saved,
                     "next_step_plan_seconds": time.perf_counter() - start,
                     "mixing_steps_built": loader.plan.steps_built - before})
    return rows


def shuffle_quality(num_docs: int, docs_per_shard: int, window: int, seq: int, batch: int,
                    dp: int, steps: int) -> list[dict]:
    """Shard window vs global shuffle on a lengths-only split: shards a rank touches per step,
    the overlap (Jaccard) of neighbouring windows' source shards, and the lag-1 rank
    correlation of the ids of consecutive documents (0 for a perfect shuffle)."""
    from soda_mega.data.read.order import StreamOrder
    from soda_mega.data.read.steps import StepPlan

    lengths = np.random.default_rng(1).integers(200, 4000, num_docs)
    counts = [docs_per_shard] * (num_docs // docs_per_shard)
    lengths = lengths[:sum(counts)]
    starts = np.cumsum([0] + counts)
    rows = []
    for w in (window, 0):
        plan = StepPlan([StreamOrder(lengths, counts, 0, 0, w)], [1.0], seq, batch)
        shard_sets, docs = [], []
        for k in range(steps * batch):
            pieces = plan.window(k)
            shard_sets.append({int(np.searchsorted(starts, d, side="right")) - 1 for _, d, _, _ in pieces})
            docs += [d for _, d, a, _ in pieces if a == 0]
        jaccard = [len(x & y) / len(x | y) for x, y in zip(shard_sets, shard_sets[1:])]
        per_rank = batch // dp
        rank_steps = [set().union(*shard_sets[i:i + per_rank]) for i in range(0, len(shard_sets), per_rank)]
        working_set = len(set().union(*shard_sets))
        r = np.argsort(np.argsort(np.array(docs)))
        rows.append({"shuffle_window": w, "shards": len(counts),
                     "neighbour_window_shard_jaccard": float(np.mean(jaccard)),
                     "distinct_shards_per_rank_step": float(np.mean([len(x) for x in rank_steps])),
                     "distinct_shards_per_global_step": float(np.mean(
                         [len(set().union(*shard_sets[i:i + batch])) for i in range(0, len(shard_sets), batch)])),
                     "distinct_shards_in_measured_steps": working_set, "measured_steps": steps,
                     "lag1_doc_rank_correlation": float(np.corrcoef(r[:-1], r[1:])[0, 1])})
    return rows


def _rss() -> dict:
    """Current RSS, private (USS) and peak RSS (VmHWM: this process since its exec/fork) in MB."""
    fields = {}
    for name in ("/proc/self/smaps_rollup", "/proc/self/status"):
        with open(name) as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0].rstrip(":") in ("Rss", "Private_Clean", "Private_Dirty", "VmHWM"):
                    fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss_mb": fields.get("Rss", 0.0),
            "private_mb": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0),
            "peak_rss_mb": fields.get("VmHWM", 0.0)}


def memory_child(lengths_path: str, docs_per_shard: int, window: int, seq: int, batch: int) -> dict:
    """A fresh 'rank' (numpy + the plan only): open the split, plan steps early and late, then
    fork a 'worker' that plans other steps; both report their memory."""
    from soda_mega.data.read.order import LengthsFile, StreamOrder
    from soda_mega.data.read.steps import StepPlan

    base = _rss()
    lengths = LengthsFile(lengths_path)  # as DocumentSource opens doc_lengths.npy
    n = len(lengths)
    counts = [docs_per_shard] * (n // docs_per_shard) + ([n % docs_per_shard] if n % docs_per_shard else [])
    start = time.perf_counter()
    order = StreamOrder(lengths, counts, seed=0, stream=0, window=window)
    plan = StepPlan([order], [1.0], seq, batch)
    opened = time.perf_counter() - start
    far = (order.epoch_tokens // (seq * batch)) * 3 // 2  # half-way through the second epoch
    for step in (0, 1, 1000, far):
        for k in range(batch // 8):  # one rank of DP=8
            plan.window(step * batch + k)
    rank = _rss()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: plans other steps
        os.close(read)
        for step in (far + 1, far + 2, 5000):
            for k in range(batch // 8):
                plan.window(step * batch + k)
        os.write(write, json.dumps(_rss()).encode())
        os._exit(0)
    os.close(write)
    worker = json.loads(os.read(read, 1 << 16))
    os.waitpid(pid, 0)
    return {"documents": n, "shards": len(counts), "open_seconds": opened,
            "baseline": base, "rank": rank, "worker": worker}


def measure_memory(num_docs: int, docs_per_shard: int, window: int, seq: int, batch: int,
                   tmp: Path) -> dict:
    """Write a lengths-only split of ``num_docs`` documents, then measure a fresh process."""
    path = tmp / "doc_lengths.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(num_docs,))
    rng = np.random.default_rng(0)
    for a in range(0, num_docs, 1 << 24):
        b = min(a + (1 << 24), num_docs)
        out[a:b] = rng.integers(200, 4000, b - a)  # 16-320 s of 8-codebook speech at 12.5 Hz
    out.flush()
    del out
    cmd = [sys.executable, __file__, "--memory-child", str(path), str(docs_per_shard),
           str(window), str(seq), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    path.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_remote(preset: str, datasets: list[str], cfg_overrides: list[str], batches: int,
                   tmp: Path) -> dict:
    """Tokens/s from a local S3 server (moto) vs local disk, one loader process each (no
    workers, so the cache counters are this process's), with the cache hit rate: the share of
    document reads whose shard was already on the node (prefetched or kept). The S3 run's cache
    limit is half the corpus's shard bytes, so eviction happens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import serving

    with serving() as server:
        bucket = server.new_bucket("bench")
        urls = []
        for d in datasets:
            name = Path(d).name
            for path in sorted(Path(d).rglob("*")):
                if path.is_file():
                    server.client.upload_file(str(path), bucket, f"{name}/{path.relative_to(d)}")
            urls.append(f"s3://{bucket}/{name}")
        rows = {}
        shard_bytes = sum(p.stat().st_size for d in datasets for p in Path(d).rglob("shard.*"))
        for label, train in (("local_disk", datasets), ("local_s3", urls)):
            cfg = load_config(preset=preset, overrides=[
                f"--data.train={','.join(train)}", *cfg_overrides, "--data.num_workers=0",
                f"--data.cache_dir={tmp / ('cache-' + label)}",
                f"--data.cache_limit={shard_bytes // 2 if label == 'local_s3' else 0}"])
            loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
            start = time.perf_counter()
            tokens = sum(b["tokens"].numel() for b in itertools.islice(iter(loader), batches))
            seconds = time.perf_counter() - start
            cache = loader.sources[0].cache
            reads = sum(s.reads for s in loader.sources)
            waits = sum(s.waits for s in loader.sources)
            rows[label] = {"tokens_per_s": tokens / seconds, "seconds": seconds,
                           "document_reads": reads, "reads_that_waited_for_a_fetch": waits,
                           "cache_hit_rate": 1 - waits / reads if reads else None,
                           "files_fetched": cache.misses, "files_evicted": cache.evicted,
                           "cache_bytes": cache.usage()}
        return rows


def measure(cfg, batches: int, warmup: int) -> dict:
    loader = SodaDataLoader(cfg, dp_rank=0, dp_size=1, needs_data=True)
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    start = time.perf_counter()
    tokens = 0
    for batch in itertools.islice(it, batches):
        tokens += batch["tokens"].numel()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", default=[], help="built dataset root (repeatable); default: synthetic")
    p.add_argument("--preset", default="soda-1.7b", help="model whose consumption is the yardstick")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--batches", type=int, default=200, help="timed micro-batches")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="stated GPU peak (H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.5, help="stated model FLOPs utilisation")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_data.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few batches (CPU test mode)")
    p.add_argument("--memory-docs", type=int, default=200_000_000,
                   help="documents of the lengths-only split for the memory measurement (0 = skip)")
    p.add_argument("--docs-per-shard", type=int, default=6000,
                   help="documents per shard of the synthetic splits (~64 MB shards of 30 s speech)")
    p.add_argument("--shuffle-window", type=int, default=64, help="data.shuffle_window measured "
                   "(shuffle quality; the S3 run uses 2 on its few shards)")
    p.add_argument("--global-batch", type=int, default=512, help="windows per global step "
                   "(memory and shuffle-quality measurements)")
    p.add_argument("--dp", type=int, default=64, help="data-parallel size for shards per rank")
    p.add_argument("--no-remote", action="store_true", help="skip the local S3 server comparison")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        path, per_shard, window, seq, batch = args.memory_child
        print(json.dumps(memory_child(path, int(per_shard), int(window), int(seq), int(batch))))
        return 0
    if args.smoke:
        args.seq_length, args.micro_batch, args.batches = 256, 2, 10
        args.memory_docs, args.docs_per_shard, args.global_batch, args.dp = 100_000, 500, 64, 8

    yardstick = load_config(preset=args.preset)
    layout = VocabLayout.from_config(yardstick.vocab)
    fpt = flops_per_token(yardstick.model, layout.size, seq_length=args.seq_length).training
    consumed = args.peak_tflops * 1e12 * args.mfu / fpt

    with tempfile.TemporaryDirectory() as tmp:
        datasets = args.dataset
        if not datasets:
            docs = (60, 6) if args.smoke else (1500, 150)
            frames = (50, 100) if args.smoke else (125, 500)
            print(f"[bench_data] writing a synthetic corpus ({docs[0]} speech + {docs[1]} text docs)",
                  file=sys.stderr)
            datasets = synth_corpus(Path(tmp), layout, *docs, frames=frames)
        cfg = load_config(preset=args.preset, overrides=[
            f"--data.train={','.join(datasets)}", f"--model.seq_length={args.seq_length}",
            f"--training.micro_batch_size={args.micro_batch}",
            f"--training.global_batch_size={args.micro_batch}", f"--data.num_workers={args.workers}"])
        result = measure(cfg, args.batches, warmup=2 if args.smoke else 10)
        planning = measure_plan(cfg, 200 if args.smoke else 20000)
        state = measure_state_dict(cfg)
        memory = None
        if args.memory_docs:
            print(f"[bench_data] memory: lengths-only split of {args.memory_docs:,} documents",
                  file=sys.stderr)
            memory = measure_memory(args.memory_docs, args.docs_per_shard, args.shuffle_window,
                                    args.seq_length, args.global_batch, Path(tmp))
        quality = shuffle_quality(20_000 if args.smoke else 400_000,
                                  50 if args.smoke else 200, args.shuffle_window // 8 or 1 if args.smoke
                                  else args.shuffle_window, args.seq_length,
                                  args.global_batch, args.dp, 2 if args.smoke else 4)
        remote = None
        if not args.no_remote:
            remote = measure_remote(args.preset, datasets, [
                f"--model.seq_length={args.seq_length}", f"--training.micro_batch_size={args.micro_batch}",
                f"--training.global_batch_size={args.micro_batch}",
                "--data.shuffle_window=2"], args.batches, Path(tmp))

    headroom = result["tokens_per_s"] / consumed
    payload = {
        "benchmark": "data_loader",
        "smoke": args.smoke,
        "settings": {"seq_length": args.seq_length, "micro_batch": args.micro_batch,
                     "workers": args.workers, "datasets": args.dataset or "synthetic"},
        "loader": result,
        "yardstick": {"preset": args.preset, "training_flops_per_token": fpt,
                      "stated_peak_tflops": args.peak_tflops, "stated_mfu": args.mfu,
                      "consumed_tokens_per_s_per_gpu": consumed},
        "headroom": headroom,
        "planning": planning,
        # Each DP rank lays out every mixing step (the documents of a global batch) before it
        # cuts its own windows: planning tokens/s divided by the per-GPU consumption is the
        # largest DP size before planning becomes the bottleneck.
        "max_dp_before_planning_bound": planning["tokens_per_s"] / consumed,
        "state_dict": state,
        "memory": memory,
        "shuffle_quality": quality,
        "remote": remote,
    }
    write_json(args.out, payload)
    print(f"loader {result['tokens_per_s']:,.0f} tokens/s with {args.workers} workers; "
          f"{args.preset} consumes {consumed:,.0f} tokens/s per GPU "
          f"(stated {args.peak_tflops:g} TFLOP/s x {args.mfu:.0%} MFU) -> headroom {headroom:.1f}x "
          f"({'meets' if headroom >= 10 else 'BELOW'} the 10x target); planning alone "
          f"{planning['tokens_per_s']:,.0f} tokens/s -> fine up to DP "
          f"{planning['tokens_per_s'] / consumed:,.0f}")
    for row in state:
        print(f"state_dict at step {row['step']:>9,}: {row['state_dict_seconds'] * 1e6:.1f} us; "
              f"next step planned in {row['next_step_plan_seconds'] * 1e3:.1f} ms "
              f"({row['mixing_steps_built']} mixing steps laid out)")
    if memory:
        print(f"memory, {memory['documents']:,} documents in {memory['shards']:,} shards "
              f"(opened in {memory['open_seconds']:.1f} s): rank peak RSS "
              f"{memory['rank']['peak_rss_mb']:.0f} MB (private {memory['rank']['private_mb']:.0f} MB, "
              f"{memory['baseline']['peak_rss_mb']:.0f} MB before opening); worker peak RSS "
              f"{memory['worker']['peak_rss_mb']:.0f} MB (private {memory['worker']['private_mb']:.0f} MB)")
    for row in quality:
        print(f"shuffle_window={row['shuffle_window']:<3} ({row['shards']} shards): "
              f"{row['distinct_shards_per_rank_step']:.1f} shards per rank-step, "
              f"{row['distinct_shards_per_global_step']:.1f} per global step, "
              f"{row['distinct_shards_in_measured_steps']} in {row['measured_steps']} steps, neighbour-window "
              f"shard Jaccard {row['neighbour_window_shard_jaccard']:.3f}, lag-1 doc-id rank "
              f"correlation {row['lag1_doc_rank_correlation']:+.3f}")
    if remote:
        for label, row in remote.items():
            print(f"{label:>10}: {row['tokens_per_s']:,.0f} tokens/s (1 process, no workers) = "
                  f"{row['tokens_per_s'] / consumed:.1f}x one {args.preset} GPU; cache hit rate "
                  f"{row['cache_hit_rate']:.3f} ({row['files_fetched']} files fetched, "
                  f"{row['files_evicted']} evicted)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
