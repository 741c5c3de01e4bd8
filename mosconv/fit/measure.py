"""Measure a MoS adapter against its source and build its :class:`~mosconv.fit.report.Report`.

Errors are measured on the assembled MoS factors as stored (float32 pools) against the
source LoRA's own factors ``scale * B @ A``, with Gram matrices (no dense updates), in
float64.  In the data metric the plain-truncation baseline needs the source's singular
vectors: they come from the conversion (factorized once) or are computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.types import LoraAdapter
from ..mos.types import MosAdapter
from .datafit import DataTarget, data_err_sq, regularize
from .factorize import Factorization, factorize, fro_retained, frob_inner
from .report import (
    DataTotals,
    DistillSection,
    KindData,
    KindRow,
    KindStructure,
    ModuleData,
    ModuleRow,
    Report,
    Settings,
    Totals,
    rel,
)
from .storage import EqualBytes
from .truncation import Truncation


@dataclass(frozen=True)
class Baseline:
    """What a conversion's report compares against, kept so that a later stage
    (distillation) can build the report of a changed adapter against the same baselines.

    Attributes:
        trunc: global-budget SVD truncation at the conversion's budget (weight metric).
        dtrunc: data-aware truncation at the same budget (data metric), or None.
        structures: what the fit chose per kind.
        equal_bytes: truncation stored like the MoS adapter in no more tensor bytes
            (:func:`~mosconv.fit.storage.equal_bytes_truncation`), or None.
    """

    trunc: Truncation
    dtrunc: Truncation | None
    structures: dict[str, KindStructure]
    equal_bytes: EqualBytes | None = None


@dataclass(frozen=True)
class DataInputs:
    """What the data-metric part of a report is measured with.

    Attributes:
        moments: module name -> regularized ``(d_in, d_in)`` input second moment.
        tokens: calibration tokens the moments come from.
    """

    moments: dict[str, torch.Tensor]
    tokens: int

    @classmethod
    def from_raw(cls, moments: dict[str, torch.Tensor], tokens: int) -> DataInputs:
        """From raw second moments (regularized as the fit does)."""
        return cls({n: regularize(C) for n, C in moments.items()}, tokens)


@dataclass(frozen=True)
class Measured:
    """One module's squared errors: the MoS update's, and in the data metric also the
    plain truncation's (the baseline a user of plain SVD would get)."""

    err_sq: float
    kept: float  # ||dW'||^2 of the MoS update
    energy: float
    data_err_sq: float | None = None
    data_plain_err_sq: float | None = None
    data_energy: float | None = None


def measure(mos: MosAdapter, adapter: LoraAdapter, trunc: Truncation,
            moments: dict[str, torch.Tensor] | None = None,
            plain: dict[str, Factorization] | None = None) -> dict[str, Measured]:
    """Per module errors of ``mos`` against ``adapter``; with ``moments`` (regularized input
    second moments, :func:`~mosconv.fit.datafit.regularize`) also in the data metric, where
    ``plain`` are the source's full factorizations (computed here when absent)."""
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
        if moments is None:
            out[src.name] = Measured(err, kept, energy)
            continue
        # the source's own factorization with the module's regularized input moment: the
        # report measures against the source, not against the target the fit used
        C = moments[src.name]
        f = (plain[src.name] if plain is not None else factorize(src)).double()
        VC = C @ f.V
        denergy = float(((f.U.T @ f.U) * (f.S[:, None] * (f.V.T @ VC) * f.S[None, :])).sum())
        t = DataTarget(f=Factorization(f.U, f.S, f.V, denergy), C=C, VC=VC)
        derr = data_err_sq(t, A, B)
        k = trunc.ranks[src.name]
        root = f.S[:k].sqrt()
        dplain = data_err_sq(t, root[:, None] * f.V[:, :k].T, f.U[:, :k] * root[None, :])
        out[src.name] = Measured(err, kept, energy, derr, dplain, denergy)
    return out


def build_report(adapter: LoraAdapter, mos: MosAdapter, baseline: Baseline, settings: Settings,
                 *, data: DataInputs | None = None,
                 plain: dict[str, Factorization] | None = None,
                 distill: DistillSection | None = None,
                 local_params: int | None = None) -> Report:
    """The report of ``mos`` converted from ``adapter``; with ``data`` (data-aware
    conversion) the data-metric errors are added, with data-aware truncation
    (``baseline.dtrunc``) as their baseline; ``plain``: the source's full factorizations
    if the caller has them."""
    trunc, dtrunc = baseline.trunc, baseline.dtrunc
    measured = measure(mos, adapter, trunc, data.moments if data else None, plain)
    if data is not None and dtrunc is None:
        raise ValueError("a data-metric report needs the data-aware truncation baseline")
    modules = []
    for m in adapter.modules:
        x = measured[m.name]
        md = None
        if data:
            md = ModuleData(
                data_energy=x.data_energy,
                data_relative_error=rel(x.data_err_sq, x.data_energy),
                data_truncation_rank=dtrunc.ranks[m.name],
                data_truncation_relative_error=rel(dtrunc.err_sq[m.name], dtrunc.energy[m.name]),
                plain_truncation_data_relative_error=rel(x.data_plain_err_sq, x.data_energy))
        modules.append(ModuleRow(
            name=m.name, kind=m.kind, r_lora=m.r, r_mos=mos.module(m.name).r,
            energy=x.energy, relative_error=rel(x.err_sq, x.energy),
            energy_retained=1 - x.err_sq / x.energy if x.energy > 0 else 1.0,
            fro_retained=fro_retained(x.kept, x.energy),
            truncation_rank=trunc.ranks[m.name],
            truncation_relative_error=rel(trunc.err_sq[m.name], x.energy), data=md))
    kinds = []
    for kind, s in baseline.structures.items():
        names = [m.name for m in adapter.kinds[kind]]
        e = sum(trunc.energy[n] for n in names)
        kd = None
        if data:
            de = sum(measured[n].data_energy for n in names)
            kd = KindData(
                data_relative_error=rel(sum(measured[n].data_err_sq for n in names), de),
                data_truncation_relative_error=rel(sum(dtrunc.err_sq[n] for n in names),
                                                   sum(dtrunc.energy[n] for n in names)),
                plain_truncation_data_relative_error=rel(
                    sum(measured[n].data_plain_err_sq for n in names), de))
        kinds.append(KindRow(kind, s, rel(sum(measured[n].err_sq for n in names), e),
                             rel(sum(trunc.err_sq[n] for n in names), e), kd))
    total_energy = total_err = 0.0
    for m in adapter.modules:
        total_energy += measured[m.name].energy
        total_err += measured[m.name].err_sq
    err = rel(total_err, total_energy)
    kinds_shared = sum(1 for s in baseline.structures.values() if s.structure != "private")
    # all-private kinds ARE truncation; tiny differences are float32 storage rounding
    gain = (trunc.relative_error - err) if kinds_shared else 0.0
    dt = None
    if data:
        vals = measured.values()
        de = sum(v.data_energy for v in vals)
        drel = rel(sum(v.data_err_sq for v in vals), de)
        dtrel = rel(sum(dtrunc.err_sq.values()), sum(dtrunc.energy.values()))
        dt = DataTotals(data_relative_error=drel, data_truncation_relative_error=dtrel,
                        plain_truncation_data_relative_error=rel(
                            sum(v.data_plain_err_sq for v in vals), de),
                        data_truncation_params=dtrunc.params, calib_tokens=data.tokens)
        gain = (dtrel - drel) if kinds_shared else 0.0  # the data metric's baseline
    tb = mos.tensor_bytes()
    st, eq = mos.storage, baseline.equal_bytes
    totals = Totals(
        lora_params=adapter.params, source_params=adapter.stored_params,
        source_format=adapter.format, budget=trunc.budget, mos_params=mos.params,
        param_ratio=adapter.params / mos.params if mos.params else None,
        index_bytes=mos.index_bytes, lora_file_bytes=adapter.source_bytes,
        relative_error=err, truncation_relative_error=trunc.relative_error,
        truncation_params=trunc.params, energy_retained=1 - err * err, sharing_gain=gain,
        kinds_shared=kinds_shared, dtype=st.dtype, quantize=st.quantize,
        quant_group=st.group if st.quantized else None, lora_tensor_bytes=adapter.tensor_bytes,
        mos_tensor_bytes=tb["total"], mos_bytes=tb,
        tensor_bytes_ratio=adapter.tensor_bytes / tb["total"] if tb["total"] else None,
        truncation_equal_bytes_relative_error=eq.relative_error if eq else None,
        truncation_equal_bytes_params=eq.params if eq else None,
        truncation_equal_bytes_tensor_bytes=eq.tensor_bytes if eq else None,
        data=dt, local_params=local_params)
    return Report(settings, totals, tuple(kinds), tuple(modules), distill)
