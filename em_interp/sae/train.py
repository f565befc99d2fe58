"""Training an SAE on a hook of a loaded model, through SAE-Lens's own trainer.

An SAE (BLOCK-EM A.1; the Qwen paper, Sec. V, trains one on layer 62's residual stream with
expansion factor 23 and L1 coefficient 0.05) learns ``E``, ``D`` minimising, over token
activations ``x`` of one hook,

    L = ||x - D(E(x))||^2 + sparsity(E(x))

with the sparsity term of the architecture: ``l1_coefficient * sum_k z_k ||W_dec[k]||``
(standard), a hard top-k per token (``topk``) or per batch (``batchtopk``, saved as JumpReLU), or
an L0 penalty through a learned threshold (``jumprelu``). All four are SAE-Lens's classes and
losses, trained by SAE-Lens's ``SAETrainer``; em-interp only feeds it data and records results.

:func:`train_sae` takes ``data`` as

* **prompts** (strings, conversations, a ``PromptSet``): their real tokens' activations, chat
  template applied once, computed in batches with the forward stopped after the hook's block, held
  in memory (at most ``training_tokens`` rows), then fed to ``SAETrainer``;
* an **activation store** (:class:`em_interp.activations.cache.ActivationStore`, ideally
  ``reduce="none"``): rows streamed by ``store.iter_batches(shuffle=True)``, one new permutation
  per epoch, so the model never runs again -- train many SAEs on one store;
* a **tensor** ``[n, d_in]`` or an **iterator** of ``[batch, d_in]`` tensors;
* **local text** (a ``datasets.Dataset`` with a ``text`` column, a ``.txt`` file with one document
  per line, a ``.jsonl`` file with ``text`` fields, or :func:`text_dataset`): SAE-Lens's
  ``LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=...)``, which
  tokenizes plain text into ``context_size`` windows and computes activations while training.

It writes SAE-Lens's folder (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``)
whose ``cfg.json`` also names card, variant, hook, data and this config under
``metadata["em_interp"]``, plus ``result/`` (the :class:`SAETrainResult`), atomically. At the end
it evaluates the SAE (:func:`em_interp.sae.evaluate.evaluate_sae`: explained variance, L0,
dead-latent fraction, CE-loss recovered). Pass ``eval_prompts=`` held out from training
(:func:`em_interp.sae.evaluate.held_out_split`): they are checked against the training prompts by
content id (``train_prompts=`` names them for a store or tensor), and ``metrics.on_training_data``
says whether any was trained on. Without them the metrics are measured on the first training
prompts or rows and flagged ``on_training_data=True``. Calling it again with the same model, hook,
data and config returns the saved result without training (re-evaluated when other
``eval_prompts`` are passed). wandb is off unless ``wandb=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import signal
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from em_interp import hooks
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.inputs import as_prompt_list, describe_model, tokenizer_of, unwrap
from em_interp.results import Result, json_safe
from em_interp.sae.data import (
    capture_first,
    describe_data,
    is_text,
    iterator_batches,
    special_token_ids,
    store_batches,
    tensor_batches,
    text_dataset,
    text_windows,
)
from em_interp.sae.evaluate import SAEMetrics, collect_token_activations, evaluate_sae
from em_interp.sae.load import META_KEY, load_sae, write_sae_files

log = logging.getLogger(__name__)

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")


@dataclasses.dataclass
class SAETrainConfig:
    """How to train an SAE (every field is saved with the SAE)."""

    architecture: Architecture = "standard"
    """``"standard"`` (ReLU + L1), ``"topk"``, ``"batchtopk"`` (saved as JumpReLU) or
    ``"jumprelu"``."""
    expansion_factor: int = 8
    """``d_sae = expansion_factor * d_in`` (the Qwen paper uses 23)."""
    k: int = 32
    """Active latents per token for ``topk`` (on average per batch for ``batchtopk``)."""
    l1_coefficient: float = 5.0
    """Weight of the L1 penalty of ``standard`` SAEs (the Qwen paper: 0.05; the right value
    depends on the activations' scale, see ``normalize_activations``)."""
    l0_coefficient: float = 1.0
    """Weight of the L0 penalty of ``jumprelu`` SAEs."""
    sparsity_warm_up_steps: int = 0
    """Steps over which the L1/L0 coefficient ramps up from 0."""
    lr: float = 3e-4
    """Adam learning rate."""
    lr_end: float | None = None
    """Final learning rate of a decaying schedule (SAE-Lens requires it; ``None`` -> lr / 10)."""
    lr_scheduler: Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"] = (
        "constant")
    """SAE-Lens learning-rate schedule."""
    lr_warm_up_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay_steps: int = 0
    """Steps of linear decay to ``lr_end`` at the end (``constant`` schedule)."""
    training_tokens: int = 200_000
    """Token budget: steps = training_tokens // batch_size (data is cycled in epochs)."""
    batch_size: int = 1024
    """Activations (tokens) per training step."""
    normalize_activations: Literal["none", "expected_average_only_in"] = (
        "expected_average_only_in")
    """``"expected_average_only_in"`` (default) scales inputs to mean norm sqrt(d_in) during
    training and folds the factor into the saved weights, so the L1/L0 coefficients mean the same
    on every model and layer (residual norms range from ~1 to ~1000); ``"none"`` trains on raw
    activations (SAE-Lens's default)."""
    exclude_special_tokens: bool = True
    """Skip BOS/EOS/pad-id tokens (attention-sink outliers) in prompt and text data (a store
    keeps every real token)."""
    context_size: int = 128
    """Tokens per window for local text data."""
    model_batch_size: int = 8
    """Prompts per model forward when computing activations."""
    n_batches_in_buffer: int = 8
    """SAE-Lens runner's activation buffer (local text data), in model batches."""
    n_batches_for_norm_estimate: int = 20
    """Batches used to estimate the normalisation factor."""
    dead_feature_window: int = 1000
    """Steps without firing after which SAE-Lens counts a latent as dead."""
    seed: int = 0
    """Seed of weight initialisation and data order."""
    device: str | None = None
    """Device of the SAE; ``None``: the device of the hook's block."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the SAE's weights."""
    out_dir: str | None = None
    """Where to write the SAE folder; ``None``: ``<em_interp cache>/saes/<model>/<hook>-...``."""
    eval_tokens: int = 4096
    """Activation rows used for the final explained variance / L0 / dead fraction."""
    eval_prompts: int = 16
    """Prompts (or texts) used for the final CE-loss metrics when none are passed."""
    ce_loss: bool = True
    """Compute CE-loss recovered at the end (needs prompts or text)."""
    wandb: bool = False
    """Log to Weights & Biases (off by default; never contacted otherwise)."""
    wandb_project: str = "em-interp-sae"
    """wandb project when ``wandb=True``."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got "
                              f"{self.architecture!r}.")
        for name in ("expansion_factor", "k", "training_tokens", "batch_size", "context_size",
                     "model_batch_size", "n_batches_in_buffer", "n_batches_for_norm_estimate",
                     "dead_feature_window", "eval_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"SAETrainConfig.{name} must be a positive integer, got "
                                  f"{getattr(self, name)!r}.")
        for name in ("sparsity_warm_up_steps", "lr_warm_up_steps", "lr_decay_steps",
                     "eval_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SAETrainConfig.{name} must be >= 0.")
        if self.lr <= 0 or self.l1_coefficient < 0 or self.l0_coefficient < 0:
            raise ConfigError("lr must be > 0 and the sparsity coefficients >= 0.")
        if self.lr_end is None:
            self.lr_end = self.lr / 10
        if self.training_tokens < self.batch_size:
            raise ConfigError(f"training_tokens ({self.training_tokens}) is less than one batch "
                              f"({self.batch_size}); raise training_tokens.")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ConfigError("normalize_activations must be 'none' or "
                              "'expected_average_only_in'.")
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)

    @property
    def n_steps(self) -> int:
        """Training steps: ``training_tokens // batch_size``."""
        return self.training_tokens // self.batch_size

    def to_dict(self) -> dict:
        """The config as JSON data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAETrainConfig:
        """A config from :meth:`to_dict` (unknown keys raise)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"unknown SAETrainConfig fields {bad}.")
        return cls(**d)


# ------------------------------------------------------------------ result


@dataclasses.dataclass(frozen=True)
class SAETrainResult(Result):
    """A trained SAE: where it is, how training went, and its final metrics."""

    kind = "sae_train"
    sae_dir: str
    """The SAE-Lens folder (``load_sae(sae_dir)`` reopens the SAE)."""
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    card: str | None
    variant: str | None
    data: dict
    """What the SAE was trained on (kind, size, hash)."""
    config: dict
    """The :class:`SAETrainConfig`."""
    metrics: SAEMetrics
    mse_curve: np.ndarray
    """Per step: the batch's squared reconstruction error per token (summed over d_in), in the
    units the SAE trained on (after ``normalize_activations``)."""
    ev_curve: np.ndarray
    """Per step: explained variance of the batch."""
    n_steps: int
    n_tokens: int
    train_seconds: float
    eval_data: dict | None = None
    """What :attr:`metrics` were measured on: ``{"kind": "training data"}`` or ``{"kind":
    "prompts", "hash": ..., "n_prompts": ...}``."""

    @property
    def sae(self):
        """The trained SAE (inference form), loaded from :attr:`sae_dir` on first use."""
        sae = self.__dict__.get("_sae")
        if sae is None:
            sae = load_sae(self.sae_dir)
            object.__setattr__(self, "_sae", sae)
        return sae

    @property
    def df(self) -> pd.DataFrame:
        """One row per step: ``step``, ``mse``, ``explained_variance``."""
        return pd.DataFrame({"step": np.arange(len(self.mse_curve)), "mse": self.mse_curve,
                             "explained_variance": self.ev_curve})

    def to_dict(self) -> dict:
        return {"sae_dir": self.sae_dir, "hook": self.hook, "architecture": self.architecture,
                "d_in": self.d_in, "d_sae": self.d_sae, "card": self.card,
                "variant": self.variant, "n_steps": self.n_steps, "n_tokens": self.n_tokens,
                "train_seconds": self.train_seconds,
                "tokens_per_second": self.n_tokens / self.train_seconds
                if self.train_seconds > 0 else None,
                **{k: v for k, v in self.metrics.to_dict().items()
                   if k in ("explained_variance", "l0", "dead_fraction", "ce_recovered",
                            "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "on_training_data",
                            "n_train_overlap")},
                "n_eval_tokens": self.metrics.n_tokens, "n_eval_prompts": self.metrics.n_prompts}

    def figure(self, title: str | None = None):
        """Training curve: batch MSE (log scale) and batch explained variance per step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(specs=[[{"secondary_y": True}]])
        steps = np.arange(len(self.mse_curve))
        fig.add_trace(go.Scatter(x=steps, y=self.mse_curve, name="MSE"), secondary_y=False)
        fig.add_trace(go.Scatter(x=steps, y=self.ev_curve, name="explained variance"),
                      secondary_y=True)
        fig.update_layout(template="plotly_white",
                          title=title or (f"{self.architecture} SAE at {self.hook} "
                                          f"(d_sae {self.d_sae}): final EV "
                                          f"{self.metrics.explained_variance:.3f}, L0 "
                                          f"{self.metrics.l0:.1f}"))
        fig.update_xaxes(title_text="training step")
        fig.update_yaxes(title_text="reconstruction MSE", type="log", secondary_y=False)
        fig.update_yaxes(title_text="explained variance", secondary_y=True)
        return fig


# ------------------------------------------------------------------ SAE-Lens glue


def training_sae_config(cfg: SAETrainConfig, d_in: int, device: str, hook: str):
    """The SAE-Lens training config (``StandardTrainingSAEConfig``, ...) for ``cfg``."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    common = {"d_in": d_in, "d_sae": d_in * cfg.expansion_factor, "dtype": cfg.dtype,
              "device": device, "normalize_activations": cfg.normalize_activations,
              "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none"}
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > common["d_sae"]:
        raise ConfigError(f"k={cfg.k} exceeds d_sae={common['d_sae']}.")
    if cfg.architecture == "standard":
        return StandardTrainingSAEConfig(**common, l1_coefficient=cfg.l1_coefficient,
                                         l1_warm_up_steps=cfg.sparsity_warm_up_steps)
    if cfg.architecture == "topk":
        return TopKTrainingSAEConfig(**common, k=cfg.k)
    if cfg.architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, k=cfg.k)
    return JumpReLUTrainingSAEConfig(**common, l0_coefficient=cfg.l0_coefficient,
                                     l0_warm_up_steps=cfg.sparsity_warm_up_steps)


def trainer_config(cfg: SAETrainConfig, device: str):
    """SAE-Lens's ``SAETrainerConfig`` for ``cfg`` (no checkpoints; wandb only if asked)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=cfg.n_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr_end,
        lr_scheduler_name=cfg.lr_scheduler, lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps, device=device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 2000),
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=cfg.wandb, wandb_project=cfg.wandb_project))


def _batch_variance(x: torch.Tensor) -> torch.Tensor:
    """``mean_t ||x_t - mean(x)||^2`` of a ``[batch, d]`` batch (two kernels)."""
    return torch.var(x.detach().float(), dim=0, correction=0).sum()


class _LossRecorder:
    """Per-step batch MSE and explained variance of a runner's training, read through the
    SAE's own hook points (the SAETrainer path records them in :func:`recording_trainer`)."""

    def __init__(self, sae):
        self.sae = sae
        self.rows: list[torch.Tensor] = []
        self._x: torch.Tensor | None = None

    def _input(self, x, hook):
        self._x = x.detach()

    def _recons(self, x_hat, hook):
        x = self._x
        if x is None or not self.sae.training:
            return
        err = (x_hat.detach().float() - x.float()).pow(2).sum(-1).mean()
        self.rows.append(torch.stack([err, _batch_variance(x)]))

    @contextlib.contextmanager
    def attached(self):
        self.sae.hook_sae_input.add_hook(self._input)
        self.sae.hook_sae_recons.add_hook(self._recons)
        try:
            yield self
        finally:
            self.sae.hook_sae_input.remove_hooks()
            self.sae.hook_sae_recons.remove_hooks()

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        return _curves(self.rows)


def _curves(rows: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros(0), np.zeros(0)
    t = torch.stack(rows).double().cpu().numpy()
    return t[:, 0], 1.0 - t[:, 0] / np.maximum(t[:, 1], 1e-30)


@functools.cache
def recording_trainer():
    """SAE-Lens's ``SAETrainer`` with :meth:`step` also keeping each step's MSE (SAE-Lens's own
    ``mse_loss``, no extra work) and batch variance, for the per-step curves."""
    from sae_lens import SAETrainer

    class RecordingSAETrainer(SAETrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_rows: list[torch.Tensor] = []

        def step(self, batch):
            out = super().step(batch)
            self.loss_rows.append(torch.stack([out.losses["mse_loss"].detach().float(),
                                               _batch_variance(out.sae_in)]))
            return out

        def curves(self) -> tuple[np.ndarray, np.ndarray]:
            return _curves(self.loss_rows)

    return RecordingSAETrainer


_TQDM_MODULES = ("sae_lens.training.sae_trainer", "sae_lens.training.activation_scaler",
                 "sae_lens.training.activations_store")


@contextlib.contextmanager
def quiet_sae_lens(progress: bool):
    """SAE-Lens's progress bars off (``progress=False``), its chatter about overridden models /
    datasets silenced, and the signal handlers its runner installs restored afterwards."""
    import importlib

    patched = []
    if not progress:
        for name in _TQDM_MODULES:
            mod = importlib.import_module(name)
            patched.append((mod, mod.tqdm))
            mod.tqdm = functools.partial(mod.tqdm, disable=True)
    sl_log = logging.getLogger("sae_lens")
    level = sl_log.level
    sl_log.setLevel(logging.ERROR)
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            handlers[sig] = signal.getsignal(sig)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(not tokenized|fewer samples|exhausted)")
            yield
    finally:
        for mod, orig in patched:
            mod.tqdm = orig
        sl_log.setLevel(level)
        for sig, h in handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, h)


def _hook_device(tl, hook: str) -> str:
    layer = hooks.layer_of(hook)
    if layer is None:
        return str(tl.cfg.device)
    return str(next(tl.blocks[layer].parameters()).device)


def _default_out_dir(model, hook: str, cfg: SAETrainConfig, data_info: dict) -> Path:
    from em_interp.models.cache import cache_dir

    info = describe_model(model)
    name = info.get("card") or info.get("model_name") or "model"
    if info.get("variant"):
        name = f"{name}-{info['variant']}"
    key = json.dumps([hook, cfg.to_dict(), data_info, info], sort_keys=True, default=str)
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return cache_dir() / "saes" / safe / (f"{hook}-{cfg.architecture}-"
                                          f"x{cfg.expansion_factor}-{h}")


def _identity(model, hook: str, cfg: SAETrainConfig, data_info: dict) -> dict:
    conf = cfg.to_dict()
    for k in ("out_dir", "device", "wandb", "wandb_project"):
        conf.pop(k)
    info = describe_model(model)
    return json_safe({"hook": hook, "config": conf, "data": data_info,
                      "model": {k: info.get(k) for k in ("card", "variant", "model_name",
                                                         "n_layers", "d_model")}})


def _cached(folder: Path, ident: dict, overwrite: bool) -> SAETrainResult | None:
    from em_interp.atomic import is_complete

    if not (folder.exists() and is_complete(folder)) or overwrite:
        return None
    try:
        meta = json.loads((folder / "cfg.json").read_text())["metadata"][META_KEY]
    except (OSError, KeyError, ValueError):
        meta = None
    stored = None if meta is None else meta.get("identity")
    if stored is not None and stored == ident and ident["data"].get("kind") != "iterator" and (
            folder / "result").is_dir():
        log.info("reusing the SAE trained in %s", folder)
        return SAETrainResult.load(folder / "result")
    diff = ("its settings differ" if stored is None else
            ", ".join(f"{k} differs" for k in ident if stored.get(k) != ident.get(k))
            or "it was trained on data that cannot be identified (an iterator)")
    raise StoreMismatchError(f"{str(folder)!r} already holds an SAE but {diff}; pass "
                             "another out_dir, or overwrite=True to replace it.")


# ------------------------------------------------------------------ sizes (text data)


def check_text_sizes(cfg: SAETrainConfig, dataset, tokenizer) -> int | None:
    """Check, before SAE-Lens's runner starts, that it can serve batches from ``dataset``.

    The runner concatenates the texts (a BOS at the start of each ``context_size`` window, a
    separator between texts) into full windows only, runs the model on them and keeps an
    activation buffer of ``n_batches_in_buffer * context_size`` tokens from which it serves
    ``batch_size``-token training batches. SAE-Lens raises a bare ``ValueError`` from deep inside
    its runner when the buffer is smaller than one batch or the text holds no full window; here
    each case is an error naming the numbers and the fix. Text shorter than one batch is refused
    too (every batch would repeat the same tokens), as for a tensor with fewer rows than a batch.

    Args:
        cfg: the training config.
        dataset: the text (``datasets`` dataset with a ``text`` column); ``None`` checks only the
            config.
        tokenizer: the model's tokenizer (counts the tokens the runner would make).

    Returns:
        The tokens counted (counting stops once both limits are met), or ``None`` without data.

    Raises:
        ConfigError: the buffer is smaller than one training batch.
        DataError: the text is shorter than one context window or one training batch.
    """
    n_buf, ctx, batch = cfg.n_batches_in_buffer, cfg.context_size, cfg.batch_size
    buffer = n_buf * ctx
    if buffer < batch:
        raise ConfigError(
            f"training from text, SAE-Lens's runner buffers n_batches_in_buffer x context_size = "
            f"{n_buf} x {ctx} = {buffer} tokens, fewer than one training batch "
            f"(batch_size={batch}). Raise n_batches_in_buffer to {-(-batch // ctx)} (or "
            f"context_size to {-(-batch // n_buf)}), or lower batch_size to {buffer}.")
    if dataset is None:
        return None
    need = max(ctx, batch)
    n_tok = n_texts = 0
    for row in dataset:
        n_tok += len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
        n_texts += 1
        if n_tok >= need:
            return n_tok
    if n_tok < ctx:  # (the BOS and separators it adds are not counted: they are filtered out)
        raise DataError(
            f"the text holds {n_tok} tokens in {n_texts} texts, fewer than one context window "
            f"(context_size={ctx}), so SAE-Lens's runner, which uses full windows only, would "
            f"find nothing to train on. Pass more text (at least {ctx} tokens), or lower "
            f"context_size to {n_tok}.")
    if n_tok < batch:
        raise DataError(
            f"the text holds {n_tok} tokens in {n_texts} texts, fewer than one training batch "
            f"(batch_size={batch}): every batch would repeat the same tokens. Pass more text (at "
            f"least {batch} tokens), or lower batch_size to {n_tok} (and training_tokens with "
            "it).")
    return n_tok


# ------------------------------------------------------------------ train


def _eval_data(eval_prompts) -> dict:
    from em_interp.inputs import n_prompts, prompts_hash

    if eval_prompts is None:
        return {"kind": "training data"}
    return {"kind": "prompts", "hash": prompts_hash(eval_prompts),
            "n_prompts": n_prompts(eval_prompts)}


def _training_prompts(kind: str, data, train_prompts):
    """The prompts (or texts) the SAE trains on, for the content-id check of the evaluation
    prompts; ``None`` when they cannot be known (a store, tensor or iterator without
    ``train_prompts``)."""
    if train_prompts is not None:
        return train_prompts
    if kind == "prompts":
        return data
    if kind == "text":
        return list(text_dataset(data)["text"])
    return None


def train_sae(model, hook: str, data, cfg: SAETrainConfig | None = None, *,
              eval_prompts=None, train_prompts=None, overwrite: bool = False,
              progress: bool = True) -> SAETrainResult:
    """Train an SAE-Lens SAE on ``hook`` of ``model`` (see the module docstring).

    Args:
        model: a ``Loaded`` or ``HookedTransformer`` (the organism, the base, ...).
        hook: the hook point, e.g. ``em_interp.hooks.resid_post(62)``.
        data: prompts / a ``PromptSet``, an ``ActivationStore``, a ``[n, d_in]`` tensor, an
            iterator of ``[batch, d_in]`` tensors, or local text (``datasets.Dataset``, a
            ``.txt``/``.jsonl`` path, :func:`text_dataset`).
        cfg: the :class:`SAETrainConfig` (default: its defaults).
        eval_prompts: prompts for the final metrics, held out from training (default: the
            first ``cfg.eval_prompts`` training prompts or texts; for a store or tensor, its
            first ``eval_tokens`` rows and no CE loss; ``on_training_data`` is then True).
        train_prompts: the prompts a store or tensor was computed from, to check
            ``eval_prompts`` against by content id (prompts and text data are known already);
            without them ``on_training_data`` is ``None`` (unknown) for such data.
        overwrite: retrain even if ``out_dir`` holds this SAE, or replace one trained otherwise.
        progress: show progress bars.

    Returns:
        :class:`SAETrainResult` (``.sae`` is the trained SAE; ``.sae_dir`` its folder).

    Raises:
        HookNameError: ``hook`` is not a hook point of the model.
        ConfigError: local text with an activation buffer (``n_batches_in_buffer *
            context_size``) smaller than one batch (:func:`check_text_sizes`).
        DataError: empty or unusable data (a store without the hook, too few rows, text shorter
            than one context window or one batch).
        StoreMismatchError: ``out_dir`` holds another SAE and ``overwrite`` is False.
    """
    from sae_lens import TrainingSAE
    from sae_lens.util import temporary_seed

    from em_interp.atomic import atomic_dir
    from em_interp.hooks import check_hook

    cfg = cfg or SAETrainConfig()
    tl = unwrap(model)
    check_hook(tl, hook)
    d_in = hooks.width(tl, hook)
    if is_text(data):  # SAE-Lens's runner sizes, before the text is even read
        check_text_sizes(cfg, None, None)
    kind, data_info = describe_data(model, hook, data)
    if kind == "text":
        check_text_sizes(cfg, text_dataset(data), tokenizer_of(model))
    if kind == "store":
        width = int(np.prod(data.shape(hook)[1:]))
        if width != d_in:
            raise DataError(f"the store's {hook} rows have width {width}, the model's hook "
                            f"{d_in}: the store was written by another model.")
    device = cfg.device or _hook_device(tl, hook)
    folder = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir(model, hook, cfg, data_info)
    ident = _identity(model, hook, cfg, data_info)
    known = _training_prompts(kind, data, train_prompts) if eval_prompts is not None else None
    cached = _cached(folder, ident, overwrite)
    if cached is not None:
        if eval_prompts is None or cached.eval_data == _eval_data(eval_prompts):
            return cached
        log.info("re-evaluating the saved SAE on the eval_prompts given")
        metrics = evaluate_sae(model, cached.sae, eval_prompts, hook_name=hook,
                               max_tokens=cfg.eval_tokens, batch_size=cfg.model_batch_size,
                               ce_loss=cfg.ce_loss, train_prompts=known)
        return dataclasses.replace(cached, metrics=metrics, eval_data=_eval_data(eval_prompts))
    info = describe_model(model)
    meta = {"card": info.get("card"), "variant": info.get("variant"), "hook": hook,
            "data": data_info, "model": info, "train_config": cfg.to_dict(), "identity": ident}

    # evaluation data: eval_prompts if given (checked by content id against the training
    # prompts), else (part of) the training data, said so
    eval_acts, on_train, ce_prompts = None, True if eval_prompts is None else None, eval_prompts
    if eval_prompts is None and kind == "prompts":
        ce_prompts = as_prompt_list(data)[:max(cfg.eval_prompts, 1)]
    elif eval_prompts is None and kind == "text":
        ce_prompts = text_windows(model, text_dataset(data)["text"][:max(cfg.eval_prompts, 1)],
                                  cfg.context_size)
    with temporary_seed(cfg.seed), quiet_sae_lens(progress), atomic_dir(
            folder, meta={"what": "em-interp SAE"}) as tmp:
        sae_cfg = training_sae_config(cfg, d_in, device, hook)
        if kind == "text":
            t0 = time.perf_counter()
            sae, recorder = _train_with_runner(model, hook, text_dataset(data), cfg, sae_cfg,
                                               device, tmp)
            train_seconds = time.perf_counter() - t0
        else:
            first_rows: list[torch.Tensor] = []
            if kind == "prompts":
                acts = collect_token_activations(
                    model, hook, data, max_tokens=cfg.training_tokens,
                    batch_size=cfg.model_batch_size,
                    exclude_token_ids=special_token_ids(model) if cfg.exclude_special_tokens
                    else frozenset(), dtype=torch.float32, progress=progress)
                provider = tensor_batches(acts, cfg.batch_size, cfg.seed)
                first_rows.append(acts[:cfg.eval_tokens])
            elif kind == "tensor":
                provider = tensor_batches(data, cfg.batch_size, cfg.seed)
                first_rows.append(data.flatten(1)[:cfg.eval_tokens])
            elif kind == "store":
                provider = store_batches(data, hook, cfg.batch_size, cfg.seed)
                first_rows.append(next(data.iter_batches(hook, cfg.eval_tokens)).flatten(1))
            else:
                provider = capture_first(iterator_batches(data, cfg.batch_size),
                                          first_rows, cfg.eval_tokens)
            sae = TrainingSAE.from_dict(sae_cfg.to_dict())
            wandb_run = None
            if cfg.wandb:
                import wandb

                wandb_run = wandb.init(project=cfg.wandb_project, config=json_safe(meta))
            trainer = recording_trainer()(cfg=trainer_config(cfg, device), sae=sae,
                                          data_provider=provider, evaluator=None)
            recorder = trainer
            t0 = time.perf_counter()
            trainer.fit()
            train_seconds = time.perf_counter() - t0
            if wandb_run is not None:
                wandb_run.finish()
            if eval_prompts is None:
                eval_acts = torch.cat(first_rows)[:cfg.eval_tokens].float()
            _set_metadata(sae, model, hook)
            write_sae_files(sae, tmp)
            from safetensors.torch import save_file

            save_file({"sparsity": trainer.log_feature_sparsity},
                      str(tmp / "sparsity.safetensors"))
        _add_meta(tmp / "cfg.json", meta)
        trained = load_sae(tmp, device=device)
        metrics = evaluate_sae(model, trained, ce_prompts, acts=eval_acts, hook_name=hook,
                               max_tokens=cfg.eval_tokens, batch_size=cfg.model_batch_size,
                               ce_loss=cfg.ce_loss and ce_prompts is not None,
                               on_training_data=on_train, train_prompts=known)
        mse, ev = recorder.curves()
        result = SAETrainResult(
            sae_dir=str(folder), hook=hook, architecture=cfg.architecture, d_in=d_in,
            d_sae=int(trained.cfg.d_sae), card=info.get("card"), variant=info.get("variant"),
            data=data_info, config=cfg.to_dict(), metrics=metrics, mse_curve=mse, ev_curve=ev,
            n_steps=int(len(mse)), n_tokens=int(len(mse)) * cfg.batch_size,
            train_seconds=float(train_seconds), eval_data=_eval_data(eval_prompts))
        result.save(tmp / "result")
    object.__setattr__(result, "_sae", trained)
    return result


def _set_metadata(sae, model, hook: str) -> None:
    info = describe_model(model)
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = info.get("card") or info.get("model_name")
    sae.cfg.metadata.hook_head_index = None


def _add_meta(cfg_path: Path, meta: dict) -> None:
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("metadata", {})[META_KEY] = json_safe(meta)
    cfg_path.write_text(json.dumps(cfg, indent=1))


def _train_with_runner(model, hook: str, dataset, cfg: SAETrainConfig, sae_cfg, device: str,
                       out: Path):
    """SAE-Lens's ``LanguageModelSAETrainingRunner`` on local text, writing into ``out``."""
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )

    info = describe_model(model)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=info.get("card") or info.get("model_name") or "model",
        hook_name=hook, dataset_path="", streaming=False, is_dataset_tokenized=False,
        context_size=cfg.context_size, training_tokens=cfg.n_steps * cfg.batch_size,
        train_batch_size_tokens=cfg.batch_size, store_batch_size_prompts=cfg.model_batch_size,
        n_batches_in_buffer=cfg.n_batches_in_buffer, lr=cfg.lr, lr_end=cfg.lr_end,
        lr_scheduler_name=cfg.lr_scheduler, lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps, device=device, dtype=cfg.dtype, seed=cfg.seed,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 2000),
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        exclude_special_tokens=cfg.exclude_special_tokens,
        logger=LoggingConfig(log_to_wandb=cfg.wandb, wandb_project=cfg.wandb_project),
        checkpoint_path=None, output_path=str(out), verbose=False,
        model_from_pretrained_kwargs={})
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_model=unwrap(model),
                                            override_dataset=dataset)
    recorder = _LossRecorder(runner.sae)
    with recorder.attached():
        sae = runner.run()
    return sae, recorder


__all__ = ["ARCHITECTURES", "SAETrainConfig", "SAETrainResult", "check_text_sizes",
           "text_dataset", "train_sae", "trainer_config", "training_sae_config"]
