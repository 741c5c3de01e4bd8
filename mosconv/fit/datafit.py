"""Data-aware fitting: the same structures as :mod:`mosconv.fit.pools`, in the metric of the inputs.

With a module's input second moment ``C`` (:mod:`mosconv.model.calib`), the error of an
approximation ``B' A'`` of ``dW`` is ::

    E = ||(dW - B'A') R||_F^2 = tr(dW C dW^T) - 2 tr(B'^T dW C A'^T) + tr(B'^T B' A' C A'^T)

for any ``R R^T = C``.  Two pieces:

* :func:`whitened_factorization` is the exact SVD of ``dW R`` mapped back:
  ``dW = U diag(S) V^T`` with ``U^T U = I`` and ``V^T C V = I``.  Keeping a prefix of it is
  the best rank-k approximation in this metric, so global-budget truncation of these
  spectra is *data-aware truncation*, and :func:`mosconv.fit.pools.private_fit` of these
  factorizations reproduces it.  Only ``r x r`` matrices are decomposed (``A C A^T``).
* :func:`refine_data` improves a MoS structure (routes fixed) in this metric: for each pool
  in turn, the error is a quadratic in the pool entries, minimized by conjugate gradients
  (Jacobi preconditioned, warm started, so every step lowers the error).  Routes are the
  ones chosen when the structure was initialized; re-routing is not done in this metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.types import LoraModule
from .factorize import Factorization
from .pools import KindFit, best_of_rounds, factors, gather

F64 = torch.float64


@dataclass(frozen=True)
class DataTarget:
    """A module's update in the data metric.

    Attributes:
        f: whitened factorization, ``V^T C V = I`` (float64).
        C: ``(d_in, d_in)`` input second moment (float64).
        VC: ``C @ f.V``, ``(d_in, k)``.
    """

    f: Factorization
    C: torch.Tensor
    VC: torch.Tensor

    @property
    def energy(self) -> float:
        return self.f.energy


def regularize(C: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``C + ridge * mean(diag C) * I``: keeps every input direction slightly in the metric."""
    C = C.to(F64)
    d = C.shape[0]
    lam = ridge * float(C.diagonal().mean().clamp_min(1e-300))
    return C + lam * torch.eye(d, dtype=F64)


def whitened_factorization(module: LoraModule, C: torch.Tensor) -> Factorization:
    """``dW = U diag(S) V^T`` with ``U^T U = I``, ``V^T C V = I``, ``S`` descending.

    ``C`` is ``(d_in, d_in)`` symmetric positive (semi)definite; directions of ``A``'s row
    space that ``C`` does not see are dropped (they cost nothing in this metric).
    """
    B, A = module.B.to(F64), module.A.to(F64)
    C = C.to(F64)
    qb, rb = torch.linalg.qr(B)  # (d_out, k1), (k1, r)
    G = A @ C @ A.T  # (r, r) = (A R)(A R)^T
    g, W = torch.linalg.eigh((G + G.T) / 2)
    keep = g > 1e-12 * float(g.max().clamp_min(1e-300))
    g, W = g[keep], W[:, keep]
    core = module.scale * rb @ (W * g.sqrt())  # (k1, r')
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    U = qb @ u  # (d_out, k)
    V = A.T @ ((W / g.sqrt()) @ vh.T)  # (d_in, k): V^T C V = I
    energy = module.scale**2 * float(((B.T @ B) * G).sum())
    return Factorization(U=U, S=s, V=V, norm_sq=max(energy, float((s**2).sum())))


def data_target(module: LoraModule, C: torch.Tensor) -> DataTarget:
    f = whitened_factorization(module, C)
    C = C.to(F64)
    return DataTarget(f=f, C=C, VC=C @ f.V)


def data_err_sq(t: DataTarget, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||(U S V^T - B A) R||_F^2`` from small Grams; ``A (r, d_in)``, ``B (d_out, r)``."""
    if A.shape[0] == 0:
        return t.energy
    A, B = A.to(F64), B.to(F64)
    cross = ((t.f.U.T @ B) * (t.f.S[:, None] * (t.VC.T @ A.T))).sum()
    quad = ((B.T @ B) * ((A @ t.C) @ A.T)).sum()
    return max(float(t.energy - 2 * cross + quad), 0.0)


def kind_data_err_sq(kf: KindFit, targets: list[DataTarget]) -> list[float]:
    return [data_err_sq(t, *factors(kf, m)) for t, m in zip(targets, kf.modules)]


# ---------------------------------------------------------------- refinement


def _side_problem(kf: KindFit, targets: list[DataTarget], side: str):
    """Per module ``(routes, weights, G, M, K)`` with the error, as a function of the
    module's side matrix ``X`` (``A``, or ``B^T``), ``tr(G X M X^T) - 2 tr(K X^T) + const``.
    ``M`` is None for the identity (the output side)."""
    out = []
    for t, m in zip(targets, kf.modules):
        if m.r == 0:
            continue
        A, B = factors(kf, m)
        if side == "A":
            G, M = B.T @ B, t.C
            K = ((B.T @ t.f.U) * t.f.S) @ t.VC.T  # (r, d_in)
            out.append((m.routes_A, m.weights_A, G, M, K))
        else:
            G, M = (A @ t.C) @ A.T, None
            K = ((A @ t.VC) * t.f.S) @ t.f.U.T  # (r, d_out)
            out.append((m.routes_B, m.weights_B, G, M, K))
    return out


def _scatter(n: int, s: int, routes, w, X: torch.Tensor, out: torch.Tensor) -> None:
    """``out[routes[j, i]] += w[j, i] * X[j, i*s:(i+1)*s]``."""
    seg = X.reshape(routes.shape[0], routes.shape[1], s)
    if w is not None:
        seg = seg * w[..., None]
    out.index_add_(0, routes.reshape(-1), seg.reshape(-1, s))


def _cg_pool(pool: torch.Tensor, problem, iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Minimize the pool quadratic by Jacobi-preconditioned conjugate gradients from ``pool``."""
    n, s = pool.shape

    def hess(P: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, s, dtype=F64)
        for routes, w, G, M, _ in problem:
            X = G @ gather(P, routes, w)
            _scatter(n, s, routes, w, X if M is None else X @ M, out)
        return out

    b = torch.zeros(n, s, dtype=F64)
    diag = torch.zeros(n, s, dtype=F64)
    for routes, w, G, M, K in problem:
        _scatter(n, s, routes, w, K, b)
        r, nc = routes.shape
        ww = torch.ones(r, nc, dtype=F64) if w is None else w
        dm = torch.ones(nc * s, dtype=F64) if M is None else M.diagonal()
        d = (ww.pow(2) * G.diagonal()[:, None])[..., None] * dm.reshape(1, nc, s)
        diag.index_add_(0, routes.reshape(-1), d.reshape(-1, s))
    used = diag > 0
    inv = torch.where(used, 1.0 / diag.clamp_min(1e-300), torch.zeros_like(diag))
    x = pool.clone()
    res = (b - hess(x)) * used
    z = res * inv
    p = z.clone()
    rz = float((res * z).sum())
    bnorm = float(b.pow(2).sum()) or 1.0
    for _ in range(iters):
        if rz <= tol * tol * bnorm:
            break
        Hp = hess(p) * used
        php = float((p * Hp).sum())
        if php <= 0:
            break
        alpha = rz / php
        x += alpha * p
        res -= alpha * Hp
        z = res * inv
        rz_new = float((res * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def refine_data(kf: KindFit, targets: list[DataTarget], iters: int, cg_iters: int = 25,
                tol: float = 1e-7) -> KindFit:
    """Alternate conjugate-gradient solves of the A- and B-pools in the data metric (routes
    and slot weights fixed); return the best state seen."""
    def round_() -> None:
        kf.pool_A = _cg_pool(kf.pool_A, _side_problem(kf, targets, "A"), cg_iters)
        kf.pool_B = _cg_pool(kf.pool_B, _side_problem(kf, targets, "B"), cg_iters)

    return best_of_rounds(kf, round_, lambda: sum(kind_data_err_sq(kf, targets)),
                          sum(t.energy for t in targets), iters, tol)
