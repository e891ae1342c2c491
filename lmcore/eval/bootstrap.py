"""Is a difference between two runs more than noise? A paired bootstrap.

Both runs were scored on the same units (validation windows for bits per byte, validation
examples for a task metric). A resample draws ``n`` units with replacement, the same draw for
both runs, and recomputes the metric of each on it; the differences over ``resamples`` draws give
a percentile confidence interval of ``b - a``. The difference is *within noise* when that
interval holds 0 (the runs are not distinguishable on these units at that confidence).

Windows of one document are not independent (a hard document makes all its windows hard, for both
runs and for their difference), so bits per byte are resampled by documents, each with all its
windows, when there are :data:`MIN_DOCUMENTS` or more; with a handful of validation documents (the
default corpus has 7) windows are the only units there are, and the line says that its interval
is optimistic (:func:`bits_per_byte_units`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from lmcore.core.errors import StageError


@dataclasses.dataclass
class Paired:
    """The outcome of :func:`paired_bootstrap` for one metric."""

    metric: str
    a: float
    b: float
    low: float
    """Lower end of the interval of ``b - a``."""
    high: float
    confidence: float
    resamples: int
    units: int
    unit: str

    @property
    def difference(self) -> float:
        return self.b - self.a

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def line(self) -> str:
        verdict = "within noise" if self.within_noise else "NOT within noise"
        return (f"{self.metric}: {self.a:.4f} -> {self.b:.4f} ({self.difference:+.4f}; {self.confidence:.0%} interval "
                f"[{self.low:+.4f}, {self.high:+.4f}] over {self.units:,} {self.unit}, {self.resamples:,} paired "
                f"resamples): {verdict}")


def paired_bootstrap(metric: str, stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float],
                     n: int, unit: str, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                     strata: Sequence[int] | None = None) -> Paired:
    """``stat_*(indices)``: the metric of each run on those units (an array of ``n`` indices).
    ``strata``: the sizes of consecutive groups of the units (MNLI's matched and mismatched
    splits) resampled each within itself, so that every resample keeps each group's size."""
    if n < 2:
        raise StageError(f"{metric}: {n} {unit} to resample; a bootstrap needs at least 2")
    if not 0 < confidence < 1:
        raise StageError(f"confidence {confidence} must be between 0 and 1")
    every = np.arange(n)
    a, b = stat_a(every), stat_b(every)
    sizes = list(strata) if strata is not None else [n]
    if sum(sizes) != n or min(sizes) < 1:
        raise StageError(f"{metric}: strata {sizes} do not split the {n} {unit}")
    starts = np.cumsum([0] + sizes[:-1])
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        idx = np.concatenate([start + rng.integers(0, size, size) for start, size in zip(starts, sizes)])
        diffs[r] = stat_b(idx) - stat_a(idx)
    tail = (1 - confidence) / 2
    finite = diffs[np.isfinite(diffs)]
    if len(finite) < resamples:  # an interval from fewer resamples than it says would be too narrow a claim
        raise StageError(f"{metric}: {resamples - len(finite)} of {resamples} resamples gave no finite difference "
                         f"(a NaN or infinite value among the {unit}): no interval")
    low, high = (float(x) for x in np.quantile(finite, [tail, 1 - tail]))
    return Paired(metric, float(a), float(b), low, high, confidence, resamples, n, unit)


MIN_DOCUMENTS = 20
"""Documents from which bits per byte are resampled by document rather than by window."""


def bits_per_byte_units(windows: dict[str, list]) -> tuple[dict[str, list], str]:
    """The units to resample for bits per byte from a window table
    (:meth:`lmcore.eval.harness.DocumentScores.window_table`), as ``({"nll", "bytes"}, unit
    name)``: one per document (its windows' sums) when there are :data:`MIN_DOCUMENTS` or more,
    else the windows themselves, named as an optimistic unit."""
    docs = np.asarray(windows["document"])
    kinds, inverse = np.unique(docs, return_inverse=True)
    if len(kinds) >= MIN_DOCUMENTS:
        nll = np.bincount(inverse, weights=np.asarray(windows["nll"], dtype=float))
        nbytes = np.bincount(inverse, weights=np.asarray(windows["bytes"], dtype=float))
        return {"nll": nll.tolist(), "bytes": nbytes.tolist()}, "documents"
    return ({"nll": list(windows["nll"]), "bytes": list(windows["bytes"])},
            f"windows of {len(kinds)} document(s) (not independent: an optimistic interval)")


def bits_per_byte_stat(windows: dict[str, list]) -> Callable[[np.ndarray], float]:
    """Bits per byte of a resample of the windows of
    :meth:`lmcore.eval.harness.DocumentScores.window_table`."""
    nll, nbytes = np.asarray(windows["nll"], dtype=float), np.asarray(windows["bytes"], dtype=float)

    def stat(idx: np.ndarray) -> float:
        return float(nll[idx].sum() / (math.log(2) * nbytes[idx].sum()))

    return stat


def same_windows(a: dict[str, list], b: dict[str, list]) -> bool:
    """Whether two window tables cover the same units (same documents, tokens and bytes)."""
    return a["document"] == b["document"] and a["tokens"] == b["tokens"] and \
        np.allclose(a["bytes"], b["bytes"])
