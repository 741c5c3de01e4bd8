"""Bytes, not just parameters: fit a converted MoS adapter to its storage, and the truncation
baseline at equal bytes.

:func:`store` casts pools, cores and slot weights to a float dtype, or quantizes pools and
cores to int8 / int4 (:mod:`mosconv.mos.quant`). Quantization is fitted, not just rounded:

* every quantized matrix gets least-squares scales after rounding (per group,
  ``<x, q> / <q, q>``);
* a module whose shards are all its own (the truncation structure) also tries a
  least-squares pass with one side's quantized factor fixed: quantize ``A``, solve ``B`` for
  the exact update given it, quantize ``B``, solve ``A`` again, and the same starting from
  ``B``; the candidate with the lowest exact error of the stored factors is kept (plain
  rounding is one of them, so this never does worse than rounding).

:func:`equal_bytes_truncation` is the baseline a user would otherwise pick at the same size:
global-budget SVD truncation (ranks by energy per stored byte) whose factors, stored in the
same dtype / quantization (plain rounding), take no more bytes than the MoS adapter's tensors.
No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..lora.types import LoraAdapter, LoraModule
from ..mos.quant import QMAX, Storage, dequantize, quantize, refit_scales, snap
from ..mos.types import KindPools, MosAdapter, MosModule, implicit_routes
from .factorize import Factorization, factorize
from .truncation import allocate

F64 = torch.float64


# ---------------------------------------------------------------- storing a fitted adapter


def stored_values(x: torch.Tensor, st: Storage) -> torch.Tensor:
    """``x`` (rows) as stored, float32: cast to a float dtype, or quantized (rounded with
    absmax scales, then least-squares scales) and read back."""
    if not st.quantized:
        return snap(x, st)
    x = x.to(torch.float32)
    if x.numel() == 0:
        return x
    q, _ = quantize(x, st.quantize, st.group)
    s = refit_scales(x, q, st.group)
    y = dequantize(q, s, st.group)
    # a fixed point of quantize/dequantize when every group reaches +-qmax (then its scale
    # is recovered exactly); otherwise (subnormal scales) let snap find one
    top = _group_max(q.abs(), st.group)
    if bool(((top == QMAX[st.quantize]) | (s.float() == 0)).all()):
        return y
    return snap(y, st)


def _group_max(a: torch.Tensor, group: int) -> torch.Tensor:
    n, w = a.shape
    g = (w + group - 1) // group
    pad = g * group - w
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(n, g, group).amax(2)


def _err_sq(B0: torch.Tensor, A0: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
            energy: float) -> float:
    """``||B0 A0 - B A||^2`` from Gram matrices (float64)."""
    if A.shape[0] == 0:
        return energy
    c = float(((B0.T @ B) * (A0 @ A.T)).sum())
    g = float(((B.T @ B) * (A @ A.T)).sum())
    return max(energy - 2 * c + g, 0.0)


def _solve(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X G = R`` for a symmetric PSD ``G`` (least squares, small ridge)."""
    k = G.shape[0]
    ridge = 1e-12 * float(G.diagonal().abs().max()) if k else 0.0
    return torch.linalg.solve(G + ridge * torch.eye(k, dtype=G.dtype), R.T).T


def _private_module(A: torch.Tensor, B: torch.Tensor, src: LoraModule, st: Storage
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored ``(A, B)`` of a private module (``A (k, d_in)``, ``B (d_out, k)``) with the
    lowest exact error against ``src`` among rounding and least-squares passes."""
    A0 = src.A.to(F64)
    B0 = src.B.to(F64) * src.scale
    energy = float(((B0.T @ B0) * (A0 @ A0.T)).sum())

    def qa(x: torch.Tensor) -> torch.Tensor:
        return stored_values(x, st).to(F64)

    def qb(x: torch.Tensor) -> torch.Tensor:  # B's columns are its stored rows
        return stored_values(x.T.contiguous(), st).T.to(F64)

    def solve_b(Aq: torch.Tensor) -> torch.Tensor:  # argmin ||B0 A0 - B Aq||
        return _solve(Aq @ Aq.T, B0 @ (A0 @ Aq.T))

    def solve_a(Bq: torch.Tensor) -> torch.Tensor:  # argmin ||B0 A0 - Bq A||
        return _solve(Bq.T @ Bq, (A0.T @ (B0.T @ Bq))).T

    A, B = A.to(F64), B.to(F64)
    a1, b2 = qa(A), qb(B)
    b1 = qb(solve_b(a1))
    a2 = qa(solve_a(b2))
    cands = [(a1, b2), (a1, b1), (qa(solve_a(b1)), b1), (a2, b2), (a2, qb(solve_b(a2)))]
    errs = [_err_sq(B0, A0, b, a, energy) for a, b in cands]
    a, b = cands[min(range(len(cands)), key=errs.__getitem__)]
    return a.to(torch.float32), b.to(torch.float32)


def _is_private(p: KindPools, mods: list[MosModule]) -> bool:
    return (p.nc == 1 and not p.public_A and not p.public_B and not p.shared
            and all(m.core is None and m.weights_A is None and implicit_routes(m, "A")
                    and implicit_routes(m, "B") for m in mods))


def store(mos: MosAdapter, adapter: LoraAdapter, storage: Storage, *,
          refit: bool = True) -> MosAdapter:
    """``mos`` with its pools, cores and slot weights as ``storage`` keeps them (float32
    tensors holding the stored values), quantization fitted against ``adapter``'s weights
    (``refit``: the least-squares passes of private modules, which minimize the weight
    error; off for a data-aware conversion, whose metric they would not follow: its
    factors are rounded).

    Raises:
        StorageOverflow: values beyond float16's range (as values or as scales).
    """
    storage.validate()
    fstore = Storage(storage.dtype)
    by_kind: dict[str, list[MosModule]] = {}
    for m in mos.modules:
        by_kind.setdefault(m.kind, []).append(m)
    kinds = {}
    for kind, p in mos.kinds.items():
        mods = by_kind.get(kind, [])
        nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
        if refit and storage.quantized and _is_private(p, mods):
            pa, pb = p.pool_A.clone(), p.pool_B.clone()
            for m in mods:
                if m.r == 0:
                    continue
                (a0, a1), (b0, b1) = m.private_A, m.private_B
                A, B = _private_module(p.pool_A[a0:a1], p.pool_B[b0:b1].T, adapter.module(m.name),
                                       storage)
                pa[a0:a1], pb[b0:b1] = A, B.T
        else:  # shared entries (a zoo's pool file) stay as they are
            pa = torch.cat([p.pool_A[:nA], stored_values(p.pool_A[nA:], storage)])
            pb = torch.cat([p.pool_B[:nB], stored_values(p.pool_B[nB:], storage)])
        kinds[kind] = replace(p, pool_A=pa.contiguous(), pool_B=pb.contiguous())
    modules = tuple(replace(
        m,
        weights_A=None if m.weights_A is None else snap(m.weights_A, fstore, rows=False),
        weights_B=None if m.weights_B is None else snap(m.weights_B, fstore, rows=False),
        core=None if m.core is None else stored_values(m.core, storage)) for m in mos.modules)
    return replace(mos, kinds=kinds, modules=modules, storage=storage)


# ---------------------------------------------------------------- the baseline at equal bytes


@dataclass(frozen=True)
class EqualBytes:
    """Truncation stored like the MoS adapter, in no more tensor bytes.

    Attributes:
        relative_error: energy-weighted relative error of the stored (rounded) factors.
        params: parameters of its factors.
        tensor_bytes: bytes of its factors as stored (values and scales).
        budget_bytes: the byte budget it was given.
        ranks: kept rank per module.
    """

    relative_error: float
    params: int
    tensor_bytes: int
    budget_bytes: int
    ranks: dict[str, int]


def row_bytes(storage: Storage, d_in: int, d_out: int) -> int:
    """Bytes of one rank of a module stored as a plain factor pair (an ``A`` row and a
    ``B`` column, each a stored row of its own with its scales)."""
    return storage.row_bytes(d_in) + storage.row_bytes(d_out)


def _stored_truncation_error(f: Factorization, k: int, st: Storage, src: LoraModule
                             ) -> tuple[float, float]:
    """``(squared error, energy)`` of the top-``k`` truncation whose factors ``sqrt(s) v``
    and ``sqrt(s) u`` are stored plainly in ``st`` (rounded; absmax scales), measured
    against the source update itself (as the report measures the MoS adapter: measured
    against the float32 factorization instead, it came out up to 3e-10 low)."""
    A0 = src.A.to(F64)
    B0 = src.B.to(F64) * src.scale
    energy = float(((B0.T @ B0) * (A0 @ A0.T)).sum())
    if k == 0:
        return energy, energy
    fd = f.double()
    root = fd.S[:k].sqrt()
    A = snap((root[:, None] * fd.V[:, :k].T).float(), st).to(F64)  # (k, d_in)
    Bt = snap((root[:, None] * fd.U[:, :k].T).float(), st).to(F64)  # (k, d_out)
    return _err_sq(B0, A0, Bt.T, A, energy), energy


def equal_bytes_truncation(adapter: LoraAdapter, storage: Storage, budget_bytes: int,
                           facts: dict[str, Factorization] | None = None) -> EqualBytes:
    """Global-budget truncation (ranks by energy per stored byte) under ``budget_bytes``
    tensor bytes, its factors stored in ``storage``; its error is that of the stored factors
    (float32 storage: the exact truncation error)."""
    facts = facts or {}
    fs = {m.name: facts.get(m.name) or factorize(m) for m in adapter.modules}
    costs = {m.name: row_bytes(storage, m.d_in, m.d_out) for m in adapter.modules}
    ranks = allocate({n: f.S**2 for n, f in fs.items()}, costs, int(budget_bytes))
    err = energy = 0.0
    for m in adapter.modules:
        f, k = fs[m.name], ranks[m.name]
        if storage.dtype == "float32" and not storage.quantized:
            energy += f.energy
            err += float((f.S[k:] ** 2).sum())
        else:
            e, en = _stored_truncation_error(f, k, storage, m)
            energy += en
            err += e
    rel = math.sqrt(err / energy) if energy > 0 else 0.0
    used = sum(ranks[m.name] * costs[m.name] for m in adapter.modules)
    params = sum(ranks[m.name] * (m.d_in + m.d_out) for m in adapter.modules)
    return EqualBytes(rel, params, used, int(budget_bytes), ranks)
