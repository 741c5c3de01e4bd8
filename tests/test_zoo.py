"""Pools shared across a zoo (:func:`mosconv.fit.zoo.fit_group`, ``run_batch(shared_pool=True)``).

Errors are measured here, in float64, from the assembled MoS adapters against the source
LoRA updates; the independent baseline (global SVD truncation over every module of every
adapter at the same total budget) is recomputed here too, with a greedy written apart from
mosconv.fit.truncation.
"""

from __future__ import annotations

import heapq
import json
import math
import pickle
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import pytest
import torch
from helpers import ZOO, assert_same_mos, example_module, one_thread, zoo_path
from test_batch import files_of, summary_numbers, write_lora_like

from mosconv.batch.run import SUMMARY_FILE, BatchConfig, run_batch
from mosconv.fit.zoo import fit_group
from mosconv.lora.read import read_adapter
from mosconv.mos.format import load_mos
from mosconv.names import POOLS_DIR

RATIO = 8.0


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ references


def update(m) -> torch.Tensor:
    """A LoRA module's ``scale * B @ A`` in float64."""
    return float(m.scale) * (m.B.double() @ m.A.double())


def mos_update(mos, name: str) -> torch.Tensor:
    mm = mos.module(name)
    A, B = mos.assemble(mm)
    return float(mm.scale) * (B.double() @ A.double())


def measured_error(adapters, moses) -> tuple[float, list[float]]:
    """Energy-weighted relative error over all adapters, and each adapter's own."""
    tot_err = tot_energy = 0.0
    per = []
    for a, mos in zip(adapters, moses):
        err = energy = 0.0
        for m in a.modules:
            dw = update(m)
            err += float(((dw - mos_update(mos, m.name)) ** 2).sum())
            energy += float((dw**2).sum())
        per.append(math.sqrt(err / energy))
        tot_err += err
        tot_energy += energy
    return math.sqrt(tot_err / tot_energy), per


def exported_error(source: Path, exported: Path) -> float:
    """Energy-weighted relative error of an exported LoRA against its source."""
    src, back = read_adapter(source), read_adapter(exported)
    err = energy = 0.0
    for m in src.modules:
        dw = update(m)
        err += float((dw - update(back.module(m.name))).pow(2).sum())
        energy += float(dw.pow(2).sum())
    return math.sqrt(err / energy)


def singular_values(m) -> torch.Tensor:
    """Singular values of ``scale * B @ A`` via QR of both factors (float64)."""
    _, rb = torch.linalg.qr(m.B.double())
    _, ra = torch.linalg.qr(m.A.double().T)
    return float(abs(m.scale)) * torch.linalg.svdvals(rb @ ra.T)


def independent_measured(adapters, ratio: float) -> float:
    """Energy-weighted error of every adapter converted alone (what compress / plain batch
    give), measured densely here."""
    from mosconv.fit.convert import ConvertConfig, convert

    moses = [convert(a, ConvertConfig(ratio=ratio)).mos for a in adapters]
    return measured_error(adapters, moses)[0]


def independent_reference(adapters, ratio: float) -> tuple[float, int, int]:
    """``(relative error, params used, budget)`` of global truncation over every module of
    every adapter at ``floor(sum(lora_params) / ratio)``: take triplets by sigma^2 per
    parameter, skipping those that no longer fit."""
    budget = math.floor(sum(a.params for a in adapters) / ratio + 1e-9)
    spectra, costs, heap = [], [], []
    energy = 0.0
    for a in adapters:
        for m in a.modules:
            s = singular_values(m) ** 2
            j = len(spectra)
            spectra.append(s.tolist())
            costs.append(m.d_in + m.d_out)
            energy += float(s.sum())
            if len(s) and s[0] > 0:
                heapq.heappush(heap, (-s[0].item() / costs[j], j, 0))
    left, used, kept = budget, 0, 0.0
    while heap:
        _, j, i = heapq.heappop(heap)
        if costs[j] > left:
            continue  # this module's later triplets cannot fit either
        left -= costs[j]
        used += costs[j]
        kept += spectra[j][i]
        if i + 1 < len(spectra[j]) and spectra[j][i + 1] > 0:
            heapq.heappush(heap, (-spectra[j][i + 1] / costs[j], j, i + 1))
    return math.sqrt(max(energy - kept, 0.0) / energy), used, budget


def group_params(res) -> int:
    """Parameters of a fitted group: pool file tensors once, plus every adapter's own."""
    pool = sum(t.numel() for t in res.shared_pools.values())
    return pool + sum(m.local_params for m in res.adapters)  # own pools, cores, weights


# ------------------------------------------------------------------ the zoo pairs


# in discovery order (sorted), as run_batch fits them
PAIRS = {
    "gemma3-270m-svg-x3": ("curriculum_stage1", "final"),
    "opt-125m-lora-ckpts": ("checkpoint-10", "final"),
}


@cache
def _pair_fit(project: str):
    adapters = [read_adapter(ZOO / project / name) for name in PAIRS[project]]
    with one_thread():
        res = fit_group(adapters, RATIO, seed=0)
    return adapters, res


def pair_fit(project: str):
    for name in PAIRS[project]:
        zoo_path(f"{project}/{name}")  # skips with the reason when the zoo is absent
    return _pair_fit(project)


@pytest.mark.parametrize("project", sorted(PAIRS))
def test_zoo_pair_shared_beats_independent(project):
    adapters, res = pair_fit(project)
    t = asdict(res.totals)
    lora = sum(a.params for a in adapters)
    measured, per = measured_error(adapters, res.adapters)
    ref_err, ref_params, budget = independent_reference(adapters, RATIO)
    numbers = (f"{project}: mode {res.mode}, params {t.get('mos_params')} (budget {budget}, "
               f"lora {lora}), shared error measured {measured:.5f} (claimed "
               f"{t['shared_relative_error']:.5f}; per adapter "
               f"{', '.join(f'{e:.4f}' for e in per)}), independent {t['independent_relative_error']:.5f} "
               f"(reference {ref_err:.5f} at {ref_params} params)")
    print(numbers)
    assert res.mode == "shared", numbers
    assert t["mos_params"] <= lora / RATIO, numbers
    assert group_params(res) == t["mos_params"], numbers
    # "independent" = each adapter converted alone at the same ratio (never more params)
    assert t["independent_relative_error"] == pytest.approx(
        independent_measured(adapters, RATIO), rel=1e-4), numbers
    assert measured == pytest.approx(t["shared_relative_error"], rel=1e-3), numbers
    assert measured < t["independent_relative_error"], numbers
    assert measured < ref_err, numbers
    # each adapter's report measures that adapter against its own source
    for e, report in zip(per, res.reports):
        assert report.totals.relative_error == pytest.approx(e, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("project", sorted(PAIRS))
def test_zoo_pair_run_batch_shared(project, tmp_path):
    adapters, res = pair_fit(project)
    out = tmp_path / "out"
    summary = run_batch(ZOO / project, out, BatchConfig(ratio=RATIO, shared_pool=True))
    assert summary.failed == 0
    assert [a.name for a in summary.adapters] == list(PAIRS[project])
    t = asdict(summary.totals)
    pools = sorted((out / POOLS_DIR).glob("*.safetensors"))
    assert len(pools) == 1
    assert t["shared_pool_params"] == sum(x.numel() for x in res.shared_pools.values())
    assert t["mos_params"] == res.totals.mos_params <= t["lora_params"] / RATIO
    by_name = dict(zip(PAIRS[project], zip(adapters, res.adapters)))
    loaded = [load_mos(out / a.name) for a in summary.adapters]
    sources = [by_name[a.name][0] for a in summary.adapters]
    for mos, a in zip(loaded, summary.adapters):  # the saved adapters are the fitted ones
        assert_same_mos(mos, by_name[a.name][1])
    measured, _ = measured_error(sources, loaded)
    print(f"{project}: saved adapters' error {measured:.5f}, zoo totals {t['relative_error']:.5f}, "
          f"params {t['lora_params']} -> {t['mos_params']}")
    assert measured < res.totals.independent_relative_error
    assert t["relative_error"] == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("project", sorted(PAIRS))
def test_zoo_pairs_at_ratio_16_and_8_against_issue_12s_figures(project):
    """Issue 12's figures for the pairs, measured on the assembled adapters: below 0.78
    (gemma3) and 0.68 (opt) at total ratio 16; at ratio 8 opt <= 0.50 (its last 560
    parameters buy a partial column) and gemma3 below the plain joint basis's 0.633 (the
    issue's <= 0.63 is below what any per-module form reaches on gemma3, docs/batch.md)."""
    adapters, res8 = pair_fit(project)
    with one_thread():
        res16 = fit_group(adapters, 16.0, seed=0)
    for ratio, res, limit in ((8.0, res8, {"gemma3-270m-svg-x3": 0.633,
                                           "opt-125m-lora-ckpts": 0.5}[project]),
                              (16.0, res16, {"gemma3-270m-svg-x3": 0.78,
                                             "opt-125m-lora-ckpts": 0.68}[project])):
        measured, _ = measured_error(adapters, res.adapters)
        print(f"{project} ratio {ratio}: {measured:.5f} at {group_params(res)} params")
        assert res.mode == "shared"
        assert group_params(res) <= math.floor(sum(a.params for a in adapters) / ratio)
        assert measured <= limit
        assert measured == pytest.approx(res.totals.shared_relative_error, rel=1e-6)


# ------------------------------------------------------------------ synthetic zoos


def lora_like_zoo(root: Path, n: int = 8, **kw) -> list[Path]:
    return [write_lora_like(root / f"task{i}", i, layers=4, d=256, d_kv=64, r=16, **kw)
            for i in range(n)]


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """Eight adapters with the same seeded A init (plus 1% drift) and their own B."""
    root = tmp_path_factory.mktemp("trained_like") / "zoo"
    return root, [read_adapter(p) for p in lora_like_zoo(root)]


def test_same_init_zoo_shared_clearly_beats_independent(trained_like):
    _, adapters = trained_like
    res = fit_group(adapters, RATIO, seed=0)
    t = asdict(res.totals)
    lora = sum(a.params for a in adapters)
    measured, per = measured_error(adapters, res.adapters)
    ref_err, _, budget = independent_reference(adapters, RATIO)
    numbers = (f"8 same-init adapters: mode {res.mode}, params {t.get('mos_params')} "
               f"(budget {budget}), shared error {measured:.4f} (claimed "
               f"{t['shared_relative_error']:.4f}), independent {t['independent_relative_error']:.4f} "
               f"(reference {ref_err:.4f}), ratio {measured / ref_err:.3f}")
    print(numbers)
    assert res.mode == "shared", numbers
    assert t["mos_params"] <= lora / RATIO and group_params(res) == t["mos_params"], numbers
    assert t["independent_relative_error"] == pytest.approx(
        independent_measured(adapters, RATIO), rel=1e-4), numbers
    assert measured == pytest.approx(t["shared_relative_error"], rel=1e-3), numbers
    assert measured <= 0.8 * ref_err, numbers
    assert measured <= 0.8 * t["independent_relative_error"], numbers
    # every adapter got a share of the pools: none is left far behind
    assert max(per) < ref_err, numbers
    for mos in res.adapters:
        for p in mos.kinds.values():
            assert p.shared and p.shared["n_A"] == res.shared_pools[p.shared["key_A"]].shape[0]
            assert torch.equal(p.pool_A[: p.shared["n_A"]], res.shared_pools[p.shared["key_A"]])


def test_independent_init_falls_back(tmp_path):
    """A different random A per adapter: stacking finds no common row space."""
    adapters = [read_adapter(p) for p in lora_like_zoo(tmp_path / "zoo", shared_A=False)]
    res = fit_group(adapters, RATIO, seed=0)
    t = asdict(res.totals)
    measured, _ = measured_error(adapters, res.adapters)
    ref_err, _, _ = independent_reference(adapters, RATIO)
    numbers = (f"independent inits: mode {res.mode}, error {measured:.4f}, independent "
               f"{t['independent_relative_error']:.4f} (reference {ref_err:.4f}), shared would "
               f"be {t['shared_relative_error']:.4f}")
    print(numbers)
    # the floor: never worse than converting each adapter alone (a plain batch run)
    assert measured <= independent_measured(adapters, RATIO) * (1 + 1e-4), numbers
    assert res.mode == "independent", numbers
    assert not res.shared_pools
    assert all(not p.shared for m in res.adapters for p in m.kinds.values())
    assert sum(m.params for m in res.adapters) <= sum(a.params for a in adapters) / RATIO


def test_fit_group_is_deterministic(trained_like):
    _, adapters = trained_like
    a, b = fit_group(adapters, RATIO, seed=0), fit_group(adapters, RATIO, seed=0)
    assert a.mode == b.mode == "shared"
    assert list(a.shared_pools) == list(b.shared_pools)
    for key in a.shared_pools:
        assert torch.equal(a.shared_pools[key], b.shared_pools[key]), key
    for ma, mb in zip(a.adapters, b.adapters, strict=True):
        assert_same_mos(ma, mb)
    assert json.dumps([r.to_json() for r in a.reports]) == json.dumps([r.to_json() for r in b.reports])
    assert a.totals == b.totals


def test_run_batch_shared_is_deterministic(trained_like, tmp_path):
    zoo, _ = trained_like
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        summary = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True))
        assert summary.failed == 0 and summary.totals.converted == 8
        assert summary.totals.shared_pool_params > 0
        assert summary.totals.mos_params <= summary.totals.lora_params / RATIO
    one, two = files_of(outs[0]), files_of(outs[1])
    assert sorted(one) == sorted(two)
    assert any(k.startswith(f"{POOLS_DIR}/") for k in one)
    assert [k for k in one if one[k] != two[k]] == []
    assert summary_numbers(outs[0]) == summary_numbers(outs[1])
    s = json.loads((outs[0] / SUMMARY_FILE).read_text())
    assert len({a["group"] for a in s["adapters"]}) == 1


def test_synthetic_zoo_joint_fit_gains_with_n(tmp_path):
    """A zoo built as training builds one (two init seeds, a shared output subspace plus
    adapter-specific parts): the joint fit beats converting each adapter alone by a clear
    margin, more so the more adapters share the bases, and every member gains."""
    paths = example_module("synthetic_zoo").write_zoo(tmp_path / "zoo", 8, d=128, d_kv=32, r=8,
                                              layers=2)
    adapters = [read_adapter(p) for p in paths]
    errors = []
    for n in (4, 8):
        res = fit_group(adapters[:n], RATIO, seed=0)
        t = res.totals
        measured, per = measured_error(adapters[:n], res.adapters)
        alone = [r.totals.truncation_relative_error for r in res.reports]
        print(f"N={n}: joint {measured:.4f}, alone {t.independent_relative_error:.4f}, "
              f"pool {t.pool_params}, own {t.local_params}")
        assert res.mode == "shared"
        assert measured <= 0.9 * t.independent_relative_error
        assert all(p < a for p, a in zip(per, alone, strict=True))  # nobody pays for the others
        assert group_params(res) == t.mos_params <= t.lora_params / RATIO
        errors.append(measured)
    assert errors[1] < errors[0]


# ------------------------------------------------------------------ adding to a fitted zoo


def test_adding_adapters_fits_only_them_and_leaves_the_zoo_untouched(tmp_path):
    from mosconv.pipeline import export_lora

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    for i in range(4):
        write_lora_like(zoo / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    first = run_batch(zoo, out, config)
    assert first.failed == 0 and first.totals.shared_pool_params > 0
    before = files_of(out)
    for i in (4, 5):  # the zoo gains two adapters of the same base model
        write_lora_like(zoo / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
    again = run_batch(zoo, out, config)
    status = {a.name: a.status for a in again.adapters}
    assert status == {**{f"task{i}": "skipped" for i in range(4)},
                      "task4": "converted", "task5": "converted"}
    after = files_of(out)
    for path, data in before.items():  # existing members and the pool file: same bytes
        if not path.endswith(".members.json"):  # the record of who the pools serve grows
            assert after[path] == data, path
    served = json.loads(next((out / POOLS_DIR).glob("*.members.json")).read_text())["members"]
    assert served == [f"task{i}" for i in range(6)]
    for a in again.adapters[4:]:
        mos = load_mos(out / a.name)
        assert mos.local_params <= read_adapter(zoo / a.name).params / RATIO
        exp = export_lora(out / a.name, tmp_path / "exp" / a.name)
        assert exported_error(zoo / a.name, exp) == pytest.approx(a.relative_error, rel=1e-4)
        # the shared bases serve the newcomer better than converting it alone
        assert a.relative_error < a.truncation_relative_error
        assert _mixed_routes(mos)  # a private residual beside the shared rows
    refit = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, refit=True))
    assert {a.status for a in refit.adapters} == {"converted"}  # gained members since its fit
    refit = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, refit=True))
    assert {a.status for a in refit.adapters} == {"skipped"}  # fitted on all: nothing to refit
    (out / "task0" / "mos_config.json").unlink()  # an incomplete member, with --refit
    refit = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, refit=True))
    assert {a.status for a in refit.adapters} == {"converted"}


def test_a_newcomer_is_never_worse_than_compress_gives_it_alone(tmp_path):
    """A rank-4 newcomer to a group of rank-8 adapters beat truncation against the bases but
    lost to compress --search fast alone (0.774 against 0.756): it is converted alone."""
    from mosconv.fit.convert import ConvertConfig, convert

    synthetic = example_module("synthetic_zoo")
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    synthetic.write_zoo(zoo, 3, d=128, d_kv=64, r=8, layers=2)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    assert run_batch(zoo, out, config).totals.shared_pool_params > 0
    synthetic.write_zoo(tmp_path / "r4", 1, d=128, d_kv=64, r=4, layers=2)
    (tmp_path / "r4" / "task00").rename(zoo / "new_r4")
    row = next(a for a in run_batch(zoo, out, config).adapters if a.name == "new_r4")
    alone = convert(read_adapter(zoo / "new_r4"), ConvertConfig(ratio=RATIO))
    assert row.status == "converted"
    assert row.relative_error <= alone.report.totals.relative_error + 1e-9


def test_a_group_that_lost_and_gained_members_adds_the_new_ones_only(tmp_path):
    """One member leaving and one joining (a renamed folder is both) fits only the newcomer
    against the pools, as an add does; it refitted the whole group and deleted the pool
    file the departed member's output still refers to."""
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    for i in range(3):
        write_lora_like(zoo / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    assert run_batch(zoo, out, config).totals.shared_pool_params > 0
    before = files_of(out)
    (zoo / "task0").rename(tmp_path / "gone")
    write_lora_like(zoo / "task3", 3, layers=2, d=64, d_kv=32, r=8)
    status = {a.name: a.status for a in run_batch(zoo, out, config).adapters}
    assert status == {"task1": "skipped", "task2": "skipped", "task3": "converted"}
    after = files_of(out)
    for path, data in before.items():
        if not path.endswith(".members.json"):
            assert after[path] == data, path
    load_mos(out / "task0")  # its pool file is still there


def test_a_group_that_falls_back_writes_each_member_as_compress_does(tmp_path):
    """A float16 member of a group that also has a float32 one is stored float16 when the
    group falls back to converting each alone (it was float32: twice the bytes)."""
    from safetensors.torch import load_file, save_file

    from mosconv.fit.convert import ConvertConfig
    from mosconv.pipeline import compress

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    example_module("synthetic_zoo").write_zoo(tmp_path / "z", 2, d=128, d_kv=64, r=8,
                                              layers=2)
    (tmp_path / "z" / "task00").rename(zoo.mkdir() or zoo / "a")
    (tmp_path / "z" / "task01").rename(zoo / "b")
    weights = zoo / "b" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    summary = run_batch(zoo, out, BatchConfig(ratio=8, shared_pool=True))
    assert summary.totals.shared_pool_params == 0  # the group falls back
    compress(zoo / "b", tmp_path / "alone", ConvertConfig(ratio=8))
    assert load_mos(out / "b").storage.dtype == "float16"
    assert (out / "b" / "mos_adapter.safetensors").read_bytes() == \
        (tmp_path / "alone" / "mos_adapter.safetensors").read_bytes()


class _Killed(BaseException):
    """A run stopped where it stands (as by kill -9): no handler runs."""


def test_a_newcomer_written_but_not_yet_recorded_is_recorded_on_the_rerun(tmp_path, monkeypatch):
    """A run killed between writing an added member and recording it in the pool's member
    record left it off the record for good: the rerun skipped it as complete, and --refit
    no longer saw that the group gained a member since its fit."""
    from mosconv.batch import run

    zoo = tmp_path / "zoo"
    for i in range(3):
        write_lora_like(zoo / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    with one_thread():
        run_batch(zoo, tmp_path / "a", config)
        run_batch(zoo, tmp_path / "b", config)
        write_lora_like(zoo / "task3", 3, layers=2, d=64, d_kv=32, r=8)
        run_batch(zoo, tmp_path / "a", config)  # uninterrupted

        def killed(*args, **kwargs):
            raise _Killed

        with monkeypatch.context() as m:  # the member is written, then the run dies
            m.setattr(run, "write_pool_members", killed)
            with pytest.raises(_Killed):
                run_batch(zoo, tmp_path / "b", config)
        assert (tmp_path / "b" / "task3" / "mos_config.json").is_file()
        rerun = run_batch(zoo, tmp_path / "b", config)
        assert {a.status for a in rerun.adapters} == {"skipped"}
        assert files_of(tmp_path / "b") == files_of(tmp_path / "a")
        refit = run_batch(zoo, tmp_path / "b", BatchConfig(ratio=RATIO, shared_pool=True,
                                                           refit=True))
    assert {a.status for a in refit.adapters} == {"converted"}  # it gained task3 since


def test_no_member_is_worse_off_than_converted_alone(tmp_path):
    """A group of related adapters plus one trained from another seed on another task: the
    newcomer would pay for the others' shared bases, so it is converted alone; every member's
    error is at most its error converted alone, and the related ones still share."""
    from mosconv.fit.convert import ConvertConfig, convert

    paths = [write_lora_like(tmp_path / f"t{i}", i, layers=2, d=256, d_kv=64, r=16)
             for i in range(3)]
    paths.append(write_lora_like(tmp_path / "other", 7, layers=2, d=256, d_kv=64, r=16,
                                 shared_A=False, seed=3, decay=0.95))
    adapters = [read_adapter(p) for p in paths]
    res = fit_group(adapters, RATIO, seed=0)
    alone = [convert(a, ConvertConfig(ratio=RATIO)).report.totals.relative_error
             for a in adapters]
    got = [r.totals.relative_error for r in res.reports]
    print("joint", [f"{e:.4f}" for e in got], "alone", [f"{e:.4f}" for e in alone],
          "members served", res.totals.joint_members)
    assert all(g <= a * (1 + 1e-6) for g, a in zip(got, alone, strict=True))
    assert res.mode == "shared" and res.totals.joint_members >= 2
    assert group_params(res) <= res.totals.budget


def test_newcomers_get_private_residuals_and_are_never_worse_off(tmp_path):
    """Adapters joining a fitted group: their parts against the shared bases grow private
    residuals (directions outside the bases) where that pays; one from another seed and
    task, which the bases do not serve, is converted alone."""
    from mosconv.fit.convert import ConvertConfig, convert
    from mosconv.fit.zoo import fit_new_members

    paths = [write_lora_like(tmp_path / f"t{i}", i, layers=2, d=128, d_kv=64, r=16)
             for i in range(5)]
    paths.append(write_lora_like(tmp_path / "other", 7, layers=2, d=128, d_kv=64, r=16,
                                 shared_A=False, seed=3, decay=0.95))
    adapters = [read_adapter(p) for p in paths]
    res = fit_group(adapters[:4], RATIO, seed=0)
    assert res.mode == "shared"
    mos, reports = fit_new_members(res.adapters, adapters[4:], RATIO)
    alone = [convert(a, ConvertConfig(ratio=RATIO)).report.totals.relative_error
             for a in adapters[4:]]
    got = [r.totals.relative_error for r in reports]
    print("new", [f"{e:.4f}" for e in got], "alone", [f"{e:.4f}" for e in alone])
    assert all(g <= a * (1 + 1e-6) for g, a in zip(got, alone, strict=True))
    assert got[0] < 0.9 * alone[0]  # the related newcomer gains from the bases
    assert _mixed_routes(mos[0])  # residual directions of its own beside the shared rows
    for m_new, a in zip(mos, adapters[4:]):
        assert m_new.local_params <= a.params / RATIO


def _mixed_routes(mos) -> list[str]:
    """Modules with one side routed both to the group's shared rows and to rows of their own."""
    out = []
    for m in mos.modules:
        p = mos.kinds[m.kind]
        if not p.shared:
            continue
        for routes, n in ((m.routes_A, p.shared["n_A"]), (m.routes_B, p.shared["n_B"])):
            if bool((routes < n).any()) and bool((routes >= n).any()):
                out.append(m.name)
    return out


def test_newcomer_residuals_on_joint_cores_match_their_reported_errors(tmp_path):
    """A zoo whose members share bases on both sides with a core each (two init seeds, a
    shared output subspace): newcomers' cores grow by their residual directions; the errors
    reported equal the errors of the adapters as built, and they beat converting alone."""
    from mosconv.fit.zoo import fit_new_members

    paths = example_module("synthetic_zoo").write_zoo(tmp_path / "zoo", 8, d=128, d_kv=64, r=16,
                                                      layers=2)
    adapters = [read_adapter(p) for p in paths]
    res = fit_group(adapters[:6], RATIO, seed=0)
    assert res.mode == "shared"
    mos, reports = fit_new_members(res.adapters, adapters[6:], RATIO)
    _, per = measured_error(adapters[6:], mos)
    for m, r, e in zip(mos, reports, per, strict=True):
        assert e == pytest.approx(r.totals.relative_error, rel=1e-4)
        assert r.totals.relative_error < 0.85 * r.totals.truncation_relative_error
        n_B = {k: p.shared["n_B"] for k, p in m.kinds.items() if p.shared}
        assert any(x.core is not None and x.core.shape[0] > int((x.routes_B < n_B[x.kind]).sum())
                   for x in m.modules)  # a core wider than the shared basis: a residual


# ------------------------------------------------------------------ exact allocation


def _write_checkpoints(root: Path, n: int = 2, noise: float = 0.1, layers: int = 4,
                       base: str = "tiny-lm") -> list[Path]:
    """Checkpoints of one training run: a LoRA folder, then the same tensors each moved a
    little (``noise`` times the tensor's std, a fresh draw per checkpoint), as later
    checkpoints of the run leave them."""
    from safetensors.torch import load_file, save_file

    first = write_lora_like(root / "ckpt-0", 0, layers=layers, d=64, d_kv=32, r=8, base=base)
    tensors = load_file(str(first / "adapter_model.safetensors"))
    out = [first]
    for i in range(1, n):
        g = torch.Generator().manual_seed(i)
        folder = root / f"ckpt-{i}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
        save_file({k: (v + noise * v.std() * torch.randn(v.shape, generator=g)).contiguous()
                   for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        out.append(folder)
    return out


def _tied_modules(moses) -> list[str]:
    """Modules where every member routes to the same shared rows with no core of its own."""
    out = []
    for m in moses[0].modules:
        p = moses[0].kinds[m.kind]
        others = [x.module(m.name) for x in moses[1:]]
        if (p.shared and m.core is None and len(m.routes_A) and all(
                o.core is None and torch.equal(o.routes_A, m.routes_A)
                and torch.equal(o.routes_B, m.routes_B) for o in others)
                and bool((m.routes_A < p.shared["n_A"]).all())
                and bool((m.routes_B < p.shared["n_B"]).all())):
            out.append(m.name)
    return out


def test_checkpoints_of_one_run_share_one_approximation(tmp_path, monkeypatch):
    """Nearly equal adapters (checkpoints of one run): modules where both route to the same
    rows with no core (the tied form) spend the cores' parameters on more rank; the group's
    error is lower than without the form, and measured equals reported."""
    from mosconv.fit import joint

    adapters = [read_adapter(p) for p in _write_checkpoints(tmp_path)]
    budget = math.floor(sum(a.params for a in adapters) / RATIO)
    res = fit_group(adapters, RATIO, seed=0)
    assert res.mode == "shared"
    tied = _tied_modules(res.adapters)
    assert tied
    for n in tied:  # one approximation for both
        assert torch.equal(mos_update(res.adapters[0], n), mos_update(res.adapters[1], n))
    measured, per = measured_error(adapters, res.adapters)
    assert measured == pytest.approx(res.totals.shared_relative_error, rel=1e-6)
    assert group_params(res) <= budget
    for e, r in zip(per, res.reports):
        assert e == pytest.approx(r.totals.relative_error, rel=1e-6)
        assert e < r.totals.truncation_relative_error
    monkeypatch.setattr(joint, "TIED_MAX_FLOOR", -1.0)  # the form never computed
    without = fit_group(adapters, RATIO, seed=0)
    assert without.mode == "shared" and not _tied_modules(without.adapters)
    print(f"checkpoints at ratio {RATIO}: {measured:.5f} with tied modules ({len(tied)}), "
          f"{without.totals.shared_relative_error:.5f} without")
    assert measured < without.totals.shared_relative_error - 0.005


def test_tied_groups_write_load_export_and_take_newcomers(tmp_path):
    """A batch of checkpoints writes its tied modules as plain routes into the pool file
    (no core); they load, export to the errors reported, and a later checkpoint joining the
    group gets a core against both sides of the tied rows, leaving the others untouched."""
    from mosconv.pipeline import export_lora

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    paths = _write_checkpoints(zoo, n=3)
    newcomer = paths[2].rename(tmp_path / "later")
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    first = run_batch(zoo, out, config)
    assert first.failed == 0 and first.totals.shared_pool_params > 0
    loaded = [load_mos(out / a.name) for a in first.adapters]
    assert _tied_modules(loaded)
    for a in first.adapters:
        exp = export_lora(out / a.name, tmp_path / "exp" / a.name)
        assert exported_error(zoo / a.name, exp) == pytest.approx(a.relative_error, rel=1e-4)
    before = files_of(out)
    newcomer.rename(zoo / "ckpt-2")
    again = run_batch(zoo, out, config)
    assert {a.name: a.status for a in again.adapters} == {
        "ckpt-0": "skipped", "ckpt-1": "skipped", "ckpt-2": "converted"}
    after = files_of(out)
    for path, data in before.items():
        if not path.endswith(".members.json"):
            assert after[path] == data, path
    new = load_mos(out / "ckpt-2")
    tied = _tied_modules(loaded)
    p = new.kinds[new.module(tied[0]).kind]
    cored = [n for n in tied if new.module(n).core is not None
             and bool((new.module(n).routes_A < p.shared["n_A"]).any())
             and bool((new.module(n).routes_B < p.shared["n_B"]).any())]
    assert cored  # a core against both sides of the tied rows
    rep = again.adapters[2]
    exp = export_lora(out / "ckpt-2", tmp_path / "exp" / "ckpt-2")
    assert exported_error(zoo / "ckpt-2", exp) == pytest.approx(rep.relative_error, rel=1e-4)
    assert rep.relative_error < rep.truncation_relative_error


def test_tied_basis_is_the_truncated_weighted_mean():
    """``tied_basis`` against dense arithmetic: ``U V^T`` is the weighted mean's rank-``k``
    truncation, ``err[k]`` the holders' weighted squared error; unrelated updates: None."""
    from mosconv.fit.factorize import Factorization
    from mosconv.fit.joint import joint_basis, tied_basis

    g = torch.Generator().manual_seed(3)
    common = torch.randn(12, 4, generator=g, dtype=torch.float64) @ \
        torch.randn(4, 9, generator=g, dtype=torch.float64)

    def fact(dw, w=1.0):
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        return Factorization(U[:, :6], S[:6] * w, Vh[:6].T, None)

    dws = []
    for _ in range(3):
        B = torch.randn(12, 2, generator=g, dtype=torch.float64)
        A = torch.randn(2, 9, generator=g, dtype=torch.float64)
        dws.append(common + 0.2 * B @ A)
    weights = [1.0, 2.0, 0.5]
    basis = joint_basis([fact(d, math.sqrt(w)) for d, w in zip(dws, weights)])
    tb = tied_basis([fact(d, w) for d, w in zip(dws, weights)], basis, sum(weights))
    assert tb is not None
    mean = sum(w * d for w, d in zip(weights, dws)) / sum(weights)
    U, S, Vh = torch.linalg.svd(mean)
    for k in range(tb.err.numel()):
        X = (U[:, :k] * S[:k]) @ Vh[:k]
        assert torch.allclose(tb.U[:, :k] @ tb.V[:, :k].T, X, atol=1e-10)
        assert float(tb.err[k]) == pytest.approx(
            sum(w * float(((d - X) ** 2).sum()) for w, d in zip(weights, dws)), rel=1e-9)
    far = [torch.zeros(12, 9, dtype=torch.float64) for _ in range(2)]
    far[0][:6, :4] = torch.randn(6, 4, generator=g, dtype=torch.float64)
    far[1][6:, 4:] = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert tied_basis([fact(d) for d in far], joint_basis([fact(d) for d in far]), 2.0) is None


def _small_group(seed: int):
    """Three modules of two holders each (rank 2 factorizations), shapes differing."""
    from mosconv.fit.factorize import Factorization

    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (7, 5), "b": (4, 9), "c": (6, 6)}
    shared = {n: (torch.randn(o, 1, generator=g), torch.randn(1, i, generator=g))
              for n, (i, o) in shapes.items()}
    facts = []
    for _ in range(2):
        fa = {}
        for n, (d_in, d_out) in shapes.items():
            B = torch.randn(d_out, 2, generator=g) * 0.5
            A = torch.randn(2, d_in, generator=g)
            dw = (B @ A + 2 * shared[n][0] @ shared[n][1]).double()
            U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
            fa[n] = Factorization(U[:, :3], S[:3], Vh[:3].T, None)
        facts.append(fa)
    return list(shapes), {n: (0, 1) for n in shapes}, facts


def _brute_force(names, holders, facts, bases, budget):
    """Least predicted error over every combination of every module's options, listed here
    from the definitions (no frontier): joint ranks, one-sided ranks, private ranks per holder."""
    import itertools

    menus = []
    for n in names:
        d_in, d_out = facts[0][n].d_in, facts[0][n].d_out
        b, h = bases[n], len(holders[n])
        g = [fa[n].S.double() ** 2 for fa in facts]
        menu = [((r0 + r1) * (d_in + d_out), float(g[0][r0:].sum() + g[1][r1:].sum()))
                for r0 in range(g[0].numel() + 1) for r1 in range(g[1].numel() + 1)]
        menu += [(a * d_out + c * d_in + h * a * c, b.energy - float(b.kept[a, c]))
                 for a in range(1, b.kept.shape[0]) for c in range(1, b.kept.shape[1])]
        menu += [(k * (d_in + h * d_out), b.energy - float(b.gain_V[:k].sum()))
                 for k in range(1, b.gain_V.numel() + 1)]
        menu += [(k * (d_out + h * d_in), b.energy - float(b.gain_U[:k].sum()))
                 for k in range(1, b.gain_U.numel() + 1)]
        if b.tied is not None:
            menu += [(k * (d_in + d_out), float(b.tied.err[k]))
                     for k in range(1, b.tied.err.numel())]
        menus.append(menu)
    return min(sum(e for _, e in combo) for combo in itertools.product(*menus)
               if sum(c for c, _ in combo) <= budget)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_allocation_matches_brute_force_and_never_loses(seed):
    from mosconv.fit.joint import (
        _by_price,
        _greedy,
        _knapsack,
        allocate,
        joint_basis,
        plan_params,
        spectra,
        tied_basis,
    )

    names, holders, facts = _small_group(seed)
    bases = {n: joint_basis([fa[n] for fa in facts]) for n in names}
    for n, b in bases.items():  # the tied form where it may pay (weights 1)
        bases[n] = replace(b, tied=tied_basis([fa[n] for fa in facts], b, 2.0))
    assert any(b.tied is not None for b in bases.values())
    spec = spectra(names, holders, facts)
    shape = spec[1]
    for budget in (10, 23, 40, 61, 90, 140):
        plans, err = _knapsack(names, holders, spec, bases, budget)
        assert sum(plan_params(p, shape[p.name]) for p in plans) <= budget
        assert err == pytest.approx(_brute_force(names, holders, facts, bases, budget),
                                    rel=1e-12, abs=1e-12), budget
        chosen = allocate(names, holders, spec, bases, budget)[1]
        assert chosen <= _by_price(names, holders, spec, bases, budget)[1] + 1e-12
        assert chosen <= _greedy(names, holders, spec, bases, budget)[1] + 1e-12
        assert chosen == pytest.approx(err, rel=1e-12, abs=1e-12)
        # coarse units (rounded-up costs) still fit the budget
        coarse = _knapsack(names, holders, spec, bases, budget, cells=4)
        assert sum(plan_params(p, shape[p.name]) for p in coarse[0]) <= budget
        assert coarse[1] >= err - 1e-12
    assert _knapsack(names, holders, spec, bases, 140, work=10) is None


# ------------------------------------------------------------------ members held in chunks


@dataclass(frozen=True)
class _Handle:
    key: int


class IsolatedReducer:
    """A reducer whose tasks see copies of what it keeps (as another process would) and whose
    caller gets opaque handles; it records every value that comes back to the caller."""

    def __init__(self) -> None:
        self.store: dict[int, object] = {}
        self.returned: list = []  # what tasks sent back, and what get fetched
        self.gets = 0

    def _copy(self, x):
        return pickle.loads(pickle.dumps(x))  # our own objects, in this test only

    def _arg(self, a):
        return self._copy(self.store[a.key]) if isinstance(a, _Handle) else self._copy(a)

    def put(self, value):
        h = _Handle(len(self.store))
        self.store[h.key] = self._copy(value)
        return h

    def map(self, fn, args):
        out = [self._copy(fn(*[self._arg(a) for a in x])) for x in args]
        self.returned.append(out)
        return out

    def keep(self, fn, args):
        out = []
        for x in args:
            heavy, light = fn(*[self._arg(a) for a in x])
            light = self._copy(light)
            self.returned.append(light)
            out.append((self.put(heavy), light))
        return out

    def get(self, h):
        self.gets += 1
        value = self._copy(self.store[h.key])
        self.returned.append(value)
        return value


def _held(x, seen=None):
    """Every object reachable from ``x`` through containers and dataclasses, and the bytes
    of the tensors among them."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(x) in seen:
        return [], 0
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        return [x], x.numel() * x.element_size()
    items = (list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, list | tuple)
             else [getattr(x, f.name) for f in dataclasses.fields(x)]
             if dataclasses.is_dataclass(x) and not isinstance(x, type) else [])
    objs, size = [x], 0
    for y in items:
        o, s = _held(y, seen)
        objs += o
        size += s
    return objs, size


def test_group_fit_holds_no_factorization_outside_its_chunks(tmp_path):
    """``batch --shared-pool``'s group fit with members held in chunks elsewhere (copies, opaque
    handles): the fitting process gets back spectra, bases, last triangles of reductions and
    reports, no adapter, factorization, chunk or MoS adapter, and no tensor larger than one
    module's ``d x d``; the fit is the one computed in this process (same pools, reports and
    built adapters)."""
    from mosconv.batch.run import discover, fit_group_items
    from mosconv.fit.factorize import Factorization
    from mosconv.fit.zoo import Chunk
    from mosconv.lora.types import LoraAdapter
    from mosconv.mos.types import MosAdapter

    for i in range(7):
        write_lora_like(tmp_path / "zoo" / f"t{i}", i, layers=2, seed=int(i >= 5))
    items = discover(tmp_path / "zoo")
    config = BatchConfig(ratio=RATIO, shared_pool=True, chunk=2)
    iso = IsolatedReducer()
    handles, fit = fit_group_items(items, config, iso)
    _, local = fit_group_items(items, config)
    assert fit.mode == local.mode == "shared"
    assert all(isinstance(h, _Handle) for h in handles)
    assert [b is None for b in fit.built] == [b is None for b in local.built]
    assert any(isinstance(b, _Handle) for b in fit.built)
    assert fit.shared_pools.keys() == local.shared_pools.keys()
    assert all(torch.equal(fit.shared_pools[k], local.shared_pools[k]) for k in fit.shared_pools)
    assert [r.to_json() for r in fit.reports] == [r.to_json() for r in local.reports]
    objs, _ = _held(iso.returned)
    assert not [o for o in objs if isinstance(o, Factorization | LoraAdapter | Chunk | MosAdapter)]
    d = 64  # the widest module of these adapters
    tensors = [o for o in objs if isinstance(o, torch.Tensor)]
    assert iso.gets > 0 and tensors
    assert all(t.dim() <= 2 and max(t.shape, default=0) <= d for t in tensors)
    # the chunks the fit built are written from where they are held: the same adapters
    for c, b in enumerate(local.built):
        if b is None:  # none of the chunk's members is served by the pools
            continue
        built = iso.store[fit.built[c].key]
        assert len(built) == len(b) == len(iso.store[handles[c].key].adapters)
        for m_iso, m_loc in zip(built, b):
            assert (m_iso is None) == (m_loc is None)
            if m_iso is not None:
                assert_same_mos(m_iso.adapter(), m_loc.adapter())


def test_built_members_reference_the_group_pools_without_copies(tmp_path):
    """A member the fit built is held as its own rows plus a reference to the group's pool
    tensors (the same objects for every member), not as a pool per member holding a copy of
    the group's rows; its MoS adapter is assembled when asked for, rows of the group first."""
    from safetensors.torch import load_file, save_file

    from mosconv.fit.zoo import fit_members
    from mosconv.mos.quant import Storage

    paths = [write_lora_like(tmp_path / f"t{i}", i, layers=2, d=64, d_kv=32, r=8)
             for i in range(4)]
    for i, path in enumerate(paths):  # layer 1: every adapter its own A init (nothing shared)
        f = path / "adapter_model.safetensors"
        x = load_file(str(f))
        g = torch.Generator().manual_seed(50 + i)
        for k in [k for k in x if ".layers.1." in k and "lora_A" in k]:
            x[k] = (torch.rand(x[k].shape, generator=g) * 2 - 1) / 8
        save_file(x, str(f))
    adapters = [read_adapter(p) for p in paths]
    _, fit = fit_members(adapters, [Storage()], RATIO, chunk=2)
    assert fit.mode == "shared"
    held = [m for b in fit.built for m in b or [] if m is not None]
    assert len(held) == 4
    own_rows = 0
    for m in held:
        assert m.pools is fit.shared_pools
        mos = m.adapter()
        for kind, p in m.own.kinds.items():
            q = mos.kinds[kind]
            assert p.shared == q.shared
            if not p.shared:
                assert p.pool_A is q.pool_A
                continue
            for side, n in (("A", p.shared["n_A"]), ("B", p.shared["n_B"])):
                own, full = getattr(p, f"pool_{side}"), getattr(q, f"pool_{side}")
                group = fit.shared_pools.get(p.shared[f"key_{side}"])
                assert full.shape[0] == n + own.shape[0]
                assert torch.equal(full[n:], own)
                if group is not None:
                    assert torch.equal(full[:n], group)
                    if not own.shape[0]:
                        assert full is group  # no own rows: the group's tensor itself
                own_rows += own.shape[0]
    assert own_rows > 0  # the private layer's rows sit beside the group's
    again = fit_group(adapters, RATIO, chunk=2)
    for m, a in zip(held, again.adapters, strict=True):
        assert_same_mos(m.adapter(), a)


def test_a_group_whose_members_all_lose_is_fitted_once(tmp_path, monkeypatch):
    """When the joint fit leaves every member worse off than alone, doubling every weight
    would give the same fit again: the group falls back after one fit, as it would after
    all the rounds."""
    from mosconv.fit import zoo

    # a different random A per adapter: nothing to share, everyone loses to alone
    adapters = [read_adapter(p) for p in lora_like_zoo(tmp_path / "zoo", n=4, shared_A=False)]
    calls = []
    real = zoo._joint
    monkeypatch.setattr(zoo, "_joint", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = fit_group(adapters, RATIO, seed=0)
    assert res.mode == "independent" and len(calls) == 1


def test_partial_column_keeps_what_it_says():
    """``partial_column`` against dense arithmetic: the column is zero outside the shards it
    names, and what it says it adds is what least-squares cores against the bases with it
    keep beyond those without it; more shards never keep less."""
    from mosconv.fit.factorize import Factorization
    from mosconv.fit.joint import outside, partial_column

    g = torch.Generator().manual_seed(5)
    dws = [torch.randn(48, 6, generator=g, dtype=torch.float64)
           @ torch.randn(6, 40, generator=g, dtype=torch.float64) for _ in range(3)]
    facts = []
    for dw in dws:
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        facts.append(Factorization(U[:, :6], S[:6], Vh[:6].T, None))
    side_by_side = torch.cat(dws, dim=1)
    U = torch.linalg.svd(side_by_side, full_matrices=False)[0][:, :2]
    V = torch.linalg.svd(torch.cat(dws, dim=0), full_matrices=False)[2][:2].T

    def kept(Ub, Vb):  # least-squares cores for (not orthonormal) bases
        Pu = Ub @ torch.linalg.pinv(Ub)
        Pv = Vb @ torch.linalg.pinv(Vb)
        return sum(float((Pu @ d @ Pv).pow(2).sum()) for d in dws)

    base = kept(U, V)
    for side in ("U", "V"):
        X = outside(facts, U, V, side)
        gains = []
        for n in (1, 3, 5):
            pc = partial_column(X, U if side == "U" else V, side, [(8, n)])
            width = (48 if side == "U" else 40) // 8
            on = torch.zeros_like(pc.column, dtype=torch.bool)
            for j in pc.shards:
                on[j * width:(j + 1) * width] = True
            assert len(pc.shards) == n and not bool(pc.column[~on].ne(0).any())
            col = pc.column[:, None]
            after = (kept(torch.cat([U, col], 1), V) if side == "U"
                     else kept(U, torch.cat([V, col], 1)))
            assert after - base == pytest.approx(pc.gain, rel=1e-9)
            gains.append(pc.gain)
        assert gains == sorted(gains)


def test_the_budget_left_buys_a_partial_column_on_the_opt_pair(tmp_path):
    """The opt pair at ratio 8: its budget is 96 columns of 768 and a plan with cores holds
    at most 95; the rest (560 parameters) buys a column on some of its 32-wide shards, its
    other shards routed to one zero shard (issue 12: <= 0.50, within the budget).  Written,
    loaded and exported to the errors reported; a newcomer joins the sharded kind, leaving
    the other files byte-identical."""
    from safetensors.torch import load_file, save_file

    from mosconv.pipeline import export_lora

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    zoo.mkdir()
    for name in ("final", "checkpoint-10"):
        src = zoo_path(f"opt-125m-lora-ckpts/{name}")
        (zoo / name).mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (zoo / name / f).write_bytes((src / f).read_bytes())
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    first = run_batch(zoo, out, config)
    t = first.totals
    assert first.failed == 0 and t.shared_pool_params > 0
    loaded = [load_mos(out / a.name) for a in first.adapters]
    sharded = [k for k, p in loaded[0].kinds.items() if p.nc > 1]
    assert len(sharded) == 1
    lora = sum(read_adapter(zoo / a.name).params for a in first.adapters)
    group = first.groups[0]
    assert group.relative_error <= 0.50
    assert group.mos_params <= lora // 8
    for a in first.adapters:
        exp = export_lora(out / a.name, tmp_path / "exp" / a.name)
        assert exported_error(zoo / a.name, exp) == pytest.approx(a.relative_error, rel=1e-4)
    before = files_of(out)
    tensors = load_file(str(zoo / "final" / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "adapter_config.json").write_bytes(
        (zoo / "final" / "adapter_config.json").read_bytes())
    save_file({k: (v + 0.1 * v.std() * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in tensors.items()}, str(tmp_path / "later" / "adapter_model.safetensors"))
    (tmp_path / "later").rename(zoo / "later")
    again = run_batch(zoo, out, config)
    assert {a.name: a.status for a in again.adapters}["later"] == "converted"
    after = files_of(out)
    for path, data in before.items():
        if not path.endswith(".members.json"):
            assert after[path] == data, path
    new = load_mos(out / "later")
    assert new.kinds[sharded[0]].nc == loaded[0].kinds[sharded[0]].nc
    rep = next(a for a in again.adapters if a.name == "later")
    exp = export_lora(out / "later", tmp_path / "exp" / "later")
    assert exported_error(zoo / "later", exp) == pytest.approx(rep.relative_error, rel=1e-4)
    assert rep.relative_error < rep.truncation_relative_error


def test_a_byte_budget_leaves_the_remainder_unspent():
    """Under ``size_ratio`` (bytes are the budget) the remainder is not tried: its routes
    would cost bytes for the last parameters, and the shrinking search then lands far below
    the byte budget (opt at size ratio 32: 0.3516 with it, 0.3420 without)."""
    adapters = [read_adapter(zoo_path(f"opt-125m-lora-ckpts/{n}"))
                for n in ("final", "checkpoint-10")]
    res = fit_group(adapters, 8.0, size_ratio=32.0, quantize="auto")
    assert res.mode == "shared"
    assert all(p.nc == 1 for a in res.adapters for p in a.kinds.values())
    assert res.totals.shared_relative_error < 0.345


def test_fit_group_names_what_is_wrong_with_its_arguments(tmp_path):
    from factory import llama_like, write_random_peft

    from mosconv.errors import ConfigError

    a = read_adapter(write_lora_like(tmp_path / "a", 0))
    other = read_adapter(write_random_peft(tmp_path / "b", llama_like(layers=1, d=16, d_kv=8))[0])
    with pytest.raises(ConfigError, match="a group needs at least one adapter, got none"):
        fit_group([], 8.0)
    with pytest.raises(ConfigError, match="adapters 0 and 1 have different module kinds"):
        fit_group([a, other], 8.0)
    with pytest.raises(ConfigError, match="chunk must be an integer >= 1, got 0"):
        fit_group([a, a], 8.0, chunk=0)
