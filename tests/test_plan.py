"""``em-interp plan``: parameter counts against HF and PEFT, the refusal of ``run``, and the
prediction against a measured peak RSS on the tiny card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from em_interp.cli import main
from em_interp.errors import ConfigError
from em_interp.models.cards import get_card
from em_interp.results import load_result
from em_interp.run.config import RunConfig
from em_interp.run.plan import (
    ALL_PROJECTIONS,
    GiB,
    RunPlan,
    card_shape,
    check_plan,
    parse_bytes,
    plan_run,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_TOML = """
[run]
card = "tiny-random-llama"
stages = ["probing", "dla"]
batch_size = 8
max_prompt_chars = 150
[probing]
n_prompts = 32
[dla]
n_prompts = 4
tokens = ["No", "Yes"]
"""


def _hf_params(card_name: str, *, tied: bool = False) -> int:
    """Parameters of the HF model built from the card's shape on the meta device."""
    import transformers

    card = get_card(card_name)
    a, shape = card.architecture, card_shape(card)
    cls = getattr(transformers, a.hf_class)
    cfg = cls.config_class(vocab_size=shape.vocab, hidden_size=a.d_model,
                           intermediate_size=a.d_mlp, num_hidden_layers=a.n_layers,
                           num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                           tie_word_embeddings=tied)
    with torch.device("meta"):
        model = cls(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("card", ["qwen2.5-32b-instruct-risky-financial-advice",
                                  "llama-3.1-8b-instruct-risky-financial-advice",
                                  "tiny-random-qwen2"])
def test_parameter_count_matches_hf(card):
    # untied HF models hold exactly the HookedTransformer's parameters (W_E and W_U apart)
    assert card_shape(get_card(card)).n_params == _hf_params(card)


def test_real_sizes():
    # published sizes: Llama-3.1-8B has 8.03e9 parameters, Qwen2.5-32B 32.76e9
    assert card_shape(get_card("llama-3.1-8b-instruct-bad-medical-advice")).n_params \
        == 8_030_261_248
    assert abs(card_shape(get_card("qwen2.5-32b-instruct-bad-medical-advice")).n_params
               - 32.76e9) < 0.01e9


def test_lora_parameters_match_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from em_interp.models.loading import resolve_card
    from em_interp.models.sources import resolve_source

    card = resolve_card("tiny-random-qwen2")
    hf = AutoModelForCausalLM.from_pretrained(resolve_source(card.base, card=card),
                                              dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=3, target_modules=list(ALL_PROJECTIONS)))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert card_shape(card).lora_params(3, ALL_PROJECTIONS) == trainable


@pytest.mark.parametrize("text,value", [("80GiB", 80 * GiB), ("141 GB", 141 * 10**9),
                                        ("512MiB", 512 * 2**20), ("1024", 1024),
                                        ("1.5GiB", int(1.5 * GiB))])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ConfigError, match="80GiB"):
        parse_bytes("lots")


def test_qwen_paper_plan_needs_two_big_gpus():
    cfg = RunConfig.from_toml("qwen-paper")
    two = plan_run(cfg, gpus=2, gpu_mem="80GiB")
    assert two.misfit() is None
    assert [s.stage for s in two.stage_plans()] == cfg.stages
    # bf16 weights of base + merged all-projection LoRA organism: ~2 x 61 GiB over two GPUs
    pair = two.stage_plans()[0].weights
    assert 110 * GiB < pair < 125 * GiB
    one = plan_run(cfg, gpus=1, gpu_mem="80GiB")
    stage, need = one.misfit()
    assert stage == "probing" and need > 80 * GiB
    with pytest.raises(ConfigError, match=r"stage 'probing' needs about 1\d\d\.\d GiB"):
        check_plan(one)


def test_generation_kv_cache_grows_with_new_tokens():
    cfg = RunConfig.from_toml("qwen-paper")
    short = plan_run(cfg.override(stages=["asr"]), gpus=2, gpu_mem="80GiB")
    cfg.asr.max_new_tokens = 4096
    long = plan_run(cfg.override(stages=["asr"]), gpus=2, gpu_mem="80GiB")
    shape = card_shape(get_card(cfg.card))
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.d_head * cfg.batch_size * 2
    grown = long.stage_plans()[0].working - short.stage_plans()[0].working
    assert grown == per_token * (4096 - 128)


def test_em_eval_loads_nothing_when_served_and_the_pair_plus_judge_when_local():
    served = plan_run(RunConfig.from_toml("em-eval"), gpus=0)
    (row,) = served.stage_plans()
    assert row.stage == "em_eval" and row.weights == 0 and row.working == 0
    assert served.weights_disk == 0  # no model is fetched for a served evaluation
    local_cfg = RunConfig.from_toml("em-eval-local")
    local = plan_run(local_cfg, gpus=0)
    judge = card_shape(get_card("qwen2.5-coder-0.5b-instruct")).n_params * 4  # float32
    assert local.stage_plans()[0].weights == local.pair_bytes + judge
    assert local.weights_disk > 0


def test_plan_result_contract(tmp_path):
    plan = plan_run(RunConfig.from_toml("quick"), gpus=0)
    assert list(plan.df.stage) == RunConfig.from_toml("quick").stages
    assert (plan.df.peak_GiB > 0).all()
    back = load_result(plan.save(tmp_path / "plan"))
    assert isinstance(back, RunPlan) and back.to_dict() == plan.to_dict()
    assert len(plan.figure().data) == 2


def test_cli_plan_prints_every_stage(capsys):
    assert main(["plan", "qwen-paper", "--gpus", "2", "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    for stage in RunConfig.from_toml("qwen-paper").stages:
        assert stage in out
    assert "fits: yes" in out


def test_run_refuses_a_plan_that_does_not_fit(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    assert main(["run", str(cfg), "--out", str(out), "--gpus", "1", "--gpu-mem", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert "stage 'probing'" in err and "--no-plan-check" in err and "MiB" in err
    assert not out.exists()


def test_prediction_within_25_percent_of_measured_rss(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_check.py"), str(cfg),
                          "--stages", "probing", "--json", str(tmp_path / "check.json")],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "check.json").read_text())["rows"][0]
    assert row["stage"] == "probing" and row["measured_bytes"] > 200 * 2**20
    assert 0.75 <= row["ratio"] <= 1.25, row


def test_card_vocab_size_is_checked_against_config():
    import dataclasses

    from em_interp.errors import CardError
    from em_interp.models.loading import check_architecture
    from em_interp.models.sources import resolve_source

    card = get_card("tiny-random-llama")
    folder = resolve_source(card.base, card=card)
    good = dataclasses.replace(card, architecture=dataclasses.replace(
        card.architecture, vocab_size=264))
    check_architecture(good, folder)
    bad = dataclasses.replace(card, architecture=dataclasses.replace(
        card.architecture, vocab_size=999))
    with pytest.raises(CardError, match="vocab_size = 999"):
        check_architecture(bad, folder)
    assert card_shape(good).vocab == 264 == card_shape(card).vocab
