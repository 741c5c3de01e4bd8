"""Reading a safetensors header (no torch: used by the fast batch bookkeeping too)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from ...errors import FormatError

# A safetensors header larger than this is refused before it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bytes per element of every safetensors dtype mosconv reads (sub-byte F4/F6 are refused).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}


class TensorEntry(TypedDict):
    """One tensor of a safetensors header, as :func:`check_entries` has validated it."""

    dtype: str  # a key of DTYPE_BYTES, e.g. ``F32``
    shape: list[int]
    data_offsets: list[int]  # ``[start, end)`` bytes into the data that follows the header


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _short(key: object) -> str:
    key = str(key)
    return repr(key) if len(key) <= 80 else repr(key[:80]) + "..."


def _show(value: object) -> str:
    """``repr`` of a header value, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_entries(path: Path, header: Mapping[str, object], data_bytes: int) -> None:
    """Validate every tensor entry against the file, in plain Python (no allocation).

    ``header`` is the parsed JSON header without ``__metadata__``: its values are not yet
    known to be anything, which is what is checked (each becomes a :class:`TensorEntry`).

    Dtypes, shapes and offsets must be well-formed, every declared size (shape x dtype)
    must equal its byte range, and the ranges must tile the data part of the file exactly
    (no overlap, no gap, nothing past the end): a header that declares more than the file
    holds is refused here, before any tensor is allocated.
    """
    spans = []
    for key, e in header.items():
        what = f"{path}: corrupt safetensors header (tensor {_short(key)}"
        if not isinstance(e, dict):
            raise FormatError(f"{what} is not an object)")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise FormatError(f"{what} has unsupported dtype {_show(dtype)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise FormatError(f"{what} has invalid shape {_show(shape)})")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]):
            raise FormatError(f"{what} has invalid data_offsets {_show(offsets)})")
        nbytes = DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
        start, end = offsets
        if end - start != nbytes:
            if nbytes > data_bytes:
                raise FormatError(f"{what} declares shape {shape} of {nbytes} bytes, more than "
                                  f"the file's {data_bytes} data bytes)")
            raise FormatError(f"{what} declares shape {shape} {dtype} = {nbytes} bytes but its "
                              f"data_offsets hold {end - start})")
        if end > data_bytes:
            raise FormatError(f"{path}: corrupt or truncated safetensors file (tensor {_short(key)} "
                              f"ends at byte {end}, the file holds {data_bytes} data bytes)")
        spans.append((start, end, key))
    pos, prev = 0, None
    for start, end, key in sorted(spans):
        if start != pos:
            problem = (f"tensors {_short(prev)} and {_short(key)} overlap" if start < pos
                       else f"gap of {start - pos} bytes before tensor {_short(key)}")
            raise FormatError(f"{path}: corrupt safetensors header ({problem})")
        pos, prev = end, key
    if pos != data_bytes:
        raise FormatError(f"{path}: corrupt safetensors file (tensors cover {pos} of its "
                          f"{data_bytes} data bytes)")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Return ``(tensor_entries, metadata)`` of a safetensors file without loading tensors."""
    header, meta, _ = _read_header(path)
    return header, meta


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: not a safetensors file (file shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise FormatError(f"{path}: corrupt safetensors header (declares {n} header "
                                  f"bytes, the file has {size})")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from None
    except _DuplicateKey as e:
        raise FormatError(f"{path}: corrupt safetensors header (duplicate key "
                          f"{_short(e)})") from None
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, absurd numbers or nesting
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise FormatError(f"{path}: corrupt safetensors header (__metadata__ value of "
                              f"{_short(k)} is not a string)")
    check_entries(path, header, size - 8 - n)
    return header, dict(meta), 8 + n
