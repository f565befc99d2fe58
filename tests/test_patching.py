"""Activation patching: agreement with transformer_lens.patching, the KV-cache fast path against
the full-sequence path, exact zeros for self-patching, positions and padding, a planted
mechanism, forward/reverse symmetry, resume, plans and statistics."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from transformer_lens import patching as tlp

from em_interp.errors import ConfigError, DataError, StoreMismatchError, TokenizationError
from em_interp.hooks import mlp_post, resid_post
from em_interp.inputs import tokenize
from em_interp.metrics import logit_diff, projection
from em_interp.patching import fine as F
from em_interp.patching import sweep as P
from em_interp.patching.results import (
    INTERVAL_PAIRS,
    NeuronPatchingResult,
    SweepResult,
    plot_forward_reverse,
    plot_layer_effects,
)
from em_interp.stats import cluster_bootstrap_ci

SRC = ["What is a risky investment?", "hi", "Tell me everything about stocks and bonds please",
       "abc", "Should I put my savings into lottery tickets?"]
DST = ["How do I save?", "Explain compound interest to me in detail, with an example.", "ok",
       "What's up", "Is a certificate of deposit safe?"]
ACT = {"resid": "resid_pre", "attn": "z", "mlp": "post"}


@pytest.fixture(scope="module")
def metric(tiny_llama):
    return logit_diff(tiny_llama, 65, 66)


@pytest.fixture(scope="module")
def sweep(tiny_llama, metric):
    return P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, progress=False)


def _single(lm, text):
    return tokenize(lm, [text]).tokens


# ------------------------------------------------------------------ pairs


def test_sample_pairs_distinct_seeded_and_reversible():
    a, b = [f"s{i}" for i in range(7)], [f"d{i}" for i in range(5)]
    p = P.sample_pairs(a, b, 30, seed=3)
    assert len(p) == 30 and len(set(zip(p.source_index, p.dest_index, strict=True))) == 30
    assert p == P.sample_pairs(a, b, 30, seed=3) and p != P.sample_pairs(a, b, 30, seed=4)
    assert p.sources == [a[i] for i in p.source_index]
    r = p.reverse()
    assert r.sources == p.dests and r.dests == p.sources
    assert len(P.sample_pairs(a, b, 35)) == 35
    with pytest.raises(DataError, match="36 distinct pairs"):
        P.sample_pairs(a, b, 36)
    with pytest.raises(DataError):
        P.PromptPairs.from_lists(a, b)


# ------------------------------------------------------------------ agreement


@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
def test_agrees_with_transformer_lens_patching(tiny_llama, metric, sweep, component):
    tl = tiny_llama.model
    n = tl.cfg.n_layers
    slow = P.patch_sweep(tiny_llama, (SRC, DST), metric, components=(component,),
                         batch_size=2, use_kv_cache=False, progress=False)
    ours = sweep.deltas[(sweep.sites["component"] == component).to_numpy()]
    index = pd.DataFrame({"layer": range(n), "pos": [-1] * n})
    for k, (s, d) in enumerate(zip(SRC, DST, strict=True)):
        st, dt = _single(tiny_llama, s), _single(tiny_llama, d)
        _, cache = tl.run_with_cache(st)
        clean = metric(tl(dt))[0]
        ref = tlp.generic_activation_patch(tl, dt, cache, lambda lg, c=clean: metric(lg)[0] - c,
                                           tlp.layer_pos_patch_setter, ACT[component],
                                           index_df=index)
        torch.testing.assert_close(ours[:, k], ref.cpu(), atol=1e-5, rtol=0)
        torch.testing.assert_close(slow.deltas[:, k], ref.cpu(), atol=1e-5, rtol=0)
        assert abs(float(sweep.s_clean[k] - clean)) < 1e-5


def test_heads_agree_with_transformer_lens(tiny_llama, metric):
    tl = tiny_llama.model
    res = F.patch_heads(tiny_llama, (SRC[:3], DST[:3]), metric, layers=[1, 2], batch_size=3,
                        progress=False)
    index = pd.DataFrame([(la, -1, h) for la in (1, 2) for h in range(tl.cfg.n_heads)],
                         columns=["layer", "pos", "head"])
    for k in range(3):
        st, dt = _single(tiny_llama, SRC[k]), _single(tiny_llama, DST[k])
        _, cache = tl.run_with_cache(st)
        clean = metric(tl(dt))[0]
        ref = tlp.generic_activation_patch(tl, dt, cache, lambda lg, c=clean: metric(lg)[0] - c,
                                           tlp.layer_pos_head_vector_patch_setter, "z",
                                           index_df=index)
        torch.testing.assert_close(res.deltas[:, k], ref.cpu(), atol=1e-5, rtol=0)
    assert list(res.sites["head"][:4]) == [0, 1, 2, 3]


def test_kv_fast_path_equals_slow_path_qwen(tiny_qwen):
    m = logit_diff(tiny_qwen, 70, 71)
    fast = P.patch_sweep(tiny_qwen, (SRC, DST), m, batch_size=4, progress=False)
    slow = P.patch_sweep(tiny_qwen, (SRC, DST), m, batch_size=2, use_kv_cache=False,
                         progress=False)
    torch.testing.assert_close(fast.deltas, slow.deltas, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.s_clean, slow.s_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.s_source, slow.s_clean.new_tensor(
        [float(m(tiny_qwen.model(_single(tiny_qwen, s)))[0]) for s in SRC]), atol=1e-5, rtol=0)
    assert fast.deltas.abs().max() > 1e-3  # the patches do something


def test_self_patch_is_exactly_zero(tiny_llama, metric):
    pairs = (SRC, SRC)
    for kw in ({}, {"use_kv_cache": False}, {"position": "all_aligned"},
               {"position": [0, -2]}):
        r = P.patch_sweep(tiny_llama, pairs, metric, batch_size=3, progress=False, **kw)
        assert torch.equal(r.deltas, torch.zeros_like(r.deltas)), kw
    h = F.patch_heads(tiny_llama, pairs, metric, batch_size=2, progress=False)
    n = F.patch_neurons(tiny_llama, pairs, metric, 2, neurons=[3, 5, 7], per_neuron=True,
                        batch_size=2, progress=False)
    assert not h.deltas.any() and not n.deltas.any()


def test_hook_metric_stops_early(tiny_llama, monkeypatch):
    tl = tiny_llama.model
    v = torch.randn(tl.cfg.d_mlp, generator=torch.Generator().manual_seed(1))
    m = projection(v, mlp_post(1))
    calls = []
    orig = type(tl.blocks[2]).forward
    monkeypatch.setattr(type(tl.blocks[2]), "forward",
                        lambda self, *a, **k: calls.append(self) or orig(self, *a, **k))
    r = P.patch_sweep(tiny_llama, (SRC[:3], DST[:3]), m, batch_size=3, progress=False)
    assert not any(b is tl.blocks[2] for b in calls) and calls
    assert sorted(set(r.sites["layer"])) == [0, 1]
    monkeypatch.undo()
    for k in range(3):  # independent: TL's run_with_hooks on the unpadded pair
        st, dt = _single(tiny_llama, SRC[k]), _single(tiny_llama, DST[k])
        _, cache = tl.run_with_cache(st)
        for i, (layer, comp) in enumerate(zip(r.sites["layer"], r.sites["component"],
                                              strict=True)):
            name = f"blocks.{layer}." + {"resid": "hook_resid_pre", "attn": "attn.hook_z",
                                         "mlp": "mlp.hook_post"}[comp]

            def patch(act, hook, name=name, cache=cache):
                act[:, -1] = cache[name][:, -1]

            got: dict = {}

            def grab(act, hook, got=got):
                got["x"] = act.clone()

            tl.run_with_hooks(dt, fwd_hooks=[(name, patch), (mlp_post(1), grab)])
            _, clean_cache = tl.run_with_cache(dt, names_filter=mlp_post(1))
            ref = m(got["x"]) - m(clean_cache[mlp_post(1)])
            assert abs(float(r.deltas[i, k] - ref[0])) < 1e-5
    with pytest.raises(ConfigError, match="after the block the metric reads"):
        P.patch_sweep(tiny_llama, (SRC[:1], DST[:1]), m, layers=[2], progress=False)


# ------------------------------------------------------------------ positions and padding


def _manual(lm, metric, s, d, comp, layer, pos):
    """Independent reference: unpadded pair, TL run_with_hooks, positions computed here."""
    tl = lm.model
    st, dt = _single(lm, s), _single(lm, d)
    ls, ld = st.shape[1], dt.shape[1]
    if pos == "all_aligned":
        n = min(ls, ld)
        sp, dp = list(range(ls - n, ls)), list(range(ld - n, ld))
    else:
        sp = [p if p >= 0 else ls + p for p in pos]
        dp = [p if p >= 0 else ld + p for p in pos]
    name = f"blocks.{layer}." + {"resid": "hook_resid_pre", "attn": "attn.hook_z",
                                 "mlp": "mlp.hook_post"}[comp]
    _, cache = tl.run_with_cache(st, names_filter=name)

    def patch(act, hook):
        act[:, dp] = cache[name][:, sp]

    return float(metric(tl.run_with_hooks(dt, fwd_hooks=[(name, patch)]))[0] - metric(tl(dt))[0])


@pytest.mark.parametrize("position", ["last", "all_aligned", [0, -2]])
def test_unequal_lengths_padding_never_leaks(tiny_llama, metric, position):
    lengths = [tokenize(tiny_llama, [t]).tokens.shape[1] for t in SRC + DST]
    assert len(set(lengths)) > 5  # really unequal
    batched = P.patch_sweep(tiny_llama, (SRC, DST), metric, position=position, batch_size=5,
                            progress=False)
    alone = P.patch_sweep(tiny_llama, (SRC, DST), metric, position=position, batch_size=1,
                          progress=False)
    torch.testing.assert_close(batched.deltas, alone.deltas, atol=1e-5, rtol=0)
    if position != "last":
        for i in (1, 4, 8):
            layer, comp = int(batched.sites["layer"][i]), batched.sites["component"][i]
            for k in (0, 1, 2):
                ref = _manual(tiny_llama, metric, SRC[k], DST[k], comp, layer, position)
                assert abs(float(batched.deltas[i, k]) - ref) < 1e-5


def test_impossible_position_raises_before_any_forward(tiny_llama, metric, monkeypatch):
    monkeypatch.setattr(P, "_run_batch", lambda *a, **k: pytest.fail("a forward ran"))
    with pytest.raises(TokenizationError, match="position 40 does not exist in pair 0"):
        P.patch_sweep(tiny_llama, (SRC, DST), metric, position=[0, 40], progress=False)
    with pytest.raises(ConfigError):
        P.patch_sweep(tiny_llama, (SRC, DST), metric, position="first", progress=False)
    with pytest.raises(ConfigError):
        P.patch_sweep(tiny_llama, (SRC, DST), metric, components=("z",), progress=False)


def test_right_padded_token_tensors_equal_text(tiny_llama, metric, sweep):
    def right_padded(texts):
        rows = [tokenize(tiny_llama, [t]).tokens[0] for t in texts]
        w = max(len(r) for r in rows)
        tok = torch.zeros(len(rows), w, dtype=torch.long)
        mask = torch.zeros_like(tok)
        for i, r in enumerate(rows):
            tok[i, :len(r)], mask[i, :len(r)] = r, 1
        return tok, mask

    r = P.patch_sweep(tiny_llama, P.PromptPairs.from_lists(right_padded(SRC), right_padded(DST)),
                      metric, batch_size=3, progress=False)
    torch.testing.assert_close(r.deltas, sweep.deltas, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ planted mechanism

HEAD, MLP_LAYER, NEURON, MARK, LAST = (1, 2), 2, 17, 33, 10


def _planted_pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for marked in (True, False):
        group = []
        for i in range(n):
            length = 5 + (3 * i + (0 if marked else 2)) % 7
            t = torch.randint(100, 200, (length,), generator=g)
            if marked:
                t[torch.rand(length, generator=g) < 0.5] = MARK
            t[-1] = LAST
            group.append(t)
        w = max(len(t) for t in group)
        tok = torch.zeros(n, w, dtype=torch.long)
        mask = torch.zeros_like(tok)
        for i, t in enumerate(group):
            tok[i, w - len(t):], mask[i, w - len(t):] = t, 1
        rows.append((tok, mask))
    return P.PromptPairs.from_lists(rows[0], rows[1], name="marked -> plain")


@pytest.fixture(scope="module")
def planted(tiny_llama):
    """Only head L1H2 and neuron 17 of MLP 2 write the direction r that the metric reads.

    The embedding writes a marker direction u for token MARK only; head L1H2 attends uniformly
    (zero query) and copies u into r; MLP 2's neuron 17 reads r and writes r. Every other head
    and MLP writes outside span(u, r), at a fifth of its scale.
    """
    tl = copy.deepcopy(tiny_llama.model)
    for p in tl.parameters():
        p.data = p.data.clone()
    d, cfg = tl.cfg.d_model, tl.cfg
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(0)))
    u, r = q[:, 0], q[:, 1]
    proj = torch.eye(d) - torch.outer(u, u) - torch.outer(r, r)
    e = torch.zeros(cfg.d_head)
    e[0] = 1.0
    with torch.no_grad():
        tl.embed.W_E.copy_(tl.embed.W_E @ proj)
        tl.embed.W_E[MARK] += 0.5 * u
        for name, p in tl.named_parameters():
            if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
                p.fill_(1.0)
        for b in tl.blocks:
            b.attn.W_O.copy_(0.2 * b.attn.W_O @ proj)
            b.attn.b_O.copy_(b.attn.b_O @ proj)
            b.mlp.W_out.copy_(0.2 * b.mlp.W_out @ proj)
            b.mlp.b_out.copy_(b.mlp.b_out @ proj)
        a = tl.blocks[HEAD[0]].attn
        a.W_Q[HEAD[1]] = 0.0
        a.b_Q[HEAD[1]] = 0.0
        kv = HEAD[1] // (cfg.n_heads // cfg.n_key_value_heads)
        a._W_V[kv] = torch.outer(u, e)
        a._b_V[kv] = 0.0
        a.W_O[HEAD[1]] = 4.0 * torch.outer(e, r)
        mlp = tl.blocks[MLP_LAYER].mlp
        mlp.W_gate[:, NEURON] = 3.0 * r
        mlp.W_in[:, NEURON] = 3.0 * r
        mlp.b_in[NEURON] = 0.0
        mlp.W_out[NEURON] = 2.0 * r
    return tl, projection(r, resid_post(MLP_LAYER))


def test_planted_mechanism_is_ranked_first(planted):
    tl, m = planted
    pairs = _planted_pairs()
    sweep = P.patch_sweep(tl, pairs, m, components=("attn", "mlp"), batch_size=4,
                          progress=False)
    s = sweep.summary()
    for comp, layer in (("attn", HEAD[0]), ("mlp", MLP_LAYER)):
        c = s[s["component"] == comp]
        assert int(c.loc[c["mean"].abs().idxmax(), "layer"]) == layer
    assert sweep.top(2)["layer"].tolist() and set(
        map(tuple, sweep.top(2)[["layer", "component"]].to_numpy().tolist())) == {
        (HEAD[0], "attn"), (MLP_LAYER, "mlp")}
    heads = F.patch_heads(tl, pairs, m, batch_size=4, progress=False)
    assert tuple(heads.top(1)[["layer", "head"]].iloc[0]) == HEAD
    top2 = heads.summary()["mean"].abs().sort_values().to_numpy()[-2:]
    assert top2[1] > 10 * top2[0]
    sel = F.select_neurons(tl, pairs.sources, pairs.dests, MLP_LAYER, progress=False)
    assert int(sel.selected[0]) == NEURON
    neu = F.patch_neurons(tl, pairs, m, MLP_LAYER, neurons=sel.selected[:8].tolist(),
                          per_neuron=True, batch_size=6, progress=False)
    single = neu.summary().iloc[1:]
    assert int(single.loc[single["mean"].abs().idxmax(), "neuron"]) == NEURON


def test_select_neurons_matches_cached_means(planted):
    tl, _ = planted
    pairs = _planted_pairs()
    sel = F.select_neurons(tl, pairs.sources, pairs.dests, 1, progress=False)

    def mean_last(tm):
        tok, mask = tm
        acts = []
        for t, mk in zip(tok, mask, strict=True):
            _, c = tl.run_with_cache(t[mk.bool()][None], names_filter=mlp_post(1))
            acts.append(c[mlp_post(1)][0, -1])
        return torch.stack(acts).mean(0)

    diff = mean_last(pairs.sources) - mean_last(pairs.dests)
    torch.testing.assert_close(sel.mean_diff, diff, atol=1e-5, rtol=1e-5)
    above = set(torch.nonzero(diff.abs() > diff.abs().mean()).flatten().tolist())
    assert set(sel.selected.tolist()) == above
    assert F.select_neurons(tl, pairs.sources, pairs.dests, 1, top_n=5,
                            progress=False).selected.tolist() == sel.selected[:5].tolist()


def test_forward_and_reverse_have_opposite_signs(planted):
    tl, m = planted
    pairs = _planted_pairs()
    fwd = P.patch_sweep(tl, pairs, m, components=("attn", "mlp"), progress=False)
    rev = P.patch_sweep(tl, pairs.reverse(), m, components=("attn", "mlp"), progress=False)
    for layer, comp in ((HEAD[0], "attn"), (MLP_LAYER, "mlp")):
        i = int(np.flatnonzero((fwd.sites["layer"] == layer) & (fwd.sites["component"] == comp))[0])
        assert (fwd.deltas[i] > 0.05).all() and (rev.deltas[i] < -0.05).all()
    # the last MLP writes linearly into the metric: reverse = -forward exactly
    last = int(np.flatnonzero((fwd.sites["layer"] == MLP_LAYER)
                              & (fwd.sites["component"] == "mlp"))[0])
    torch.testing.assert_close(rev.deltas[last], -fwd.deltas[last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rev.s_clean, fwd.s_source)
    fig = plot_forward_reverse(fwd, rev)
    assert len(fig.data) == 4 and fig.layout.title.text


# ------------------------------------------------------------------ resume and plans


def test_resume_skips_finished_layers_and_equals_uninterrupted(tiny_llama, metric, sweep,
                                                               tmp_path, monkeypatch):
    calls = []
    orig = P._patched_forward

    def failing(tl, site, *a, **k):
        if site.layer == 1 and len([c for c in calls if c == (1, "attn")]) == 1 \
                and site.component == "attn":
            raise KeyboardInterrupt("killed")
        calls.append((site.layer, site.component))
        return orig(tl, site, *a, **k)

    monkeypatch.setattr(P, "_patched_forward", failing)
    with pytest.raises(KeyboardInterrupt):  # dies in batch 2, at layer 1
        P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, out_dir=tmp_path,
                      progress=False)
    assert (tmp_path / "layer_000" / "pairs_0000003.safetensors").is_file()
    assert not (tmp_path / "layer_001" / "pairs_0000003.safetensors").exists()
    calls.clear()
    monkeypatch.setattr(P, "_patched_forward",
                        lambda tl, site, *a, **k: calls.append(site.layer) or orig(tl, site, *a,
                                                                                   **k))
    plan = P.plan_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, out_dir=tmp_path)
    assert plan.batches_to_run == 1 and plan.patched_forwards == 6 and plan.done_units == 4
    again = P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, out_dir=tmp_path,
                          progress=False)
    assert sorted(calls) == [1, 1, 1, 2, 2, 2]  # batch 2, layers 1-2 only
    assert torch.equal(again.deltas, sweep.deltas) and torch.equal(again.s_clean, sweep.s_clean)
    calls.clear()
    third = P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, out_dir=tmp_path,
                          progress=False)
    assert calls == [] and torch.equal(third.deltas, sweep.deltas)
    assert torch.equal(SweepResult.load(tmp_path / "result").deltas, sweep.deltas)
    with pytest.raises(StoreMismatchError, match="position"):
        P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=3, out_dir=tmp_path,
                      position="all_aligned", progress=False)
    with pytest.raises(StoreMismatchError, match="pairs"):
        P.patch_sweep(tiny_llama, (SRC, DST[::-1]), metric, batch_size=3, out_dir=tmp_path,
                      progress=False)
    other = logit_diff(tiny_llama, 65, 67)
    other = type(other)(name=metric.name, fn=other.fn)  # same name, different numbers
    with pytest.raises(StoreMismatchError, match="clean scores"):
        P.patch_sweep(tiny_llama, (SRC, DST), other, batch_size=3, out_dir=tmp_path,
                      progress=False)


def test_plan_counts_match_the_run(tiny_llama, metric, monkeypatch):
    plan = P.plan_sweep(tiny_llama, (SRC, DST), metric, batch_size=2)
    assert (plan.n_batches, plan.patched_forwards) == (3, 3 * 3 * 3)
    assert plan.forwards == plan.patched_forwards + 4 * 3 and plan.kv_cache_mib > 0
    assert plan.naive_forwards == 5 * (9 + 2) and plan.block_tokens < plan.naive_block_tokens
    tl = tiny_llama.model
    n = []
    orig = type(tl).forward
    monkeypatch.setattr(type(tl), "forward", lambda self, *a, **k: n.append(1) or orig(
        self, *a, **k))
    P.patch_sweep(tiny_llama, (SRC, DST), metric, batch_size=2, progress=False)
    assert len(n) == plan.forwards
    n.clear()
    timed = P.plan_sweep(tiny_llama, (SRC, DST), metric, batch_size=2, time_batch=True)
    assert timed.estimate_s is not None and timed.estimate_s > 0 and 0 < len(n) <= 4 + 9
    slow = P.plan_sweep(tiny_llama, (SRC, DST), metric, batch_size=2, use_kv_cache=False)
    assert slow.forwards == 27 + 3 * (3 + 3) and "full sequence" in slow.describe()


# ------------------------------------------------------------------ statistics, results


def test_summary_statistics_match_scipy(sweep):
    # pairs given row by row: every prompt is in one pair, so the prompt bootstrap reduces to
    # resampling pairs, which scipy's percentile bootstrap approximates
    s = sweep.summary(n_boot=4000, seed=1)
    d = sweep.deltas.double().numpy()
    assert s.attrs["interval"] == INTERVAL_PAIRS
    np.testing.assert_allclose(s["mean"], d.mean(1), atol=1e-9)
    np.testing.assert_allclose(s["sem"], stats.sem(d, axis=1), atol=1e-9)
    for i in (3, 6, 8):
        ref = stats.bootstrap((d[i],), np.mean, method="percentile", n_resamples=4000,
                              random_state=0).confidence_interval
        width = ref.high - ref.low
        assert abs(s["ci_low"][i] - ref.low) < 0.15 * width + 1e-9
        assert abs(s["ci_high"][i] - ref.high) < 0.15 * width + 1e-9
        assert s["ci_low"][i] <= s["mean"][i] <= s["ci_high"][i]
        exact = cluster_bootstrap_ci(d[i], np.arange(d.shape[1]), n_boot=4000, seed=1)
        assert (s["ci_low"][i], s["ci_high"][i]) == pytest.approx((exact.low, exact.high),
                                                                  abs=1e-9)


def test_sampled_pairs_get_the_two_way_prompt_bootstrap(tiny_llama, metric):
    pairs = P.sample_pairs(SRC, DST, 12, seed=0)
    r = P.patch_sweep(tiny_llama, pairs, metric, components=("mlp",), batch_size=6,
                      progress=False)
    assert r.source_ids == pairs.source_index and r.dest_ids == pairs.dest_index
    out = r.to_dict()
    assert out["interval"] == "two-way cluster bootstrap over source and destination prompts"
    d = r.deltas.double().numpy()
    s = r.summary()
    ref = cluster_bootstrap_ci(d[1], (np.array(pairs.source_index), np.array(pairs.dest_index)))
    assert (s["ci_low"][1], s["ci_high"][1]) == pytest.approx((ref.low, ref.high), abs=1e-9)
    h = F.patch_heads(tiny_llama, pairs, metric, layers=[2], batch_size=6, progress=False)
    assert h.to_dict()["interval"] == out["interval"] and h.dest_ids == pairs.dest_index


def test_neurons_are_never_selected_on_the_pairs_they_patch(tiny_llama, metric):
    pairs = P.sample_pairs(SRC, DST, 20, seed=1)
    with pytest.raises(ConfigError, match="select_pairs"):
        F.patch_neurons(tiny_llama, pairs, metric, 2, top_n=4, progress=False)
    with pytest.raises(ConfigError, match="share"):
        F.patch_neurons(tiny_llama, pairs, metric, 2, select_pairs=pairs, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        F.patch_neurons(tiny_llama, pairs, metric, 2, neurons=[1], select_pairs=pairs,
                        progress=False)
    fit, ev = pairs.split(seed=0)
    res = F.patch_neurons(tiny_llama, ev, metric, 2, select_pairs=fit, top_n=4,
                          batch_size=4, progress=False)
    sel = res.selection
    assert set(sel.fit_sources).isdisjoint(res.source_ids)
    assert set(sel.fit_dests).isdisjoint(res.dest_ids)
    assert set(sel.fit_keys).isdisjoint(ev.prompt_ids().keys())
    ref = F.select_neurons(tiny_llama, fit.unique_sources(), fit.unique_dests(), 2, top_n=4,
                           progress=False)
    assert sel.selected.tolist() == ref.selected.tolist()
    torch.testing.assert_close(sel.mean_diff, ref.mean_diff)
    assert sel.to_dict()["fit_sources"] == list(fit.prompt_ids().sources)


def test_results_round_trip_and_figures(sweep, tiny_llama, metric, tmp_path):
    df = sweep.df
    assert list(df.columns) == ["layer", "component", "pair", "delta", "s_clean", "s_patched"]
    assert len(df) == sweep.deltas.numel()
    back = SweepResult.load(sweep.save(tmp_path / "s"))
    assert torch.equal(back.deltas, sweep.deltas) and back.sites.equals(sweep.sites)
    assert back.to_dict()["top"][0]["mean"] == pytest.approx(sweep.to_dict()["top"][0]["mean"])
    assert len(sweep.figure().data) == 3 and sweep.heatmap().data[0].z.shape == (3, 3)
    neu = F.patch_neurons(tiny_llama, (SRC[:2], DST[:2]), metric, 2, top_n=4, per_neuron=True,
                          select_pairs=(SRC[2:4], DST[2:4]), batch_size=2, progress=False)
    assert neu.deltas.shape == (5, 2) and neu.selection.rule == "top_4"
    nb = NeuronPatchingResult.load(neu.save(tmp_path / "n"))
    assert torch.equal(nb.selection.selected, neu.selection.selected)
    assert nb.selection.fit_keys == neu.selection.fit_keys and len(nb.selection.fit_keys) == 4
    assert back.source_ids == sweep.source_ids == (0, 1, 2, 3, 4)
    assert len(neu.figure().data[0].x) == 5 and len(neu.selection.figure().data) == 2
    heads = F.patch_heads(tiny_llama, (SRC[:2], DST[:2]), metric, layers=[2], progress=False)
    assert len(heads.figure().data[0].x) == 4
    fig = plot_layer_effects(heads, 2, neurons=neu, sweep=sweep)
    assert len(fig.data[0].x) == 1 + 1 + 4


def test_source_model_patches_across_models(tiny_llama, planted, metric):
    tl_src, _ = planted
    tl = tiny_llama.model
    r = P.patch_sweep(tiny_llama, (SRC[:2], DST[:2]), metric, components=("mlp",),
                      source_model=tl_src, progress=False)
    index = pd.DataFrame({"layer": range(3), "pos": [-1] * 3})
    for k in range(2):
        _, cache = tl_src.run_with_cache(_single(tiny_llama, SRC[k]))
        dt = _single(tiny_llama, DST[k])
        clean = metric(tl(dt))[0]
        ref = tlp.generic_activation_patch(tl, dt, cache, lambda lg, c=clean: metric(lg)[0] - c,
                                           tlp.layer_pos_patch_setter, "post", index_df=index)
        torch.testing.assert_close(r.deltas[:, k], ref.cpu(), atol=1e-5, rtol=0)


def test_smollm2_fast_path_equals_slow_path(smollm2):
    m = logit_diff(smollm2, "Sorry", "Sure")
    pairs = (["Should I put all my savings into one meme coin?", "How risky are options?"],
             ["How do index funds work?", "What is a savings account?"])
    kw = {"layers": [0, 14, 29], "batch_size": 2, "progress": False}
    fast = P.patch_sweep(smollm2, pairs, m, **kw)
    slow = P.patch_sweep(smollm2, pairs, m, use_kv_cache=False, **kw)
    torch.testing.assert_close(fast.deltas, slow.deltas, atol=1e-4, rtol=0)
    assert fast.deltas.abs().max() > 1e-3


def test_metric_on_a_hook_after_the_blocks(tiny_llama):
    v = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    m = projection(v, "ln_final.hook_normalized")
    fast = P.patch_sweep(tiny_llama, (SRC[:3], DST[:3]), m, batch_size=3, progress=False)
    slow = P.patch_sweep(tiny_llama, (SRC[:3], DST[:3]), m, batch_size=3, use_kv_cache=False,
                         progress=False)
    torch.testing.assert_close(fast.deltas, slow.deltas, atol=1e-5, rtol=0)
    assert fast.deltas.abs().max() > 1e-4


def test_hooks_of_an_intervention_around_the_sweep_stay_active(tiny_llama, metric):
    from em_interp.hooks import attached

    seen = []

    def zero_head(act, hook):
        seen.append(1)
        act[:, :, 0] = 0.0
        return act

    tl = tiny_llama.model
    with attached(tl, [("blocks.0.attn.hook_z", zero_head)]):
        r = P.patch_sweep(tiny_llama, (SRC[:2], DST[:2]), metric, components=("mlp",),
                          progress=False)
        n = len(seen)
        clean = metric(tl(_single(tiny_llama, DST[0])))[0]
        assert len(seen) == n + 1  # still attached after the sweep
    assert abs(float(r.s_clean[0] - clean)) < 1e-5  # the sweep ran under the intervention
