"""Interventions: ablate heads, neurons or a direction, or steer, as reusable context managers.

Each intervention is built on a model by a function of this module, holds what it needs (head
indices, reference means, a direction), and edits activations through TransformerLens forward
hooks while it is active:

* :func:`ablate_heads` -- replace the output of heads ``(layer, head)`` *before* ``o_proj``
  (``blocks.L.attn.hook_z``, ``[batch, pos, head_index, d_head]``)::

      zero:  z[..., h, :] <- 0
      mean:  z[..., h, :] <- mean over the real tokens of a reference prompt set of z[..., h, :]

  The Qwen introspection paper (Sec. V, Fig. 11) mean- and zero-ablates L62H12 and L62H28 of
  the 32B organism, alone and together, with the mean taken over a jailbreak and a benign set,
  and compares the attack-success rate with a random-head control. Mean ablation keeps the
  head's average contribution, so the model stays near its activation manifold; zero ablation
  does not ("off-manifold").
* :func:`random_heads` -- the control: ``n`` heads drawn with ``random.Random(seed)``, uniformly
  among all heads (or those of ``layers``) minus ``exclude``.
* :func:`ablate_neurons` -- the same two modes for neurons of ``blocks.L.mlp.hook_post`` (the MLP
  activation before ``down_proj``).
* :func:`ablate_direction` -- remove the component along a unit direction ``d``:
  ``x <- x - (x . d) d``, by default from every write into the residual stream (the
  directional ablation of Arditi et al., 2024), optionally with same-norm random and orthogonal
  control directions (:mod:`em_interp.behaviour.controls`).
* :func:`steer` -- add ``alpha * d`` at one hook point, at every position or only at the positions
  produced during generation (BLOCK-EM steers with SAE decoder directions: Sec. 3.1 and A.3,
  "induce" ``base + alpha d_k`` and "repair" ``misaligned - alpha d_k``).
* :func:`compose` -- several interventions as one; hooks run in argument order.

The contract other modules rely on:

* ``with iv:`` attaches the hooks to the model the intervention was built on and removes them in
  ``finally`` (also when the body raises); an intervention can be entered again after it exited,
  but not while it is active on the same model. ``iv.applied(other_model)`` attaches the same
  hooks to another model of the same shape (e.g. the organism of a pair).
* ``iv.fwd_hooks()`` -> ``[(hook_name, fn), ...]`` for ``model.run_with_hooks(...,
  fwd_hooks=iv.fwd_hooks())``; ``iv.describe()`` -> a JSON-safe dict; ``iv.state()`` -> the tensors
  it holds (reference means, directions), which results save next to their numbers.
* Hook names are validated when the intervention is built, before any forward.
* A mean is computed **once**, on first use (entering, ``fwd_hooks()``, ``state()`` or
  :meth:`Intervention.prepare`), over the real tokens of the reference prompts, in batches, with
  the forward stopped after the deepest hooked block
  (:func:`em_interp.activations.reference_means.reference_means`, also importable from here); it is then cached on the object. It is
  computed under whatever hooks are attached at that moment, so call ``prepare()`` before
  entering other interventions if that matters. Saved means can be passed back as
  ``reference=iv.state()``.

**Which positions are "generated".** ``steer(..., positions="generated")`` reads the boolean
``[batch, pos]`` mask set by :func:`generated_positions` for the forward that is running.
:func:`em_interp.behaviour.generation.generate` runs the prompt (prefill) under an all-``False`` mask and
every decode step under an all-``True`` mask, so only generated tokens are steered; the AB metric
marks the answer tokens. Outside such a block nothing is marked and the steer does nothing.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float

from em_interp import hooks as H
from em_interp.activations.reference_means import describe_reference, reference_means
from em_interp.behaviour.controls import control_directions
from em_interp.errors import ConfigError, HookNameError
from em_interp.inputs import unwrap

log = logging.getLogger(__name__)

Mode = Literal["zero", "mean"]
HookFn = Callable[..., torch.Tensor | None]
_MODES = ("zero", "mean")
_DIRECTION_HOOKS = {"resid_pre": H.resid_pre, "resid_mid": H.resid_mid,
                    "resid_post": H.resid_post, "attn_out": H.attn_out, "mlp_out": H.mlp_out}

# ------------------------------------------------------------------ generated positions

_GENERATED: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "em_interp_generated_positions", default=None)


@contextlib.contextmanager
def generated_positions(mask: Bool[torch.Tensor, "batch pos"] | None) -> Iterator[None]:
    """Mark which positions of the forwards run inside the block are *generated* tokens.

    ``mask[b, p]`` is ``True`` where position ``p`` of row ``b`` of the next forward was produced
    by the model (a decode step, or an answer scored by teacher forcing). ``steer(...,
    positions="generated")`` adds its vector only there. ``None`` marks nothing.
    """
    token = _GENERATED.set(None if mask is None else mask.bool())
    try:
        yield
    finally:
        _GENERATED.reset(token)


def current_generated_positions() -> torch.Tensor | None:
    """The mask set by the innermost :func:`generated_positions` block, or ``None``."""
    return _GENERATED.get()


# ------------------------------------------------------------------ base class


class Intervention(abc.ABC):
    """Base class: a reusable context manager that edits activations through forward hooks.

    Subclasses implement :meth:`_hooks` (and :meth:`_prepare` when they compute something lazily),
    :meth:`describe` and :meth:`state`.
    """

    kind: ClassVar[str] = "intervention"

    def __init__(self, model):
        self.source = model
        """What the intervention was built on (a ``Loaded`` or a ``HookedTransformer``)."""
        self.model = unwrap(model)
        """The ``HookedTransformer`` that ``with iv:`` attaches to."""
        self._active: set[int] = set()
        self._entered: list[contextlib.AbstractContextManager] = []

    # -- to override
    def _prepare(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Compute anything computed lazily (reference means)."""

    @abc.abstractmethod
    def _hooks(self) -> list[tuple[str, HookFn]]:
        """The ``(hook name, hook function)`` pairs to attach."""

    def describe(self) -> dict:
        """JSON-safe description: ``kind`` and the settings (heads, mode, alpha, ...)."""
        return {"kind": self.kind}

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors the intervention holds (reference means, directions), by name."""
        return {}

    # -- public
    def prepare(self) -> Intervention:
        """Compute the reference means now (otherwise done on first use); returns ``self``."""
        self._prepare()
        return self

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        """``[(hook_name, fn), ...]`` for ``model.run_with_hooks(..., fwd_hooks=...)``."""
        self._prepare()
        return self._hooks()

    def check_compatible(self, model) -> None:
        """Raise :class:`~em_interp.errors.ConfigError` if ``model``'s shape differs."""
        cfg, mine = unwrap(model).cfg, self.model.cfg
        keys = ("n_layers", "n_heads", "d_head", "d_model", "d_mlp")
        diff = {k: (getattr(mine, k), getattr(cfg, k)) for k in keys
                if getattr(mine, k) != getattr(cfg, k)}
        if diff:
            raise ConfigError(f"{self.kind} was built on a model with a different shape "
                              f"(built on vs given: {diff}); build it on the model it is "
                              "applied to.")

    @contextlib.contextmanager
    def applied(self, model=None) -> Iterator[Intervention]:
        """Attach the hooks to ``model`` (default: the model it was built on) for a block."""
        tl = self.model if model is None else unwrap(model)
        if id(tl) in self._active:
            raise RuntimeError(f"{self.kind} is already active on this model; it cannot be "
                               "entered again until it exits (build a second one to stack).")
        self.check_compatible(tl)
        fwd = self.fwd_hooks()
        self._active.add(id(tl))
        try:
            with H.attached(tl, fwd):
                yield self
        finally:
            self._active.discard(id(tl))

    @property
    def active(self) -> bool:
        """True while the hooks are attached to some model."""
        return bool(self._active)

    def __enter__(self) -> Intervention:
        cm = self.applied()
        cm.__enter__()
        self._entered.append(cm)
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._entered.pop().__exit__(*exc)

    def __repr__(self) -> str:
        d = {k: v for k, v in self.describe().items() if k != "kind"}
        inner = ", ".join(f"{k}={v!r}" for k, v in d.items())
        return f"{type(self).__name__}({inner})"


# ------------------------------------------------------------------ head and neuron ablation


class _UnitAblation(Intervention):
    """Zero or mean ablation of units (heads or neurons) of one or more hook points."""

    def __init__(self, model, units: dict[str, list[int]], *, mode: str, reference,
                 batch_size: int, mean_over: str, progress: bool):
        super().__init__(model)
        if mode not in _MODES:
            raise ConfigError(f"mode must be 'zero' or 'mean', got {mode!r}.")
        if mode == "mean" and reference is None:
            raise ConfigError("mode='mean' needs reference=: a prompt set to average over (the "
                              "Qwen paper uses the jailbreak and benign prompts), or saved means "
                              "from iv.state().")
        if mode == "zero" and reference is not None:
            raise ConfigError("reference= is only used by mode='mean'; drop it for zero "
                              "ablation.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if mean_over not in ("tokens", "last"):
            raise ConfigError(f"mean_over must be 'tokens' or 'last', got {mean_over!r}.")
        for name in units:
            H.check_hook(self.model, name)
        self.units = units
        self.mode = mode
        self.reference = reference
        self.batch_size = batch_size
        self.mean_over = mean_over
        self.progress = progress
        self._means: dict[str, torch.Tensor] | None = None
        if isinstance(reference, Mapping):
            self._means = self._check_means(reference)

    @abc.abstractmethod
    def _unit_shape(self, hook_name: str) -> tuple[int, ...]:
        """Per-position shape of the units at ``hook_name`` (heads or neurons first)."""

    def _check_means(self, given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.units:
            if name not in given:
                raise ConfigError(f"the given means have no entry for {name!r} (keys: "
                                  f"{sorted(given)}); pass the state() of an ablation of the "
                                  "same units.")
            t = torch.as_tensor(given[name])
            if tuple(t.shape) != self._unit_shape(name):
                raise ConfigError(f"the mean for {name!r} has shape {tuple(t.shape)}, expected "
                                  f"{self._unit_shape(name)}.")
            out[name] = t.detach().to(self.model.cfg.dtype)
        return out

    def _prepare(self) -> None:  # noqa: B027 (optional hook, empty by default)
        if self.mode == "mean" and self._means is None:
            self._means = reference_means(self.source, self.reference, list(self.units),
                                          batch_size=self.batch_size, over=self.mean_over,
                                          progress=self.progress)

    def _hooks(self) -> list[tuple[str, HookFn]]:
        return [(name, _unit_hook(idx, self._unit_shape(name),
                                  None if self._means is None else self._means[name]))
                for name, idx in self.units.items()]

    def state(self) -> dict[str, torch.Tensor]:
        """``{hook_name: mean}`` over all units of each hooked point (mean mode), else ``{}``."""
        if self.mode != "mean":
            return {}
        self._prepare()
        return {k: v.detach().cpu() for k, v in self._means.items()}


def _unit_hook(indices: list[int], unit_shape: tuple[int, ...],
               mean: torch.Tensor | None) -> HookFn:
    """``act[..., i, :] <- mean[i]`` (or 0) for the units ``indices``: heads of ``attn.hook_z``
    (``unit_shape = (n_heads, d_head)``) or neurons (``unit_shape = (d_mlp,)``). Out of place,
    so gradients still flow through the other units."""
    n_units = unit_shape[0]
    keep = torch.ones(n_units)
    keep[indices] = 0.0
    keep = keep.reshape(n_units, *([1] * (len(unit_shape) - 1)))
    keep_at = H.Placed(keep)
    fill_at = None if mean is None else H.Placed(mean.detach().clone().float() * (1.0 - keep))

    def hook(act, hook):
        k = keep_at.like(act)
        return act * k if fill_at is None else act * k + fill_at.like(act)

    return hook


class HeadAblation(_UnitAblation):
    """Zero or mean ablation of attention heads at ``attn.hook_z`` (see :func:`ablate_heads`)."""

    kind = "ablate_heads"

    def __init__(self, model, heads, *, mode: str = "zero", reference=None, batch_size: int = 8,
                 mean_over: str = "tokens", progress: bool = False,
                 info: dict[str, Any] | None = None):
        tl = unwrap(model)
        self.heads = _check_heads(tl, heads)
        units: dict[str, list[int]] = {}
        for layer, head in self.heads:
            units.setdefault(H.attn_z(layer), []).append(head)
        self.info = dict(info or {})
        super().__init__(model, units, mode=mode, reference=reference, batch_size=batch_size,
                         mean_over=mean_over, progress=progress)

    def _unit_shape(self, hook_name: str) -> tuple[int, ...]:
        return (self.model.cfg.n_heads, self.model.cfg.d_head)

    def describe(self) -> dict:
        return {"kind": self.info.get("kind", self.kind),
                "heads": [list(h) for h in self.heads], "mode": self.mode,
                **({"reference": describe_reference(self.reference),
                    "mean_over": self.mean_over} if self.mode == "mean" else {}),
                **{k: v for k, v in self.info.items() if k != "kind"}}


class NeuronAblation(_UnitAblation):
    """Zero or mean ablation of MLP neurons at ``mlp.hook_post`` (see :func:`ablate_neurons`)."""

    kind = "ablate_neurons"

    def __init__(self, model, layer: int, neurons: Sequence[int], *, mode: str = "zero",
                 reference=None, batch_size: int = 8, mean_over: str = "tokens",
                 progress: bool = False):
        tl = unwrap(model)
        self.layer = H.check_layer(tl, layer)
        d_mlp = tl.cfg.d_mlp
        idx = [int(n) for n in dict.fromkeys(int(n) for n in neurons)]
        if not idx:
            raise ConfigError("ablate_neurons needs at least one neuron index.")
        bad = [n for n in idx if not 0 <= n < d_mlp]
        if bad:
            raise ConfigError(f"neuron indices {bad} are out of range 0..{d_mlp - 1} (d_mlp = "
                              f"{d_mlp}).")
        self.neurons = idx
        super().__init__(model, {H.mlp_post(self.layer): idx}, mode=mode, reference=reference,
                         batch_size=batch_size, mean_over=mean_over, progress=progress)

    def _unit_shape(self, hook_name: str) -> tuple[int, ...]:
        return (self.model.cfg.d_mlp,)

    def describe(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "neurons": self.neurons,
                "mode": self.mode,
                **({"reference": describe_reference(self.reference),
                    "mean_over": self.mean_over} if self.mode == "mean" else {})}


def _check_heads(tl, heads) -> list[tuple[int, int]]:
    if isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads):
        heads = [heads]
    out = []
    for item in heads:
        try:
            layer, head = (int(item[0]), int(item[1]))
        except (TypeError, IndexError, ValueError):
            raise ConfigError(f"each head must be a (layer, head) pair, got {item!r}.") from None
        layer = H.check_layer(tl, layer)
        if not 0 <= head < tl.cfg.n_heads:
            raise HookNameError(f"head {head} is out of range: layer {layer} has heads "
                                f"0..{tl.cfg.n_heads - 1} (the paper's 'L62H12' is (62, 12)).")
        out.append((layer, head))
    out = list(dict.fromkeys(out))
    if not out:
        raise ConfigError("ablate_heads needs at least one (layer, head) pair.")
    return out


def ablate_heads(model, heads, *, mode: Mode = "zero", reference=None, batch_size: int = 8,
                 mean_over: Literal["tokens", "last"] = "tokens",
                 progress: bool = False) -> HeadAblation:
    """Zero- or mean-ablate attention heads (their output before ``o_proj``, ``attn.hook_z``).

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        heads: ``(layer, head)`` pairs, 0-indexed, e.g. ``[(62, 12), (62, 28)]``.
        mode: ``"zero"`` sets the heads' ``z`` to 0; ``"mean"`` to their mean over ``reference``.
        reference: for ``mode="mean"``: the prompts to average over (a ``PromptSet``, strings,
            conversations or ``ChatTokens``), or saved means (``other.state()``).
        batch_size: prompts per forward when computing the mean.
        mean_over: ``"tokens"`` (every real token, the default) or ``"last"`` (last token only).
        progress: show a progress bar while computing the mean.

    Returns:
        A :class:`HeadAblation` (a reusable context manager).
    """
    return HeadAblation(model, heads, mode=mode, reference=reference, batch_size=batch_size,
                        mean_over=mean_over, progress=progress)


def random_heads(model, n: int, *, seed: int, exclude=(), layers: Sequence[int] | None = None,
                 mode: Mode = "zero", reference=None, batch_size: int = 8,
                 mean_over: Literal["tokens", "last"] = "tokens",
                 progress: bool = False) -> HeadAblation:
    """The random-head control: ablate ``n`` heads drawn by ``seed``, never one of ``exclude``.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        n: number of heads.
        seed: seed of ``random.Random`` (the same seed draws the same heads).
        exclude: ``(layer, head)`` pairs never drawn (the heads under study).
        layers: draw only from these layers (e.g. ``[62]`` for a same-layer control); default
            all layers.
        mode: ``"zero"`` or ``"mean"``, as in :func:`ablate_heads`.
        reference: for ``mode="mean"``, as in :func:`ablate_heads`.
        batch_size: prompts per forward when computing the mean.
        mean_over: as in :func:`ablate_heads`.
        progress: show a progress bar while computing the mean.

    Returns:
        A :class:`HeadAblation` whose ``describe()`` has ``kind="random_heads"`` and the seed.
    """
    tl = unwrap(model)
    excluded = set(_check_heads(tl, exclude)) if len(exclude) else set()
    layer_list = range(tl.cfg.n_layers) if layers is None else [H.check_layer(tl, x)
                                                                 for x in layers]
    pool = [(layer, h) for layer in layer_list for h in range(tl.cfg.n_heads)
            if (layer, h) not in excluded]
    if not 1 <= n <= len(pool):
        raise ConfigError(f"cannot draw {n} heads: {len(pool)} heads are eligible (after "
                          f"excluding {len(excluded)}).")
    picked = sorted(random.Random(seed).sample(pool, n))
    info = {"kind": "random_heads", "seed": seed, "n": n,
            "exclude": [list(h) for h in sorted(excluded)],
            "layers": None if layers is None else list(layer_list)}
    return HeadAblation(model, picked, mode=mode, reference=reference, batch_size=batch_size,
                        mean_over=mean_over, progress=progress, info=info)


def ablate_neurons(model, layer: int, neurons: Sequence[int], *, mode: Mode = "zero",
                   reference=None, batch_size: int = 8,
                   mean_over: Literal["tokens", "last"] = "tokens",
                   progress: bool = False) -> NeuronAblation:
    """Zero- or mean-ablate MLP neurons of one layer (``blocks.L.mlp.hook_post``).

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        layer: the block, 0-indexed.
        neurons: neuron indices in ``0 .. d_mlp - 1``.
        mode: ``"zero"`` or ``"mean"``.
        reference: for ``mode="mean"``: prompts to average over, or saved means.
        batch_size: prompts per forward when computing the mean.
        mean_over: ``"tokens"`` or ``"last"``.
        progress: show a progress bar while computing the mean.

    Returns:
        A :class:`NeuronAblation`.
    """
    return NeuronAblation(model, layer, neurons, mode=mode, reference=reference,
                          batch_size=batch_size, mean_over=mean_over, progress=progress)


# ------------------------------------------------------------------ directions


def _unit_vector(direction, width: int, what: str) -> torch.Tensor:
    d = torch.as_tensor(direction).detach().flatten().float()
    if d.shape[0] != width:
        raise ConfigError(f"{what}: the direction has {d.shape[0]} entries, the hook's "
                          f"activation {width}.")
    norm = d.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ConfigError(f"{what}: the direction has zero (or non-finite) norm.")
    return d / norm


class DirectionAblation(Intervention):
    """Project a unit direction out of the residual stream (see :func:`ablate_direction`)."""

    kind = "ablate_direction"

    def __init__(self, model, direction, *, layers: Sequence[int] | None = None,
                 hook: str | Sequence[str] = "writes", controls: Sequence[str] = (),
                 n_controls: int = 3, control_seed: int = 0):
        super().__init__(model)
        kinds = [hook] if isinstance(hook, str) else list(hook)
        bad = [k for k in kinds if k not in (*_DIRECTION_HOOKS, "writes")]
        if bad or not kinds or ("writes" in kinds and len(kinds) > 1):
            raise ConfigError(f"hook must be 'writes' (every write into the residual stream) or "
                              f"one or more of {sorted(_DIRECTION_HOOKS)}, got {hook!r}.")
        cfg = self.model.cfg
        self.layers = (list(range(cfg.n_layers)) if layers is None
                       else list(dict.fromkeys(H.check_layer(self.model, x) for x in layers)))
        self.hook_kinds = kinds
        self.direction = _unit_vector(direction, cfg.d_model, "ablate_direction")
        if kinds == ["writes"]:
            first = min(self.layers)
            self.hook_names = [H.resid_pre(first)] + [
                f(layer) for layer in sorted(self.layers) for f in (H.attn_out, H.mlp_out)]
        else:
            self.hook_names = [_DIRECTION_HOOKS[k](layer) for layer in self.layers for k in kinds]
        for name in self.hook_names:
            H.check_hook(self.model, name)
        self.controls: dict[str, DirectionAblation] = {
            name: DirectionAblation(model, vec, layers=self.layers, hook=hook)
            for name, vec in (control_directions(self.direction, kinds=controls, n=n_controls,
                                                 seed=control_seed) if controls else {}).items()}
        """Same-norm control ablations (``"random 1"``, ``"orthogonal 1"``, ...), when asked."""

    def _hooks(self) -> list[tuple[str, HookFn]]:
        d = H.Placed(self.direction)

        def hook(act, hook):
            v = d.like(act)
            return act - (act @ v).unsqueeze(-1) * v

        return [(name, hook) for name in self.hook_names]

    def describe(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "hook": self.hook_kinds,
                "direction_hash": _tensor_hash(self.direction)}

    def state(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction.clone()}


def ablate_direction(model, direction: Float[torch.Tensor, " d_model"], *,
                     layers: Sequence[int] | None = None,
                     hook: str | Sequence[str] = "writes", controls: Sequence[str] = (),
                     n_controls: int = 3, control_seed: int = 0) -> DirectionAblation:
    """Remove the component along ``direction``: ``x <- x - (x . d) d``.

    The default, ``hook="writes"``, is the directional ablation of Arditi et al. (2024): the
    direction is removed from the stream entering the first chosen block (``resid_pre``) and
    from every write into it (``attn_out`` and ``mlp_out`` of each chosen block), so it cannot
    mix back in. With ``layers=None`` that is every layer and every position. Ablating one
    ``resid_post`` only lets later blocks write the direction again.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        direction: ``[d_model]``; normalised to unit length.
        layers: blocks to edit (0-indexed); default all.
        hook: ``"writes"`` (default, above), or the stream point(s) of each block:
            ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``,
            or a list of them.
        controls: also build same-norm control ablations (``"random"``, ``"orthogonal"``;
            :mod:`em_interp.behaviour.controls`), in ``iv.controls``; conditions passed to
            :func:`~em_interp.behaviour.rates.attack_success_rate` run them too.
        n_controls: draws per control kind.
        control_seed: seed of the control draws.

    Returns:
        A :class:`DirectionAblation`.
    """
    return DirectionAblation(model, direction, layers=layers, hook=hook, controls=controls,
                             n_controls=n_controls, control_seed=control_seed)


class Steering(Intervention):
    """Add ``alpha * direction`` at one hook point (see :func:`steer`)."""

    kind = "steer"

    def __init__(self, model, hook: str, direction, alpha: float, *,
                 positions: Literal["all", "generated"] = "all", normalize: bool = False,
                 controls: Sequence[str] = (), n_controls: int = 3, control_seed: int = 0):
        super().__init__(model)
        H.check_hook(self.model, hook)
        if positions not in ("all", "generated"):
            raise ConfigError(f"positions must be 'all' or 'generated', got {positions!r}.")
        d = torch.as_tensor(direction).detach().float()
        shape = H.unit_shape(self.model, hook)
        if shape is not None:
            width = 1
            for s in shape:
                width *= s
            if d.numel() != width:
                raise ConfigError(f"steer at {hook}: the direction has {d.numel()} entries, "
                                  f"the activation {shape}.")
            d = d.reshape(shape)
        if normalize:
            norm = d.norm()
            if norm == 0:
                raise ConfigError("steer: cannot normalise a zero direction.")
            d = d / norm
        self.hook = hook
        self.direction = d
        self.alpha = float(alpha)
        self.positions = positions
        self.normalize = normalize
        self.controls: dict[str, Steering] = {
            name: Steering(model, hook, vec, alpha, positions=positions)
            for name, vec in (control_directions(d, kinds=controls, n=n_controls,
                                                 seed=control_seed) if controls else {}).items()}
        """Same-norm control steerings (``"random 1"``, ``"orthogonal 1"``, ...), when asked."""

    def _hooks(self) -> list[tuple[str, HookFn]]:
        vec = H.Placed(self.alpha * self.direction)
        generated_only = self.positions == "generated"

        def hook(act, hook):
            v = vec.like(act)
            if v.shape != act.shape[act.ndim - v.ndim:]:
                raise ConfigError(f"steer at {hook.name}: the direction has shape "
                                  f"{tuple(v.shape)}, the activation {tuple(act.shape)}.")
            if not generated_only:
                return act + v
            mask = _GENERATED.get()
            if mask is None:
                return act
            if tuple(mask.shape) != tuple(act.shape[:2]):
                raise RuntimeError(f"steer(positions='generated') at {hook.name}: the "
                                   f"generated-positions mask is {tuple(mask.shape)} but the "
                                   f"activation is {tuple(act.shape)}; set the mask with "
                                   "generated_positions() for the forward that runs.")
            m = mask.to(act.device, act.dtype).reshape(*mask.shape, *([1] * (act.ndim - 2)))
            return act + m * v

        return [(self.hook, hook)]

    def describe(self) -> dict:
        return {"kind": self.kind, "hook": self.hook, "alpha": self.alpha,
                "positions": self.positions, "normalize": self.normalize,
                "direction_norm": float(self.direction.norm()),
                "direction_hash": _tensor_hash(self.direction)}

    def state(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction.clone()}


def steer(model, hook: str, direction: torch.Tensor, alpha: float, *,
          positions: Literal["all", "generated"] = "all", normalize: bool = False,
          controls: Sequence[str] = (), n_controls: int = 3, control_seed: int = 0) -> Steering:
    """Add ``alpha * direction`` to the activation at ``hook``.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        hook: a hook name, e.g. ``em_interp.hooks.resid_post(19)`` (BLOCK-EM's "layer 20").
        direction: a vector with the activation's trailing shape (``[d_model]`` for the residual
            stream, ``[d_mlp]`` for ``mlp.hook_post``, ``[n_heads, d_head]`` or flat for
            ``attn.hook_z``), e.g. an SAE decoder row.
        alpha: the scale; 0 is the identity, negative values steer away.
        positions: ``"all"`` every position; ``"generated"`` only the positions produced during
            generation (see the module docstring: :func:`generated_positions`).
        normalize: scale ``direction`` to unit norm first.
        controls: also build steerings along same-norm control directions (``"random"``,
            ``"orthogonal"``; :mod:`em_interp.behaviour.controls`), in ``iv.controls``.
        n_controls: draws per control kind.
        control_seed: seed of the control draws.

    Returns:
        A :class:`Steering`.
    """
    return Steering(model, hook, direction, alpha, positions=positions, normalize=normalize,
                    controls=controls, n_controls=n_controls, control_seed=control_seed)


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------ composition


class Composition(Intervention):
    """Several interventions applied together; hooks run in the order given (see
    :func:`compose`)."""

    kind = "compose"

    def __init__(self, parts: Sequence[Intervention]):
        flat: list[Intervention] = []
        for p in parts:
            if p is None:
                continue
            if isinstance(p, Composition):
                flat.extend(p.parts)
            elif isinstance(p, Intervention):
                flat.append(p)
            else:
                raise ConfigError(f"compose takes interventions, got {type(p).__name__}.")
        self.parts = flat
        self.source = flat[0].source if flat else None
        self.model = flat[0].model if flat else None
        self._active = set()
        self._entered = []

    def _prepare(self) -> None:  # noqa: B027 (optional hook, empty by default)
        for p in self.parts:
            p._prepare()

    def _hooks(self) -> list[tuple[str, HookFn]]:
        return [h for p in self.parts for h in p._hooks()]

    def check_compatible(self, model) -> None:
        for p in self.parts:
            p.check_compatible(model)

    @contextlib.contextmanager
    def applied(self, model=None) -> Iterator[Intervention]:
        if model is None and self.model is None:
            yield self  # the empty composition: nothing to attach
            return
        tl = self.model if model is None else unwrap(model)
        busy = [p for p in self.parts if id(tl) in p._active]
        if id(tl) in self._active or busy:
            raise RuntimeError("compose: an intervention in it is already active on this model.")
        self.check_compatible(tl)
        fwd = self.fwd_hooks()
        self._active.add(id(tl))
        for p in self.parts:
            p._active.add(id(tl))
        try:
            with H.attached(tl, fwd):
                yield self
        finally:
            self._active.discard(id(tl))
            for p in self.parts:
                p._active.discard(id(tl))

    def describe(self) -> dict:
        if not self.parts:
            return {"kind": "none"}
        if len(self.parts) == 1:
            return self.parts[0].describe()
        return {"kind": self.kind, "parts": [p.describe() for p in self.parts]}

    def state(self) -> dict[str, torch.Tensor]:
        if len(self.parts) == 1:
            return self.parts[0].state()
        return {f"{i}/{k}": v for i, p in enumerate(self.parts) for k, v in p.state().items()}


def compose(*interventions: Intervention | None) -> Composition:
    """Apply several interventions together; hooks on the same point run in argument order.

    ``None`` entries are skipped, and ``compose()`` is the identity, so a "baseline" condition can
    be written as ``None``.

    Args:
        *interventions: the interventions (nested compositions are flattened).

    Returns:
        A :class:`Composition`.
    """
    return Composition(interventions)


def as_intervention(x) -> Composition:
    """One :class:`Composition` from ``None``, an intervention, or a sequence of them."""
    if x is None:
        return Composition([])
    if isinstance(x, Intervention):
        return x if isinstance(x, Composition) else Composition([x])
    if isinstance(x, Sequence) and not isinstance(x, str):
        return Composition(list(x))
    raise ConfigError(f"interventions must be an intervention, a list of them or None, got "
                      f"{type(x).__name__}.")
