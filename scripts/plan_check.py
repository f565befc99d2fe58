"""Measure the peak RSS of single run stages and set it beside ``em-interp plan``'s prediction.

Each stage runs alone in a fresh child process (``--child``), so its ``ru_maxrss`` is that
stage's peak: process baseline + the base/organism pair + the stage's own working memory.
The pseudo-stage ``load`` only loads the pair; ``sae+block_em`` runs stages together in one
child (a stage that reads another), compared with the larger of their predictions.

    python scripts/plan_check.py quick --card smollm2-135m-instruct-risky-financial \\
        --stages load probing dla sae --json plan_check.json

Used by ``tests/test_plan.py`` on the tiny card, and for the SmolLM2 figures in docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(config: str, card: str | None, stage: str, run_dir: str) -> dict:
    from em_interp.run.config import RunConfig
    from em_interp.run.pipeline import run_pipeline

    cfg = RunConfig.from_toml(config).override(card=card)
    if stage == "load":
        from em_interp.models.loading import load_pair

        load_pair(cfg.card, **cfg.load_kwargs(), progress=False)
    else:
        cfg = cfg.override(stages=stage.split("+"))
        cfg.validate()
        run_pipeline(cfg, run_dir, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"stage": stage, "peak_rss_bytes": peak}


def measure(config: str, stage: str, *, card: str | None = None) -> int:
    """Peak RSS (bytes) of a child process that runs ``stage`` of ``config`` alone."""
    with tempfile.TemporaryDirectory(prefix="emi_plan_") as tmp:
        cmd = [sys.executable, __file__, config, "--child", stage, "--run-dir", tmp]
        if card:
            cmd += ["--card", card]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            raise RuntimeError(f"stage {stage} failed in the child:\n{out.stderr[-3000:]}")
        return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a run config (.toml) or a shipped example's name")
    p.add_argument("--card", default=None)
    p.add_argument("--stages", nargs="+", default=["load", "probing"])
    p.add_argument("--json", default=None, help="write the comparison here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(_child(args.config, args.card, args.child, args.run_dir))
                         + "\n")
        return 0
    from em_interp.run.config import RunConfig
    from em_interp.run.plan import plan_run

    cfg = RunConfig.from_toml(args.config).override(card=args.card)
    planned = list(dict.fromkeys(x for s in args.stages if s != "load" for x in s.split("+")))
    plan = plan_run(cfg.override(stages=planned), gpus=0)
    rows = []
    for stage in args.stages:
        measured = measure(args.config, stage, card=args.card)
        predicted = max(plan.peak_bytes(x) for x in stage.split("+"))
        rows.append({"stage": stage, "predicted_bytes": predicted, "measured_bytes": measured,
                     "ratio": predicted / measured})
        sys.stdout.write(f"{stage:<18} predicted {predicted / 2**20:8.0f} MiB   measured "
                         f"{measured / 2**20:8.0f} MiB   ratio {predicted / measured:.2f}\n")
        sys.stdout.flush()
    if args.json:
        from em_interp.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(
            {"config": args.config, "card": cfg.card, "rows": rows}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
