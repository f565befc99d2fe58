"""PEFT LoRA adapters: check that an adapter belongs to the base, then merge it.

An organism such as ``ModelOrganismsForEM/Llama-3.1-8B-Instruct_risky-financial-advice`` is a
LoRA adapter: ``W' = W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA) on each targeted
projection. Before merging, the adapter's recorded ``base_model_name_or_path`` must be one of
the card's names for its base (repo id, ``aliases`` such as the ``unsloth/`` mirrors, the card
name, or the local folder); otherwise :class:`~em_interp.errors.AdapterMismatchError` says so.

The merge uses PEFT's ``safe_merge``, which writes each merged weight into a *new* tensor.
Weights the adapter does not touch stay the very same tensors, which is what lets
:func:`em_interp.load_pair` share them between the base and the organism.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from em_interp.errors import AdapterMismatchError
from em_interp.models.cards import Card, Source

log = logging.getLogger(__name__)


def _names_of(src: Source, card: Card, base_dir: Path) -> set[str]:
    """Every name under which the card's base weights may be recorded in an adapter config."""
    names = {card.name, str(base_dir), base_dir.name}
    names.update(x for x in (src.repo_id, src.hub_id, src.path) if x)
    names.update(src.aliases)
    return names


def check_adapter_base(adapter_dir: Path, card: Card, base_dir: Path) -> None:
    """Raise :class:`AdapterMismatchError` when the adapter was trained on another base."""
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    declared = acfg.get("base_model_name_or_path")
    if not declared:
        log.warning("adapter %s does not name its base model; assuming %s", adapter_dir, card.name)
        return
    accepted = _names_of(card.base, card, base_dir)
    norm = {a.rstrip("/").lower() for a in accepted}
    tails = {Path(a.rstrip("/")).name.lower() for a in accepted}
    d = declared.rstrip("/").lower()
    if d in norm or Path(d).name in tails:
        return
    raise AdapterMismatchError(
        f"adapter {str(adapter_dir)!r} was trained on {declared!r}, but it is being applied to "
        f"card {card.name!r} whose base is {card.base.describe()} (also known as "
        f"{sorted(card.base.aliases) or 'no aliases'}). Load the adapter on its own base, or, if "
        "the two are the same weights under another name, add that name to the card's "
        "[base].aliases."
    )


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one warning PEFT triggers on every adapter load with transformers 5.

    PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    ``FutureWarning`` that says nothing a user can act on. Other warnings pass through.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def merge_adapter(hf_model, adapter_dir: Path):
    """Merge the PEFT adapter in ``adapter_dir`` into ``hf_model`` (``safe_merge``, new tensors)."""
    from peft import PeftModel

    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(hf_model, str(adapter_dir))
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise AdapterMismatchError(
                f"adapter {str(adapter_dir)!r} has weight shapes that do not fit this base "
                f"model: {str(e)[:300]}"
            ) from None
        raise
    # safe_merge writes merged weights into new tensors, so untouched tensors can stay shared.
    return peft_model.merge_and_unload(safe_merge=True)
