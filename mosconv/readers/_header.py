"""Reading a safetensors header (no torch: used by the fast batch bookkeeping too)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import FormatError

# A safetensors header larger than this is refused before it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Return ``(tensor_entries, metadata)`` of a safetensors file without loading tensors."""
    header, meta, _ = _read_header(path)
    return header, meta


def _read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: not a safetensors file (file shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n > path.stat().st_size - 8:
                raise FormatError(f"{path}: corrupt safetensors header (declares {n} header bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    return header, {str(k): str(v) for k, v in meta.items()}, 8 + n
