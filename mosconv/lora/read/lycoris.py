"""LyCORIS LoHa and LoKr modules of a single file, read exactly as LoRA factors.

kohya sd-scripts with ``--network_module lycoris.kohya`` (metadata
``ss_network_module=lycoris.kohya``) writes one group of keys per module, ``<mod>`` being a
kohya name such as ``lora_unet_down_blocks_0_attentions_0_proj_in`` or
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``:

| type | keys | update ``dW`` |
|---|---|---|
| LoHa | ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in) or (r, in, kh, kw), ``hada_w2_a``, ``hada_w2_b``, ``alpha`` | ``scale * (w1a @ w1b) * (w2a @ w2b)`` (elementwise) |
| LoKr | ``lokr_w1`` (o1, i1) or ``lokr_w1_a`` @ ``lokr_w1_b``; ``lokr_w2`` (o2, i2) / (o2, i2, kh, kw) or ``lokr_w2_a`` (o2, r) @ ``lokr_w2_b`` (r, i2) / (r, i2*kh*kw) / (r, i2, kh, kw); ``alpha`` | ``scale * kron(W1, W2)`` |

Each update is factorized exactly (float64) into ``scale * B @ A`` of its numerical rank
(singular values below ``RTOL * s_max`` are dropped: at most ``RTOL * sqrt(rank)`` relative
error, far below float32 storage rounding), without a ``d_out x d_in`` matrix where the
structure allows:

* LoHa: ``(w1a @ w1b) * (w2a @ w2b) = L @ R`` with the face-splitting (Khatri-Rao) factors
  ``L[i, (k, l)] = w1a[i, k] * w2a[i, l]`` and ``R[(k, l), j] = w1b[k, j] * w2b[l, j]`` of
  rank ``r1 * r2``; QR of ``L`` and ``R^T`` and an SVD of the small core (the dense product
  is formed instead when ``r1 * r2 >= min(d_out, d_in)``, which is then cheaper).
* LoKr: the SVD of a Kronecker product is the Kronecker product of the SVDs, so ``W1`` and
  ``W2`` are factorized separately (QR + small SVD when stored as a product) and
  ``U = kron(U1, U2)``, ``S = kron(s1, s2)``, ``V = kron(V1, V2)``.  A conv ``W2`` is
  flattened to ``(o2, i2*kh*kw)``: LyCORIS's ``kron(w1[:, :, None, None], w2)`` flattened to
  ``(o, i*kh*kw)`` equals ``kron(w1, w2.reshape(o2, -1))``.

The factors are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``, with each left singular
vector's largest-magnitude entry made positive (deterministic signs).  A zero update is a
rank-1 pair of zeros.

Scaling, as LyCORIS (github.com/KohakuBlueleaf/LyCORIS, commit f49d30d) applies it in its
forward pass (``get_weight`` scales once: ``lycoris/modules/loha.py`` 194-217 and 309-321,
``lycoris/modules/lokr.py`` 358-371 and 551-566; ``get_diff_weight``, loha.py 228-233 and
lokr.py 383-388, multiplies by ``scale`` a second time on LyCORIS's merge path, which is not
what inference with the file applies):

* ``scale = alpha / dim`` (loha.py 128-136, lokr.py 206-217), ``alpha`` the stored scalar.
  ``alpha`` missing or 0 means ``alpha = dim``, scale 1 (loha.py 130, lokr.py 208).  With
  rsLoRA the file already stores ``alpha * sqrt(dim)`` (loha.py 138, lokr.py 219), so
  ``alpha / dim`` is still the applied scale.
* LoHa ``dim`` is the rows of ``hada_w1_b`` (loha.py 157-168, ``lora_dim = w1b.size(0)``).
* LoKr ``dim`` is the columns of ``lokr_w1_a`` when W1 is stored as a product, else of
  ``lokr_w2_a`` (lokr.py 262-270; likewise ``lycoris/functional/lokr.py`` 134-141).  When
  both W1 and W2 are stored full, LyCORIS sets ``alpha = dim`` (lokr.py 209-211): scale 1,
  the stored alpha is ignored.
* the products: ``lycoris/functional/loha.py`` 14 (``(w1u @ w1d) * (w2u @ w2d) * scale``) and
  131-146 (4-D ``hada_w*_b`` flattened, result reshaped to ``(out, in, kh, kw)``);
  ``lycoris/functional/lokr.py`` 11-20 (``make_kron``: ``w1`` unsqueezed to the dims of
  ``w2``, ``torch.kron``) and 142-151 (a 4-D ``lokr_w2_b`` is flattened to ``(r, -1)``).

LyCORIS's own module saves non-Tucker conv LoHa factors and ``lokr_w2_b`` flattened
(``(r, in*kh*kw)``, loha.py 76 and 95-99, lokr.py 131-136): such a module is read as the
``(out, in*kh*kw)`` matrix it is (exact), but the file does not say the kernel shape, so its
``conv_shape`` is None.  4-D factors give ``conv_shape = (out, in, kh, kw)``.

Refused with :class:`UnsupportedAdapterError` (key suffixes from ``weight_list`` /
``algo_check`` of each module in ``lycoris/modules/``): Tucker LoHa/LoKr (``hada_t1``,
``hada_t2``, ``lokr_t1``, ``lokr_t2``: loha.py 23-24, lokr.py 38-39), LoCon Tucker
(``lora_mid.weight``, locon.py 32), DoRA (``dora_scale``, loha.py 26, lokr.py 41, locon.py
34), full / diff (``diff``, ``diff_b``: full.py 27), diag-OFT (3-D ``oft_blocks``:
diag_oft.py 29-34 and 89-94; ``oft_diag`` in older LyCORIS), BOFT (4-D ``oft_blocks``:
boft.py 44-49 and 102-107), GLoRA (``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``,
``bm.weight``: glora.py 19-27), IA3 (``on_input``: ia3.py 15-16), norm (``w_norm``,
``b_norm``: norms.py 14); also PEFT-style ``oft_r`` / ``boft_R`` / ``boft_s`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from ..._threads import one_thread
from ...errors import FormatError, UnsupportedAdapterError
from ..types import LoraModule
from ._common import make_module
from ._io import check_finite, dtype_name

RTOL = 1e-6
"""Singular values below ``RTOL * s_max`` (float64) are dropped as numerically zero."""
MAX_VALUES = 2**28
"""Most values ``rank * (d_out + d_in)`` of one module's exact factorization."""

LYCORIS_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$")
_LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_SUPPORTED = "mosconv reads LoRA, LoCon, LoHa and LoKr"

# (pattern, type); ``[^.]+`` module names for the suffixes that could appear in other files
_REFUSED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), t) for p, t in (
    (r"^(?P<mod>.+?)\.(?P<tag>hada_t[12])$", "LoHa Tucker"),
    (r"^(?P<mod>.+?)\.(?P<tag>lokr_t[12])$", "LoKr Tucker"),
    (r"^(?P<mod>.+?)\.(?P<tag>lora_mid)(?:\..*)?$", "LoCon Tucker"),
    (r"^(?P<mod>.+?)\.(?P<tag>dora_scale)(?:\..*)?$", "DoRA"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>diff|diff_b)$", "full (diff)"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>oft_blocks)$", "OFT"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>oft_diag)$", "diag-OFT"),
    (r"^(?P<mod>.+?)\.(?P<tag>oft_[rR])(?:\.weight)?$", "OFT"),
    (r"^(?P<mod>.+?)\.(?P<tag>boft_[Rs])(?:\.weight)?$", "BOFT"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>(?:a1|a2|b1|b2|bm)\.weight)$", "GLoRA"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>on_input)$", "IA3"),
    (r"^(?P<mod>[^.]+)\.(?P<tag>[wb]_norm)$", "norm"),
))
_WHY = {"DoRA": "its update depends on the base weights' norms"}

_SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A thin SVD ``(U, s, V)`` with ``W = U @ diag(s) @ V.T``."""


def check_refused(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`UnsupportedAdapterError` for the first (sorted) key of a LyCORIS type
    that mosconv does not read."""
    for key in sorted(tensors):
        for pattern, kind in _REFUSED:
            m = pattern.match(key)
            if not m:
                continue
            if m["tag"] == "oft_blocks":
                kind = {3: "diag-OFT", 4: "BOFT"}.get(tensors[key].dim(), kind)
            why = f" ({_WHY[kind]})" if kind in _WHY else ""
            raise UnsupportedAdapterError(
                f"{path}: LyCORIS {kind} module {m['mod']} (key {key}) is not supported{why}; "
                f"{_SUPPORTED}"
            )


def has_lycoris_keys(keys: Iterable[str]) -> bool:
    """True if any key is a LoHa or LoKr factor."""
    return any(LYCORIS_KEY.match(k) for k in keys)


def lycoris_format(types: set[str]) -> str:
    """``lycoris-loha``, ``lycoris-lokr``, ``lycoris-loha+lokr``, ``lycoris-lokr+lora``, ...:
    the module types present, in the order LoHa, LoKr, plain LoRA."""
    return "lycoris-" + "+".join(t for t in ("loha", "lokr", "lora") if t in types)


def read_lycoris(
    path: Path, tensors: dict[str, torch.Tensor]
) -> tuple[list[LoraModule], set[str], set[str]]:
    """Read every LoHa / LoKr module of ``tensors``.

    Returns:
        ``(modules, used_keys, dtypes)``: the modules (``source_type`` ``loha`` / ``lokr``,
        ``stored_params`` the numel of their factors), the keys they consumed (factors and
        ``.alpha``) and the storage dtypes of their factors.

    Raises:
        FormatError: a missing, non-float, non-finite or mis-shaped factor, a module holding
            both LoHa and LoKr keys, a non-scalar alpha.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = LYCORIS_KEY.match(key)
        if m:
            groups.setdefault(m["mod"], {})[m["part"]] = t
    modules, used, dtypes = [], set(), set()
    for mod in sorted(groups):
        parts = groups[mod]
        for part, t in sorted(parts.items()):
            _check_factor(path, mod, part, t)
            dtypes.add(dtype_name(t))
        used.update(f"{mod}.{p}" for p in parts)
        alpha = _alpha(path, mod, tensors)
        if f"{mod}.alpha" in tensors:
            used.add(f"{mod}.alpha")
        is_loha = any(p.startswith("hada_") for p in parts)
        if is_loha and any(p.startswith("lokr_") for p in parts):
            raise FormatError(f"{path}: module {mod} holds both LoHa (hada_*) and LoKr (lokr_*) "
                              "tensors")
        with one_thread():
            module = (_loha if is_loha else _lokr)(path, mod, parts, alpha)
        modules.append(replace(module, stored_params=sum(t.numel() for t in parts.values()),
                               stored_bytes=sum(t.numel() * t.element_size()
                                                for t in parts.values()),
                               source_type="loha" if is_loha else "lokr"))
    return modules, used, dtypes


# --------------------------------------------------------------------------- validation


def _check_factor(path: Path, mod: str, part: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise FormatError(f"{path}: module {mod} {part} has non-float dtype {t.dtype}")
    check_finite(path, f"{mod}.{part}", t)
    if t.dim() not in (2, 4):
        raise FormatError(f"{path}: module {mod} {part} has shape {tuple(t.shape)}; expected a "
                          "2-D matrix or a 4-D conv tensor")
    if t.numel() == 0:
        raise FormatError(f"{path}: module {mod} has an empty factor {part} {tuple(t.shape)}")


def _alpha(path: Path, mod: str, tensors: dict[str, torch.Tensor]) -> float | None:
    t = tensors.get(f"{mod}.alpha")
    if t is None:
        return None
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise FormatError(f"{path}: alpha tensor {mod}.alpha has shape {tuple(t.shape)} and "
                          f"dtype {dtype_name(t)}, expected a real scalar")
    return float(t.reshape(()).to(torch.float64).item())


def _need(parts: dict[str, torch.Tensor], mod: str, path: Path, kind: str, *names: str) -> None:
    for name in names:
        if name not in parts:
            raise FormatError(f"{path}: {kind} module {mod} has no {name} tensor")


def _mismatch(path: Path, mod: str, kind: str, a: str, ta: torch.Tensor, b: str,
              tb: torch.Tensor) -> FormatError:
    return FormatError(f"{path}: {kind} module {mod} has mismatched shapes {a} "
                       f"{tuple(ta.shape)} and {b} {tuple(tb.shape)}")


def _scale(alpha: float | None, dim: int | None) -> float:
    """LyCORIS's scale: ``alpha / dim``; alpha missing or 0 is ``dim``; no dim (LoKr with both
    factors full) is 1."""
    if dim is None or alpha is None or alpha == 0:
        return 1.0
    return alpha / dim


# --------------------------------------------------------------------------- exact SVDs


def _svd_of_product(L: torch.Tensor, R: torch.Tensor) -> _SVD:
    """Exact thin SVD ``(U, s, V)`` of ``L @ R`` (float64), through QR of ``L`` and ``R^T``
    and an SVD of the small core, or densely when the inner dimension is not smaller."""
    if L.shape[1] >= min(L.shape[0], R.shape[1]):  # the product is no bigger than L, R
        return _svd(L @ R)
    ql, rl = torch.linalg.qr(L)
    qr, rr = torch.linalg.qr(R.T)
    u, s, vh = torch.linalg.svd(rl @ rr.T, full_matrices=False)
    return ql @ u, s, qr @ vh.T


def _check_size(path: Path, mod: str, rank: int, d_out: int, d_in: int) -> None:
    """Refuse an update whose exact factorization would not fit in memory (a crafted file:
    real adapters are far below the limit)."""
    n = rank * (d_out + d_in)
    if n > MAX_VALUES:
        raise UnsupportedAdapterError(
            f"{path}: module {mod}'s exact LoRA factorization would hold {n:,} values (rank "
            f"{rank}, {d_out}x{d_in}); mosconv reads at most {MAX_VALUES:,} per module")


def _svd(W: torch.Tensor) -> _SVD:
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    return u, s, vh.T


def _keep(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
          ref: float | None = None) -> _SVD:
    """Drop singular values below ``RTOL * ref`` (``ref`` default ``s.max()``) and fix signs:
    the largest-magnitude entry of each kept left vector is positive."""
    top = float(s.max()) if s.numel() else 0.0
    ref = top if ref is None else ref
    keep = s > RTOL * ref if top > 0 else torch.zeros_like(s, dtype=torch.bool)
    U, s, V = U[:, keep], s[keep], V[:, keep]
    if s.numel():
        idx = U.abs().argmax(dim=0)
        sign = torch.where(U[idx, torch.arange(U.shape[1])] < 0, -1.0, 1.0).to(U.dtype)
        U, V = U * sign, V * sign
    return U, s, V


def _module(path: Path, mod: str, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
            scale: float, conv_shape: tuple[int, ...] | None) -> LoraModule:
    """The LoRA pair ``B = U sqrt(s)``, ``A = sqrt(s) V^T`` (rank-1 zeros for a zero update)."""
    if s.numel() == 0:
        A = torch.zeros(1, V.shape[0], dtype=torch.float64)
        B = torch.zeros(U.shape[0], 1, dtype=torch.float64)
    else:
        root = s.sqrt()
        A, B = (V * root).T, U * root
    return replace(make_module(path, mod, A, B, scale), conv_shape=conv_shape)


# --------------------------------------------------------------------------- LoHa


def _loha(path: Path, mod: str, parts: dict[str, torch.Tensor],
          alpha: float | None) -> LoraModule:
    _need(parts, mod, path, "LoHa", *_LOHA_PARTS)
    w1a, w1b, w2a, w2b = (parts[p] for p in _LOHA_PARTS)
    ups = []
    for name, t in (("hada_w1_a", w1a), ("hada_w2_a", w2a)):
        if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
            raise FormatError(f"{path}: LoHa module {mod} has {name} {tuple(t.shape)}; expected "
                              "(out, r) or (out, r, 1, 1)")
        ups.append(t.reshape(t.shape[0], t.shape[1]))
    w1a, w2a = ups
    if w1a.shape[0] != w2a.shape[0]:
        raise _mismatch(path, mod, "LoHa", "hada_w1_a", w1a, "hada_w2_a", w2a)
    if w1b.shape[1:] != w2b.shape[1:]:
        raise _mismatch(path, mod, "LoHa", "hada_w1_b", w1b, "hada_w2_b", w2b)
    for i, ta, tb in ((1, w1a, w1b), (2, w2a, w2b)):
        if ta.shape[1] != tb.shape[0]:
            raise _mismatch(path, mod, "LoHa", f"hada_w{i}_a", ta, f"hada_w{i}_b", tb)
    d_out = int(w1a.shape[0])
    conv_shape = (d_out, *map(int, w1b.shape[1:])) if w1b.dim() == 4 else None
    r1, r2 = int(w1b.shape[0]), int(w2b.shape[0])
    a1, a2 = w1a.double(), w2a.double()
    b1, b2 = w1b.reshape(r1, -1).double(), w2b.reshape(r2, -1).double()
    d_in = int(b1.shape[1])
    _check_size(path, mod, min(r1 * r2, d_out, d_in), d_out, d_in)
    if r1 * r2 >= min(d_out, d_in):  # full rank possible: the dense product is cheaper
        U, s, V = _svd((a1 @ b1) * (a2 @ b2))
    else:  # face-splitting factors: (w1a @ w1b) * (w2a @ w2b) = L @ R
        L = (a1[:, :, None] * a2[:, None, :]).reshape(d_out, r1 * r2)
        R = (b1[:, None, :] * b2[None, :, :]).reshape(r1 * r2, d_in)
        U, s, V = _svd_of_product(L, R)
    U, s, V = _keep(U, s, V)
    return _module(path, mod, U, s, V, _scale(alpha, r1), conv_shape)


# --------------------------------------------------------------------------- LoKr


def _lokr_factor(path: Path, mod: str, parts: dict[str, torch.Tensor], w: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int],
                            tuple[int, ...], int | None]:
    """``(U, s, V, (out, in), kernel, dim)`` of W1 (``w = "lokr_w1"``) or W2, flattened to a
    matrix; ``dim`` is the inner rank when stored as a product, else None."""
    full, a, b = parts.get(w), parts.get(f"{w}_a"), parts.get(f"{w}_b")
    if full is not None and (a is not None or b is not None):
        raise FormatError(f"{path}: LoKr module {mod} has both {w} and {w}_a/{w}_b tensors")
    if full is None:
        if a is None or b is None:
            missing = w if a is None and b is None else (f"{w}_a" if a is None else f"{w}_b")
            raise FormatError(f"{path}: LoKr module {mod} has no {missing} tensor")
        if a.dim() != 2:
            raise FormatError(f"{path}: LoKr module {mod} has {w}_a {tuple(a.shape)}; expected "
                              "a 2-D matrix")
        if a.shape[1] != b.shape[0]:
            raise _mismatch(path, mod, "LoKr", f"{w}_a", a, f"{w}_b", b)
        kernel = tuple(map(int, b.shape[2:]))
        U, s, V = _svd_of_product(a.double(), b.reshape(b.shape[0], -1).double())
        shape = (int(a.shape[0]), int(b.shape[1]))
        dim = int(a.shape[1])
    else:
        kernel = tuple(map(int, full.shape[2:]))
        U, s, V = _svd(full.reshape(full.shape[0], -1).double())
        shape, dim = (int(full.shape[0]), int(full.shape[1])), None
    if w == "lokr_w1" and kernel:
        raise FormatError(f"{path}: LoKr module {mod} has a 4-D {w}; LyCORIS stores W1 as a "
                          "2-D matrix")
    return (*_keep(U, s, V), shape, kernel, dim)


def _lokr(path: Path, mod: str, parts: dict[str, torch.Tensor],
          alpha: float | None) -> LoraModule:
    U1, s1, V1, (o1, i1), _, dim1 = _lokr_factor(path, mod, parts, "lokr_w1")
    U2, s2, V2, (o2, i2), kernel, dim2 = _lokr_factor(path, mod, parts, "lokr_w2")
    dim = dim1 if dim1 is not None else dim2  # lokr.py 263-268: w1a's rank first
    _check_size(path, mod, s1.numel() * s2.numel(), o1 * o2, V1.shape[0] * V2.shape[0])
    s = torch.kron(s1, s2)
    top = float(s1.max() * s2.max()) if s1.numel() and s2.numel() else 0.0
    order = torch.sort(s, descending=True, stable=True).indices
    U, s, V = torch.kron(U1, U2)[:, order], s[order], torch.kron(V1, V2)[:, order]
    keep = s > RTOL * top
    U, s, V = U[:, keep], s[keep], V[:, keep]
    conv_shape = (o1 * o2, i1 * i2, *kernel) if kernel else None
    return _module(path, mod, U, s, V, _scale(alpha, dim), conv_shape)
