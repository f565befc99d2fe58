"""BLOCK-EM latent discovery (stages 1-3) and the versioned latent-set file.

Given a base model, its misaligned organism, an SAE at the blocking layer and a core prompt set
(BLOCK-EM Sec. 3.1, App. A.2-A.4, B.2):

1. **Activation shifts** (eq. 3-5). ``z_bar_k(x)`` is latent ``k`` averaged over the real tokens
   of prompt ``x``; ``Delta_k = E_x[z_bar_k^mis(x)] - E_x[z_bar_k^base(x)]``. The candidate pool
   is the top ``N+`` latents with ``Delta > 0`` and the top ``N-`` with ``Delta < 0``
   (``N+ = N- = 250``).
2. **Induce-and-repair screen** (eq. 6-7). Steering adds ``alpha * s * d_k / |d_k|`` to the
   hidden state at the SAE's hook at every position, with ``s`` a global scale: the median
   token norm of the base model's hidden states there (system-prompt tokens excluded). With
   ``sigma = sign(Delta_k)``::

       score2(k) = [mis(base; sigma 0.7) - mis(base; 0)] + [mis(org; 0) - mis(org; sigma (-0.4))]

   The shortlist is the top 40 of each sign.
3. **Calibration** (eq. 8-10). Each shortlisted latent is swept over ``alpha in A = [0, 0.05,
   ..., 0.75]`` (induce: ``sigma a`` on the base; repair: ``-sigma a`` on the organism); the
   strongest safe setting is ``alpha*_ind = argmax |alpha|`` with ``incoherence(alpha) <= tau``
   (10%) and likewise ``alpha*_rep``::

       score(k) = [mis(base; alpha*_ind) - mis(base; 0)] + [mis(org; 0) - mis(org; alpha*_rep)]   (9)
       score(k) =                                          mis(org; 0) - mis(org; alpha*_rep)    (10)

   ``K`` is the top ``|K| = 20`` by score (optionally only latents with positive induction, or
   positive induction and repair, App. A.4 footnote 11), split by the sign of ``Delta`` into
   ``K+`` and ``K-``.

``mis`` and ``incoherence`` come from a pluggable :class:`~em_interp.block_em.measures.
BehaviourMeasure`: the AB metric on CPU, judges on generations on a GPU host.

:func:`discover_latents` writes each stage into its folder before the next begins (``stage1/``,
``stage2/``, ``stage3/``; stages 2 and 3 also append one line per latent to
``stage*.partial.jsonl``), and a rerun resumes from what is there; a folder written with other
models, SAE, prompts, measure or settings is refused (:class:`~em_interp.errors.
StoreMismatchError`). The result is a **latent-set file** (:class:`LatentSet`, JSON, versioned):
the SAE's identity and hook, the latents with sign, Delta, scores and best alphas, the steering
scale and the prompts used. It loads back, so discovery can be skipped, and it refuses an SAE or
hook it was not made with (:class:`~em_interp.errors.SAEMismatchError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from em_interp.atomic import atomic_write_bytes
from em_interp.errors import ConfigError, DataError, SAEMismatchError, StoreMismatchError
from em_interp.inputs import describe_model, n_prompts, prompts_hash
from em_interp.results import Result, json_safe

log = logging.getLogger(__name__)

FORMAT = "em-interp-latent-set"
VERSION = 1
VARIANTS = ("full", "plus_only", "minus_only", "shuffled_signs", "random", "top_delta")


# ------------------------------------------------------------------ the latent-set file


def _sae_hook(sae) -> str | None:
    from em_interp.sae.load import sae_hook_name

    return sae_hook_name(sae)


def fingerprint(sae, latents: Sequence[int]) -> list[list[float]]:
    """Per latent: its decoder row's norm and its projections on 4 fixed random unit vectors
    (seed 0), a dtype-robust identity of the decoder directions."""
    w = sae.W_dec.detach()[torch.as_tensor(list(latents), dtype=torch.long,
                                           device=sae.W_dec.device)].float().cpu()
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(w.shape[1], 4, generator=gen)
    r = r / r.norm(dim=0, keepdim=True)
    return torch.cat([w.norm(dim=1, keepdim=True), w @ r], 1).tolist()


@dataclass(frozen=True)
class Latent:
    """One blocked latent."""

    index: int
    sign: int
    """+1: in ``K+`` (its increase is blocked), -1: in ``K-``."""
    delta: float | None = None
    """Stage-1 activation shift ``Delta_k`` (``None`` for a hand-picked latent)."""
    score: float | None = None
    """Stage-3 score (eq. 9 or 10)."""
    induce: float | None = None
    """``mis(base; alpha*_ind) - mis(base; 0)``."""
    repair: float | None = None
    """``mis(org; 0) - mis(org; alpha*_rep)``."""
    alpha_induce: float | None = None
    alpha_repair: float | None = None


@dataclass(frozen=True)
class LatentSet:
    """The signed latent set ``K = K+ u K-`` of one SAE (the latent-set file's content)."""

    hook: str
    """The hook the SAE reads (``blocks.L.hook_resid_post``)."""
    latents: tuple[Latent, ...]
    sae: dict = field(default_factory=dict)
    """The SAE's identity: ``describe_sae`` fields and ``fingerprint`` of the latents."""
    steer_scale: float | None = None
    """``s``, the median token norm used for steering."""
    prompts: dict | None = None
    """The core prompts of stages 1-3 (name, n, hash) and the measure."""
    models: dict | None = None
    """The base and organism the latents were found with."""
    config: dict | None = None
    """The :class:`DiscoveryConfig` used."""
    variant_name: str = "full"
    """Which ablation of the discovered set this is (``full`` for the set itself)."""

    def __post_init__(self):
        if not self.latents:
            raise DataError("a latent set needs at least one latent.")
        idx = [lat.index for lat in self.latents]
        if len(set(idx)) != len(idx):
            raise DataError(f"latent set has repeated latents: {sorted(idx)}.")
        bad = [lat for lat in self.latents if lat.sign not in (1, -1)]
        if bad:
            raise DataError(f"latent signs must be +1 or -1, got {bad[0]}.")

    @property
    def indices(self) -> list[int]:
        return [lat.index for lat in self.latents]

    @property
    def k_plus(self) -> list[int]:
        """Latents whose increase is blocked."""
        return [lat.index for lat in self.latents if lat.sign > 0]

    @property
    def k_minus(self) -> list[int]:
        """Latents whose decrease is blocked."""
        return [lat.index for lat in self.latents if lat.sign < 0]

    @classmethod
    def planted(cls, sae, k_plus: Sequence[int] = (), k_minus: Sequence[int] = (), *,
                hook: str | None = None) -> LatentSet:
        """A latent set chosen by hand (no discovery), for an SAE."""
        hook = hook or _sae_hook(sae)
        if hook is None:
            raise SAEMismatchError("the SAE records no hook; pass hook=.")
        lats = tuple([Latent(int(k), 1) for k in k_plus] + [Latent(int(k), -1) for k in k_minus])
        return cls(hook=hook, latents=lats, sae=_sae_identity(sae, [lat.index for lat in lats]),
                   variant_name="planted")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["latents"] = [dataclasses.asdict(lat) for lat in self.latents]
        return {"format": FORMAT, "version": VERSION, **json_safe(d)}

    def save(self, path: str | Path) -> Path:
        """Write the JSON file atomically."""
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    @classmethod
    def from_dict(cls, doc: dict, where: str = "<dict>") -> LatentSet:
        if doc.get("format") != FORMAT:
            raise DataError(f"{where} is not an em-interp latent-set file (format "
                            f"{doc.get('format')!r}).")
        if doc.get("version") != VERSION:
            raise DataError(f"{where} has latent-set version {doc.get('version')}; this "
                            f"em-interp reads version {VERSION}.")
        try:
            lats = tuple(Latent(**lat) for lat in doc["latents"])
            kw = {k: doc.get(k) for k in ("sae", "steer_scale", "prompts", "models", "config")}
            return cls(hook=doc["hook"], latents=lats, variant_name=doc.get("variant_name",
                                                                            "full"), **kw)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed latent-set file ({e}).") from None

    @classmethod
    def load(cls, path: str | Path) -> LatentSet:
        """Read a latent-set file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"latent-set file {str(path)!r} does not exist.")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} is not JSON ({e}).") from None
        return cls.from_dict(doc, str(path))

    def check(self, sae, hook: str | None = None) -> LatentSet:
        """Raise :class:`SAEMismatchError` unless ``sae`` (reading ``hook``) is the SAE the set
        was made with: same hook, ``d_in``, ``d_sae`` and decoder directions of its latents."""
        hook = hook or _sae_hook(sae)
        if hook != self.hook:
            raise SAEMismatchError(
                f"the latent set was made at {self.hook!r}, but the SAE reads {hook!r}. Use the "
                "SAE the set was discovered with (its hook is in the file), or rerun discovery.")
        want = self.sae or {}
        for key in ("d_in", "d_sae"):
            if key in want and int(want[key]) != int(getattr(sae.cfg, key)):
                raise SAEMismatchError(
                    f"the latent set was made with an SAE of {key}={want[key]}, this SAE has "
                    f"{key}={getattr(sae.cfg, key)}: it is another SAE. Load the SAE named in "
                    f"the file ({want.get('source') or want.get('architecture')}).")
        if max(self.indices) >= int(sae.cfg.d_sae):
            raise SAEMismatchError(f"latent {max(self.indices)} does not exist in an SAE with "
                                   f"d_sae={sae.cfg.d_sae}.")
        fp = want.get("fingerprint")
        if fp:
            got = np.asarray(fingerprint(sae, self.indices))
            ref = np.asarray(fp)
            scale = max(1e-6, float(np.abs(ref).max()))
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=2e-2, atol=2e-3 * scale):
                raise SAEMismatchError(
                    "the SAE's decoder directions for the set's latents differ from those the "
                    f"set was made with (same hook {hook!r} and shape, different weights): it is "
                    "another SAE. Load the SAE named in the file, or rerun discovery.")
        return self

    def variant(self, name: str, *, seed: int = 0, shifts=None) -> LatentSet:
        """An ablation of the set (BLOCK-EM App. D.1, E.1).

        ``full`` (itself), ``plus_only`` (``K+``), ``minus_only`` (``K-``), ``shuffled_signs``
        (the same latents, signs permuted with ``seed``), ``random`` (as many random latents with
        the same sign counts; needs ``d_sae`` in the file), ``top_delta`` (the ``|K|`` largest
        ``|Delta|`` of stage 1, signed by ``Delta``; needs ``shifts``).
        """
        if name not in VARIANTS:
            raise ConfigError(f"latent-set variant {name!r} is not one of {list(VARIANTS)}.")
        lats = list(self.latents)
        rng = random.Random(seed)
        if name == "full":
            return self
        if name in ("plus_only", "minus_only"):
            keep = [lat for lat in lats if (lat.sign > 0) == (name == "plus_only")]
            if not keep:
                raise DataError(f"variant {name!r}: the set has no latent of that sign.")
            lats = keep
        elif name == "shuffled_signs":
            signs = [lat.sign for lat in lats]
            rng.shuffle(signs)
            lats = [dataclasses.replace(lat, sign=s) for lat, s in zip(lats, signs, strict=True)]
        elif name == "random":
            d_sae = (self.sae or {}).get("d_sae")
            if d_sae is None:
                raise DataError("variant 'random' needs the SAE's d_sae in the latent set.")
            picks = rng.sample([k for k in range(int(d_sae)) if k not in set(self.indices)],
                               len(lats))
            lats = [Latent(k, lat.sign) for k, lat in zip(picks, lats, strict=True)]
        else:  # top_delta
            if shifts is None:
                raise ConfigError("variant 'top_delta' needs shifts= (stage-1 ActivationShifts).")
            delta = shifts.delta.float()
            top = torch.topk(delta.abs(), len(lats)).indices.tolist()
            lats = [Latent(int(k), 1 if float(delta[k]) > 0 else -1, float(delta[k]))
                    for k in top]
        fp = dict(self.sae or {})
        fp.pop("fingerprint", None)  # other latents: the fingerprint no longer applies
        return dataclasses.replace(self, latents=tuple(lats), sae=fp,
                                   variant_name=name if name != "random" else f"random@{seed}")

    @property
    def df(self) -> pd.DataFrame:
        return pd.DataFrame([dataclasses.asdict(lat) for lat in self.latents])


def _sae_identity(sae, latents: Sequence[int], source: str | None = None) -> dict:
    from em_interp.sae.load import describe_sae

    d = describe_sae(sae)
    d.pop("em_interp", None)
    return {**d, "source": source, "fingerprint": fingerprint(sae, latents)}


# ------------------------------------------------------------------ stage 1


def _user_start(tokenizer, text: str, first_user: str) -> int:
    """Number of tokens of ``text`` before the first user message's content."""
    pos = text.find(first_user) if first_user else 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        offs = offs[1:]
    return sum(1 for s, _ in offs if s < max(pos, 0))


@torch.no_grad()
def steer_scale(model, hook: str, prompts, *, batch_size: int = 8) -> float:
    """BLOCK-EM's global steering scale ``s`` (App. A.3): the median of the base model's
    token norms ``|h_t|`` at ``hook`` over the prompts' real tokens from the first user message
    on (the system prompt and chat header before it are excluded)."""
    from em_interp.inputs import as_prompt_list
    from em_interp.sae.encode import hook_activation_batches

    items = as_prompt_list(prompts)
    tok = model.tokenizer
    norms = []
    for start, _, mask, acts in hook_activation_batches(model, hook, items,
                                                         batch_size=batch_size):
        for i in range(acts.shape[0]):
            p = items[start + i]
            conv = [{"role": "user", "content": p}] if isinstance(p, str) else p
            first = next((m["content"] for m in conv if m["role"] == "user"), "")
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            real = acts[i][mask[i].bool()]
            norms.append(real[_user_start(tok, text, first):].float().norm(dim=-1).cpu())
    return float(torch.cat(norms).median())


@dataclass(frozen=True)
class ActivationShifts(Result):
    """Stage 1: per-latent shift ``Delta_k`` of the token-averaged latents (eq. 4)."""

    kind: ClassVar[str] = "block_em_shifts"

    delta: Float[torch.Tensor, " d_sae"]
    mean_base: Float[torch.Tensor, " d_sae"]
    """``E_x z_bar^base``."""
    mean_organism: Float[torch.Tensor, " d_sae"]
    hook: str = ""
    n_prompts: int = 0
    steer_scale: float | None = None

    def candidates(self, n_plus: int, n_minus: int | None = None) -> list[tuple[int, int, float]]:
        """``(latent, sign, Delta)`` of the top ``n_plus`` positive and ``n_minus`` negative
        shifts (eq. 5), largest first."""
        n_minus = n_plus if n_minus is None else n_minus
        d = self.delta.float()
        out = []
        for sign, n in ((1, n_plus), (-1, n_minus)):
            vals = sign * d
            k = min(n, int((vals > 0).sum()))
            if k:
                top = torch.topk(vals, k)
                out += [(int(i), sign, float(d[i])) for i in top.indices]
        return out

    @property
    def df(self) -> pd.DataFrame:
        return pd.DataFrame({"latent": np.arange(self.delta.numel()),
                             "delta": self.delta.float().numpy(),
                             "mean_base": self.mean_base.float().numpy(),
                             "mean_organism": self.mean_organism.float().numpy()})

    def to_dict(self) -> dict:
        d = self.delta.float()
        return {"hook": self.hook, "n_prompts": self.n_prompts, "steer_scale": self.steer_scale,
                "n_positive": int((d > 0).sum()), "n_negative": int((d < 0).sum()),
                "max_delta": float(d.max()), "min_delta": float(d.min())}

    def figure(self, n: int = 20, **kwargs):
        """The ``n`` largest positive and negative shifts."""
        import plotly.graph_objects as go

        rows = self.candidates(n)
        rows.sort(key=lambda r: r[2])
        fig = go.Figure(go.Bar(x=[r[2] for r in rows], y=[f"latent {r[0]}" for r in rows],
                               orientation="h",
                               marker_color=["#d62728" if r[1] > 0 else "#1f77b4" for r in rows]))
        fig.update_layout(template="plotly_white", title=kwargs.get(
            "title", f"Stage 1: SAE latent shifts organism - base at {self.hook}"),
            xaxis_title="Delta_k = E[z_bar organism] - E[z_bar base]", yaxis_title="latent",
            height=300 + 12 * len(rows))
        return fig


@torch.no_grad()
def activation_shifts(base, organism, sae, prompts, *, batch_size: int = 8,
                      scale_prompts=None, progress: bool = True) -> ActivationShifts:
    """Stage 1: ``Delta_k`` over ``prompts`` (and the steering scale ``s`` on the base).

    Args:
        base: the base model (``Loaded``).
        organism: the misaligned model (``Loaded``), same architecture.
        sae: the SAE at the blocking layer (checked against both models).
        prompts: the core prompts.
        batch_size: prompts per forward.
        scale_prompts: prompts for ``s`` (default ``prompts``).
        progress: show progress bars.
    """
    from em_interp.sae.encode import encode
    from em_interp.sae.load import check_sae

    hook = check_sae(base, sae)
    check_sae(organism, sae)
    zb = encode(base, sae, prompts, "mean", batch_size=batch_size, progress=progress)
    zm = encode(organism, sae, prompts, "mean", batch_size=batch_size, progress=progress)
    s = steer_scale(base, hook, scale_prompts if scale_prompts is not None else prompts,
                    batch_size=batch_size)
    return ActivationShifts(delta=zm.mean(0) - zb.mean(0), mean_base=zb.mean(0),
                            mean_organism=zm.mean(0), hook=hook, n_prompts=zb.shape[0],
                            steer_scale=s)


# ------------------------------------------------------------------ stages 2 and 3


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of stages 1-3 (defaults: BLOCK-EM Table 1, App. B.2)."""

    n_candidates: int = 250
    """``N+ = N-``: candidates of each sign from stage 1."""
    alpha_induce: float = 0.7
    """Stage-2 induction strength (times ``sign(Delta)``)."""
    alpha_repair: float = -0.4
    """Stage-2 repair strength (times ``sign(Delta)``)."""
    shortlist: int = 40
    """Stage-2 shortlist per sign."""
    grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(16))
    """Stage-3 strengths ``A`` (magnitudes; 0 is the unsteered model)."""
    tau: float = 0.10
    """Incoherence budget."""
    n_latents: int = 20
    """``|K|``."""
    score: Literal["induce_repair", "repair"] = "induce_repair"
    """Stage-3 ranking: eq. 9 or eq. 10."""
    require: Literal["none", "induction", "both"] = "induction"
    """Keep only latents with positive induction (A.4), or positive induction and repair
    (footnote 11), before ranking."""
    batch_size: int = 8
    """Prompts per forward in stage 1 and the steering scale."""
    steer_scale: float | None = None
    """``s``; ``None``: the median token norm (:func:`steer_scale`)."""

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(float(a) for a in self.grid))
        for name in ("n_candidates", "shortlist", "n_latents", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DiscoveryConfig.{name} must be an integer >= 1.")
        if not self.grid or any(a < 0 for a in self.grid) or 0.0 not in self.grid:
            raise ConfigError("DiscoveryConfig.grid must hold non-negative magnitudes "
                              "including 0.")
        if not 0 <= self.tau <= 1:
            raise ConfigError(f"DiscoveryConfig.tau must be in [0, 1], got {self.tau}.")
        if self.score not in ("induce_repair", "repair") or self.require not in (
                "none", "induction", "both"):
            raise ConfigError("DiscoveryConfig.score must be 'induce_repair' or 'repair'; "
                              "require 'none', 'induction' or 'both'.")

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))


def _steer(model, hook: str, sae, k: int, alpha: float, s: float):
    from em_interp.behaviour.interventions import steer
    from em_interp.sae.encode import decoder_directions

    d = decoder_directions(sae, [k], normalize=True)[0]
    return steer(model, hook, d, alpha * s)


def _read_partial(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[int(row["latent"])] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interruption
    return done


def _append(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(json_safe(row)) + "\n")


@dataclass(frozen=True)
class StageTable(Result):
    """A stage's table (stage 2: one row per candidate; stage 3: one row per latent, with the
    sweep in ``sweep``)."""

    kind: ClassVar[str] = "block_em_stage"

    table: Any
    """The stage's DataFrame: one row per candidate (stage 2) or per shortlisted latent
    (stage 3)."""
    sweep: Any = None
    """Stage 3: one row per (latent, direction, alpha) of the calibration sweeps."""
    stage: int = 2

    @property
    def df(self) -> pd.DataFrame:
        return self.table

    def to_dict(self) -> dict:
        t = self.table
        return {"stage": self.stage, "n": len(t),
                "best": t.sort_values("score", ascending=False).head(5)[
                    ["latent", "sign", "score"]].to_dict("records") if len(t) else []}

    def figure(self, **kwargs):
        """Induction against repair per latent (stage 2 or 3)."""
        import plotly.graph_objects as go

        t = self.table
        fig = go.Figure(go.Scatter(
            x=t["induce"], y=t["repair"], mode="markers", text=[f"latent {k}" for k in t.latent],
            marker={"color": ["#d62728" if s > 0 else "#1f77b4" for s in t.sign]}))
        fig.update_layout(template="plotly_white", title=kwargs.get(
            "title", f"Stage {self.stage}: induction vs repair (red: K+, blue: K-)"),
            xaxis_title="induction: mis(base; steered) - mis(base)",
            yaxis_title="repair: mis(organism) - mis(organism; steered)")
        return fig


def screen(base, organism, sae, candidates, measure, s: float, cfg: DiscoveryConfig, *,
           partial: Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Stage 2: eq. 7 for each ``(latent, sign, Delta)`` candidate (rows appended to
    ``partial`` as they finish, and skipped when already there)."""
    hook = _sae_hook(sae)
    done = _read_partial(partial) if partial is not None else {}
    b0, m0 = measure(base), measure(organism)
    rows = []
    for k, sign, delta in tqdm(candidates, desc="stage 2: induce/repair", disable=not progress):
        if k in done:
            rows.append(done[k])
            continue
        bi = measure(base, _steer(base, hook, sae, k, sign * cfg.alpha_induce, s))
        mr = measure(organism, _steer(organism, hook, sae, k, sign * cfg.alpha_repair, s))
        row = {"latent": k, "sign": sign, "delta": delta,
               "induce": bi.misalign - b0.misalign, "repair": m0.misalign - mr.misalign,
               "incoherence_induce": bi.incoherence, "incoherence_repair": mr.incoherence}
        row["score"] = row["induce"] + row["repair"]
        rows.append(row)
        if partial is not None:
            _append(partial, row)
    return pd.DataFrame(rows)


def shortlist(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The top ``n`` stage-2 scores of each sign."""
    parts = [table[table.sign == s].sort_values("score", ascending=False).head(n)
             for s in (1, -1)]
    return pd.concat(parts, ignore_index=True)


def calibrate(base, organism, sae, latents: pd.DataFrame, measure, s: float,
              cfg: DiscoveryConfig, *, partial: Path | None = None,
              progress: bool = True) -> StageTable:
    """Stage 3: per-latent alpha sweeps under the incoherence budget (eq. 8-10).

    Returns:
        The stage-3 :class:`StageTable`: ``table`` has one row per latent (``latent``, ``sign``,
        ``delta``, ``alpha_induce``, ``alpha_repair``, ``induce``, ``repair``, ``score``),
        ``sweep`` one per (latent, direction, alpha) (``misalign``, ``incoherence``).
    """
    hook = _sae_hook(sae)
    done = _read_partial(partial) if partial is not None else {}
    b0, m0 = measure(base), measure(organism)
    summary, sweep = [], []
    for row in tqdm(latents.itertuples(index=False), total=len(latents),
                    desc="stage 3: alpha sweeps", disable=not progress):
        k, sign = int(row.latent), int(row.sign)
        if k in done:
            summary.append({x: v for x, v in done[k].items() if x != "sweep"})
            sweep += done[k]["sweep"]
            continue
        points = []
        for direction, model, ref, mult in (("induce", base, b0, sign),
                                            ("repair", organism, m0, -sign)):
            best = (0.0, ref)
            for a in cfg.grid:
                if a == 0:
                    beh = ref
                else:
                    beh = measure(model, _steer(model, hook, sae, k, mult * a, s))
                points.append({"latent": k, "direction": direction, "alpha": mult * a,
                               "misalign": beh.misalign, "incoherence": beh.incoherence})
                if beh.incoherence <= cfg.tau and a >= abs(best[0]):
                    best = (mult * a, beh)
            if direction == "induce":
                a_ind, ind = best[0], best[1].misalign - b0.misalign
            else:
                a_rep, rep = best[0], m0.misalign - best[1].misalign
        score = rep if cfg.score == "repair" else ind + rep
        out = {"latent": k, "sign": sign, "delta": float(row.delta), "alpha_induce": a_ind,
               "alpha_repair": a_rep, "induce": ind, "repair": rep, "score": score}
        summary.append(out)
        sweep += points
        if partial is not None:
            _append(partial, {**out, "sweep": points})
    return StageTable(table=pd.DataFrame(summary), sweep=pd.DataFrame(sweep), stage=3)


def select(summary: pd.DataFrame, cfg: DiscoveryConfig) -> pd.DataFrame:
    """The final ``K``: the top ``n_latents`` by score among the latents ``cfg.require`` keeps."""
    t = summary
    if cfg.require in ("induction", "both"):
        t = t[t.induce > 0]
    if cfg.require == "both":
        t = t[t.repair > 0]
    if t.empty:
        raise DataError(f"no shortlisted latent passes require={cfg.require!r} (positive "
                        "induction/repair under the budget). Use a larger shortlist or grid, a "
                        "more sensitive measure, or DiscoveryConfig(require='none').")
    if len(t) < cfg.n_latents:
        log.warning("only %d latents pass require=%r; |K| = %d instead of %d", len(t),
                    cfg.require, len(t), cfg.n_latents)
    return t.sort_values("score", ascending=False).head(cfg.n_latents)


# ------------------------------------------------------------------ the whole pipeline


@dataclass(frozen=True)
class DiscoveryResult(Result):
    """Stages 1-3 and the latent set they selected."""

    kind: ClassVar[str] = "block_em_discovery"

    shifts: ActivationShifts
    stage2: StageTable
    stage3: StageTable
    latent_set: dict
    """The :class:`LatentSet` as a dict (``LatentSet.from_dict``)."""

    @property
    def latents(self) -> LatentSet:
        return LatentSet.from_dict(self.latent_set)

    @property
    def df(self) -> pd.DataFrame:
        return self.latents.df

    def to_dict(self) -> dict:
        ls = self.latents
        return {"hook": ls.hook, "k_plus": ls.k_plus, "k_minus": ls.k_minus,
                "steer_scale": ls.steer_scale}

    def figure(self, **kwargs):
        """Stage-3 score of each selected latent, coloured by sign."""
        import plotly.graph_objects as go

        d = self.df.sort_values("score")
        fig = go.Figure(go.Bar(x=d["score"], y=[f"latent {k}" for k in d["index"]],
                               orientation="h",
                               marker_color=["#d62728" if s > 0 else "#1f77b4" for s in d.sign]))
        fig.update_layout(template="plotly_white", title=kwargs.get(
            "title", "BLOCK-EM latent set (red: K+, blue: K-)"), xaxis_title="stage-3 score",
            yaxis_title="latent")
        return fig


def _identity(base, organism, sae, prompts, measure, cfg: DiscoveryConfig) -> dict:
    w = sae.W_dec.detach().float().cpu().numpy()
    return json_safe({"base": describe_model(base), "organism": describe_model(organism),
                      "sae": {"hook": _sae_hook(sae), "d_in": int(sae.cfg.d_in),
                              "d_sae": int(sae.cfg.d_sae),
                              "w_dec_sha256": hashlib.sha256(w.tobytes()).hexdigest()[:16]},
                      "prompts": {"n": n_prompts(prompts), "hash": prompts_hash(prompts)},
                      "measure": measure.describe(), "config": cfg.to_dict()})


def discover_latents(base, organism, sae, prompts, measure, out_dir: str | Path,
             cfg: DiscoveryConfig | None = None, *, scale_prompts=None,
             sae_source: str | None = None, progress: bool = True) -> DiscoveryResult:
    """Run stages 1-3, writing each stage to ``out_dir`` before the next; resume a rerun.

    Args:
        base: the base model (``Loaded``).
        organism: the misaligned organism (``Loaded``; e.g. ``load_pair(card)``).
        sae: the SAE at the blocking layer.
        prompts: the core prompts of stage 1 (e.g. ``load_prompt_set("em_questions")``).
        measure: the behaviour measure of stages 2-3, bound to its prompts (e.g.
            ``ABBehaviour(load_prompt_set("ab_pairs").train())``).
        out_dir: the discovery folder (``manifest.json``, ``stage1/``, ``stage2/``, ``stage3/``,
            ``latent_set.json``).
        cfg: the :class:`DiscoveryConfig`.
        scale_prompts: prompts for the steering scale ``s`` (default ``prompts``).
        sae_source: where the SAE came from (path or release), recorded in the latent set.
        progress: show progress bars.

    Raises:
        StoreMismatchError: ``out_dir`` holds a discovery made with other inputs or settings.
    """
    cfg = cfg or DiscoveryConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = _identity(base, organism, sae, prompts, measure, cfg)
    man = out / "manifest.json"
    if man.is_file():
        old = json.loads(man.read_text())
        if old != ident:
            diff = sorted(k for k in ident if old.get(k) != ident[k])
            raise StoreMismatchError(
                f"{str(out)!r} holds a discovery made with other {', '.join(diff)}; pass a new "
                "out_dir, or delete the folder to start again.")
    else:
        atomic_write_bytes(man, json.dumps(ident, indent=1).encode())
    if (out / "stage1" / "result.json").is_file():
        shifts = ActivationShifts.load(out / "stage1")
    else:
        shifts = activation_shifts(base, organism, sae, prompts, batch_size=cfg.batch_size,
                                   scale_prompts=scale_prompts, progress=progress)
        if cfg.steer_scale is not None:
            shifts = dataclasses.replace(shifts, steer_scale=float(cfg.steer_scale))
        shifts.save(out / "stage1")
    s = float(shifts.steer_scale)
    if (out / "stage2" / "result.json").is_file():
        st2 = StageTable.load(out / "stage2")
    else:
        cands = shifts.candidates(cfg.n_candidates)
        if not cands:
            raise DataError("stage 1 found no latent whose activation shifts; are base and "
                            "organism the same model?")
        st2 = StageTable(table=screen(base, organism, sae, cands, measure, s, cfg,
                                      partial=out / "stage2.partial.jsonl", progress=progress),
                         stage=2)
        st2.save(out / "stage2")
    if (out / "stage3" / "result.json").is_file():
        st3 = StageTable.load(out / "stage3")
    else:
        st3 = calibrate(base, organism, sae, shortlist(st2.table, cfg.shortlist), measure, s,
                        cfg, partial=out / "stage3.partial.jsonl", progress=progress)
        st3.save(out / "stage3")
    chosen = select(st3.table, cfg)
    lats = tuple(Latent(index=int(r.latent), sign=int(r.sign), delta=float(r.delta),
                        score=float(r.score), induce=float(r.induce), repair=float(r.repair),
                        alpha_induce=float(r.alpha_induce), alpha_repair=float(r.alpha_repair))
                 for r in chosen.itertuples(index=False))
    ls = LatentSet(hook=shifts.hook, latents=lats,
                   sae=_sae_identity(sae, [lat.index for lat in lats], sae_source),
                   steer_scale=s, prompts={"core": ident["prompts"], "measure": ident["measure"]},
                   models={"base": ident["base"], "organism": ident["organism"]},
                   config=cfg.to_dict())
    ls.save(out / "latent_set.json")
    return DiscoveryResult(shifts=shifts, stage2=st2, stage3=st3, latent_set=ls.to_dict())


__all__ = [
    "ActivationShifts",
    "DiscoveryConfig",
    "DiscoveryResult",
    "Latent",
    "LatentSet",
    "StageTable",
    "VARIANTS",
    "activation_shifts",
    "calibrate",
    "discover_latents",
    "fingerprint",
    "screen",
    "select",
    "shortlist",
    "steer_scale",
]
