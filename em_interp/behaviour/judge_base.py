"""What every judge shares: rubrics, scores, the :class:`Judge` protocol and its verdict cache.

See :mod:`em_interp.behaviour.judges` for the judges, the cache key and the failure rules.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from em_interp.errors import ConfigError, JudgeError

log = logging.getLogger(__name__)

JUDGE_VERSION = "3"
"""Version of the code that turns a judge's output into a verdict (request format, reading
logprobs and text, the local judge's candidates). Part of every cache key: bump it whenever
that code changes what a verdict would be."""


# ------------------------------------------------------------------ rubrics and phrases


@dataclass(frozen=True)
class Rubric:
    """A judge prompt: ``template`` with ``{question}`` and ``{answer}``, scored on ``scale``."""

    name: str
    version: str
    template: str
    scale: tuple[int, int] = (0, 100)
    """Lowest and highest whole number the judge may answer."""
    labels: tuple[str, ...] = ()
    """Words the judge may answer instead of a number (e.g. ``REFUSAL``)."""

    def __post_init__(self):
        lo, hi = self.scale
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= 999):
            raise ConfigError(f"rubric {self.name!r}: scale must be two whole numbers "
                              f"0 <= lo < hi <= 999, got {self.scale}.")
        if "{answer}" not in self.template:
            raise ConfigError(f"rubric {self.name!r}: the template has no {{answer}} "
                              "placeholder.")

    def prompt(self, question: str, answer: str) -> str:
        """The judge prompt for one pair (placeholders replaced verbatim)."""
        return self.template.replace("{question}", question).replace("{answer}", answer)

    @property
    def id(self) -> str:
        """``name@version``, a readable tag (the cache key uses :meth:`describe`)."""
        return f"{self.name}@{self.version}"

    def describe(self) -> dict:
        """Everything that defines the rubric, its full prompt text included (part of every
        cache key, so an edited template is never answered from old verdicts)."""
        return {"name": self.name, "version": self.version, "template": self.template,
                "scale": list(self.scale), "labels": list(self.labels)}


def load_rubrics() -> dict[str, Rubric]:
    """The rubrics shipped in ``em_interp/data/rubrics.json``, by name."""
    doc = json.loads(resources.files("em_interp.data").joinpath("rubrics.json").read_text())
    return {name: Rubric(name=name, version=str(r["version"]), template=r["template"],
                         scale=tuple(r["scale"]), labels=tuple(r.get("labels", ())))
            for name, r in doc["rubrics"].items()}


def resolve_rubrics(rubrics) -> tuple[Rubric, ...]:
    shipped = load_rubrics()
    out = []
    for r in ([rubrics] if isinstance(rubrics, str | Rubric) else rubrics):
        if isinstance(r, Rubric):
            out.append(r)
        elif r in shipped:
            out.append(shipped[r])
        else:
            raise ConfigError(f"unknown rubric {r!r}; shipped: {sorted(shipped)}, or pass a "
                              "Rubric.")
    if not out:
        raise ConfigError("a judge needs at least one rubric.")
    return tuple(out)


# ------------------------------------------------------------------ scores


@dataclass(frozen=True)
class RubricScore:
    """One rubric's verdict on one pair."""

    score: float | None
    """The (expected) number on the rubric's scale; ``None`` when the judge answered a label."""
    label: str | None
    """The label the judge chose instead of a number (``"REFUSAL"``), else ``None``."""
    method: str
    """How it was read: ``"logprobs"``, ``"text"``, ``"exact"`` (local judge) or ``"string"``."""
    raw: str
    """The judge's raw output (its text, or a summary for the local judge)."""
    number_mass: float | None = None
    """Share of probability on number answers (``None`` for text parsing)."""
    note: str | None = None
    """Why a fallback was taken, if one was."""


@dataclass(frozen=True)
class JudgeScore:
    """All rubric verdicts of one judge on one (question, answer)."""

    question: str
    answer: str
    judge: str
    rubrics: dict[str, RubricScore] = field(default_factory=dict)

    def get(self, rubric: str) -> float | None:
        """The number for ``rubric`` (``None`` if it answered a label or was not scored)."""
        r = self.rubrics.get(rubric)
        return None if r is None else r.score

    @property
    def refused(self) -> bool | None:
        """True when a rubric's label is ``REFUSAL`` (or the refusal judge matched); ``None``
        when no rubric of this judge says anything about refusal."""
        if "refused" in self.rubrics:
            return bool(self.rubrics["refused"].score)
        tell = [r for name, r in self.rubrics.items() if name in ("aligned", "severity")]
        if not tell:
            return None
        return any(r.label == "REFUSAL" for r in tell)

    def as_row(self) -> dict:
        """A flat dict: ``<rubric>``, ``<rubric>_label``, ``<rubric>_method`` and ``refused``."""
        row: dict = {}
        for name, r in self.rubrics.items():
            row[name] = r.score
            row[f"{name}_label"] = r.label
            row[f"{name}_method"] = r.method
        row["refused"] = self.refused
        return row


# ------------------------------------------------------------------ protocol and cache


class Judge(abc.ABC):
    """The judge protocol: subclasses implement :meth:`_score_rubric` (one rubric, one pair) and
    :meth:`settings` (everything besides the rubric and the pair that can change a verdict)."""

    name: str = "judge"
    rubrics: tuple[Rubric, ...] = ()
    cache_dir: Path | None = None

    @property
    def identity(self) -> str:
        """A short, readable name of the judge for results and cache folders (judge kind and
        model). The cache is keyed on :meth:`settings`, not on this."""
        return self.name

    def settings(self) -> dict:
        """JSON-safe description of everything besides the rubric and the pair that can change
        a verdict (endpoint, model, decoding and reading parameters). Never holds a secret."""
        return {"kind": type(self).__name__, "name": self.name}

    @abc.abstractmethod
    def _score_rubric(self, rubric: Rubric, question: str, answer: str) -> RubricScore:
        """Score one answer on one rubric (no cache: :meth:`score` handles that)."""

    # -- cache
    def cache_key(self, rubric: Rubric, question: str, answer: str) -> str:
        """SHA-256 of the toolkit's judge version, :meth:`settings`, the rubric's full text and
        scale (:meth:`Rubric.describe`), the question and the answer: a verdict is reused only
        when nothing that could change it has changed."""
        doc = {"judge_version": JUDGE_VERSION, "judge": self.settings(),
               "rubric": rubric.describe(), "question": question, "answer": answer}
        blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, rubric: Rubric, question: str, answer: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = self.cache_key(rubric, question, answer)
        return self.cache_dir / slug(self.identity) / key[:2] / f"{key}.json"

    def _cached(self, rubric: Rubric, question: str, answer: str) -> RubricScore | None:
        path = self._cache_path(rubric, question, answer)
        if path is None or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            result = RubricScore(**doc["result"])
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring an unreadable judge cache file %s", path)
            return None
        if unusable(result):
            log.warning("ignoring a judge cache file without a verdict %s", path)
            return None
        return result

    def _store(self, rubric: Rubric, question: str, answer: str, result: RubricScore) -> None:
        path = self._cache_path(rubric, question, answer)
        if path is None:
            return
        from em_interp.atomic import atomic_write_bytes

        doc = {"judge": self.identity, "judge_version": JUDGE_VERSION,
               "settings": self.settings(), "rubric": rubric.describe(),
               "question": question, "answer": answer, "result": asdict(result)}
        atomic_write_bytes(path, json.dumps(doc, ensure_ascii=False, indent=1).encode())

    def _checked(self, rubric: Rubric, question: str, answer: str) -> RubricScore:
        """:meth:`_score_rubric`, raising :class:`JudgeError` for a result that is no verdict
        (neither a finite number nor a label), so that it is never cached or counted."""
        res = self._score_rubric(rubric, question, answer)
        if unusable(res):
            raise JudgeError(f"{self.name} gave no verdict on rubric {rubric.name!r} (score "
                             f"{res.score!r}, no label; raw {res.raw[:80]!r}); the item is not "
                             "scored. Check the judge model and the rubric's scale.")
        return res

    # -- public
    def score(self, question: str, answer: str) -> JudgeScore:
        """Score one pair on every rubric; raises :class:`JudgeError` if it cannot."""
        return self.score_many([(question, answer)], progress=False)[0]

    def score_many(self, pairs: Iterable[tuple[str, str]], *, progress: bool = True
                   ) -> list[JudgeScore]:
        """Score many pairs (cached ones are not re-scored); raises :class:`JudgeError` after
        scoring the rest if any item failed."""
        pairs = [(str(q), str(a)) for q, a in pairs]
        results: dict[tuple[int, str], RubricScore] = {}
        todo = []
        for i, (q, a) in enumerate(pairs):
            for r in self.rubrics:
                hit = self._cached(r, q, a)
                if hit is None:
                    todo.append((i, r))
                else:
                    results[(i, r.name)] = hit
        failures = self._run(todo, pairs, results, progress)
        if failures:
            (i, r), err = failures[0]
            raise JudgeError(f"{self.name}: {len(failures)} of {len(todo)} judge calls failed "
                             f"(first: item {i}, rubric {r.name!r}: {err}). The "
                             f"{len(todo) - len(failures)} that succeeded are cached; rerun "
                             "to retry the rest. Failed items are never scored.")
        return [JudgeScore(question=q, answer=a, judge=self.identity,
                           rubrics={r.name: results[(i, r.name)] for r in self.rubrics})
                for i, (q, a) in enumerate(pairs)]

    def _run(self, todo, pairs, results, progress) -> list:
        failures = []
        for i, r in tqdm(todo, desc=self.name, disable=not progress or not todo, leave=False):
            try:
                res = self._checked(r, *pairs[i])
            except JudgeError as e:
                failures.append(((i, r), e))
                continue
            self._store(r, *pairs[i], res)
            results[(i, r.name)] = res
        return failures

    def score_table(self, table, *, question_col: str = "prompt",
                    answer_col: str = "completion", progress: bool = True):
        """A copy of ``table`` (e.g. ``GenerationResult.df``) with the score columns added."""
        scores = self.score_many(zip(table[question_col], table[answer_col], strict=True),
                                 progress=progress)
        import pandas as pd

        extra = pd.DataFrame([s.as_row() for s in scores], index=table.index)
        return pd.concat([table.drop(columns=[c for c in extra if c in table]), extra], axis=1)


def unusable(result: RubricScore) -> bool:
    """True for a result that is no verdict: no label and no finite number."""
    if result.label is not None:
        return False
    return not (isinstance(result.score, int | float) and math.isfinite(result.score))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


def default_cache_dir(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None:
        from em_interp.models.cache import cache_dir as root

        return root() / "judges"
    return Path(cache_dir)


