"""Memory of the process that fits a zoo group: the local engine against Ray, in one run.

    python examples/benchmarks/zoo_group_memory.py [--n 64] [--chunk 8] [--json out.json]
        [--engines local ray]

Writes a synthetic zoo (examples/synthetic_zoo.py: one base model, two init seeds, a shared
output subspace plus adapter-specific parts) of ``--n`` adapters, then fits it as one group
the way ``batch --shared-pool`` does (``mosconv.batch.run.fit_group_items``) twice, each in a
fresh Python process:

* ``local``: every chunk is held, factorized, converted alone and built in that process;
* ``ray``: a local Ray instance (2 CPUs) runs the chunk tasks and keeps the chunks in its
  object store; the fitting process holds the spectra, bases and reports.

Each child reports two figures of its private memory (``RssAnon`` of /proc/self/status,
over its value after the imports and, for Ray, ``ray.init``): what it **holds** once the fit
is done, with the fit's results and the chunks' handles still alive (after ``gc.collect()``
and glibc's ``malloc_trim(0)``, so memory the allocator kept but nothing uses is not
counted), the same once the fit's results are dropped (what nothing of the fit references any
more), and the **peak** during the fit (sampled every 20 ms; it includes such unused
allocator memory and the fit's temporaries).  Also its time and every member's relative
error; the parent prints them side by side with the LoRA and factorization bytes of the
group, and checks that both engines give the same errors (to 1e-9).  Private memory, not RSS:
a Ray driver that reads an object maps the object store's shared memory, which RSS counts
although the store holds it.  Ray's own processes (workers, object store) are not the
fitting process and are not counted: on a cluster they are other machines.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def trimmed_anon_mib() -> float:
    """:func:`anon_mib` after a garbage collection and glibc's ``malloc_trim(0)``."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return anon_mib()


def anon_mib() -> float:
    """Private (anonymous) resident memory of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """The largest :func:`anon_mib` seen while it runs (a thread sampling every 20 ms)."""

    def __init__(self) -> None:
        self.peak = anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_mib())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mib())


def child(engine: str, zoo: str, chunk: int) -> dict:
    import torch

    from mosconv.batch.run import BatchConfig, RayReducer, discover, fit_group_items

    torch.set_num_threads(1)
    reducer = None
    if engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        reducer = RayReducer()
    items = discover(zoo)
    config = BatchConfig(ratio=8.0, shared_pool=True, chunk=chunk, engine=engine)
    base = trimmed_anon_mib()
    t0 = time.perf_counter()
    with PeakSampler() as peak:
        handles, fit = fit_group_items(items, config, reducer)
    seconds = time.perf_counter() - t0
    held = trimmed_anon_mib() - base
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert len(handles) == len(fit.built)
    out = {"engine": engine, "mode": fit.mode, "seconds": seconds, "anon_before_mib": base,
           "held_mib": held, "peak_growth_mib": peak.peak - base, "peak_rss_mib": rss,
           "errors": [r.totals.relative_error for r in fit.reports],
           "group_error": fit.totals.shared_relative_error
           if fit.mode == "shared" else fit.totals.independent_relative_error,
           "results_pickled_mib": len(pickle.dumps((fit.reports, fit.shared_pools))) / 2**20}
    del handles, fit  # what stays once nothing of the fit is referenced
    out["held_without_results_mib"] = trimmed_anon_mib() - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local", "ray"],
                    help="which engines to run (both by default; their errors are compared)")
    ap.add_argument("--child", choices=["local", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--zoo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.zoo, args.chunk)))
        return

    import torch
    from synthetic_zoo import write_zoo

    from mosconv import factorize_adapter, read_adapter

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_zoo(Path(tmp) / "zoo", args.n, d=args.d, d_kv=args.d, r=16,
                          layers=args.layers)
        a = read_adapter(paths[0])
        f = factorize_adapter(a)
        lora_mib = args.n * a.params * 4 / 2**20
        fact_mib = args.n * sum((t.U.numel() + t.S.numel() + t.V.numel()) * 4
                               for t in f.values()) / 2**20
        runs = {}
        for engine in args.engines:
            cmd = [sys.executable, __file__, "--child", engine, "--zoo", str(Path(tmp) / "zoo"),
                   "--chunk", str(args.chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    both = [r["errors"] for r in runs.values()]
    worst = max((abs(x - y) for x, y in zip(both[0], both[-1])), default=0.0)
    print(f"machine: {machine}")
    print(f"group: {args.n} adapters x {a.params:,} LoRA params ({lora_mib:.0f} MiB as float32; "
          f"factorizations {fact_mib:.0f} MiB), chunks of {args.chunk}, ratio 8")
    print("engine | mode | group error | fit time | fitting process: held after the fit "
          "(its results, pickled; held once they are dropped) | peak during it | peak RSS")
    for e, r in runs.items():
        print(f"{e} | {r['mode']} | {r['group_error']:.5f} | {r['seconds']:.1f} s | "
              f"{r['held_mib']:.0f} MiB ({r['results_pickled_mib']:.1f} MiB; "
              f"{r['held_without_results_mib']:.0f} MiB) | {r['peak_growth_mib']:.0f} MiB | "
              f"{r['peak_rss_mib']:.0f} MiB")
    print(f"largest difference of a member's error between the engines: {worst:.1e}")
    if worst > 1e-9:
        raise SystemExit("the engines disagree")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "n": args.n, "chunk": args.chunk,
                                         "lora_params_per_adapter": a.params,
                                         "lora_mib": lora_mib, "factorizations_mib": fact_mib,
                                         "runs": runs, "largest_error_difference": worst},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
