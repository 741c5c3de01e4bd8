"""``--engine ray``: the same bytes as the local engine, with and without shared pools.

A local Ray instance (2 CPUs, no dashboard) is started once for this module and shut down
at its end; mosconv reuses it because Ray is already initialized (``address`` None).
"""

from __future__ import annotations

import json

import pytest
from helpers import one_thread
from test_batch import files_of, make_shared_zoo, make_small_zoo, run_cli, summary_numbers

from mosconv.batch.run import SUMMARY_FILE, BatchConfig, run_batch

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


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-pool"])
def test_cli_engine_ray(ray_session, zoo, tmp_path, shared):
    flags = ["--shared-pool"] if shared else []
    with one_thread():
        res = run_cli("batch", zoo, tmp_path / "ray", "--engine", "ray", "-q", *flags)
        assert res.exit_code == 0, res.output
        res = run_cli("batch", zoo, tmp_path / "local", "-q", *flags)
        assert res.exit_code == 0, res.output
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    # a rerun on Ray skips everything
    res = run_cli("batch", zoo, tmp_path / "ray", "--engine", "ray", "--json", *flags)
    assert res.exit_code == 0, res.output
    assert {a["status"] for a in json.loads(res.stdout)["adapters"]} == {"skipped"}
