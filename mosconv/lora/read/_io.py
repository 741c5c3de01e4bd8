"""Safe tensor-file loading shared by every reader.

safetensors headers are validated by mosconv (dtypes, shapes and offsets against the file
size, before anything is allocated) and by the safetensors library; legacy ``.bin`` files
(``torch.save`` zips, whose entries are first checked against the file size) are loaded
with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers: no pickle is executed.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from ...errors import FormatError
from ._header import TensorEntry, _read_header, read_safetensors_header  # noqa: F401


def load_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of ``path`` (``.safetensors`` or legacy ``.bin``/``.pt``) on CPU.

    Returns:
        ``(tensors, metadata)``; metadata is the safetensors header metadata or ``{}``.

    Raises:
        FormatError: missing, truncated or corrupt file, or a pickle that contains
            anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        header, meta, data_start = _read_header(path)
        if not _utf8(path):  # the safetensors library takes UTF-8 paths only: its bytes
            return _load_safetensors_bytes(path), meta
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:  # validates the header
                keys = list(f.keys())
                tensors = {}
                with open(path, "rb") as fh:
                    for key in keys:
                        t = _read_into(fh, data_start, header[key])
                        tensors[key] = t if t is not None else f.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FormatError(f"{path}: corrupt or truncated safetensors file ({msg})") from None
        _check_names(path, tensors)
        return tensors, meta
    _check_zip(path)
    try:
        with warnings.catch_warnings():  # a damaged pickle makes torch warn (e.g. "Detected
            warnings.simplefilter("ignore")  # pickle protocol 66") before it fails
            with open(path, "rb") as fh:  # a file object: any path the OS takes
                obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice (to load it unsafely, which mosconv never does);
        # the reason is the line naming what it refused ("Unsupported global ...", "Trying
        # to load unsupported GLOBAL posix.system ..."), minus its own advice.
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
        reason = next((ln for ln in lines if re.search(r"global|WeightsUnpickler", ln, re.IGNORECASE)
                       and "weights_only" not in ln), None)
        reason = f" ({reason.split('. Please use')[0].rstrip('.')[:200]})" if reason else ""
        raise FormatError(
            f"{path}: refused to load: the pickle holds objects other than tensors{reason}; "
            "mosconv never unpickles code (convert the file to safetensors where you trust it)"
        ) from None
    except Exception as e:  # noqa: BLE001  (a damaged pickle makes torch raise anything:
        # TypeError, AssertionError, struct.error, ...; weights_only ran no code)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: corrupt or truncated checkpoint ({msg[:200]})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise FormatError(f"{path}: not a state dict of named tensors")
    _check_names(path, obj)
    return dict(obj), {}


def _utf8(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (a name of other bytes arrives surrogate-escaped)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_safetensors_bytes(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file whose path the library cannot take, read through its bytes (the
    header was checked against the file size first, as for any other path)."""
    from safetensors.torch import load

    try:
        with open(path, "rb") as fh:
            tensors = load(fh.read())
    except (SafetensorError, RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{path}: corrupt or truncated safetensors file ({msg})") from None
    _check_names(path, tensors)
    return tensors


def _check_names(path: Path, tensors: Iterable[str]) -> None:
    """Tensor names end up in messages and module names: no control characters."""
    for key in tensors:
        if not key.isprintable():
            raise FormatError(f"{path}: corrupt file (tensor name {key[:80]!a} holds "
                              "control characters)")


def _check_zip(path: Path) -> None:
    """Refuse a ``.bin``/``.pt`` that is not a sound ``torch.save`` zip, before torch reads it.

    torch allocates what the file declares: the pre-1.6 (non-zip) format declares storage
    sizes inside the pickle, and a zip entry declares its own size, so a damaged file could
    make torch allocate far more than the file holds.  ``torch.save`` writes stored
    (uncompressed) entries, so every entry must fit in the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            raise FormatError(
                f"{path}: not a torch.save zip checkpoint (pre-1.6 legacy torch serialization "
                "or another format); re-save it with a current torch or as safetensors"
            )
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise FormatError(f"{path}: not a torch.save checkpoint (zip entry "
                                      f"{info.filename[:80]!r} is compressed; torch.save "
                                      "stores its entries as they are)")
                if (info.compress_size != info.file_size
                        or info.header_offset + info.file_size > size):
                    raise FormatError(f"{path}: corrupt or truncated checkpoint (zip entry "
                                      f"{info.filename[:80]!r} declares {info.file_size} bytes "
                                      f"that the {size}-byte file cannot hold)")
            bad = z.testzip()  # torch.load does not check the CRCs torch.save writes
            if bad is not None:
                raise FormatError(f"{path}: corrupt checkpoint (zip entry {bad[:80]!r} does "
                                  "not match its CRC)")
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001  (zipfile raises BadZipFile, ValueError, struct.error...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: corrupt or truncated checkpoint ({msg[:200]})") from None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_into(fh: BinaryIO, data_start: int, entry: TensorEntry) -> torch.Tensor | None:
    """Read one tensor straight into its own buffer (no mmap: peak memory = 1x the data).

    Returns None for dtypes not listed here (the caller falls back to safetensors)."""
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        return None
    shape = [int(d) for d in entry["shape"]]
    start, end = (int(x) for x in entry["data_offsets"])
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if end - start != nbytes:
        raise ValueError(f"tensor data size {end - start} does not match shape {shape}")
    if nbytes:
        fh.seek(data_start + start)
        buf = t.reshape(-1).view(torch.uint8).numpy()
        if fh.readinto(memoryview(buf)) != nbytes:
            raise ValueError("file ends inside tensor data")
    return t


def check_finite(path: Path, key: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        return
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.to(torch.float32)  # float8: isfinite is not implemented for it
    if not torch.isfinite(t).all():
        raise FormatError(f"{path}: tensor {key} contains NaN or Inf values")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
