"""How much does the thorough search save by fitting each distinct candidate once?

``compress --search thorough`` tries many budget shares per kind; several round to the same
plan (private ranks, public rows, shards), whose fit is deterministic and so cannot beat the
best so far: mosconv fits each plan once. k-means also limits BLAS threads through one
threadpoolctl controller made once per process (making one scans the loaded libraries,
about 3 ms, on every call before).

For each real zoo adapter, in one run and one process: the conversion as mosconv does it,
next to the same conversion with both savings undone (every candidate fitted, a new
controller per k-means call), and a check that both give the same tensors and report.

    python examples/benchmarks/search_speed.py [--zoo ../shared/zoo] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import mosconv.fit.convert as convert_mod
import mosconv.fit.pools as pools_mod
from mosconv import read_adapter
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.mos.format import to_tensors

HERE = Path(__file__).resolve().parent
ADAPTERS = ["sd15-diffusers-attnproc-r4", "gemma3-270m-svg-x3/final", "open-calm-1b-r1-fp16",
            "smollm-135m-medical-r16/5epochs"]


class _Unique(tuple):
    """A plan that equals no other: every candidate is fitted, as before the saving."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


@contextmanager
def undone():
    """Both savings undone for the block."""
    from threadpoolctl import threadpool_limits

    plan, limit = convert_mod._shared_plan, pools_mod._thread_limit

    def every_plan(*args):
        p = plan(*args)
        return None if p is None else _Unique(p)

    convert_mod._shared_plan = every_plan
    pools_mod._thread_limit = lambda: threadpool_limits(1)
    try:
        yield
    finally:
        convert_mod._shared_plan, pools_mod._thread_limit = plan, limit


def _run(adapter) -> tuple[float, bytes, str, int]:
    fits = []
    real = convert_mod.shared_fit

    def counting(*args, **kwargs):
        fits.append(1)
        return real(*args, **kwargs)

    convert_mod.shared_fit = counting
    try:
        t0 = time.perf_counter()
        res = convert(adapter, ConvertConfig(ratio=8, search="thorough"))
        seconds = time.perf_counter() - t0
    finally:
        convert_mod.shared_fit = real
    tensors, _ = to_tensors(res.mos)
    blob = b"".join(k.encode() + t.contiguous().view(torch.uint8).numpy().tobytes()
                    for k, t in sorted(tensors.items()))
    return seconds, blob, json.dumps(res.report.to_json(), sort_keys=True), len(fits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE.parents[1] / ".." / "shared" / "zoo")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    print(f"machine: {machine}\n")
    print("adapter | thorough, fitted once per plan (s) | every candidate fitted (s) | x faster"
          " | fits: once / every | same output")
    rows = []
    for name in ADAPTERS:
        adapter = read_adapter(args.zoo / name)
        new_s, new_t, new_r, new_fits = _run(adapter)
        with undone():
            old_s, old_t, old_r, old_fits = _run(adapter)
        same = new_t == old_t and new_r == old_r
        rows.append({"adapter": name, "seconds": new_s, "seconds_every_candidate": old_s,
                     "speedup": old_s / new_s, "fits": new_fits, "fits_every_candidate":
                     old_fits, "same_output": same})
        print(f"{name} | {new_s:.2f} | {old_s:.2f} | x{old_s / new_s:.2f} | {new_fits} / "
              f"{old_fits} | {same}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    if not all(r["same_output"] for r in rows):
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
