"""scripts/gpu_check.py at tiny size on the CPU: every row is there, with finite numbers, and the
toolkit's logits equal HF's on the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"forward", "cache", "patching", "generation", "block_em_step"}


def test_gpu_check_tiny_on_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny",
                          "--device", "cpu", "--peak-tflops", "1", "--reps", "1",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["meta"]["size"] == "tiny" and doc["meta"]["dtype"] == "float32"
    rows = doc["rows"]
    for model in ("qwen2.5-32b", "llama-3.1-8b"):
        got = {r["check"] for r in rows if r["model"] == model}
        assert got == CHECKS | {"equivalence"}, got
    for r in rows:
        if r["check"] == "equivalence":
            assert r["ok"] and r["max_abs_diff"] < 1e-3, r
            continue
        numbers = [r["toolkit_s"], r["hf_s"], r["toolkit_over_hf"], r["toolkit_peak_mem_gib"],
                   r["hf_peak_mem_gib"]]
        if r["check"] in ("forward", "generation"):
            numbers += [r["toolkit_tokens_per_s"], r["hf_tokens_per_s"], r["toolkit_mfu"]]
        assert all(isinstance(x, float | int) and math.isfinite(x) and x > 0 for x in numbers), r
    # the scaled-down configs keep the architectures and their head ratios
    specs = doc["meta"]["specs"]
    assert specs["qwen2.5-32b"]["hf_class"] == "Qwen2ForCausalLM"
    assert specs["llama-3.1-8b"]["rope_scaling"]["rope_type"] == "llama3"
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| qwen2.5-32b |") == len(CHECKS) + 1
