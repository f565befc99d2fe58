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
from em_interp.representations.probing import ProbeResult, pca_figure, probe_layers, wilson_interval

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
    assert d["best_layer"] in (2, 5, 6) and d["best_accuracy"] >= 0.95
    assert d["mean_accuracy"] == pytest.approx(c["accuracy"].mean())
    assert "control" not in d


def test_accuracy_weights_and_controls_equal_a_direct_sklearn_fit(store):
    res = probe_layers(store, C=0.5, seed=3, progress=False)
    y = np.array(store.labels)
    idx = np.arange(N)
    train, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=3)
    assert set(np.flatnonzero(res.test_mask)) == set(test)
    y_rand = y[np.random.default_rng(3).permutation(N)]
    prev = None
    for i, layer in enumerate(range(L)):
        x = store.load(TEMPLATE.format(layer=layer)).numpy()
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000,
                                                                  random_state=3))
        pipe.fit(x[train], y[train])
        row = res.curve().loc[layer]
        assert row["accuracy"] == pytest.approx(pipe.score(x[test], y[test]), abs=1e-12)
        # weights in original units reproduce the pipeline's decision function
        w, b = res.weights[i].double().numpy(), float(res.intercepts[i])
        np.testing.assert_allclose(x[test].astype(np.float64) @ w + b,
                                   pipe.decision_function(x[test]), rtol=1e-4, atol=1e-4)
        if prev is not None:
            cos = w @ prev / np.linalg.norm(w) / np.linalg.norm(prev)
            assert row["persistence"] == pytest.approx(cos, abs=1e-5)
        prev = w
        rand = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000,
                                                                  random_state=3))
        rand.fit(x[train], y_rand[train])
        assert row["random_label_accuracy"] == pytest.approx(rand.score(x[test], y_rand[test]))
        ci = binomtest(round(row["accuracy"] * len(test)), len(test)).proportion_ci(
            method="wilson")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_fixed_split_from_a_mask_or_the_prompt_sets_split(tmp_path):
    tensors, y = planted({1})
    split = ["test" if i % 4 == 0 else "train" for i in range(N)]
    s = ActivationStore.from_tensors(tmp_path, tensors, labels=y, split=split)
    mask = np.array([x == "test" for x in split])
    by_mask = probe_layers(s, layers=[1, 3], test_mask=mask, progress=False)
    by_split = probe_layers(s, layers=[1, 3], test_mask="split", progress=False)
    assert np.array_equal(by_mask.test_mask, mask) and by_mask.meta["n_test"] == mask.sum()
    assert by_mask.df["accuracy"].tolist() == by_split.df["accuracy"].tolist()
    x = s.load(TEMPLATE.format(layer=1)).numpy()
    yy = np.array(y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    pipe.fit(x[~mask], yy[~mask])
    assert by_mask.curve().loc[1, "accuracy"] == pytest.approx(pipe.score(x[mask], yy[mask]))
    assert list(by_mask.layers) == [1, 3]
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
    assert res.to_dict()["control"]["best_layer"] in (0, 7)
    assert res.meta["control_store"]["path"] == str(control.path)
    res.save(tmp_path / "r")
    back = ProbeResult.load(tmp_path / "r")
    assert torch.equal(back.weights, res.weights) and back.layers == res.layers
    assert np.array_equal(back.test_mask, res.test_mask)
    np.testing.assert_allclose(back.df["accuracy"], res.df["accuracy"])
    fig = res.figure("accuracy")
    names = [t.name for t in fig.data]
    assert {"organism", "control", "organism, random labels", "control 95% CI"} <= set(names)
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
