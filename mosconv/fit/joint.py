"""Joint bases for a group of adapters: per module name a shared left and right basis and a
small dense core per adapter, ``dW_i ~ U C_i V^T`` (``U`` with ``k_U`` columns, ``V`` with
``k_V``, ``C_i`` of ``k_U x k_V``) (the structure of Compress-then-Serve,
arXiv 2407.00066), or each adapter's own truncation where sharing does not pay.  Tensors in,
tensors out; no I/O.

For one module name ``m`` held by adapters ``i = 1..n`` with exact factorizations
``dW_i = U_i S_i V_i^T`` (:mod:`mosconv.fit.factorize`):

* **Bases** without forming any ``d_out x d_in`` matrix: ``U`` = left singular vectors of
  ``[U_1 S_1, ..., U_n S_n]`` (the updates side by side), ``V`` = those of
  ``[V_1 S_1, ..., V_n S_n]`` (the updates stacked), each through a QR of the tall factor
  matrix and an SVD of its small triangle.  Cores ``C_i = U^T dW_i V = (U^T U_i) S_i (V_i^T V)``.
  With orthonormal ``U, V`` the error is ``||dW_i||^2 - ||C_i||^2``; prefixes of the bases
  give every pair of ranks at once (2-D prefix sums of ``sum_i C_i^2``).  The two sides may
  keep different ranks: adapters trained from one seed keep nearly the same ``A`` (a small
  shared ``V``) while their ``B`` differ (a wider ``U``).
* **One-sided sharing**: only ``V`` shared (``A`` rows every holder routes to) and each
  adapter's own ``B_i = dW_i V`` (``shared_A``), or only ``U`` shared and ``A_i = U^T dW_i``
  (``shared_B``); optimal for their structure with the same bases, no core (which grows as
  ``n k^2`` and dominates for large groups of adapters whose other side differs).
* **Tied**: every holder routes to the same ``k`` rows on both sides with no core, the
  rank-``k`` truncation of the holders' weighted mean update (:class:`TiedBasis`; computed
  where the holders are nearly equal, as checkpoints of one run are).
* **Budget**: a joint module costs ``k_U d_out + k_V d_in + n k_U k_V`` parameters (bases
  once, a core per adapter), ``shared_A`` ``k (d_in + n d_out)``, ``shared_B``
  ``k (d_out + n d_in)``, ``tied`` ``k (d_in + d_out)``; the private alternative is each
  adapter's own singular triplets at ``d_in + d_out`` each.  One price ``lam`` (error per
  parameter) is found by bisection so that every module, choosing the option and rank that
  minimize ``error + lam * params``, fits the group budget together; leftover budget buys
  private triplets greedily.  The chosen parameters never increase with ``lam``, so the
  bisection is exact.  A greedy over every module's next step is the second candidate, and
  the exact optimum the third: a multiple-choice knapsack (each module name picks one option
  from its cost/error frontier) solved by dynamic programming over the budget, in parameter
  units where the table is small enough (coarser, rounded-up units otherwise).  The lowest
  predicted error of the three wins.
* **Refinement**: alternating least squares on the exact error (higher-order orthogonal
  iteration): ``U`` = top-``k`` left singular vectors of ``[dW_1 V, ..., dW_n V]``, then
  ``V`` likewise of the stacked ``U^T dW_i``; the kept energy never decreases, the best state
  is kept.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from .factorize import Factorization

F64 = torch.float64


@dataclass(frozen=True)
class JointBasis:
    """The joint bases of one module name over the adapters that hold it.

    Attributes:
        U: ``(d_out, K_U)`` orthonormal columns, float64, by decreasing importance.
        V: ``(d_in, K_V)`` orthonormal columns, float64.
        kept: ``(K_U + 1, K_V + 1)`` float64,
            ``kept[a, b] = sum_i ||U[:, :a]^T dW_i V[:, :b]||^2``.
        energy: ``sum_i ||dW_i||^2``.
        gain_U, gain_V: squared singular values of the side-by-side and stacked updates:
            ``sum(gain_V[:k])`` is what ``k`` shared ``V`` columns keep (``shared_A``).
    """

    U: torch.Tensor
    V: torch.Tensor
    kept: torch.Tensor
    energy: float
    gain_U: torch.Tensor
    gain_V: torch.Tensor
    tied: TiedBasis | None = None  # set by :func:`tied_basis` where it may pay


@dataclass(frozen=True)
class TiedBasis:
    """One approximation that every holder of a module name routes to, with no core or rows
    of its own (``tied``): the top singular triplets of the holders' weighted mean update
    ``M = sum_i w_i dW_i / sum_i w_i``, which minimizes ``sum_i w_i ||dW_i - X||^2`` over
    every ``X`` of rank ``k``.  Adapters that are checkpoints of one run are nearly equal
    (``../shared/zoo``'s pairs: cosine 0.97 per module), and there the ``n k^2`` parameters
    of the cores are what it saves.

    Attributes:
        U: ``(d_out, K)``, the left singular vectors of ``M`` times the square roots of its
            singular values (float64), by decreasing singular value.
        V: ``(d_in, K)``, the right ones likewise: ``M ~ U[:, :k] V[:, :k]^T``.
        err: ``(K + 1,)`` float64, ``err[k] = sum_i w_i ||dW_i - M_k||^2``.
    """

    U: torch.Tensor
    V: torch.Tensor
    err: torch.Tensor


class Reducer(Protocol):
    """Where the per-chunk work of a reduction runs: ``put`` stores a value where tasks read
    it (returns a handle), ``map`` runs ``fn(*a)`` for every ``a`` and returns the results in
    order, ``keep`` runs ``fn(*a)`` (which returns ``(heavy, light)``) for every ``a`` and
    returns ``(handle of heavy, light)``: the heavy part stays where the task ran, ``get``
    fetches a handle's value.  Handles passed as arguments of ``map`` and ``keep`` reach the
    task as their values.  :class:`LocalReducer` runs in this process;
    ``mosconv.batch.run.RayReducer`` on Ray tasks (handles: object refs)."""

    def put(self, value: Any) -> Any: ...

    def map(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]: ...

    def keep(self, fn: Callable[..., Any], args: list[tuple]) -> list[tuple[Any, Any]]: ...

    def get(self, handle: Any) -> Any: ...


class LocalReducer:
    """Runs every chunk in this process, in order (a handle is the value itself)."""

    def put(self, value: Any) -> Any:
        return value

    def map(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        return [fn(*a) for a in args]

    def keep(self, fn: Callable[..., Any], args: list[tuple]) -> list[tuple[Any, Any]]:
        return [fn(*a) for a in args]

    def get(self, handle: Any) -> Any:
        return handle


LOCAL = LocalReducer()
CHUNK = 32  # adapters per leaf of a reduction
FAN_IN = 8  # triangles merged per task


@dataclass(frozen=True)
class Parts:
    """The factorizations of one module name's holders, in chunks stored by a reducer (the
    leaves of every reduction over them).  Without ``pick`` a chunk is a list of
    factorizations; with it, chunk ``c``'s list is ``picker(chunk, *args)`` for
    ``pick[c] = (picker, *args)``, computed in the task (chunks of whole adapters held where
    the reducer keeps them, :mod:`mosconv.fit.zoo`)."""

    chunks: tuple
    reducer: Reducer
    pick: tuple | None = None

    @staticmethod
    def of(facts: list[Factorization] | Parts, reducer: Reducer | None = None,
           chunk: int = CHUNK) -> Parts:
        if isinstance(facts, Parts):
            return facts
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        red = reducer or LOCAL
        return Parts(tuple(red.put(facts[i:i + chunk]) for i in range(0, len(facts), chunk)),
                     red)

    def _calls(self, fn: Callable[..., Any], extra: tuple) -> tuple[Callable[..., Any], list]:
        """The function and the argument tuples that run ``fn(chunk's list, *extra)`` per chunk."""
        if self.pick is None:
            return fn, [(c, *extra) for c in self.chunks]
        return _picked, [(fn, c, p, *extra) for c, p in zip(self.chunks, self.pick)]

    def map(self, fn: Callable[..., Any], *extra: Any) -> list[Any]:
        return self.reducer.map(*self._calls(fn, extra))

    def keep(self, fn: Callable[..., Any], *extra: Any) -> list[tuple[Any, Any]]:
        """Like :meth:`map` for an ``fn`` that returns ``(heavy, light)``: the heavy results
        stay where the tasks ran (handles; see :class:`Reducer`)."""
        return self.reducer.keep(*self._calls(fn, extra))

    @property
    def final(self) -> bool:
        """One chunk: its leaf computes the SVD itself (no reduction)."""
        return len(self.chunks) == 1


def _picked(fn: Callable[..., Any], chunk: Any, pick: tuple, *extra: Any) -> Any:
    """``fn`` on the factorizations that ``pick`` selects from a chunk."""
    picker, *args = pick
    return fn(picker(chunk, *args), *extra)


def _triangle(cols: torch.Tensor) -> torch.Tensor:
    """``T`` with ``T^T T = cols cols^T``: the R of a QR of ``cols^T`` (``min(R, d) x d``)."""
    return torch.linalg.qr(cols.T, mode="r")[1]


def _merge(*ts: torch.Tensor) -> torch.Tensor:
    """The triangle of the columns behind several triangles (one tall-skinny QR step)."""
    return _triangle(torch.cat(ts, dim=0).T) if len(ts) > 1 else ts[0]


def _left_svd(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of ``cols`` (``d x R``), dropping numerically zero
    ones: a QR of ``cols``, then the SVD of the small triangle."""
    q, r = torch.linalg.qr(cols)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    keep = s > 1e-12 * float(s.max()) if s.numel() else s > 0
    return q @ u[:, keep], s[keep]


def _leaf(cols: torch.Tensor, final: bool) -> Any:
    """A leaf's part of a reduction: its triangle, or the SVD itself when it is the only leaf."""
    return _left_svd(cols) if final else _triangle(cols)


def _at(x: Any, index: int | None) -> Any:
    return x if index is None else x[index]


def _merge_kept(index: int | None, *items: Any) -> tuple[torch.Tensor, None]:
    """:func:`_merge` of the triangles at ``index`` of several leaves (all of them: None)."""
    return _merge(*[_at(x, index) for x in items]), None


def _svd_of(leaves: list[Any], reducer: Reducer, index: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of the columns behind the leaves (handles of what the
    leaf tasks kept; their part ``index`` when a leaf holds several): a single leaf's own
    SVD, or the leaf triangles merged ``FAN_IN`` at a time in a fixed tree by tasks that keep
    their results too (so the result does not depend on where the tasks ran, and only the
    last triangle comes back here), then the SVD of the columns behind the last triangle
    ``T`` (``T^T T = cols cols^T``, so ``T^T`` has the same left singular vectors)."""
    if len(leaves) == 1:  # the only leaf: its own SVD (see _leaf)
        return _at(reducer.get(leaves[0]), index)
    while len(leaves) > 1:
        leaves = [h for h, _ in reducer.keep(_merge_kept, [(index, *leaves[i:i + FAN_IN])
                                                           for i in range(0, len(leaves), FAN_IN)])]
        index = None
    return _left_svd(reducer.get(leaves[0]).T)


def _scaled(side: torch.Tensor, f: Factorization) -> torch.Tensor:
    """``U S`` or ``V S`` of a factorization, in float64."""
    return side.to(F64) * f.S.to(F64)[None, :]


def _leaf_bases(facts: list[Factorization], final: bool) -> tuple[tuple[Any, Any], float]:
    """Leaves of the updates side by side and stacked (kept), and their energy."""
    return ((_leaf(torch.cat([_scaled(f.U, f) for f in facts], dim=1), final),
             _leaf(torch.cat([_scaled(f.V, f) for f in facts], dim=1), final)),
            float(sum((f.S.to(F64) ** 2).sum() for f in facts)))


def _leaf_left(facts: list[Factorization], V: torch.Tensor, final: bool) -> tuple[Any, None]:
    """Leaf of ``[dW_i V]`` side by side (kept)."""
    return _leaf(torch.cat([_scaled(f.U, f) @ (f.V.to(F64).T @ V) for f in facts], dim=1),
                 final), None


def _leaf_right(facts: list[Factorization], U: torch.Tensor, final: bool) -> tuple[Any, None]:
    """Leaf of ``[dW_i^T U]`` side by side (kept)."""
    return _leaf(torch.cat([_scaled(f.V, f) @ (f.U.to(F64).T @ U) for f in facts], dim=1),
                 final), None


def _leaf_kept(facts: list[Factorization], U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``sum_i C_i^2`` elementwise over a chunk."""
    return sum(c.pow(2) for c in cores(facts, U, V))


def cores(facts: list[Factorization], U: torch.Tensor, V: torch.Tensor) -> list[torch.Tensor]:
    """``C_i = U^T dW_i V`` for every factorization (float64)."""
    return [((U.T @ f.U.to(F64)) * f.S.to(F64)[None, :]) @ (f.V.to(F64).T @ V) for f in facts]


def _leaf_core_cuts(facts: list[Factorization], U: torch.Tensor, V: torch.Tensor
                    ) -> list[tuple[float, torch.Tensor]]:
    """For each of a chunk's factorizations: what its core ``C_i = U^T dW_i V`` keeps
    (``||C_i||^2``) and the order in which it would give up rows and columns
    (:func:`_trim_steps`)."""
    out = []
    for c in cores(facts, U, V):
        e = c.pow(2)
        out.append((float(e.sum()), _trim_steps(e)))
    return out


def core_cuts(facts: list[Factorization] | Parts, U: torch.Tensor, V: torch.Tensor,
              reducer: Reducer | None = None, chunk: int = CHUNK
              ) -> list[tuple[float, torch.Tensor]]:
    """Per holder (in holder order), for orthonormal bases: the energy its core keeps and its
    cut steps (:func:`_trim_steps`), computed where the chunks are (a map over them): what
    re-routing needs of a core, ``O(k)`` numbers instead of its ``k_U x k_V``."""
    parts = Parts.of(facts, reducer, chunk)
    return [c for out in parts.map(_leaf_core_cuts, U, V) for c in out]


def joint_basis(facts: list[Factorization] | Parts, reducer: Reducer | None = None,
                chunk: int = CHUNK) -> JointBasis:
    """The plain joint bases (SVD of the updates side by side and stacked), as a tall-skinny
    QR reduction over chunks of ``chunk`` adapters run by ``reducer`` (this process by
    default); the same chunking gives the same bytes wherever the chunks run."""
    parts = Parts.of(facts, reducer, chunk)
    leaves = parts.keep(_leaf_bases, parts.final)
    U, sU = _svd_of([h for h, _ in leaves], parts.reducer, 0)
    V, sV = _svd_of([h for h, _ in leaves], parts.reducer, 1)
    kept = torch.zeros(U.shape[1] + 1, V.shape[1] + 1, dtype=F64)
    if U.shape[1] and V.shape[1]:
        E = sum(parts.map(_leaf_kept, U, V))  # chunk sums, added in chunk order
        kept[1:, 1:] = E.cumsum(0).cumsum(1)
    energy = sum(e for _, e in leaves)
    return JointBasis(U, V, kept, energy, sU ** 2, sV ** 2)


TIED_MAX_FLOOR = 0.5  # a tied basis is computed where its floor is at most this share


def _leaf_sum(facts: list[Factorization], U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``sum_i U^T dW_i V`` over a chunk."""
    return sum(cores(facts, U, V))


def tied_basis(scaled: list[Factorization] | Parts, basis: JointBasis, weight: float,
               reducer: Reducer | None = None, chunk: int = CHUNK) -> TiedBasis | None:
    """The tied basis of a module name (:class:`TiedBasis`): ``scaled`` holds each holder's
    update times its weight, ``w_i dW_i`` (the factorizations the joint ``basis`` was
    computed from hold ``sqrt(w_i) dW_i``), ``weight = sum_i w_i``.  The weighted sum lies in
    the span of the joint bases, so ``sum_i w_i dW_i = U K V^T`` with ``K`` summed over the
    chunks (as the cores are) and its SVD that of ``K``.  None where the tied form's floor,
    ``sum_i w_i ||dW_i - M||^2`` (what no rank recovers), exceeds ``TIED_MAX_FLOOR`` of the
    holders' energy: adapters that differ (a zoo of unrelated ones) skip the SVD."""
    U, V = basis.U, basis.V
    if not U.shape[1] or not V.shape[1] or weight <= 0 or basis.energy <= 0:
        return None
    parts = Parts.of(scaled, reducer, chunk)
    K = sum(parts.map(_leaf_sum, U, V))  # chunk sums, added in chunk order
    if basis.energy - float(K.pow(2).sum()) / weight > TIED_MAX_FLOOR * basis.energy:
        return None
    a, s, bt = torch.linalg.svd(K, full_matrices=False)
    keep = s > 1e-12 * float(s.max()) if s.numel() else s > 0
    a, s, b = a[:, keep], s[keep], bt[keep].T
    root = (s / weight).sqrt()
    err = basis.energy - torch.cat([torch.zeros(1, dtype=F64), (s ** 2).cumsum(0)]) / weight
    return TiedBasis((U @ a) * root[None, :], (V @ b) * root[None, :], err.clamp(min=0))


def refine(facts: list[Factorization] | Parts, U: torch.Tensor, V: torch.Tensor, iters: int,
           tol: float = 1e-9, reducer: Reducer | None = None,
           chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Alternating least squares for bases of ``U.shape[1]`` and ``V.shape[1]`` columns
    (higher-order orthogonal iteration); returns the best ``(U, V, kept energy)`` seen,
    starting from ``(U, V)``.  Each half-step is a reduction like :func:`joint_basis`'s."""
    parts = Parts.of(facts, reducer, chunk)
    kU, kV = U.shape[1], V.shape[1]

    def kept(U: torch.Tensor, V: torch.Tensor) -> float:
        return float(sum(parts.map(_leaf_kept, U, V)).sum())

    best = (U, V, kept(U, V))
    for _ in range(iters):
        U = _svd_of([h for h, _ in parts.keep(_leaf_left, V, parts.final)],
                    parts.reducer)[0][:, :kU]
        V = _svd_of([h for h, _ in parts.keep(_leaf_right, U, parts.final)],
                    parts.reducer)[0][:, :kV]
        if U.shape[1] < kU or V.shape[1] < kV:
            break
        e = kept(U, V)
        if e > best[2]:
            improved = e > best[2] * (1 + tol)
            best = (U, V, e)
            if improved:
                continue
        break
    return best


@dataclass(frozen=True)
class ModulePlan:
    """What one module name gets: ``joint`` bases of ``k_U`` / ``k_V`` columns shared by
    ``holders`` (a ``k_U x k_V`` core each), ``shared_A`` (``k_V`` shared ``V`` columns),
    ``shared_B`` (``k_U`` shared ``U`` columns), ``tied`` (``k_U == k_V`` columns of the
    :class:`TiedBasis` that every holder routes to, no core), or ``private`` ranks per
    holder (each adapter's own top singular triplets)."""

    name: str
    holders: tuple[int, ...]
    mode: str  # joint | shared_A | shared_B | tied | private
    k_U: int = 0
    k_V: int = 0
    ranks: tuple[int, ...] = ()
    subsets: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    """``joint`` only: per holder, the ``U`` and ``V`` columns its core spans (its routes
    into the bases, a ``len(U cols) x len(V cols)`` core); empty: every holder spans all."""


def joint_params(k_U: torch.Tensor | int, k_V: torch.Tensor | int, d_in: int, d_out: int,
                 n: int) -> torch.Tensor | int:
    """Parameters of joint bases of ``k_U``/``k_V`` columns with ``n`` cores."""
    return k_U * d_out + k_V * d_in + n * k_U * k_V


def _joint_grid(b: JointBasis, n: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(err, params)`` over the grid of ranks ``(k_U, k_V)``; a joint module keeps at
    least one column on each side."""
    kU = torch.arange(b.kept.shape[0], dtype=F64)[:, None]
    kV = torch.arange(b.kept.shape[1], dtype=F64)[None, :]
    params = joint_params(kU, kV, d_in, d_out, n)
    err = b.energy - b.kept
    return err, params


def one_sided_params(mode: str, k: int, d_in: int, d_out: int, n: int) -> int:
    """Parameters of ``shared_A`` (``k`` shared ``A`` rows, ``n`` private ``B``) or ``shared_B``."""
    return k * (d_in + n * d_out) if mode == "shared_A" else k * (d_out + n * d_in)


def _coreless_tables(b: JointBasis, n: int, d_in: int, d_out: int
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per mode with one rank and no core (``shared_A``, ``shared_B``, and ``tied`` where
    the basis has a tied form), ``(err, params)`` over ``k = 0..K``."""
    out = {}
    for mode, gain in (("shared_A", b.gain_V), ("shared_B", b.gain_U)):
        kept = torch.cat([torch.zeros(1, dtype=F64), gain.cumsum(0)])
        ks = torch.arange(kept.numel(), dtype=F64)
        out[mode] = (b.energy - kept, ks * (d_in + n * d_out) if mode == "shared_A"
                     else ks * (d_out + n * d_in))
    if b.tied is not None:
        out["tied"] = (b.tied.err, torch.arange(b.tied.err.numel(), dtype=F64) * (d_in + d_out))
    return out


def _coreless_plan(name: str, holders: tuple[int, ...], mode: str, k: int) -> ModulePlan:
    """The plan of a mode of :func:`_coreless_tables` at rank ``k``."""
    return ModulePlan(name, holders, mode, k_U=0 if mode == "shared_A" else k,
                      k_V=0 if mode == "shared_B" else k)


def _joint_choice(grid: tuple[torch.Tensor, torch.Tensor], lam: float
                  ) -> tuple[int, int, float, float]:
    """``(k_U, k_V, err, params)`` minimizing ``err + lam * params`` (both ranks >= 1)."""
    err, params = grid
    obj = (err + lam * params)[1:, 1:]
    flat = int(torch.argmin(obj))  # first minimum: the smallest ranks among ties
    a, b = divmod(flat, obj.shape[1])
    return a + 1, b + 1, float(err[a + 1, b + 1]), float(params[a + 1, b + 1])


class _PrivateChoices:
    """One module's private ranks at a price per parameter ``lam``: each holder keeps the
    triplets whose gain beats ``lam * c`` (``c``: a triplet's params); every holder's rank
    from one comparison of the holders' gains side by side, each tail's sum computed once."""

    def __init__(self, gains: list[torch.Tensor], c: int) -> None:
        self.gains, self.c, self.tails = gains, c, {}
        self.table = torch.full((len(gains), max((g.numel() for g in gains), default=0)),
                                -math.inf, dtype=F64)
        for i, g in enumerate(gains):
            self.table[i, :g.numel()] = g

    def __call__(self, lam: float) -> tuple[tuple[int, ...], float, float]:
        """``(ranks, squared error left, params)`` at price ``lam``."""
        ranks = tuple(int(r) for r in (self.table > lam * self.c).sum(1).tolist())
        err = sum(self._tail(i, r) for i, r in enumerate(ranks))
        return ranks, err, float(sum(ranks) * self.c)

    def _tail(self, i: int, r: int) -> float:
        t = self.tails.get((i, r))
        if t is None:
            t = self.tails[i, r] = float(self.gains[i][r:].sum())
        return t


Spectra = tuple[dict[str, list[torch.Tensor]], dict[str, tuple[int, int]]]


def spectra(names: list[str], holders: dict[str, tuple[int, ...]],
            facts: list[dict[str, Factorization]]) -> Spectra:
    """Per module name, each holder's squared singular values (float64), and
    ``(d_in, d_out)``: all that the allocation needs of the factorizations."""
    gains = {n: [facts[i][n].S.to(F64) ** 2 for i in holders[n]] for n in names}
    shape = {n: (facts[holders[n][0]][n].d_in, facts[holders[n][0]][n].d_out) for n in names}
    return gains, shape


def allocate(names: list[str], holders: dict[str, tuple[int, ...]], spec: Spectra,
             bases: dict[str, JointBasis], budget: int,
             menus: dict[str, list[tuple[int, float, ModulePlan]]] | None = None
             ) -> tuple[list[ModulePlan], float]:
    """The plans of every module name under ``budget`` parameters: the best (lowest
    predicted error) of a price-based allocation, a greedy one and, where its table is small
    enough, the exact one (:func:`_knapsack`) (see the module docstring); returns the plans
    and the predicted total squared error (before refinement).  ``menus``: a dict to keep
    each module's options in (:func:`_module_options`, which do not depend on the budget)
    across calls with the same holders, spectra and bases."""
    found = [_by_price(names, holders, spec, bases, budget),
             _greedy(names, holders, spec, bases, budget)]
    exact = _knapsack(names, holders, spec, bases, budget, menus=menus)
    if exact is not None:
        found.append(exact)
    return min(found, key=lambda x: x[1])  # the first of equals: price, greedy, knapsack


def _greedy(names: list[str], holders: dict[str, tuple[int, ...]],
            spec: Spectra, bases: dict[str, JointBasis],
            budget: int) -> tuple[list[ModulePlan], float]:
    """Greedy by error decrease per parameter over every module's next step: one more
    column on either side (or both) of its joint bases, or one more private triplet; a
    module's first step decides its mode.  Steps whose gain per parameter can rise later
    (joint cores grow quadratically) are why this complements :func:`_by_price`."""
    gains, shape = spec
    state = {n: ["none", 0, 0, [0] * len(holders[n])] for n in names}
    left = budget
    err = sum(float(g.sum()) for n in names for g in gains[n])

    def next_step(n: str) -> tuple[float, float, int, tuple] | None:
        """(gain per param, gain, cost, move) of module n's best next step that fits."""
        mode, kU, kV, ranks = state[n]
        d_in, d_out = shape[n]
        best = None
        if mode in ("none", "joint") and n in bases:
            b, h = bases[n], len(holders[n])
            here = float(b.kept[kU, kV]) if mode == "joint" else 0.0
            steps = [(1, 1)] if mode == "none" else [(kU + 1, kV), (kU, kV + 1), (kU + 1, kV + 1)]
            for a, c in steps:
                if a < b.kept.shape[0] and c < b.kept.shape[1]:
                    gain = float(b.kept[a, c]) - here
                    cost = int(joint_params(a, c, d_in, d_out, h)) - (
                        int(joint_params(kU, kV, d_in, d_out, h)) if mode == "joint" else 0)
                    if gain > 0 and cost <= left and (best is None or gain / cost > best[0]):
                        best = (gain / cost, gain, cost, ("joint", a, c, None))
        for side, gk in (("shared_A", "gain_V"), ("shared_B", "gain_U")):
            if mode in ("none", side) and n in bases:
                g = getattr(bases[n], gk)
                k = (kV if side == "shared_A" else kU) if mode == side else 0
                cost = one_sided_params(side, 1, d_in, d_out, len(holders[n]))
                if k < g.numel() and float(g[k]) > 0 and cost <= left:
                    gain = float(g[k])
                    if best is None or gain / cost > best[0]:
                        best = (gain / cost, gain, cost, (side, k + 1, k + 1, None))
        if mode in ("none", "tied") and n in bases and bases[n].tied is not None:
            t = bases[n].tied.err
            k, cost = (kU if mode == "tied" else 0), d_in + d_out
            if k + 1 < t.numel() and cost <= left:
                gain = float(t[k]) - float(t[k + 1])
                if gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, gain, cost, ("tied", k + 1, k + 1, None))
        if mode in ("none", "private"):
            for j, (g, r) in enumerate(zip(gains[n], ranks)):
                cost = d_in + d_out
                if r < g.numel() and float(g[r]) > 0 and cost <= left:
                    gain = float(g[r])
                    if best is None or gain / cost > best[0]:
                        best = (gain / cost, gain, cost, ("private", 0, 0, j))
        return best

    # a module's best next step stays its best while it fits: the budget left only shrinks,
    # so only the module that moved and those whose step no longer fits are looked at again
    cached = {n: next_step(n) for n in names}
    while True:
        for n, m in cached.items():
            if m is not None and m[2] > left:
                cached[n] = next_step(n)
        moves = [(m, n) for n in names if (m := cached[n]) is not None]
        if not moves:
            break
        (_, gain, cost, (mode, a, c, j)), n = max(moves, key=lambda x: x[0][0])
        st = state[n]
        st[0] = mode
        if mode in ("joint", "tied"):
            st[1], st[2] = a, c
        elif mode == "shared_A":
            st[2] = c
        elif mode == "shared_B":
            st[1] = a
        else:
            st[3][j] += 1
        left -= cost
        err -= gain
        cached[n] = next_step(n)
    plans = [ModulePlan(n, holders[n], "private", ranks=tuple(state[n][3]))
             if state[n][0] in ("none", "private") else
             ModulePlan(n, holders[n], state[n][0], k_U=state[n][1], k_V=state[n][2])
             for n in names]
    return plans, max(err, 0.0)


def _by_price(names: list[str], holders: dict[str, tuple[int, ...]],
             spec: Spectra, bases: dict[str, JointBasis],
             budget: int) -> tuple[list[ModulePlan], float]:
    """Plans from one price per parameter (a Lagrangian relaxation of the budget)."""
    gains, shape = spec
    width = {n: sum(shape[n]) for n in names}
    grids = {n: _joint_grid(b, len(holders[n]), *shape[n])
             for n, b in bases.items() if b.kept.shape[0] > 1 and b.kept.shape[1] > 1}

    sided = {n: _coreless_tables(b, len(holders[n]), *shape[n]) for n, b in bases.items()
             if n in grids}
    private = {n: _PrivateChoices(gains[n], width[n]) for n in names}

    def one_sided(n: str, lam: float) -> dict[str, tuple[int, float, float]]:
        out = {}
        for mode, (err, params) in sided[n].items():
            k = int(torch.argmin(err + lam * params))
            out[mode] = (k, float(err[k]), float(params[k]))
        return out

    def plans(lam: float) -> tuple[list[ModulePlan], float, float]:
        out, err_total, params_total = [], 0.0, 0.0
        for n in names:
            ranks, perr, pparams = private[n](lam)
            plan = ModulePlan(n, holders[n], "private", ranks=ranks)
            best = (perr + lam * pparams, perr, pparams)
            if n in grids:
                kU, kV, jerr, jparams = _joint_choice(grids[n], lam)
                if jerr + lam * jparams < best[0]:
                    plan = ModulePlan(n, holders[n], "joint", k_U=kU, k_V=kV)
                    best = (jerr + lam * jparams, jerr, jparams)
                for mode, (k, oerr, oparams) in one_sided(n, lam).items():
                    if k and oerr + lam * oparams < best[0]:
                        plan = _coreless_plan(n, holders[n], mode, k)
                        best = (oerr + lam * oparams, oerr, oparams)
            out.append(plan)
            err_total += best[1]
            params_total += best[2]
        return out, err_total, params_total

    top = max([float(g[0]) / width[n] for n in names for g in gains[n] if g.numel()] +
              [float((b.energy - e).max() / p[1:, 1:].min()) for n, b in bases.items()
               if n in grids for e, p in [grids[n]]] +
              [float((bases[n].energy - e).max() / p[1]) for n in sided
               for e, p in sided[n].values() if p.numel() > 1], default=0.0)
    lo, hi = 0.0, top * 2 + 1e-300
    if plans(lo)[2] <= budget:
        hi = lo
    for _ in range(200):  # bisection on the price; params(lam) is non-increasing
        if hi - lo <= 1e-15 * hi:
            break
        mid = (lo + hi) / 2
        if plans(mid)[2] <= budget:
            hi = mid
        else:
            lo = mid
    chosen, err, params = plans(hi)
    return _fill(chosen, gains, width, budget - int(params), err)


def _fill(chosen: list[ModulePlan], gains: dict[str, list[torch.Tensor]],
          width: dict[str, int], left: int, err: float) -> tuple[list[ModulePlan], float]:
    """Spend what the price left over on the next private triplets, best gain per param first."""
    items = []
    for pos, p in enumerate(chosen):
        if p.mode != "private":
            continue
        for h, (g, r) in enumerate(zip(gains[p.name], p.ranks)):
            for j in range(r, g.numel()):
                if float(g[j]) > 0:
                    items.append((-float(g[j]) / width[p.name], pos, h, j))
    items.sort()
    ranks = {pos: list(p.ranks) for pos, p in enumerate(chosen)}
    for _, pos, h, j in items:
        c = width[chosen[pos].name]
        if c <= left and ranks[pos][h] == j:
            ranks[pos][h] += 1
            left -= c
            err -= float(gains[chosen[pos].name][h][j])
    out = [p if p.mode != "private" else
           ModulePlan(p.name, p.holders, "private", ranks=tuple(ranks[pos]))
           for pos, p in enumerate(chosen)]
    return out, max(err, 0.0)


KNAPSACK_CELLS = 1 << 16  # budget cells of the exact allocation (coarser units above)
KNAPSACK_WORK = 1 << 28  # cells x options it may visit, else it is not run


def _frontier(cost: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Indices of the options no cheaper (or equally cheap) option beats, by cost: strictly
    falling error (ties: the first listed)."""
    order = torch.sort(err, stable=True).indices
    order = order[torch.sort(cost[order], stable=True).indices]
    e = err[order]
    prev = torch.cat([torch.full((1,), math.inf, dtype=e.dtype), e.cummin(0).values[:-1]])
    return order[e < prev]


def _module_options(n: str, h: tuple[int, ...], gains: list[torch.Tensor], shape: tuple[int, int],
                    b: JointBasis | None) -> list[tuple[int, float, ModulePlan]]:
    """Every ``(params, predicted error, plan)`` of one module name on its cost/error
    frontier, by cost.  Private options take the best ``t`` triplets over all holders (each
    holder's gains fall, so the ``t`` largest are prefixes of each holder's)."""
    d_in, d_out = shape
    energy = float(sum(float(g.sum()) for g in gains))
    vals = torch.cat(gains) if gains else torch.zeros(0, dtype=F64)
    who = torch.cat([torch.full((g.numel(),), j) for j, g in enumerate(gains)]) if gains \
        else torch.zeros(0, dtype=torch.int64)
    top = torch.sort(-vals, stable=True).indices
    top = top[vals[top] > 0]
    t = torch.arange(top.numel() + 1)
    costs = [t * (d_in + d_out)]
    errs = [(energy - torch.cat([torch.zeros(1, dtype=F64), vals[top].cumsum(0)])).clamp(min=0)]
    kinds = [("private", t)]
    if b is not None and b.kept.shape[0] > 1 and b.kept.shape[1] > 1:
        err, params = _joint_grid(b, len(h), d_in, d_out)
        kU, kV = torch.meshgrid(torch.arange(1, err.shape[0]), torch.arange(1, err.shape[1]),
                                indexing="ij")
        costs.append(params[1:, 1:].reshape(-1).round().long())
        errs.append(err[1:, 1:].reshape(-1))
        kinds.append(("joint", torch.stack([kU.reshape(-1), kV.reshape(-1)], 1)))
        for mode, (err1, params1) in _coreless_tables(b, len(h), d_in, d_out).items():
            costs.append(params1[1:].round().long())
            errs.append(err1[1:])
            kinds.append((mode, torch.arange(1, err1.numel())))
    cost, errv = torch.cat([c.long() for c in costs]), torch.cat(errs)
    starts = torch.tensor([0] + [c.numel() for c in costs]).cumsum(0)
    out = []
    for i in _frontier(cost, errv).tolist():
        seg = int(torch.searchsorted(starts, i, right=True)) - 1
        mode, what = kinds[seg]
        x = what[i - int(starts[seg])]
        if mode == "private":
            ranks = torch.bincount(who[top[:int(x)]], minlength=len(gains))
            plan = ModulePlan(n, h, "private", ranks=tuple(int(r) for r in ranks))
        elif mode == "joint":
            plan = ModulePlan(n, h, "joint", k_U=int(x[0]), k_V=int(x[1]))
        else:
            plan = _coreless_plan(n, h, mode, int(x))
        out.append((int(cost[i]), float(errv[i]), plan))
    return out


def _knapsack(names: list[str], holders: dict[str, tuple[int, ...]],
              spec: Spectra, bases: dict[str, JointBasis],
              budget: int, cells: int = KNAPSACK_CELLS, work: int = KNAPSACK_WORK,
              menus: dict[str, list[tuple[int, float, ModulePlan]]] | None = None
              ) -> tuple[list[ModulePlan], float] | None:
    """The exact allocation: one option per module name (mode and ranks) minimizing the
    predicted total error within ``budget`` (a multiple-choice knapsack, by dynamic
    programming over the budget).  Costs are counted in units of
    ``ceil(budget / cells)`` parameters (rounded up, so the plans always fit; exact when the
    unit is 1); None when the table would exceed ``work`` cell visits."""
    if budget <= 0:
        return None
    gains, shape = spec
    kept = {} if menus is None else menus
    for n in names:
        if n not in kept:
            kept[n] = _module_options(n, holders[n], gains[n], shape[n], bases.get(n))
    menus = [kept[n] for n in names]
    unit = max(1, -(-budget // cells))
    size = budget // unit + 1
    if size * sum(len(m) for m in menus) > work:
        return None
    best = torch.zeros(size, dtype=F64)  # least error of the modules so far at cost <= b
    picks = []
    for menu in menus:
        new = torch.full((size,), math.inf, dtype=F64)
        arg = torch.zeros(size, dtype=torch.int32)
        for j, (c, e, _) in enumerate(menu):
            u = -(-c // unit)
            if u >= size:
                break  # the menu is by cost
            cand = best[:size - u] + e
            better = cand < new[u:]
            new[u:] = torch.where(better, cand, new[u:])
            arg[u:] = torch.where(better, torch.tensor(j, dtype=torch.int32), arg[u:])
        best = new
        picks.append(arg)
    b, chosen = size - 1, []
    for menu, arg in zip(reversed(menus), reversed(picks)):
        c, _, plan = menu[int(arg[b])]
        chosen.append(plan)
        b -= -(-c // unit)
    chosen.reverse()
    used = sum(plan_params(p, shape[p.name]) for p in chosen)
    width = {n: sum(shape[n]) for n in names}
    return _fill(chosen, gains, width, budget - used, float(best[-1]))


def plan_params(p: ModulePlan, shape: tuple[int, int]) -> int:
    """Parameters of a module's plan (``shape``: ``(d_in, d_out)``), cores as routed."""
    d_in, d_out = shape
    if p.mode == "joint" and p.subsets:
        return p.k_U * d_out + p.k_V * d_in + sum(len(u) * len(v) for u, v in p.subsets)
    if p.mode == "joint":
        return int(joint_params(p.k_U, p.k_V, d_in, d_out, len(p.holders)))
    if p.mode in ("shared_A", "shared_B"):
        return one_sided_params(p.mode, p.k_V or p.k_U, d_in, d_out, len(p.holders))
    if p.mode == "tied":
        return p.k_U * (d_in + d_out)
    return sum(p.ranks) * (d_in + d_out)


def _trim_steps(E: torch.Tensor) -> torch.Tensor:
    """How one core gives up rows and columns: repeatedly the row or column whose energy (in
    ``E = C^2``) per parameter freed is least (a row first among equals, then the lowest
    index), down to ``1 x 1``.  One row per step, float64: the parameters freed, the energy
    lost, the side (0: a row, a ``U`` column of the basis; 1: a column, a ``V`` column) and
    its index.  Row and column sums are kept up to date as they go (``O(k^2)``)."""
    e = E.tolist()
    rows, cols = list(range(E.shape[0])), list(range(E.shape[1]))
    rs = [sum(r) for r in e]
    cs = [sum(e[i][j] for i in rows) for j in cols]
    out = []
    while len(rows) * len(cols) > 1:
        cand = []
        if len(rows) > 1:
            a = min(rows, key=lambda i: rs[i])
            cand.append((rs[a] / len(cols), 0, a, rs[a], len(cols)))
        if len(cols) > 1:
            b = min(cols, key=lambda j: cs[j])
            cand.append((cs[b] / len(rows), 1, b, cs[b], len(rows)))
        _, side, k, lost, freed = min(cand)
        if side == 0:
            rows.remove(k)
            for j in cols:
                cs[j] -= e[k][j]
        else:
            cols.remove(k)
            for i in rows:
                rs[i] -= e[i][k]
        out.append((freed, lost, side, k))
    return torch.tensor(out, dtype=F64).reshape(-1, 4)


def route_cores(plans: list[ModulePlan], cuts: dict[str, list[tuple[float, torch.Tensor]]],
                excess: int) -> tuple[list[ModulePlan], float] | None:
    """Re-routing: free at least ``excess`` parameters from the joint modules' cores, each
    holder's core giving up the rows and columns (basis columns it stops routing to) that
    keep least of its update per parameter, least first over every core of the group
    (``cuts``: per joint module name, each holder's :func:`core_cuts`).  Returns the plans
    with ``subsets`` where a core was cut, and the energy given up; None if the cores cannot
    free that much."""
    seqs, where = [], []
    for p in plans:
        if p.mode == "joint":
            for h, (_, steps) in enumerate(cuts[p.name]):
                seqs.append(steps)
                where.append((p, h))

    def entry(i: int, j: int) -> tuple[float, int, int]:
        freed, lost = seqs[i][j, 0].item(), seqs[i][j, 1].item()
        return lost / freed, i, j

    heap = [entry(i, 0) for i, s in enumerate(seqs) if s.shape[0]]
    heapq.heapify(heap)
    taken = [0] * len(seqs)
    lost = 0.0
    while excess > 0 and heap:
        _, i, j = heapq.heappop(heap)
        excess -= int(seqs[i][j, 0].item())
        lost += seqs[i][j, 1].item()
        taken[i] = j + 1
        if j + 1 < seqs[i].shape[0]:
            heapq.heappush(heap, entry(i, j + 1))
    if excess > 0:
        return None
    cut: dict[str, dict[int, tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for (p, h), s, t in zip(where, seqs, taken):
        if t:
            gone = {(int(side), int(k)) for side, k in s[:t, 2:].tolist()}
            cut.setdefault(p.name, {})[h] = (
                tuple(r for r in range(p.k_U) if (0, r) not in gone),
                tuple(c for c in range(p.k_V) if (1, c) not in gone))
    out = []
    for p in plans:
        if p.name in cut:
            full = (tuple(range(p.k_U)), tuple(range(p.k_V)))
            p = replace(p, subsets=tuple(cut[p.name].get(h, full)
                                         for h in range(len(p.holders))))
        out.append(p)
    return out, lost


@dataclass(frozen=True)
class PartialColumn:
    """One more column for a joint module's ``U`` (``side = "U"``) or ``V`` basis, nonzero
    on ``shards`` of its ``nc`` shards only (the others route to a zero shard): what a
    budget too small for a whole column buys.  ``column`` is that vector (``d``, unit norm,
    zeros outside ``shards``); ``gain`` the energy it adds to what the cores keep (least
    squares against the bases with it)."""

    side: str
    nc: int
    shards: tuple[int, ...]
    column: torch.Tensor
    gain: float


def outside(facts: list[Factorization] | Parts, U: torch.Tensor, V: torch.Tensor, side: str,
            reducer: Reducer | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """``X`` with ``X X^T`` the part of ``sum_i dW_i V V^T dW_i^T`` (side ``U``; side ``V``:
    ``sum_i dW_i^T U U^T dW_i``) outside the basis being extended, for orthonormal ``U``,
    ``V``: what one more column on that side could add to the cores.  One reduction over
    the chunks, like a half-step of :func:`refine`."""
    parts = Parts.of(facts, reducer, chunk)
    Q, other = (U, V) if side == "U" else (V, U)
    leaf = _leaf_left if side == "U" else _leaf_right
    W, s = _svd_of([h for h, _ in parts.keep(leaf, other, parts.final)], parts.reducer)
    X = W * s[None, :]
    return X - Q @ (Q.T @ X)


def partial_column(X: torch.Tensor, Q: torch.Tensor, side: str,
                   shapes: list[tuple[int, int]]) -> PartialColumn | None:
    """The column to add to the basis ``Q`` (orthonormal, side ``U`` or ``V``) of a joint
    module whose remaining part on that side is ``X`` (:func:`outside`), among columns of
    ``n`` of ``nc`` shards for each ``(nc, n)`` in ``shapes``: the shape whose top-``n``
    shards hold most of the best whole column's gain, those shards, then the best vector on
    them (exact for that support: the top generalized eigenvector of ``X_S X_S^T`` against
    ``I - Q_S Q_S^T``).  Its gain is at most a whole column's, the top squared singular
    value of ``X``.  None when nothing is left outside the basis."""
    if not X.numel() or not shapes or float(X.pow(2).sum()) <= 0:
        return None
    top = _left_svd(X)[0][:, 0]
    d = X.shape[0]
    best = None
    for nc, n in shapes:
        en = top.pow(2).reshape(nc, d // nc).sum(1)
        order = en.argsort(descending=True, stable=True)[:n]
        kept = float(en[order].sum())
        if best is None or kept > best[0]:
            best = (kept, nc, tuple(sorted(int(j) for j in order)))
    _, nc, shards = best
    width = d // nc
    rows = torch.cat([torch.arange(j * width, (j + 1) * width) for j in shards])
    XS, QS = X[rows], Q[rows]
    # whiten by N = I - Q_S Q_S^T (what is outside the basis, on the support): with
    # Q_S = P diag(c) R^T, N^(-1/2) = I + P diag((1 - c^2)^(-1/2) - 1) P^T; the best x is
    # N^(-1/2) y for y the top left singular vector of N^(-1/2) X_S (small: k and X's width)
    P, c, _ = torch.linalg.svd(QS, full_matrices=False)
    f = (1 - c.pow(2)).clamp(min=1e-12).rsqrt() - 1

    def root(Z: torch.Tensor) -> torch.Tensor:  # N^(-1/2) Z
        return Z + P @ (f[:, None] * (P.T @ Z))

    x = root(_left_svd(root(XS))[0][:, :1])[:, 0]
    column = torch.zeros(d, dtype=F64)
    column[rows] = x / x.norm()
    new = column - Q @ (Q.T @ column)  # its part outside the basis: what it adds
    if float(new.norm()) <= 1e-9:
        return None
    return PartialColumn(side, nc, shards, column,
                         float((new @ X).pow(2).sum() / new.pow(2).sum()))
