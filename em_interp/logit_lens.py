"""Logit lens: read the residual stream after every block through the model's own unembedding.

For block ``l`` and position ``p`` the lens logits are

    lens_l = unembed(ln_final(resid_post_l[p]))

i.e. what the model would predict if it stopped after block ``l``. The last block's lens
equals the model's logits exactly. The Qwen paper (Sec. on logit lens) tracks a refusal token
against a compliance token this way; pass the tokens you care about as ``tokens`` (strings are
looked up in the tokenizer, never hard-coded ids).

Only the residual at the read position is kept per layer (a hook slices it during the
forward), so memory is ``n_layers x batch x d_model`` whatever the prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float

from em_interp.hooks import attached, resid_post
from em_interp.results import Result


@dataclass(frozen=True)
class LogitLensResult(Result):
    """Per-layer probabilities of tracked tokens at one position of each prompt."""

    kind = "logit_lens"

    probs: Float[torch.Tensor, "layer batch token"]
    """Softmax probability of each tracked token, per layer and prompt."""
    top_ids: torch.Tensor
    """``[layer, batch]`` id of the most likely token per layer."""
    top_probs: Float[torch.Tensor, "layer batch"]
    token_ids: list[int]
    token_strs: list[str]
    top_strs: list[list[str]]
    """``[layer][batch]`` decoded most likely token."""

    @property
    def df(self) -> pd.DataFrame:
        """Tidy table: one row per (layer, prompt, tracked token)."""
        n_layers, batch, n_tok = self.probs.shape
        rows = []
        for layer in range(n_layers):
            for b in range(batch):
                for t in range(n_tok):
                    rows.append({"layer": layer, "prompt": b, "token": self.token_strs[t],
                                 "token_id": self.token_ids[t],
                                 "prob": float(self.probs[layer, b, t]),
                                 "top_token": self.top_strs[layer][b],
                                 "top_prob": float(self.top_probs[layer, b])})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """Final-layer and peak probability of each tracked token, averaged over prompts."""
        mean = self.probs.mean(1)  # [layer, token]
        return {"n_layers": self.probs.shape[0], "n_prompts": self.probs.shape[1],
                "tokens": {s: {"final_prob": float(mean[-1, t]),
                               "peak_prob": float(mean[:, t].max()),
                               "peak_layer": int(mean[:, t].argmax())}
                           for t, s in enumerate(self.token_strs)}}

    def figure(self, prompt: int = 0, title: str | None = None):
        """Plotly line chart: probability of each tracked token across layers for one prompt."""
        import plotly.graph_objects as go

        fig = go.Figure()
        layers = list(range(self.probs.shape[0]))
        for t, s in enumerate(self.token_strs):
            fig.add_trace(go.Scatter(x=layers, y=self.probs[:, prompt, t].tolist(),
                                     mode="lines+markers", name=repr(s)))
        fig.add_trace(go.Scatter(
            x=layers, y=self.top_probs[:, prompt].tolist(), mode="markers", name="top-1",
            text=[self.top_strs[layer][prompt] for layer in layers],
            hovertemplate="layer %{x}: %{text} (%{y:.3f})", marker={"symbol": "x"}))
        fig.update_layout(title=title or "Logit lens", xaxis_title="layer (resid_post, 0-indexed)",
                          yaxis_title="probability", template="plotly_white")
        return fig


def token_id(tokenizer, text: str) -> int:
    """The id of the first token of ``text`` (no special tokens), looked up, never typed in."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{text!r} encodes to no tokens")
    return ids[0]


@torch.no_grad()
def logit_lens(
    model,
    tokens: torch.Tensor,
    track: Sequence[str | int],
    *,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    position: int = -1,
) -> LogitLensResult:
    """Run the logit lens at ``position`` of every prompt in ``tokens``.

    ``track`` lists tokens (strings, looked up with ``tokenizer``, or ids) whose probability is
    followed across layers. Use left-padded batches (:meth:`Loaded.chat_tokens`) so that
    ``position=-1`` is every prompt's last token.
    """
    tokenizer = tokenizer or model.tokenizer
    ids = [t if isinstance(t, int) else token_id(tokenizer, t) for t in track]
    n_layers = model.cfg.n_layers
    grabbed: dict[int, torch.Tensor] = {}

    def grab(layer):
        def hook(act, hook):
            grabbed[layer] = act[:, position].detach()
        return hook

    fwd = [(resid_post(layer), grab(layer)) for layer in range(n_layers)]
    with attached(model, fwd):
        model(tokens, attention_mask=attention_mask, return_type=None)
    last_dev = model.unembed.W_U.device
    resid = torch.stack([grabbed[layer].to(last_dev) for layer in range(n_layers)])
    logits = model.unembed(model.ln_final(resid)).float()  # [layer, batch, vocab]
    probs = logits.softmax(-1)
    top_probs, top_ids = probs.max(-1)
    decode = tokenizer.decode
    return LogitLensResult(
        probs=probs[..., ids].cpu(),
        top_ids=top_ids.cpu(),
        top_probs=top_probs.cpu(),
        token_ids=ids,
        token_strs=[decode([i]) for i in ids],
        top_strs=[[decode([int(i)]) for i in row] for row in top_ids],
    )
