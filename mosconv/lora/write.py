"""Writers of plain LoRA folders (PEFT layout), used by export and by examples/tests.

Scaling is baked into ``B`` and ``lora_alpha == r`` (with per-module ranks in
``rank_pattern`` and ``alpha_pattern``), which is what servers that read only the
top-level alpha (vLLM, LoRAX) need.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_bytes, atomic_write_json, prepare_output_dir, safetensors_bytes
from ..names import PEFT_CONFIG, PEFT_WEIGHTS
from ..names import PEFT_PREFIX as PREFIX


def peft_state_dict(modules: list[tuple[str, torch.Tensor, torch.Tensor, bool]]) -> dict[str, torch.Tensor]:
    """PEFT keys for ``(name, A, B, embedding)`` tuples, scale already folded into B."""
    sd: dict[str, torch.Tensor] = {}
    for name, A, B, embedding in modules:
        if embedding:
            sd[f"{PREFIX}{name}.lora_embedding_A"] = A
            sd[f"{PREFIX}{name}.lora_embedding_B"] = B
        else:
            sd[f"{PREFIX}{name}.lora_A.weight"] = A
            sd[f"{PREFIX}{name}.lora_B.weight"] = B
    return sd


def peft_config(base: dict[str, Any], names_ranks: list[tuple[str, int]]) -> dict[str, Any]:
    """A PEFT LoRA config with ``lora_alpha == r`` everywhere (scale 1)."""
    ranks = Counter(r for _, r in names_ranks)
    r0 = ranks.most_common(1)[0][0] if ranks else 8
    pattern = {name: r for name, r in names_ranks if r != r0}
    cfg = dict(base)
    for key in ("use_dora", "use_rslora"):
        if key in cfg:
            cfg[key] = False
    cfg.update({
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": {_escape(n): r for n, r in pattern.items()},
        "alpha_pattern": {_escape(n): r for n, r in pattern.items()},
    })
    if not cfg.get("target_modules"):
        cfg["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n, _ in names_ranks})
    return cfg


def _escape(name: str) -> str:
    """A ``rank_pattern`` key that PEFT's suffix regex matches for this module only."""
    return re.escape(name)


def write_peft_folder(
    out: Path,
    modules: list[tuple[str, torch.Tensor, torch.Tensor, bool]],
    config: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (last) into ``out``."""
    out = Path(out)
    replacing = (out / PEFT_CONFIG).exists()  # an old export, whose config goes first
    wrote = False
    try:
        prepare_output_dir(out, PEFT_CONFIG, overwrite)
        sd = peft_state_dict(modules)
        sd.update(extra_tensors or {})
        atomic_write_bytes(out / PEFT_WEIGHTS[0],
                           safetensors_bytes(sd, metadata or {"format": "pt"}))
        wrote = True
        atomic_write_json(out / PEFT_CONFIG, config)
    except BaseException:  # (disk full, interrupt) no weights without their config are left:
        # ours, or the old export's once its config is gone
        if wrote or (replacing and not (out / PEFT_CONFIG).exists()):
            (out / PEFT_WEIGHTS[0]).unlink(missing_ok=True)
        raise
    return out
