"""The MoS adapter format, versions 1 to 3: the one place that knows tensor names and file layout.

Version 2 adds optional per-module cores (``mos.cores.<name>``). Version 3 adds the storage
(``storage`` in ``mos_config.json``: float dtype, or int8/int4 values with float16 scales
``mos.scales.<kid>.A``, ``mos.core_scales.<name>``) and does not store routes that are a
module's own private range in order (``implicit_routes``). A file is written with the lowest
version that holds it, so older readers keep loading what they could before.

A MoS folder holds ``mos_adapter.safetensors``, ``report.json`` and
``mos_config.json`` (written last: its presence means the folder is complete).
See ``docs/format.md`` for every tensor and field; the in-memory types and their assembly
are in :mod:`mosconv.mos.types`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import FormatError
from ..fileio import (
    atomic_write_bytes,
    atomic_write_json,
    prepare_output_dir,
    real_path,
    safetensors_bytes,
)
from ..fit.report import Report
from ..lora.read._io import check_finite, load_tensor_file
from ..names import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSION_CORES,
    FORMAT_VERSION_STORAGE,
    FORMAT_VERSIONS,
    POOLS_DIR,
    REPORT_FILE,
    TENSOR_FILE,
    kind_ids,
)
from .manifest import load_report, mos_folder
from .quant import FLOAT_DTYPES, QUANTIZE, SCALE_DTYPE, Storage, StorageOverflow, decode, encode
from .quant import n_groups as _n_groups
from .types import KindPools, MosAdapter, MosModule, implicit_routes, route_dtype

__all__ = ["format_version", "is_mos_dir", "load_mos", "load_report", "save_mos", "to_tensors"]

# ---------------------------------------------------------------- saving


def format_version(mos: MosAdapter) -> int:
    """The lowest format version that holds ``mos``."""
    if mos.storage.quantized or any(implicit_routes(m, side) for m in mos.modules
                                    for side in "AB"):
        return FORMAT_VERSION_STORAGE
    if any(m.core is not None for m in mos.modules):
        return FORMAT_VERSION_CORES
    return FORMAT_VERSION


def to_tensors(mos: MosAdapter) -> tuple[dict[str, torch.Tensor], dict]:
    """The safetensors dict and the JSON config of a MoS adapter (no I/O).

    Raises:
        FormatError: values that the storage cannot hold (beyond float16's range).
    """
    ids = kind_ids(mos.kinds)
    version = format_version(mos)
    st = mos.storage if version == FORMAT_VERSION_STORAGE else Storage(mos.storage.dtype)
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, x: torch.Tensor, scale_name: str) -> None:
        if version == FORMAT_VERSION_STORAGE and x.shape[0] == 0:
            return  # v3: an empty pool is not stored (its kind declares 0 entries)
        try:
            values, scales = encode(x, st)
        except StorageOverflow as e:
            raise FormatError(f"{name}: {e}; store it as float32 or bfloat16") from None
        tensors[name] = values
        if scales is not None:
            tensors[scale_name] = scales

    kinds_cfg = []
    for kind, p in mos.kinds.items():
        kid = ids[kind]
        nA, nB = (p.shared["n_A"], p.shared["n_B"]) if p.shared else (0, 0)
        put(f"mos.pools.{kid}.A", p.pool_A[nA:], f"mos.scales.{kid}.A")
        put(f"mos.pools.{kid}.B", p.pool_B[nB:], f"mos.scales.{kid}.B")
        entry = {
            "id": kid, "kind": kind, "d_in": p.d_in, "d_out": p.d_out, "nc": p.nc,
            "pool_A": int(p.pool_A.shape[0]), "pool_B": int(p.pool_B.shape[0]),
            "public_A": p.public_A, "public_B": p.public_B,
        }
        if p.shared:
            entry["shared_pool"] = dict(p.shared)
        kinds_cfg.append(entry)
    modules_cfg = []
    for m in mos.modules:
        p = mos.kinds[m.kind]
        implicit = [side for side in "AB" if version == FORMAT_VERSION_STORAGE
                    and implicit_routes(m, side)]
        if "A" not in implicit:
            tensors[f"mos.routes.{m.name}.A"] = m.routes_A.to(route_dtype(p.pool_A.shape[0]))
        if "B" not in implicit:
            tensors[f"mos.routes.{m.name}.B"] = m.routes_B.to(route_dtype(p.pool_B.shape[0]))
        if m.weights_A is not None:
            tensors[f"mos.weights.{m.name}.A"] = m.weights_A.to(st.torch_dtype)
            tensors[f"mos.weights.{m.name}.B"] = m.weights_B.to(st.torch_dtype)
        entry = {
            "name": m.name, "kind": ids[m.kind], "r": m.r, "scale": m.scale,
            "private_A": list(m.private_A), "private_B": list(m.private_B),
            "weights": m.weights_A is not None, "embedding": m.embedding,
            "conv_shape": list(m.conv_shape) if m.conv_shape else None,
        }
        if m.core is not None:
            put(f"mos.cores.{m.name}", m.core.contiguous(), f"mos.core_scales.{m.name}")
            entry["core"] = True
            entry["r_A"] = m.r_A
        if implicit:
            entry["implicit_routes"] = implicit
        modules_cfg.append(entry)
    for key, t in mos.extra_tensors.items():
        tensors[f"extra.{key}"] = t
    config = {
        "format": FORMAT_NAME,
        "format_version": version,
        **mos.info,
        "params": mos.params,
        "local_params": mos.local_params,
        "index_bytes": mos.index_bytes,
    }
    if version == FORMAT_VERSION_STORAGE:
        config["storage"] = st.to_json()
    config.update(source=mos.source, kinds=kinds_cfg, modules=modules_cfg)
    return tensors, config


def save_mos(mos: MosAdapter, out: str | Path, report: Report | None = None, *,
             overwrite: bool = False) -> Path:
    """Write a MoS folder: tensors, then ``report.json``, then ``mos_config.json`` (last).

    The report written gains the tensor file's size (``totals.mos_file_bytes``)."""
    out = Path(out)
    prepare_output_dir(out, CONFIG_FILE, overwrite)
    tensors, config = to_tensors(mos)
    # one key only: safetensors writes metadata in hash-map order, so two keys would make
    # the header bytes differ between runs
    meta = {"format": f"{FORMAT_NAME}.v{config['format_version']}"}
    data = safetensors_bytes(tensors, meta)
    atomic_write_bytes(out / TENSOR_FILE, data)
    if report is not None:
        atomic_write_json(out / REPORT_FILE, report.with_file_bytes(len(data)).to_json())
    atomic_write_json(out / CONFIG_FILE, config)
    return out


# ---------------------------------------------------------------- loading


def is_mos_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() or (p.is_file() and p.name == CONFIG_FILE)


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise FormatError(f"{where}: invalid MoS adapter: {what}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _show(value) -> str:
    """``repr`` of a JSON value, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The widest layer side a MoS file may declare (16x the largest vocabularies): export and
# apply allocate a dropped module's zero factors from the declared widths alone, so a tiny
# crafted file must not declare terabytes.
MAX_WIDTH = 2**24


def _field(obj: dict, key: str, cfg_path: Path, where: str, *, lo: int = 0,
           hi: int | None = None, default=None) -> int:
    """``obj[key]``: a JSON integer in ``[lo, hi]`` (``default`` when absent)."""
    value = obj.get(key, default)
    _need(_is_int(value) and value >= lo and (hi is None or value <= hi), cfg_path,
          f"{where}: {key} is {_show(value)}, expected an integer >= {lo}"
          + (f" and <= {hi}" if hi is not None else ""))
    return value


def load_mos(path: str | Path, pool_cache: dict | None = None) -> MosAdapter:
    """Load and validate a MoS folder (routes in range, pool shapes, ranks).

    ``pool_cache``: a dict kept across calls, so that the members of a zoo read and hash
    their group's pool file once (each member's recorded sha256 is still checked).

    Raises:
        FormatError: missing or corrupt files, wrong version, inconsistent tensors.
    """
    folder = mos_folder(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: not a MoS adapter (no {CONFIG_FILE}; an incomplete "
                          "or interrupted output has none)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # also bad UTF-8, absurd numbers, nesting
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise FormatError(f"{cfg_path}: cannot read MoS config ({msg})") from None
    _need(isinstance(cfg, dict) and cfg.get("format") == FORMAT_NAME, cfg_path,
          f"'format' is not {FORMAT_NAME!r}")
    version = cfg.get("format_version")
    _need(_is_int(version) and version in FORMAT_VERSIONS, cfg_path,
          f"format_version {_show(version)} is not supported (this mosconv reads "
          f"{' and '.join(map(str, FORMAT_VERSIONS))})")
    for key, kind in (("kinds", list), ("modules", list), ("source", dict)):
        _need(isinstance(cfg.get(key, {} if key == "source" else None), kind), cfg_path,
              f"{key!r} is {_show(cfg.get(key))}, expected a JSON {kind.__name__}")
    _need(len(cfg["modules"]) > 0, cfg_path,
          "'modules' is empty (every adapter mosconv writes holds a module at least)")
    source_cfg = cfg.get("source", {}).get("config")
    _need(source_cfg is None or isinstance(source_cfg, dict), cfg_path,
          f"source.config is {_show(source_cfg)}, expected an object or null")
    tensors, _ = load_tensor_file(folder / TENSOR_FILE)
    tpath = folder / TENSOR_FILE
    try:
        kinds, modules = _kinds_and_modules(folder, cfg, cfg_path, tpath, tensors, version,
                                            pool_cache)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as e:
        # a safety net: every field is checked above, so this means a check is missing
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise FormatError(f"{cfg_path}: invalid MoS config ({type(e).__name__}: {msg})") from None
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    info = {k: v for k, v in cfg.items()
            if k not in ("format", "format_version", "source", "kinds", "modules", "params",
                         "local_params", "index_bytes", "storage")}
    return MosAdapter(kinds=kinds, modules=tuple(modules), extra_tensors=extra,
                      source=cfg.get("source", {}), info=info,
                      storage=_storage(cfg, cfg_path, tensors, version))


def _storage(cfg: dict, cfg_path: Path, tensors: dict, version: int) -> Storage:
    """The storage a config declares (v3), or that its float pools have (v1, v2)."""
    if version < FORMAT_VERSION_STORAGE:
        dtypes = {t.dtype for k, t in tensors.items() if k.startswith("mos.pools.")}
        names = [n for n, d in FLOAT_DTYPES.items() if d in dtypes]
        return Storage(names[0] if len(names) == 1 else "float32")
    return _read_storage(cfg, cfg_path)


def _read_storage(cfg: dict, cfg_path: Path) -> Storage:
    st = cfg.get("storage")
    _need(isinstance(st, dict), cfg_path, f"storage is {_show(st)}, expected an object")
    dtype, quant = st.get("dtype"), st.get("quantize", "none")
    _need(dtype in FLOAT_DTYPES, cfg_path,
          f"storage.dtype is {_show(dtype)}, expected one of {', '.join(FLOAT_DTYPES)}")
    _need(quant in QUANTIZE, cfg_path,
          f"storage.quantize is {_show(quant)}, expected one of {', '.join(QUANTIZE)}")
    group = _field(st, "group", cfg_path, "storage", lo=1, default=64) if quant != "none" else 64
    return Storage(dtype, quant, group)


def _kinds_and_modules(folder: Path, cfg: dict, cfg_path: Path, tpath: Path, tensors: dict,
                       version: int = FORMAT_VERSION, pool_cache: dict | None = None
                       ) -> tuple[dict[str, KindPools], list[MosModule]]:
    """The validated pools and modules of a MoS config whose top level is checked."""
    shared_cache: dict = pool_cache if pool_cache is not None else {}
    st = _read_storage(cfg, cfg_path) if version >= FORMAT_VERSION_STORAGE else Storage()
    kinds: dict[str, KindPools] = {}
    id_to_kind: dict[str, str] = {}
    for i, k in enumerate(cfg["kinds"]):
        _need(isinstance(k, dict), cfg_path, f"kinds[{i}] is {_show(k)}, expected an object")
        kid, kind = k.get("id"), k.get("kind")
        _need(isinstance(kid, str) and isinstance(kind, str) and kid.isprintable()
              and kind.isprintable(), cfg_path,
              f"kinds[{i}] has id {_show(kid)} and kind {_show(kind)}, expected strings")
        _need(kid not in id_to_kind and kind not in kinds, cfg_path,
              f"kind {kid} ({kind}) appears twice")
        nc = _field(k, "nc", cfg_path, f"kind {kid}", lo=1)
        d_in, d_out = (_field(k, f, cfg_path, f"kind {kid}", lo=1, hi=MAX_WIDTH)
                       for f in ("d_in", "d_out"))
        _need(d_in % nc == 0 and d_out % nc == 0, cfg_path,
              f"kind {kid}: nc={nc} does not divide d_in={d_in} and d_out={d_out}")
        sA, sB = d_in // nc, d_out // nc
        shared = k.get("shared_pool")
        if shared is not None:
            _need(isinstance(shared, dict), cfg_path,
                  f"kind {kid}: shared_pool is {_show(shared)}, expected an object")
        sa = sb = None
        if shared:
            sa, sb = _shared_pools(folder, cfg_path, kid, shared, shared_cache, (sA, sB), st)
        # v3 does not store an empty (own part of a) pool
        n_shared = (0 if sa is None else sa.shape[0], 0 if sb is None else sb.shape[0])
        empty = [version >= FORMAT_VERSION_STORAGE and f"mos.pools.{kid}.{side}" not in tensors
                 and k.get(f"pool_{side}") == n for side, n in zip("AB", n_shared)]
        pa = torch.zeros(0, sA) if empty[0] else _stored(
            tensors, f"mos.pools.{kid}.A", f"mos.scales.{kid}.A", sA, st, tpath)
        pb = torch.zeros(0, sB) if empty[1] else _stored(
            tensors, f"mos.pools.{kid}.B", f"mos.scales.{kid}.B", sB, st, tpath)
        if shared:
            pa, pb = torch.cat([sa, pa.to(sa.dtype)]), torch.cat([sb, pb.to(sb.dtype)])
        for side, pool in (("A", pa), ("B", pb)):
            declared = k.get(f"pool_{side}")
            _need(declared is None or (_is_int(declared) and declared == pool.shape[0]), cfg_path,
                  f"kind {kid} declares pool_{side}={_show(declared)} but the tensor has "
                  f"{pool.shape[0]} shards")
        check_finite(tpath, f"mos.pools.{kid}", pa)
        check_finite(tpath, f"mos.pools.{kid}", pb)
        public = [_field(k, f"public_{side}", cfg_path, f"kind {kid}", default=0,
                         hi=int(pool.shape[0])) for side, pool in (("A", pa), ("B", pb))]
        kinds[kind] = KindPools(kind, d_in, d_out, nc, pa.float(), pb.float(), public[0],
                                public[1], dict(shared) if shared else None)
        id_to_kind[kid] = kind
    modules = []
    names = set()
    for i, m in enumerate(cfg["modules"]):
        _need(isinstance(m, dict), cfg_path, f"modules[{i}] is {_show(m)}, expected an object")
        name = m.get("name")
        _need(isinstance(name, str) and name.isprintable() and name not in names, cfg_path,
              f"modules[{i}] has name {_show(name)}, expected a string that no other module has")
        names.add(name)
        where = f"module {name}"
        _need(isinstance(m.get("kind"), str) and m["kind"] in id_to_kind, cfg_path,
              f"{where} names unknown kind {_show(m.get('kind'))}")
        r = _field(m, "r", cfg_path, where)
        # with a core, A_l has r_A rows (C_l is r x r_A); otherwise r
        r_A = _field(m, "r_A", cfg_path, where, default=r) if m.get("core") is True else r
        pools = kinds[id_to_kind[m["kind"]]]
        implicit = m.get("implicit_routes", [])
        _need(isinstance(implicit, list) and all(x in ("A", "B") for x in implicit)
              and (not implicit or version >= FORMAT_VERSION_STORAGE), cfg_path,
              f"{where}: implicit_routes is {_show(implicit)}, expected a list of 'A'/'B' "
              "(format_version 3)")
        private = []
        for side, pool in (("A", pools.pool_A), ("B", pools.pool_B)):
            rng = m.get(f"private_{side}", [0, 0])
            _need(isinstance(rng, list) and len(rng) == 2 and all(_is_int(x) for x in rng)
                  and 0 <= rng[0] <= rng[1] <= pool.shape[0], cfg_path,
                  f"{where}: private_{side} is {_show(rng)}, expected [start, stop] within the "
                  f"pool of {pool.shape[0]} shards")
            private.append(tuple(rng))
        routes = []
        for side, pool, rank, rng in (("A", pools.pool_A, r_A, private[0]),
                                      ("B", pools.pool_B, r, private[1])):
            if side in implicit:  # the module's private range, in order
                _need(rng[1] - rng[0] == rank * pools.nc, cfg_path,
                      f"{where} has implicit {side} routes but private_{side} {list(rng)} "
                      f"does not hold {rank * pools.nc} shards")
                routes.append(torch.arange(rng[0], rng[1], dtype=torch.int64))
                continue
            t = tensors.get(f"mos.routes.{name}.{side}")
            _need(t is not None, tpath, f"routes of {where} ({side}) missing")
            _need(t.dim() == 1, tpath,
                  f"routes of {where} ({side}) have shape {tuple(t.shape)}, expected 1-D")
            _need(t.numel() == rank * pools.nc, tpath,
                  f"routes of {where} ({side}) have {t.numel()} entries, expected "
                  f"{rank * pools.nc}")
            _need(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
                  tpath, f"routes of {where} ({side}) have dtype {t.dtype}, expected integers")
            t = t.to(torch.int64)
            _need(t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) < pool.shape[0]), tpath,
                  f"routes of {where} ({side}) point outside the pool of {pool.shape[0]} shards")
            routes.append(t)
        weights = [None, None]
        flags = {f: m.get(f, False) for f in ("weights", "embedding", "core")}
        for flag, value in flags.items():
            _need(isinstance(value, bool), cfg_path,
                  f"{where}: {flag} is {_show(value)}, expected true or false")
        if flags["weights"]:
            for j, (side, rank) in enumerate((("A", r_A), ("B", r))):
                w = tensors.get(f"mos.weights.{name}.{side}")
                _need(w is not None and w.is_floating_point() and w.numel() == rank * pools.nc,
                      tpath,
                      f"weights of {where} ({side}) missing, not float or of wrong size")
                check_finite(tpath, f"mos.weights.{name}.{side}", w)
                weights[j] = w.float().reshape(-1)
        core = None
        if flags["core"]:
            _need(version >= FORMAT_VERSION_CORES, cfg_path,
                  f"{where} has a core, which format_version {version} does not have")
            core = _stored(tensors, f"mos.cores.{name}", f"mos.core_scales.{name}", r_A, st,
                           tpath, rows=r, what=f"core of {where}")
            check_finite(tpath, f"mos.cores.{name}", core)
        scale = m.get("scale")
        _need(isinstance(scale, (int, float)) and not isinstance(scale, bool), cfg_path,
              f"{where} has scale {_show(scale)}, expected a number")
        _need(math.isfinite(scale), cfg_path, f"{where} has non-finite scale")
        conv = m.get("conv_shape")
        _need(conv is None or (isinstance(conv, list) and len(conv) == 4
                               and all(_is_int(x) and x >= 1 for x in conv)
                               and conv[0] == pools.d_out
                               and conv[1] * conv[2] * conv[3] == pools.d_in), cfg_path,
              f"{where}: conv_shape is {_show(conv)}, expected null or [out, in, kh, kw] with "
              f"out = {pools.d_out} and in*kh*kw = {pools.d_in}")
        modules.append(MosModule(
            name=name, kind=id_to_kind[m["kind"]], r=r, scale=float(scale),
            routes_A=routes[0], routes_B=routes[1], weights_A=weights[0], weights_B=weights[1],
            private_A=private[0], private_B=private[1], embedding=flags["embedding"],
            conv_shape=tuple(conv) if conv else None, core=core,
        ))
    return kinds, modules


def _stored(tensors: dict, name: str, scale_name: str, width: int, st: Storage, tpath: Path,
            *, rows: int | None = None, what: str | None = None) -> torch.Tensor:
    """float32 values of a stored ``(N, width)`` matrix (``rows`` fixes ``N``): a float
    tensor, or int8 / packed int4 values with their float16 scales."""
    what = what or f"pool {name}"
    t = tensors.get(name)
    want = f"{rows if rows is not None else 'N'}, "
    if not st.quantized:
        _need(t is not None and t.is_floating_point() and t.dim() == 2 and t.shape[1] == width
              and (rows is None or t.shape[0] == rows), tpath,
              f"{what} " + ("is missing" if t is None else f"has shape {tuple(t.shape)} {t.dtype}")
              + f", expected float ({want}{width})")
        return t.float()
    packed = st.quantize == "int4"
    cols, dtype = ((width + 1) // 2, torch.uint8) if packed else (width, torch.int8)
    _need(t is not None and t.dtype == dtype and t.dim() == 2 and t.shape[1] == cols
          and (rows is None or t.shape[0] == rows), tpath,
          f"{what} " + ("is missing" if t is None else f"has shape {tuple(t.shape)} {t.dtype}")
          + f", expected {str(dtype).removeprefix('torch.')} ({want}{cols})"
          + (" (int4, two per byte)" if packed else ""))
    s = tensors.get(scale_name)
    groups = _n_groups(width, st.group)
    _need(s is not None and s.dtype == SCALE_DTYPE and tuple(s.shape) == (t.shape[0], groups),
          tpath, f"scales {scale_name} " + ("are missing" if s is None
                                             else f"have shape {tuple(s.shape)} {s.dtype}")
          + f", expected float16 ({t.shape[0]}, {groups})")
    _need(bool(torch.isfinite(s).all()) and bool((s >= 0).all()), tpath,
          f"scales {scale_name} hold non-finite or negative values")
    return decode(t, s, st, width)


# Where a zoo member's pool file lies: OUT/pools/ seen from OUT/<name>/, nothing else (a
# crafted file naming /etc/... or a path down elsewhere is not read, nor hashed).
_POOL_REF = re.compile(rf"(?:\.\./)+{POOLS_DIR}/[^/\\]+\.safetensors")


def _shared_pools(folder: Path, cfg_path: Path, kid: str, ref: dict, cache: dict,
                  widths: tuple[int, int], st: Storage | None = None):
    """The shared ``(A, B)`` entries of one kind from a zoo's pool file, hash-checked, stored
    like the member's pools (``st``: a float dtype, or quantized values under ``key_A`` with
    their float16 scales under ``key_A + ".scales"``)."""
    from ..fileio import sha256_file

    _need(isinstance(ref, dict) and isinstance(ref.get("file"), str)
          and "\0" not in ref["file"], cfg_path, f"kind {kid}: shared_pool has no file")
    _need(isinstance(ref.get("sha256"), str), cfg_path,
          f"kind {kid}: shared_pool has sha256 {_show(ref.get('sha256'))}, expected a string")
    _need(_POOL_REF.fullmatch(ref["file"]) is not None, cfg_path,
          f"kind {kid}: shared_pool file {_show(ref['file'])} is not a zoo's pool file "
          f"(../{POOLS_DIR}/<group>.safetensors, relative to the adapter's folder)")
    path = real_path(folder / ref["file"])
    if str(path) not in cache:
        if not path.is_file():
            raise FormatError(f"{cfg_path}: kind {kid} needs the shared pool file {path}, "
                              "which is missing")
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read shared pool file ({e.strerror or e})") from None
        cache[str(path)] = [digest, None]  # tensors read once a member's sha256 matches
    hit = cache[str(path)]
    digest = hit[0]
    _need(digest == ref["sha256"], cfg_path,
          f"shared pool file {path} has sha256 {digest[:12]}..., expected "
          f"{ref['sha256'][:12]}... (changed or replaced)")
    if hit[1] is None:
        hit[1] = load_tensor_file(path)[0]
    tensors = hit[1]
    out = []
    for side, width in zip("AB", widths):
        key = ref.get(f"key_{side}")
        n = _field(ref, f"n_{side}", cfg_path, f"kind {kid}: shared_pool", default=0)
        if n == 0:
            out.append(torch.zeros(0, width))
            continue
        _need(isinstance(key, str), cfg_path, f"kind {kid}: shared pool tensor key_{side} is "
              f"{_show(key)}, expected a string")
        out.append(_stored(tensors, key, f"{key}.scales", width, st or Storage(), path, rows=n,
                           what=f"shared pool tensor {key}"))
    return tuple(out)
