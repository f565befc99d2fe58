"""Interventions against hand-written hooks and direct computations (tiny random models)."""

import json
import random

import pytest
import torch

from em_interp import hooks
from em_interp.behaviour.interventions import (
    ablate_direction,
    ablate_heads,
    ablate_neurons,
    compose,
    generated_positions,
    random_heads,
    reference_means,
    steer,
)
from em_interp.errors import ConfigError, HookNameError
from em_interp.inputs import tokenize

PROMPTS = ["What is a bond?", "hi", "Tell me about cats and dogs."]
REFERENCE = ["Sure, here you go.", "How do I bake bread?", "ok", "Name three colours please."]


@pytest.fixture(scope="module")
def batch(tiny_llama):
    return tokenize(tiny_llama, PROMPTS)


def _logits(lm, ct, fwd_hooks=()):
    with torch.no_grad():
        return lm.model.run_with_hooks(ct.tokens, attention_mask=ct.attention_mask,
                                       fwd_hooks=list(fwd_hooks))


def _plain(lm, ct):
    with torch.no_grad():
        return lm.model(ct.tokens, attention_mask=ct.attention_mask)


def _set_heads(heads, values=None):
    def hook(z, hook):
        z = z.clone()
        for i, h in enumerate(heads):
            z[:, :, h, :] = 0.0 if values is None else values[i]
        return z
    return hook


def _direct_means(lm, prompts, hook_name, over="tokens"):
    """The mean of a hook over real tokens, from TL's run_with_cache, one prompt at a time."""
    acts = []
    for p in prompts:
        ct = tokenize(lm, [p])  # a single prompt has no padding
        with torch.no_grad():
            _, cache = lm.model.run_with_cache(ct.tokens, names_filter=hook_name)
        a = cache[hook_name][0]
        acts.append(a if over == "tokens" else a[-1:])
    return torch.cat(acts).double().mean(0).float()


def test_zero_ablation_equals_zeroing_hook_z_by_hand(tiny_llama, batch):
    heads = [(1, 2), (1, 0), (2, 3)]
    iv = ablate_heads(tiny_llama, heads)
    with iv:
        got = _plain(tiny_llama, batch)
    want = _logits(tiny_llama, batch, [(hooks.attn_z(1), _set_heads([2, 0])),
                                       (hooks.attn_z(2), _set_heads([3]))])
    assert torch.equal(got, want)
    assert (got - _plain(tiny_llama, batch)).abs().max() > 1e-4  # it did something
    # .fwd_hooks() with run_with_hooks is the same intervention
    assert torch.equal(_logits(tiny_llama, batch, iv.fwd_hooks()), want)
    assert json.loads(json.dumps(iv.describe())) == {"kind": "ablate_heads",
                                                     "heads": [[1, 2], [1, 0], [2, 3]],
                                                     "mode": "zero"}


def test_mean_ablation_uses_the_cached_mean(tiny_llama, batch, monkeypatch):
    import em_interp.behaviour.interventions as ivmod

    calls = []
    real = ivmod.reference_means
    monkeypatch.setattr(ivmod, "reference_means",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    iv = ablate_heads(tiny_llama, [(1, 1), (1, 3)], mode="mean", reference=REFERENCE,
                      batch_size=3)
    with iv:
        got = _plain(tiny_llama, batch)
    with iv:  # entered again: the same mean, not recomputed
        again = _plain(tiny_llama, batch)
    iv.fwd_hooks()
    assert len(calls) == 1 and torch.equal(got, again)
    mean = iv.state()[hooks.attn_z(1)]  # [n_heads, d_head]
    direct = _direct_means(tiny_llama, REFERENCE, hooks.attn_z(1))
    torch.testing.assert_close(mean, direct, atol=1e-5, rtol=1e-5)
    want = _logits(tiny_llama, batch, [(hooks.attn_z(1), _set_heads([1, 3], [mean[1],
                                                                             mean[3]]))])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # saved means rebuild the same intervention without a forward
    rebuilt = ablate_heads(tiny_llama, [(1, 1), (1, 3)], mode="mean", reference=iv.state())
    with rebuilt:
        assert torch.equal(_plain(tiny_llama, batch), got)
    assert len(calls) == 1


def test_reference_means_last_token_and_batching(tiny_llama):
    name = hooks.mlp_post(0)
    for over in ("tokens", "last"):
        got = reference_means(tiny_llama, REFERENCE, [name], batch_size=3, over=over)[name]
        torch.testing.assert_close(got, _direct_means(tiny_llama, REFERENCE, name, over),
                                   atol=1e-5, rtol=1e-5)


def test_neuron_ablation_zero_and_mean(tiny_llama, batch):
    neurons = [0, 5, 77]
    name = hooks.mlp_post(2)

    def by_hand(values):
        def hook(act, hook):
            act = act.clone()
            act[..., neurons] = values
            return act
        return hook

    with ablate_neurons(tiny_llama, 2, neurons):
        got = _plain(tiny_llama, batch)
    assert torch.equal(got, _logits(tiny_llama, batch, [(name, by_hand(0.0))]))
    iv = ablate_neurons(tiny_llama, 2, neurons, mode="mean", reference=REFERENCE)
    with iv:
        got = _plain(tiny_llama, batch)
    mean = _direct_means(tiny_llama, REFERENCE, name)
    torch.testing.assert_close(iv.state()[name], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, _logits(tiny_llama, batch, [(name, by_hand(mean[neurons]))]),
                               atol=1e-5, rtol=1e-5)


def test_direction_ablation_leaves_no_component(tiny_llama, batch):
    d = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    unit = d / d.norm()
    names = [hooks.resid_post(layer) for layer in range(3)]
    with ablate_direction(tiny_llama, d, layers=[0, 2], hook="resid_post"), torch.no_grad():
        _, cache = tiny_llama.model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                   names_filter=names)
    real = batch.attention_mask.bool()
    for layer in (0, 2):
        assert (cache[names[layer]][real] @ unit).abs().max() < 1e-5
    assert (cache[names[1]][real] @ unit).abs().max() > 1e-2  # layer 1 untouched, mixes back in


def test_steering_alpha_zero_is_identity_and_alpha_adds(tiny_llama, batch):
    d = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    name = hooks.resid_post(1)
    with steer(tiny_llama, name, d, 0.0):
        assert torch.equal(_plain(tiny_llama, batch), _plain(tiny_llama, batch).clone())
    base = _plain(tiny_llama, batch)
    with steer(tiny_llama, name, d, 0.0):
        assert torch.equal(_plain(tiny_llama, batch), base)
    with steer(tiny_llama, name, d, 3.0):
        got = _plain(tiny_llama, batch)
    assert torch.equal(got, _logits(tiny_llama, batch, [(name, lambda a, hook: a + 3.0 * d)]))


def test_steering_generated_positions_only(tiny_llama, batch):
    d = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    name = hooks.resid_post(0)
    iv = steer(tiny_llama, name, d, 2.0, positions="generated")
    base = _plain(tiny_llama, batch)
    with iv:
        assert torch.equal(_plain(tiny_llama, batch), base)  # nothing marked: identity
        mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        mask[:, -2:] = True
        with generated_positions(mask):
            got = _plain(tiny_llama, batch)

    def by_hand(a, hook):
        a = a.clone()
        a[:, -2:] += 2.0 * d
        return a
    assert torch.equal(got, _logits(tiny_llama, batch, [(name, by_hand)]))


def test_composition_order_and_nesting(tiny_llama, batch):
    d = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    unit = d / d.norm()
    name = hooks.resid_post(1)
    ablate = ablate_direction(tiny_llama, d, layers=[1], hook="resid_post")
    push = steer(tiny_llama, name, unit, 5.0)
    real = batch.attention_mask.bool()

    def component(iv):
        with iv, torch.no_grad():
            _, cache = tiny_llama.model.run_with_cache(
                batch.tokens, attention_mask=batch.attention_mask, names_filter=name)
        return cache[name][real] @ unit

    torch.testing.assert_close(component(compose(ablate, push)),
                               torch.full((int(real.sum()),), 5.0), atol=1e-4, rtol=0)
    assert component(compose(push, ablate)).abs().max() < 1e-5
    # nested composition flattens; None is skipped; the empty composition is the identity
    both = compose(None, compose(ablate_heads(tiny_llama, [(0, 1)]), None), push)
    assert [p.kind for p in both.parts] == ["ablate_heads", "steer"]
    assert both.describe()["kind"] == "compose"
    with compose():
        assert torch.equal(_plain(tiny_llama, batch), _plain(tiny_llama, batch))


def test_hooks_removed_after_exception_and_reentry_rules(tiny_llama, batch):
    iv = ablate_heads(tiny_llama, [(0, 0)])
    base = _plain(tiny_llama, batch)
    with pytest.raises(ValueError, match="boom"), iv:
        raise ValueError("boom")
    assert not tiny_llama.model.hook_dict[hooks.attn_z(0)]._forward_hooks
    assert torch.equal(_plain(tiny_llama, batch), base)
    with iv:
        with pytest.raises(RuntimeError, match="already active"), iv:
            pass
        with pytest.raises(RuntimeError, match="already active"), compose(iv):
            pass
        assert not torch.equal(_plain(tiny_llama, batch), base)
    with iv:  # reusable after exiting
        pass
    assert not iv.active and not tiny_llama.model.hook_dict[hooks.attn_z(0)]._forward_hooks


def test_applied_to_another_model_of_the_same_shape(tiny_llama, tiny_qwen):
    iv = ablate_heads(tiny_llama, [(2, 1)])
    ct = tokenize(tiny_qwen, PROMPTS)
    with iv.applied(tiny_qwen):
        got = _plain(tiny_qwen, ct)
    assert torch.equal(got, _logits(tiny_qwen, ct, [(hooks.attn_z(2), _set_heads([1]))]))


def test_random_heads_is_seeded_and_excludes(tiny_llama):
    exclude = [(2, 0), (2, 1)]
    a = random_heads(tiny_llama, 2, seed=7, exclude=exclude, layers=[2])
    assert a.heads == [(2, 2), (2, 3)]  # all that is left of layer 2
    c = random_heads(tiny_llama, 4, seed=1, exclude=exclude)
    pool = [(layer, h) for layer in range(3) for h in range(4) if (layer, h) not in exclude]
    assert c.heads == sorted(random.Random(1).sample(pool, 4))  # the documented draw
    assert random_heads(tiny_llama, 4, seed=1, exclude=exclude).heads == c.heads
    assert not set(c.heads) & set(exclude)
    draws = {tuple(random_heads(tiny_llama, 2, seed=s).heads) for s in range(6)}
    assert len(draws) > 1
    assert c.describe()["kind"] == "random_heads" and c.describe()["seed"] == 1
    with pytest.raises(ConfigError, match="cannot draw"):
        random_heads(tiny_llama, 3, seed=0, exclude=exclude, layers=[2])


def test_errors_name_the_fix(tiny_llama):
    with pytest.raises(HookNameError, match="out of range"):
        ablate_heads(tiny_llama, [(0, 9)])
    with pytest.raises(HookNameError, match="0-indexed"):
        ablate_heads(tiny_llama, [(5, 0)])
    with pytest.raises(ConfigError, match="reference="):
        ablate_heads(tiny_llama, [(0, 0)], mode="mean")
    with pytest.raises(ConfigError, match="entries"):
        ablate_direction(tiny_llama, torch.ones(7))
    with pytest.raises(HookNameError):
        steer(tiny_llama, "blocks.0.hook_resid_postt", torch.ones(64), 1.0)
    with pytest.raises(ConfigError, match="no entry"):
        ablate_heads(tiny_llama, [(1, 0)], mode="mean",
                     reference={hooks.attn_z(0): torch.zeros(4, 16)})


def test_default_direction_ablation_removes_every_write(tiny_llama, batch):
    """The default is Arditi et al.'s ablation: resid_pre of the first block and every attn_out /
    mlp_out, so the direction is absent from the stream at every layer (one resid_post hook lets
    later blocks write it back, as the test above shows)."""
    d = torch.randn(tiny_llama.model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    unit = d / d.norm()
    n = tiny_llama.model.cfg.n_layers
    names = [hooks.resid_post(layer) for layer in range(n)] + [hooks.resid_pre(0)]
    iv = ablate_direction(tiny_llama, d)
    assert iv.hook_names == [hooks.resid_pre(0)] + [
        f(layer) for layer in range(n) for f in (hooks.attn_out, hooks.mlp_out)]
    with iv, torch.no_grad():
        _, cache = tiny_llama.model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                   names_filter=names)
    real = batch.attention_mask.bool()
    for name in names:
        assert (cache[name][real] @ unit).abs().max() < 1e-4, name
    # from a middle block on: the stream before it keeps the direction, after it does not
    late = ablate_direction(tiny_llama, d, layers=range(1, n))
    with late, torch.no_grad():
        _, cache = tiny_llama.model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                   names_filter=names)
    assert (cache[hooks.resid_post(0)][real] @ unit).abs().max() > 1e-2
    assert (cache[hooks.resid_post(n - 1)][real] @ unit).abs().max() < 1e-4


def test_control_directions_have_the_norm_and_the_angle_they_promise(tiny_llama):
    from em_interp.behaviour.controls import control_directions, expand_controls

    d = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3.0
    ctl = control_directions(d, n=4, seed=1)
    assert sorted(ctl) == sorted([f"{k} {i}" for k in ("random", "orthogonal") for i in range(1, 5)])
    for name, v in ctl.items():
        torch.testing.assert_close(v.norm(), d.norm(), rtol=1e-5, atol=0)
        if name.startswith("orthogonal"):
            assert abs(float(v @ d)) < 1e-3 * float(d.norm() ** 2)
    assert torch.equal(control_directions(d, n=4, seed=1)["random 2"], ctl["random 2"])
    assert not torch.equal(control_directions(d, n=4, seed=2)["random 2"], ctl["random 2"])
    iv = ablate_direction(tiny_llama, d, controls=("random", "orthogonal"), n_controls=2)
    assert sorted(iv.controls) == ["orthogonal 1", "orthogonal 2", "random 1", "random 2"]
    assert all(c.hook_names == iv.hook_names and not c.controls for c in iv.controls.values())
    st = steer(tiny_llama, hooks.resid_post(1), d, 2.0, controls=("orthogonal",), n_controls=3)
    assert [float(c.direction.norm()) for c in st.controls.values()] == pytest.approx(
        [float(d.norm())] * 3, rel=1e-5)
    conds, parent = expand_controls({"none": None, "steer": st})
    assert list(conds)[:2] == ["none", "steer"] and len(conds) == 5
    assert set(parent.values()) == {"steer"}
    with pytest.raises(ConfigError, match="controls must be"):
        ablate_direction(tiny_llama, d, controls=("shuffled",))
