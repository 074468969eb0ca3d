"""How long a checkpoint save blocks the training loop: synchronous vs asynchronous (issue 31).

Builds a real run (the trainer of ``soda-mega train``: model, distributed optimizer, loader on
a synthetic corpus written here), takes one training step so that the optimizer state exists,
then, in the same process:

* ``sync``: :func:`soda_mega.checkpoint.save.save_checkpoint`, the loop waits for all of it;
* ``async``: :class:`soda_mega.checkpoint.async_save.AsyncSaver`: the loop hands the state
  over, goes on training (real steps, polling the save after each as the trainer does) and
  finalizes when every write has finished.

Per save: the time the loop was blocked, the time from the start to the publish, the bytes and
the training steps taken meanwhile. Target: the median asynchronous stall is at most 10% of
the median synchronous save. JSON + markdown in ``benchmarks/results/``.

    python benchmarks/bench_checkpoint.py              # soda-135m (~2.7 GB of state), 3 saves each
    python benchmarks/bench_checkpoint.py --smoke      # tiny preset, seconds; for the test suite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.10  # async stall / sync save


def _corpus(root: Path, vocab) -> Path:
    from soda_mega.data.write.synthetic import random_docs, write_split
    from soda_mega.tokens import VocabLayout

    layout = VocabLayout.from_config(vocab)
    write_split(root / "speech" / "train", layout, random_docs(layout, 64, 64, 600, 1, "speech"),
                "speech")
    return root / "speech"


def _trainer(preset: str, work: Path, seq_length: int, overrides: tuple[str, ...] = ()):
    from soda_mega.config import load_config
    from soda_mega.training.trainer import Trainer

    vocab = load_config(preset=preset).vocab
    corpus = _corpus(work / "corpus", vocab)
    cfg = load_config(preset=preset, overrides=[
        f"data.train={corpus}", f"run.dir={work / 'run'}", "run.eval_interval=0",
        "run.tensorboard=false", f"model.seq_length={seq_length}",
        "training.global_batch_size=1", "training.micro_batch_size=1", "data.num_workers=0",
        *overrides])
    return Trainer(cfg)


def run(preset: str, saves: int, seq_length: int, overrides: tuple[str, ...] = ()) -> dict:
    from soda_mega.checkpoint.async_save import AsyncSaver, SaveReport
    from soda_mega.checkpoint.save import save_checkpoint

    load_before = os.getloadavg()  # other work on the machine slows both modes, not the ratio
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        work = Path(tmp)
        trainer = _trainer(preset, work, seq_length, overrides)
        data = iter(trainer.loader)

        def step() -> float:
            started = time.perf_counter()
            trainer.train_step([next(data) for _ in range(trainer.micro_per_step)])
            return time.perf_counter() - started

        step_s = [step()]  # the optimizer state exists from here on
        rows = []
        for i in range(saves):
            started = time.perf_counter()
            path = save_checkpoint(work / "sync", trainer.step, trainer.model, trainer.optimizer,
                                   trainer.trainer_state(), keep_last=1)
            report = SaveReport.of(trainer.step, path, started)
            rows.append({"mode": "sync", "save": i, **_row(report), "steps_meanwhile": 0})
            print(f"sync  save {i}: {report.line()}", flush=True)
            step_s.append(step())
        saver = AsyncSaver(work / "async", keep_last=1)
        for i in range(saves):
            saver.start(trainer.step, trainer.model, trainer.optimizer, trainer.trainer_state())
            steps = 0
            report = None
            while report is None:
                step_s.append(step())
                steps += 1
                report = saver.poll()
            rows.append({"mode": "async", "save": i, **_row(report), "steps_meanwhile": steps})
            print(f"async save {i}: {report.line()} ({steps} steps meanwhile)", flush=True)
        sync = statistics.median(r["blocked_s"] for r in rows if r["mode"] == "sync")
        stall = statistics.median(r["blocked_s"] for r in rows if r["mode"] == "async")
        return {"preset": preset, "seq_length": seq_length, "saves": saves,
                "overrides": list(overrides), "precision": trainer.cfg.training.precision,
                "checkpoint_bytes": rows[0]["bytes"], "step_s_median": statistics.median(step_s),
                "rows": rows, "sync_save_s_median": sync, "async_blocked_s_median": stall,
                "stall_ratio": stall / sync, "target_ratio": TARGET,
                "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
                "meets_target": stall / sync <= TARGET}


def _row(report) -> dict:
    return {"step": report.step, "bytes": report.bytes, "blocked_s": round(report.blocked_s, 4),
            "save_s": round(report.seconds, 4)}


def _load(result: dict) -> str:
    load = result.get("load_average")
    if not load:
        return "not recorded"
    return f"{'/'.join(f'{x:g}' for x in load[:3])} before, {'/'.join(f'{x:g}' for x in load[3:])} after"


def markdown(result: dict) -> str:
    lines = [f"# Checkpoint save stall: {result['preset']} "
             f"({result['checkpoint_bytes'] / 1e9:.2f} GB per checkpoint, {result['precision']})", "",
             f"`python benchmarks/bench_checkpoint.py{''.join(' --set ' + o for o in result['overrides'])}` on "
             f"{result['provenance']['device']['name']} ({result['provenance']['device'].get('cores', '?')} "
             f"cores), commit {result['provenance']['commit'][:10]}; a training step took "
             f"{result['step_s_median']:.2f} s (median); 1/5/15-minute load average "
             f"{_load(result)}.", "",
             "| mode | save | bytes | loop blocked (s) | start to publish (s) | steps meanwhile |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['save']} | {r['bytes']:,} | {r['blocked_s']:.3f} | "
                     f"{r['save_s']:.3f} | {r['steps_meanwhile']} |")
    lines += ["", f"Median synchronous save: {result['sync_save_s_median']:.3f} s; median "
              f"asynchronous stall: {result['async_blocked_s_median']:.3f} s; ratio "
              f"{result['stall_ratio']:.3f} (target <= {TARGET}: "
              f"{'met' if result['meets_target'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="soda-135m", help="model preset (default soda-135m)")
    parser.add_argument("--saves", type=int, default=3, help="saves of each mode (default 3)")
    parser.add_argument("--seq-length", type=int, default=128,
                        help="tokens per sequence of the training steps between saves (default "
                             "128: the state, not the step, is what is measured)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override of the run (repeatable), e.g. "
                             "--set training.precision=fp32 (bf16 matmuls are slow on most CPUs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset, 1 save each, results under --out as *_smoke.*")
    args = parser.parse_args(argv)
    from soda_mega.utils.provenance import stamp, write_json

    preset, saves = ("tiny", 1) if args.smoke else (args.preset, args.saves)
    result = run(preset, saves, args.seq_length, tuple(args.set))
    device = stamp()["device"]["kind"]
    name = f"bench_checkpoint_{device}{'_smoke' if args.smoke else ''}"
    path = write_json(args.out / f"{name}.json", result)
    import json

    result = json.loads(path.read_text())
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
