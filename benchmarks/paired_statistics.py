"""Confidence intervals over seeds for the paired comparisons of `quality.py`.

A comparison has one number per seed (a variant's FD, or its ratio to stock at the same seed), and 5 seeds at most
on a CPU budget. Two intervals of the mean are given for it: the percentile bootstrap, which assumes nothing about
the shape of the spread but sees only those few numbers, and Student's t, which assumes a normal spread and is
wider at small n. A claim is made only when both support it.
"""

import statistics

import numpy as np
import scipy.stats


def bootstrap_ci(values: list[float], confidence: float = 0.95, resamples: int = 10_000) -> list[float]:
    """Percentile-bootstrap confidence interval of the mean of `values` (one value per seed), resampling the
    seeds with replacement; fixed resampling seed, so a table regenerates exactly. NaNs for fewer than 2 values."""
    if len(values) < 2:
        return [float("nan"), float("nan")]
    interval = scipy.stats.bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval
    return [float(interval.low), float(interval.high)]


def t_interval(values: list[float], confidence: float = 0.95) -> list[float]:
    """Student-t confidence interval of the mean of `values`. With 5 seeds the percentile bootstrap only sees the
    spread of 5 numbers and is about a third narrower than this one, so the tables print both and a decision
    takes the wider. NaNs for fewer than 2 values."""
    if len(values) < 2:
        return [float("nan"), float("nan")]
    mean, error = statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5
    half_width = scipy.stats.t.ppf((1 + confidence) / 2, df=len(values) - 1) * error
    return [mean - half_width, mean + half_width]


def paired_ratio(runs: list[dict], stock_by_seed: dict[int, dict], metric) -> dict:
    """Mean, std and 95 % CIs (bootstrap and Student-t) over seeds of metric(run) / metric(stock run of the same
    seed)."""
    ratios = [metric(run) / metric(stock_by_seed[run["seed"]]) for run in runs]
    return {
        "mean": statistics.mean(ratios),
        "std": statistics.stdev(ratios) if len(ratios) > 1 else float("nan"),
        "ci95": bootstrap_ci(ratios),
        "t_ci95": t_interval(ratios),
    }
