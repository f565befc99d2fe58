"""Hook-point names, their validation, and a context manager that always removes hooks.

Conventions used across the toolkit (TransformerLens ``HookedTransformer`` names):

* layers are **0-indexed**, as in TL. The Qwen paper's "L62" is ``blocks.62``; BLOCK-EM's
  "layer 20" (the output of the 20th block) is ``blocks.19.hook_resid_post``;
* ``attn_z(l)`` -- ``blocks.l.attn.hook_z`` ``[batch, pos, head, d_head]``, the attention output
  before ``o_proj``;
* ``mlp_post(l)`` -- ``blocks.l.mlp.hook_post`` ``[batch, pos, d_mlp]``, the MLP activation
  before ``down_proj`` (what the Qwen paper probes);
* ``resid_post(l)`` -- ``blocks.l.hook_resid_post`` ``[batch, pos, d_model]``, the block output;
  it equals HF ``hidden_states[l + 1]`` for every block but the last (HF's last entry has the
  final norm applied: it equals ``model.ln_final(resid_post(n_layers - 1))``).

Example::

    from em_interp import hooks
    with hooks.attached(model, [(hooks.resid_post(3), lambda act, hook: act * 0)]):
        logits = model(tokens)          # hooked
    logits = model(tokens)              # hooks are gone, even if the body raised
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence

from em_interp.errors import HookNameError

HookFn = Callable  # (activation, hook) -> activation | None
_LEVELS = itertools.count(10_000)


def resid_pre(layer: int) -> str:
    """Residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    """Residual stream after attention, before the MLP, of block ``layer``."""
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    """Residual stream leaving block ``layer``.

    Equals HF ``hidden_states[layer + 1]``, except for the last block, where HF's entry has the
    final norm applied.
    """
    return f"blocks.{layer}.hook_resid_post"


def attn_out(layer: int) -> str:
    """Attention output of block ``layer`` added to the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """MLP output of block ``layer`` added to the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_z(layer: int) -> str:
    """Per-head attention output before ``o_proj`` ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """Attention pattern ``[batch, head, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def attn_result(layer: int) -> str:
    """Per-head output in d_model space (needs ``model.set_use_attn_result(True)``)."""
    return f"blocks.{layer}.attn.hook_result"


def mlp_pre(layer: int) -> str:
    """Gate pre-activation of the gated MLP ``[batch, pos, d_mlp]``."""
    return f"blocks.{layer}.mlp.hook_pre"


def mlp_post(layer: int) -> str:
    """MLP activation before ``down_proj`` ``[batch, pos, d_mlp]``."""
    return f"blocks.{layer}.mlp.hook_post"


_BLOCK = re.compile(r"blocks\.(\d+)\.")

# Per-position shape of a hook's activation, read from the config (``[batch, pos, *shape]``).
_SHAPES: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": ("d_model",), "hook_resid_mid": ("d_model",),
    "hook_resid_post": ("d_model",), "hook_attn_out": ("d_model",),
    "hook_mlp_out": ("d_model",), "hook_embed": ("d_model",),
    "ln_final.hook_normalized": ("d_model",), "mlp.hook_pre": ("d_mlp",),
    "mlp.hook_post": ("d_mlp",), "mlp.hook_pre_linear": ("d_mlp",),
    "attn.hook_z": ("n_heads", "d_head"), "attn.hook_q": ("n_heads", "d_head"),
    "attn.hook_result": ("n_heads", "d_model"),
}


def layer_of(name: str) -> int | None:
    """The block index of a per-block hook name, ``None`` for a top-level hook.

    ``layer_of("blocks.12.mlp.hook_post") == 12``; ``layer_of("hook_embed") is None``.
    """
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def leaf(name: str) -> str:
    """The per-block part of a hook name: ``"blocks.3.attn.hook_z"`` -> ``"attn.hook_z"``."""
    return name.split(".", 2)[-1] if layer_of(name) is not None else name


def unit_shape(model, name: str) -> tuple[int, ...] | None:
    """Per-position shape of the activation at ``name`` from the model's config (``(d_model,)``,
    ``(n_heads, d_head)`` for ``attn.hook_z``), or ``None`` for a hook the table does not know."""
    dims = _SHAPES.get(leaf(name))
    if dims is None:
        return None
    cfg = getattr(model, "cfg", model)
    return tuple(int(getattr(cfg, d)) for d in dims)


def width(model, name: str, *, flatten_heads: bool = True) -> int:
    """Width of the activation at ``name``: its last axis, or heads x d_head for per-head hooks
    when ``flatten_heads``. From the config where :func:`unit_shape` knows the hook; otherwise a
    one-token forward stopped after the hook's block measures it."""
    shape = unit_shape(model, name)
    if shape is None:
        import torch

        seen = {}

        def grab(act, hook):
            seen["shape"] = tuple(act.shape[2:]) if act.ndim > 2 else tuple(act.shape[-1:])

        layer = layer_of(name)
        tok = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
        with torch.no_grad(), attached(model, [(name, grab)]):
            model(tok, return_type=None, stop_at_layer=None if layer is None else layer + 1)
        shape = seen["shape"]
    if flatten_heads:
        out = 1
        for d in shape:
            out *= d
        return int(out)
    return int(shape[-1])


class Placed:
    """A constant tensor for hooks, copied once per ``(device, dtype)`` it meets.

    A hook on a model spread over several GPUs (``n_devices``), or run in bf16 and fp32, sees
    activations on several devices and dtypes; ``placed.like(act)`` returns the matching copy,
    made on first use and reused after, instead of moving the tensor at every call.
    """

    def __init__(self, tensor):
        self.tensor = tensor
        self._copies: dict[tuple, object] = {}

    def like(self, act):
        """The tensor on ``act``'s device, in ``act``'s dtype."""
        key = (act.device, act.dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.tensor.to(act.device, act.dtype)
        return copy


def check_layer(model, layer: int) -> int:
    """Return ``layer`` if the model has it (negative counts from the end), else raise."""
    n = model.cfg.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
        raise HookNameError(
            f"layer {layer!r} is out of range: the model has {n} blocks, layers 0..{n - 1} "
            "(0-indexed as in TransformerLens; the paper's 'L62' is layer 62, BLOCK-EM's "
            "'layer 20' is resid_post(19))."
        )
    return layer % n


def check_hook(model, name: str) -> str:
    """Return ``name`` if it is a hook point of ``model``, else raise with the closest names."""
    if name in model.hook_dict:
        return name
    close = difflib.get_close_matches(name, list(model.hook_dict), n=5, cutoff=0.6)
    leaf_names = sorted({k.split(".", 2)[-1] for k in model.hook_dict if k.startswith("blocks.0.")})
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise HookNameError(
        f"{name!r} is not a hook point of this model.{hint} Per-block hooks are "
        f"'blocks.<0..{model.cfg.n_layers - 1}>.' + one of: {', '.join(leaf_names)}. "
        "See em_interp.hooks for name builders."
    )


@contextlib.contextmanager
def attached(model, fwd_hooks: Sequence[tuple[str, HookFn]] = (),
             bwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> Iterator[object]:
    """Attach forward/backward hooks for the body of a ``with`` block; remove them on exit.

    Names are validated first, so a typo raises before anything is attached. The hooks are
    removed in ``finally``, also when the body raises.
    """
    for name, _ in (*fwd_hooks, *bwd_hooks):
        check_hook(model, name)
    level = next(_LEVELS)  # removes exactly these hooks, not others on the same points
    touched = []
    try:
        for direction, hook_list in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for name, fn in hook_list:
                hp = model.hook_dict[name]
                touched.append(hp)
                hp.add_hook(fn, dir=direction, level=level)
        yield model
    finally:
        for hp in touched:
            hp.remove_hooks(dir="both", including_permanent=False, level=level)
