"""Generation: KV-cache decoding against full recomputation and HF ``generate``; seeds; resume."""

import json

import numpy as np
import pytest
import torch

from em_interp import hooks
from em_interp.behaviour.generation import (
    GenerationResult,
    decode_step,
    generate,
    prefill,
    sample_next,
)
from em_interp.behaviour.interventions import steer
from em_interp.errors import StoreMismatchError
from em_interp.inputs import tokenize
from em_interp.results import load_result

PROMPTS = ["What is a bond?", "hi", "Tell me about cats and dogs.", "Name a colour."]


def _greedy_by_recompute(lm, prompt, n, fwd_hooks_for=None):
    """Greedy decoding by re-running the whole sequence every step (no cache), one prompt."""
    ids = tokenize(lm, [prompt]).tokens
    n_prompt = ids.shape[1]
    out = []
    for _ in range(n):
        fwd = [] if fwd_hooks_for is None else fwd_hooks_for(ids.shape[1], n_prompt)
        with torch.no_grad():
            logits = lm.model.run_with_hooks(ids, fwd_hooks=fwd)
        t = int(logits[0, -1].argmax())
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


def test_kv_cache_greedy_equals_full_recompute(tiny_llama):
    r = generate(tiny_llama, PROMPTS[:2], max_new_tokens=8, stop_at_eos=False, progress=False)
    for i, p in enumerate(PROMPTS[:2]):
        assert r.df.tokens[i] == _greedy_by_recompute(tiny_llama, p, 8)


def test_generated_only_steering_during_generation(tiny_llama):
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    name = hooks.resid_post(1)
    iv = steer(tiny_llama, name, d, 4.0, positions="generated")
    r = generate(tiny_llama, PROMPTS[:2], max_new_tokens=6, stop_at_eos=False, progress=False,
                 interventions=iv)

    def only_generated(width, n_prompt):
        def hook(a, hook):
            a = a.clone()
            a[:, n_prompt:] += 4.0 * d
            return a
        return [(name, hook)]

    for i, p in enumerate(PROMPTS[:2]):
        assert r.df.tokens[i] == _greedy_by_recompute(tiny_llama, p, 6, only_generated)
    plain = generate(tiny_llama, PROMPTS[:2], max_new_tokens=6, stop_at_eos=False,
                     progress=False)
    assert plain.df.tokens.tolist() != r.df.tokens.tolist()
    assert r.interventions["kind"] == "steer" and "direction" in r.intervention_state


def test_prefill_runs_the_prompt_once(tiny_llama):
    seen = []
    ct = tokenize(tiny_llama, PROMPTS)
    with hooks.attached(tiny_llama.model, [("hook_embed", lambda a, hook: seen.append(
            tuple(a.shape[:2])))]), torch.no_grad():
        logits, state = prefill(tiny_llama, ct.tokens, ct.attention_mask)
        for _ in range(3):
            logits = decode_step(tiny_llama, state, logits.argmax(-1))
    assert seen == [tuple(ct.tokens.shape)] + [(4, 1)] * 3
    assert state.attention_mask.shape == (4, ct.tokens.shape[1] + 3)


def test_batched_equals_unbatched_greedy_and_sampled(tiny_llama):
    kw = {"max_new_tokens": 10, "progress": False, "seed": 3}
    for temperature in (0.0, 1.0):
        one = generate(tiny_llama, PROMPTS, batch_size=1, temperature=temperature, **kw)
        many = generate(tiny_llama, PROMPTS, batch_size=3, temperature=temperature, **kw)
        assert one.df.tokens.tolist() == many.df.tokens.tolist()
        assert one.df.stop_reason.tolist() == many.df.stop_reason.tolist()


def test_reproducible_under_a_seed(tiny_llama):
    kw = {"max_new_tokens": 12, "progress": False, "temperature": 1.0, "n_samples": 3}
    a = generate(tiny_llama, PROMPTS[:2], seed=11, **kw)
    b = generate(tiny_llama, PROMPTS[:2], seed=11, **kw)
    c = generate(tiny_llama, PROMPTS[:2], seed=12, **kw)
    assert a.df.tokens.tolist() == b.df.tokens.tolist()
    assert a.df.tokens.tolist() != c.df.tokens.tolist()
    assert len(set(map(tuple, a.df.tokens))) > 1  # samples of one prompt differ
    assert a.df[["prompt_index", "sample"]].values.tolist() == [
        [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_nucleus_sampling_frequencies():
    """A planted distribution: p = (0.5, 0.3, 0.15, 0.05), top_p = 0.6 keeps tokens 0 and 1."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sample_next(logits, temperature=1.0, top_p=0.6, generators=gens)
    counts = np.bincount(draws.numpy(), minlength=4)
    assert counts[2] == counts[3] == 0
    from scipy.stats import binomtest

    assert binomtest(int(counts[0]), 4000, 0.5 / 0.8).pvalue > 1e-3
    assert torch.equal(sample_next(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))


def test_equal_to_hf_generate_greedy_on_smollm2(smollm2, smollm2_hf):
    prompts = ["What is the capital of France?", "hi", "Write a haiku about autumn."]
    r = generate(smollm2, prompts, max_new_tokens=20, batch_size=3, progress=False)
    ct = tokenize(smollm2, prompts)
    with torch.no_grad():
        out = smollm2_hf.generate(input_ids=ct.tokens, attention_mask=ct.attention_mask,
                                  max_new_tokens=20, do_sample=False)
    eos = smollm2.tokenizer.eos_token_id
    for i in range(len(prompts)):
        ids = out[i, ct.tokens.shape[1]:].tolist()
        stopped = eos in ids
        ids = ids[:ids.index(eos)] if stopped else ids
        assert r.df.tokens[i] == ids
        assert r.df.stop_reason[i] == ("eos" if stopped else "max_new_tokens")
        assert r.df.n_tokens[i] == len(ids)
        assert r.df.completion[i] == smollm2.tokenizer.decode(ids, skip_special_tokens=True)
    assert "eos" in set(r.df.stop_reason)  # "hi" gets a short answer


def test_resume_from_a_partial_jsonl(tiny_llama, tmp_path, monkeypatch):
    import em_interp.behaviour.generation as gen

    path = tmp_path / "gen.jsonl"
    kw = {"max_new_tokens": 6, "temperature": 1.0, "n_samples": 2, "seed": 5, "progress": False,
          "batch_size": 3}
    full = generate(tiny_llama, PROMPTS, out_path=path, **kw)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["__header__"]["n_samples"] == 2 and len(lines) == 1 + 8
    # keep the header, 3 rows and half of a fourth (an interrupted write)
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:15])
    generated = []
    real = gen._generate_chunk
    monkeypatch.setattr(gen, "_generate_chunk", lambda tl, rows, keys, **k: generated.extend(
        keys) or real(tl, rows, keys, **k))
    resumed = generate(tiny_llama, PROMPTS, out_path=path, **kw)
    done_before = {(json.loads(x)["prompt_index"], json.loads(x)["sample"]) for x in lines[1:4]}
    assert set(generated) == {(i, s) for i in range(4) for s in range(2)} - done_before
    assert resumed.df.equals(full.df)
    assert len(path.read_text().splitlines()) == 1 + 8
    with pytest.raises(StoreMismatchError, match="max_new_tokens"):
        generate(tiny_llama, PROMPTS, out_path=path, **{**kw, "max_new_tokens": 7})


def test_result_roundtrip(tiny_llama, tmp_path):
    d = torch.randn(64, generator=torch.Generator().manual_seed(9))
    r = generate(tiny_llama, PROMPTS[:2], max_new_tokens=4, progress=False,
                 interventions=[steer(tiny_llama, hooks.resid_post(0), d, 1.0)])
    r.save(tmp_path / "g")
    back = load_result(tmp_path / "g")
    assert isinstance(back, GenerationResult)
    assert back.df[["prompt", "completion", "n_tokens"]].equals(
        r.df[["prompt", "completion", "n_tokens"]])
    assert torch.equal(back.intervention_state["direction"], d)
    assert r.to_dict()["n_rows"] == 2 and r.figure().layout.xaxis.title.text


def test_step_hook_sees_every_forward_and_drives_lockstep_patching(tiny_llama, monkeypatch):
    """A planted stop token makes rows leave the batch; the step hook sees the live rows, its
    hooks act on that forward only, and decode_patch (built on step_hook) stays exact."""
    import em_interp
    import em_interp.behaviour.generation as gen
    from em_interp.patching.generation import decode_patch

    kw = {"max_new_tokens": 6, "progress": False, "batch_size": 3}
    free = generate(tiny_llama, PROMPTS, stop_at_eos=False, **kw)
    stop = free.df.tokens[0][1]  # row 0 stops at its second token
    r = generate(tiny_llama, PROMPTS, stop_tokens=[stop], **kw)
    assert {"eos", "max_new_tokens"} <= set(r.df.stop_reason)
    # the step hook: record what each forward gets, and steer generated steps by hand
    d = torch.randn(64, generator=torch.Generator().manual_seed(1))
    seen, acts, alpha = [], [], [0.0]

    def step_hook(step, tokens, mask, rows):
        seen.append((step, tuple(tokens.shape), rows.tolist()))
        assert mask.shape == tokens.shape
        if step == 0:
            return None

        def add(a, hook):
            acts.append(tuple(a.shape[:2]))
            return a + alpha[0] * d
        return [(hooks.resid_post(1), add)]

    got = generate(tiny_llama, PROMPTS, stop_tokens=[stop], step_hook=step_hook, **kw)
    assert got.df.tokens.tolist() == r.df.tokens.tolist()
    assert got.settings["step_hook"].endswith("step_hook")
    assert not tiny_llama.model.hook_dict[hooks.resid_post(1)].fwd_hooks  # removed each step
    assert [s[2] for s in seen if s[0] == 0] == [[0, 1, 2], [0]]  # 4 prompts, batches of 3
    decode = [s for s in seen if s[0] > 0]
    assert acts == [(len(rows), 1) for _, _, rows in decode]  # the hook ran on that forward
    pairs = list(zip(seen, seen[1:], strict=False))
    for before, after in pairs:
        if after[0] > 0:  # a decode step: one token per live row; rows only ever leave
            assert after[1] == (len(after[2]), 1) and set(after[2]) <= set(before[2])
    assert any(len(b[2]) < len(a[2]) for a, b in pairs if b[0] > 1)
    alpha[0] = 4.0
    ref = generate(tiny_llama, PROMPTS, stop_tokens=[stop], **kw, interventions=steer(
        tiny_llama, hooks.resid_post(1), d, 4.0, positions="generated"))
    steered = generate(tiny_llama, PROMPTS, stop_tokens=[stop], step_hook=step_hook, **kw)
    assert steered.df.tokens.tolist() == ref.df.tokens.tolist() != r.df.tokens.tolist()
    # decode_patch keeps model B's cache in lockstep when rows leave A's batch
    organism = em_interp.load("tiny-random-llama", "organism", progress=False)
    free_b = generate(organism, PROMPTS, stop_at_eos=False, **kw)
    stops = [free_b.df.tokens[0][1]]
    monkeypatch.setattr(gen, "stop_token_ids", lambda model, extra=None: stops)
    want_b = generate(organism, PROMPTS, **kw)
    assert "eos" in set(want_b.df.stop_reason)
    last = tiny_llama.model.cfg.n_layers - 1
    got_b = decode_patch(tiny_llama, organism, PROMPTS, last, **kw)
    assert got_b.df.tokens.tolist() == want_b.df.tokens.tolist()
    assert got_b.df.stop_reason.tolist() == want_b.df.stop_reason.tolist()
    stops[:] = [stop]
    assert decode_patch(tiny_llama, tiny_llama, PROMPTS, 1, **kw).df.tokens.tolist() == \
        r.df.tokens.tolist()


def _lean_vs_tl_steps(lm, iv, n_steps=5, drop_at=2):
    """Logits of LeanDecoder.step and of TL's decode_step, step by step from one prefill, under
    the same interventions; a row leaves the batch at step ``drop_at``."""
    from em_interp.behaviour.generation import LeanDecoder, keep_rows

    ct = tokenize(lm, PROMPTS)
    out = []
    with iv.applied(lm.model), torch.no_grad():
        logits, state = prefill(lm, ct.tokens, ct.attention_mask)
        _, state2 = prefill(lm, ct.tokens, ct.attention_mask)
        lean = LeanDecoder(lm, state2, n_steps)
        nxt = logits.argmax(-1)
        for step in range(n_steps):
            if step == drop_at:
                keep = torch.tensor([0, 2, 3])
                keep_rows(state, keep)
                lean.keep(keep)
                nxt = nxt[keep]
            a, b = decode_step(lm, state, nxt), lean.step(nxt)
            out.append((a, b))
            nxt = a.argmax(-1)
    return out


@pytest.mark.parametrize("card", ["tiny_llama", "tiny_qwen"])
def test_lean_decode_step_equals_tl_decode_step(card, request):
    """The lean step against TL's own forward: with hooks at many of the points it keeps
    (heads at hook_z, neurons at mlp.hook_post, a direction at every residual write, a steer
    at resid_post of generated positions), over steps where a row leaves the batch."""
    from em_interp.behaviour.generation import lean_decode_blocker
    from em_interp.behaviour.interventions import (
        ablate_direction,
        ablate_heads,
        ablate_neurons,
        compose,
    )

    lm = request.getfixturevalue(card)
    cfg = lm.model.cfg
    g = torch.Generator().manual_seed(4)
    iv = compose(
        ablate_heads(lm, [(0, 1)], mode="mean", reference=PROMPTS),
        ablate_neurons(lm, 1, [0, 3, 5], mode="zero"),
        ablate_direction(lm, torch.randn(cfg.d_model, generator=g), layers=[1]),
        steer(lm, hooks.resid_post(0), torch.randn(cfg.d_model, generator=g), 3.0,
              positions="generated"))
    assert lean_decode_blocker(lm) is None
    with iv.applied(lm.model):
        assert lean_decode_blocker(lm) is None
    for plain in (True, False):
        steps = _lean_vs_tl_steps(lm, compose() if plain else iv)
        for a, b in steps:
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_generate_keeps_tl_forward_where_the_lean_step_differs(tiny_llama):
    """A hook at a point the lean step does not reproduce (TL gives hook_pattern every cached
    key) or a torch hook on a module keeps TL's forward, with TL's activations."""
    from em_interp.behaviour.generation import lean_decode_blocker

    shapes = []
    name = "blocks.1.attn.hook_pattern"
    rec = (name, lambda a, hook: shapes.append(tuple(a.shape)))
    with hooks.attached(tiny_llama.model, [rec]):
        assert name in lean_decode_blocker(tiny_llama)
        r = generate(tiny_llama, PROMPTS[:2], max_new_tokens=4, stop_at_eos=False,
                     progress=False)
    width = tokenize(tiny_llama, PROMPTS[:2]).tokens.shape[1]
    n_heads = tiny_llama.model.cfg.n_heads
    assert shapes == [(2, n_heads, width, width)] + [(2, n_heads, 1, width + i)
                                                     for i in range(1, 4)]
    lean = generate(tiny_llama, PROMPTS[:2], max_new_tokens=4, stop_at_eos=False, progress=False)
    assert lean.df.tokens.tolist() == r.df.tokens.tolist()
    handle = tiny_llama.model.blocks[0].mlp.register_forward_hook(lambda m, i, o: None)
    try:
        assert "blocks.0.mlp" in lean_decode_blocker(tiny_llama)
    finally:
        handle.remove()
    assert lean_decode_blocker(tiny_llama) is None
