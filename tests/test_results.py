"""The result contract: save/load round-trips every field kind through JSON + safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from em_interp.errors import DataError
from em_interp.results import Result, json_safe, load_result


@dataclass(frozen=True)
class Inner(Result):
    kind = "inner"
    values: torch.Tensor
    note: str = ""

    @property
    def df(self):
        return pd.DataFrame({"v": self.values.tolist()})

    def figure(self):
        import plotly.graph_objects as go

        return go.Figure(go.Scatter(y=self.values.tolist()))

    def to_dict(self):
        return {"mean": float(self.values.mean())}


@dataclass(frozen=True)
class Outer(Result):
    kind = "outer"
    acts: torch.Tensor
    arr: np.ndarray
    table: pd.DataFrame
    named: dict
    heads: tuple[tuple[int, int], ...] = ()
    layers: list = field(default_factory=list)
    inner: Inner | None = None
    score: float = float("nan")

    @property
    def df(self):
        return self.table

    def to_dict(self):
        return {"score": self.score, "n": int(self.acts.shape[0])}


def _outer():
    return Outer(acts=torch.randn(3, 4, dtype=torch.bfloat16), arr=np.arange(6.0).reshape(2, 3),
                 table=pd.DataFrame({"layer": [0, 1], "name": ["a", "b"], "x": [0.5, 1.5],
                                     "ok": [True, False]}),
                 named={"dirs": {"a": 1}, "k": [1, 2]}, heads=((62, 12), (62, 28)),
                 layers=[1, 2], inner=Inner(values=torch.arange(5.0), note="hi"))


def test_round_trip_keeps_every_field(tmp_path):
    r = _outer()
    r.save(tmp_path / "r")
    back = Outer.load(tmp_path / "r")
    assert torch.equal(back.acts, r.acts) and back.acts.dtype == torch.bfloat16
    assert isinstance(back.arr, np.ndarray) and np.array_equal(back.arr, r.arr)
    pd.testing.assert_frame_equal(back.table, r.table)
    assert back.named == r.named and back.heads == ((62, 12), (62, 28)) and back.layers == [1, 2]
    assert torch.equal(back.inner.values, r.inner.values) and back.inner.note == "hi"
    assert back.score is None  # NaN is stored as JSON null
    assert isinstance(load_result(tmp_path / "r"), Outer)
    doc = json.loads((tmp_path / "r" / "result.json").read_text())
    assert doc["summary"] == {"score": None, "n": 3}
    assert not list(tmp_path.glob("*.pkl")) and not list((tmp_path / "r").rglob("*.pkl"))


def test_load_refuses_other_types_and_non_results(tmp_path):
    Inner(values=torch.ones(2)).save(tmp_path / "i")
    with pytest.raises(DataError, match="not a .*Outer"):
        Outer.load(tmp_path / "i")
    with pytest.raises(DataError, match="no result.json"):
        load_result(tmp_path)


def test_json_safe_converts_numbers():
    out = json_safe({"a": np.float32(1.5), "b": torch.tensor(2), "c": (1, float("inf")),
                     "d": np.array([1, 2])})
    assert out == {"a": 1.5, "b": 2, "c": [1, None], "d": [1, 2]}
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError):
        json_safe(object())


def test_logit_lens_result_follows_the_contract(tmp_path, tiny_llama):
    from em_interp.readouts.logit_lens import LogitLensResult, logit_lens

    ct = tiny_llama.chat_tokens(["hi", "hello there"])
    res = logit_lens(tiny_llama.model, ct.tokens, [ord("a"), ord("b")],
                     attention_mask=ct.attention_mask)
    res.save(tmp_path / "ll")
    back = LogitLensResult.load(tmp_path / "ll")
    assert torch.equal(back.probs, res.probs) and back.top_strs == res.top_strs
    assert back.to_dict() == res.to_dict()
    json.dumps(res.to_dict(), allow_nan=False)
