"""Timing and memory helpers shared by every ``bench_*.py`` script.

Benchmarks print ratios against a baseline measured in the same process, never absolute goals
checked by tests. The helpers here keep them consistent:

* :func:`interleaved` -- time several callables round-robin after a warm-up (so slow drifts in
  machine load hit all of them alike) and report min, median and the median of per-round
  ratios against a named baseline ("paired", the most robust of the three);
  :func:`pair_ratios` gives the same three ratios between any two of them;
* :func:`peak_rss_mib` / :func:`rss_mib` / :func:`measure_peak_rss` -- resident memory;
* :func:`warn_if_busy` -- a warning when other processes use the CPUs before a timed phase;
* :func:`add_card_args` -- ``--card`` (default the real SmolLM2 card) and ``--tiny`` (the tiny
  random card, for a smoke run: its steps are so short that overhead dominates every ratio);
* :func:`table`, :func:`fmt`, :func:`ratio`, :func:`versions`, :func:`write_json`.

Import it from a benchmark run as ``python benchmarks/bench_x.py`` (the script's folder is on
``sys.path``): ``from _timing import interleaved, table``.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REAL_CARD = "smollm2-135m-instruct"
TINY_CARD = "tiny-random-llama"


def add_card_args(ap, what: str = "card name, card file or local HF folder") -> None:
    """``--card`` (default :data:`REAL_CARD`) and ``--tiny`` (= ``--card tiny-random-llama``)."""
    ap.add_argument("--card", default=REAL_CARD, help=f"{what} (default {REAL_CARD})")
    ap.add_argument("--tiny", dest="card", action="store_const", const=TINY_CARD,
                    help=f"use {TINY_CARD}: a smoke run (overhead dominates its ratios; quote "
                         f"{REAL_CARD})")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_peak_rss(fn: Callable[[], object], interval: float = 0.01) -> tuple[object, float]:
    """Run ``fn`` and return ``(its result, peak RSS in MiB while it ran)``.

    A sampling thread reads the RSS every ``interval`` seconds, so a phase's own peak is seen
    even after an earlier phase of the same process set the lifetime maximum higher.
    """
    peak = [rss_mib()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            done.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, max(peak[0], rss_mib())


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def busy_cpu_percent(seconds: float = 1.0) -> float | None:
    """System-wide CPU use over ``seconds`` while this process sleeps: what others are using."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.cpu_percent(interval=seconds)


def warn_if_busy(where: str) -> float | None:
    """Print a warning when other processes keep the CPUs busy; return their use in percent."""
    busy = busy_cpu_percent()
    if busy is not None and busy > 15:
        print(f"  WARNING: other processes use {busy:.0f}% of the CPUs before the {where} phase; "
              "timings will be noisy (compare min/paired, rerun idle, or use --threads 1).")
    return busy


def interleaved(fns: dict[str, Callable[[], object]], *, baseline: str, repeats: int = 5,
                warmup: int = 1) -> dict:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Returns ``{"times_s", "min_s", "median_s", "ratio_min", "ratio_median", "ratio_paired"}``;
    every ratio is ``name / baseline`` (``ratio_paired`` is the median of per-round ratios).
    """
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {list(fns)}")
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    mins = {k: min(v) for k, v in times.items()}
    meds = {k: statistics.median(v) for k, v in times.items()}
    base = times[baseline]
    return {
        "times_s": times, "min_s": mins, "median_s": meds, "baseline": baseline,
        "ratio_min": {k: ratio(mins[k], mins[baseline]) for k in fns},
        "ratio_median": {k: ratio(meds[k], meds[baseline]) for k in fns},
        "ratio_paired": {k: statistics.median(t / b for t, b in zip(v, base, strict=True))
                         for k, v in times.items()},
    }


def pair_ratios(res: dict, name: str, ref: str) -> dict[str, float | None]:
    """``name`` against ``ref`` (not the run's baseline) from :func:`interleaved`'s output: the
    ratio of mins, of medians, and the median of per-round ratios (``paired``)."""
    t, r = res["times_s"][name], res["times_s"][ref]
    return {"min": ratio(min(t), min(r)),
            "median": ratio(statistics.median(t), statistics.median(r)),
            "paired": statistics.median(a / b for a, b in zip(t, r, strict=True))}


def timing_rows(res: dict, unit: float = 1e3, unit_name: str = "ms") -> tuple[list, list]:
    """Headers and rows of a table for the output of :func:`interleaved`."""
    base = res["baseline"]
    headers = ["", f"min {unit_name}", f"median {unit_name}", f"/{base} (min)",
               f"/{base} (median)", f"/{base} (paired)"]
    rows = [[k, fmt(res["min_s"][k] * unit, ".1f"), fmt(res["median_s"][k] * unit, ".1f"),
             fmt(res["ratio_min"][k], ".2f"), fmt(res["ratio_median"][k], ".2f"),
             fmt(res["ratio_paired"][k], ".2f")] for k in res["times_s"]]
    return headers, rows


def versions(*packages: str) -> dict:
    """Python and package versions, for the JSON a benchmark writes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages or ("torch", "transformers", "transformer-lens", "sae-lens", "peft",
                            "em-interp"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write ``payload`` (with versions added) to ``path`` when one is given."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "versions": versions()}, indent=2, default=str))
    print(f"wrote {path}")
