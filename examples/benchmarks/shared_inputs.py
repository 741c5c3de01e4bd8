"""Do the modules of one layer that read the same input gain from sharing input vectors?

    python examples/benchmarks/shared_inputs.py [--zoo ../shared/zoo] [--ratios 8]
                                                [--rounds 5] [--json out.json]

q_proj, k_proj and v_proj of a layer read the same hidden state, so their updates' input
(row) spaces may overlap, and a form in which they route to one pool of input vectors would
pay for those vectors once. Per pair of the zoo and ratio this prints:

* how much the row spaces overlap: the cosines of the principal angles between the two
  adapters' stacked ``A`` rows of two modules of a layer (largest, median over layers);
* **separate**: the best split of the budget over modules, each with its own joint bases
  (``a`` output and ``c`` input vectors, cores ``2 a c`` counted, the kept energy of the plain
  joint bases), exact by dynamic programming;
* **with shared inputs**: the same, where the modules of a layer that read one input (two or
  all of them) may instead share ``b`` input vectors, each keeping its own output vectors and
  cores (``b d_in + sum a_m d_out + 2 sum a_m b``): the shared vectors from the SVD of the
  modules' updates stacked, then ``--rounds`` rounds of alternating least squares (output
  vectors per module, then the shared input vectors) for each number of output vectors.

Both count parameters, not bytes; neither is a bound (shared vectors found otherwise could do
better), they compare the two forms on equal terms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pair_bounds import best_split, dense, frontier
from zoo_joint import machine_line, read_pairs

from mosconv.fit.joint import joint_basis
from mosconv.fit.truncation import budget_for_ratio

F64 = torch.float64
MAX_SHARED = 4  # shared input vectors tried per group (the fits keep 0-2 vectors a module)
MAX_OUT = 2  # output vectors per module on shared inputs


def combine(a: list[tuple[int, float]], b: list[tuple[int, float]], cap: int
            ) -> list[tuple[int, float]]:
    """The frontier of every option of ``a`` with every option of ``b``."""
    return frontier([(ca + cb, ea + eb) for ca, ea in a for cb, eb in b if ca + cb <= cap])


def separate_menu(fs, d_out: int, d_in: int) -> list[tuple[int, float]]:
    b = joint_basis(fs)
    opts = [(0, b.energy)]
    for a in range(1, b.kept.shape[0]):
        for c in range(1, b.kept.shape[1]):
            opts.append((a * d_out + c * d_in + 2 * a * c, b.energy - float(b.kept[a, c])))
    return frontier(opts)


def shared_options(Ws: dict[str, list[torch.Tensor]], names: tuple[str, ...], d_in: int,
                   d_out: dict[str, int], rounds: int, cap: int) -> list[tuple[int, float]]:
    """Options of the modules ``names`` on ``b`` shared input vectors."""
    _, _, vt = torch.linalg.svd(torch.cat([W for n in names for W in Ws[n]]),
                                full_matrices=False)
    out = []
    for b in range(1, MAX_SHARED + 1):
        for a_max in range(1, MAX_OUT + 1):
            V = vt[:b].T
            for _ in range(rounds):  # output vectors per module, then the shared inputs
                G = torch.zeros(V.shape[0], V.shape[0], dtype=F64)
                for n in names:
                    U = torch.linalg.svd(torch.cat([W @ V for W in Ws[n]], 1),
                                         full_matrices=False)[0][:, :a_max]
                    for W in Ws[n]:
                        P = U.T @ W
                        G += P.T @ P
                V = torch.linalg.eigh(G)[1][:, -b:]
            menu = [(b * d_in, 0.0)]
            for n in names:
                energy = sum(float((W ** 2).sum()) for W in Ws[n])
                s = torch.linalg.svdvals(torch.cat([W @ V for W in Ws[n]], 1)) ** 2
                kept = torch.cat([torch.zeros(1, dtype=F64), s.cumsum(0)])
                menu = combine(menu, [(a * (d_out[n] + 2 * b), energy - float(kept[a]))
                                      for a in range(min(a_max + 1, kept.numel()))], cap)
            out += menu
    return out


def overlaps(adapters, groups) -> dict[str, list[float]]:
    """Largest principal cosine between two modules' stacked A rows, per pair of module
    names and layer."""
    mods = [{m.name: m for m in a.modules} for a in adapters]
    out: dict[str, list[float]] = {}
    for names in groups:
        bases = {n: torch.linalg.qr(torch.cat([m[n].A for m in mods]).T.to(F64))[0]
                 for n in names}
        for x, y in itertools.combinations(names, 2):
            key = f"{x.rsplit('.', 1)[1]}-{y.rsplit('.', 1)[1]}"
            out.setdefault(key, []).append(float(torch.linalg.svdvals(bases[x].T @ bases[y])[0]))
    return out


def pair_rows(zoo: Path, ratios: list[float], rounds: int) -> list[dict]:
    rows = []
    for project, adapters, facts in read_pairs(zoo):
        energy = sum(float((f.S.to(F64) ** 2).sum()) for fa in facts for f in fa.values())
        mods = {m.name: m for m in adapters[0].modules}
        sep = {n: separate_menu([fa[n] for fa in facts], m.d_out, m.d_in)
               for n, m in mods.items()}
        Ws = {n: [dense(fa[n]).to(F64) for fa in facts] for n in mods}
        groups: dict[tuple[str, int], list[str]] = {}
        for n, m in mods.items():
            groups.setdefault((n.rsplit(".", 1)[0], m.d_in), []).append(n)
        multi = [tuple(v) for v in groups.values() if len(v) > 1]
        cos = overlaps(adapters, multi)
        for ratio in ratios:
            budget = budget_for_ratio(sum(a.params for a in adapters), ratio)
            menus = []
            for (_, d_in), names in groups.items():
                alone = [(0, 0.0)]
                for n in names:
                    alone = combine(alone, sep[n], budget)
                opts = list(alone)
                for k in range(2, len(names) + 1):
                    for subset in itertools.combinations(names, k):
                        rest = [(0, 0.0)]
                        for n in names:
                            if n not in subset:
                                rest = combine(rest, sep[n], budget)
                        opts += combine(shared_options(
                            Ws, subset, d_in, {n: mods[n].d_out for n in subset}, rounds,
                            budget), rest, budget)
                menus.append(frontier(opts))
            rows.append({
                "pair": project, "ratio": ratio, "budget": budget,
                "groups_sharing_an_input": len(multi),
                "largest_principal_cosine": {k: {"max": max(v), "median": sorted(v)[len(v) // 2]}
                                             for k, v in cos.items()},
                "separate": math.sqrt(best_split(list(sep.values()), budget, 2) / energy),
                "with_shared_inputs": math.sqrt(best_split(menus, budget, 2) / energy),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--ratios", type=float, nargs="+", default=[8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = machine_line()
    print(f"machine: {machine}\n")
    rows = pair_rows(args.zoo, args.ratios, args.rounds)
    print("\npair | ratio | modules of a layer reading one input: largest principal cosine, "
          "median over layers | separate | with shared inputs")
    for r in rows:
        cos = ", ".join(f"{k} {v['median']:.2f}" for k, v in r["largest_principal_cosine"].items())
        print(f"{r['pair']} | {r['ratio']:g} | {cos or '-'} | {r['separate']:.5f} | "
              f"{r['with_shared_inputs']:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rounds": args.rounds,
                                         "pairs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
