"""Data-aware conversion: the whitened factorization, data-aware truncation, the data-metric
refinement, convert(..., calib=...) and its report, errors and determinism."""

from __future__ import annotations

import math

import pytest
import torch
from factory import llama_like, write_random_peft

import mosconv
from mosconv import ConfigError
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.fit.datafit import (
    data_err_sq,
    data_target,
    kind_data_err_sq,
    refine_data,
    regularize,
    whitened_factorization,
)
from mosconv.fit.factorize import factorize
from mosconv.fit.pools import private_fit, shared_fit
from mosconv.lora.types import LoraModule
from mosconv.model.calib import CalibStats
from mosconv.mos.format import save_mos

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _moment(d: int, rank: int, seed: int, basis=None) -> torch.Tensor:
    """A realistic input second moment: most energy in a ``rank``-dim subspace."""
    g = torch.Generator().manual_seed(seed)
    basis = basis if basis is not None else torch.randn(d, rank, generator=g, dtype=F64)
    X = torch.randn(500, rank, generator=g, dtype=F64) @ basis.T
    X = X + 0.05 * torch.randn(500, d, generator=g, dtype=F64)
    return X.T @ X / 500


def _module(d_out=12, d_in=10, r=4, seed=0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule("m", torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5)


def test_whitened_factorization_is_exact_and_c_orthonormal():
    m = _module()
    C = _moment(10, 3, 1)
    f = whitened_factorization(m, C)
    dW = m.scale * m.B.double() @ m.A.double()
    assert torch.allclose(f.U.T @ f.U, torch.eye(f.S.numel(), dtype=F64), atol=1e-10)
    assert torch.allclose(f.V.T @ C.double() @ f.V, torch.eye(f.S.numel(), dtype=F64), atol=1e-8)
    assert torch.allclose((f.U * f.S) @ f.V.T, dW, atol=1e-8)
    assert bool((f.S[:-1] >= f.S[1:]).all())
    assert math.isclose(f.energy, float(torch.trace(dW @ C @ dW.T)), rel_tol=1e-9)


def test_identity_metric_gives_plain_spectrum():
    m = _module()
    f = whitened_factorization(m, torch.eye(10, dtype=F64))
    assert torch.allclose(f.S, factorize(m).S, atol=1e-9)


def test_data_truncation_beats_plain_truncation_in_data_metric():
    m = _module(r=6)
    C = _moment(10, 3, 2)
    t = data_target(m, C)
    plain = factorize(m).double()
    for k in range(1, 6):
        root = t.f.S[:k].sqrt()
        e_data = data_err_sq(t, root[:, None] * t.f.V[:, :k].T, t.f.U[:, :k] * root)
        assert math.isclose(e_data, float((t.f.S[k:] ** 2).sum()), rel_tol=1e-6, abs_tol=1e-9)
        pr = plain.S[:k].sqrt()
        e_plain = data_err_sq(t, pr[:, None] * plain.V[:, :k].T, plain.U[:, :k] * pr)
        assert e_data <= e_plain * (1 + 1e-9)


def test_refine_data_never_increases_the_error():
    mods = [_module(seed=s) for s in range(4)]
    basis = torch.randn(10, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    targets = [data_target(m, regularize(_moment(10, 3, 10 + i, basis))) for i, m in enumerate(mods)]
    fs = [t.f for t in targets]
    kf = shared_fit(fs, [1, 1, 1, 1], 1, 2, 2, False, seed=0)
    before = sum(kind_data_err_sq(kf, targets))
    after = sum(kind_data_err_sq(refine_data(kf, targets, iters=3), targets))
    assert after <= before * (1 + 1e-12) and after < before
    # the private structure of the whitened spectra is data-aware truncation exactly
    pf = private_fit(fs, [2, 2, 2, 2])
    errs = kind_data_err_sq(pf, targets)
    for e, t in zip(errs, targets):
        assert math.isclose(e, float((t.f.S[2:] ** 2).sum()), rel_tol=1e-6, abs_tol=1e-9)


def _adapter_and_stats(tmp_path, shared_inputs=True):
    path, _ = write_random_peft(tmp_path / "lora", llama_like(4, 32, 16), r=6)
    adapter = mosconv.read_adapter(path)
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(32, 5, generator=g, dtype=F64) if shared_inputs else None
    moments = {m.name: _moment(32, 5, 20 + i, basis) for i, m in enumerate(adapter.modules)}
    return adapter, CalibStats(moments, 500, {"data": "synthetic"})


@pytest.mark.parametrize("search", ["truncation", "fast", "thorough"])
def test_convert_with_calib_reports_both_metrics_and_never_loses(tmp_path, search):
    adapter, stats = _adapter_and_stats(tmp_path)
    res = convert(adapter, ConvertConfig(ratio=6, search=search), calib=stats)
    t = res.report.to_json()["totals"]
    assert t["metric"] == "data" and t["calib_tokens"] == 500
    assert t["mos_params"] <= t["budget"]
    assert t["data_relative_error"] <= t["data_truncation_relative_error"] + 1e-6
    assert t["data_truncation_relative_error"] <= t["plain_truncation_data_relative_error"] + 1e-9
    for key in ("relative_error", "truncation_relative_error"):
        assert 0 <= t[key] <= 1
    if search == "truncation":
        assert math.isclose(t["data_relative_error"], t["data_truncation_relative_error"],
                            rel_tol=1e-5)
        assert t["sharing_gain"] == 0
    else:  # inputs share a subspace across layers: sharing pays in the data metric
        assert t["kinds_shared"] >= 1 and t["sharing_gain"] > 0.01
    for m in res.report.to_json()["modules"]:
        assert {"data_relative_error", "data_truncation_relative_error",
                "plain_truncation_data_relative_error", "data_truncation_rank"} <= set(m)
    for k in res.report.to_json()["kinds"]:
        assert k["data_relative_error"] <= k["data_truncation_relative_error"] + 1e-6
    assert res.mos.info["metric"] == "data" and res.mos.info["calib"]["tokens"] == 500


def test_convert_with_calib_is_deterministic(tmp_path):
    adapter, stats = _adapter_and_stats(tmp_path)
    outs = []
    for i in range(2):
        res = convert(adapter, ConvertConfig(ratio=6, seed=1), calib=stats)
        outs.append(save_mos(res.mos, tmp_path / f"m{i}", res.report) / "mos_adapter.safetensors")
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_calib_that_does_not_match_the_adapter(tmp_path):
    adapter, stats = _adapter_and_stats(tmp_path)
    name = adapter.modules[0].name
    missing = CalibStats({k: v for k, v in stats.moments.items() if k != name}, 500)
    with pytest.raises(ConfigError, match=f"no entry for module {name}"):
        convert(adapter, ConvertConfig(), calib=missing)
    wrong = CalibStats({**stats.moments, name: torch.eye(8, dtype=F64)}, 500)
    with pytest.raises(ConfigError, match="do not match"):
        convert(adapter, ConvertConfig(), calib=wrong)
