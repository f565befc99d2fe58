"""The stages of ``em-interp demo`` / ``em-interp run``: cached, resumable, in one run folder.

A run is a list of stages (:data:`em_interp.run.stages.STAGES`: probing, introspection, patching, dla,
asr, sae, block_em) over one card, configured by a :class:`~em_interp.run.config.RunConfig`. Each
stage writes everything it produced into ``stages/<name>/`` of the run folder, atomically:

* ``stage.json`` -- title, a short text (what was computed, what the numbers are), the headline
  numbers (``summary``, what ``results.json`` holds under the stage's key), the figure files,
  the stage's config hash, the seconds it took;
* ``figures/*.json`` -- plotly figures, drawn by :mod:`em_interp.run.report`;
* ``results/<name>/`` -- the analyses' :class:`~em_interp.results.Result` objects.

Long stages also keep resumable intermediate state in ``work/<name>/<hash>/`` (activation
stores, patching sweeps written per layer, generations written line by line), so a run killed in
the middle of a stage picks up where it stopped.

**Caching.** A stage's hash covers its own settings, the run-wide ones (card, seed, dtype, batch
size, prompt length limit), the hashes of the stages it reads, and the toolkit's version with a
content hash of the shipped prompt sets (:func:`toolkit_version`), so an upgrade recomputes
everything instead of serving results of older code. A stage whose ``stage.json`` records the
same hash is not recomputed: an unchanged rerun only rebuilds ``results.json``,
``manifest.json`` and ``report.html``. ``manifest.json`` keeps each cached stage's seconds (those
of the run that computed it) and lists the stages served from cache in this invocation.

**Forcing.** ``force=["patching"]`` discards the stage's outputs and intermediate work
(``stages/patching/``, ``work/patching/``) and recomputes it, and so for every later stage that
reads it (transitively). Everything is discarded before the first stage runs, so a forced run
that is killed is finished by a plain rerun, never answered from the old cache.

Models are loaded once per run (:class:`~em_interp.run.stage.RunContext` holds them) and only
when a stage that is not cached needs them. Every argument is checked before anything is
written: an unknown or absent stage in ``force``, a ``run_dir`` that is a file, raise
:class:`~em_interp.errors.ConfigError` and leave no folder behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_interp.atomic import atomic_dir, atomic_write_bytes, is_complete
from em_interp.errors import ConfigError
from em_interp.results import json_safe
from em_interp.run.stage import RunContext, Stage, StageOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`run_pipeline` returns: where the run is and what it wrote."""

    run_dir: Path
    """The run folder."""
    results: dict[str, Any]
    """``results.json``: the headline numbers, one key per stage, in run order."""
    manifest: dict[str, Any]
    """``manifest.json``: card, stages, seed, config, versions, seconds per stage, caveat."""
    report: Path
    """``report.html``."""
    cached: tuple[str, ...]
    """Stages served from cache in this invocation (not recomputed)."""

    @property
    def computed(self) -> tuple[str, ...]:
        """Stages computed in this invocation."""
        return tuple(s for s in self.manifest["stages"] if s not in self.cached)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True).encode()).hexdigest()[:16]


def toolkit_version() -> dict:
    """The em-interp version and the shipped data's versions, part of every stage's hash.

    ``{"em_interp": __version__, "prompt_sets": {name: header version}, "data_sha256": ...,
    "judge_version": ...}`` (the judges' verdict code, so cached ASR verdicts follow it);
    the content hash covers every shipped data file (prompt sets, refusal phrases, rubrics), so
    an edited set recomputes the stages even when its version was not bumped.
    """
    from importlib import resources

    import em_interp

    root = resources.files("em_interp.data")
    digest = hashlib.sha256()
    sets: dict[str, Any] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith((".jsonl", ".json")):
            continue
        data = entry.read_bytes()
        digest.update(entry.name.encode() + b"\0" + data + b"\0")
        if entry.name.endswith(".jsonl"):
            first = data.split(b"\n", 1)[0]
            try:
                meta = json.loads(first).get("__meta__", {})
            except (ValueError, AttributeError):
                meta = {}
            sets[entry.name[: -len(".jsonl")]] = meta.get("version")
    from em_interp.behaviour.judge_base import JUDGE_VERSION

    return {"em_interp": em_interp.__version__, "prompt_sets": sets,
            "data_sha256": digest.hexdigest()[:16], "judge_version": JUDGE_VERSION}


def _versions(toolkit: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "transformer-lens", "sae-lens", "peft",
                "scikit-learn", "scipy", "plotly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return {"em-interp": toolkit["em_interp"], **out}


def check_run_dir(run_dir: str | Path, *, option: str = "run_dir") -> Path:
    """``run_dir`` as a Path, if a run folder can be made there; else a ConfigError.

    An existing file at the path, or at any folder above it, cannot become a run folder.
    ``option`` names the argument in the message (the CLI passes ``--out``).
    """
    path = Path(run_dir).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is" if p == path else f"lies under {str(p)!r}, which is"
                raise ConfigError(f"{option} {str(path)!r} {where} a file, not a folder; give "
                                  "a folder for the run (a new one, or an earlier run's).")
            break
    return path


def check_stage_names(names: Collection[str], known: Collection[str], *, option: str) -> None:
    """A ConfigError naming ``option`` (and the closest stage) unless every name is known."""
    import difflib

    bad = [s for s in names if s not in known]
    if bad:
        hints = [f"{b!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            b, list(known), n=1)) else repr(b) for b in bad]
        raise ConfigError(f"{option} names unknown stage(s) {', '.join(hints)}; stages are "
                          f"{', '.join(known)}.")


def check_force(force: Collection[str], run_stages: Collection[str],
                known: Collection[str], *, option: str = "force",
                stages_option: str = "config.stages") -> None:
    """A ConfigError unless every stage in ``force`` is known and one of ``run_stages``.

    ``option`` / ``stages_option`` name the arguments in the message (the CLI passes
    ``--force`` / ``--stages``).
    """
    check_stage_names(force, known, option=option)
    absent = [s for s in force if s not in run_stages]
    if absent:
        raise ConfigError(f"{option} names {', '.join(absent)}, which this run does not include "
                          f"(its stages: {', '.join(run_stages)}); add it to {stages_option} or "
                          f"drop it from {option}.")


def _forced(config, stages: dict[str, Stage], force) -> set[str]:
    """``force`` plus every stage of the run that reads a forced stage, transitively."""
    forced = set(force)
    for name in config.stages:
        if any(r in forced for r in stages[name].reads):
            forced.add(name)
    return forced


def _discard(path: Path) -> None:
    """Remove a folder: renamed aside first (one atomic step), then deleted."""
    for old in path.parent.glob(f".{path.name}.discarded-*") if path.parent.is_dir() else []:
        shutil.rmtree(old, ignore_errors=True)  # a discard a crash interrupted
    if path.exists():
        aside = path.with_name(f".{path.name}.discarded-{uuid.uuid4().hex[:8]}")
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def _table_json(caption: str, df) -> dict:
    return {"caption": caption, "columns": [str(c) for c in df.columns],
            "rows": json_safe(df.astype(object).where(df.notna(), None).values.tolist())}


def _write_stage(stage_dir: Path, stage: Stage, out: StageOutput, config_hash: str,
                 seconds: float) -> None:
    if out.held_out is not None and out.held_out.overlap:
        raise ConfigError(f"stage {stage.name!r} evaluated on {out.held_out.overlap} prompt(s) "
                          "it was fit on; its fit and evaluation prompts must be disjoint (a "
                          "bug in the stage, or a config whose prompt sets overlap).")
    with atomic_dir(stage_dir, meta={"stage": stage.name}) as tmp:
        figures = []
        if out.figures:
            (tmp / "figures").mkdir()
        for stem, fig, caption in out.figures:
            path = tmp / "figures" / f"{stem}.json"
            path.write_text(fig.to_json())
            figures.append({"file": f"figures/{stem}.json", "caption": caption})
        for name, result in out.results.items():
            result.write_into(tmp / "results" / name)
        info = {"name": stage.name, "title": out.title or stage.title, "text": out.text,
                "summary": json_safe(out.summary), "figures": figures,
                "results": sorted(out.results), "config_hash": config_hash,
                "tables": [_table_json(c, df) for c, df in out.tables],
                "held_out": None if out.held_out is None else out.held_out.to_dict(),
                "seconds": round(seconds, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "stage.json").write_text(json.dumps(info, indent=1))


def _with_held_out(summary: dict, held) -> dict:
    """A stage's results.json entry: its headline numbers, and under ``"prompts"`` the content
    ids it was fit on and evaluated on (when it selects anything)."""
    out = json_safe(summary)
    if held is not None:
        out = {**out, "prompts": held if isinstance(held, dict) else held.to_dict()}
    return out


def _drop_stale_work(stage_work: Path, keep: str) -> None:
    """Intermediate state written under other settings of a now-finished stage is dead weight."""
    if stage_work.is_dir():
        for child in stage_work.iterdir():
            if child.is_dir() and child.name != keep:
                shutil.rmtree(child, ignore_errors=True)


def check_servers(config, to_run) -> None:
    """Raise :class:`~em_interp.errors.ConfigError` naming the URL of any judge or generation
    server that a stage about to run needs and that does not answer, before any model loads."""
    from em_interp.behaviour.openai_http import OpenAIEndpoint

    sub = dataclasses.replace(config, stages=list(to_run))
    for where, url, key_env in sub.servers():
        OpenAIEndpoint(url, api_key_env=key_env).check_reachable(where)


def run_pipeline(config, run_dir: str | Path, *, force: tuple[str, ...] = (),
                 progress: bool = True, stages: dict[str, Stage] | None = None) -> RunOutcome:
    """Run (or resume) every stage of ``config.stages`` into ``run_dir``.

    Writes ``results.json`` (one key per stage), ``manifest.json`` (card, versions, seeds,
    config, seconds per stage, the stages served from cache) and ``report.html`` at the end,
    also when every stage was cached.

    Args:
        config: a :class:`~em_interp.run.config.RunConfig` (call its ``validate()`` first to
            check it against the card before anything loads).
        run_dir: the run folder, new or an earlier run's (resumed).
        force: stages to recompute from scratch, with the stages that read them (their
            ``stages/`` and ``work/`` folders are discarded first).
        progress: show progress bars.
        stages: the stage table (default :data:`em_interp.run.stages.STAGES`).

    Returns:
        A :class:`RunOutcome`.

    Raises:
        ConfigError: a stage of ``config.stages`` or ``force`` that does not exist, a ``force``
            stage the run does not include, a ``run_dir`` that is (or lies under) a file; raised
            before anything is written.
    """
    from em_interp.run.report import build_report

    if stages is None:
        from em_interp.run.stages import STAGES as stages
    force = tuple(force)
    check_stage_names(config.stages, stages, option="config.stages")
    check_force(force, config.stages, stages)
    run_dir = check_run_dir(run_dir)
    toolkit = toolkit_version()
    run_dir.mkdir(parents=True, exist_ok=True)
    forced = _forced(config, stages, force)
    for name in sorted(forced):
        log.info("stage %s: forced, discarding stages/%s and work/%s", name, name, name)
        _discard(run_dir / "stages" / name)
        _discard(run_dir / "work" / name)
    ctx = RunContext(config, run_dir, progress=progress)
    started = time.perf_counter()
    summaries: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    cached: list[str] = []
    for name in config.stages:  # every stage's key first: the servers check needs them
        upstream = {r: ctx.hashes.get(r) for r in stages[name].reads}
        ctx.hashes[name] = _hash({"stage": name, "config": config.stage_config(name),
                                  "common": config.common(), "upstream": upstream,
                                  "toolkit": toolkit})
    infos = {name: ctx.stage_info(name) if is_complete(run_dir / "stages" / name) else {}
             for name in config.stages}
    check_servers(config, [n for n in config.stages
                           if infos[n].get("config_hash") != ctx.hashes[n]])
    for name in config.stages:
        stage = stages[name]
        h = ctx.hashes[name]
        stage_dir = run_dir / "stages" / name
        info = infos[name]
        if info.get("config_hash") == h:
            log.info("stage %s: cached (computed in %.1f s)", name, info.get("seconds", 0.0))
            seconds[name] = float(info.get("seconds", 0.0))
            summaries[name] = _with_held_out(info.get("summary", {}), info.get("held_out"))
            cached.append(name)
            continue
        log.info("stage %s: running", name)
        t = time.perf_counter()
        out = stage.fn(ctx)
        seconds[name] = time.perf_counter() - t
        _write_stage(stage_dir, stage, out, h, seconds[name])
        _drop_stale_work(run_dir / "work" / name, keep=h)
        summaries[name] = _with_held_out(out.summary, out.held_out)
    timings = {**seconds, **{k: v for k, v in ctx.timings.items() if k not in seconds},
               "total": time.perf_counter() - started}
    results = {name: summaries[name] for name in config.stages}
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())
    manifest = {"card": config.card, "stages": list(config.stages), "seed": config.seed,
                "config": json_safe(config.to_dict()), "versions": _versions(toolkit),
                "toolkit": toolkit, "timings_s": {k: round(v, 2) for k, v in timings.items()},
                "cached": cached, "forced": sorted(forced),
                "caveat": config.caveat(), "machine": {"platform": platform.platform(),
                                                       "python": platform.python_version()},
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_bytes(run_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    report = build_report(run_dir)
    return RunOutcome(run_dir=run_dir, results=results, manifest=manifest, report=report,
                      cached=tuple(cached))
