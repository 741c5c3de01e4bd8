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
from .factorize import fro_retained, frob_inner
from .mos_format import MosAdapter
from .truncation import Truncation

REPORT_SCHEMA = "mosconv.report/1"
_TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def measure(mos: MosAdapter, adapter: LoraAdapter) -> dict[str, tuple[float, float, float]]:
    """Per module ``(err_sq, kept_energy, energy)`` of the MoS update against the source
    LoRA's own factors ``scale * B @ A`` (float64, Gram matrices)."""
    out = {}
    for src in adapter.modules:
        m = mos.module(src.name)
        A, B = mos.assemble(m)
        A = A.to(torch.float64)
        B = B.to(torch.float64) * m.scale
        A0 = src.A.to(torch.float64)
        B0 = src.B.to(torch.float64) * src.scale
        energy = frob_inner(B0, A0, B0, A0)
        kept = frob_inner(B, A, B, A) if m.r else 0.0
        err = max(energy + kept - 2 * frob_inner(B0, A0, B, A), 0.0) if m.r else energy
        out[src.name] = (err, kept, energy)
    return out


def build_report(adapter: LoraAdapter, mos: MosAdapter, trunc: Truncation, structures: dict,
                 config) -> dict:
    measured = measure(mos, adapter)
    modules = []
    total_energy = total_err = 0.0
    for m in adapter.modules:
        err, kept, energy = measured[m.name]
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
        e = sum(trunc.energy[m.name] for m in adapter.kinds[kind])
        kinds.append({
            "kind": kind, **{k: v for k, v in s.items() if not k.endswith("err_sq")},
            "relative_error": math.sqrt(s["err_sq"] / e) if e > 0 else 0.0,
            "truncation_relative_error": math.sqrt(s["truncation_err_sq"] / e) if e > 0 else 0.0,
        })
    return {
        "schema": REPORT_SCHEMA,
        "ratio": float(config.ratio),
        "seed": config.seed,
        "search": config.search,
        "iters": config.iters,
        "routing_weights": config.routing_weights,
        "totals": {
            "lora_params": adapter.params,
            "budget": trunc.budget,
            "mos_params": mos.params,
            "param_ratio": adapter.params / mos.params if mos.params else None,
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
