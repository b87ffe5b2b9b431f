"""Paired tests of two classifiers answered on the same items (pure functions, numpy only).

``before`` / ``after`` are per-item correctness (bool) of two models (stage 1 and stage 2) on the *same*
items in the same order. Only the discordant items carry information about which is better:
``b`` = items right before and wrong after, ``c`` = wrong before and right after.

- :func:`mcnemar_exact`: under H0 (no difference) each discordant item is a fair coin, so
  ``c ~ Binomial(b + c, 1/2)``; the two-sided exact p-value is
  ``p = min(1, 2 * P(X <= min(b, c)))``, ``P(X <= k) = sum_{i<=k} C(n, i) / 2^n``, ``n = b + c``.
- :func:`paired_bootstrap`: resample items with replacement (the pairs stay together), ``B`` times, with a
  seeded generator; the accuracy difference ``d = mean(after) - mean(before)`` gets a percentile interval
  and a two-sided p-value from the null-centred resamples: ``p = (1 + #{|d*_i - d| >= |d|}) / (1 + B)``.
- :func:`paired_score_comparison`: the same bootstrap over a continuous per-item score (UAE / GvU's held-out
  reward), on the items whose two scores are both finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np


def discordant(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """(b, c): items right before and wrong after, and wrong before and right after."""
    x, y = _pair(before, after)
    return int((x & ~y).sum()), int((~x & y).sum())


def binom_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``: ``sum_{i=0..k} C(n, i) / 2^n``, exact in integers."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(comb(n, i) for i in range(k + 1)) / 2**n  # int / int: a correctly rounded float


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: ``min(1, 2 * P(X <= min(b, c)))``,
    ``X ~ Binomial(b + c, 1/2)``; 1.0 when there is no discordant item."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf_half(min(b, c), n))


def paired_bootstrap(before: Sequence[float], after: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """The difference ``d = mean(after) - mean(before)`` over paired items (correctness or any score), with
    the resamples' standard error, a percentile interval at ``level`` and the two-sided p-value
    ``(1 + #{|d*_i - d| >= |d|}) / (1 + B)`` over ``B = n_boot`` resamples of the item indices drawn by
    ``numpy.random.default_rng(seed)``."""
    x, y = np.asarray(before, dtype=np.float64).reshape(-1), np.asarray(after, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired test: {x.size} items before but {y.size} after (the same items are needed)")
    if x.size == 0:
        raise ValueError("paired_bootstrap: no items")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be >= 1, got {n_boot}")
    diff = y.astype(np.float64) - x.astype(np.float64)
    d = float(diff.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    boot = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    p = (1 + int(np.sum(np.abs(boot - d) >= abs(d) - 1e-12))) / (1 + n_boot)
    return {"diff": d, "se": float(boot.std(ddof=1)) if n_boot > 1 else 0.0, "ci_low": float(lo),
            "ci_high": float(hi), "p_value": float(min(1.0, p))}


def paired_comparison(before: Sequence[bool], after: Sequence[bool], n_boot: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Both tests on one pair of correctness vectors: n, the two accuracies, the difference (after - before),
    the discordant counts, the exact McNemar p-value and the bootstrap interval and p-value."""
    x, y = _pair(before, after)
    b, c = discordant(x, y)
    boot = paired_bootstrap(x, y, n_boot, seed)
    return {"n": float(x.size), "accuracy_before": float(x.mean()), "accuracy_after": float(y.mean()),
            "diff": boot["diff"], "b": float(b), "c": float(c), "mcnemar_p": mcnemar_exact(b, c),
            "bootstrap_se": boot["se"], "bootstrap_ci_low": boot["ci_low"], "bootstrap_ci_high": boot["ci_high"],
            "bootstrap_p": boot["p_value"]}


def paired_score_comparison(before: Sequence[float], after: Sequence[float], n_boot: int = 10_000,
                            seed: int = 0) -> dict[str, float]:
    """A paired test of a continuous per-item score (a held-out reward): n (pairs where both are finite),
    the two means, the difference (after - before), how many items rose / fell, and the paired bootstrap's
    interval and two-sided p-value."""
    x, y = np.asarray(before, dtype=np.float64).reshape(-1), np.asarray(after, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired test: {x.size} items before but {y.size} after (the same items are needed)")
    keep = np.isfinite(x) & np.isfinite(y)  # a NaN reward was dropped: its item has no pair
    x, y = x[keep], y[keep]
    boot = paired_bootstrap(x, y, n_boot, seed)
    return {"n": float(x.size), "mean_before": float(x.mean()), "mean_after": float(y.mean()),
            "diff": boot["diff"], "rises": float(np.sum(y > x)), "falls": float(np.sum(y < x)),
            "bootstrap_se": boot["se"], "bootstrap_ci_low": boot["ci_low"], "bootstrap_ci_high": boot["ci_high"],
            "bootstrap_p": boot["p_value"]}


def _pair(before: Sequence[bool], after: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(before, dtype=bool).reshape(-1), np.asarray(after, dtype=bool).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired test: {x.size} items before but {y.size} after (the same items are needed)")
    return x, y
