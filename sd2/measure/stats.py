"""Bootstrap confidence intervals over prompts (no torch: the tables use them too).

MAL is a ratio of sums, committed tokens over verification steps, so prompts are the
independent units: resampling them with replacement keeps each prompt's steps together.
Paired comparisons resample the same prompts for both drafts, which cancels the
prompt-to-prompt variation both share (an easy prompt is easy for every draft).
"""

import numpy as np

LEVEL = 0.95


def bootstrap_indices(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_items) indices drawn with replacement; a fixed seed gives fixed intervals."""
    return np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num, dtype=float) / np.asarray(den, dtype=float)


def ratio_ci(num, den, *, n_boot: int, seed: int, level: float = LEVEL) -> tuple[float, float, float]:
    """(sum(num) / sum(den), low, high): percentile bootstrap interval over items.

    For MAL: num = committed tokens per prompt, den = counted steps per prompt. n_boot resamples
    (the config's measure.bootstrap), drawn from `seed`.
    """
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) != len(den):
        raise ValueError(f"num and den differ in length: {len(num)} vs {len(den)}")
    if not len(num) or den.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    idx = bootstrap_indices(len(num), n_boot, seed)
    return float(num.sum() / den.sum()), *_interval(_ratio(num[idx].sum(1), den[idx].sum(1)), level)


def paired_ratio_ci(
    num_a, den_a, num_b, den_b, *, n_boot: int, seed: int, level: float = LEVEL
) -> tuple[float, float, float]:
    """(R_a / R_b, low, high) with R = sum(num) / sum(den), both sides resampled on the same items.

    The items must be aligned (item i of a and of b is the same prompt).
    """
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len({len(x) for x in arrays}) != 1:
        raise ValueError(f"paired samples differ in length: {[len(x) for x in arrays]}")
    num_a, den_a, num_b, den_b = arrays
    if not len(num_a) or den_a.sum() == 0 or den_b.sum() == 0 or num_b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    idx = bootstrap_indices(len(num_a), n_boot, seed)
    boot = _ratio(_ratio(num_a[idx].sum(1), den_a[idx].sum(1)), _ratio(num_b[idx].sum(1), den_b[idx].sum(1)))
    estimate = (num_a.sum() / den_a.sum()) / (num_b.sum() / den_b.sum())
    return float(estimate), *_interval(boot, level)


def paired_statistic_ci(statistic, *arrays, n_boot: int, seed: int, level: float = LEVEL) -> tuple[float, float, float]:
    """(statistic(sums), low, high): `statistic` of the arrays' sums, every array resampled on the same items
    (aligned per-prompt arrays, as paired_ratio_ci's), e.g. the ratio of two drafts' improvement factors."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    if not len(arrays[0]):
        return float("nan"), float("nan"), float("nan")
    idx = bootstrap_indices(len(arrays[0]), n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = statistic(*[a.sum() for a in arrays])
        boot = statistic(*[a[idx].sum(1) for a in arrays])
    return float(estimate), *_interval(np.asarray(boot, dtype=float), level)


def excludes(low: float, high: float, value: float) -> bool:
    """Whether the interval [low, high] lies entirely on one side of `value` (significant at its level)."""
    return bool(np.isfinite(low) and np.isfinite(high) and (low > value or high < value))


def two_level_ci(runs: list, statistic, *, n_boot: int, seed: int, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean over runs of statistic(run's sums), low, high): a bootstrap of training runs, then of prompts in each.

    runs: one tuple of aligned per-prompt arrays per run (a run's prompts are the same across its arrays);
    statistic maps the tuple of their sums (each array summed over a resample of the run's prompts) to a
    number, e.g. a paired MAL ratio. Each resample draws len(runs) runs with replacement and, for every run
    drawn, its own resample of that run's prompts, so the interval covers the training run as well as the
    choice of prompts.
    """
    if not runs:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n_runs = len(runs)
    per_run = []
    for arrays in runs:
        arrays = [np.asarray(a, dtype=float) for a in arrays]
        idx = rng.integers(0, len(arrays[0]), size=(n_boot * n_runs, len(arrays[0])))
        with np.errstate(divide="ignore", invalid="ignore"):
            per_run.append((statistic(*[a.sum() for a in arrays]), statistic(*[a[idx].sum(1) for a in arrays])))
    picks = rng.integers(0, n_runs, size=(n_boot, n_runs))
    draws = np.arange(n_boot * n_runs).reshape(n_boot, n_runs)  # a fresh prompt resample for every pick
    samples = np.stack([per_run[r][1] for r in range(n_runs)])[picks, draws].mean(1)
    return float(np.mean([estimate for estimate, _ in per_run])), *_interval(samples, level)


def paired_ratio(num_a, den_a, num_b, den_b):
    """(sum(num_a) / sum(den_a)) / (sum(num_b) / sum(den_b)) from the sums: two_level_ci's paired MAL ratio."""
    return (num_a / den_a) / (num_b / den_b)
