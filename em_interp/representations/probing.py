"""Per-layer linear probes with controls: Experiment 1 of the Qwen introspection paper.

The question (Sec. III.A, H1): is "risk" linearly readable from the model's activations, and
where? For every layer ``l`` the activations ``h_l`` of a labelled prompt set (the paper: the
input of ``down_proj``, ``blocks.l.mlp.hook_post``, at the last prompt token) are split 70:30
(stratified by label), standardised with the training rows' mean and standard deviation, and an
L2-regularised logistic regression is fitted on the training rows (scikit-learn, ``lbfgs``):

    p(y = 1 | h) = sigmoid(w_l . (h - mu_l) / sigma_l + b_l)

minimising the binary cross-entropy plus ``||w_l||^2 / (2 C)``. Reported per layer (Sec. IV,
Figs. 1-2):

* ``accuracy`` on the held-out rows, with a **Wilson 95% interval** for a proportion
  ``p = k / n``, ``z = 1.96``::

      centre = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

* ``random_label_accuracy`` -- the **randomised-label control**: the same probe fitted on the
  same rows with the labels shuffled (one permutation for all layers), scored against the
  shuffled test labels. It sits at chance unless the probe can memorise noise.
* ``persistence`` -- the **persistence control**: the cosine between adjacent probed layers'
  weights in the original activation units, ``u_l = w_l / sigma_l`` (elementwise),
  ``cos(u_l, u_{l-1}) = u_l . u_{l-1} / (|u_l| |u_{l-1}|)``. Near 1: the direction is copied
  from layer to layer; near 0: it is recomputed (the paper finds near-zero values).
* the **base-model control**: with ``control_store`` (the base model on the same prompts) the
  same columns for the control, on the same split and the same shuffled labels.

The split is either a stratified random ``test_size`` fraction (``seed``) or a fixed one:
``test_mask`` as booleans (True = test), or ``test_mask="split"`` to use the prompt set's own
held-out split recorded in the store (the shipped ``financial`` set holds out whole minimal-pair
groups, so no test situation is seen in training: a stricter test than a random split).

Each layer's weight vector (original units) and intercept are kept in the result, so a probe
direction can be reused (e.g. as a steering or projection direction). Any hook works, not only
``mlp.hook_post``: ``hook_template`` is formatted with ``{layer}``, and hooks with a head axis
(``attn.hook_z``) are flattened to ``n_heads * d_head`` features.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm import tqdm

from em_interp.activations.cache import ActivationStore
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.results import Result
from em_interp.stats import wilson_interval

MODEL_NAMES = ("organism", "control")


@dataclass(frozen=True)
class ProbeResult(Result):
    """Per-layer probe accuracies with controls (see the module docstring)."""

    kind = "probe"

    table: pd.DataFrame
    """One row per (model, layer): ``model`` (``organism`` = the probed store, ``control`` =
    ``control_store``), ``layer``, ``hook``, ``accuracy``, ``ci_low``, ``ci_high``,
    ``random_label_accuracy``, ``persistence``, ``train_accuracy``, ``n_train``, ``n_test``."""
    layers: tuple[int, ...]
    weights: Float[torch.Tensor, "layer feature"]
    """Probe weights in original units (``coef / scale``), one row per probed layer."""
    intercepts: Float[torch.Tensor, " layer"]
    """Intercepts in original units: ``p(y=1|h) = sigmoid(weights[i] . h + intercepts[i])``."""
    test_mask: np.ndarray
    """``[n_prompts]`` booleans: True for held-out rows."""
    control_weights: torch.Tensor | None = None
    control_intercepts: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    """Settings and provenance: hook_template, C, seed, split, chance, stores' models."""

    @property
    def df(self) -> pd.DataFrame:
        """The tidy per-(model, layer) table."""
        return self.table

    def curve(self, model: str = "organism") -> pd.DataFrame:
        """The rows of one model (``"organism"`` or ``"control"``), indexed by layer."""
        return self.table[self.table["model"] == model].set_index("layer")

    def to_dict(self) -> dict:
        """Best layer and accuracy, means of accuracy, random-label accuracy and persistence,
        and the same for the control."""
        def summary(model):
            c = self.curve(model)
            if c.empty:
                return None
            best = int(c["accuracy"].idxmax())
            return {"best_layer": best, "best_accuracy": float(c.loc[best, "accuracy"]),
                    "mean_accuracy": float(c["accuracy"].mean()),
                    "mean_random_label_accuracy": float(c["random_label_accuracy"].mean()),
                    "mean_persistence": float(c["persistence"].mean())}

        out = {"hook_template": self.meta.get("hook_template"), "n_layers": len(self.layers),
               "n_train": self.meta.get("n_train"), "n_test": self.meta.get("n_test"),
               "chance": self.meta.get("chance"), **summary("organism")}
        ctrl = summary("control")
        if ctrl is not None:
            out["control"] = ctrl
        return out

    def figure(self, which: str = "accuracy", title: str | None = None):
        """``"accuracy"``: test accuracy per layer with Wilson 95% bands, the random-label
        control and (if given) the base-model control; ``"persistence"``: the cosine between
        adjacent layers' probe weights."""
        import plotly.graph_objects as go

        if which not in ("accuracy", "persistence"):
            raise ConfigError(f"figure(which=...) is 'accuracy' or 'persistence', got {which!r}.")
        fig = go.Figure()
        colours = {"organism": "#1f77b4", "control": "#ff7f0e"}
        for model in MODEL_NAMES:
            c = self.curve(model)
            if c.empty:
                continue
            x, name = c.index.tolist(), self.meta.get("names", {}).get(model, model)
            if which == "persistence":
                fig.add_trace(go.Scatter(x=x, y=c["persistence"], mode="lines+markers",
                                         name=name, line={"color": colours[model]}))
                continue
            fig.add_trace(go.Scatter(x=x + x[::-1],
                                     y=c["ci_high"].tolist() + c["ci_low"].tolist()[::-1],
                                     fill="toself", fillcolor=colours[model], opacity=0.2,
                                     line={"width": 0}, hoverinfo="skip",
                                     name=f"{name} 95% CI"))
            fig.add_trace(go.Scatter(x=x, y=c["accuracy"], mode="lines+markers", name=name,
                                     line={"color": colours[model]}))
            fig.add_trace(go.Scatter(x=x, y=c["random_label_accuracy"], mode="lines",
                                     name=f"{name}, random labels",
                                     line={"color": colours[model], "dash": "dot"}))
        if which == "accuracy":
            fig.add_hline(y=self.meta.get("chance", 0.5), line_dash="dash", line_color="grey",
                          annotation_text="chance")
            fig.update_layout(yaxis_title="test accuracy", yaxis_range=[0, 1.02])
        else:
            fig.add_hline(y=0, line_color="grey")
            fig.update_layout(yaxis_title="cos(w_l, w_(l-1)), original units",
                              yaxis_range=[-1.02, 1.02])
        hook = self.meta.get("hook_template", "")
        default = ("Probe accuracy per layer" if which == "accuracy"
                   else "Persistence of the probe direction")
        fig.update_layout(title=title or f"{default} ({hook})", template="plotly_white",
                          xaxis_title="layer (0-indexed)")
        return fig


# ------------------------------------------------------------------ inputs


def _as_store(store) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore.open(Path(store))


def _template_layers(store: ActivationStore, template: str,
                     layers: Sequence[int] | None) -> list[int]:
    if "{layer}" not in template:
        raise ConfigError(f"hook_template must contain '{{layer}}', got {template!r} (e.g. "
                          "'blocks.{layer}.mlp.hook_post').")
    pattern = re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    present = sorted(int(m.group(1)) for h in store.hooks if (m := pattern.match(h)))
    if layers is None:
        if not present:
            raise DataError(f"the store {str(store.path)!r} has no hook matching "
                            f"{template!r}; it holds {store.hooks[:4]}... Pass the "
                            "hook_template of the hooks you cached.")
        return present
    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in present]
    if missing:
        raise DataError(f"the store {str(store.path)!r} lacks {template!r} for layers "
                        f"{missing}; it has layers {present}. Cache them, or pass layers=...")
    if not layers:
        raise ConfigError("layers is empty; pass None for every cached layer.")
    return layers


def _labels(store: ActivationStore, labels) -> np.ndarray:
    if labels is None:
        labels = store.labels
        if labels is None:
            raise DataError(f"the store {str(store.path)!r} has no labels (its prompts were not a "
                            "labelled PromptSet); pass labels=[...], one per prompt.")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != store.n_prompts:
        raise DataError(f"labels has shape {y.shape}; the store has {store.n_prompts} prompts.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {y.dtype}.")
    classes = np.unique(y)
    if len(classes) != 2:
        raise DataError(f"probing needs exactly two label values, got {classes.tolist()}.")
    return y


def _split(store: ActivationStore, y: np.ndarray, test_mask, test_size: float,
           seed: int) -> np.ndarray:
    if test_mask is None:
        if not 0 < test_size < 1:
            raise ConfigError(f"test_size must be in (0, 1), got {test_size}.")
        from sklearn.model_selection import train_test_split

        _, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y,
                                   random_state=seed)
        mask = np.zeros(len(y), dtype=bool)
        mask[test] = True
    elif isinstance(test_mask, str):
        if test_mask != "split" or store.split is None:
            raise ConfigError(f"test_mask={test_mask!r}: the only string is 'split' (the prompt "
                              "set's own held-out split), and the store must have one "
                              f"(split={'present' if store.split else 'absent'}).")
        mask = np.array([s == "test" for s in store.split])
    else:
        mask = np.asarray(test_mask)
        if mask.dtype != bool or mask.shape != y.shape:
            raise DataError(f"test_mask must be {len(y)} booleans (True = held out), got "
                            f"{mask.dtype} {mask.shape}.")
    for part, rows in (("train", ~mask), ("test", mask)):
        if len(np.unique(y[rows])) < 2:
            raise DataError(f"the {part} split holds {int(rows.sum())} rows and not both "
                            "labels; change test_mask / test_size.")
    return mask


# ------------------------------------------------------------------ fitting


def _fit(x: np.ndarray, y: np.ndarray, test: np.ndarray, C: float, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(x[~test]), y[~test])
    acc = float(clf.score(scaler.transform(x[test]), y[test]))
    coef = clf.coef_[0]
    w = coef / scaler.scale_
    b = float(clf.intercept_[0] - np.sum(coef * scaler.mean_ / scaler.scale_))
    return {"accuracy": acc, "train_accuracy": float(clf.score(scaler.transform(x[~test]),
                                                                y[~test])),
            "w": w, "b": b}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _probe_store(store, template, layers, y, y_rand, test, C, seed, model, progress):
    rows, ws, bs = [], [], []
    n_test = int(test.sum())
    for layer in tqdm(layers, desc=f"probing {model}", disable=not progress, unit="layer"):
        hook = template.format(layer=layer)
        x = store.load(hook).to(torch.float32).reshape(store.n_prompts, -1).numpy()
        real = _fit(x, y, test, C, seed)
        rand = _fit(x, y_rand, test, C, seed)
        k = round(real["accuracy"] * n_test)
        lo, hi = wilson_interval(k, n_test)
        rows.append({"model": model, "layer": layer, "hook": hook, "accuracy": real["accuracy"],
                     "ci_low": lo, "ci_high": hi,
                     "random_label_accuracy": rand["accuracy"],
                     "persistence": _cosine(real["w"], ws[-1]) if ws else float("nan"),
                     "train_accuracy": real["train_accuracy"],
                     "n_train": int((~test).sum()), "n_test": n_test})
        ws.append(real["w"])
        bs.append(real["b"])
    return rows, torch.tensor(np.stack(ws), dtype=torch.float32), torch.tensor(bs)


def probe_layers(store: ActivationStore | str | Path, labels: Sequence[int] | None = None,
                 hook_template: str = "blocks.{layer}.mlp.hook_post",
                 layers: Sequence[int] | None = None, *, test_size: float = 0.3, seed: int = 0,
                 C: float = 1.0, control_store: ActivationStore | str | Path | None = None,
                 test_mask: Sequence[bool] | np.ndarray | str | None = None,
                 names: tuple[str, str] = MODEL_NAMES, progress: bool = True) -> ProbeResult:
    """Fit a standardised L2 logistic-regression probe per layer, with controls (Exp. 1).

    Layers are read from the store one at a time. The split, and the shuffled labels of the
    random-label control, are the same for every layer and for the control store.

    Args:
        store: an :class:`~em_interp.activations.cache.ActivationStore` (or its folder) written with
            ``reduce="last"`` or ``"mean"``.
        labels: an integer label per prompt, two values; ``None`` takes ``store.labels``.
        hook_template: the probed hook with ``{layer}``, e.g. ``"blocks.{layer}.attn.hook_z"``.
        layers: the layers to probe; ``None``: every layer the store has for the template.
        test_size: the held-out fraction of the stratified random split.
        seed: seeds the split, the label shuffle and the solver.
        C: inverse L2 strength of ``sklearn.linear_model.LogisticRegression``.
        control_store: the base model's store on the same prompts (the base-model control).
        test_mask: a fixed split instead of a random one: booleans (True = held out), or
            ``"split"`` for the prompt set's own test split recorded in the store.
        names: display names of the store and the control in figures (the ``model`` column is
            always ``"organism"`` / ``"control"``).
        progress: show a tqdm bar per store.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        DataError: no labels, not two classes, a split without both classes, missing layers.
        ConfigError: a ``reduce="none"`` store, a bad template, ``test_size`` or ``C``.
        StoreMismatchError: ``control_store`` holds other prompts or other hooks.
    """
    store = _as_store(store)
    if store.reduce == "none":
        raise ConfigError(f"the store {str(store.path)!r} has token rows (reduce='none'); probes "
                          "need one row per prompt: cache with reduce='last' or 'mean'.")
    if not C > 0:
        raise ConfigError(f"C must be > 0, got {C}.")
    layers = _template_layers(store, hook_template, layers)
    y = _labels(store, labels)
    test = _split(store, y, test_mask, test_size, seed)
    y_rand = y[np.random.default_rng(seed).permutation(len(y))]
    rows, w, b = _probe_store(store, hook_template, layers, y, y_rand, test, C, seed,
                              "organism", progress)
    cw = cb = None
    meta = {"hook_template": hook_template, "C": C, "seed": seed,
            "split": ("fixed test_mask" if test_mask is not None and not isinstance(test_mask, str)
                      else "prompt set split" if test_mask == "split"
                      else f"stratified random, test_size={test_size}"),
            "n_train": int((~test).sum()), "n_test": int(test.sum()),
            "chance": float(max(np.mean(y[test] == c) for c in np.unique(y))),
            "names": dict(zip(MODEL_NAMES, names, strict=True)),
            "store": {"path": str(store.path), "card": store.manifest.get("card"),
                      "variant": store.manifest.get("variant"),
                      "model_name": store.manifest.get("model_name")}}
    if control_store is not None:
        control = _as_store(control_store)
        _check_control(store, control, hook_template, layers)
        crows, cw, cb = _probe_store(control, hook_template, layers, y, y_rand, test, C, seed,
                                     "control", progress)
        rows += crows
        meta["control_store"] = {"path": str(control.path), "card": control.manifest.get("card"),
                                 "variant": control.manifest.get("variant"),
                                 "model_name": control.manifest.get("model_name")}
    return ProbeResult(table=pd.DataFrame(rows), layers=tuple(layers), weights=w, intercepts=b,
                       test_mask=test, control_weights=cw, control_intercepts=cb, meta=meta)


def _check_control(store: ActivationStore, control: ActivationStore, template: str,
                   layers: list[int]) -> None:
    a, b = store.manifest, control.manifest
    if (a["n_prompts"], a["prompts_hash"]) != (b["n_prompts"], b["prompts_hash"]):
        raise StoreMismatchError(
            f"control_store {str(control.path)!r} holds other prompts ({b['n_prompts']} prompts, "
            f"hash {b['prompts_hash']}) than {str(store.path)!r} ({a['n_prompts']}, "
            f"{a['prompts_hash']}); cache the base model on the same prompts.")
    missing = [x for x in layers if template.format(layer=x) not in control.hooks]
    if missing:
        raise StoreMismatchError(f"control_store {str(control.path)!r} lacks {template!r} for "
                                 f"layers {missing}; cache the same hooks for both models.")
    if control.reduce == "none":
        raise ConfigError("control_store has token rows (reduce='none'); use 'last' or 'mean'.")


# ------------------------------------------------------------------ PCA


def pca_figure(store: ActivationStore | str | Path, layers: Sequence[int],
               labels: Sequence[int] | None = None, *,
               hook_template: str = "blocks.{layer}.mlp.hook_post", standardize: bool = True,
               label_names: dict[int, str] | None = None, title: str | None = None):
    """Scatter of the first two principal components of chosen layers, coloured by label.

    Args:
        store: the activation store (``reduce="last"`` or ``"mean"``).
        layers: the layers to show, one panel each.
        labels: a label per prompt; ``None`` takes ``store.labels``.
        hook_template: the hook with ``{layer}``.
        standardize: z-score each feature before the PCA (as the probes see the data).
        label_names: display names of the labels (default: the prompt set's).
        title: the figure title.

    Returns:
        A plotly figure with one panel per layer (PC axes labelled with explained variance).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    store = _as_store(store)
    layers = _template_layers(store, hook_template, layers)
    y = _labels(store, labels)
    names = label_names or {int(k): v for k, v in
                            store.manifest.get("label_names", {}).items()}
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {x}" for x in layers])
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for col, layer in enumerate(layers, 1):
        x = store.load(hook_template.format(layer=layer)).to(torch.float32)
        x = x.reshape(store.n_prompts, -1).numpy()
        if standardize:
            x = StandardScaler().fit_transform(x)
        pca = PCA(n_components=2, random_state=0).fit(x)
        pcs = pca.transform(x)
        for j, cls in enumerate(np.unique(y)):
            sel = y == cls
            fig.add_trace(go.Scatter(x=pcs[sel, 0], y=pcs[sel, 1], mode="markers",
                                     marker={"color": colours[j % len(colours)], "size": 5,
                                             "opacity": 0.7},
                                     name=names.get(int(cls), str(cls)), legendgroup=str(cls),
                                     showlegend=col == 1), row=1, col=col)
        ev = pca.explained_variance_ratio_
        fig.update_xaxes(title_text=f"PC1 ({ev[0]:.0%})", row=1, col=col)
        fig.update_yaxes(title_text=f"PC2 ({ev[1]:.0%})", row=1, col=col)
    fig.update_layout(title=title or f"First two principal components ({hook_template})",
                      template="plotly_white")
    return fig


__all__ = ["ProbeResult", "pca_figure", "probe_layers", "wilson_interval"]
