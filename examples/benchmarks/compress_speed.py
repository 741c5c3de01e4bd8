"""How long and how much memory does ``mosconv compress`` take, next to just reading the adapter?

Builds a Llama-2-7B-shaped rank-16 PEFT LoRA on all 7 linear kinds (32 layers x 7 kinds =
224 modules, 39.98M LoRA parameters, about 160 MB in float32; the "LoRA r=16" row of the
MoS paper) and writes it to a temporary folder with :func:`mosconv.lora.write.write_peft_folder`.
Then, each step in a FRESH Python subprocess (so that peak memory is that step's own), it
measures wall time and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of:

  (a) baseline: ``python`` + ``import torch, mosconv`` and nothing else;
  (b) load + exact factorization: ``mosconv.read_adapter`` + ``mosconv.factorize_adapter``;
  (c) compress: what ``mosconv compress LORA OUT --ratio 8 --quiet`` does, through the library:
      ``mosconv.pipeline.compress(lora, out, ConvertConfig(ratio=8))`` (search "fast");
  (d) the same with ``ConvertConfig(ratio=8, search="truncation")``.

Times are the work inside the subprocess, after the imports (the import cost is (a) and is
the same in every step); the subprocess's whole wall time is reported too.  Checks:

  * time:   (c) / (b) <= --max-time-ratio (default 10); (d) / (b) is reported;
  * memory: peak_rss(c) <= --mem-factor (default 3) x adapter file bytes + peak_rss(a).

The factors are random but shaped like a trained adapter: ``A`` is PEFT's kaiming-uniform
initialization (uniform in +-1/sqrt(d_in)) plus a small trained drift (5% of the init's
scale, Gaussian), and ``B = Q diag(s) M`` with ``Q`` orthonormal, ``M`` a random rotation
and a decaying spectrum ``s_i = exp(-i/4) * (1 + 0.3 u_i)``, so that ``dW = (alpha/r) B @ A``
has a stable rank of about 2.5 of 16, as real LoRAs do.  ``lora_alpha = 32``.

When a check fails (unless --no-profile), or with --profile, the compress step is run once
more under cProfile (in its own subprocess) and the top functions by cumulative and by
internal time are printed.

    python examples/benchmarks/compress_speed.py [--layers 32] [--json PATH] [--profile]

--layers N shrinks the adapter (N x 7 modules) for a quick run.  Exit status: 0 when both
checks pass, 1 otherwise.

Noise: (b) takes well under a second on an idle 2-core machine, so the time ratio swings with
whatever else runs.  torch's two intra-op threads are especially sensitive: with one core
taken by another process, factorization slowed down about 10x in our runs (fitting is
single-threaded and suffers less), which shrinks the ratio.  Check the load averages printed,
use --repeats, and --threads 1 for a measurement that does not depend on a free second core.
"""

from __future__ import annotations

import argparse
import json
import math
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

from _llama import ALPHA, LLAMA2_7B, RANK, machine_info

STEPS = {
    "a": ("baseline", "python + import torch, mosconv"),
    "b": ("load", "read_adapter + factorize_adapter"),
    "c": ("compress", "pipeline.compress, ConvertConfig(ratio=8) (search fast)"),
    "d": ("compress-truncation", "pipeline.compress, ConvertConfig(ratio=8, search='truncation')"),
}
WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- inner steps (subprocess)


def inner(step: str, lora: str, out: str | None, ratio: float, profile: str | None,
          threads: int | None, layers: int = 32, seed: int = 0) -> None:
    """Run one step in this (fresh) process and print one JSON line with its numbers."""
    if step == "make":
        print(json.dumps(write_lora(Path(lora), layers, seed)))
        return
    import torch

    import mosconv
    from mosconv.fit.convert import ConvertConfig
    from mosconv.pipeline import compress

    if threads:
        torch.set_num_threads(threads)
    t_imported = time.perf_counter()
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def work():
        if step == "baseline":
            return {}
        if step == "load":
            adapter = mosconv.read_adapter(lora)
            facts = mosconv.factorize_adapter(adapter)
            return {"modules": len(facts), "lora_params": adapter.params}
        search = "truncation" if step == "compress-truncation" else "fast"
        result = compress(lora, out, ConvertConfig(ratio=ratio, search=search), overwrite=True)
        t = result.report.to_json()["totals"]
        return {"modules": len(result.mos.modules), "lora_params": t["lora_params"],
                "mos_params": t["mos_params"], "relative_error": t["relative_error"],
                "truncation_relative_error": t["truncation_relative_error"],
                "kinds_shared": t["kinds_shared"], "mos_file_bytes": t["mos_file_bytes"]}

    t0 = time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        numbers = prof.runcall(work)
        prof.dump_stats(profile)
    else:
        numbers = work()
    t1 = time.perf_counter()
    print(json.dumps({
        "step": step,
        "import_s": t_imported - T_START,
        "work_s": t1 - t0,
        "process_s": t1 - T_START,
        "rss_after_import_kib": rss_imported,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **numbers,
    }))


# ---------------------------------------------------------------- outer driver


def source_state() -> dict | None:
    """The mosconv commit measured and whether its package files had local changes."""
    here = Path(__file__).resolve().parents[2]
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", "-C", str(here), *cmd], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "mosconv")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "mosconv_dirty": bool(dirty)} if head else None


def load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def make_modules(layers: int, seed: int):
    """Llama-2-7B-shaped rank-16 modules ``(name, A, B, False)`` in float32."""
    import torch

    torch.set_num_threads(1)  # deterministic and no contention on small machines
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(RANK, dtype=torch.float64) / 4.0)
    modules = []
    for layer in range(layers):
        for sub, (d_out, d_in) in LLAMA2_7B.items():
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) weight
            A = (torch.rand(RANK, d_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
            A += 0.05 * bound * torch.randn(RANK, d_in, generator=g, dtype=torch.float64)
            q, _ = torch.linalg.qr(torch.randn(d_out, RANK, generator=g, dtype=torch.float64))
            mix, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=g, dtype=torch.float64))
            s = decay * (1 + 0.3 * torch.rand(RANK, generator=g, dtype=torch.float64))
            B = 0.02 * q @ torch.diag(s) @ mix
            modules.append((f"model.layers.{layer}.{sub}", A.float(), B.float(), False))
    return modules


def write_lora(folder: Path, layers: int, seed: int) -> dict:
    from mosconv.fit.factorize import factorize_pair, stable_rank
    from mosconv.lora.write import write_peft_folder

    modules = make_modules(layers, seed)
    sample = modules[:7 * min(layers, 2)]  # the first two layers
    srs = [stable_rank(factorize_pair(B, A, ALPHA / RANK).S) for _, A, B, _ in sample]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "target_modules": sorted(s.rsplit(".", 1)[-1] for s in LLAMA2_7B),
        "base_model_name_or_path": "synthetic-llama-2-7b-shapes", "fan_in_fan_out": False,
        "bias": "none", "lora_dropout": 0.0,
    }
    write_peft_folder(folder, modules, config, overwrite=True)
    params = sum(A.numel() + B.numel() for _, A, B, _ in modules)
    del modules
    return {"modules": layers * len(LLAMA2_7B), "layers": layers, "rank": RANK, "alpha": ALPHA,
            "lora_params": params, "file_bytes": (folder / WEIGHTS).stat().st_size,
            "stable_rank_mean_sample": statistics.mean(srs)}


def run_step(step: str, lora: Path, out: Path, ratio: float, threads: int | None,
             profile: Path | None = None, extra: list[str] | None = None) -> dict:
    """Run one step in a fresh interpreter and return its JSON line.

    On Linux a child's ``ru_maxrss`` starts at its parent's high-water mark (subprocess uses
    vfork/fork + exec, and exec carries the old address space's peak into the new process).
    That is why this driver never imports torch or builds tensors itself: it stays at a few
    MiB, below every step's own peak, so each step's number is its own.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--inner", step, "--lora", str(lora),
           "--out", str(out), "--ratio", str(ratio)] + (extra or [])
    if threads:
        cmd += ["--threads", str(threads)]
    if profile:
        cmd += ["--profile-out", str(profile)]
    load = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {step} failed with exit status {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["subprocess_wall_s"] = wall
    res["load_avg_1m_before"] = load[0] if load else None
    return res


def table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                       for i, c in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32,
                    help="layers of the synthetic adapter (default 32)")
    ap.add_argument("--ratio", type=float, default=8.0, help="compression ratio (default 8)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh subprocesses per step; the median time and the largest peak RSS "
                         "are reported (default 1)")
    ap.add_argument("--max-time-ratio", type=float, default=10.0,
                    help="(c) / (b) work time must not exceed this (default 10)")
    ap.add_argument("--mem-factor", type=float, default=3.0,
                    help="peak RSS of (c) must not exceed this x file bytes + peak RSS of (a) "
                         "(default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="always profile the compress step (by default only when a check fails)")
    ap.add_argument("--no-profile", action="store_true",
                    help="never profile, even when a check fails")
    ap.add_argument("--profile-top", type=int, default=15,
                    help="functions shown in the profile (default 15)")
    ap.add_argument("--workdir",
                    help="folder for the adapter and outputs (default: a temp folder, removed)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    # inner-step entry point (used by the driver; not for direct use)
    ap.add_argument("--inner", choices=["make"] + [s[0] for s in STEPS.values()],
                    help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.inner:
        inner(args.inner, args.lora, args.out, args.ratio, args.profile_out, args.threads,
              args.layers, args.seed)
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
        adapter = run_step("make", lora, tmp, args.ratio, None,
                           extra=["--layers", str(args.layers), "--seed", str(args.seed)])
        adapter.pop("subprocess_wall_s", None)
        print(f"adapter: Llama-2-7B shapes, rank {RANK}, alpha {ALPHA}, {args.layers} layers x "
              f"7 kinds = {adapter['modules']} modules, {adapter['lora_params']:,} LoRA params, "
              f"{WEIGHTS} {adapter['file_bytes'] / 2**20:.1f} MiB "
              f"(stable rank ~{adapter['stable_rank_mean_sample']:.2f}; written in "
              f"{time.perf_counter() - t0:.1f} s to {lora})")
        print()

        results: dict[str, dict] = {}
        for key, (step, what) in STEPS.items():
            runs = []
            for i in range(args.repeats):
                print(f"  ({key}) {step}: {what} ... ", end="", flush=True)
                r = run_step(step, lora, tmp / f"out-{step}", args.ratio, args.threads)
                print(f"{r['work_s']:.2f} s, peak {mib(r['peak_rss_kib'])} MiB")
                runs.append(r)
            best = dict(runs[0])
            best["work_s"] = statistics.median(r["work_s"] for r in runs)
            best["work_min_s"] = min(r["work_s"] for r in runs)
            best["subprocess_wall_s"] = statistics.median(r["subprocess_wall_s"] for r in runs)
            best["peak_rss_kib"] = max(r["peak_rss_kib"] for r in runs)
            best["runs"] = runs
            results[key] = best
            if key == "a":
                info["torch"], info["torch_threads"] = best["torch"], best["torch_threads"]
                print(f"      torch {info['torch']}, {info['torch_threads']} intra-op threads")
        la1 = load_avg()

        a, b, c, d = (results[k] for k in "abcd")
        time_ratio_c = c["work_s"] / b["work_s"]
        time_ratio_d = d["work_s"] / b["work_s"]
        mem_limit_kib = args.mem_factor * adapter["file_bytes"] / 1024 + a["peak_rss_kib"]
        time_ok = time_ratio_c <= args.max_time_ratio
        mem_ok = c["peak_rss_kib"] <= mem_limit_kib

        print()
        rows = []
        for key, (step, what) in STEPS.items():
            r = results[key]
            rows.append([f"({key}) {step}", f"{r['work_s']:.2f}", f"{r['subprocess_wall_s']:.2f}",
                         "-" if key in "ab" else f"{r['work_s'] / b['work_s']:.2f}x",
                         mib(r["peak_rss_kib"]), mib(r["peak_rss_kib"] - a["peak_rss_kib"]),
                         f"{r['relative_error']:.4f}" if "relative_error" in r else "-"])
        print(table(rows, ["step", "work s", "process s", "/ (b)", "peak RSS MiB",
                           "over (a) MiB", "rel.err"]))
        print()
        checks = [
            [f"time (c)/(b) <= {args.max_time_ratio:g}", f"{time_ratio_c:.2f}",
             "PASS" if time_ok else "FAIL"],
            ["time (d)/(b) (informational)", f"{time_ratio_d:.2f}", "-"],
            [f"peak RSS (c) <= {args.mem_factor:g} x file + peak RSS (a)",
             (f"{mib(c['peak_rss_kib'])} MiB <= {mib(mem_limit_kib)} MiB ({args.mem_factor:g} x "
              f"{adapter['file_bytes'] / 2**20:.1f} + {mib(a['peak_rss_kib'])})"),
             "PASS" if mem_ok else "FAIL"],
        ]
        print(table(checks, ["check", "value", "verdict"]))
        if "relative_error" in c:
            print(f"\ncompress (fast): {c['lora_params']:,} -> {c['mos_params']:,} params, "
                  f"relative error {c['relative_error']:.4f} vs truncation "
                  f"{c['truncation_relative_error']:.4f}, {c['kinds_shared']} of 7 kinds shared")
        if la1:
            print(f"load average at end (1/5/15 min): {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")
        passed = time_ok and mem_ok
        print(f"overall: {'PASS' if passed else 'FAIL'}")

        profile_text = None
        if args.profile or (not passed and not args.no_profile):
            import io
            import pstats

            prof_path = tmp / "compress.prof"
            print("\nprofiling the compress step (cProfile, fresh subprocess) ...", flush=True)
            r = run_step("compress", lora, tmp / "out-profile", args.ratio, args.threads, prof_path)
            buf = io.StringIO()
            st = pstats.Stats(str(prof_path), stream=buf)
            st.sort_stats("cumulative").print_stats(args.profile_top)
            st.sort_stats("tottime").print_stats(args.profile_top)
            profile_text = buf.getvalue()
            print(f"compress under cProfile: {r['work_s']:.2f} s")
            print(profile_text)

        if args.json:
            doc = {
                "benchmark": "mosconv.compress_speed/1",
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "machine": info, "load_avg_start": la0, "load_avg_end": la1,
                "adapter": adapter, "ratio": args.ratio, "repeats": args.repeats,
                "steps": {k: {"name": STEPS[k][0], "what": STEPS[k][1], **v}
                          for k, v in results.items()},
                "time_ratio_c_b": time_ratio_c, "time_ratio_d_b": time_ratio_d,
                "max_time_ratio": args.max_time_ratio, "time_pass": time_ok,
                "mem_limit_kib": mem_limit_kib, "mem_factor": args.mem_factor, "mem_pass": mem_ok,
                "pass": passed, "profile_top": profile_text,
            }
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
