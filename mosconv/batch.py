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
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ConfigError, FormatError, MosconvError
from .fileio import atomic_write_bytes, atomic_write_json, safetensors_bytes, sha256_file
from .mos_format import CONFIG_FILE, save_mos
from .readers import resolve_adapter_path
from .readers.peft import CONFIG_NAME

SUMMARY_FILE = "summary.json"
POOLS_DIR = "pools"
_SUFFIXES = (".safetensors", ".bin")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class BatchConfig:
    """Settings of a batch run (the per-adapter ones are those of ``compress``)."""

    ratio: float = 8.0
    seed: int = 0
    search: str = "fast"
    iters: int = 4
    jobs: int = 1
    engine: str = "local"
    address: str | None = None
    shared_pool: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"jobs must be >= 1, got {self.jobs}")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"engine must be local or ray, got {self.engine!r}")


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


def outcome_from_report(item: Item, dest: Path, status: str, seconds: float,
                        group: str | None = None) -> Outcome:
    """An outcome whose numbers come from the ``report.json`` in ``dest``."""
    try:
        report = json.loads((dest / "report.json").read_text())
        t = report["totals"]
        energy = sum(m["energy"] for m in report["modules"])
    except (OSError, ValueError, KeyError, TypeError):
        return Outcome(item.name, item.source, status, seconds, group=group)
    return Outcome(item.name, item.source, status, seconds, t["lora_params"], t["mos_params"],
                   t.get("local_params", t["mos_params"]), t["relative_error"],
                   t["truncation_relative_error"], group, None, energy)


# ---------------------------------------------------------------- discovery


def safe_name(rel: str) -> str:
    """A relative output path that cannot escape the output folder."""
    parts = [p for p in re.split(r"[\\/]+", rel) if p not in ("", ".", "..")]
    parts = [_SAFE.sub("_", p).lstrip(".") or "_" for p in parts]
    if not parts:
        raise ConfigError(f"adapter path {rel!r} gives an empty output name")
    return "/".join(parts)


def discover(zoo: str | Path) -> list[Item]:
    """Adapters under a folder (recursive, sorted) or listed in a text file (one per line)."""
    zoo = Path(zoo)
    if not zoo.exists():
        raise FormatError(f"{zoo}: no such file or folder")
    items: list[Item] = []
    if zoo.is_file():
        base = zoo.parent
        for line in zoo.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line) if Path(line).is_absolute() else base / line
            rel = os.path.relpath(p, base)
            items.append(Item(safe_name(rel.removesuffix(p.suffix) if p.is_file() else rel), str(p)))
    else:
        for dirpath, dirnames, filenames in os.walk(zoo):
            dirnames.sort()
            d = Path(dirpath)
            if CONFIG_NAME in filenames:
                items.append(Item(safe_name(os.path.relpath(d, zoo)), str(d)))
                dirnames[:] = []  # a PEFT folder's contents belong to it
                continue
            for fn in sorted(filenames):
                if fn.endswith(_SUFFIXES):
                    rel = os.path.relpath(d / fn, zoo)
                    items.append(Item(safe_name(rel.rsplit(".", 1)[0]), str(d / fn)))
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
    files = ([p / CONFIG_NAME] + [p / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                                  if (p / n).is_file()][:1]) if family == "peft" else [p]
    return [{"name": f.name, "sha256": sha256_file(f)} for f in files]


def is_complete(out_dir: Path, source: str) -> bool:
    """True when ``out_dir`` holds a finished conversion of the unchanged ``source``."""
    cfg = out_dir / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        recorded = json.loads(cfg.read_text())["source"]["files"]
        want = source_hashes(source)
    except (OSError, ValueError, KeyError, TypeError, MosconvError):
        return False
    have = [{"name": f.get("name"), "sha256": f.get("sha256")} for f in recorded]
    if have != want:
        return False
    for ref in _shared_refs(json.loads(cfg.read_text())):
        f = (out_dir / ref["file"])
        if not f.is_file() or sha256_file(f) != ref["sha256"]:
            return False
    return True


def _shared_refs(cfg: dict) -> list[dict]:
    return [k["shared_pool"] for k in cfg.get("kinds", []) if k.get("shared_pool")]


# ---------------------------------------------------------------- one adapter


def convert_one(item: Item, out: str, config: BatchConfig) -> Outcome:
    """Convert one adapter as ``compress`` does; never raises for a bad adapter."""
    from .convert import ConvertConfig
    from .pipeline import compress

    t0 = time.perf_counter()
    dest = Path(out) / item.name
    try:
        if not config.overwrite and is_complete(dest, item.source):
            return outcome_from_report(item, dest, "skipped", time.perf_counter() - t0)
        cc = ConvertConfig(ratio=config.ratio, seed=config.seed, search=config.search,
                           iters=config.iters)
        compress(item.source, dest, cc, command=None, overwrite=True)
        return outcome_from_report(item, dest, "converted", time.perf_counter() - t0)
    except (MosconvError, OSError) as e:
        return Outcome(item.name, item.source, "failed", time.perf_counter() - t0,
                       error=str(e).splitlines()[0] if str(e) else type(e).__name__)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _local_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    if config.jobs == 1 or len(items) == 1:
        for item in items:
            yield convert_one(item, out, config)
        return
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    with ProcessPoolExecutor(config.jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(convert_one, item, out, config) for item in items]
        for fut in as_completed(futures):
            yield fut.result()


def _ray_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'mosconv[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
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


def fit_and_write_group(items: list[Item], out: str, config: BatchConfig, gid: str
                        ) -> list[Outcome]:
    """Fit one group's shared pools and write the pool file, then every adapter folder."""
    from .pipeline import source_provenance
    from .readers import read_adapter
    from .zoo import fit_group

    t0 = time.perf_counter()
    try:
        adapters = [read_adapter(i.source) for i in items]
        res = fit_group(adapters, config.ratio, config.seed)
    except (MosconvError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Outcome(i.name, i.source, "failed", error=msg, group=gid) for i in items]
    out = Path(out)
    outcomes = []
    if res.mode == "shared":
        (out / POOLS_DIR).mkdir(parents=True, exist_ok=True)
        data = safetensors_bytes(res.shared_pools, {"format": "mosconv.pools.v1"})
        pool_path = out / POOLS_DIR / f"{gid}.safetensors"
        atomic_write_bytes(pool_path, data)
        digest = hashlib.sha256(data).hexdigest()
    for item, a, mos, report in zip(items, adapters, res.adapters, res.reports):
        dest = out / item.name
        try:
            kinds = mos.kinds
            if res.mode == "shared":
                pool_rel = os.path.relpath(pool_path, dest)
                kinds = {k: replace(p, shared={**p.shared, "file": pool_rel, "sha256": digest})
                         for k, p in mos.kinds.items()}
            mos = replace(mos, kinds=kinds,
                          source={**mos.source, **source_provenance(item.source, a)},
                          info={**mos.info, "command": None, "zoo_group": gid})
            save_mos(mos, dest, report, overwrite=True)
            outcomes.append(outcome_from_report(item, dest, "converted",
                                                (time.perf_counter() - t0) / len(items), gid))
        except (MosconvError, OSError) as e:
            outcomes.append(Outcome(item.name, item.source, "failed", error=str(e), group=gid))
    return outcomes


def _shared_map(items: list[Item], out: str, config: BatchConfig) -> Iterator[Outcome]:
    from .readers import read_adapter
    from .zoo import group_key

    groups: dict[str, list[Item]] = {}
    singles: list[Item] = []
    for item in items:
        try:
            key = group_key(read_adapter(item.source))
        except (MosconvError, OSError) as e:
            yield Outcome(item.name, item.source, "failed", error=str(e).splitlines()[0])
            continue
        groups.setdefault(key, []).append(item)
    for key in list(groups):
        if len(groups[key]) == 1:
            singles.append(groups.pop(key)[0])
    yield from convert_many(singles, out, config) if singles else iter(())
    for key, members in groups.items():
        gid = _group_id(key)
        if not config.overwrite and all(is_complete(Path(out) / i.name, i.source) for i in members):
            for i in members:
                yield outcome_from_report(i, Path(out) / i.name, "skipped", 0.0, gid)
            continue
        if config.engine == "ray":
            import ray

            task = ray.remote(num_cpus=1)(fit_and_write_group)
            yield from ray.get(task.remote(members, out, config, gid))
        else:
            yield from fit_and_write_group(members, out, config, gid)


# ---------------------------------------------------------------- the whole run


@dataclass
class Summary:
    """``summary.json``: per adapter outcomes and zoo totals."""

    ratio: float
    shared_pool: bool
    adapters: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(1 for a in self.adapters if a["status"] == "failed")


def run_batch(zoo: str | Path, out: str | Path, config: BatchConfig = BatchConfig(),
              progress: Callable[[Outcome], None] | None = None) -> Summary:
    """Convert every adapter of ``zoo`` into ``out`` and write ``out/summary.json``."""
    config.validate()
    items = discover(zoo)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--engine ray needs Ray: pip install 'mosconv[ray]'") from None
    stream = _shared_map(items, str(out), config) if config.shared_pool else \
        convert_many(items, out, config)
    results = {}
    for outcome in stream:
        results[outcome.name] = outcome
        if progress:
            progress(outcome)
    rows = [asdict(results[i.name]) for i in items]
    if config.shared_pool:
        pool_files = sorted((out / POOLS_DIR).glob("*.safetensors")) if (out / POOLS_DIR).is_dir() else []
    else:
        pool_files = []
    done = [r for r in rows if r["status"] != "failed" and r["lora_params"] is not None]
    pool_params = 0
    for f in pool_files:
        from .readers._io import read_safetensors_header

        header, _ = read_safetensors_header(f)
        for entry in header.values():
            n = 1
            for d in entry["shape"]:
                n *= int(d)
            pool_params += n
    lora = sum(r["lora_params"] for r in done)
    local = sum(r["local_params"] or 0 for r in done)
    energy = sum(r["energy"] or 0.0 for r in done)

    def weighted(key: str) -> float | None:
        if not done or energy <= 0:
            return None
        return (sum((r["energy"] or 0.0) * r[key] ** 2 for r in done) / energy) ** 0.5

    totals = {
        "adapters": len(rows),
        "converted": sum(1 for r in rows if r["status"] == "converted"),
        "skipped": sum(1 for r in rows if r["status"] == "skipped"),
        "failed": sum(1 for r in rows if r["status"] == "failed"),
        "lora_params": lora,
        "mos_params": local + pool_params,
        "shared_pool_params": pool_params,
        "relative_error": weighted("relative_error"),
        "truncation_relative_error": weighted("truncation_relative_error"),
        "seconds": sum(r["seconds"] for r in rows),
    }
    summary = Summary(config.ratio, config.shared_pool, rows, totals)
    atomic_write_json(out / SUMMARY_FILE, asdict(summary))
    return summary
