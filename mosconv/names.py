"""File and format names, in a module that imports nothing heavy (no torch), so that the
CLI and batch bookkeeping (what is done, what to skip) start fast."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# PEFT folders: every PEFT file name and key prefix mosconv reads or writes
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # written: the first
PEFT_PREFIX = "base_model.model."

# MoS folders (see docs/format.md)
FORMAT_NAME = "mosconv.mos"
FORMAT_VERSION = 1  # written when no module has a core (v1 readers load it)
FORMAT_VERSION_CORES = 2  # written when a module has a core between its factors
FORMAT_VERSION_STORAGE = 3  # written when routes are implicit or tensors quantized
FORMAT_VERSIONS = (1, 2, 3)  # what this mosconv reads
CONFIG_FILE = "mos_config.json"
TENSOR_FILE = "mos_adapter.safetensors"
REPORT_FILE = "report.json"
CALIB_FILE = "calib_stats.safetensors"  # compress --calib TEXT keeps its statistics here
POOLS_DIR = "pools"  # a zoo's shared pools: OUT/pools/<group>.safetensors


def kind_id(index: int) -> str:
    """The id of the ``index``-th kind of a MoS adapter (``k0``, ``k1``, ...): the tensor
    names ``mos.pools.<id>.A``, a module's ``kind`` field and shared pool keys use it."""
    return f"k{index}"


def kind_ids(kinds: Iterable[str]) -> dict[str, str]:
    """Kind name -> id, for kinds in their order (a dict or list of kind names)."""
    return {kind: kind_id(i) for i, kind in enumerate(kinds)}


def pool_file(out: str | Path, group: str) -> Path:
    """``OUT/pools/<group>.safetensors``: where a zoo group's shared pools are written."""
    return Path(out) / POOLS_DIR / f"{group}.safetensors"


def pool_members_file(out: str | Path, group: str) -> Path:
    """``OUT/pools/<group>.members.json``: the adapters a group's pools serve (the ones they
    were fitted on, then those added to them), with the pool file's sha256."""
    return Path(out) / POOLS_DIR / f"{group}.members.json"
