"""Helpers shared by the run stages: prompt selection, hook templates, layer lists, wording."""

from __future__ import annotations

from pathlib import Path

from em_interp import hooks


def prompt_set(ctx, name: str, n: int = 0, *, label: int | None = None,
               split: str | None = None):
    """A shipped set or a file, filtered to ``max_prompt_chars``, then ``n`` sampled (0: all)."""
    return select_prompts(ctx.config, name, n, label=label, split=split)


def select_prompts(config, name: str, n: int = 0, *, label: int | None = None,
                   split: str | None = None):
    """:func:`prompt_set` from a :class:`~em_interp.run.config.RunConfig` alone, so a config's
    check can see the prompts a stage will draw before any model loads."""
    from em_interp.data import (
        list_prompt_sets,
        load_prompt_set,
        read_jailbreakbench_csv,
        read_labelled,
    )

    if name in list_prompt_sets():
        ps = load_prompt_set(name)
    elif str(name).lower().endswith(".csv") and "goal" in Path(name).read_text()[:500].lower():
        ps = read_jailbreakbench_csv(name)
    else:
        ps = read_labelled(name)
    if split == "train":
        ps = ps.train()
    elif split == "test":
        ps = ps.test()
    if label is not None:
        ps = ps.where(label)
    limit = config.max_prompt_chars
    if limit:
        ps = ps.subset([i for i, t in enumerate(ps.texts) if len(t) <= limit])
    if n and n < len(ps):
        ps = ps.sample(n, seed=config.seed)
    return ps


def hook_name(kind: str, layer: int) -> str:
    """``hooks.<kind>(layer)``, e.g. ``hook_name("mlp_post", 3)`` -> ``blocks.3.mlp.hook_post``."""
    return getattr(hooks, kind)(layer)


def hook_template(kind: str) -> str:
    """``blocks.{layer}.<leaf>`` for a hook kind (the builders are plain f-strings)."""
    return getattr(hooks, kind)("{layer}")


def layer_list(value, n_layers: int) -> list[int]:
    """Config layers (``None``: all; negatives from the end) as sorted non-negative indices."""
    if value is None:
        return list(range(n_layers))
    return sorted({int(v) % n_layers for v in value})


def fmt_ci(lo: float, hi: float) -> str:
    return f"[{lo:.2f}, {hi:.2f}]"


def make_judge(cfg, cache_dir=None, rubrics=("aligned",)):
    """The judge a run config names (``rubrics`` for the LLM judges)."""
    from em_interp.behaviour import judges

    if cfg.kind == "refusal":
        return judges.RefusalStringJudge()
    if cfg.kind == "openai":
        return judges.OpenAICompatibleJudge(cfg.base_url, cfg.model, rubrics=rubrics,
                                            cache_dir=cache_dir, api_key_env=cfg.api_key_env)
    from em_interp.models.loading import load

    return judges.LocalHFJudge(load(cfg.model, progress=False), rubrics=rubrics,
                               cache_dir=cache_dir)
