"""Converting whole adapter zoos: discovery, resumable runs, parallel jobs, shared pools.

``OUT`` mirrors the zoo: the adapter at ``ZOO/a/b`` is written to ``OUT/a/b`` (a single
file ``ZOO/a/x.safetensors`` to ``OUT/a/x``).  A finished adapter folder holds
``mos_config.json`` with the sha256 of its source files; a rerun skips it when those still
match and redoes anything incomplete, so a killed run continued later ends with the same
bytes as an uninterrupted one.  In shared-pool mode each group's pools are written to
``OUT/pools/<group>.safetensors`` (before its adapters, which refer to it by sha256).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, FormatError, MosconvError, check_seed
from ..fileio import (
    atomic_write_bytes,
    atomic_write_json,
    missing,
    real_path,
    remove_stale_tmp,
    safetensors_bytes,
    same_or_inside,
    sha256_file,
)
from ..lora.read import resolve_adapter_path
from ..mos.manifest import (
    load_report,
    read_manifest,
    read_pool_members,
    read_pool_record,
    write_pool_members,
)
from ..names import (
    CONFIG_FILE,
    PEFT_WEIGHTS,
    POOLS_DIR,
    TENSOR_FILE,
    pool_file,
    pool_members_file,
)
from ..names import PEFT_CONFIG as CONFIG_NAME

if TYPE_CHECKING:
    from ..fit.report import Report
    from ..fit.zoo import ChunkedFit
    from ..lora.types import LoraAdapter
    from ..mos.quant import Storage
    from ..mos.types import MosAdapter

SUMMARY_FILE = "summary.json"
_SUFFIXES = (".safetensors", ".bin")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

log = logging.getLogger("mosconv")  # mosconv -v shows these


@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch run (the per-adapter ones are those of ``compress``)."""

    ratio: float = 8.0
    seed: int = 0
    search: str = "fast"
    iters: int = 4
    routing_weights: bool = True
    dtype: str = "auto"
    quantize: str = "none"
    size_ratio: float | None = None
    jobs: int = 1
    engine: str = "local"
    address: str | None = None
    shared_pool: bool = False
    overwrite: bool = False
    refit: bool = False  # shared_pool: refit groups that gained adapters (else add to them)
    chunk: int = 32  # shared_pool: adapters held, factorized and built together (a leaf of the
    # joint-basis reductions; with Ray, one task and one object-store entry)

    def settings(self) -> dict:
        """What an output must have been made with to count as done on a rerun."""
        out = {"ratio": float(self.ratio), "seed": self.seed, "search": self.search,
               "iters": self.iters, "shared_pool": self.shared_pool}
        if not self.routing_weights:  # recorded only when off: outputs made before the
            out["routing_weights"] = False  # option existed (weights on) still count as done
        for key, default in (("dtype", "auto"), ("quantize", "none"), ("size_ratio", None)):
            if getattr(self, key) != default:  # likewise
                out[key] = getattr(self, key)
        return out

    def validate(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or self.ratio < 1:
            raise ConfigError(f"ratio must be a number >= 1, got {self.ratio!r}")
        check_seed(self.seed)
        if self.refit and not self.shared_pool:
            raise ConfigError("refit is used with a shared pool", options=("shared_pool",))
        if self.address is not None and self.engine != "ray":
            raise ConfigError("an address is used with the Ray engine", options=("engine",))
        if self.jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {self.jobs}")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be local or ray, got {self.engine!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"chunk must be an integer >= 1, got {self.chunk!r}")
        if self.quantize == "auto" and self.size_ratio is None:  # (without importing torch)
            raise ConfigError("quantize auto chooses by size: it needs a size ratio",
                              options=("size_ratio",))


@dataclass(frozen=True)
class Item:
    """One adapter of the zoo: its source path and its output folder name (relative)."""

    name: str
    source: str


@dataclass
class Outcome:
    """What happened to one adapter (a row of ``summary.json``)."""

    name: str
    source: str
    status: str  # converted | skipped | failed
    seconds: float = 0.0
    lora_params: int | None = None
    mos_params: int | None = None
    local_params: int | None = None
    relative_error: float | None = None
    truncation_relative_error: float | None = None
    group: str | None = None
    error: str | None = None
    energy: float | None = None
    lora_tensor_bytes: int | None = None  # the source's LoRA factors as stored
    mos_tensor_bytes: int | None = None  # its own tensors as stored (a pool file apart)
    # truncation stored alike in no more bytes (the baseline under a byte budget)
    truncation_equal_bytes_relative_error: float | None = None


def outcome_from_report(item: Item, dest: Path, status: str, seconds: float,
                        group: str | None = None) -> Outcome:
    """An outcome whose numbers come from the ``report.json`` in ``dest``."""
    try:
        report = load_report(dest)
    except (OSError, MosconvError):
        report = None
    if report is None:
        return Outcome(item.name, item.source, status, seconds, group=group)
    t = report.totals
    local = t.local_params if t.local_params is not None else t.mos_params
    return Outcome(item.name, item.source, status, seconds, t.lora_params, t.mos_params,
                   local, t.relative_error, t.truncation_relative_error, group, None,
                   report.energy, t.lora_tensor_bytes, t.mos_tensor_bytes,
                   # the baseline of a byte budget: a group member has it under one only
                   t.truncation_equal_bytes_relative_error if t.size_ratio is not None else None)


# ---------------------------------------------------------------- discovery


def safe_name(rel: str) -> str:
    """A relative output path that cannot escape the output folder."""
    parts = [p for p in re.split(r"[\\/]+", rel) if p not in ("", ".", "..")]
    parts = [_SAFE.sub("_", p).lstrip(".") or "_" for p in parts]
    if not parts:
        raise ConfigError(f"adapter path {rel!r} gives an empty output name")
    return "/".join(parts)


def discover(zoo: str | Path, exclude: str | Path | None = None) -> list[Item]:
    """Adapters under a folder (recursive, sorted) or listed in a text file (one per line).

    ``exclude`` (the output folder, when it lies inside the zoo) is not searched.  Links to
    folders are followed (each folder is searched once).  A zoo that is itself one adapter
    (a PEFT folder or a weight file) gives a zoo of one.
    """
    zoo = Path(zoo)
    if not zoo.exists():
        raise FormatError(f"{zoo}: {missing(zoo)}")
    skip = real_path(exclude) if exclude is not None else None
    items: list[Item] = []
    if zoo.is_file() and (zoo.suffix in (*_SUFFIXES, ".pt", ".pth") or zoo.name == CONFIG_NAME):
        target = zoo.parent if zoo.name == CONFIG_NAME or (zoo.parent / CONFIG_NAME).is_file() \
            else zoo
        name = target.name if target.is_dir() else target.stem
        return [Item(safe_name(name or "adapter"), str(target))]
    if zoo.is_dir() and (zoo / CONFIG_NAME).is_file():
        return [Item(safe_name(real_path(zoo).name or "adapter"), str(zoo))]
    if zoo.is_file():
        base = zoo.parent
        try:
            lines = zoo.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as e:
            raise FormatError(f"{zoo}: not a folder nor a text file listing adapters ({e})") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "\0" in line:
                raise FormatError(f"{zoo}: line {n}: not a path (it holds a NUL byte)")
            p = Path(line) if Path(line).is_absolute() else base / line
            rel = os.path.relpath(p, base)
            items.append(Item(safe_name(rel.removesuffix(p.suffix) if p.is_file() else rel), str(p)))
    else:
        if skip is not None and real_path(zoo) == skip:
            raise ConfigError(f"{zoo}: is also the output folder; write the outputs to another "
                              "folder (one inside the zoo is fine)")
        seen: set[Path] = set()
        unreadable: list[OSError] = []  # folders that cannot be listed: failed, not skipped
        for dirpath, dirnames, filenames in os.walk(zoo, onerror=unreadable.append,
                                                    followlinks=True):
            dirnames.sort()
            d = Path(dirpath)
            real = real_path(d)
            if (skip is not None and real == skip) or real in seen:  # the output; a link loop
                dirnames[:] = []
                continue
            seen.add(real)
            if CONFIG_NAME in filenames or CONFIG_NAME in dirnames:  # read_adapter names
                # a config that is not a file (a folder, a broken link) as the problem
                items.append(Item(safe_name(os.path.relpath(d, zoo)), str(d)))
                dirnames[:] = []  # a PEFT folder's contents belong to it
                continue
            for fn in sorted(filenames):
                if fn.endswith(_SUFFIXES):
                    rel = os.path.relpath(d / fn, zoo)
                    items.append(Item(safe_name(rel.rsplit(".", 1)[0]), str(d / fn)))
        for e in unreadable:  # convert_one names the problem (cannot read ...)
            if e.filename is not None and Path(e.filename) != zoo:
                items.append(Item(safe_name(os.path.relpath(e.filename, zoo)), str(e.filename)))
            elif e.filename is not None:
                raise FormatError(f"{zoo}: cannot read ({e.strerror or e})")
    names = [i.name for i in items]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{zoo}: several adapters map to the output name(s) {sorted(dup)}")
    if not items:
        raise FormatError(f"{zoo}: no adapters found")
    return items


def source_hashes(source: str) -> list[dict]:
    """``[{name, sha256}]`` of the files an adapter is read from (as ``compress`` records)."""
    family, p = resolve_adapter_path(source)
    files = ([p / CONFIG_NAME] + [p / n for n in PEFT_WEIGHTS if (p / n).is_file()][:1]
             if family == "peft" else [p])
    return [{"name": f.name, "sha256": sha256_file(f)} for f in files]


def is_complete(out_dir: Path, source: str, settings: dict | None = None,
                group: str | None = None) -> bool:
    """True when ``out_dir`` holds a finished conversion of the unchanged ``source``, made
    with the same batch ``settings`` and in the same shared-pool ``group`` (None: none),
    with its tensor file whole (a header that reads, data of the size it declares) and its
    report."""
    from ..lora.read._header import read_safetensors_header

    if not (out_dir / CONFIG_FILE).is_file():
        return False
    try:
        manifest = read_manifest(out_dir)
        want = source_hashes(source)
        read_safetensors_header(out_dir / TENSOR_FILE)
        if load_report(out_dir) is None:
            return False
    except (OSError, MosconvError):
        return False
    if list(manifest.source_files) != [(f["name"], f["sha256"]) for f in want]:
        return False
    if settings is not None and (manifest.batch != settings or manifest.zoo_group != group):
        return False
    for ref in manifest.pool_refs:
        f = (out_dir / ref.file)
        if not f.is_file() or sha256_file(f) != ref.sha256:
            return False
    return True


# ---------------------------------------------------------------- one adapter


def member_dir(out: str | Path, name: str) -> Path:
    """``OUT/<name>``, the output folder of the adapter ``name``; refused where a link
    already there leads out of OUT (a rerun would write, and replace outputs, elsewhere).

    Raises:
        FormatError: the folder is a link out of OUT."""
    dest = Path(out) / name
    if not same_or_inside(dest, out):
        raise FormatError(f"{dest}: a link out of {out}; batch writes only inside OUT: "
                          "remove the link")
    return dest


def convert_one(item: Item, out: str, config: BatchConfig) -> Outcome:
    """Convert one adapter as ``compress`` does; never raises for a bad adapter."""
    t0 = time.perf_counter()
    try:
        dest = member_dir(out, item.name)
        if not config.overwrite and is_complete(dest, item.source, config.settings()):
            return outcome_from_report(item, dest, "skipped", time.perf_counter() - t0)
        from ..fit.convert import ConvertConfig  # torch is needed only from here on
        from ..pipeline import compress

        cc = ConvertConfig(ratio=float(config.ratio), seed=config.seed, search=config.search,
                           iters=config.iters, routing_weights=config.routing_weights,
                           dtype=config.dtype, quantize=config.quantize,
                           size_ratio=config.size_ratio)
        compress(item.source, dest, cc, command=None, overwrite=True,
                 extra_info={"batch": config.settings()})
        return outcome_from_report(item, dest, "converted", time.perf_counter() - t0)
    except (MosconvError, OSError) as e:
        return Outcome(item.name, item.source, "failed", time.perf_counter() - t0,
                       error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Exception as e:
        log.debug("converting %s", item.source, exc_info=True)
        text = str(e).splitlines()[0] if str(e) else ""
        return Outcome(item.name, item.source, "failed", time.perf_counter() - t0,
                       error=f"{item.source}: internal error: {type(e).__name__}: {text}")


def _init_worker(threads: int, parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(threads)

    def watch() -> None:  # a parent killed (kill -9) cannot stop its workers: they stop
        while os.getppid() == parent:  # themselves, rather than wait on its queue forever
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="mosconv-parent-watch").start()


def _local_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    if config.jobs == 1 or len(items) == 1:
        for item in items:
            yield convert_one(item, out, config)
        return
    import multiprocessing as mp
    import sys

    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    if "torch" not in sys.modules and "fork" in mp.get_all_start_methods():
        # Import the heavy modules once here and fork: workers start without re-importing.
        # Safe because this process has run no torch operation (no OpenMP pool to inherit).
        import sklearn.cluster  # noqa: F401

        from .. import pipeline  # noqa: F401

        ctx = mp.get_context("fork")
    else:  # torch already ran here (e.g. --shared-pool read the adapters): fresh workers
        ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(config.jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, os.getpid()))
    futures = []
    try:
        futures = [pool.submit(convert_one, item, out, config) for item in items]
        for fut in as_completed(futures):
            yield fut.result()
    except BaseException:  # Ctrl-C, or the caller stopped: stop now, as one process does (a
        for fut in futures:  # worker's own KeyboardInterrupt ends only its task, and the
            fut.cancel()  # queue would run on); outputs are written atomically, a rerun
        for proc in list((getattr(pool, "_processes", None) or {}).values()):  # finishes
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_session(config: BatchConfig) -> bool:
    """Ray, initialized as ``config`` says (``--address``; Ray's own notices kept off the
    terminal) unless the caller has initialized it; True when this call started it (the run
    then shuts it down itself, not at interpreter exit where an interrupt is not handled).

    Raises:
        ConfigError: Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray engine needs Ray: pip install 'mosconv[ray]'") from None
    if ray.is_initialized():
        return False
    import logging

    ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    return True


def _ray_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    import ray

    _ray_session(config)
    task = ray.remote(num_cpus=1)(convert_one)
    pending = [task.remote(item, out, config) for item in items]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def convert_many(items: list[Item], out: str | Path, config: BatchConfig = BatchConfig()
                 ) -> Iterator[Outcome]:
    """Convert adapters independently, yielding an :class:`Outcome` as each finishes."""
    config.validate()
    Path(out).mkdir(parents=True, exist_ok=True)
    mapper = _ray_map if config.engine == "ray" else _local_map
    yield from mapper(items, str(out), config)


# ---------------------------------------------------------------- shared pools


def _group_id(key: str) -> str:
    base = _SAFE.sub("_", key.split("|", 1)[0]).strip("_")[-40:] or "group"
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class RayReducer:
    """Runs the chunks of a group fit (:mod:`mosconv.fit.joint`, :mod:`mosconv.fit.zoo`) as
    Ray tasks: chunks live in the object store, results come back in order; what ``keep``
    keeps stays in the object store.  Needs an initialized Ray."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._tasks: dict = {}

    def _task(self, fn: Callable[..., Any], returns: int) -> Any:
        task = self._tasks.get((fn, returns))
        if task is None:
            task = self._tasks[fn, returns] = self._ray.remote(num_cpus=1,
                                                               num_returns=returns)(fn)
        return task

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def map(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        task = self._task(fn, 1)
        return self._ray.get([task.remote(*a) for a in args])

    def keep(self, fn: Callable[..., Any], args: list[tuple]) -> list[tuple[Any, Any]]:
        task = self._task(fn, 2)
        refs = [task.remote(*a) for a in args]
        return list(zip([h for h, _ in refs], self._ray.get([x for _, x in refs])))

    def get(self, handle: Any) -> Any:
        return self._ray.get(handle)


def fit_group_items(items: list[Item], config: BatchConfig, reducer: Any = None,
                    storages: list[Storage] | None = None) -> tuple[list[Any], ChunkedFit]:
    """Fit one group, stored in ``storages[0]`` (float32 by default), or with
    ``config.size_ratio`` in the best of ``storages`` that fits the byte budget (see
    :func:`mosconv.fit.zoo.group_storages`): its members are read, factorized and converted
    alone in chunks of ``config.chunk`` where ``reducer`` keeps them (this process by
    default; Ray tasks and the object store with :class:`RayReducer`), and fitted from there
    (:func:`mosconv.fit.zoo.fit_members`).  Returns the chunks' handles and the fit."""
    from ..fit.zoo import fit_members
    from ..lora.read import read_adapter
    from ..mos.quant import Storage

    return fit_members([i.source for i in items], storages or [Storage()], float(config.ratio),
                       config.seed, config.search, config.iters, config.routing_weights,
                       config.dtype, config.quantize, config.size_ratio, reducer=reducer,
                       chunk=config.chunk, load=read_adapter)


def write_chunk(chunk: Any, built: list | None, items: list[Item], reports: list[Report],
                out: str, config: BatchConfig, gid: str, pool: tuple[str, str] | None,
                seconds: float) -> list[Outcome]:
    """Write a chunk's members (where the chunk is): each its joint MoS adapter, or the one
    converted alone where the fit has none for it (``built`` None: the group fell back, and
    each member is written as ``compress`` writes it)."""
    written = []
    for j, (i, a, r_alone, r) in enumerate(zip(items, chunk.adapters, chunk.alone, reports)):
        if built is None:
            mos, r = _as_compress(a, r_alone, r, config)
        else:
            mos = r_alone.mos if built[j] is None else built[j].adapter()
        written.append(write_member(i, a, mos, r, out, config, gid, pool, seconds))
    return written


def _as_compress(adapter: LoraAdapter, alone: Any, report: Report, config: BatchConfig
                 ) -> tuple[MosAdapter, Report]:
    """A member of a group that fell back, as ``compress`` converts it: the conversion
    alone in the group's storage, or again in its own where the group's was widened for
    another member's dtype (a float16 member of a group with a float32 one)."""
    if config.size_ratio is not None:  # each member's own storage choice already
        return alone.mos, report
    from ..fit.convert import ConvertConfig, convert

    cc = ConvertConfig(ratio=float(config.ratio), seed=config.seed, search=config.search,
                       iters=config.iters, routing_weights=config.routing_weights,
                       dtype=config.dtype, quantize=config.quantize)
    if cc.storages(adapter)[0] == alone.mos.storage:
        return alone.mos, report
    res = convert(adapter, cc)
    return res.mos, res.report


def write_pool_file(out: str, gid: str, pools: dict, storage: Storage | None = None
                    ) -> tuple[Path, str]:
    """Write a group's shared pools once, stored in ``storage`` (float32 by default; a
    quantized pool ``k0.A`` has its float16 scales in ``k0.A.scales``); returns
    ``(path, sha256)``."""
    from ..mos.quant import Storage, encode

    st = storage or Storage()
    tensors = {}
    for key, x in pools.items():
        values, scales = encode(x, st)
        tensors[key] = values
        if scales is not None:
            tensors[f"{key}.scales"] = scales
    path = pool_file(out, gid)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, {"format": "mosconv.pools.v1"})
    atomic_write_bytes(path, data)
    return path, hashlib.sha256(data).hexdigest()


def write_member(item: Item, adapter: LoraAdapter, mos: MosAdapter, report: Report, out: str,
                 config: BatchConfig,
                 gid: str, pool: tuple[str, str] | None, seconds: float) -> Outcome:
    """Write one adapter of a group (its own shards and routes; refs to the pool file)."""
    from ..mos.format import save_mos
    from ..pipeline import source_provenance

    try:
        dest = member_dir(out, item.name)
        kinds = mos.kinds
        if pool is not None:
            rel = os.path.relpath(pool[0], dest)
            kinds = {k: replace(p, shared={**p.shared, "file": rel, "sha256": pool[1]})
                     if p.shared else p for k, p in mos.kinds.items()}
        mos = replace(mos, kinds=kinds,
                      source={**mos.source, **source_provenance(item.source, adapter)},
                      info={**mos.info, "command": None, "batch": config.settings(),
                            "zoo_group": gid})
        save_mos(mos, dest, report, overwrite=True)
        return outcome_from_report(item, dest, "converted", seconds, gid)
    except (MosconvError, OSError) as e:
        return Outcome(item.name, item.source, "failed", error=str(e).splitlines()[0], group=gid)


def _group_outcomes(members: list[Item], out: str, config: BatchConfig, gid: str,
                    storages: list[Storage] | None = None) -> Iterator[Outcome]:
    """Fit where the group's vectors are, then fan the per-adapter writing out."""
    t0 = time.perf_counter()
    remote = config.engine == "ray"
    try:
        handles, res = fit_group_items(members, config, RayReducer() if remote else None,
                                       storages)
    except (MosconvError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        for i in members:
            yield Outcome(i.name, i.source, "failed", error=msg, group=gid)
        return
    if res.mode == "shared":
        path, digest = write_pool_file(out, gid, res.shared_pools, res.storage)
        pool = (str(path), digest)
        write_pool_members(out, gid, digest, [i.name for i in members])
    else:  # a pool file from an earlier run of this group is no longer used
        pool = None
        pool_file(out, gid).unlink(missing_ok=True)
        pool_members_file(out, gid).unlink(missing_ok=True)
    per = (time.perf_counter() - t0) / len(members)
    n = config.chunk
    args = [(h, b, members[c * n:(c + 1) * n], res.reports[c * n:(c + 1) * n], out, config,
             gid, pool, per) for c, (h, b) in enumerate(zip(handles, res.built))]
    if remote:
        import ray

        task = ray.remote(num_cpus=1)(write_chunk)
        for outcomes in ray.get([task.remote(*x) for x in args]):
            yield from outcomes
    else:
        for x in args:
            yield from write_chunk(*x)


def _recorded_group(dest: Path) -> str | None:
    try:
        return read_manifest(dest).zoo_group
    except (OSError, MosconvError):
        return None


def _shared_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    if not (config.overwrite or config.refit):  # all done already: skip without reading
        # (or importing) anything; --refit looks at each group's record first
        done = [(i, _recorded_group(Path(out) / i.name)) for i in items]
        if all(is_complete(Path(out) / i.name, i.source, config.settings(), g) for i, g in done) \
                and _all_recorded(out, done):
            for i, g in done:
                yield outcome_from_report(i, Path(out) / i.name, "skipped", 0.0, g)
            return
    from ..fit.zoo import group_key, group_storages
    from ..lora.read import read_adapter

    groups: dict[str, list[Item]] = {}
    dtypes: dict[str, list[str]] = {}  # the members' source dtypes, per group
    singles: list[Item] = []
    for item in items:
        try:
            adapter = read_adapter(item.source)
        except (MosconvError, OSError) as e:
            yield Outcome(item.name, item.source, "failed", error=str(e).splitlines()[0])
            continue
        key = group_key(adapter)
        groups.setdefault(key, []).append(item)
        dtypes.setdefault(key, []).append(adapter.dtype)
    for key in list(groups):
        if len(groups[key]) == 1:
            singles.append(groups.pop(key)[0])
    yield from convert_many(singles, out, config) if singles else iter(())
    for key, members in groups.items():
        gid = _group_id(key)
        done = {}  # members complete in this group (or converted alone before it formed)
        for i in [] if config.overwrite else members:
            g = _recorded_group(Path(out) / i.name)
            if g in (gid, None) and is_complete(Path(out) / i.name, i.source, config.settings(), g):
                done[i.name] = g
        for i in members:
            if i.name in done:
                yield outcome_from_report(i, Path(out) / i.name, "skipped", 0.0, done[i.name])
        new = [i for i in members if i.name not in done]
        record = _reconciled_record(out, gid, [i.name for i in members if done.get(i.name)])
        served, fitted = record or (None, None)
        if not new and not (config.refit and record is not None and (
                set(served) - {i.name for i in members}  # members left the zoo
                or set(served) != set(fitted))):
            continue  # (--refit: also a group that lost members, or gained some since its fit)
        if config.refit or config.overwrite:
            served = None
        present = [n for n in served or () if n in {i.name for i in members}]
        if present and all(n in done for n in present) \
                and all(i.name not in served for i in new):
            # a group whose pools serve its old members still in the zoo, complete, gained
            # adapters (some old members may have left it: their outputs and the pools stay)
            yield from _add_outcomes([i for i in members if i.name in served], new, out,
                                     config, gid, served, fitted)
        else:  # a new group, a changed or unfinished member, or --refit: fit the group
            yield from _group_outcomes(members, out, config, gid, group_storages(
                dtypes[key], config.dtype, config.quantize, size_ratio=config.size_ratio))


def _all_recorded(out: str, done: list[tuple[Item, str | None]]) -> bool:
    """No member of a group is missing from its pool record (:func:`_reconciled_record`; a
    group without pool file, whose members were converted alone, has none to be in)."""
    groups: dict[str, set[str]] = {}
    for i, g in done:
        if g is not None:
            groups.setdefault(g, set()).add(i.name)
    for g, names in groups.items():
        record = read_pool_record(out, g)
        if record is not None and not names <= set(record[0]):
            return False
    return True


def _reconciled_record(out: str, gid: str, complete: list[str]
                       ) -> tuple[list[str], list[str]] | None:
    """The group's pool record, with the ``complete`` members in the group (they refer to its
    pool file as it is) that it does not list appended, in zoo order, and written back: a
    run killed between writing an added member and recording it leaves such a member, and
    the record is what later adds and ``--refit`` go by."""
    record = read_pool_record(out, gid)
    if record is None:
        return None
    served, fitted = record
    lost = [n for n in complete if n not in served]
    if lost:
        served = [*served, *lost]
        write_pool_members(out, gid, sha256_file(pool_file(out, gid)), served, fitted)
    return served, fitted


def _add_outcomes(done: list[Item], new: list[Item], out: str, config: BatchConfig, gid: str,
                  served: list[str], fitted: list[str]) -> Iterator[Outcome]:
    """Fit only the ``new`` members of a group whose ``done`` members (and pool file) stay
    untouched, against the group's shared bases; the pool's member record then lists them
    (``served`` and ``fitted``: as it stood)."""
    from ..fit.zoo import fit_new_members
    from ..lora.read import read_adapter
    from ..mos.format import load_mos

    t0 = time.perf_counter()
    try:
        adapters = [read_adapter(i.source) for i in new]
        wanted = {m.name for a in adapters for m in a.modules}
        members, seen = [], set()
        for i in done:  # as many members as it takes to see every module (each loads the pools)
            mos = load_mos(Path(out) / i.name)
            if any(p.shared for p in mos.kinds.values()):
                members.append(mos)
                seen |= {m.name for m in mos.modules}
            if wanted <= seen:
                break
        members = members or [load_mos(Path(out) / done[0].name)]
        # with a size ratio the group was fitted at some parameter ratio in its storage:
        # newcomers take the same, so they keep the group's bytes per LoRA byte
        ratio = float(members[0].info.get("ratio", config.ratio)) if config.size_ratio \
            else float(config.ratio)
        mos_list, reports = fit_new_members(members, adapters, ratio, config.seed,
                                            search=config.search, iters=config.iters,
                                            routing_weights=config.routing_weights)
        if config.size_ratio is not None:
            mos_list, reports = _sized_newcomers(adapters, mos_list, reports, config)
    except (MosconvError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        for i in new:
            yield Outcome(i.name, i.source, "failed", error=msg, group=gid)
        return
    path = pool_file(out, gid)
    pool = (str(path), sha256_file(path))
    per = (time.perf_counter() - t0) / len(new)
    added = list(served)
    for i, a, m, r in zip(new, adapters, mos_list, reports):
        outcome = write_member(i, a, m, r, out, config, gid, pool, per)
        if outcome.status == "converted":
            added.append(i.name)
            write_pool_members(out, gid, pool[1], added, fitted)
        yield outcome


def _sized_newcomers(adapters: list, mos_list: list, reports: list, config: BatchConfig
                     ) -> tuple[list, list]:
    """Under a byte budget, each newcomer next to itself converted alone as ``compress
    --size-ratio`` would: the alone conversion where it is better (never worse off than on
    its own), else its group fit with the baseline at equal bytes of that conversion."""
    from ..fit.convert import ConvertConfig, convert
    from ..fit.zoo import sized_report

    cc = ConvertConfig(ratio=float(config.ratio), seed=config.seed, search=config.search,
                       iters=config.iters, routing_weights=config.routing_weights,
                       dtype=config.dtype, quantize=config.quantize,
                       size_ratio=config.size_ratio)
    out_mos, out_reports = [], []
    for a, mos, rep in zip(adapters, mos_list, reports):
        alone = convert(a, cc)
        if alone.report.totals.relative_error < rep.totals.relative_error:
            mos, rep = alone.mos, alone.report
        else:
            rep = sized_report(rep, alone.report, config.size_ratio)
        out_mos.append(mos)
        out_reports.append(rep)
    return out_mos, out_reports


# ---------------------------------------------------------------- the whole run


def _pools_in_use(dests: list[Path]) -> tuple[dict[Path, tuple[int, int]], dict[Path, set[Path]]]:
    """The shared pool files the given outputs refer to, ``(params, tensor bytes)`` each
    (params as the outputs' references count them, so int4 packing and the scales of
    quantized pools count in bytes only), and the files each output refers to."""
    keys: dict[Path, dict[str, int]] = {}
    used: dict[Path, set[Path]] = {}
    for dest in dests:
        try:
            refs = read_manifest(dest).pool_refs
        except (OSError, MosconvError):
            continue
        for ref in refs:
            f = real_path(dest / ref.file)
            keys.setdefault(f, {}).update(ref.tensors)
            used.setdefault(dest, set()).add(f)
    out = {}
    if keys:
        from ..lora.read._header import read_safetensors_header
    for f in sorted(keys):
        if f.is_file():
            header, _ = read_safetensors_header(f)
            out[f] = (sum(keys[f].values()),
                      sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0])
                          for e in header.values()))
    return out, used


def _energy_weighted(rows: list[Outcome], key: str) -> float | None:
    """``sqrt(sum energy * err^2 / sum energy)`` over ``rows`` (None without energy)."""
    energy = sum(r.energy or 0.0 for r in rows)
    if not rows or energy <= 0 or any(getattr(r, key) is None for r in rows):
        return None
    return (sum((r.energy or 0.0) * getattr(r, key) ** 2 for r in rows) / energy) ** 0.5


def _bytes_sum(rows: list[Outcome], key: str) -> int | None:
    values = [getattr(r, key) for r in rows]
    return None if any(v is None for v in values) else sum(values)


@dataclass(frozen=True)
class ZooTotals:
    """The zoo totals of ``summary.json``: counts, parameters (shared pools once), errors
    energy-weighted over the converted adapters (None when there are none)."""

    adapters: int
    converted: int
    skipped: int
    failed: int
    lora_params: int
    mos_params: int
    shared_pool_params: int
    relative_error: float | None
    truncation_relative_error: float | None
    seconds: float
    shared_pool_bytes: int = 0  # the pool files' tensor bytes, each file once
    lora_tensor_bytes: int | None = None  # the sources' LoRA factors as stored
    mos_tensor_bytes: int | None = None  # the adapters' own tensors + the pool files' (None:
    # an output made before reports counted bytes)
    truncation_equal_bytes_relative_error: float | None = None  # each in no more bytes


@dataclass(frozen=True)
class GroupSummary:
    """One group of ``--shared-pool`` (a row of ``summary.json``'s ``groups``): its members
    that did not fail, its pool file (shown once, apart from the members' own parts) and its
    errors, energy-weighted over the members."""

    group: str
    adapters: int
    pool_file: str | None  # relative to OUT; None: the group was converted alone
    pool_params: int
    pool_bytes: int
    local_params: int
    lora_params: int
    mos_params: int  # pool once + the members' own
    lora_tensor_bytes: int | None
    mos_tensor_bytes: int | None
    relative_error: float | None
    truncation_relative_error: float | None
    # adapters its pool file also serves that are not in this run's zoo (their sources left
    # it): the pool's budget was theirs too; --refit refits the group for those it has now
    also_serves: list[str] = field(default_factory=list)
    truncation_equal_bytes_relative_error: float | None = None


@dataclass(frozen=True)
class Summary:
    """``summary.json`` (``dataclasses.asdict``): per adapter outcomes, zoo totals and, with
    ``--shared-pool``, per group."""

    ratio: float
    shared_pool: bool
    adapters: list[Outcome]
    totals: ZooTotals
    groups: list[GroupSummary] = field(default_factory=list)
    # the storage asked for (with size_ratio, ratio is not the budget)
    size_ratio: float | None = None
    dtype: str = "auto"
    quantize: str = "none"

    @property
    def failed(self) -> int:
        return sum(1 for a in self.adapters if a.status == "failed")


def _group_summaries(out: Path, done: list[Outcome], pools: dict[Path, tuple[int, int]],
                     used: dict[Path, set[Path]]) -> list[GroupSummary]:
    """Per group (in order of first appearance), its members that did not fail; ``pools``
    and ``used`` as :func:`_pools_in_use` gives them for the outputs."""
    by_group: dict[str, list[Outcome]] = {}
    for r in done:
        if r.group is not None:
            by_group.setdefault(r.group, []).append(r)
    groups = []
    for gid, members in by_group.items():
        files = set().union(*(used.get(out / r.name, set()) for r in members)) & pools.keys()
        pool_params, pool_bytes = (sum(pools[f][i] for f in files) for i in (0, 1))
        own_bytes = _bytes_sum(members, "mos_tensor_bytes")
        local = sum(r.local_params or 0 for r in members)
        names = sorted(os.path.relpath(f, real_path(out)) for f in files)
        here = {r.name for r in members}
        groups.append(GroupSummary(
            group=gid, adapters=len(members), pool_file=names[0] if names else None,
            pool_params=pool_params, pool_bytes=pool_bytes, local_params=local,
            lora_params=sum(r.lora_params or 0 for r in members),
            mos_params=local + pool_params,
            lora_tensor_bytes=_bytes_sum(members, "lora_tensor_bytes"),
            mos_tensor_bytes=None if own_bytes is None else own_bytes + pool_bytes,
            relative_error=_energy_weighted(members, "relative_error"),
            truncation_relative_error=_energy_weighted(members, "truncation_relative_error"),
            also_serves=[n for n in read_pool_members(out, gid) or [] if n not in here],
            truncation_equal_bytes_relative_error=_energy_weighted(
                members, "truncation_equal_bytes_relative_error")))
    return groups


def run_batch(zoo: str | Path, out: str | Path, config: BatchConfig = BatchConfig(),
              progress: Callable[[Outcome], None] | None = None) -> Summary:
    """Convert every adapter of ``zoo`` into ``out`` and write ``out/summary.json``."""
    config.validate()
    items = discover(zoo, exclude=out)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder (OUT is the folder the outputs "
                          "go to)")
    clash = [i.name for i in items if i.name == SUMMARY_FILE]
    if clash:
        raise ConfigError(f"{zoo}: adapter {clash[0]} would be written to OUT/{SUMMARY_FILE}, "
                          "where the run's summary goes; rename or move it")
    if config.shared_pool:
        clash = [i.name for i in items if i.name.split("/")[0] == POOLS_DIR]
        if clash:
            raise ConfigError(f"{zoo}: adapter {clash[0]} would be written under OUT/{POOLS_DIR}, "
                              "where the shared pools go; rename or move it")
    out.mkdir(parents=True, exist_ok=True)
    if config.shared_pool and not same_or_inside(out / POOLS_DIR, out):
        raise ConfigError(f"{out / POOLS_DIR}: a link out of {out}; batch writes only inside "
                          "OUT: remove the link")
    try:  # what a killed run left mid-write outside the adapters' folders (theirs: each one's)
        remove_stale_tmp(out, {SUMMARY_FILE}.__contains__)
        if (out / POOLS_DIR).is_dir():
            remove_stale_tmp(out / POOLS_DIR, lambda name: name.endswith(
                (".safetensors", ".members.json")))
    except OSError as e:
        raise ConfigError(f"{out}: cannot remove a temporary file a killed run left "
                          f"({e.strerror or e})") from None
    started = _ray_session(config) if config.engine == "ray" else False
    stream = _shared_map(items, str(out), config) if config.shared_pool else \
        convert_many(items, out, config)
    results = {}
    try:
        for outcome in stream:
            results[outcome.name] = outcome
            if progress:
                progress(outcome)
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = [results[i.name] for i in items]
    done = [r for r in rows if r.status != "failed" and r.lora_params is not None]
    pools, used = _pools_in_use([out / r.name for r in done])
    pool_params, pool_bytes = (sum(v[i] for v in pools.values()) for i in (0, 1))
    local = sum(r.local_params or 0 for r in done)
    own_bytes = _bytes_sum(done, "mos_tensor_bytes")
    totals = ZooTotals(
        adapters=len(rows), converted=sum(1 for r in rows if r.status == "converted"),
        skipped=sum(1 for r in rows if r.status == "skipped"),
        failed=sum(1 for r in rows if r.status == "failed"),
        lora_params=sum(r.lora_params for r in done), mos_params=local + pool_params,
        shared_pool_params=pool_params, relative_error=_energy_weighted(done, "relative_error"),
        truncation_relative_error=_energy_weighted(done, "truncation_relative_error"),
        seconds=sum(r.seconds for r in rows), shared_pool_bytes=pool_bytes,
        lora_tensor_bytes=_bytes_sum(done, "lora_tensor_bytes"),
        mos_tensor_bytes=None if own_bytes is None else own_bytes + pool_bytes,
        truncation_equal_bytes_relative_error=_energy_weighted(
            done, "truncation_equal_bytes_relative_error"))
    groups = _group_summaries(out, done, pools, used) if config.shared_pool else []
    summary = Summary(config.ratio, config.shared_pool, rows, totals, groups,
                      config.size_ratio, config.dtype, config.quantize)
    atomic_write_json(out / SUMMARY_FILE, asdict(summary))
    return summary
