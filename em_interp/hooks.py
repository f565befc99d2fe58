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
