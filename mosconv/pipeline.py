"""Thin I/O on top of the library: read -> convert -> save, and export back to LoRA."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, FormatError, NumericalError
from .fileio import (
    prepare_output_dir,
    real_path,
    same_or_inside,
    sha256_file,
    writing,
)
from .fit.convert import ConvertConfig, ConvertResult, check_calib, convert
from .fit.storage import store
from .lora.read import read_adapter
from .lora.types import LoraAdapter
from .lora.write import peft_config, write_peft_folder
from .model.calib import CalibStats, is_stats_file, save_stats
from .mos.format import CONFIG_FILE, is_mos_dir, load_mos, load_report, save_mos
from .mos.quant import Storage, StorageOverflow
from .names import CALIB_FILE, PEFT_CONFIG

if TYPE_CHECKING:
    from .model.distill import DistillConfig
    from .mos.types import MosAdapter

log = logging.getLogger("mosconv")  # mosconv -v shows these


@dataclass(frozen=True)
class DataSpec:
    """Where the base model and the text for data-aware conversion, distillation and
    evaluation come from.

    Attributes:
        base_model: local model folder (or ``.gguf`` file).
        gguf_file: name of a GGUF file inside ``base_model``.
        data: plain text or JSONL file (:mod:`mosconv.model.data`).
        max_tokens: tokens of ``data`` used at most.
        seq_len: tokens per block.
        batch_size: blocks per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    base_model: str | Path | None = None
    gguf_file: str | None = None
    data: str | Path | None = None
    max_tokens: int = 50_000
    seq_len: int = 256
    batch_size: int = 4
    device: str = "auto"

    def need(self, what: str) -> None:
        if self.base_model is None or self.data is None:
            raise ConfigError(f"{what} needs a base model and a text file",
                              options=("base_model", "data"))
        self.check()

    def check(self) -> None:
        """Settings that can be wrong before the model loads (it takes a while)."""
        if self.max_tokens < self.seq_len:
            raise ConfigError(f"max_tokens must be at least seq_len ({self.seq_len}), got "
                              f"{self.max_tokens}", options=("max_tokens", "seq_len"))


class _Session:
    """The base model, tokenizer and token blocks, loaded once and shared by the stages."""

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self._model = None
        self._blocks: dict[str, object] = {}

    @property
    def model(self):
        if self._model is None:
            from .model.distill import resolve_device
            from .model.hf import load_base_model

            device = resolve_device(self.spec.device)
            log.info("loading base model %s%s on %s", self.spec.base_model,
                     f" ({self.spec.gguf_file})" if self.spec.gguf_file else "", device)
            self._model = load_base_model(self.spec.base_model, gguf_file=self.spec.gguf_file,
                                          device=device)
        return self._model

    def blocks(self, data: str | Path | None = None):
        """``(n, seq_len)`` token blocks of ``data`` (default: the spec's data file)."""
        key = str(data if data is not None else self.spec.data)
        if key not in self._blocks:
            from .model.data import read_texts, token_blocks

            texts = read_texts(key)
            self._blocks[key] = token_blocks(self.model[1], texts, self.spec.seq_len,
                                             self.spec.max_tokens, source=key)
        return self._blocks[key]


def calibrate(adapter: LoraAdapter | str | Path, spec: DataSpec, out: str | Path | None = None,
              *, progress: Callable[[int], None] | None = None,
              session: _Session | None = None, overwrite: bool = False) -> CalibStats:
    """Input second moments of ``adapter``'s modules on ``spec.data`` run through
    ``spec.base_model``; written to ``out`` (``.safetensors``) when given (an existing file
    only with ``overwrite``, checked before the model runs).

    Raises:
        ConfigError: missing base model or data, modules missing from the model or of
            other shapes, ``out`` exists; FormatError: unreadable model or data.
    """
    from .model.calib import collect_moments
    from .model.runtime import find_layers

    if out is not None and Path(out).exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; it is replaced only when overwriting is "
                          "asked for", options=("overwrite",))
    spec.need("calibration")
    if not hasattr(adapter, "modules"):
        adapter = read_adapter(adapter)
    session = session or _Session(spec)
    model, _ = session.model
    layers = find_layers(model, adapter)
    info = {
        "base_model": str(spec.base_model), "gguf_file": spec.gguf_file,
        "data": str(spec.data), "data_sha256": sha256_file(Path(spec.data)),
        "seq_len": spec.seq_len, "max_tokens": spec.max_tokens,
    }
    log.info("calibrating %d modules on %s", len(layers), spec.data)
    try:
        stats = collect_moments(model, layers, session.blocks(spec.data),
                                batch_size=spec.batch_size, progress=progress, info=info)
    except NumericalError as e:
        raise NumericalError(f"{spec.base_model} on {spec.data}: {e}") from None
    if out is not None:
        save_stats(stats, out)
    return stats


def load_calib(calib: CalibStats | str | Path | None, adapter: LoraAdapter, spec: DataSpec,
               session: _Session, progress: Callable[[int], None] | None = None
               ) -> tuple[CalibStats | None, bool]:
    """``calib`` as CalibStats, and whether they were computed here: a stats file is read
    (the model is not run) and must cover ``adapter`` (else named); a data file is run
    through the base model."""
    from .model.calib import load_stats

    if calib is None or isinstance(calib, CalibStats):
        return calib, False
    if not Path(calib).is_file():
        raise FormatError(f"{calib}: no such file (calibration statistics, or a text to "
                          "compute them from, were asked for)")
    if is_stats_file(calib):
        stats = load_stats(calib)
        try:
            check_calib(adapter, stats)
        except ConfigError as e:
            raise ConfigError(f"{calib}: {e}") from None
        return stats, False
    if Path(calib).suffix == ".safetensors":  # a stats file that does not read: not text
        raise FormatError(f"{calib}: not a calibration file mosconv wrote (corrupt, truncated "
                          "or another safetensors file)")
    if spec.base_model is None:
        raise ConfigError(f"{calib}: not a calibration file; computing statistics from this "
                          "text needs a base model", options=("base_model",))
    return calibrate(adapter, replace(spec, data=calib), progress=progress,
                     session=session), True


def compress(
    lora_path: str | Path,
    out: str | Path,
    config: ConvertConfig | None = None,
    *,
    command: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_total: Callable[[int], None] | None = None,
    extra_info: dict | None = None,
    calib: CalibStats | str | Path | None = None,
    data: DataSpec | None = None,
    distill: DistillConfig | None = None,
    held_out: float = 0.1,
    on_step: Callable[[int, float], None] | None = None,
) -> ConvertResult:
    """Read a LoRA, convert it, optionally distill it, and write the MoS folder ``out``.

    Args:
        calib: None (weight-space conversion), a :class:`~mosconv.model.calib.CalibStats`, a
            calibration file, or a data file (then ``data.base_model`` is run on it and the
            statistics are saved as ``out/calib_stats.safetensors`` for reuse).
        data: base model and text (for ``calib`` from text and for ``distill``).
        distill: a :class:`~mosconv.model.distill.DistillConfig` to fine-tune the converted
            adapter against the LoRA on ``data.data`` (``held_out`` of the blocks held out).
        progress: called after each kind fitted (each storage tried, with a size ratio);
            ``progress_total`` first, with how many calls there will be.

    The source files' sha256 and the command line are recorded in ``mos_config.json``.
    Raises FormatError/ConfigError/MosconvError; a failed run leaves no ``mos_config.json``.
    """
    if is_mos_dir(lora_path):
        raise FormatError(f"{lora_path}: is a MoS adapter, not a LoRA (compress converts LoRAs; "
                          "export turns a MoS adapter back into a LoRA)")
    config = config or ConvertConfig()
    config.validate()
    data = data or DataSpec()
    if distill is not None:
        distill.validate()
        data.need("distillation")
    out = Path(out)
    if same_or_inside(lora_path, out):
        raise ConfigError(f"{out}: holds the input adapter {lora_path}; write the MoS adapter "
                          "to another folder")
    # fail before the work, not after; with overwrite an old output stays complete and
    # untouched until the first new file is written (a bad input leaves it as it was); a
    # failure removes the folders made here (leave nothing behind that we made)
    with writing(out, CONFIG_FILE, overwrite):
        log.info("reading %s", lora_path)
        adapter = read_adapter(lora_path)
        if progress_total is not None:  # how many times convert will call ``progress``
            progress_total(len(config.storages(adapter)) if config.size_ratio is not None
                           else len(adapter.kinds))
        session = _Session(data)
        stats, computed = load_calib(calib, adapter, data, session)
        log.info("converting %d modules at ratio %g (%s metric)", len(adapter.modules),
                 config.ratio, "data" if stats is not None else "weight")
        try:
            result = convert(adapter, config, progress=progress, calib=stats)
        except StorageOverflow as e:
            raise StorageOverflow(f"{lora_path}: {e}; store it as float32 or bfloat16",
                                  options=("dtype",)) from None
        if distill is not None:
            result = _distill(adapter, result, config, stats, session, distill, held_out,
                              on_step)
        mos = result.mos
        mos = replace(mos,
                      source={**mos.source, **source_provenance(lora_path, adapter)},
                      info={**mos.info, "command": command, **(extra_info or {})})
        log.info("writing %s", out)
        stats_file = out / CALIB_FILE
        if computed:  # statistics computed from text: kept with the output
            prepare_output_dir(out, CONFIG_FILE, overwrite)  # the old output ends here
            save_stats(stats, stats_file)
        elif stats_file.exists() and not (isinstance(calib, (str, Path))
                                          and real_path(calib) == real_path(stats_file)):
            # an old output's statistics are not this one's (read from there, they are)
            prepare_output_dir(out, CONFIG_FILE, overwrite)
            stats_file.unlink()
        save_mos(mos, out, result.report, overwrite=True)
    # the report as saved (with the tensor file's size)
    return ConvertResult(mos=mos, report=load_report(out) or result.report,
                         baseline=result.baseline)


def _distill(adapter: LoraAdapter, result: ConvertResult, config: ConvertConfig,
             stats: CalibStats | None, session: _Session, dconfig: DistillConfig,
             held_out: float, on_step: Callable[[int, float], None] | None) -> ConvertResult:
    """Distill ``result.mos``; its report is built for the distilled adapter against the
    conversion's baselines, with a ``distill`` section giving the truncation baseline's
    held-out KL next to the student's."""
    from .fit.measure import DataInputs, build_report
    from .fit.report import DistillSection
    from .model.data import split_blocks
    from .model.distill import distill as run_distill
    from .model.distill import mean_kl, resolve_device
    from .model.runtime import apply, remove

    model, _ = session.model
    try:
        train, held = split_blocks(session.blocks(), held_out)
    except FormatError as e:
        raise FormatError(f"{session.spec.data}: {e} (blocks of {session.spec.seq_len} "
                          f"tokens, {session.spec.max_tokens} tokens at most)",
                          options=("seq_len", "max_tokens")) from None
    log.info("distilling: %d train / %d held-out blocks, up to %d steps", train.shape[0],
             held.shape[0], dconfig.steps)
    try:
        res = run_distill(model, adapter, result.mos, train, held, dconfig, progress=on_step)
    except NumericalError as e:
        raise NumericalError(f"{session.spec.base_model} on {session.spec.data}: {e}") from None
    baseline = convert(adapter, replace(config, search="truncation")).mos
    device = resolve_device(dconfig.device)
    apply(model, adapter, name="teacher", activate=False)
    try:
        apply(model, baseline, name="truncation", activate=False)
        trunc_kl = mean_kl(model, held, "teacher", "truncation", batch_size=dconfig.batch_size,
                           device=device)
    finally:
        remove(model)
    section = DistillSection(
        **res.info, truncation_kl=trunc_kl, data=str(session.spec.data),
        data_sha256=sha256_file(Path(session.spec.data)),
        base_model=str(session.spec.base_model), gguf_file=session.spec.gguf_file)
    mos = replace(res.mos, info={**res.mos.info, "distilled": True})
    if result.mos.storage != Storage():  # trained in float: stored (re-quantized) again
        mos = store(mos, adapter, result.mos.storage, refit=stats is None)
    data = None if stats is None else DataInputs.from_raw(check_calib(adapter, stats),
                                                          stats.tokens)
    report = build_report(adapter, mos, result.baseline, config.settings(), data=data,
                          distill=section)
    return ConvertResult(mos=mos, report=report, baseline=result.baseline)


def source_provenance(lora_path: str | Path, adapter: LoraAdapter) -> dict[str, Any]:
    """``{"path", "files": [{name, bytes, sha256}]}`` of the files an adapter was read from."""
    files = [{"name": Path(p).name, "bytes": os.path.getsize(p), "sha256": sha256_file(Path(p))}
             for p in adapter.source_files]
    return {"path": str(lora_path), "files": files}


SERVER_RANKS = (8, 16, 32, 64, 128, 256, 512)  # vLLM's max_lora_rank choices


def export_lora(mos_dir: str | Path, out: str | Path, *, overwrite: bool = False,
                dtype: str = "auto", pad_rank: int | str | None = None) -> Path:
    """Materialize a MoS adapter as a standard PEFT LoRA folder.

    Scale is folded into ``B`` and ``lora_alpha == r`` (per-module ranks in
    ``rank_pattern``/``alpha_pattern``); non-LoRA tensors are restored under their
    original keys.  A module whose MoS rank is 0 is written as a rank-1 zero pair.
    ``dtype``: of the LoRA factors; ``auto`` = the MoS adapter's float dtype, float32 for a
    quantized adapter (its dequantized values are exact in float32).
    ``pad_rank``: every module padded with zero rows / columns to one rank (an integer, or
    ``auto``: the smallest of 8, 16, 32, ..., 512 that holds the largest module), so servers
    that read only the top-level ``r`` (vLLM, LoRAX: ``max_lora_rank``) load it unchanged;
    the update is the same (zeros add nothing).

    Raises:
        FormatError: the source was not PEFT (diffusers/kohya export is not supported).
    """
    from .mos.quant import FLOAT_DTYPES

    if dtype != "auto" and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be auto or one of {', '.join(FLOAT_DTYPES)}, got "
                          f"{dtype!r}", options=("dtype",))
    if same_or_inside(mos_dir, out):
        raise ConfigError(f"{out}: holds the input adapter {mos_dir}; write the LoRA to another "
                          "folder")
    mos = load_mos(mos_dir)
    _refuse_source(mos, Path(out))
    if dtype == "auto":  # int8/int4 values times float16 scales are exact in float32
        dtype = "float32" if mos.storage.quantized else mos.storage.dtype
    tdtype = FLOAT_DTYPES[dtype]
    fmt = mos.source.get("format")
    if fmt != "peft":
        raise FormatError(
            f"{mos_dir}: export writes PEFT folders, but this adapter came from a {fmt!r} "
            "source; exporting to that format is not supported yet"
        )
    modules, ranks = [], []
    for m in mos.modules:
        A, B = mos.assemble(m)
        B = B * m.scale
        if m.r == 0:
            pools = mos.kinds[m.kind]
            A = A.new_zeros(1, pools.d_in)
            B = B.new_zeros(pools.d_out, 1)
        A, B = A.to(tdtype), B.to(tdtype)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            fix = ("export as float32" if tdtype != torch.float32 else
                   "its scale times its factors is beyond float32; the adapter is damaged")
            raise NumericalError(f"{mos_dir}: module {m.name} does not fit {tdtype} (values "
                                 f"too large); {fix}")
        modules.append((m.name, A.contiguous(), B.contiguous(), m.embedding))
        ranks.append((m.name, int(A.shape[0])))
    if pad_rank is not None:
        modules, ranks = _pad_ranks(mos_dir, modules, pad_rank)
    base = dict(mos.source.get("config") or {})
    for key in ("rank_pattern", "alpha_pattern"):
        base.pop(key, None)
    cfg = peft_config(base, ranks)
    out = Path(out)
    # a failed export (disk full, interrupt) leaves no folder it made
    with writing(out, PEFT_CONFIG, overwrite):
        # adapter_model.safetensors, then adapter_config.json (the marker) last
        return write_peft_folder(out, modules, cfg, mos.extra_tensors, overwrite=overwrite)


def _refuse_source(mos: MosAdapter, out: Path) -> None:
    """An export never replaces the LoRA the adapter was converted from (its files, by
    size and sha256, as ``mos_config.json`` records them): that would trade the trained
    adapter for its lossy reconstruction."""
    files = mos.source.get("files") or []
    if not files or not all(isinstance(f, dict) for f in files):
        return
    for f in files:
        p = out / str(f.get("name"))
        if not p.is_file() or p.stat().st_size != f.get("bytes") or sha256_file(p) != f.get(
                "sha256"):
            return
    raise ConfigError(f"{out}: holds the LoRA this MoS adapter was converted from (its files "
                      "match the ones mos_config.json records); export to another folder")


def _pad_ranks(mos_dir: str | Path, modules: list, pad_rank: int | str) -> tuple[list, list]:
    """Modules padded with zeros to one rank (see :func:`export_lora`)."""
    top = max((int(A.shape[0]) for _, A, _, _ in modules), default=1)
    if pad_rank == "auto":
        fits = [r for r in SERVER_RANKS if r >= top]
        if not fits:
            raise ConfigError(f"{mos_dir}: a module has rank {top}, above every server rank "
                              f"({SERVER_RANKS[-1]} at most)", options=("pad_rank",))
        target = fits[0]
    elif isinstance(pad_rank, int) and not isinstance(pad_rank, bool) and pad_rank >= 1:
        target = pad_rank
        if top > target:
            raise ConfigError(f"{mos_dir}: a module has rank {top}, above the rank {target} "
                              f"to pad to (pad to {top} or more, or auto)")
    else:
        raise ConfigError(f"pad rank must be auto or an integer >= 1, got {pad_rank!r}",
                          options=("pad_rank",))
    out = []
    for name, A, B, emb in modules:
        k = int(A.shape[0])
        A = torch.cat([A, A.new_zeros(target - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], target - k)], dim=1)
        out.append((name, A.contiguous(), B.contiguous(), emb))
    return out, [(name, target) for name, *_ in modules]


def export_summary(folder: str | Path) -> dict[str, Any]:
    """What ``export --json`` prints of an exported PEFT folder: files, r, alpha, ranks."""
    import json

    folder = Path(folder)
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return {"out": str(folder), "files": files, "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "rank_pattern": cfg.get("rank_pattern", {}),
            "alpha_pattern": cfg.get("alpha_pattern", {})}


def evaluate_adapters(teacher: LoraAdapter | str | Path, student: MosAdapter | LoraAdapter | str | Path,
                      spec: DataSpec) -> dict[str, Any]:
    """``mosconv eval``: the fidelity of ``student`` (MoS folder or LoRA) to ``teacher`` (LoRA)
    on ``spec.data`` (see :func:`mosconv.model.distill.evaluate`).

    Raises:
        ConfigError: missing base model or data, adapters that do not fit the model.
    """
    from .model.distill import evaluate, resolve_device
    from .model.runtime import apply, remove

    spec.need("eval")
    session = _Session(spec)
    model, _ = session.model
    blocks = session.blocks()
    apply(model, teacher, name="teacher", activate=False)
    try:
        apply(model, student, name="student", activate=False)
        res = evaluate(model, blocks, "teacher", "student", batch_size=spec.batch_size,
                       device=resolve_device(spec.device))
    finally:
        remove(model)
    return {"teacher": str(teacher), "student": str(student), "data": str(spec.data), **res}
