"""What does ``mosconv compress --quantize int8 / int4`` cost in time, and what does it buy?

Builds the Llama-2-7B-shaped rank-16 PEFT LoRA of ``compress_speed.py`` once (its
``write_lora``: 32 layers x 7 kinds = 224 modules, 39.98M LoRA parameters, about 160 MB in
float32) in a temporary folder, then times the whole compress (read + convert + save) of
``mosconv compress LORA OUT --ratio 8 --quantize Q --quiet``, through the library as
``compress_speed.py`` does::

    mosconv.pipeline.compress(lora, out, ConvertConfig(ratio=8, quantize=Q), overwrite=True)

for Q = none, int8 and int4, each run in a FRESH Python subprocess (so that its peak RSS is
its own), the variants interleaved (none, int8, int4, none, int8, int4, ...) so that a
drift in the machine's speed hits all three alike.  Times are the work inside the subprocess,
after the imports.  Before each run the script waits (up to --wait-idle seconds) until other
processes use less than 0.2 CPUs, and it records the CPU seconds other processes used during
each run (``/proc/stat``).  A run during which they used more than --busy-cpus CPUs on
average is "busy" and is run again (up to --retry-busy times; the last try is kept, the
table counts the busy runs kept): on a shared 2-core machine the quantized variants suffer
far more from contention than the unquantized one (torch's two intra-op threads on many small
tensors: 8-17x slower in our runs), which would make the ratio measure the neighbours.

Per variant: min and median seconds over --repeats, the median's ratio to the unquantized
median (check: every ratio <= --max-time-ratio, default 1.5) and the ratio of the minimums,
peak RSS, and what the time buys, from the report's totals: ``relative_error`` (of the
stored adapter),
``truncation_equal_bytes_relative_error`` (SVD truncation stored the same way in no more
tensor bytes), ``tensor_bytes_ratio`` (LoRA tensor bytes / MoS tensor bytes) and
``file_bytes_ratio``.

When the check fails (unless --no-profile), or with --profile, one compress with
``quantize=int4`` (--profile-quantize) runs once more under cProfile in its own subprocess;
the top functions by cumulative and by internal time, and every function of
``mosconv/fit/storage.py`` and ``mosconv/mos/quant.py``, are printed.

    python examples/benchmarks/quantize_speed.py [--repeats 3] [--layers 32] [--json PATH]

Exit status: 0 when the time check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # before the heavy imports, for the inner steps

# the driver never imports torch (see compress_speed.run_step: peak RSS of the children)
from _llama import ALPHA, RANK, machine_info
from batch_speed import busy_cpu_s
from compress_speed import load_avg, source_state, table, write_lora

VARIANTS = ("none", "int8", "int4")
WEIGHTS = "adapter_model.safetensors"
QUANT_FILES = ("mosconv/fit/storage.py", "mosconv/mos/quant.py")


# ---------------------------------------------------------------- inner steps (subprocess)


def inner(step: str, lora: str, out: str | None, ratio: float, quantize: str, dtype: str,
          profile: str | None, threads: int | None, layers: int = 32, seed: int = 0) -> None:
    """Run one step in this (fresh) process and print one JSON line with its numbers."""
    if step == "make":
        print(json.dumps(write_lora(Path(lora), layers, seed)))
        return
    import torch

    from mosconv.fit.convert import ConvertConfig
    from mosconv.pipeline import compress

    if threads:
        torch.set_num_threads(threads)
    t_imported = time.perf_counter()
    config = ConvertConfig(ratio=ratio, quantize=quantize, dtype=dtype)

    def work():
        return compress(lora, out, config, overwrite=True)

    t0 = time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(work)
        prof.dump_stats(profile)
    else:
        result = work()
    t1 = time.perf_counter()
    t = result.report.to_json()["totals"]
    keys = ("lora_params", "mos_params", "dtype", "quantize", "quant_group", "relative_error",
            "truncation_relative_error", "truncation_equal_bytes_relative_error",
            "truncation_equal_bytes_params", "lora_tensor_bytes", "mos_tensor_bytes",
            "tensor_bytes_ratio", "lora_file_bytes", "mos_file_bytes", "file_bytes_ratio",
            "kinds_shared")
    print(json.dumps({
        "step": step,
        "quantize": quantize,
        "import_s": t_imported - T_START,
        "work_s": t1 - t0,
        "process_s": t1 - T_START,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "modules": len(result.mos.modules),
        **{k: t.get(k) for k in keys},
    }))


# ---------------------------------------------------------------- outer driver


def wait_for_idle(max_wait: float, threshold: float = 0.2) -> tuple[float | None, float]:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` CPUs.

    Returns the CPUs in use over the last second and the seconds waited."""
    start = time.monotonic()
    deadline = start + max_wait
    while True:
        b0, t0 = busy_cpu_s(), time.monotonic()
        time.sleep(1.0)
        b1 = busy_cpu_s()
        if b0 is None or b1 is None:
            return None, time.monotonic() - start
        load = (b1 - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load, time.monotonic() - start


def run_step(step: str, lora: Path, out: Path, args: argparse.Namespace, quantize: str = "none",
             profile: Path | None = None, wait_idle: float = 0.0) -> dict:
    """Run one step in a fresh interpreter and return its JSON line, with the wall time of
    the subprocess, its CPU seconds and the CPU seconds other processes used meanwhile."""
    cmd = [sys.executable, os.path.abspath(__file__), "--inner", step, "--lora", str(lora),
           "--out", str(out), "--ratio", str(args.ratio), "--inner-quantize", quantize,
           "--dtype", args.dtype, "--layers", str(args.layers), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if profile:
        cmd += ["--profile-out", str(profile)]
    idle_load, waited = wait_for_idle(wait_idle) if wait_idle > 0 else (None, 0.0)
    load = load_avg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    busy1 = busy_cpu_s()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {step} ({quantize}) failed with exit status {proc.returncode}")
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["subprocess_wall_s"] = wall
    res["subprocess_cpu_s"] = cpu
    res["other_cpu_s"] = (max(0.0, busy1 - busy0 - cpu)
                          if busy0 is not None and busy1 is not None else None)
    res["load_avg_1m_before"] = load[0] if load else None
    res["idle_wait_s"] = waited
    res["cpus_busy_before"] = idle_load
    return res


def profile_text(prof_path: Path, top: int) -> tuple[str, list[dict]]:
    """The printed profile, and the functions of QUANT_FILES as rows (by cumulative time)."""
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(prof_path), stream=buf)
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    quant = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rel = file.replace(os.sep, "/")
        hit = next((q for q in QUANT_FILES if rel.endswith(q)), None)
        if hit:
            quant.append({"function": f"{hit}:{line}({name})", "ncalls": nc,
                          "tottime_s": tt, "cumtime_s": ct})
    quant.sort(key=lambda r: -r["cumtime_s"])
    return buf.getvalue(), quant


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved runs per variant; min and median are reported (default 3)")
    ap.add_argument("--layers", type=int, default=32,
                    help="layers of the synthetic adapter (default 32)")
    ap.add_argument("--ratio", type=float, default=8.0, help="compression ratio (default 8)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="ConvertConfig.dtype for every variant (default auto: float32 here)")
    ap.add_argument("--max-time-ratio", type=float, default=1.5,
                    help="median(quantized) / median(none) must not exceed this (default 1.5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each run, wait up to this many seconds for other processes "
                         "to leave the CPUs idle (0: do not wait; default 60)")
    ap.add_argument("--busy-cpus", type=float, default=0.25,
                    help="a run during which other processes used more than this many CPUs on "
                         "average is busy (default 0.25)")
    ap.add_argument("--retry-busy", type=int, default=2,
                    help="run a busy run again, up to this many times; the last try is kept "
                         "(default 2)")
    ap.add_argument("--profile", action="store_true",
                    help="always profile one compress (by default only when the check fails)")
    ap.add_argument("--no-profile", action="store_true",
                    help="never profile, even when the check fails")
    ap.add_argument("--profile-quantize", default="int4", choices=VARIANTS,
                    help="the variant profiled (default int4)")
    ap.add_argument("--profile-top", type=int, default=20,
                    help="functions shown in the profile (default 20)")
    ap.add_argument("--workdir",
                    help="folder for the adapter and outputs (default: a temp folder, removed)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    # inner-step entry point (used by the driver; not for direct use)
    ap.add_argument("--inner", choices=["make", "compress"], help=argparse.SUPPRESS)
    ap.add_argument("--inner-quantize", default="none", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.inner:
        inner(args.inner, args.lora, args.out, args.ratio, args.inner_quantize, args.dtype,
              args.profile_out, args.threads, args.layers, args.seed)
        return 0
    if args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")

    info = machine_info()
    info["source"] = source_state()
    la0 = load_avg()
    print(f"machine: {info['processor']} | {info['system']} | {info['cpu_count']} CPUs | "
          f"{(info['mem_total_kib'] or 0) / 2**20:.1f} GiB RAM | python {info['python']}")
    if info["source"]:
        print(f"mosconv: commit {info['source']['commit']}"
              + (" + uncommitted changes in mosconv/" if info["source"]["mosconv_dirty"] else ""))
    if la0:
        busy = la0[0] >= 0.5 * (info["cpu_count"] or 1)
        print(f"load average at start (1/5/15 min): {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}"
              + (" (busy machine: timings are noisy)" if busy else ""))

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mosconv-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        lora = tmp / "lora"
        t0 = time.perf_counter()
        adapter = run_step("make", lora, tmp, args)
        for k in ("subprocess_wall_s", "subprocess_cpu_s", "other_cpu_s", "load_avg_1m_before",
                  "idle_wait_s", "cpus_busy_before"):
            adapter.pop(k, None)
        print(f"adapter: Llama-2-7B shapes, rank {RANK}, alpha {ALPHA}, {args.layers} layers x "
              f"7 kinds = {adapter['modules']} modules, {adapter['lora_params']:,} LoRA params, "
              f"{WEIGHTS} {adapter['file_bytes'] / 2**20:.1f} MiB "
              f"(stable rank ~{adapter['stable_rank_mean_sample']:.2f}; written in "
              f"{time.perf_counter() - t0:.1f} s)")
        print(f"timing: pipeline.compress(lora, out, ConvertConfig(ratio={args.ratio:g}, "
              f"quantize=Q, dtype={args.dtype!r})), Q in {', '.join(VARIANTS)}, interleaved, "
              f"{args.repeats} repeat(s), each in a fresh subprocess")
        print()

        runs: dict[str, list[dict]] = {q: [] for q in VARIANTS}
        for i in range(args.repeats):
            for q in VARIANTS:
                print(f"  [{i + 1}/{args.repeats}] compress --quantize {q} ... ", end="",
                      flush=True)
                attempts = []
                while True:
                    r = run_step("compress", lora, tmp / f"out-{q}", args, q,
                                 wait_idle=args.wait_idle)
                    other = r["other_cpu_s"]
                    r["busy"] = busy = (other is not None
                                        and other > args.busy_cpus * r["subprocess_wall_s"])
                    print(f"{r['work_s']:.2f} s, peak {r['peak_rss_kib'] / 1024:,.0f} MiB"
                          + (f", other processes {other:.1f} CPU s" if other is not None else "")
                          + (" (busy)" if busy else ""), end="", flush=True)
                    attempts.append(r)
                    if not busy or len(attempts) > args.retry_busy:
                        break
                    print(", again ... ", end="", flush=True)
                print()
                r = dict(attempts[-1])
                r["attempts"] = len(attempts)
                if len(attempts) > 1:
                    r["discarded_busy_s"] = [a["work_s"] for a in attempts[:-1]]
                runs[q].append(r)
                if "torch" not in info:
                    info["torch"], info["torch_threads"] = r["torch"], r["torch_threads"]
        la1 = load_avg()

        results: dict[str, dict] = {}
        for q, rs in runs.items():
            times = [r["work_s"] for r in rs]
            last = rs[-1]
            results[q] = {
                "min_s": min(times), "median_s": statistics.median(times), "times_s": times,
                "peak_rss_kib": max(r["peak_rss_kib"] for r in rs),
                "busy_runs": sum(r["busy"] for r in rs),
                **{k: last[k] for k in last if k not in (
                    "step", "work_s", "import_s", "process_s", "peak_rss_kib", "torch",
                    "torch_threads", "subprocess_wall_s", "subprocess_cpu_s", "other_cpu_s",
                    "load_avg_1m_before", "idle_wait_s", "cpus_busy_before", "busy",
                    "attempts", "discarded_busy_s")},
                "runs": rs,
            }
        base = results["none"]["median_s"]
        for q in VARIANTS:
            results[q]["median_ratio_to_none"] = results[q]["median_s"] / base
            results[q]["min_ratio_to_none"] = results[q]["min_s"] / results["none"]["min_s"]
        worst = max(results[q]["median_ratio_to_none"] for q in VARIANTS if q != "none")
        passed = worst <= args.max_time_ratio

        print(f"\nmachine: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']} "
              f"({info['torch_threads']} threads), python {info['python']}; repeats "
              f"{args.repeats}, interleaved")
        rows = []
        for q in VARIANTS:
            r = results[q]
            rows.append([q, f"{r['min_s']:.2f}", f"{r['median_s']:.2f}",
                         "-" if q == "none" else f"{r['median_ratio_to_none']:.2f}x",
                         "-" if q == "none" else f"{r['min_ratio_to_none']:.2f}x",
                         r["busy_runs"], f"{r['peak_rss_kib'] / 1024:,.0f}",
                         fmt(r["relative_error"], ".4f"),
                         fmt(r["truncation_equal_bytes_relative_error"], ".4f"),
                         fmt(r["tensor_bytes_ratio"], ".2f"), fmt(r["file_bytes_ratio"], ".2f"),
                         fmt((r["mos_file_bytes"] or 0) / 2**20, ".2f")])
        print(table(rows, ["quantize", "min s", "median s", "median / none", "min / none",
                           "busy runs", "peak RSS MiB", "rel.err",
                           "trunc@bytes err", "tensor bytes x", "file bytes x", "file MiB"]))
        print("\nbusy runs: kept runs during which other processes used more than "
              f"{args.busy_cpus:g} CPUs (after {args.retry_busy} retries); rel.err: relative error "
              "of the stored adapter; trunc@bytes err: SVD truncation stored the same way in no "
              "more tensor bytes; tensor/file bytes x: LoRA bytes / MoS bytes")
        verdict = "PASS" if passed else "FAIL"
        print(f"check: median(quantized) / median(none) <= {args.max_time_ratio:g}: worst "
              f"{worst:.2f}x -> {verdict}")
        if la1:
            print(f"load average at end (1/5/15 min): {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")

        prof_printed, prof_quant, prof_s = None, None, None
        if args.profile or (not passed and not args.no_profile):
            prof_path = tmp / "compress.prof"
            q = args.profile_quantize
            print(f"\nprofiling one compress --quantize {q} (cProfile, fresh subprocess) ...",
                  flush=True)
            r = run_step("compress", lora, tmp / "out-profile", args, q, prof_path,
                         wait_idle=args.wait_idle)
            prof_s = r["work_s"]
            prof_printed, prof_quant = profile_text(prof_path, args.profile_top)
            print(f"compress --quantize {q} under cProfile: {prof_s:.2f} s")
            print(prof_printed)
            print(f"functions of {' and '.join(QUANT_FILES)} (by cumulative time, >= 5 ms):")
            print(table([[f["function"], f["ncalls"], f"{f['tottime_s']:.2f}",
                          f"{f['cumtime_s']:.2f}"] for f in prof_quant
                         if f["cumtime_s"] >= 0.005],
                        ["function", "ncalls", "tottime s", "cumtime s"]))

        if args.json:
            doc = {
                "benchmark": "mosconv.quantize_speed/1",
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "machine": info, "load_avg_start": la0, "load_avg_end": la1,
                "adapter": adapter, "ratio": args.ratio, "dtype": args.dtype,
                "repeats": args.repeats, "order": "interleaved: " + ", ".join(VARIANTS),
                "wait_idle_s": args.wait_idle, "threads": args.threads,
                "busy_cpus": args.busy_cpus, "retry_busy": args.retry_busy,
                "variants": results,
                "worst_median_ratio_to_none": worst, "max_time_ratio": args.max_time_ratio,
                "pass": passed,
                "profile": None if prof_printed is None else {
                    "quantize": args.profile_quantize, "work_s_under_cprofile": prof_s,
                    "quant_functions": prof_quant, "top": prof_printed},
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            print(f"wrote {args.json}")
        return 0 if passed else 1
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
