"""The decode benchmark's protocol (scripts/bench/decode.py) with stand-in sides (no torch, no model), and its
`--lumen_only` path end to end on a 4-token run."""

import re

import pytest

from scripts.bench import decode


class _Side:
    """A stand-in for one side: each call returns the next of its scripted seconds and logs itself."""

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log = name, list(seconds), log

    def time_once(self, batch):
        self.log.append((self.name, batch))
        return {"seconds": self.seconds.pop(0), "tokens": [[1, 2, 3]]}

    __call__ = time_once


def test_rounds_alternate_sides_and_time_the_second_call_of_each():
    log = []
    hf = _Side("hf", [9.0, 0.6, 9.0, 0.8], log)  # 9.0: untimed calls, never reported
    lumen = _Side("lumen", [9.0, 0.2, 9.0, 0.1], log)
    r = decode.interleaved(hf, lumen, "8", rounds=2)
    assert log == [("hf", "8"), ("hf", "8"), ("lumen", "8"), ("lumen", "8")] * 2
    assert r["hf_s"] == [0.6, 0.8] and r["lumen_s"] == [0.2, 0.1]
    assert r["ratios"] == pytest.approx([3.0, 8.0])  # per round: HF seconds / Lumen seconds


def test_agreement_counts_the_identical_prefix_and_equal_positions():
    a = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert decode.agreement(a, a) == (4, 1.0)
    assert decode.agreement(a, [[1, 2, 0, 4], [5, 6, 7, 8]]) == (2, 7 / 8)


def test_processor_rows_alternate_and_report_the_median_overhead():
    log = []
    noop = _Side("noop", [9.0, 0.22, 9.0, 0.33, 9.0, 0.21], log)
    plain = _Side("plain", [9.0, 0.2, 9.0, 0.3, 9.0, 0.2], log)
    row = decode.processor_row("tiny", 8, noop, plain, rounds=3)
    assert log == [("noop", "8"), ("noop", "8"), ("plain", "8"), ("plain", "8")] * 3
    # Per-round ratios 1.10, 1.10, 1.05: the median overhead is +10%; the same tokens on both sides. Stand-in sides
    # report no CPU time.
    assert row[:2] == ["tiny", 8] and row[4] == "+10.0%" and row[5] == "+5.0% to +10.0%"
    assert row[6:] == ["n/a", "yes"]
    assert row[2].startswith("0.200") and row[3].startswith("0.220")


@pytest.mark.slow  # compiles the benchmark's tiny model twice (~20 s on 2 cores)
def test_the_lumen_only_path_runs_end_to_end(capsys):
    decode.main(["--lumen_only", "--no_append", "--runs", "1", "--batch_sizes", "2", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    row = re.search(r"\|\s*tiny\s*\|\s*2\s*\|.*\|\s*([+-][\d.]+%)\s*\|\s*yes\s*\|", out)
    assert "processor overhead" in out and row  # a CPU-time overhead was measured, the tokens agree
