"""services.stats: exact McNemar and the paired bootstrap on hand-made pairs with known answers."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from services.stats import (
    binom_cdf_half,
    discordant,
    mcnemar_exact,
    paired_bootstrap,
    paired_comparison,
    paired_score_comparison,
)


def pairs(both: int, b: int, c: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Correctness vectors with ``both`` right-right, ``b`` right-wrong, ``c`` wrong-right, ``neither``."""
    before = [True] * both + [True] * b + [False] * c + [False] * neither
    after = [True] * both + [False] * b + [True] * c + [False] * neither
    return before, after


def exact_two_sided(b: int, c: int) -> Fraction:
    """By hand: 2 * sum_{i <= min(b, c)} C(n, i) / 2^n, n = b + c, as a fraction."""
    n = b + c
    return min(Fraction(1), 2 * Fraction(sum(comb(n, i) for i in range(min(b, c) + 1)), 2**n))


def test_mcnemar_known_values():
    # b=10, c=2: n=12, P(X<=2) = (1 + 12 + 66) / 4096 = 79/4096, two-sided 158/4096 = 0.0385742...
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(10, 2) == pytest.approx(0.03857421875, abs=1e-12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # symmetric
    # b=c: no evidence either way, p = 1; no discordant item: p = 1
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # b=0, c=6: 2 / 64 = 0.03125; b=0, c=5: 2 / 32 = 0.0625 (not significant at 0.05)
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125, abs=1e-15)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625, abs=1e-15)
    for b, c in [(3, 9), (1, 7), (20, 35), (40, 41), (0, 1)]:
        assert mcnemar_exact(b, c) == pytest.approx(float(exact_two_sided(b, c)), rel=1e-12)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_binomial_cdf_matches_fractions():
    for n in (1, 7, 30, 200):
        for k in (-1, 0, n // 3, n // 2, n - 1, n, n + 3):
            want = Fraction(sum(comb(n, i) for i in range(max(0, min(k, n)) + 1)), 2**n) if k >= 0 else 0
            assert binom_cdf_half(k, n) == pytest.approx(float(want), rel=1e-12, abs=0)


def test_discordant_counts_from_vectors():
    before, after = pairs(both=30, b=10, c=2, neither=8)
    assert discordant(before, after) == (10, 2)
    out = paired_comparison(before, after, n_boot=2000, seed=1)
    assert out["n"] == 50
    assert out["accuracy_before"] == pytest.approx(40 / 50)
    assert out["accuracy_after"] == pytest.approx(32 / 50)
    assert out["diff"] == pytest.approx(-8 / 50)
    assert (out["b"], out["c"]) == (10, 2)
    assert out["mcnemar_p"] == pytest.approx(0.03857421875, abs=1e-12)
    with pytest.raises(ValueError, match="same items"):
        discordant([True, False], [True])


def test_bootstrap_is_seeded_and_brackets_the_difference():
    before, after = pairs(both=300, b=20, c=60, neither=120)  # d = +40 / 500 = 0.08
    a = paired_bootstrap(before, after, n_boot=4000, seed=7)
    assert a == paired_bootstrap(before, after, n_boot=4000, seed=7)  # the same seed, the same answer
    assert a["se"] != paired_bootstrap(before, after, n_boot=4000, seed=8)["se"]  # another seed, other draws
    assert a["diff"] == pytest.approx(0.08)
    assert a["ci_low"] < 0.08 < a["ci_high"]
    assert a["ci_low"] > 0  # 60 vs 20 discordant: clearly positive
    # the standard error of d is sqrt((b + c) / n^2 - d^2 / n) ~ 0.0172; the 95% interval is about +-1.96 se
    se = np.sqrt((20 + 60) / 500**2 - 0.08**2 / 500)
    assert a["se"] == pytest.approx(se, rel=0.05)
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    # a 3.6-standard-error effect: no resample of 4000 lands as far from d as 0 is
    assert a["p_value"] == pytest.approx(1 / 4001)
    assert mcnemar_exact(20, 60) < 1e-4  # the exact test agrees: far below 0.05


def test_bootstrap_without_difference_and_agreement_with_mcnemar():
    same = [True, False, True, True] * 25
    none = paired_bootstrap(same, same, n_boot=500, seed=0)
    assert none["diff"] == 0 and none["p_value"] == 1.0 and none["ci_low"] == none["ci_high"] == 0
    assert none["se"] == 0
    before, after = pairs(both=50, b=10, c=2, neither=38)
    boot = paired_bootstrap(before, after, n_boot=20_000, seed=3)["p_value"]
    # the bootstrap's normal-like tail is lighter than the exact binomial's at 12 discordant items, but the
    # two tell the same story: significant at 0.05, same order of magnitude
    assert 0.005 < boot < 0.05
    assert mcnemar_exact(10, 2) < 0.05
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_score_comparison_pairs_finite_scores_and_tells_a_shift_from_none():
    rng = np.random.default_rng(0)
    before = rng.normal(0.5, 0.1, 400)
    shifted = before + 0.02 + rng.normal(0, 0.01, 400)  # every item rises by ~0.02: a clear paired rise
    r = paired_score_comparison(before, shifted, n_boot=4000, seed=1)
    assert r["n"] == 400 and r["diff"] == pytest.approx(float(np.mean(shifted - before)))
    assert r["bootstrap_p"] < 0.001 and r["bootstrap_ci_low"] > 0 and r["rises"] > 380
    noise = before + rng.normal(0, 0.01, 400)  # no shift: p well above 0.05 for this draw
    assert paired_score_comparison(before, noise, n_boot=4000, seed=1)["bootstrap_p"] > 0.05
    with_nan = paired_score_comparison([0.1, np.nan, 0.3, 0.2], [0.2, 0.5, np.nan, 0.4], n_boot=100)
    assert with_nan["n"] == 2 and with_nan["diff"] == pytest.approx(0.15)  # items 0 and 3 only
    assert with_nan["rises"] == 2 and with_nan["falls"] == 0
    with pytest.raises(ValueError, match="same items"):
        paired_score_comparison([0.1, 0.2], [0.1])
