"""em_interp.stats against statsmodels/scipy on fixed inputs, definitional re-implementations, and
simulations with a known truth (interval coverage, null uniformity, family-wise error)."""

import itertools

import numpy as np
import pytest
from scipy.stats import binomtest, norm, permutation_test
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower

from em_interp.errors import ConfigError, DataError
from em_interp.stats import (
    bh_fdr,
    cluster_bootstrap_ci,
    holm,
    mcnemar_exact,
    min_detectable_effect,
    permutation_matrix,
    permutation_null,
    permutation_pvalues,
    wilson_interval,
)

# ------------------------------------------------------------------ McNemar


def _pairs(n11, n10, n01, n00):
    a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00, dtype=bool)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, dtype=bool)
    return a, b


@pytest.mark.parametrize("cells", [(10, 7, 1, 12), (3, 0, 0, 5), (0, 9, 9, 0), (20, 2, 11, 7),
                                   (1, 40, 3, 0)])
def test_mcnemar_exact_equals_statsmodels(cells):
    n11, n10, n01, n00 = cells
    a, b = _pairs(*cells)
    res = mcnemar_exact(a, b)
    ref = mcnemar([[n11, n10], [n01, n00]], exact=True)
    assert (res.b10, res.b01, res.n) == (n10, n01, sum(cells))
    assert res.statistic == ref.statistic
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    if n10 + n01:  # the exact binomial test on the discordant pairs, from scipy
        assert res.pvalue == pytest.approx(binomtest(n10, n10 + n01, 0.5).pvalue, rel=1e-12)
    assert res.difference == pytest.approx(a.mean() - b.mean())
    assert res.ci_low <= res.difference + 1e-9 or n10 == n01  # adjusted centre may shift
    assert -1 <= res.ci_low < res.ci_high <= 1


def test_mcnemar_interval_covers_at_small_n():
    """Agresti-Min keeps its coverage at n = 30 where Wald does not (planted p10, p01)."""
    rng = np.random.default_rng(0)
    p11, p10, p01 = 0.4, 0.15, 0.05
    truth, hits, n, sims = p10 - p01, 0, 30, 1500
    cells = rng.multinomial(n, [p11, p10, p01, 1 - p11 - p10 - p01], size=sims)
    for c in cells:
        r = mcnemar_exact(*_pairs(*c))
        hits += r.ci_low <= truth <= r.ci_high
    assert 0.93 <= hits / sims <= 0.985


def test_mcnemar_errors():
    with pytest.raises(DataError, match="same items"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(DataError, match="0/1"):
        mcnemar_exact([0, 2], [1, 1])


# ------------------------------------------------------------------ Holm and BH

P_FIXED = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.04, 0.9, 0.0001, 0.049, 0.6])


def _holm_by_definition(p):
    m, order = len(p), np.argsort(p)
    adj, running = np.empty(m), 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adj[i] = min(1.0, running)
    return adj


def _bh_by_definition(p):
    m = len(p)
    return np.array([min(1.0, min(m * p[j] / (np.sum(p <= p[j])) for j in range(m)
                                  if p[j] >= p[i])) for i in range(m)])


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_holm_and_bh_equal_statsmodels_and_their_definitions(alpha):
    h, b = holm(P_FIXED, alpha), bh_fdr(P_FIXED, alpha)
    for res, method, by_def in ((h, "holm", _holm_by_definition),
                                (b, "fdr_bh", _bh_by_definition)):
        rej, adj, _, _ = multipletests(P_FIXED, alpha=alpha, method=method)
        np.testing.assert_allclose(res.adjusted, adj, rtol=1e-12)
        np.testing.assert_allclose(res.adjusted, by_def(P_FIXED), rtol=1e-12)
        assert np.array_equal(res.reject, rej) and np.array_equal(res.reject, adj <= alpha)
        assert res.method == method and np.array_equal(res.pvalues, P_FIXED)
    assert h.reject.sum() <= b.reject.sum()  # BH is never more conservative than Holm


def test_multiple_testing_leaves_nan_out_and_checks_inputs():
    p = np.array([0.01, np.nan, 0.02, 0.5])
    res = holm(p)
    np.testing.assert_allclose(res.adjusted[[0, 2, 3]], _holm_by_definition(p[[0, 2, 3]]))
    assert np.isnan(res.adjusted[1]) and not res.reject[1]
    assert res.to_dict()["method"] == "holm"
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        bh_fdr([0.2, 1.5])
    with pytest.raises(ConfigError, match="alpha"):
        holm([0.1], alpha=0)


# ------------------------------------------------------------------ cluster bootstrap


def _clustered(rng, g=50, m=5, mu=0.3):
    effects = rng.normal(0, 1, g)
    clusters = np.repeat(np.arange(g), m)
    return mu + effects[clusters] + rng.normal(0, 1, g * m), clusters


def test_cluster_bootstrap_covers_a_known_mean_and_iid_bootstrap_does_not():
    """600 simulated data sets of 50 clusters x 5 (ICC 0.5) around a known mean: the cluster
    interval covers it 95% +- 3 points; the i.i.d. bootstrap on the same data does not."""
    rng = np.random.default_rng(1)
    mu, sims, hit_c, hit_i = 0.3, 600, 0, 0
    for s in range(sims):
        v, cl = _clustered(rng, mu=mu)
        c = cluster_bootstrap_ci(v, cl, n_boot=400, seed=s)
        i = cluster_bootstrap_ci(v, np.arange(v.size), n_boot=400, seed=s)
        hit_c += c.low <= mu <= c.high
        hit_i += i.low <= mu <= i.high
        assert c.n_clusters == 50 and i.n_clusters == 250 and c.estimate == pytest.approx(v.mean())
    assert 0.92 <= hit_c / sims <= 0.98
    assert hit_i / sims < 0.85


def test_two_way_cluster_bootstrap_covers_and_one_way_undercovers():
    """Crossed source x destination effects: the pigeonhole two-way bootstrap covers the known
    mean, resampling the sources alone undercovers."""
    rng = np.random.default_rng(2)
    mu, sims, g1, g2, hit2, hit1 = -0.2, 300, 25, 25, 0, 0
    s, d = np.meshgrid(np.arange(g1), np.arange(g2), indexing="ij")
    s, d = s.ravel(), d.ravel()
    for k in range(sims):
        v = mu + rng.normal(0, 1, g1)[s] + rng.normal(0, 1, g2)[d] + rng.normal(0, 1, s.size)
        two = cluster_bootstrap_ci(v, (s, d), n_boot=400, seed=k)
        one = cluster_bootstrap_ci(v, s, n_boot=400, seed=k)
        hit2 += two.low <= mu <= two.high
        hit1 += one.low <= mu <= one.high
    assert two.n_clusters == (g1, g2)
    assert 0.92 <= hit2 / sims <= 0.995
    assert hit1 / sims < 0.88


def test_cluster_bootstrap_fast_path_equals_the_weighted_loop():
    """The cluster-sum fast path (one- and two-way, unbalanced, some cells empty) equals the same
    draws computed pair by pair through a user ``stat``; a median works too."""
    rng = np.random.default_rng(3)
    n = 90
    v = rng.normal(size=n)
    s, d = rng.integers(0, 7, n), rng.integers(0, 5, n)
    for clusters in (s, (s, d)):
        fast = cluster_bootstrap_ci(v, clusters, n_boot=300, seed=4)
        loop = cluster_bootstrap_ci(v, clusters, n_boot=300, seed=4,
                                    stat=lambda x, w: np.sum(w * x) / np.sum(w))
        assert (fast.low, fast.high, fast.se) == pytest.approx((loop.low, loop.high, loop.se),
                                                               rel=1e-10)
        assert fast.n_boot == loop.n_boot
    med = cluster_bootstrap_ci(v, s, n_boot=200, seed=0,
                               stat=lambda x, w: np.median(np.repeat(x, w.astype(int))))
    assert med.estimate == pytest.approx(np.median(v)) and med.low < med.estimate < med.high
    assert med.half_width == pytest.approx((med.high - med.low) / 2)
    with pytest.raises(DataError, match="two clusters"):
        cluster_bootstrap_ci(v, np.zeros(n))
    with pytest.raises(DataError, match="one cluster id per value"):
        cluster_bootstrap_ci(v, s[:10])


# ------------------------------------------------------------------ permutations


def test_permutation_pvalue_matches_the_exact_enumeration():
    """12 values, 6 vs 6, mean difference: the Monte-Carlo p-value converges to scipy's exact
    enumeration of all 924 splits."""
    x = np.array([0.9, 1.4, 0.3, 2.2, 1.1, 1.8, -0.2, 0.4, 0.1, 1.0, -0.5, 0.6])
    y = np.array([1] * 6 + [0] * 6)
    exact = permutation_test((x[:6], x[6:]), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                             permutation_type="independent", alternative="greater",
                             n_resamples=np.inf, vectorized=True).pvalue

    def stat(labels):  # [m, 12] -> [m]
        return (labels @ x) / 6 - ((1 - labels) @ x) / 6

    res = permutation_null(stat, y, n=4000, seed=0, vectorized=True)
    assert res.pvalue == pytest.approx(exact, abs=0.012)
    loop = permutation_null(lambda lab: stat(lab[None])[0], y, n=4000, seed=0)
    np.testing.assert_allclose(loop.null, res.null)  # the same draws, looped or vectorised
    assert res.observed[0] == pytest.approx(x[:6].mean() - x[6:].mean())


def test_plus_one_correction_and_ties():
    null = np.arange(99.0)[:, None]
    assert permutation_pvalues([1000.0], null).pvalue == pytest.approx(1 / 100)
    assert permutation_pvalues([50.0], null).pvalue == pytest.approx((1 + 49) / 100)  # ties count
    assert permutation_pvalues([0.0], np.zeros((9, 1))).pvalue == 1.0
    assert permutation_pvalues([-1000.0], null, alternative="less").pvalue == pytest.approx(0.01)


def test_null_pvalues_are_uniform_and_max_statistic_controls_the_family():
    """400 null data sets, a family of 10 statistics each: raw p <= 0.05 in ~5% of tests, but
    'some raw p <= 0.05' in ~40% of families; the max-statistic p keeps that at ~5%."""
    rng = np.random.default_rng(5)
    sims, k, n_items = 400, 10, 40
    raw, any_raw, any_max, fam = [], 0, 0, 0
    for s in range(sims):
        x = rng.normal(size=(n_items, k))
        y = np.arange(n_items) % 2
        res = permutation_null(lambda lab, x=x: (lab @ x - (1 - lab) @ x) / 20, y, n=99, seed=s,
                               vectorized=True)
        raw.append(res.pvalues)
        any_raw += res.pvalues.min() <= 0.05
        any_max += res.pvalues_max.min() <= 0.05
        fam += res.p_max <= 0.05
        assert res.p_max == pytest.approx(res.pvalues_max.min())
        assert np.all(res.pvalues_max >= res.pvalues)
    raw = np.concatenate(raw)
    assert abs(np.mean(raw <= 0.05) - 0.05) < 0.012
    assert abs(np.mean(raw <= 0.5) - 0.5) < 0.03
    assert any_raw / sims > 0.3
    assert any_max / sims <= 0.08 and fam == any_max


def test_group_schemes_keep_the_design():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 2)
    pairs = np.tile([1, 0], 20)  # minimal pairs: one of each label per group
    within = permutation_matrix(pairs, 2000, seed=1, groups=groups)  # auto: "both"
    for g in range(20):
        assert np.all(within[:, groups == g].sum(1) == 1)
    assert abs(within[:, 0].mean() - 0.5) < 0.04  # which twin is 1 is random
    blocks = np.repeat(np.arange(10), 4)
    constant = np.repeat(rng.permutation([1] * 5 + [0] * 5), 4)  # a label per whole group
    across = permutation_matrix(constant, 2000, seed=2, groups=blocks, scheme="across")
    for g in range(10):
        part = across[:, blocks == g]
        assert np.all(part == part[:, :1])
    assert abs(across[:, 0].mean() - 0.5) < 0.04 and np.all(across.sum(1) == 20)
    free = permutation_matrix(constant, 500, seed=3)
    assert np.mean([len(set(r[blocks == 0])) > 1 for r in free]) > 0.5  # free breaks groups
    # each permutation is a permutation: the label multiset is kept
    assert np.all(np.sort(free, 1) == np.sort(constant))
    with pytest.raises(ConfigError, match="needs groups"):
        permutation_matrix(pairs, 5, scheme="within")


# ------------------------------------------------------------------ minimum detectable effect


def test_min_detectable_effect_equals_statsmodels_power():
    sigma, n = 2.0, 64
    se = sigma / np.sqrt(n)
    es = NormalIndPower().solve_power(nobs1=n, alpha=0.05, power=0.8, ratio=0)
    assert min_detectable_effect(se) == pytest.approx(es * sigma, rel=1e-4)
    assert min_detectable_effect(1.0) == pytest.approx(norm.ppf(0.975) + norm.ppf(0.8))
    assert min_detectable_effect(half_width=1.959963984540054 * se) == pytest.approx(
        min_detectable_effect(se))
    es1 = NormalIndPower().solve_power(nobs1=n, alpha=0.05, power=0.9, ratio=0,
                                       alternative="larger")
    assert min_detectable_effect(se, power=0.9, alternative="one-sided") == pytest.approx(
        es1 * sigma, rel=1e-6)
    # from a Wilson interval of an accuracy at chance: the resolution of a null probe result
    lo, hi = wilson_interval(24, 48)
    mde = min_detectable_effect(half_width=(hi - lo) / 2)
    assert 0.18 < mde < 0.21
    with pytest.raises(ConfigError, match="exactly one"):
        min_detectable_effect()
    with pytest.raises(ConfigError, match="power"):
        min_detectable_effect(1.0, power=1.0)


def test_wilson_matches_scipy():
    for k, n in itertools.product((0, 3, 10), (10, 25)):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_bounds_are_exact_at_zero_and_all():
    # no float residue at the ends: a rate of 0 (or 1) has its bound exactly at 0 (or 1)
    for n in (1, 3, 4, 9, 57):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert wilson_interval(0, n)[1] > 0 and wilson_interval(n, n)[0] < 1
