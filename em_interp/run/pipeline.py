"""The stages of ``em-interp demo`` / ``em-interp run``: cached, resumable, in one run folder.

A run is a list of stages (:data:`em_interp.run.stages.STAGES`: probing, introspection, patching, dla,
asr, sae, block_em) over one card, configured by a :class:`~em_interp.run.config.RunConfig`. Each
stage writes everything it produced into ``stages/<name>/`` of the run folder, atomically:

* ``stage.json`` -- title, a short text (what was computed, what the numbers are), the headline
  numbers (``summary``, what ``results.json`` holds under the stage's key), the figure files,
  the stage's config hash, seconds;
* ``figures/*.json`` -- plotly figures, drawn by :mod:`em_interp.run.report`;
* ``results/<name>/`` -- the analyses' :class:`~em_interp.results.Result` objects.

Long stages also keep resumable intermediate state in ``work/<name>/`` (activation stores,
patching sweeps written per layer, generations written line by line), so a run killed in the
middle of a stage picks up where it stopped. A stage whose ``stage.json`` records the same config
hash (its own settings plus the card, seed and the stages it reads from) is not recomputed:
an unchanged rerun only rebuilds ``results.json``, ``manifest.json`` and ``report.html``.
``force=["patching"]`` reruns a stage (and the stages after it that read its output).

Models are loaded once per run (:class:`RunContext` holds them) and only when a stage that is
not cached needs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from em_interp.atomic import atomic_dir, atomic_write_bytes, is_complete
from em_interp.errors import ConfigError
from em_interp.results import json_safe
from em_interp.run.stage import RunContext, Stage, StageOutput

log = logging.getLogger(__name__)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True).encode()).hexdigest()[:16]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("em-interp", "torch", "transformers", "transformer-lens", "sae-lens", "peft",
                "scikit-learn", "scipy", "plotly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _write_stage(stage_dir: Path, stage: Stage, out: StageOutput, config_hash: str,
                 seconds: float) -> None:
    with atomic_dir(stage_dir, meta={"stage": stage.name}) as tmp:
        figures = []
        if out.figures:
            (tmp / "figures").mkdir()
        for stem, fig, caption in out.figures:
            path = tmp / "figures" / f"{stem}.json"
            path.write_text(fig.to_json())
            figures.append({"file": f"figures/{stem}.json", "caption": caption})
        for name, result in out.results.items():
            result._write_sub(tmp / "results" / name)
        info = {"name": stage.name, "title": out.title or stage.title, "text": out.text,
                "summary": json_safe(out.summary), "figures": figures,
                "results": sorted(out.results), "config_hash": config_hash,
                "seconds": round(seconds, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "stage.json").write_text(json.dumps(info, indent=1))


def _drop_stale_work(stage_work: Path, keep: str) -> None:
    """Intermediate state written under other settings of a now-finished stage is dead weight."""
    import shutil

    if stage_work.is_dir():
        for child in stage_work.iterdir():
            if child.is_dir() and child.name != keep:
                shutil.rmtree(child, ignore_errors=True)


def run_pipeline(config, run_dir: str | Path, *, force: tuple[str, ...] = (),
                 progress: bool = True, stages: dict[str, Stage] | None = None) -> dict:
    """Run (or resume) every stage of ``config.stages`` into ``run_dir``; return results.json.

    Writes ``results.json`` (one key per stage), ``manifest.json`` (card, versions, seeds,
    config, timings) and ``report.html`` at the end, also when every stage was cached.
    """
    from em_interp.run.report import build_report
    from em_interp.run.stages import STAGES

    stages = stages or STAGES
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in (*config.stages, *force) if s not in stages]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(stages)}.")
    ctx = RunContext(config, run_dir, progress=progress)
    started = time.perf_counter()
    forced = set(force)
    summaries: dict[str, Any] = {}
    for name in config.stages:
        stage = stages[name]
        upstream = {r: ctx.hashes.get(r) for r in stage.reads}
        h = _hash({"stage": name, "config": config.stage_config(name),
                   "common": config.common(), "upstream": upstream})
        ctx.hashes[name] = h
        stage_dir = run_dir / "stages" / name
        cached = is_complete(stage_dir) and ctx.stage_info(name).get("config_hash") == h
        if any(r in forced for r in stage.reads):
            forced.add(name)  # a stage that reads a recomputed stage is recomputed too
        if cached and name not in forced:
            log.info("stage %s: cached", name)
            info = ctx.stage_info(name)
            ctx.timings[name] = 0.0
            summaries[name] = info.get("summary", {})
            continue
        log.info("stage %s: running", name)
        t = time.perf_counter()
        out = stage.fn(ctx)
        seconds = time.perf_counter() - t
        _write_stage(stage_dir, stage, out, h, seconds)
        _drop_stale_work(run_dir / "work" / name, keep=h)
        ctx.timings[name] = seconds
        summaries[name] = json_safe(out.summary)
    ctx.timings["total"] = time.perf_counter() - started
    results = {name: summaries[name] for name in config.stages}
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())
    manifest = {"card": config.card, "stages": list(config.stages), "seed": config.seed,
                "config": json_safe(config.to_dict()), "versions": _versions(),
                "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()},
                "caveat": config.caveat(), "machine": {"platform": platform.platform(),
                                                       "python": platform.python_version()},
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_bytes(run_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    build_report(run_dir)
    return results
