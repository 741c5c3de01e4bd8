"""Pools shared across the adapters of a zoo: tensors in, shared pools and per-adapter
MoS adapters out (no I/O).

Adapters of one project share structure: LoRA's ``A`` barely leaves its seeded random
initialization, so adapters trained from the same seed have nearly the same row spaces.
For each module name present in the group, the updates of every adapter are stacked
(``[dW_1; dW_2; ...]``) and their common row space, the top right singular vectors
``Q`` of the stack, becomes shared A-pool shards; each adapter keeps private B shards
``dW_a Q``.  A direction costs ``d_in + n_adapters * d_out`` and keeps ``sigma^2`` of the
stack's energy; directions of all module names compete for one group budget by energy
per parameter (the same greedy as truncation).

The group's total parameters (shared pools once plus every adapter's own shards) stay
under ``sum(lora_params) / ratio``.  Independent conversion at the same total budget
(global truncation over all adapters' modules) is computed too, and the group keeps
whichever of the two has the lower total error: shared pools never make it worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .. import __version__
from ..lora.types import LoraAdapter
from ..mos.types import KindPools, MosAdapter, MosModule
from ..names import kind_ids
from .convert import ConvertConfig, convert, source_info
from .factorize import Factorization, factorize_adapter
from .measure import Baseline, build_report
from .report import KindStructure, Report, Settings
from .truncation import allocate, budget_for_ratio, truncate

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


@dataclass(frozen=True)
class GroupResult:
    """Outcome of fitting one group of adapters jointly.

    Attributes:
        mode: ``shared`` (pools in ``shared_pools``) or ``independent`` (truncation won).
        adapters: one MoS adapter per input, in input order; in shared mode each kind's
            ``shared`` ref has ``n_A`` entries that live in ``shared_pools``.
        reports: one report per adapter (errors against its own source).
        shared_pools: tensor name -> tensor, the content of the group's pool file.
        totals: group totals: params, budget, errors of both modes.
    """

    mode: str
    adapters: list[MosAdapter]
    reports: list[Report]
    totals: GroupTotals
    shared_pools: dict[str, torch.Tensor] = field(default_factory=dict)


def group_key(adapter: LoraAdapter) -> str:
    """Adapters are grouped by base model and the shapes of their module kinds."""
    kinds = sorted(adapter.kinds)
    return f"{adapter.base_model or 'unknown'}|" + ";".join(kinds)


def _stack_rows(facts: list[Factorization]) -> torch.Tensor:
    """``[S_a V_a^T]_a`` stacked: its right singular vectors are the common row space."""
    return torch.cat([f.S[:, None] * f.V.double().T for f in facts])


def fit_group(adapters: list[LoraAdapter], ratio: float, seed: int = 0,
              factorizations: list[dict[str, Factorization]] | None = None,
              search: str = "fast", iters: int = 4,
              routing_weights: bool = True) -> GroupResult:
    """Convert ``adapters`` (same base model and kinds) with pools shared across them.

    The alternative is each adapter converted on its own (exactly what ``compress`` and a
    plain ``batch`` give, with ``search``/``iters``/``routing_weights``); the group keeps whichever has the lower
    total error, so ``--shared-pool`` is never worse than converting independently.
    The pool file tensors are named ``<kind id>.A`` (kind ids ``k0, k1, ...`` in the
    order of the first adapter's kinds).
    """
    facts = factorizations or [factorize_adapter(a) for a in adapters]
    total_params = sum(a.params for a in adapters)
    budget = budget_for_ratio(total_params, ratio)
    flat = {(i, n): f for i, fa in enumerate(facts) for n, f in fa.items()}
    energy = sum(f.energy for f in flat.values())

    # independent: every adapter converted alone, as compress does
    cc = ConvertConfig(ratio=float(ratio), seed=seed, search=search, iters=iters,
                       routing_weights=routing_weights)
    alone = [convert(a, cc, factorizations=fa) for a, fa in zip(adapters, facts)]
    indep_err_sq = sum(m.energy * m.relative_error ** 2
                       for r in alone for m in r.report.modules)
    indep_err = math.sqrt(indep_err_sq / energy) if energy > 0 else 0.0
    indep_params = sum(r.report.totals.mos_params for r in alone)

    # shared row spaces: per module name, stacked over the adapters that have it
    names = [m.name for m in adapters[0].modules]
    holders = {n: [i for i, a in enumerate(adapters) if n in facts[i]] for n in names}
    bases, gains, costs = {}, {}, {}
    for n in names:
        m = adapters[0].module(n)
        _, s, vh = torch.linalg.svd(_stack_rows([facts[i][n] for i in holders[n]]),
                                    full_matrices=False)
        bases[n] = vh  # (k, d_in) orthonormal rows
        gains[n] = s**2
        costs[n] = m.d_in + len(holders[n]) * m.d_out
    ks = allocate(gains, costs, budget)
    shared_err_sq = sum(float(gains[n][ks[n]:].sum()) for n in names)
    # modules that exist in some adapters only are not in `names`: they stay unconverted
    missing = [(i, n) for i, fa in enumerate(facts) for n in fa if n not in holders]
    shared_err = math.sqrt((shared_err_sq + sum(flat[k].energy for k in missing)) / energy) \
        if energy > 0 else 0.0
    params_shared = sum(ks[n] * costs[n] for n in names)
    totals = GroupTotals(lora_params=total_params, budget=budget, adapters=len(adapters),
                         independent_relative_error=indep_err,
                         shared_relative_error=shared_err, independent_params=indep_params,
                         shared_params=params_shared, mode="independent",
                         mos_params=indep_params)
    if missing or shared_err >= indep_err:
        return GroupResult("independent", [r.mos for r in alone], [r.report for r in alone],
                           totals)
    return _shared(adapters, facts, bases, ks, ratio, seed, totals)


def _shared(adapters: list[LoraAdapter], facts: list[dict[str, Factorization]],
            bases: dict[str, torch.Tensor], ks: dict[str, int], ratio: float, seed: int,
            totals: GroupTotals) -> GroupResult:
    ids = kind_ids(adapters[0].kinds)
    pools: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}
    for kind, ms in adapters[0].kinds.items():
        rows, start = [], 0
        for m in ms:
            offsets[m.name] = start
            rows.append(bases[m.name][:ks[m.name]])
            start += ks[m.name]
        pools[f"{ids[kind]}.A"] = torch.cat(rows).float().contiguous()
    mos_list = []
    for a, fa in zip(adapters, facts):
        kinds, mods = {}, []
        for kind, ms in a.kinds.items():
            shared_A = pools[f"{ids[kind]}.A"]
            b_rows, start = [], 0
            for m in ms:
                k, f = ks[m.name], fa[m.name]
                Q = bases[m.name][:k]  # (k, d_in)
                # B = dW Q^T = U S (V^T Q^T): the exact least-squares B for the shared A rows
                b_rows.append((((f.U.double() * f.S) @ (f.V.double().T @ Q.T)).T).float())
                routes_A = torch.arange(offsets[m.name], offsets[m.name] + k)
                routes_B = torch.arange(start, start + k)
                mods.append(_module(m, kind, routes_A, routes_B, (0, 0), (start, start + k)))
                start += k
            d_in, d_out = ms[0].d_in, ms[0].d_out
            ref = {"file": None, "sha256": None, "key_A": f"{ids[kind]}.A", "key_B": None,
                   "n_A": int(shared_A.shape[0]), "n_B": 0}
            local_B = torch.cat(b_rows) if b_rows else torch.zeros(0, d_out)
            kinds[kind] = KindPools(kind, d_in, d_out, 1, shared_A, local_B.contiguous(),
                                    int(shared_A.shape[0]), 0, ref)
        mos_list.append(_mos(a, kinds, mods, ratio, seed, "shared"))
    reports = [_report(a, fa, mos, ratio, seed) for a, fa, mos in zip(adapters, facts, mos_list)]
    pool_params = sum(t.numel() for t in pools.values())
    local = sum(sum(p.local_params for p in mos.kinds.values()) for mos in mos_list)
    return GroupResult("shared", mos_list, reports,
                       replace(totals, mode="shared", pool_params=pool_params,
                               local_params=local, mos_params=pool_params + local), pools)


def _module(m, kind, routes_A, routes_B, private_A, private_B) -> MosModule:
    return MosModule(name=m.name, kind=kind, r=int(routes_A.numel()), scale=1.0,
                     routes_A=routes_A.to(torch.int64).clone(),
                     routes_B=routes_B.to(torch.int64).clone(),
                     private_A=tuple(private_A), private_B=tuple(private_B),
                     embedding=m.embedding, conv_shape=m.conv_shape)


def _mos(a: LoraAdapter, kinds: dict[str, KindPools], mods: list[MosModule], ratio: float,
         seed: int, mode: str) -> MosAdapter:
    order = {m.name: i for i, m in enumerate(a.modules)}
    mods.sort(key=lambda m: order[m.name])
    info = {"mosconv_version": __version__, "ratio": float(ratio), "seed": seed,
            "search": f"zoo-{mode}",
            "iters": 0, "routing_weights": False, "lora_params": a.params,
            "budget": budget_for_ratio(a.params, ratio)}
    return MosAdapter(kinds=kinds, modules=tuple(mods), extra_tensors=dict(a.extra_tensors),
                      source=source_info(a), info=info)


def _report(a: LoraAdapter, fa: dict[str, Factorization], mos: MosAdapter, ratio: float,
            seed: int) -> Report:
    """Per-adapter report; its truncation baseline is this adapter converted alone."""
    trunc = truncate(fa, budget_for_ratio(a.params, ratio))
    structures = {
        kind: KindStructure(structure="shared" if p.shared else "private", nc=p.nc,
                            public_A=p.public_A, public_B=p.public_B,
                            pool_A=int(p.pool_A.shape[0]), pool_B=int(p.pool_B.shape[0]),
                            params=p.local_params, budget=None, candidates_tried=0,
                            weights=False)
        for kind, p in mos.kinds.items()}
    settings = Settings(ratio=float(max(ratio, 1.0)), seed=seed, search=mos.info["search"],
                        iters=0, routing_weights=False)
    return build_report(a, mos, Baseline(trunc, None, structures), settings,
                        local_params=sum(p.local_params for p in mos.kinds.values()))
