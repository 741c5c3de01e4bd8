"""``mosconv.cli.plot`` and the ``--plot`` options of ``inspect`` and ``compress``: the PNGs render
(signature, size, real content), are byte-deterministic, are written atomically, group many
kinds into few panels; a missing matplotlib is a one-line CLI error (exit 1) before any work;
docs/choosing-ratio.md shows images that exist in the repo."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factory import llama_like, write_random_peft
from helpers import REPO_ROOT, one_thread, zoo_conversion

from mosconv import read_adapter
from mosconv.cli.commands import main
from mosconv.errors import ConfigError
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.fit.report import Report
from mosconv.inspect import inspect_lora
from mosconv.model.calib import CalibStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "plotting needs matplotlib: pip install 'mosconv[plot]'"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A small random PEFT adapter: 6 layers x q/v, rank 4."""
    folder, _ = write_random_peft(tmp_path_factory.mktemp("plot") / "lora",
                                  llama_like(layers=6, d=32, d_kv=16), r=4, alpha=8)
    return folder


@pytest.fixture(scope="module")
def adapter(lora):
    return read_adapter(lora)


@pytest.fixture(scope="module")
def report(adapter):
    """A weight-metric report (module fixtures run before the autouse one: one thread here too)."""
    with one_thread():
        return convert(adapter, ConvertConfig(ratio=4, search="fast")).report


@pytest.fixture(scope="module")
def data_report(adapter):
    """A data-metric report, as after ``compress --calib`` (identity input moments)."""
    stats = CalibStats(moments={m.name: torch.eye(m.d_in, dtype=torch.float64)
                                for m in adapter.modules}, tokens=1)
    with one_thread():
        return convert(adapter, ConvertConfig(ratio=4, search="fast"), calib=stats).report


def assert_real_png(path) -> None:
    """A PNG with content: signature, > 10 kB, the plot's pixel size, many distinct colors."""
    import matplotlib.image

    from mosconv.cli.plot import DPI, WIDTH

    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert len(raw) > 10_000, len(raw)
    img = matplotlib.image.imread(path)
    assert img.shape[1] == int(WIDTH * DPI) and img.shape[0] > 300
    colors = np.unique(img[::2, ::2].reshape(-1, img.shape[-1]), axis=0)
    assert len(colors) > 30, len(colors)
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was moved into place


# --------------------------------------------------------------------------- library


def test_plot_lora_spectra(mpl, adapter, tmp_path):
    from mosconv.cli.plot import lora_spectra, plot_lora

    info = inspect_lora(adapter)
    spectra = lora_spectra(adapter)
    assert set(spectra) == {m.name for m in adapter.modules}
    assert all(len(s) == 4 and s == sorted(s, reverse=True) for s in spectra.values())
    plot_lora(info, tmp_path / "lora.png", spectra=spectra)
    assert_real_png(tmp_path / "lora.png")


def test_plot_lora_from_json_alone(mpl, adapter, tmp_path):
    """The inspect JSON has no singular values: the panels fall back to stable ranks."""
    from mosconv.cli.plot import plot_lora

    info = json.loads(json.dumps(inspect_lora(adapter)))
    plot_lora(info, tmp_path / "lora.png")
    assert_real_png(tmp_path / "lora.png")
    # with singular values inside the document, they are used (the same bytes as spectra=)
    from mosconv.cli.plot import lora_spectra

    spectra = lora_spectra(adapter)
    plot_lora(info, tmp_path / "a.png", spectra=spectra)
    for m in info["modules"]:
        m["singular_values"] = spectra[m["name"]]
    plot_lora(info, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_plot_lora_error_vs_bytes_panel(mpl, adapter):
    """The LoRA plot has an "error vs bytes" panel: truncation's errors at inspect's ratios
    against the bytes of its factors stored as float32 / float16 / int8 / int4, log x, and
    says that quantization error is not included; with or without singular values."""
    from mosconv.cli.plot import BYTES_PER_PARAM, BYTES_TITLE, lora_figure, lora_spectra

    info = inspect_lora(adapter)
    assert BYTES_PER_PARAM == {"float32": 4.0, "float16": 2.0, "int8": 1 + 2 / 64,
                               "int4": 0.5 + 2 / 64}
    for spectra in (lora_spectra(adapter), None):
        fig = lora_figure(info, spectra)
        panels = [ax for ax in fig.axes if ax.get_title().startswith(BYTES_TITLE)]
        assert len(panels) == 1, [ax.get_title() for ax in fig.axes]
        ax = panels[0]
        assert "quantization error not included" in ax.get_title()
        assert ax.get_xscale() == "log"
        lines = {ln.get_label().split()[0]: ln for ln in ax.get_lines()
                 if ln.get_label().split()[0] in BYTES_PER_PARAM}
        assert list(lines) == ["float32", "float16", "int8", "int4"]
        for name, ln in lines.items():
            tr = info["truncation"]
            assert list(ln.get_xdata()) == pytest.approx(
                [t["params"] * BYTES_PER_PARAM[name] for t in tr])
            assert list(ln.get_ydata()) == [t["relative_error"] for t in tr]
        assert ax.get_legend() is not None
        # spectra panels (2 kinds), their colorbars or none, truncation vs ratio, and this
        titles = [a.get_title() for a in fig.axes]
        assert sum(t.startswith("global SVD truncation") for t in titles) == 1
        assert len(fig.axes) == (6 if spectra else 4), titles
        trunc = next(a for a in fig.axes if a.get_title().startswith("global SVD truncation"))
        below = trunc.get_position().y0 > ax.get_position().y1  # two kinds: stacked
        assert below and trunc.get_position().x0 == pytest.approx(ax.get_position().x0)
    # one kind: truncation and error vs bytes side by side
    k0 = info["kinds"][0]["kind"]
    one = {**info, "kinds": info["kinds"][:1],
           "modules": [m for m in info["modules"] if m["kind"] == k0]}
    fig = lora_figure(one)
    trunc, ax = (next(a for a in fig.axes if a.get_title().startswith(t))
                 for t in ("global SVD truncation", BYTES_TITLE))
    assert ax.get_position().x0 > trunc.get_position().x1
    assert ax.get_position().y0 == pytest.approx(trunc.get_position().y0)


def test_plot_mos_weight_metric(mpl, report, tmp_path):
    from mosconv.cli.plot import plot_mos

    assert "data_relative_error" not in report.to_json()["totals"]
    plot_mos(report, tmp_path / "mos.png")
    assert_real_png(tmp_path / "mos.png")


def test_plot_mos_data_metric_adds_a_column(mpl, report, data_report, tmp_path):
    import matplotlib.image

    from mosconv.cli.plot import plot_mos

    assert data_report.to_json()["totals"]["metric"] == "data"
    assert "data_truncation_relative_error" in data_report.to_json()["modules"][0]
    plot_mos(report, tmp_path / "weight.png")
    plot_mos(data_report, tmp_path / "data.png")
    assert_real_png(tmp_path / "data.png")
    weight = matplotlib.image.imread(tmp_path / "weight.png")
    data = matplotlib.image.imread(tmp_path / "data.png")
    # same rows (one per kind), so the same size; the right half holds the data panels
    assert weight.shape == data.shape
    assert not np.array_equal(weight, data)


def test_plots_are_byte_deterministic(mpl, report, tmp_path):
    from mosconv.cli.plot import plot_mos

    plot_mos(report, tmp_path / "a.png")
    plot_mos(Report.from_json(json.loads(json.dumps(report.to_json()))), tmp_path / "b.png")
    raw = (tmp_path / "a.png").read_bytes()
    assert raw == (tmp_path / "b.png").read_bytes()
    assert b"matplotlib" not in raw.lower()  # no Software / version stamp


def test_many_kinds_are_grouped_into_few_panels():
    """Kinds beyond MAX_PANELS group by their last name part, then into one panel."""
    from mosconv.cli.plot import MAX_PANELS, _groups, _layer_labels

    # as in a Stable Diffusion UNet: kinds per block width, attn1/attn2, to_q ... to_out.0
    mods = [{"name": f"blocks.{b}.attn{a}.to_{p}",
             "kind": f"blocks.*.attn{a}.to_{p.replace('.0', '.*')}[{8 * b}x8]"}
            for b in (1, 2) for a in (1, 2) for p in ("q", "k", "v", "out.0")]
    assert len({m["kind"] for m in mods}) == 16 > MAX_PANELS
    groups = _groups(mods)
    assert [g[0] for g in groups] == ["*.to_q  (4 kinds)", "*.to_k  (4 kinds)",
                                      "*.to_v  (4 kinds)", "*.to_out  (4 kinds)"]
    assert sum(len(g[1]) for g in groups) == len(mods)
    kohya = [{"name": f"lora_unet_b_{i}_p{j}", "kind": f"lora_unet_b_*_p{j}[8x8]"}
             for i in range(2) for j in range(MAX_PANELS + 1)]
    assert [(t, len(ms)) for t, ms, _ in _groups(kohya)] == [("all modules (7 kinds)", 14)]
    # layer numbers come from the kind's `*`
    ms = [{"name": f"model.layers.{i}.q", "kind": "model.layers.*.q[4x4]"} for i in (0, 10, 2)]
    assert _layer_labels("model.layers.*.q[4x4]", ms) == (["0", "10", "2"], "layer")


def test_plot_path_is_checked(mpl, report, tmp_path):
    from mosconv.cli.plot import plot_mos

    with pytest.raises(ConfigError, match=r"must end in \.png"):
        plot_mos(report, tmp_path / "mos.svg")
    with pytest.raises(ConfigError, match="does not exist"):
        plot_mos(report, tmp_path / "missing" / "mos.png")


def test_zoo_30_layers(mpl, tmp_path):
    """A real 30-layer adapter with a shared kind renders (every layer labelled)."""
    from mosconv.cli.plot import plot_mos

    _, result = zoo_conversion("smollm-135m-medical-r16/5epochs", 8.0)
    plot_mos(result.report, tmp_path / "smollm.png")
    assert_real_png(tmp_path / "smollm.png")


# --------------------------------------------------------------------------- CLI


def test_cli_inspect_plot_lora(mpl, lora, tmp_path):
    out = tmp_path / "spectra.png"
    res = CliRunner().invoke(main, ["inspect", str(lora), "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output and "global SVD truncation" in res.output
    assert_real_png(out)
    # --json stays pure JSON
    res = CliRunner().invoke(main, ["inspect", str(lora), "--json", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["schema"] == "mosconv.inspect.lora/1"


def test_cli_compress_plot_then_inspect_plot(mpl, lora, tmp_path):
    mos, png = tmp_path / "mos", tmp_path / "errors.png"
    res = CliRunner().invoke(main, ["compress", str(lora), str(mos), "--ratio", "4",
                                    "--search", "truncation", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert f"wrote {png}" in res.output
    assert_real_png(png)
    again = tmp_path / "again.png"
    res = CliRunner().invoke(main, ["inspect", str(mos), "--plot", str(again)])
    assert res.exit_code == 0, res.output
    assert "MoS adapter" in res.output
    assert again.read_bytes() == png.read_bytes()  # both plot the saved report.json
    (mos / "report.json").unlink()
    res = CliRunner().invoke(main, ["inspect", str(mos), "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert res.output.strip() == f"mosconv: error: {mos}: no report.json, nothing to plot"


def test_cli_bad_plot_name_fails_before_work(mpl, lora, tmp_path):
    res = CliRunner().invoke(main, ["compress", str(lora), str(tmp_path / "mos"),
                                    "--plot", str(tmp_path / "errors.jpg")])
    assert res.exit_code == 2  # a usage error, as every bad option value
    assert "Invalid value for '--plot'" in res.output and "must end in .png" in res.output
    assert not (tmp_path / "mos").exists()
    res = CliRunner().invoke(main, ["compress", str(lora), str(tmp_path / "mos"),
                                    "--plot", str(tmp_path / "nowhere" / "e.png")])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert not (tmp_path / "mos").exists()


def test_cli_without_matplotlib(lora, tmp_path, monkeypatch):
    """No matplotlib: one line, exit 1, and compress stops before converting anything."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    for args in (["inspect", str(lora), "--plot", str(tmp_path / "a.png")],
                 ["compress", str(lora), str(tmp_path / "mos"), "--plot", str(tmp_path / "b.png")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1, res.output
        assert res.output.strip() == f"mosconv: error: {MISSING}"
        assert "Traceback" not in res.output
    assert not (tmp_path / "mos").exists()
    assert not list(tmp_path.glob("*.png"))
    from mosconv.cli.plot import require_matplotlib

    with pytest.raises(ConfigError, match=re.escape(MISSING)):
        require_matplotlib()


# --------------------------------------------------------------------------- docs


def test_choosing_ratio_page_shows_existing_images():
    page = REPO_ROOT / "docs" / "choosing-ratio.md"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())
    assert "img/error_vs_ratio.png" in images
    assert any(re.fullmatch(r"img/inspect_[\w.-]+\.png", i) for i in images), images
    for rel in images:
        path = (page.parent / rel).resolve()
        assert path.is_file(), rel
        assert REPO_ROOT in path.parents  # in the repo, not in ../shared
        assert path.read_bytes()[:8] == PNG_SIGNATURE
