"""Thin I/O on top of the library: read -> convert -> save, and export back to LoRA."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .convert import ConvertConfig, ConvertResult, convert
from .errors import FormatError
from .fileio import prepare_output_dir, sha256_file
from .mos_format import CONFIG_FILE, load_mos, save_mos
from .readers import read_adapter
from .writers import peft_config, write_peft_folder


def compress(
    lora_path: str | Path,
    out: str | Path,
    config: ConvertConfig | None = None,
    *,
    command: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    extra_info: dict | None = None,
) -> ConvertResult:
    """Read a LoRA, convert it, and write the MoS folder ``out``.

    The source files' sha256 and the command line are recorded in ``mos_config.json``.
    Raises FormatError/ConfigError/MosconvError; a failed run leaves no ``mos_config.json``.
    """
    config = config or ConvertConfig()
    out = Path(out)
    created = not out.exists()
    prepare_output_dir(out, CONFIG_FILE, overwrite)  # fail before the work, not after
    try:
        adapter = read_adapter(lora_path)
        result = convert(adapter, config, progress=progress)
        mos = replace(result.mos,
                      source={**result.mos.source, **source_provenance(lora_path, adapter)},
                      info={**result.mos.info, "command": command, **(extra_info or {})})
        save_mos(mos, out, result.report, overwrite=True)
    except BaseException:
        if created:  # leave nothing behind that we made
            shutil.rmtree(out, ignore_errors=True)
        raise
    return ConvertResult(mos=mos, report=result.report)


def source_provenance(lora_path: str | Path, adapter) -> dict:
    """``{"path", "files": [{name, bytes, sha256}]}`` of the files an adapter was read from."""
    files = [{"name": Path(p).name, "bytes": os.path.getsize(p), "sha256": sha256_file(Path(p))}
             for p in adapter.source_files]
    return {"path": str(lora_path), "files": files}


def export_lora(mos_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Materialize a MoS adapter as a standard PEFT LoRA folder.

    Scale is folded into ``B`` and ``lora_alpha == r`` (per-module ranks in
    ``rank_pattern``/``alpha_pattern``); non-LoRA tensors are restored under their
    original keys.  A module whose MoS rank is 0 is written as a rank-1 zero pair.

    Raises:
        FormatError: the source was not PEFT (diffusers/kohya export is not supported).
    """
    mos = load_mos(mos_dir)
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
        modules.append((m.name, A.contiguous(), B.contiguous(), m.embedding))
        ranks.append((m.name, int(A.shape[0])))
    base = dict(mos.source.get("config") or {})
    for key in ("rank_pattern", "alpha_pattern"):
        base.pop(key, None)
    cfg = peft_config(base, ranks)
    return write_peft_folder(Path(out), modules, cfg, mos.extra_tensors, overwrite=overwrite)
