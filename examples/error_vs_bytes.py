"""Relative error against tensor bytes for every adapter of ../shared/zoo: float and quantized
storage at several parameter ratios, and what ``--size-ratio`` chooses.

    python examples/error_vs_bytes.py --json docs/data/error-vs-bytes.json \\
        --plot docs/img/error-vs-bytes.png [--zoo ../shared/zoo] [--ratios 4 8 16 32 64]
        [--size-ratios 16 32 64] [--adapters gpt2-tigrinya-lora ...]

For each adapter (every folder of the zoo with an ``adapter_config.json``, plus folders holding
a ``.safetensors`` file, as ``examples/output_digest.py`` finds them) it converts with library
calls only (``mosconv.read_adapter``, ``mosconv.fit.convert.convert``, ``search="fast"``):

* at each parameter ratio, in four storages given explicitly: ``float32`` and ``float16``
  (``quantize="none"``), ``int8`` and ``int4`` (``dtype="float16"``: slot weights, if any, in
  float16; pools and cores as integers with float16 scales per 64 values);
* at each size ratio, with ``dtype="auto"`` and ``quantize="auto"``: the storage and parameter
  ratio the converter chooses, and every storage it tried.

Each point records the report totals ``relative_error``,
``truncation_equal_bytes_relative_error`` (SVD truncation stored the same way in no more tensor
bytes), ``mos_tensor_bytes``, ``lora_tensor_bytes`` and ``tensor_bytes_ratio``. It prints a
compact table and the machine, writes the points as JSON and draws one small panel per adapter
(x: tensor bytes, log scale; y: relative error; one line per storage; stars: the size-ratio
choices). The adapters are read where they are; nothing is copied. One torch thread. Needs
matplotlib for ``--plot`` (``pip install 'mosconv[plot]'``). Used for docs/choosing-ratio.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from mosconv import factorize_adapter, read_adapter
from mosconv.errors import MosconvError
from mosconv.fileio import atomic_write_bytes
from mosconv.fit.convert import ConvertConfig, convert

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / ".." / "shared" / "zoo"
# label -> (dtype, quantize), given explicitly
STORAGES = {"float32": ("float32", "none"), "float16": ("float16", "none"),
            "int8": ("float16", "int8"), "int4": ("float16", "int4")}
COLORS = {"float32": "#1f77b4", "float16": "#2ca02c", "int8": "#ff7f0e", "int4": "#d62728"}


def zoo_adapters(zoo: Path) -> list[str]:
    """Every adapter folder of the zoo: PEFT folders and folders holding one weight file."""
    found = {p.parent for p in zoo.rglob("adapter_config.json")}
    found |= {p.parent for p in zoo.rglob("*.safetensors") if p.parent not in found}
    return sorted(str(p.relative_to(zoo)) for p in found)


def _cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _point(name: str, label: str, totals: dict, seconds: float, **extra) -> dict:
    keys = ("relative_error", "truncation_relative_error", "truncation_equal_bytes_relative_error",
            "mos_tensor_bytes", "lora_tensor_bytes", "tensor_bytes_ratio", "mos_params",
            "param_ratio", "kinds_shared", "dtype", "quantize")
    return {"adapter": name, "storage": label, **extra, **{k: totals[k] for k in keys},
            "seconds": round(seconds, 3)}


def measure(zoo: Path, names: list[str], ratios: list[float], size_ratios: list[float]
            ) -> list[dict]:
    points: list[dict] = []
    for name in names:
        adapter = read_adapter(zoo / name)
        facts = factorize_adapter(adapter)  # shared by every conversion of this adapter
        for label, (dtype, quant) in STORAGES.items():
            for ratio in ratios:
                t0 = time.perf_counter()
                try:
                    res = convert(adapter, ConvertConfig(ratio=ratio, dtype=dtype, quantize=quant,
                                                         search="fast"), factorizations=facts)
                except MosconvError as e:  # e.g. values beyond float16's range
                    points.append({"adapter": name, "storage": label, "ratio": ratio,
                                   "dtype": dtype, "quantize": quant, "failed": str(e)})
                    print(f"{name} {label} x{ratio:g}: failed: {e}")
                    continue
                t = res.report.to_json()["totals"]
                points.append(_point(name, label, t, time.perf_counter() - t0, ratio=ratio))
        for size in size_ratios:
            t0 = time.perf_counter()
            try:
                res = convert(adapter, ConvertConfig(size_ratio=size, dtype="auto",
                                                     quantize="auto", search="fast"),
                              factorizations=facts)
            except MosconvError as e:
                points.append({"adapter": name, "storage": f"size-ratio {size:g}",
                               "size_ratio": size, "failed": str(e)})
                print(f"{name} --size-ratio {size:g}: failed: {e}")
                continue
            t = res.report.to_json()["totals"]
            chosen = t["quantize"] if t["quantize"] != "none" else t["dtype"]
            points.append(_point(name, f"size-ratio {size:g}", t, time.perf_counter() - t0,
                                 ratio=None, size_ratio=size, chosen=chosen,
                                 size_budget_bytes=t["size_budget_bytes"],
                                 size_choices=t["size_choices"]))
        print(f"{name}: done", flush=True)
    return points


def _fmt_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(p: dict, digits: int = 1) -> str:
    """``x7.9``, or ``0 B`` where nothing is stored (the ratio is undefined)."""
    r = p["tensor_bytes_ratio"]
    return f"x{r:.{digits}f}" if r is not None else f"{p['mos_tensor_bytes']} B"


def table(points: list[dict], ratios: list[float]) -> str:
    ok = [p for p in points if "failed" not in p]
    lines = ["adapter / storage: relative error (tensor bytes ratio) at --ratio "
             + ", ".join(f"{r:g}" for r in ratios)
             + ";  [equal-bytes truncation error]"]
    for name in dict.fromkeys(p["adapter"] for p in ok):
        src = next(p["lora_tensor_bytes"] for p in ok if p["adapter"] == name)
        lines.append(f"{name}  (source LoRA tensors {src:,} B)")
        for label in STORAGES:
            row = {p["ratio"]: p for p in ok if p["adapter"] == name and p["storage"] == label}
            cells = [f"{row[r]['relative_error']:.4f} ({_ratio(row[r])}) "
                     f"[{row[r]['truncation_equal_bytes_relative_error']:.4f}]"
                     if r in row else "failed" for r in ratios]
            lines.append(f"  {label:8s} " + "  ".join(cells))
        for p in ok:
            if p["adapter"] == name and "size_ratio" in p:
                lines.append(
                    f"  --size-ratio {p['size_ratio']:g}: {p['chosen']} (dtype {p['dtype']}) at "
                    f"param ratio {_f(p['param_ratio'], '.3f')}, error {p['relative_error']:.4f}, "
                    f"equal-bytes truncation {p['truncation_equal_bytes_relative_error']:.4f}, "
                    f"{p['mos_tensor_bytes']:,} B ({_ratio(p, 2)}; budget "
                    f"{p['size_budget_bytes']:,} B); tried: "
                    + ", ".join(f"{c['quantize'] if c['quantize'] != 'none' else c['dtype']}"
                                f" x{_f(c['param_ratio'], '.2f')} {c['relative_error']:.4f}"
                                for c in p["size_choices"]))
    return "\n".join(lines)


def draw(points: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ok = [p for p in points if "failed" not in p]
    names = list(dict.fromkeys(p["adapter"] for p in ok))
    cols = 5 if len(names) > 6 else min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(3.1 * cols, 2.55 * rows + 0.9), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        mine = [p for p in ok if p["adapter"] == name]
        empty = sorted({p["ratio"] for p in mine if p.get("ratio") and not p["mos_tensor_bytes"]})
        for label in STORAGES:  # a point that keeps nothing (0 bytes) has no place on a log axis
            ps = sorted((p for p in mine if p["storage"] == label and p["mos_tensor_bytes"]),
                        key=lambda p: p["ratio"])
            ax.plot([p["mos_tensor_bytes"] for p in ps], [p["relative_error"] for p in ps],
                    "-o", color=COLORS[label], lw=1.2, ms=3)
        for p in mine:
            if "size_ratio" in p and p["mos_tensor_bytes"]:
                ax.plot(p["mos_tensor_bytes"], p["relative_error"], "*", color="k", ms=9,
                        mfc="none", mew=1.0)
                ax.annotate(f"S{p['size_ratio']:g}", (p["mos_tensor_bytes"], p["relative_error"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=6.5)
        src = mine[0]["lora_tensor_bytes"]
        ax.axvline(src, color="0.5", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        note = f"; x{min(empty):g}+: 0 B, error 1" if empty else ""
        ax.set_title(f"{name}\nsource {_fmt_bytes(src)} (dotted){note}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("MoS tensor bytes (log)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error of dW", fontsize=8)
    handles = [Line2D([], [], color=COLORS[k], marker="o", ms=3, lw=1.2, label=k)
               for k in STORAGES]
    handles.append(Line2D([], [], color="k", marker="*", ms=9, mfc="none", lw=0,
                          label="--size-ratio S (auto storage)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle("Relative error against tensor bytes, real adapters of ../shared/zoo: "
                 "points at --ratio 4, 8, 16, 32, 64 (right to left), int8/int4 with float16 "
                 "scales per 64 values", fontsize=9.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    atomic_write_bytes(out, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ZOO)
    ap.add_argument("--ratios", type=float, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--size-ratios", type=float, nargs="+", default=[16, 32, 64])
    ap.add_argument("--adapters", nargs="+", help="only these zoo folders (default: all)")
    ap.add_argument("--json", type=Path, help="write the points here")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine()
    print(f"machine: {info['platform']}, {info['cpu'] or info['machine']}, "
          f"{info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} torch thread")
    t0 = time.perf_counter()
    zoo = args.zoo.resolve()
    points = measure(zoo, args.adapters or zoo_adapters(zoo), args.ratios, args.size_ratios)
    seconds = time.perf_counter() - t0
    print(table(points, args.ratios))
    n = len(points)
    print(f"\n{n} points ({sum('failed' in p for p in points)} failed) in {seconds:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"schema": "mosconv.example.error-vs-bytes/1", "machine": info,
               "seconds": round(seconds, 1), "ratios": args.ratios,
               "size_ratios": args.size_ratios,
               "storages": {k: {"dtype": d, "quantize": q} for k, (d, q) in STORAGES.items()},
               "search": "fast", "points": points}
        atomic_write_bytes(args.json, (json.dumps(doc, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        draw(points, args.plot)
        print(f"wrote {args.plot} ({args.plot.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
