"""The decode benchmark's protocol (scripts/bench/decode.py), with stand-in sides: no torch, no model."""

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
