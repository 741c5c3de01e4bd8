"""``convert(adapter, config) -> ConvertResult``: LoRA in memory -> MoS in memory, no I/O.

1. Factorize every module exactly and compute global-budget truncation at
   ``budget = floor(lora_params / ratio)``; this fixes each kind's budget.
2. Per kind, the all-private structure that reproduces truncation is the first
   candidate.  With ``search != "truncation"``, MoS structures with public pools
   (k-means initialized, refined by least squares and re-routing; see
   :mod:`mosconv.fit.pools`) compete under the same kind budget.  A kind keeps the
   candidate with the lowest exact error, so the result is never worse than
   truncation and sharing is used only where it earns its place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import __version__
from .._threads import one_thread
from ..errors import ConfigError, MosconvError, check_seed
from ..lora.types import LoraAdapter
from ..mos.quant import FLOAT_DTYPES, QUANTIZE, Storage, StorageOverflow, storage_of_source
from ..mos.types import KindPools, MosAdapter, MosModule
from .factorize import Factorization, factorize
from .measure import Baseline, DataInputs, build_report
from .metric import CalibLike, DataMetric, Metric, Target, WeightMetric
from .pools import KindFit, divisors_for, private_fit, shared_fit, shared_params
from .report import KindStructure, Report, Settings
from .storage import equal_bytes_truncation, row_bytes, store
from .truncation import Truncation, allocate, budget_for_ratio, floor_div, truncate

SEARCH_LEVELS = ("truncation", "fast", "thorough")


@dataclass(frozen=True)
class ConvertConfig:
    """Settings of one conversion.

    Attributes:
        ratio: parameter budget is ``floor(lora_params / ratio)``; ``>= 1``.
        seed: seeds k-means; same input and seed give the same bytes.
        search: ``truncation`` (all-private only), ``fast`` (a few MoS candidates per
            kind) or ``thorough`` (more shard sizes and public shares).
        iters: refinement iterations per MoS candidate.
        routing_weights: allow per-slot scalar weights in MoS candidates (counted as
            parameters); False restricts candidates to the paper's unweighted form.
        dtype: ``auto`` (the source's float dtype), ``float32``, ``float16`` or
            ``bfloat16``: how pools, cores and slot weights are stored.
        quantize: ``none``, ``int8`` or ``int4`` (pools and cores, float16 scales per
            ``group`` values); ``auto`` only with ``size_ratio`` (try all three).
        group: values per quantization scale along a row.
        size_ratio: the budget in bytes instead of parameters: MoS tensor bytes <= the
            source's LoRA tensor bytes / ``size_ratio``; the parameter ratio and the storage
            (among ``dtype`` / ``quantize``) with the lowest error are chosen; ``ratio`` is
            then not used.
    """

    ratio: float = 8.0
    seed: int = 0
    search: str = "fast"
    iters: int = 4
    routing_weights: bool = True
    dtype: str = "auto"
    quantize: str = "none"
    group: int = 64
    size_ratio: float | None = None

    def settings(self) -> Settings:
        """What a report records of these settings."""
        return Settings(float(self.ratio), self.seed, self.search, self.iters,
                        self.routing_weights)

    def validate(self) -> None:
        if (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                or not math.isfinite(self.ratio) or self.ratio < 1):
            raise ConfigError(f"ratio must be a number >= 1, got {self.ratio!r}")
        check_seed(self.seed)
        if self.search not in SEARCH_LEVELS:
            raise ConfigError(f"search must be one of {', '.join(SEARCH_LEVELS)}, got {self.search!r}")
        if self.iters < 0:
            raise ConfigError(f"iters must be >= 0, got {self.iters!r}")
        if self.dtype != "auto" and self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(FLOAT_DTYPES)}, "
                              f"got {self.dtype!r}", options=("dtype",))
        if self.quantize not in (*QUANTIZE, "auto"):
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, "
                              f"got {self.quantize!r}", options=("quantize",))
        if self.quantize == "auto" and self.size_ratio is None:
            raise ConfigError("quantize auto chooses by size: it needs a size ratio",
                              options=("size_ratio",))
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 2:
            raise ConfigError(f"group must be an integer >= 2, got {self.group!r}")
        if self.size_ratio is not None and (
                not isinstance(self.size_ratio, (int, float)) or not math.isfinite(self.size_ratio)
                or self.size_ratio < 1):
            raise ConfigError(f"size ratio must be a number >= 1, got {self.size_ratio!r}",
                              options=("size_ratio",))

    def storages(self, adapter: LoraAdapter) -> list[Storage]:
        """The storages this config allows for ``adapter`` (one, unless ``size_ratio``
        leaves a choice: ``dtype auto`` then also tries float16 for a float32 source,
        ``quantize auto`` tries none, int8 and int4). Quantized storages keep their slot
        weights in float16 (bfloat16 for a bfloat16 source) unless ``dtype`` says otherwise."""
        return self.storages_for(adapter.dtype)

    def storages_for(self, source_dtype: str) -> list[Storage]:
        """:meth:`storages` for a source whose factors are ``source_dtype`` (as
        :attr:`LoraAdapter.dtype` records it; several joined by ``/`` for a group of
        adapters: ``auto`` then keeps the widest)."""
        src = storage_of_source(source_dtype)
        if self.dtype != "auto":
            dtypes = [self.dtype]
        elif self.size_ratio is not None and src == "float32":
            dtypes = ["float32", "float16"]
        else:
            dtypes = [src]
        quants = list(QUANTIZE) if self.quantize == "auto" else [self.quantize]
        out = [Storage(d, "none") for d in dtypes] if "none" in quants else []
        # quantized: the few float tensors left (slot weights) take 16 bits unless asked
        qd = self.dtype if self.dtype != "auto" else "bfloat16" if src == "bfloat16" \
            else "float16"
        out += [Storage(qd, q, self.group) for q in quants if q != "none"]
        return out


@dataclass(frozen=True)
class ConvertResult:
    """A converted adapter and its report (see ``docs/format.md`` for the report fields).

    Attributes:
        mos: the MoS adapter.
        report: its :class:`~mosconv.fit.report.Report` (``report.to_json()``: ``report.json``).
        baseline: the truncation baselines and chosen structures the report was built
            against (distillation builds its report against the same ones).
    """

    mos: MosAdapter
    report: Report
    baseline: Baseline | None = None

    @property
    def settings(self) -> Settings:
        return self.report.settings


def _candidates(search: str, n_modules: int, d_in: int, d_out: int, routing_weights: bool):
    """(share of the kind budget for public pools, nc, public rows, weights) to try."""
    if search == "truncation" or n_modules < 2:
        return []
    ws = (False, True) if routing_weights else (False,)
    if search == "fast":  # small shards share best (measured on the zoo); four mixes
        nc = divisors_for(d_in, d_out, (16, 8, 4, 2, 1))[0]
        mixes = [(0.125, 2, False), (0.5, 2, True), (0.125, 1, True), (0.5, 1, False)]
        return [(f, nc, q, w and routing_weights) for f, q, w in mixes]
    ncs = divisors_for(d_in, d_out, (1, 2, 4, 8, 16))
    return [(f, nc, q, w) for f in (0.125, 0.25, 0.5) for nc in ncs for q in (1, 2) for w in ws]


def _worth_searching(search: str, targets: list[Factorization], ranks: list[int]) -> bool:
    """Whether the fast search tries shared pools for a kind (thorough always does).

    Two cheap signs that sharing can pay, measured on the zoo and on synthetic adapters:
    truncation starves a module (rank 0 while its update is not zero), or the modules'
    next residual directions overlap: the top singular value^2 of their stacked
    ``sqrt(s) v`` (or ``sqrt(s) u``) vectors is at least twice the largest single one
    (about 1 for independent layers, about L for L layers that share a direction).
    Where neither holds, no shared candidate won in our measurements, and skipping the
    search keeps ``compress`` close to the cost of load + factorize.
    """
    if search == "thorough":
        return True
    if any(k == 0 and f.energy > 0 for f, k in zip(targets, ranks)):
        return True
    for side in ("V", "U"):
        rows = []
        for f, k in zip(targets, ranks):
            s = f.S[k:k + 2]
            if s.numel():
                rows.append(s.sqrt()[:, None].float() * getattr(f, side)[:, k:k + 2].T)
        if len(rows) < 2:
            return False
        stack = torch.cat(rows).double()
        top = float(torch.linalg.svdvals(stack)[0]) ** 2
        if top >= 2 * float(stack.pow(2).sum(1).max()):
            return True
    return False


def _shared_plan(facts: list[Factorization], kind_budget: int,
                 cand: tuple[float, int, int, bool]) -> tuple | None:
    """What a shared candidate fits: ``(private ranks, public rows, n_public, nc,
    weights)``, or None when no public shard fits the budget. Candidates of different
    budget shares can round to one plan (the thorough search has many such)."""
    frac, nc, q, weights = cand
    d_in, d_out = facts[0].d_in, facts[0].d_out
    gains = {i: f.S**2 for i, f in enumerate(facts)}
    costs = {i: d_in + d_out for i in gains}
    priv = allocate(gains, costs, int(kind_budget * (1 - frac)))
    private_ranks = tuple(priv[i] for i in range(len(facts)))
    fixed = shared_params(d_in, d_out, list(private_ranks), q, 0, nc, weights)
    n_public = (kind_budget - fixed) * nc // (d_in + d_out)
    if n_public < 1:
        return None
    return private_ranks, q, n_public, nc, weights


def _try_shared(facts: list[Factorization], targets: list[Target], metric: Metric,
                kind_budget: int, plan: tuple, seed: int, iters: int) -> KindFit | None:
    private_ranks, q, n_public, nc, weights = plan
    kf = shared_fit(facts, list(private_ranks), q, n_public, nc, weights, seed)
    if kf.params > kind_budget:  # k-means may return fewer shards, never more
        return None
    return metric.refine(kf, targets, iters)


def _to_pools(kind: str, kf: KindFit, d_in: int, d_out: int) -> KindPools:
    return KindPools(kind, d_in, d_out, kf.nc, kf.pool_A.to(torch.float32),
                     kf.pool_B.to(torch.float32), kf.public_A, kf.public_B)


def convert(
    adapter: LoraAdapter,
    config: ConvertConfig = ConvertConfig(),
    *,
    progress: Callable[[str], None] | None = None,
    factorizations: dict[str, Factorization] | None = None,
    calib: CalibLike | None = None,
) -> ConvertResult:
    """Convert a LoRA adapter into a MoS adapter under ``lora_params / ratio`` parameters
    (or, with ``config.size_ratio``, under ``lora_tensor_bytes / size_ratio`` bytes), stored
    as ``config.dtype`` / ``config.quantize`` say.

    Args:
        adapter: from :func:`mosconv.read_adapter`.
        config: ratio, seed, search level, storage.
        progress: called with the kind's name after each kind (for progress bars).
        factorizations: precomputed :func:`factorize_adapter` output, to skip recomputing.
        calib: :class:`mosconv.model.calib.CalibStats` with an input second moment for every
            module: data-aware conversion (search, refinement and the truncation baseline
            in the metric ``||(dW - dW') X||``); both metrics are reported.

    The report gives the error of what is stored (after the cast or quantization), next to
    truncation at the same parameters and truncation stored the same way in no more bytes.

    Raises:
        ConfigError: invalid settings, or ``calib`` that does not match the adapter.
        StorageOverflow: values that float16 cannot hold (use float32 or bfloat16).
    """
    config.validate()
    if not isinstance(adapter, LoraAdapter):  # fitting reads no files: the caller does
        raise ConfigError(f"convert takes a LoraAdapter (mosconv.read_adapter(path) reads "
                          f"one), got {type(adapter).__name__}")
    storages = config.storages(adapter)
    if config.size_ratio is None:
        res = _convert_stored(adapter, config, storages[0], budget_for_ratio(
            adapter.params, config.ratio), progress, factorizations, calib)
    else:
        res = _convert_sized(adapter, config, storages, progress, factorizations, calib)
    return _asked(res, config.search)


def _asked(res: ConvertResult, search: str) -> ConvertResult:
    """``res`` recording the search asked for, also where truncation's structure was kept
    (stored alike in the same bytes it did better; the kinds' structures say so)."""
    if res.mos.info.get("search") == search:
        return res
    return replace(res, mos=replace(res.mos, info={**res.mos.info, "search": search}),
                   report=replace(res.report,
                                  settings=replace(res.report.settings, search=search)))


def _convert_sized(adapter: LoraAdapter, config: ConvertConfig, storages: list[Storage],
                   progress: Callable[[str], None] | None,
                   factorizations: dict[str, Factorization] | None,
                   calib: CalibLike | None) -> ConvertResult:
    """``--size-ratio``: per storage, truncation at the largest parameter budget whose
    tensors fit the byte budget, and (unless the search is ``truncation``) the search at the
    largest budget whose tensors, routes included, fit; the lowest error wins (ties: fewer
    bytes)."""
    if factorizations is None and calib is None:
        factorizations = {m.name: factorize(m) for m in adapter.modules}
    limit = floor_div(adapter.tensor_bytes, config.size_ratio)
    searches = ["truncation"] + ([config.search] if config.search != "truncation" else [])
    best: ConvertResult | None = None  # the lowest (error, bytes), the first of equals
    tried: list[tuple[tuple[float, int], Storage, dict]] = []  # every candidate, in numbers

    def keep(res: ConvertResult) -> None:
        nonlocal best
        t = res.report.totals
        key = (_minimized_error(res.report), t.mos_tensor_bytes or 0)
        tried.append((key, res.mos.storage, {
            "dtype": res.mos.storage.dtype, "quantize": res.mos.storage.quantize,
            "param_ratio": t.param_ratio, "mos_params": t.mos_params,
            "mos_tensor_bytes": t.mos_tensor_bytes, "relative_error": t.relative_error,
            "truncation_equal_bytes_relative_error": t.truncation_equal_bytes_relative_error}))
        if best is None or key < (_minimized_error(best.report),
                                  best.report.totals.mos_tensor_bytes or 0):
            best = res  # the others are dropped: a 7B-sized adapter's 8 candidates held 549 MiB

    for st in storages:
        per_param = max(row_bytes(st, m.d_in, m.d_out) / (m.d_in + m.d_out)
                        for m in adapter.modules)
        for search in searches:
            budget = int(limit / per_param)
            for _ in range(8):  # shared structures add routes: shrink until the bytes fit
                try:
                    res = _convert_stored(adapter, replace(config, search=search), st, budget,
                                          None, factorizations, calib, limit)
                except StorageOverflow:
                    break
                used = res.report.totals.mos_tensor_bytes or 0
                if used <= limit:
                    keep(res)
                    break
                budget -= max(1, math.ceil((used - limit) / per_param))
                if budget < 0:
                    break
        if progress:
            progress(st.label)
    if best is None:
        raise ConfigError(f"size ratio {config.size_ratio:g}: no storage fits "
                          f"{limit} bytes", options=("size_ratio",))
    tried.sort(key=lambda c: c[0])  # stable: equals keep the order they were tried in
    choices, seen = [], set()
    for _, st, c in tried:  # per storage, its best
        if st not in seen:
            seen.add(st)
            choices.append(c)
    totals = replace(best.report.totals, size_ratio=float(config.size_ratio),
                     size_budget_bytes=limit, size_choices=choices)
    info = {**best.mos.info, "size_ratio": float(config.size_ratio)}
    return ConvertResult(replace(best.mos, info=info), replace(best.report, totals=totals),
                         best.baseline)


def _minimized_error(report) -> float:
    """The error the conversion minimized: the data-aware one with calibration statistics."""
    data = report.totals.data
    return data.data_relative_error if data is not None else report.totals.relative_error


def _convert_stored(
    adapter: LoraAdapter,
    config: ConvertConfig,
    storage: Storage,
    budget: int,
    progress: Callable[[str], None] | None = None,
    factorizations: dict[str, Factorization] | None = None,
    calib: CalibLike | None = None,
    byte_limit: int | None = None,
) -> ConvertResult:
    """Convert a LoRA adapter into a MoS adapter under ``budget`` parameters, stored in
    ``storage``. The equal-bytes truncation baseline gets the MoS tensor bytes, or
    ``byte_limit`` (``--size-ratio``) when given. A result with shared kinds that this
    baseline beats (their routes and slot weights cost bytes) is replaced by the
    all-private structure, so the result never does worse than the baseline at its bytes.

    Args:
        adapter: from :func:`mosconv.read_adapter`.
        config: ratio, seed, search level.
        progress: called with the kind's name after each kind (for progress bars).
        factorizations: precomputed :func:`factorize_adapter` output, to skip recomputing.
        calib: :class:`mosconv.model.calib.CalibStats` with an input second moment for every
            module: data-aware conversion (search, refinement and the truncation baseline
            in the metric ``||(dW - dW') X||``); both metrics are reported.

    Raises:
        ConfigError: invalid settings, or ``calib`` that does not match the adapter.
    """
    metric: Metric
    if calib is None and factorizations is None and storage != Storage():
        # storing needs the singular vectors again (the equal-bytes baseline): factorize
        # once, rather than spectra first and each kind while it is fitted
        with one_thread():
            factorizations = {m.name: factorize(m) for m in adapter.modules}
    if calib is None:
        metric = WeightMetric(factorizations)
        with one_thread():  # what the report shows does not depend on the thread count
            plain = metric.spectra(adapter)
    else:
        moments = check_calib(adapter, calib)
        # full factorizations: the report measures plain truncation in the data metric too
        plain = factorizations or {m.name: factorize(m) for m in adapter.modules}
        metric = DataMetric.from_moments(adapter, moments, calib.tokens, calib.info)
    trunc = truncate(plain, budget)
    fit_trunc = trunc if calib is None else truncate(metric.spectra(adapter), budget)
    torch.manual_seed(config.seed)

    with one_thread():
        kinds, structures, mos_modules = _fit_kinds(adapter, metric, fit_trunc, config, progress)
    order = {m.name: i for i, m in enumerate(adapter.modules)}
    mos_modules.sort(key=lambda m: order[m.name])
    info = {
        "mosconv_version": __version__,
        "ratio": float(config.ratio) if config.size_ratio is None
        else adapter.params / max(budget, 1),
        "seed": config.seed,
        "search": config.search,
        "iters": config.iters,
        "routing_weights": config.routing_weights,
        "lora_params": adapter.params,
        "budget": budget,
        "metric": metric.name,
    }
    if calib is not None:
        info["calib"] = {"tokens": calib.tokens, **calib.info}
    mos = MosAdapter(kinds=kinds, modules=tuple(mos_modules),
                     extra_tensors=dict(adapter.extra_tensors), source=source_info(adapter),
                     info=info)
    with one_thread():  # many small matrices: threads only add contention
        if storage != Storage():
            mos = store(mos, adapter, storage, refit=calib is None)
        full = None if storage == Storage() else (factorizations or (plain if calib else None))
        equal = equal_bytes_truncation(
            adapter, storage,
            byte_limit if byte_limit is not None else mos.tensor_bytes()["total"],
            plain if storage == Storage() else full)
    baseline = Baseline(trunc, None if calib is None else fit_trunc, structures, equal)
    data = None
    if isinstance(metric, DataMetric):
        data = DataInputs({n: t.C for n, t in metric.targets.items()}, metric.tokens)
    settings = replace(config.settings(), ratio=float(info["ratio"]))
    with one_thread():  # float64 sums whose last digits would follow the thread count
        report = build_report(adapter, mos, baseline, settings, data=data,
                              plain=plain if data else None)
    t = report.totals
    if (calib is None and byte_limit is None and config.search != "truncation"
            and t.kinds_shared and equal.relative_error < t.relative_error):
        # truncation stored alike in these bytes does better (the routes and slot weights
        # cost more than sharing gains): keep the all-private structure
        return _convert_stored(adapter, replace(config, search="truncation"), storage, budget,
                               progress, factorizations, calib)
    return ConvertResult(mos=mos, report=report, baseline=baseline)


def source_info(adapter: LoraAdapter) -> dict:
    """What a MoS adapter records of its source (``mos_config.json``'s ``source``)."""
    return {
        "format": adapter.format,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": adapter.dtype,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "config": adapter.config,
        "metadata": adapter.metadata,
    }


def check_calib(adapter: LoraAdapter, calib: CalibLike) -> dict[str, torch.Tensor]:
    """The moments of ``calib`` for every module of ``adapter``, shapes checked."""
    moments = {}
    for m in adapter.modules:
        C = calib.moments.get(m.name)
        if C is None:
            raise ConfigError(f"calibration statistics have no entry for module {m.name} "
                              f"({len(calib.moments)} modules; collected for another adapter?)")
        if tuple(C.shape) != (m.d_in, m.d_in):
            raise ConfigError(f"calibration statistics of module {m.name} are "
                              f"{C.shape[0]}x{C.shape[1]}, but its d_in is {m.d_in} "
                              "(base model and adapter do not match)")
        moments[m.name] = C
    return moments


def _fit_kinds(adapter: LoraAdapter, metric: Metric, trunc: Truncation, config: ConvertConfig,
               progress: Callable[[str], None] | None
               ) -> tuple[dict[str, KindPools], dict[str, KindStructure], list[MosModule]]:
    """Per kind: the all-private structure from ``trunc`` (truncation in ``metric``), then
    shared candidates; the lowest error in ``metric`` wins."""
    kinds: dict[str, KindPools] = {}
    structures: dict[str, KindStructure] = {}
    mos_modules = []
    for kind, mods in adapter.kinds.items():
        targets = metric.kind_targets(mods)
        facts = [metric.factorization(t) for t in targets]
        ranks = [trunc.ranks[m.name] for m in mods]
        d_in, d_out = mods[0].d_in, mods[0].d_out
        kind_budget = sum(ranks) * (d_in + d_out)
        best = private_fit(facts, ranks)
        best_err = sum(trunc.err_sq[m.name] for m in mods)
        tried = 0
        cands = _candidates(config.search, len(mods), d_in, d_out, config.routing_weights)
        if kind_budget > 0 and cands and (
                metric.always_search() or _worth_searching(config.search, facts, ranks)):
            targets = metric.for_search(targets)
            search_facts = [metric.factorization(t) for t in targets]
            plans: set[tuple] = set()
            for cand in cands:
                tried += 1
                plan = _shared_plan(search_facts, kind_budget, cand)
                if plan is None or plan in plans:  # a plan fitted already: the same error,
                    continue  # which cannot beat the best so far (fits are deterministic)
                plans.add(plan)
                kf = _try_shared(search_facts, targets, metric, kind_budget, plan, config.seed,
                                 config.iters)
                if kf is None:
                    continue
                err = sum(metric.err_sq(kf, targets))
                if err < best_err * (1 - 1e-9):
                    best, best_err = kf, err
        if best.params > kind_budget:
            raise MosconvError(f"internal error: kind {kind} uses {best.params} > {kind_budget} params")
        kinds[kind] = _to_pools(kind, best, d_in, d_out)
        structures[kind] = KindStructure(
            structure=best.structure, nc=best.nc, public_A=best.public_A,
            public_B=best.public_B, pool_A=int(best.pool_A.shape[0]),
            pool_B=int(best.pool_B.shape[0]), params=best.params, budget=kind_budget,
            candidates_tried=tried, weights=any(m.weights_A is not None for m in best.modules))
        for m, mr in zip(mods, best.modules):
            mos_modules.append(MosModule(
                name=m.name, kind=kind, r=mr.r, scale=1.0,
                routes_A=mr.routes_A.reshape(-1).clone(), routes_B=mr.routes_B.reshape(-1).clone(),
                weights_A=None if mr.weights_A is None else mr.weights_A.reshape(-1).float(),
                weights_B=None if mr.weights_B is None else mr.weights_B.reshape(-1).float(),
                private_A=mr.private_A, private_B=mr.private_B,
                embedding=m.embedding, conv_shape=m.conv_shape,
            ))
        if progress:
            progress(kind)
    return kinds, structures, mos_modules
