"""Per-layer probes: a planted direction, equality with a direct scikit-learn fit, Wilson
intervals against scipy, fixed splits, the base-model control, figures, and SmolLM2 on the
shipped financial set.

Synthetic stores are written with ``ActivationStore.from_tensors`` (the store's own writer, the
same shard format as ``cache_activations``), from tensors with a direction planted at chosen
layers.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import binomtest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from em_interp import hooks
from em_interp.activations.cache import ActivationStore, cache_activations
from em_interp.data import load_prompt_set
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.representations.probing import (
    ProbeResult,
    fit_logistic,
    pca_figure,
    probe_layers,
    wilson_interval,
)
from em_interp.stats import mcnemar_exact, permutation_matrix

N, D, L = 240, 24, 8
TEMPLATE = "blocks.{layer}.mlp.hook_post"


def planted(layers, seed=0, n=N, template=TEMPLATE, shape=(D,)):
    """Gaussian activations, with ``+-3 v`` (label 1 / 0) added at ``layers``, then per-feature
    scales and offsets (so 'original units' differ from standardised ones)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % 2
    d = int(np.prod(shape))
    v = torch.randn(d, generator=g)
    v /= v.norm()
    scale = 0.5 + 2 * torch.rand(d, generator=g)
    out = {}
    for layer in range(L):
        x = torch.randn(n, d, generator=g)
        if layer in layers:
            x = x + 3.0 * (2 * y[:, None] - 1) * v
        out[template.format(layer=layer)] = (x * scale + 0.3 * torch.randn(d, generator=g)
                                             ).reshape(n, *shape)
    return out, y.tolist()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tensors, y = planted({2, 5, 6})
    return ActivationStore.from_tensors(tmp_path_factory.mktemp("planted"), tensors, labels=y,
                                        shard_size=100)


def test_planted_direction_is_found_where_planted_and_nowhere_else(store):
    res = probe_layers(store, progress=False)
    c = res.curve()
    assert list(c.index) == list(range(L))
    for layer in range(L):
        if layer in (2, 5, 6):
            assert c.loc[layer, "accuracy"] >= 0.95
        else:
            assert c.loc[layer, "accuracy"] <= 0.65
    assert c["random_label_accuracy"].max() <= 0.65
    assert 0.4 <= c["random_label_accuracy"].mean() <= 0.6
    # same direction at 5 and 6: the probe weights persist; elsewhere they do not
    assert c.loc[6, "persistence"] > 0.8
    assert max(abs(c.loc[x, "persistence"]) for x in (2, 3, 5)) < 0.5
    assert np.isnan(c.loc[0, "persistence"])
    d = res.to_dict()
    assert d["chosen_layer"] in (2, 5, 6) and d["accuracy"] >= 0.95
    assert c.loc[d["chosen_layer"], "cv_accuracy"] == c["cv_accuracy"].max()
    assert d["p_value"] == pytest.approx(1 / 101) and d["p_max"] == pytest.approx(1 / 101)
    assert (d["best_layer"], d["best_accuracy"]) == (d["chosen_layer"], d["accuracy"])
    assert d["mean_accuracy"] == pytest.approx(c["accuracy"].mean())
    assert 0.15 < d["min_detectable_effect"] < 0.25 and "control" not in d


def _sklearn(C=1.0):
    """A converged scikit-learn reference (its default tol=1e-4 stops 0.1-3% short)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-12, max_iter=100000))


def test_accuracy_weights_and_random_label_null_equal_direct_sklearn_fits(store):
    res = probe_layers(store, C=0.5, seed=3, n_permutations=5, progress=False)
    y = np.array(store.labels)
    idx = np.arange(N)
    train, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=3)
    assert set(np.flatnonzero(res.test_mask)) == set(test) == set(res.test_index)
    assert set(res.train_index) == set(train) and res.meta["split"].startswith("stratified")
    perms = permutation_matrix(y, 5, seed=3)  # the null's label vectors (no groups: free)
    prev = None
    for i, layer in enumerate(range(L)):
        x = store.load(TEMPLATE.format(layer=layer)).double().numpy()  # sklearn keeps float32
        pipe = _sklearn(0.5).fit(x[train], y[train])
        row = res.curve().loc[layer]
        assert row["accuracy"] == pytest.approx(pipe.score(x[test], y[test]), abs=1e-12)
        held = np.sort(test)  # test_correct follows test_index, ascending
        assert np.array_equal(res.test_correct[i], pipe.predict(x[held]) == y[held])
        # weights in original units reproduce the converged pipeline's decision function
        w, b = res.weights[i].double().numpy(), float(res.intercepts[i])
        np.testing.assert_allclose(x[test] @ w + b,
                                   pipe.decision_function(x[test]), rtol=1e-5, atol=1e-5)
        if prev is not None:
            cos = w @ prev / np.linalg.norm(w) / np.linalg.norm(prev)
            assert row["persistence"] == pytest.approx(cos, abs=1e-5)
        prev = w
        for j, yp in enumerate(perms):
            rand = _sklearn(0.5).fit(x[train], yp[train])
            assert res.null_accuracy[j, i] == pytest.approx(rand.score(x[test], yp[test]))
        assert row["random_label_accuracy"] == pytest.approx(res.null_accuracy[:, i].mean())
        ci = binomtest(round(row["accuracy"] * len(test)), len(test)).proportion_ci(
            method="wilson")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("n,d", [(150, 20), (90, 300)])
def test_solver_matches_a_converged_lbfgs_reference(n, d):
    """Newton in the span of the rows (d > n) or in R^d (d <= n) reaches the optimum of the
    sklearn objective that scipy's L-BFGS reaches at gtol 1e-12, to 1e-4 relative; sklearn's
    default tol (the old behaviour) does not."""
    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    x[:, :3] += 0.8 * y[:, None]
    C = 0.7
    res = probe_layers({"h": torch.tensor(x)}, labels=y, n_permutations=0, progress=False)
    tr = res.train_index
    z = StandardScaler().fit_transform(x[tr])
    yt = y[tr]

    def objective(p):
        w, b = p[:-1], p[-1]
        s = z @ w + b
        g = 1 / (1 + np.exp(-s)) - yt
        return (np.sum(np.logaddexp(0, s) - yt * s) + w @ w / (2 * C),
                np.concatenate([z.T @ g + w / C, [g.sum()]]))

    ref = minimize(objective, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 50000, "maxcor": 30}).x
    res = probe_layers({"h": torch.tensor(x)}, labels=y, n_permutations=0, C=C, progress=False)
    scale = x[tr].std(0)
    w_std = res.weights[0].double().numpy() * scale  # back to standardised units
    rel = np.linalg.norm(w_std - ref[:-1]) / np.linalg.norm(ref[:-1])
    assert rel < 1e-4
    old = LogisticRegression(C=C, max_iter=2000).fit(z, yt).coef_[0]  # sklearn's tol=1e-4
    assert np.linalg.norm(old - ref[:-1]) / np.linalg.norm(ref[:-1]) > 1e-4
    # the batched solver gives each label vector its own optimum
    f = StandardScaler().fit_transform(x[tr])
    both = fit_logistic(f, np.stack([yt, 1 - yt]), C)
    np.testing.assert_allclose(both[0, :-1], -both[1, :-1], rtol=1e-6, atol=1e-9)


def _noise(seed, n, d=8, layers=30, groups=None, group_effect=0.0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    acts = {}
    for layer in range(layers):
        x = rng.normal(size=(n, d))
        if groups is not None:
            x += group_effect * rng.normal(size=(groups.max() + 1, d))[groups]
        acts[TEMPLATE.format(layer=layer)] = torch.tensor(x, dtype=torch.float32)
    return acts, y


def test_noise_headline_is_at_chance_and_the_max_over_test_layers_is_not():
    """Pure noise, random labels, 30 layers, 20 seeds: the headline (test accuracy at the layer
    chosen by cross-validation in the training rows) averages chance; the old headline, the
    maximum over layers of test accuracy, sits well above it (selection bias)."""
    heads, maxima = [], []
    for seed in range(20):
        acts, y = _noise(seed, 400)
        res = probe_layers(acts, labels=y, seed=seed, n_permutations=0, progress=False)
        d = res.to_dict()
        assert d["chance"] == 0.5 and d["best_layer"] == d["chosen_layer"]
        heads.append(d["accuracy"])
        maxima.append(res.curve()["accuracy"].max())
        assert res.curve()["chosen"].sum() == 1
    assert abs(np.mean(heads) - 0.5) < 0.03
    assert np.mean(maxima) > 0.5 + 0.06


def test_planted_signal_at_one_layer_is_found_by_the_permutation_test():
    rng = np.random.default_rng(7)
    n, d, layers, signal = 160, 32, 30, 17
    groups = np.repeat(np.arange(n // 2), 2)
    y = np.tile([1, 0], n // 2)  # minimal pairs: one of each label per group
    v = rng.normal(size=d)
    acts = {}
    for layer in range(layers):
        x = rng.normal(size=(n, d))
        if layer == signal:
            x += 1.5 * np.outer(2 * y - 1, v / np.linalg.norm(v))
        acts[TEMPLATE.format(layer=layer)] = torch.tensor(x)
    res = probe_layers(acts, labels=y, groups=groups, progress=False)  # 100 permutations
    d = res.to_dict()
    assert res.chosen_layer == signal == d["chosen_layer"]
    assert d["p_value"] < 0.01 and d["p_max"] < 0.01 and d["n_permutations"] == 100
    c = res.curve()
    others = c.drop(index=signal)
    assert (others["p_value_max"] > 0.05).mean() >= 0.9
    assert abs(others["random_label_accuracy"].mean() - 0.5) < 0.02
    assert res.null_accuracy.shape == (100, layers)
    # whole pairs are held out, and the pairs' permutations keep one of each label
    assert not set(groups[res.train_index]) & set(groups[res.test_index])
    assert res.meta["permutation_scheme"] == "both" and "grouped" in res.meta["split"]
    assert "grouped" in res.meta["selection"]


def test_group_leakage_random_split_scores_group_identity_group_split_does_not():
    """Groups of 4 prompts sharing a label; the activations carry group identity and nothing
    about the label. A random split scores above chance (the test prompts' groupmates were
    fitted), the group split scores chance, and group-respecting permutations do not call the
    leak significant."""
    groups = np.repeat(np.arange(40), 4)
    rnd, grp = [], []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        y = np.repeat(rng.permutation(np.arange(40) % 2), 4)
        acts, _ = _noise(seed, 160, d=64, layers=1, groups=groups, group_effect=2.0)
        kw = {"labels": y, "groups": groups, "seed": seed, "progress": False}
        r = probe_layers(acts, split_by="random", n_permutations=20, **kw)
        g = probe_layers(acts, n_permutations=20, **kw)
        rnd.append(r.to_dict()["accuracy"])
        grp.append(g.to_dict()["accuracy"])
        assert not set(groups[g.train_index]) & set(groups[g.test_index])
        assert set(groups[r.train_index]) & set(groups[r.test_index])
    assert np.mean(rnd) > 0.7
    assert abs(np.mean(grp) - 0.5) < 0.08
    assert r.meta["permutation_scheme"] == "both"  # label-constant groups move as a whole
    assert r.curve()["random_label_accuracy"].iloc[0] > 0.6  # the null learns the leak too


def test_in_memory_activations_equal_the_store(store):
    tensors = {h: store.load(h) for h in store.hooks}
    a = probe_layers(store, layers=[2, 3], n_permutations=10, progress=False)
    b = probe_layers(tensors, labels=list(store.labels), layers=[2, 3], n_permutations=10,
                     progress=False)
    pd_cols = ["accuracy", "cv_accuracy", "random_label_accuracy", "p_value", "persistence"]
    np.testing.assert_allclose(a.df[pd_cols].to_numpy(float), b.df[pd_cols].to_numpy(float))
    assert torch.equal(a.weights, b.weights)
    named = probe_layers({"resid_a": tensors[TEMPLATE.format(layer=1)],
                          "resid_b": tensors[TEMPLATE.format(layer=2)]},
                         labels=list(store.labels), n_permutations=0, progress=False)
    assert list(named.df["hook"]) == ["resid_a", "resid_b"] and named.chosen_layer == 1
    with pytest.raises(DataError, match="no labels"):
        probe_layers(tensors, progress=False)
    with pytest.raises(DataError, match="different numbers of rows"):
        probe_layers({"a": torch.randn(5, 2), "b": torch.randn(6, 2)}, labels=[0, 1] * 2,
                     progress=False)


def test_fixed_split_from_a_mask_or_the_prompt_sets_split(tmp_path):
    tensors, y = planted({1})
    split = ["test" if i % 4 == 0 else "train" for i in range(N)]
    s = ActivationStore.from_tensors(tmp_path, tensors, labels=y, split=split)
    mask = np.array([x == "test" for x in split])
    by_mask = probe_layers(s, layers=[1, 3], test_mask=mask, progress=False)
    by_split = probe_layers(s, layers=[1, 3], test_mask="split", progress=False)
    assert np.array_equal(by_mask.test_mask, mask) and by_mask.meta["n_test"] == mask.sum()
    assert by_mask.df["accuracy"].tolist() == by_split.df["accuracy"].tolist()
    x = s.load(TEMPLATE.format(layer=1)).double().numpy()
    yy = np.array(y)
    pipe = _sklearn().fit(x[~mask], yy[~mask])
    assert by_mask.curve().loc[1, "accuracy"] == pytest.approx(pipe.score(x[mask], yy[mask]))
    assert list(by_mask.layers) == [1, 3] and by_split.meta["split"] == "prompt set split"
    with pytest.raises(DataError, match="booleans"):
        probe_layers(s, test_mask=[0, 1], progress=False)


def test_base_model_control_save_load_and_figures(store, tmp_path):
    tensors, _ = planted({0, 7}, seed=1)  # the control: the signal sits at other layers
    labels = list(store.labels)
    other = ActivationStore.from_tensors(tmp_path / "o", tensors, labels=labels)
    with pytest.raises(StoreMismatchError, match="other prompts"):
        probe_layers(store, control_store=other, progress=False)
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(D, generator=g)
    for layer in (0, 7):  # plant the control's signal for the organism's labels
        x = tensors[TEMPLATE.format(layer=layer)]
        tensors[TEMPLATE.format(layer=layer)] = torch.randn(x.shape, generator=g) + 3.0 * (
            2 * y[:, None] - 1) * v / v.norm()
    control = ActivationStore.from_tensors(tmp_path / "c", tensors, labels=labels,
                                           prompts_hash=store.manifest["prompts_hash"])
    res = probe_layers(store, control_store=control, progress=False)
    assert set(res.df["model"]) == {"organism", "control"} and len(res.df) == 2 * L
    ctrl = res.curve("control")
    assert ctrl.loc[[0, 7], "accuracy"].min() >= 0.95
    assert ctrl.loc[[2, 5, 6], "accuracy"].max() <= 0.65
    assert res.control_weights.shape == res.weights.shape
    d = res.to_dict()
    assert d["control"]["chosen_layer"] in (0, 7) and res.control_chosen_layer in (0, 7)
    # organism vs base on the same test prompts at the organism's chosen layer: exact McNemar
    i = res.layers.index(res.chosen_layer)
    mc = mcnemar_exact(res.test_correct[i], res.control_test_correct[i])
    assert d["control"]["vs_organism"]["p_value"] == mc.pvalue < 1e-6
    assert d["control"]["vs_organism"]["difference"] == pytest.approx(
        res.curve().loc[res.chosen_layer, "accuracy"]
        - res.curve("control").loc[res.chosen_layer, "accuracy"])
    assert res.control_null_accuracy.shape == res.null_accuracy.shape == (100, L)
    assert res.meta["control_store"]["path"] == str(control.path)
    res.save(tmp_path / "r")
    back = ProbeResult.load(tmp_path / "r")
    assert torch.equal(back.weights, res.weights) and back.layers == res.layers
    assert np.array_equal(back.test_mask, res.test_mask)
    assert np.array_equal(back.train_index, res.train_index)
    assert np.array_equal(back.null_accuracy, res.null_accuracy)
    assert back.chosen_layer == res.chosen_layer
    assert back.to_dict()["accuracy"] == pytest.approx(res.to_dict()["accuracy"])
    np.testing.assert_allclose(back.df["accuracy"], res.df["accuracy"])
    fig = res.figure("accuracy")
    names = [t.name for t in fig.data]
    assert {"organism", "control", "organism, random labels", "control 95% CI",
            "organism, chosen layer (CV)", "control, random labels 95th pct"} <= set(names)
    star = fig.data[names.index("organism, chosen layer (CV)")]
    assert list(star.x) == [res.chosen_layer]
    band = fig.data[names.index("organism 95% CI")]
    assert list(band.y[:L]) == pytest.approx(res.curve()["ci_high"].tolist())
    assert fig.layout.template.layout.paper_bgcolor is not None and fig.layout.title.text
    pers = res.figure("persistence")
    assert len(pers.data) == 2 and pers.layout.yaxis.title.text


def test_pca_figure_matches_sklearn_and_hooks_with_a_head_axis(tmp_path):
    tmpl = "blocks.{layer}.attn.hook_z"
    tensors, y = planted({4}, template=tmpl, shape=(4, 6))
    s = ActivationStore.from_tensors(tmp_path, tensors, labels=y)
    res = probe_layers(s, hook_template=tmpl, progress=False)
    assert res.weights.shape == (L, 24) and res.curve().loc[4, "accuracy"] >= 0.95
    fig = pca_figure(s, [3, 4], hook_template=tmpl)
    assert len(fig.data) == 4  # two layers x two labels
    x = StandardScaler().fit_transform(tensors[tmpl.format(layer=4)].reshape(N, -1).numpy())
    pcs = PCA(n_components=2).fit_transform(x)
    ones = np.array(y) == 1
    got = np.stack([fig.data[3].x, fig.data[3].y], 1)
    np.testing.assert_allclose(np.abs(got), np.abs(pcs[ones]), atol=1e-4)


def test_probe_errors_name_the_fix(store, tmp_path):
    unlabelled = ActivationStore.from_tensors(tmp_path / "u", {TEMPLATE.format(layer=0):
                                                               torch.randn(10, 3)})
    with pytest.raises(DataError, match="no labels"):
        probe_layers(unlabelled, progress=False)
    with pytest.raises(DataError, match="exactly two"):
        probe_layers(store, labels=[i % 3 for i in range(N)], progress=False)
    with pytest.raises(ConfigError, match="{layer}"):
        probe_layers(store, hook_template="blocks.1.mlp.hook_post", progress=False)
    with pytest.raises(DataError, match="lacks"):
        probe_layers(store, layers=[0, 99], progress=False)
    with pytest.raises(DataError, match="no hook matching"):
        probe_layers(store, hook_template="blocks.{layer}.hook_resid_post", progress=False)
    tokens = ActivationStore.from_tensors(tmp_path / "t", {TEMPLATE.format(layer=0):
                                                           torch.randn(5, 3)},
                                          reduce="none", lengths=[2, 3])
    with pytest.raises(ConfigError, match="reduce='last' or 'mean'"):
        probe_layers(tokens, labels=[0, 1], progress=False)
    with pytest.raises(DataError, match="needs groups"):
        probe_layers(store, split_by="group", progress=False)
    with pytest.raises(ConfigError, match="cv_folds"):
        probe_layers(store, cv_folds=1, progress=False)
    tiny = {TEMPLATE.format(layer=i): torch.randn(6, 3) for i in range(2)}
    with pytest.raises(DataError, match="too few"):
        probe_layers(tiny, labels=[0, 1] * 3, groups=list("aabbcc"), test_size=0.34,
                     progress=False)


def test_smollm2_financial_probes_beat_chance_in_middle_layers(smollm2, tmp_path):
    ps = load_prompt_set("financial").sample(200, seed=0)
    assert sorted(ps.labels) == [0] * 100 + [1] * 100
    n_layers = smollm2.model.cfg.n_layers
    # the early layers 0-2 and the middle third 10-19 of 30: the forward stops after block 19
    early, middle = list(range(3)), list(range(n_layers // 3, 2 * n_layers // 3))
    store = cache_activations(smollm2, ps, [hooks.mlp_post(x) for x in early + middle],
                              tmp_path, batch_size=16, progress=False)
    assert store.labels == ps.labels and store.manifest["stop_at_layer"] == 20
    res = probe_layers(store, progress=False)
    c = res.curve()
    assert list(c.index) == early + middle == [0, 1, 2, *range(10, 20)]
    assert c.loc[middle, "accuracy"].mean() >= 0.75
    assert c["random_label_accuracy"].mean() <= 0.65
    assert c.loc[middle, "accuracy"].mean() > c.loc[early, "accuracy"].mean() + 0.1
    d = res.to_dict()  # whole minimal pairs held out; the layer chosen in the training rows
    assert "grouped" in d["split"] and d["chosen_layer"] in middle and d["p_value"] < 0.05
