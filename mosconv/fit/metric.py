"""The metric a conversion fits and measures in: one object the fitting engine calls.

* :class:`WeightMetric`: ``||dW - dW'||_F`` (the default).  A module's target is its exact
  factorization :class:`~mosconv.fit.factorize.Factorization` (float64 while fitting).
* :class:`DataMetric`: ``||(dW - dW') X||_F`` on calibration inputs ``X`` (input second
  moments ``C = X X^T / n``).  A module's target is a
  :class:`~mosconv.fit.datafit.DataTarget` (whitened factorization), built once per module.

Both give the engine (:mod:`mosconv.fit.convert`) the same five things: the spectrum that
truncation allocates over, a kind's targets, the factorization whose prefixes are
truncation, the error of a kind fit, and its refinement.  A new metric (or a new
structure's error) plugs in here without a branch in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..lora.types import LoraAdapter, LoraModule
from .datafit import DataTarget, data_target, kind_data_err_sq, refine_data, regularize
from .factorize import Factorization, factorize
from .pools import KindFit, kind_err_sq, refine

Target = Factorization | DataTarget


class CalibLike(Protocol):
    """Calibration statistics as the fit needs them
    (:class:`mosconv.model.calib.CalibStats` is one)."""

    moments: dict[str, torch.Tensor]  # module name -> (d_in, d_in) input second moment
    tokens: int
    info: dict


class WeightMetric:
    """Frobenius error of the update."""

    name = "weight"

    def __init__(self, factorizations: dict[str, Factorization] | None = None) -> None:
        self.factorizations = factorizations

    def spectra(self, adapter: LoraAdapter) -> dict[str, Factorization]:
        """Per module, what global truncation allocates over.  Without precomputed
        factorizations only singular values are kept (peak memory holds one kind's
        singular vectors at a time; :meth:`kind_targets` factorizes a kind when it is fitted)."""
        if self.factorizations is not None:
            return self.factorizations
        return {m.name: _spectrum(m) for m in adapter.modules}

    def kind_targets(self, mods: list[LoraModule]) -> list[Factorization]:
        facts = self.factorizations
        return [facts[m.name] if facts else factorize(m) for m in mods]

    def factorization(self, t: Target) -> Factorization:
        return t  # type: ignore[return-value]

    def for_search(self, targets: list[Target]) -> list[Target]:
        """Targets as the shared-pool fits want them: float64 singular vectors."""
        return [t.double() for t in targets]  # type: ignore[union-attr]

    def err_sq(self, kf: KindFit, targets: list[Target]) -> list[float]:
        return kind_err_sq(kf, targets)  # type: ignore[arg-type]

    def refine(self, kf: KindFit, targets: list[Target], iters: int) -> KindFit:
        return refine(kf, targets, iters)  # type: ignore[arg-type]

    def always_search(self) -> bool:
        """Whether shared candidates are tried for every kind (else a cheap test decides)."""
        return False


@dataclass
class DataMetric:
    """Error on calibration inputs: every module's target computed once, at construction.

    Attributes:
        targets: module name -> whitened target (its ``C`` regularized as the fit uses it).
        tokens: calibration tokens the moments were computed on.
        info: where the statistics came from (recorded in ``mos_config.json``).
    """

    targets: dict[str, DataTarget]
    tokens: int
    info: dict

    name = "data"

    @classmethod
    def from_moments(cls, adapter: LoraAdapter, moments: dict[str, torch.Tensor], tokens: int,
                     info: dict) -> DataMetric:
        """Targets of every module of ``adapter`` from its input second moments."""
        from .._threads import one_thread

        with one_thread():
            targets = {m.name: data_target(m, regularize(moments[m.name]))
                       for m in adapter.modules}
        return cls(targets, tokens, info)

    def spectra(self, adapter: LoraAdapter) -> dict[str, Factorization]:
        return {n: t.f for n, t in self.targets.items()}

    def kind_targets(self, mods: list[LoraModule]) -> list[DataTarget]:
        return [self.targets[m.name] for m in mods]

    def factorization(self, t: Target) -> Factorization:
        return t.f  # type: ignore[union-attr]

    def for_search(self, targets: list[Target]) -> list[Target]:
        return targets  # already float64

    def err_sq(self, kf: KindFit, targets: list[Target]) -> list[float]:
        return kind_data_err_sq(kf, targets)  # type: ignore[arg-type]

    def refine(self, kf: KindFit, targets: list[Target], iters: int) -> KindFit:
        return refine_data(kf, targets, iters)  # type: ignore[arg-type]

    def always_search(self) -> bool:
        return True


Metric = WeightMetric | DataMetric


def _spectrum(module: LoraModule) -> Factorization:
    """A module's singular values, with empty singular-vector matrices of the right heights."""
    f = factorize(module)
    return Factorization(torch.empty(f.d_out, 0), f.S, torch.empty(f.d_in, 0))
