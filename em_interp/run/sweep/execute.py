"""Running a sweep's points: each one an ordinary run, on the local or the Ray backend.

:func:`run_sweep` expands and validates every point first (:meth:`SweepSpec.points`), then runs
each point that has not finished through :func:`em_interp.run.pipeline.run_pipeline` in its own
run folder, ``DIR/points/<key>/`` (``key`` = :func:`~em_interp.run.sweep.spec.config_key`, a hash
of the resolved config and the toolkit version). Within a point the pipeline's stage cache
applies, so a point killed half-way resumes from its finished stages.

* **Done.** A finished point writes ``point.json`` (status ``finished``) into its folder, and
  ``sweep.json`` / ``sweep.html`` are rewritten after every point (pending ones marked so). A rerun
  of the sweep skips such points (status ``cached``) and runs only the missing and failed ones.
* **Failures.** A point that raises, or whose Ray worker dies, is an attempt that failed; it is
  run again up to ``retries`` times. One that fails every attempt is marked ``failed`` in
  ``sweep.json`` with its last error, never dropped.
* **Backends.** ``local`` runs the points one after another in this process (tests and CI);
  ``ray`` submits each as a Ray task with the sweep's declared resources (``num_cpus``,
  ``num_gpus``, ``memory``) to a local Ray instance, or to an existing cluster with ``address``
  (every node needs em-interp installed and the same model cache or hub access).

A point runner is any picklable ``runner(payload) -> dict`` (default :func:`run_point`), so
tests can plant failures.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from em_interp.atomic import atomic_write_text
from em_interp.errors import ConfigError
from em_interp.run.sweep.spec import Resources, SweepPoint, SweepSpec

log = logging.getLogger(__name__)
Backend = Literal["local", "ray"]
RAY_HINT = "pip install 'em-interp[sweep]'"


def run_point(payload: dict) -> dict:
    """Run one point (in this process or a Ray worker); never raises for a failing run.

    ``payload``: ``{"config": RunConfig.to_dict(), "source": str, "run_dir": str}``.
    Returns ``{"status": "finished" | "failed", "seconds", "error"}``.
    """
    from em_interp.run.config import RunConfig
    from em_interp.run.pipeline import run_pipeline

    t = time.perf_counter()
    try:
        cfg = RunConfig.from_dict(payload["config"], source=payload["source"])
        run_pipeline(cfg, payload["run_dir"], progress=False)
    except Exception as e:  # a failed point is reported, not raised
        return {"status": "failed", "seconds": time.perf_counter() - t,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}
    return {"status": "finished", "seconds": time.perf_counter() - t, "error": None}


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` returns."""

    out_dir: Path
    points: list[dict]
    """``sweep.json``'s point records (axes, key, status, attempts, error, headline)."""
    sweep_json: Path
    sweep_html: Path
    seconds: float
    """Wall time of this invocation."""

    @property
    def failed(self) -> list[dict]:
        return [p for p in self.points if p["status"] == "failed"]

    @property
    def ran(self) -> list[dict]:
        """Points run in this invocation (not served from an earlier one)."""
        return [p for p in self.points if p["status"] != "cached"]


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, backend: Backend = "local",
              address: str | None = None, retries: int | None = None,
              runner: Callable[[dict], dict] = run_point,
              on_event: Callable[[str], None] | None = None,
              plan_check: bool = True) -> SweepOutcome:
    """Run (or resume) every point of ``spec`` into ``out_dir``; write sweep.json and sweep.html.

    Args:
        spec: the parsed sweep file.
        out_dir: the sweep folder (``points/<key>/`` holds each point's run folder).
        backend: ``"local"`` (in-process, one after another) or ``"ray"``.
        address: Ray only: an existing cluster's address (``None``: start a local instance).
        retries: extra attempts of a failed point (``None``: the file's ``[sweep].retries``).
        runner: the point runner (default :func:`run_point`; must be picklable for Ray).
        on_event: called with a line per started / finished / failed point (the CLI prints).
        plan_check: check each point's memory plan (:func:`em_interp.run.plan.plan_run`)
            first: on the local backend against this machine, as ``em-interp run`` does; on
            Ray (CPU points) against the declared ``[resources].memory``.

    Raises:
        ConfigError: a bad point (before anything runs), an unknown backend, ``address``
            without the Ray backend, Ray not installed.
    """
    from em_interp.run.pipeline import check_run_dir
    from em_interp.run.sweep.summary import point_record, write_summary

    say = on_event or log.info
    if backend not in ("local", "ray"):
        raise ConfigError(f"backend {backend!r}: use 'local' or 'ray'.")
    if address is not None and backend != "ray":
        raise ConfigError("--address is for the Ray backend; add --backend ray.")
    retries = spec.retries if retries is None else retries
    if retries < 0:
        raise ConfigError(f"retries = {retries} must be >= 0.")
    points = spec.points()  # every point validated before anything runs or is written
    if plan_check:
        _check_plans(points, backend, spec.resources)
    out = check_run_dir(out_dir, option="--out")
    if backend == "ray":
        _import_ray()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    state: dict[int, dict] = {}
    todo = []
    for p in points:
        if _finished(out, p):
            state[p.index] = {**_read_point(out, p), "status": "cached"}
        else:
            state[p.index] = {"status": "pending", "attempts": 0, "error": None}
            todo.append(p)
    say(f"{len(points)} point(s): {len(points) - len(todo)} finished earlier, "
        f"{len(todo)} to run on the {backend} backend")
    done: dict[int, dict] = {}  # records of finished points (they no longer change)

    def snapshot() -> tuple[list[dict], Path, Path]:
        """sweep.json / sweep.html as they stand (rewritten after every point)."""
        records = []
        for p in points:
            rec = done.get(p.index) or point_record(p, state[p.index], out)
            if state[p.index]["status"] in ("finished", "cached"):
                done[p.index] = rec
            records.append(rec)
        return records, *write_summary(out, spec, records, backend=backend,
                                       seconds=time.perf_counter() - t0)

    for attempt in range(1 + retries):
        if not todo:
            break
        results = (_run_local(todo, out, runner, say) if backend == "local" else
                   _run_ray(todo, out, runner, spec.resources, address, say))
        failed = []
        for p, res in results:
            st = state[p.index]
            st["attempts"] += 1
            st.update(status=res["status"], error=res.get("error"),
                      seconds=round(float(res.get("seconds", 0.0)), 2))
            if res["status"] == "finished":
                _write_point(out, p, st)
                say(f"point {p.index} ({p.label}): finished in {st['seconds']:.1f} s")
            else:
                failed.append(p)
                more = "; retrying" if attempt < retries else ""
                say(f"point {p.index} ({p.label}): attempt {st['attempts']} failed: "
                    f"{st['error']}{more}")
            snapshot()
        todo = failed
    records, sweep_json, sweep_html = snapshot()
    return SweepOutcome(out_dir=out, points=records, sweep_json=sweep_json,
                        sweep_html=sweep_html, seconds=time.perf_counter() - t0)


def _check_plans(points: list[SweepPoint], backend: str, resources: Resources) -> None:
    """Refuse a point whose memory plan does not fit where it will run (naming the point)."""
    from em_interp.run.plan import check_plan, plan_run

    for p in points:
        where = f"{p.config.source}"
        if backend == "local":
            try:
                check_plan(plan_run(p.config))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e} (em-interp sweep: --no-plan-check)") from None
        elif resources.memory and not resources.num_gpus:
            plan = plan_run(p.config, gpus=0)
            peak = max([plan.peak_bytes(s.stage) for s in plan.stage_plans()]
                       + [plan.peak_bytes("load")])
            if peak > resources.memory:
                raise ConfigError(
                    f"{where}: its memory plan peaks at about {peak / 2**30:.1f} GiB, more than "
                    f"the {resources.memory / 2**30:.1f} GiB it declares to Ray "
                    "([resources].memory); raise it, or lower the run's sizes "
                    "(--no-plan-check skips this check).")


def point_dir(out: Path, p: SweepPoint) -> Path:
    """A point's run folder."""
    return out / "points" / p.key


def _payload(out: Path, p: SweepPoint) -> dict:
    return {"config": p.config.to_dict(), "source": p.config.source,
            "run_dir": str(point_dir(out, p))}


def _finished(out: Path, p: SweepPoint) -> bool:
    rec = _read_point(out, p)
    return (rec.get("status") == "finished" and rec.get("key") == p.key
            and (point_dir(out, p) / "results.json").is_file())


def _read_point(out: Path, p: SweepPoint) -> dict:
    path = point_dir(out, p) / "point.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_point(out: Path, p: SweepPoint, st: dict) -> None:
    from em_interp.results import json_safe

    doc = {"key": p.key, "axes": json_safe(p.axes), "status": "finished",
           "attempts": st["attempts"], "seconds": st.get("seconds"), "error": None,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(point_dir(out, p) / "point.json", json.dumps(doc, indent=1))


def _run_local(todo: list[SweepPoint], out: Path, runner, say) -> Iterator[tuple]:
    for p in todo:
        say(f"point {p.index} ({p.label}): running")
        try:
            res = runner(_payload(out, p))
        except Exception as e:  # a runner that raises is a failed attempt too
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": 0.0}
        yield p, res


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"the Ray backend needs Ray, which is not installed: {RAY_HINT} "
                          "(or run with --backend local).") from None
    return ray


def _check_fits(total: dict, resources: Resources, address: str | None, say) -> None:
    """A point that asks for more than the whole Ray instance has would wait forever: refuse it
    (on an existing cluster, which may scale up, only say so)."""
    short = [f"{name} {need:g}{unit} (the instance has {total.get(key, 0) / scale:g}{unit})"
             for name, key, need, scale, unit in (
                 ("num_cpus", "CPU", resources.num_cpus, 1, ""),
                 ("num_gpus", "GPU", resources.num_gpus, 1, ""),
                 ("memory", "memory", (resources.memory or 0) / 2**30, 2**30, " GiB"))
             if need and total.get(key, 0) / scale < need]
    if not short:
        return
    msg = (f"each point asks Ray for {', '.join(short)}, more than it has, so no point could "
           "start. Lower [resources] in the sweep file, or run on a cluster that has them "
           "(--address).")
    if address is None:
        raise ConfigError(msg)
    say(f"warning: {msg} Waiting for the cluster to scale up.")


def _run_ray(todo: list[SweepPoint], out: Path, runner, resources: Resources,
             address: str | None, say) -> Iterator[tuple]:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    try:
        _check_fits(ray.cluster_resources(), resources, address, say)
        task = ray.remote(runner).options(max_retries=0, **resources.ray_options())
        pending: dict[Any, SweepPoint] = {}
        for p in todo:
            pending[task.remote(_payload(out, p))] = p
            say(f"point {p.index} ({p.label}): submitted")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                p = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the worker died (OOM, node lost) or the task raised
                    res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                           "seconds": 0.0}
                yield p, res
    finally:
        if started:
            ray.shutdown()
