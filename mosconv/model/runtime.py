"""Attach MoS (or plain LoRA) adapters to a PyTorch / transformers model, switch, merge, remove.

Each targeted layer is replaced by an :class:`AdapterLayer` that wraps the original layer
(``.base``) and holds one delta per adapter name; ``forward(x) = base(x) + delta(x)`` for the
active adapter.  A MoS adapter's pools are stored once, under ``model.mos_adapters[name][kid]``;
every :class:`MosDelta` of the kind gathers its ``A_l``/``B_l`` from them on each forward::

    model = mosconv.apply(model, "out/mos")      # MoS folder, LoRA folder/file, or in memory
    mosconv.set_active(model, None)              # base model only
    mosconv.merge(model)                         # fold the active adapter into the weights

Supported base layers: ``torch.nn.Linear`` and GPT-2's ``Conv1D`` (weight ``(in, out)``).
Non-LoRA tensors of an adapter (``modules_to_save``: a classifier head, ...) are not applied:
an adapter that has some is refused unless ``extra="ignore"`` asks for its LoRA part alone
(PEFT would replace those modules, so the outputs would differ from PEFT's).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedAdapterError
from ..lora.types import LoraAdapter, LoraModule
from ..mos.types import MosAdapter, MosModule, fold_core
from ..names import kind_ids

POOLS_ATTR = "mos_adapters"
SHARED_ATTR = "mos_shared_pools"  # a zoo group's pool-file entries, once per model


class KindPoolModule(nn.Module):
    """The two shard pools of one kind: ``pool_A (N_A, d_in/nc)``, ``pool_B (N_B, d_out/nc)``.

    A zoo member's pools may start with the entries of its group's pool file: those live in
    a ``shared`` KindPoolModule held once per model (referenced, not registered) and the
    member holds only its own entries; routes index the concatenation (shared first)."""

    def __init__(self, pool_A: torch.Tensor, pool_B: torch.Tensor, d_in: int, d_out: int,
                 nc: int, trainable: bool, shared: KindPoolModule | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.nc = d_in, d_out, nc
        self.pool_A = nn.Parameter(pool_A, requires_grad=trainable)
        self.pool_B = nn.Parameter(pool_B, requires_grad=trainable)
        self._shared = (shared,)  # a tuple: not a submodule

    def gather(self, side: str, routes: torch.Tensor) -> torch.Tensor:
        """Pool rows ``routes`` of ``side`` (shared entries first, then this module's own)."""
        own = self.pool_A if side == "A" else self.pool_B
        shared = self._shared[0]
        if shared is None:
            return own[routes]
        sh = shared.pool_A if side == "A" else shared.pool_B
        n = sh.shape[0]
        if own.shape[0] == 0:
            return sh[routes]
        if n == 0:
            return own[routes]
        mask = (routes < n)[:, None]
        return torch.where(mask, sh[routes.clamp(max=n - 1)], own[(routes - n).clamp(min=0)])


class FactorCache:
    """Assembled ``(A, B)`` of MoS modules kept between forwards while nothing can change
    them (no gradient is being taken; pools, slot weights and cores unmodified: their
    version counters are checked), least recently used first out beyond ``max_bytes``.
    ``mosconv.set_factor_cache(max_bytes)`` sets the bound (0: no cache). ``generation``
    counts the clears: the layers' joint-pass caches (:func:`_joint_inputs`) key on it, so a
    clear empties them too."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.generation = 0
        self.entries: dict[int, tuple[Any, tuple, tuple[torch.Tensor, torch.Tensor], int]] = {}
        self.bytes = 0

    def get(self, delta: MosDelta, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self.entries.get(id(delta))
        if hit is None or hit[0]() is not delta or hit[1] != key:
            return None
        self.entries[id(delta)] = self.entries.pop(id(delta))  # most recently used
        return hit[2]

    def put(self, delta: MosDelta, key: tuple, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        import weakref

        self.drop(delta)
        size = sum(t.numel() * t.element_size() for t in factors)
        if size > self.max_bytes:
            return
        while self.entries and self.bytes + size > self.max_bytes:
            oldest = next(iter(self.entries))
            self.bytes -= self.entries.pop(oldest)[3]
        self.entries[id(delta)] = (weakref.ref(delta), key, factors, size)
        self.bytes += size

    def drop(self, delta: MosDelta) -> None:
        old = self.entries.pop(id(delta), None)
        if old is not None:
            self.bytes -= old[3]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.generation += 1


FACTORS = FactorCache()


def set_factor_cache(max_bytes: int) -> None:
    """Bound the bytes of assembled MoS factors kept between forwards (0 turns it off, the
    joint passes' gathered cores included) and empty every such cache, as is needed after an
    in-place update through ``p.data`` (PyTorch does not count those)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ConfigError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
    FACTORS.max_bytes = max_bytes
    FACTORS.clear()


class MosDelta(nn.Module):
    """One module's MoS update ``scale * (x @ A_l.T) @ B_l.T``, assembled on every call.

    The kind's :class:`KindPoolModule` is referenced, not registered (it lives under
    ``model.mos_adapters``), so each pool appears once in ``parameters()``/``state_dict()``.
    Routes are int64 buffers ``(r * nc,)``; slot weights, when present, are parameters.
    """

    def __init__(self, pools: KindPoolModule, m: MosModule, trainable: bool) -> None:
        super().__init__()
        self._pools = (pools,)  # a tuple: not a submodule
        self.r, self.scale = m.r, float(m.scale)
        dev, dt = pools.pool_A.device, pools.pool_A.dtype
        self.register_buffer("routes_A", m.routes_A.to(device=dev, dtype=torch.int64))
        self.register_buffer("routes_B", m.routes_B.to(device=dev, dtype=torch.int64))
        self.weights_A: nn.Parameter | None = None
        self.weights_B: nn.Parameter | None = None
        if m.weights_A is not None:
            wa, wb = m.weights_A.to(dev, dt, copy=True), m.weights_B.to(dev, dt, copy=True)
            self.weights_A = nn.Parameter(wa, requires_grad=trainable)
            self.weights_B = nn.Parameter(wb, requires_grad=trainable)
        self.core: nn.Parameter | None = None
        if m.core is not None:  # format v2: dW = scale * B_l @ C_l @ A_l
            self.core = nn.Parameter(m.core.to(dev, dt, copy=True), requires_grad=trainable)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_l (r, d_in), B_l (d_out, r))`` gathered from the pools, scale not folded (a
        core folded into ``A_l``)."""
        p = self._pools[0]
        a = p.gather("A", self.routes_A)  # (r*nc, d_in/nc)
        b = p.gather("B", self.routes_B)  # (r*nc, d_out/nc)
        if self.weights_A is not None:
            a = a * self.weights_A[:, None]
            b = b * self.weights_B[:, None]
        B = b.reshape(self.r, p.d_out).T
        if self.core is None:
            return a.reshape(self.r, p.d_in), B
        return fold_core(a.reshape(self.core.shape[1], p.d_in), self.core, B)

    def _inputs(self) -> list[torch.Tensor]:
        """Every tensor the assembled factors depend on."""
        p = self._pools[0]
        ts = [p.pool_A, p.pool_B, self.weights_A, self.weights_B, self.core, self.routes_A,
              self.routes_B]
        sh = p._shared[0]
        if sh is not None:
            ts += [sh.pool_A, sh.pool_B]
        return [t for t in ts if t is not None]

    def cached_factors(self, device: torch.device, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` in ``dtype`` on ``device``, from :data:`FACTORS` when nothing
        needs their gradient."""
        inputs = self._inputs()
        key = _cache_key(device, dtype, inputs)
        if key is None:
            A, B = self.factors()
            return A.to(device, dtype), B.to(device, dtype)
        hit = FACTORS.get(self, key)
        if hit is None:
            with torch.inference_mode(False), torch.no_grad():  # usable in and out of it
                A, B = self.factors()
                hit = (A.to(device, dtype).contiguous(), B.to(device, dtype).contiguous())
            FACTORS.put(self, key, hit)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d_in) -> (..., d_out)`` in x's dtype and device."""
        A, B = self.cached_factors(x.device, x.dtype)
        return self.scale * ((x @ A.T) @ B.T)

    def basis_key(self) -> tuple | None:
        """For a zoo member whose update is ``U C V^T`` with both ``U`` and ``V`` rows of its
        group's shared pools (a core between them, or none: a tied module, ``C = I``; one
        run of ``nc`` routes per row, no slot weights): the shared pools it routes into
        (members with the same key share one pass, over the rows any of them routes to);
        else None."""
        if not hasattr(self, "_basis"):
            p, key = self._pools[0], None
            sh = p._shared[0]
            ra, rb = _runs(self.routes_A, p.nc), _runs(self.routes_B, p.nc)
            shape = (len(rb), len(rb)) if self.core is None else tuple(self.core.shape)
            if (self.weights_A is None and sh is not None
                    and ra and rb and shape == (len(rb), len(ra))
                    and len(set(ra)) == len(ra) and len(set(rb)) == len(rb)
                    and max(map(max, ra)) < sh.pool_A.shape[0]
                    and max(map(max, rb)) < sh.pool_B.shape[0]):
                key = (id(sh),)
            self._basis = key
        return self._basis


def _cache_key(device: torch.device, dtype: torch.dtype, inputs: list[torch.Tensor]
               ) -> tuple | None:
    """What cached factors built from ``inputs`` depend on: each tensor's object, storage and
    version counter (an in-place update bumps it; one through ``.data`` does not, and is not
    seen); None when they cannot be cached: one is trainable (``requires_grad``: a fused
    optimizer step, e.g. ``AdamW(fused=True)``, updates it without bumping its version
    counter, so trainable adapters are assembled on every forward, as PEFT does), or one is
    an inference tensor (made under ``torch.inference_mode``, no version counter)."""
    if any(t.requires_grad for t in inputs):
        return None
    if any(t.is_inference() for t in inputs):
        return None
    return (str(device), dtype, tuple((id(t), t.data_ptr(), t._version) for t in inputs))


def _runs(routes: torch.Tensor, nc: int) -> list[tuple[int, ...]]:
    """A module's routes as one run of ``nc`` pool entries per rank row."""
    return [tuple(r) for r in routes.reshape(-1, nc).tolist()]


def _rows(pool: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """``pool[routes]``: a view when ``routes`` is a contiguous increasing range."""
    n = int(routes.numel())
    if n and int(routes[-1]) - int(routes[0]) == n - 1 and bool(
            (routes[1:] - routes[:-1] == 1).all()):
        return pool.narrow(0, int(routes[0]), n)
    return pool[routes]


def _joint_pass(x: torch.Tensor, out: torch.Tensor,
                members: list[tuple[MosDelta, torch.Tensor]], cache: dict) -> torch.Tensor:
    """``out[rows] += scale_i * x[rows] V C_i^T U^T`` for members sharing ``U``, ``V``: the
    basis once for all their rows, the cores by a batched matmul."""
    idx, cores, A, B = _joint_inputs(x, members, cache)
    xs = x.index_select(0, idx)
    h = (xs @ A.T).reshape(xs.shape[0], -1, A.shape[0])  # (rows, tokens, r_A)
    h = torch.bmm(h, cores)  # each row through its own core (gathered per row)
    delta = (h @ B.T).reshape(*xs.shape[:-1], B.shape[0])
    return out.index_add_(0, idx, delta.to(out.dtype))


def _joint_inputs(x: torch.Tensor, members: list[tuple[MosDelta, torch.Tensor]],
                  cache: dict) -> tuple:
    """``(rows, stacked scaled cores gathered per row, V^T, U)`` of a joint pass, kept in the
    layer's ``cache`` between calls (a few kilobytes per group of members: the bases are
    views of the shared pools) while the members, their rows and every tensor they depend on
    are the same (objects and version counters), no gradient is being taken and the factor
    cache is on and has not been cleared since (``FACTORS.generation``)."""
    d0 = members[0][0]
    tensors = [d.core for d, _ in members if d.core is not None] + d0._inputs()
    versions = _cache_key(x.device, x.dtype, tensors)
    if versions is None or FACTORS.max_bytes == 0:
        return _joint_build(x, members)
    versions = (FACTORS.generation, versions)
    objs = [d for d, _ in members] + [i for _, i in members] + tensors
    hit = cache.get(d0.basis_key())
    if (hit is None or len(hit[0]) != len(objs) or hit[1] != versions
            or any(a is not b for a, b in zip(hit[0], objs))):
        with torch.inference_mode(False), torch.no_grad():
            hit = (objs, versions, _joint_build(x, members))
        cache[d0.basis_key()] = hit
    return hit[2]


def _joint_build(x: torch.Tensor, members: list[tuple[MosDelta, torch.Tensor]]) -> tuple:
    """The rows, per-row cores and bases of a joint pass.  The bases are the shared rows any
    member routes to (in order; a view of the pools where that is a range, as when every
    member routes to all of a module's basis); a member routing to some of them (re-routed)
    has its core placed at theirs, zeros elsewhere."""
    idx = torch.cat([i for _, i in members])
    which = torch.cat([torch.full((int(i.numel()),), k, device=x.device, dtype=torch.long)
                       for k, (_, i) in enumerate(members)])
    nc = members[0][0]._pools[0].nc
    ua = sorted(set().union(*(_runs(d.routes_A, nc) for d, _ in members)))
    ub = sorted(set().union(*(_runs(d.routes_B, nc) for d, _ in members)))
    at_a, at_b = {r: k for k, r in enumerate(ua)}, {r: k for k, r in enumerate(ub)}
    cores = torch.zeros(len(members), len(ub), len(ua), device=x.device, dtype=x.dtype)
    for k, (d, _) in enumerate(members):
        ia = torch.tensor([at_a[r] for r in _runs(d.routes_A, nc)], device=x.device)
        ib = torch.tensor([at_b[r] for r in _runs(d.routes_B, nc)], device=x.device)
        core = torch.eye(len(ib)) if d.core is None else d.core  # tied: rows paired by rank
        cores[k, ib[:, None], ia[None, :]] = d.scale * core.to(x.device, x.dtype)
    sh = members[0][0]._pools[0]._shared[0]
    A = _rows(sh.pool_A, torch.tensor(ua, device=sh.pool_A.device).reshape(-1))
    B = _rows(sh.pool_B, torch.tensor(ub, device=sh.pool_B.device).reshape(-1))
    A = A.reshape(len(ua), -1).to(x.device, x.dtype)
    B = B.reshape(len(ub), -1).T.to(x.device, x.dtype)
    return idx, cores[which].transpose(1, 2).contiguous(), A, B


class LoraDelta(nn.Module):
    """A plain LoRA update ``scale * (x @ A.T) @ B.T``, ``A (r, d_in)``, ``B (d_out, r)``."""

    def __init__(self, m: LoraModule, device: torch.device, dtype: torch.dtype,
                 trainable: bool) -> None:
        super().__init__()
        self.scale = float(m.scale)
        self.A = nn.Parameter(m.A.to(device, dtype, copy=True), requires_grad=trainable)
        self.B = nn.Parameter(m.B.to(device, dtype, copy=True), requires_grad=trainable)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d_in) -> (..., d_out)`` in x's dtype and device."""
        A, B = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        return self.scale * ((x @ A.T) @ B.T)


class AdapterLayer(nn.Module):
    """Wraps a base layer; ``forward(x) = base(x) + deltas[active](x)`` (base only when None)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.active: str | None = None
        self.rows: tuple[str | None, ...] | None = None  # mixed batches: one name per row
        self._groups: dict = {}
        self._joint: dict = {}  # inputs of joint passes (see _joint_inputs)
        self.shared_basis_rows = 0  # rows of the last mixed batch done in a joint pass

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight (dtype checks) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x, *args, **kwargs)`` plus the active delta of ``x``; extra arguments go to
        the base layer as they are."""
        out = self.base(x, *args, **kwargs)
        if self.rows is not None:
            return self._mixed(x, out)
        if self.active is None or self.active not in self.deltas:
            return out
        return out + self.deltas[self.active](x).to(out.dtype)

    def _row_groups(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``[(adapter, row indices)]`` for a batch of ``batch`` rows: the names set by
        :func:`set_active`, each repeated ``batch / len(names)`` times in place when
        ``generate`` expands rows (``num_return_sequences``, beams)."""
        key = (batch, str(device))
        if key not in self._groups:
            names = self.rows or ()
            if not names or batch % len(names):
                raise ConfigError(f"mixed batch: {len(names)} adapter names for a batch of "
                                  f"{batch} rows (give one name per row)")
            rep = batch // len(names)
            rows: dict[str, list[int]] = {}
            for i, n in enumerate(names):
                if n is not None and n in self.deltas:
                    rows.setdefault(n, []).extend(range(i * rep, (i + 1) * rep))
            self._groups = {key: [(n, torch.tensor(ix, device=device)) for n, ix in rows.items()]}
        return self._groups[key]

    def _mixed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter. Adapters that are a shared basis and a core each (a zoo's
        joint fit) share one pass: the basis applied once to all their rows, each row's core
        gathered by adapter index (``bmm``); every other adapter: one call on its rows."""
        joint: dict[tuple, list[tuple[MosDelta, torch.Tensor]]] = {}
        self.shared_basis_rows = 0
        for name, idx in self._row_groups(x.shape[0], x.device):
            d = self.deltas[name]
            key = d.basis_key() if isinstance(d, MosDelta) else None
            if key is not None:
                joint.setdefault(key, []).append((d, idx))
                continue
            out.index_add_(0, idx, d(x.index_select(0, idx)).to(out.dtype))
        for members in joint.values():
            if len(members) == 1:
                d, idx = members[0]
                out.index_add_(0, idx, d(x.index_select(0, idx)).to(out.dtype))
                continue
            out = _joint_pass(x, out, members, self._joint)
            self.shared_basis_rows += sum(int(i.numel()) for _, i in members)
        return out


# ------------------------------------------------------------------ helpers


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _layer_shape(layer: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a supported layer, None for anything else."""
    if isinstance(layer, AdapterLayer):
        layer = layer.base
    if isinstance(layer, nn.Linear):
        return int(layer.out_features), int(layer.in_features)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return int(layer.weight.shape[1]), int(layer.weight.shape[0])
    return None


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` of the base model: adapter layers are yielded, not entered, and the
    adapters' pool containers are left out, so a walk costs the same whatever the number of
    adapters attached."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()  # a module reachable twice is yielded once (as named_modules does)
    while stack:
        name, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield name, mod
        if isinstance(mod, AdapterLayer):
            continue
        children = [(f"{name}.{n}" if name else n, c) for n, c in mod._modules.items()
                    if c is not None and not (mod is model and n in (POOLS_ATTR, SHARED_ATTR))]
        stack.extend(reversed(children))


def _named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules`` without the insides of adapter layers and the pool containers."""
    return dict(_walk(model))


def _resolve(name: str, layers: dict[str, nn.Module]) -> str:
    """The base model's name for an adapter module name, matched the way PEFT does.

    Raises:
        ConfigError: no match, or several suffix matches.
    """
    if name in layers:
        return name
    hits = [n for n in layers if n and (n.endswith("." + name) or name.endswith("." + n))]
    if len(hits) == 1:
        return hits[0]
    why = "no module of that name" if not hits else f"ambiguous: {', '.join(hits[:4])}"
    raise ConfigError(f"{name}: not found in the base model ({why})")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in _walk(model) if isinstance(m, AdapterLayer)]


def _load(adapter: MosAdapter | LoraAdapter | str | Path) -> MosAdapter | LoraAdapter:
    if isinstance(adapter, (MosAdapter, LoraAdapter)):
        return adapter
    if isinstance(adapter, (str, Path)):
        from ..lora.read import read_adapter
        from ..mos.format import is_mos_dir, load_mos

        return load_mos(adapter) if is_mos_dir(adapter) else read_adapter(adapter)
    raise ConfigError(f"adapter must be a MosAdapter, a LoraAdapter or a path, "
                      f"got {type(adapter).__name__}")


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


# ------------------------------------------------------------------ public API


_ATTACHED = itertools.count()  # the order adapters were attached in (adapter_names)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in the order they were attached."""
    names: dict[str, float] = {}
    for _, layer in _adapter_layers(model):
        for n, d in layer.deltas.items():
            names[n] = min(names.get(n, math.inf), getattr(d, "attached", math.inf))
    for n in getattr(model, POOLS_ATTR, None) or {}:
        names.setdefault(n, math.inf)
    return sorted(names, key=names.__getitem__)  # stable: ties keep first-seen order


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when the model runs as the base model."""
    for _, layer in _adapter_layers(model):
        if layer.rows is not None:
            raise ConfigError("a mixed batch is active (one adapter per row): name the "
                              "adapter, or set_active(model, name) first")
        if layer.active is not None:
            return layer.active
    return None


def _check_name(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ConfigError(f"adapter {name!r}: not attached to this model "
                          f"(attached: {', '.join(adapter_names(model)) or 'none'})")


def apply(model: nn.Module, adapter: MosAdapter | LoraAdapter | str | Path | list, *,
          name: str | list[str] = "default", trainable: bool = False,
          activate: bool = True, extra: str = "refuse") -> nn.Module:
    """Attach an adapter to ``model`` in place under ``name``; returns ``model``.

    ``adapter`` may also be a ``batch`` output folder or a list of adapters: each is
    attached under its own name (its path relative to the zoo, the folder name of a listed
    path, or ``name`` as a list), a zoo group's shared pools held once, none activated
    (:func:`set_active` takes one name, or one per row of a batch).

    Every check (names, layer types, shapes) runs before the model is changed.
    Adapter tensors are cast to each base layer's device and dtype (a kind's pools to its
    first layer's).  ``trainable`` sets ``requires_grad`` of the pools and slot weights
    (or LoRA ``A``/``B``); the base model's parameters are left as they are.  A trainable
    zoo member gets its own copy of its group's shared pools (training one must not change
    the others), so the pools are held once per member, not once per model.  ``extra``:
    what to do with an adapter's non-LoRA tensors (``modules_to_save``), which the runtime
    does not apply: ``refuse`` (raise) or ``ignore`` (attach the LoRA part alone).

    Raises:
        ConfigError: bad or duplicate ``name``, a module missing from the model, a shape that
            differs between the base layer and the adapter, a bad ``extra``.
        UnsupportedAdapterError: embedding or conv modules, a base layer that is neither
            ``nn.Linear`` nor GPT-2 ``Conv1D``, or non-LoRA tensors with ``extra="refuse"``.
        FormatError: ``adapter`` is a path that cannot be read.
    """
    if torch.is_inference_mode_enabled():  # the adapter's tensors must track versions and
        with torch.inference_mode(False):  # be usable by autograd later: build them outside
            return apply(model, adapter, name=name, trainable=trainable, activate=activate,
                         extra=extra)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"apply attaches adapters to a torch.nn.Module, got "
                          f"{type(model).__name__}")
    if extra not in ("refuse", "ignore"):
        raise ConfigError(f"extra must be 'refuse' or 'ignore', got {extra!r}")
    if isinstance(adapter, (list, tuple)) or _is_zoo(adapter):
        return _apply_many(model, adapter, name, trainable, extra)
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_names(model):
        raise ConfigError(f"adapter {name!r}: already attached to this model")
    ad = _load(adapter)
    keys = sorted(k for k, t in ad.extra_tensors.items()
                  if not (k.endswith(".alpha") and t.numel() == 1))  # a kohya scale, no factors
    if keys and extra == "refuse":
        shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
        raise UnsupportedAdapterError(
            f"adapter {name!r} holds tensors outside its LoRA modules ({shown}: whole "
            "weights saved beside the factors, as modules_to_save or saved embedding layers "
            "are), which the runtime does not apply; attach its LoRA part alone "
            "with extra='ignore', or export it and load it with PEFT")
    layers = _named_layers(model)
    if isinstance(ad, MosAdapter):
        shapes = {m.name: (ad.kinds[m.kind].d_out, ad.kinds[m.kind].d_in) for m in ad.modules}
    else:
        shapes = {m.name: (m.d_out, m.d_in) for m in ad.modules}
    plan: list[tuple[MosModule | LoraModule, str, nn.Module]] = []
    seen: dict[str, str] = {}
    for m in ad.modules:
        target = _resolve(m.name, layers)
        layer = layers[target]
        if m.embedding or m.conv_shape:
            what = "embedding" if m.embedding else "conv"
            raise UnsupportedAdapterError(f"{m.name}: {what} adapter modules are not supported "
                                          "by the runtime (only Linear and Conv1D layers)")
        have = _layer_shape(layer)
        if have is None:
            raise _unsupported_layer(m.name, layer)
        if have != shapes[m.name]:
            raise ConfigError(f"{m.name}: base model and adapter do not match (base layer "
                              f"(out, in) = {have}, adapter {shapes[m.name]})")
        if target in seen:
            raise ConfigError(f"{m.name}: base layer {target} is also targeted by {seen[target]}")
        seen[target] = m.name
        plan.append((m, target, layer.base if isinstance(layer, AdapterLayer) else layer))

    pools: dict[str, KindPoolModule] = {}
    if isinstance(ad, MosAdapter):
        first: dict[str, torch.Tensor] = {}
        for m, _, base in plan:
            first.setdefault(m.kind, base.weight)
        container = nn.ModuleDict()
        ids = kind_ids(ad.kinds)
        for kind, p in ad.kinds.items():
            w = first.get(kind)
            dev, dt = (w.device, _float_dtype(w)) if w is not None else ("cpu", torch.float32)
            nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
            shared = _shared_pools(model, p, dev, dt) if p.shared and not trainable else None
            if shared is None:
                nA = nB = 0
            pa, pb = p.pool_A[nA:].to(dev, dt, copy=True), p.pool_B[nB:].to(dev, dt, copy=True)
            pools[kind] = KindPoolModule(pa, pb, p.d_in, p.d_out, p.nc, trainable, shared)
            container[ids[kind]] = pools[kind]
        if not hasattr(model, POOLS_ATTR):
            setattr(model, POOLS_ATTR, nn.ModuleDict())
        getattr(model, POOLS_ATTR)[name] = container
    order = next(_ATTACHED)
    for m, target, base in plan:
        if isinstance(m, MosModule):
            delta: nn.Module = MosDelta(pools[m.kind], m, trainable)
        else:
            delta = LoraDelta(m, base.weight.device, _float_dtype(base.weight), trainable)
        layer = layers[target]
        if not isinstance(layer, AdapterLayer):
            layer = AdapterLayer(base)
            _set_child(model, target, layer)
        delta.attached = order
        layer.deltas[name] = delta
    if activate:
        set_active(model, name)
    return model


def set_active(model: nn.Module, name: str | None | list[str | None]) -> None:
    """Make adapter ``name`` active in every layer (layers it does not target run base only);
    None runs the base model.

    A list gives one adapter name (or None: the base model) per row of the batch: a mixed
    batch, each row through its own adapter in one forward (one call per distinct adapter,
    on its rows). When ``generate`` repeats rows (``num_return_sequences``, beams), each name
    covers its repeated rows; a batch whose size is not a multiple of the list's length is
    an error at the forward.

    Raises:
        ConfigError: a name that is not attached, or an empty list.
    """
    if isinstance(name, (list, tuple)):
        names = tuple(name)
        if not names:
            raise ConfigError("set_active: an empty list of adapter names")
        for n in dict.fromkeys(names):
            if n is not None:
                _check_name(model, n)
        for _, layer in _adapter_layers(model):
            layer.active, layer.rows, layer._groups, layer._joint = None, names, {}, {}
        return
    if name is not None:
        _check_name(model, name)
    for _, layer in _adapter_layers(model):
        layer.active = name if name in layer.deltas else None
        layer.rows, layer._groups, layer._joint = None, {}, {}


def trainable_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter ``name``'s parameters, each once: pools (a zoo group's shared entries too,
    frozen unless attached with ``trainable``), then slot weights (or LoRA A, B).

    Raises:
        ConfigError: ``name`` is not attached.
    """
    _check_name(model, name)
    out: dict[int, nn.Parameter] = {}
    container = getattr(model, POOLS_ATTR, None)
    if container is not None and name in container:
        out.update((id(p), p) for p in container[name].parameters())
        for kp in container[name].values():  # a zoo group's pool-file entries (held once)
            if kp._shared[0] is not None:
                out.update((id(p), p) for p in kp._shared[0].parameters())
    for _, layer in _adapter_layers(model):
        if name in layer.deltas:
            out.update((id(p), p) for p in layer.deltas[name].parameters())
    return list(out.values())


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach adapter ``name`` (every adapter when None); returns ``model``.

    A layer left without adapters is replaced by its original layer object, and
    ``model.mos_adapters`` is deleted once empty, so removing everything restores the
    model's ``state_dict`` exactly.  Removing the active adapter leaves the base model
    active; ``remove(model, name)`` refuses an adapter that rows of an active mixed batch
    use, while ``remove(model)`` removes every adapter, those of the mixed batch included.

    Raises:
        ConfigError: ``name`` is not attached, or rows of the active mixed batch use it.
    """
    if name is not None:
        _check_name(model, name)
        if any(layer.rows is not None and name in layer.rows
               for _, layer in _adapter_layers(model)):
            raise ConfigError(f"adapter {name!r}: rows of the active mixed batch use it; "
                              "set_active another list (or None) before removing it")
    for path, layer in _adapter_layers(model):
        for key in ([name] if name is not None else list(layer.deltas)):
            if key in layer.deltas:
                del layer.deltas[key]
                if layer.active == key:
                    layer.active = None
        if not len(layer.deltas):
            _set_child(model, path, layer.base)
    container = getattr(model, POOLS_ATTR, None)
    if container is not None:
        for key in ([name] if name is not None else list(container)):
            if key in container:
                del container[key]
        if not len(container):
            delattr(model, POOLS_ATTR)
    _drop_unused_shared(model)
    return model


@torch.no_grad()
def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (the active one when None) into the base weights, then remove
    every adapter; returns ``model`` with its original layer types.

    Linear: ``W (out, in) += scale * B @ A``; Conv1D: ``W (in, out) += (scale * B @ A).T``;
    the sum is formed in at least float32 and stored in the weight's dtype.

    Raises:
        ConfigError: no active adapter and no ``name``, ``name`` not attached, a base
            weight that is not floating point (quantized), or one tied to another module's
            (an ``lm_head`` tied to the input embeddings).
    """
    name = name if name is not None else active_adapter(model)
    if name is None:
        raise ConfigError("merge: no adapter is active and no name was given")
    _check_name(model, name)
    todo = [(p, layer) for p, layer in _adapter_layers(model) if name in layer.deltas]
    holders: dict[int, list[str]] = {}  # who holds each weight: tied weights have several
    for n, w in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(w), []).append(n)
    for path, layer in todo:
        if not layer.base.weight.is_floating_point():
            raise ConfigError(f"{path}: cannot merge into a {layer.base.weight.dtype} weight")
        tied = [n for n in holders.get(id(layer.base.weight), []) if n != f"{path}.base.weight"]
        if tied:
            raise ConfigError(
                f"{path}: its weight is tied to {', '.join(tied)}, which merging would change "
                f"too; serve the adapter attached, or untie the weight first ({path}.weight = "
                f"nn.Parameter({path}.weight.detach().clone()))")
    for _, layer in todo:
        delta = layer.deltas[name]
        A, B = delta.factors()
        w = layer.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        dw = delta.scale * (B.to(w.device, acc) @ A.to(w.device, acc))  # (out, in)
        if not isinstance(layer.base, nn.Linear):  # Conv1D stores (in, out)
            dw = dw.T
        w.copy_((w.to(acc) + dw).to(w.dtype))
    return remove(model)


def _is_zoo(adapter: Any) -> bool:
    """A ``batch`` output folder (``summary.json``, no ``mos_config.json`` of its own)."""
    if not isinstance(adapter, (str, Path)):
        return False
    from ..names import CONFIG_FILE

    p = Path(adapter)
    return p.is_dir() and (p / "summary.json").is_file() and not (p / CONFIG_FILE).exists()


def _unsupported_layer(name: str, layer: nn.Module) -> UnsupportedAdapterError:
    """The error for a base layer the runtime cannot attach to (PEFT's own: named so)."""
    kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if kind.startswith("peft."):
        return UnsupportedAdapterError(
            f"{name}: the model already holds PEFT adapter layers ({kind}); attach to the "
            "base model without them (PeftModel.unload() gives it back)")
    return UnsupportedAdapterError(f"{name}: base layer {kind} is not supported (only "
                                   "torch.nn.Linear and GPT-2 Conv1D)")


def _zoo_members(folder: Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every converted adapter of a ``batch`` output: the names its
    ``summary.json`` lists (paths relative to the zoo), in that order."""
    import json

    from ..errors import FormatError
    from ..fileio import same_or_inside

    path = folder / "summary.json"
    try:
        rows = json.loads(path.read_text())["adapters"]
        names = [r["name"] for r in rows if r.get("status") in ("converted", "skipped")]
        if not isinstance(rows, list) or not all(isinstance(n, str) and n for n in names):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise FormatError(f"{path}: not a batch summary (no adapters list)") from None
    if not names:
        raise FormatError(f"{path}: lists no converted adapters")
    for n in names:  # batch writes every member inside OUT, under a relative name
        if n.startswith(("/", "\\")) or any(part in ("", ".", "..") for part in n.split("/")) \
                or not same_or_inside(folder / n, folder):
            raise FormatError(f"{path}: adapter name {n!r} leads out of {folder}; a batch "
                              "output names its adapters by paths inside it")
    return [(n, folder / n) for n in names]


def _apply_many(model: nn.Module, adapters: Any, names: Any, trainable: bool,
                extra: str) -> nn.Module:
    """Attach every adapter of a ``batch`` output folder, or of a list, each under its name
    (its path relative to the zoo; for a list the folder name), nothing attached when one
    fails. A group's pool-file entries are held once (:data:`SHARED_ATTR`)."""
    if isinstance(adapters, (list, tuple)):
        items = [(Path(a).name if isinstance(a, (str, Path)) else f"adapter{i}", a)
                 for i, a in enumerate(adapters)]
    else:
        items = _zoo_members(Path(adapters))
    if isinstance(names, (list, tuple)):
        if len(names) != len(items):
            raise ConfigError(f"{len(names)} names for {len(items)} adapters")
        items = [(n, a) for n, (_, a) in zip(names, items)]
    elif names != "default":
        raise ConfigError("name: give a list of names (one per adapter) or none")
    seen = set(adapter_names(model))
    for n, _ in items:
        if not isinstance(n, str) or not n or "." in n:
            raise ConfigError(f"adapter name {n!r}: names are non-empty and have no '.' "
                              "(give names=[...])")
        if n in seen:
            raise ConfigError(f"adapter {n!r}: already attached (or listed twice)")
        seen.add(n)
    bases = {b: n for n, a in items if (b := _base_model_of(a)) is not None}
    if len(bases) > 1:
        (b1, n1), (b2, n2) = list(bases.items())[:2]
        raise ConfigError(f"adapters of different base models: {n1} ({b1}) and {n2} ({b2}); "
                          "attach the ones made for this model")
    from ..mos.format import is_mos_dir, load_mos

    done: list[str] = []
    pool_cache: dict = {}  # each group's pool file read and hashed once
    try:
        for n, a in items:
            if isinstance(a, (str, Path)) and is_mos_dir(a):
                a = load_mos(a, pool_cache=pool_cache)
            apply(model, a, name=n, trainable=trainable, activate=False, extra=extra)
            done.append(n)
    except BaseException:
        for n in done:
            remove(model, n)
        raise
    return model


def _base_model_of(adapter: Any) -> str | None:
    """The base model an adapter says it was made for (a MoS folder's config is read
    without its tensors), or None."""
    import json

    from ..names import CONFIG_FILE, PEFT_CONFIG

    if isinstance(adapter, MosAdapter):
        return adapter.source.get("base_model")
    if isinstance(adapter, LoraAdapter):
        return adapter.base_model
    if isinstance(adapter, (str, Path)):
        for name, get in ((CONFIG_FILE, lambda c: (c.get("source") or {}).get("base_model")),
                          (PEFT_CONFIG, lambda c: c.get("base_model_name_or_path"))):
            path = Path(adapter) / name
            if path.is_file():
                try:
                    value = get(json.loads(path.read_text()))
                except (OSError, ValueError, AttributeError, RecursionError):
                    return None  # unreadable: apply names the problem
                return value if isinstance(value, str) else None
    return None


def _shared_pools(model: nn.Module, p: Any, device: Any, dtype: torch.dtype) -> KindPoolModule:
    """The model's one copy of a zoo group's pool-file entries for kind pools ``p`` on
    ``device`` in ``dtype``: the copy held already, in whatever dtype and device it was made
    for (``model.half()`` or ``.to()`` after attaching moves it, and members attached later
    find it), else a new one, named by the pool file and its entries (and, where the model
    needs the entries on a second device or in a second dtype, by those too)."""
    ref = p.shared
    name = f"{ref['sha256']}-{ref.get('key_A')}-{ref.get('key_B')}".replace(".", "_")
    if not hasattr(model, SHARED_ATTR):
        setattr(model, SHARED_ATTR, nn.ModuleDict())
    store = getattr(model, SHARED_ATTR)
    want = torch.device(device)
    for key, held in store.items():
        pool = held.pool_A
        if (key == name or key.startswith(name + "-")) and pool.dtype == dtype and (
                pool.device == want or (want.index is None and pool.device.type == want.type)):
            return held
    key, n = name, 1
    while key in store:
        key, n = re.sub(r"[.:]", "_", f"{name}-{dtype}-{want}") + ("" if n == 1 else f"-{n}"), n + 1
    nA, nB = ref["n_A"], ref["n_B"]
    store[key] = KindPoolModule(p.pool_A[:nA].to(device, dtype, copy=True),
                                p.pool_B[:nB].to(device, dtype, copy=True),
                                p.d_in, p.d_out, p.nc, False)
    return store[key]


def _drop_unused_shared(model: nn.Module) -> None:
    store = getattr(model, SHARED_ATTR, None)
    if store is None:
        return
    used = {id(kp._shared[0]) for c in (getattr(model, POOLS_ATTR, None) or {}).values()
            for kp in c.values() if kp._shared[0] is not None}
    for key in [k for k, v in store.items() if id(v) not in used]:
        del store[key]
    if not len(store):
        delattr(model, SHARED_ATTR)


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Resident bytes of the attached adapters: a zoo's shared pools (once), each adapter's
    own tensors (pools, routes, slot weights, cores; or LoRA factors), the total, and next to
    them what the same adapters take as plain LoRAs (each module at its assembled rank, in
    the layer's dtype), as PEFT would hold them after ``export``."""
    shared = sum(t.numel() * t.element_size()
                 for t in (getattr(model, SHARED_ATTR, None) or nn.Module()).parameters())
    own: dict[str, int] = {}
    lora: dict[str, int] = {}
    for name in adapter_names(model):
        seen: dict[int, torch.Tensor] = {}
        container = getattr(model, POOLS_ATTR, None)
        if container is not None and name in container:
            seen.update((id(t), t) for t in container[name].parameters())
        nl = 0
        for _, layer in _adapter_layers(model):
            if name not in layer.deltas:
                continue
            d = layer.deltas[name]
            seen.update((id(t), t) for t in d.parameters())
            seen.update((id(t), t) for t in d.buffers())
            A, B = d.factors()
            item = layer.base.weight.element_size() if layer.base.weight.is_floating_point() \
                else 4
            nl += max(int(A.shape[0]), 1) * (int(A.shape[1]) + int(B.shape[0])) * item
        own[name] = sum(t.numel() * t.element_size() for t in seen.values())
        lora[name] = nl
    return {"shared_bytes": shared, "adapter_bytes": own,
            "total_bytes": shared + sum(own.values()), "lora_bytes": lora,
            "lora_total_bytes": sum(lora.values()), "adapters": len(own)}


def find_layers(model: nn.Module, adapter: MosAdapter | LoraAdapter) -> dict[str, nn.Module]:
    """Adapter module name -> the base model's layer it targets (matched as :func:`apply`
    does, shapes checked), without changing the model.

    Raises:
        ConfigError: a module missing from the model or of another shape.
        UnsupportedAdapterError: a layer that is neither ``nn.Linear`` nor GPT-2 ``Conv1D``.
    """
    layers = _named_layers(model)
    out: dict[str, nn.Module] = {}
    for m in adapter.modules:
        if isinstance(adapter, MosAdapter):
            want = (adapter.kinds[m.kind].d_out, adapter.kinds[m.kind].d_in)
        else:
            want = (m.d_out, m.d_in)
        layer = layers[_resolve(m.name, layers)]
        have = _layer_shape(layer)
        if have is None:
            raise _unsupported_layer(m.name, layer)
        if have != want:
            raise ConfigError(f"{m.name}: base model and adapter do not match (base layer "
                              f"(out, in) = {have}, adapter {want})")
        out[m.name] = layer.base if isinstance(layer, AdapterLayer) else layer
    return out
