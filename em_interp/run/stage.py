"""A stage of a run: what it is (:class:`Stage`), what it returns (:class:`StageOutput`) and
what it sees (:class:`RunContext`).

These types live apart from :mod:`em_interp.run.pipeline`, which runs stages, and from
:mod:`em_interp.run.stages`, which defines them, so neither imports the other.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_interp.results import Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """What a stage fit (selected) on and what it evaluated on, as prompt content ids
    (:attr:`em_interp.data.PromptSet.ids`), with a sentence each for the report.

    A stage that selects something -- a layer, heads, neurons, latents, a direction, lambda --
    selects on ``fit`` and reports on ``evaluated``; the pipeline writes both into results.json
    and refuses a stage whose two sets share a prompt.
    """

    fit: tuple[str, ...]
    evaluated: tuple[str, ...]
    fit_note: str = ""
    """e.g. "layer chosen by grouped 5-fold CV on the train split (120 prompts)"."""
    evaluated_note: str = ""
    """e.g. "held-out test split (40 prompts, 20 minimal pairs)"."""

    @classmethod
    def of(cls, fit, evaluated, fit_note: str = "", evaluated_note: str = "") -> HeldOut:
        """From prompt sets, lists of prompts or lists of ids (strings of 12 hex digits)."""
        return cls(tuple(_ids(fit)), tuple(_ids(evaluated)), fit_note, evaluated_note)

    @property
    def overlap(self) -> int:
        """Prompts in both sets (a leak: must be 0)."""
        return len(set(self.fit) & set(self.evaluated))

    def to_dict(self) -> dict:
        return {"fit": list(self.fit), "evaluated": list(self.evaluated),
                "n_fit": len(set(self.fit)), "n_evaluated": len(set(self.evaluated)),
                "overlap": self.overlap, "fit_note": self.fit_note,
                "evaluated_note": self.evaluated_note}


def _ids(x) -> list[str]:
    from em_interp.data import PromptSet, prompt_ids

    if isinstance(x, PromptSet):
        return x.ids
    items = list(x)
    if all(isinstance(i, str) and len(i) == 12 and all(c in "0123456789abcdef" for c in i)
           for i in items):
        return items
    return prompt_ids(items)


@dataclass
class StageOutput:
    """What a stage function returns: results to save, figures to draw, numbers and text."""

    summary: dict[str, Any]
    """Headline numbers (JSON-safe), written to ``results.json`` under the stage's name."""
    text: str
    """A few sentences: what was computed and what the numbers are (no claims beyond them)."""
    title: str = ""
    results: dict[str, Result] = field(default_factory=dict)
    figures: list[tuple[str, Any, str]] = field(default_factory=list)
    """``(file stem, plotly figure, caption)`` triples."""
    tables: list[tuple[str, Any]] = field(default_factory=list)
    """``(caption, pandas DataFrame)`` pairs: the stage's results as a paper would print them
    (named columns, rounded numbers), shown in the report."""
    held_out: HeldOut | None = None
    """What the stage selected on and what it evaluated on (``None``: it selects nothing)."""


@dataclass(frozen=True)
class Stage:
    """A named step of a run: ``fn(ctx) -> StageOutput``; ``reads`` lists stages it depends on."""

    name: str
    title: str
    fn: Callable[[RunContext], StageOutput]
    reads: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("pair",)
    """What the stage loads: ``"pair"`` (base + organism) or nothing."""


class RunContext:
    """Shared state of one run: the config, the run folder, lazily loaded models and the
    outputs of finished stages (read back from disk, so resumed runs see the same inputs)."""

    def __init__(self, config, run_dir: Path, progress: bool = True):
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        self._pair = None
        self.timings: dict[str, float] = {}
        self.hashes: dict[str, str] = {}
        """Config hash of each stage of this run (set before the stage runs)."""

    @property
    def pair(self):
        """The card's base and organism (``em_interp.load_pair``), loaded on first use."""
        if self._pair is None:
            from em_interp.models.loading import load_pair

            log.info("loading the base model and the organism of %s (weights not yet in the "
                     "cache are fetched, converted or trained first)", self.config.card)
            t = time.perf_counter()
            self._pair = load_pair(self.config.card, **self.config.load_kwargs(),
                                   progress=self.progress)
            self.timings["load_models"] = time.perf_counter() - t
            log.info("models loaded in %.1f s", self.timings["load_models"])
        return self._pair

    def work_dir(self, stage: str) -> Path:
        """Resumable intermediate state of ``stage`` (stores, sweeps, generations).

        Keyed by the stage's config hash: changed settings start from scratch, while a killed
        run with the same settings resumes from what it wrote.
        """
        path = self.run_dir / "work" / stage / self.hashes.get(stage, "default")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_info(self, stage: str) -> dict:
        """The ``stage.json`` of a finished stage (``{}`` when it has not finished)."""
        path = self.run_dir / "stages" / stage / "stage.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def stage_result(self, stage: str, name: str) -> Result:
        """A saved result of a finished stage, e.g. ``ctx.stage_result("dla", "dla")``."""
        from em_interp.results import load_result

        return load_result(self.run_dir / "stages" / stage / "results" / name)
