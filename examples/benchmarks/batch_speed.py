"""Zoo batch conversion: parallel speed-up, rerun cost, and shared vs independent pools.

    python examples/benchmarks/batch_speed.py [--zoo ../shared/zoo] [--counts 16 32]
        [--jobs 1 2] [--repeats 3] [--ratio 8] [--wait-idle 30] [--json batch_speed.json]

(a) speed: writes N small synthetic PEFT adapters (Llama-like, 8 layers x q,k,v,o,
    hidden 512, GQA k/v 128, r 16, one seed each; the layers of a kind share part of
    their B direction, so the fast search really fits MoS candidates and one conversion
    takes about 0.7 s on a 2.6 GHz EPYC core) and times
    ``python -m mosconv.cli.commands batch ZOO OUT --jobs J --quiet`` as a subprocess into a fresh
    OUT: wall time includes the interpreter start, the torch import and, for J > 1, the
    spawn workers' start.  Runs alternate between the J values; the best of --repeats is
    shown, with the sum of per-adapter seconds from summary.json, the median and largest
    adapter time, the CPU time of the run and the CPU time other processes used meanwhile
    (a shared machine distorts parallel timings: the script waits up to --wait-idle
    seconds for idle CPUs before each run, and probes how many cores are really free).
    The fixed costs (interpreter + imports, spawn pool start) are measured on their own,
    with the speed-up they leave.
(b) rerun: ``batch ZOO OUT --ratio 8`` on the real zoo, then the same command again
    (everything is complete, nothing to do), next to the time of the imports alone.
(c) shared vs independent on the real zoo: ``batch ... --shared-pool`` next to (b)'s
    output, per adapter of the gemma3 and opt pairs and per pair, and each pair's group
    totals from ``mosconv.fit.zoo.fit_group``.
(b) and (c) are skipped with a message when the real zoo is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mosconv.cli.render import table
from mosconv.lora.write import write_peft_folder

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "mosconv.cli"]
PAIRS = {"gemma3": "gemma3-270m-svg-x3", "opt": "opt-125m-lora-ckpts"}

HIDDEN, KV, LAYERS, RANK, ALPHA = 512, 128, 8, 16, 32
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN)}


# ---------------------------------------------------------------- helpers


def machine_line() -> str:
    load = f", load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads){load}")




def shown(cmd: list[str]) -> str:
    return "python -m mosconv.cli.commands " + " ".join(cmd[len(CLI):])


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (``/proc/stat``; None elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` CPUs; the load seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_cpu_s(), time.monotonic()
        time.sleep(1.0)
        b1 = busy_cpu_s()
        if b0 is None or b1 is None:
            return 0.0
        load = (b1 - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load


def timed(cmd: list[str], wait_idle: float = 0.0) -> dict:
    """Run ``cmd``; wall seconds, its CPU seconds (user + sys), the CPU seconds other
    processes used meanwhile (contention on a shared machine), exit code."""
    if wait_idle > 0:
        wait_for_idle(wait_idle)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    busy1 = busy_cpu_s()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    other = max(0.0, busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None else None
    if proc.returncode not in (0, 1):
        sys.exit(f"{shown(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"command": shown(cmd), "wall_s": wall, "cpu_s": cpu, "other_cpu_s": other,
            "rc": proc.returncode, "stderr": proc.stderr.strip()[-500:]}


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def synthetic_modules(seed: int, share: float = 0.8) -> list:
    """Llama-like LoRA modules; each kind's layers share ``share`` of a common B basis."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    common = {p: torch.linalg.qr(torch.randn(d_out, RANK, generator=g, dtype=f64))[0]
              for p, (d_out, _) in SHAPES.items()}
    decay = torch.exp(-torch.arange(RANK, dtype=f64) / 2.0)
    modules = []
    for layer in range(LAYERS):
        for p, (d_out, d_in) in SHAPES.items():
            A = (torch.rand(RANK, d_in, generator=g, dtype=f64) * 2 - 1) / math.sqrt(d_in)
            q = share * common[p] + (1 - share) * torch.randn(d_out, RANK, generator=g,
                                                              dtype=f64) / math.sqrt(d_out)
            mix, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=g, dtype=f64))
            B = 0.02 * q @ torch.diag(decay * (1 + 0.3 * torch.rand(RANK, generator=g, dtype=f64))) @ mix
            modules.append((f"model.layers.{layer}.self_attn.{p}", A.float(), B.float(), False))
    return modules


def write_synthetic_zoo(folder: Path, n: int) -> None:
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
              "target_modules": sorted(SHAPES), "base_model_name_or_path": "synthetic-llama-512",
              "fan_in_fan_out": False, "bias": "none"}
    for i in range(n):
        write_peft_folder(folder / f"adapter_{i:02d}", synthetic_modules(1000 + i), config,
                          overwrite=True)


_PROBE = """
import time, torch
torch.set_num_threads(1)
x = torch.randn(512, 64, dtype=torch.float64)
t = time.perf_counter()
for _ in range(600):
    torch.linalg.svd(x, full_matrices=False)
print(time.perf_counter() - t)
"""


def parallel_capacity() -> dict:
    """A fixed one-thread workload alone, then two copies at once: how many CPUs are free.

    2.0 means two idle cores; on a shared or throttled machine it is lower, and ``--jobs 2``
    cannot beat it.
    """
    def probe(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = min(probe(1) for _ in range(2))
    both = min(probe(2) for _ in range(2))
    return {"alone_s": alone, "two_at_once_s": both, "capacity": 2 * alone / both}


def _noop(_: int) -> int:
    import mosconv.pipeline  # noqa: F401  (what a worker imports for its first adapter)

    return os.getpid()


def fixed_costs(jobs: int) -> dict:
    """Interpreter + ``import mosconv.cli.commands`` + torch, and the start of a spawn pool of ``jobs``."""
    start = timed([sys.executable, "-c", "import mosconv.cli.commands, mosconv.batch.run, mosconv.pipeline"])
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from mosconv.batch.run import _init_worker

    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pids = set(pool.map(_noop, range(jobs * 4)))
        first = time.perf_counter() - t0
    return {"interpreter_import_s": start["wall_s"], "spawn_pool_s": first,
            "spawn_workers_used": len(pids), "jobs": jobs}


# ---------------------------------------------------------------- (a) parallel speed


def bench_jobs(work: Path, counts: list[int], jobs_list: list[int], repeats: int,
               wait_idle: float) -> dict:
    rows, results = [], []
    cap = [parallel_capacity()]
    fixed = {j: fixed_costs(j) for j in jobs_list if j > 1}
    base_fixed = timed([sys.executable, "-c", "import mosconv.cli.commands, mosconv.batch.run, mosconv.pipeline"])
    for n in counts:
        zoo = work / f"synthetic_{n}"
        write_synthetic_zoo(zoo, n)
        per_n = {}
        for rep in range(repeats):
            for jobs in jobs_list:
                out = work / f"out_{n}_j{jobs}_{rep}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = CLI + ["batch", str(zoo), str(out), "--jobs", str(jobs), "--quiet"]
                r = timed(cmd, wait_idle)
                s = read_summary(out)
                t = s["totals"]
                secs = sorted(a["seconds"] for a in s["adapters"])
                r.update(adapters=n, jobs=jobs, repeat=rep, converted=t["converted"],
                         failed=t["failed"], sum_adapter_s=t["seconds"],
                         mean_adapter_s=sum(secs) / len(secs), max_adapter_s=secs[-1],
                         median_adapter_s=secs[len(secs) // 2], adapters_per_s=n / r["wall_s"])
                results.append(r)
                per_n.setdefault(jobs, []).append(r)
                shutil.rmtree(out, ignore_errors=True)
        best = {j: min(rs, key=lambda x: x["wall_s"]) for j, rs in per_n.items()}
        j1 = best.get(1)
        for jobs, r in sorted(best.items()):
            speedup = j1["wall_s"] / r["wall_s"] if j1 else None
            ideal = None
            if j1 and jobs > 1:
                # fixed costs are paid once, the adapters' work is split over the workers
                compute = max(j1["wall_s"] - base_fixed["wall_s"], 0.0)
                pred = base_fixed["wall_s"] + fixed[jobs]["spawn_pool_s"] + compute / jobs
                ideal = j1["wall_s"] / pred
            rows.append([n, jobs, f"{r['wall_s']:.2f}", f"{r['adapters_per_s']:.2f}",
                         f"x{speedup:.2f}" if speedup else "-",
                         f"x{ideal:.2f}" if ideal else "-",
                         f"{r['sum_adapter_s']:.2f}", f"{r['median_adapter_s']:.3f}",
                         f"{r['max_adapter_s']:.2f}", f"{r['cpu_s']:.2f}",
                         "-" if r["other_cpu_s"] is None else f"{r['other_cpu_s']:.2f}",
                         f"{r['converted']}/{n}"])
    print("(a) parallel speed: synthetic zoo, best of", repeats, "run(s) per setting")
    print(f"    adapter: Llama-like {LAYERS} layers x q,k,v,o, hidden {HIDDEN}, k/v {KV}, r {RANK}")
    print(table(rows, ["adapters", "jobs", "wall s", "adapters/s", "speed-up",
                       "fixed-cost bound", "sum adapter s", "median adapter s",
                       "max adapter s", "CPU s", "others' CPU s", "converted"]))
    print(f"fixed costs: interpreter + import mosconv/torch {base_fixed['wall_s']:.2f} s"
          + "".join(f"; spawn pool of {j} (start + import in workers) {c['spawn_pool_s']:.2f} s"
                    for j, c in fixed.items()))
    cap.append(parallel_capacity())
    print("'fixed-cost bound': the speed-up left if the jobs-1 adapter work divided perfectly "
          "over the workers and only the fixed costs were added.  A worker's first adapter also "
          "pays its first scikit-learn import (the 'max adapter s' column).")
    print("parallel capacity (a fixed one-thread workload: 2 x time alone / time of two at once; "
          "2.0 = two free cores): "
          + ", ".join(f"{c['capacity']:.2f}" for c in cap) + " (before, after)")
    print()
    return {"runs": results, "parallel_capacity": cap,
            "fixed_costs": {"interpreter_import_s": base_fixed["wall_s"],
                            **{f"spawn_pool_{j}_s": c["spawn_pool_s"] for j, c in fixed.items()}}}


# ---------------------------------------------------------------- (b) rerun, (c) shared


def bench_rerun(zoo: Path, out: Path, ratio: float, wait_idle: float) -> dict:
    cmd = CLI + ["batch", str(zoo), str(out), "--ratio", f"{ratio:g}", "--quiet"]
    first = timed(cmd, wait_idle)
    s1 = read_summary(out)["totals"]
    second = timed(cmd, wait_idle)
    s2 = read_summary(out)["totals"]
    floor = timed([sys.executable, "-c", "import mosconv.cli.commands, mosconv.batch"])
    ratio_ = second["wall_s"] / first["wall_s"]
    rows = [["first", f"{first['wall_s']:.2f}", s1["converted"], s1["skipped"], s1["failed"],
             first["rc"], f"{s1['seconds']:.3f}", f"{first['other_cpu_s'] or 0:.2f}"],
            ["second", f"{second['wall_s']:.2f}", s2["converted"], s2["skipped"], s2["failed"],
             second["rc"], f"{s2['seconds']:.3f}", f"{second['other_cpu_s'] or 0:.2f}"]]
    print("(b) rerun cost on the real zoo:", shown(cmd))
    print(table(rows, ["run", "wall s", "converted", "skipped", "failed", "exit",
                       "sum adapter s", "others' CPU s"]))
    print(f"second / first = {ratio_:.3f} ({'<' if ratio_ < 0.1 else '>='} 10%); "
          f"'python -c \"import mosconv.cli.commands, mosconv.batch.run\"' alone takes "
          f"{floor['wall_s']:.2f} s")
    if first["stderr"]:
        print("stderr of the first run:", first["stderr"])
    print()
    return {"command": shown(cmd), "first": {**first, "totals": s1},
            "second": {**second, "totals": s2}, "second_over_first": ratio_,
            "import_floor_s": floor["wall_s"]}


def _pair_numbers(rows: list[dict], out: Path) -> tuple[float, int]:
    """Energy-weighted relative error over ``rows`` and their params (own + pools once)."""
    energy = sum(r["energy"] for r in rows)
    err = math.sqrt(sum(r["energy"] * r["relative_error"] ** 2 for r in rows) / energy)
    params = sum(r["local_params"] for r in rows)
    pools = {r["group"] for r in rows if r["group"] and r["local_params"] != r["mos_params"]}
    for gid in pools:
        from mosconv.lora.read._io import read_safetensors_header

        f = out / "pools" / f"{gid}.safetensors"
        if f.is_file():
            header, _ = read_safetensors_header(f)
            params += sum(math.prod(int(d) for d in e["shape"]) for e in header.values())
    return err, params


def bench_shared(zoo: Path, indep_out: Path, shared_out: Path, ratio: float,
                 wait_idle: float) -> dict:
    from mosconv.fit.zoo import fit_group
    from mosconv.lora.read import read_adapter

    cmd = CLI + ["batch", str(zoo), str(shared_out), "--ratio", f"{ratio:g}", "--shared-pool",
                 "--quiet"]
    run = timed(cmd, wait_idle)
    first_summary = read_summary(shared_out)
    rerun = timed(cmd, wait_idle)
    rerun_totals = read_summary(shared_out)["totals"]
    shared = {a["name"]: a for a in first_summary["adapters"]}
    indep = {a["name"]: a for a in read_summary(indep_out)["adapters"]}
    rows, per_adapter, pair_rows, pairs = [], [], [], {}

    def f(x):
        return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

    for label, folder in PAIRS.items():
        names = sorted(n for n in shared if n.startswith(folder + "/"))
        for name in names:
            s, i = shared[name], indep.get(name, {})
            rows.append([name, f"{s['lora_params']:,}", f"{i.get('local_params') or 0:,}",
                         f"{s['local_params'] or 0:,}", f(i.get("relative_error")),
                         f(s["relative_error"]), f(s["truncation_relative_error"]),
                         s["status"], s["group"] or "-"])
            per_adapter.append({"name": name, "independent": i, "shared": s})
        if names and all(n in indep for n in names):
            e_in, p_in = _pair_numbers([indep[n] for n in names], indep_out)
            e_sh, p_sh = _pair_numbers([shared[n] for n in names], shared_out)
            pairs[label] = {"independent_relative_error": e_in, "independent_params": p_in,
                            "shared_relative_error": e_sh, "shared_params": p_sh}
            pair_rows.append([label, f"{p_in:,}", f"{p_sh:,}", f(e_in), f(e_sh)])
    t_sh = first_summary["totals"]
    t_in = read_summary(indep_out)["totals"]
    print("(c) shared vs independent on the real zoo:", shown(cmd))
    print(f"    first run {run['wall_s']:.2f} s (exit {run['rc']}), rerun {rerun['wall_s']:.2f} s "
          f"({rerun_totals['skipped']} of {rerun_totals['adapters']} skipped)")
    print(table(rows, ["adapter", "lora params", "own params indep", "own params shared",
                       "rel.err indep", "rel.err shared", "trunc.err (alone)", "status",
                       "group"]))
    print()
    print("per pair, from the two summary.json (params: own shards + the group's pool file "
          "once; errors energy-weighted over the pair):")
    print(table(pair_rows, ["pair", "params indep", "params shared", "rel.err indep",
                            "rel.err shared"]))
    print(f"zoo totals: independent params {t_in['mos_params']:,} rel.err "
          f"{t_in['relative_error']:.4f}; shared-pool run params {t_sh['mos_params']:,} "
          f"(incl. {t_sh['shared_pool_params']:,} in pools) rel.err {t_sh['relative_error']:.4f}")
    print()
    groups = {}
    grows = []
    for label, folder in PAIRS.items():
        paths = sorted(p.parent for p in (zoo / folder).glob("*/adapter_config.json"))
        if len(paths) < 2:
            continue
        adapters = [read_adapter(p) for p in paths]
        t0 = time.perf_counter()
        res = fit_group(adapters, ratio, 0)
        dt = time.perf_counter() - t0
        t = asdict(res.totals)
        groups[label] = {"adapters": [str(p.relative_to(zoo)) for p in paths], "seconds": dt, **t}
        grows.append([label, len(paths), f"{t['lora_params']:,}", f"{t['budget']:,}",
                      f"{t['independent_params']:,}", f"{t['shared_params']:,}",
                      f"{t['independent_relative_error']:.4f}", f"{t['shared_relative_error']:.4f}",
                      t["mode"], f"{dt:.2f}"])
    print(f"group totals from mosconv.fit.zoo.fit_group(adapters, ratio={ratio:g}, seed=0):")
    print(table(grows, ["pair", "n", "lora params", "budget", "indep params", "shared params",
                        "indep rel.err", "shared rel.err", "mode", "s"]))
    print()
    return {"command": shown(cmd), "run": run, "rerun": {**rerun, "totals": rerun_totals},
            "per_adapter": per_adapter,
            "pairs": pairs, "groups": groups, "totals_independent": t_in,
            "totals_shared": t_sh}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(ROOT / ".." / "shared" / "zoo"), help="the real zoo")
    ap.add_argument("--counts", type=int, nargs="+", default=[16, 32],
                    help="synthetic zoo sizes for (a)")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="runs per (count, jobs); best is shown")
    ap.add_argument("--ratio", type=float, default=8.0, help="ratio for (b) and (c)")
    ap.add_argument("--wait-idle", type=float, default=30.0,
                    help="before each (a) run, wait up to this many seconds for other processes "
                         "to leave the CPUs idle (0: do not wait)")
    ap.add_argument("--skip-speed", action="store_true", help="skip (a)")
    ap.add_argument("--workdir", help="keep the temporary folders here (default: a temp folder)")
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    args = ap.parse_args()

    print("machine:", machine_line())
    print()
    result = {"machine": machine_line(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__}
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="batch_speed_")
        work = Path(tmp.name)
    try:
        if not args.skip_speed:
            result["speed"] = bench_jobs(work, args.counts, args.jobs, args.repeats,
                                         args.wait_idle)
        zoo = Path(args.zoo)
        if not zoo.is_dir():
            print(f"(b), (c): real zoo {zoo} not found, skipped")
        else:
            indep_out, shared_out = work / "real_independent", work / "real_shared"
            for p in (indep_out, shared_out):
                shutil.rmtree(p, ignore_errors=True)
            result["rerun"] = bench_rerun(zoo, indep_out, args.ratio, args.wait_idle)
            result["shared"] = bench_shared(zoo, indep_out, shared_out, args.ratio,
                                            args.wait_idle)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("machine:", machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
