"""Bootstrap intervals: coverage on synthetic data with a known answer, pairing, edge cases."""

import numpy as np
import pytest

from sd2.measure.stats import excludes, paired_ratio_ci, ratio_ci


def _prompts(rng, n, mal):
    """Per-prompt (accepted tokens, steps) whose pooled ratio has expectation close to `mal`."""
    steps = rng.integers(5, 30, size=n)
    per_step = rng.gamma(shape=4.0, scale=mal / 4.0, size=n)  # prompt difficulty varies
    return per_step * steps, steps


def test_ratio_ci_covers_the_true_ratio_about_95_percent():
    rng = np.random.default_rng(0)
    true, trials, n = 2.0, 300, 150
    hits = 0
    for t in range(trials):
        acc, steps = _prompts(rng, n, true)
        _, low, high = ratio_ci(acc, steps, n_boot=1000, seed=t)
        hits += low <= true <= high
    # binomial sd at 95% over 300 trials is 1.3 points: 0.90..0.99 catches a broken interval
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_interval_shrinks_with_more_prompts():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        acc, steps = _prompts(rng, n, 2.0)
        _, low, high = ratio_ci(acc, steps, n_boot=1000, seed=0)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) = 1/4


def test_estimate_is_the_pooled_ratio_and_fixed_seed_is_reproducible():
    acc, steps = [3, 5, 8, 2], [2, 2, 4, 1]
    a = ratio_ci(acc, steps, n_boot=1000, seed=7)
    assert a[0] == pytest.approx(18 / 9)
    assert a == ratio_ci(acc, steps, n_boot=1000, seed=7)
    assert a[1] < a[0] < a[2]


def test_paired_interval_uses_the_shared_prompt_effect():
    rng = np.random.default_rng(2)
    n = 200
    steps = rng.integers(5, 30, size=n)
    difficulty = rng.gamma(4.0, 0.5, size=n)
    a = difficulty * 1.05 * steps  # 5% better on every prompt
    b = difficulty * steps
    ratio, low, high = paired_ratio_ci(a, steps, b, steps, n_boot=1000, seed=0)
    assert ratio == pytest.approx(1.05)
    assert 1.0 < low < high < 1.1 and excludes(low, high, 1.0)
    # unpaired, the same 5% is lost in the prompt-to-prompt noise
    _, a_low, a_high = ratio_ci(a, steps, n_boot=1000, seed=0)
    _, b_low, b_high = ratio_ci(b, steps, n_boot=1000, seed=1)
    assert a_low < b_high


def test_paired_interval_without_an_effect_contains_one():
    rng = np.random.default_rng(3)
    steps = rng.integers(5, 30, size=300)
    a = rng.gamma(4.0, 0.5, size=300) * steps
    b = rng.permutation(a)
    _, low, high = paired_ratio_ci(a, steps, b, steps, n_boot=1000, seed=0)
    assert low < 1.0 < high and not excludes(low, high, 1.0)


def test_degenerate_inputs():
    assert all(np.isnan(ratio_ci([], [], n_boot=1000, seed=0)))
    assert all(np.isnan(ratio_ci([0, 0], [0, 0], n_boot=1000, seed=0)))
    assert all(np.isnan(paired_ratio_ci([1], [1], [0], [1], n_boot=1000, seed=0)))
    with pytest.raises(ValueError, match="length"):
        ratio_ci([1, 2], [1], n_boot=1000, seed=0)
    with pytest.raises(ValueError, match="length"):
        paired_ratio_ci([1, 2], [1, 1], [1], [1], n_boot=1000, seed=0)
    assert not excludes(float("nan"), 2.0, 1.0)
