"""Small statistics shared by the analyses: the Wilson score interval and Fisher's exact test.

The Wilson interval of a proportion ``k / n`` at confidence ``c`` (``z`` the normal quantile at
``(1 + c) / 2``)::

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

It stays inside [0, 1] and keeps its coverage at the small counts of CPU-sized runs (probe test
sets of tens of prompts, ASR over a few dozen requests), where the normal interval does not.
"""

from __future__ import annotations

import math

from em_interp.errors import ConfigError


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    from scipy.stats import norm

    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")
    if n <= 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def fisher_vs(k: int, n: int, k0: int, n0: int) -> tuple[float, float]:
    """Two-sided Fisher exact test of ``k/n`` against ``k0/n0``: ``(odds ratio, p-value)``."""
    from scipy.stats import fisher_exact

    res = fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="two-sided")
    return float(res.statistic), float(res.pvalue)
