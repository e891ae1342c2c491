"""The paired bootstrap behind `lmcore compare A B`: noise is called noise, a real gain is not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmcore.core.errors import StageError
from lmcore.eval.bootstrap import bits_per_byte_stat, paired_bootstrap, same_windows


def accuracy(correct):
    correct = np.asarray(correct, dtype=float)
    return lambda idx: float(correct[idx].mean())


def test_identical_runs_are_within_noise_with_an_empty_interval():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 2, 500)
    p = paired_bootstrap("acc", accuracy(c), accuracy(c), 500, "examples", resamples=300)
    assert p.difference == 0 and p.low == p.high == 0 and p.within_noise
    assert "within noise" in p.line() and "NOT" not in p.line()


def test_a_clear_gain_is_not_noise_and_a_tiny_one_is():
    rng = np.random.default_rng(1)
    a = rng.random(1000) < 0.70
    better = a | (rng.random(1000) < 0.5)  # fixes half of a's errors: ~ +15 points
    p = paired_bootstrap("acc", accuracy(a), accuracy(better), 1000, "examples", resamples=500)
    assert p.difference > 0.1 and p.low > 0 and not p.within_noise and "NOT within noise" in p.line()
    flip = a.copy()
    flip[np.flatnonzero(~a)[:2]] = True  # two more right answers out of 1000
    q = paired_bootstrap("acc", accuracy(a), accuracy(flip), 1000, "examples", resamples=500)
    assert 0 < q.difference < 0.01 and q.within_noise


def test_pairing_cancels_what_both_runs_share():
    # per-unit difficulty varies a lot, the gain is the same everywhere: paired, the gain is clear
    rng = np.random.default_rng(2)
    hard = rng.random(400) * 10
    windows_a = {"document": [0] * 400, "tokens": [8] * 400, "bytes": [30.0] * 400, "nll": list(hard + 5)}
    windows_b = {**windows_a, "nll": list(hard + 4.9)}
    assert same_windows(windows_a, windows_b)
    p = paired_bootstrap("bpb", bits_per_byte_stat(windows_a), bits_per_byte_stat(windows_b), 400, "windows", 400)
    assert p.a == pytest.approx(sum(windows_a["nll"]) / (math.log(2) * 30 * 400))
    assert p.high < 0 and not p.within_noise  # lower is better: b - a < 0 everywhere


def test_bad_inputs_are_named():
    with pytest.raises(StageError, match="at least 2"):
        paired_bootstrap("acc", accuracy([1]), accuracy([1]), 1, "examples")
    with pytest.raises(StageError, match="confidence"):
        paired_bootstrap("acc", accuracy([1, 0]), accuracy([1, 0]), 2, "examples", confidence=95)
    assert not same_windows({"document": [0], "tokens": [3], "bytes": [1.0]},
                            {"document": [0], "tokens": [4], "bytes": [1.0]})


def test_resamples_without_a_finite_difference_are_an_error_not_a_narrower_interval():
    """They were dropped: the interval came from fewer resamples than the line reported (and
    from none at all, a numpy error, when every one was NaN)."""
    values = np.array([1.0, 2.0, math.nan, 3.0])

    def stat(idx: np.ndarray) -> float:
        return float(values[idx].mean())

    with pytest.raises(StageError, match=r"m: \d+ of 200 resamples gave no finite difference .*among the units"):
        paired_bootstrap("m", stat, lambda idx: stat(idx) + 0.1, 4, "units", resamples=200)
