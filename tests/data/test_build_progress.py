"""The build's progress lines (tqdm underneath): the fields, plain lines in a log, one line
rewritten in place on a terminal, nothing when quiet."""

from __future__ import annotations

import io
import re
import time

from soda_mega.data.write.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_has_counts_rate_audio_eta_and_skipped():
    p = Progress("speech train", 10, 2, stream=io.StringIO(), enabled=False)
    assert re.fullmatch(r"\[speech train\] 2/10 records \(20%\) \| \? rec/s \| ETA \?", p.line())
    p.advance(3, audio_seconds=7200.0, skipped=1)
    time.sleep(0.01)
    line = p.line()
    assert line.startswith("[speech train] 5/10 records (50%) | ")
    rate = re.search(r"\| ([0-9.]+k?) rec/s \|", line)
    assert rate and rate.group(1) != "0.00", line
    assert "| 2.00 h audio, " in line and " s audio/s | ETA " in line, line
    assert re.search(r"ETA \d+:\d\d \| skipped 1$", line), line
    assert p.stream.getvalue() == ""  # quiet: nothing printed, finish included
    p.finish()
    assert p.stream.getvalue() == ""


def test_the_rate_counts_only_records_built_in_this_run():
    """A resumed build starts at its done records; 0 new records means no rate and no ETA."""
    p = Progress("text", 100, 99, stream=io.StringIO(), enabled=False)
    time.sleep(0.01)
    assert "| ? rec/s | ETA ?" in p.line()
    assert Progress("empty", 0, stream=io.StringIO(), enabled=False).line().startswith(
        "[empty] 0/0 records (100%)")


def test_a_log_gets_plain_lines_at_most_every_log_every_seconds():
    log = io.StringIO()
    p = Progress("speech valid", 40, stream=log, log_every=3600.0)
    for _ in range(40):
        p.advance(1, audio_seconds=2.0)
    p.finish()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start line, then (an hour not having passed) only the final one
    assert len(lines) == 2 and lines[0].startswith("[speech valid] 0/40 records (0%)"), lines
    assert lines[1].startswith("[speech valid] 40/40 records (100%) | "), lines
    assert "0.02 h audio" in lines[1], lines


def test_a_log_line_is_not_repeated_by_finish_when_it_showed_the_count():
    log = io.StringIO()
    p = Progress("speech train", 3, stream=log, log_every=0.0)
    for _ in range(3):
        p.advance()
    p.finish()
    counts = [re.match(r"\[speech train\] (\d)/3", ln).group(1) for ln in log.getvalue().splitlines()]
    assert counts == ["0", "1", "2", "3"]


def test_a_terminal_gets_one_line_rewritten_in_place():
    term = _Terminal()
    p = Progress("speech train", 5, stream=term)
    for _ in range(5):
        p.advance(1, skipped=1)
    p.finish()
    text = term.getvalue()
    assert text.startswith("\r[speech train] 0/5 records") and text.endswith("\n")
    assert text.count("\n") == 1  # all updates rewrite the one line
    assert text.rstrip().rsplit("\r", 1)[-1].startswith("[speech train] 5/5 records (100%)")
    assert text.rstrip().endswith("skipped 5")
