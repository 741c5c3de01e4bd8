"""The conversion report, typed: what ``report.json`` holds (fields in ``docs/format.md``).

A :class:`Report` is built once (by :func:`mosconv.fit.measure.build_report`, from measured
errors) and never edited: :meth:`Report.with_file_bytes` returns a new one when the saved
file's size is known.  :meth:`Report.to_json` gives the ``mosconv.report/1`` object with
the fields in the order they have always had; :meth:`Report.from_json` reads one back and
is the one place a report is validated (missing or mistyped fields are named).

Pure Python: no torch, so batch bookkeeping and ``inspect`` read reports quickly.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, TypeVar

REPORT_SCHEMA = "mosconv.report/1"

T = TypeVar("T")


class ReportError(ValueError):
    """A ``report.json`` object that is not a valid ``mosconv.report/1`` report."""


@dataclass(frozen=True)
class Settings:
    """The conversion settings a report records."""

    ratio: float
    seed: int
    search: str
    iters: int
    routing_weights: bool


@dataclass(frozen=True)
class ModuleData:
    """Data-metric errors of one module (conversions with calibration statistics)."""

    data_energy: float
    data_relative_error: float
    data_truncation_rank: int
    data_truncation_relative_error: float
    plain_truncation_data_relative_error: float


@dataclass(frozen=True)
class ModuleRow:
    """One module: ranks, its update's energy, MoS and truncation errors."""

    name: str
    kind: str
    r_lora: int
    r_mos: int
    energy: float
    relative_error: float
    energy_retained: float
    fro_retained: float
    truncation_rank: int
    truncation_relative_error: float
    data: ModuleData | None = None


@dataclass(frozen=True)
class KindStructure:
    """What the fit chose for one kind (the structure part of a kind row)."""

    structure: str  # private | shared | mos
    nc: int
    public_A: int
    public_B: int
    pool_A: int
    pool_B: int
    params: int
    budget: int | None
    candidates_tried: int
    weights: bool


@dataclass(frozen=True)
class KindData:
    """Data-metric errors of one kind."""

    data_relative_error: float
    data_truncation_relative_error: float
    plain_truncation_data_relative_error: float


@dataclass(frozen=True)
class KindRow:
    """One kind: its structure and errors next to truncation's."""

    kind: str
    structure: KindStructure
    relative_error: float
    truncation_relative_error: float
    data: KindData | None = None


@dataclass(frozen=True, kw_only=True)
class DataTotals:
    """Totals in the data metric (``metric: "data"`` in the JSON)."""

    data_relative_error: float
    data_truncation_relative_error: float
    plain_truncation_data_relative_error: float
    data_truncation_params: int | None = None
    calib_tokens: int


@dataclass(frozen=True, kw_only=True)
class Totals:
    """Whole-adapter numbers: parameters, bytes as stored, errors next to truncation's
    (fields in their JSON order; those with a default may be missing in older reports)."""

    lora_params: int
    source_params: int | None = None
    source_format: str | None = None
    budget: int
    mos_params: int
    param_ratio: float | None = None
    index_bytes: int
    lora_file_bytes: int | None = None
    mos_file_bytes: int | None = None
    file_bytes_ratio: float | None = None
    relative_error: float
    truncation_relative_error: float
    truncation_params: int | None = None
    energy_retained: float | None = None
    sharing_gain: float
    kinds_shared: int
    dtype: str | None = None  # storage of pools, cores, slot weights (float dtype)
    quantize: str | None = None  # none | int8 | int4 (pools and cores)
    quant_group: int | None = None  # values per float16 scale when quantized
    lora_tensor_bytes: int | None = None  # the source's LoRA factor tensors as stored
    mos_tensor_bytes: int | None = None  # this adapter's own tensors as stored (extra apart)
    mos_bytes: dict | None = None  # pools, cores, scales, routes, weights, total, extra
    tensor_bytes_ratio: float | None = None  # lora_tensor_bytes / mos_tensor_bytes
    truncation_equal_bytes_relative_error: float | None = None
    truncation_equal_bytes_params: int | None = None
    truncation_equal_bytes_tensor_bytes: int | None = None
    size_ratio: float | None = None  # --size-ratio asked for
    size_budget_bytes: int | None = None  # lora_tensor_bytes / size_ratio
    size_choices: list | None = None  # the storages tried for --size-ratio, best first
    data: DataTotals | None = None  # written flat, after ``"metric": "data"``
    local_params: int | None = None  # zoo members: params in the adapter's own file


@dataclass(frozen=True, kw_only=True)
class DistillSection:
    """What distillation did, and the truncation baseline's held-out KL next to it."""

    device: str
    dtype: str | None = None
    steps: int
    max_steps: int | None = None
    best_step: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    train_blocks: int | None = None
    held_out_blocks: int | None = None
    train_tokens_seen: int | None = None
    hidden_weight: float | None = None
    kl_before: float
    kl_after: float
    held_out_kl: list | None = None  # [[step, kl], ...]
    loss_first: float | None = None
    loss_last: float | None = None
    losses: list | None = None
    seconds: float | None = None
    steps_per_s: float | None = None
    truncation_kl: float
    data: str | None = None
    data_sha256: str | None = None
    base_model: str | None = None
    gguf_file: str | None = None


@dataclass(frozen=True)
class Report:
    """A conversion report: settings, totals, one row per kind and per module."""

    settings: Settings
    totals: Totals
    kinds: tuple[KindRow, ...]
    modules: tuple[ModuleRow, ...]
    distill: DistillSection | None = None
    schema: str = REPORT_SCHEMA

    @property
    def metric(self) -> str:
        """``data`` when the report has data-metric errors, else ``weight``."""
        return "data" if self.totals.data is not None else "weight"

    @property
    def energy(self) -> float:
        """Sum of the modules' ``||dW||^2``: the weight of this adapter in zoo totals."""
        return sum(m.energy for m in self.modules)

    def with_file_bytes(self, mos_file_bytes: int) -> Report:
        """The same report with the saved tensor file's size (and the ratio to the source's)."""
        t = self.totals
        ratio = t.lora_file_bytes / mos_file_bytes if t.lora_file_bytes else t.file_bytes_ratio
        return replace(self, totals=replace(t, mos_file_bytes=mos_file_bytes,
                                            file_bytes_ratio=ratio))

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` object."""
        s = self.settings
        out: dict[str, Any] = {"schema": self.schema, "ratio": s.ratio, "seed": s.seed,
                               "search": s.search, "iters": s.iters,
                               "routing_weights": s.routing_weights,
                               "totals": _totals_json(self.totals),
                               "kinds": [_kind_json(k) for k in self.kinds],
                               "modules": [_flat(m, "data") for m in self.modules]}
        if self.distill is not None:
            out["distill"] = _flat(self.distill, "")
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Report:
        """Read a ``report.json`` object (as :meth:`to_json` writes, or an older one whose
        optional fields are missing).

        Raises:
            ReportError: not a JSON object, a field missing or of the wrong type (named).
        """
        if not isinstance(obj, dict):
            raise ReportError("not a JSON object")
        totals, kinds, modules = obj.get("totals"), obj.get("kinds"), obj.get("modules", [])
        if not isinstance(totals, dict) or not isinstance(kinds, list):
            raise ReportError("no totals object or kinds list")
        if not isinstance(modules, list):
            raise ReportError(f"modules is {_show(modules)}")
        data = None
        if totals.get("metric") == "data":
            data = _read(DataTotals, totals, "totals.")
        t = replace(_read(Totals, totals, "totals.", skip=("data",)), data=data)
        settings = Settings(  # older reports may lack these
            ratio=float(_value(obj, "ratio", float | None, "") or 0.0),
            seed=_value(obj, "seed", int | None, "") or 0,
            search=_value(obj, "search", str | None, "") or "",
            iters=_value(obj, "iters", int | None, "") or 0,
            routing_weights=bool(_value(obj, "routing_weights", bool | None, "")))
        krows = []
        for i, k in enumerate(kinds):
            where = f"kinds[{i}]."
            if not isinstance(k, dict):
                raise ReportError(f"kinds[{i}] is {_show(k)}")
            structure = _read(KindStructure, k, where, optional=(
                "public_A", "public_B", "budget", "candidates_tried", "weights"))
            kd = _read(KindData, k, where) if data is not None else None
            krows.append(KindRow(_value(k, "kind", str, where), structure,
                                 _value(k, "relative_error", float, where),
                                 _value(k, "truncation_relative_error", float, where), kd))
        mrows = []
        for i, m in enumerate(modules):
            where = f"modules[{i}]."
            if not isinstance(m, dict):
                raise ReportError(f"modules[{i}] is {_show(m)}")
            md = _read(ModuleData, m, where) if data is not None else None
            mrows.append(replace(_read(ModuleRow, m, where, skip=("data",)), data=md))
        d = obj.get("distill")
        distill = None
        if d is not None:
            if not isinstance(d, dict):
                raise ReportError(f"distill is {_show(d)}")
            distill = _read(DistillSection, d, "distill.")
        return cls(settings, t, tuple(krows), tuple(mrows), distill,
                   schema=obj.get("schema") if isinstance(obj.get("schema"), str) else REPORT_SCHEMA)


def rel(err_sq: float, energy: float) -> float:
    """``sqrt(err_sq / energy)``, 0 for a zero update."""
    return math.sqrt(err_sq / energy) if energy > 0 else 0.0


# ---------------------------------------------------------------- JSON helpers


def _flat(row: Any, nested: str) -> dict[str, Any]:
    """A row's fields in order, with the ``nested`` section's fields appended when present."""
    out = {f.name: getattr(row, f.name) for f in fields(row) if f.name != nested}
    sub = getattr(row, nested) if nested else None
    if sub is not None:
        out.update({f.name: getattr(sub, f.name) for f in fields(sub)})
    return out


def _kind_json(k: KindRow) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": k.kind}
    out.update({f.name: getattr(k.structure, f.name) for f in fields(k.structure)})
    out["relative_error"] = k.relative_error
    out["truncation_relative_error"] = k.truncation_relative_error
    if k.data is not None:
        out.update({f.name: getattr(k.data, f.name) for f in fields(k.data)})
    return out


def _totals_json(t: Totals) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: getattr(t, f.name) for f in fields(t)
                           if f.name not in ("data", "local_params")}
    if t.data is not None:
        out["metric"] = "data"
        out.update({f.name: getattr(t.data, f.name) for f in fields(t.data)})
    if t.local_params is not None:
        out["local_params"] = t.local_params
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a JSON value fits a field type (``float`` takes integers; ``int`` not bools)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    if tp is int:
        return isinstance(value, int)
    origin = typing.get_origin(tp) or tp
    return isinstance(value, origin)


def _value(obj: dict, key: str, tp: Any, where: str) -> Any:
    value = obj.get(key)
    if not _accepts(tp, value):
        raise ReportError(f"{where}{key} is {_show(value)}")
    return float(value) if tp is float else value


_HINTS: dict[type, dict[str, Any]] = {}


def _read(cls: type[T], obj: dict, where: str, *, skip: tuple[str, ...] = (),
          optional: tuple[str, ...] = ()) -> T:
    """Build dataclass ``cls`` from ``obj``: fields with a default may be missing, and so
    may ``optional`` ones (given their type's empty value); present fields are type-checked."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        tp = hints[f.name]
        if f.name not in obj:
            if f.name in optional:
                kw[f.name] = _empty(tp)
                continue
            if f.default is not MISSING:
                continue
        kw[f.name] = _value(obj, f.name, tp, where)
    return cls(**kw)


def _empty(tp: Any) -> Any:
    if _accepts(tp, None):
        return None
    return {int: 0, bool: False, str: ""}[tp]
