"""API edges of metrics, patching, readouts and activations: plain-function metrics, token ids in
the list-of-pairs form, the split patching engine, typed position reads, in-memory activations,
and the activation store's size line said once."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from em_interp import hooks
from em_interp.activations.cache import cache_activations
from em_interp.data import PromptSet
from em_interp.errors import ConfigError, DataError, HookNameError, MetricError
from em_interp.inputs import tokenize
from em_interp.metrics import Metric, as_metric, evaluate, logit_diff
from em_interp.patching import fine as F
from em_interp.patching import sweep as P
from em_interp.patching.store import SweepPlan

SRC = ["What is a risky investment?", "hi", "Tell me everything about stocks and bonds please",
       "abc"]
DST = ["How do I save?", "Explain compound interest to me in detail, with an example.", "ok",
       "What's up"]
PROMPTS = ["a", "a much longer prompt here, with several more words", "hi there",
           [{"role": "user", "content": "What is a bond?"}], "mid size prompt", "x y z"]
HOOKS = [hooks.mlp_post(0), hooks.attn_z(1), hooks.resid_post(2)]


def ld_65_66(logits):
    """A metric as a plain function: logits [batch, pos, vocab] -> [batch]."""
    last = logits[:, -1].float()
    return last[:, 65] - last[:, 66]


def _no_forward(monkeypatch, lm):
    def boom(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(lm.model, "forward", boom)


# ------------------------------------------------------------------ 1. metrics as functions


def test_as_metric_passes_wraps_and_refuses(tiny_llama):
    m = logit_diff(tiny_llama, 65, 66)
    assert as_metric(m) is m
    w = as_metric(ld_65_66)
    assert isinstance(w, Metric) and w.name == "ld_65_66" and w.hook is None
    assert w.layer is None and w.stop_layer is None and w.logit_ids is None
    logits = torch.arange(2 * 3 * 100, dtype=torch.float32).reshape(2, 3, 100)
    assert w(logits).tolist() == [-1.0, -1.0]
    for bad in (3, "logit_diff", None, Metric):
        with pytest.raises(MetricError, match=r"em_interp\.metrics\.Metric"):
            as_metric(bad)
    ct = tokenize(tiny_llama, DST[:2])
    torch.testing.assert_close(evaluate(tiny_llama, ct.tokens, ct.attention_mask, ld_65_66),
                               evaluate(tiny_llama, ct.tokens, ct.attention_mask, m))


def test_patching_entry_points_take_a_plain_function(tiny_llama):
    m = logit_diff(tiny_llama, 65, 66)
    pairs = (SRC, DST)
    ref = P.patch_sweep(tiny_llama, pairs, m, batch_size=2, progress=False)
    got = P.patch_sweep(tiny_llama, pairs, ld_65_66, batch_size=2, progress=False)
    assert got.metric == "ld_65_66"
    torch.testing.assert_close(got.deltas, ref.deltas, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.s_clean, ref.s_clean, atol=1e-5, rtol=0)
    assert ref.deltas.abs().max() > 1e-3
    plan = P.plan_sweep(tiny_llama, pairs, ld_65_66, batch_size=2)
    assert isinstance(plan, SweepPlan) and plan.patched_forwards == 2 * 3 * 3
    h_ref = F.patch_heads(tiny_llama, pairs, m, layers=[1], batch_size=2, progress=False)
    h = F.patch_heads(tiny_llama, pairs, ld_65_66, layers=[1], batch_size=2, progress=False)
    torch.testing.assert_close(h.deltas, h_ref.deltas, atol=1e-5, rtol=0)
    n_ref = F.patch_neurons(tiny_llama, pairs, m, 1, neurons=[3, 5], batch_size=2,
                            progress=False)
    n = F.patch_neurons(tiny_llama, pairs, ld_65_66, 1, neurons=[3, 5], batch_size=2,
                        progress=False)
    torch.testing.assert_close(n.deltas, n_ref.deltas, atol=1e-5, rtol=0)
    assert P.layers_for(tiny_llama, ld_65_66, None) == list(range(tiny_llama.model.cfg.n_layers))
    with pytest.raises(MetricError, match=r"em_interp\.metrics\.Metric"):
        P.patch_sweep(tiny_llama, pairs, 42, progress=False)


# ------------------------------------------------------------------ 2. token ids in pairs


def test_list_of_token_pairs_equals_prompt_pairs(tiny_llama):
    m = logit_diff(tiny_llama, 65, 66)
    src_ct, dst_ct = tokenize(tiny_llama, SRC), tokenize(tiny_llama, DST)

    def row(ct, i, form):
        one = ct.tokens[i][ct.attention_mask[i].bool()]
        return {"1d": one, "2d": one[None],
                "chat": tokenize(tiny_llama, one[None])}[form]

    forms = ["1d", "2d", "chat", "1d"]
    listed = [(row(src_ct, i, f), row(dst_ct, i, f)) for i, f in enumerate(forms)]
    as_pairs = P.PromptPairs.from_lists(src_ct, dst_ct)
    runs = []
    for kw in ({}, {"use_kv_cache": False}, {"position": "all_aligned"}):
        a = P.patch_sweep(tiny_llama, listed, m, batch_size=3, progress=False, **kw)
        b = P.patch_sweep(tiny_llama, as_pairs, m, batch_size=3, progress=False, **kw)
        assert torch.equal(a.deltas, b.deltas), kw
        assert torch.equal(a.s_clean, b.s_clean) and torch.equal(a.s_source, b.s_source)
        assert a.deltas.abs().max() > 1e-3
        runs.append(a)
    text = P.patch_sweep(tiny_llama, list(zip(SRC, DST, strict=True)), m, batch_size=3,
                         progress=False)
    torch.testing.assert_close(text.deltas, runs[0].deltas, atol=1e-5, rtol=0)
    pp = P.as_prompt_pairs(listed)
    assert len(pp) == 4 and pp.sources.lengths == src_ct.lengths
    with pytest.raises(DataError, match="other sources are token ids"):
        P.as_prompt_pairs([(listed[0][0], DST[0]), (SRC[1], DST[1])])
    with pytest.raises(DataError, match=r"integer id tensor"):
        P.as_prompt_pairs([(torch.ones(2, 3, dtype=torch.long), listed[0][1])])
    with pytest.raises(DataError, match="ChatTokens of 4 prompts"):
        P.as_prompt_pairs([(src_ct, listed[0][1])])


# ------------------------------------------------------------------ 3. plan and run apart


def test_plan_sites_runs_nothing_and_run_sites_is_typed(tiny_llama, monkeypatch):
    m = logit_diff(tiny_llama, 65, 66)
    cfg = P.PatchingConfig(components=("mlp", "resid"), batch_size=2)
    sites = [P.Site(layer, c, label=c) for layer in (0, 2) for c in cfg.components]
    run = P.run_sites(tiny_llama, (SRC, DST), m, sites, config=cfg, progress=False)
    assert isinstance(run, P.SiteRun) and not isinstance(run, tuple)
    assert dataclasses.is_dataclass(run) and run.sites == tuple(sites)
    assert run.deltas.shape == (4, 4) and run.s_clean.shape == run.s_source.shape == (4,)
    sweep = P.patch_sweep(tiny_llama, (SRC, DST), m, components=("mlp", "resid"),
                          layers=[0, 2], batch_size=2, progress=False)
    assert torch.equal(run.deltas, sweep.deltas) and torch.equal(run.s_clean, sweep.s_clean)
    assert run.plan.patched_forwards == 2 * 2 * 2  # 2 batches x 2 layers x 2 sites
    with monkeypatch.context() as mp:
        _no_forward(mp, tiny_llama)
        plan = P.plan_sites(tiny_llama, (SRC, DST), ld_65_66, sites, config=cfg)
    assert isinstance(plan, SweepPlan) and plan == run.plan
    timed = P.plan_sites(tiny_llama, (SRC, DST), m, sites, config=cfg, time_batch=True)
    assert timed.seconds_per_batch > 0 and timed.estimate_s == pytest.approx(
        2 * timed.seconds_per_batch)


# ------------------------------------------------------------------ 4. typed position reads


def test_read_at_positions_returns_a_frozen_dataclass(tiny_llama):
    from em_interp.readouts.logit_lens import PositionReads, read_at_positions, read_positions

    tl = tiny_llama.model
    ct = tokenize(tiny_llama, ["hi", "hello there friend, how are you"])
    names = [hooks.attn_z(1), hooks.resid_post(0)]
    reads = read_at_positions(tiny_llama, names, ct.tokens, ct.attention_mask, position=-2)
    assert isinstance(reads, PositionReads) and reads.hooks == names and reads.position == -2
    with pytest.raises(dataclasses.FrozenInstanceError):
        reads.position = 0
    cols = read_positions(ct.attention_mask, -2)
    assert torch.equal(reads.columns, cols)
    _, cache = tl.run_with_cache(ct.tokens, attention_mask=ct.attention_mask, names_filter=names)
    for name in names:
        want = cache[name][torch.arange(2), cols]
        assert torch.equal(reads.acts[name], want) and torch.equal(reads[name], want)
    assert reads[hooks.attn_z(1)].shape == (2, tl.cfg.n_heads, tl.cfg.d_head)
    with pytest.raises(DataError, match="was read"):
        reads[hooks.mlp_post(0)]


# ------------------------------------------------------------------ 5. activations in memory


@pytest.mark.parametrize("reduce", ["last", "mean", "none"])
def test_in_memory_activations_equal_the_store(tiny_llama, tmp_path, reduce):
    ps = PromptSet(name="toy", prompts=tuple(PROMPTS), labels=(1, 0, 1, 0, 1, 0),
                   split=("train",) * 4 + ("test",) * 2)
    mem = cache_activations(tiny_llama, ps, HOOKS, batch_size=4, reduce=reduce, progress=False)
    store = cache_activations(tiny_llama, ps, HOOKS, tmp_path / "s", batch_size=4,
                              reduce=reduce, progress=False)
    assert mem.hooks == tuple(HOOKS) and mem.reduce == reduce and mem.n_prompts == 6
    assert mem.labels == ps.labels and mem.split == ps.split
    assert mem.prompts_hash == store.manifest["prompts_hash"]
    assert torch.equal(mem.offsets, store.offsets) and mem.n_rows == store.n_rows
    ct = tokenize(tiny_llama, PROMPTS)
    assert list(mem.lengths) == ct.lengths and list(mem.texts) == ct.texts
    for h in HOOKS:
        assert torch.equal(mem.acts[h], store.load(h)) and mem.shape(h) == store.shape(h)
    n = 6 if reduce != "none" else sum(ct.lengths)
    assert mem.acts[hooks.attn_z(1)].shape == (n, 4, 16)
    parts = mem.per_prompt(HOOKS[0])
    assert [p.shape[0] for p in parts] == (ct.lengths if reduce == "none" else [1] * 6)
    again = mem.to_store(tmp_path / "from-memory")
    assert torch.equal(again.offsets, store.offsets) and again.labels == ps.labels
    for h in HOOKS:
        assert torch.equal(again.load(h), store.load(h))


def test_in_memory_checks_before_any_forward_and_stops_early(tiny_llama, monkeypatch):
    with monkeypatch.context() as mp:
        _no_forward(mp, tiny_llama)
        with pytest.raises(HookNameError, match="blocks.0.mlp.hook_out"):
            cache_activations(tiny_llama, PROMPTS, [hooks.mlp_post(0), "blocks.0.mlp.hook_out"],
                              progress=False)
        with pytest.raises(DataError, match="longer than the model's context"):
            cache_activations(tiny_llama, ["short", "x" * 300], HOOKS, progress=False)
        with pytest.raises(ConfigError, match="cannot be pooled"):
            cache_activations(tiny_llama, PROMPTS, hooks.attn_pattern(0), progress=False)
        with pytest.raises(ConfigError, match="store on disk"):
            cache_activations(tiny_llama, PROMPTS, HOOKS, shard_size=4, progress=False)
    seen = []
    with hooks.attached(tiny_llama.model, [(hooks.resid_pre(2), lambda a, hook: seen.append(1))]):
        mem = cache_activations(tiny_llama, PROMPTS, [hooks.mlp_post(0), hooks.attn_z(1)],
                                batch_size=4, progress=False)
    assert seen == [] and mem.acts[hooks.mlp_post(0)].shape == (6, 128)


# ------------------------------------------------------------------ 6. the size line, once


def _said(text: str) -> int:
    return text.count("activation store ")


def test_store_line_is_said_once(tiny_llama, tmp_path, capsys, caplog):
    # logging shows INFO (as the CLI sets it up): the log says it, the bar does not
    with caplog.at_level(logging.INFO, logger="em_interp.activations.cache"):
        cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "a", batch_size=4)
    out = capsys.readouterr()
    logged = "\n".join(caplog.messages)
    assert _said(logged) == 1
    assert _said(logged) + _said(out.out) + _said(out.err) == 1
    # logging at its default (WARNING): said above the progress bar instead
    caplog.clear()
    cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "b", batch_size=4)
    out = capsys.readouterr()
    assert _said("\n".join(caplog.messages)) == 0
    assert _said(out.out) + _said(out.err) == 1
