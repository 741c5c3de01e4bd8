"""convert(): parameter budget, never worse than truncation, lossless at ratio 1, report
honesty (against a dense recomputation), determinism and configuration errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from factory import llama_like, write_random_peft
from helpers import (
    ZOO_ADAPTERS,
    assert_same_mos,
    dense,
    mos_dense,
    zoo_conversion,
    zoo_path,
)

from mosconv import ConfigError, read_adapter
from mosconv.fit.convert import ConvertConfig, convert

pytestmark = pytest.mark.usefixtures("single_thread")


# Two small zoo adapters stay in the fast set; the whole zoo (about 40 s) is marked slow.
FAST_ZOO = ("distilbert-imdb-seqcls", "gpt2-great-tabular-bin")
ZOO_PARAMS = [
    pytest.param(n, id=n) if n in FAST_ZOO else pytest.param(n, id=n, marks=pytest.mark.slow)
    for n in ZOO_ADAPTERS
]


def _synthetic(tmp_path, name="a", **kw):
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    modules = kw.pop("modules", None) or llama_like(layers=4, d=32, d_kv=16)
    folder, pairs = write_random_peft(tmp_path / name, modules, **kw)
    return read_adapter(folder), pairs


def _check_structure(adapter, mos):
    """Modules in source order; routes inside the pools; every private slot inside its
    module's own private block; private blocks of one kind pairwise disjoint."""
    assert [m.name for m in mos.modules] == [m.name for m in adapter.modules]
    for kind, pools in mos.kinds.items():
        assert pools.d_in % pools.nc == 0 and pools.d_out % pools.nc == 0
        assert pools.pool_A.shape[1] == pools.d_in // pools.nc
        assert pools.pool_B.shape[1] == pools.d_out // pools.nc
        mods = [m for m in mos.modules if m.kind == kind]
        for side, pool, public in (("A", pools.pool_A, pools.public_A),
                                   ("B", pools.pool_B, pools.public_B)):
            blocks = []
            for m in mods:
                routes = m.routes_A if side == "A" else m.routes_B
                lo, hi = m.private_A if side == "A" else m.private_B
                assert routes.numel() == m.r * pools.nc
                if routes.numel():
                    assert int(routes.min()) >= 0 and int(routes.max()) < pool.shape[0]
                private = routes[routes >= public]
                assert bool(((private >= lo) & (private < hi)).all()), (m.name, side)
                if hi > lo:
                    assert public <= lo and hi <= pool.shape[0]
                    blocks.append((lo, hi))
            blocks.sort()
            for (_, hi1), (lo2, _) in itertools.pairwise(blocks):
                assert hi1 <= lo2, f"private blocks overlap in {kind} ({side})"


def _dense_relative_error(adapter, mos) -> float:
    err = energy = 0.0
    for m in adapter.modules:
        ref = dense(m.A, m.B, m.scale)
        err += float((mos_dense(mos, m.name) - ref).pow(2).sum())
        energy += float(ref.pow(2).sum())
    return math.sqrt(err / energy)


# ------------------------------------------------------------------ the zoo at ratio 8


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_zoo_ratio8_within_budget_and_never_worse_than_truncation(name):
    adapter, res = zoo_conversion(name, ratio=8)
    t = res.report.to_json()["totals"]
    assert t["lora_params"] == adapter.params
    assert t["budget"] == adapter.params // 8
    assert t["mos_params"] <= t["lora_params"] / 8
    assert t["mos_params"] == res.mos.params
    assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
    for k in res.report.to_json()["kinds"]:
        assert k["params"] <= k["budget"], k["kind"]
        assert k["relative_error"] <= k["truncation_relative_error"] + 1e-6, k["kind"]
    assert sum(k["params"] for k in res.report.to_json()["kinds"]) == res.mos.params
    assert [m["name"] for m in res.report.to_json()["modules"]] == [m.name for m in adapter.modules]
    _check_structure(adapter, res.mos)


def test_report_error_matches_dense_recomputation_zoo():
    """The report's relative error equals ||dW_mos - dW||_F / ||dW||_F formed densely, with
    dW taken straight from the source file (not through mosconv's reader)."""
    import json

    from safetensors.torch import load_file

    folder = zoo_path("distilbert-imdb-seqcls")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    raw = load_file(str(folder / "adapter_model.safetensors"))
    _, res = zoo_conversion("distilbert-imdb-seqcls", ratio=8)
    err = energy = 0.0
    for row in res.report.to_json()["modules"]:
        key = f"base_model.model.{row['name']}"
        ref = dense(raw[f"{key}.lora_A.weight"], raw[f"{key}.lora_B.weight"], scale)
        diff = float((mos_dense(res.mos, row["name"]) - ref).pow(2).sum())
        e = float(ref.pow(2).sum())
        assert math.sqrt(diff / e) == pytest.approx(row["relative_error"], rel=1e-6, abs=1e-9)
        err, energy = err + diff, energy + e
    assert len(res.report.to_json()["modules"]) == 12
    assert math.sqrt(err / energy) == pytest.approx(res.report.to_json()["totals"]["relative_error"],
                                                    rel=1e-6)


def test_report_error_matches_dense_recomputation_shared(tmp_path):
    """Same check on a synthetic adapter where shared pools (and slot weights) win."""
    adapter, _ = _synthetic(tmp_path, modules=llama_like(layers=6, d=64, d_kv=32), r=8,
                            alpha=16, shared_A=True)
    res = convert(adapter, ConvertConfig(ratio=4))
    t = res.report.to_json()["totals"]
    assert t["kinds_shared"] >= 1  # the point of this case: exercise a shared structure
    assert _dense_relative_error(adapter, res.mos) == pytest.approx(t["relative_error"], rel=1e-6)
    _check_structure(adapter, res.mos)


def _check_report_fields(adapter, res):
    """The identities docs/format.md states between report fields."""
    rep, mos = res.report.to_json(), res.mos
    assert list(rep) == ["schema", "ratio", "seed", "search", "iters", "routing_weights",
                         "totals", "kinds", "modules"]
    assert rep["schema"] == "mosconv.report/1"
    t = rep["totals"]
    assert t["energy_retained"] == pytest.approx(1 - t["relative_error"] ** 2, abs=1e-12)
    assert t["param_ratio"] == pytest.approx(t["lora_params"] / t["mos_params"])
    assert t["truncation_params"] <= t["budget"]
    assert t["index_bytes"] == mos.index_bytes
    assert t["mos_file_bytes"] is None and t["file_bytes_ratio"] is None  # never saved
    shared = [k for k in rep["kinds"] if k["structure"] == "shared"]
    assert t["kinds_shared"] == len(shared)
    if shared:
        assert t["sharing_gain"] == pytest.approx(
            t["truncation_relative_error"] - t["relative_error"], abs=1e-15)
    else:
        assert t["sharing_gain"] == 0.0
    rows = {m["name"]: m for m in rep["modules"]}
    for k in rep["kinds"]:
        mods = [m for m in adapter.modules if m.kind == k["kind"]]
        assert k["budget"] == sum(rows[m.name]["truncation_rank"] * (m.d_in + m.d_out)
                                  for m in mods)
        pools = mos.kinds[k["kind"]]
        assert (k["nc"], k["public_A"], k["public_B"], k["pool_A"], k["pool_B"]) == (
            pools.nc, pools.public_A, pools.public_B, pools.pool_A.shape[0], pools.pool_B.shape[0])
        assert k["weights"] == any(mos.module(m.name).weights_A is not None for m in mods)
        if k["structure"] == "private":
            assert (k["nc"], k["public_A"], k["public_B"]) == (1, 0, 0)
    for m in adapter.modules:
        row = rows[m.name]
        assert row["r_lora"] == m.r and row["r_mos"] == mos.module(m.name).r
        ref = dense(m.A, m.B, m.scale)
        assert row["energy"] == pytest.approx(float(ref.pow(2).sum()), rel=1e-9)
        if row["energy"] > 0:
            assert row["energy_retained"] == pytest.approx(1 - row["relative_error"] ** 2,
                                                           abs=1e-9)


def test_report_fields_are_consistent_zoo():
    adapter, res = zoo_conversion("distilbert-imdb-seqcls", ratio=8)
    _check_report_fields(adapter, res)


def test_report_fields_are_consistent_shared(tmp_path):
    adapter, _ = _synthetic(tmp_path)
    res = convert(adapter, ConvertConfig(ratio=2, search="thorough"))
    assert res.report.to_json()["totals"]["kinds_shared"] >= 1
    _check_report_fields(adapter, res)


def test_sharing_gain_is_exactly_zero_when_every_kind_is_private(tmp_path):
    """All-private kinds ARE truncation: float32 rounding must not show up as a gain."""
    adapter, _ = _synthetic(tmp_path)
    for ratio in (1.5, 3, 8):
        res = convert(adapter, ConvertConfig(ratio=ratio, search="truncation"))
        assert res.report.to_json()["totals"]["kinds_shared"] == 0
        assert res.report.to_json()["totals"]["sharing_gain"] == 0.0
        _check_report_fields(adapter, res)


def test_zero_modules_are_handled(tmp_path):
    """Modules whose update is exactly zero (B = 0, as PEFT initializes it): finite report,
    the total error still matches a dense recomputation, budget and floor hold."""
    from mosconv.lora.write import write_peft_folder

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (d_out, d_in) in llama_like(layers=4, d=32, d_kv=16).items():
        B = torch.zeros(d_out, 4) if ".1." in name else torch.randn(d_out, 4, generator=g)
        rows.append((name, torch.randn(4, d_in, generator=g), B, False))
    write_peft_folder(tmp_path / "z", rows, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                             "target_modules": ["q_proj", "v_proj"]})
    adapter = read_adapter(tmp_path / "z")
    for ratio, search in ((1, "truncation"), (2, "fast"), (8, "fast")):
        res = convert(adapter, ConvertConfig(ratio=ratio, search=search))
        t = res.report.to_json()["totals"]
        assert all(math.isfinite(v) for v in t.values() if isinstance(v, float))
        assert t["mos_params"] <= adapter.params / ratio
        assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
        assert _dense_relative_error(adapter, res.mos) == pytest.approx(t["relative_error"],
                                                                        rel=1e-6, abs=1e-7)
        for row in res.report.to_json()["modules"]:
            assert math.isfinite(row["relative_error"]) and math.isfinite(row["energy_retained"])
            if ".1." in row["name"]:
                assert row["energy"] == 0.0 and row["truncation_rank"] == 0
        if ratio == 1:
            assert t["relative_error"] < 1e-5
            assert all(mos_m.r == 0 for mos_m in res.mos.modules if ".1." in mos_m.name)


# ------------------------------------------------------------------ ratio 1: lossless


@pytest.mark.parametrize("name", ZOO_ADAPTERS)
def test_zoo_ratio1_reproduces_adapter(name):
    # float32 storage: lossless up to float32 rounding, whatever the source's dtype
    _, res = zoo_conversion(name, ratio=1, search="truncation", dtype="float32")
    t = res.report.to_json()["totals"]
    assert t["relative_error"] < 1e-5
    assert t["mos_params"] <= t["lora_params"]
    assert res.mos.params == t["mos_params"]
    worst = max(row["relative_error"] for row in res.report.to_json()["modules"])
    assert worst < 1e-5


def test_ratio1_float16_source_keeps_float16_within_its_rounding():
    adapter, res = zoo_conversion("open-calm-1b-r1-fp16", ratio=1, search="truncation")
    assert adapter.dtype == "float16" and res.mos.storage.dtype == "float16"
    t = res.report.totals
    assert t.dtype == "float16" and t.relative_error < 1e-3
    assert t.tensor_bytes_ratio == pytest.approx(1.0, rel=1e-6)  # rank 1 kept: same bytes


def test_ratio1_default_search_reproduces_adapter():
    adapter = read_adapter(zoo_path("opt-125m-lora-ckpts/final"))
    res = convert(adapter, ConvertConfig(ratio=1))
    assert res.report.to_json()["search"] == "fast"
    assert res.report.to_json()["totals"]["relative_error"] < 1e-5
    assert _dense_relative_error(adapter, res.mos) < 1e-5


def test_ratio1_synthetic_is_exact_per_module(tmp_path):
    adapter, pairs = _synthetic(tmp_path)
    res = convert(adapter, ConvertConfig(ratio=1))
    for name, (A, B) in pairs.items():
        ref = dense(A, B, 8 / 4)
        got = mos_dense(res.mos, name)
        assert float((got - ref).norm() / ref.norm()) < 1e-6, name


# ------------------------------------------------------------------ budget at float ratios


@pytest.mark.parametrize("ratio", [1.5, 2, 3.7, 16])
@pytest.mark.parametrize("weights", [True, False], ids=["weights", "plain"])
def test_budget_holds_at_float_ratios(tmp_path, ratio, weights):
    adapter, _ = _synthetic(tmp_path)
    res = convert(adapter, ConvertConfig(ratio=ratio, routing_weights=weights))
    t = res.report.to_json()["totals"]
    assert t["budget"] == math.floor(adapter.params / ratio)
    assert res.mos.params == t["mos_params"] <= t["budget"] <= adapter.params / ratio
    assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
    if not weights:
        assert all(m.weights_A is None and m.weights_B is None for m in res.mos.modules)
    _check_structure(adapter, res.mos)


def test_shared_A_rows_floor_holds(tmp_path):
    """Layers that share their A (same seeded A, different B): whether a shared candidate
    wins or not, the budget and the truncation floor hold."""
    adapter, pairs = _synthetic(tmp_path, modules=llama_like(layers=6, d=64, d_kv=32), r=8,
                                alpha=16, shared_A=True)
    q = [A for n, (A, _) in pairs.items() if n.endswith("q_proj")]
    assert all(torch.equal(q[0], a) for a in q[1:])
    for ratio in (2, 8):
        res = convert(adapter, ConvertConfig(ratio=ratio))
        t = res.report.to_json()["totals"]
        assert t["mos_params"] <= adapter.params / ratio
        assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
        assert t["sharing_gain"] == pytest.approx(
            t["truncation_relative_error"] - t["relative_error"])
        _check_structure(adapter, res.mos)


# ------------------------------------------------------------------ determinism


def test_same_input_and_seed_give_identical_tensors(tmp_path):
    adapter, _ = _synthetic(tmp_path, modules=llama_like(layers=6, d=64, d_kv=32), r=8,
                            alpha=16, shared_A=True)
    cfg = ConvertConfig(ratio=3, seed=7)
    first = convert(adapter, cfg)
    again = convert(read_adapter(tmp_path / "a"), cfg)  # a fresh read, too
    assert_same_mos(first.mos, again.mos)
    assert first.report == again.report


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize("ratio", [0.5, 0.999, 0, -2, float("nan"), float("inf"), "8", True])
def test_bad_ratio_is_config_error(tmp_path, ratio):
    adapter, _ = _synthetic(tmp_path)
    with pytest.raises(ConfigError, match="ratio"):
        convert(adapter, ConvertConfig(ratio=ratio))


@pytest.mark.parametrize("kw, word", [({"search": "exhaustive"}, "search"),
                                      ({"iters": -1}, "iters")])
def test_bad_settings_are_config_errors(tmp_path, kw, word):
    adapter, _ = _synthetic(tmp_path)
    with pytest.raises(ConfigError, match=word) as e:
        convert(adapter, ConvertConfig(**kw))
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, config", [
    ("smollm-135m-medical-r16/5epochs", ConvertConfig(ratio=8)),
    ("smollm-135m-medical-r16/5epochs", ConvertConfig(ratio=8, quantize="int4")),
    ("open-calm-1b-r1-fp16", ConvertConfig(ratio=8)),
])
def test_outputs_do_not_depend_on_the_thread_count(name, config, tmp_path):
    """The report's float64 sums followed torch's thread count in their last digits, so
    ``batch --jobs 2`` (fewer threads per worker) wrote other report bytes than --jobs 1."""
    from mosconv.pipeline import compress

    src = zoo_path(name)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(tmp_path / str(threads))
            compress(src, outs[-1], config, command=None)
    finally:
        torch.set_num_threads(n)
    for f in ("report.json", "mos_config.json", "mos_adapter.safetensors"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_stored_truncation_baseline_is_measured_against_the_source():
    """open-calm is float16 and its conversion is truncation stored in float16: the same
    factors as the equal-bytes baseline, so the same error to the last digit (the baseline
    was measured against the float32 factorization and came out 3e-10 lower)."""
    ad = read_adapter(zoo_path("open-calm-1b-r1-fp16"))
    t = convert(ad, ConvertConfig(ratio=8)).report.totals
    assert t.relative_error <= t.truncation_equal_bytes_relative_error
    assert t.relative_error == pytest.approx(t.truncation_equal_bytes_relative_error, rel=1e-13)


@pytest.mark.parametrize("config", [ConvertConfig(ratio=8, dtype="float16"),
                                    ConvertConfig(ratio=8, quantize="int4"),
                                    ConvertConfig(size_ratio=32)])
def test_the_search_asked_for_is_recorded(config, shared_a_adapter):
    """Where stored truncation wins, its structure is kept; the search recorded stayed
    "truncation" though "fast" was asked for."""
    res = convert(shared_a_adapter, config)
    assert res.mos.info["search"] == "fast" and res.report.settings.search == "fast"
