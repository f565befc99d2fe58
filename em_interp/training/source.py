"""The ``trained`` weight source: a LoRA organism trained once from its card's recipe.

A card whose organism is ``kind = "trained"`` names a dataset (a shipped prompt set or a chat
JSONL file) and a :class:`~em_interp.training.lora.LoRATrainConfig` recipe. The first load trains
the adapter with :func:`~em_interp.training.lora.train_lora` into
``cache_dir()/trained/<card>-<hash>/`` (atomically); later loads reuse it. The hash covers the
recipe, the base source, the dataset's content and :data:`~em_interp.training.lora.TRAINING_VERSION`,
so changing any of them trains anew and an unchanged card never trains twice.

:func:`resolve_trained` is registered in ``pyproject.toml`` as the ``em_interp.weight_sources`` entry
point ``trained``; :func:`em_interp.models.sources.resolve_source` finds it there, so the loading
layer needs no import of this package.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from em_interp.atomic import atomic_dir, is_complete
from em_interp.models.cache import cache_dir
from em_interp.models.cards import Card, Source
from em_interp.models.sources import card_dir, source_key

log = logging.getLogger(__name__)


def trained_source_key(src: Source, card: Card) -> tuple[str, object, list]:
    """``(hash, LoRATrainConfig, conversations)`` of a ``trained`` source (see the module doc)."""
    import dataclasses

    from em_interp.data import list_prompt_sets, load_prompt_set, read_chat_jsonl
    from em_interp.errors import ConfigError, DataError
    from em_interp.training.lora import TRAINING_VERSION, LoRATrainConfig, conversations_of

    try:
        cfg = LoRATrainConfig.from_dict(dict(src.recipe))
    except ConfigError as e:
        raise ConfigError(f"card {card.name!r}, [organism.source.recipe]: {e}") from None
    assert src.dataset is not None
    if src.dataset in list_prompt_sets():
        data = load_prompt_set(src.dataset)
    else:
        path = (card_dir(card) / Path(src.dataset).expanduser()).resolve()
        if not path.is_file():
            raise DataError(f"card {card.name!r}: dataset {src.dataset!r} is neither a shipped "
                            f"prompt set ({', '.join(list_prompt_sets())}) nor a file "
                            f"({str(path)!r}).")
        data = read_chat_jsonl(path)
    if src.split != "all":
        data = data.train() if src.split == "train" else data.test()
    convs = conversations_of(data)
    if cfg.max_examples is not None:
        convs = convs[: cfg.max_examples]
    key = source_key(cfg.to_dict(), dataclasses.asdict(card.base), convs, TRAINING_VERSION)
    return key, cfg, convs


def resolve_trained(src: Source, card: Card, *, progress: bool = True) -> Path:
    """The adapter folder of a ``trained`` source, training it on first use (cached after)."""
    key, cfg, convs = trained_source_key(src, card)
    final = cache_dir() / "trained" / f"{card.name}-{key}"
    if is_complete(final):
        return final / "adapter"
    from em_interp.training.lora import load_base_hf, train_lora

    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(
        math.ceil(len(convs) / cfg.batch_size) / cfg.grad_accum)))
    log.info("training the LoRA organism %s: %d steps of %d conversation%s on %s (once; cached "
             "after the first run in %s)", card.name, steps, cfg.batch_size * cfg.grad_accum,
             "" if cfg.batch_size * cfg.grad_accum == 1 else "s", src.dataset, final)
    with atomic_dir(final, meta={"source": src.describe(), "recipe": cfg.to_dict()}) as tmp:
        model = load_base_hf(card, dtype=cfg.dtype, device=cfg.device)
        train_lora(card, convs, cfg, tmp, progress=progress, model=model)
    return final / "adapter"
