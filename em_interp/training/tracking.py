"""LoRA direction tracking: how the adapter's direction rotates across training checkpoints.

For rank-1 adapters the EM model-organism work (Turner et al., "Model Organisms for Emergent
Misalignment", and the short EM notes) reports a "phase change" around step 180 of training:
the LoRA ``B`` vector (and ``A``) rotates sharply over a few steps, while the loss barely moves.
:func:`lora_directions` reads every ``checkpoint-<step>/`` of a :func:`em_interp.training.lora.train_lora`
run and, for each adapted module and factor ``v`` (the ``A`` and ``B`` vectors; the flattened
factors for rank > 1), computes::

    cos_prev(t)  = <v_t, v_prev> / (|v_t| |v_prev|)     (successive checkpoints)
    cos_final(t) = <v_t, v_T>    / (|v_t| |v_T|)        (against the last checkpoint)

The rotation step is the checkpoint where the mean of ``cos_prev`` over modules and factors is
lowest: where the direction changes most. One call, one figure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from em_interp.errors import DataError
from em_interp.results import Result

_MODULE = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.\w+)?\.weight$")


def _checkpoint_dirs(run) -> list[tuple[int, Path]]:
    if hasattr(run, "run_dir"):  # a LoRATrainResult
        run = Path(run.run_dir)
    run = Path(run)
    found = []
    for p in run.iterdir() if run.is_dir() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "adapter_model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    if not found:
        raise DataError(f"{str(run)!r} holds no checkpoint-<step>/adapter_model.safetensors; "
                        "train with LoRATrainConfig(save_every=...) to save checkpoints.")
    return sorted(found)


def _factors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "adapter_model.safetensors")).items():
        m = _MODULE.match(key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = t.float().flatten()
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return math.nan if na == 0 or nb == 0 else float(a @ b) / (na * nb)


@dataclass(frozen=True)
class LoRADirections(Result):
    """Cosines of each module's LoRA ``A`` and ``B`` vectors between successive checkpoints."""

    kind: ClassVar[str] = "lora_directions"

    table: Any
    """Tidy DataFrame: ``module, factor (A/B), step, prev_step, cos_prev, cos_final, norm``."""
    rotation_step: int | None
    """The step (checkpoint) where the mean successive cosine over modules and factors is
    lowest: where the direction rotates most."""
    rank: int = 1

    @property
    def df(self):
        return self.table

    def to_dict(self) -> dict:
        df = self.table
        valid = df.dropna(subset=["cos_prev"])
        return {"rotation_step": self.rotation_step, "rank": self.rank,
                "n_modules": int(df.module.nunique()), "n_checkpoints": int(df.step.nunique()),
                "min_cos_prev": float(valid.cos_prev.min()) if len(valid) else None}

    def figure(self, **kwargs):
        """Successive-checkpoint cosine of ``A`` and ``B`` per module against the step."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for (module, factor), g in self.table.groupby(["module", "factor"], sort=True):
            fig.add_trace(go.Scatter(x=g.step, y=g.cos_prev, mode="lines+markers",
                                     name=f"{module} {factor}"))
        if self.rotation_step is not None:
            fig.add_vline(x=self.rotation_step, line_dash="dash",
                          annotation_text=f"largest rotation: step {self.rotation_step}")
        fig.update_layout(template="plotly_white", title=kwargs.get(
            "title", "LoRA direction between successive checkpoints"),
            xaxis_title="optimizer step", yaxis_title="cos(v_t, v_{t-1})")
        return fig


def lora_directions(run) -> LoRADirections:
    """Track the LoRA direction of every adapted module across a run's checkpoints.

    Args:
        run: a run folder of :func:`train_lora` (its ``checkpoint-<step>/`` folders) or the
            :class:`LoRATrainResult`.

    Returns:
        :class:`LoRADirections`: for each module and factor, ``cos(v_t, v_prev)`` between
        successive checkpoints and ``cos(v_t, v_final)``; the step of the largest rotation.
        For rank 1 these are the A and B vectors; for rank r the flattened factors.
    """
    import pandas as pd

    ckpts = _checkpoint_dirs(run)
    facs = [(step, _factors(p)) for step, p in ckpts]
    if not facs[0][1]:
        raise DataError(f"{ckpts[0][1]} holds no LoRA factors (lora_A / lora_B weights).")
    final = facs[-1][1]
    rows = []
    acfg = ckpts[-1][1] / "adapter_config.json"
    rank = int(json.loads(acfg.read_text()).get("r", 1)) if acfg.is_file() else 1
    for i, (step, f) in enumerate(facs):
        for module, ab in f.items():
            for factor in ("A", "B"):
                v = ab[factor]
                prev = facs[i - 1][1][module][factor] if i else None
                rows.append({"module": module, "factor": factor, "step": step,
                             "prev_step": facs[i - 1][0] if i else None,
                             "cos_prev": _cos(v, prev) if prev is not None else math.nan,
                             "cos_final": _cos(v, final[module][factor]),
                             "norm": float(v.norm())})
    df = pd.DataFrame(rows)
    mean = df.dropna(subset=["cos_prev"]).groupby("step").cos_prev.mean()
    return LoRADirections(table=df, rotation_step=int(mean.idxmin()) if len(mean) else None,
                          rank=rank)


__all__ = ["LoRADirections", "lora_directions"]
