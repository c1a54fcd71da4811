"""Statistics the package reports, on `scipy.stats`: Wilson intervals, bootstrap CIs, AUC.

- `wilson_interval(k, n)`: a proportion and its 95% Wilson score interval
  (`scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`), vectorised over arrays.
- `bootstrap_mean_ci(x, ...)`: the mean over the last axis and its percentile-bootstrap
  interval (`scipy.stats.bootstrap`, method "percentile"); the resampling stream is seeded, so
  two samples of the same length get the same resamples (paired CIs across methods).
- `auc(pos, neg)`: the Mann-Whitney AUC, P(pos > neg) + P(pos = neg) / 2
  (`scipy.stats.mannwhitneyu(...).statistic / (n_pos n_neg)`), vectorised over leading axes.
NaN where a sample is empty.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "bootstrap_mean_ci", "wilson_interval"]


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rate, low, high) of k successes in n trials, element-wise; NaN where n = 0."""
    from scipy.stats import binomtest

    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    rate, lo, hi = (np.full(k.shape, np.nan) for _ in range(3))
    for idx in np.ndindex(k.shape):
        if n[idx] > 0:
            ci = binomtest(int(k[idx]), int(n[idx])).proportion_ci(confidence_level=confidence, method="wilson")
            rate[idx], lo[idx], hi[idx] = k[idx] / n[idx], ci.low, ci.high
    if rate.ndim == 0:
        return float(rate), float(lo), float(hi)
    return rate, lo, hi


def bootstrap_mean_ci(x, *, n_boot: int = 1000, confidence: float = 0.95, seed=0) -> tuple[float, float, float]:
    """(mean, low, high) of a 1-D sample (NaN ignored) with a percentile-bootstrap interval.

    `seed` seeds `numpy.random.default_rng` (an int or a sequence such as [seed, metric, n]);
    samples of the same size drawn with the same seed use the same resamples."""
    from scipy.stats import bootstrap

    v = np.asarray(x, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1 or np.all(v == v[0]):
        return mean, mean, mean
    res = bootstrap((v,), np.mean, n_resamples=int(n_boot), confidence_level=confidence, method="percentile",
                    vectorized=True, random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def auc(pos, neg, axis: int = -1) -> np.ndarray | float:
    """Mann-Whitney AUC of `pos` over `neg` along `axis` (other axes broadcast); ties count 1/2."""
    from scipy.stats import mannwhitneyu

    p = np.moveaxis(np.asarray(pos, dtype=np.float64), axis, -1)
    q = np.moveaxis(np.asarray(neg, dtype=np.float64), axis, -1)
    n1, n2 = p.shape[-1], q.shape[-1]
    shape = np.broadcast_shapes(p.shape[:-1], q.shape[:-1])
    if n1 == 0 or n2 == 0:
        out = np.full(shape, np.nan)
    else:
        p = np.broadcast_to(p, shape + (n1,))
        q = np.broadcast_to(q, shape + (n2,))
        out = mannwhitneyu(p, q, axis=-1, method="asymptotic").statistic / (n1 * n2)
    return float(out) if np.ndim(out) == 0 else np.asarray(out)
