"""The conversion report: measured errors of the MoS adapter next to the truncation
baseline at the same budget.  Fields are documented in ``docs/format.md``.

Errors are measured on the assembled MoS factors (float32 pools, as saved) against
the exact factorization of the source, with Gram matrices (no dense updates).
"""

from __future__ import annotations

import math

import torch

from ..lora.types import LoraAdapter
from ..mos.types import MosAdapter
from .datafit import data_err_sq
from .factorize import Factorization, factorize, fro_retained, frob_inner
from .truncation import Truncation

REPORT_SCHEMA = "mosconv.report/1"


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


def measure_data(mos: MosAdapter, adapter: LoraAdapter, moments: dict[str, torch.Tensor],
                 trunc: Truncation) -> dict[str, tuple[float, float, float]]:
    """Per module ``(err_sq, plain_truncation_err_sq, energy)`` in the data metric
    ``tr(E C E^T)``, ``C`` the module's input second moment with the same small ridge as
    the conversion (:func:`mosconv.fit.datafit.regularize`)."""
    from .datafit import DataTarget, regularize

    out = {}
    for src in adapter.modules:
        C = regularize(moments[src.name])
        f = factorize(src).double()
        VC = C @ f.V
        energy = float(((f.U.T @ f.U) * (f.S[:, None] * (f.V.T @ VC) * f.S[None, :])).sum())
        t = DataTarget(f=Factorization(f.U, f.S, f.V, energy), C=C, VC=VC)
        A, B = mos.assemble(mos.module(src.name))
        m = mos.module(src.name)
        err = data_err_sq(t, A.to(torch.float64), B.to(torch.float64) * m.scale)
        k = trunc.ranks[src.name]
        root = f.S[:k].sqrt()
        terr = data_err_sq(t, root[:, None] * f.V[:, :k].T, f.U[:, :k] * root[None, :])
        out[src.name] = (err, terr, energy)
    return out


def _rel(err: float, energy: float) -> float:
    return math.sqrt(err / energy) if energy > 0 else 0.0


def build_report(adapter: LoraAdapter, mos: MosAdapter, trunc: Truncation, structures: dict,
                 config, *, calib=None, dtrunc: Truncation | None = None) -> dict:
    """The report; with ``calib``, the data-metric fields (and ``dtrunc``, data-aware
    truncation at the same budget, as their baseline) are added."""
    measured = measure(mos, adapter)
    data = measure_data(mos, adapter, calib.moments, trunc) if calib is not None else None
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
        if data is not None:
            derr, dplain, denergy = data[m.name]
            modules[-1].update({
                "data_energy": denergy,
                "data_relative_error": _rel(derr, denergy),
                "data_truncation_rank": dtrunc.ranks[m.name],
                "data_truncation_relative_error": _rel(dtrunc.err_sq[m.name], dtrunc.energy[m.name]),
                "plain_truncation_data_relative_error": _rel(dplain, denergy),
            })
    rel = math.sqrt(total_err / total_energy) if total_energy > 0 else 0.0
    kinds = []
    for kind, s in structures.items():
        names = [m.name for m in adapter.kinds[kind]]
        e = sum(trunc.energy[n] for n in names)
        entry = {
            "kind": kind, **{k: v for k, v in s.items() if not k.endswith("err_sq")},
            "relative_error": _rel(sum(measured[n][0] for n in names), e),
            "truncation_relative_error": _rel(sum(trunc.err_sq[n] for n in names), e),
        }
        if data is not None:
            de = sum(data[n][2] for n in names)
            entry.update({
                "data_relative_error": _rel(sum(data[n][0] for n in names), de),
                "data_truncation_relative_error": _rel(sum(dtrunc.err_sq[n] for n in names),
                                                       sum(dtrunc.energy[n] for n in names)),
                "plain_truncation_data_relative_error": _rel(sum(data[n][1] for n in names), de),
            })
        kinds.append(entry)
    report = {
        "schema": REPORT_SCHEMA,
        "ratio": float(config.ratio),
        "seed": config.seed,
        "search": config.search,
        "iters": config.iters,
        "routing_weights": config.routing_weights,
        "totals": {
            "lora_params": adapter.params,
            "source_params": adapter.stored_params,
            "source_format": adapter.format,
            "budget": trunc.budget,
            "mos_params": mos.params,
            "param_ratio": adapter.params / mos.params if mos.params else None,
            "index_bytes": mos.index_bytes,
            "lora_file_bytes": adapter.source_bytes,
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
    if data is not None:
        de = sum(v[2] for v in data.values())
        derr = sum(v[0] for v in data.values())
        drel = _rel(derr, de)
        dtrel = _rel(sum(dtrunc.err_sq.values()), sum(dtrunc.energy.values()))
        t = report["totals"]
        t.update({
            "metric": "data",
            "data_relative_error": drel,
            "data_truncation_relative_error": dtrel,
            "plain_truncation_data_relative_error": _rel(sum(v[1] for v in data.values()), de),
            "data_truncation_params": dtrunc.params,
            "calib_tokens": calib.tokens,
        })
        # in the data metric the baseline is data-aware truncation
        t["sharing_gain"] = (dtrel - drel) if t["kinds_shared"] else 0.0
    return report
