"""The activation store: values against TransformerLens's own ActivationCache and safetensors,
padding, SIGKILL + resume byte-identity, manifest mismatches, bounded memory, errors."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from em_interp import hooks
from em_interp.activations import cache as act_mod
from em_interp.activations import store as store_mod
from em_interp.activations.cache import (
    ActivationStore,
    cache_activations,
    disk_estimate,
    human_bytes,
)
from em_interp.data import PromptSet
from em_interp.errors import ConfigError, DataError, HookNameError, StoreMismatchError
from em_interp.models.chat import chat_tokens

PROMPTS = ["a", "a much longer prompt here, with several more words", "hi there",
           [{"role": "user", "content": "What is a bond?"}], "mid size prompt", "x y z"]
HOOKS = [hooks.mlp_post(0), hooks.attn_z(1), hooks.resid_post(2)]


@pytest.fixture(scope="module")
def tl_reference(tiny_llama):
    """TL's own run_with_cache, one unpadded prompt at a time:
    ``{(prompt index, hook): [pos, ...]}``."""
    out = {}
    for i, p in enumerate(PROMPTS):
        ct = chat_tokens(tiny_llama.tokenizer, [p])
        _, cache = tiny_llama.model.run_with_cache(ct.tokens, attention_mask=ct.attention_mask,
                                                   names_filter=HOOKS)
        out.update({(i, h): cache[h][0] for h in HOOKS})
    return out


@pytest.mark.parametrize("reduce", ["last", "mean", "none"])
def test_rows_equal_tl_activation_cache_and_plain_safetensors(tiny_llama, tl_reference, tmp_path,
                                                              reduce):
    store = cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path, batch_size=2, shard_size=4,
                              reduce=reduce, progress=False)
    offsets = store.offsets
    assert len(store.manifest["shards"]) == 2 and store.n_prompts == len(PROMPTS)
    for hook in HOOKS:
        full = store.load(hook)
        assert full.shape == store.shape(hook)
        assert full.shape[1:] == ((4, 16) if "hook_z" in hook else (128,) if "mlp" in hook
                                  else (64,))
        for i in range(len(PROMPTS)):
            a = tl_reference[i, hook]
            ref = {"last": a[-1], "mean": a.mean(0), "none": a}[reduce]
            got = full[offsets[i]:offsets[i + 1]]
            got = got if reduce == "none" else got[0]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the shards are plain safetensors files: safetensors' own reader sees the same rows
    bounds = [0] + [int(offsets[s["stop"]]) for s in store.manifest["shards"]]
    for k, shard in enumerate(store.manifest["shards"]):
        data = load_file(str(tmp_path / shard["file"]))
        for hook in HOOKS:
            assert torch.equal(data[hook], store.load(hook)[bounds[k]:bounds[k + 1]])
        if reduce == "none":
            lengths = offsets[shard["start"] + 1:shard["stop"] + 1] - offsets[
                shard["start"]:shard["stop"]]
            assert torch.equal(data[store_mod.LENGTHS_KEY], lengths)
    if reduce == "none":
        ct = chat_tokens(tiny_llama.tokenizer, PROMPTS)
        assert torch.equal(offsets.diff(), ct.attention_mask.sum(-1))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen"])
def test_left_and_right_padding_equal_unbatched_runs(request, tmp_path, fixture):
    lm = request.getfixturevalue(fixture)
    hook = [hooks.resid_post(1), hooks.mlp_post(0)]
    left = chat_tokens(lm.tokenizer, PROMPTS)
    assert (left.attention_mask[:, 0] == 0).any()  # really padded
    # the same rows right-padded
    lengths = left.attention_mask.sum(-1)
    tok, mask = torch.full_like(left.tokens, left.tokens[0, 0]), torch.zeros_like(left.tokens)
    for i, n in enumerate(lengths.tolist()):
        tok[i, :n] = left.tokens[i, -n:]
        mask[i, :n] = 1
    for reduce in ("last", "mean"):
        one = cache_activations(lm, PROMPTS, hook, tmp_path / f"one-{reduce}", batch_size=1,
                                reduce=reduce, progress=False)
        lpad = cache_activations(lm, PROMPTS, hook, tmp_path / f"left-{reduce}", batch_size=6,
                                 reduce=reduce, progress=False)
        rpad = cache_activations(lm, (tok, mask), hook, tmp_path / f"right-{reduce}",
                                 batch_size=6, reduce=reduce, progress=False)
        for h in hook:
            torch.testing.assert_close(lpad.load(h), one.load(h), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rpad.load(h), one.load(h), atol=1e-5, rtol=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    import em_interp
    from em_interp import hooks
    from em_interp.activations.cache import cache_activations

    mode, out = sys.argv[1], sys.argv[2]
    lm = em_interp.load("tiny-random-llama", "base", progress=False)
    prompts = [f"prompt {i}: " + "word " * (i % 13) for i in range(96)]
    names = [hooks.mlp_post(0), hooks.attn_z(1), hooks.resid_post(2)]
    kw = dict(batch_size=4, shard_size=8, reduce="none", progress=False)
    if mode == "slow":  # about 50 ms per batch, so the parent can kill it mid-run
        lm.model.hook_dict["hook_embed"].add_hook(lambda a, hook: time.sleep(0.05),
                                                  is_permanent=True)
        cache_activations(lm, prompts, names, out, **kw)
    else:
        cache_activations(lm, prompts, names, out, **kw)
        cache_activations(lm, prompts, names, out + "-clean", **kw)
    print("DONE")
""")


def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (out / "shard_00001.safetensors").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the caching subprocess never wrote a shard"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    n_shards = math.ceil(96 / 8)
    done = len(manifest["shards"])
    assert not manifest["complete"] and 1 <= done < n_shards
    with pytest.raises(DataError, match="unfinished"):
        ActivationStore.open(out)
    # what a kill can leave behind: a half-written temp shard, and a shard renamed into place
    # but not yet listed in the manifest; neither may be read as good
    (out / ".shard_00011.safetensors.partial-12345").write_bytes(b"\0" * 100)
    (out / f"shard_{done:05d}.safetensors").write_bytes(b"garbage, not a shard")
    res = subprocess.run([sys.executable, str(script), "finish", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "DONE" in res.stdout, res.stderr[-3000:]
    clean = tmp_path / "store-clean"
    shards = sorted(p.name for p in clean.glob("shard_*.safetensors"))
    assert len(shards) == n_shards
    assert sorted(p.name for p in out.glob("shard_*.safetensors")) == shards
    for name in shards:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(out.glob(".*.partial-*"))
    a, b = ActivationStore.open(out), ActivationStore.open(clean)
    assert torch.equal(a.offsets, b.offsets)
    for h in a.hooks:
        assert torch.equal(a.load(h), b.load(h))


@pytest.fixture
def forward_counter(monkeypatch):
    calls = {"n": 0}
    real = act_mod._pooled_forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(act_mod, "_pooled_forward", counting)
    return calls


def test_finished_store_is_reused_and_mismatches_are_refused(tiny_llama, tiny_qwen, tmp_path,
                                                             forward_counter):
    out = tmp_path / "s"
    first = cache_activations(tiny_llama, PROMPTS, HOOKS, out, batch_size=2, progress=False)
    n = forward_counter["n"]
    assert n == 1 + 3  # the shape probe (one prompt) + three batches
    again = cache_activations(tiny_llama, PROMPTS, list(reversed(HOOKS)), out, batch_size=2,
                              progress=False)
    assert forward_counter["n"] == n  # nothing recomputed
    assert torch.equal(again.load(HOOKS[0]), first.load(HOOKS[0]))
    cases = {
        "model": dict(model=tiny_qwen),
        "hooks": dict(hooks=HOOKS[:2]),
        "prompts": dict(prompts=PROMPTS[:-1] + ["changed"]),
        "reduce": dict(reduce="mean"),
        "dtype": dict(dtype="float16"),
        "batch_size": dict(batch_size=3),
        "shard_size": dict(shard_size=4),
    }
    for what, change in cases.items():
        kw = dict(model=tiny_llama, prompts=PROMPTS, hooks=HOOKS, batch_size=2,
                  progress=False) | change
        model, prompts, names = kw.pop("model"), kw.pop("prompts"), kw.pop("hooks")
        with pytest.raises(StoreMismatchError, match=rf"{what}: .*another out_dir.*overwrite"):
            cache_activations(model, prompts, names, out, **kw)
    assert forward_counter["n"] == n
    # tiny_qwen has hooks of the same names: only the weights tell the models apart
    with pytest.raises(StoreMismatchError, match="tiny-random-qwen2"):
        cache_activations(tiny_qwen, PROMPTS, HOOKS, out, batch_size=2, progress=False)
    fresh = cache_activations(tiny_llama, PROMPTS, HOOKS, out, batch_size=2, reduce="mean",
                              overwrite=True, progress=False)
    assert fresh.reduce == "mean" and forward_counter["n"] == 2 * n


def test_bad_input_raises_before_any_forward(tiny_llama, tmp_path, monkeypatch):
    tl = tiny_llama.model

    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(tl, "forward", no_forward)
    with pytest.raises(HookNameError, match="blocks.0.mlp.hook_out"):
        cache_activations(tiny_llama, PROMPTS, [hooks.mlp_post(0), "blocks.0.mlp.hook_out"],
                          tmp_path / "a", progress=False)
    with pytest.raises(HookNameError):
        cache_activations(tiny_llama, PROMPTS, hooks.mlp_post(7), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="cannot be pooled"):
        cache_activations(tiny_llama, PROMPTS, hooks.attn_pattern(0), tmp_path / "a",
                          progress=False)
    with pytest.raises(DataError, match="empty"):
        cache_activations(tiny_llama, [], HOOKS, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match=r"longer than the model's context of 256 tokens.*\(1, "):
        cache_activations(tiny_llama, ["short", "x" * 300], HOOKS, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="no hooks"):
        cache_activations(tiny_llama, PROMPTS, [], tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="multiple of batch_size=4.*shard_size=8"):
        cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "a", batch_size=4,
                          shard_size=10, progress=False)
    for bad in (dict(reduce="max"), dict(dtype="int8"), dict(batch_size=0)):
        with pytest.raises(ConfigError):
            cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "a", progress=False, **bad)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_forward_stops_after_the_deepest_hook(tiny_llama, tmp_path):
    seen = []
    with hooks.attached(tiny_llama.model, [(hooks.resid_pre(2), lambda a, hook: seen.append(1))]):
        store = cache_activations(tiny_llama, PROMPTS, [hooks.mlp_post(0), hooks.attn_z(1)],
                                  tmp_path / "a", batch_size=3, progress=False)
        assert store.manifest["stop_at_layer"] == 2 and seen == []
        cache_activations(tiny_llama, PROMPTS, hooks.mlp_post(2), tmp_path / "b",
                          batch_size=3, progress=False)
    assert len(seen) == 1 + 2  # the shape probe + two batches
    assert act_mod.stop_layer(["hook_embed"]) == 0
    assert act_mod.stop_layer([hooks.mlp_post(3), "ln_final.hook_normalized"]) is None


def test_memory_is_one_batch_of_rows(tiny_llama, tmp_path, monkeypatch):
    sizes = []
    real = store_mod.ShardWriter.write

    def spy(self, name, row, rows):
        sizes.append(rows.shape[0])
        return real(self, name, row, rows)

    monkeypatch.setattr(store_mod.ShardWriter, "write", spy)
    prompts = [f"question {i} " + "a " * (i % 5) for i in range(40)]
    store = cache_activations(tiny_llama, prompts, HOOKS, tmp_path, batch_size=4, shard_size=12,
                              progress=False)
    # rows reach the disk one batch at a time, never a shard or the whole set
    assert max(sizes) == 4 and len(sizes) == 10 * len(HOOKS)
    shards = store.manifest["shards"]
    assert [s["stop"] - s["start"] for s in shards] == [12, 12, 12, 4]
    for s in shards:
        assert load_file(str(tmp_path / s["file"]))[HOOKS[0]].shape[0] == s["rows"]


def test_manifest_labels_dtype_and_disk_arithmetic(tiny_llama, tmp_path, caplog):
    ps = PromptSet(name="toy", prompts=tuple(f"p{i} " * (i + 1) for i in range(6)),
                   labels=(1, 0, 1, 0, 1, 0), split=("train",) * 4 + ("test",) * 2,
                   groups=tuple("aabbcc"), label_names={0: "benign", 1: "risky"})
    with caplog.at_level("INFO", logger="em_interp.activations.cache"):
        store = cache_activations(tiny_llama, ps, HOOKS, tmp_path / "f", batch_size=4,
                                  progress=False)
    m = store.manifest
    assert store.labels == ps.labels and store.split == ps.split and store.groups == ps.groups
    assert m["card"] == "tiny-random-llama" and m["variant"] == "base"
    assert m["prompt_set"]["hash"] == ps.hash() and m["n_prompts"] == 6
    assert m["shapes"] == {HOOKS[0]: [128], HOOKS[1]: [4, 16], HOOKS[2]: [64]}
    assert m["dtype"] == "float32" and m["batch_size"] == 4 and m["em_interp_version"]
    data_bytes = 6 * (128 + 64 + 64) * 4
    assert m["estimated_bytes"] == data_bytes and human_bytes(data_bytes) in caplog.text
    assert store.disk_bytes > data_bytes
    half = cache_activations(tiny_llama, ps, HOOKS, tmp_path / "h", batch_size=4,
                             dtype="bfloat16", progress=False)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.load(HOOKS[1]), store.load(HOOKS[1]).to(torch.bfloat16))
    assert store.load(HOOKS[0], dtype="float16").dtype == torch.float16
    # the Qwen paper's scale: 64 layers x d_mlp 27648 x 12,000 prompts in bf16
    assert disk_estimate(64, 27648, 12000) == 64 * 27648 * 12000 * 2 == 42_467_328_000
    assert human_bytes(disk_estimate(64, 27648, 12000)) == "42.5 GB"


def test_iter_batches_streams_across_shards(tiny_llama, tmp_path):
    prompts = [f"q{i} " + "b " * (i % 4) for i in range(14)]
    store = cache_activations(tiny_llama, prompts, HOOKS, tmp_path, batch_size=2, shard_size=4,
                              reduce="none", progress=False)
    full = store.load(HOOKS[1])
    batches = list(store.iter_batches(HOOKS[1], 7))
    assert all(b.shape[0] == 7 for b in batches[:-1]) and 0 < batches[-1].shape[0] <= 7
    assert torch.equal(torch.cat(batches), full)
    shuffled = torch.cat(list(store.iter_batches(HOOKS[1], 7, shuffle=True, seed=3)))
    perm = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(shuffled, full[perm])
    other = torch.cat(list(store.iter_batches(HOOKS[1], 5, shuffle=True, seed=4)))
    assert not torch.equal(other, shuffled)
    assert torch.equal(other.flatten(1).sort(0).values, full.flatten(1).sort(0).values)


def test_open_refuses_what_is_not_a_finished_store(tiny_llama, tmp_path):
    with pytest.raises(DataError, match="not an activation store"):
        ActivationStore.open(tmp_path)
    store = cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "s", batch_size=2,
                              shard_size=2, progress=False)
    with pytest.raises(DataError, match="no hook"):
        store.load("blocks.0.mlp.hook_pre")
    one = cache_activations(tiny_llama, PROMPTS, HOOKS, tmp_path / "one", batch_size=2,
                            progress=False)  # one shard: load() is a memory-mapped view
    view = one.load(HOOKS[0])
    before = view.clone()
    view.zero_()  # writing into it changes neither the file nor later reads
    assert torch.equal(one.load(HOOKS[0]), before)
    assert torch.equal(ActivationStore.open(tmp_path / "one").load(HOOKS[0]), before)
    shard = tmp_path / "s" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(DataError, match="wrong size"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="already holds"):
        ActivationStore.from_tensors(tmp_path / "s", {"x": torch.zeros(2, 3)})
