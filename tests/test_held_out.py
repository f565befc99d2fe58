"""Held-out discipline, recorded: each stage says what it fit on and what it evaluated on, the
pipeline refuses a stage whose two sets share a prompt, and the report reads like a paper."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from em_interp.data import load_prompt_set, prompt_ids
from em_interp.errors import ConfigError
from em_interp.run.config import RunConfig
from em_interp.run.pipeline import run_pipeline
from em_interp.run.stage import HeldOut, Stage, StageOutput

FIN = load_prompt_set("financial")


def _stage(name, held, table=None):
    def fn(ctx):
        return StageOutput(summary={"accuracy": 0.8125, "layers": [1, 2, 3],
                                    "top": [{"layer": 3, "mean": 0.5}]},
                           text=f"{name} ran.", held_out=held,
                           tables=[] if table is None else [("Top sites", table)])

    return Stage(name, name.title(), fn, needs=())


def _config(*names):
    return RunConfig(card="tiny-random-llama", stages=list(names))


def test_prompt_ids_are_content_ids_stable_across_views():
    ids = FIN.ids
    assert len(set(ids)) == len(FIN) and all(len(i) == 12 for i in ids)
    train, test = FIN.train(), FIN.test()
    assert set(train.ids) | set(test.ids) == set(ids) and not set(train.ids) & set(test.ids)
    assert FIN.sample(10, seed=3).ids == prompt_ids(FIN.sample(10, seed=3).prompts)
    assert prompt_ids(["a"]) != prompt_ids(["b"])


def test_held_out_records_go_into_results_json_and_the_report(tmp_path):
    held = HeldOut.of(FIN.train(), FIN.test(), "grouped CV on the train split",
                      "held-out test split")
    table = pd.DataFrame({"layer": [3, 7], "effect": [0.123456, -0.5], "significant": [True,
                                                                                        False]})
    out = run_pipeline(_config("probing"), tmp_path, progress=False,
                       stages={"probing": _stage("probing", held, table)})
    rec = out.results["probing"]["prompts"]
    assert rec["overlap"] == 0 and rec["n_fit"] == len(FIN.train())
    assert rec["n_evaluated"] == len(FIN.test()) and set(rec["evaluated"]) == set(FIN.test().ids)
    # a cached rerun gives the same record
    again = run_pipeline(_config("probing"), tmp_path, progress=False,
                         stages={"probing": _stage("probing", held, table)})
    assert again.cached == ("probing",) and again.results["probing"]["prompts"] == rec
    page = (tmp_path / "report.html").read_text()
    assert "Fit / selected on" in page and "prompts in both: 0" in page
    assert "<caption>Top sites</caption>" in page and "0.123" in page and "-0.500" in page
    # no Python reprs of nested records in the report's tables
    assert "{'layer'" not in page and "[{" not in page.split("<script")[0] + page.split(
        "</script>")[-1]


def test_a_stage_that_evaluates_on_what_it_fit_is_refused(tmp_path):
    leaky = HeldOut.of(FIN.subset(range(20)), FIN.subset(range(10, 30)))
    assert leaky.overlap == 10
    with pytest.raises(ConfigError, match="evaluated on 10 prompt"):
        run_pipeline(_config("probing"), tmp_path, progress=False,
                     stages={"probing": _stage("probing", leaky)})
    assert not (tmp_path / "stages" / "probing" / "stage.json").exists()


def test_a_stage_that_selects_nothing_says_so(tmp_path):
    run_pipeline(_config("dla"), tmp_path, progress=False, stages={"dla": _stage("dla", None)})
    info = json.loads((tmp_path / "stages" / "dla" / "stage.json").read_text())
    assert info["held_out"] is None
    assert "Selects nothing" in (tmp_path / "report.html").read_text()
