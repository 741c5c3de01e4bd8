"""Mixed-batch speed of mosconv against PEFT in one process, interleaved.

    python examples/benchmarks/serve_zoo_ab.py [--model smollm2] [--n 64] [--batches 8 32]
        [--repeats 5] [--work /tmp/serve_zoo_work] [--json out.json]

serve_zoo.py runs each system in its own process (so that each has its own peak RSS); on a
shared machine a process can land in a slow spell, and the same workload then differs by 20%
or more from one process to the next. Here one process holds both (the base model loaded
twice: mosconv attached to one copy, PEFT with the exported LoRAs to the other) and times
their mixed-batch greedy ``generate`` alternately (mosconv, PEFT, mosconv, ...), so both see
the same machine. Same zoo, rows and ids as serve_zoo.py (run serve_zoo.py first: it
converts and exports the zoo into --work). The outputs are compared token for token.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_zoo import NEW_TOKENS, PROMPT, machine_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_zoo_work"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    import mosconv

    torch.set_num_threads(args.threads)
    line, info = machine_line(args.threads)
    print("machine:", line)
    root = args.work / args.model
    zoo = root / f"n{args.n}"  # serve_zoo.py's layout: out (the conversion), exp (LoRAs)
    names = [f"task{i:02d}" for i in range(args.n)]
    cfg = AutoConfig.from_pretrained(root / "base")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    pad = pad[0] if isinstance(pad, list) else (pad or 0)
    ours = AutoModelForCausalLM.from_pretrained(root / "base").float().eval()
    mosconv.apply(ours, zoo / "out")
    peft = AutoModelForCausalLM.from_pretrained(root / "base").float().eval()
    exp = zoo / "exp"
    peft = PeftModel.from_pretrained(peft, exp / names[0], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(exp / n, adapter_name=n)
    peft.eval()
    out = {"machine": info, "machine_line": line, "model": args.model, "n": args.n,
           "repeats": args.repeats, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "batches": {}}
    rng = random.Random(1000 + args.n)  # serve_zoo.py's rows
    all_rows = {b: [rng.choice(names) for _ in range(b)] for b in args.batches}
    for b, rows in all_rows.items():
        ids = torch.randint(0, cfg.vocab_size, (b, PROMPT),
                            generator=torch.Generator().manual_seed(b))
        kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
              "pad_token_id": pad, "attention_mask": torch.ones_like(ids)}
        mosconv.set_active(ours, rows)
        runs = {"mosconv": lambda ids=ids, kw=kw: ours.generate(ids, **kw),
                "peft": lambda ids=ids, kw=kw, rows=rows: peft.generate(
                    input_ids=ids, adapter_names=rows, **kw)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        got: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for fn in runs.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    t = time.perf_counter()
                    got[k] = fn()
                    times[k].append(time.perf_counter() - t)
        same = bool(torch.equal(got["mosconv"], got["peft"]))
        r = {"times_s": times, "greedy_match": same}
        for stat, f in (("best", min), ("median", statistics.median)):
            r[f"tokens_per_s_{stat}"] = {k: b * NEW_TOKENS / f(v) for k, v in times.items()}
            r[f"ratio_{stat}"] = f(times["peft"]) / f(times["mosconv"])
        out["batches"][str(b)] = r
        print(f"{args.model} N={args.n} batch {b}: tokens/s mosconv / PEFT, best "
              f"{r['tokens_per_s_best']['mosconv']:.1f} / {r['tokens_per_s_best']['peft']:.1f} "
              f"(x{r['ratio_best']:.2f}), median {r['tokens_per_s_median']['mosconv']:.1f} / "
              f"{r['tokens_per_s_median']['peft']:.1f} (x{r['ratio_median']:.2f}); greedy "
              f"tokens equal: {'yes' if same else 'NO'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
