"""How much faster is mosconv's exact factorization than a dense SVD of dW?

mosconv factorizes every LoRA update ``dW = scale * B @ A`` (``B: d_out x r``,
``A: r x d_in``) through a QR of each factor and an ``r x r`` SVD
(:func:`mosconv.fit.factorize.factorize_pair`), never forming the ``d_out x d_in``
matrix.  Rank-resizing tools such as kohya's ``resize_lora.py`` instead materialize
``dW`` and run a dense SVD on it.  This script measures both, in one run, on a
Llama-2-7B-shaped rank-16 adapter on all 7 linear kinds (32 layers, 224 modules,
39.98M LoRA parameters, the "LoRA r=16" row of the MoS paper):

  (a) per distinct shape (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008,
      written d_out x d_in): dense path (materialize dW in float32, then
      ``torch.linalg.svd(dW, full_matrices=False)``) vs ``factorize_pair(B, A, scale)``
      (warmed up, median of several repeats), their ratio, and the largest
      disagreement of the r leading singular values (a correctness check);
  (b) ``factorize_pair`` over all 224 modules (total seconds, median of 3 passes);
  (c) PASS if the ratio is at least --min-ratio (default 1000) for every shape.

The factors are random but shaped like a real adapter: ``A`` is drawn like PEFT's
kaiming-uniform initialization (uniform in +-1/sqrt(d_in)), ``B`` is small
(normal, std 1e-3), ``scale = alpha / r = 32 / 16``.  The timings do not depend on
the values, only on the shapes.

On a 2-core machine one dense SVD takes about 15 s (4096x4096) to over a minute
(4096x11008), so the full run takes a few minutes.  --quick uses small shapes (1024x1024,
2752x1024, 1024x2752; 4 layers) to smoke-test the script in seconds; the shapes are
too small for the 1000x claim, so in --quick mode the verdict is informational and
the exit status is 0.

    python examples/benchmarks/factorize_speed.py [--quick] [--json PATH]

Exit status: 0 when every shape passes (always with --quick), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from _llama import ALPHA, LLAMA2_7B, RANK
from _llama import machine_info as base_machine_info

import mosconv
from mosconv.fit.factorize import factorize_pair

QUICK = {
    "self_attn.q_proj": (1024, 1024),
    "self_attn.k_proj": (1024, 1024),
    "self_attn.v_proj": (1024, 1024),
    "self_attn.o_proj": (1024, 1024),
    "mlp.gate_proj": (2752, 1024),
    "mlp.up_proj": (2752, 1024),
    "mlp.down_proj": (1024, 2752),
}


def machine_info() -> dict:
    return {
        **base_machine_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "mosconv": mosconv.__version__,
    }


def make_factors(d_out: int, d_in: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` in float32: ``A`` like PEFT's kaiming-uniform init, ``B`` small random."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) weight
    A = (torch.rand(RANK, d_in, generator=g) * 2 - 1) * bound
    B = torch.randn(d_out, RANK, generator=g) * 1e-3
    return B, A


def make_adapter(shapes: dict, layers: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        for sub, (d_out, d_in) in shapes.items():
            B, A = make_factors(d_out, d_in, g)
            out.append((f"model.layers.{layer}.{sub}", B, A))
    return out


def time_dense(B: torch.Tensor, A: torch.Tensor, scale: float, repeats: int) -> tuple[list[float], torch.Tensor]:
    """The kohya path: materialize ``dW`` in float32, dense SVD.  Returns times and S."""
    times, S = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        dW = scale * (B.float() @ A.float())
        _, S, _ = torch.linalg.svd(dW, full_matrices=False)
        times.append(time.perf_counter() - t0)
        del dW
    return times, S


def time_fast(B: torch.Tensor, A: torch.Tensor, scale: float, repeats: int, warmup: int):
    for _ in range(warmup):
        fact = factorize_pair(B, A, scale)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fact = factorize_pair(B, A, scale)
        times.append(time.perf_counter() - t0)
    return times, fact


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small shapes (1024x1024, 2752x1024, 1024x2752), 4 layers: a smoke test in "
                         "seconds; the PASS/FAIL verdict is informational")
    ap.add_argument("--layers", type=int, default=None, help="layers (default 32, or 4 with --quick)")
    ap.add_argument("--dense-repeats", type=int, default=1,
                    help="dense SVDs per shape, median reported (default 1: each takes 15-70 s on 2 cores)")
    ap.add_argument("--fast-repeats", type=int, default=21,
                    help="factorize_pair calls per shape after warm-up, median reported (default 21)")
    ap.add_argument("--all-repeats", type=int, default=3,
                    help="passes of factorize_pair over all modules, median reported (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed factorize_pair calls per shape (default 3)")
    ap.add_argument("--min-ratio", type=float, default=1000.0,
                    help="dense / factorize_pair time each shape must reach to PASS (default 1000)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the dense SVD (default: torch's choice); "
                         "factorize_pair pins itself to one thread")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    for name in ("dense_repeats", "fast_repeats", "all_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    if args.warmup < 0:
        ap.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = QUICK if args.quick else LLAMA2_7B
    layers = args.layers or (4 if args.quick else 32)
    scale = ALPHA / RANK
    info = machine_info()
    print(f"machine: {info['processor']} | {info['system']} | {info['cpu_count']} CPUs | "
          f"torch {info['torch']}, {info['torch_threads']} threads | python {info['python']}")
    load = info["load_avg_1m_at_start"]
    if load is not None:
        busy = load >= 0.5 * (info["cpu_count"] or 1)
        print(f"load average (1 min) at start: {load:.2f}"
              + (" (busy machine: other work slows both paths; rerun when quiet)" if busy else ""))

    modules = make_adapter(shapes, layers, args.seed)
    lora_params = sum(RANK * (B.shape[0] + A.shape[1]) for _, B, A in modules)
    print(f"adapter: {'quick, small shapes' if args.quick else 'Llama-2-7B shapes'}, rank {RANK}, "
          f"alpha {ALPHA}, {layers} layers x {len(shapes)} kinds = {len(modules)} modules, "
          f"{lora_params:,} LoRA params")
    print()

    # (a) one module of each distinct shape, in first-seen order
    seen: dict[tuple[int, int], tuple[str, torch.Tensor, torch.Tensor]] = {}
    for name, B, A in modules:
        seen.setdefault((B.shape[0], A.shape[1]), (name, B, A))
    per_shape = []
    for (d_out, d_in), (name, B, A) in seen.items():
        kinds = [s.rsplit(".", 1)[-1] for s, sh in shapes.items() if sh == (d_out, d_in)]
        print(f"  {d_out}x{d_in} ({'/'.join(kinds)}): dense SVD x{args.dense_repeats} ...",
              end="", flush=True)
        fast_times, fact = time_fast(B, A, scale, args.fast_repeats, args.warmup)
        dense_times, S_dense = time_dense(B, A, scale, args.dense_repeats)
        dense_s = statistics.median(dense_times)
        fast_s = statistics.median(fast_times)
        ratio = dense_s / fast_s
        k = fact.S.numel()
        s_err = float((fact.S - S_dense[:k].double()).abs().max() / fact.S[0])
        ok = ratio >= args.min_ratio
        print(f" {dense_s:.1f} s")
        per_shape.append({
            "shape": f"{d_out}x{d_in}", "d_out": d_out, "d_in": d_in, "kinds": kinds,
            "module": name, "dense_s": dense_s, "dense_times_s": dense_times,
            "fast_s": fast_s, "fast_times_s": fast_times, "ratio": ratio,
            "max_sv_diff_rel": s_err, "pass": ok,
        })

    # (b) all modules with factorize_pair, median of --all-repeats passes
    all_times = []
    for _ in range(args.all_repeats):
        t0 = time.perf_counter()
        for _, B, A in modules:
            factorize_pair(B, A, scale)
        all_times.append(time.perf_counter() - t0)
    all_s = statistics.median(all_times)

    print()
    rows = [[p["shape"], "/".join(p["kinds"]), f"{p['dense_s']:.2f}", f"{p['fast_s'] * 1e3:.3f}",
             f"{p['ratio']:,.0f}x", f"{p['max_sv_diff_rel']:.1e}",
             ("PASS" if p["pass"] else "FAIL")]
            for p in per_shape]
    print(table(rows, ["shape (d_out x d_in)", "kinds", "dense SVD s", "factorize_pair ms",
                       "speed-up", "max |dS|/S1", f">= {args.min_ratio:,.0f}x"]))
    print()
    print(f"factorize_pair over all {len(modules)} modules: {all_s:.3f} s "
          f"({all_s / len(modules) * 1e3:.2f} ms per module; median of {args.all_repeats} passes)")
    passed = all(p["pass"] for p in per_shape)
    verdict = "PASS" if passed else "FAIL"
    if args.quick:
        print(f"overall: {verdict} (--quick: informational, small shapes)")
    else:
        print(f"overall: {verdict}")
    print(f"dense = float32 dW = scale * B @ A, then torch.linalg.svd(dW, full_matrices=False) on "
          f"{info['torch_threads']} thread(s), median of {args.dense_repeats}; factorize_pair = "
          f"median of {args.fast_repeats} after {args.warmup} warm-up calls (mosconv runs it on one thread).")

    if args.json:
        result = {
            "benchmark": "mosconv.factorize_speed/1",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "quick": args.quick, "machine": info,
            "adapter": {"rank": RANK, "alpha": ALPHA, "scale": scale, "layers": layers,
                        "modules": len(modules), "lora_params": lora_params,
                        "shapes": {k: list(v) for k, v in shapes.items()}},
            "settings": {"dense_repeats": args.dense_repeats, "fast_repeats": args.fast_repeats,
                         "warmup": args.warmup, "min_ratio": args.min_ratio, "seed": args.seed},
            "per_shape": per_shape,
            "all_modules": {"modules": len(modules), "total_s": all_s, "times_s": all_times,
                            "per_module_ms": all_s / len(modules) * 1e3},
            "pass": passed,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0 if (passed or args.quick) else 1


if __name__ == "__main__":
    sys.exit(main())
