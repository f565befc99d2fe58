"""Caching activations: run the model once per batch and stream what the hooks saw to disk.

Later analyses (probes, directions, SAE training, BLOCK-EM stage 1) read activations from an
:class:`~em_interp.activations.store.ActivationStore` instead of running the model again.
:func:`cache_activations` runs the model **once per batch** with every requested hook and writes
what the hooks saw, reduced over positions, to the store's safetensors shards plus a JSON
manifest (the format: :mod:`em_interp.activations.store`). For a prompt with real tokens
``t = 1..T`` (padding never counts, left or right):

* ``"last"`` -- ``h[T]`` (the Qwen paper, Sec. III.A / Experiment 1, reads the input of
  ``down_proj``, ``blocks.l.mlp.hook_post``, at the last prompt token);
* ``"mean"`` -- ``(1/T) sum_t h[t]`` (accumulated in fp32);
* ``"none"`` -- every ``h[t]``; rows of prompt ``i`` are ``offsets[i]:offsets[i+1]``.

Hooks keep their trailing axes (``attn.hook_z`` -> ``(n_heads, d_head)``).

**Streaming.** Each hook pools inside the forward (the ``[batch, pos, ...]`` activation is
dropped when the hook returns), the forward stops after the deepest requested block
(``stop_at_layer``), and each batch's rows go straight to their offset in the shard file:
memory is one batch of rows, whatever the number of prompts. The Qwen paper's scale (64 layers
x d_mlp 27648 x 12,000 prompts, bf16, ``"last"``) is 64 * 27648 * 12000 * 2 bytes = 42.5 GB,
written shard by shard; the size is logged (and shown in the progress bar) before starting.

**In memory.** With ``out_dir=None`` nothing is written: the same batches, padding, hook checks
and stopped forward fill an :class:`Activations` (``acts[hook]`` is ``[n_prompts, *trailing]``,
or ``[n_tokens, *trailing]`` with ``offsets`` for ``"none"``), equal to what a store would hold.
It suits a notebook's few dozen prompts; :meth:`Activations.to_store` writes one later.

**Resume.** A shard is listed in the manifest only once it is complete and renamed into place,
so a run killed at any moment (SIGKILL included) resumes from the first unlisted shard, and
leftovers are deleted, never read. Shard boundaries are batch boundaries, so every batch is
padded and computed as before: the files are byte-identical to an uninterrupted run's. A store
written with other settings is refused with :class:`~em_interp.errors.StoreMismatchError`; a
finished one is returned without computing.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from em_interp.activations.store import (
    DTYPES,
    FORMAT_VERSION,
    LENGTHS_KEY,
    MANIFEST,
    REDUCES,
    ActivationStore,
    ShardWriter,
    clear,
    disk_estimate,
    dtype_name,
    human_bytes,
    locked,
    read_manifest,
    remove_partials,
    resolve_dtype,
    shard_name,
    write_manifest,
)
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.hooks import attached, check_hook, layer_of
from em_interp.inputs import (
    Batch,
    Reduce,
    describe_model,
    n_prompts,
    pool,
    prompts_hash,
    token_batches,
    unwrap,
)
from em_interp.models.chat import ChatTokens

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
"""Target size of a shard when ``shard_size`` is not given (memory does not depend on it)."""

_NO_POS_AXIS = ("hook_pattern", "hook_attn_scores")
_IDENTITY = ("model", "hooks", "prompts_hash", "n_prompts", "reduce", "dtype", "batch_size",
             "shard_size")


# ------------------------------------------------------------------ settings and identity


def _hook_list(hooks) -> list[str]:
    names = list(dict.fromkeys([hooks] if isinstance(hooks, str) else list(hooks or [])))
    if not names or not all(isinstance(h, str) for h in names):
        raise ConfigError(f"no hooks given, or not strings ({names[:3]}); pass a hook name or a "
                          "list, e.g. [hooks.mlp_post(l) for l in range(model.cfg.n_layers)].")
    return names


def _check_hooks(tl, names: list[str]) -> None:
    for h in names:
        check_hook(tl, h)
        if h.endswith(_NO_POS_AXIS):
            raise ConfigError(f"{h!r} is [batch, head, query_pos, key_pos], not [batch, pos, ...]"
                              ", so it cannot be pooled over positions; cache hook_z, hook_q or "
                              "the residual instead, or use run_with_cache for patterns.")


def stop_layer(names: Sequence[str]) -> int | None:
    """``stop_at_layer`` for a forward that only needs ``names``: the deepest block + 1 (``None``
    when a hook after the blocks, such as ``ln_final``, is asked for)."""
    deepest = -1
    for h in names:
        layer = layer_of(h)
        if layer is not None:
            deepest = max(deepest, layer)
        elif not h.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
            return None
    return deepest + 1


def _fingerprint(tl) -> str:
    """A hash of a small corner of every parameter: tells two models' weights apart cheaply."""
    h = hashlib.sha256()
    for name, p in tl.named_parameters():
        corner = p.detach()[tuple(slice(0, 4) for _ in range(p.ndim - 1)) + (slice(0, 16),)]
        h.update(name.encode())
        h.update(corner.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def _model_identity(model) -> dict:
    info = describe_model(model)
    info["fingerprint"] = _fingerprint(unwrap(model))
    return info


def _prompt_meta(prompts) -> dict:
    """Labels, split, groups and description of a PromptSet (``None`` for other inputs)."""
    if hasattr(prompts, "prompts") and hasattr(prompts, "describe"):
        return {"labels": None if prompts.labels is None else list(prompts.labels),
                "label_names": {str(k): v for k, v in prompts.label_names.items()},
                "split": list(prompts.split),
                "groups": None if prompts.groups is None else list(prompts.groups),
                "prompt_set": prompts.describe()}
    return {"labels": None, "label_names": {}, "split": None, "groups": None,
            "prompt_set": None}


def _short(m: dict | None) -> str:
    m = m or {}
    return (f"{m.get('card') or m.get('model_name')}"
            f"{' (' + m['variant'] + ')' if m.get('variant') else ''}, weights "
            f"{m.get('fingerprint')}")


def _differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for key in _IDENTITY:
        a, b = stored.get(key), wanted.get(key)
        if key == "shard_size" and b is None:
            continue  # None: whatever the store has
        if key == "hooks":
            a, b = sorted(a or []), sorted(b or [])
            if a != b:
                extra, missing = sorted(set(b) - set(a)), sorted(set(a) - set(b))
                out.append(f"hooks: the store has {len(a)}, the call asks for {len(b)} "
                           f"(new: {extra[:4]}, not asked: {missing[:4]})")
            continue
        if key == "model":
            if (a or {}).get("fingerprint") != (b or {}).get("fingerprint"):
                out.append(f"model: stored {_short(a)}, requested {_short(b)}")
            continue
        if a != b:
            label = "prompts" if key in ("prompts_hash", "n_prompts") else key
            out.append(f"{label}: stored {a!r}, requested {b!r}")
    return out


def _check_context(tl, lengths: Sequence[int]) -> None:
    long = [(i, x) for i, x in enumerate(lengths) if x > tl.cfg.n_ctx]
    if long:
        raise DataError(f"{len(long)} prompt(s) are longer than the model's context of "
                        f"{tl.cfg.n_ctx} tokens (prompt, tokens: {long[:5]}); shorten or drop "
                        "them, e.g. prompt_set.subset([...]).")


# ------------------------------------------------------------------ the forward


def _pooled_forward(tl, batch, names: list[str], reduce: str, stop: int | None,
                    out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One forward of ``batch``; each hook pools its activation at once (nothing else kept)."""
    got: dict[str, torch.Tensor] = {}
    mask = batch.tokens.attention_mask

    def grab(name):
        def hook(act, hook):
            pooled = pool(act.detach(), mask, reduce)
            if reduce == "none":
                pooled = torch.cat(pooled)
            got[name] = pooled.to(out_dtype)
        return hook

    with attached(tl, [(h, grab(h)) for h in names]):
        tl(batch.tokens.tokens, attention_mask=mask, return_type=None, stop_at_layer=stop)
    return {h: got[h].to("cpu") for h in names}


def _probe_shapes(model, prompts, names, *, chat, system, stop) -> dict[str, list[int]]:
    """Trailing shape of each hook, from a forward of one token (the first prompt's last)."""
    first = next(token_batches(model, prompts, 1, chat=chat, system=system, stop=1))
    ct = first.tokens
    one = Batch(0, ChatTokens(ct.tokens[:, -1:], ct.attention_mask[:, -1:], ct.texts))
    out = _pooled_forward(unwrap(model), one, names, "last", stop, unwrap(model).cfg.dtype)
    return {h: list(out[h].shape[1:]) for h in names}


# ------------------------------------------------------------------ in memory


@dataclass(frozen=True)
class Activations:
    """Activations held in memory: what ``cache_activations(..., out_dir=None)`` returns.

    The rows are those an :class:`ActivationStore` of the same call would hold, and the reading
    API is the store's (:meth:`load`, :meth:`shape`, :attr:`offsets`, :attr:`labels`, ...), so
    code written for one reads the other.
    """

    acts: dict[str, torch.Tensor]
    """``{hook: [n_prompts, *trailing]}`` for ``"last"`` / ``"mean"``; ``{hook: [n_tokens,
    *trailing]}`` for ``"none"`` (the rows of prompt ``i`` are ``offsets[i]:offsets[i+1]``)."""
    hooks: tuple[str, ...]
    """The hook names, in the order they were asked for."""
    reduce: str
    """``"last"``, ``"mean"`` or ``"none"``."""
    texts: tuple[str, ...]
    """Each prompt as the model read it (the rendered chat template; ``""`` for token ids)."""
    lengths: tuple[int, ...]
    """Real (non-pad) tokens of each prompt."""
    prompts_hash: str
    """The hash a store of the same prompts records (pairs two results of the same prompts)."""
    model: dict
    """The model's identity (card, variant, shape)."""
    labels: tuple[int, ...] | None = None
    """A labelled PromptSet's labels (``None`` for other prompt inputs)."""
    split: tuple[str, ...] | None = None
    """A PromptSet's ``train``/``test`` split."""
    groups: tuple[str, ...] | None = None
    """A PromptSet's groups."""

    @property
    def n_prompts(self) -> int:
        return len(self.lengths)

    @property
    def n_rows(self) -> int:
        """Rows per hook: ``n_prompts``, or the number of tokens for ``reduce="none"``."""
        return int(self.acts[self.hooks[0]].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.acts[self.hooks[0]].dtype

    @property
    def offsets(self) -> torch.Tensor:
        """``[n_prompts + 1]`` row offsets, as :attr:`ActivationStore.offsets`."""
        if self.reduce != "none":
            return torch.arange(self.n_prompts + 1, dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.tensor(self.lengths, dtype=torch.long).cumsum(0)])

    def _check(self, hook: str) -> None:
        if hook not in self.acts:
            raise DataError(f"no hook {hook!r} was cached; these were: {list(self.hooks)[:4]}. "
                            "Run cache_activations again with it in hooks.")

    def shape(self, hook: str) -> tuple[int, ...]:
        """``(n_rows, *trailing)`` of ``hook``."""
        self._check(hook)
        return tuple(self.acts[hook].shape)

    def load(self, hook: str, *, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """``hook``'s ``[n_rows, *trailing]`` matrix (``dtype`` converts)."""
        self._check(hook)
        out = self.acts[hook]
        return out if dtype is None else out.to(resolve_dtype(dtype, out.dtype))

    def per_prompt(self, hook: str) -> list[torch.Tensor]:
        """``hook``'s rows split by prompt: ``[T_i, *trailing]`` each for ``"none"``,
        ``[1, *trailing]`` each otherwise."""
        return list(self.load(hook).split(torch.diff(self.offsets).tolist()))

    def to_store(self, out_dir: str | Path, *, overwrite: bool = False) -> ActivationStore:
        """Write these rows as an :class:`ActivationStore` (for the analyses that read one)."""
        return ActivationStore.from_tensors(
            out_dir, self.acts, labels=self.labels, split=self.split, groups=self.groups,
            reduce=self.reduce, lengths=self.lengths if self.reduce == "none" else None,
            prompts_hash=self.prompts_hash, description={"model": self.model},
            overwrite=overwrite)

    def __repr__(self) -> str:
        return (f"Activations({len(self.hooks)} hooks, n_prompts={self.n_prompts}, "
                f"reduce={self.reduce!r}, dtype={dtype_name(self.dtype)})")


def _in_memory(model, prompts, names: list[str], *, batch_size: int, reduce: str,
               out_dtype: torch.dtype, chat: bool, system: str | None,
               progress: bool) -> Activations:
    """The forward of the store path, batch for batch, kept in memory."""
    tl = unwrap(model)
    batches = list(token_batches(model, prompts, batch_size, chat=chat, system=system))
    lengths = [x for b in batches for x in b.tokens.lengths]  # token ids only: before forwards
    _check_context(tl, lengths)
    stop = stop_layer(names)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in names}
    bar = tqdm(total=len(lengths), unit="prompt", disable=not progress,
               desc=f"caching {len(names)} hooks in memory")
    try:
        for batch in batches:
            out = _pooled_forward(tl, batch, names, reduce, stop, out_dtype)
            for h in names:
                parts[h].append(out[h])
            bar.update(len(batch.tokens))
    finally:
        bar.close()
    meta = _prompt_meta(prompts)
    return Activations(
        acts={h: torch.cat(parts[h]) for h in names}, hooks=tuple(names), reduce=reduce,
        texts=tuple(t for b in batches for t in b.tokens.texts), lengths=tuple(lengths),
        prompts_hash=prompts_hash(prompts, chat=chat, system=system),
        model=describe_model(model),
        **{k: None if meta[k] is None else tuple(meta[k]) for k in ("labels", "split", "groups")})


# ------------------------------------------------------------------ caching


@torch.no_grad()
def cache_activations(model, prompts, hooks: str | Sequence[str],
                      out_dir: str | Path | None = None, *, batch_size: int = 8,
                      reduce: Reduce = "last", dtype: str | torch.dtype | None = None,
                      chat: bool = True, system: str | None = None,
                      shard_size: int | None = None, overwrite: bool = False,
                      progress: bool = True) -> ActivationStore | Activations:
    """Run ``model`` over ``prompts`` and stream ``hooks``' activations to a store in ``out_dir``
    (or, with ``out_dir=None``, return them in memory).

    Resumable: call it again with the same arguments after an interruption and it continues
    from the last complete shard; on a finished store it returns at once (see the module
    docstring for the guarantees).

    Example (a notebook, no files)::

        acts = cache_activations(lm, prompts, [hooks.resid_post(l) for l in range(4)])
        acts.load(hooks.resid_post(3)).shape   # (len(prompts), d_model)

    Args:
        model: a :class:`~em_interp.models.loading.Loaded` or a bare ``HookedTransformer``.
        prompts: anything :func:`em_interp.inputs.token_batches` accepts (strings,
            conversations, a :class:`~em_interp.data.PromptSet`, ``ChatTokens``, token ids);
            a labelled PromptSet's labels, split and groups are kept in the manifest.
        hooks: a hook name or a list (``hooks.mlp_post(l)``, ...); checked before any forward.
        out_dir: the store's folder (created if needed); ``None`` keeps the activations in
            memory and returns an :class:`Activations` (nothing is written).
        batch_size: prompts per forward. Part of the store's identity (padding, numerics).
        reduce: ``"last"`` (last real token), ``"mean"`` (mean over real tokens) or ``"none"``
            (every real token; rows of prompt ``i`` are ``store.offsets[i]:offsets[i+1]``).
        dtype: ``None`` keeps the model's dtype; ``"float16"``, ``"bfloat16"``, ``"float32"``
            convert when writing.
        chat: apply the chat template (once) to text prompts; ``False`` tokenizes plain text.
        system: a system message for conversations that have none.
        shard_size: prompts per shard, a multiple of ``batch_size``; ``None`` picks about
            256 MiB per shard (or, when resuming, whatever the store uses).
        overwrite: replace a store written with other settings instead of refusing it.
        progress: show a tqdm progress bar.

    Returns:
        The finished :class:`ActivationStore`, or :class:`Activations` for ``out_dir=None``.

    Raises:
        HookNameError: a hook name the model does not have (before any forward).
        ConfigError: bad ``reduce``, ``dtype``, ``batch_size`` or ``shard_size``, no hooks, or a
            hook without a position axis.
        DataError: no prompts; another process writing the same store.
        StoreMismatchError: ``out_dir`` holds a store written with other settings.
    """
    tl = unwrap(model)
    names = _hook_list(hooks)
    if reduce not in REDUCES:
        raise ConfigError(f"reduce must be one of {list(REDUCES)}, got {reduce!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if out_dir is None and (shard_size is not None or overwrite):
        raise ConfigError("shard_size and overwrite apply to a store on disk; pass out_dir, or "
                          "leave them out to keep the activations in memory.")
    if shard_size is not None and not (isinstance(shard_size, int) and shard_size > 0
                                       and shard_size % batch_size == 0):
        good = batch_size * max(1, round(shard_size / batch_size)) if isinstance(
            shard_size, int) else batch_size
        raise ConfigError(f"shard_size must be a positive multiple of batch_size={batch_size} "
                          f"(a resumed run restarts at a shard boundary, which must be a batch "
                          f"boundary), got {shard_size!r}; use shard_size={good}.")
    n = n_prompts(prompts)  # DataError when empty
    _check_hooks(tl, names)
    out_dtype = resolve_dtype(dtype, tl.cfg.dtype)
    if out_dir is None:
        return _in_memory(model, prompts, names, batch_size=batch_size, reduce=reduce,
                          out_dtype=out_dtype, chat=chat, system=system, progress=progress)
    wanted = {"model": _model_identity(model), "hooks": names,
              "prompts_hash": prompts_hash(prompts, chat=chat, system=system), "n_prompts": n,
              "reduce": reduce, "dtype": dtype_name(out_dtype), "batch_size": batch_size,
              "shard_size": shard_size}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stop = stop_layer(names)
    with locked(folder):
        manifest = read_manifest(folder)
        if manifest is not None and overwrite:
            clear(folder)
            manifest = None
        meta = _prompt_meta(prompts)
        if manifest is not None:
            diffs = _differences(manifest, wanted)
            if diffs:
                raise StoreMismatchError(
                    f"the activation store {str(folder)!r} was written with other settings: "
                    + "; ".join(diffs) + ". Use another out_dir, or pass overwrite=True to "
                    "replace it.")
            if meta["labels"] is not None and any(manifest.get(k) != v for k, v in meta.items()):
                manifest.update(meta)  # labels are metadata: update them, keep the data
                write_manifest(folder, manifest)
            if manifest["complete"]:
                return ActivationStore.open(folder)
        remove_partials(folder)
        if manifest is None:
            manifest = _new_manifest(model, prompts, names, wanted, meta, chat=chat,
                                     system=system, stop=stop, out_dtype=out_dtype)
            for p in folder.glob("shard_*.safetensors"):
                p.unlink()  # shards of an unfinished first run: not listed, never trusted
            write_manifest(folder, manifest)
        _run_shards(model, prompts, folder, manifest, chat=chat, system=system, stop=stop,
                    progress=progress)
    return ActivationStore.open(folder)


def _new_manifest(model, prompts, names, wanted, meta, *, chat, system, stop, out_dtype) -> dict:
    from em_interp import __version__

    tl = unwrap(model)
    n, batch_size, reduce = wanted["n_prompts"], wanted["batch_size"], wanted["reduce"]
    lengths = [x for b in token_batches(model, prompts, batch_size, chat=chat, system=system)
               for x in b.tokens.lengths]  # token ids only: checked before any forward
    _check_context(tl, lengths)
    shapes = _probe_shapes(model, prompts, names, chat=chat, system=system, stop=stop)
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    per_row = sum(math.prod(shapes[h]) for h in names) * itemsize
    if reduce == "none":
        tokens, rows_note = sum(lengths), f"{sum(lengths)} tokens of {n} prompts"
    else:
        tokens, rows_note = n, f"{n} prompts"
    estimate = per_row * tokens
    shard_size = wanted["shard_size"]
    if shard_size is None:
        per_prompt = per_row * tokens / n
        shard_size = max(1, int(DEFAULT_SHARD_BYTES // max(per_prompt, 1)) // batch_size)
        shard_size = min(shard_size * batch_size, math.ceil(n / batch_size) * batch_size)
    return {
        "format": "em-interp-activations", "format_version": FORMAT_VERSION,
        "em_interp_version": __version__, **wanted, "shard_size": shard_size,
        "card": wanted["model"].get("card"), "variant": wanted["model"].get("variant"),
        "model_name": wanted["model"].get("model_name"), "chat": chat, "system": system,
        "stop_at_layer": stop, "shapes": shapes, "n_layers": tl.cfg.n_layers,
        "n_rows": tokens, "estimated_bytes": estimate,
        "estimate": (f"{len(names)} hooks x {per_row // itemsize} values x "
                     f"{rows_note} x {itemsize} bytes = {human_bytes(estimate)}"),
        **meta, "shards": [], "complete": False,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _log_shows(level: int) -> bool:
    """Whether a record of ``level`` from this module's logger reaches a handler."""
    if not log.isEnabledFor(level):
        return False
    logger: logging.Logger | None = log
    while logger is not None:
        if any(h.level <= level for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def _run_shards(model, prompts, folder: Path, manifest: dict, *, chat, system, stop,
                progress) -> None:
    tl = unwrap(model)
    names, reduce = manifest["hooks"], manifest["reduce"]
    n, size, batch_size = manifest["n_prompts"], manifest["shard_size"], manifest["batch_size"]
    out_dtype = DTYPES[manifest["dtype"]]
    n_shards = math.ceil(n / size)
    done = len(manifest["shards"])
    done_prompts = manifest["shards"][-1]["stop"] if done else 0
    left = manifest["estimated_bytes"] * (n - done_prompts) / n
    note = (f"activation store {folder}: {manifest['estimate']} on disk, {n_shards} shard(s) of "
            f"{size} prompts" + (f"; resuming at shard {done}, {human_bytes(left)} left"
                                 if done else ""))
    # said once: through the log when it shows INFO, else above the progress bar
    shown_by_log = _log_shows(logging.INFO)
    log.info(note)
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < left:
        log.warning("activation store %s needs about %s more but only %s is free", folder,
                    human_bytes(left), human_bytes(free))
    bar = tqdm(total=n, initial=done_prompts, unit="prompt", disable=not progress,
               desc=f"caching {len(names)} hooks -> {human_bytes(manifest['estimated_bytes'])}")
    if progress and not shown_by_log:
        bar.write(note)
    try:
        for k in range(done, n_shards):
            start, stop_i = k * size, min((k + 1) * size, n)
            batches = token_batches(model, prompts, batch_size, chat=chat, system=system,
                                    start=start, stop=stop_i)
            lengths = None
            if reduce == "none":
                batches = list(batches)  # token ids only: the shard's row count comes first
                lengths = [x for b in batches for x in b.tokens.lengths]
            rows = sum(lengths) if lengths is not None else stop_i - start
            layout = {h: (rows, *manifest["shapes"][h]) for h in names}
            writer = ShardWriter(folder / shard_name(k), layout, out_dtype, lengths)
            try:
                row = 0
                for batch in batches:
                    out = _pooled_forward(tl, batch, names, reduce, stop, out_dtype)
                    for h in names:
                        writer.write(h, row, out[h])
                    row += out[names[0]].shape[0]
                    del out
                    bar.update(len(batch.tokens))
                nbytes = writer.finish()
            except BaseException:
                writer.abort()
                raise
            manifest["shards"].append({"file": shard_name(k), "start": start, "stop": stop_i,
                                       "rows": rows, "bytes": nbytes})
            write_manifest(folder, manifest)
    finally:
        bar.close()
    manifest["n_rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["complete"] = True
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_manifest(folder, manifest)


__all__ = ["FORMAT_VERSION", "LENGTHS_KEY", "MANIFEST", "ActivationStore", "Activations",
           "cache_activations", "disk_estimate", "human_bytes", "stop_layer"]
