"""Single-file image-model LoRAs: diffusers (PEFT-style and legacy), kohya / sd-scripts and
LyCORIS LoHa / LoKr.

| family | keys | scale |
|---|---|---|
| diffusers | ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``text_encoder.``) | ``.alpha`` / r if present, else from the header's ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora`` per component, or for the whole file when unprefixed, as diffusers loads it), else diffusers' rule: the rank of the component's first ``lora_B`` / r (1 when the ranks are equal) |
| diffusers-legacy | ``<path>.processor.to_q_lora.down.weight`` / ``.up.weight`` | 1 |
| kohya | ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (also ``lora_te*_``, ``lora_transformer_``, and ``lycoris_`` from LyCORIS's wrapper) | alpha / r (alpha defaults to r) |
| lycoris-loha | ``<module>.hada_w1_a`` / ``_w1_b`` / ``_w2_a`` / ``_w2_b`` / ``.alpha`` | alpha / r (see :mod:`.lycoris`) |
| lycoris-lokr | ``<module>.lokr_w1`` or ``_w1_a`` + ``_w1_b``, ``.lokr_w2`` or ``_w2_a`` + ``_w2_b``, ``.alpha`` | alpha / r, 1 if both full (see :mod:`.lycoris`) |

kohya conv modules (LoCon 1x1 and 3x3) are flattened to ``(out, in*kh*kw)`` matrices,
which is exact; the kernel shape is kept in ``LoraModule.conv_shape``.  LyCORIS LoHa and
LoKr updates are factorized exactly into LoRA factors of their true rank
(:mod:`mosconv.lora.read.lycoris`); a LyCORIS file may also hold plain kohya
``lora_down``/``lora_up`` modules, read as kohya ones.  Its format is ``lycoris-`` plus the
module types present joined by ``+`` (``lycoris-loha``, ``lycoris-lokr``,
``lycoris-loha+lokr``, ``lycoris-lokr+lora``, ...).  Other LyCORIS types (Tucker, DoRA,
full/diff, OFT, BOFT, GLoRA, IA3, norm) are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ...errors import FormatError, UnsupportedAdapterError
from ..types import LoraAdapter, LoraModule, assign_kinds
from ._common import make_module
from ._io import dtype_name, load_tensor_file
from .lycoris import check_refused, has_lycoris_keys, lycoris_format, read_lycoris
from .peft import VARIANTS, check_pattern, check_rank, is_number, pattern_key

# kohya / sd-scripts prefixes, and ``lycoris_``: LyCORIS's own wrapper names LoCon modules so
_KOHYA_MOD = r"(?P<mod>(?:lora_(?:unet|te\d?|transformer)|lycoris)_[\w]+?)"
_KOHYA = re.compile(rf"^{_KOHYA_MOD}\.(?P<which>lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(rf"^{_KOHYA_MOD}\.alpha$")
_LEGACY = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")
_PEFT_STYLE = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_PEFT_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
# A LoRA factor in some layout: one left over once a family's keys are read was not understood
_LORA_LIKE = re.compile(r"(?:lora_(?:down|up|A|B)|lora\w*\.(?:down|up)|lora_[AB]\.[^.]+)\.weight$")


def detect_family(keys: list[str]) -> str | None:
    """``lycoris``, ``kohya``, ``diffusers-legacy``, ``diffusers`` or None from a file's
    tensor keys (``lycoris``: any LoHa / LoKr factor key)."""
    if has_lycoris_keys(keys):
        return "lycoris"
    if any(_KOHYA.match(k) for k in keys):
        return "kohya"
    if any(_LEGACY.match(k) for k in keys):
        return "diffusers-legacy"
    if any(_PEFT_STYLE.match(k) for k in keys):
        return "diffusers"
    return None


def read_single_file(path: Path, family: str | None = None) -> LoraAdapter:
    """Read a diffusers, kohya or LyCORIS (LoHa / LoKr) single-file adapter.

    Raises:
        FormatError: unreadable file, unknown key layout, unpaired or mismatched factors.
        UnsupportedAdapterError: LyCORIS types other than LoHa / LoKr (Tucker, DoRA,
            full, OFT, GLoRA, IA3, ...).
    """
    path = Path(path)
    tensors, meta = load_tensor_file(path)
    check_refused(path, tensors)  # before detection: an OFT-only file is named as such
    family = family or detect_family(list(tensors))
    if family is None:
        raise FormatError(
            f"{path}: unknown adapter format (no lora_A/lora_B, lora_(unet|te|transformer)_* or "
            "lycoris_* lora_down/lora_up, hada_w1_a/lokr_w1 or processor *_lora keys)"
        )
    modules: list[LoraModule] = []
    dtypes: set[str] = set()
    fmt = family
    if family == "lycoris":  # LoHa / LoKr modules, then plain kohya ones from the rest
        modules, used, dtypes = read_lycoris(path, tensors)
        tensors = {k: v for k, v in tensors.items() if k not in used}
        family = "kohya"
    plain, extra, plain_dtypes = _read_pairs(path, tensors, family,
                                             _diffusers_config(path, meta, tensors)
                                             if family == "diffusers" else {})
    clash = sorted({m.name for m in modules} & {m.name for m in plain})
    if clash:
        raise FormatError(f"{path}: module {clash[0]} holds both LyCORIS (hada_*/lokr_*) and "
                          "lora_down/lora_up tensors")
    stray = sorted(k for k in extra if _LORA_LIKE.search(k))
    if stray:
        raise FormatError(f"{path}: tensor {stray[0]} looks like a LoRA factor but is not in the "
                          f"{family} layout the rest of the file has; mixed layouts are not "
                          "supported")
    if fmt == "lycoris":
        fmt = lycoris_format({m.source_type for m in [*modules, *plain]})
    modules += plain
    dtypes |= plain_dtypes
    if not modules:
        raise FormatError(f"{path}: no LoRA tensors found: empty adapter")
    return LoraAdapter(
        format=fmt,
        modules=assign_kinds(modules),
        extra_tensors=extra,
        metadata=meta,
        base_model=meta.get("ss_sd_model_name") or meta.get("ss_base_model_version"),
        dtype="/".join(sorted(dtypes)),
        source_files=(path,),
        source_bytes=path.stat().st_size,
    )


def _diffusers_config(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]
                      ) -> dict[str, dict]:
    """Per component (``unet``, ``text_encoder``, ...), the PEFT ``LoraConfig`` fields that
    diffusers' ``save_lora_weights`` writes into the header (``lora_adapter_metadata``: JSON
    of ``"<component>.<field>"``), with what mosconv cannot carry refused (DoRA, lora_bias)."""
    for key in tensors:
        if "lora_magnitude_vector" in key or key.endswith(".lora_B.bias"):
            what = "DoRA" if "lora_magnitude_vector" in key else "lora_bias"
            raise UnsupportedAdapterError(f"{path}: tensor {key}: a {what} adapter; its update "
                                          "is not B @ A alone; not supported")
    raw = meta.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, absurd nesting
        raise FormatError(f"{path}: header lora_adapter_metadata is not valid JSON") from None
    if not isinstance(flat, dict):
        raise FormatError(f"{path}: header lora_adapter_metadata is not a JSON object")
    configs: dict[str, dict] = {}
    dotted = {"." in str(key) for key in flat}
    if dotted == {True, False}:
        raise FormatError(f"{path}: header lora_adapter_metadata mixes fields with and without "
                          "a component prefix (unet., text_encoder., ...)")
    if dotted == {False}:  # a model's save_lora_adapter: one LoraConfig, no component prefix
        configs[""] = flat
    else:  # a pipeline's save_lora_weights: "<component>.<field>"
        for key, value in flat.items():
            component, _, field = str(key).partition(".")
            configs.setdefault(component, {})[field] = value
    for component, cfg in configs.items():
        for field in ("use_dora", "lora_bias", *VARIANTS):
            if cfg.get(field):
                raise UnsupportedAdapterError(f"{path}: {component + '.' if component else ''}"
                                              f"{field}=true in its metadata; not supported")
        _check_header_config(path, component, cfg)
    return configs


def _check_header_config(path: Path, component: str, cfg: dict) -> None:
    """The header fields that set scales, checked as the PEFT folder reader checks them: a
    wrong type would give a wrong scale without a word."""
    where = f"{path}: header lora_adapter_metadata {component + '.' if component else ''}"
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise FormatError(f"{where}use_rslora must be true or false, got {cfg['use_rslora']!r}")
    if cfg.get("lora_alpha") is not None and not is_number(cfg["lora_alpha"], (int, float)):
        raise FormatError(f"{where}lora_alpha must be a number, got {cfg['lora_alpha']!r}")
    check_pattern(where, "alpha_pattern", cfg.get("alpha_pattern"), (int, float))
    check_pattern(where, "rank_pattern", cfg.get("rank_pattern"), (int,))


def _metadata_scale(path: Path, configs: dict[str, dict], mod: str, r: int) -> float | None:
    """The scale PEFT gives module ``mod`` of rank ``r`` from its component's config (None:
    no config for it, or one without ``lora_alpha``); a rank other than the config's is
    refused, as for a PEFT folder (diffusers could not load it)."""
    if "" in configs:  # one config for the whole file, names without a component
        component, name = "", mod
    else:
        component, _, name = mod.partition(".")
    cfg = configs.get(component)
    if not cfg or not r:
        return None
    check_rank(path, cfg, name, r, source="its header lora_adapter_metadata gives "
               + (f"{component}." if component else ""), shown=mod)
    patterns = cfg.get("alpha_pattern") or {}
    key = pattern_key(patterns, name) if isinstance(patterns, dict) else None
    alpha = patterns[key] if key else cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


# The components a diffusers pipeline file prefixes its keys with (each loaded on its own).
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
               "prior", "decoder")


def _component(mod: str) -> str:
    head, dot, _ = mod.partition(".")
    return head if dot and head in _COMPONENTS else ""


def _first_ranks(tensors: dict[str, torch.Tensor], alphas: dict[str, float],
                 configs: dict[str, dict]) -> dict[str, int]:
    """Per component of a diffusers file whose header has no config for it and none of whose
    modules has an ``.alpha``: the rank of its first ``lora_B`` in the file's key order.
    diffusers builds that component's ``LoraConfig`` with ``r = lora_alpha =`` that rank and
    the other ranks in ``rank_pattern`` (``get_peft_kwargs``), so a module of rank ``r``
    gets the scale ``first / r``: 1 when every rank is the same."""
    if "" in configs:
        return {}
    first: dict[str, int] = {}
    with_alpha = {_component(m) for m in alphas}
    for key, t in tensors.items():
        m = _PEFT_STYLE.match(key)
        if m and m["which"] == "lora_B" and t.dim() > 1:
            comp = _component(m["mod"])
            if comp not in configs and comp not in with_alpha:
                first.setdefault(comp, int(t.shape[1]))
    return first


def _read_pairs(path: Path, tensors: dict[str, torch.Tensor], family: str,
                configs: dict[str, dict] | None = None
                ) -> tuple[list[LoraModule], dict[str, torch.Tensor], set[str]]:
    """``(modules, extra_tensors, dtypes)`` of the down/up pairs of one key family
    (``configs``: a diffusers file's per-component configs, :func:`_diffusers_config`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    extra = {}
    if family == "kohya":
        lora, alpha_re, down, up = _KOHYA, _KOHYA_ALPHA, "lora_down", "lora_up"
    elif family == "diffusers-legacy":
        lora, alpha_re, down, up = _LEGACY, None, "down", "up"
    else:
        lora, alpha_re, down, up = _PEFT_STYLE, _PEFT_ALPHA, "lora_A", "lora_B"
    for key, t in tensors.items():
        m = lora.match(key)
        if m:
            if family == "diffusers-legacy":
                proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
                mod = f"{m['path']}.{proj}"
            else:
                mod = m["mod"]
            pairs.setdefault(mod, {})[m["which"]] = t
            continue
        a = alpha_re.match(key) if alpha_re else None
        if a and t.numel() != 1:
            raise FormatError(f"{path}: alpha tensor {key} has shape {list(t.shape)}, "
                              "expected one number")
        if a:
            if t.is_complex() or t.dtype == torch.bool:
                raise FormatError(f"{path}: alpha tensor {key} has dtype {dtype_name(t)}, "
                                  "expected a real number")
            alphas[a["mod"]] = float(t.reshape(()).to(torch.float64).item())
            continue
        extra[key] = t
    modules = []
    dtypes = set()
    first = _first_ranks(tensors, alphas, configs or {}) if family == "diffusers" else {}
    for mod, slot in pairs.items():
        a, b = slot.get(down), slot.get(up)
        r = int(a.shape[0]) if a is not None and a.dim() > 0 else 1
        alpha = alphas.get(mod, float(first.get(_component(mod), r)))
        if family == "kohya" and alpha == 0:
            alpha = float(r)  # sd-scripts: "alpha = lora_dim if alpha is None or alpha == 0"
        scale = alpha / r if r else 1.0  # r=0: refused there; a NaN/Inf alpha too
        from_header = _metadata_scale(path, configs or {}, mod, r)
        from_header = None if mod in alphas else from_header
        if from_header is not None:  # diffusers: the config in its header, as it loads it
            scale = from_header
        modules.append(make_module(path, mod, a, b, scale))
        dtypes.add(dtype_name(a))
    orphan = set(alphas) - set(pairs)
    for mod in sorted(orphan):  # an alpha without factors is kept, not lost
        extra[f"{mod}.alpha"] = tensors[f"{mod}.alpha"]
    return modules, extra, dtypes
