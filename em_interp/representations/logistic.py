"""L2-regularised logistic regression, solved to convergence for many label vectors at once.

The probes of :mod:`em_interp.representations.probing` minimise, per label vector ``y``,

    L(theta) = sum_i [log(1 + exp(z_i)) - y_i z_i] + (1 / 2C) ||w||^2,   z_i = b + w . x_i

(sklearn's ``LogisticRegression(C=C)`` objective: the intercept ``b`` is not penalised) by
Newton's method, batched over label vectors (the real labels and every permutation of the null),
to a relative tolerance of 1e-10, where sklearn's default ``tol=1e-4`` leaves the weights
1-3% from the optimum. With more features than fitting rows the problem is solved in the span
of the rows (an ``n x n`` Gram eigendecomposition, never ``d x d``), which leaves the optimum
unchanged: the L2 penalty puts no weight outside that span.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass
class Basis:
    """Standardisation of the fitting rows and an orthonormal basis of their span."""

    mean: np.ndarray
    scale: np.ndarray
    v: np.ndarray | None
    """``[d, r]`` orthonormal basis of the standardised rows' span (``None``: all of R^d)."""
    features: np.ndarray
    """``[n, r]``: the fitting rows in that basis."""

    @classmethod
    def fit(cls, x: np.ndarray) -> Basis:
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0  # as StandardScaler
        z = (x - mean) / scale
        n, d = z.shape
        if d <= n:
            return cls(mean, scale, None, z)
        evals, evecs = np.linalg.eigh(z @ z.T)  # Gram: n x n, never d x d
        keep = evals > max(evals[-1], 1e-300) * 1e-12
        root = np.sqrt(evals[keep])
        v = (z.T @ evecs[:, keep]) / root  # [d, r], orthonormal columns
        return cls(mean, scale, v, evecs[:, keep] * root)

    def project(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return z if self.v is None else z @ self.v

    def weights(self, beta: np.ndarray) -> np.ndarray:
        """Standardised-space weights ``w = V beta``."""
        return beta if self.v is None else self.v @ beta


@functools.cache
def _threadpools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # scans the loaded libraries once (milliseconds)


def blas_threads(limit: int | None):
    """Limit BLAS threads (``None``: leave them). Batches of small solves run faster on one
    thread than on many, and much faster on a shared machine."""
    return _threadpools().limit(limits=limit, user_api="blas")


def _objective(theta, f1, y, pen):
    z = theta @ f1.T
    return np.sum(np.logaddexp(0.0, z) - y * z, 1) + 0.5 * np.sum(pen * theta * theta, 1)


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, *, tol: float = 1e-10,
                 max_iter: int = 100) -> np.ndarray:
    """Newton's method for ``[P, n]`` label vectors at once: ``[P, r + 1]`` (weights, intercept)
    minimising ``sum_i BCE + ||w||^2 / (2C)`` on ``features`` ``[n, r]`` (intercept unpenalised).

    Each step solves ``H delta = g`` with ``H = F1^T diag(p (1 - p)) F1 + diag(1/C, ..., 0)``,
    backtracking until the Armijo condition holds; it stops at a relative step below ``tol``.
    Label vectors with one class have no finite optimum and are returned as NaN.
    """
    n, r = features.shape
    y = np.atleast_2d(labels).astype(np.float64)
    f1 = np.hstack([features, np.ones((n, 1))])
    pen = np.full(r + 1, 1.0 / C)
    pen[-1] = 0.0
    theta = np.zeros((y.shape[0], r + 1))
    ok = (y.min(1) < 1) & (y.max(1) > 0)
    theta[~ok] = np.nan
    # batch so that the [batch, r+1, n] and [batch, r+1, r+1] arrays stay around 256 MB
    chunk = max(1, int(2**25 // ((r + 1) * max(n, r + 1))))
    rows = np.flatnonzero(ok)
    # many small BLAS calls: threads cost more than they give below a few hundred features
    with blas_threads(1 if r < 512 else None):
        for start in range(0, rows.size, chunk):
            idx = rows[start:start + chunk]
            theta[idx] = _newton(f1, y[idx], pen, tol, max_iter)
    return theta


def _newton(f1, y, pen, tol, max_iter):
    from scipy.special import expit

    p0 = y.mean(1).clip(1e-6, 1 - 1e-6)
    theta = np.zeros((y.shape[0], f1.shape[1]))
    theta[:, -1] = np.log(p0 / (1 - p0))
    obj = _objective(theta, f1, y, pen)
    active = np.arange(y.shape[0])
    diag = np.arange(f1.shape[1])
    for _ in range(max_iter):
        if active.size == 0:
            break
        th, ya = theta[active], y[active]
        p = expit(th @ f1.T)
        grad = (p - ya) @ f1 + pen * th
        hess = np.matmul(f1.T[None] * (p * (1 - p))[:, None, :], f1)
        hess[:, diag, diag] += pen + 1e-12 * f1.shape[0]
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        decrement = np.sum(grad * step, 1)
        t = np.ones(active.size)
        cur = obj[active]
        for _ in range(40):
            new = th - t[:, None] * step
            val = _objective(new, f1, ya, pen)
            good = val <= cur - 1e-4 * t * decrement
            if good.all():
                break
            t = np.where(good, t, t / 2)
        good = val <= cur + 1e-12 * np.abs(cur)  # keep any non-increasing step
        theta[active[good]] = new[good]
        obj[active[good]] = val[good]
        size = np.max(np.abs(t[:, None] * step), 1)
        done = ~good | (size <= tol * (1 + np.max(np.abs(new), 1)))
        active = active[~done]
    return theta
