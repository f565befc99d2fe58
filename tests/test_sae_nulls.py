"""The null of SAE feature correlations: the permutation null of max |r| over latents against a
loop of scipy correlations, pure-noise latents that are not significant (while their raw
p-values and max |r| look impressive), a planted latent that is found, and Benjamini-Hochberg
against a hand-written step-up rule."""

import numpy as np
import pytest
import torch
from scipy import stats

from em_interp.errors import ConfigError
from em_interp.results import load_result
from em_interp.sae import feature_correlations
from em_interp.sae.features import FeatureCorrelations, max_abs_r_null
from em_interp.stats import permutation_matrix


def sparse_noise(n, d, seed):
    """SAE-like latents that know nothing about any label: ReLU of shifted Gaussians (most are
    zero on most prompts), with a spread of firing rates."""
    g = np.random.default_rng(seed)
    bias = g.uniform(-2.0, 0.5, size=d)
    return np.maximum(g.normal(size=(n, d)) + bias, 0.0)


def bh_by_hand(p, alpha):
    """The Benjamini-Hochberg step-up rule written out: reject the k smallest p-values, k the
    largest i with p_(i) <= alpha * i / m."""
    p = np.asarray(p)
    m = len(p)
    order = np.argsort(p)
    ok = np.flatnonzero(p[order] <= alpha * np.arange(1, m + 1) / m)
    reject = np.zeros(m, dtype=bool)
    if ok.size:
        reject[order[:ok[-1] + 1]] = True
    return reject


def test_vectorised_null_equals_a_loop_of_scipy_correlations():
    x = sparse_noise(20, 30, seed=1)
    x[:, 4] = 0.0  # a constant latent has no correlation and is left out
    y = np.array([0, 1] * 10)
    perms = permutation_matrix(y, 15, seed=3)
    got = max_abs_r_null(x, perms, chunk=4)  # several chunks
    for b, yb in enumerate(perms):
        rs = [abs(stats.pearsonr(x[:, k], yb)[0]) for k in range(30) if x[:, k].std() > 0]
        assert got[b] == pytest.approx(max(rs), abs=1e-12)
    res = feature_correlations(torch.tensor(x), y, n_permutations=15, seed=3)
    np.testing.assert_allclose(res.null_max_abs_r, got, atol=1e-12)
    assert res.n_permutations == 15
    obs = np.nanmax(np.abs(res.pearson_r))
    assert res.p_max_abs_r == pytest.approx((1 + np.sum(got >= obs - 1e-12)) / 16)
    # each latent's family-wise p: (1 + #{null max >= |r_k|}) / (1 + B)
    k = int(np.nanargmin(np.abs(res.pearson_r)))
    assert res.p_fwer[k] == pytest.approx(
        (1 + np.sum(got >= abs(res.pearson_r[k]) - 1e-12)) / 16)
    assert np.isnan(res.p_fwer[4]) and np.isnan(res.p_bh[4])


def test_pure_noise_latents_are_not_significant_across_seeds():
    n, d, seeds = 64, 3000, range(8)
    y = np.array([0, 1] * (n // 2))
    p_max, n_fdr, raw_hits, max_r, q95 = [], [], [], [], []
    for s in seeds:
        res = feature_correlations(torch.tensor(sparse_noise(n, d, s)), y, seed=s)
        p_max.append(res.p_max_abs_r)
        n_fdr.append(res.n_significant)
        raw_hits.append(int(np.sum(res.p_value < 0.05)))
        max_r.append(res.max_abs_r)
        q95.append(res.null_quantile(0.95))
    # what the old report showed: max |r| near 0.5 and ~5% of thousands of raw p-values < 0.05
    assert min(max_r) > 0.35 and min(raw_hits) > 50
    # with the null: that max |r| is what chance gives, and FDR finds (almost) nothing
    assert min(q95) > 0.35
    assert sum(p < 0.05 for p in p_max) <= 2
    assert sum(n_fdr) <= 2
    d0 = res.to_dict()
    assert d0["n_permutations"] == 200 and d0["null_max_abs_r_q95"] == pytest.approx(q95[-1])
    assert d0["n_significant_fdr"] == n_fdr[-1] and d0["p_max_abs_r"] == p_max[-1]


def test_a_planted_latent_is_found():
    n, d = 64, 3000
    g = np.random.default_rng(7)
    y = np.array([0, 1] * (n // 2))
    x = sparse_noise(n, d, seed=7)
    planted = 1234
    x[:, planted] = np.maximum(0.9 * y + g.normal(0, 0.5, n) + 0.3, 0)
    res = feature_correlations(torch.tensor(x), y, label_name="refused", seed=0)
    assert abs(res.pearson_r[planted]) > 0.55
    assert int(res.top(1)["latent"][0]) == planted
    assert res.p_max_abs_r < 0.01 and res.p_fwer[planted] < 0.01
    assert res.p_bh[planted] < 0.05 and res.n_significant >= 1
    assert res.max_abs_r > res.null_quantile(0.95)
    table = res.table(3)
    assert table.loc[0, "latent"] == planted and table.loc[0, "side"] == "positive"
    assert {"r", "p", "p_BH", "p_FWER (permutation)"} <= set(table.columns)
    assert all(not isinstance(v, (list, dict)) for v in table.to_numpy().ravel())


def test_bh_matches_the_step_up_rule():
    n, d = 40, 500
    g = np.random.default_rng(2)
    y = np.array([0, 1] * (n // 2))
    x = sparse_noise(n, d, seed=2)
    x[:, :25] += 1.5 * y[:, None] * g.uniform(0.3, 1.5, size=25)  # 25 real effects
    res = feature_correlations(torch.tensor(x), y, n_permutations=0)
    live = ~np.isnan(res.p_value)
    for alpha in (0.05, 0.2):
        want = bh_by_hand(res.p_value[live], alpha)
        got = np.nan_to_num(res.p_bh[live], nan=1.0) <= alpha
        np.testing.assert_array_equal(got, want)
    assert res.n_significant == int(bh_by_hand(res.p_value[live], 0.05).sum()) >= 10
    assert res.null_max_abs_r is None and res.p_max_abs_r is None
    with pytest.raises(ConfigError, match="n_permutations"):
        feature_correlations(torch.tensor(x), y, n_permutations=-1)


def test_group_respecting_permutations_keep_each_groups_labels():
    """With groups, the null permutes labels within groups of the same composition only."""
    y = np.array([1, 0] * 12)
    groups = np.repeat(np.arange(12), 2)  # minimal pairs: one of each label per group
    x = sparse_noise(24, 50, seed=4)
    res = feature_correlations(torch.tensor(x), y, groups=groups, n_permutations=30, seed=1)
    perms = permutation_matrix(y, 30, seed=1, groups=groups)
    assert all((p.reshape(12, 2).sum(1) == 1).all() for p in perms)
    np.testing.assert_allclose(res.null_max_abs_r, max_abs_r_null(x, perms), atol=1e-12)


def test_null_round_trips(tmp_path):
    y = np.array([0, 1] * 10)
    res = feature_correlations(torch.tensor(sparse_noise(20, 40, 0)), y, n_permutations=25)
    res.save(tmp_path / "c")
    back = load_result(tmp_path / "c")
    assert isinstance(back, FeatureCorrelations)
    np.testing.assert_array_equal(back.null_max_abs_r, res.null_max_abs_r)
    assert back.to_dict() == res.to_dict()
    assert back.figure("bars").layout.shapes  # the null's 95% line
