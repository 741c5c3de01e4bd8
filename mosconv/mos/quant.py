"""How a MoS adapter's float tensors are stored: a float dtype, or symmetric int8 / int4 values
with one float16 scale per group of ``group`` values along each row.

No I/O here (the tensor names live in :mod:`mosconv.mos.format`). In memory, pools and cores
are always float32 holding exactly the values that are stored (:func:`snap`), so that every
error measured in memory is the error of the file.

Quantization of a ``(N, w)`` matrix ``x`` (``qmax`` = 127 for int8, 7 for int4), per row and
per group ``g`` of columns ``[g*group, (g+1)*group)`` (the last group may be shorter)::

    scale[n, g] = float16 rounded *up* from max|x[n, group g]| / qmax     (0 for a zero group)
    q[n, j]     = round(x[n, j] / scale[n, g(j)]), clamped to [-qmax, qmax]
    x'[n, j]    = q[n, j] * scale[n, g(j)]          (computed in float32)

int4 values are packed two per byte: column ``2k`` in the low nibble, ``2k+1`` in the high
nibble, each as a 4-bit two's complement number (a row of odd width gets a zero nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NumericalError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
QUANTIZE = ("none", "int8", "int4")
QMAX = {"int8": 127, "int4": 7}
SCALE_DTYPE = torch.float16
DEFAULT_GROUP = 64
_F16_MAX = float(torch.finfo(torch.float16).max)


class StorageOverflow(NumericalError):
    """Values too large for the storage (float16 values or scales)."""


@dataclass(frozen=True)
class Storage:
    """How pools, cores and slot weights are stored.

    Attributes:
        dtype: ``float32``, ``float16`` or ``bfloat16``: float tensors that are not quantized
            (all of them with ``quantize="none"``; slot weights always).
        quantize: ``none``, ``int8`` or ``int4``: pools (shared, public and private shards)
            and cores as integers with float16 scales per group of ``group`` values.
        group: values per scale along a row.
    """

    dtype: str = "float32"
    quantize: str = "none"
    group: int = DEFAULT_GROUP

    def validate(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, "
                             f"got {self.quantize!r}")
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 1:
            raise ValueError(f"group must be an integer >= 1, got {self.group!r}")

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.dtype]

    @property
    def label(self) -> str:
        """``float16``, ``int8`` (with float16 scales per 64 values), ..."""
        return self.quantize if self.quantized else self.dtype

    def to_json(self) -> dict:
        out: dict = {"dtype": self.dtype, "quantize": self.quantize}
        if self.quantized:
            out.update(group=self.group, scale_dtype="float16")
        return out

    # ------------------------------------------------------------ bytes

    def value_bytes(self, rows: int, width: int) -> int:
        """Bytes of the values of a ``(rows, width)`` matrix stored this way (scales apart)."""
        if self.quantize == "int8":
            return rows * width
        if self.quantize == "int4":
            return rows * ((width + 1) // 2)
        return rows * width * self.torch_dtype.itemsize

    def scale_bytes(self, rows: int, width: int) -> int:
        """Bytes of the scales of a ``(rows, width)`` matrix (0 unless quantized)."""
        if not self.quantized:
            return 0
        return rows * n_groups(width, self.group) * SCALE_DTYPE.itemsize

    def row_bytes(self, width: int) -> int:
        """Bytes of one stored row of ``width`` values, scales included."""
        return self.value_bytes(1, width) + self.scale_bytes(1, width)


def n_groups(width: int, group: int) -> int:
    return (width + group - 1) // group if width else 0


def storage_of_source(dtype: str) -> str:
    """The float dtype ``--dtype auto`` keeps for a source whose factors are ``dtype`` (as
    :class:`~mosconv.lora.types.LoraAdapter` records it; mixed dtypes keep the widest)."""
    names = [d for d in dtype.split("/") if d]
    for wide in ("float64", "float32"):
        if wide in names:
            return "float32"
    if names and all(n == names[0] for n in names) and names[0] in FLOAT_DTYPES:
        return names[0]
    return "float32"  # float16 with bfloat16: neither holds the other's values


# ---------------------------------------------------------------- quantization


def _ceil_f16(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= ``x`` (float32 in, float16 out)."""
    h = x.to(SCALE_DTYPE)
    low = h.float() < x
    if bool(low.any()):
        up = torch.nextafter(h, torch.full_like(h, float("inf")))
        h = torch.where(low, up, h)
    return h


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """``(N, w)`` -> ``(N, G, group')``, zero padded; ``group' = min(group, w)`` (one group
    holds the whole row then: padding it wider changes nothing, and a huge ``group`` read
    from a file must not allocate in proportion to it)."""
    n, w = x.shape
    group = max(1, min(group, w))
    g = n_groups(w, group)
    pad = g * group - w
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(n, g, group)


def quantize(x: torch.Tensor, quantize: str, group: int,
             scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)`` of a float ``(N, w)`` matrix: int8 ``(N, w)`` values and float16
    ``(N, G)`` scales; with ``scales`` given, the values for those scales.

    Raises:
        StorageOverflow: a scale does not fit float16.
    """
    qmax = QMAX[quantize]
    x = x.to(torch.float32)
    n, w = x.shape
    xg = _grouped(x, group)
    if scales is None:
        top = xg.abs().amax(dim=2) if w else x.new_zeros(n, 0)
        if bool((top / qmax > _F16_MAX).any()):
            raise StorageOverflow("values too large for float16 scales")
        scales = _ceil_f16(top / qmax)
    s = scales.float()[:, :, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(xg / safe), torch.zeros_like(xg)).clamp_(-qmax, qmax)
    return q.reshape(n, xg.shape[1] * xg.shape[2])[:, :w].to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """float32 ``(N, w)`` values of int8 ``q`` with float16 ``scales``."""
    n, w = q.shape
    qg = _grouped(q.float(), group)
    out = qg * scales.float()[:, :, None]
    return out.reshape(n, qg.shape[1] * qg.shape[2])[:, :w].contiguous()


def refit_scales(x: torch.Tensor, q: torch.Tensor, group: int) -> torch.Tensor:
    """Least-squares float16 scales for fixed integers ``q``: per group
    ``<x, q> / <q, q>`` (the rounding fixed, the scale that best fits the values)."""
    xg = _grouped(x.float(), group).double()
    qg = _grouped(q.float(), group).double()
    num = (xg * qg).sum(2)
    den = (qg * qg).sum(2)
    s = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).clamp_min(0)
    if bool((s > _F16_MAX).any()):
        raise StorageOverflow("values too large for float16 scales")
    return s.to(SCALE_DTYPE)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``(N, w)`` in [-8, 7] -> uint8 ``(N, ceil(w/2))``, two values per byte."""
    w = q.shape[1]
    if w % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``(N, ceil(w/2))`` -> int8 ``(N, width)``."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])[:, :width]
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def encode(x: torch.Tensor, storage: Storage) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensors that store float32 ``x`` (``(N, w)`` when quantized): ``(values, scales)``;
    ``scales`` is None for a float dtype. Exact for values from :func:`snap`."""
    if not storage.quantized:
        out = x.to(storage.torch_dtype).contiguous()
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
            raise StorageOverflow(f"values too large for {storage.dtype}")
        return out, None
    q, s = quantize(x, storage.quantize, storage.group)
    return (pack_int4(q) if storage.quantize == "int4" else q), s


def decode(values: torch.Tensor, scales: torch.Tensor | None, storage: Storage,
           width: int) -> torch.Tensor:
    """float32 values of stored tensors (the inverse of :func:`encode`)."""
    if not storage.quantized:
        return values.to(torch.float32)
    q = unpack_int4(values, width) if storage.quantize == "int4" else values.to(torch.int8)
    return dequantize(q, scales, storage.group)


def snap(x: torch.Tensor, storage: Storage, *, rows: bool = True) -> torch.Tensor:
    """float32 ``x`` as it is stored and read back: cast to the dtype, or quantized and
    dequantized until that no longer changes it (then :func:`encode` is exact for it).
    ``rows=False`` for a 1-D tensor that is never quantized (slot weights)."""
    if not storage.quantized or not rows:
        return encode(x, Storage(storage.dtype))[0].to(torch.float32)
    shape = x.shape
    y = x.to(torch.float32) if x.dim() == 2 else x.reshape(shape[0], -1).to(torch.float32)
    for _ in range(64):  # a fixed point in one or two steps (more only for subnormal scales)
        q, s = quantize(y, storage.quantize, storage.group)
        z = dequantize(q, s, storage.group)
        if torch.equal(z, y):
            break
        y = z
    return y.reshape(shape)
