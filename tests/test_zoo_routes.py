"""Re-routing in a zoo's joint fit: each member's core spans only the basis columns that serve
it (its routes into the group's pool file), so the group can afford wider bases within the
same budget.  The cut is exact in energy, the routes are what load, export and newcomers see,
and the fit only keeps it where it lowers the group's error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import example_module
from test_batch import files_of
from test_zoo import exported_error, group_params, measured_error

from mosconv.batch.run import BatchConfig, run_batch
from mosconv.cli import main
from mosconv.fit import zoo
from mosconv.fit.joint import ModulePlan, _trim_steps, plan_params, route_cores
from mosconv.fit.zoo import fit_group
from mosconv.lora.read import read_adapter
from mosconv.mos.format import load_mos

RATIO = 8.0
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic(root: Path, n: int = 12, start: int = 0) -> list[Path]:
    """The synthetic zoo (two init seeds, a shared output subspace plus adapter-specific
    parts), small: one layer of q/v projections of width 64."""
    paths = example_module("synthetic_zoo").write_zoo(root, start + n, d=64, d_kv=32, r=8,
                                                      layers=1)
    return paths[start:]


def routes_of(mos, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    m = mos.module(name)
    return tuple(m.routes_B.tolist()), tuple(m.routes_A.tolist())


def test_route_cores_cuts_the_least_energy_per_parameter_first():
    # holder 0's last column keeps 0.11 over 2 params; every other cut costs more per param
    e0 = torch.tensor([[9.0, 1.0, 0.1], [4.0, 0.5, 0.01]], dtype=F64)
    e1 = torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0]], dtype=F64)
    joint = ModulePlan("m", (0, 1), "joint", k_U=2, k_V=3)
    private = ModulePlan("p", (0,), "private", ranks=(1,))
    shape = (3, 4)  # (d_in, d_out)
    cuts = {"m": [(float(e.sum()), _trim_steps(e)) for e in (e0, e1)]}
    (cut, kept), lost = route_cores([joint, private], cuts, excess=2)
    assert kept == private
    assert cut.subsets == (((0, 1), (0, 1)), ((0, 1), (0, 1, 2)))
    assert lost == pytest.approx(0.11)
    assert plan_params(joint, shape) - plan_params(cut, shape) == 2
    # the next cheapest: holder 0's second column (1.5 over 2 params once the third went)
    (cut, _), lost = route_cores([joint, private], cuts, excess=3)
    assert cut.subsets[0] == ((0, 1), (0,)) and lost == pytest.approx(0.11 + 1.5)
    assert plan_params(joint, shape) - plan_params(cut, shape) == 4
    # every core down to 1 x 1 frees 5 + 5 parameters, no more
    assert route_cores([joint], cuts, excess=11) is None


def test_rerouted_group_is_better_within_budget_and_measured_as_reported(tmp_path,
                                                                         monkeypatch):
    adapters = [read_adapter(p) for p in synthetic(tmp_path / "zoo")]
    res = fit_group(adapters, RATIO)
    monkeypatch.setattr(zoo, "ROUTE_STEPS", ())  # re-routing off
    dense = fit_group(adapters, RATIO)
    assert res.mode == dense.mode == "shared"
    measured, per = measured_error(adapters, res.adapters)
    assert measured == pytest.approx(res.totals.shared_relative_error, rel=1e-6)
    print(f"re-routed {measured:.4f}, dense {dense.totals.shared_relative_error:.4f}, "
          f"alone {res.totals.independent_relative_error:.4f}")
    assert measured < dense.totals.shared_relative_error * 0.99
    alone = [r.totals.truncation_relative_error for r in res.reports]
    assert all(p <= a for p, a in zip(per, alone, strict=True))
    assert group_params(res) == res.totals.mos_params <= res.totals.budget
    # members route to different basis columns of one module, and a core spans its routes
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        routes = {routes_of(m, name) for m in res.adapters}
        assert len(routes) > 1, name
        for m in res.adapters:
            mm = m.module(name)
            assert mm.core.shape == (mm.routes_B.numel(), mm.routes_A.numel())


def test_rerouted_zoo_writes_loads_exports_and_takes_newcomers(tmp_path):
    from mosconv.pipeline import export_lora

    zoo_dir, out = tmp_path / "zoo", tmp_path / "out"
    synthetic(zoo_dir)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    first = run_batch(zoo_dir, out, config)
    assert first.failed == 0 and first.totals.shared_pool_params > 0
    moses = {a.name: load_mos(out / a.name) for a in first.adapters}
    name = "model.layers.0.self_attn.q_proj"
    assert len({routes_of(m, name) for m in moses.values()}) > 1  # re-routed
    shown = CliRunner().invoke(main, ["inspect", str(out / "task03")])
    assert shown.exit_code == 0 and "shared" in shown.output
    assert "holds more parameters" not in shown.output  # the group's pool file is not its own
    for a in first.adapters[:3]:  # export gives back the update the report measured
        exp = export_lora(out / a.name, tmp_path / "exp" / a.name)
        assert exported_error(zoo_dir / a.name, exp) == pytest.approx(a.relative_error, rel=1e-4)
    before = files_of(out)
    # two adapters join: the group's bases are every column some member routes to
    for p in synthetic(tmp_path / "more", n=2, start=12):
        p.rename(zoo_dir / p.name)
    again = run_batch(zoo_dir, out, config)
    assert [a.status for a in again.adapters].count("converted") == 2
    after = files_of(out)
    for path, data in before.items():  # the pool file and the members written: same bytes
        if not path.endswith(".members.json"):
            assert after[path] == data, path
    union = set()
    for m in moses.values():
        union |= set(m.module(name).routes_A.tolist())
    for a in again.adapters:
        if a.status != "converted":
            continue
        new = load_mos(out / a.name)
        shared = new.kinds[new.module(name).kind].shared["n_A"]
        assert {r for r in new.module(name).routes_A.tolist() if r < shared} == union
        assert a.relative_error < a.truncation_relative_error
