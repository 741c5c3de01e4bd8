"""Readers: any supported LoRA on disk -> :class:`mosconv.lora.types.LoraAdapter`.

:func:`read_adapter` detects the format: a folder with ``adapter_config.json`` is
PEFT; a single ``.safetensors``/``.bin`` file (or a folder holding exactly one)
is diffusers or kohya by its keys; an ``adapter_model.*`` file inside a PEFT
folder is read as that folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import FormatError
from ...fileio import missing
from ...names import PEFT_CONFIG as CONFIG_NAME
from ...names import PEFT_WEIGHTS as WEIGHT_NAMES

if TYPE_CHECKING:
    from ..types import LoraAdapter

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_adapter_path(path: str | Path) -> tuple[str, Path]:
    """Return ``(family, path)``: ``("peft", folder)`` or ``("file", file)``."""
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FormatError(f"{path}: {missing(path)}")
    if path.is_file():
        if path.name in WEIGHT_NAMES and (path.parent / CONFIG_NAME).is_file():
            return "peft", path.parent
        if path.name == CONFIG_NAME:
            return "peft", path.parent
        if path.suffix not in _SUFFIXES:
            raise FormatError(f"{path}: unknown adapter format (expected a folder or a "
                              ".safetensors/.bin file)")
        return "file", _not_bare_peft_weights(path)
    config = path / CONFIG_NAME
    if config.is_file():
        return "peft", path
    if os.path.lexists(config):  # a PEFT folder whose config cannot be read as a file: not
        why = "a folder" if config.is_dir() else missing(config)  # another format's folder
        raise FormatError(f"{config}: cannot read ({why})")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
    if len(files) == 1:
        return "file", _not_bare_peft_weights(files[0])
    if not files:
        inside = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
        hint = (f"; the adapter in {path / inside[0]}? (PEFT saves an adapter not named "
                "'default' in a subfolder of that name)") if inside else ""
        raise FormatError(f"{path}: unknown adapter format (no {CONFIG_NAME} and no "
                          f".safetensors/.bin file){hint}")
    raise FormatError(f"{path}: several weight files and no {CONFIG_NAME}; pass one file")


def _not_bare_peft_weights(path: Path) -> Path:
    """``path``, unless it is PEFT's weight file without its config: read as a single file its
    scale would be 1, not PEFT's ``lora_alpha / r`` (e.g. an export whose config was never
    written)."""
    if path.name in WEIGHT_NAMES:
        raise FormatError(f"{path}: PEFT weights without {CONFIG_NAME} beside them: their scale "
                          "(lora_alpha / r) is unknown")
    return path


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a LoRA adapter in any supported format.

    Raises:
        FormatError: missing path, unknown format, corrupt file, invalid tensors.
        UnsupportedAdapterError: adapters mosconv refuses on purpose (DoRA, LoHa, ...).
    """
    from .peft import read_peft  # torch is imported only when an adapter is read
    from .single_file import read_single_file

    family, p = resolve_adapter_path(path)
    if family == "peft":
        return read_peft(p)
    return read_single_file(p)


__all__ = ["read_adapter", "resolve_adapter_path"]
