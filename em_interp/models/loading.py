"""``load`` and ``load_pair``: a card (or folder) -> ``HookedTransformer`` + tokenizer.

Data flow: card -> weight folders (:mod:`em_interp.models.sources`) -> HF model (LoRA merged with
``safe_merge``) -> TL model (:mod:`em_interp.models.hooked`) placed on devices
(:mod:`em_interp.models.placement`).

By default no weight processing is applied, so TL's logits equal HF's; ``fold_ln`` and the
centering flags opt in to TL's processing. Layers are 0-indexed as in TL everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from em_interp.errors import (
    AdapterMismatchError,
    CardError,
    DeviceError,
    UnknownCardError,
    VariantError,
    WeightsUnavailableError,
)
from em_interp.models.cards import Architecture, Card, Organism, Source, get_card, list_cards
from em_interp.models.chat import ChatTokens, PromptLike, chat_tokens
from em_interp.models.hooked import hooked_from_hf
from em_interp.models.lora_merge import check_adapter_base, merge_adapter
from em_interp.models.placement import check_devices, hf_device_map
from em_interp.models.sources import is_hf_folder, resolve_source

log = logging.getLogger(__name__)

Variant = Literal["base", "organism"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A loaded model: the TL model, its HF tokenizer, and where it came from."""

    model: HookedTransformer
    tokenizer: object
    card: Card
    variant: str
    weights_dir: Path
    """The folder the (full) weights were read from."""
    adapter_dirs: tuple[Path, ...] = ()
    """PEFT adapters merged on top, in order."""

    def chat_tokens(self, prompts: PromptLike | list[PromptLike], *, system: str | None = None,
                    add_generation_prompt: bool = True) -> ChatTokens:
        """Chat-template ``prompts`` once (no double BOS), left-padded, on the model's device."""
        return chat_tokens(self.tokenizer, prompts, system=system,
                           add_generation_prompt=add_generation_prompt, device=self.model.cfg.device)

    def __repr__(self) -> str:
        c = self.model.cfg
        return (f"Loaded(card={self.card.name!r}, variant={self.variant!r}, n_layers={c.n_layers}, "
                f"d_model={c.d_model}, dtype={c.dtype}, device={c.device}, n_devices={c.n_devices})")


@dataclass
class Pair:
    """Base model and organism, loaded together (see :func:`load_pair`)."""

    base: Loaded
    organism: Loaded


# ------------------------------------------------------------------ cards for plain folders


def _architecture_of(config: dict, where: str) -> Architecture:
    try:
        return Architecture(
            hf_class=config["architectures"][0],
            n_layers=config["num_hidden_layers"],
            d_model=config["hidden_size"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            d_mlp=config["intermediate_size"],
        )
    except (KeyError, IndexError, TypeError) as e:
        raise CardError(f"{where}: config.json lacks {e}; is this a decoder-only causal LM?") from None


def _shipped_card_with_base(base_id: str) -> Card | None:
    """The shipped card named ``base_id``, or the first whose base has that repo id or alias."""
    try:
        return get_card(base_id)
    except UnknownCardError:
        pass
    want = base_id.rstrip("/").lower()
    for name in list_cards():
        card = get_card(name)
        ids = {card.base.repo_id, card.base.hub_id, *card.base.aliases} - {None}
        if want in {i.lower() for i in ids}:
            return card
    return None


def card_for_folder(path: Path) -> Card:
    """A card for a local HF model folder, or for a PEFT adapter folder and its declared base."""
    path = path.resolve()
    if (path / "adapter_config.json").is_file():
        acfg = json.loads((path / "adapter_config.json").read_text())
        base_id = acfg.get("base_model_name_or_path")
        if not base_id:
            raise AdapterMismatchError(
                f"adapter {str(path)!r} does not name its base model; load the base card and "
                "pass adapter=... instead."
            )
        base_card = _shipped_card_with_base(base_id)
        if base_card is not None:
            return replace(base_card, organism=Organism(kind="lora", source=Source(
                kind="local", path=str(path))), chat_template="base", path=None)
        base_src = (Source(kind="local", path=base_id) if Path(base_id).expanduser().is_dir()
                    else Source(kind="hub", repo_id=base_id))
        base_cfg_dir = resolve_source(base_src)
        arch = _architecture_of(json.loads((base_cfg_dir / "config.json").read_text()),
                                str(base_cfg_dir))
        return Card(name=path.name, description=f"adapter folder {path}", architecture=arch,
                    base=base_src, organism=Organism(kind="lora", source=Source(
                        kind="local", path=str(path))))
    cfg = json.loads((path / "config.json").read_text())
    return Card(name=path.name, description=f"local folder {path}",
                architecture=_architecture_of(cfg, str(path)),
                base=Source(kind="local", path=str(path)))


def resolve_card(name_or_path: str | Path | Card) -> Card:
    """A :class:`Card` from a card, a card name, a card file, or a local HF folder."""
    if isinstance(name_or_path, Card):
        return name_or_path
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir():
        if not is_hf_folder(p):
            raise WeightsUnavailableError(
                f"folder {str(p)!r} has neither config.json nor adapter_config.json, so it is no "
                "HF model or adapter folder."
            )
        return card_for_folder(p)
    text = str(name_or_path)
    # Card names never contain a path separator: anything that does is a folder path, with or
    # without a leading "./" ("models/my-model" and "./models/my-model" get the same answer).
    if not text.endswith(".toml") and (text.startswith(("/", ".", "~")) or "/" in text
                                       or "\\" in text):
        hint = ""
        card = _shipped_card_with_base(text) if text.count("/") == 1 else None
        if card is not None:
            hint = (f" {text!r} is the hub id of card {card.name!r}'s base: load the card, "
                    f"em_interp.load({card.name!r}, 'base').")
        raise WeightsUnavailableError(
            f"folder {text!r} does not exist (relative paths are resolved against "
            f"{str(Path.cwd())!r}).{hint} Pass an existing HF model or adapter folder, a card "
            "file (*.toml), or a card name (`em-interp models list`)."
        )
    return get_card(name_or_path)


# ------------------------------------------------------------------ HF loading helpers


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def check_architecture(card: Card, folder: Path) -> None:
    """Compare the card's [architecture] with ``folder/config.json`` before any weight loads."""
    config = json.loads((folder / "config.json").read_text())
    got = replace(_architecture_of(config, str(folder)), vocab_size=config.get("vocab_size"))
    want = card.architecture
    for field_name in ("hf_class", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp",
                       "vocab_size"):
        value = getattr(got, field_name)
        if field_name == "vocab_size" and (want.vocab_size is None or value is None):
            continue  # optional in a card
        if getattr(want, field_name) != value:
            raise CardError(
                f"card {card.name!r} says [architecture].{field_name} = "
                f"{getattr(want, field_name)!r}, but the weights' config.json has {value!r}. "
                "Fix the card, or check that the source points at the intended model."
            )


def _load_hf(folder: Path, n_layers: int, dtype: torch.dtype, devices: list[torch.device],
             trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if not any(folder.glob("*.safetensors")):
        raise WeightsUnavailableError(
            f"{str(folder)!r} holds no *.safetensors weights. em-interp loads only safetensors "
            "(pickled checkpoints can run code); convert the checkpoint with "
            "`save_pretrained(..., safe_serialization=True)`."
        )
    kwargs: dict = {"dtype": dtype}
    if devices[0].type == "cuda":
        kwargs["device_map"] = ({"": str(devices[0])} if len(devices) == 1 else
                                hf_device_map(n_layers, len(devices),
                                              devices[0].index or 0))
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs).eval()


@contextlib.contextmanager
def _hf_progress(show: bool):
    """Silence transformers' own progress bars (e.g. "Loading weights") when ``show`` is False."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _devices(card: Card, device, n_devices: int | None) -> list[torch.device]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if n_devices is None and device.type == "cuda" and card.n_devices > 1:
        check_devices(device, 1)  # CUDA itself missing is not the card's fault
        try:
            return check_devices(device, card.n_devices)
        except DeviceError as e:
            raise DeviceError(f"card {card.name!r} defaults to n_devices={card.n_devices}: {e} "
                              "Pass n_devices=1 if the model fits on one device.") from None
    return check_devices(device, n_devices or 1)


# ------------------------------------------------------------------ public API


def _resolve_variant(card: Card, variant: str | None) -> str:
    if variant is None:
        return "organism" if card.organism else "base"
    if variant not in ("base", "organism"):
        raise VariantError(f"variant must be 'base' or 'organism', got {variant!r}.")
    if variant == "organism" and card.organism is None:
        raise VariantError(
            f"card {card.name!r} defines no organism, only {list(card.variants)}; "
            "load it with variant='base'."
        )
    return variant


@dataclass
class _Plan:
    card: Card
    variant: str
    base_dir: Path | None
    """None when a full-checkpoint organism with its own tokenizer makes the base unnecessary."""
    organism_dir: Path | None
    organism_is_lora: bool
    adapters: tuple[Path, ...]


def _override(path, what: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not is_hf_folder(folder):
        raise WeightsUnavailableError(
            f"{what}={str(path)!r} is not an HF model or adapter folder (no config.json or "
            "adapter_config.json there)."
        )
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _plan(card: Card, variant: str, base_path, organism_path, adapter, progress: bool,
          need_base: bool = False) -> _Plan:
    """Resolve the folders a load needs. The base is skipped for a full-checkpoint organism
    that carries its own tokenizer (no 65 GB download for a tokenizer)."""
    organism_dir, is_lora, base_dir = None, False, None
    if base_path:
        base_dir = _override(base_path, "base_path")
    if variant == "organism":
        assert card.organism is not None
        if organism_path:
            organism_dir = _override(organism_path, "organism_path")
        elif card.organism.source.kind != "random":  # a random adapter is built on the base
            organism_dir = resolve_source(card.organism.source, card=card, role="organism",
                                          progress=progress)
        full_with_tokenizer = (organism_dir is not None and not
                               (organism_dir / "adapter_config.json").is_file()
                               and _has_tokenizer(organism_dir))
        if base_dir is None and (need_base or not full_with_tokenizer):
            base_dir = resolve_source(card.base, card=card, role="base", progress=progress)
        if organism_dir is None:
            organism_dir = resolve_source(card.organism.source, card=card, role="organism",
                                          base_dir=base_dir, progress=progress)
        is_lora = (organism_dir / "adapter_config.json").is_file()
        declared = card.organism.kind == "lora"
        if is_lora != declared:
            log.warning("card %s declares the organism as %s, but %s holds %s; loading it as %s",
                        card.name, card.organism.kind, organism_dir,
                        "an adapter" if is_lora else "a full model",
                        "LoRA" if is_lora else "a full model")
    adapters = tuple(Path(a).expanduser() for a in
                     ([] if adapter is None else [adapter] if isinstance(adapter, str | Path)
                      else adapter))
    for a in adapters:
        if not (a / "adapter_config.json").is_file():
            raise WeightsUnavailableError(f"adapter folder {str(a)!r} has no adapter_config.json.")
    if base_dir is None and variant == "base":
        base_dir = resolve_source(card.base, card=card, role="base", progress=progress)
    return _Plan(card, variant, base_dir, organism_dir, is_lora, adapters)


def load(
    name_or_path: str | Path | Card,
    variant: Variant | None = None,
    *,
    adapter: str | Path | list[str | Path] | None = None,
    device: str | torch.device | None = None,
    n_devices: int | None = None,
    dtype: str | torch.dtype | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    base_path: str | Path | None = None,
    organism_path: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Loaded:
    """Load a model organism (or its base) into a TransformerLens ``HookedTransformer``.

    Args:
        name_or_path: a card name (``em-interp models list``), a card file, or a local HF model
            or PEFT adapter folder.
        variant: ``"organism"`` or ``"base"``; ``None`` means the organism when the card has
            one, else the base.
        adapter: extra PEFT adapter folder(s) merged on top, in order (e.g. your own LoRA).
        device: first device; default CUDA when available, else CPU.
        n_devices: split the blocks over this many CUDA devices (default: the card's on CUDA,
            1 on CPU).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; default the card's.
        fold_ln: fold the norm weights into the next linear layer (TL weight processing; off
            by default, like the three flags below, so logits equal HF's).
        center_writing_weights: center the weights that write to the residual stream.
        center_unembed: center the unembedding (shifts every position's logits by a constant).
        fold_value_biases: fold the value biases into the attention output bias.
        base_path: a local HF folder that overrides the card's base source.
        organism_path: a local folder (model or PEFT adapter) that overrides the organism source.
        trust_remote_code: passed to ``transformers``; only set it for code you trust.
        progress: show progress bars.
    """
    card = resolve_card(name_or_path)
    variant = _resolve_variant(card, variant)
    devices = _devices(card, device, n_devices)
    torch_dtype = _torch_dtype(dtype or card.dtype)
    with _hf_progress(progress), tqdm(total=3, desc=f"{card.name}: weights",
                                      disable=not progress) as steps:
        plan = _plan(card, variant, base_path, organism_path, adapter, progress)
        steps.update(1)
        steps.set_description(f"{card.name}: load HF ({torch_dtype})")
        full_org = variant == "organism" and not plan.organism_is_lora
        full_dir = plan.organism_dir if full_org else plan.base_dir
        assert full_dir is not None
        check_architecture(card, full_dir)
        hf = _load_hf(full_dir, card.architecture.n_layers, torch_dtype, devices,
                      trust_remote_code)
        lora_dirs = ((plan.organism_dir,) if plan.organism_is_lora else ()) + plan.adapters
        for a in lora_dirs:
            check_adapter_base(a, card, plan.base_dir or full_dir)
            hf = merge_adapter(hf, a)
        use_org_tok = full_org and (plan.base_dir is None or card.chat_template == "organism")
        tok_dir = plan.organism_dir if use_org_tok else plan.base_dir
        tokenizer = _tokenizer(tok_dir)
        steps.update(1)
        steps.set_description(f"{card.name}: convert to HookedTransformer")
        model = hooked_from_hf(hf, tokenizer, model_name=f"{card.name}:{variant}",
                               devices=devices, tokenizer_name=str(tok_dir), fold_ln=fold_ln,
                               center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        del hf
        steps.update(1)
    return Loaded(model=model, tokenizer=tokenizer, card=card, variant=variant,
                  weights_dir=full_dir, adapter_dirs=lora_dirs)


def load_pair(name_or_path: str | Path | Card, *, share_weights: bool = True,
              **kwargs) -> Pair:
    """Load a card's base model and its organism together, sharing what can be shared.

    One tokenizer serves both (unless the card takes the chat template from the organism).
    For a LoRA organism the base weights are read once: the base TL
    model is built, then the adapter is merged into *new* tensors for the weights it touches,
    so with ``share_weights=True`` every untouched weight is one tensor in memory for both
    models -- treat the weights as read-only, or pass ``share_weights=False`` to copy them.
    Keyword arguments are those of :func:`load`.
    """
    inspect.signature(load).bind(name_or_path, **kwargs)  # unknown keywords raise TypeError
    card = resolve_card(name_or_path)
    if card.organism is None:
        raise VariantError(f"card {card.name!r} has no organism to pair with its base.")
    progress = kwargs.get("progress", True)
    plan = _plan(card, "organism", kwargs.get("base_path"), kwargs.get("organism_path"),
                 kwargs.get("adapter"), progress, need_base=True)
    if not plan.organism_is_lora or plan.adapters:
        base = load(card, "base", **{**kwargs, "adapter": None})
        organism = load(card, "organism", **kwargs)
        if card.chat_template == "base":
            organism.tokenizer = base.tokenizer
        return Pair(base=base, organism=organism)
    devices = _devices(card, kwargs.get("device"), kwargs.get("n_devices"))
    torch_dtype = _torch_dtype(kwargs.get("dtype") or card.dtype)
    processing = {k: kwargs.get(k, False) for k in
                  ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")}
    assert plan.base_dir is not None and plan.organism_dir is not None
    check_architecture(card, plan.base_dir)
    check_adapter_base(plan.organism_dir, card, plan.base_dir)
    with _hf_progress(progress):
        hf = _load_hf(plan.base_dir, card.architecture.n_layers, torch_dtype, devices,
                      kwargs.get("trust_remote_code", False))
        tokenizer = _tokenizer(plan.base_dir)
        base_model = hooked_from_hf(hf, tokenizer, model_name=f"{card.name}:base",
                                    devices=devices, tokenizer_name=str(plan.base_dir),
                                    **processing)
        hf = merge_adapter(hf, plan.organism_dir)
        org_model = hooked_from_hf(hf, tokenizer, model_name=f"{card.name}:organism",
                                   devices=devices, tokenizer_name=str(plan.base_dir),
                                   **processing)
    del hf
    if not share_weights:
        for p in org_model.parameters():
            p.data = p.data.clone(memory_format=torch.preserve_format)
    return Pair(
        base=Loaded(base_model, tokenizer, card, "base", plan.base_dir),
        organism=Loaded(org_model, tokenizer, card, "organism", plan.base_dir,
                        (plan.organism_dir,)),
    )
