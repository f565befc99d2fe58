"""``em-interp sweep``: a grid of ordinary runs (cards x seeds x config values), local or on Ray.

* :mod:`~em_interp.run.sweep.spec` -- the sweep file, its axes and the points they expand to;
* :mod:`~em_interp.run.sweep.execute` -- running the points (local or Ray), retries, resume;
* :mod:`~em_interp.run.sweep.summary` -- headline numbers, across-seed intervals,
  ``sweep.json`` and ``sweep.html``.

See ``docs/sweeps.md``.
"""

from em_interp.run.sweep.execute import SweepOutcome, run_point, run_sweep
from em_interp.run.sweep.spec import Resources, SweepPoint, SweepSpec, config_key, list_sweeps
from em_interp.run.sweep.summary import SweepSummary, across_seed_interval, summarize

__all__ = ["Resources", "SweepOutcome", "SweepPoint", "SweepSpec", "SweepSummary",
           "across_seed_interval", "config_key", "list_sweeps", "run_point", "run_sweep",
           "summarize"]
