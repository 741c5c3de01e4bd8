"""The typed report (mosconv.fit.report): built once, never edited, the JSON of report.json
round-trips, reading validates in one place and names the bad field, and reading needs no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from mosconv.errors import FormatError
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.fit.report import REPORT_SCHEMA, Report, ReportError
from mosconv.model.calib import CalibStats
from mosconv.mos.format import load_report, save_mos
from mosconv.names import REPORT_FILE, TENSOR_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(shared_a_adapter):
    return shared_a_adapter


@pytest.fixture(scope="module")
def results(adapter):
    import torch

    d_in = {m.name: m.d_in for m in adapter.modules}
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = CalibStats({n: (x[:, :d] .T @ x[:, :d]) / 64 for n, d in d_in.items()}, 64,
                       {"data": "x"})
    config = ConvertConfig(ratio=4, search="fast")
    return convert(adapter, config), convert(adapter, config, calib=stats)


def test_json_round_trips_for_both_metrics(results):
    for res in results:
        obj = res.report.to_json()
        assert obj["schema"] == REPORT_SCHEMA
        again = Report.from_json(json.loads(json.dumps(obj)))
        assert again == res.report
        assert again.to_json() == obj
    weight, data = (r.report for r in results)
    assert weight.metric == "weight" and "metric" not in weight.to_json()["totals"]
    assert data.metric == "data" and data.to_json()["totals"]["metric"] == "data"
    assert data.totals.data.calib_tokens == 64
    assert all(m.data is not None for m in data.modules)


def test_a_report_is_never_edited(results, tmp_path):
    report = results[0].report
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.totals.relative_error = 0.0  # type: ignore[misc]
    before = report.to_json()
    save_mos(results[0].mos, tmp_path / "m", report)
    assert report.to_json() == before  # saving does not touch the caller's report
    assert report.totals.mos_file_bytes is None
    saved = load_report(tmp_path / "m")
    assert saved.totals.mos_file_bytes == (tmp_path / "m" / TENSOR_FILE).stat().st_size
    assert saved == report.with_file_bytes(saved.totals.mos_file_bytes)


def test_kind_and_module_rows_agree_with_totals(results):
    report = results[0].report
    e = sum(m.energy for m in report.modules)
    assert report.energy == pytest.approx(e)
    err = sum(m.energy * m.relative_error ** 2 for m in report.modules)
    assert (err / e) ** 0.5 == pytest.approx(report.totals.relative_error, rel=1e-9)
    assert sum(k.structure.params for k in report.kinds) == report.totals.mos_params


def _broken(obj: dict, path: list, value) -> dict:
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


@pytest.mark.parametrize("path, value, named", [
    (["totals", "relative_error"], "x", "totals.relative_error is 'x'"),
    (["totals", "lora_params"], KeyError, "totals.lora_params is None"),
    (["totals", "kinds_shared"], True, "totals.kinds_shared is True"),
    (["kinds", 0, "structure"], 3, "kinds[0].structure is 3"),
    (["kinds", 0], [], "kinds[0] is []"),
    (["modules", 1, "energy"], None, "modules[1].energy is None"),
    (["totals"], [], "no totals object or kinds list"),
    (["modules"], {}, "modules is {}"),
])
def test_invalid_reports_name_the_field(results, path, value, named):
    obj = _broken(results[0].report.to_json(), path, value)
    with pytest.raises(ReportError) as e:
        Report.from_json(obj)
    assert str(e.value) == named


def test_data_fields_are_required_in_a_data_report(results):
    obj = _broken(results[1].report.to_json(), ["kinds", 0, "data_relative_error"], KeyError)
    with pytest.raises(ReportError, match=r"kinds\[0\]\.data_relative_error is None"):
        Report.from_json(obj)


def test_older_reports_without_the_newer_fields_still_read(results):
    obj = results[0].report.to_json()
    for key in ("source_params", "source_format", "lora_file_bytes", "truncation_params"):
        del obj["totals"][key]
    for k in obj["kinds"]:
        del k["candidates_tried"], k["weights"]
    del obj["modules"]
    old = Report.from_json(obj)
    assert old.totals.source_params is None and old.modules == ()
    assert old.kinds[0].structure.candidates_tried == 0


def test_load_report_gives_one_line_errors(tmp_path, results):
    save_mos(results[0].mos, tmp_path / "m", results[0].report)
    p = tmp_path / "m" / REPORT_FILE
    p.write_text(json.dumps({"totals": {}, "kinds": []}))
    with pytest.raises(FormatError) as e:
        load_report(tmp_path / "m")
    assert str(e.value) == f"{p}: invalid report (totals.lora_params is None)"
    p.write_text("{")
    with pytest.raises(FormatError, match="cannot read report"):
        load_report(tmp_path / "m")


def test_reading_reports_imports_no_torch(results, tmp_path):
    save_mos(results[0].mos, tmp_path / "m", results[0].report)
    code = ("import sys; from mosconv.mos.manifest import load_report, read_manifest; "
            f"r = load_report({str(tmp_path / 'm')!r}); m = read_manifest({str(tmp_path / 'm')!r}); "
            "assert r.totals.mos_params > 0 and m.zoo_group is None; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
