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


def test_bits_per_byte_is_resampled_by_document_when_there_are_enough():
    """Windows of one document share its difficulty and its gain: resampled as independent
    windows, the interval was several times too narrow."""
    from lmcore.eval.bootstrap import MIN_DOCUMENTS, bits_per_byte_units

    rng = np.random.default_rng(3)
    docs, per_doc = 30, 20
    gain = np.repeat(rng.normal(0.1, 0.5, docs), per_doc)  # each document's own gain, on all its windows
    hard = np.repeat(rng.random(docs) * 10, per_doc)
    a = {"document": list(np.repeat(np.arange(docs), per_doc)), "tokens": [8] * docs * per_doc,
         "bytes": [30.0] * docs * per_doc, "nll": list(hard + 5)}
    b = {**a, "nll": list(hard + 5 - gain)}
    (ua, unit), (ub, _) = bits_per_byte_units(a), bits_per_byte_units(b)
    assert unit == "documents" and len(ua["nll"]) == docs and sum(ua["bytes"]) == 30.0 * docs * per_doc
    by_doc = paired_bootstrap("bpb", bits_per_byte_stat(ua), bits_per_byte_stat(ub), docs, unit, 500)
    by_window = paired_bootstrap("bpb", bits_per_byte_stat(a), bits_per_byte_stat(b), docs * per_doc, "w", 500)
    assert by_doc.a == pytest.approx(by_window.a) and by_doc.b == pytest.approx(by_window.b)  # the same bpb
    assert (by_doc.high - by_doc.low) > 3 * (by_window.high - by_window.low)
    few = {**a, "document": [d % (MIN_DOCUMENTS - 1) for d in a["document"]]}
    units, unit = bits_per_byte_units(few)
    assert len(units["nll"]) == docs * per_doc and unit.startswith(f"windows of {MIN_DOCUMENTS - 1} document(s)")


def test_strata_keep_each_splits_size_in_every_resample():
    """MNLI's matched and mismatched examples were resampled as one pool: a resample could hold
    none of one split (its metric NaN, read as 0) and each split's share varied."""
    seen = []

    def stat(idx: np.ndarray) -> float:
        seen.append((int((idx < 3).sum()), int((idx >= 3).sum())))
        return float(idx.mean())

    paired_bootstrap("m", stat, stat, 5, "examples", resamples=50, strata=[3, 2])
    assert set(seen) == {(3, 2)}
    with pytest.raises(StageError, match=r"strata \[3, 3\] do not split the 5 examples"):
        paired_bootstrap("m", stat, stat, 5, "examples", resamples=50, strata=[3, 3])
