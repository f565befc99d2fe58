"""`em-interp run` / `demo` end to end on the tiny card: outputs, caching, --force, resume after a
kill, config validation before any model loads, and the report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from em_interp.cli import main
from em_interp.errors import ConfigError, UnknownCardError
from em_interp.results import load_result
from em_interp.run.config import PAPER_STAGES, STAGE_NAMES, RunConfig, list_configs
from em_interp.run.pipeline import run_pipeline
from em_interp.run.stages import STAGES as ALL_STAGES

# the papers' analyses; em_eval (it needs a judge server) is tested in tests/test_em_eval.py
STAGES = {name: ALL_STAGES[name] for name in PAPER_STAGES}

TINY = {
    "run": {"card": "tiny-random-llama", "stages": list(STAGES), "batch_size": 8,
            "max_prompt_chars": 150},
    "probing": {"n_prompts": 32},
    "refusal_direction": {"n_validation": 8, "n_test": 4, "max_new_tokens": 4,
                          "layers": [1, 2]},
    "introspection": {"n_prompts": 32, "n_null": 20},
    "patching": {"k_pairs": 2, "head_layers": 1},
    "dla": {"n_prompts": 4, "tokens": ["No", "Yes"]},
    "asr": {"n_prompts": 4, "n_reference": 4, "max_new_tokens": 4,
            "models": ["base", "organism"]},
    "sae": {"training_tokens": 4096, "expansion": 2, "n_prompts": 16, "train_prompts": 48},
    "block_em": {"n_prompts": 6, "n_ab_pairs": 4, "n_candidates": 3, "k_latents": 2,
                 "grid": [0.0, 0.5], "max_steps": 2, "n_examples": 8, "eval_pairs": 6},
}


def _toml(d: dict) -> str:
    lines = []
    for table, body in d.items():
        lines.append(f"[{table}]")
        for k, v in body.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted run of every stage on the tiny card."""
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig.from_dict(TINY)
    cfg.validate()
    outcome = run_pipeline(cfg, out, progress=False)
    return cfg, out, outcome


def test_run_writes_every_stage_report_and_manifest(tiny_run):
    cfg, out, outcome = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert list(saved) == list(cfg.stages) == list(STAGES)
    assert saved == json.loads(json.dumps(outcome.results))
    assert outcome.run_dir == out and outcome.report == out / "report.html"
    assert outcome.cached == () and outcome.computed == tuple(STAGES)
    assert outcome.manifest == json.loads((out / "manifest.json").read_text())
    assert saved["probing"]["n_layers"] == 3 and 0 <= saved["probing"]["best_accuracy"] <= 1
    assert saved["introspection"]["n_risky"] > 0
    assert saved["patching"]["k_pairs"] == 2
    assert saved["dla"]["max_abs_total_error"] < 1e-3
    assert set(saved["asr"]["conditions"]) >= {"baseline"}
    assert saved["sae"]["train"]["d_sae"] == 2 * 64 and -1 <= saved["sae"]["features"][
        "max_abs_r"] <= 1
    assert len(saved["block_em"]["runs"]) == 2 and saved["block_em"]["latents_plus"] + saved[
        "block_em"]["latents_minus"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["card"] == "tiny-random-llama" and manifest["seed"] == 0
    assert manifest["versions"]["torch"] and set(STAGES) <= set(manifest["timings_s"])
    assert manifest["config"]["probing"]["n_prompts"] == 32
    report = (out / "report.html").read_text()
    assert "<script" in report and "<script src=" not in report  # plotly.js inline: offline
    n_figures = 0
    for name in STAGES:
        info = json.loads((out / "stages" / name / "stage.json").read_text())
        assert info["text"] and info["summary"]
        assert info["title"] in report or info["title"].replace("'", "&#x27;") in report
        for i, fig in enumerate(info["figures"]):
            assert (out / "stages" / name / fig["file"]).is_file()
            assert f'id="{name}-fig{i}"' in report
            n_figures += 1
    assert n_figures >= 2 * len(STAGES)
    assert manifest["caveat"].split(" ")[0] in report


SELECTING = ("probing", "refusal_direction", "introspection", "patching", "dla", "asr")
"""Stages that choose something (a layer, head layers, heads, a direction) on some prompts."""


def test_selecting_stages_record_disjoint_fit_and_evaluated_prompts(tiny_run):
    _, out, _ = tiny_run
    saved = json.loads((out / "results.json").read_text())
    for name in STAGES:
        rec = saved[name].get("prompts")
        if name in SELECTING:
            assert rec is not None, name
        if rec is None:
            continue
        assert rec["overlap"] == 0, name
        assert rec["n_fit"] > 0 and rec["n_evaluated"] > 0, name
        assert not set(rec["fit"]) & set(rec["evaluated"]), name
        assert rec["fit_note"] and rec["evaluated_note"], name
    # the asr stage's fit includes the prompts the dla stage chose its heads on
    assert set(saved["dla"]["prompts"]["fit"]) <= set(saved["asr"]["prompts"]["fit"])
    assert saved["patching"]["split"]["n_fit"] == saved["patching"]["split"]["n_eval"] == 2
    assert saved["probing"]["prompts"]["n_fit"] == saved["probing"]["n_train"]
    # refusal_direction: fit, validation and test disjoint; its direction is the one the
    # introspection and asr stages use
    rd = saved["refusal_direction"]
    assert rd["n_fit"] + rd["n_validation"] == rd["prompts"]["n_fit"]
    assert rd["n_test_harmful"] == rd["n_test_harmless"] == 4
    assert rd["layer"] in (1, 2) and rd["n_candidates"] == 2
    sel = load_result(out / "stages" / "refusal_direction" / "results" / "selection")
    assert set(sel.fit_ids).isdisjoint(sel.validation_ids)
    assert set(sel.fit_ids) | set(sel.validation_ids) <= set(saved["asr"]["prompts"]["fit"])
    assert saved["asr"]["direction_layer"] == rd["layer"]
    asr = load_result(out / "stages" / "asr" / "results" / "asr")
    used = next(v for k, v in asr.intervention_state.items()
                if k.startswith("refusal direction") and "control" not in k)
    assert abs(torch.nn.functional.cosine_similarity(used, sel.direction.vector, dim=0)) > 0.9999
    intro = saved["introspection"]["refusal_direction"]
    assert intro["layer"] == rd["layer"] and intro["same_direction_cosine"] > 0.9999
    assert 0 <= intro["em_cosine_p_shuffled"] <= 1
    conditions = saved["asr"]["conditions"]
    assert any(c.startswith("refusal direction") for c in conditions)
    assert sum(" · control " in c for c in conditions) == 2 * 2  # 2 random + 2 orthogonal
    assert all(c["p_holm"] is None or 0 <= c["p_holm"] <= 1 for c in conditions.values()
               if c["control_of"] is None)


def test_asr_attacks_base_and_organism_and_tests_them_paired(tiny_run):
    from statsmodels.stats.contingency_tables import mcnemar

    _, out, _ = tiny_run
    saved = json.loads((out / "results.json").read_text())["asr"]
    assert saved["models"] == ["base", "organism"]
    org = load_result(out / "stages" / "asr" / "results" / "asr")
    base = load_result(out / "stages" / "asr" / "results" / "asr_base")
    # the same conditions on both models, the base's built on the base model
    assert set(saved["per_model"]["base"]["conditions"]) == set(saved["conditions"])

    def ok(res):
        d = res.completions
        return d[d["condition"] == "baseline"].sort_values("prompt_index")["success"].to_numpy()

    a, b = ok(org), ok(base)
    assert list(org.completions.query("condition == 'baseline'").sort_values("prompt_index")[
        "prompt"]) == list(base.completions.query("condition == 'baseline'").sort_values(
            "prompt_index")["prompt"])
    cmp = saved["organism_vs_base"]
    assert cmp["asr_organism"] == pytest.approx(a.mean())
    assert cmp["asr_base"] == pytest.approx(b.mean())
    assert cmp["difference"] == pytest.approx(a.mean() - b.mean())
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert cmp["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert (cmp["organism_only"], cmp["base_only"]) == (table[0][1], table[1][0])


def test_report_tables_hold_no_python_reprs(tiny_run):
    import html
    import re

    _, out, _ = tiny_run
    page = (out / "report.html").read_text()
    text = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    for bad in ("{'", "[{", "{&#x27;", "[[", "<td>{", "[&#x27;"):
        assert bad not in text, bad
    for name in SELECTING:
        info = json.loads((out / "stages" / name / "stage.json").read_text())
        assert info["tables"], name
        for table in info["tables"]:
            assert table["caption"] and table["columns"] and table["rows"], name
            assert f"<caption>{html.escape(table['caption'])}</caption>" in text, name
            for row in table["rows"]:
                assert all(not isinstance(v, (dict, list)) for v in row), (name, row)


def test_unchanged_rerun_is_cached_and_force_reruns_dependents(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    infos = {n: json.loads((out / "stages" / n / "stage.json").read_text()) for n in STAGES}
    before = {n: info["finished_at"] for n, info in infos.items()}
    t = time.perf_counter()
    again = run_pipeline(cfg, out, progress=False)
    assert time.perf_counter() - t < 60
    assert json.loads(json.dumps(again.results)) == json.loads(
        (out / "results.json").read_text())
    after = {n: json.loads((out / "stages" / n / "stage.json").read_text())["finished_at"]
             for n in STAGES}
    assert after == before  # nothing recomputed
    assert again.cached == tuple(STAGES) and again.computed == ()
    manifest = json.loads((out / "manifest.json").read_text())
    # the seconds that produced each cached result, not 0.0
    assert {n: manifest["timings_s"][n] for n in STAGES} == {
        n: info["seconds"] for n, info in infos.items()}
    assert manifest["cached"] == list(STAGES)
    time.sleep(1.1)
    run_pipeline(cfg, out, force=("dla",), progress=False)
    after = {n: json.loads((out / "stages" / n / "stage.json").read_text())["finished_at"]
             for n in STAGES}
    changed = {n for n in STAGES if after[n] != before[n]}
    assert changed == {"dla", "asr"}  # asr reads dla's heads


def test_a_changed_setting_recomputes_only_its_stage(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    changed = RunConfig.from_dict({**TINY, "asr": {**TINY["asr"], "max_new_tokens": 5}})
    before = {n: json.loads((copy / "stages" / n / "stage.json").read_text())["finished_at"]
              for n in STAGES}
    time.sleep(1.1)
    run_pipeline(changed, copy, progress=False)
    after = {n: json.loads((copy / "stages" / n / "stage.json").read_text())["finished_at"]
             for n in STAGES}
    assert {n for n in STAGES if after[n] != before[n]} == {"asr"}
    assert json.loads((copy / "manifest.json").read_text())["config"]["asr"][
        "max_new_tokens"] == 5


def test_killed_run_resumes_without_recomputing_finished_stages(tiny_run, tmp_path):
    """SIGKILL in the middle of the patching stage, rerun: probing and introspection are not
    recomputed, patching resumes from its per-batch files, and the numbers equal an
    uninterrupted run's."""
    _, ref_dir, _ = tiny_run
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(_toml(TINY))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "em_interp.cli", "run", str(cfg_path), "--out", str(out),
           "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (out / "work" / "patching").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "patching" / "stage.json").exists()
    assert not (out / "results.json").exists()
    done = {n: json.loads((out / "stages" / n / "stage.json").read_text())["finished_at"]
            for n in ("probing", "introspection")}
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    for n, t in done.items():
        assert json.loads((out / "stages" / n / "stage.json").read_text())["finished_at"] == t
    resumed = json.loads((out / "results.json").read_text())
    reference = json.loads((ref_dir / "results.json").read_text())
    for stage in ("probing", "introspection", "patching", "dla", "asr"):
        _assert_close(resumed[stage], reference[stage], stage)


def _assert_close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5, nan_ok=True), where
    else:
        assert a == b, where


# ------------------------------------------------------------------ config validation


def _cfg(**tables):
    data = {"run": {"card": "qwen2.5-32b-instruct-risky-financial-advice"}}
    for k, v in tables.items():
        data.setdefault(k, {}).update(v)
    return RunConfig.from_dict(data)


def test_layers_out_of_range_are_rejected_with_the_range():
    with pytest.raises(ConfigError, match=r"layer 70.*64 layers: use 0\.\.63"):
        _cfg(patching={"layers": [10, 70]}).validate()
    with pytest.raises(ConfigError, match=r"\[sae\]\.layer.*-65"):
        _cfg(sae={"layer": -65}).validate()
    with pytest.raises(ConfigError, match=r"head 40 of layer 62.*0\.\.39"):
        _cfg(asr={"heads": [[62, 40]]}).validate()
    _cfg(sae={"layer": -64}, patching={"layers": [0, 63]}).validate()


def test_bad_keys_hooks_stages_sets_and_cards():
    with pytest.raises(ConfigError, match=r"'k_pair' \(did you mean 'k_pairs'\?\)"):
        _cfg(patching={"k_pair": 3})
    with pytest.raises(ConfigError, match=r"unknown table \[patchin\]"):
        RunConfig.from_dict({"patchin": {}})
    with pytest.raises(ConfigError, match="not a hook kind; use one of resid_pre"):
        _cfg(probing={"hook": "mlp_out_post"})
    with pytest.raises(ConfigError, match="unknown stage"):
        _cfg(run={"stages": ["probing", "probes"]})
    with pytest.raises(ConfigError, match="neither a shipped prompt set"):
        _cfg(dla={"prompt_set": "harmfull"}).validate()
    with pytest.raises(ConfigError, match="should be of type int"):
        _cfg(patching={"k_pairs": "many"})
    with pytest.raises(ConfigError, match="needs model and base_url"):
        _cfg(asr={"judge": {"kind": "openai"}})
    with pytest.raises(ConfigError, match=r"add \"dla\" to \[run\]\.stages"):
        _cfg(run={"stages": ["asr"]})
    _cfg(run={"stages": ["asr"]}, asr={"heads": [[1, 0]]})
    for bad in ([], ["organism", "organism"], ["base", "tuned"]):
        with pytest.raises(ConfigError, match=r"\[asr\]\.models"):
            _cfg(asr={"models": bad})
    with pytest.raises(ConfigError, match="has no organism"):
        RunConfig.from_dict({"run": {"card": "smollm2-135m-instruct"}}).validate()
    with pytest.raises(UnknownCardError):
        RunConfig.from_dict({"run": {"card": "qwen-32b-risky"}}).validate()


def test_invalid_config_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import em_interp.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pair", boom)
    monkeypatch.setattr(loading, "load", boom)
    path = tmp_path / "bad.toml"
    path.write_text('[run]\ncard = "tiny-random-llama"\n[probing]\nlayers = [0, 3]\n')
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "layer 3" in err and "0..2" in err
    path.write_text("[run\ncard = 1")
    assert main(["run", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shipped_configs_parse_and_validate():
    assert {"demo", "quick", "qwen-paper", "llama-block-em"} <= set(list_configs())
    for name in list_configs():
        cfg = RunConfig.from_toml(name)
        cfg.validate()
        assert set(cfg.stages) <= set(STAGE_NAMES)
    assert RunConfig.from_toml("qwen-paper").n_devices == 2
    assert RunConfig.from_toml("qwen-paper").asr.heads == [[62, 12], [62, 28]]


def test_report_command_rebuilds_and_refuses_non_runs(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 100_000
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
