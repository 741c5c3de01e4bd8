"""How low any per-module form can take the zoo pairs, next to the joint fit, in one run.

    python examples/benchmarks/pair_bounds.py [--zoo ../shared/zoo] [--json out.json]

Issue 12 asks for <= 0.63 (gemma3) and <= 0.50 (opt) at total ratio 8, below 0.78 and 0.68 at
ratio 16 (energy-weighted relative error of dW over both adapters of a pair, parameters within
the independent budget). This prints, per pair and ratio:

* **joint fit**: `fit_group` (what `batch --shared-pool` writes), measured on its stored tensors.
* **bound, cores free**: a lower bound for every form in which each adapter's approximation of
  a module lies in the span of that module's stored vectors (``a`` output vectors of
  ``d_out`` and ``b`` input vectors of ``d_in``, ``a d_out + b d_in`` parameters): joint bases
  with cores (refined or re-routed), one-sided bases, tied rows, private triplets, private
  residuals, any mix of them per module. Its cores, however many, cost nothing here. Two
  adapters keep at most ``min(top-a energy of [dW_1 dW_2], top-b energy of [dW_1; dW_2])`` of a
  module, and the best split of the budget over the modules (exact, by dynamic programming in
  units of the gcd of the widths) gives the bound. Forms that share vectors across modules
  are not covered (bases shared by all layers of a kind were measured: docs/batch.md).
* **the same, one column free**: that bound where one module gets one more vector on a side
  for nothing: it bounds every form above plus one partial column (the fit spends what a
  whole column no longer fits in on a column of some of its shards, which keeps at most
  what a whole column keeps, :func:`mosconv.fit.joint.partial_column`).  The bound before
  it covers whole vectors only.
* **plain Tucker, cores free**: the same with the kept energy of the plain joint bases (what
  the fit's bases keep, to 1e-4 after refinement), again with free cores.
* Where every width is one column size ``w`` (opt: 768 in and out) and the budget is a whole
  number of columns: a plan that holds any core leaves at least one column unspent, so it
  is bounded by the free-core plans one column smaller (on the rigorous bound, on the plain
  joint bases, and on bases refined by alternating least squares at every pair of ranks, ten
  rounds each); a plan without cores (tied rows, private triplets, one-sided bases, tied rows
  plus private residuals per adapter) is computed exactly at the full budget.

The bounds count parameters, not bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import reduce
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from zoo_joint import machine_line, read_pairs

from mosconv.fit.joint import joint_basis, refine
from mosconv.fit.truncation import budget_for_ratio
from mosconv.fit.zoo import fit_group

F64 = torch.float64
TARGETS = {("gemma3-270m-svg-x3", 8): "<= 0.63", ("opt-125m-lora-ckpts", 8): "<= 0.50",
           ("gemma3-270m-svg-x3", 16): "< 0.78", ("opt-125m-lora-ckpts", 16): "< 0.68"}


def frontier(options: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The options no cheaper one beats (cost, squared error), by cost."""
    out, best = [], math.inf
    for c, e in sorted(options):
        if e < best:
            out.append((c, e))
            best = e
    return out


def best_split(menus: list[list[tuple[int, float]]], budget: int, unit: int) -> float:
    """Least total squared error, one option per module, costs summing to <= budget (exact:
    every cost is a multiple of ``unit``)."""
    size = budget // unit + 1
    best = torch.zeros(size, dtype=F64)
    for menu in menus:
        new = torch.full((size,), math.inf, dtype=F64)
        for c, e in menu:
            u = c // unit
            if u < size:
                new[u:] = torch.minimum(new[u:], best[:size - u] + e)
        best = new
    return float(best[-1])


def best_split_one_free(menus: list[list[tuple[int, float]]],
                        free: list[list[tuple[int, float]]], budget: int, unit: int) -> float:
    """:func:`best_split` where one module may take its option from ``free`` instead (the
    same cost with one more vector on a side, for nothing)."""
    size = budget // unit + 1
    best = torch.zeros(size, dtype=F64)
    used = torch.full((size,), math.inf, dtype=F64)

    def step(prev: torch.Tensor, menu: list[tuple[int, float]], new: torch.Tensor) -> None:
        for c, e in menu:
            u = c // unit
            if u < size:
                new[u:] = torch.minimum(new[u:], prev[:size - u] + e)

    for menu, menu_free in zip(menus, free):
        new, new_used = torch.full((size,), math.inf, dtype=F64), torch.full((size,), math.inf,
                                                                            dtype=F64)
        step(best, menu, new)
        step(used, menu, new_used)
        step(best, menu_free, new_used)
        best, used = new, new_used
    return float(torch.minimum(best, used)[-1])


def dense(f) -> torch.Tensor:
    return (f.U.to(F64) * f.S.to(F64)[None, :]) @ f.V.to(F64).T


def module_menus(adapters, facts, refined: bool
                 ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per module: the rigorous free-core options, the plain-Tucker free-core ones (and, with
    ``refined``, those on bases refined at every pair of ranks) and the core-free ones (tied
    rows, private triplets, one-sided bases, tied + private residuals)."""
    out = {}
    for m in adapters[0].modules:
        fs = [fa[m.name] for fa in facts]
        b = joint_basis(fs)
        zero = torch.zeros(1, dtype=F64)
        cu, cv = torch.cat([zero, b.gain_U.cumsum(0)]), torch.cat([zero, b.gain_V.cumsum(0)])
        w = m.d_in + m.d_out
        spectra = sorted((float(x) for f in fs for x in f.S.to(F64) ** 2), reverse=True)
        private = [(t * w, b.energy - sum(spectra[:t])) for t in range(len(spectra) + 1)]
        rigorous, plain, tucker = list(private), list(private), list(private)
        one_free = []  # one more vector on a side for nothing (what a partial column adds)
        for a in range(cu.numel()):
            for c in range(cv.numel()):
                cost = a * m.d_out + c * m.d_in
                kept = max(float(min(cu[min(a + 1, cu.numel() - 1)], cv[c])),
                           float(min(cu[a], cv[min(c + 1, cv.numel() - 1)])))
                one_free.append((cost, b.energy - kept))
        for a in range(1, cu.numel()):
            for c in range(1, cv.numel()):
                cost = a * m.d_out + c * m.d_in
                rigorous.append((cost, b.energy - float(min(cu[a], cv[c]))))
                plain.append((cost, b.energy - float(b.kept[a, c])))
                if refined:
                    kept = max(refine(fs, b.U[:, :a], b.V[:, :c], 10)[2], float(b.kept[a, c]))
                    tucker.append((cost, b.energy - kept))
        free = list(private)
        free += [(k * (m.d_in + len(fs) * m.d_out), b.energy - float(cv[k]))
                 for k in range(1, cv.numel())]
        free += [(k * (m.d_out + len(fs) * m.d_in), b.energy - float(cu[k]))
                 for k in range(1, cu.numel())]
        Ws = [dense(f) for f in fs]
        mean = sum(Ws) / len(Ws)
        u, s, vt = torch.linalg.svd(mean, full_matrices=False)
        for ks in range(1, min(s.numel(), cu.numel())):
            X = (u[:, :ks] * s[:ks]) @ vt[:ks]
            left = [W - X for W in Ws]
            err = float(sum((r ** 2).sum() for r in left))
            free.append((ks * w, err))  # tied rows
            gains = sorted((float(x) for r in left
                            for x in torch.linalg.svdvals(r)[:cu.numel()] ** 2), reverse=True)
            for t, g in enumerate(gains, 1):  # plus private residuals, best first
                err -= g
                free.append(((ks + t) * w, err))
        out[m.name] = {"rigorous": frontier(rigorous), "one_free": frontier(one_free + rigorous),
                       "plain": frontier(plain),
                       "refined": frontier(tucker), "core_free": frontier(free)}
    return out


def pair_rows(zoo: Path, ratios: list[float]) -> list[dict]:
    rows = []
    for project, adapters, facts in read_pairs(zoo):
        widths = {x for m in adapters[0].modules for x in (m.d_in, m.d_out)}
        menus = module_menus(adapters, facts, refined=len(widths) == 1)
        energy = sum(float((f.S.to(F64) ** 2).sum()) for fa in facts for f in fa.values())
        unit = reduce(math.gcd, widths)

        def rel(err: float, energy: float = energy) -> float:
            return math.sqrt(max(err, 0.0) / energy)

        for ratio in ratios:
            budget = budget_for_ratio(sum(a.params for a in adapters), ratio)
            res = fit_group(adapters, ratio, factorizations=facts)
            row = {"pair": project, "ratio": ratio, "budget": budget,
                   "target": TARGETS.get((project, int(ratio)), ""),
                   "joint_fit": res.totals.shared_relative_error,
                   "joint_fit_params": res.totals.shared_params,
                   "bound_cores_free": rel(best_split(
                       [v["rigorous"] for v in menus.values()], budget, unit)),
                   "bound_one_column_free": rel(best_split_one_free(
                       [v["rigorous"] for v in menus.values()],
                       [v["one_free"] for v in menus.values()], budget, unit)),
                   "plain_tucker_cores_free": rel(best_split(
                       [v["plain"] for v in menus.values()], budget, unit))}
            if len(widths) == 1 and budget % unit == 0:
                row["column"] = unit
                row["with_cores_bound"] = rel(best_split(
                    [v["rigorous"] for v in menus.values()], budget - unit, unit))
                row["with_cores_plain_tucker"] = rel(best_split(
                    [v["plain"] for v in menus.values()], budget - unit, unit))
                row["with_cores_refined_tucker"] = rel(best_split(
                    [v["refined"] for v in menus.values()], budget - unit, unit))
                row["core_free_exact"] = rel(best_split(
                    [v["core_free"] for v in menus.values()], budget, unit))
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 16])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = machine_line()
    print(f"machine: {machine}\n")
    rows = pair_rows(args.zoo, args.ratios)
    print("pair | ratio | issue 12 | joint fit (params) | bound, cores free | the same, one "
          "column free | plain Tucker, "
          "cores free | plans with a core: bound / plain / refined Tucker | plans without: exact")
    for r in rows:
        extra = (f"{r['with_cores_bound']:.5f} / {r['with_cores_plain_tucker']:.5f} / "
                 f"{r['with_cores_refined_tucker']:.5f} | {r['core_free_exact']:.5f}"
                 if "column" in r else "- | -")
        print(f"{r['pair']} | {r['ratio']:g} | {r['target']} | {r['joint_fit']:.5f} "
              f"({r['joint_fit_params']:,}) | {r['bound_cores_free']:.5f} | "
              f"{r['bound_one_column_free']:.5f} | "
              f"{r['plain_tucker_cores_free']:.5f} | {extra}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "pairs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
