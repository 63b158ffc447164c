"""course/bench.py: the shared benchmark helpers do what they say (fast: no real timing claims)."""

from __future__ import annotations

import time

import pytest

from course.bench import Bandwidth, best_of, interleaved, markdown_table, read_bandwidth, timed


def test_timed_and_best_of_take_the_shortest_call_and_return_the_last_result():
    assert timed(lambda: time.sleep(0.01)) >= 0.01
    delays = iter([0.03, 0.0, 0.02])
    calls = []

    def fn():
        d = next(delays)
        time.sleep(d)
        calls.append(d)
        return len(calls)

    t, out = best_of(fn, 3)
    assert out == 3 and t < 0.02
    with pytest.raises(ValueError):
        best_of(fn, 0)


def test_interleaved_takes_turns():
    order = []
    res = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3)
    assert order == ["a", "b"] * 3
    assert set(res) == {"a", "b"} and len(res["a"]["times"]) == 3
    assert res["a"]["best"] <= res["a"]["median"]


def test_bandwidth_samples():
    assert read_bandwidth(0.01) > 0
    bw = Bandwidth(0.01)
    bw.sample(), bw.sample()
    assert len(bw.samples) == 2 and bw.best == max(bw.samples) and "2 samples" in bw.span()


def test_markdown_table():
    md = markdown_table(["shape", "tok/s", "ratio"], [["tiny", 12.345, "2.0x"], ["big", 1.0, "1.1x"]])
    assert md.splitlines() == ["| shape | tok/s | ratio |", "|---|---:|---|", "| tiny | 12.3 | 2.0x |",
                               "| big | 1.0 | 1.1x |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])
