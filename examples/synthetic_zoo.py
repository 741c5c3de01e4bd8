"""A synthetic zoo of LoRA adapters built the way training leaves them, for measuring joint fits.

    python examples/synthetic_zoo.py OUT [--n 32] [--d 256] [--r 16] [--layers 4]
                                         [--seeds 2] [--seed-scheme cycle|half]

Every adapter adapts the q/v projections of the same (imaginary) base model. What they share,
and what they do not, follows how LoRA training behaves:

* ``A`` is PEFT's kaiming-uniform init drawn from a seed, plus a small drift (``A`` barely
  moves in training). With ``--seed-scheme cycle`` (the default) adapters are split over
  ``--seeds`` init seeds: those with one seed share their ``A``, the others do not. With
  ``half`` the even-numbered adapters share one seed (a default such as 42 that many trainers
  keep) and every odd-numbered one has a seed of its own.
* ``B`` has a component in an output subspace shared by the whole zoo (``--shared-rank``
  directions: the same base model and similar tasks move the same features) plus an
  adapter-specific part (``--own`` of its scale), with a decaying column scale as trained
  ``B`` has.

Written with ``safetensors.torch.save_file`` (not mosconv's writer), one PEFT folder per adapter
(``OUT/task00``, ``OUT/task01``, ...). Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_zoo(root: Path, n: int, *, d: int = 256, d_kv: int = 64, r: int = 16,
              layers: int = 4, seeds: int = 2, shared_rank: int = 4, own: float = 0.5,
              drift: float = 0.01, base: str = "synthetic-base", seed_scheme: str = "cycle"
              ) -> list[Path]:
    """Write ``n`` adapters under ``root``; returns their folders in order."""
    if seed_scheme not in ("cycle", "half"):
        raise ValueError(f"seed_scheme: {seed_scheme!r} is not 'cycle' or 'half'")
    mods = {f"model.layers.{i}.self_attn.{p}": s for i in range(layers)
            for p, s in (("q_proj", (d, d)), ("v_proj", (d_kv, d)))}
    zoo = torch.Generator().manual_seed(12345)
    shared = {name: torch.linalg.qr(torch.randn(d_out, shared_rank, generator=zoo))[0]
              for name, (d_out, _) in mods.items()}
    decay = 0.85 ** torch.arange(r, dtype=torch.float32)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(1_000 + i)
        init = i % seeds if seed_scheme == "cycle" else (0 if i % 2 == 0 else 1 + i)
        tensors = {}
        for li, (name, (d_out, d_in)) in enumerate(mods.items()):
            ga = torch.Generator().manual_seed(7_919 * init + li)
            bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) weight
            A = (torch.rand(r, d_in, generator=ga) * 2 - 1) * bound
            A = A + drift * bound * torch.randn(r, d_in, generator=g)
            B = shared[name] @ torch.randn(shared_rank, r, generator=g)
            B = B + own * torch.randn(d_out, r, generator=g) / math.sqrt(d_out / shared_rank)
            B = B * decay * 0.05
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        folder = root / f"task{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
               "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
               "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
               "use_rslora": False, "use_dora": False, "rank_pattern": {},
               "alpha_pattern": {}, "modules_to_save": None}
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        out.append(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-scheme", choices=("cycle", "half"), default="cycle")
    args = ap.parse_args()
    paths = write_zoo(args.out, args.n, d=args.d, r=args.r, layers=args.layers, seeds=args.seeds,
                      seed_scheme=args.seed_scheme)
    print(f"wrote {len(paths)} adapters under {args.out}")


if __name__ == "__main__":
    main()
