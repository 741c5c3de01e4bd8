"""Zoos: the adapters of one base model fitted together, with bases shared across them
(tensors in, shared pools and per-adapter MoS adapters out; no I/O).

Adapters of one project share structure (one run's checkpoints, one curriculum's stages,
adapters trained from one seed).  Per module name, :mod:`mosconv.fit.joint` computes a
joint left and right basis over the adapters that hold it; each adapter keeps a small core
``C_i`` (``dW_i ~ U C_i V^T``, MoS format v2), or, where sharing does not pay for a module,
its own truncation.  One price per parameter decides, for every module name, between the
two and the rank, under the group budget ``sum(lora_params) / ratio``; the joint bases are
then refined by alternating least squares on the exact error.

Stored as MoS: the bases are pool rows every holder routes to (``U`` columns in the B-pool,
``V`` columns in the A-pool, nc = 1), written once per group in a pool file; an adapter's own
file holds its cores and its private shards.  Each adapter converted alone (as ``compress``
does) is computed too: a member the joint fit leaves worse off than that weighs more in the
fit, or leaves the group, so no member is worse off; and the group keeps whichever has the
lower total error, so the joint fit never makes the group worse than converting each adapter
on its own.

Members are held in chunks (:class:`Chunk`: adapters, factorizations, alone conversions)
where a reducer keeps them: this process, or Ray's object store.  The fit itself
(:func:`fit_chunks`) sees each member's spectra and reports only; the reductions of the joint
bases and the building and measuring of each member run as tasks on the chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import __version__
from .._threads import one_thread
from ..errors import ConfigError
from ..lora.types import LoraAdapter, LoraModule
from ..mos.quant import Storage, StorageOverflow
from ..mos.types import KindPools, MosAdapter, MosModule
from ..names import kind_ids
from .convert import ConvertConfig, ConvertResult, convert, source_info
from .factorize import Factorization, factorize_adapter
from .joint import (
    CHUNK,
    LOCAL,
    JointBasis,
    ModulePlan,
    Parts,
    Reducer,
    allocate,
    core_cuts,
    joint_basis,
    outside,
    partial_column,
    plan_params,
    refine,
    route_cores,
    tied_basis,
)
from .measure import Baseline, build_report
from .report import KindStructure, Report, Settings
from .storage import row_bytes, stored_values
from .truncation import budget_for_ratio, floor_div, truncate

F64 = torch.float64


@dataclass(frozen=True, kw_only=True)
class GroupTotals:
    """A group's totals: its budget and the errors of both modes at that budget.

    Attributes:
        mode: the mode kept (``shared`` or ``independent``).
        mos_params: params of the kept mode (in shared mode: pool file once + own files).
        pool_params, local_params: shared mode only: the pool file's and the adapters' own.
    """

    lora_params: int
    budget: int
    adapters: int
    independent_relative_error: float
    shared_relative_error: float
    independent_params: int
    shared_params: int
    mode: str
    mos_params: int
    pool_params: int | None = None
    local_params: int | None = None
    joint_modules: int = 0  # module names fitted with shared bases (the others: private)
    modules: int = 0
    joint_members: int = 0  # members the pools serve; the others gain nothing, converted alone


@dataclass(frozen=True)
class GroupResult:
    """Outcome of fitting one group of adapters jointly.

    Attributes:
        mode: ``shared`` (pools in ``shared_pools``) or ``independent`` (truncation won).
        adapters: one MoS adapter per input, in input order; in shared mode each kind's
            ``shared`` ref has ``n_A`` entries that live in ``shared_pools``.
        reports: one report per adapter (errors against its own source).
        shared_pools: tensor name -> tensor, the content of the group's pool file (float32
            tensors holding the values ``storage`` stores).
        totals: group totals: params, budget, errors of both modes.
        storage: how the pools, cores and the adapters' own shards are stored.
    """

    mode: str
    adapters: list[MosAdapter]
    reports: list[Report]
    totals: GroupTotals
    shared_pools: dict[str, torch.Tensor] = field(default_factory=dict)
    storage: Storage = field(default_factory=Storage)


def group_key(adapter: LoraAdapter) -> str:
    """Adapters are grouped by base model and the shapes of their module kinds."""
    kinds = sorted(adapter.kinds)
    return f"{adapter.base_model or 'unknown'}|" + ";".join(kinds)


def check_group(adapters: list[LoraAdapter]) -> None:
    """Raise :class:`ConfigError` unless ``adapters`` can be fitted as one group: at least
    one, all with the same module kinds (names and shapes)."""
    if not adapters:
        raise ConfigError("a group needs at least one adapter, got none")
    first = sorted(adapters[0].kinds)
    for i, a in enumerate(adapters[1:], 1):
        if sorted(a.kinds) != first:
            bases = f" (base models {adapters[0].base_model or 'unknown'} and " \
                    f"{a.base_model or 'unknown'})" if a.base_model != adapters[0].base_model \
                else ""
            raise ConfigError(f"adapters 0 and {i} have different module kinds{bases}: a group "
                              "shares bases between adapters of one base model and targets")


def alone_config(ratio: float, seed: int = 0, search: str = "fast", iters: int = 4,
                 routing_weights: bool = True, storage: Storage | None = None) -> ConvertConfig:
    """How a member is converted alone, for the comparison (exactly as ``compress`` does,
    stored like the group: ``storage``, float32 by default)."""
    st = storage or Storage()
    return ConvertConfig(ratio=float(ratio), seed=seed, search=search, iters=iters,
                         routing_weights=routing_weights, dtype=st.dtype,
                         quantize=st.quantize, group=st.group)


def group_storages(sources: list[str], dtype: str = "auto", quantize: str = "none",
                   group: int = 64, size_ratio: float | None = None) -> list[Storage]:
    """How a group may be stored (its pool file, its members' cores and own shards): as
    ``compress`` chooses for one adapter (:meth:`ConvertConfig.storages`), for the members'
    source dtypes ``sources`` (:attr:`LoraAdapter.dtype` each; ``auto`` keeps the widest
    where they differ: float32, also for float16 with bfloat16).  One storage unless
    ``size_ratio`` leaves a choice (``dtype``/``quantize`` ``auto``).

    Raises:
        ConfigError: settings ``compress`` refuses (``quantize auto`` without a size ratio).
    """
    cfg = ConvertConfig(dtype=dtype, quantize=quantize, group=group, size_ratio=size_ratio)
    cfg.validate()
    return cfg.storages_for("/".join(sources))


# ---------------------------------------------------------------- members held in chunks


@dataclass(frozen=True)
class Chunk:
    """Members of a group held together where a reducer keeps them (this process, or Ray's
    object store): the adapters, their exact factorizations and each converted alone.  The
    process that fits the group sees only their :class:`MemberInfo`."""

    adapters: list[LoraAdapter]
    facts: list[dict[str, Factorization]]
    alone: list[ConvertResult]


@dataclass(frozen=True)
class MemberInfo:
    """What fitting a group needs of one member: its spectra and its alone conversion's
    report, no other tensor.

    Attributes:
        modules: ``(name, kind, d_in, d_out)`` per module, in the adapter's order.
        gains: squared singular values of each module's update (float64).
    """

    params: int
    modules: tuple[tuple[str, str, int, int], ...]
    kinds: tuple[str, ...]
    gains: dict[str, torch.Tensor]
    energy: float
    alone: Report
    alone_local_params: int
    tensor_bytes: int = 0  # the source's LoRA factors as stored


def make_chunk(sources: list, config: ConvertConfig,
               facts: list[dict[str, Factorization]] | None = None,
               load: Callable[[Any], LoraAdapter] | None = None
               ) -> tuple[Chunk, list[MemberInfo]]:
    """A chunk of members (``sources``: adapters, or what ``load`` reads them from),
    factorized and converted alone, and what the fitting process needs of them."""
    adapters = [load(x) for x in sources] if load is not None else list(sources)
    facts = list(facts) if facts is not None else [factorize_adapter(a) for a in adapters]
    alone = [convert(a, config, factorizations=fa) for a, fa in zip(adapters, facts)]
    infos = [MemberInfo(params=a.params,
                        modules=tuple((m.name, m.kind, m.d_in, m.d_out) for m in a.modules),
                        kinds=tuple(a.kinds),
                        gains={n: f.S.to(F64) ** 2 for n, f in fa.items()},
                        energy=sum(f.energy for f in fa.values()), alone=r.report,
                        alone_local_params=r.mos.local_params, tensor_bytes=a.tensor_bytes)
             for a, fa, r in zip(adapters, facts, alone)]
    return Chunk(adapters, facts, alone), infos


def _select(chunk: Chunk, name: str, sel: tuple[tuple[int, float], ...]) -> list[Factorization]:
    """The factorizations of module ``name`` of a chunk's members ``(position, weight)``."""
    return [chunk.facts[j][name] if w == 1.0 else _weighted(chunk.facts[j][name], w)
            for j, w in sel]


@dataclass(frozen=True)
class ChunkedFit:
    """A group fitted over members held in chunks (:func:`fit_chunks`).

    Attributes:
        reports: one per member, in member order.
        built: per chunk, the handle of its members as the joint fit built them (a list
            over the chunk's members of :class:`Built`, None for a member converted alone),
            or None (all alone; so in ``independent`` mode).
    """

    mode: str
    reports: list[Report]
    totals: GroupTotals
    shared_pools: dict[str, torch.Tensor]
    built: list[Any]
    storage: Storage = field(default_factory=Storage)  # of the pools and the members' own


def fit_group(adapters: list[LoraAdapter], ratio: float, seed: int = 0,
              factorizations: list[dict[str, Factorization]] | None = None,
              search: str = "fast", iters: int = 4,
              routing_weights: bool = True, refine_iters: int = 10,
              reducer: Reducer | None = None, chunk: int = CHUNK,
              dtype: str = "auto", quantize: str = "none",
              size_ratio: float | None = None) -> GroupResult:
    """Convert ``adapters`` (same base model and kinds) with bases shared across them.

    The alternative is each adapter converted on its own (exactly what ``compress`` and a
    plain ``batch`` give, with ``search``/``iters``/``routing_weights``): no member ends worse
    off than that (see the module docstring), and the group keeps whichever has the lower
    total error (measured on the stored tensors), so ``--shared-pool`` is never worse
    than converting independently, for the group or for any member.  ``dtype``/``quantize``:
    how pools, cores and own shards are stored, both ways (:func:`group_storages`; cores and
    own parts are least squares against the bases as stored).  ``size_ratio``: the budget in
    bytes instead (:func:`fit_chunks_sized`; ``ratio`` is then not used).  ``refine_iters``:
    alternating least-squares rounds per joint module.  The pool file tensors are named
    ``<kind id>.A`` / ``<kind id>.B`` (kind ids ``k0, k1, ...`` in the order of the first
    adapter's kinds).  The members are held in chunks of ``chunk`` adapters by ``reducer``
    (this process by default), where each is factorized, converted alone and built; the
    joint bases are reductions over those chunks (:func:`mosconv.fit.joint.joint_basis`).

    Raises:
        ConfigError: no adapters, adapters whose module kinds differ (other base models or
            other target modules: ``batch`` groups by :func:`group_key`), bad settings.
    """
    check_group(adapters)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    red = reducer or LOCAL
    storages = group_storages([a.dtype for a in adapters], dtype, quantize,
                              size_ratio=size_ratio)
    handles, fit = fit_members(adapters, storages, ratio, seed, search, iters, routing_weights,
                               dtype, quantize, size_ratio, refine_iters, red, chunk,
                               factorizations)
    mos_list = []
    for h, b in zip(handles, fit.built):
        ch, built = red.get(h), None if b is None else red.get(b)
        mos_list += [r.mos if built is None or built[j] is None else built[j].adapter()
                     for j, r in enumerate(ch.alone)]
    return GroupResult(fit.mode, mos_list, fit.reports, fit.totals, fit.shared_pools, fit.storage)


def fit_members(sources: list, storages: list[Storage], ratio: float, seed: int = 0,
                search: str = "fast", iters: int = 4, routing_weights: bool = True,
                dtype: str = "auto", quantize: str = "none", size_ratio: float | None = None,
                refine_iters: int = 10, reducer: Reducer | None = None, chunk: int = CHUNK,
                factorizations: list[dict[str, Factorization]] | None = None,
                load: Callable[[Any], LoraAdapter] | None = None
                ) -> tuple[list[Any], ChunkedFit]:
    """Hold a group's members in chunks of ``chunk`` where ``reducer`` keeps them
    (:func:`make_chunk`: ``sources`` are adapters, or what ``load`` reads them from), each
    converted alone, and fit the group from there: in ``storages[0]`` at ``ratio``
    (:func:`fit_chunks`), or under ``size_ratio`` (:func:`fit_chunks_sized`; each member
    alone as ``compress --size-ratio`` with ``dtype``/``quantize`` does).  Returns the
    chunks' handles and the fit."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    red = reducer or LOCAL
    if size_ratio is None:
        cc = alone_config(ratio, seed, search, iters, routing_weights, storages[0])
    else:  # each member alone at its own byte budget, in the storage that serves it best
        cc = ConvertConfig(ratio=float(ratio), seed=seed, search=search, iters=iters,
                           routing_weights=routing_weights, dtype=dtype, quantize=quantize,
                           size_ratio=size_ratio)
    spans = [(s, s + chunk) for s in range(0, len(sources), chunk)]
    kept = red.keep(make_chunk, [(sources[a:b], cc, None if factorizations is None
                                  else factorizations[a:b], load) for a, b in spans])
    fit = fit_chunks(kept, ratio, seed, refine_iters, red, storages[0]) if size_ratio is None \
        else fit_chunks_sized(kept, size_ratio, storages, seed, refine_iters, red)
    return [h for h, _ in kept], fit


def fit_chunks(kept: list[tuple[Any, list[MemberInfo]]], ratio: float, seed: int = 0,
               refine_iters: int = 10, reducer: Reducer | None = None,
               storage: Storage | None = None, remainder: bool = True) -> ChunkedFit:
    """Fit a group whose members ``reducer`` holds in chunks: ``kept`` is what
    ``reducer.keep(make_chunk, ...)`` returned (per chunk, its handle and its members'
    :class:`MemberInfo`; members are numbered chunk after chunk), their alone conversions
    stored in ``storage`` (float32 by default) like the group's pools and cores.  This
    process holds the
    members' spectra, the bases and the reports, never their factorizations: every step that
    reads those runs on the chunks (leaves of the reductions, building and measuring each
    member).  ``remainder=False`` leaves the budget a whole column does not fit in unspent
    (:func:`_remainder`; as under a byte budget)."""
    red = reducer or LOCAL
    storage = storage or Storage()
    handles = [h for h, _ in kept]
    infos = [i for _, part in kept for i in part]
    index = [(c, j) for c, (_, part) in enumerate(kept) for j in range(len(part))]
    total_params = sum(m.params for m in infos)
    budget = budget_for_ratio(total_params, ratio)
    energy = sum(m.energy for m in infos)
    indep_err = _group_error(m.alone for m in infos)
    indep_params = sum(m.alone.totals.mos_params for m in infos)

    # the joint fit, over the members it serves. The group budget is spent where the group's
    # error drops most, which can leave one member worse off than converted alone: such a
    # member's error then weighs more in the fit (doubled, a few rounds), and a member still
    # worse off leaves the group (converted alone) and the others are fitted again.
    members = list(range(len(infos)))
    weights = [1.0] * len(infos)
    rounds = 0
    while True:
        pools, built, rep_sub, local_sub, setup = _joint(
            handles, infos, index, members, ratio, seed, refine_iters,
            [weights[i] for i in members], red, storage)
        losers = _losers(members, rep_sub, infos)
        if not losers or not pools:
            break
        if len(losers) == len(members):
            # every member worse off: doubling every weight scales the fit's objective
            # uniformly (the same fit, up to rounding), so the rounds would end with all of
            # them left out; skip to that
            pools = {}
            break
        rounds += 1
        if rounds <= 6:
            for i in losers:
                weights[i] *= 2.0
            continue
        members = [i for i in members if i not in losers]
        if len(members) < 2:
            pools = {}
            break
    plans, fitted = setup.plans, setup.fitted
    routed = _rerouted(setup, refine_iters) if pools else None
    if routed is not None:
        # re-routing the fit the members and weights settled on: kept where it lowers their
        # error as stored and leaves none of them worse off than alone
        alt = _built(handles, infos, index, setup, *routed, ratio, seed, red, storage)
        if _group_error(alt[2]) < _group_error(rep_sub) and not _losers(members, alt[2], infos):
            pools, built, rep_sub, local_sub = alt
            plans, fitted = routed
    # the joint members within their budget (a member converted alone is within its own)
    joint_budget = budget_for_ratio(sum(infos[i].params for i in members), ratio)
    left = joint_budget - sum(t.numel() for t in pools.values()) - sum(local_sub)
    filled = _remainder(setup, plans, fitted, left, storage, infos) \
        if pools and remainder else None
    if filled is not None:
        # the budget a whole column no longer fits in: a column on some of its shards
        alt = _built(handles, infos, index, setup, filled[0], filled[1], ratio, seed, red,
                     storage, filled[2])
        used = sum(t.numel() for t in alt[0].values()) + sum(alt[3])
        if (_group_error(alt[2]) < _group_error(rep_sub) and not _losers(members, alt[2], infos)
                and used <= joint_budget):
            pools, built, rep_sub, local_sub = alt
            plans = filled[0]
    reports = [m.alone for m in infos]
    local_of = [m.alone_local_params for m in infos]
    if pools:
        for i, r, lp in zip(members, rep_sub, local_sub):
            reports[i], local_of[i] = r, lp
    pool_params = sum(t.numel() for t in pools.values())
    local = sum(local_of)
    shared_err = _group_error(reports)
    if pools and pool_params + sum(local_sub) > joint_budget:
        raise AssertionError(f"internal error: joint fit uses {pool_params + sum(local_sub)} "
                             f"> {joint_budget}")
    totals = GroupTotals(lora_params=total_params, budget=budget, adapters=len(infos),
                         independent_relative_error=indep_err,
                         shared_relative_error=shared_err, independent_params=indep_params,
                         shared_params=pool_params + local, mode="independent",
                         mos_params=indep_params,
                         joint_modules=sum(1 for p in plans if p.mode != "private") if pools else 0,
                         modules=len(plans), joint_members=len(members) if pools else 0)
    if not pools or shared_err >= indep_err or energy <= 0:
        return ChunkedFit("independent", [m.alone for m in infos], totals, {},
                          [None] * len(handles), storage)
    return ChunkedFit("shared", reports,
                      replace(totals, mode="shared", pool_params=pool_params,
                              local_params=local, mos_params=pool_params + local),
                      pools, built, storage)


def fit_chunks_sized(kept: list[tuple[Any, list[MemberInfo]]], size_ratio: float,
                     storages: list[Storage], seed: int = 0, refine_iters: int = 10,
                     reducer: Reducer | None = None) -> ChunkedFit:
    """:func:`fit_chunks` under a byte budget: the group's tensors (its pool file once and
    its members' own, routes and scales included) <= the members' LoRA tensor bytes /
    ``size_ratio``, at the largest parameter budget whose bytes fit (shrunk until they do).
    The storage: of ``storages`` (:func:`group_storages`), the one that serves the members
    best converted alone at this byte ratio (the lowest energy-weighted error over their
    ``size_choices``; a group fit costs several of those conversions); without those
    choices, each storage is fitted and the lowest group error wins (ties: fewer bytes).
    The members' alone conversions in ``kept`` should be made under the same ``size_ratio``
    (each at its own byte budget, as ``compress --size-ratio`` does)."""
    infos = [i for _, part in kept for i in part]
    storages = _best_alone(storages, infos)
    total = sum(m.params for m in infos)
    limit = floor_div(sum(m.tensor_bytes for m in infos), size_ratio)
    shapes = {(d_in, d_out) for m in infos for _, _, d_in, d_out in m.modules}
    found = []
    for st in storages:
        per_param = max(row_bytes(st, d_in, d_out) / (d_in + d_out) for d_in, d_out in shapes)
        budget = int(limit / per_param)
        for step in range(8):  # routes and scales: shrink until the bytes fit
            if budget < 1:
                break
            try:
                # no remainder: its routes cost bytes to spend the last parameters, and
                # bytes are the budget here
                fit = fit_chunks(kept, total / budget, seed, refine_iters, reducer, st,
                                 remainder=False)
            except StorageOverflow:
                break
            used, t = _fit_bytes(fit), fit.totals
            if used <= limit:
                err = t.shared_relative_error if fit.mode == "shared" \
                    else t.independent_relative_error
                found.append((err, used, len(found), fit))
                break
            # below the parameters the fit used (a plan may leave some of its budget), by
            # the bytes over, more each round
            budget = min(budget, t.mos_params) - (2 ** step) * max(
                1, math.ceil((used - limit) / per_param))
    if not found:
        raise ConfigError(f"size ratio {size_ratio:g}: no storage fits the group in "
                          f"{limit} bytes", options=("size_ratio",))
    best = min(found, key=lambda x: x[:3])[3]
    reports = [r if r is m.alone else sized_report(r, m.alone, size_ratio)
               for r, m in zip(best.reports, infos)]
    return replace(best, reports=reports)


def sized_report(report: Report, alone: Report, size_ratio: float) -> Report:
    """A group member's report under a byte budget: the byte ratio asked for, and the
    baseline at equal bytes of its alone conversion ``alone`` (made under ``size_ratio``)."""
    a = alone.totals
    return replace(report, totals=replace(
        report.totals, size_ratio=float(size_ratio), size_budget_bytes=a.size_budget_bytes,
        truncation_equal_bytes_relative_error=a.truncation_equal_bytes_relative_error,
        truncation_equal_bytes_params=a.truncation_equal_bytes_params,
        truncation_equal_bytes_tensor_bytes=a.truncation_equal_bytes_tensor_bytes))


def _best_alone(storages: list[Storage], infos: list[MemberInfo]) -> list[Storage]:
    """``[the storage with the lowest energy-weighted alone error]`` over the members'
    ``size_choices`` (each storage's best conversion of that member; a storage some member
    could not be converted in at its byte budget is not a candidate), or ``storages`` when
    no storage has a choice for every member."""
    if len(storages) < 2:
        return storages
    errs: dict[Storage, float] = {}
    for st in storages:
        total: float | None = 0.0
        for m in infos:
            hit = [c["relative_error"] for c in m.alone.totals.size_choices or ()
                   if c["dtype"] == st.dtype and c["quantize"] == st.quantize]
            if not hit:
                total = None
                break
            total += m.energy * hit[0] ** 2
        if total is not None:
            errs[st] = total
    return [min(errs, key=errs.__getitem__)] if errs else storages


def group_bytes(shared_pools: dict[str, torch.Tensor], storage: Storage,
                reports: list[Report]) -> tuple[int, int]:
    """Tensor bytes of a fitted group as stored: ``(its pool file's, its members' own)``
    (``GroupResult`` or ``ChunkedFit`` fields)."""
    pools = sum(storage.value_bytes(*t.shape) + storage.scale_bytes(*t.shape)
                for t in shared_pools.values())
    return pools, sum(r.totals.mos_tensor_bytes or 0 for r in reports)


def _fit_bytes(fit: ChunkedFit) -> int:
    return sum(group_bytes(fit.shared_pools, fit.storage, fit.reports))


@dataclass(frozen=True)
class _Setup:
    """A joint fit of some members before it is built: what allocating needs (spectra,
    shapes, the reduction leaves and joint bases of every shared module name) and the plans
    and refined bases allocated within the budget."""

    members: list[int]
    budget: int
    names: list[str]
    holders: dict[str, tuple[int, ...]]
    spec: Any  # (gains, shape) as mosconv.fit.joint.spectra gives
    parts: dict[str, Parts]
    bases: dict[str, JointBasis]
    plans: list[ModulePlan]
    fitted: dict[str, _Fitted]
    menus: dict[str, list]  # each module's allocation options (budget-independent), as computed


def _joint(handles: list[Any], infos: list[MemberInfo], index: list[tuple[int, int]],
           members: list[int], ratio: float, seed: int, refine_iters: int,
           weights: list[float], red: Reducer, storage: Storage
           ) -> tuple[dict[str, torch.Tensor], list[Any], list[Report], list[int], _Setup]:
    """The joint fit of ``members`` under their group budget: pool tensors, the handle of
    each chunk's built MoS adapters, each member's report and own params, and the fit's
    :class:`_Setup` (its plans, and what re-routing it needs).  ``weights`` scale each
    member's squared error in the fit (bases, allocation, refinement); cores and own shards
    are always the exact least squares for the member's own update, against the bases as
    stored (``storage``)."""
    sub = [infos[i] for i in members]
    budget = budget_for_ratio(sum(m.params for m in sub), ratio)
    names: list[str] = []
    for m in sub:
        names += [n for n, *_ in m.modules if n not in names]
    holders = {n: tuple(i for i, m in enumerate(sub) if n in m.gains) for n in names}
    gains = {n: [sub[i].gains[n] * w for i in holders[n] for w in [weights[i]]] for n in names}
    shape = {}
    for m in sub:
        for n, _, d_in, d_out in m.modules:
            shape.setdefault(n, (d_in, d_out))
    parts = {n: _parts(n, holders[n], members, weights, index, handles, red)
             for n in names if len(holders[n]) > 1}
    bases = {n: joint_basis(p) for n, p in parts.items()}
    for n, b in bases.items():  # a tied form where the holders are nearly equal
        tied = tied_basis(_parts(n, holders[n], members, [w * w for w in weights], index,
                                 handles, red), b, sum(weights[i] for i in holders[n]))
        if tied is not None:
            bases[n] = replace(b, tied=tied)
    menus: dict[str, list] = {}
    plans, _ = allocate(names, holders, (gains, shape), bases, budget, menus)
    fitted = _refined_all(plans, bases, parts, refine_iters)
    setup = _Setup(members, budget, names, holders, (gains, shape), parts, bases, plans, fitted,
                   menus)
    return (*_built(handles, infos, index, setup, plans, fitted, ratio, seed, red, storage),
            setup)


def _built(handles: list[Any], infos: list[MemberInfo], index: list[tuple[int, int]],
           setup: _Setup, plans: list[ModulePlan], fitted: dict[str, _Fitted], ratio: float,
           seed: int, red: Reducer, storage: Storage, nc_of: dict[str, int] | None = None
           ) -> tuple[dict[str, torch.Tensor], list[Any], list[Report], list[int]]:
    """Build and measure ``setup``'s members for ``plans`` and bases ``fitted``: pool
    tensors, each chunk's handle of built MoS adapters, each member's report and own params.
    The kinds in ``nc_of`` are stored in that many shards per row (:func:`_shard_rows`)."""
    members = setup.members
    sub = [infos[i] for i in members]
    kind_of = {n: k for m in sub for n, k, _, _ in m.modules}
    widths = {k: (d_in, d_out) for m in sub for _, k, d_in, d_out in m.modules}
    ids = kind_ids(sub[0].kinds)
    rows, offsets = _pools(ids, kind_of, fitted, storage)
    pools, shards = _sharded(rows, ids, nc_of or {})
    ctx = red.put((ids, widths, {p.name: p for p in plans}, offsets, rows, ratio, seed,
                   storage, pools, shards))
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for i, g in enumerate(members):
        c, j = index[g]
        by_chunk.setdefault(c, []).append((j, i))
    order = sorted(by_chunk)
    kept = red.keep(_build_chunk, [(handles[c], tuple(by_chunk[c]), ctx) for c in order])
    built: list[Any] = [None] * len(handles)
    reports: list[Any] = [None] * len(members)
    local = [0] * len(members)
    for c, (h, rows) in zip(order, kept):
        built[c] = h
        for (_, i), (r, lp) in zip(by_chunk[c], rows):
            reports[i], local[i] = r, lp
    return pools, built, reports, local


ROUTE_STEPS = (1.05, 1.1, 1.15, 1.2, 1.3, 1.4)  # allocations beyond the budget re-routing tries
ROUTE_MIN_CORES = 0.01  # cores below this share of the budget: nothing worth re-routing
# alternating least-squares rounds for a re-routed fit: on the synthetic zoos one round ends
# within 3e-4 (relative) of ten, in under a third of their time (docs/batch.md)
ROUTED_REFINE = 1


def _rerouted(setup: _Setup, refine_iters: int
              ) -> tuple[list[ModulePlan], dict[str, _Fitted]] | None:
    """Re-routing a fit: allocated over its budget by a step more (``ROUTE_STEPS``) and
    brought back within it by cutting the cores' least useful rows and columns (each member
    routing to the basis columns that serve it, :func:`mosconv.fit.joint.route_cores`),
    step after step while the predicted error falls (compared on the plain bases; only the
    allocation kept is refined, ``ROUTED_REFINE`` rounds, then cut on its refined bases).
    Large groups gain (their bases grow, and every member's core with them).  Returns the
    plans and bases, None when no step beats the fit as it is or its cores are a small share
    of its budget (``ROUTE_MIN_CORES``: a pair of adapters)."""
    if _core_params(setup.plans) < ROUTE_MIN_CORES * setup.budget:
        return None

    def plain(plans: list[ModulePlan]) -> dict[str, _Fitted]:  # the joint modules' (cut)
        return {p.name: _Fitted(setup.bases[p.name].U[:, :p.k_U], setup.bases[p.name].V[:, :p.k_V])
                for p in plans if p.mode == "joint"}

    # the fit as it is, on the plain bases: its joint bases' kept-energy table has it
    best = sum(_plain_error(setup, p) for p in setup.plans)
    found = None
    for step in ROUTE_STEPS:
        plans, _ = allocate(setup.names, setup.holders, setup.spec, setup.bases,
                            math.floor(setup.budget * step), setup.menus)
        routed = _predicted(setup, plans, plain(plans))
        if routed is None or routed[1] >= best:
            break
        best, found = routed[1], plans
    if found is None:
        return None
    fitted = _refined_all(found, setup.bases, setup.parts, min(refine_iters, ROUTED_REFINE))
    routed = _predicted(setup, found, fitted)  # the same cut in size, on the refined bases
    return None if routed is None else (routed[0], fitted)


REMAINDER_MIN_WIDTH = 32  # narrower shards are not tried (each costs a route)


def _remainder(setup: _Setup, plans: list[ModulePlan], fitted: dict[str, _Fitted], left: int,
               storage: Storage, infos: list[MemberInfo]
               ) -> tuple[list[ModulePlan], dict[str, _Fitted], dict[str, int]] | None:
    """A budget ``left`` too small for a whole column spent on one column of some of its
    shards (:func:`mosconv.fit.joint.partial_column`), added to a joint module's ``U`` or
    ``V``: its other shards route to one zero shard, its kind is stored in that many shards
    per row (``nc``), and every holder's core grows by a row or column.  Looked for on both
    sides of every joint module (one reduction each, a half-step of refinement), in shards
    at least ``REMAINDER_MIN_WIDTH`` wide (and whole quantization groups); the one that
    keeps most is taken.  Returns the plans, bases and ``{kind: nc}``, or None."""
    shape = setup.spec[1]
    kind_of = {n: k for m in infos for n, k, _, _ in m.modules}
    cands = []
    for p in plans:
        if p.mode != "joint" or p.subsets:
            continue
        d_in, d_out = shape[p.name]
        g = math.gcd(d_in, d_out)
        for side, grow, d in (("U", p.k_V, d_out), ("V", p.k_U, d_in)):
            shapes = []
            for nc in range(2, g + 1):
                widths = (d_in // nc, d_out // nc)
                if g % nc or min(widths) < REMAINDER_MIN_WIDTH or (
                        storage.quantized and any(w % storage.group for w in widths)):
                    continue
                n = min(nc - 1, (left - len(p.holders) * grow) // (d // nc) - 1)
                if n >= 1:  # n shards and the zero shard
                    shapes.append((nc, n))
            if shapes:
                cands.append((p.name, side, shapes))
    best = None
    for name, side, shapes in cands:
        f = fitted[name]
        pc = partial_column(outside(setup.parts[name], f.U, f.V, side),
                            f.U if side == "U" else f.V, side, shapes)
        if pc is not None and pc.gain > 0 and (best is None or pc.gain > best[1].gain):
            best = (name, pc)
    if best is None:
        return None
    name, pc = best
    f, col = fitted[name], pc.column[:, None]
    new = (_Fitted(torch.cat([f.U, col], dim=1), f.V) if pc.side == "U"
           else _Fitted(f.U, torch.cat([f.V, col], dim=1)))
    plans = [replace(p, k_U=p.k_U + (pc.side == "U"), k_V=p.k_V + (pc.side == "V"))
             if p.name == name else p for p in plans]
    return plans, {**fitted, name: new}, {kind_of[name]: pc.nc}


def _predicted(setup: _Setup, plans: list[ModulePlan], fitted: dict[str, _Fitted]
               ) -> tuple[list[ModulePlan], float] | None:
    """``plans`` (with orthonormal bases ``fitted``, plain or refined) re-routed within the
    setup's budget, and their predicted squared error (exact for those bases); None when the
    cores cannot free what they exceed."""
    shape = setup.spec[1]
    cuts = {p.name: core_cuts(setup.parts[p.name], fitted[p.name].U, fitted[p.name].V)
            for p in plans if p.mode == "joint"}
    excess = sum(plan_params(p, shape[p.name]) for p in plans) - setup.budget
    err = 0.0
    if excess > 0:
        routed = route_cores(plans, cuts, excess)
        if routed is None:
            return None
        plans, err = routed
    for p in plans:
        err += (setup.bases[p.name].energy - sum(kept for kept, _ in cuts[p.name])
                if p.mode == "joint" else _plain_error(setup, p))
    return plans, err


def _plain_error(setup: _Setup, p: ModulePlan) -> float:
    """A module's predicted squared error under plan ``p``: its private triplets' tails, its
    one-sided basis's, or its joint bases' on the plain bases with every core whole."""
    if p.mode == "private":
        return sum(float(g[r:].sum()) for g, r in zip(setup.spec[0][p.name], p.ranks))
    b = setup.bases[p.name]
    if p.mode == "joint":
        return b.energy - float(b.kept[p.k_U, p.k_V])
    if p.mode == "tied":
        return float(b.tied.err[p.k_U])
    g = b.gain_V[:p.k_V] if p.mode == "shared_A" else b.gain_U[:p.k_U]
    return b.energy - float(g.sum())


def _losers(members: list[int], reports: list[Report], infos: list[MemberInfo]) -> list[int]:
    """The members a joint fit leaves worse off than converted alone."""
    return [i for i, r in zip(members, reports)
            if r.totals.relative_error > infos[i].alone.totals.relative_error * (1 + 1e-9)]


def _core_params(plans: list[ModulePlan]) -> int:
    """The parameters of the joint modules' cores, as routed."""
    return sum(sum(len(u) * len(v) for u, v in p.subsets) if p.subsets
               else len(p.holders) * p.k_U * p.k_V for p in plans if p.mode == "joint")


def _parts(name: str, held: tuple[int, ...], members: list[int], weights: list[float],
           index: list[tuple[int, int]], handles: list[Any], red: Reducer) -> Parts:
    """The reduction leaves of one module name: per chunk that holds some of its holders,
    those members' factorizations (weighted), picked in the task."""
    sel: dict[int, list[tuple[int, float]]] = {}
    for i in held:
        c, j = index[members[i]]
        sel.setdefault(c, []).append((j, weights[i]))
    order = sorted(sel)
    return Parts(tuple(handles[c] for c in order), red,
                 tuple((_select, name, tuple(sel[c])) for c in order))


def _weighted(f: Factorization, w: float) -> Factorization:
    """``sqrt(w) dW``: its squared error counts ``w`` times."""
    r = math.sqrt(w)
    return Factorization(f.U, f.S * r, f.V, None if f.norm_sq is None else f.norm_sq * w)


def _group_error(reports) -> float:
    """Energy-weighted relative error over the modules of several reports."""
    err = energy = 0.0
    for r in reports:
        for m in r.modules:
            err += m.energy * m.relative_error ** 2
            energy += m.energy
    return math.sqrt(err / energy) if energy > 0 else 0.0


@dataclass(frozen=True)
class _Fitted:
    U: torch.Tensor  # (d_out, k_U) float64: shared B-pool rows (k_U = 0 for shared_A)
    V: torch.Tensor  # (d_in, k_V): shared A-pool rows (k_V = 0 for shared_B)
    # orthonormal columns except a tied basis's (its singular values folded in, U V^T = M_k)


def _refined_all(plans: list[ModulePlan], bases: dict[str, JointBasis],
                 parts: dict[str, Parts], iters: int) -> dict[str, _Fitted]:
    """The shared bases of every plan that has some (:func:`_refined`)."""
    return {p.name: _refined(p, bases[p.name], parts[p.name], iters)
            for p in plans if p.mode != "private"}


def _refined(plan: ModulePlan, basis: JointBasis, parts: Parts, iters: int) -> _Fitted:
    """The shared bases of a plan: joint ones refined by alternating least squares; a
    one-sided or tied basis is already optimal for its structure."""
    if plan.mode == "tied":
        return _Fitted(basis.tied.U[:, :plan.k_U], basis.tied.V[:, :plan.k_V])
    U, V = basis.U[:, :plan.k_U], basis.V[:, :plan.k_V]
    if plan.mode == "joint":
        U, V, _ = refine(parts, U, V, iters)
    return _Fitted(U, V)


def _pools(ids: dict[str, str], kind_of: dict[str, str], fitted: dict[str, _Fitted],
           storage: Storage) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The group's pool tensors (per kind, the shared rows of its modules in module order;
    float32 holding the values ``storage`` stores) and each shared module's first A row and
    first B row in them."""
    pools: dict[str, torch.Tensor] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for kind, kid in ids.items():
        rows_A, rows_B, start_A, start_B = [], [], 0, 0
        for n, kd in kind_of.items():
            if kd == kind and n in fitted:
                offsets[n] = (start_A, start_B)
                rows_A.append(fitted[n].V.T)
                rows_B.append(fitted[n].U.T)
                start_A += fitted[n].V.shape[1]
                start_B += fitted[n].U.shape[1]
        rows_A = [r for r in rows_A if r.shape[0]]
        rows_B = [r for r in rows_B if r.shape[0]]
        if rows_A:
            pools[f"{kid}.A"] = stored_values(torch.cat(rows_A), storage)
        if rows_B:
            pools[f"{kid}.B"] = stored_values(torch.cat(rows_B), storage)
    return pools, offsets


def _build_chunk(chunk: Chunk, rows: tuple[tuple[int, int], ...], ctx: tuple
                 ) -> tuple[list[MosAdapter | None], list[tuple[Report, int]]]:
    """Build and measure a chunk's members (``(position in the chunk, position among the
    fitted members)``): each as :class:`Built` (None for the chunk's other members), and
    each one's report and own params."""
    ids, widths, plans, offsets, pools, ratio, seed, storage, stored, shards = ctx
    out: list[Built | None] = [None] * len(chunk.adapters)
    light = []
    for j, i in rows:
        a, fa = chunk.adapters[j], chunk.facts[j]
        out[j] = held = _build(a, fa, i, ids, widths, plans, offsets, pools, ratio, seed, storage,
                               stored, shards)
        mos = held.adapter()
        light.append((_report(a, fa, mos, ratio, seed), mos.local_params))
    return out, light


@dataclass(frozen=True)
class Built:
    """A member as the joint fit built it, held without a copy of the group's pool rows
    (one per member would be the pool times the group's size): ``own`` holds each kind's
    pools with the member's own rows only, ``pools`` the group's pool tensors, which every
    member of a chunk references.  :meth:`adapter` assembles its MoS adapter; ``own`` alone
    is not one (its pools lack the group's rows, which its routes count first)."""

    own: MosAdapter
    pools: dict[str, torch.Tensor]

    def adapter(self) -> MosAdapter:
        kinds = {}
        for kind, p in self.own.kinds.items():
            if p.shared:
                shared_A = self.pools.get(p.shared["key_A"], torch.zeros(0, p.d_in))
                shared_B = self.pools.get(p.shared["key_B"], torch.zeros(0, p.d_out))
                p = replace(p, pool_A=_joined(shared_A, p.pool_A),
                            pool_B=_joined(shared_B, p.pool_B))
            kinds[kind] = p
        return replace(self.own, kinds=kinds)


def _joined(shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    return torch.cat([shared, own]).contiguous() if own.shape[0] else shared


def _build(a: LoraAdapter, fa: dict[str, Factorization], i: int, ids: dict[str, str],
           widths: dict[str, tuple[int, int]], plans: dict[str, ModulePlan],
           offsets: dict[str, tuple[int, int]], pools: dict[str, torch.Tensor], ratio: float,
           seed: int, storage: Storage, stored: dict[str, torch.Tensor] | None = None,
           shards: dict[str, _Shards] | None = None) -> Built:
    """Member ``i``'s MoS adapter: routes into the group's pools (shared rows first), its
    cores and its own shards (least squares against the shared rows as stored, stored in
    ``storage``); held without the group's rows (:class:`Built`).  ``pools`` holds the
    shared rows whole; ``stored`` the pool tensors as written, the kinds in ``shards`` in
    shards of rows (:func:`_sharded`; both ``pools`` by default)."""
    kinds, mods = {}, []
    for kind, ms in a.kinds.items():
        d_in, d_out = widths[kind]
        shared_A = pools.get(f"{ids[kind]}.A", torch.zeros(0, d_in))
        shared_B = pools.get(f"{ids[kind]}.B", torch.zeros(0, d_out))
        nA, nB = int(shared_A.shape[0]), int(shared_B.shape[0])
        loc_A, loc_B, start_A, start_B = [], [], 0, 0
        for m in ms:
            p, f = plans[m.name], fa[m.name]
            if p.mode in ("joint", "shared_A", "shared_B", "tied"):
                oa, ob = offsets[m.name]
                cols_U, cols_V = (p.subsets[p.holders.index(i)] if p.subsets
                                  else (range(p.k_U), range(p.k_V)))
                routes_A = oa + torch.tensor(list(cols_V), dtype=torch.int64)
                routes_B = ob + torch.tensor(list(cols_U), dtype=torch.int64)
                Vb = shared_A[routes_A].to(F64).T  # (d_in, k_V) as stored
                Ub = shared_B[routes_B].to(F64).T  # (d_out, k_U)
                rng_A = rng_B = (0, 0)
                core = None
                if p.mode == "joint":
                    core = stored_values(_least_squares(f, Ub, Vb), storage)  # (k_U, k_V)
                elif p.mode == "shared_A":  # B_i: the least squares for the stored V
                    loc_B.append(stored_values(_least_squares(f, None, Vb).T, storage))
                    rng_B = (nB + start_B, nB + start_B + p.k_V)
                    routes_B = torch.arange(*rng_B)
                    start_B += p.k_V
                elif p.mode == "shared_B":  # A_i, for the stored U
                    loc_A.append(stored_values(_least_squares(f, Ub, None), storage))
                    rng_A = (nA + start_A, nA + start_A + p.k_U)
                    routes_A = torch.arange(*rng_A)
                    start_A += p.k_U
                mods.append(_module(m, kind, routes_A, routes_B, rng_A, rng_B, core))
                continue
            k = p.ranks[p.holders.index(i)]
            a_k, b_k = _private_rows(f, k, storage)
            loc_A.append(a_k)
            loc_B.append(b_k)
            rng_A = (nA + start_A, nA + start_A + k)
            rng_B = (nB + start_B, nB + start_B + k)
            mods.append(_module(m, kind, torch.arange(*rng_A), torch.arange(*rng_B), rng_A,
                                rng_B, None))
            start_A += k
            start_B += k
        own_A = torch.cat(loc_A).contiguous() if loc_A else torch.zeros(0, d_in)
        own_B = torch.cat(loc_B).contiguous() if loc_B else torch.zeros(0, d_out)
        ref = None
        if nA or nB:
            ref = {"file": None, "sha256": None, "key_A": f"{ids[kind]}.A",
                   "key_B": f"{ids[kind]}.B", "n_A": nA, "n_B": nB}
        kinds[kind] = KindPools(kind, d_in, d_out, 1, own_A, own_B, nA, nB, ref)
        if shards and kind in shards:
            kinds[kind], mods = _resharded(kinds[kind], mods, shards[kind])
    return Built(_mos(a, kinds, mods, ratio, seed, "shared", storage),
                 pools if stored is None else stored)


@dataclass(frozen=True)
class _Shards:
    """How a kind's shared rows are stored in shards: ``at_A[j]`` (``at_B[j]``) are the
    ``nc`` pool entries that hold shared row ``j``; ``n_A`` (``n_B``) shared entries."""

    nc: int
    at_A: torch.Tensor
    at_B: torch.Tensor
    n_A: int
    n_B: int
    shared_A: torch.Tensor | None = None  # the shared entries (a loaded group's), if held
    shared_B: torch.Tensor | None = None


def _shard_rows(rows: torch.Tensor, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(N, d)`` as ``nc`` shards each, every all-zero shard stored once (last):
    the shards ``(M, d / nc)`` and where each row's shards are (``(N, nc)`` int64)."""
    flat = rows.reshape(rows.shape[0] * nc, rows.shape[1] // nc)
    zero = ~flat.ne(0).any(dim=1)
    at = torch.cumsum((~zero).to(torch.int64), 0) - 1
    out = flat[~zero]
    if bool(zero.any()):
        at[zero] = out.shape[0]
        out = torch.cat([out, flat.new_zeros(1, flat.shape[1])])
    return out.contiguous(), at.reshape(rows.shape[0], nc)


def _sharded(rows: dict[str, torch.Tensor], ids: dict[str, str], nc_of: dict[str, int]
             ) -> tuple[dict[str, torch.Tensor], dict[str, _Shards]]:
    """The group's pool tensors with the kinds of ``nc_of`` in shards (:func:`_shard_rows`),
    and those kinds' :class:`_Shards`."""
    if not nc_of:
        return rows, {}
    out, shards = dict(rows), {}
    for kind, nc in nc_of.items():
        at, n = {}, {}
        for side in ("A", "B"):
            key = f"{ids[kind]}.{side}"
            if key in rows:
                out[key], at[side] = _shard_rows(rows[key], nc)
                n[side] = out[key].shape[0]
            else:
                at[side], n[side] = torch.zeros(0, nc, dtype=torch.int64), 0
        shards[kind] = _Shards(nc, at["A"], at["B"], n["A"], n["B"])
    return out, shards


def _resharded(p: KindPools, mods: list[MosModule], sh: _Shards
               ) -> tuple[KindPools, list[MosModule]]:
    """A member's kind ``p`` built with whole rows (``nc = 1``; shared rows first), stored
    in ``sh.nc`` shards: the shared rows where ``sh`` puts them, its own rows' shards after
    them in order; its modules' routes and private ranges follow."""
    nc = sh.nc
    nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)

    def table(at: torch.Tensor, start: int, own: int) -> torch.Tensor:
        return torch.cat([at, start + torch.arange(own * nc, dtype=torch.int64).reshape(-1, nc)])

    tA = table(sh.at_A, sh.n_A, p.pool_A.shape[0])
    tB = table(sh.at_B, sh.n_B, p.pool_B.shape[0])

    def rng(r: tuple[int, int], n: int, start: int) -> tuple[int, int]:
        return (start + (r[0] - n) * nc, start + (r[1] - n) * nc) if r[1] > r[0] else r

    out = []
    for m in mods:
        if m.kind != p.kind:
            out.append(m)
            continue
        out.append(replace(m, routes_A=tA[m.routes_A].reshape(-1),
                           routes_B=tB[m.routes_B].reshape(-1),
                           private_A=rng(m.private_A, nA, sh.n_A),
                           private_B=rng(m.private_B, nB, sh.n_B)))
    ref = dict(p.shared, n_A=sh.n_A, n_B=sh.n_B) if p.shared else None
    pool_A = p.pool_A.reshape(-1, p.d_in // nc).contiguous()
    pool_B = p.pool_B.reshape(-1, p.d_out // nc).contiguous()
    return KindPools(p.kind, p.d_in, p.d_out, nc, pool_A, pool_B, sh.n_A, sh.n_B, ref), out


def _private_rows(f: Factorization, k: int, storage: Storage) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's own rank-``k`` truncation as stored: ``A`` rows ``sqrt(s) v`` as stored,
    then ``B`` the least squares for ``dW`` given them (``k x d_in``, ``k x d_out``)."""
    root = f.S[:k].to(F64).sqrt()
    A = stored_values(root[:, None] * f.V[:, :k].to(F64).T, storage)
    B = _least_squares(f, None, A.to(F64).T)  # (d_out, k)
    return A, stored_values(B.T, storage)


def _least_squares(f: Factorization, Ub: torch.Tensor | None, Vb: torch.Tensor | None
                   ) -> torch.Tensor:
    """The exact least squares for ``dW`` given stored bases (float64): the core
    ``(Ub^T Ub)^+ Ub^T dW Vb (Vb^T Vb)^+`` (``k_U x k_V``); with ``Ub`` None, the ``B``
    that ``Vb`` leaves, ``dW Vb (Vb^T Vb)^+`` (``d_out x k_V``); with ``Vb`` None, the ``A``
    for ``Ub``, ``(Ub^T Ub)^+ Ub^T dW`` (``k_U x d_in``)."""
    left = f.U.to(F64) * f.S.to(F64)[None, :]  # (d_out, r): dW = left V^T
    right = f.V.to(F64).T  # (r, d_in)
    if Ub is not None:
        left = torch.linalg.pinv(Ub.T @ Ub) @ (Ub.T @ left)
    if Vb is not None:
        right = (right @ Vb) @ torch.linalg.pinv(Vb.T @ Vb)
    return left @ right


def _uses_shared(m: MosModule, p: KindPools) -> bool:
    """Whether a module routes into the rows of the group's pool file."""
    nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
    return bool((m.routes_A < nA).any() or (m.routes_B < nB).any())


def _module(m: LoraModule, kind: str, routes_A: torch.Tensor, routes_B: torch.Tensor,
            private_A: tuple[int, int], private_B: tuple[int, int],
            core: torch.Tensor | None) -> MosModule:
    return MosModule(name=m.name, kind=kind, r=int(routes_B.numel()), scale=1.0,
                     routes_A=routes_A.to(torch.int64).clone(),
                     routes_B=routes_B.to(torch.int64).clone(),
                     private_A=tuple(private_A), private_B=tuple(private_B),
                     embedding=m.embedding, conv_shape=m.conv_shape, core=core)


def _mos(a: LoraAdapter, kinds: dict[str, KindPools], mods: list[MosModule], ratio: float,
         seed: int, mode: str, storage: Storage) -> MosAdapter:
    order = {m.name: i for i, m in enumerate(a.modules)}
    mods.sort(key=lambda m: order[m.name])
    info = {"mosconv_version": __version__, "ratio": float(ratio), "seed": seed,
            "search": f"zoo-{mode}",
            "iters": 0, "routing_weights": False, "lora_params": a.params,
            "budget": budget_for_ratio(a.params, ratio)}
    return MosAdapter(kinds=kinds, modules=tuple(mods), extra_tensors=dict(a.extra_tensors),
                      source=source_info(a), info=info, storage=storage)


def _report(a: LoraAdapter, fa: dict[str, Factorization], mos: MosAdapter, ratio: float,
            seed: int) -> Report:
    """Per-adapter report; its truncation baseline is this adapter converted alone."""
    trunc = truncate(fa, budget_for_ratio(a.params, ratio))
    structures = {}
    for kind, p in mos.kinds.items():
        own = [m for m in mos.modules if m.kind == kind]
        shared = bool(p.shared) and any(_uses_shared(m, p) for m in own)
        structures[kind] = KindStructure(
            structure="shared" if shared else "private", nc=p.nc, public_A=p.public_A,
            public_B=p.public_B, pool_A=int(p.pool_A.shape[0]), pool_B=int(p.pool_B.shape[0]),
            params=p.local_params + sum(m.core.numel() for m in own if m.core is not None),
            budget=None, candidates_tried=0, weights=False)
    settings = Settings(ratio=float(max(ratio, 1.0)), seed=seed, search=mos.info["search"],
                        iters=0, routing_weights=False)
    with one_thread():  # float64 sums whose last digits would follow the thread count
        return build_report(a, mos, Baseline(trunc, None, structures), settings,
                            local_params=mos.local_params)


# ---------------------------------------------------------------- adding to a fitted group


@dataclass(frozen=True)
class _SharedBasis:
    """The pool rows a fitted group's members route to for one module name."""

    idx_A: torch.Tensor  # pool A rows (the V basis), int64
    idx_B: torch.Tensor  # pool B rows (the U basis)
    core: bool  # both sides shared (joint, or tied): a newcomer gets a core; else one-sided


def _shared_bases(members: list[MosAdapter]) -> dict[str, _SharedBasis]:
    """Per module name, the shared rows the existing members route to (all of them: a
    re-routed member's core spans only some)."""
    rows: dict[str, tuple[set[int], set[int], bool]] = {}
    for mos in members:
        for m in mos.modules:
            p = mos.kinds[m.kind]
            if not p.shared:
                continue
            a = m.routes_A[m.routes_A < p.shared["n_A"]].tolist()
            b = m.routes_B[m.routes_B < p.shared["n_B"]].tolist()
            if a or b:
                # both sides in the shared rows: a core (joint) or none (tied, the same
                # approximation for every member); a newcomer gets a core against both
                ra, rb, _ = rows.setdefault(m.name, (set(), set(), bool(a) and bool(b)))
                ra.update(a)
                rb.update(b)
    return {n: _SharedBasis(torch.tensor(sorted(a), dtype=torch.int64),
                            torch.tensor(sorted(b), dtype=torch.int64), core)
            for n, (a, b, core) in rows.items()}


def fit_new_members(members: list[MosAdapter], adapters: list[LoraAdapter], ratio: float,
                    seed: int = 0,
                    factorizations: list[dict[str, Factorization]] | None = None,
                    residuals: bool = True, search: str = "fast", iters: int = 4,
                    routing_weights: bool = True) -> tuple[list[MosAdapter], list[Report]]:
    """Fit ``adapters`` that join a group already fitted into ``members`` (loaded MoS
    adapters of that group, whose pools hold the group's shared rows): the shared bases stay
    as they are; each new adapter gets, per module, either its own part against them (a core,
    or its side of a one-sided basis, by least squares) extended by a private residual of
    some rank (directions outside the bases, rows of its own), or its own truncation,
    whichever lowers its error most per parameter, within its own ``lora_params / ratio``.
    A new adapter the bases do not serve as well as converting it alone (as ``compress``
    does with ``search``, ``iters``, ``routing_weights``, stored like the group) is converted
    alone, so it is never worse off than on its own.  ``residuals=False`` leaves out the
    private residuals (for comparison).

    Their own parts are stored like the group's (``members[0].storage``).
    Returns the new members' MoS adapters (kinds in the existing members' order, pointing at
    the same pool file) and their reports (truncation baseline: each adapter alone).
    """
    facts = factorizations or [factorize_adapter(a) for a in adapters]
    members, shards = _whole_rows(members)
    template = members[0]
    storage = template.storage
    bases = _shared_bases(members)
    out, reports = [], []
    for a, fa in zip(adapters, facts):
        own = {}
        for m in a.modules:
            b = bases.get(m.name)
            p = template.kinds.get(m.kind)
            if b is not None and p is not None:
                own[m.name] = _own_part(fa[m.name], p, b, storage=storage)
        plans = _plan_new(a, fa, own, budget_for_ratio(a.params, ratio), template.kinds,
                          residuals, storage)
        mos = _build_new(a, fa, template, plans, ratio, seed, storage, shards)
        rep = _report(a, fa, mos, ratio, seed)
        if rep.totals.relative_error > rep.totals.truncation_relative_error or \
                search != "truncation":  # (with truncation alone, that is the comparison)
            cc = alone_config(ratio, seed, search, iters, routing_weights, storage=storage)
            res = convert(a, cc, factorizations=fa)
            if res.report.totals.relative_error < rep.totals.relative_error:
                mos, rep = res.mos, res.report  # the bases do not serve it: converted alone
        out.append(mos)
        reports.append(rep)
    return out, reports


@dataclass(frozen=True)
class _OwnPart:
    """A new adapter's least-squares part against a module's shared bases, extended by
    ``rank`` private directions of its own (a private residual): ``extra_A`` (``rank x d_in``)
    rows routed after the shared A rows, ``extra_B`` (``rank x d_out``) after the shared B
    rows."""

    basis: _SharedBasis
    core: torch.Tensor | None  # (k_U + rank, k_V + rank) for joint bases
    rows: torch.Tensor | None  # its own B rows (k_V + rank, d_out) or A rows, one-sided
    params: int
    gain: float  # ||dW||^2 - ||dW - approximation||^2
    rank: int = 0
    extra_A: torch.Tensor | None = None
    extra_B: torch.Tensor | None = None


def _orth(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``M``'s (float64)."""
    return torch.linalg.qr(M)[0] if M.shape[1] else M


def _top_outside(side: torch.Tensor, Q: torch.Tensor, other: torch.Tensor, r: int
                 ) -> torch.Tensor:
    """The ``r`` top left singular vectors of ``(I - Q Q^T) side other^T`` (``side``:
    ``d x s``, ``other``: ``m x s``), computed in the ``s``-dimensional span of ``side``."""
    P = side - Q @ (Q.T @ side)
    q, R = torch.linalg.qr(P)
    u = torch.linalg.svd(R @ other.T, full_matrices=False)[0]
    return q @ u[:, :r]


def _residual_directions(f: Factorization, Ub: torch.Tensor, Vb: torch.Tensor, r: int,
                         core: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(b, a)``: ``r`` output and ``r`` input directions outside the shared bases that
    keep the most of ``dW`` beyond them (``d_out x r``, ``d_in x r``; None for the side a
    one-sided basis does not extend).  One-sided bases: the top singular vectors of the part of ``dW``
    outside the basis (exact).  Joint bases: alternating over the two sides, keeping the
    state whose full core (cross terms included) keeps the most."""
    U, S, V = f.U.to(F64), f.S.to(F64), f.V.to(F64)
    US, VS = U * S[None, :], V * S[None, :]
    Qu, Qv = _orth(Ub), _orth(Vb)
    if not core and Vb.shape[1]:  # shared A rows: new A rows, own B rows refitted
        return None, _top_outside(V, Qv, US, r)
    if not core:
        return _top_outside(U, Qu, VS, r), None
    b = _top_outside(U, Qu, VS, r)
    best, kept = None, -1.0
    for _ in range(6):  # the first round always improves on kept = -1, so best is set
        L = torch.cat([Qu, b], dim=1)
        a = _top_outside(V, Qv, (L.T @ U) * S[None, :], r)
        R = torch.cat([Qv, a], dim=1)
        k = float((((L.T @ U) * S[None, :]) @ (V.T @ R)).pow(2).sum())
        if k <= kept * (1 + 1e-12):
            break
        best, kept = (b, a), k
        b = _top_outside(U, Qu, (R.T @ V) * S[None, :], r)
    return best


def _own_part(f: Factorization, p: KindPools, b: _SharedBasis, rank: int = 0,
              storage: Storage | None = None) -> _OwnPart:
    """Least squares against the stored (nearly orthonormal) bases, extended by ``rank``
    private directions (:func:`_residual_directions`); the gain is measured on the part as it
    will be stored (in ``storage``, float32 by default)."""
    storage = storage or Storage()
    Vb = p.pool_A[b.idx_A].to(F64).T  # (d_in, k_V)
    Ub = p.pool_B[b.idx_B].to(F64).T  # (d_out, k_U)
    core = b.core and bool(Ub.shape[1]) and bool(Vb.shape[1])
    ext_A = ext_B = None
    if rank:
        bo, ai = _residual_directions(f, Ub, Vb, rank, core)
        if bo is not None:
            ext_B = stored_values(bo.T, storage)
            Ub = torch.cat([Ub, ext_B.to(F64).T], dim=1)
        if ai is not None:
            ext_A = stored_values(ai.T, storage)
            Vb = torch.cat([Vb, ext_A.to(F64).T], dim=1)
    extra = sum(t.numel() for t in (ext_A, ext_B) if t is not None)
    U, S, V = f.U.to(F64), f.S.to(F64), f.V.to(F64)
    if core:
        C = _least_squares(f, Ub, Vb)
        part = _OwnPart(b, stored_values(C, storage), None, C.numel() + extra, 0.0)
        aU, aV = Ub @ part.core.to(F64), Vb  # dW ~ aU aV^T
    elif Vb.shape[1]:  # shared A rows: B_own = dW Vb (Vb^T Vb)^-1, stored as rows
        Bown = _least_squares(f, None, Vb)  # (d_out, k_V)
        part = _OwnPart(b, None, stored_values(Bown.T, storage), Bown.numel() + extra, 0.0)
        aU, aV = part.rows.to(F64).T, Vb
    else:  # shared B rows: A_own = (Ub^T Ub)^-1 Ub^T dW
        Aown = _least_squares(f, Ub, None)  # (k_U, d_in)
        part = _OwnPart(b, None, stored_values(Aown, storage), Aown.numel() + extra, 0.0)
        aU, aV = Ub, part.rows.to(F64).T
    energy = float((S ** 2).sum())
    cross = float(((U.T @ aU) * (S[:, None] * (V.T @ aV))).sum())
    quad = float(((aU.T @ aU) * (aV.T @ aV)).sum())
    return replace(part, gain=energy - max(energy - 2 * cross + quad, 0.0), rank=rank,
                   extra_A=ext_A, extra_B=ext_B)


def _plan_new(a: LoraAdapter, fa: dict[str, Factorization], own: dict[str, _OwnPart],
              budget: int, kinds: dict[str, KindPools], residuals: bool = True,
              storage: Storage | None = None) -> dict[str, int | _OwnPart]:
    """Per module its shared part (an :class:`_OwnPart`, with a private residual of some
    rank) or a private rank: greedy by gain per parameter (a module's first step decides
    between its shared part and its own triplets; a shared part then grows its residual)."""
    state: dict[str, int | _OwnPart] = {m.name: 0 for m in a.modules}
    grown: dict[tuple[str, int], _OwnPart] = {}

    def wider(m: LoraModule, o: _OwnPart) -> _OwnPart | None:
        if not residuals or o.rank >= fa[m.name].S.numel():
            return None
        key = (m.name, o.rank + 1)
        if key not in grown:
            grown[key] = _own_part(fa[m.name], kinds[m.kind], o.basis, o.rank + 1, storage)
        return grown[key]

    gains = {m.name: fa[m.name].S.to(F64) ** 2 for m in a.modules}
    left = budget
    while True:
        best = None
        for m in a.modules:
            st, g = state[m.name], gains[m.name]
            steps = []
            if st == 0 and m.name in own:
                steps.append((own[m.name].gain, own[m.name].params, own[m.name]))
            if isinstance(st, _OwnPart) and (w := wider(m, st)) is not None:
                steps.append((w.gain - st.gain, w.params - st.params, w))
            if isinstance(st, int) and st < g.numel():
                steps.append((float(g[st]), m.d_in + m.d_out, st + 1))
            for gain, cost, new in steps:
                if gain > 0 and 0 < cost <= left and (best is None or gain / cost > best[0]):
                    best = (gain / cost, m.name, new, cost)
        if best is None:
            break
        _, name, new, cost = best
        state[name] = new
        left -= cost
    return state


def _whole_rows(members: list[MosAdapter]) -> tuple[list[MosAdapter], dict[str, _Shards]]:
    """A fitted group's members with the kinds it stores in shards (``nc > 1``, a partial
    column: :func:`_remainder`) seen as whole rows (``nc = 1``): each distinct run of ``nc``
    shared entries a member routes a rank row to is one shared row (in order), so the bases
    read as they do without shards; the members' own rows are left out (a newcomer does not
    read them).  And the :class:`_Shards` that store a newcomer's rows as the group does."""
    shards: dict[str, _Shards] = {}
    for kind, p in members[0].kinds.items():
        if p.nc == 1 or not p.shared:
            continue
        runs: dict[str, set] = {"A": set(), "B": set()}
        for mos in members:
            q = mos.kinds[kind]
            for m in mos.modules:
                if m.kind != kind:
                    continue
                for side in ("A", "B"):
                    n = q.shared[f"n_{side}"]
                    for run in getattr(m, f"routes_{side}").reshape(-1, q.nc).tolist():
                        if max(run) < n:
                            runs[side].add(tuple(run))
        at = {side: torch.tensor(sorted(r), dtype=torch.int64).reshape(-1, p.nc)
              for side, r in runs.items()}
        shards[kind] = _Shards(p.nc, at["A"], at["B"], p.shared["n_A"], p.shared["n_B"],
                               p.pool_A[:p.shared["n_A"]], p.pool_B[:p.shared["n_B"]])
    if not shards:
        return members, shards
    out = []
    for mos in members:
        kinds, mods = dict(mos.kinds), list(mos.modules)
        for kind, sh in shards.items():
            q = kinds[kind]
            row = {side: {tuple(r): j for j, r in enumerate(getattr(sh, f"at_{side}").tolist())}
                   for side in ("A", "B")}
            pool_A = q.pool_A[sh.at_A].reshape(-1, q.d_in)
            pool_B = q.pool_B[sh.at_B].reshape(-1, q.d_out)
            ref = dict(q.shared, n_A=pool_A.shape[0], n_B=pool_B.shape[0])
            kinds[kind] = KindPools(kind, q.d_in, q.d_out, 1, pool_A, pool_B, pool_A.shape[0],
                                    pool_B.shape[0], ref)
            mods = [replace(m, routes_A=_whole(m.routes_A, row["A"], q.nc),
                            routes_B=_whole(m.routes_B, row["B"], q.nc),
                            weights_A=None, weights_B=None, private_A=(0, 0), private_B=(0, 0))
                    if m.kind == kind else m for m in mods]
        out.append(replace(mos, kinds=kinds, modules=tuple(mods)))
    return out, shards


def _whole(routes: torch.Tensor, row: dict[tuple, int], nc: int) -> torch.Tensor:
    """Routes of ``nc`` entries per rank row as whole rows: ``row`` numbers the shared runs;
    a run of own entries becomes a row past them (never read: :func:`_whole_rows`)."""
    return torch.tensor([row.get(tuple(r), len(row)) for r in routes.reshape(-1, nc).tolist()],
                        dtype=torch.int64)


def _build_new(a: LoraAdapter, fa: dict[str, Factorization], template: MosAdapter,
               plans: dict[str, int | _OwnPart], ratio: float, seed: int,
               storage: Storage, shards: dict[str, _Shards] | None = None) -> MosAdapter:
    kinds, mods = {}, []
    by_kind = a.kinds
    for kind, p in template.kinds.items():
        if kind not in by_kind:
            continue
        nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
        loc_A, loc_B, sA, sB = [], [], 0, 0
        for m in by_kind[kind]:
            plan, f = plans[m.name], fa[m.name]
            if isinstance(plan, _OwnPart):  # shared bases, own part, private residual
                o = plan
                own_B_rows = o.rows is not None and bool(o.basis.idx_A.numel())  # shared A
                own_A_rows = o.rows is not None and not own_B_rows  # shared B
                ownA = o.rows if own_A_rows else o.extra_A
                ownB = o.rows if own_B_rows else o.extra_B
                rA = rB = (0, 0)
                if ownA is not None:
                    loc_A.append(ownA)
                    rA = (nA + sA, nA + sA + ownA.shape[0])
                    sA += ownA.shape[0]
                if ownB is not None:
                    loc_B.append(ownB)
                    rB = (nB + sB, nB + sB + ownB.shape[0])
                    sB += ownB.shape[0]
                shared_A = None if own_A_rows else o.basis.idx_A
                shared_B = None if own_B_rows else o.basis.idx_B
                routes_A = torch.cat([t for t in (shared_A, torch.arange(*rA)) if t is not None])
                routes_B = torch.cat([t for t in (shared_B, torch.arange(*rB)) if t is not None])
                mods.append(_module(m, kind, routes_A, routes_B, rA, rB, o.core))
                continue
            k = int(plan)
            a_k, b_k = _private_rows(f, k, storage)
            loc_A.append(a_k)
            loc_B.append(b_k)
            rA, rB = (nA + sA, nA + sA + k), (nB + sB, nB + sB + k)
            mods.append(_module(m, kind, torch.arange(*rA), torch.arange(*rB), rA, rB, None))
            sA += k
            sB += k
        pool_A = torch.cat([p.pool_A[:nA], *loc_A]) if loc_A else p.pool_A[:nA]
        pool_B = torch.cat([p.pool_B[:nB], *loc_B]) if loc_B else p.pool_B[:nB]
        kinds[kind] = KindPools(kind, p.d_in, p.d_out, p.nc, pool_A.contiguous(),
                                pool_B.contiguous(), nA, nB,
                                dict(p.shared) if p.shared else None)
        if shards and kind in shards:  # own rows after the group's shards, routes to them
            sh = shards[kind]
            own, mods = _resharded(replace(kinds[kind], pool_A=pool_A[nA:], pool_B=pool_B[nB:]),
                                   mods, sh)
            kinds[kind] = replace(own, pool_A=torch.cat([sh.shared_A, own.pool_A]).contiguous(),
                                  pool_B=torch.cat([sh.shared_B, own.pool_B]).contiguous())
    return _mos(a, kinds, mods, ratio, seed, "shared", storage)
