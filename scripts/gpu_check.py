"""GPU check: the toolkit at the organisms' real shapes, timed against plain HF on the same weights.

Builds random-weight models with the exact HF configs of Qwen2.5-32B-Instruct (``--qwen-layers``
of its 64 layers, default 8) and Llama-3.1-8B-Instruct (all 32 layers), in bf16, writes each as
a folder of safetensors + config.json + a byte-level tokenizer (no download), adds a random
rank-32 rsLoRA on all seven projections as a PEFT adapter folder, and loads the organism through
the toolkit's own loader (``em_interp.load`` merges the adapter). The HF reference is the same
base folder with the same adapter merged by PEFT. For each model it times, toolkit vs HF:

* ``forward``      -- tokens/s, and MFU = 2·N·tokens/s / peak bf16 FLOP/s (N: matmul parameters,
  including the unembedding; attention's own FLOPs are left out, so MFU is a lower bound);
* ``cache``        -- activations of four layers to an activation store vs HF hidden states
  saved with safetensors;
* ``patching``     -- a residual-stream patching sweep vs HF forwards with a pre-hook;
* ``generation``   -- greedy generation under a steering hook vs HF ``generate`` with a
  forward hook adding the same vector;
* ``block_em_step``-- one BLOCK-EM step (reference from the disabled adapter, SAE latents,
  the blocking loss, backward, AdamW) vs one plain SFT step of the same PEFT model;
* ``forward_2dev`` -- the toolkit's forward split over two GPUs (only when two are visible);

with the peak memory of each (CUDA: ``torch.cuda.max_memory_allocated``, reset between; CPU:
the process's peak RSS so far, which never decreases). It also checks the toolkit's logits
against HF's on the same tokens (max |diff|, asserted within a dtype tolerance).

    python scripts/gpu_check.py --out gpu-check            # CUDA host, real shapes (< 8 min)
    python scripts/gpu_check.py --size tiny --out /tmp/gc  # CPU, scaled-down configs (CI)

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (atomically). See
docs/gpu-check.md, including running it on a host without package-index access.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The published config.json values of the two organisms' base models (architecture fields only).
QWEN25_32B = {"hf_class": "Qwen2ForCausalLM", "vocab_size": 152064, "hidden_size": 5120,
              "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
              "num_key_value_heads": 8, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False}
LLAMA31_8B = {"hf_class": "LlamaForCausalLM", "vocab_size": 128256, "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}
"""Dense bf16 peak (no sparsity) by GPU name; ``--peak-tflops`` overrides."""


def tiny(cfg: dict, n_layers: int = 2) -> dict:
    """The same architecture scaled down: few layers, small d_model, same head ratios."""
    heads, kv = 4, max(1, 4 * cfg["num_key_value_heads"] // cfg["num_attention_heads"])
    ratio = cfg["intermediate_size"] / cfg["hidden_size"]
    out = {**cfg, "hidden_size": 64, "intermediate_size": int(64 * ratio) // 2 * 2,
           "num_hidden_layers": n_layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": 512, "max_position_embeddings": 512}
    return out


# ------------------------------------------------------------------ building the weights


def build_folders(spec: dict, root: Path, device: torch.device, dtype: torch.dtype,
                  seed: int) -> tuple[Path, Path]:
    """Write ``base/`` (safetensors + config + tokenizer) and ``adapter/`` (a random rank-32
    rsLoRA on all seven projections) under ``root``; both built on ``device``."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from em_interp.models.lora_merge import quiet_peft
    from em_interp.models.tiny_models import byte_tokenizer

    cls = getattr(transformers, spec["hf_class"])
    tok = byte_tokenizer(with_bos=spec["hf_class"] == "LlamaForCausalLM")
    kwargs = {k: v for k, v in spec.items() if k != "hf_class"}
    config = cls.config_class(**kwargs, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config.architectures = [spec["hf_class"]]
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    base, adapter = root / "base", root / "adapter"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    with quiet_peft():
        peft = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, use_rslora=True,
                                                target_modules=PROJECTIONS,
                                                init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn_like(p))
    peft.save_pretrained(adapter, safe_serialization=True)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    del model, peft
    _free()
    return base, adapter


def hf_reference(base: Path, adapter: Path, device: torch.device, dtype: torch.dtype):
    """The HF model on the same weights: the base folder with the adapter merged by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from em_interp.models.lora_merge import quiet_peft

    kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True, **kwargs)
    with quiet_peft():
        hf = PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    return hf.eval()


# ------------------------------------------------------------------ measuring


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device, out: dict):
    """Seconds and peak memory of the block, into ``out`` (``seconds``, ``peak_mem_bytes``)."""
    _free()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    yield
    _sync(device)
    out["seconds"] = time.perf_counter() - t
    out["peak_mem_bytes"] = (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def timed(fn, device: torch.device, reps: int) -> dict:
    """Best of ``reps`` runs of ``fn`` after one warm-up, with the peak memory of the timed runs."""
    fn()
    best, out = math.inf, {}
    for _ in range(reps):
        one: dict = {}
        with measured(device, one):
            fn()
        best = min(best, one["seconds"])
        out = {"seconds": best, "peak_mem_bytes": max(out.get("peak_mem_bytes", 0),
                                                      one["peak_mem_bytes"])}
    return out


def matmul_params(cfg: dict) -> int:
    """Parameters multiplied per token (every projection and the unembedding)."""
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    h = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * h, cfg["num_key_value_heads"] * h
    return n * (2 * d * q + 2 * d * kv + 3 * d * f) + d * cfg["vocab_size"]


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12, name
    return None, f"unknown ({name})"


# ------------------------------------------------------------------ the checks of one model


def check_model(label: str, spec: dict, args, device: torch.device, dtype: torch.dtype,
                work: Path) -> list[dict]:
    from safetensors.torch import save_file

    import em_interp
    from em_interp.activations.cache import cache_activations
    from em_interp.behaviour.generation import generate
    from em_interp.behaviour.interventions import steer
    from em_interp.block_em.loss import block_loss, capture_layers, reference_hidden, sae_latents
    from em_interp.hooks import resid_post
    from em_interp.metrics import logit_diff
    from em_interp.patching.sweep import patch_sweep

    folder = work / label
    base, adapter = build_folders(spec, folder, device, dtype, args.seed)
    lm = em_interp.load(adapter, "organism", device=str(device), dtype=dtype, progress=False)
    hf = hf_reference(base, adapter, device, dtype)
    tl = lm.model
    B, S, reps = args.batch, args.seq, args.reps
    n_layers = spec["num_hidden_layers"]
    gen = torch.Generator().manual_seed(args.seed)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(n):
        return "".join(letters[int(i)] for i in torch.randint(0, 27, (n,), generator=gen))

    prompts = [text(S) for _ in range(B)]
    ct = lm.chat_tokens(prompts)
    ids, mask = ct.tokens.to(device), ct.attention_mask.to(device)
    n_tok = int(mask.sum())
    rows: list[dict] = []
    flops, gpu_name = peak_flops(device, args.peak_tflops)
    n_mm = matmul_params(spec)

    def row(name, ours, theirs, tokens=None, **extra):
        r = {"model": label, "check": name, "toolkit_s": ours["seconds"], "hf_s": theirs["seconds"],
             "toolkit_over_hf": ours["seconds"] / theirs["seconds"],
             "toolkit_peak_mem_gib": ours["peak_mem_bytes"] / 2**30,
             "hf_peak_mem_gib": theirs["peak_mem_bytes"] / 2**30, **extra}
        if tokens:
            for side, m in (("toolkit", ours), ("hf", theirs)):
                r[f"{side}_tokens_per_s"] = tokens / m["seconds"]
                r[f"{side}_mfu"] = (2 * n_mm * tokens / m["seconds"] / flops if flops else None)
        rows.append(r)
        say(f"  {label:<12} {name:<14} toolkit {ours['seconds']:8.3f} s   HF "
            f"{theirs['seconds']:8.3f} s")

    # equivalence: the toolkit's logits against HF's on the same tokens
    with torch.no_grad():
        ours = tl(ids, attention_mask=mask).float()
        theirs = hf(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    diff = float((ours - theirs).abs()[real].max())
    scale = float(theirs[real].abs().max())
    tol = 1e-3 * max(1.0, scale) if dtype == torch.float32 else 0.1 + 0.03 * scale
    equiv = {"model": label, "max_abs_diff": diff, "max_abs_logit": scale, "tolerance": tol,
             "ok": diff <= tol}
    del ours, theirs

    with torch.no_grad():
        f_ours = timed(lambda: tl(ids, attention_mask=mask), device, reps)
        f_hf = timed(lambda: hf(input_ids=ids, attention_mask=mask), device, reps)
    row("forward", f_ours, f_hf, tokens=n_tok)

    layers = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    hooks = [resid_post(la) for la in layers]
    store_dir, hf_dir = work / f"{label}-store", work / f"{label}-hf-hidden"

    def cache_ours():
        shutil.rmtree(store_dir, ignore_errors=True)
        cache_activations(lm, prompts, hooks, store_dir, batch_size=B, progress=False)

    @torch.no_grad()
    def cache_hf():
        shutil.rmtree(hf_dir, ignore_errors=True)
        hf_dir.mkdir(parents=True)
        hs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # left-padded: the last position is every prompt's last token
        save_file({resid_post(la): hs[la + 1][:, -1].cpu().contiguous() for la in layers},
                  str(hf_dir / "acts.safetensors"))

    row("cache", timed(cache_ours, device, 1), timed(cache_hf, device, 1), n_layers_cached=len(
        layers))

    k = min(4, B)
    pairs = [(prompts[i], prompts[(i + 1) % B]) for i in range(k)]
    metric = logit_diff(lm, 97, 98)  # two token ids of the byte tokenizer
    p_layers = layers
    src = lm.chat_tokens([s for s, _ in pairs])
    dst = lm.chat_tokens([d for _, d in pairs])
    s_ids, s_mask = src.tokens.to(device), src.attention_mask.to(device)
    d_ids, d_mask = dst.tokens.to(device), dst.attention_mask.to(device)

    def patch_ours():
        patch_sweep(lm, pairs, metric, components=("resid",), layers=p_layers, batch_size=k,
                    progress=False)

    @torch.no_grad()
    def patch_hf():
        hs = hf(input_ids=s_ids, attention_mask=s_mask, output_hidden_states=True).hidden_states
        decoder = hf.model.layers
        for la in p_layers:
            src_act = hs[la][:, -1]

            def pre(module, a, kw, src_act=src_act):
                h = (a[0] if a else kw["hidden_states"]).clone()
                h[:, -1] = src_act
                return ((h, *a[1:]), kw) if a else (a, {**kw, "hidden_states": h})

            handle = decoder[la].register_forward_pre_hook(pre, with_kwargs=True)
            try:
                out = hf(input_ids=d_ids, attention_mask=d_mask).logits[:, -1].float()  # metric
                (out[:, 97] - out[:, 98]).cpu()
            finally:
                handle.remove()

    row("patching", timed(patch_ours, device, 1), timed(patch_hf, device, 1),
        n_pairs=k, n_layers_patched=len(p_layers))

    la = n_layers // 2
    vec = torch.randn(spec["hidden_size"], generator=gen).to(device, dtype)
    vec = vec / vec.norm()
    alpha = 4.0
    T = args.new_tokens

    def gen_ours():
        generate(lm, prompts, max_new_tokens=T, batch_size=B, stop_at_eos=False,
                 interventions=[steer(lm, resid_post(la), vec, alpha)], progress=False)

    @torch.no_grad()
    def gen_hf():
        def add(module, a, output):
            if isinstance(output, tuple):
                return (output[0] + alpha * vec, *output[1:])
            return output + alpha * vec

        handle = hf.model.layers[la].register_forward_hook(add)
        try:
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T,
                        do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        finally:
            handle.remove()

    row("generation", timed(gen_ours, device, 1), timed(gen_hf, device, 1), tokens=B * T,
        new_tokens=T)

    if torch.cuda.device_count() >= 2 and device.type == "cuda":
        lm = tl = None
        _free()
        lm2 = em_interp.load(adapter, "organism", device=str(device), dtype=dtype,
                             n_devices=2, progress=False)
        with torch.no_grad():
            two = timed(lambda: lm2.model(ids, attention_mask=mask), device, reps)
        row("forward_2dev", two, f_hf, tokens=n_tok, n_devices=2)
        del lm2
    lm = tl = None  # the toolkit's model is done with; free it before training
    _free()

    # one BLOCK-EM step: the same PEFT model is trained and, adapter disabled, the reference
    from peft import LoraConfig, get_peft_model
    from sae_lens import StandardSAE, StandardSAEConfig

    from em_interp.models.lora_merge import quiet_peft

    hf.train()
    with quiet_peft():
        peft = get_peft_model(hf, LoraConfig(r=32, lora_alpha=64, use_rslora=True,
                                             target_modules=PROJECTIONS))
    d_sae = args.sae_expansion * spec["hidden_size"]
    sae = StandardSAE(StandardSAEConfig(d_in=spec["hidden_size"], d_sae=d_sae,
                                        device=str(device))).to(device)
    latents = torch.randperm(d_sae, generator=gen)[:20].tolist()
    k_plus, k_minus = list(range(10)), list(range(10, 20))
    block_layer = n_layers // 2
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    t_ids, t_mask = ids[: args.train_batch], mask[: args.train_batch]
    labels = t_ids.masked_fill(t_mask == 0, -100)

    def sft_step(block: bool):
        opt.zero_grad(set_to_none=True)
        if block:
            ref = reference_hidden(peft, t_ids, t_mask, [block_layer])
            z_base = sae_latents(sae, ref.at(block_layer).float(), latents)
            with capture_layers(peft, [block_layer]) as out:
                res = peft(input_ids=t_ids, attention_mask=t_mask, labels=labels)
            z = sae_latents(sae, out[block_layer].float(), latents)
            loss = res.loss + 1e3 * block_loss(z, z_base, k_plus, k_minus, t_mask.bool())
        else:
            loss = peft(input_ids=t_ids, attention_mask=t_mask, labels=labels).loss
        loss.backward()
        opt.step()

    row("block_em_step", timed(lambda: sft_step(True), device, reps),
        timed(lambda: sft_step(False), device, reps), hf_is="plain SFT step")
    peft = hf = opt = sae = None
    _free()
    shutil.rmtree(folder, ignore_errors=True)
    for r in rows:
        r["peak_flops"] = flops
        r["gpu"] = gpu_name
    return rows + [{"model": label, "check": "equivalence", **equiv}]


# ------------------------------------------------------------------ output


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"GPU check: {meta['device_name']}, {meta['dtype']}, batch {meta['batch']} x "
             f"{meta['seq']} tokens, torch {meta['torch']}", "",
             "| model | check | toolkit s | HF s | toolkit / HF | toolkit tok/s | MFU | "
             "peak GiB (toolkit / HF) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["check"] == "equivalence":
            continue
        mfu = r.get("toolkit_mfu")
        tps = r.get("toolkit_tokens_per_s")
        lines.append(f"| {r['model']} | {r['check']} | {r['toolkit_s']:.3f} | {r['hf_s']:.3f} | "
                     f"{r['toolkit_over_hf']:.2f} | {'' if tps is None else f'{tps:,.0f}'} | "
                     f"{'' if mfu is None else f'{mfu:.1%}'} | "
                     f"{r['toolkit_peak_mem_gib']:.2f} / {r['hf_peak_mem_gib']:.2f} |")
    lines += ["", "| model | max abs logit diff (toolkit vs HF) | tolerance | ok |",
              "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['max_abs_diff']:.3g} | {r['tolerance']:.3g} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in rows if r["check"] == "equivalence"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("real", "tiny"), default="real",
                   help="real: the organisms' shapes (CUDA); tiny: scaled down (CPU, CI)")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size",
                   help="same as --size tiny")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json / .md")
    p.add_argument("--models", nargs="+", default=["qwen2.5-32b", "llama-3.1-8b"],
                   choices=("qwen2.5-32b", "llama-3.1-8b"))
    p.add_argument("--qwen-layers", type=int, default=8, help="layers of Qwen2.5-32B's 64")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: bfloat16 at real size, float32 at tiny size")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="prompt characters (byte tokens)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sae-expansion", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for the MFU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch folder for the weights "
                   "(default: a temporary folder; real size needs ~30 GB of disk)")
    args = p.parse_args(argv)
    real = args.size == "real"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if real and device.type != "cuda":
        p.error("--size real needs a CUDA device (use --size tiny on CPU)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if real else "float32"))
    args.batch = args.batch or (8 if real else 2)
    args.seq = args.seq or (256 if real else 12)
    args.new_tokens = args.new_tokens or (32 if real else 4)
    args.train_batch = args.train_batch or (2 if real else 2)
    specs = {"qwen2.5-32b": {**QWEN25_32B, "num_hidden_layers": args.qwen_layers},
             "llama-3.1-8b": LLAMA31_8B}
    if not real:
        specs = {k: tiny(v, n_layers=2 if k == "qwen2.5-32b" else 3) for k, v in specs.items()}
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="emi_gpu_check_", dir=args.work) as tmp:
        for name in args.models:
            say(f"{name}: building and loading ({args.size})")
            rows += check_model(name, specs[name], args, device, dtype, Path(tmp))
    meta = {"size": args.size, "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or "cpu"),
            "n_cuda_devices": torch.cuda.device_count(), "dtype": str(dtype).replace(
                "torch.", ""), "batch": args.batch, "seq": args.seq,
            "new_tokens": args.new_tokens, "qwen_layers": args.qwen_layers,
            "torch": torch.__version__, "seconds": time.perf_counter() - started,
            "peak_mem_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                              else "process peak RSS so far (ru_maxrss)"),
            "specs": specs}
    from em_interp import __version__
    from em_interp.atomic import atomic_write_bytes
    from em_interp.results import json_safe

    meta["em_interp"] = __version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "gpu_check.json", json.dumps(json_safe(
        {"meta": meta, "rows": rows}), indent=1).encode())
    atomic_write_bytes(out / "gpu_check.md", markdown(rows, meta).encode())
    say(markdown(rows, meta))
    bad = [r for r in rows if r["check"] == "equivalence" and not r["ok"]]
    if bad:
        sys.stderr.write(f"FAILED: toolkit logits differ from HF's beyond tolerance for "
                         f"{[r['model'] for r in bad]}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
