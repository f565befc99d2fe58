"""Orthogonal Procrustes alignment of two models' activation spaces, for ``n < d`` too.

The Qwen paper (Sec. III.B, Experiment 2) brings two models (base and organism) into one
coordinate system through the orthogonal ``R`` minimising
``||H_src R - H_dst||_F`` over *anchor* activations ``H_src, H_dst`` ``[n, d]`` (the same prompts
through both models). With ``M = H_src^T H_dst = U S V^T``, ``R = U V^T``. At the paper's scale
``n < d`` (6,000 anchors, ``d_mlp = 27648``) ``M`` has rank ``r <= n``, so ``R`` is fixed only on
the ``r``-dimensional row space of the anchors; it is computed without any ``d x d`` matrix:

* QR of ``H_src^T = Q_a R_a`` and ``H_dst^T = Q_b R_b`` gives ``M = Q_a (R_a R_b^T) Q_b^T``, and
  the SVD of the ``n x n`` core ``R_a R_b^T = P S Q^T`` gives ``U = Q_a P``, ``V = Q_b Q``
  (``d x r``, orthonormal columns);
* the minimiser is ``R = U V^T + (any orthogonal map of span(U)^perp onto span(V)^perp)``. The
  default ``complement="nearest_identity"`` takes the one **closest to the identity** (what a
  fine-tune that barely moved the space should get): ``R`` is the identity on the complement of
  ``span(U, V)`` (dimension ``m <= 2r``), and inside it the completion ``w`` maximises
  ``tr(R)`` (an ``m x m`` polar decomposition). So ``R = I + Z G Z^T`` with ``Z`` ``[d, m]``
  orthonormal and ``G`` ``[m, m]``, exactly orthogonal. ``complement="zero"`` gives the literal
  thin-SVD reading ``R = U V^T``, a partial isometry that **drops** every component outside the
  anchors' span (the two coincide when ``n >= d`` and the anchors have full rank).

:class:`ProcrustesResult` holds the factors (``.apply(x) = x R``; ``.matrix()`` builds the dense
``R`` only when asked), the residual ``||H_src R - H_dst||_F``, the relative residual (divided by
``||H_dst||_F``) and, for comparison, the relative residual of ``R = I``.

:func:`em_interp.representations.directions.introspection_scores` uses it to carry the base model's refusal
vector into the organism's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, DataError
from em_interp.results import Result

Complement = Literal["nearest_identity", "zero"]


def _as_matrix(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty tensor [n, d]; got "
                        f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}.")
    return x


@dataclass(frozen=True)
class ProcrustesResult(Result):
    """The orthogonal ``R`` minimising ``||H_src R - H_dst||_F``, in factored form.

    ``R = identity_weight * I + left @ right.T``; see the module docstring.
    """

    kind = "procrustes"

    left: Float[torch.Tensor, "d k"]
    """Left factor ``[d, k]`` (``Z G`` for ``nearest_identity``, ``U`` for ``zero``)."""
    right: Float[torch.Tensor, "d k"]
    """Right factor ``[d, k]`` (``Z`` for ``nearest_identity``, ``V`` for ``zero``)."""
    identity_weight: float
    """1.0 when ``R`` is the identity off the factors' span, 0.0 when it is zero there."""
    singular_values: Float[torch.Tensor, " rank"]
    """Singular values of ``H_src^T H_dst`` (the nonzero ones, descending)."""
    residual: float
    """``||H_src R - H_dst||_F``."""
    relative_residual: float
    """``residual / ||H_dst||_F``."""
    identity_relative_residual: float
    """``||H_src - H_dst||_F / ||H_dst||_F``: the same fit with ``R = I``, for comparison."""
    n: int
    """Number of anchor rows."""
    d: int
    """Dimension."""
    rank: int
    """Rank of ``H_src^T H_dst`` (the dimension on which the data fixes ``R``)."""
    complement: str = "nearest_identity"
    """How ``R`` was completed off the anchors' span."""

    def apply(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        """``x R`` for row vectors ``x`` ``[..., d]`` (never forms ``R``)."""
        left, right = self.left.to(x.device), self.right.to(x.device)
        xf = x.to(left.dtype)
        out = (xf @ left) @ right.T
        if self.identity_weight:
            out = out + self.identity_weight * xf
        return out.to(x.dtype) if x.is_floating_point() else out

    def apply_inverse(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        """``x R^T`` (the inverse rotation when ``R`` is orthogonal)."""
        left, right = self.left.to(x.device), self.right.to(x.device)
        xf = x.to(left.dtype)
        out = (xf @ right) @ left.T
        if self.identity_weight:
            out = out + self.identity_weight * xf
        return out.to(x.dtype) if x.is_floating_point() else out

    def rotate(self, v: Float[torch.Tensor, " d"]) -> Float[torch.Tensor, " d"]:
        """``v R`` for one vector ``[d]``."""
        return self.apply(v[None])[0]

    def matrix(self) -> Float[torch.Tensor, "d d"]:
        """The dense ``R`` ``[d, d]`` (``d^2`` memory: 3 GB at ``d = 27648`` in float32)."""
        r = self.left @ self.right.T
        if self.identity_weight:
            r = r + self.identity_weight * torch.eye(self.d, dtype=r.dtype, device=r.device)
        return r

    @property
    def df(self) -> pd.DataFrame:
        """One row per singular value of ``H_src^T H_dst``."""
        return pd.DataFrame({"index": np.arange(self.rank),
                             "singular_value": self.singular_values.double().cpu().numpy()})

    def to_dict(self) -> dict:
        """Residuals, sizes and rank."""
        return {"n": self.n, "d": self.d, "rank": self.rank, "complement": self.complement,
                "residual": self.residual, "relative_residual": self.relative_residual,
                "identity_relative_residual": self.identity_relative_residual}

    def figure(self, title: str | None = None):
        """Singular values of ``H_src^T H_dst`` (log scale)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(y=self.singular_values.double().cpu().tolist(),
                                   mode="lines+markers"))
        fig.update_layout(title=title or f"Procrustes: singular values (relative residual "
                          f"{self.relative_residual:.3g}, R = I: "
                          f"{self.identity_relative_residual:.3g})", xaxis_title="index",
                          yaxis_title="singular value", yaxis_type="log",
                          template="plotly_white")
        return fig


def _rank(s: torch.Tensor, rtol: float | None, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = rtol if rtol is not None else max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol * s[0]).sum())


def _polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``P Q^T`` of ``m = P S Q^T``."""
    p, _, qh = torch.linalg.svd(m)
    return p @ qh


def procrustes_align(h_src: Float[torch.Tensor, "batch d"], h_dst: Float[torch.Tensor, "batch d"],
                     *, complement: Complement = "nearest_identity",
                     dtype: torch.dtype = torch.float64,
                     rtol: float | None = None) -> ProcrustesResult:
    """The orthogonal ``R`` minimising ``||h_src R - h_dst||_F`` (see the module docstring).

    Works for ``n < d`` without forming a ``d x d`` matrix: cost ``O(n^2 d)`` time and
    ``O(n d)`` memory.

    Args:
        h_src: anchor activations of the source model ``[n, d]`` (e.g. the base, benign prompts).
        h_dst: the same prompts' activations in the target model ``[n, d]`` (the organism).
        complement: ``"nearest_identity"`` (orthogonal ``R``, identity off the anchors' span)
            or ``"zero"`` (the partial isometry ``U V^T``).
        dtype: compute dtype (float64 by default; the factors are returned in it).
        rtol: singular values below ``rtol * s_max`` count as zero (default
            ``max(n, d) * eps``).
    """
    if complement not in ("nearest_identity", "zero"):
        raise ConfigError(f"complement must be 'nearest_identity' or 'zero', got "
                          f"{complement!r}.")
    a = _as_matrix(h_src, "h_src").to(dtype)
    b = _as_matrix(h_dst, "h_dst").to(dtype=dtype, device=a.device)
    if a.shape != b.shape:
        raise DataError(f"h_src {tuple(a.shape)} and h_dst {tuple(b.shape)} must have the same "
                        "shape: the same anchor prompts through both models, in the same order.")
    n, d = a.shape
    if n >= d:
        u, s, vh = torch.linalg.svd(a.T @ b)
        r = _rank(s, rtol, (n, d))
        u, v = u[:, :r], vh[:r].T
    else:
        qa, ra = torch.linalg.qr(a.T)  # [d, n], [n, n]
        qb, rb = torch.linalg.qr(b.T)
        p, s, qh = torch.linalg.svd(ra @ rb.T)
        r = _rank(s, rtol, (n, d))
        u, v = qa @ p[:, :r], qb @ qh[:r].T
    s = s[:r]
    if complement == "zero" or r == d:
        left, right, eye = u, v, 0.0
    else:
        left, right = _nearest_identity_factors(u, v)
        eye = 1.0
    res = ProcrustesResult(left=left, right=right, identity_weight=eye, singular_values=s,
                           residual=0.0, relative_residual=0.0, identity_relative_residual=0.0,
                           n=n, d=d, rank=r, complement=complement)
    b_norm = float(b.norm())
    resid = float((res.apply(a) - b).norm())
    ident = float((a - b).norm())
    return ProcrustesResult(
        left=left, right=right, identity_weight=eye, singular_values=s, residual=resid,
        relative_residual=resid / b_norm if b_norm else float("nan"),
        identity_relative_residual=ident / b_norm if b_norm else float("nan"),
        n=n, d=d, rank=r, complement=complement)


def _nearest_identity_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """``(Z G, Z)`` with ``R = I + Z G Z^T`` orthogonal, ``U_i R = V_i``, closest to ``I``."""
    r = u.shape[1]
    y = v - u @ (u.T @ v)  # the part of span(V) outside span(U)
    uy, sy, _ = torch.linalg.svd(y, full_matrices=False)
    extra = uy[:, sy > 1e-9]
    if extra.shape[1]:  # re-orthogonalise against U once more, for numerical safety
        extra, _ = torch.linalg.qr(extra - u @ (u.T @ extra))
    z = torch.cat([u, extra], 1)  # [d, m], orthonormal basis of span(U, V)
    m = z.shape[1]
    vc = z.T @ v  # [m, r]: V in Z coordinates; U is [I_r; 0]
    q, _ = torch.linalg.qr(vc, mode="complete")
    v_perp = q[:, r:]  # [m, m - r], orthonormal complement of vc
    rw = torch.zeros(m, m, dtype=u.dtype, device=u.device)
    rw[:r] = vc.T  # u v^T with u = [I_r; 0]
    if m > r:
        # u_perp = [0; I]: w maximises tr(w v_perp^T u_perp) = tr(w v_perp[r:]^T)
        w = _polar(v_perp[r:])
        rw[r:] = w @ v_perp.T
    g = rw - torch.eye(m, dtype=u.dtype, device=u.device)
    return z @ g, z
