"""Small statistics shared by the analyses: intervals, exact and permutation tests, multiplicity
corrections, cluster bootstraps and the minimum detectable effect.

Every function states its formula here or in its docstring. Where scipy or statsmodels computes
the thing, they do it (and the tests compare); what they lack is written out by hand.

**Wilson interval** of a proportion ``k / n`` at confidence ``c`` (``z`` the normal quantile at
``(1 + c) / 2``)::

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

It stays inside [0, 1] and keeps its coverage at the small counts of CPU-sized runs (probe test
sets of tens of prompts, ASR over a few dozen requests), where the normal interval does not.

**Paired binary outcomes** (the same prompts under two conditions): :func:`mcnemar_exact`, the
exact binomial test on the discordant pairs, with the Agresti-Min interval of the difference.

**Families of tests** (layers, heads, conditions): :func:`holm` (family-wise error) and
:func:`bh_fdr` (false discovery rate), both from ``statsmodels.stats.multitest``; and, when the
statistics come from a permutation null, the max-statistic adjustment of
:func:`permutation_null`, which uses their dependence instead of a worst-case bound.

**Clustered observations** (prompts that share a template, pairs that share a source and a
destination prompt): :func:`cluster_bootstrap_ci` resamples whole clusters, one-way or two-way.
An i.i.d. bootstrap over such data underestimates the spread and undercovers.

**Nulls**: :func:`min_detectable_effect` turns an interval's half-width into the smallest effect
the run could have detected, so that "no effect" is reported with its resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from em_interp.errors import ConfigError, DataError

Scheme = Literal["auto", "free", "within", "across", "both"]


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


# ------------------------------------------------------------------ proportions


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    _check_confidence(confidence)
    if n <= 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the bound is exactly 0 (1); floating point leaves ~1e-17 otherwise
    return (0.0 if k <= 0 else max(0.0, centre - half), 1.0 if k >= n else min(1.0, centre + half))


def fisher_vs(k: int, n: int, k0: int, n0: int) -> tuple[float, float]:
    """Two-sided Fisher exact test of ``k/n`` against ``k0/n0``: ``(odds ratio, p-value)``."""
    from scipy.stats import fisher_exact

    res = fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


# ------------------------------------------------------------------ paired binary outcomes


@dataclass(frozen=True)
class McNemarResult:
    """The exact McNemar test of two paired binary outcomes (see :func:`mcnemar_exact`)."""

    n: int
    """Number of pairs (prompts)."""
    b01: int
    """Pairs with ``a`` false and ``b`` true."""
    b10: int
    """Pairs with ``a`` true and ``b`` false."""
    statistic: float
    """``min(b01, b10)``, as ``statsmodels``' exact McNemar reports it."""
    pvalue: float
    """Two-sided exact p-value: ``min(1, 2 * BinomCDF(min(b01, b10); b01 + b10, 1/2))``."""
    rate_a: float
    rate_b: float
    difference: float
    """``rate_a - rate_b = (b10 - b01) / n``."""
    ci_low: float
    ci_high: float
    """Agresti-Min interval of ``difference`` at ``confidence``."""
    confidence: float

    def to_dict(self) -> dict:
        """All fields, JSON-safe."""
        return asdict(self)


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray, *,
                  confidence: float = 0.95) -> McNemarResult:
    """Exact McNemar test: did the rate of a binary outcome change between two conditions
    measured on the same items (e.g. refusal with and without an ablation, prompt by prompt)?

    Only the discordant pairs carry information about the difference: with ``b10`` items true
    under ``a`` only and ``b01`` true under ``b`` only, under H0 (equal rates) each discordant item
    is ``a``-only with probability 1/2, so ``b10 ~ Binomial(b01 + b10, 1/2)`` and the two-sided
    p-value is ``min(1, 2 * P(X <= min(b01, b10)))``. This is exact at any count (the chi-square
    version is not, at the tens of prompts of a CPU run), and it uses the pairing, which the
    two-sample Fisher test throws away. It equals
    ``statsmodels.stats.contingency_tables.mcnemar(table, exact=True)``.

    The difference of rates ``d = (b10 - b01) / n`` gets the Agresti-Min interval (Agresti & Min,
    Biometrics 2005): add 1/2 to each of the four cells, then the Wald interval::

        p10 = (b10 + 1/2) / (n + 2),   p01 = (b01 + 1/2) / (n + 2)
        d'  = p10 - p01,   se = sqrt((p10 + p01 - d'^2) / (n + 2))
        [d' - z se, d' + z se]  (clipped to [-1, 1])

    which keeps near-nominal coverage at small ``n``, unlike the plain Wald interval.

    Args:
        a: outcome per item under the first condition (booleans, or 0/1).
        b: outcome per item under the second condition, the same items in the same order.
        confidence: level of the interval.

    Raises:
        DataError: ``a`` and ``b`` of different lengths, empty, or not binary.
    """
    from scipy.stats import binom

    _check_confidence(confidence)
    a, b = _binary(a, "a"), _binary(b, "b")
    if a.shape != b.shape or a.size == 0:
        raise DataError(f"mcnemar_exact needs two outcome arrays over the same items; got "
                        f"{a.size} and {b.size} items.")
    n = int(a.size)
    b10, b01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    m = b01 + b10
    stat = min(b01, b10)
    p = 1.0 if m == 0 else min(1.0, 2.0 * float(binom.cdf(stat, m, 0.5)))
    p10, p01 = (b10 + 0.5) / (n + 2), (b01 + 0.5) / (n + 2)
    d_adj = p10 - p01
    half = _z(confidence) * math.sqrt(max(p10 + p01 - d_adj * d_adj, 0.0) / (n + 2))
    return McNemarResult(n=n, b01=b01, b10=b10, statistic=float(stat), pvalue=p,
                         rate_a=float(a.mean()), rate_b=float(b.mean()),
                         difference=(b10 - b01) / n, ci_low=max(-1.0, d_adj - half),
                         ci_high=min(1.0, d_adj + half), confidence=confidence)


def _binary(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one outcome per item (1-D), got shape {arr.shape}.")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise DataError(f"{name} must be booleans or 0/1, got values "
                            f"{np.unique(arr)[:5].tolist()}.")
        arr = arr.astype(bool)
    return arr


# ------------------------------------------------------------------ families of tests


@dataclass(frozen=True)
class AdjustedPValues:
    """p-values adjusted for a family of tests (see :func:`holm`, :func:`bh_fdr`)."""

    pvalues: np.ndarray
    """The raw p-values, in input order."""
    adjusted: np.ndarray
    """Adjusted p-values, in input order (NaN where the input was NaN)."""
    reject: np.ndarray
    """``adjusted <= alpha`` (False where the input was NaN)."""
    alpha: float
    method: str
    """``"holm"`` or ``"fdr_bh"`` (the statsmodels method name)."""

    def to_dict(self) -> dict:
        """Lists of raw and adjusted p-values and rejections, the level and the method."""
        return {"pvalues": self.pvalues.tolist(), "adjusted": self.adjusted.tolist(),
                "reject": self.reject.tolist(), "alpha": self.alpha, "method": self.method}


def _adjust(pvalues, alpha: float, method: str) -> AdjustedPValues:
    from statsmodels.stats.multitest import multipletests

    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}.")
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise DataError(f"p-values must lie in [0, 1], got {p[finite & ((p < 0) | (p > 1))][:5]}.")
    adjusted = np.full(p.shape, np.nan)
    reject = np.zeros(p.shape, dtype=bool)
    if finite.any():
        rej, adj, _, _ = multipletests(p[finite], alpha=alpha, method=method)
        adjusted[finite], reject[finite] = adj, rej
    return AdjustedPValues(pvalues=p, adjusted=adjusted, reject=reject, alpha=alpha,
                           method=method)


def holm(pvalues: Sequence[float] | np.ndarray, alpha: float = 0.05) -> AdjustedPValues:
    """Holm's step-down adjustment: controls the family-wise error rate (the chance of any false
    rejection) under any dependence between the tests.

    With the ``m`` p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted values are::

        p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))

    returned in input order. Uniformly more powerful than Bonferroni (``m p``). NaN p-values
    (a layer that could not be tested) are left out of the family and stay NaN.
    Computed by ``statsmodels.stats.multitest.multipletests(method="holm")``.
    """
    return _adjust(pvalues, alpha, "holm")


def bh_fdr(pvalues: Sequence[float] | np.ndarray, alpha: float = 0.05) -> AdjustedPValues:
    """Benjamini-Hochberg adjustment: controls the false discovery rate (the expected share of
    false rejections among the rejections) for independent or positively dependent tests.

    With the ``m`` p-values sorted, the adjusted values are::

        p~_(i) = min(1, min_{j >= i} m p_(j) / j)

    returned in input order; rejecting ``p~ <= alpha`` is the BH step-up rule. Use it when many
    layers or heads are screened and a few false leads are acceptable; use :func:`holm` when any
    false claim is costly. NaN p-values are left out and stay NaN. Computed by
    ``statsmodels.stats.multitest.multipletests(method="fdr_bh")``.
    """
    return _adjust(pvalues, alpha, "fdr_bh")


# ------------------------------------------------------------------ cluster bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval (see :func:`cluster_bootstrap_ci`)."""

    estimate: float
    """The statistic on the data as observed (all weights 1)."""
    low: float
    high: float
    se: float
    """Standard deviation of the bootstrap distribution."""
    confidence: float
    n_boot: int
    """Bootstrap draws that gave a finite statistic."""
    n_clusters: int | tuple[int, int]
    """Clusters resampled: one count, or (first, second) for two-way clusters."""

    @property
    def half_width(self) -> float:
        """``(high - low) / 2``, e.g. for :func:`min_detectable_effect`."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        """All fields, JSON-safe."""
        out = asdict(self)
        out["n_clusters"] = (list(self.n_clusters) if isinstance(self.n_clusters, tuple)
                             else self.n_clusters)
        return out


def _codes(ids, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{name} must give one cluster id per value ({n}), got shape {arr.shape}.")
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def _cluster_counts(rng: np.random.Generator, g: int, n_boot: int) -> np.ndarray:
    """``[n_boot, g]``: how often each of ``g`` clusters is drawn in ``g`` draws with
    replacement (a multinomial(g, 1/g) per row)."""
    draws = rng.integers(0, g, size=(n_boot, g)) + g * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * g).reshape(n_boot, g).astype(np.float64)


def _is_two_way(clusters, n: int) -> bool:
    return (isinstance(clusters, tuple | list) and len(clusters) == 2 and n != 2
            and all(np.ndim(c) == 1 and len(c) == n for c in clusters))


def cluster_bootstrap_ci(values: Sequence[float] | np.ndarray,
                         clusters: Sequence | np.ndarray | tuple[Sequence, Sequence], *,
                         n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                         stat: Callable[[np.ndarray, np.ndarray], float] | None = None
                         ) -> BootstrapCI:
    """Percentile bootstrap interval of a statistic of clustered values, resampling clusters.

    Values that share a cluster (the prompts of one template, the pairs that share a source
    prompt) are correlated, so the i.i.d. bootstrap, which treats them as independent,
    underestimates the spread and its interval undercovers. Resample the clusters instead:

    * **One-way** (``clusters`` = one id per value): draw ``G`` clusters with replacement from
      the ``G`` observed; a value enters with weight = the number of times its cluster was drawn.
    * **Two-way** (``clusters=(source_ids, dest_ids)``, e.g. patching pairs crossed over source
      and destination prompts): draw the source clusters and the destination clusters
      independently, each with replacement; a value enters with weight
      ``count_source(s_i) * count_dest(d_i)`` -- the pairs whose source and destination were
      both drawn, weighted by multiplicity. This is the pigeonhole bootstrap (Owen, Ann. Appl.
      Stat. 2007; McCullagh 2000); it is mildly conservative, which one-way resampling of a
      crossed design is not.

    The statistic on each draw is ``stat(values, weights)`` (default: the weighted mean,
    ``sum w_i v_i / sum w_i``, computed from cluster sums without materialising the weights);
    the interval is the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of the draws. Draws with zero
    total weight or a non-finite statistic are dropped. Percentile intervals undercover a little
    with few clusters (about ``sqrt((G - 1) / G)`` too narrow): with fewer than ~20 clusters
    read the interval as approximate.

    Args:
        values: one value per observation.
        clusters: one cluster id per observation, or a pair of id sequences (two-way).
        n_boot: bootstrap draws.
        confidence: interval level.
        seed: seeds ``numpy.random.default_rng``.
        stat: ``stat(values, weights) -> float``; ``None`` for the weighted mean.

    Raises:
        DataError: ids of the wrong length, fewer than two clusters, no values, NaN values.
        ConfigError: ``n_boot < 2`` or ``confidence`` outside (0, 1).
    """
    _check_confidence(confidence)
    if n_boot < 2:
        raise ConfigError(f"n_boot must be >= 2, got {n_boot}.")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.size
    if n == 0 or not np.isfinite(v).all():
        raise DataError(f"cluster_bootstrap_ci needs finite values, got {n} values "
                        f"({int((~np.isfinite(v)).sum())} not finite).")
    rng = np.random.default_rng(seed)
    two_way = _is_two_way(clusters, n)
    codes = ([_codes(c, n, f"clusters[{i}]") for i, c in enumerate(clusters)] if two_way
             else [_codes(clusters, n, "clusters")])
    sizes = [int(c.max()) + 1 for c in codes]
    if min(sizes) < 2:
        raise DataError(f"cluster_bootstrap_ci needs at least two clusters per way, got {sizes}.")
    counts = [_cluster_counts(rng, g, n_boot) for g in sizes]
    if stat is None:
        if two_way:
            s, d = codes
            total = np.zeros((sizes[0], sizes[1]))
            number = np.zeros((sizes[0], sizes[1]))
            np.add.at(total, (s, d), v)
            np.add.at(number, (s, d), 1.0)
            num = np.einsum("bs,sd,bd->b", counts[0], total, counts[1])
            den = np.einsum("bs,sd,bd->b", counts[0], number, counts[1])
        else:
            total = np.bincount(codes[0], weights=v, minlength=sizes[0])
            number = np.bincount(codes[0], minlength=sizes[0]).astype(np.float64)
            num, den = counts[0] @ total, counts[0] @ number
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = np.where(den > 0, num / den, np.nan)
        estimate = float(v.mean())
    else:
        boot = np.empty(n_boot)
        for i in range(n_boot):
            w = counts[0][i, codes[0]]
            if two_way:
                w = w * counts[1][i, codes[1]]
            boot[i] = float(stat(v, w)) if w.sum() > 0 else np.nan
        estimate = float(stat(v, np.ones(n)))
    boot = boot[np.isfinite(boot)]
    if boot.size < 2:
        raise DataError("fewer than two bootstrap draws gave a finite statistic; check stat and "
                        "the clusters.")
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return BootstrapCI(estimate=estimate, low=float(lo), high=float(hi),
                       se=float(boot.std(ddof=1)), confidence=confidence, n_boot=int(boot.size),
                       n_clusters=tuple(sizes) if two_way else sizes[0])


# ------------------------------------------------------------------ permutation tests


@dataclass(frozen=True)
class PermutationResult:
    """A permutation null for a statistic or a family of statistics (see
    :func:`permutation_null`)."""

    observed: np.ndarray
    """``[k]`` the statistic(s) on the real labels."""
    null: np.ndarray
    """``[n, k]`` the statistic(s) on ``n`` permuted label vectors."""
    pvalues: np.ndarray
    """``[k]`` per-statistic p-values, ``(1 + #{null >= observed}) / (1 + n)``."""
    pvalues_max: np.ndarray
    """``[k]`` max-statistic (single-step max-T) adjusted p-values,
    ``(1 + #{max_j null_j >= observed_k}) / (1 + n)``: family-wise error control."""
    p_max: float
    """p-value of the family's maximum, ``(1 + #{max_j null_j >= max_j observed_j}) / (1 + n)``:
    is there a signal anywhere in the family?"""
    n: int
    scheme: str
    alternative: str

    @property
    def pvalue(self) -> float:
        """The p-value of a single (scalar) statistic."""
        if self.observed.size != 1:
            raise ConfigError(f"pvalue is for one statistic; this family has {self.observed.size}"
                              ": use .pvalues, .pvalues_max or .p_max.")
        return float(self.pvalues[0])

    def to_dict(self) -> dict:
        """Observed values and p-values as lists (the null itself is left out)."""
        return {"observed": self.observed.tolist(), "pvalues": self.pvalues.tolist(),
                "pvalues_max": self.pvalues_max.tolist(), "p_max": self.p_max, "n": self.n,
                "scheme": self.scheme, "alternative": self.alternative}


def _group_layout(groups, n: int):
    codes = _codes(groups, n, "groups")
    order = np.argsort(codes, kind="stable")  # rows grouped, row order within a group
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # per size class: a [n_groups_of_that_size, size] matrix of row indices
    by_size = {}
    for s in np.unique(sizes):
        gs = np.flatnonzero(sizes == s)
        by_size[int(s)] = order[starts[gs][:, None] + np.arange(s)[None, :]]
    return codes, by_size


def permutation_matrix(labels: Sequence | np.ndarray, n: int, *, seed: int = 0,
                       groups: Sequence | np.ndarray | None = None,
                       scheme: Scheme = "auto") -> np.ndarray:
    """``[n, len(labels)]``: ``n`` permutations of ``labels``, respecting ``groups``.

    Schemes (``"auto"``: ``"free"`` without groups, ``"both"`` with):

    * ``"free"``: any permutation of all labels.
    * ``"within"``: labels are shuffled among the members of each group only, so every group
      keeps its label counts (minimal pairs stay one risky, one benign).
    * ``"across"``: whole groups swap their label vectors with other groups of the same size, so
      a group whose members share a label keeps sharing one (the exchangeable unit is the group).
    * ``"both"``: ``"across"`` then ``"within"``: each group keeps the label composition of some
      group of its size, and which member gets which label is random. It preserves the
      label-by-group structure of the design, whatever it is, which is what a null must do when
      the features carry group identity.
    """
    y = np.asarray(labels)
    m = y.shape[0]
    if n < 1:
        raise ConfigError(f"the number of permutations must be >= 1, got {n}.")
    if scheme == "auto":
        scheme = "free" if groups is None else "both"
    if scheme not in ("free", "within", "across", "both"):
        raise ConfigError(f"scheme must be 'auto', 'free', 'within', 'across' or 'both', got "
                          f"{scheme!r}.")
    if scheme != "free" and groups is None:
        raise ConfigError(f"scheme={scheme!r} needs groups=...; use scheme='free' without groups.")
    rng = np.random.default_rng(seed)
    if scheme == "free":
        return y[rng.permuted(np.tile(np.arange(m), (n, 1)), axis=1)]
    codes, by_size = _group_layout(groups, m)
    idx = np.tile(np.arange(m), (n, 1))  # idx[p, i]: the row whose label row i receives
    if scheme in ("across", "both"):
        for rows in by_size.values():  # rows: [g, s]
            perm = rng.permuted(np.tile(np.arange(rows.shape[0]), (n, 1)), axis=1)  # [n, g]
            idx[:, rows] = rows[perm]  # group j receives group perm[j]'s vector
    if scheme in ("within", "both"):
        keys = rng.random((n, m))
        # sort each row by (group, random key): the positions of a group's rows in a random order
        grouped = np.argsort(codes, kind="stable")
        shuffled = np.lexsort((keys, np.broadcast_to(codes, (n, m))), axis=1)
        within = np.empty_like(idx)
        within[:, grouped] = shuffled
        idx = np.take_along_axis(idx, within, axis=1)
    return y[idx]


def permutation_pvalues(observed, null, *, alternative: Literal["greater", "less"] = "greater",
                        scheme: str = "given") -> PermutationResult:
    """p-values of ``observed`` (``[k]``) against a permutation ``null`` (``[n, k]``).

    With ``n`` permutations, the +1 correction counts the observed labelling as one of the
    permutations, so the p-value is never 0 and the test has exact level ``alpha`` whenever
    ``alpha (n + 1)`` is an integer (Phipson & Smyth 2010)::

        p_k     = (1 + #{b : null[b, k] >= observed[k]}) / (1 + n)
        p_max_k = (1 + #{b : max_j null[b, j] >= observed[k]}) / (1 + n)     (max-T)
        p_max   = (1 + #{b : max_j null[b, j] >= max_j observed[j]}) / (1 + n)

    ``p_max_k`` controls the family-wise error over the ``k`` statistics under their actual
    dependence (Westfall & Young single-step max-T), so it is the p-value for "the best of the
    layers"; ``p_max`` is the smallest of them. ``alternative="less"`` negates both sides. Ties
    count against the observed value (a relative tolerance of 1e-12 absorbs float noise).
    """
    if alternative not in ("greater", "less"):
        raise ConfigError(f"alternative must be 'greater' or 'less', got {alternative!r}.")
    obs = np.atleast_1d(np.asarray(observed, dtype=np.float64))
    nul = np.asarray(null, dtype=np.float64).reshape(-1, obs.size)
    sign = 1.0 if alternative == "greater" else -1.0
    o, z = sign * obs, sign * nul
    tol = 1e-12 * np.maximum(1.0, np.abs(o))
    n = nul.shape[0]
    p = (1 + np.sum(z >= o[None, :] - tol[None, :], axis=0)) / (1 + n)
    zmax = np.nanmax(z, axis=1)
    pm = (1 + np.sum(zmax[:, None] >= o[None, :] - tol[None, :], axis=0)) / (1 + n)
    omax = np.nanmax(o)
    p_max = float((1 + np.sum(zmax >= omax - 1e-12 * max(1.0, abs(omax)))) / (1 + n))
    p = np.where(np.isnan(obs), np.nan, p)
    pm = np.where(np.isnan(obs), np.nan, pm)
    return PermutationResult(observed=obs, null=nul, pvalues=p, pvalues_max=pm, p_max=p_max,
                             n=n, scheme=scheme, alternative=alternative)


def permutation_null(statistic: Callable[[np.ndarray], float | np.ndarray],
                     labels: Sequence | np.ndarray, *, n: int = 1000, seed: int = 0,
                     groups: Sequence | np.ndarray | None = None, scheme: Scheme = "auto",
                     alternative: Literal["greater", "less"] = "greater",
                     vectorized: bool = False) -> PermutationResult:
    """Permutation test of ``statistic(labels)`` (one value or a family, e.g. one per layer).

    The null distribution is the statistic recomputed on ``n`` permutations of the labels
    (:func:`permutation_matrix`, respecting ``groups`` with ``scheme``); the p-values are those of
    :func:`permutation_pvalues`: per statistic, max-statistic adjusted, and for the family's
    maximum, all with the +1 correction ``(1 + #{null >= observed}) / (1 + n)``.

    Args:
        statistic: ``statistic(labels) -> float | [k]``; with ``vectorized=True`` it takes a
            ``[m, n_items]`` matrix of label vectors and returns ``[m]`` or ``[m, k]``.
        labels: the real labels, one per item.
        n: permutations.
        seed: seeds the permutations.
        groups: a group id per item; permutations respect them as ``scheme`` says.
        scheme: ``"auto"``, ``"free"``, ``"within"``, ``"across"`` or ``"both"``.
        alternative: ``"greater"`` (large statistics are evidence) or ``"less"``.
        vectorized: call ``statistic`` once on all label vectors instead of once per vector.
    """
    y = np.asarray(labels)
    perms = permutation_matrix(y, n, seed=seed, groups=groups, scheme=scheme)
    if vectorized:
        both = np.asarray(statistic(np.concatenate([y[None], perms])), dtype=np.float64)
        both = both.reshape(n + 1, -1)
        obs, null = both[0], both[1:]
    else:
        obs = np.atleast_1d(np.asarray(statistic(y), dtype=np.float64))
        null = np.stack([np.atleast_1d(np.asarray(statistic(p), dtype=np.float64))
                         for p in perms])
    used = scheme if scheme != "auto" else ("free" if groups is None else "both")
    return permutation_pvalues(obs, null, alternative=alternative, scheme=used)


# ------------------------------------------------------------------ resolution of a null


def min_detectable_effect(se: float | None = None, *, half_width: float | None = None,
                          alpha: float = 0.05, power: float = 0.8,
                          interval_confidence: float = 0.95,
                          alternative: Literal["two-sided", "one-sided"] = "two-sided") -> float:
    """The smallest true effect a run would have detected with probability ``power``.

    A two-sided level-``alpha`` z-test on an estimate with standard error ``SE`` rejects when
    ``|estimate| > z_{1-alpha/2} SE``; an effect ``delta`` is detected with probability ``power``
    when ``delta = (z_{1-alpha/2} + z_{power}) SE`` (ignoring the far tail)::

        MDE = (z_{1 - alpha/2} + z_{power}) * SE      (= 2.80 SE at alpha 0.05, power 0.8)

    (``z_{1-alpha}`` for a one-sided test). Report it with a null: "no effect larger than MDE",
    not "no effect". ``SE`` is given, or read off an interval: ``SE = half_width /
    z_{(1 + interval_confidence)/2}`` (a 95% interval's half-width is 1.96 SE).

    Raises:
        ConfigError: neither or both of ``se`` and ``half_width``; levels outside (0, 1).
    """
    from scipy.stats import norm

    if (se is None) == (half_width is None):
        raise ConfigError("give exactly one of se=... or half_width=... to "
                          "min_detectable_effect.")
    for name, value in (("alpha", alpha), ("power", power),
                        ("interval_confidence", interval_confidence)):
        if not 0 < value < 1:
            raise ConfigError(f"{name} must be in (0, 1), got {value}.")
    if alternative not in ("two-sided", "one-sided"):
        raise ConfigError(f"alternative must be 'two-sided' or 'one-sided', got {alternative!r}.")
    if se is None:
        se = half_width / _z(interval_confidence)
    if not se >= 0:
        raise DataError(f"the standard error must be >= 0, got {se}.")
    crit = norm.ppf(1 - alpha / 2) if alternative == "two-sided" else norm.ppf(1 - alpha)
    return float((crit + norm.ppf(power)) * se)


__all__ = ["AdjustedPValues", "BootstrapCI", "McNemarResult", "PermutationResult", "bh_fdr",
           "cluster_bootstrap_ci", "fisher_vs", "holm", "mcnemar_exact", "min_detectable_effect",
           "permutation_matrix", "permutation_null", "permutation_pvalues", "wilson_interval"]
