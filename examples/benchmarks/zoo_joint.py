"""Zoos fitted jointly: independent conversion, the shared pools of mosconv 0.x (shared A rows
only), the plain joint basis and the joint fit (`batch --shared-pool` now), side by side in one
run.

    python examples/benchmarks/zoo_joint.py [--zoo ../shared/zoo] [--json out.json]
        [--parts abcd] [--seed-scheme cycle|half]

(a) The related pairs of ../shared/zoo at total ratio 8 and 16: energy-weighted relative error of
    dW over both adapters and the parameters used (pool file once + both adapters' own).
(b) A synthetic zoo (examples/synthetic_zoo.py: two init seeds, a shared output subspace plus
    adapter-specific parts) of N = 4, 8, 16, 32 adapters: at ratio 8 the errors; then the
    largest ratio at which the joint fit is still as good as converting each adapter alone at
    ratio 8, and what one adapter costs there (its own params, and with its share of the pools).
    At ratio 8 also the joint fit without re-routing (every member's core spanning all of a
    module's basis columns), and the own params per adapter both ways. ``--seed-scheme half``
    builds the zoo with half its adapters sharing one init seed and the others each their own.
(c) Time to fit a group of 8 adapters of ~1M LoRA parameters each (fit_group, this machine),
    without re-routing and the remainder (the baseline), with re-routing, and with both (the
    default), as ratios; each the best of two runs.
(d) Adapters joining a fitted group (what `batch --shared-pool` does when a zoo gains
    adapters: fit_new_members): the synthetic zoo's first 8 adapters fitted, 4 more added
    against their pools; each newcomer's error with private residuals (now), without them
    (parts against the bases or own truncation only, as before; a newcomer then worse off
    than alone is converted alone) and converted alone.

"Plain joint basis" is issue 12's starting point (square cores, greedy ranks; see
plain_joint_basis). "Shared pools of 0.x" is recomputed here from its definition: per module name the top right
singular vectors of the stacked updates are shared A rows, each adapter keeps ``B_i = dW_i Q``;
directions compete for the group budget by energy per parameter. All numbers are measured on
the adapters' exact factorizations; the joint fit's are measured on its stored float32 tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from synthetic_zoo import write_zoo

from mosconv import factorize_adapter, read_adapter
from mosconv.fit import zoo
from mosconv.fit.joint import joint_basis
from mosconv.fit.truncation import allocate, budget_for_ratio
from mosconv.fit.zoo import fit_group, fit_new_members

PAIRS = {"gemma3-270m-svg-x3": ("curriculum_stage1", "final"),
         "opt-125m-lora-ckpts": ("checkpoint-10", "final")}


def old_shared_pools(adapters, facts, ratio: float) -> tuple[float, int]:
    """(relative error, params) of mosconv 0.x's shared A rows at the group budget."""
    budget = budget_for_ratio(sum(a.params for a in adapters), ratio)
    names = [m.name for m in adapters[0].modules]
    gains, costs, energy = {}, {}, 0.0
    for n in names:
        b = joint_basis([fa[n] for fa in facts])
        gains[n], energy = b.gain_V, energy + b.energy
        m = adapters[0].module(n)
        costs[n] = m.d_in + len(adapters) * m.d_out
    ks = allocate(gains, costs, budget)
    err = energy - sum(float(gains[n][:ks[n]].sum()) for n in names)
    return math.sqrt(max(err, 0.0) / energy), sum(ks[n] * costs[n] for n in names)


def plain_joint_basis(adapters, facts, ratio: float) -> tuple[float, int]:
    """(relative error, params) of the plain joint basis at the group budget, as issue 12
    defines it: per module name the top-k left singular vectors of the updates side by side
    and the top-k right ones of them stacked, a k x k core per adapter (``k (d_out + d_in)``
    once plus ``n k^2``), k chosen per module by a global greedy on error decrease per
    parameter."""
    budget = budget_for_ratio(sum(a.params for a in adapters), ratio)
    n, names = len(adapters), [m.name for m in adapters[0].modules]
    bases = {m: joint_basis([fa[m] for fa in facts]) for m in names}
    width = {m.name: m.d_in + m.d_out for m in adapters[0].modules}
    k = dict.fromkeys(names, 0)
    left, kept = budget, 0.0

    def step(m: str) -> tuple[float, float, int] | None:
        b, j = bases[m], k[m]
        if j + 1 >= min(b.kept.shape):
            return None
        gain = float(b.kept[j + 1, j + 1] - b.kept[j, j])
        cost = width[m] + n * (2 * j + 1)
        return (gain / cost, gain, cost) if gain > 0 and cost <= left else None

    while True:
        moves = [(s, m) for m in names if (s := step(m)) is not None]
        if not moves:
            break
        (_, gain, cost), m = max(moves, key=lambda x: x[0][0])
        k[m] += 1
        left -= cost
        kept += gain
    energy = sum(b.energy for b in bases.values())
    return math.sqrt(max(energy - kept, 0.0) / energy), budget - left


def read_pairs(zoo: Path):
    """``(project, adapters, factorizations)`` of each pair found in ``zoo``."""
    for project, names in PAIRS.items():
        paths = [zoo / project / n for n in names]
        if not all(p.exists() for p in paths):
            print(f"{project}: not in {zoo}, skipped")
            continue
        adapters = [read_adapter(p) for p in paths]
        yield project, adapters, [factorize_adapter(a) for a in adapters]


def pairs(zoo: Path, ratios: list[float]) -> list[dict]:
    rows = []
    for project, adapters, facts in read_pairs(zoo):
        for ratio in ratios:
            old_err, old_params = old_shared_pools(adapters, facts, ratio)
            plain_err, plain_params = plain_joint_basis(adapters, facts, ratio)
            res = fit_group(adapters, ratio, factorizations=facts)
            t = res.totals
            rows.append({"pair": project, "ratio": ratio, "budget": t.budget,
                         "independent": t.independent_relative_error,
                         "independent_params": t.independent_params,
                         "old_shared_pools": old_err, "old_params": old_params,
                         "plain_joint_basis": plain_err, "plain_params": plain_params,
                         "joint": t.shared_relative_error, "joint_params": t.shared_params,
                         "mode": res.mode, "joint_modules": f"{t.joint_modules}/{t.modules}",
                         "per_adapter": [r.totals.relative_error for r in res.reports],
                         "per_adapter_alone": [r.totals.truncation_relative_error
                                               for r in res.reports]})
    return rows


def synthetic(ns: list[int], seed_scheme: str = "cycle") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_zoo(Path(tmp), max(ns), seed_scheme=seed_scheme)
        adapters = [read_adapter(p) for p in paths]
    facts = [factorize_adapter(a) for a in adapters]
    for n in ns:
        ads, fa = adapters[:n], facts[:n]
        with rerouting(False):
            dense = fit_group(ads, 8.0, factorizations=fa)
        res = fit_group(ads, 8.0, factorizations=fa)
        t = res.totals
        target = t.independent_relative_error
        lo, hi = 8.0, 256.0  # the largest ratio whose joint error is still <= target
        best = res
        for _ in range(10):
            mid = math.sqrt(lo * hi)
            r = fit_group(ads, mid, factorizations=fa)
            if r.mode == "shared" and r.totals.shared_relative_error <= target:
                lo, best = mid, r
            else:
                hi = mid
        own = sum(m.local_params for m in best.adapters) / n
        pool = best.totals.pool_params or 0
        rows.append({"n": n, "lora_params_per_adapter": ads[0].params,
                     "independent": target, "joint": t.shared_relative_error,
                     "joint_without_rerouting": dense.totals.shared_relative_error,
                     "own_params_per_adapter_at_ratio": t.local_params / n,
                     "own_params_per_adapter_at_ratio_without_rerouting":
                         dense.totals.local_params / n,
                     "mode": res.mode, "equal_error_ratio": lo,
                     "own_params_per_adapter": own, "pool_params": pool,
                     "params_per_adapter_with_pool_share": own + pool / n})
    return rows


def newcomers(ratios: list[float], fitted: int = 8, added: int = 4) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [read_adapter(p) for p in write_zoo(Path(tmp), fitted + added)]
    facts = [factorize_adapter(a) for a in adapters]
    rows = []
    for ratio in ratios:
        res = fit_group(adapters[:fitted], ratio, factorizations=facts[:fitted])
        new, fa = adapters[fitted:], facts[fitted:]
        mos, with_res = fit_new_members(res.adapters, new, ratio, factorizations=fa)
        _, without = fit_new_members(res.adapters, new, ratio, factorizations=fa,
                                     residuals=False)
        rows.append({"ratio": ratio, "fitted": fitted, "mode": res.mode,
                     "with_residuals": [r.totals.relative_error for r in with_res],
                     "without_residuals": [r.totals.relative_error for r in without],
                     "alone": [r.totals.truncation_relative_error for r in with_res],
                     "own_params": [m.local_params for m in mos],
                     "budget_per_adapter": [a.params // int(ratio) for a in new]})
    return rows


@contextmanager
def rerouting(on: bool):
    """Re-routing on (the default) or off (``ROUTE_STEPS`` empty) within the block."""
    steps = zoo.ROUTE_STEPS
    zoo.ROUTE_STEPS = steps if on else ()
    try:
        yield
    finally:
        zoo.ROUTE_STEPS = steps


@contextmanager
def remainder(on: bool):
    """The remainder's partial column on (the default) or off within the block."""
    width = zoo.REMAINDER_MIN_WIDTH
    zoo.REMAINDER_MIN_WIDTH = width if on else 1 << 30
    try:
        yield
    finally:
        zoo.REMAINDER_MIN_WIDTH = width


def speed(repeats: int = 2) -> dict:
    """The group fit of 8 adapters x ~1M params: re-routing and the remainder off (the
    baseline), re-routing on, then both on (the default); each the best of ``repeats``."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_zoo(Path(tmp), 8, d=1024, d_kv=1024, r=16, layers=16)
        adapters = [read_adapter(p) for p in paths]
    out = {"adapters": 8, "lora_params_per_adapter": adapters[0].params}
    for key, route, rest in (("_without_rerouting", False, False),
                             ("_without_remainder", True, False), ("", True, True)):
        with rerouting(route), remainder(rest):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = fit_group(adapters, 8.0)
                times.append(time.perf_counter() - t0)
            out[f"seconds{key}"] = min(times)
            out[f"joint{key}"] = res.totals.shared_relative_error
    out.update(mode=res.mode, independent=res.totals.independent_relative_error)
    return out


def print_pairs(rows: list[dict]) -> None:
    print("(a) pairs: relative error (params)")
    print("pair | ratio | independent | shared pools 0.x | plain joint basis | joint | joint modules | "
          "per adapter joint / alone")
    for r in rows:
        per = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(r["per_adapter"], r["per_adapter_alone"]))
        print(f"{r['pair']} | {r['ratio']:g} | {r['independent']:.4f} ({r['independent_params']:,}) | "
              f"{r['old_shared_pools']:.4f} ({r['old_params']:,}) | "
              f"{r['plain_joint_basis']:.4f} ({r['plain_params']:,}) | {r['joint']:.4f} "
              f"({r['joint_params']:,}) | {r['joint_modules']} | {per}")


def print_synthetic(rows: list[dict]) -> None:
    print("\n(b) synthetic zoo at ratio 8, and at the largest ratio matching independent's error")
    print("N | independent | joint (without re-routing) | own params/adapter at ratio 8 (without) | "
          "equal-error ratio | own params/adapter there | pool | per adapter incl. pool share")
    for r in rows:
        print(f"{r['n']} | {r['independent']:.4f} | {r['joint']:.4f} "
              f"({r['joint_without_rerouting']:.4f}) | {r['own_params_per_adapter_at_ratio']:,.0f} "
              f"({r['own_params_per_adapter_at_ratio_without_rerouting']:,.0f}) | "
              f"{r['equal_error_ratio']:.1f} | "
              f"{r['own_params_per_adapter']:,.0f} | {r['pool_params']:,} | "
              f"{r['params_per_adapter_with_pool_share']:,.0f} (LoRA {r['lora_params_per_adapter']:,})")


def print_speed(s: dict) -> None:
    base = s["seconds_without_rerouting"]
    print(f"\n(c) fit_group of {s['adapters']} adapters x {s['lora_params_per_adapter']:,} LoRA "
          f"params, best of 2: {s['seconds']:.1f} s (x{s['seconds'] / base:.2f} the {base:.1f} s "
          f"without re-routing and remainder, x{s['seconds'] / s['seconds_without_remainder']:.2f}"
          f" the {s['seconds_without_remainder']:.1f} s without the remainder); mode "
          f"{s['mode']}, joint {s['joint']:.5f}, without the remainder "
          f"{s['joint_without_remainder']:.5f}, without both {s['joint_without_rerouting']:.5f}, "
          f"independent {s['independent']:.4f}")


def print_newcomers(rows: list[dict]) -> None:
    print("\n(d) 4 adapters added to a group fitted on 8 (synthetic zoo): relative error each")
    print("ratio | with private residuals | without | alone")
    for r in rows:
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)
        print(f"{r['ratio']:g} | {fmt(r['with_residuals'])} | {fmt(r['without_residuals'])} | "
              f"{fmt(r['alone'])}")


def machine_line() -> str:
    """The machine the pair benchmarks ran on, as they print and record it."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 16])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--parts", default="abcd", help="which of (a)-(d) to run, e.g. 'b'")
    ap.add_argument("--seed-scheme", choices=("cycle", "half"), default="cycle",
                    help="the synthetic zoo's init seeds (see examples/synthetic_zoo.py)")
    args = ap.parse_args()
    machine = machine_line()
    print(f"machine: {machine}\n")
    out = {"machine": machine, "seed_scheme": args.seed_scheme}
    if "a" in args.parts:
        out["pairs"] = pairs(args.zoo, args.ratios)
        print_pairs(out["pairs"])
    if "b" in args.parts:
        out["synthetic"] = synthetic(args.n, args.seed_scheme)
        print_synthetic(out["synthetic"])
    if "c" in args.parts:
        out["speed"] = speed()
        print_speed(out["speed"])
    if "d" in args.parts:
        out["newcomers"] = newcomers(args.ratios)
        print_newcomers(out["newcomers"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
