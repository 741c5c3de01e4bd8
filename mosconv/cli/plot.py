"""PNG plots of what ``mosconv inspect`` and ``mosconv compress`` report (optional extra:
``pip install 'mosconv[plot]'``).

Both plots take the JSON-ready dicts mosconv already produces and compute nothing new:

* :func:`plot_lora` draws an :func:`mosconv.inspect.inspect_lora` summary: the singular value
  spectra of every module, one panel per kind, the truncation error against the ratio, and the
  same errors against the bytes the truncated factors take in float32 / float16 / int8 / int4
  (parameters times :data:`BYTES_PER_PARAM`; quantization error not included). The inspect
  document carries no singular values, so they are passed in: :func:`lora_spectra` runs the
  same factorization ``inspect`` does.
* :func:`plot_mos` draws a conversion report (``report.json``, ``docs/format.md``): per
  module, the relative error of the MoS adapter next to the truncation baseline at the same
  budget, one panel per kind, plus the data metric when the report has it (``compress --calib``).

matplotlib is imported inside the functions only, through its non-interactive Agg canvas (no
pyplot, no global backend switch). The same input gives the same PNG bytes: fixed figure size
for a given number of panels, fixed dpi, no timestamp or software version in the file. Files
are written atomically (temporary file in the same folder, then ``os.replace``).

With many kinds (Stable Diffusion UNets have dozens), panels group the kinds by the last part of
their name (``to_q``, ``to_k``, ...), and when even that gives too many, one panel holds every
module.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from ..fit.report import Report
from ..mos.quant import DEFAULT_GROUP

if TYPE_CHECKING:
    from ..lora.types import LoraAdapter

MAX_PANELS = 6  # panels of modules per plot; more kinds are grouped (see the module docstring)
DPI = 100
WIDTH = 13.0  # inches
MAX_TICKS = 32  # x tick labels per panel at most (30-layer adapters keep every layer)
DENSE = 64  # modules per panel above which the baseline is drawn as a line, not bars
_MISSING = "plotting needs matplotlib: pip install 'mosconv[plot]'"
_MOS_COLOR, _TRUNC_COLOR, _PLAIN_COLOR = "#1f77b4", "#ff7f0e", "#444444"
# bytes per parameter of a factor stored as float32, float16, int8 or int4 (one float16 scale
# per DEFAULT_GROUP values): the x axis of plot_lora's "error vs bytes" panel
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "int8": 1 + 2 / DEFAULT_GROUP,
                   "int4": 0.5 + 2 / DEFAULT_GROUP}
_STORAGE_COLORS = {"float32": "#1f77b4", "float16": "#2ca02c", "int8": "#ff7f0e",
                   "int4": "#d62728"}
_SOURCE_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
BYTES_TITLE = "error vs bytes"
_WEIGHT_LABEL = r"rel. error $\|dW-\widehat{dW}\|_F\,/\,\|dW\|_F$"
_DATA_LABEL = r"rel. error $\|(dW-\widehat{dW})X\|_F\,/\,\|dW X\|_F$"


def require_matplotlib() -> None:
    """Raise :class:`~mosconv.errors.ConfigError` when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ConfigError(_MISSING) from None


def check_plot_path(path: str | Path) -> Path:
    """Check, before any work, that a plot can be written to ``path``: a ``.png`` name in an
    existing folder, and matplotlib installed.

    Raises:
        ConfigError: the name does not end in ``.png``, its folder does not exist, or
            matplotlib is missing.
    """
    path = Path(path)
    problem = plot_path_problem(path)
    if problem:
        raise ConfigError(f"--plot: {path}: {problem}")
    require_matplotlib()
    return path


def plot_path_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a plot file name: not ``.png``, or no such folder."""
    if path.suffix.lower() != ".png":
        return "the plot file name must end in .png"
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        return f"folder {path.parent} {what}"
    return None


def lora_spectra(adapter: LoraAdapter) -> dict[str, list[float]]:
    """Singular values of every module's ``dW`` (descending), keyed by module name: the
    factorization ``inspect`` uses, for :func:`plot_lora`'s ``spectra``."""
    from ..fit.factorize import factorize_adapter

    return {name: [float(s) for s in f.S] for name, f in factorize_adapter(adapter).items()}


# --------------------------------------------------------------------------- helpers


def _figure(height: float):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _pattern(kind: str) -> str:
    """A kind without its ``[d_out x d_in]`` shape suffix."""
    return kind.split("[", 1)[0]


def _target(kind: str) -> str:
    """The last dotted part of a kind's name, ignoring ``*`` parts (``...attn1.to_out.*``
    gives ``to_out``); a kohya kind (no dots) is its own target."""
    parts = [p for p in _pattern(kind).split(".") if p and p != "*"]
    return parts[-1] if parts else kind


def _groups(modules: list[dict]) -> list[tuple[str, list[dict], bool]]:
    """``(title, modules, is_one_kind)`` per panel, modules in their given order."""
    by_kind: dict[str, list[dict]] = {}
    for m in modules:
        by_kind.setdefault(m["kind"], []).append(m)
    if len(by_kind) <= MAX_PANELS:
        return [(k, ms, True) for k, ms in by_kind.items()]
    by_target: dict[str, list[str]] = {}
    for k in by_kind:
        by_target.setdefault(_target(k), []).append(k)
    if len(by_target) <= MAX_PANELS:
        return [(f"*.{t}  ({len(ks)} kinds)", [m for k in ks for m in by_kind[k]], False)
                for t, ks in by_target.items()]
    return [(f"all modules ({len(by_kind)} kinds)", list(modules), False)]


def _layer_labels(kind: str, ms: list[dict]) -> tuple[list[str], str]:
    """Tick labels for a panel: the numbers the kind's ``*`` stand for in each module name
    (``12`` for ``model.layers.12.self_attn.q_proj``), else positions; and the axis label."""
    if ms and all(m["kind"] == kind for m in ms):
        pat = re.escape(_pattern(kind)).replace(r"\*", r"(\d+)")
        found = [re.fullmatch(pat, m["name"]) for m in ms]
        if all(f is not None and f.groups() for f in found):
            stars = len(found[0].groups())
            return ([".".join(f.groups()) for f in found],
                    "layer" if stars == 1 else "layer (the kind's * indices)")
    return [str(i) for i in range(len(ms))], "module (in adapter order)"


def _set_ticks(ax, labels: list[str], panel_inches: float) -> None:
    """Label every layer when they fit (every k-th otherwise); vertical when long."""
    n = len(labels)
    step = max(1, math.ceil(n / MAX_TICKS))
    ticks = list(range(0, n, step))
    longest = max((len(labels[i]) for i in ticks), default=0)
    vertical = len(ticks) * (0.075 * longest + 0.08) > 0.85 * panel_inches
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=90 if vertical else 0, fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)


def _weighted(ms: list[dict], err: str, energy: str) -> float | None:
    """Energy-weighted relative error of a group of modules, from their own fields."""
    e = sum(m[energy] for m in ms)
    if e <= 0:
        return None
    return math.sqrt(sum(m[energy] * m[err] ** 2 for m in ms) / e)


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


# --------------------------------------------------------------------------- LoRA


def _spectra_panel(fig, ax, ms, spectra, labels, what) -> None:
    """One line per module: ``sigma_i / sigma_1`` against ``i``, colored by layer."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cmap = colormaps["viridis"]
    norm = Normalize(0, max(len(ms) - 1, 1))
    top = 1
    for j, m in enumerate(ms):
        s = [float(x) for x in spectra.get(m["name"], [])]
        if not s or s[0] <= 0:
            continue  # a zero update has no spectrum to draw
        y = [v / s[0] if v / s[0] > 1e-12 else float("nan") for v in s]
        top = max(top, len(s))
        ax.plot(range(1, len(s) + 1), y, color=cmap(norm(j)), lw=1.2, alpha=0.85,
                marker="o", ms=3 if len(s) <= 16 else 0)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.3, not 3 x 10^-1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))  # label 2, 3, 5 x 10^k
    ax.set_xlim(0.6, top + 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("singular value index i", fontsize=9)
    ax.set_ylabel(r"$\sigma_i\,/\,\sigma_1$ (log scale)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, aspect=30)
    step = max(1, math.ceil(len(ms) / 8))
    cb.set_ticks(list(range(0, len(ms), step)))
    cb.ax.set_yticklabels([labels[t] for t in range(0, len(ms), step)], fontsize=7)
    cb.set_label(what, fontsize=8)


def _sigma_by_layer_panel(ax, ms, spectra, labels, what, panel_inches) -> None:
    """Rank 1-2 modules: the singular values themselves (log scale) against the layer."""
    xs = range(len(ms))
    for i, marker in ((0, "o"), (1, "s")):
        ys = [float(s[i]) if len(s := spectra.get(m["name"], [])) > i and s[i] > 0
              else float("nan") for m in ms]
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, marker=marker, lw=1, label=rf"$\sigma_{i + 1}$")
    ax.set_yscale("log")
    _set_ticks(ax, labels, panel_inches)
    ax.set_xlabel(what, fontsize=9)
    ax.set_ylabel(r"singular value of $dW$ (scale included, log)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _stable_rank_panel(ax, ms, labels, what, panel_inches) -> None:
    """Without spectra: each module's stable rank (from ``info``) next to its rank."""
    ax.bar(range(len(ms)), [m["stable_rank"] for m in ms], color=_MOS_COLOR, width=0.7,
           label="stable rank")
    ax.plot(range(len(ms)), [m["r"] for m in ms], "k_", ms=10, label="rank r")
    _set_ticks(ax, labels, panel_inches)
    ax.set_xlabel(what, fontsize=9)
    ax.set_ylabel(r"stable rank $\|dW\|_F^2/\|dW\|_2^2$", fontsize=9)
    ax.set_ylim(0, max((m["r"] for m in ms), default=1) * 1.3)  # room for the legend
    ax.legend(fontsize=8, loc="upper left", ncol=2)


def _fmt_bytes(v: float, _pos=None) -> str:
    """A tick label for a byte count: ``300 B``, ``40 kB``, ``1.5 MB``."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:g} {unit}"
    return f"{v:g} B"


def _bytes_panel(ax, info: dict[str, Any], narrow: bool = False) -> None:
    """Truncation's relative error against the tensor bytes its factors would take stored as
    float32, float16, int8 or int4: the points of ``info["truncation"]`` (each ratio's
    parameters times :data:`BYTES_PER_PARAM`). Rounding / quantization error is not added
    (``narrow``: a narrow panel, its title and label on more lines)."""
    from matplotlib.ticker import FuncFormatter

    tr = [t for t in info["truncation"] if t["params"] > 0]  # 0 bytes: no place on a log axis
    for name, per in BYTES_PER_PARAM.items():
        ax.plot([t["params"] * per for t in tr], [t["relative_error"] for t in tr], "-o",
                color=_STORAGE_COLORS[name], lw=1.5, ms=3.5,
                label=f"{name} {per:.3g} B/p")
    lo = min((t["params"] * BYTES_PER_PARAM["int4"] for t in tr), default=None)
    for t in tr:  # the ratio next to the float32 point; the others share it, shifted left
        ax.annotate(f"x{t['ratio']:g}", (t["params"] * BYTES_PER_PARAM["float32"],
                                         t["relative_error"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    size = _SOURCE_ITEMSIZE.get(str(info.get("dtype")))
    src = info.get("stored_params", 0) * size if size else 0
    if src > 0:
        ax.axvline(src, color=_PLAIN_COLOR, lw=1, ls=":",
                   label=f"source ({info['dtype']})")
    ax.set_xscale("log")
    if lo is not None:
        ax.set_xlim(lo / 1.6, max(src, max(t["params"] for t in tr) * 4.0) * 1.6)
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_bytes))
    ax.set_ylim(0, 1.32)  # room for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("tensor bytes of the kept factors" + ("\n(log)" if narrow else " (log)"),
                  fontsize=9)
    ax.set_ylabel(r"relative error $\|dW-\widehat{dW}\|_F\,/\,\|dW\|_F$", fontsize=9)
    ax.set_title(f"{BYTES_TITLE}:" + ("\n" if narrow else " ") + "truncation per storage\n"
                 + ("(quantization error\nnot included)" if narrow
                    else "(quantization error not included)"), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper center", ncol=2, framealpha=0.9, columnspacing=0.8,
              handlelength=1.5, title=f"int8/int4: + a float16 scale per {DEFAULT_GROUP} values",
              title_fontsize=7)


def plot_lora(info: dict[str, Any], path: str | Path, spectra: dict[str, list[float]] | None = None) -> None:
    """Draw an :func:`~mosconv.inspect.inspect_lora` summary into the PNG ``path``.

    Left: per kind, each module's singular values ``sigma_i / sigma_1`` (log scale), one line
    per module colored by layer (for rank 1-2 kinds: the singular values against the layer);
    two kinds one above the other, more in two columns.
    Right: global SVD truncation's relative error at each ratio of ``info["truncation"]``, and
    "error vs bytes": the same errors against the tensor bytes of the truncated factors stored
    as float32, float16, int8 or int4 (parameters times :data:`BYTES_PER_PARAM`; the error of
    rounding or quantizing is not included). With one kind panel the two stand side by side,
    else one above the other.

    Args:
        info: ``inspect_lora`` output (schema ``mosconv.inspect.lora/1``).
        spectra: module name -> singular values, descending (:func:`lora_spectra`); taken
            from ``info["modules"][i]["singular_values"]`` when absent there. Without either,
            the panels show each module's stable rank instead.

    Raises:
        ConfigError: bad ``path`` (see :func:`check_plot_path`) or matplotlib missing.
    """
    path = check_plot_path(path)
    _save(lora_figure(info, spectra), path)


def lora_figure(info: dict[str, Any], spectra: dict[str, list[float]] | None = None) -> Any:
    """The matplotlib ``Figure`` :func:`plot_lora` saves (for tests and custom saving)."""
    require_matplotlib()
    modules = info["modules"]
    if spectra is None and modules and all("singular_values" in m for m in modules):
        spectra = {m["name"]: m["singular_values"] for m in modules}
    kinds = {k["kind"]: k for k in info["kinds"]}
    groups = _groups(modules)
    cols = 1 if len(groups) <= 2 else 2  # two kinds: one above the other, full width
    rows = max(1, math.ceil(len(groups) / cols))
    fig = _figure(1.2 + 3.4 * rows)
    side = 0.75 if cols == 2 else 0.6
    if rows == 1:  # truncation and error vs bytes side by side
        gs = fig.add_gridspec(1, cols + 2, width_ratios=[1.0] * cols + [side, side])
        trunc_spec, bytes_spec = gs[0, cols], gs[0, cols + 1]
    else:  # one above the other in the right column
        gs = fig.add_gridspec(rows, cols + 1, width_ratios=[1.0] * cols + [side])
        right = gs[:, cols].subgridspec(2, 1)
        trunc_spec, bytes_spec = right[0], right[1]
    for i, (title, ms, one_kind) in enumerate(groups):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        labels, what = _layer_labels(title if one_kind else "", ms)
        panel = WIDTH * 0.8 / cols
        if spectra is None:
            _stable_rank_panel(ax, ms, labels, what, panel)
        elif max((len(spectra.get(m["name"], [])) for m in ms), default=0) <= 2:
            _sigma_by_layer_panel(ax, ms, spectra, labels, what, panel)
        else:
            _spectra_panel(fig, ax, ms, spectra, labels, what)
        k = kinds.get(title) if one_kind else None
        sub = (f"{k['modules']} modules, r {'/'.join(map(str, k['ranks']))}, mean stable rank "
               f"{k['stable_rank_mean']:.2f}, 90% energy in {k['dirs90_mean']:.1f} dirs"
               if k else f"{len(ms)} modules")
        ax.set_title(f"{_short(title, 70)}\n{sub}", fontsize=9)
        ax.tick_params(labelsize=8)
    ax = fig.add_subplot(trunc_spec)
    tr = info["truncation"]
    xs = [t["ratio"] for t in tr]
    ys = [t["relative_error"] for t in tr]
    ax.plot(xs, ys, "-o", color=_TRUNC_COLOR, lw=2)
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xlim(min(xs) / 1.35, max(xs) * 1.35)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("ratio (LoRA params / budget)", fontsize=9)
    ax.set_ylabel(r"relative error $\|dW-\widehat{dW}\|_F\,/\,\|dW\|_F$", fontsize=9)
    ax.set_title("global SVD truncation\n(the baseline MoS is\nmeasured against)" if cols == 2
                 else "global SVD truncation\n(the baseline MoS is measured against)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    _bytes_panel(fig.add_subplot(bytes_spec), info, narrow=cols == 2)
    base = info.get("base_model") or "-"
    fig.suptitle(
        f"LoRA adapter ({info['format']}, base {_short(str(base), 50)}): {info['num_modules']} "
        f"modules in {info['num_kinds']} kinds, ranks {info['ranks']}, "
        f"{info['lora_params']:,} LoRA params", fontsize=11)
    return fig


# --------------------------------------------------------------------------- MoS report


def _bars(ax, ms, labels, what, ylabel, cols, mos_key, base_key, base_label, plain_key=None):
    n = len(ms)
    xs = range(n)
    if n <= DENSE:  # grouped bars
        w = 0.4
        ax.bar([x - w / 2 for x in xs], [m[mos_key] for m in ms], width=w, color=_MOS_COLOR,
               label="MoS")
        ax.bar([x + w / 2 for x in xs], [m[base_key] for m in ms], width=w, color=_TRUNC_COLOR,
               label=base_label)
    else:  # bars thinner than a few pixels alias: MoS bars, the baseline as a step line on top
        ax.bar(list(xs), [m[mos_key] for m in ms], width=1.0, color=_MOS_COLOR, label="MoS")
        ax.step(list(xs), [m[base_key] for m in ms], where="mid", color=_TRUNC_COLOR, lw=1.2,
                label=base_label)
    vals = [m[mos_key] for m in ms] + [m[base_key] for m in ms]
    if plain_key:
        ax.plot(list(xs), [m[plain_key] for m in ms], linestyle="none", marker="_", ms=9,
                mew=1.6, color=_PLAIN_COLOR, label="plain truncation")
        vals += [m[plain_key] for m in ms]
    top = max(1.0, max(vals, default=0))
    ax.set_ylim(0, top * 1.25)  # room for the legend
    if top <= 1.0 + 1e-6:
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlabel(what, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    _set_ticks(ax, labels, WIDTH * 0.92 / cols)


def plot_mos(report: Report, path: str | Path) -> None:
    """Draw a conversion report (``report.json``, schema ``mosconv.report/1``) into the PNG
    ``path``.

    One row per kind: each module's relative error, MoS next to truncation at the same budget
    (grouped bars). With the data-metric fields (``compress --calib``) a second column shows
    the data-aware error next to data-aware truncation, with plain truncation as markers.

    Raises:
        ConfigError: bad ``path`` (see :func:`check_plot_path`) or matplotlib missing.
    """
    path = check_plot_path(path)
    report = report.to_json()  # the documented flat rows: what the bars are keyed by
    t = report["totals"]
    modules = report["modules"]
    data = t.get("metric") == "data" and all("data_relative_error" in m for m in modules)
    kinds = {k["kind"]: k for k in report["kinds"]}
    groups = _groups(modules)
    cols = 2 if data else 1
    rows = max(1, len(groups))
    fig = _figure(1.5 + 2.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (title, ms, one_kind) in enumerate(groups):
        labels, what = _layer_labels(title if one_kind else "", ms)
        k = kinds.get(title) if one_kind else None
        if k:
            rel, trel = k["relative_error"], k["truncation_relative_error"]
            head = f"{_short(title, 80 // cols + 20)}   [{k['structure']}, nc {k['nc']}]"
        else:
            rel = _weighted(ms, "relative_error", "energy")
            trel = _weighted(ms, "truncation_relative_error", "energy")
            head = _short(title, 80)
        ax = axes[i][0]
        _bars(ax, ms, labels, what, _WEIGHT_LABEL, cols, "relative_error",
              "truncation_relative_error",
              "truncation, same budget")
        if rel is not None:
            head += f"\nweight metric: MoS {rel:.4f}, truncation {trel:.4f}"
        ax.set_title(head, fontsize=9)
        if data:
            ax = axes[i][1]
            _bars(ax, ms, labels, what, _DATA_LABEL, cols, "data_relative_error",
                  "data_truncation_relative_error",
                  "data-aware truncation, same budget", "plain_truncation_data_relative_error")
            if k:
                drel, dtrel = k["data_relative_error"], k["data_truncation_relative_error"]
            else:
                drel = _weighted(ms, "data_relative_error", "data_energy")
                dtrel = _weighted(ms, "data_truncation_relative_error", "data_energy")
            sub = (f"\ndata metric: MoS {drel:.4f}, data-aware truncation {dtrel:.4f}"
                   if drel is not None else "")
            ax.set_title(f"{_short(title, 60)}{sub}", fontsize=9)
    for ax in axes[0]:
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda j: (names[j] != "MoS", names[j] == "plain truncation"))
        ax.legend([handles[j] for j in order], [names[j] for j in order], fontsize=8,
                  loc="upper left", ncol=len(names), framealpha=0.9)
    ratio = report.get("ratio")
    line1 = (f"MoS vs truncation at ratio {ratio:g}: params {t['lora_params']:,} -> "
             f"{t['mos_params']:,} (budget {t['budget']:,}), "
             f"{t['kinds_shared']} of {len(report['kinds'])} kinds shared")
    line2 = (f"weight metric{' (left)' if data else ''}: relative error {t['relative_error']:.4f}, truncation "
             f"{t['truncation_relative_error']:.4f}")
    if data:
        line2 += (f";  data metric (right, {t['calib_tokens']:,} calibration tokens): "
                  f"{t['data_relative_error']:.4f}, data-aware truncation "
                  f"{t['data_truncation_relative_error']:.4f}")
    line2 += f";  sharing gain {t['sharing_gain']:+.4f}"
    fig.suptitle(f"{line1}\n{line2}", fontsize=10)
    _save(fig, path)
