"""``--engine ray``: the same bytes as the local engine, with and without shared pools, and
the joint bases of a group computed as tall-skinny QR reductions over Ray tasks.

A local Ray instance (2 CPUs, no dashboard) is started once for this module and shut down
at its end; mosconv reuses it because Ray is already initialized (``address`` None).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_mos, one_thread
from test_batch import (
    files_of,
    make_shared_zoo,
    make_small_zoo,
    run_cli,
    summary_numbers,
    write_lora_like,
)

from mosconv.batch.run import SUMMARY_FILE, BatchConfig, RayReducer, run_batch
from mosconv.fit.factorize import factorize_adapter
from mosconv.fit.joint import joint_basis, refine
from mosconv.fit.zoo import fit_group
from mosconv.lora.read import read_adapter
from mosconv.names import POOLS_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"ray is not installed ({e}); pip install 'mosconv[ray]' to run these tests")
    if ray.is_initialized():  # someone else's instance: start from a known state
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The small zoo (PEFT folders and a kohya file) plus the shared-pool zoo's adapters."""
    root = tmp_path_factory.mktemp("ray_zoo") / "zoo"
    make_small_zoo(root / "small")
    make_shared_zoo(root / "shared")
    return root


def assert_same_outputs(a, b) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert summary_numbers(a) == summary_numbers(b)


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-pool"])
def test_ray_engine_matches_local(ray_session, zoo, tmp_path, shared):
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        with one_thread():
            summary = run_batch(zoo, out, BatchConfig(ratio=8.0, engine=engine,
                                                      shared_pool=shared))
        assert summary.failed == 0, summary.adapters
        assert summary.totals.converted == summary.totals.adapters == 11
        outs[engine] = out
    assert ray_session.is_initialized()
    assert_same_outputs(outs["ray"], outs["local"])
    if shared:
        assert json.loads((outs["ray"] / SUMMARY_FILE).read_text())["totals"][
            "shared_pool_params"] > 0


@pytest.mark.parametrize("flags", [[], ["--shared-pool"], ["--shared-pool", "--dtype", "float16"],
                                   ["--shared-pool", "--quantize", "int4"],
                                   ["--shared-pool", "--size-ratio", "24"]],
                         ids=["independent", "shared-pool", "shared-pool-float16",
                              "shared-pool-int4", "shared-pool-size-ratio"])
def test_cli_engine_ray(ray_session, zoo, tmp_path, flags):
    with one_thread():
        res = run_cli("batch", zoo, tmp_path / "ray", "--engine", "ray", "-q", *flags)
        assert res.exit_code == 0, res.output
        res = run_cli("batch", zoo, tmp_path / "local", "-q", *flags)
        assert res.exit_code == 0, res.output
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    if "--dtype" in flags or "--quantize" in flags:  # the pool file is stored as asked
        from safetensors.torch import load_file

        pools = list((tmp_path / "ray" / POOLS_DIR).glob("*.safetensors"))
        want = torch.float16 if "float16" in flags else torch.uint8  # int4: packed
        assert pools and all(t.dtype == (torch.float16 if k.endswith(".scales") else want)
                             for p in pools for k, t in load_file(p).items())
    # a rerun on Ray skips everything
    res = run_cli("batch", zoo, tmp_path / "ray", "--engine", "ray", "--json", *flags)
    assert res.exit_code == 0, res.output
    assert {a["status"] for a in json.loads(res.stdout)["adapters"]} == {"skipped"}


class CountingRayReducer(RayReducer):
    """A RayReducer that counts the tasks it sent to Ray."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0

    def map(self, fn, args):
        self.tasks += len(args)
        return super().map(fn, args)

    def keep(self, fn, args):
        self.tasks += len(args)
        return super().keep(fn, args)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Nine adapters of one base model, seven from one seed and two from another, factorized."""
    root = tmp_path_factory.mktemp("ray_group")
    adapters = [read_adapter(write_lora_like(root / f"t{i}", i, layers=2, seed=int(i >= 7)))
                for i in range(9)]
    return adapters, [factorize_adapter(a) for a in adapters]


def test_joint_basis_reduction_on_ray_equals_local(ray_session, group):
    """Leaves of one adapter each: 9 leaf tasks, a merge level of 2 tasks, a last merge; the
    bases, kept-energy table and refined bases are the bytes the local reducer gives, and
    match one leaf over all adapters to float64 rounding."""
    _, facts = group
    name = "model.layers.1.self_attn.q_proj"
    fs = [fa[name] for fa in facts]
    ray_red = CountingRayReducer()
    with one_thread():
        local = joint_basis(fs, chunk=1)
        remote = joint_basis(fs, ray_red, chunk=1)
        whole = joint_basis(fs, chunk=len(fs))
        refined_local = refine(fs, local.U[:, :6], local.V[:, :4], 5, chunk=1)
        refined_remote = refine(fs, remote.U[:, :6], remote.V[:, :4], 5, reducer=ray_red,
                                chunk=1)
    assert ray_red.tasks >= 9 + 9 + 2 + 1  # the leaves and merges of both bases, the table
    for a, b in ((local.U, remote.U), (local.V, remote.V), (local.kept, remote.kept),
                 (local.gain_U, remote.gain_U), (local.gain_V, remote.gain_V)):
        assert torch.equal(a, b)
    assert local.energy == remote.energy
    assert all(torch.equal(a, b) for a, b in zip(refined_local[:2], refined_remote[:2]))
    assert refined_local[2] == refined_remote[2]
    # the chunking changes the rounding only: every error of the table to 1e-9 of the energy
    assert float((local.kept - whole.kept).abs().max()) <= 1e-9 * whole.energy
    assert torch.allclose(local.gain_U, whole.gain_U, rtol=1e-9, atol=1e-12 * whole.energy)


def test_fit_group_on_ray_equals_local(ray_session, group):
    """The whole group fit with its reductions on Ray: the same pool and adapter tensors and
    errors as in this process (same chunking), and errors within 1e-6 of the unchunked fit."""
    adapters, facts = group
    ray_red = CountingRayReducer()
    with one_thread():
        local = fit_group(adapters, 8.0, factorizations=facts, chunk=2)
        remote = fit_group(adapters, 8.0, factorizations=facts, chunk=2, reducer=ray_red)
        whole = fit_group(adapters, 8.0, factorizations=facts)
    assert ray_red.tasks > 0
    assert local.mode == remote.mode == "shared"
    assert local.shared_pools.keys() == remote.shared_pools.keys()
    assert all(torch.equal(local.shared_pools[k], remote.shared_pools[k])
               for k in local.shared_pools)
    for a, b in zip(local.adapters, remote.adapters):
        assert_same_mos(a, b)
    assert [r.to_json() for r in local.reports] == [r.to_json() for r in remote.reports]
    for a, b in zip(local.reports, whole.reports):
        assert abs(a.totals.relative_error - b.totals.relative_error) <= 1e-6


def test_group_members_are_held_in_the_object_store(ray_session, tmp_path):
    """``batch --shared-pool --engine ray``: the members are read, factorized, converted alone
    and built by tasks, in chunks that stay in Ray's object store (the fitting process holds
    object refs); the fit equals the one computed in this process."""
    from mosconv.batch.run import discover, fit_group_items

    for i in range(7):
        write_lora_like(tmp_path / "zoo" / f"t{i}", i, layers=2, seed=int(i >= 5))
    items = discover(tmp_path / "zoo")
    config = BatchConfig(ratio=8.0, shared_pool=True, chunk=2, engine="ray")
    red = CountingRayReducer()
    with one_thread():
        handles, remote = fit_group_items(items, config, red)
        _, local = fit_group_items(items, config)
    assert len(handles) == 4 and all(isinstance(h, ray_session.ObjectRef) for h in handles)
    assert all(b is None or isinstance(b, ray_session.ObjectRef) for b in remote.built)
    assert red.tasks > 4
    assert remote.mode == local.mode == "shared"
    assert all(torch.equal(remote.shared_pools[k], local.shared_pools[k])
               for k in local.shared_pools)
    assert [r.to_json() for r in remote.reports] == [r.to_json() for r in local.reports]


def _shared_on_both_engines(tmp_path, chunk: int, ratio: float = 8.0) -> dict:
    """``tmp_path / "zoo"`` converted with ``--shared-pool`` by the local engine and on Ray
    (members in chunks of ``chunk``): the output folders, checked to hold the same bytes."""
    outs = {}
    for engine in ("local", "ray"):
        with one_thread():
            summary = run_batch(tmp_path / "zoo", tmp_path / engine,
                                BatchConfig(ratio=ratio, engine=engine, shared_pool=True,
                                            chunk=chunk))
        assert summary.failed == 0 and summary.totals.shared_pool_params > 0
        outs[engine] = tmp_path / engine
    assert_same_outputs(outs["ray"], outs["local"])
    return outs


def test_rerouted_group_on_ray_equals_local(ray_session, tmp_path):
    """A group whose members' cores are re-routed (the synthetic zoo): the same bytes on Ray,
    members held in chunks of 4 there and here."""
    from helpers import example_module

    from mosconv.mos.format import load_mos

    example_module("synthetic_zoo").write_zoo(tmp_path / "zoo", 12, d=64, d_kv=32, r=8,
                                              layers=1)
    outs = _shared_on_both_engines(tmp_path, chunk=4)
    name = "model.layers.0.self_attn.q_proj"
    routes = {tuple(load_mos(outs["ray"] / f"task{i:02d}").module(name).routes_A.tolist())
              for i in range(12)}
    assert len(routes) > 1  # members route to different basis columns


def test_tied_group_on_ray_equals_local(ray_session, tmp_path):
    """Checkpoints of one run (the tied form: every member routes to one approximation, its
    weighted mean's SVD reduced over the chunks): the same bytes on Ray, chunks of 2."""
    from test_zoo import _tied_modules, _write_checkpoints

    from mosconv.mos.format import load_mos

    _write_checkpoints(tmp_path / "zoo", n=3)
    outs = _shared_on_both_engines(tmp_path, chunk=2)
    assert _tied_modules([load_mos(outs["ray"] / f"ckpt-{i}") for i in range(3)])


def test_partial_column_on_ray_equals_local(ray_session, tmp_path, monkeypatch):
    """A group whose leftover budget buys a partial column (reduced over the chunks like a
    refinement step; narrow shards allowed so the small kinds qualify): the same bytes on
    Ray, chunks of 2."""
    from test_zoo import _write_checkpoints

    from mosconv.fit import zoo
    from mosconv.mos.format import load_mos

    monkeypatch.setattr(zoo, "REMAINDER_MIN_WIDTH", 4)  # read here, not in the tasks
    _write_checkpoints(tmp_path / "zoo", n=3, layers=2, noise=1.0, base="tiny-llama")
    outs = _shared_on_both_engines(tmp_path, chunk=2, ratio=10.0)
    assert any(p.nc > 1 for p in load_mos(outs["ray"] / "ckpt-0").kinds.values())


@pytest.mark.parametrize("shared", [False, True])
def test_ray_is_started_as_asked_also_for_shared_pools_alone(tmp_path, monkeypatch, shared):
    """A zoo of group members only (no single adapter) went straight to the group fit, where
    Ray started itself: --address was ignored (a local instance instead of the cluster asked
    for, rc 0) and its notices reached the terminal. Ray is now started first, either way."""
    ray = pytest.importorskip("ray")

    class Started(Exception):
        pass

    calls = []

    def init(**kw):
        calls.append(kw)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    zoo = tmp_path / "zoo"
    for i in range(2):
        write_lora_like(zoo / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
    with pytest.raises(Started):
        run_batch(zoo, tmp_path / "out", BatchConfig(ratio=8, shared_pool=shared, engine="ray",
                                                     address="HOST:6379"))
    assert calls and calls[0]["address"] == "HOST:6379" and calls[0]["log_to_driver"] is False
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()
