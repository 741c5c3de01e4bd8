"""PEFT LoRA folders: ``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``.

Keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (an
adapter name such as ``.default`` may stand before ``.weight`` in old files) and
``<module>.lora_embedding_A`` / ``_B`` for embeddings.  Scaling follows PEFT:
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with per-module
``rank_pattern`` / ``alpha_pattern`` overrides matched as regex suffixes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..adapter import LoraAdapter, assign_kinds
from ..errors import FormatError, UnsupportedAdapterError
from ..names import PEFT_CONFIG as CONFIG_NAME
from ..names import PEFT_WEIGHTS as WEIGHT_NAMES
from ._common import make_module
from ._io import dtype_name, load_tensor_file

PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's default lora_alpha (not r)
_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[A-Za-z_][\w-]*))?(?:\.weight)?$"
)
# Initialisations that modify the base weights: the saved A/B alone do not define dW.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the pattern that matches ``module_name`` as a suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type {peft_type!r} is not LORA")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{path}: DoRA adapter (use_dora=true): its update needs the base weights; not supported"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r} modifies the base weights, so A/B alone do not "
            "define the update; convert it with PEFT's path_initial_model_for_weight_conversion first"
        )
    for field, kind in (("lora_alpha", (int, float)), ("r", int)):
        if field in config and config[field] is not None and not isinstance(config[field], kind):
            raise FormatError(f"{path}: {field} must be a number, got {config[field]!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise FormatError(f"{path}: {field} must be an object, got {config[field]!r}")
    return config


def weight_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FormatError(f"{folder}: PEFT folder has {CONFIG_NAME} but no {' or '.join(WEIGHT_NAMES)}")


def read_peft(folder: Path) -> LoraAdapter:
    """Read a PEFT LoRA folder into a :class:`LoraAdapter`.

    Raises:
        FormatError: unreadable config or weights, unpaired or mismatched factors.
        UnsupportedAdapterError: DoRA, base-modifying initialisations, non-LoRA PEFT types.
    """
    folder = Path(folder)
    config = read_config(folder)
    path = weight_file(folder)
    tensors, meta = load_tensor_file(path)

    pairs: dict[str, dict[str, object]] = {}
    extra = {}
    for key, t in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(
                f"{path}: DoRA adapter (tensor {key}): its update needs the base weights; "
                "not supported"
            )
        m = _LORA_KEY.match(key)
        if not m:
            extra[key] = t
            continue
        mod = m["mod"].removeprefix(PREFIX)
        slot = pairs.setdefault(mod, {})
        slot[m["which"]] = t

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = []
    dtypes = set()
    for mod, slot in pairs.items():
        embedding = "lora_embedding_A" in slot or "lora_embedding_B" in slot
        a = slot.get("lora_embedding_A" if embedding else "lora_A")
        b = slot.get("lora_embedding_B" if embedding else "lora_B")
        r_key = pattern_key(rank_pattern, mod)
        a_key = pattern_key(alpha_pattern, mod)
        r = rank_pattern[r_key] if r_key else config.get("r", a.shape[0] if a is not None and a.dim() else 8)
        alpha = alpha_pattern[a_key] if a_key else config.get("lora_alpha")
        if alpha is None:
            alpha = PEFT_DEFAULT_ALPHA  # what LoraConfig gives a config without lora_alpha
        if a is not None and a.dim() >= 1 and a.shape[0] != r:
            r = int(a.shape[0])  # the tensor is the truth; PEFT could not load it otherwise
        if not r:
            raise FormatError(f"{path}: module {mod} has rank 0")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        module = make_module(path, mod, a, b, scale, embedding=embedding)
        modules.append(module)
        dtypes.add(dtype_name(a))
    if not modules:
        raise FormatError(f"{path}: no LoRA tensors (lora_A/lora_B) found: empty adapter")
    return LoraAdapter(
        format="peft",
        modules=assign_kinds(modules),
        extra_tensors=extra,
        config=config,
        metadata=meta,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        dtype="/".join(sorted(dtypes)),
        source_files=(folder / CONFIG_NAME, path),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )
