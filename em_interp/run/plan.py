"""``em-interp plan``: the peak memory and disk each stage of a run will need, before it runs.

The plan is arithmetic on the card's ``[architecture]`` and the run config's sizes; nothing is
loaded. With ``b`` the bytes per element of the run's dtype, ``L`` layers, ``d`` d_model,
``H`` / ``K`` query / KV heads of width ``h = d / H``, ``F`` d_mlp and ``V`` the vocabulary:

* **weights** ``P·b``, ``P = 2·V·d + L·(2·d·H·h + 2·d·K·h + 3·d·F + 2·d) + d`` (+ the QKV biases of
  Qwen2). The embedding and unembedding are counted apart: the HookedTransformer keeps its own
  ``W_U`` even for tied models.
* **the pair** (base and organism, loaded once per run by ``load_pair``): ``P·b`` plus the
  weights the organism changes -- a full fine-tune is a second ``P·b``; a LoRA organism merged
  with shared weights adds only its target projections, ``L·Σ_t size(t)·b``.
* **a forward** of ``B`` prompts of ``S`` tokens: one block's transients ``B·S·(3F+4d)·b``
  and its attention scores ``B·H·S²·(b+4)``, plus the logits -- ``B·S·V·b`` where a stage
  reads them at every position (dla), else ``B·V·4`` at the last one (activation caching
  stops after the deepest hooked block and computes none).
* **the KV cache** of generation: ``2·L·K·h·B·(S+T)·b`` for ``T`` new tokens.
* **the SAE** (trained in float32 with Adam): ``4·(2·d·E·d + E·d + d)·4`` bytes (parameters,
  gradients and two moments for ``E`` = expansion), a training batch of 1024 rows' latents,
  the activation rows it trains on (every token of ``train_prompts`` prompts, ``d`` floats),
  and its evaluation: three forwards (clean, spliced, zero-ablated) with float32 logits and
  log-probabilities, ``6·8·S·V·4``.
* **BLOCK-EM**: the fine-tune loads a second copy of the base as a float32 HF model (what
  ``em_interp.training.load_base_hf`` does), trains a rank-16 LoRA on all seven projections
  (parameters, gradients and Adam moments in float32) with activations kept for the backward
  pass at batch 4 x 192 tokens (``10·d + 4·F + 2·H·S`` floats per token and layer, and the
  float32 logits three times: values, log-softmax, gradient); the BLOCK-EM reference forward
  reuses the same model with its adapter disabled (no second copy); each tuned model is then
  loaded once more to score.
* **process baseline**: on a CPU host the plan adds the resident size of a Python process that
  has imported the stack a stage uses -- torch, transformers, TransformerLens, SAE-Lens,
  scikit-learn, plotly (:data:`PROCESS_BASELINE`, measured: about 580 MiB) -- which dominates
  for the tiny test cards; on GPUs it adds a CUDA context per device (:data:`CUDA_CONTEXT`).
* **load staging** (CPU only): loading the pair holds transients of the PEFT merge and the TL
  conversion, :data:`LOAD_STAGING` of the base weights (measured on SmolLM2-135M; see
  ``docs/plan.md``).

Over ``n`` GPUs the blocks are split evenly, so each device holds ``1/n`` of the weights and
the stage's working memory is counted whole on every device (activations cross them in turn).
Sequence lengths are estimated from the prompt sets' longest prompt (characters / 4 for BPE
tokenizers, 1 for the tests' byte tokenizer) plus a chat-template allowance. The figures are
estimates for refusing runs that cannot fit, not promises: see ``docs/plan.md`` for how they
compare with measured peaks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd

from em_interp.errors import ConfigError
from em_interp.results import Result

GiB = 2**30
MiB = 2**20
PROCESS_BASELINE = 580 * MiB
"""Resident size of a process that imported the toolkit's stack (measured, 2-core CPU host)."""
CUDA_CONTEXT = 512 * MiB
"""Memory a CUDA context takes on each device, outside PyTorch's allocator."""
LOAD_STAGING = 0.3
"""Transients of loading the pair on CPU, as a fraction of the base weights (measured)."""
CHAT_OVERHEAD_TOKENS = 40
"""Tokens a chat template adds around a prompt (system header, role markers)."""
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_VOCAB = 32_000


@dataclass(frozen=True)
class Shape:
    """The sizes the plan needs, read from a card."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab: int
    qkv_bias: bool
    vocab_known: bool = True
    """False when the card gives no vocabulary size and :data:`DEFAULT_VOCAB` was assumed."""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def module_params(self) -> dict[str, int]:
        """Parameters of each projection of one block."""
        d, h = self.d_model, self.d_head
        q, kv = self.n_heads * h, self.n_kv_heads * h
        return {"q_proj": d * q + (q if self.qkv_bias else 0),
                "k_proj": d * kv + (kv if self.qkv_bias else 0),
                "v_proj": d * kv + (kv if self.qkv_bias else 0),
                "o_proj": q * d, "gate_proj": d * self.d_mlp, "up_proj": d * self.d_mlp,
                "down_proj": self.d_mlp * d}

    @property
    def n_params(self) -> int:
        """Parameters of the HookedTransformer (embedding and unembedding counted apart)."""
        block = sum(self.module_params().values()) + 2 * self.d_model
        return 2 * self.vocab * self.d_model + self.n_layers * block + self.d_model

    def lora_params(self, rank: int, modules) -> int:
        """Parameters of a rank-``rank`` LoRA on ``modules`` of every block (A and B factors)."""
        d, h = self.d_model, self.d_head
        dims = {"q_proj": (d, self.n_heads * h), "k_proj": (d, self.n_kv_heads * h),
                "v_proj": (d, self.n_kv_heads * h), "o_proj": (self.n_heads * h, d),
                "gate_proj": (d, self.d_mlp), "up_proj": (d, self.d_mlp),
                "down_proj": (self.d_mlp, d)}
        return self.n_layers * sum(rank * sum(dims[m]) for m in modules if m in dims)


def card_shape(card) -> Shape:
    """The :class:`Shape` of a card: ``[architecture]``, its vocabulary from the card (or from a
    random source's config, or the byte tokenizer's size), QKV biases for Qwen2."""
    a = card.architecture
    vocab = getattr(a, "vocab_size", None) or card.base.config.get("vocab_size")
    if vocab is None and card.base.kind == "random":
        from em_interp.models.tiny_models import N_BYTES, SPECIALS

        vocab = N_BYTES + len(SPECIALS)
    return Shape(a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.d_mlp,
                 int(vocab or DEFAULT_VOCAB), a.hf_class == "Qwen2ForCausalLM",
                 vocab_known=vocab is not None)


@dataclass(frozen=True)
class StagePlan:
    """One stage's predicted needs (bytes)."""

    stage: str
    weights: int
    """Weights resident during the stage (the pair, plus any extra copy the stage loads)."""
    working: int
    """Activations, caches, optimizer state and other transients at the stage's peak."""
    disk: int
    """What the stage writes to the run folder (activation stores, SAE, adapters)."""
    note: str = ""


@dataclass(frozen=True)
class RunPlan(Result):
    """Per-stage peak memory and disk of a run (see the module docstring for the formulas).

    ``device`` is ``"cpu"`` (one pool: RAM) or ``"cuda"`` (``n_devices`` pools of
    ``device_bytes``); ``peak_bytes(stage)`` is the peak of one pool.
    """

    kind: ClassVar[str] = "plan"

    card: str
    dtype: str
    device: str
    n_devices: int
    device_bytes: int | None
    """Memory of one pool (GPU memory per device, or available RAM); ``None``: unknown."""
    stages: tuple[dict, ...] = ()
    """One :class:`StagePlan` per stage, as a dict (``stage``, ``weights``, ``working``,
    ``disk``, ``note``; bytes), in run order; :meth:`stage_plans` gives them typed."""
    weights_disk: int = 0
    """The base and organism weights in the model cache."""
    pair_bytes: int = 0
    """The base and organism as loaded (with the CPU load staging)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def stage_plans(self) -> list[StagePlan]:
        """The stages' plans, in run order."""
        return [StagePlan(**d) for d in self.stages]

    def peak_bytes(self, stage: str) -> int:
        """Predicted peak of one memory pool while ``stage`` runs (``"load"``: only the pair)."""
        if stage == "load":
            weights, working = self.pair_bytes, 0
        else:
            s = next((x for x in self.stage_plans() if x.stage == stage), None)
            if s is None:
                raise KeyError(f"stage {stage!r} is not in this plan")
            weights, working = s.weights, s.working
        if self.device == "cpu":
            return PROCESS_BASELINE + weights + working
        return CUDA_CONTEXT + -(-weights // self.n_devices) + working

    def misfit(self) -> tuple[str, int] | None:
        """The first stage whose peak exceeds ``device_bytes``, with that peak (``None``: fits)."""
        if self.device_bytes is None:
            return None
        for s in self.stage_plans():
            if self.peak_bytes(s.stage) > self.device_bytes:
                return s.stage, self.peak_bytes(s.stage)
        return None

    @property
    def df(self) -> pd.DataFrame:
        rows = [{"stage": s.stage, "weights_GiB": s.weights / GiB / (
                    1 if self.device == "cpu" else self.n_devices),
                 "working_GiB": s.working / GiB, "peak_GiB": self.peak_bytes(s.stage) / GiB,
                 "disk_GiB": s.disk / GiB, "note": s.note} for s in self.stage_plans()]
        return pd.DataFrame(rows, columns=["stage", "weights_GiB", "working_GiB", "peak_GiB",
                                           "disk_GiB", "note"])

    def figure(self, **kwargs):
        import plotly.graph_objects as go

        df = self.df
        fig = go.Figure([go.Bar(name="weights", x=df.stage, y=df.weights_GiB),
                         go.Bar(name="working", x=df.stage, y=df.working_GiB)])
        fig.update_layout(barmode="stack", yaxis_title="GiB per " + (
            "device" if self.device == "cuda" else "host"), title=f"Memory plan: {self.card}")
        if self.device_bytes:
            fig.add_hline(y=self.device_bytes / GiB, line_dash="dash",
                          annotation_text="available")
        return fig

    def to_dict(self) -> dict:
        miss = self.misfit()
        return {"card": self.card, "dtype": self.dtype, "device": self.device,
                "n_devices": self.n_devices, "device_bytes": self.device_bytes,
                "weights_disk_bytes": self.weights_disk,
                "stages": {s.stage: {"peak_bytes": self.peak_bytes(s.stage),
                                     "weights_bytes": s.weights, "working_bytes": s.working,
                                     "disk_bytes": s.disk, "note": s.note}
                           for s in self.stage_plans()},
                "fits": miss is None, "notes": list(self.notes)}

    def table(self) -> str:
        """The plan as aligned text (what ``em-interp plan`` prints)."""
        pool = ("per GPU" if self.device == "cuda" else "RAM")
        head = f"{'stage':<18}{'weights':>10}{'working':>10}{'peak ' + pool:>14}{'disk':>10}"
        lines = [f"memory plan: {self.card}, {self.dtype}, " + (
            f"{self.n_devices} x GPU" + (f" of {_fmt(self.device_bytes)}" if self.device_bytes
                                         else "") if self.device == "cuda" else
            "CPU" + (f" ({_fmt(self.device_bytes)} available)" if self.device_bytes else "")),
            head]
        for s in self.stage_plans():
            w = s.weights if self.device == "cpu" else -(-s.weights // self.n_devices)
            flag = "" if self.device_bytes is None or self.peak_bytes(
                s.stage) <= self.device_bytes else "  DOES NOT FIT"
            lines.append(f"{s.stage:<18}{_fmt(w):>10}{_fmt(s.working):>10}"
                         f"{_fmt(self.peak_bytes(s.stage)):>14}{_fmt(s.disk):>10}{flag}")
        lines.append(f"{'model cache':<18}{'':>10}{'':>10}{'':>14}{_fmt(self.weights_disk):>10}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80 GB"``, ``"512MiB"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"memory size {text!r} is not understood; write e.g. 80GiB, 141GB or "
                          "512MiB.")
    power = " KMGT".index(m.group(2).upper() or " ")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** power)


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (bytes), or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _tokens(chars: int, byte_tokenizer: bool) -> int:
    return CHAT_OVERHEAD_TOKENS + (chars if byte_tokenizer else -(-chars // 4))


def _prompt_chars(name: str, limit: int | None) -> tuple[int, float, int]:
    """Longest and mean prompt (characters) and the number of prompts of a set or file."""
    from em_interp.data import load_prompt_set

    ps = load_prompt_set(name)
    lens = [len(t) for t in ps.texts if not limit or len(t) <= limit] or [0]
    return max(lens), sum(lens) / len(lens), len(lens)


def plan_run(config, *, gpus: int | None = None, gpu_mem: int | str | None = None) -> RunPlan:
    """Predict each stage's peak memory and disk for ``config`` (a validated-able RunConfig).

    Args:
        config: a :class:`~em_interp.run.config.RunConfig`.
        gpus: GPUs to plan for; ``None``: the config's ``n_devices`` if CUDA is visible (or
            ``gpu_mem`` is given), else the CPU; 0: the CPU.
        gpu_mem: memory of each GPU (bytes or ``"80GiB"``); ``None``: detected.
    """
    from em_interp.models.cards import get_card

    config.check_types()
    card = get_card(config.card)
    dtype = config.dtype or card.dtype
    b = _BYTES[dtype]
    shape = card_shape(card)
    device, n_dev, pool = _pools(config, card, gpus, gpu_mem)
    byte_tok = card.base.kind == "random" and card.base.tokenizer.startswith("bytes")
    L, d, V, F, H = shape.n_layers, shape.d_model, shape.vocab, shape.d_mlp, shape.n_heads
    K, h = shape.n_kv_heads, shape.d_head
    P = shape.n_params
    org = card.organism
    if org is not None and org.kind == "lora":
        mods = org.target_modules or ALL_PROJECTIONS
        touched = L * sum(v for k, v in shape.module_params().items() if k in mods)
    else:
        touched = P
    pair = (P + touched) * b + (int(LOAD_STAGING * P * b) if device == "cpu" else 0)
    B, limit = config.batch_size, config.max_prompt_chars

    def seq(name: str) -> int:
        return _tokens(_prompt_chars(name, limit)[0], byte_tok)

    def forward(batch: int, s: int, logits: bool = False) -> int:
        return (batch * s * (3 * F + 4 * d) * b + batch * H * s * s * (b + 4)
                + (batch * s * V * b if logits else batch * V * 4))

    def ce_eval(batch: int, s: int) -> int:
        # the SAE's CE-loss-recovered: clean, spliced and zero-ablated forwards, each with
        # float32 logits and log-probabilities (KL), over a batch of the evaluation prompts
        return forward(batch, s) + 6 * batch * s * V * 4

    def kv(batch: int, s: int) -> int:
        return 2 * L * K * h * batch * s * b

    plans: list[StagePlan] = []
    c = config
    for stage in config.stages:
        if stage == "probing":
            s, n = seq(c.probing.prompt_set), _prompt_chars(c.probing.prompt_set, limit)[2]
            n = min(n, c.probing.n_prompts or n)
            layers = L if c.probing.layers is None else len(c.probing.layers)
            width = F if c.probing.hook in ("mlp_post", "mlp_pre") else d
            store = 2 * n * layers * width * b
            plans.append(StagePlan(stage, pair, forward(min(B, n), s) + store, store,
                                   "last-token activations of every probed layer, both models"))
        elif stage == "refusal_direction":
            r = c.refusal_direction
            s = seq(r.prompt_set)
            n = _prompt_chars(r.prompt_set, limit)[2]
            store = n * L * d * b
            plans.append(StagePlan(stage, pair, max(forward(B, s), kv(B, s + r.max_new_tokens))
                                   + store, store,
                                   f"generation: KV cache of {B} x {s + r.max_new_tokens} tokens"))
        elif stage == "introspection":
            i = c.introspection
            s = max(seq(i.prompt_set), seq(i.refusal_set))
            n = i.n_prompts or _prompt_chars(i.prompt_set, limit)[2]
            width = F if i.hook in ("mlp_post", "mlp_pre") else d
            store = 2 * 2 * n * L * width * b
            plans.append(StagePlan(stage, pair, forward(B, s) + store, store,
                                   "last-token activations at every layer of two prompt sets, "
                                   "both models (an upper bound)"))
        elif stage == "patching":
            s = seq(c.patching.prompt_set)
            state = B * (3 * L * s * d) * b + kv(B, s)
            plans.append(StagePlan(stage, pair, forward(B, s) + state,
                                   0,
                                   "source activations of every layer and the destination's "
                                   "KV cache per batch"))
        elif stage == "dla":
            s, n = seq(c.dla.prompt_set), min(B, c.dla.n_prompts or B)
            plans.append(StagePlan(stage, pair, forward(n, s, logits=True) + n * L * H * d * 4, 0,
                                   "per-head contributions at the read position"))
        elif stage == "asr":
            a = c.asr
            s = seq(a.prompt_set)
            plans.append(StagePlan(stage, pair, max(forward(B, s), kv(B, s + a.max_new_tokens)),
                                   0, f"generation: KV cache of {B} x {s + a.max_new_tokens} "
                                      "tokens"))
        elif stage == "sae":
            e = c.sae
            chars = _prompt_chars("financial", limit)[1]
            rows = (e.train_prompts or 1300) * _tokens(int(chars), byte_tok)
            rows_b = rows * d * b
            s_mix = _tokens(max(_prompt_chars(n, limit)[0] for n in
                                ("financial", "harmful", "em_questions", "ab_pairs")), byte_tok)
            if e.source == "train":
                sae_p = 2 * d * e.expansion * d + e.expansion * d + d
                work = 16 * sae_p + 1024 * e.expansion * d * 4 * 3 + rows_b + ce_eval(8, s_mix)
                disk = rows_b + sae_p * 4
                note = (f"SAE d_sae {e.expansion * d} with Adam (float32), {rows:,} activation "
                        "rows")
            else:
                work, disk, note = ce_eval(B, s_mix) + 4 * 2 * d * 65536, 0, \
                    "a loaded SAE (size assumed d_sae 65536 for the estimate)"
            plans.append(StagePlan(stage, pair, work, disk, note))
        elif stage == "block_em":
            be = c.block_em
            lora = shape.lora_params(16, ALL_PROJECTIONS)
            st, bt = 192, 4
            # per token and layer, kept for the backward pass: the norms' and projections'
            # inputs, q and k after RoPE, the residuals (~10 d), the MLP's gate, up,
            # activation and product (4 F) and the attention probabilities (2 H S); then the
            # float32 logits, their log-softmax and its gradient
            train_acts = bt * st * L * (10 * d + 2 * H * st + 4 * F) * 4 + bt * st * V * 4 * 3
            train = P * 4 + lora * 16 + train_acts
            tuned = P * b
            runs = len(be.seeds) * len(be.lambdas)
            d_sae = c.sae.expansion * d
            plans.append(StagePlan(stage, pair + max(train, tuned), 4 * 2 * d * d_sae,
                                   runs * lora * 4,
                                   f"{runs} fine-tunes: a float32 HF copy of the base, a "
                                   "rank-16 LoRA with Adam, activations for the backward pass"))
        elif stage == "em_eval":
            e = c.em_eval
            if e.generator.kind == "openai":
                plans.append(StagePlan(stage, 0, 0, 0, "samples from a server: no model loads "
                                                      "here"))
            else:
                s = seq(e.questions) if e.questions == "em_questions" else 64
                judge = 0
                if e.judge.kind == "local":
                    try:
                        jcard = get_card(e.judge.model)
                        judge = card_shape(jcard).n_params * _BYTES[jcard.dtype]
                    except Exception:  # noqa: BLE001 -- a folder: unknown size, not counted
                        judge = 0
                plans.append(StagePlan(stage, pair + judge, kv(B, s + e.max_new_tokens), 0,
                                       f"generation: KV cache of {B} x {s + e.max_new_tokens} "
                                       "tokens" + ("; a local judge model" if judge else "")))
    notes = []
    if not shape.vocab_known:
        notes.append(f"card {card.name!r} gives no vocab_size; {DEFAULT_VOCAB} was assumed "
                     "(add vocab_size to its [architecture])")
    if device == "cuda" and "block_em" in config.stages:
        notes.append("BLOCK-EM's fine-tune also reads the base into CPU RAM (float32) before "
                     "moving it to the GPU")
    disk_b = 4 if card.base.kind in ("wheel", "gguf", "random") else _BYTES[card.dtype]
    loads = any(x.weights for x in plans) or not plans
    wdisk = 0 if not loads else P * disk_b + (0 if org is None else (
        shape.lora_params(org.lora_rank or 32, org.target_modules or ALL_PROJECTIONS) * 4
        if org.kind == "lora" else P * disk_b))
    return RunPlan(card=card.name, dtype=dtype, device=device, n_devices=n_dev,
                   device_bytes=pool, stages=tuple(dataclasses.asdict(x) for x in plans), weights_disk=wdisk, pair_bytes=pair,
                   notes=tuple(notes))


def _pools(config, card, gpus, gpu_mem) -> tuple[str, int, int | None]:
    """``(device, n_devices, bytes per pool)`` the plan is checked against."""
    mem = parse_bytes(gpu_mem) if isinstance(gpu_mem, str) else gpu_mem
    cuda = _cuda_devices()
    if gpus is None:
        gpus = (config.n_devices or card.n_devices) if (cuda or mem) and config.device != "cpu" \
            else 0
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus} must be >= 0 (0 plans for the CPU).")
    if gpus == 0:
        return "cpu", 1, available_ram()
    if mem is None and cuda:
        mem = min(m for _, m in cuda[:gpus])
    return "cuda", gpus, mem


def _cuda_devices() -> list[tuple[str, int]]:
    """``(name, total bytes)`` of each visible CUDA device (none without torch CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 -- a broken driver means: plan for the CPU
        return []


def check_plan(plan: RunPlan) -> None:
    """Raise :class:`~em_interp.errors.ConfigError` naming the first stage that does not fit."""
    miss = plan.misfit()
    if miss is None:
        return
    stage, need = miss
    where = (f"one of {plan.n_devices} GPU(s) with {_fmt(plan.device_bytes)}"
             if plan.device == "cuda" else f"{_fmt(plan.device_bytes)} of available RAM")
    raise ConfigError(f"the memory plan of this run does not fit: stage {stage!r} needs about "
                      f"{_fmt(need)} at its peak, more than {where}. Lower its sizes "
                      "([run].batch_size, the stage's prompt counts), use more or larger GPUs "
                      "(--gpus, --gpu-mem, [run].n_devices), or pass --no-plan-check to run "
                      "anyway (`em-interp plan CONFIG` prints the table).")
