"""The MoS adapter in memory: pools per kind, routed modules, and how a module's factors are
assembled (arXiv 2410.00938, with optional per-slot weights ``w``, 1 when absent)::

    A_l[j, i*sA:(i+1)*sA] = wA[j*nc+i] * poolA[idx_A[j*nc+i]]      # A_l: (r, d_in)
    B_l[i*sB:(i+1)*sB, j] = wB[j*nc+i] * poolB[idx_B[j*nc+i]]      # B_l: (d_out, r)
    dW_l = scale_l * B_l @ A_l                 # format v1
    dW_l = scale_l * B_l @ C_l @ A_l           # format v2: a module may carry a core C_l

With a core, ``B_l`` has ``r`` columns (``routes_B``: ``r * nc`` slots) and ``A_l`` has
``r_A`` rows (``routes_A``: ``r_A * nc`` slots), ``C_l`` is ``(r, r_A)``.

A core lets a basis that every adapter of a zoo routes to (shared pool rows) serve each
adapter through its own small ``C_l`` (the joint fits of :mod:`mosconv.fit.zoo`).

No I/O here: :mod:`mosconv.mos.format` reads and writes these on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from ..errors import ConfigError
from .quant import Storage


class SharedPoolRef(TypedDict):
    """Where the first entries of a kind's pools live when a zoo shares them
    (:attr:`KindPools.shared`; ``shared_pool`` of a kind in ``mos_config.json``)."""

    file: str | None  # the pool file, relative to the adapter folder (None until written)
    sha256: str | None  # the pool file's sha256 (None until written)
    key_A: str | None  # tensor name of the shared A entries in that file, or None
    key_B: str | None  # likewise for B
    n_A: int  # the first n_A entries of pool_A are the shared ones
    n_B: int


@dataclass(frozen=True)
class KindPools:
    """The two shard pools of one module kind.

    Attributes:
        kind: the kind string (name pattern + shape), see :mod:`mosconv.lora.types`.
        d_in, d_out: the kind's matrix shape ``(d_out, d_in)``.
        nc: shards per rank vector; divides ``d_in`` and ``d_out``.
        pool_A: ``(N_A, d_in // nc)`` float32.
        pool_B: ``(N_B, d_out // nc)`` float32.
        public_A, public_B: the first ``public_*`` entries of each pool are public
            (any module may route to them); the rest are private blocks.
        shared: None, or a reference to a pool file shared by a zoo of adapters
            (a :class:`SharedPoolRef`): the first ``n_A`` / ``n_B`` entries of the pools
            live in that file, not in the adapter's own.
    """

    kind: str
    d_in: int
    d_out: int
    nc: int
    pool_A: torch.Tensor
    pool_B: torch.Tensor
    public_A: int = 0
    public_B: int = 0
    shared: SharedPoolRef | None = None

    @property
    def params(self) -> int:
        return self.pool_A.numel() + self.pool_B.numel()

    @property
    def local_params(self) -> int:
        """Parameters stored in this adapter's own file (shared pool entries excluded)."""
        if not self.shared:
            return self.params
        sA, sB = self.d_in // self.nc, self.d_out // self.nc
        return self.params - self.shared["n_A"] * sA - self.shared["n_B"] * sB


@dataclass(frozen=True)
class MosModule:
    """One module's routes into its kind's pools.

    Attributes:
        name: module path in the base model (as in the source adapter).
        kind: key into :attr:`MosAdapter.kinds`.
        r: rank of ``B_l`` (0 means the update is dropped); without a core also ``A_l``'s.
        scale: multiplies ``B_l @ A_l``.
        routes_A, routes_B: ``(r * nc,)`` int64 pool indices, slot ``j*nc + i``.
        weights_A, weights_B: ``(r * nc,)`` float32 slot weights, or None (paper form).
        private_A, private_B: ``(start, stop)`` pool index ranges used by this module only.
        core: ``(r, r_A)`` float32 matrix between the factors, or None (the identity);
            ``r_A = len(routes_A) / nc``.
    """

    name: str
    kind: str
    r: int
    scale: float
    routes_A: torch.Tensor
    routes_B: torch.Tensor
    weights_A: torch.Tensor | None = None
    weights_B: torch.Tensor | None = None
    private_A: tuple[int, int] = (0, 0)
    private_B: tuple[int, int] = (0, 0)
    embedding: bool = False
    conv_shape: tuple[int, ...] | None = None
    core: torch.Tensor | None = None

    @property
    def r_A(self) -> int:
        """Rows of ``A_l`` before the core: ``r`` without a core."""
        return int(self.core.shape[1]) if self.core is not None else self.r


@dataclass(frozen=True)
class MosAdapter:
    """A Mixture-of-Shards adapter in memory.

    Attributes:
        kinds: pools per kind, in kind order.
        modules: per-module routes, in the source's module order.
        extra_tensors: non-LoRA tensors of the source, original keys, untouched.
        source: provenance and the source's config (format, base_model, task_type,
            fan_in_fan_out, config, metadata, files with sha256).
        info: free-form conversion facts stored in ``mos_config.json`` (ratio, seed,
            command, mosconv version, structure per kind).
        storage: how pools, cores and slot weights are stored (dtype, quantization); the
            float32 tensors in memory hold exactly the stored values
            (:func:`mosconv.mos.quant.snap`).
    """

    kinds: dict[str, KindPools]
    modules: tuple[MosModule, ...]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    storage: Storage = field(default_factory=Storage)

    @property
    def params(self) -> int:
        """Trainable parameters: pool entries (private included), slot weights and cores."""
        return sum(k.params for k in self.kinds.values()) + self._module_params()

    @property
    def local_params(self) -> int:
        """Parameters stored in this adapter's own file (entries of a zoo's shared pool
        file excluded): what one more adapter of a zoo costs."""
        return sum(k.local_params for k in self.kinds.values()) + self._module_params()

    def _module_params(self) -> int:
        n = 0
        for m in self.modules:
            for w in (m.weights_A, m.weights_B, m.core):
                if w is not None:
                    n += w.numel()
        return n

    @property
    def index_bytes(self) -> int:
        """Bytes of the stored routes (smallest integer dtype per pool); routes that are a
        module's own private range in order are not stored (:func:`implicit_routes`)."""
        total = 0
        for m in self.modules:
            pools = self.kinds[m.kind]
            for side, n in (("A", pools.pool_A.shape[0]), ("B", pools.pool_B.shape[0])):
                if not implicit_routes(m, side):
                    total += getattr(m, f"routes_{side}").numel() * route_dtype(n).itemsize
        return total

    def tensor_bytes(self) -> dict[str, int]:
        """Bytes of this adapter's own tensors as stored (a zoo's shared pool file apart):
        ``shards`` (pool entries), ``cores`` (values), ``scales`` (of quantized pools and cores), ``routes``,
        ``weights`` (slot weights), ``total`` (their sum) and ``extra`` (pass-through
        tensors of the source, not in ``total``)."""
        st = self.storage
        pools = scales = cores = weights = 0
        for p in self.kinds.values():
            nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
            for n, width in ((p.pool_A.shape[0] - nA, p.d_in // p.nc),
                             (p.pool_B.shape[0] - nB, p.d_out // p.nc)):
                pools += st.value_bytes(n, width)
                scales += st.scale_bytes(n, width)
        fstore = Storage(st.dtype)
        for m in self.modules:
            if m.core is not None:
                cores += st.value_bytes(*m.core.shape)
                scales += st.scale_bytes(*m.core.shape)
            for w in (m.weights_A, m.weights_B):
                if w is not None:
                    weights += fstore.value_bytes(1, w.numel())
        routes = self.index_bytes
        extra = sum(t.numel() * t.element_size() for t in self.extra_tensors.values())
        return {"shards": pools, "cores": cores, "scales": scales, "routes": routes,
                "weights": weights, "total": pools + cores + scales + routes + weights,
                "extra": extra}

    def module(self, name: str) -> MosModule:
        for m in self.modules:
            if m.name == name:
                return m
        raise ConfigError(f"no module {name!r} in this MoS adapter ({len(self.modules)} "
                          f"modules, e.g. {self.modules[0].name if self.modules else '-'})")

    def assemble(self, name_or_module: str | MosModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a module with ``dW = scale * B @ A``: ``A (k, d_in)``, ``B (d_out, k)``;
        scale not folded, a core folded into the wider side (``k = min(r, r_A)``)."""
        m = self.module(name_or_module) if isinstance(name_or_module, str) else name_or_module
        return assemble(self.kinds[m.kind], m)


def assemble(pools: KindPools, m: MosModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a module's ``A (k, d_in)`` and ``B (d_out, k)`` from its pools, with
    ``dW = scale * B @ A``: without a core ``A_l, B_l`` (``k = r``); with a core ``C_l`` it is
    folded into the side that keeps the rank smallest (``C_l @ A_l`` or ``B_l @ C_l``)."""
    a = pools.pool_A[m.routes_A]  # (r*nc, sA)
    b = pools.pool_B[m.routes_B]  # (r*nc, sB)
    if m.weights_A is not None:
        a = a * m.weights_A[:, None].to(a.dtype)
    if m.weights_B is not None:
        b = b * m.weights_B[:, None].to(b.dtype)
    A = a.reshape(m.r_A, pools.d_in)
    B = b.reshape(m.r, pools.d_out).T.contiguous()
    if m.core is not None:
        return fold_core(A, m.core.to(A.dtype), B)
    return A, B


def fold_core(A: torch.Tensor, core: torch.Tensor, B: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' @ A' = B @ core @ A``, of inner size ``min`` of the core's sides."""
    if core.shape[1] < core.shape[0]:
        return A, (B @ core).contiguous()
    return (core @ A).contiguous(), B


def implicit_routes(m: MosModule, side: str) -> bool:
    """Whether a module's ``side`` routes are its own private range in order
    (``private_X[0], private_X[0] + 1, ...``, covering it): format v3 does not store them."""
    routes = getattr(m, f"routes_{side}")
    start, stop = getattr(m, f"private_{side}")
    if routes.numel() != stop - start:
        return False
    return routes.numel() == 0 or bool(torch.equal(
        routes, torch.arange(start, stop, dtype=routes.dtype)))


def route_dtype(pool_size: int) -> torch.dtype:
    """Smallest integer dtype that holds every index of a pool (as PEFT VB-LoRA does)."""
    if pool_size <= 2**8:
        return torch.uint8
    if pool_size <= 2**15:
        return torch.int16
    if pool_size <= 2**31:
        return torch.int32
    return torch.int64
