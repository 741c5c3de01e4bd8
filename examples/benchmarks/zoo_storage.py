"""A zoo group stored in float32, float16, bfloat16, int8 and int4 (`batch --shared-pool
--dtype / --quantize`), side by side in one run: the group's error and its bytes as stored,
next to each adapter converted alone in the same storage.

    python examples/benchmarks/zoo_storage.py [--zoo ../shared/zoo] [--json out.json]

Groups: the related pairs of ../shared/zoo (float32 sources) at total ratio 8 and 16, and the
synthetic zoo of examples/synthetic_zoo.py (N = 8 adapters) written as float16, as a float16
user's zoo is: there ``--dtype auto`` keeps float16 where mosconv 0.x stored float32 pools.

Then (b) the same groups under a byte budget (``--size-ratio S``, S = 16, 32, 64, quantize
auto): the storage and parameter ratio chosen for the group, its error, next to each adapter
converted alone at its own byte budget (``compress --size-ratio S``).

(c) Time, in one run: a group of 8 synthetic adapters of ~1M LoRA parameters fitted at
``--ratio 8`` (the baseline), with ``--quantize int8`` and at ``--size-ratio 16`` (quantize
auto), and the eight alone conversions that ``compress --size-ratio 16`` makes (part of the
last).

Bytes are tensor bytes as stored: the pool file's tensors once, plus every member's own tensors
(cores, own shards, routes; ``MosAdapter.tensor_bytes``), against the source LoRA factors'
tensor bytes. Errors are energy-weighted relative errors of dW over the group, measured on the
stored values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from synthetic_zoo import write_zoo

from mosconv import factorize_adapter, read_adapter
from mosconv.fit.zoo import fit_group, group_bytes

PAIRS = {"gemma3-270m-svg-x3": ("curriculum_stage1", "final"),
         "opt-125m-lora-ckpts": ("checkpoint-10", "final")}
STORAGES = (("float32", "none"), ("float16", "none"), ("bfloat16", "none"), ("auto", "int8"),
            ("auto", "int4"))  # quantized: float16 scales per 64 values


def measure(name: str, adapters, ratio: float) -> list[dict]:
    facts = [factorize_adapter(a) for a in adapters]
    src_bytes = sum(a.tensor_bytes for a in adapters)
    rows = []
    for dtype, quantize in STORAGES:
        res = fit_group(adapters, ratio, factorizations=facts, dtype=dtype, quantize=quantize)
        st = res.storage
        pool, own = group_bytes(res.shared_pools, st, res.reports)
        t = res.totals
        rows.append({"group": name, "source_dtype": adapters[0].dtype, "ratio": ratio,
                     "dtype": st.dtype if not st.quantized else st.quantize, "mode": res.mode, "error": t.shared_relative_error
                     if res.mode == "shared" else t.independent_relative_error,
                     "alone_error": t.independent_relative_error,
                     "pool_bytes": pool, "own_bytes": own, "bytes": pool + own,
                     "source_bytes": src_bytes, "bytes_ratio": src_bytes / (pool + own)})
    return rows


def sized(name: str, adapters) -> list[dict]:
    facts = [factorize_adapter(a) for a in adapters]
    rows = []
    for size_ratio in (16.0, 32.0, 64.0):
        res = fit_group(adapters, 8.0, factorizations=facts, size_ratio=size_ratio,
                        quantize="auto")
        t, st = res.totals, res.storage
        src = sum(a.tensor_bytes for a in adapters)
        used = sum(group_bytes(res.shared_pools, st, res.reports))
        rows.append({"group": name, "size_ratio": size_ratio, "mode": res.mode,
                     "storage": st.quantize if st.quantized else st.dtype,
                     "param_ratio": t.lora_params / max(t.mos_params, 1),
                     "error": t.shared_relative_error if res.mode == "shared"
                     else t.independent_relative_error,
                     "alone_error": t.independent_relative_error,
                     "bytes": used, "budget_bytes": src // int(size_ratio)})
    return rows


def timing() -> dict:
    from mosconv.fit.convert import ConvertConfig, convert

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_zoo(Path(tmp), 8, d=1024, d_kv=1024, r=16, layers=16)
        adapters = [read_adapter(p) for p in paths]
    out = {"adapters": 8, "lora_params_per_adapter": adapters[0].params}
    for name, kw in (("ratio_8", {}), ("int8", {"quantize": "int8"}),
                     ("size_ratio_16", {"size_ratio": 16.0, "quantize": "auto"})):
        t0 = time.perf_counter()
        res = fit_group(adapters, 8.0, **kw)
        out[name] = {"seconds": time.perf_counter() - t0, "mode": res.mode,
                     "storage": res.storage.quantize if res.storage.quantized
                     else res.storage.dtype}
    t0 = time.perf_counter()
    for a in adapters:
        convert(a, ConvertConfig(size_ratio=16.0, quantize="auto"))
    out["alone_size_ratio_16"] = {"seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows, sized_rows = [], []
    for project, names in PAIRS.items():
        paths = [args.zoo / project / n for n in names]
        if not all(p.exists() for p in paths):
            print(f"{project}: not in {args.zoo}, skipped")
            continue
        adapters = [read_adapter(p) for p in paths]
        for ratio in (8.0, 16.0):
            rows += measure(project, adapters, ratio)
        sized_rows += sized(project, adapters)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import load_file, save_file

        paths = write_zoo(Path(tmp), 8)
        for p in paths:  # the same zoo as a float16 user has it
            f = p / "adapter_model.safetensors"
            save_file({k: v.half() for k, v in load_file(f).items()}, str(f))
        adapters = [read_adapter(p) for p in paths]
    for ratio in (8.0, 16.0):
        rows += measure("synthetic zoo (N = 8, float16)", adapters, ratio)
    sized_rows += sized("synthetic zoo (N = 8, float16)", adapters)
    print("group | source | ratio | storage | mode | error (alone, same dtype) | bytes: pools + own "
          "= total (x source)")
    for r in rows:
        print(f"{r['group']} | {r['source_dtype']} | {r['ratio']:g} | {r['dtype']} | {r['mode']} | "
              f"{r['error']:.5f} ({r['alone_error']:.5f}) | {r['pool_bytes']:,} + "
              f"{r['own_bytes']:,} = {r['bytes']:,} (x{r['bytes_ratio']:.1f})")
    print("\n(b) group | size ratio | mode | storage | param ratio | error (alone at equal bytes) "
          "| bytes (budget)")
    for r in sized_rows:
        print(f"{r['group']} | {r['size_ratio']:g} | {r['mode']} | {r['storage']} | "
              f"{r['param_ratio']:.2f} | {r['error']:.4f} ({r['alone_error']:.4f}) | "
              f"{r['bytes']:,} ({r['budget_bytes']:,})")
    t = timing()
    base = t["ratio_8"]["seconds"]
    print(f"\n(c) fit_group of 8 adapters x {t['lora_params_per_adapter']:,} LoRA params:")
    for name in ("ratio_8", "int8", "size_ratio_16", "alone_size_ratio_16"):
        r = t[name]
        print(f"{name}: {r['seconds']:.1f} s (x{r['seconds'] / base:.2f} of ratio_8)"
              + (f", {r['mode']}, {r['storage']}" if "mode" in r else ""))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    print(f"\nmachine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows,
                                         "size_ratio": sized_rows, "timing": t},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
