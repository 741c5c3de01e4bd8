"""Reading a MoS folder's JSON files without torch: ``report.json`` as a typed
:class:`~mosconv.fit.report.Report`, and what batch bookkeeping needs of ``mos_config.json``
(source files, batch settings, zoo group, shared pool references).

Tensors and the full config are read by :mod:`mosconv.mos.format`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..fileio import atomic_write_json, sha256_file
from ..fit.report import Report, ReportError
from ..names import CONFIG_FILE, REPORT_FILE, TENSOR_FILE, pool_file, pool_members_file


def _read_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise FormatError(f"{p}: cannot read {what} ({msg})") from None


def mos_folder(path: str | Path) -> Path:
    """The MoS folder ``path`` names: itself, or the folder of its ``mos_config.json`` or
    tensor file (a reader takes either)."""
    p = Path(path)
    return p.parent if p.name in (CONFIG_FILE, TENSOR_FILE) and p.is_file() else p


def load_report(path: str | Path) -> Report | None:
    """The report of the MoS folder ``path`` (or of the folder of its ``mos_config.json`` or
    tensor file, as :func:`~mosconv.mos.format.load_mos` takes them), or None when it has
    no ``report.json``.

    Raises:
        FormatError: unreadable JSON, or not a valid report (the field is named).
    """
    p = mos_folder(path) / REPORT_FILE
    if not p.is_file():
        return None
    try:
        return Report.from_json(_read_json(p, "report"))
    except ReportError as e:
        raise FormatError(f"{p}: invalid report ({e})") from None


@dataclass(frozen=True)
class PoolRef:
    """A kind's reference to a zoo's shared pool file (path relative to the MoS folder) and
    the parameters of the tensors it names there (``(key, params)`` each; a quantized
    tensor's values, whatever their packing)."""

    file: str
    sha256: str
    tensors: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Manifest:
    """What ``mos_config.json`` says about where a MoS folder came from.

    Attributes:
        source_files: ``(name, sha256)`` of each source file, as recorded (none when the
            adapter was saved from Python without provenance).
        batch: the batch settings it was converted with (None: not by batch).
        zoo_group: the shared-pool group it belongs to (None: none).
        pool_refs: the shared pool files its kinds use.
    """

    source_files: tuple[tuple[str | None, str | None], ...]
    batch: dict | None
    zoo_group: str | None
    pool_refs: tuple[PoolRef, ...]


def _pool_ref(kind: dict) -> PoolRef:
    ref, nc = kind["shared_pool"], int(kind.get("nc") or 1)
    tensors = tuple((str(ref[f"key_{s}"]), int(ref.get(f"n_{s}") or 0) * int(kind[d]) // nc)
                    for s, d in (("A", "d_in"), ("B", "d_out")) if ref.get(f"key_{s}"))
    return PoolRef(str(ref["file"]), str(ref["sha256"]), tensors)


def read_manifest(path: str | Path) -> Manifest:
    """The :class:`Manifest` of the MoS folder ``path``.

    Raises:
        FormatError: no or unreadable ``mos_config.json``, or fields of the wrong type.
    """
    p = Path(path) / CONFIG_FILE
    cfg = _read_json(p, "MoS config")
    try:
        files = tuple((f.get("name"), f.get("sha256"))
                      for f in (cfg.get("source") or {}).get("files") or ())
        refs = tuple(_pool_ref(k) for k in cfg.get("kinds", []) if k.get("shared_pool"))
        batch, group = cfg.get("batch"), cfg.get("zoo_group")
    except (KeyError, TypeError, AttributeError, ValueError):
        raise FormatError(f"{p}: invalid MoS config (source files or shared pool references "
                          "of the wrong type)") from None
    if batch is not None and not isinstance(batch, dict) or \
            group is not None and not isinstance(group, str):
        raise FormatError(f"{p}: invalid MoS config (batch or zoo_group of the wrong type)")
    return Manifest(files, batch, group, refs)


def write_pool_members(out: str | Path, group: str, pool_sha256: str, names: list[str],
                       fitted: list[str] | None = None) -> None:
    """Record which adapters (output names) a zoo group's pool file serves, and the ones it
    was fitted on (``fitted``; default: all of ``names``)."""
    atomic_write_json(pool_members_file(out, group), {
        "pool_sha256": pool_sha256, "members": list(names),
        "fitted": list(names if fitted is None else fitted)})


def read_pool_record(out: str | Path, group: str) -> tuple[list[str], list[str]] | None:
    """``(members, fitted)``: the adapters a group's pool file serves, and the ones it was
    fitted on (a record written before that field existed: all it serves); None: no pool
    file, no record, or a record written for another pool file than the one there."""
    path, rec = pool_file(out, group), pool_members_file(out, group)
    try:
        data = json.loads(rec.read_text())
        names, fitted = data["members"], data.get("fitted", data["members"])
        if not path.is_file() or data["pool_sha256"] != sha256_file(path):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = all(isinstance(x, list) and all(isinstance(n, str) for n in x) for x in (names, fitted))
    return (names, fitted) if ok else None


def read_pool_members(out: str | Path, group: str) -> list[str] | None:
    """The adapters a group's pool file serves (:func:`read_pool_record`), or None."""
    record = read_pool_record(out, group)
    return None if record is None else record[0]
