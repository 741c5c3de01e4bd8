"""The conversion report: measured errors of the MoS adapter next to the truncation
baseline at the same budget.  Fields are documented in ``docs/format.md``.

Errors are measured on the assembled MoS factors (float32 pools, as saved) against
the exact factorization of the source, with Gram matrices (no dense updates).
"""

from __future__ import annotations

import math
import os

import torch

from .adapter import LoraAdapter
from .factorize import Factorization, fro_retained
from .fit import module_err_sq
from .mos_format import MosAdapter
from .truncation import Truncation

REPORT_SCHEMA = "mosconv.report/1"
_TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def measure(mos: MosAdapter, facts: dict[str, Factorization]) -> dict[str, tuple[float, float]]:
    """Per module ``(err_sq, kept_energy)`` of the MoS update against the exact target."""
    out = {}
    for m in mos.modules:
        A, B = mos.assemble(m)
        A = A.to(torch.float64)
        B = B.to(torch.float64) * m.scale
        err = module_err_sq(facts[m.name], A, B)
        kept = float(((B.T @ B) * (A @ A.T)).sum()) if m.r else 0.0
        out[m.name] = (err, kept)
    return out


def build_report(adapter: LoraAdapter, facts: dict[str, Factorization], mos: MosAdapter,
                 trunc: Truncation, structures: dict, config) -> dict:
    measured = measure(mos, facts)
    modules = []
    total_energy = total_err = 0.0
    for m in adapter.modules:
        f = facts[m.name]
        err, kept = measured[m.name]
        energy = f.energy
        total_energy += energy
        total_err += err
        rel = math.sqrt(err / energy) if energy > 0 else 0.0
        modules.append({
            "name": m.name,
            "kind": m.kind,
            "r_lora": m.r,
            "r_mos": mos.module(m.name).r,
            "energy": energy,
            "relative_error": rel,
            "energy_retained": 1 - err / energy if energy > 0 else 1.0,
            "fro_retained": fro_retained(kept, energy),
            "truncation_rank": trunc.ranks[m.name],
            "truncation_relative_error": math.sqrt(trunc.err_sq[m.name] / energy) if energy > 0 else 0.0,
        })
    rel = math.sqrt(total_err / total_energy) if total_energy > 0 else 0.0
    lora_file_bytes = sum(os.path.getsize(p) for p in adapter.source_files
                          if str(p).endswith(_TENSOR_SUFFIXES) and os.path.exists(p))
    kinds = []
    for kind, s in structures.items():
        e = sum(facts[m.name].energy for m in adapter.kinds[kind])
        kinds.append({
            "kind": kind, **{k: v for k, v in s.items() if not k.endswith("err_sq")},
            "relative_error": math.sqrt(s["err_sq"] / e) if e > 0 else 0.0,
            "truncation_relative_error": math.sqrt(s["truncation_err_sq"] / e) if e > 0 else 0.0,
        })
    return {
        "schema": REPORT_SCHEMA,
        "ratio": config.ratio,
        "seed": config.seed,
        "search": config.search,
        "totals": {
            "lora_params": adapter.params,
            "budget": trunc.budget,
            "mos_params": mos.params,
            "param_ratio": adapter.params / mos.params if mos.params else math.inf,
            "index_bytes": mos.index_bytes,
            "lora_file_bytes": lora_file_bytes,
            "mos_file_bytes": None,
            "file_bytes_ratio": None,
            "relative_error": rel,
            "truncation_relative_error": trunc.relative_error,
            "truncation_params": trunc.params,
            "energy_retained": 1 - rel * rel,
            # all-private kinds ARE truncation; tiny differences are float32 storage rounding
            "sharing_gain": (trunc.relative_error - rel) if any(
                s["structure"] != "private" for s in structures.values()) else 0.0,
            "kinds_shared": sum(1 for s in structures.values() if s["structure"] != "private"),
        },
        "kinds": kinds,
        "modules": modules,
    }
