"""Whether columns on some of their shards would pay beyond the remainder, on the zoo pairs.

    python examples/benchmarks/shard_exchange.py [--zoo ../shared/zoo] [--ratio 8] [--json out.json]

The joint fit spends what its plan leaves (less than a whole column) on one column of some of
its shards (docs/batch.md, "the remainder").  Could shards pay elsewhere too: a plan that keeps
only some shards of a module's last column and spends the parameters freed on partial columns
of other modules?  On the fit's own plan and refined bases (``batch --shared-pool``), for both
sides of every joint module, shards at least 32 wide (as the remainder):

* **add**: what a column of ``n`` of its ``nc`` shards would keep, per parameter, for every
  ``n`` (:func:`mosconv.fit.joint.partial_column`);
* **drop**: what the module's last column loses, per parameter freed, when only ``n`` of its
  shards are kept (the best column on ``n`` shards against the bases without it).

The exchange pays only if some add keeps more per parameter than some drop loses.  The
greedy exchange below (best adds first, paid by the cheapest drops, one of each per module
side) is optimistic: it leaves out the cores' growth and the zero shards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from zoo_joint import machine_line, read_pairs

from mosconv.fit import zoo
from mosconv.fit.joint import outside, partial_column

F64 = torch.float64
MIN_WIDTH = 32


def shard_count(d_in: int, d_out: int) -> int:
    """The most shards per row with both widths at least ``MIN_WIDTH``."""
    g = math.gcd(d_in, d_out)
    return max(n for n in range(1, g + 1) if g % n == 0 and min(d_in, d_out) // n >= MIN_WIDTH)


def exchange(setup, plans, fitted) -> dict:
    adds, drops = [], []
    for p in plans:
        if p.mode != "joint" or p.subsets:
            continue
        d_in, d_out = setup.spec[1][p.name]
        nc = shard_count(d_in, d_out)
        if nc < 2:
            continue
        f = fitted[p.name]
        for side, d, k in (("U", d_out, p.k_U), ("V", d_in, p.k_V)):
            w = d // nc
            Q = f.U if side == "U" else f.V
            X = outside(setup.parts[p.name], f.U, f.V, side)
            for n in range(1, nc):
                pc = partial_column(X, Q, side, [(nc, n)])
                if pc is not None:
                    adds.append((pc.gain / (n * w), pc.gain, n * w, p.name, side))
            if k > 1:
                Qm = Q[:, :k - 1]
                Um, Vm = (Qm, f.V) if side == "U" else (f.U, Qm)
                Xm = outside(setup.parts[p.name], Um, Vm, side)
                full = float(torch.linalg.matrix_norm(Xm, ord=2) ** 2)
                for n in range(1, nc):
                    pc = partial_column(Xm, Qm, side, [(nc, n)])
                    loss = full - (pc.gain if pc is not None else 0.0)
                    drops.append((loss / ((nc - n) * w), loss, (nc - n) * w, p.name, side))
    adds.sort(key=lambda a: -a[0])
    drops.sort(key=lambda a: a[0])
    freed, gained, lost, used, di = 0, 0.0, 0.0, set(), 0  # beyond the remainder
    for rate, gain, cost, name, side in adds:
        if (name, side) in used:
            continue
        while freed < cost and di < len(drops):
            rl, loss, cl, dn, ds = drops[di]
            di += 1
            if (dn, ds) in used:
                continue
            if rl >= rate:
                di = len(drops)
                break
            used.add((dn, ds))
            freed, lost = freed + cl, lost + loss
        if freed < cost:
            break
        used.add((name, side))
        freed, gained = freed - cost, gained + gain
    return {"best_add_per_param": adds[0][0] if adds else 0.0,
            "cheapest_drop_per_param": drops[0][0] if drops else None,
            "exchange_gain": gained - lost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = machine_line()
    print(f"machine: {machine}\n")
    seen: dict = {}
    remainder = zoo._remainder

    def spy(setup, plans, fitted, left, storage, infos):  # the plan the remainder starts from
        seen.update(setup=setup, plans=plans, fitted=fitted, left=left)
        return remainder(setup, plans, fitted, left, storage, infos)

    zoo._remainder = spy
    rows = []
    print("pair | ratio | joint fit | budget left | best add / cheapest drop (energy per "
          "parameter, of the pair's) | optimistic exchange: squared error change")
    for project, adapters, facts in read_pairs(args.zoo):
        res = zoo.fit_group(adapters, args.ratio, factorizations=facts)
        energy = sum(float((f.S.to(F64) ** 2).sum()) for fa in facts for f in fa.values())
        ex = exchange(seen["setup"], seen["plans"], seen["fitted"])
        err = res.totals.shared_relative_error
        row = {"pair": project, "ratio": args.ratio, "joint_fit": err, "left": seen["left"],
               "best_add_per_param": ex["best_add_per_param"] / energy,
               "cheapest_drop_per_param": (None if ex["cheapest_drop_per_param"] is None
                                           else ex["cheapest_drop_per_param"] / energy),
               "exchange_relative_change": -ex["exchange_gain"] / (err ** 2 * energy)}
        rows.append(row)
        drop = row["cheapest_drop_per_param"]
        print(f"{project} | {args.ratio:g} | {err:.5f} | {row['left']:,} | "
              f"{row['best_add_per_param']:.3e} / "
              f"{'-' if drop is None else f'{drop:.3e}'} | "
              f"{row['exchange_relative_change']:+.4%}")
    zoo._remainder = remainder
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "pairs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
