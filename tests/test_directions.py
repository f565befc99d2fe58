"""Directions: Procrustes against scipy and a planted rotation, statistics by hand, planted
introspection, EM-vs-refusal on a planted pair, and save/load through a real store."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from em_interp.activations.cache import ActivationStore
from em_interp.errors import ConfigError, DataError
from em_interp.representations.directions import (
    Direction,
    IntrospectionResult,
    cohens_d,
    introspection_scores,
    mean_difference,
    procrustes_align,
)
from em_interp.representations.em_refusal import EMvsRefusalResult, em_vs_refusal


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Procrustes


def test_procrustes_recovers_a_planted_rotation_with_n_below_d():
    d, n, k = 48, 16, 6
    g = _gen(0)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    # a rotation acting only inside a k-dim subspace T of the anchors' row space
    basis, _ = torch.linalg.qr(a.T @ torch.randn(n, k, generator=g, dtype=torch.float64))
    small = torch.tensor(ortho_group.rvs(k, random_state=3))
    q = torch.eye(d, dtype=torch.float64) + basis @ (small - torch.eye(k,
                                                                       dtype=torch.float64)) @ basis.T
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    res = procrustes_align(a, a @ q)
    assert res.n == n and res.d == d and res.rank == n
    r = res.matrix()
    # the data fix R only on span(anchors); the nearest-identity completion recovers Q exactly
    assert torch.allclose(r, q, atol=1e-10)
    assert res.residual < 1e-10 and res.relative_residual < 1e-12
    assert res.identity_relative_residual > 0.1
    assert res.left.shape[1] <= 2 * n  # never a d x d factor


def test_procrustes_matches_scipy_on_noisy_data():
    g = _gen(1)
    for n, d in [(12, 40), (60, 20)]:
        a = torch.randn(n, d, generator=g, dtype=torch.float64)
        q = torch.tensor(ortho_group.rvs(d, random_state=n))
        b = a @ q + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        r_sp, _ = orthogonal_procrustes(a.numpy(), b.numpy())
        for complement in ("nearest_identity", "zero"):
            res = procrustes_align(a, b, complement=complement)
            # R is not unique for n < d: compare the rotated data and the residual
            assert np.allclose(res.apply(a).numpy(), a.numpy() @ r_sp, atol=1e-10)
            assert res.residual == pytest.approx(np.linalg.norm(a.numpy() @ r_sp - b.numpy()),
                                                 rel=1e-10)
            assert res.relative_residual == pytest.approx(res.residual / float(b.norm()))
        full = procrustes_align(a, b).matrix()
        eye = torch.eye(d, dtype=torch.float64)
        assert torch.allclose(full @ full.T, eye, atol=1e-10)  # orthogonal
        if n >= d:
            assert np.allclose(full.numpy(), r_sp, atol=1e-10)  # unique: equal to scipy's
        else:  # the completion is the one closest to the identity
            assert float((full - eye).norm()) <= np.linalg.norm(r_sp - np.eye(d)) + 1e-9
            zero = procrustes_align(a, b, complement="zero").matrix()
            assert torch.linalg.matrix_rank(zero) == n  # a partial isometry
        # factored operations agree with the dense matrix
        x = torch.randn(3, d, generator=g, dtype=torch.float64)
        res = procrustes_align(a, b)
        assert torch.allclose(res.apply(x), x @ full, atol=1e-10)
        assert torch.allclose(res.apply_inverse(x), x @ full.T, atol=1e-10)
        assert torch.allclose(res.rotate(x[0]), x[0] @ full, atol=1e-10)
    with pytest.raises(DataError, match="same shape"):
        procrustes_align(torch.randn(3, 4), torch.randn(4, 4))


# ------------------------------------------------------------------ statistics


def test_cohens_d_and_ks_by_hand():
    x1 = np.array([1.0, 2.0, 3.0, 4.0])
    x0 = np.array([0.0, 1.0, 2.0])
    # means 2.5 and 1; variances 5/3 and 1; pooled (3 * 5/3 + 2 * 1) / 5 = 1.4
    assert cohens_d(x1, x0) == pytest.approx(1.5 / np.sqrt(1.4), rel=1e-12)
    # planted scores: the benign anchors are the same in both models (rank d, so R = I), the
    # base's risky rows differ from the benign mean only along e_0, so the scores are known
    benign = torch.tensor([[0.0, 1.0], [1.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
    base = torch.cat([torch.tensor([[5.0, 1 / 6]] * 4, dtype=torch.float64), benign])
    org = torch.cat([torch.tensor([[1.0, 7.0], [2.0, -3.0], [3.0, 0.0], [4.0, 2.0]],
                                  dtype=torch.float64), benign])
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    res = introspection_scores(base, org, labels)
    s = res.scores.double().numpy()
    s1, s0 = s[:4], s[4:]
    assert np.allclose(s, org[:, 0].numpy() - 1.0, atol=1e-6)  # zero point: benign mean, e_0
    grid = np.concatenate([s1, s0])
    sup = max(abs((s1 <= t).mean() - (s0 <= t).mean()) for t in grid)
    # risky [0, 1, 2, 3] vs benign [-1, 0, 1]: at t = 1, F1 = 1/2 and F0 = 1
    assert res.ks_statistic == pytest.approx(sup) == pytest.approx(0.5)
    assert res.ks_pvalue == pytest.approx(stats.ks_2samp(s1, s0).pvalue)
    assert res.cohens_d == pytest.approx(cohens_d(s1, s0))
    assert res.cohens_d == pytest.approx(cohens_d(x1 - 1.0, x0 - 1.0))  # the arrays above


# ------------------------------------------------------------------ introspection


def _planted_pair(n_per=80, d=32, shift=6.0, seed=0):
    """Base activations with a risky shift along r; the organism is the base rotated by Q."""
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    hb = torch.randn(2 * n_per, d, generator=g, dtype=torch.float64) @ mix + 2.0
    r = torch.randn(d, generator=g, dtype=torch.float64)
    r = r / r.norm()
    labels = torch.tensor([1] * n_per + [0] * n_per)
    hb[:n_per] += shift * r
    q = torch.tensor(ortho_group.rvs(d, random_state=seed))
    return hb.float(), (hb @ q).float(), labels, r, q


def test_planted_introspection_scores():
    hb, ho, labels, r, q = _planted_pair()
    res = introspection_scores(hb, ho, labels, hook="blocks.3.mlp.hook_post")
    aligned = (r @ q).float()
    assert float(res.direction @ aligned) > 0.99  # v R points along the rotated r
    assert res.procrustes["relative_residual"] < 1e-5  # n_benign > d: R = Q
    assert res.mean_benign == pytest.approx(0.0, abs=1e-4)  # the zero point, by construction
    assert res.mean_risky == pytest.approx(6.0, rel=0.1)
    assert res.cohens_d > 5 and res.ks_pvalue < 1e-20 and res.ks_statistic == 1.0
    assert res.evaluated_on == "all"
    # the metric: projection(direction, hook, center=zero_point) on [batch, pos, d] acts
    metric = res.metric()
    assert metric.hook == "blocks.3.mlp.hook_post"
    assert torch.allclose(metric(ho[:, None, :]), res.scores, atol=1e-4)
    # held-out prompts: fit on the first half of each class, summarise the rest
    fit = torch.tensor([i % 80 < 40 for i in range(160)])
    held = introspection_scores(hb, ho, labels, fit_mask=fit)
    assert held.evaluated_on == "held_out" and held.n_risky == 40 and held.n_benign == 40
    assert abs(held.mean_benign) < 0.3 and held.cohens_d > 5
    df = held.df
    assert list(df.columns) == ["prompt", "label", "label_name", "score", "fit"]
    fig = held.figure()
    assert len(fig.data) == 2 and "d =" in fig.layout.title.text


def test_introspection_through_stores_and_round_trip(tmp_path):
    hb, ho, labels, _, _ = _planted_pair(n_per=30, d=16)
    hook = "blocks.5.mlp.hook_post"
    sb = ActivationStore.from_tensors(tmp_path / "b", {hook: hb}, labels=labels.tolist())
    so = ActivationStore.from_tensors(tmp_path / "o", {hook: ho}, labels=labels.tolist())
    res = introspection_scores(sb, so, hook=hook)
    ref = introspection_scores(hb, ho, labels, hook=hook)
    assert torch.allclose(res.scores, ref.scores) and res.cohens_d == pytest.approx(ref.cohens_d)
    res.save(tmp_path / "r")
    back = IntrospectionResult.load(tmp_path / "r")
    assert torch.equal(back.scores, res.scores) and back.label_names == ("benign", "risky")
    assert back.to_dict() == res.to_dict()
    with pytest.raises(ConfigError, match="hook"):
        introspection_scores(sb, so)


# ------------------------------------------------------------------ mean difference / Direction


def test_mean_difference_forms_and_direction_round_trip(tmp_path):
    g = _gen(2)
    acts = torch.randn(20, 8, generator=g)
    labels = [1] * 8 + [0] * 12
    want = acts[:8].double().mean(0) - acts[8:].double().mean(0)
    two = mean_difference(acts[:8], acts[8:])
    by_label = mean_difference(acts, labels=labels)
    assert torch.allclose(two.vector.double(), want, atol=1e-6)
    assert torch.equal(two.vector, by_label.vector) and two.n_a == 8 and two.n_b == 12
    hook = "blocks.1.hook_resid_post"
    store = ActivationStore.from_tensors(tmp_path / "s", {hook: acts}, labels=labels,
                                         description={"name": "planted", "n": 20})
    d = mean_difference(store, hook=hook, name="refusal")
    assert torch.allclose(d.vector, two.vector)
    assert d.hook == hook and d.prompt_sets["a"]["name"] == "planted"
    assert d.prompt_sets["a"]["label"] == 1 and d.prompt_sets["b"]["label"] == 0
    d.save(tmp_path / "dir")
    back = Direction.load(tmp_path / "dir")
    assert torch.equal(back.vector, d.vector) and back.to_dict() == d.to_dict()
    assert back.cosine(d) == pytest.approx(1.0)
    assert torch.allclose(back.project(acts), acts @ (d.vector / d.vector.norm()), atol=1e-5)
    assert back.metric().hook == hook
    with pytest.raises(DataError, match="0/1"):
        mean_difference(acts, labels=[2] * 20)


# ------------------------------------------------------------------ EM vs refusal


def _planted_layers(n_layers=6, d=64, n_per=100, shift_from=3, shift=2.0, seed=0):
    g = _gen(seed)
    labels = torch.tensor([1] * n_per + [0] * n_per)
    base, org, true_r = [], [], []
    for _layer in range(n_layers):
        r = torch.randn(d, generator=g)
        r = r / r.norm()
        h = torch.randn(2 * n_per, d, generator=g) + 0.5
        h[:n_per] += 6.0 * r
        o = h + 0.3 * torch.randn(2 * n_per, d, generator=g)
        if _layer >= shift_from:
            o = o + shift * r
        base.append(h)
        org.append(o)
        true_r.append(r)
    return base, org, labels, true_r


def test_em_vs_refusal_on_a_planted_pair(tmp_path):
    base, org, labels, true_r = _planted_layers()
    res = em_vs_refusal(base, org, labels, n_null=400, seed=0, progress=False)
    assert res.layers == list(range(6))
    cos = res.cosine
    assert (cos[3:] > 0.9).all()  # at and after the shifted layer: about 1
    for layer in range(3):  # before it: inside the null bands
        assert res.random_lo[layer] <= cos[layer] <= res.random_hi[layer]
        assert res.shuffled_lo[layer] <= cos[layer] <= res.shuffled_hi[layer]
    assert (res.p_shuffled[3:] < 0.01).all()
    # the random band is the known distribution of cos with a uniform direction: +-1.96/sqrt(d)
    assert float(res.random_hi.mean()) == pytest.approx(1.96 / 64 ** 0.5, rel=0.2)
    # projections on the unit refusal direction, computed independently
    for layer in range(6):
        ref = base[layer][:100].double().mean(0) - base[layer][100:].double().mean(0)
        rhat = ref / ref.norm()
        assert torch.allclose(res.proj_base[layer], (base[layer].double() @ rhat).float(),
                              atol=1e-4)
        shift = float((org[layer].double() - base[layer].double()).mean(0) @ rhat)
        assert float((res.proj_organism - res.proj_base)[layer].mean()) == pytest.approx(
            shift, abs=1e-4)
        if layer >= 3:
            assert shift == pytest.approx(2.0 * float(true_r[layer].double() @ rhat), abs=0.1)
    df = res.df
    assert list(df["layer"]) == list(range(6)) and {"cosine", "shuffled_lo"} <= set(df.columns)
    proj = res.projections
    assert set(proj["model"]) == {"base", "organism"} and len(proj) == 2 * 6 * 200
    assert len(res.figure().data) == 5

    # the same numbers from a dict by hook name, a [layer, n, d] tensor, and two stores
    tmpl = "blocks.{layer}.hook_resid_post"
    by_hook = em_vs_refusal({tmpl.format(layer=i): b for i, b in enumerate(base)},
                            {tmpl.format(layer=i): o for i, o in enumerate(org)}, labels,
                            n_null=400, seed=0, progress=False)
    stacked = em_vs_refusal(torch.stack(base), torch.stack(org), labels, n_null=400, seed=0,
                            progress=False)
    sb = ActivationStore.from_tensors(tmp_path / "b", {tmpl.format(layer=i): b
                                                       for i, b in enumerate(base)},
                                      labels=labels.tolist())
    so = ActivationStore.from_tensors(tmp_path / "o", {tmpl.format(layer=i): o
                                                       for i, o in enumerate(org)},
                                      labels=labels.tolist())
    stores = em_vs_refusal(sb, so, hook_template=tmpl, n_null=400, seed=0, progress=False)
    for other in (by_hook, stacked, stores):
        assert torch.allclose(other.cosine, res.cosine, atol=1e-6)
        assert torch.allclose(other.shuffled_hi, res.shuffled_hi, atol=1e-6)
    assert stores.hooks[2] == "blocks.2.hook_resid_post"
    # a separate refusal set gives the same refusal direction
    sep = em_vs_refusal(base, org, refusal_base=base, refusal_labels=labels, n_null=50,
                        progress=False)
    assert torch.allclose(sep.cosine, res.cosine, atol=1e-6)
    d3 = res.direction(3, "refusal")
    assert isinstance(d3, Direction) and d3.cosine(true_r[3]) > 0.8
    res.save(tmp_path / "evr")
    back = EMvsRefusalResult.load(tmp_path / "evr")
    assert torch.equal(back.cosine, res.cosine)
    pd.testing.assert_frame_equal(back.df, res.df)


def test_em_vs_refusal_headline_is_corrected_across_layers():
    """Under the null (organism = base + noise, unrelated to the harmful/harmless labels), the
    per-layer shuffled p-values dip below 0.05 somewhere by chance across many layers, but the
    max-statistic p-values (the headline) stay above it; a planted alignment survives both."""
    g = torch.Generator().manual_seed(3)
    n, d, n_layers = 60, 24, 30
    labels = torch.tensor([1] * 30 + [0] * 30)
    base = [torch.randn(n, d, generator=g) for _ in range(n_layers)]
    org = [b + 0.3 * torch.randn(n, d, generator=g) for b in base]
    null = em_vs_refusal(base, org, labels, n_null=400, seed=1, progress=False)
    assert (null.p_shuffled_fwer >= null.p_shuffled - 1e-6).all()
    assert null.significant_layers() == []
    assert float(null.p_shuffled.min()) < 0.05  # uncorrected: a false positive at some layer
    # plant: at layer 7 the organism moves along the refusal direction of the base
    planted = [o.clone() for o in org]
    r = base[7][labels == 1].mean(0) - base[7][labels == 0].mean(0)
    planted[7] = base[7] + 2.0 * r / r.norm() + 0.05 * torch.randn(n, d, generator=g)
    res = em_vs_refusal(base, planted, labels, n_null=400, seed=1, progress=False)
    assert 7 in res.significant_layers()
    assert res.to_dict()["significant_layers"] == res.significant_layers()
    assert "p_shuffled_fwer" in res.df.columns


def test_em_vs_refusal_layers_the_fine_tune_left_unchanged_have_no_cosine():
    # a LoRA on the upper layers only: below them organism == base, the EM direction is zero
    base, org, labels, _ = _planted_layers()
    org = [b.clone() if layer < 3 else o for layer, (b, o) in enumerate(zip(base, org, strict=True))]
    res = em_vs_refusal(base, org, labels, n_null=100, seed=0, progress=False)
    d = res.to_dict()
    assert torch.isnan(res.cosine[:3]).all() and not torch.isnan(res.cosine[3:]).any()
    assert d["n_undefined"] == 3
    assert d["max_abs_cosine_layer"] in (3, 4, 5)
    assert d["max_abs_cosine"] == pytest.approx(float(res.cosine[3:].abs().max()))
    assert d["significant_layers"] == [3, 4, 5]
