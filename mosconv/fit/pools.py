"""Pool fitting and routing for one module kind: tensors in, pools and routes out.

Every module ``m`` of a kind has an exact target ``dW_m = U_m diag(S_m) V_m^T``
(:mod:`mosconv.fit.factorize`).  A :class:`KindFit` holds the kind's pools and, per
module, an ``(r, nc)`` route table into each pool (slot ``(j, i)`` = rank row ``j``,
segment ``i``; flattened ``j*nc + i`` on disk) with optional slot weights.  Rows
``[0, q_m)`` of a module are public (they route into the public part of the pools),
rows ``[q_m, r_m)`` are private (their shards belong to that module alone).

Errors are exact Frobenius errors computed from factor Gram matrices, never from
dense ``d_out x d_in`` updates::

    ||dW - B A||^2 = ||S||^2 - 2 tr(B^T U S V^T A^T) + tr((B^T B)(A A^T))

Refinement alternates (a) exact least squares for each pool with everything else
fixed and (b) re-routing of every public slot to its best public shard (with its
best weight, when slots carry weights), keeping the best state seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .factorize import Factorization

F64 = torch.float64


@dataclass
class ModuleRoutes:
    """Mutable routes of one module during fitting (float64 weights)."""

    routes_A: torch.Tensor  # (r, nc) int64
    routes_B: torch.Tensor  # (r, nc) int64
    weights_A: torch.Tensor | None  # (r, nc) float64 or None
    weights_B: torch.Tensor | None
    public_rows: int  # rows [0, public_rows) route into public shards
    private_A: tuple[int, int]
    private_B: tuple[int, int]

    @property
    def r(self) -> int:
        return int(self.routes_A.shape[0])


@dataclass
class KindFit:
    """Pools and routes of one kind (mutable, float64, used only while fitting)."""

    nc: int
    pool_A: torch.Tensor  # (N_A, d_in // nc)
    pool_B: torch.Tensor  # (N_B, d_out // nc)
    public_A: int
    public_B: int
    modules: list[ModuleRoutes]
    structure: str = "private"

    @property
    def params(self) -> int:
        n = self.pool_A.numel() + self.pool_B.numel()
        for m in self.modules:
            if m.weights_A is not None:
                n += m.weights_A.numel() + m.weights_B.numel()
        return n

    def copy(self) -> KindFit:
        return KindFit(
            self.nc, self.pool_A.clone(), self.pool_B.clone(), self.public_A, self.public_B,
            [ModuleRoutes(m.routes_A.clone(), m.routes_B.clone(),
                          None if m.weights_A is None else m.weights_A.clone(),
                          None if m.weights_B is None else m.weights_B.clone(),
                          m.public_rows, m.private_A, m.private_B) for m in self.modules],
            self.structure,
        )


def gather(pool: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``(r, nc*s)``: row ``j`` is the concatenation of its ``nc`` (weighted) shards."""
    x = pool[routes]  # (r, nc, s)
    if weights is not None:
        x = x * weights[..., None]
    return x.reshape(routes.shape[0], -1)


def factors(kf: KindFit, m: ModuleRoutes) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, d_in)`` and ``B (d_out, r)`` of a module, float64."""
    return gather(kf.pool_A, m.routes_A, m.weights_A), gather(kf.pool_B, m.routes_B, m.weights_B).T


def module_err_sq(f: Factorization, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||U S V^T - B A||_F^2`` from Grams."""
    if A.shape[0] == 0:
        return f.energy
    U, V = f.U.to(B.dtype), f.V.to(A.dtype)
    cross = ((U.T @ B) * (f.S[:, None] * (V.T @ A.T))).sum()
    quad = ((B.T @ B) * (A @ A.T)).sum()
    return max(float(f.energy - 2 * cross + quad), 0.0)


def kind_err_sq(kf: KindFit, targets: list[Factorization]) -> list[float]:
    return [module_err_sq(f, *factors(kf, m)) for f, m in zip(targets, kf.modules)]


# ---------------------------------------------------------------- initialisations


def private_fit(targets: list[Factorization], ranks: list[int]) -> KindFit:
    """All-private structure: module ``m`` keeps its top ``ranks[m]`` triplets exactly
    (``A`` rows ``sqrt(s) v``, ``B`` columns ``sqrt(s) u``, nc = 1).  This is truncation."""
    a_rows, b_rows, mods = [], [], []
    start = 0
    for f, k in zip(targets, ranks):
        root = f.S[:k].sqrt()
        a_rows.append(root[:, None] * f.V[:, :k].T.to(F64))
        b_rows.append(root[:, None] * f.U[:, :k].T.to(F64))
        idx = torch.arange(start, start + k, dtype=torch.int64)[:, None]
        mods.append(ModuleRoutes(idx, idx.clone(), None, None, 0, (start, start + k), (start, start + k)))
        start += k
    d_in, d_out = targets[0].d_in, targets[0].d_out
    pool_A = torch.cat(a_rows) if a_rows else torch.zeros(0, d_in, dtype=F64)
    pool_B = torch.cat(b_rows) if b_rows else torch.zeros(0, d_out, dtype=F64)
    return KindFit(1, pool_A, pool_B, 0, 0, mods, "private")


def _canonical(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows with a fixed sign (largest-magnitude entry positive) and their gains."""
    norms = x.norm(dim=1)
    idx = x.abs().argmax(dim=1)
    sign = torch.sign(x[torch.arange(x.shape[0]), idx])
    sign[sign == 0] = 1
    gain = norms * sign
    unit = x / torch.where(gain == 0, torch.ones_like(gain), gain)[:, None]
    return unit, gain


_CONTROLLER: list = []  # threadpoolctl's controller, made once: each new one scans the
# process's loaded libraries (about 3 ms, thousands of times in a thorough search)


def _thread_limit():
    """BLAS/OpenMP on one thread for the block (threadpoolctl's ``threadpool_limits(1)``)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1)


def _kmeans(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Deterministic scikit-learn k-means; ``k`` is capped at the number of distinct rows."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    arr = x.numpy()
    rows = np.ascontiguousarray(np.round(arr, 12) + 0.0)  # + 0.0: -0.0 counts as 0.0
    distinct = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))
                                   ).reshape(-1)).shape[0] if rows.size else 0
    k = max(1, min(k, distinct))
    with _thread_limit(), warnings.catch_warnings():  # small problems: threads only
        # add contention; an initialization only (least squares refine it): no warnings
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50).fit(arr)
    return torch.from_numpy(km.cluster_centers_).to(F64), km.labels_


def shared_fit(
    targets: list[Factorization],
    private_ranks: list[int],
    public_rows: int,
    n_public: int,
    nc: int,
    weights: bool,
    seed: int,
) -> KindFit:
    """MoS structure: ``private_ranks[m]`` private rows per module plus ``public_rows``
    rows that route into ``n_public`` shared shards per pool, initialized by k-means on
    the shards of each module's next residual singular vectors."""
    d_in, d_out = targets[0].d_in, targets[0].d_out
    sA, sB = d_in // nc, d_out // nc
    res_a, res_b = [], []
    for f, p in zip(targets, private_ranks):
        k = f.S.numel()
        a = torch.zeros(public_rows, d_in, dtype=F64)
        b = torch.zeros(public_rows, d_out, dtype=F64)
        take = max(0, min(public_rows, k - p))
        if take:
            root = f.S[p:p + take].sqrt()
            a[:take] = root[:, None] * f.V[:, p:p + take].T
            b[:take] = root[:, None] * f.U[:, p:p + take].T
        res_a.append(a.reshape(public_rows * nc, sA))
        res_b.append(b.reshape(public_rows * nc, sB))
    xa, xb = torch.cat(res_a), torch.cat(res_b)
    pools, routes, gains = [], [], []
    for x, side_seed in ((xa, seed), (xb, (seed + 1) % 2**32)):
        if weights:
            unit, _ = _canonical(x)
            cent, labels = _kmeans(unit, n_public, side_seed)
            lab = torch.from_numpy(labels).long()
            c = cent[lab]
            w = (x * c).sum(1) / c.pow(2).sum(1).clamp_min(1e-300)
        else:
            cent, labels = _kmeans(x, n_public, side_seed)
            lab = torch.from_numpy(labels).long()
            w = None
        pools.append(cent)
        routes.append(lab)
        gains.append(w)
    n_pub_A, n_pub_B = pools[0].shape[0], pools[1].shape[0]
    base = private_fit(targets, private_ranks)
    pool_A = torch.cat([pools[0], base.pool_A.reshape(-1, sA) if nc == 1 else _split(base.pool_A, nc)])
    pool_B = torch.cat([pools[1], base.pool_B.reshape(-1, sB) if nc == 1 else _split(base.pool_B, nc)])
    mods = []
    per = public_rows * nc
    for i, (m, p) in enumerate(zip(base.modules, private_ranks)):
        pa = (n_pub_A + m.private_A[0] * nc, n_pub_A + m.private_A[1] * nc)
        pb = (n_pub_B + m.private_B[0] * nc, n_pub_B + m.private_B[1] * nc)
        ra = torch.cat([routes[0][i * per:(i + 1) * per], torch.arange(*pa)]).reshape(-1, nc)
        rb = torch.cat([routes[1][i * per:(i + 1) * per], torch.arange(*pb)]).reshape(-1, nc)
        wa = wb = None
        if weights:
            wa = torch.cat([gains[0][i * per:(i + 1) * per], torch.ones(p * nc, dtype=F64)]).reshape(-1, nc)
            wb = torch.cat([gains[1][i * per:(i + 1) * per], torch.ones(p * nc, dtype=F64)]).reshape(-1, nc)
        mods.append(ModuleRoutes(ra, rb, wa, wb, public_rows, pa, pb))
    return KindFit(nc, pool_A, pool_B, n_pub_A, n_pub_B, mods, "shared")


def _split(pool: torch.Tensor, nc: int) -> torch.Tensor:
    """Whole-vector shards ``(n, d)`` -> ``(n*nc, d/nc)`` segments in slot order."""
    return pool.reshape(pool.shape[0] * nc, pool.shape[1] // nc)


# ---------------------------------------------------------------- refinement


def _solve_pool(pool: torch.Tensor, contribs) -> torch.Tensor:
    """Least squares for every pool entry at once.

    ``contribs`` yields ``(routes (r, nc), weights (r, nc) | None, G (r, r), C (r, nc, s))``
    for the error ``sum tr(G X X^T) - 2 tr(C X^T)`` where ``X[j, i] = w[j,i] pool[routes[j,i]]``.
    """
    n, s = pool.shape
    H = torch.zeros(n * n, dtype=F64)
    R = torch.zeros(n, s, dtype=F64)
    for routes, w, G, C in contribs:
        r, nc = routes.shape
        if r == 0:
            continue
        ww = torch.ones(r, nc, dtype=F64) if w is None else w
        rows = routes[:, None, :].expand(r, r, nc)
        cols = routes[None, :, :].expand(r, r, nc)
        vals = ww[:, None, :] * ww[None, :, :] * G[:, :, None]
        H.index_add_(0, (rows * n + cols).reshape(-1), vals.reshape(-1))
        R.index_add_(0, routes.reshape(-1), (ww[..., None] * C).reshape(r * nc, s))
    H = H.reshape(n, n)
    diag = H.diagonal()
    unused = diag <= 1e-300
    ridge = 1e-12 * float(diag.max()) if n and float(diag.max()) > 0 else 1e-12
    H = H + ridge * torch.eye(n, dtype=F64)
    R = R + ridge * pool
    H[unused, :] = 0
    H[:, unused] = 0
    H[unused, unused] = 1
    R[unused] = pool[unused]
    try:
        return torch.linalg.solve(H, R)
    except RuntimeError:
        return torch.linalg.lstsq(H, R).solution


def _side_terms(kf: KindFit, f: Factorization, m: ModuleRoutes, side: str):
    """For one module and side: current X (r, d) (A rows, or B columns as rows), the
    Gram G (r, r) of the other side and C (r, d), so the error is
    ``||S||^2 - 2 tr(C X^T) + tr(G X X^T)``."""
    A, B = factors(kf, m)
    if side == "A":
        return A, B.T @ B, ((B.T @ f.U) * f.S) @ f.V.T
    return B.T.contiguous(), A @ A.T, ((A @ f.V) * f.S) @ f.U.T


def _refine_side(kf: KindFit, targets: list[Factorization], side: str) -> None:
    """Block coordinate least squares on one pool: first the public shards (every
    module's public rows, private rows fixed), then each module's private shards
    (a small ``p x p`` system per module).  Each step is an exact minimizer."""
    pool = kf.pool_A if side == "A" else kf.pool_B
    n_pub = kf.public_A if side == "A" else kf.public_B
    nc = kf.nc
    if n_pub:
        def contribs():
            for f, m in zip(targets, kf.modules):
                q = m.public_rows
                if q == 0:
                    continue
                X, G, C = _side_terms(kf, f, m, side)
                rhs = C[:q] - G[:q, q:] @ X[q:]
                routes = m.routes_A if side == "A" else m.routes_B
                w = m.weights_A if side == "A" else m.weights_B
                yield routes[:q], None if w is None else w[:q], G[:q, :q], rhs.reshape(q, nc, -1)

        pool[:n_pub] = _solve_pool(pool[:n_pub].clone(), contribs())
    for f, m in zip(targets, kf.modules):
        q, r = m.public_rows, m.r
        if r == q:
            continue
        X, G, C = _side_terms(kf, f, m, side)
        Gpp = G[q:, q:]
        rhs = C[q:] - G[q:, :q] @ X[:q]
        ridge = 1e-12 * float(Gpp.diagonal().max().clamp_min(1e-300))
        Xp = torch.linalg.solve(Gpp + ridge * torch.eye(r - q, dtype=F64), rhs)
        routes = (m.routes_A if side == "A" else m.routes_B)[q:]
        w = m.weights_A if side == "A" else m.weights_B
        seg = Xp.reshape(r - q, nc, -1)
        if w is not None:
            seg = seg / w[q:, :, None]
        pool[routes.reshape(-1)] = seg.reshape((r - q) * nc, -1)


def _reroute(kf: KindFit, targets: list[Factorization], side: str) -> None:
    """Give each public slot the public shard (and weight) that minimizes the error."""
    pool = kf.pool_A if side == "A" else kf.pool_B
    n_pub = kf.public_A if side == "A" else kf.public_B
    if n_pub == 0:
        return
    P = pool[:n_pub]  # (n_pub, s)
    pn = P.pow(2).sum(1)  # (n_pub,)
    for f, m in zip(targets, kf.modules):
        if m.public_rows == 0:
            continue
        X, G, C = _side_terms(kf, f, m, side)
        X = X.clone()
        routes = m.routes_A if side == "A" else m.routes_B
        w = m.weights_A if side == "A" else m.weights_B
        for j in range(m.public_rows):
            gjj = float(G[j, j])
            if gjj <= 1e-300:
                continue
            g = C[j] - G[j] @ X + gjj * X[j]  # (d,)
            scores = g.reshape(kf.nc, -1) @ P.T  # (nc, n_pub)
            if w is not None:
                value = scores.pow(2) / (gjj * pn.clamp_min(1e-300))
                best = value.argmax(1)
                coef = scores.gather(1, best[:, None])[:, 0] / (gjj * pn[best].clamp_min(1e-300))
                w[j] = coef
            else:
                best = (2 * scores - gjj * pn).argmax(1)
                coef = torch.ones(kf.nc, dtype=F64)
            routes[j] = best
            X[j] = (coef[:, None] * P[best]).reshape(-1)


def refine(kf: KindFit, targets: list[Factorization], iters: int, tol: float = 1e-7) -> KindFit:
    """Alternate pool least squares and re-routing; return the best state seen."""
    def round_() -> None:
        _refine_side(kf, targets, "A")
        _refine_side(kf, targets, "B")
        _reroute(kf, targets, "A")
        _reroute(kf, targets, "B")

    return best_of_rounds(kf, round_, lambda: sum(kind_err_sq(kf, targets)),
                          sum(f.energy for f in targets), iters, tol)


def best_of_rounds(kf: KindFit, round_: Callable[[], None], error: Callable[[], float],
                   total: float, iters: int,
                   tol: float = 1e-7) -> KindFit:
    """Run ``round_()`` (which updates ``kf`` in place) up to ``iters`` times and return a copy
    of the best state by ``error()``; stop at the first round that does not lower the error,
    or lowers it by less than ``tol`` of ``total`` (the kind's energy)."""
    best = kf.copy()
    best_err = error()
    total = total or 1.0
    for _ in range(iters):
        round_()
        err = error()
        if err >= best_err:
            break
        improved = (best_err - err) / total
        best, best_err = kf.copy(), err
        if improved < tol:
            break
    return best


def shared_params(d_in: int, d_out: int, private_ranks: list[int], public_rows: int,
                  n_public: int, nc: int, weights: bool) -> int:
    """Parameters of a :func:`shared_fit` structure (pools + slot weights)."""
    n = sum(private_ranks) * (d_in + d_out) + n_public * (d_in + d_out) // nc
    if weights:
        n += 2 * nc * sum(public_rows + p for p in private_ranks)
    return n


def divisors_for(d_in: int, d_out: int, wanted: tuple[int, ...] = (1, 4, 16)) -> list[int]:
    """The values of ``wanted`` that divide both widths (valid ``nc``)."""
    return [nc for nc in wanted if d_in % nc == 0 and d_out % nc == 0]


def relative(err_sq: float, energy: float) -> float:
    return math.sqrt(err_sq / energy) if energy > 0 else 0.0
