"""The metric objects of the fitting engine (mosconv.fit.metric): the weight metric and the
data metric are two implementations of one interface, and with identity input moments the
data metric IS the weight metric (same spectra, same errors)."""

from __future__ import annotations

import pytest
import torch

from mosconv.fit.convert import ConvertConfig, convert
from mosconv.fit.factorize import factorize
from mosconv.fit.metric import DataMetric, WeightMetric
from mosconv.fit.pools import private_fit
from mosconv.model.calib import CalibStats

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(shared_a_adapter):
    return shared_a_adapter


def identity(adapter) -> CalibStats:
    return CalibStats({m.name: torch.eye(m.d_in, dtype=torch.float64) for m in adapter.modules},
                      1, {"data": "identity"})


def test_both_metrics_offer_the_same_interface(adapter):
    stats = identity(adapter)
    data = DataMetric.from_moments(adapter, stats.moments, stats.tokens, stats.info)
    for metric in (WeightMetric(), data):
        spectra = metric.spectra(adapter)
        assert list(spectra) == [m.name for m in adapter.modules]
        for mods in adapter.kinds.values():
            targets = metric.for_search(metric.kind_targets(mods))
            facts = [metric.factorization(t) for t in targets]
            kf = private_fit(facts, [2] * len(mods))
            errs = metric.err_sq(kf, targets)
            # a private fit keeps the top-2 triplets: its error is the energy of the rest
            want = [float((f.S[2:] ** 2).sum()) for f in facts]
            assert errs == pytest.approx(want, rel=1e-6, abs=1e-9)
            refined = metric.refine(kf, targets, 2)
            assert sum(metric.err_sq(refined, targets)) <= sum(errs) * (1 + 1e-9)


def test_identity_moments_give_the_weight_metric(adapter):
    metric = DataMetric.from_moments(adapter, identity(adapter).moments, 1, {})
    for m in adapter.modules:  # equal up to the fit's ridge (1e-6 of the mean moment)
        assert metric.targets[m.name].f.S == pytest.approx(factorize(m).S.double(), rel=2e-6)
    config = ConvertConfig(ratio=4, search="fast")
    weight = convert(adapter, config).report
    data = convert(adapter, config, calib=identity(adapter)).report
    assert data.metric == "data" and weight.metric == "weight"
    t = data.totals
    assert t.data.data_relative_error == pytest.approx(t.relative_error, rel=1e-6)
    assert t.data.data_truncation_relative_error == pytest.approx(
        weight.totals.truncation_relative_error, rel=1e-6)
    for row in data.modules:
        assert row.data.data_relative_error == pytest.approx(row.relative_error, rel=1e-5,
                                                             abs=1e-7)
