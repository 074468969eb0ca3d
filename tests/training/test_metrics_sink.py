"""The metrics sink after a resume: TensorBoard's event files agree with ``metrics.jsonl``."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from soda_mega.training.metrics import MetricsSink


def _log(run_dir, start: int, steps: range) -> None:
    """One run's sink as the trainer drives it: started at the step it resumes from, then a
    record per step."""
    sink = MetricsSink(run_dir, enabled=True, tensorboard=True, total_steps=10)
    sink.start(start)
    for step in steps:
        sink.write({"kind": "train", "step": step, "loss": 10.0 - step + (0.5 if start else 0.0)})
    sink.close()


def test_tensorboard_drops_the_steps_a_resume_repeats(tmp_path):
    """Issue 33.10: a run logs steps 1-5, is killed, resumes from the checkpoint of step 3 and
    logs 4-6 again: TensorBoard shows each step once, the resumed run's value, as the JSONL."""
    _log(tmp_path, 0, range(1, 6))
    _log(tmp_path, 3, range(4, 7))
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4, 5, 6]
    assert tb == [(r["step"], r["loss"]) for r in jsonl], tb
