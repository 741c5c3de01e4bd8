"""Relative error against --ratio for every real adapter in ../shared/zoo, MoS next to truncation.

    python examples/plot_error_vs_ratio.py [--zoo ../shared/zoo] [--ratios 2 4 8 16 32]
        [--out docs/img/error_vs_ratio.png]

For each adapter and ratio it converts with ``search="fast"`` (library calls only:
``mosconv.read_adapter`` and ``mosconv.fit.convert.convert``), prints a Markdown table of the report
totals ``relative_error`` (MoS) and ``truncation_relative_error`` (global SVD truncation at the
same budget), and draws both against the ratio (left) and their difference (right) into one PNG.
The adapters are read where they are; nothing is copied.  Needs matplotlib
(``pip install 'mosconv[plot]'``).  Used for docs/choosing-ratio.md.
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import torch

from mosconv import factorize_adapter, read_adapter
from mosconv.fileio import atomic_write_bytes
from mosconv.fit.convert import ConvertConfig, convert

ROOT = Path(__file__).resolve().parents[1]
ZOO_ADAPTERS = [
    "distilbert-imdb-seqcls", "gemma3-270m-svg-x3/final", "gemma3-270m-svg-x3/curriculum_stage1",
    "gpt2-great-tabular-bin", "gpt2-tigrinya-lora", "open-calm-1b-r1-fp16",
    "opt-125m-lora-ckpts/final", "opt-125m-lora-ckpts/checkpoint-10",
    "sd15-diffusers-attnproc-r4", "smollm-135m-medical-r16/5epochs",
]


def measure(zoo: Path, ratios: list[float], seed: int) -> dict[str, list[dict]]:
    """adapter name -> one row of report totals per ratio."""
    out: dict[str, list[dict]] = {}
    for name in ZOO_ADAPTERS:
        path = zoo / name
        if not path.exists():
            print(f"{name}: missing under {zoo}, skipped")
            continue
        adapter = read_adapter(path)
        facts = factorize_adapter(adapter)  # shared by the ratios (convert would redo it)
        rows = out[name] = []
        for ratio in ratios:
            t0 = time.perf_counter()
            res = convert(adapter, ConvertConfig(ratio=ratio, seed=seed, search="fast"),
                          factorizations=facts)
            t = res.report.to_json()["totals"]
            rows.append({"ratio": ratio, "lora_params": t["lora_params"],
                         "mos_params": t["mos_params"], "mos": t["relative_error"],
                         "trunc": t["truncation_relative_error"],
                         "kinds_shared": t["kinds_shared"], "kinds": len(res.report.to_json()["kinds"]),
                         "seconds": time.perf_counter() - t0})
    return out


def draw(results: dict[str, list[dict]], ratios: list[float], out: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(14, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, gx, lx = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.5, 1, 0.62]})
    colors = colormaps["tab10"]
    handles = []
    for i, (name, rows) in enumerate(results.items()):
        c = colors(i % 10)
        xs = [r["ratio"] for r in rows]
        ax.plot(xs, [r["trunc"] for r in rows], "--", color=c, lw=3, alpha=0.45)
        ax.plot(xs, [r["mos"] for r in rows], "-o", color=c, lw=1.3, ms=4)
        gx.plot(xs, [r["trunc"] - r["mos"] for r in rows], "-o", color=c, lw=1.3, ms=4)
        handles.append(Line2D([], [], color=c, marker="o", lw=1.3, label=name))
    for a in (ax, gx):
        a.set_xscale("log", base=2)
        a.set_xticks(ratios)
        a.set_xticklabels([f"{r:g}" for r in ratios])
        a.set_xlabel("--ratio (LoRA params / MoS params budget)")
        a.grid(True, alpha=0.3)
    ax.set_ylim(0, 1.03)
    ax.set_ylabel(r"relative error $\|dW-\widehat{dW}\|_F\,/\,\|dW\|_F$ (whole adapter)")
    ax.set_title("MoS (solid, markers) and truncation at the same budget (dashed, wide)")
    style = [Line2D([], [], color="k", marker="o", lw=1.3, label="MoS (compress --search fast)"),
             Line2D([], [], color="k", ls="--", lw=3, alpha=0.45, label="global SVD truncation")]
    lx.axis("off")  # the legend gets its own column, clear of every line
    lx.legend(handles=style + handles, fontsize=8.5, loc="center left", frameon=False)
    gx.axhline(0, color="k", lw=0.8)
    gx.set_ylabel("truncation error - MoS error (> 0: MoS better)")
    gx.set_title("what sharing adds on one adapter")
    fig.suptitle("Relative error of dW against the ratio, real adapters of ../shared/zoo",
                 fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(out, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT.parent / "shared" / "zoo")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "error_vs_ratio.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = measure(args.zoo, args.ratios, args.seed)
    seconds = time.perf_counter() - t0
    print("| adapter | " + " | ".join(f"x{r:g}" for r in args.ratios) + " |")
    print("|---|" + "---|" * len(args.ratios))
    for name, rows in results.items():
        cells = [f"{r['mos']:.3f}" if abs(r["mos"] - r["trunc"]) < 5e-4
                 else f"**{r['mos']:.3f}** ({r['trunc']:.3f})" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nwhere MoS differs from truncation (error difference above 1e-6):")
    for name, rows in results.items():
        for r in rows:
            if abs(r["trunc"] - r["mos"]) > 1e-6:
                print(f"  {name} x{r['ratio']:g}: MoS {r['mos']:.4f}, truncation "
                      f"{r['trunc']:.4f}, gain {r['trunc'] - r['mos']:+.4f}, "
                      f"{r['kinds_shared']}/{r['kinds']} kinds shared, "
                      f"{r['mos_params']:,} of {r['lora_params']:,} params")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(results, args.ratios, args.out)
    print(f"\nconversions: {seconds:.1f} s for {sum(map(len, results.values()))} "
          f"on {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; wrote {args.out}")


if __name__ == "__main__":
    main()
