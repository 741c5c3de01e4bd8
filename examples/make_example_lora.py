"""Write a deterministic, clearly synthetic PEFT LoRA folder for trying mosconv.

The adapter is Llama-shaped (8 layers, hidden 512, GQA k/v of width 128, rank 16 on
q/k/v/o, alpha 32).  Like real trained LoRAs, ``A`` looks like its random
initialization and ``dW = scale * B @ A`` has a quickly decaying spectrum (stable
rank about 1.6 of 16, 90% of the energy in 3 directions).  It is NOT a trained adapter:
it exists so that the README's first command runs anywhere, offline, in a second.

    python examples/make_example_lora.py example_lora [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import torch

from mosconv.lora.write import write_peft_folder

HIDDEN, KV, LAYERS, RANK, ALPHA = 512, 128, 8, 16, 32
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}


def make_modules(seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(RANK, dtype=torch.float64) / 2.0)  # singular value profile
    modules = []
    for layer in range(LAYERS):
        for proj, (d_out, d_in) in SHAPES.items():
            bound = 1 / math.sqrt(d_in)  # PEFT's kaiming-uniform-like A init
            A = (torch.rand(RANK, d_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
            q, _ = torch.linalg.qr(torch.randn(d_out, RANK, generator=g, dtype=torch.float64))
            mix, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=g, dtype=torch.float64))
            B = 0.02 * q @ torch.diag(decay * (1 + 0.3 * torch.rand(RANK, generator=g))) @ mix
            name = f"model.layers.{layer}.self_attn.{proj}"
            modules.append((name, A.float(), B.float(), False))
    return modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (PEFT layout)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "target_modules": sorted(SHAPES), "base_model_name_or_path": "synthetic-llama-512",
        "fan_in_fan_out": False, "bias": "none",
    }
    write_peft_folder(args.out, make_modules(args.seed), config, overwrite=True)
    print(f"wrote synthetic example LoRA to {args.out}")


if __name__ == "__main__":
    main()
