"""How good an SAE is on a model: explained variance, L0, dead latents, CE-loss recovered.

On activations ``x`` (rows = tokens) with reconstructions ``x_hat = D(E(x))``:

* explained variance ``EV = 1 - mean_t ||x_t - x_hat_t||^2 / mean_t ||x_t - mean(x)||^2``
  (SAE-Lens's ``metrics/explained_variance``);
* ``L0 = mean_t #{k : z_{t,k} > 0}``, the latents active per token;
* dead fraction: latents that never fire on the evaluated tokens (``latent_density`` keeps each
  latent's firing rate);

and on prompts, by splicing the SAE into the forward **without** the error term, the next-token
cross-entropy over real tokens (SAE-Lens's ``get_recons_loss``, with the attention mask):

    CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

where ``CE_zero`` zero-ablates the hook's activation. 1 means the reconstruction loses nothing
the model needs; 0 means it is as bad as deleting the activation.

**On which tokens.** Every one of these numbers flatters an SAE measured on its own training
tokens. :func:`evaluate_sae` takes ``train_prompts=`` (what the SAE was trained on) and sets
``on_training_data`` whenever any evaluated prompt is among them, by content id
(:func:`em_interp.data.prompt_ids`), recording how many (``n_train_overlap``).
:func:`held_out_split` cuts a prompt mixture into a held-out evaluation part of at least
``n_tokens`` real tokens (capped by the prompts available) and the rest, to train on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from em_interp.errors import ConfigError, DataError
from em_interp.inputs import as_prompt_list, n_prompts, token_batches, unwrap
from em_interp.results import Result
from em_interp.sae.encode import hook_activation_batches
from em_interp.sae.load import check_sae


@dataclasses.dataclass(frozen=True)
class ActivationMetrics:
    """What :func:`activation_metrics` returns: the SAE's reconstruction and sparsity on
    activation rows (see the module docstring)."""

    explained_variance: float
    mse: float
    """Mean squared reconstruction error per token, summed over ``d_in``."""
    l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Fraction of latents that never fire on these rows."""
    n_tokens: int
    latent_density: np.ndarray
    """``[d_sae]``: fraction of the rows on which each latent fires."""


@dataclasses.dataclass(frozen=True)
class CEMetrics:
    """What :func:`ce_metrics` returns: next-token cross-entropy over real positions, clean,
    with the SAE spliced in (no error term) and with the hook zero-ablated. Every loss is
    ``None`` when the prompts held no next-token position (``n_ce_tokens == 0``)."""

    ce_loss_clean: float | None = None
    ce_loss_sae: float | None = None
    ce_loss_zero: float | None = None
    ce_recovered: float | None = None
    """``(CE_zero - CE_sae) / (CE_zero - CE_clean)``; ``None`` when ``CE_zero == CE_clean``."""
    kl_div_sae: float | None = None
    """Mean KL(clean || spliced) of the next-token distributions over real positions."""
    n_ce_tokens: int = 0
    """Next-token positions averaged over."""


@dataclasses.dataclass(frozen=True)
class SAEMetrics(Result):
    """Quality of an SAE on a model's activations (see the module docstring)."""

    kind = "sae_metrics"
    hook: str
    d_in: int
    d_sae: int
    explained_variance: float
    mse: float
    """Mean squared reconstruction error per token, summed over ``d_in``."""
    l0: float
    dead_fraction: float
    n_tokens: int
    latent_density: np.ndarray
    """``[d_sae]``: fraction of evaluated tokens on which each latent fires."""
    ce_loss_clean: float | None = None
    ce_loss_sae: float | None = None
    ce_loss_zero: float | None = None
    ce_recovered: float | None = None
    kl_div_sae: float | None = None
    """Mean KL(clean || spliced) of the next-token distributions over real positions."""
    n_ce_tokens: int = 0
    on_training_data: bool | None = None
    """True when any evaluated prompt (or row) was also trained on, False when none was
    (checked by content id), ``None`` when unknown."""
    n_prompts: int | None = None
    """Prompts evaluated on (``None`` for activation rows given directly)."""
    n_train_overlap: int | None = None
    """Evaluated prompts that are also training prompts (``None``: not checked)."""

    @property
    def df(self) -> pd.DataFrame:
        """One row per latent: ``latent``, ``density``, ``log10_density``."""
        d = self.latent_density.astype(np.float64)
        return pd.DataFrame({"latent": np.arange(len(d)), "density": d,
                             "log10_density": np.log10(d + 1e-10)})

    def to_dict(self) -> dict:
        keys = ("hook", "d_in", "d_sae", "explained_variance", "mse", "l0", "dead_fraction",
                "n_tokens", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_recovered",
                "kl_div_sae", "n_ce_tokens", "on_training_data", "n_prompts",
                "n_train_overlap")
        return {k: getattr(self, k) for k in keys}

    def figure(self, title: str | None = None):
        """Histogram of log10 latent firing density (dead latents at -10)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.df["log10_density"], nbinsx=50))
        fig.update_layout(template="plotly_white",
                          title=title or (f"SAE latent density at {self.hook}: EV "
                                          f"{self.explained_variance:.3f}, L0 {self.l0:.1f}, "
                                          f"dead {self.dead_fraction:.1%}"),
                          xaxis_title="log10(fraction of tokens the latent fires on)",
                          yaxis_title="latents")
        return fig


@torch.no_grad()
def activation_metrics(sae, acts: Float[torch.Tensor, "n d_in"], *,
                       batch_size: int = 4096) -> ActivationMetrics:
    """EV, MSE, L0, dead fraction and per-latent density of ``sae`` on rows ``acts``, as an
    :class:`ActivationMetrics`."""
    dev = sae.W_enc.device
    n = acts.shape[0]
    if n == 0:
        raise DataError("activation_metrics needs at least one activation row; pass more "
                        "prompts or tokens.")
    mean = torch.zeros(acts.shape[1], dtype=torch.float64, device=dev)
    for i in range(0, n, batch_size):
        mean += acts[i:i + batch_size].to(dev, torch.float64).sum(0)
    mean /= n
    err = var = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=dev)
    for i in range(0, n, batch_size):
        x = acts[i:i + batch_size].to(dev)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        xf = x.to(torch.float64)
        err += float((x_hat.to(torch.float64) - xf).pow(2).sum())
        var += float((xf - mean).pow(2).sum())
        active = z > 0
        l0 += float(active.sum())
        fired += active.sum(0).to(torch.float64)
    density = (fired / n).cpu().numpy()
    return ActivationMetrics(explained_variance=1.0 - err / var if var > 0 else float("nan"),
                             mse=err / n, l0=l0 / n, dead_fraction=float((density == 0).mean()),
                             n_tokens=int(n), latent_density=density)


@torch.no_grad()
def collect_token_activations(model, hook: str, prompts, *, max_tokens: int | None = None,
                              batch_size: int = 8, chat: bool = True, system: str | None = None,
                              exclude_token_ids: set[int] | frozenset[int] = frozenset(),
                              dtype: torch.dtype | None = torch.float32,
                              progress: bool = False) -> Float[torch.Tensor, "n d_in"]:
    """Every real token's activation at ``hook`` over ``prompts`` as rows ``[n_tokens, d_in]``.

    Tokens whose id is in ``exclude_token_ids`` are skipped; collection stops once
    ``max_tokens`` rows are gathered. ``attn.hook_z`` rows are flattened over heads.
    """
    rows: list[torch.Tensor] = []
    have = 0
    bar = tqdm(total=n_prompts(prompts), desc=f"activations {hook}", disable=not progress,
               leave=False)
    excl = torch.tensor(sorted(exclude_token_ids), dtype=torch.long)
    for _, toks, mask, acts in hook_activation_batches(model, hook, prompts,
                                                       batch_size=batch_size, chat=chat,
                                                       system=system):
        keep = mask.bool()
        if len(excl):
            keep &= ~torch.isin(toks, excl.to(toks.device))
        flat = acts.flatten(2) if acts.ndim == 4 else acts
        sel = flat[keep.to(flat.device)]
        rows.append(sel.to("cpu", dtype) if dtype is not None else sel.cpu())
        have += sel.shape[0]
        bar.update(acts.shape[0])
        if max_tokens is not None and have >= max_tokens:
            break
    bar.close()
    out = torch.cat(rows) if rows else torch.empty(0)
    return out[:max_tokens] if max_tokens is not None else out


@torch.no_grad()
def ce_metrics(model, sae, prompts, *, hook_name: str | None = None, batch_size: int = 8,
               chat: bool = True, system: str | None = None,
               progress: bool = False) -> CEMetrics:
    """CE loss clean / with the SAE (no error term) / zero-ablated, CE recovered and KL, averaged
    over real next-token positions, through SAE-Lens's ``get_recons_loss``, as a
    :class:`CEMetrics`."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    tl = unwrap(model)
    hook = check_sae(model, sae, hook_name)
    sums = {"ce_loss_without_sae": 0.0, "ce_loss_with_sae": 0.0, "ce_loss_with_ablation": 0.0,
            "kl_div_with_sae": 0.0}
    n_tok = n_pos = 0
    bar = tqdm(total=n_prompts(prompts), desc="CE loss", disable=not progress, leave=False)
    for batch in token_batches(model, prompts, batch_size, chat=chat, system=system):
        toks, mask = batch.tokens.tokens, batch.tokens.attention_mask
        if toks.shape[1] < 2:
            continue
        m = get_recons_loss(sae, tl, ActivationScaler(), toks, compute_kl=True,
                            compute_ce_loss=True, model_kwargs={"attention_mask": mask},
                            hook_name=hook)
        nxt = (mask[:, :-1].bool() & mask[:, 1:].bool())
        real = mask.bool()
        for k in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation"):
            sums[k] += float(m[k].float()[nxt.to(m[k].device)].sum())
        sums["kl_div_with_sae"] += float(m["kl_div_with_sae"].float()[
            real.to(m["kl_div_with_sae"].device)].sum())
        n_tok += int(nxt.sum())
        n_pos += int(real.sum())
        bar.update(len(batch.tokens))
    bar.close()
    if n_tok == 0:
        return CEMetrics(n_ce_tokens=0)
    clean = sums["ce_loss_without_sae"] / n_tok
    with_sae = sums["ce_loss_with_sae"] / n_tok
    zero = sums["ce_loss_with_ablation"] / n_tok
    return CEMetrics(ce_loss_clean=clean, ce_loss_sae=with_sae, ce_loss_zero=zero,
                     ce_recovered=(zero - with_sae) / (zero - clean) if zero != clean else None,
                     kl_div_sae=sums["kl_div_with_sae"] / n_pos, n_ce_tokens=n_tok)


def training_overlap(prompts, train_prompts) -> int:
    """How many of ``prompts`` are among ``train_prompts``, by content id."""
    from em_interp.data import prompt_ids

    train = set(prompt_ids(as_prompt_list(train_prompts)))
    return sum(i in train for i in prompt_ids(as_prompt_list(prompts)))


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    """What :func:`held_out_split` returns: the held-out evaluation prompts and the rest."""

    evaluation: object
    """The held-out prompts (a ``PromptSet`` when one was split)."""
    rest: object
    """Every other prompt, to train on."""
    n_tokens: int
    """Real tokens of the evaluation prompts (chat template included)."""
    capped: bool
    """True when the cap on the evaluation share stopped it short of the tokens asked."""


def held_out_split(model, prompts, n_tokens: int, *, seed: int = 0,
                   max_fraction: float = 0.25, chat: bool = True,
                   system: str | None = None) -> HeldOutSplit:
    """Hold out prompts for evaluating an SAE: drawn in a seeded random order until their real
    tokens reach ``n_tokens``, at most ``max_fraction`` of the prompts (so enough are left to
    train on) and at least one; the rest are returned for training.

    Args:
        model: the model whose tokenizer counts the tokens.
        prompts: a ``PromptSet`` or a list of prompts (the mixture the SAE would train on).
        n_tokens: real tokens wanted in the evaluation part.
        seed: seeds the order.
        max_fraction: largest share of the prompts held out.
        chat: count tokens with the chat template applied, as the forwards read them.
        system: a system message for text prompts.

    Raises:
        DataError: fewer than two prompts.
        ConfigError: ``n_tokens < 1`` or ``max_fraction`` outside (0, 1).
    """
    import random

    from em_interp.inputs import tokenize

    if n_tokens < 1 or not 0 < max_fraction < 1:
        raise ConfigError(f"held_out_split needs n_tokens >= 1 and max_fraction in (0, 1), got "
                          f"{n_tokens} and {max_fraction}.")
    items = as_prompt_list(prompts)
    if len(items) < 2:
        raise DataError(f"held_out_split needs at least two prompts (one to evaluate on, one to "
                        f"train on), got {len(items)}.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cap = max(1, int(max_fraction * len(items)))
    chosen, have = [], 0
    for start in range(0, cap, 64):  # tokenize in chunks: stop as soon as there are enough
        part = order[start:min(cap, start + 64)]
        lengths = tokenize(model, [items[i] for i in part], chat=chat,
                           system=system).attention_mask.sum(-1).tolist()
        for i, n in zip(part, lengths, strict=True):
            chosen.append(i)
            have += int(n)
            if have >= n_tokens:
                break
        if have >= n_tokens:
            break
    keep = sorted(set(range(len(items))) - set(chosen))
    chosen.sort()
    if hasattr(prompts, "subset") and hasattr(prompts, "meta"):
        name = getattr(prompts, "name", "prompts")
        ev, rest = (prompts.subset(chosen, f"{name}[held-out]"),
                    prompts.subset(keep, f"{name}[train]"))
    else:
        ev, rest = [items[i] for i in chosen], [items[i] for i in keep]
    return HeldOutSplit(evaluation=ev, rest=rest, n_tokens=have, capped=have < n_tokens)


def evaluate_sae(model, sae, prompts=None, *, acts: torch.Tensor | None = None,
                 hook_name: str | None = None, max_tokens: int = 4096, batch_size: int = 8,
                 chat: bool = True, system: str | None = None, ce_loss: bool = True,
                 on_training_data: bool | None = None, train_prompts=None,
                 progress: bool = False) -> SAEMetrics:
    """Evaluate ``sae`` on ``model`` (module docstring): activation metrics and CE recovered.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        sae: an SAE-Lens SAE (checked against the model).
        prompts: prompts to read activations from and to score CE on.
        acts: ``[n, d_in]`` activation rows to use instead of reading them from ``prompts``
            (CE is then computed only if ``prompts`` is also given).
        hook_name: the hook, if not the SAE's own.
        max_tokens: most activation rows read from ``prompts``.
        batch_size: prompts per forward.
        chat: apply the chat template to text prompts.
        system: a system message for text prompts.
        ce_loss: compute the CE metrics (three forwards per batch).
        on_training_data: were these tokens trained on? Recorded; with ``train_prompts`` it
            is also set True when any of ``prompts`` is a training prompt.
        train_prompts: the SAE's training prompts: ``prompts`` are checked against them by
            content id (``n_train_overlap``; ``on_training_data`` False when none is shared).
        progress: show progress bars.

    Returns:
        :class:`SAEMetrics`.
    """
    hook = check_sae(model, sae, hook_name)
    if acts is None and prompts is None:
        raise ConfigError("evaluate_sae needs prompts (or acts=, activation rows) to evaluate "
                          "on.")
    if acts is None:
        acts = collect_token_activations(model, hook, prompts, max_tokens=max_tokens,
                                         batch_size=batch_size, chat=chat, system=system,
                                         progress=progress)
    am = activation_metrics(sae, acts.flatten(1) if acts.ndim > 2 else acts)
    cm = (ce_metrics(model, sae, prompts, hook_name=hook, batch_size=batch_size, chat=chat,
                     system=system, progress=progress)
          if ce_loss and prompts is not None else CEMetrics())
    overlap = None
    if train_prompts is not None and prompts is not None:
        try:
            overlap = training_overlap(prompts, train_prompts)
        except DataError:  # token ids have no content ids to compare
            overlap = None
        if overlap is not None:
            on_training_data = bool(on_training_data) or overlap > 0
    return SAEMetrics(hook=hook, d_in=int(sae.cfg.d_in), d_sae=int(sae.cfg.d_sae),
                      explained_variance=am.explained_variance, mse=am.mse, l0=am.l0,
                      dead_fraction=am.dead_fraction, n_tokens=am.n_tokens,
                      latent_density=am.latent_density, ce_loss_clean=cm.ce_loss_clean,
                      ce_loss_sae=cm.ce_loss_sae, ce_loss_zero=cm.ce_loss_zero,
                      ce_recovered=cm.ce_recovered, kl_div_sae=cm.kl_div_sae,
                      n_ce_tokens=cm.n_ce_tokens, on_training_data=on_training_data,
                      n_prompts=None if prompts is None else n_prompts(prompts),
                      n_train_overlap=overlap)


__all__ = ["ActivationMetrics", "CEMetrics", "HeldOutSplit", "SAEMetrics", "activation_metrics",
           "ce_metrics", "collect_token_activations", "evaluate_sae", "held_out_split",
           "training_overlap"]
