"""Per-layer linear probes with controls: Experiment 1 of the Qwen introspection paper.

The question (Sec. III.A, H1): is "risk" linearly readable from the model's activations, and
where? For every layer ``l`` the activations ``h_l`` of a labelled prompt set (the paper: the
input of ``down_proj``, ``blocks.l.mlp.hook_post``, at the last prompt token) are split into
train and test rows, standardised with the training rows' mean and standard deviation, and an
L2-regularised logistic regression is fitted on the training rows:

    p(y = 1 | h) = sigmoid(w_l . (h - mu_l) / sigma_l + b_l)
    minimise  sum_i BCE(y_i, p_i) + ||w_l||^2 / (2 C)          (intercept not penalised)

the objective of ``sklearn.linear_model.LogisticRegression(C=C)``, solved to convergence.

**Split.** When the prompts have groups (the shipped ``financial`` set: minimal pairs, the
risky and benign twin of one situation share a group id) whole groups are held out
(``GroupShuffleSplit``, ``test_size`` of the groups): a random split would put a test prompt's
twin in training, and a probe can then score by recognising the situation rather than the risk.
Without groups the split is stratified random (as in the paper). ``test_mask`` fixes it.

**Layer choice.** The layer is chosen by K-fold cross-validation *inside the training rows*
(grouped when the split is: ``StratifiedGroupKFold``; ties broken by the cross-validated
log-loss), and the headline is the held-out test accuracy *at that layer*, with its Wilson
interval. The maximum over layers of test accuracy is not a headline: with 30 layers and no
signal it sits about two standard errors above chance. Per-layer test accuracies stay in the
table for the figure.

**Randomised-label control** (a permutation test). The probe is refitted on ``n_permutations``
permutations of the labels (respecting the groups: :func:`em_interp.stats.permutation_matrix`,
scheme ``"both"`` -- pairs stay one risky, one benign; single-label groups move as a whole) on
the same split, at every layer. Per layer: the null's mean (``random_label_accuracy``), its 95th
percentile and the p-value ``(1 + #{null >= observed}) / (1 + n)``; over layers, the
max-statistic adjusted p-values (``p_value_max``): the headline's p-value is ``p_value_max`` at
the chosen layer, valid whichever layer was chosen.

**Persistence control**: the cosine between adjacent probed layers' weights in the original
activation units ``u_l = w_l / sigma_l``: near 1 the direction is copied from layer to layer,
near 0 it is recomputed (the paper finds near-zero values). **Base-model control**: with
``control_store`` the same columns for the base model, on the same split and permutations, and
an exact McNemar test of organism vs base correctness on the test prompts at the organism's
chosen layer.

**Solver.** Newton's method (iteratively reweighted least squares with a backtracking line
search) in the span of the standardised training rows: with ``X = U S V^T`` (``r = rank <=
min(n_train, d)``) the optimal ``w`` lies in ``span(V)``, so ``w = V beta`` and the problem is the
same logistic regression on the ``r`` features ``U S`` with penalty ``||beta||^2 / 2C``. It
converges quadratically to a relative step of ``tol`` (default 1e-10): the weights match a
converged L-BFGS to 1e-6, where scikit-learn's default ``tol=1e-4`` leaves them 1-3% off. The
permutations share the basis and are solved as one batch. Cost per layer: one ``n_train x d``
Gram matrix and eigendecomposition, then ``O(n_train r^2)`` per Newton step and label vector;
30 layers x 160 prompts x 1536 features x 100 permutations take a few seconds on a CPU. At the
paper's scale (12k prompts x 27648 features) use fewer permutations or a larger host.

Each layer's weights (original units) and intercept are kept, so a direction can be reused
(steering, projection). Any hook works: ``hook_template`` is formatted with ``{layer}``; hooks
with a head axis are flattened; and any in-memory ``{name: [n, d] tensor}`` can be probed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm import tqdm

from em_interp.activations.store import ActivationStore
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.representations.logistic import Basis, blas_threads, fit_logistic
from em_interp.results import Result
from em_interp.stats import (
    mcnemar_exact,
    min_detectable_effect,
    permutation_matrix,
    permutation_pvalues,
    wilson_interval,
)

MODEL_NAMES = ("organism", "control")
Activations = ActivationStore | str | Path | Mapping[str, torch.Tensor | np.ndarray]


@dataclass(frozen=True)
class ProbeResult(Result):
    """Per-layer probe accuracies with controls (see the module docstring)."""

    kind = "probe"

    table: pd.DataFrame
    """One row per (model, layer): ``model`` (``organism`` = the probed activations,
    ``control`` = ``control_store``), ``layer``, ``hook``, ``accuracy`` (held-out test),
    ``ci_low``, ``ci_high`` (Wilson 95%), ``cv_accuracy`` (cross-validated in the training rows,
    what chooses the layer), ``chosen``, ``random_label_accuracy`` (mean of the permutation
    null), ``random_label_q95``, ``p_value`` (per layer), ``p_value_max`` (max-statistic
    adjusted over layers), ``persistence``, ``train_accuracy``, ``n_train``, ``n_test``."""
    layers: tuple[int, ...]
    weights: Float[torch.Tensor, "layer feature"]
    """Probe weights in original units (``coef / scale``), one row per probed layer."""
    intercepts: Float[torch.Tensor, " layer"]
    """Intercepts in original units: ``p(y=1|h) = sigmoid(weights[i] . h + intercepts[i])``."""
    test_mask: np.ndarray
    """``[n_prompts]`` booleans: True for held-out rows."""
    train_index: np.ndarray | None = None
    """Row (prompt) indices the probes were fitted on."""
    test_index: np.ndarray | None = None
    """Row (prompt) indices the accuracies were measured on."""
    chosen_layer: int | None = None
    """The layer chosen by cross-validation in the training rows (the headline's layer)."""
    test_correct: np.ndarray | None = None
    """``[layer, n_test]`` booleans: each test prompt classified correctly (``test_index``
    order)."""
    null_accuracy: np.ndarray | None = None
    """``[n_permutations, layer]`` test accuracies on permuted labels (``None``: no
    permutations)."""
    control_weights: torch.Tensor | None = None
    control_intercepts: torch.Tensor | None = None
    control_chosen_layer: int | None = None
    control_test_correct: np.ndarray | None = None
    control_null_accuracy: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    """Settings and provenance: hook_template, C, seed, split, selection, permutations, chance,
    stores."""

    @property
    def df(self) -> pd.DataFrame:
        """The tidy per-(model, layer) table."""
        return self.table

    def curve(self, model: str = "organism") -> pd.DataFrame:
        """The rows of one model (``"organism"`` or ``"control"``), indexed by layer."""
        return self.table[self.table["model"] == model].set_index("layer")

    def _summary(self, model: str) -> dict | None:
        c = self.curve(model)
        if c.empty:
            return None
        chosen = self.chosen_layer if model == "organism" else self.control_chosen_layer
        row = c.loc[chosen]
        n_test, chance = int(row["n_test"]), float(self.meta.get("chance", 0.5))
        mde = min_detectable_effect(float(np.sqrt(chance * (1 - chance) / n_test)))
        return {"chosen_layer": int(chosen), "accuracy": float(row["accuracy"]),
                "ci_low": float(row["ci_low"]), "ci_high": float(row["ci_high"]),
                "p_value": _num(row["p_value_max"]), "p_max": _num(c["p_value_max"].min()),
                "cv_accuracy": float(row["cv_accuracy"]),
                "min_detectable_effect": mde,
                "mean_accuracy": float(c["accuracy"].mean()),
                "mean_random_label_accuracy": _num(c["random_label_accuracy"].mean()),
                "mean_persistence": _num(c["persistence"].mean()),
                # kept for readers of older results.json: the chosen layer, not the test max
                "best_layer": int(chosen), "best_accuracy": float(row["accuracy"])}

    def to_dict(self) -> dict:
        """The headline per model: the layer chosen by cross-validation, its held-out accuracy
        with Wilson interval, its max-statistic permutation p-value, ``p_max`` (signal at any
        layer), the minimum detectable effect (accuracy above chance at 80% power), means over
        layers; under ``control`` the same for the base model and a McNemar test of organism
        vs base on the test prompts at the organism's chosen layer."""
        out = {"hook_template": self.meta.get("hook_template"), "n_layers": len(self.layers),
               "n_train": self.meta.get("n_train"), "n_test": self.meta.get("n_test"),
               "chance": self.meta.get("chance"), "split": self.meta.get("split"),
               "selection": self.meta.get("selection"),
               "n_permutations": self.meta.get("n_permutations"),
               **self._summary("organism")}
        ctrl = self._summary("control")
        if ctrl is not None:
            i = self.layers.index(self.chosen_layer)
            mc = mcnemar_exact(self.test_correct[i], self.control_test_correct[i])
            ctrl["vs_organism"] = {"layer": self.chosen_layer, "difference": mc.difference,
                                   "ci_low": mc.ci_low, "ci_high": mc.ci_high,
                                   "p_value": mc.pvalue, "b01": mc.b01, "b10": mc.b10}
            out["control"] = ctrl
        return out

    def figure(self, which: str = "accuracy", title: str | None = None):
        """``"accuracy"``: test accuracy per layer with Wilson 95% bands, the chosen layer
        (star), the random-label null (mean dotted, 95th percentile dashed) and (if given) the
        base-model control; ``"persistence"``: the cosine between adjacent layers' weights."""
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
            chosen = c[c["chosen"]]
            fig.add_trace(go.Scatter(x=chosen.index.tolist(), y=chosen["accuracy"],
                                     mode="markers", name=f"{name}, chosen layer (CV)",
                                     marker={"symbol": "star", "size": 14,
                                             "color": colours[model]}))
            fig.add_trace(go.Scatter(x=x, y=c["random_label_accuracy"], mode="lines",
                                     name=f"{name}, random labels",
                                     line={"color": colours[model], "dash": "dot"}))
            fig.add_trace(go.Scatter(x=x, y=c["random_label_q95"], mode="lines",
                                     name=f"{name}, random labels 95th pct",
                                     line={"color": colours[model], "dash": "dash",
                                           "width": 1}))
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


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


# ------------------------------------------------------------------ inputs


@dataclass
class _Source:
    """What the probes read: a store or an in-memory mapping, behind one interface."""

    hooks: list[str]
    n: int
    load: Callable[[str], np.ndarray]
    labels: tuple | None = None
    groups: tuple | None = None
    split: tuple | None = None
    prompts_hash: str | None = None
    label_names: dict = field(default_factory=dict)
    describe: dict = field(default_factory=dict)


def _as_source(obj, what: str = "store") -> _Source:
    if isinstance(obj, Mapping):
        if not obj:
            raise DataError(f"{what} is an empty mapping; pass {{hook name: [n, d] tensor}}.")
        arrays = {}
        for k, v in obj.items():
            t = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
            if t.ndim < 2 or not t.is_floating_point():
                raise DataError(f"{what}[{k!r}] is {tuple(t.shape)} {t.dtype}; every entry must "
                                "be a floating [n_prompts, d] (or [n_prompts, ...]) tensor.")
            arrays[str(k)] = t
        ns = {t.shape[0] for t in arrays.values()}
        if len(ns) != 1:
            raise DataError(f"{what} holds tensors with different numbers of rows {sorted(ns)}; "
                            "every hook needs one row per prompt, the same prompts.")
        n = ns.pop()
        return _Source(hooks=list(arrays), n=n, describe={"in_memory": True},
                       load=lambda h: arrays[h].detach().to("cpu", torch.float64)
                       .reshape(n, -1).numpy())
    store = obj if isinstance(obj, ActivationStore) else ActivationStore.open(Path(obj))
    if store.reduce == "none":
        raise ConfigError(f"the store {str(store.path)!r} has token rows (reduce='none'); probes "
                          "need one row per prompt: cache with reduce='last' or 'mean'.")
    m = store.manifest
    return _Source(hooks=store.hooks, n=store.n_prompts, labels=store.labels,
                   groups=store.groups, split=store.split, prompts_hash=m.get("prompts_hash"),
                   label_names={int(k): v for k, v in m.get("label_names", {}).items()},
                   describe={"path": str(store.path), "card": m.get("card"),
                             "variant": m.get("variant"), "model_name": m.get("model_name")},
                   load=lambda h: store.load(h).to(torch.float64).reshape(store.n_prompts, -1)
                   .numpy())


def _resolve_layers(src: _Source, template: str,
                    layers: Sequence[int] | None) -> tuple[list[int], list[str]]:
    """Layers and their hook names: from the template, or (in-memory keys that do not match
    it) the keys in order, numbered 0, 1, ..."""
    if "{layer}" not in template:
        raise ConfigError(f"hook_template must contain '{{layer}}', got {template!r} (e.g. "
                          "'blocks.{layer}.mlp.hook_post').")
    pattern = re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    present = sorted(int(m.group(1)) for h in src.hooks if (m := pattern.match(h)))
    where = src.describe.get("path", "the activations")
    if not present and src.describe.get("in_memory"):
        keys = list(range(len(src.hooks)))
        chosen = keys if layers is None else [int(x) for x in layers]
        bad = [x for x in chosen if x not in keys]
        if bad or not chosen:
            raise DataError(f"the in-memory activations have keys {src.hooks[:4]}... which do not "
                            f"match {template!r}; layers then index the keys 0..{len(keys) - 1}, "
                            f"got {bad or 'none'}.")
        return chosen, [src.hooks[i] for i in chosen]
    if layers is None:
        if not present:
            raise DataError(f"{where!r} has no hook matching {template!r}; it holds "
                            f"{src.hooks[:4]}... Pass the hook_template of the hooks you cached.")
        layers = present
    layers = [int(x) for x in layers]
    missing = [x for x in layers if x not in present]
    if missing:
        raise DataError(f"{where!r} lacks {template!r} for layers {missing}; it has layers "
                        f"{present}. Cache them, or pass layers=...")
    if not layers:
        raise ConfigError("layers is empty; pass None for every cached layer.")
    return layers, [template.format(layer=x) for x in layers]


def _labels(src: _Source, labels) -> np.ndarray:
    if labels is None:
        labels = src.labels
        if labels is None:
            where = src.describe.get("path", "in-memory activations")
            raise DataError(f"{where!r} has no labels (not a labelled PromptSet's store, or a "
                            "mapping); pass labels=[...], one per prompt.")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != src.n:
        raise DataError(f"labels has shape {y.shape}; the activations have {src.n} prompts.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {y.dtype}.")
    if len(np.unique(y)) != 2:
        raise DataError(f"probing needs exactly two label values, got {np.unique(y).tolist()}.")
    return (y == np.unique(y)[1]).astype(np.int64)


def _groups(src: _Source, groups) -> np.ndarray | None:
    g = src.groups if groups is None else groups
    if g is None:
        return None
    g = np.asarray(g)
    if g.ndim != 1 or len(g) != src.n:
        raise DataError(f"groups has shape {g.shape}; the activations have {src.n} prompts.")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _split(src: _Source, y: np.ndarray, groups: np.ndarray | None, test_mask, split_by: str,
           test_size: float, seed: int) -> tuple[np.ndarray, str]:
    if split_by not in ("auto", "group", "random"):
        raise ConfigError(f"split_by must be 'auto', 'group' or 'random', got {split_by!r}.")
    if test_mask is None:
        if not 0 < test_size < 1:
            raise ConfigError(f"test_size must be in (0, 1), got {test_size}.")
        if split_by == "group" and groups is None:
            raise DataError("split_by='group' needs groups: pass groups=[...] or a store of a "
                            "PromptSet with groups.")
        idx = np.arange(len(y))
        if groups is not None and split_by != "random":
            from sklearn.model_selection import GroupShuffleSplit

            for attempt in range(50):  # the first seed whose split has both labels both sides
                _, test = next(GroupShuffleSplit(n_splits=1, test_size=test_size,
                                                 random_state=seed + attempt)
                               .split(idx, y, groups))
                mask = np.isin(idx, test)
                if all(len(np.unique(y[r])) == 2 for r in (mask, ~mask)):
                    break
            how = (f"grouped: GroupShuffleSplit(test_size={test_size}, random_state="
                   f"{seed + attempt}), {len(np.unique(groups))} groups")
        else:
            from sklearn.model_selection import train_test_split

            _, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
            mask = np.isin(idx, test)
            how = f"stratified random, test_size={test_size}"
    elif isinstance(test_mask, str):
        if test_mask != "split" or src.split is None:
            raise ConfigError(f"test_mask={test_mask!r}: the only string is 'split' (the prompt "
                              "set's own held-out split), and the store must have one "
                              f"(split={'present' if src.split else 'absent'}).")
        mask, how = np.array([s == "test" for s in src.split]), "prompt set split"
    else:
        mask = np.asarray(test_mask)
        if mask.dtype != bool or mask.shape != y.shape:
            raise DataError(f"test_mask must be {len(y)} booleans (True = held out), got "
                            f"{mask.dtype} {mask.shape}.")
        how = "fixed test_mask"
    for part, rows in (("train", ~mask), ("test", mask)):
        if len(np.unique(y[rows])) < 2:
            raise DataError(f"the {part} split holds {int(rows.sum())} rows and not both "
                            "labels; change test_mask / test_size, or pass more prompts.")
    return mask, how


def _folds(y_train: np.ndarray, g_train: np.ndarray | None, k: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = min(k, int(np.bincount(y_train).min()))  # sklearn wants k <= each class's count
    if g_train is not None:
        k = min(k, len(np.unique(g_train)))
        if k < 2:
            return []
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y_train)), y_train, g_train))
    if k < 2:
        return []
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
                .split(np.zeros(len(y_train)), y_train))


# ------------------------------------------------------------------ one model


def _accuracy(theta: np.ndarray, g: np.ndarray, y: np.ndarray, y_fit: np.ndarray):
    """Correct predictions ``[P, m]`` of rows ``g`` ``[m, r]`` with labels ``y`` ``[P, m]``;
    a one-class fit (NaN) predicts its one class."""
    dec = g @ theta[:, :-1].T + theta[:, -1]  # [m, P]
    pred = (dec.T > 0).astype(np.int64)
    single = np.isnan(theta[:, 0])
    pred[single] = y_fit[single, :1]
    return pred == y


def _probe_model(src: _Source, hooks, y, perms, test, folds, C, tol, model, progress):
    labels = np.concatenate([y[None], perms]) if perms is not None else y[None]
    rows, ws, bs, null, correct, cv = [], [], [], [], [], []
    for hook in tqdm(hooks, desc=f"probing {model}", disable=not progress, unit="layer"):
        x = src.load(hook)
        # small matrices (rank <= n_train): BLAS threads cost more than they give
        with blas_threads(1 if (~test).sum() < 512 else None):
            fit = _probe_layer(x, y, labels, test, folds, C, tol)
        fit["row"].update(model=model, hook=hook,
                          persistence=_cosine(fit["w"], ws[-1]) if ws else float("nan"))
        rows.append(fit["row"])
        ws.append(fit["w"])
        bs.append(fit["b"])
        null.append(fit["null"])
        correct.append(fit["correct"])
        cv.append(fit["cv"])
    return rows, np.stack(ws), np.array(bs), np.stack(null, 1), np.stack(correct), cv


def _probe_layer(x, y, labels, test, folds, C, tol) -> dict:
    """One layer: fit every label vector on the training rows, score the test rows,
    cross-validate the real labels; weights and intercept in original units."""
    train = ~test
    n_test, n_train = int(test.sum()), int(train.sum())
    basis = Basis.fit(x[train])
    theta = fit_logistic(basis.features, labels[:, train], C, tol=tol)
    right = _accuracy(theta, basis.project(x[test]), labels[:, test], labels[:, train])
    w_std = basis.weights(theta[0, :-1])
    train_acc = float(_accuracy(theta[:1], basis.features, y[None, train], y[None, train]).mean())
    cv = _cross_validate(x[train], y[train], folds, C, tol)
    k = int(right[0].sum())
    lo, hi = wilson_interval(k, n_test)
    return {"row": {"accuracy": k / n_test, "ci_low": lo, "ci_high": hi, "cv_accuracy": cv[0],
                    "train_accuracy": train_acc, "n_train": n_train, "n_test": n_test},
            "w": w_std / basis.scale,
            "b": float(theta[0, -1] - np.sum(w_std * basis.mean / basis.scale)),
            "null": right[1:].mean(1), "correct": right[0], "cv": cv}


def _cross_validate(x, y, folds, C, tol) -> tuple[float, float]:
    """Pooled accuracy and mean log-loss over the validation folds (NaN without folds)."""
    if not folds:
        return float("nan"), float("nan")
    hits, loss = 0, 0.0
    for fit_rows, val_rows in folds:
        basis = Basis.fit(x[fit_rows])
        theta = fit_logistic(basis.features, y[fit_rows], C, tol=tol)
        if np.isnan(theta[0, 0]):  # one class in this fold: predict it
            hits += int(np.sum(y[val_rows] == y[fit_rows][0]))
            loss += np.log(2.0) * len(val_rows)
            continue
        dec = basis.project(x[val_rows]) @ theta[0, :-1] + theta[0, -1]
        hits += int(np.sum((dec > 0) == y[val_rows]))
        loss += float(np.sum(np.logaddexp(0.0, dec) - y[val_rows] * dec))
    n = sum(len(v) for _, v in folds)
    return hits / n, loss / n


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _finish(rows, layers, null, cv) -> int:
    """Fill the layer, selection and permutation columns in place; return the chosen layer."""
    acc = np.array([r["accuracy"] for r in rows])
    if null is not None:
        test = permutation_pvalues(acc, null)
        mean, q95 = null.mean(0), np.quantile(null, 0.95, axis=0)
        p, pm = test.pvalues, test.pvalues_max
    else:
        mean = q95 = p = pm = np.full(len(rows), np.nan)
    # highest CV accuracy, then lowest CV log-loss, then the first layer
    order = sorted(range(len(rows)), key=lambda i: (-np.nan_to_num(cv[i][0], nan=-1.0),
                                                     np.nan_to_num(cv[i][1], nan=np.inf), i))
    best = order[0]
    for i, (r, layer) in enumerate(zip(rows, layers, strict=True)):
        r.update(layer=layer, chosen=i == best, random_label_accuracy=float(mean[i]),
                 random_label_q95=float(q95[i]), p_value=float(p[i]),
                 p_value_max=float(pm[i]))
    return layers[best]


# ------------------------------------------------------------------ the entry point


def probe_layers(store: Activations, labels: Sequence[int] | None = None,
                 hook_template: str = "blocks.{layer}.mlp.hook_post",
                 layers: Sequence[int] | None = None, *,
                 groups: Sequence | None = None,
                 split_by: Literal["auto", "group", "random"] = "auto",
                 test_size: float = 0.3,
                 test_mask: Sequence[bool] | np.ndarray | str | None = None,
                 cv_folds: int = 5, n_permutations: int = 100,
                 permutation_scheme: Literal["auto", "free", "within", "across", "both"] = "auto",
                 seed: int = 0, C: float = 1.0, tol: float = 1e-10,
                 control_store: Activations | None = None,
                 names: tuple[str, str] = MODEL_NAMES, progress: bool = True) -> ProbeResult:
    """Fit a standardised L2 logistic-regression probe per layer, with controls (Exp. 1).

    Layers are read one at a time. The split, the cross-validation folds and the permuted
    labels are the same for every layer and for the control.

    Args:
        store: an :class:`~em_interp.activations.store.ActivationStore` (or its folder) written
            with ``reduce="last"`` or ``"mean"``, or a mapping ``{hook name: [n, d] tensor}``
            (keys that do not match ``hook_template`` are probed in order as layers 0, 1, ...).
        labels: an integer label per prompt, two values; ``None`` takes the store's.
        hook_template: the probed hook with ``{layer}``, e.g. ``"blocks.{layer}.attn.hook_z"``.
        layers: the layers to probe; ``None``: every layer present for the template.
        groups: a group id per prompt (minimal pairs, templates); ``None`` takes the store's.
        split_by: ``"auto"`` (whole groups held out when there are groups, else stratified
            random), ``"group"`` or ``"random"``.
        test_size: the held-out fraction (of groups, for a grouped split).
        test_mask: a fixed split: booleans (True = held out), or ``"split"`` for the prompt
            set's own test split recorded in the store.
        cv_folds: folds of the cross-validation in the training rows that chooses the layer
            (grouped when there are groups and the split is not random).
        n_permutations: label permutations of the random-label control (0: none, no p-values;
            the smallest possible p-value is ``1 / (1 + n_permutations)``).
        permutation_scheme: how permutations respect groups
            (:func:`em_interp.stats.permutation_matrix`; ``"auto"``: ``"both"`` with groups).
        seed: seeds the split, the folds and the permutations.
        C: inverse L2 strength, as in ``sklearn.linear_model.LogisticRegression``.
        tol: relative step at which Newton's method stops.
        control_store: the base model's activations on the same prompts (same kind as
            ``store``).
        names: display names of the two models in figures.
        progress: show a tqdm bar per model.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        DataError: no labels, not two classes, a split without both classes, missing layers,
            mismatched lengths.
        ConfigError: a ``reduce="none"`` store, a bad template, ``test_size``, ``C``,
            ``cv_folds``, ``n_permutations`` or ``split_by``.
        StoreMismatchError: ``control_store`` holds other prompts or other hooks.
    """
    if not C > 0:
        raise ConfigError(f"C must be > 0, got {C}.")
    if cv_folds < 2 or n_permutations < 0:
        raise ConfigError(f"cv_folds must be >= 2 and n_permutations >= 0, got {cv_folds} and "
                          f"{n_permutations}.")
    src = _as_source(store)
    layers, hooks = _resolve_layers(src, hook_template, layers)
    y = _labels(src, labels)
    g = _groups(src, groups)
    test, how = _split(src, y, g, test_mask, split_by, test_size, seed)
    ctrl = None
    if control_store is not None:
        ctrl = _as_source(control_store, "control_store")
        _check_control(src, ctrl, hooks)
    grouped_cv = g is not None and split_by != "random" and not how.startswith("stratified")
    folds = _folds(y[~test], g[~test] if grouped_cv else None, cv_folds, seed)
    if not folds and len(layers) > 1:
        raise DataError(f"the {int((~test).sum())} training rows are too few for a "
                        "cross-validation that chooses the layer (each fold needs a group of "
                        "each label); pass more prompts, or one layer in layers=[...].")
    perms = None
    if n_permutations:
        perms = permutation_matrix(y, n_permutations, seed=seed, groups=g,
                                   scheme=permutation_scheme)
    scheme = (permutation_scheme if permutation_scheme != "auto"
              else "free" if g is None else "both")
    rows, w, b, null, correct, cv = _probe_model(src, hooks, y, perms, test, folds, C, tol,
                                                 "organism", progress)
    null = null if perms is not None else None
    chosen = _finish(rows, layers, null, cv)
    meta = {"hook_template": hook_template, "C": C, "seed": seed, "tol": tol, "split": how,
            "selection": (f"{len(folds)}-fold {'grouped ' if grouped_cv else ''}cross-validation "
                          "in the training rows" if folds else "single layer"),
            "n_permutations": n_permutations, "permutation_scheme": scheme,
            "n_train": int((~test).sum()), "n_test": int(test.sum()),
            "chance": float(max(np.mean(y[test] == c) for c in (0, 1))),
            "names": dict(zip(MODEL_NAMES, names, strict=True)), "store": src.describe}
    extra = {}
    if ctrl is not None:
        crows, cw, cb, cnull, ccorrect, ccv = _probe_model(ctrl, hooks, y, perms, test, folds,
                                                           C, tol, "control", progress)
        cnull = cnull if perms is not None else None
        extra = {"control_weights": torch.tensor(cw, dtype=torch.float32),
                 "control_intercepts": torch.tensor(cb, dtype=torch.float32),
                 "control_chosen_layer": _finish(crows, layers, cnull, ccv),
                 "control_test_correct": ccorrect, "control_null_accuracy": cnull}
        rows += crows
        meta["control_store"] = ctrl.describe
    columns = ["model", "layer", "hook", "accuracy", "ci_low", "ci_high", "cv_accuracy",
               "chosen", "random_label_accuracy", "random_label_q95", "p_value", "p_value_max",
               "persistence", "train_accuracy", "n_train", "n_test"]
    return ProbeResult(table=pd.DataFrame(rows)[columns], layers=tuple(layers),
                       weights=torch.tensor(w, dtype=torch.float32),
                       intercepts=torch.tensor(b, dtype=torch.float32), test_mask=test,
                       train_index=np.flatnonzero(~test), test_index=np.flatnonzero(test),
                       chosen_layer=chosen, test_correct=correct, null_accuracy=null,
                       meta=meta, **extra)


def _check_control(src: _Source, control: _Source, hooks: list[str]) -> None:
    where = control.describe.get("path", "the in-memory control")
    if control.n != src.n or (src.prompts_hash and control.prompts_hash
                              and src.prompts_hash != control.prompts_hash):
        raise StoreMismatchError(
            f"control_store {where!r} holds other prompts ({control.n} prompts, hash "
            f"{control.prompts_hash}) than the probed activations ({src.n}, "
            f"{src.prompts_hash}); cache the base model on the same prompts.")
    missing = [h for h in hooks if h not in control.hooks]
    if missing:
        raise StoreMismatchError(f"control_store {where!r} lacks the hooks {missing[:4]}; cache "
                                 "the same hooks for both models.")


# ------------------------------------------------------------------ PCA


def pca_figure(store: Activations, layers: Sequence[int],
               labels: Sequence[int] | None = None, *,
               hook_template: str = "blocks.{layer}.mlp.hook_post", standardize: bool = True,
               label_names: dict[int, str] | None = None, title: str | None = None):
    """Scatter of the first two principal components of chosen layers, coloured by label.

    Args:
        store: the activation store (``reduce="last"`` or ``"mean"``) or an in-memory mapping.
        layers: the layers to show, one panel each.
        labels: a label per prompt; ``None`` takes the store's.
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

    src = _as_source(store)
    names = label_names or src.label_names
    layers, hooks = _resolve_layers(src, hook_template, layers)
    _labels(src, labels)
    raw = np.asarray(labels if labels is not None else src.labels)
    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {x}" for x in layers])
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for col, hook in enumerate(hooks, 1):
        x = src.load(hook)
        if standardize:
            x = StandardScaler().fit_transform(x)
        pca = PCA(n_components=2, random_state=0).fit(x)
        pcs = pca.transform(x)
        for j, cls in enumerate(np.unique(raw)):
            sel = raw == cls
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


__all__ = ["ProbeResult", "fit_logistic", "pca_figure", "probe_layers", "wilson_interval"]
