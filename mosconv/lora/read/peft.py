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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import FormatError, UnsupportedAdapterError
from ...names import PEFT_CONFIG as CONFIG_NAME
from ...names import PEFT_PREFIX as PREFIX
from ...names import PEFT_WEIGHTS as WEIGHT_NAMES
from ..types import LoraAdapter, assign_kinds
from ._common import make_module
from ._io import dtype_name, load_tensor_file

if TYPE_CHECKING:
    import torch

PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's default lora_alpha (not r)
_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[A-Za-z_][\w-]*))?(?:\.weight)?$"
)
# Initialisations that modify the base weights: the saved A/B alone do not define dW.
# PEFT's path_initial_model_for_weight_conversion turns the first four into plain LoRAs.
_CONVERTIBLE_INITS = ("pissa", "olora", "corda", "astra")
_BASE_MODIFYING_INITS = (*_CONVERTIBLE_INITS, "loftq", "lora_ga")
# PEFT LoRA variants whose update is not ``scale * B @ A`` on the unchanged base weights:
# config field -> what it does instead (peft.tuners.lora.variants).
VARIANTS = {
    "kasa_config": "KaSA: a diagonal lora_diag between B and A, on a truncated base weight",
    "use_bdlora": "BD-LoRA: a block-diagonal lora_A or lora_B",
    "use_qalora": "QA-LoRA: lora_A acts on pooled input groups",
    "alora_invocation_tokens": "aLoRA: the update applies only after its invocation tokens",
    "arrow_config": "Arrow: a router mixes a library of LoRAs per token",
}


def pattern_key(patterns: Mapping[str, float], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the pattern that matches ``module_name`` as a suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json``, checked where mosconv relies on a field (the
    object itself is PEFT's JSON, any keys)."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd numbers or nesting
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise FormatError(f"{path}: not valid JSON ({msg})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise FormatError(f"{path}: {field} must be true or false, got {_show(config[field])}")
    for field in ("base_model_name_or_path", "task_type"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise FormatError(f"{path}: {field} must be a string, got {_show(config[field])}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise FormatError(f"{path}: target_modules must be a string or a list of strings, "
                          f"got {_show(targets)}")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type {_show(peft_type)} is not LORA")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{path}: DoRA adapter (use_dora=true): its update needs the base weights; not supported"
        )
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(
            f"{path}: lora_bias=true: the adapter also adds a bias to each module (lora_B.bias), "
            "which a MoS adapter does not carry; not supported")
    for field, what in VARIANTS.items():
        if config.get(field):
            raise UnsupportedAdapterError(f"{path}: {field} is set ({what}), so the update is not "
                                          "scale * B @ A; not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        fix = ("; convert it with PEFT's path_initial_model_for_weight_conversion first"
               if init.lower().startswith(_CONVERTIBLE_INITS) else "; not supported")
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={_show(init)} modifies the base weights, so A/B alone do "
            f"not define the update{fix}")
    for field, kind in (("lora_alpha", (int, float)), ("r", int)):
        value = config.get(field)
        if value is not None and not is_number(value, kind):
            raise FormatError(f"{path}: {field} must be a number, got {_show(value)}")
    for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        check_pattern(f"{path}: ", field, config.get(field), kind)
    return config


def check_pattern(where: str, field: str, pattern: object,
                  kind: type | tuple[type, ...]) -> None:
    """A ``rank_pattern`` / ``alpha_pattern`` (None or an object of regex keys and numbers
    of ``kind``), as :func:`pattern_key` uses it; errors start with ``where``."""
    pattern = pattern or {}
    if not isinstance(pattern, dict):
        raise FormatError(f"{where}{field} must be an object, got {_show(pattern)}")
    for key, value in pattern.items():
        if not is_number(value, kind):
            raise FormatError(f"{where}{field}[{_show(key)}] must be a number, "
                              f"got {_show(value)}")
        try:
            re.compile(rf"(.*\.)?({key})$")  # as pattern_key uses it
        except (re.error, RecursionError, OverflowError) as e:
            raise FormatError(f"{where}{field} key {_show(key)} is not a valid regular "
                              f"expression ({e})") from None


def is_number(value: object, kind: type | tuple[type, ...]) -> bool:
    """A JSON number of ``kind`` (bools and NaN/Infinity are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _show(value: object) -> str:
    """``repr`` of a config value, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_rank(path: Path, config: Mapping[str, Any], mod: str, r: int,
               source: str = f"{CONFIG_NAME} gives ", shown: str | None = None) -> None:
    """The tensors' rank must be the one the config gives (``rank_pattern`` or ``r``): the
    scale ``alpha / r`` depends on it, and PEFT cannot load a file that disagrees
    (``source``: where the config comes from, ``shown``: the module's name, for the message)."""
    patterns = config.get("rank_pattern") or {}
    key = pattern_key(patterns, mod)
    expected = patterns[key] if key else config.get("r")
    if expected is not None and expected != r:
        where = f"rank_pattern[{_show(key)}]" if key else "r"
        if (config.get("target_parameters") and is_number(expected, int) and expected > 0
                and r > expected and r % expected == 0):  # peft's ParamWrapper on (E, ., .)
            raise UnsupportedAdapterError(
                f"{path}: module {shown or mod} has {r // expected} updates of rank {expected} "
                "(target_parameters on a 3-D parameter: one per expert); not supported")
        raise FormatError(f"{path}: module {shown or mod} has rank {r} in its tensors but "
                          f"{source}{where}={expected}")


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

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}  # (module, which) -> the tensor key that gave it
    names: dict[str | None, str] = {}  # adapter name in the keys (old files) -> a key
    extra = {}
    for key, t in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(
                f"{path}: DoRA adapter (tensor {key}): its update needs the base weights; "
                "not supported"
            )
        m = _LORA_KEY.match(key)
        if m and m["adapter"] == "bias":  # lora_B.bias: PEFT's lora_bias, whatever the config
            raise UnsupportedAdapterError(
                f"{path}: tensor {key}: the adapter also adds a bias to its modules "
                "(lora_bias), which a MoS adapter does not carry; not supported")
        if not m:
            extra[key] = t
            continue
        mod = m["mod"].removeprefix(PREFIX)
        names.setdefault(None if m["adapter"] in (None, "weight") else m["adapter"], key)
        if len(names) > 1:
            a, b = names.values()
            raise FormatError(f"{path}: tensors of several adapters ({a}, {b}); mosconv reads "
                              "one adapter per file")
        which = m["which"]
        for other in ({"lora_A", "lora_B"} if "embedding" in which else
                      {"lora_embedding_A", "lora_embedding_B"}) | {which}:
            if (mod, other) in keys:
                raise FormatError(f"{path}: tensors {keys[mod, other]} and {key} both give "
                                  f"module {mod} a factor")
        keys[mod, which] = key
        pairs.setdefault(mod, {})[which] = t

    alpha_pattern = config.get("alpha_pattern") or {}
    modules = []
    dtypes = set()
    for mod, slot in pairs.items():
        embedding = "lora_embedding_A" in slot or "lora_embedding_B" in slot
        a = slot.get("lora_embedding_A" if embedding else "lora_A")
        b = slot.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or a.dim() < 1:
            make_module(path, mod, a, b, 1.0, embedding=embedding)  # raises the precise error
        r = int(a.shape[0])
        check_rank(path, config, mod, r)
        a_key = pattern_key(alpha_pattern, mod)
        alpha = alpha_pattern[a_key] if a_key else config.get("lora_alpha")
        if alpha is None:
            alpha = PEFT_DEFAULT_ALPHA  # what LoraConfig gives a config without lora_alpha
        if not r:
            raise FormatError(f"{path}: module {mod} has rank 0")
        try:
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        except OverflowError:
            scale = math.inf  # a huge integer alpha: refused as non-finite below
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
        source_bytes=path.stat().st_size,
    )
