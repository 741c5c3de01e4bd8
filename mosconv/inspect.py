"""Summaries of a LoRA adapter for ``mosconv inspect`` (no printing here).

:func:`inspect_lora` returns a JSON-ready dict whose schema is documented in
``docs/inspect.md`` (``schema: "mosconv.inspect.lora/1"``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .fit.factorize import Factorization, directions_for_energy, factorize_adapter, stable_rank
from .fit.truncation import budget_for_ratio, truncate
from .lora.types import LoraAdapter, LoraModule

INSPECT_RATIOS = (2, 4, 8, 16)
LORA_SCHEMA = "mosconv.inspect.lora/1"


def _target(name: str) -> str:
    """The ``target_modules`` entry naming a module: its last name part, or the last two
    when the last is a bare index (diffusers' ``to_out.0``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _kind_summary(kind: str, modules: list[LoraModule],
                  facts: dict[str, Factorization]) -> dict[str, Any]:
    srs = [stable_rank(facts[m.name].S) for m in modules]
    d90 = [directions_for_energy(facts[m.name].S, 0.9) for m in modules]
    m0 = modules[0]
    return {
        "kind": kind,
        "modules": len(modules),
        "d_in": m0.d_in,
        "d_out": m0.d_out,
        "ranks": sorted({m.r for m in modules}),
        "scales": sorted({round(m.scale, 8) for m in modules}),
        "params": sum(m.params for m in modules),
        "stored_params": sum(m.file_params for m in modules),
        "energy": sum(facts[m.name].energy for m in modules),
        "stable_rank_mean": sum(srs) / len(srs),
        "stable_rank_max": max(srs),
        "dirs90_mean": sum(d90) / len(d90),
        "dirs90_max": max(d90),
    }


def inspect_lora(adapter: LoraAdapter,
                 ratios: Iterable[float] = INSPECT_RATIOS) -> dict[str, Any]:
    """JSON-ready summary of a LoRA adapter: format, sizes, per-kind spectra, truncation errors.

    The keys and their types are those of ``docs/inspect.md`` (schema ``mosconv.inspect.lora/1``).
    """
    facts = factorize_adapter(adapter)
    kinds = adapter.kinds
    truncation = []
    for ratio in ratios:
        budget = budget_for_ratio(adapter.params, ratio)
        t = truncate(facts, budget)
        truncation.append(
            {"ratio": ratio, "budget": budget, "params": t.params,
             "relative_error": t.relative_error}
        )
    files = [
        {"path": str(p), "bytes": os.path.getsize(p)} for p in adapter.source_files if Path(p).exists()
    ]
    ranks = sorted({m.r for m in adapter.modules})
    return {
        "schema": LORA_SCHEMA,
        "type": "lora",
        "format": adapter.format,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": adapter.dtype,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "files": files,
        "file_bytes": sum(f["bytes"] for f in files),
        "num_modules": len(adapter.modules),
        "num_kinds": len(kinds),
        "ranks": ranks,
        "lora_alpha": adapter.config.get("lora_alpha"),
        "scales": sorted({round(m.scale, 8) for m in adapter.modules}),
        "targets": sorted({_target(m.name) for m in adapter.modules}),
        "lora_params": adapter.params,
        "stored_params": adapter.stored_params,
        "lora_equivalent_params": adapter.params,
        "extra_tensors": {k: list(v.shape) for k, v in adapter.extra_tensors.items()},
        "extra_params": sum(v.numel() for v in adapter.extra_tensors.values()),
        "kinds": [_kind_summary(k, ms, facts) for k, ms in kinds.items()],
        "modules": [
            {"name": m.name, "kind": m.kind, "r": m.r, "d_in": m.d_in, "d_out": m.d_out,
             "scale": m.scale, "stable_rank": stable_rank(facts[m.name].S),
             "energy": facts[m.name].energy, "source_type": m.source_type,
             "stored_params": m.file_params}
            for m in adapter.modules
        ],
        "truncation": truncation,
    }


MOS_SCHEMA = "mosconv.inspect.mos/1"


def inspect_mos(path: str | Path) -> dict[str, Any]:
    """JSON-ready summary of a MoS folder: structure, pools, sizes and its stored report.

    The keys and their types are those of ``docs/inspect.md`` (schema ``mosconv.inspect.mos/1``).
    """
    from .mos.format import format_version, load_mos, load_report

    mos = load_mos(path)
    report = load_report(path)
    kinds = [
        {"kind": k, "d_in": p.d_in, "d_out": p.d_out, "nc": p.nc,
         "pool_A": int(p.pool_A.shape[0]), "pool_B": int(p.pool_B.shape[0]),
         "public_A": p.public_A, "public_B": p.public_B, "params": p.params,
         "own_params": p.local_params + sum(t.numel() for m in mos.modules if m.kind == k
                                            for t in (m.weights_A, m.weights_B, m.core)
                                            if t is not None),
         "modules": sum(1 for m in mos.modules if m.kind == k)}
        for k, p in mos.kinds.items()
    ]
    return {
        "schema": MOS_SCHEMA,
        "type": "mos",
        "format_version": format_version(mos),
        "mosconv_version": mos.info.get("mosconv_version"),
        "source_format": mos.source.get("format"),
        "base_model": mos.source.get("base_model"),
        "ratio": mos.info.get("ratio"),
        "command": mos.info.get("command"),
        "batch": mos.info.get("batch"),
        "zoo_group": mos.info.get("zoo_group"),
        "num_modules": len(mos.modules),
        "num_kinds": len(mos.kinds),
        "params": mos.params,
        "local_params": mos.local_params,
        "index_bytes": mos.index_bytes,
        "storage": mos.storage.to_json(),
        "tensor_bytes": mos.tensor_bytes(),
        "kinds": kinds,
        "modules": [{"name": m.name, "kind": m.kind, "r": m.r, "scale": m.scale,
                     "weights": m.weights_A is not None, "core": m.core is not None}
                    for m in mos.modules],
        "report": report.to_json() if report is not None else None,
    }


SERVING_SCHEMA = "mosconv.inspect.serving/1"


def inspect_serving(path: str | Path) -> dict[str, Any]:
    """What serving ``path`` (a ``batch`` output folder, or one MoS folder) holds in memory,
    computed from its files: a group's pool-file entries once, each adapter's own part, the
    total, next to the same adapters as plain LoRAs (each module at its assembled rank, as
    ``export`` writes them and PEFT holds them). Bytes assume the runtime's float32 layers:
    4 bytes a value (dequantized), 8 an int64 route.

    Raises:
        FormatError: a folder that is neither, or a member that does not load.
    """
    from .errors import FormatError
    from .model.runtime import _is_zoo, _zoo_members
    from .mos.format import is_mos_dir, load_mos
    from .mos.manifest import mos_folder

    p = mos_folder(path)  # a MoS folder may be named by its config or tensor file
    if _is_zoo(p):
        members = _zoo_members(p)
    elif is_mos_dir(p):
        members = [(p.name, p)]
    else:
        raise FormatError(f"{p}: not a MoS folder or a batch output (no mos_config.json or "
                          "summary.json)")
    shared: dict[tuple, int] = {}
    rows = []
    for name, folder in members:
        mos = load_mos(folder)
        own = 0
        for kp in mos.kinds.values():
            nA, nB = (kp.shared["n_A"], kp.shared["n_B"]) if kp.shared else (0, 0)
            own += (kp.pool_A.shape[0] - nA) * (kp.d_in // kp.nc) * 4
            own += (kp.pool_B.shape[0] - nB) * (kp.d_out // kp.nc) * 4
            if kp.shared:
                key = (kp.shared["sha256"], kp.shared.get("key_A"), kp.shared.get("key_B"))
                shared[key] = (nA * (kp.d_in // kp.nc) + nB * (kp.d_out // kp.nc)) * 4
        lora = 0
        for m in mos.modules:
            own += 8 * (m.routes_A.numel() + m.routes_B.numel())
            own += 4 * sum(t.numel() for t in (m.weights_A, m.weights_B, m.core)
                           if t is not None)
            A, B = mos.assemble(m)
            lora += max(int(A.shape[0]), 1) * (int(A.shape[1]) + int(B.shape[0])) * 4
        rows.append({"name": name, "own_bytes": own, "lora_bytes": lora,
                     "params": mos.params, "local_params": mos.local_params})
        del mos
    shared_bytes = sum(shared.values())
    total = shared_bytes + sum(r["own_bytes"] for r in rows)
    lora_total = sum(r["lora_bytes"] for r in rows)
    return {"schema": SERVING_SCHEMA, "path": str(p), "adapters": len(rows),
            "shared_pool_files": len({k[0] for k in shared}), "shared_bytes": shared_bytes,
            "own_bytes_mean": (total - shared_bytes) / len(rows) if rows else 0.0,
            "total_bytes": total, "lora_total_bytes": lora_total,
            "ratio_to_lora": lora_total / total if total else None, "members": rows}
