"""``mosconv batch`` and :mod:`mosconv.batch.run`: discovery of a zoo, summary.json, resumable
reruns (skip what is done, redo what changed or is incomplete, continue after an interrupt or
a SIGKILL with the same bytes), a broken adapter among good ones, ``--jobs 2``, and
``--shared-pool`` outputs through ``inspect`` / ``export`` and their pool-file checks.

Every zoo here is synthetic and tiny (written with fixed seeds); nothing reads ../shared/zoo.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factory import llama_like, write_random_peft
from helpers import REPO_ROOT, one_thread
from safetensors.torch import save_file

import mosconv.batch.run
import mosconv.mos.format
from mosconv.batch.run import (
    SUMMARY_FILE,
    BatchConfig,
    Item,
    convert_many,
    discover,
    run_batch,
    safe_name,
)
from mosconv.cli.commands import main
from mosconv.errors import ConfigError, FormatError
from mosconv.fileio import sha256_file
from mosconv.lora.read import read_adapter
from mosconv.mos.format import CONFIG_FILE, REPORT_FILE, TENSOR_FILE, load_mos
from mosconv.names import POOLS_DIR

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ zoo writers


def write_kohya(path: Path, seed: int, d: int = 32, r: int = 4) -> Path:
    """A kohya / sd-scripts single-file LoRA with two modules (written without mosconv)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for mod in ("lora_unet_down_blocks_0_attentions_0_proj_in",
                "lora_unet_down_blocks_0_attentions_1_proj_in"):
        t[f"{mod}.lora_down.weight"] = torch.randn(r, d, generator=g)
        t[f"{mod}.lora_up.weight"] = torch.randn(d, r, generator=g)
        t[f"{mod}.alpha"] = torch.tensor(float(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return path


def write_lora_like(folder: Path, index: int, *, layers: int = 4, d: int = 64, d_kv: int = 32,
                    r: int = 8, base: str = "tiny-lm", seed: int = 0, shared_A: bool = True,
                    drift: float = 0.01, decay: float = 0.8) -> Path:
    """A PEFT folder as LoRA training leaves it: ``A`` is PEFT's kaiming-uniform init drawn
    from one generator seed per layer (the same for every adapter of the zoo when
    ``shared_A``) plus a small per-adapter drift; ``B`` is the adapter's own, with a decaying
    column scale.  Written with safetensors, not with mosconv."""
    g = torch.Generator().manual_seed(10_000 * seed + 97 * index + 1)
    mods = {f"model.layers.{i}.self_attn.{p}": s for i in range(layers)
            for p, s in (("q_proj", (d, d)), ("v_proj", (d_kv, d)))}
    tensors = {}
    for li, (name, (d_out, d_in)) in enumerate(mods.items()):
        ga = torch.Generator().manual_seed(1_000 * seed + li + (0 if shared_A else 7919 * (index + 1)))
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) weight
        A = (torch.rand(r, d_in, generator=ga) * 2 - 1) * bound
        A = A + drift * bound * torch.randn(r, d_in, generator=g)
        B = torch.randn(d_out, r, generator=g) * decay ** torch.arange(r, dtype=torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
           "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


SMALL_NAMES = ["c0", "kohya/style", "teamA/a0", "teamA/a1", "teamB/x/b0"]


def make_small_zoo(root: Path) -> Path:
    """Nested PEFT folders, one kohya single file, and non-adapter files to be ignored."""
    mods = llama_like(layers=2, d=32, d_kv=16)
    for seed, rel in enumerate(["teamA/a0", "teamA/a1", "teamB/x/b0", "c0"]):
        write_random_peft(root / rel, mods, r=4, alpha=8, seed=seed)
    write_kohya(root / "kohya" / "style.safetensors", seed=7)
    (root / "teamA" / "SOURCE.txt").write_text("where these came from\n")
    (root / "README.md").write_text("# a zoo\n")
    (root / "teamB" / "notes.json").write_text("{}\n")
    return root


def make_big_zoo(root: Path, n: int = 8) -> Path:
    """``n`` adapters big enough that converting one takes a noticeable time."""
    mods = llama_like(layers=8, d=256, d_kv=128)
    for i in range(n):
        write_random_peft(root / f"ad{i}", mods, r=16, alpha=16, seed=100 + i)
    return root


def make_shared_zoo(root: Path) -> Path:
    """Two groups: four LoRA-like adapters of ``tiny-lm`` (sharing pays) and two random ones
    of ``tiny-test-model`` (it does not)."""
    for i in range(4):
        write_lora_like(root / "lm" / f"task{i}", i)
    mods = llama_like(layers=2, d=32, d_kv=16)
    for i in range(2):
        write_random_peft(root / "other" / f"r{i}", mods, r=4, seed=50 + i)
    return root


# ------------------------------------------------------------------ tree helpers


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (summary.json left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != SUMMARY_FILE}


def summary_numbers(out: Path) -> tuple[list, dict]:
    """summary.json without its timing and status fields."""
    s = json.loads((out / SUMMARY_FILE).read_text())
    keep = ("name", "source", "lora_params", "mos_params", "local_params", "relative_error",
            "truncation_relative_error", "energy", "group", "error")
    rows = [{k: a[k] for k in keep} for a in s["adapters"]]
    totals = {k: v for k, v in s["totals"].items()
              if k not in ("seconds", "converted", "skipped")}
    return rows, totals


def assert_same_tree(a: Path, b: Path) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb), (sorted(set(fa) ^ set(fb)))
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files whose bytes differ: {differ}"
    assert summary_numbers(a) == summary_numbers(b)


def stale_tmp(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.tmp"))


def assert_one_line_error(res, *words):
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mosconv: error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> Path:
    return make_small_zoo(tmp_path_factory.mktemp("small") / "zoo")


@pytest.fixture(scope="module")
def small_run(small_zoo, tmp_path_factory):
    """``(out, CliRunner result)`` of ``mosconv batch ZOO OUT --ratio 8``."""
    out = tmp_path_factory.mktemp("small_out") / "out"
    with one_thread():
        res = run_cli("batch", small_zoo, out, "--ratio", "8")
    assert res.exit_code == 0, res.output
    return out, res


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """``(zoo, out, seconds)``: the first, timed, run over eight d=256 r=16 adapters."""
    root = tmp_path_factory.mktemp("big")
    zoo = make_big_zoo(root / "zoo")
    out = root / "out"
    with one_thread():
        t0 = time.perf_counter()
        summary = run_batch(zoo, out, BatchConfig(ratio=8.0))
        seconds = time.perf_counter() - t0
    assert summary.totals.converted == 8 and summary.failed == 0
    return zoo, out, seconds


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """``(zoo, out, CliRunner result)`` of ``mosconv batch ZOO OUT --ratio 8 --shared-pool``."""
    root = tmp_path_factory.mktemp("shared")
    zoo = make_shared_zoo(root / "zoo")
    out = root / "out"
    with one_thread():
        res = run_cli("batch", zoo, out, "--ratio", "8", "--shared-pool")
    assert res.exit_code == 0, res.output
    return zoo, out, res


# ------------------------------------------------------------------ discovery


def test_discover_folder_zoo(small_zoo):
    items = discover(small_zoo)
    assert [i.name for i in items] == SMALL_NAMES
    by_name = {i.name: Path(i.source) for i in items}
    for name in ("c0", "teamA/a0", "teamA/a1", "teamB/x/b0"):
        assert by_name[name] == small_zoo / name  # the PEFT folder, not a file inside it
    assert by_name["kohya/style"] == small_zoo / "kohya" / "style.safetensors"
    # SOURCE.txt, README.md, notes.json are no adapters
    assert all(Path(i.source).suffix not in (".txt", ".md", ".json") for i in items)


def test_discover_does_not_descend_into_peft_folders(tmp_path):
    zoo = tmp_path / "zoo"
    write_random_peft(zoo / "a", llama_like(layers=1, d=16, d_kv=8), seed=0)
    write_kohya(zoo / "a" / "checkpoints" / "old.safetensors", seed=1)  # belongs to a
    assert [i.name for i in discover(zoo)] == ["a"]


def test_discover_list_file(small_zoo, tmp_path):
    lists = tmp_path / "lists" / "deep"
    lists.mkdir(parents=True)
    rel = os.path.relpath(small_zoo, lists)
    listing = lists / "zoo.txt"
    listing.write_text("\n".join([
        "# adapters to convert",
        f"{rel}/teamA/a0",
        "",
        "   ",
        f"  {rel}/kohya/style.safetensors  ",
        "# a comment in between",
        str(small_zoo / "teamB" / "x" / "b0"),  # absolute
    ]) + "\n")
    items = discover(listing)
    assert [Path(i.source).resolve() for i in items] == [
        (small_zoo / "teamA" / "a0").resolve(),
        (small_zoo / "kohya" / "style.safetensors").resolve(),
        (small_zoo / "teamB" / "x" / "b0").resolve(),
    ]
    for i in items:  # names: the path relative to the list file, `..` dropped, suffix dropped
        assert ".." not in i.name.split("/") and not i.name.startswith("/"), i.name
    assert items[0].name.endswith("teamA/a0")
    assert items[1].name.endswith("kohya/style")
    assert items[2].name.endswith("teamB/x/b0")


def test_a_list_file_line_with_a_nul_byte_is_named(tmp_path):
    """It was an internal error (ValueError: embedded null byte) that printed the byte."""
    listing = tmp_path / "zoo.txt"
    listing.write_bytes(b"# adapters\nteam/a\x00b\n")
    res = CliRunner().invoke(main, ["batch", str(listing), str(tmp_path / "out")])
    assert_one_line_error(res, str(listing), "line 2", "NUL byte")
    assert "\0" not in res.output and not (tmp_path / "out").exists()


def test_list_file_paths_cannot_escape_out(small_zoo, tmp_path):
    """Every listed path climbs out of the list's folder; the outputs stay under OUT."""
    home = tmp_path / "run"
    lists = home / "lists"
    lists.mkdir(parents=True)
    out = home / "out"
    rel = os.path.relpath(small_zoo, lists)
    climb = "../" * 40 + str(small_zoo / "c0").lstrip("/")  # far above / and back down
    (lists / "zoo.txt").write_text(f"{rel}/teamA/a1\n{climb}\n")
    outside_before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    summary = run_batch(lists / "zoo.txt", out, BatchConfig(ratio=8.0, search="truncation"))
    assert summary.failed == 0 and len(summary.adapters) == 2
    for row in summary.adapters:
        dest = (out / row.name).resolve()
        assert out.resolve() in dest.parents, f"{row.name!r} escapes {out}"
        assert (dest / CONFIG_FILE).is_file()
    outside_after = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert outside_after == outside_before, "the run wrote outside OUT"


@pytest.mark.parametrize("rel, want", [
    ("../../etc/passwd", "etc/passwd"),
    ("a/../../b", "a/b"),
    ("./x/./y", "x/y"),
    ("/abs/path", "abs/path"),
    ("..\\..\\win\\dir", "win/dir"),
    ("sp ace/.hidden", "sp_ace/hidden"),
])
def test_safe_name(rel, want):
    assert safe_name(rel) == want


@pytest.mark.parametrize("rel", ["..", "../..", ".", ""])
def test_safe_name_refuses_empty(rel):
    with pytest.raises(ConfigError):
        safe_name(rel)


def test_discover_errors(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "SOURCE.txt").write_text("x")
    with pytest.raises(FormatError, match="no adapters"):
        discover(tmp_path / "empty")
    write_kohya(tmp_path / "dup" / "a.safetensors", seed=0)
    write_kohya(tmp_path / "dup" / "a.bin", seed=1)  # same output name "a"
    with pytest.raises(ConfigError, match="output name"):
        discover(tmp_path / "dup")


# ------------------------------------------------------------------ a whole run


def test_batch_converts_all_and_writes_summary(small_zoo, small_run):
    out, res = small_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["ratio"] == 8.0 and summary["shared_pool"] is False
    rows = summary["adapters"]
    assert [r["name"] for r in rows] == SMALL_NAMES
    for r in rows:
        assert r["status"] == "converted", r
        assert r["error"] is None
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert r["lora_params"] > 0 and 0 < r["mos_params"] <= r["lora_params"] / 8, r
        assert 0 <= r["relative_error"] <= r["truncation_relative_error"] + 1e-9 <= 1 + 1e-9, r
        dest = out / r["name"]  # the output mirrors the zoo's layout
        assert sorted(p.name for p in dest.iterdir()) == sorted([CONFIG_FILE, REPORT_FILE,
                                                                 TENSOR_FILE])
        report = json.loads((dest / REPORT_FILE).read_text())
        assert r["relative_error"] == report["totals"]["relative_error"]
        assert r["lora_params"] == report["totals"]["lora_params"]
        assert r["mos_params"] == report["totals"]["mos_params"]
    t = summary["totals"]
    assert t["adapters"] == t["converted"] == 5 and t["skipped"] == t["failed"] == 0
    assert t["lora_params"] == sum(r["lora_params"] for r in rows)
    assert t["mos_params"] == sum(r["local_params"] for r in rows)
    assert t["shared_pool_params"] == 0
    energy = sum(r["energy"] for r in rows)
    for key in ("relative_error", "truncation_relative_error"):
        want = math.sqrt(sum(r["energy"] * r[key] ** 2 for r in rows) / energy)
        assert t[key] == pytest.approx(want, rel=1e-12)
    assert t["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    for name in SMALL_NAMES:  # the table names every adapter
        assert name in res.stdout
    assert "5 adapters: 5 converted, 0 skipped, 0 failed" in res.stdout
    assert not stale_tmp(out)


def test_batch_json_prints_summary(small_zoo, small_run, tmp_path):
    out = shutil.copytree(small_run[0], tmp_path / "out")  # the shared run stays as it was
    res = run_cli("batch", small_zoo, out, "--json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed == json.loads((out / SUMMARY_FILE).read_text())


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_batch_equals_compress(small_zoo, small_run, tmp_path, name):
    """Each adapter of a batch is what ``mosconv compress`` makes of it alone."""
    out, _ = small_run
    source = next(i.source for i in discover(small_zoo) if i.name == name)
    res = run_cli("compress", source, tmp_path / "alone", "--ratio", "8", "-q")
    assert res.exit_code == 0, res.output
    alone = json.loads((tmp_path / "alone" / REPORT_FILE).read_text())["totals"]
    row = next(r for r in json.loads((out / SUMMARY_FILE).read_text())["adapters"]
               if r["name"] == name)
    assert row["relative_error"] == alone["relative_error"]
    assert row["truncation_relative_error"] == alone["truncation_relative_error"]
    assert row["mos_params"] == alone["mos_params"]
    assert (out / name / TENSOR_FILE).read_bytes() == (tmp_path / "alone" / TENSOR_FILE).read_bytes()
    a, b = (json.loads((d / CONFIG_FILE).read_text()) for d in (out / name, tmp_path / "alone"))
    assert a["command"] is None and b["command"].startswith("mosconv")  # argv under CliRunner
    assert a["source"]["files"] == b["source"]["files"]
    assert a.pop("batch")["ratio"] == 8.0  # the batch settings, used to decide what to redo
    for d in (a, b):
        del d["command"]
    assert a == b  # the same config but for the command line and the batch settings


# ------------------------------------------------------------------ reruns


def test_rerun_skips_everything_quickly(big_run):
    zoo, out, first = big_run
    before = files_of(out)
    first_rows, first_totals = summary_numbers(out)
    t0 = time.perf_counter()
    summary = run_batch(zoo, out, BatchConfig(ratio=8.0))
    again = time.perf_counter() - t0
    assert [a.status for a in summary.adapters] == ["skipped"] * 8
    assert summary.totals.converted == 0 and summary.totals.skipped == 8
    rows, totals = summary_numbers(out)
    assert rows == first_rows and totals == first_totals  # numbers still filled in
    assert all(r["relative_error"] is not None and r["lora_params"] for r in rows)
    assert files_of(out) == before
    print(f"first run {first:.3f} s, rerun {again:.4f} s, ratio {again / first:.4f}")
    assert again < 0.10 * first, f"rerun took {again:.3f} s, first run {first:.3f} s"


def test_modified_source_is_redone(small_zoo, small_run, tmp_path):
    out0, _ = small_run
    zoo = shutil.copytree(small_zoo, tmp_path / "zoo")
    out = shutil.copytree(out0, tmp_path / "out")  # sources differ in path only: still complete
    assert run_batch(zoo, out).totals.skipped == 5
    # new weights for teamA/a1 (same shapes), a new alpha for teamB/x/b0
    shutil.rmtree(zoo / "teamA" / "a1")
    write_random_peft(zoo / "teamA" / "a1", llama_like(layers=2, d=32, d_kv=16), r=4, alpha=8,
                      seed=99)
    cfg = json.loads((zoo / "teamB" / "x" / "b0" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (zoo / "teamB" / "x" / "b0" / "adapter_config.json").write_text(json.dumps(cfg))
    summary = run_batch(zoo, out)
    status = {a.name: a.status for a in summary.adapters}
    assert status == {"c0": "skipped", "kohya/style": "skipped", "teamA/a0": "skipped",
                      "teamA/a1": "converted", "teamB/x/b0": "converted"}
    fresh = tmp_path / "fresh"
    run_batch(zoo, fresh)
    for name in SMALL_NAMES:
        assert (out / name / TENSOR_FILE).read_bytes() == (fresh / name / TENSOR_FILE).read_bytes()
    assert (out / "teamA/a1" / TENSOR_FILE).read_bytes() != \
        (out0 / "teamA/a1" / TENSOR_FILE).read_bytes()


def test_incomplete_output_is_redone(small_zoo, small_run, tmp_path):
    out0, _ = small_run
    out = shutil.copytree(out0, tmp_path / "out")
    (out / "teamA" / "a0" / CONFIG_FILE).unlink()  # as a run killed before the last write
    (out / "c0" / TENSOR_FILE).write_bytes(b"garbage")  # config intact, tensors broken
    shutil.rmtree(out / "kohya")  # never started
    (out / "teamB" / "x" / "b0" / ".mos_adapter.safetensors.x1y2.tmp").write_bytes(b"partial")
    (out / "teamB" / "x" / "b0" / CONFIG_FILE).unlink()
    summary = run_batch(small_zoo, out)
    status = {a.name: a.status for a in summary.adapters}
    assert status == {"c0": "converted", "kohya/style": "converted", "teamA/a0": "converted",
                      "teamA/a1": "skipped", "teamB/x/b0": "converted"}
    for name in ("c0", "kohya/style", "teamA/a0", "teamB/x/b0"):
        for f in (CONFIG_FILE, REPORT_FILE, TENSOR_FILE):
            assert (out / name / f).read_bytes() == (out0 / name / f).read_bytes(), (name, f)
    assert not stale_tmp(out)
    # --overwrite redoes everything
    res = run_cli("batch", small_zoo, out, "--overwrite", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((out / SUMMARY_FILE).read_text())["totals"]["converted"] == 5
    assert files_of(out) == files_of(out0)


# ------------------------------------------------------------------ failures


def write_truncated(folder: Path) -> Path:
    write_random_peft(folder, llama_like(layers=2, d=32, d_kv=16), r=4, seed=42)
    f = folder / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 3 // 5])
    return f


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-pool"])
def test_corrupt_adapter_does_not_stop_the_others(small_zoo, tmp_path, shared):
    zoo = shutil.copytree(small_zoo, tmp_path / "zoo")
    write_truncated(zoo / "teamA" / "broken")
    out = tmp_path / "out"
    res = run_cli("batch", zoo, out, "--ratio", "8", *(["--shared-pool"] if shared else []))
    line = assert_one_line_error(res, "broken", "adapter_model.safetensors")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = {a["name"]: a for a in summary["adapters"]}
    assert sorted(rows) == sorted([*SMALL_NAMES, "teamA/broken"])
    bad = rows.pop("teamA/broken")
    assert bad["status"] == "failed" and "adapter_model.safetensors" in bad["error"]
    assert "\n" not in bad["error"] and bad["error"] in line
    assert bad["relative_error"] is None and bad["lora_params"] is None
    assert all(r["status"] == "converted" for r in rows.values()), rows
    assert summary["totals"]["failed"] == 1 and summary["totals"]["converted"] == 5
    assert summary["totals"]["lora_params"] == sum(r["lora_params"] for r in rows.values())
    assert not (out / "teamA" / "broken" / CONFIG_FILE).exists()
    for name in rows:
        load_mos(out / name)
    assert not stale_tmp(out)
    # a rerun retries the broken one only, and still fails on it
    res = run_cli("batch", zoo, out, "--ratio", "8", "-q", *(["--shared-pool"] if shared else []))
    assert_one_line_error(res, "broken")
    rows = json.loads((out / SUMMARY_FILE).read_text())["adapters"]
    assert {a["status"] for a in rows if a["name"] != "teamA/broken"} == {"skipped"}


@pytest.mark.parametrize("shared", [False, True])
def test_links_in_out_that_lead_out_of_it_are_not_followed(small_zoo, tmp_path, shared):
    """A member folder (or OUT/pools) that is a link out of OUT, say from an unpacked
    archive, is refused: a rerun wrote there, replacing another output without
    --overwrite."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    (out / "teamA").mkdir(parents=True)
    name = "teamA/a0"
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    extra = ["--shared-pool"] if shared else []
    res = run_cli("batch", small_zoo, out, "--ratio", "8", *extra)
    assert_one_line_error(res, name, "a link out of", "remove the link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    rows = {a["name"]: a for a in json.loads((out / SUMMARY_FILE).read_text())["adapters"]}
    assert rows[name]["status"] == "failed"
    if shared:
        (out / name).unlink()
        shutil.rmtree(out / POOLS_DIR, ignore_errors=True)
        (out / POOLS_DIR).symlink_to(elsewhere, target_is_directory=True)
        res = run_cli("batch", small_zoo, out, "--ratio", "8", *extra, "--overwrite")
        assert_one_line_error(res, str(out / POOLS_DIR), "a link out of")
        assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_batch_usage_errors(small_zoo, tmp_path):
    res = run_cli("batch", tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(res, "nope")
    res = run_cli("batch", small_zoo, tmp_path / "out", "--jobs", "0")
    assert res.exit_code == 2
    with pytest.raises(ConfigError):
        run_batch(small_zoo, tmp_path / "o2", BatchConfig(engine="spark"))
    with pytest.raises(ConfigError):
        list(convert_many([Item("x", str(small_zoo / "c0"))], tmp_path / "o3",
                          BatchConfig(jobs=0)))


# ------------------------------------------------------------------ interrupted runs


def test_keyboard_interrupt_then_rerun_gives_the_same_tree(small_zoo, small_run, tmp_path,
                                                          monkeypatch):
    ref, _ = small_run
    out = tmp_path / "out"
    real = mosconv.batch.run.convert_one
    calls = []
    k = 2

    def interrupting(item, out_, config):
        calls.append(item.name)
        if len(calls) == k + 1:
            raise KeyboardInterrupt
        return real(item, out_, config)

    monkeypatch.setattr(mosconv.batch.run, "convert_one", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_batch(small_zoo, out, BatchConfig(ratio=8.0, jobs=1))
    monkeypatch.undo()
    done = sorted(str(p.parent.relative_to(out)) for p in out.rglob(CONFIG_FILE))
    assert done == SMALL_NAMES[:k]
    assert not (out / SUMMARY_FILE).exists()
    # what a kill in the middle of the next adapter leaves: a tensor file, a temp file
    partial = out / SMALL_NAMES[k]
    partial.mkdir(parents=True)
    (partial / TENSOR_FILE).write_bytes(b"half a file")
    (partial / f".{CONFIG_FILE}.abc123.tmp").write_bytes(b"{")
    summary = run_batch(small_zoo, out, BatchConfig(ratio=8.0, jobs=1))
    assert [a.status for a in summary.adapters] == ["skipped"] * k + ["converted"] * (5 - k)
    assert not stale_tmp(out)
    assert_same_tree(out, ref)


def repo_env() -> dict[str, str]:
    """The environment for a Python subprocess that imports this checkout's mosconv."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def test_sigkill_then_rerun_gives_the_same_tree(big_run, tmp_path):
    zoo, ref, _ = big_run
    out = tmp_path / "out"
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mosconv.cli", "batch", str(zoo), str(out),
                             "--ratio", "8", "-q"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.rglob(CONFIG_FILE))):
            assert proc.poll() is None, f"batch exited early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no adapter finished within 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    finished = len(list(out.rglob(CONFIG_FILE)))
    assert 1 <= finished < 8, f"{finished} adapters were done when the run was killed"
    assert not (out / SUMMARY_FILE).exists()

    res = run_cli("batch", zoo, out, "--ratio", "8", "-q")
    assert res.exit_code == 0, res.output
    statuses = [a["status"] for a in json.loads((out / SUMMARY_FILE).read_text())["adapters"]]
    assert statuses.count("skipped") >= finished and "failed" not in statuses
    assert not stale_tmp(out)
    assert_same_tree(out, ref)


# ------------------------------------------------------------------ parallel jobs


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_stop_when_the_run_is_killed(tmp_path):
    """A `--jobs 2` run killed with SIGKILL left its workers waiting on its queue for good
    (about 260 MB each), free to write into OUT while the user's rerun went on."""
    code = (
        "import multiprocessing as mp, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from mosconv.batch.run import _init_worker\n"
        "ex = ProcessPoolExecutor(2, mp_context=mp.get_context('fork'),\n"
        "                         initializer=_init_worker, initargs=(1, os.getpid()))\n"
        "def pid_after(t):\n"
        "    time.sleep(t)\n"
        "    return os.getpid()\n"
        "pids = set()\n"
        "while len(pids) < 2:  # two tasks at once: one on each worker\n"
        "    pids |= set(ex.map(pid_after, [0.5, 0.5]))\n"
        "for _ in range(2):\n"
        "    ex.submit(time.sleep, 60)\n"
        "print(*pids, flush=True)\n"
        "time.sleep(60)\n")
    env = repo_env()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        workers = [int(x) for x in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        for w in workers if "workers" in locals() else []:
            if _running(w):
                os.kill(w, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_stops_a_jobs_2_run_at_once(tmp_path):
    """Ctrl-C with `--jobs 2` went on converting every queued adapter (all were submitted at
    once and the pool was shut down waiting for them): 28 of 30 done 17 s after it."""
    code = (
        "import os, signal, sys, threading, time\n"
        "import mosconv.batch.run as r\n"
        "def slow(item, out, config):\n"
        "    time.sleep(0 if item.name == 'a0' else 30)\n"
        "    return item.name\n"
        "r.convert_one = slow\n"
        "items = [r.Item(f'a{i}', 'x') for i in range(6)]\n"
        "t0 = time.monotonic()\n"
        "it = r._local_map(items, sys.argv[1], r.BatchConfig(jobs=2))\n"
        "assert next(it) == 'a0'\n"
        "print(*(p.pid for p in __import__('multiprocessing').active_children()), flush=True)\n"
        "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "try:\n"
        "    list(it)\n"
        "except KeyboardInterrupt:\n"
        "    print(round(time.monotonic() - t0, 1), flush=True)\n")
    env = repo_env()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120,
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    workers, seconds = proc.stdout.splitlines()
    assert float(seconds) < 10, seconds  # not the 30 s of a queued task
    deadline = time.monotonic() + 10
    pids = [int(w) for w in workers.split()]
    while any(_running(w) for w in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids and not any(_running(w) for w in pids)


def test_jobs_2_gives_the_same_bytes(small_zoo, small_run, tmp_path):
    ref, _ = small_run
    out = tmp_path / "out"
    res = run_cli("batch", small_zoo, out, "--ratio", "8", "--jobs", "2", "-q")
    assert res.exit_code == 0, res.output
    assert_same_tree(out, ref)
    assert [a["name"] for a in json.loads((out / SUMMARY_FILE).read_text())["adapters"]] == \
        SMALL_NAMES  # zoo order, not completion order


# ------------------------------------------------------------------ shared pools


def test_shared_pool_run(shared_run):
    _, out, res = shared_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["shared_pool"] is True
    rows = {a["name"]: a for a in summary["adapters"]}
    assert sorted(rows) == ["lm/task0", "lm/task1", "lm/task2", "lm/task3", "other/r0",
                            "other/r1"]
    assert all(r["status"] == "converted" for r in rows.values())
    pools = sorted((out / POOLS_DIR).glob("*.safetensors"))
    assert len(pools) == 1 and pools[0].suffix == ".safetensors", pools  # only the lm group
    groups = {r["group"] for n, r in rows.items() if n.startswith("lm/")}
    assert len(groups) == 1 and pools[0].stem == groups.pop()
    t = summary["totals"]
    pool_params = sum(t.numel() for t in load_pool(pools[0]).values())
    assert t["shared_pool_params"] == pool_params > 0
    assert t["mos_params"] == pool_params + sum(r["local_params"] for r in rows.values())
    assert t["mos_params"] <= t["lora_params"] / 8
    lm_lora = sum(r["lora_params"] for n, r in rows.items() if n.startswith("lm/"))
    lm_local = sum(r["local_params"] for n, r in rows.items() if n.startswith("lm/"))
    assert lm_local + pool_params <= lm_lora / 8
    for name in rows:
        cfg = json.loads((out / name / CONFIG_FILE).read_text())
        refs = [k["shared_pool"] for k in cfg["kinds"] if k.get("shared_pool")]
        if name.startswith("lm/"):
            assert refs and all((out / name / r["file"]).resolve() == pools[0].resolve()
                                for r in refs)
            assert not Path(refs[0]["file"]).is_absolute()  # OUT can be moved
            assert all(r["sha256"] == sha256_file(pools[0]) for r in refs)
        else:
            assert not refs
        load_mos(out / name)
    assert "shared pools" in res.stdout
    assert not stale_tmp(out)


def load_pool(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_shared_pool_rerun_skips(shared_run, tmp_path):
    zoo, out0, _ = shared_run
    out = shutil.copytree(out0, tmp_path / "out")
    summary = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    assert {a.status for a in summary.adapters} == {"skipped"}
    assert summary.totals.shared_pool_params > 0
    assert files_of(out) == files_of(out0)


def test_a_crafted_zoo_reads_nothing_outside_it(shared_run, tmp_path):
    """A member's pool file is read only at ../pools/<name>.safetensors (an absolute or other
    path was read and its sha256 printed), and summary.json names only members inside the
    output (an absolute name was attached); a declared width of 2**36 is refused before
    export allocates it."""
    _, out0, _ = shared_run
    out = shutil.copytree(out0, tmp_path / "out")
    member = out / "lm" / "task2"
    cfg_path = member / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    good = json.dumps(cfg)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(next((out / POOLS_DIR).glob("*.safetensors")), outside)
    for file in [str(outside), "../../../elsewhere.safetensors", "/etc/hostname"]:
        for k in cfg["kinds"]:
            if k.get("shared_pool"):
                k["shared_pool"]["file"] = file
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(FormatError, match="is not a zoo's pool file") as info:
            load_mos(member)
        assert "sha256" not in str(info.value)
    cfg = json.loads(good)
    cfg["kinds"][0]["d_in"] = 2**36
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"d_in is 68719476736, expected .* <= 16777216"):
        load_mos(member)
    cfg_path.write_text(good)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for name in [str(member.resolve()), "../out/lm/task2", "lm/../lm/task2"]:
        rows = [dict(summary["adapters"][0], name=name, status="converted")]
        (out / SUMMARY_FILE).write_text(json.dumps({**summary, "adapters": rows}))
        res = run_cli("inspect", out, "--serving")
        assert_one_line_error(res, "summary.json", "leads out of")


def test_inspect_and_export_shared_adapter(shared_run, tmp_path):
    _, out, _ = shared_run
    folder = out / "lm" / "task2"
    res = run_cli("inspect", folder)
    assert res.exit_code == 0, res.output
    assert "MoS adapter" in res.stdout and "shared pool" in res.stdout
    res = run_cli("inspect", folder, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    mos = load_mos(folder)
    assert info["params"] == mos.params
    assert info["report"]["totals"]["local_params"] < info["params"]

    res = run_cli("export", folder, tmp_path / "peft")
    assert res.exit_code == 0, res.output
    exported = read_adapter(tmp_path / "peft")
    assert [m.name for m in exported.modules] == [m.name for m in mos.modules]
    for m in mos.modules:
        A, B = mos.assemble(m)
        want = m.scale * (B.double() @ A.double())
        e = exported.module(m.name)
        got = e.scale * (e.B.double() @ e.A.double())
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), m.name


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_pool_file_fails_to_load(shared_run, tmp_path, damage):
    zoo, out0, _ = shared_run
    out = shutil.copytree(out0, tmp_path / "out")
    pool = next((out / POOLS_DIR).glob("*.safetensors"))
    if damage == "flip":
        data = bytearray(pool.read_bytes())
        data[len(data) // 2] ^= 0x01
        pool.write_bytes(bytes(data))
    else:
        pool.unlink()
    with pytest.raises(FormatError) as e:
        load_mos(out / "lm" / "task0")
    msg = str(e.value)
    assert "\n" not in msg and pool.name in msg, msg
    assert ("missing" if damage == "delete" else "sha256") in msg, msg
    load_mos(out / "other" / "r0")  # adapters without shared pools are unaffected
    res = run_cli("inspect", out / "lm" / "task0")
    assert_one_line_error(res, pool.name)
    res = run_cli("export", out / "lm" / "task0", tmp_path / "peft")
    assert_one_line_error(res, pool.name)
    assert not (tmp_path / "peft" / "adapter_config.json").exists()
    # a shared-pool rerun notices and refits the group: back to the original bytes
    summary = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    status = {a.name: a.status for a in summary.adapters}
    assert all(status[f"lm/task{i}"] == "converted" for i in range(4)), status
    assert status["other/r0"] == status["other/r1"] == "skipped"
    assert files_of(out) == files_of(out0)
    load_mos(out / "lm" / "task0")


def test_shared_pool_modified_member_refits_the_group(shared_run, tmp_path):
    zoo0, out0, _ = shared_run
    zoo = shutil.copytree(zoo0, tmp_path / "zoo")
    out = shutil.copytree(out0, tmp_path / "out")
    shutil.rmtree(zoo / "lm" / "task1")
    write_lora_like(zoo / "lm" / "task1", 1, seed=5)  # retrained: other weights, same shapes
    summary = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    status = {a.name: a.status for a in summary.adapters}
    assert status == {"lm/task0": "converted", "lm/task1": "converted", "lm/task2": "converted",
                      "lm/task3": "converted", "other/r0": "skipped", "other/r1": "skipped"}
    fresh = tmp_path / "fresh"
    run_batch(zoo, fresh, BatchConfig(ratio=8.0, shared_pool=True))
    a, b = files_of(out), files_of(fresh)
    for skipped in ("other/r0", "other/r1"):  # their configs keep the first zoo's path
        a.pop(f"{skipped}/{CONFIG_FILE}")
        b.pop(f"{skipped}/{CONFIG_FILE}")
    assert a == b
    assert summary_numbers(out)[1] == summary_numbers(fresh)[1]
    for name in status:
        load_mos(out / name)


@pytest.mark.parametrize("k", [0, 2])
def test_shared_pool_interrupted_group_then_rerun(shared_run, tmp_path, monkeypatch, k):
    """Interrupted while writing a group's adapters (after its pool file, after k of them)."""
    zoo, ref, _ = shared_run
    out = tmp_path / "out"
    real = mosconv.mos.format.save_mos  # batch imports it at call time
    saved = []

    def interrupting(mos, dest, *args, **kwargs):
        if mos.info.get("zoo_group") and len(saved) == k:
            raise KeyboardInterrupt
        if mos.info.get("zoo_group"):
            saved.append(dest)
        return real(mos, dest, *args, **kwargs)

    monkeypatch.setattr(mosconv.mos.format, "save_mos", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    monkeypatch.undo()
    assert len(saved) == k and any((out / POOLS_DIR).iterdir())
    summary = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    assert summary.failed == 0
    assert not stale_tmp(out)
    assert_same_tree(out, ref)


# ------------------------------------------------------------------ settings changes, stale pools, odd zoo paths


@pytest.mark.parametrize("first, second", [
    (["--ratio", "8"], ["--ratio", "4"]),
    (["--ratio", "8"], ["--ratio", "8", "--shared-pool"]),
    (["--ratio", "8", "--shared-pool"], ["--ratio", "8"]),
], ids=["ratio", "to-shared", "to-independent"])
def test_rerun_with_other_settings_redoes(tmp_path, first, second):
    zoo = make_shared_zoo(tmp_path / "zoo")
    out = tmp_path / "out"
    assert run_cli("batch", zoo, out, "-q", *first).exit_code == 0
    res = run_cli("batch", zoo, out, "-q", *second)
    assert res.exit_code == 0, res.output
    fresh = tmp_path / "fresh"
    assert run_cli("batch", zoo, fresh, "-q", *second).exit_code == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["totals"]["skipped"] == 0, [a["status"] for a in summary["adapters"]]
    for a in summary["adapters"]:
        cfg = json.loads((out / a["name"] / CONFIG_FILE).read_text())
        assert cfg["ratio"] == summary["ratio"], (a["name"], cfg["ratio"], summary["ratio"])
    assert summary_numbers(out)[0] == summary_numbers(fresh)[0]


def test_summary_counts_only_pools_in_use(shared_run, tmp_path):
    zoo0, out0, _ = shared_run
    zoo = shutil.copytree(zoo0, tmp_path / "zoo")
    out = shutil.copytree(out0, tmp_path / "out")
    for i in range(4):  # the lm adapters now name another base model: a new group
        p = zoo / "lm" / f"task{i}" / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg["base_model_name_or_path"] = "tiny-lm-v2"
        p.write_text(json.dumps(cfg))
    again = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True)).totals
    fresh = run_batch(zoo, tmp_path / "fresh", BatchConfig(ratio=8.0, shared_pool=True)).totals
    assert again.shared_pool_params == fresh.shared_pool_params, (again, fresh)
    assert again.mos_params == fresh.mos_params <= again.lora_params / 8, (again, fresh)


def test_out_inside_zoo_rerun(small_zoo, tmp_path):
    zoo = shutil.copytree(small_zoo, tmp_path / "zoo")
    assert run_cli("batch", zoo, zoo / "mos", "-q").exit_code == 0
    res = run_cli("batch", zoo, zoo / "mos", "-q")
    assert res.exit_code == 0, res.output
    summary = json.loads((zoo / "mos" / SUMMARY_FILE).read_text())
    assert [a["name"] for a in summary["adapters"]] == SMALL_NAMES
    assert {a["status"] for a in summary["adapters"]} == {"skipped"}


def test_zoo_that_is_an_adapter_file(small_zoo, tmp_path):
    res = run_cli("batch", small_zoo / "kohya" / "style.safetensors", tmp_path / "out")
    if res.exit_code == 0:  # read as a zoo of one adapter: fine too
        assert (tmp_path / "out" / "style" / CONFIG_FILE).is_file()
        return
    line = assert_one_line_error(res, "style.safetensors")
    assert "internal error" not in line, line


def test_batch_takes_the_conversion_options_of_compress(tmp_path):
    """--iters and --routing-weights are declared once for compress and batch; a batch made
    with them is what compress makes with them, and a rerun with other options redoes it."""
    zoo = tmp_path / "zoo"
    for i in range(2):
        write_random_peft(zoo / f"s{i}", llama_like(layers=4, d=32, d_kv=16), r=4, seed=10 + i,
                          shared_A=True)
    opts = ["--ratio", "4", "--iters", "1", "--no-routing-weights"]
    out = tmp_path / "out"
    res = run_cli("batch", zoo, out, *opts, "-q")
    assert res.exit_code == 0, res.output
    for name in ("s0", "s1"):
        res = run_cli("compress", zoo / name, tmp_path / name, *opts, "-q")
        assert res.exit_code == 0, res.output
        assert (out / name / TENSOR_FILE).read_bytes() == (tmp_path / name / TENSOR_FILE).read_bytes()
        kinds = json.loads((out / name / REPORT_FILE).read_text())["kinds"]
        assert not any(k["weights"] for k in kinds)
        batch = json.loads((out / name / CONFIG_FILE).read_text())["batch"]
        assert batch["iters"] == 1 and batch["routing_weights"] is False
    statuses = lambda: [a["status"] for a in json.loads((out / SUMMARY_FILE).read_text())["adapters"]]
    assert run_cli("batch", zoo, out, *opts, "-q").exit_code == 0
    assert statuses() == ["skipped", "skipped"]
    assert run_cli("batch", zoo, out, "--ratio", "4", "--iters", "1", "-q").exit_code == 0
    assert statuses() == ["converted", "converted"]  # weights allowed now: redone


def test_batch_md_python_api_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/batch.md's Python API example, run on a small zoo (one job instead of two: the
    test process is not a script with a ``__main__`` guard)."""
    doc = (REPO_ROOT / "docs" / "batch.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.+?)```", doc, flags=re.DOTALL).group(1)
    assert code.count("jobs=2") == 2
    make_shared_zoo(tmp_path / "zoo")
    monkeypatch.chdir(tmp_path)
    with one_thread():
        exec(compile(code.replace("jobs=2", "jobs=1"), "batch.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert printed[-1 - len(summary["adapters"])] == f"{summary['totals']['mos_params']} 0"
    names = [a["name"] for a in summary["adapters"]]
    assert printed[:len(names)] == [f"{n} converted" for n in names]  # progress, then totals
    # then convert_many, independent (other settings than the shared run: redone)
    assert [line.split()[0] for line in printed[len(names) + 1:]] == names
    assert all(line.split()[1] == "converted" and line.endswith(" None")
               for line in printed[len(names) + 1:])


def test_links_to_adapter_folders_are_followed_once(tmp_path):
    real = make_small_zoo(tmp_path / "real")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "a0").symlink_to(real / "teamA" / "a0", target_is_directory=True)
    (zoo / "teamB").symlink_to(real / "teamB", target_is_directory=True)
    (zoo / "teamB_again").symlink_to(real / "teamB", target_is_directory=True)
    (real / "teamB" / "loop").symlink_to(real, target_is_directory=True)  # a cycle
    items = discover(zoo)
    # each folder once (a0 is reached through two links, teamB through two and a loop)
    assert [i.name for i in items] == ["a0", "teamB/loop/c0", "teamB/loop/kohya/style",
                                       "teamB/loop/teamA/a1", "teamB/x/b0"]
    summary = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=8.0, search="truncation"))
    assert summary.totals.converted == 5 and summary.failed == 0


def test_out_equal_to_the_zoo_is_named_as_such(tmp_path):
    zoo = make_small_zoo(tmp_path / "zoo")
    res = run_cli("batch", zoo, zoo)
    assert res.exit_code == 1
    assert res.stderr == (f"mosconv: error: {zoo}: is also the output folder; write the outputs "
                          "to another folder (one inside the zoo is fine)\n")


def test_failed_adapters_leave_no_empty_folders(tmp_path):
    zoo = make_small_zoo(tmp_path / "zoo")
    deep = zoo / "x" / "y"
    deep.mkdir(parents=True)
    (deep / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "list.txt").write_text("zoo/c0\nnope/missing\n")
    for source, out in ((zoo, tmp_path / "out"), (tmp_path / "list.txt", tmp_path / "outL")):
        res = run_cli("batch", source, out, "--search", "truncation", "-q")
        assert res.exit_code == 1
        assert [p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())] == []
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "outL" / "nope").exists()


def test_inspect_names_how_a_batch_output_was_made(tmp_path):
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    res = run_cli("inspect", out / "lm" / "task0", "--json")
    info = json.loads(res.output)
    assert info["command"] is None and info["batch"]["shared_pool"] is True
    text = run_cli("inspect", out / "lm" / "task0").output
    assert (f"command       mosconv batch (ratio 8.0, seed 0, search fast, iters 4, "
            f"shared_pool True; group {info['zoo_group']})\n") in text


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-pool"])
def test_a_rerun_redoes_an_output_whose_files_are_broken(tmp_path, shared):
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    config = BatchConfig(ratio=8.0, shared_pool=shared)
    with one_thread():
        run_batch(zoo, out, config)
        first = files_of(out)
        (out / "lm" / "task2" / TENSOR_FILE).write_bytes(b"garbage")
        (out / "other" / "r1" / REPORT_FILE).unlink()
        summary = run_batch(zoo, out, config)
    status = {a.name: a.status for a in summary.adapters}
    assert status["lm/task2"] == status["other/r1"] == "converted", status
    assert files_of(out) == first  # redone to the same bytes


def lm_groups(out: Path) -> list[dict]:
    """summary.json's rows of the ``tiny-lm`` group of :func:`make_shared_zoo`."""
    groups = json.loads((out / SUMMARY_FILE).read_text())["groups"]
    return [g for g in groups if g["group"].startswith("tiny-lm")]


def test_a_group_that_lost_a_member_says_so_and_refit_refits_it(tmp_path):
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    with one_thread():
        run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
        shutil.rmtree(zoo / "lm" / "task3")
        res = run_cli("batch", zoo, out, "--shared-pool")
        assert res.exit_code == 0
        (group,) = lm_groups(out)
        assert group["also_serves"] == ["lm/task3"] and group["adapters"] == 3
        assert "note: its pools also serve lm/task3, not converted in this run" in res.output
        res = run_cli("batch", zoo, out, "--shared-pool", "--refit")
        assert res.exit_code == 0 and "note:" not in res.output
    (group,) = lm_groups(out)
    assert group["also_serves"] == [] and group["mos_params"] <= group["lora_params"] / 8
    fresh = tmp_path / "fresh"
    with one_thread():
        run_batch(zoo, fresh, BatchConfig(ratio=8.0, shared_pool=True))
    assert {k: v for k, v in files_of(out).items() if not k.startswith("lm/task3/")} == \
        files_of(fresh)  # the refit group is what a fresh run gives


def test_refit_refits_a_group_that_gained_members_since_its_fit(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    for i in range(3):
        write_lora_like(zoo / f"task{i}", i)
    with one_thread():
        run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
        write_lora_like(zoo / "task3", 3)
        added = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
        assert [a.status for a in added.adapters] == ["skipped"] * 3 + ["converted"]
        again = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
        assert {a.status for a in again.adapters} == {"skipped"}
        refit = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True, refit=True))
        assert {a.status for a in refit.adapters} == {"converted"}
        fresh = tmp_path / "fresh"
        run_batch(zoo, fresh, BatchConfig(ratio=8.0, shared_pool=True))
    assert files_of(out) == files_of(fresh)


def test_batch_settings_that_cannot_work_are_named_before_any_work(tmp_path):
    zoo = make_shared_zoo(tmp_path / "zoo")
    write_lora_like(zoo / "pools" / "x", 9)  # would land among the shared pools
    res = run_cli("batch", zoo, tmp_path / "out", "--shared-pool")
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    assert "adapter pools/x would be written under OUT/pools, where the shared pools go" \
        in res.stderr
    (tmp_path / "afile").write_text("x")
    res = run_cli("batch", zoo, tmp_path / "afile")
    assert res.exit_code == 1 and "afile: exists and is not a folder" in res.stderr
    res = run_cli("batch", zoo, tmp_path / "o2", "--address", "auto")  # a usage error
    assert res.exit_code == 2 and "--address is used with --engine ray" in res.output


def test_a_shared_pool_rerun_with_nothing_to_do_reads_no_adapter(tmp_path, monkeypatch):
    """The fast path: every member complete and recorded (a group that fell back to
    converting its members alone has no record to be in), so no adapter is read."""
    import mosconv.lora.read

    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    with one_thread():
        first = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    assert len(list((out / POOLS_DIR).glob("*.safetensors"))) == 1  # one group shares, one not
    assert len({a.group for a in first.adapters}) == 2

    def no_read(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(mosconv.lora.read, "read_adapter", no_read)
    again = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    assert {a.status for a in again.adapters} == {"skipped"}


def test_an_adapter_named_like_the_summary_is_refused_before_any_work(tmp_path):
    """It was written to OUT/summary.json/, and every run then failed writing the summary."""
    zoo = tmp_path / "zoo"
    write_lora_like(zoo / "ok", 0)
    write_lora_like(zoo / SUMMARY_FILE, 1)
    res = run_cli("batch", zoo, tmp_path / "out")
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    assert f"adapter {SUMMARY_FILE} would be written to OUT/{SUMMARY_FILE}" in res.stderr


def test_temporary_files_a_killed_run_left_outside_the_adapters_are_removed(tmp_path):
    """A run killed while writing the summary, a pool file or its member record left
    '.<name>.<random>.tmp' behind (a whole pool's copy); reruns never removed it."""
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    with one_thread():
        run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    pool = next((out / POOLS_DIR).glob("*.safetensors"))
    ours = [out / f".{SUMMARY_FILE}.x1y2.tmp", pool.parent / f".{pool.name}.a1b2.tmp",
            pool.parent / f".{pool.stem}.members.json.c3d4.tmp"]
    theirs = [out / ".notes.txt.e5f6.tmp", out / "keep.tmp"]
    for f in ours + theirs:
        f.write_bytes(b"partial")
    with one_thread():
        again = run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    assert {a.status for a in again.adapters} == {"skipped"}
    assert not any(f.exists() for f in ours) and all(f.exists() for f in theirs)


def test_a_byte_budget_is_recorded_and_its_baseline_shown(tmp_path):
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    with one_thread():
        res = run_cli("batch", zoo, out, "--size-ratio", "16", "--search", "truncation")
    assert res.exit_code == 0, res.output
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert (s["size_ratio"], s["dtype"], s["quantize"]) == (16.0, "auto", "auto")
    assert "trunc.bytes" in res.output and "truncation in no more bytes" in res.output
    for a in s["adapters"]:
        assert a["truncation_equal_bytes_relative_error"] is not None
        assert f"{a['truncation_equal_bytes_relative_error']:.4f}" in res.output
    with one_thread():  # without a byte budget there is none (a lone adapter's was given)
        res = run_cli("batch", zoo, tmp_path / "plain", "--search", "truncation", "-q")
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "plain" / SUMMARY_FILE).read_text())
    assert s["size_ratio"] is None and s["totals"]["truncation_equal_bytes_relative_error"] is None
    assert all(a["truncation_equal_bytes_relative_error"] is None for a in s["adapters"])


def test_inspect_names_a_batch_folder_and_a_pool_file(tmp_path):
    zoo, out = make_shared_zoo(tmp_path / "zoo"), tmp_path / "out"
    with one_thread():
        run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    res = run_cli("inspect", out)
    assert res.exit_code == 1 and "a batch output folder; `inspect --serving`" in res.stderr
    pool = next((out / POOLS_DIR).glob("*.safetensors"))
    res = run_cli("inspect", pool)
    assert res.exit_code == 1 and "a zoo group's shared pool file" in res.stderr
    text = run_cli("inspect", out / "lm" / "task0", "--serving").output
    assert "1 adapter: shared pools" in text and "(1 pool file)" in text
    # a member's kinds: its own parameters as the report and the table give them (they read
    # pool entries with the group's shared ones in --json, cores left out), and all of them
    info = json.loads(run_cli("inspect", out / "lm" / "task0", "--json").stdout)
    assert info["local_params"] < info["params"]
    assert sum(k["own_params"] for k in info["kinds"]) == info["local_params"]
    assert [k["own_params"] for k in info["kinds"]] == [
        k["params"] for k in info["report"]["kinds"]]


def test_one_bad_adapter_never_stops_the_zoo(tmp_path, monkeypatch):
    """A file that links to itself, a folder that cannot be listed and a bug of ours on one
    adapter each fail that adapter, named in the summary; the others convert (a link loop
    and a diffusers header with a bad regex stopped the whole run with an internal error)."""
    import json as _json

    zoo = make_small_zoo(tmp_path / "zoo")
    (zoo / "loop.safetensors").symlink_to(zoo / "loop.safetensors")  # a link to itself
    bad = zoo / "d" / "bad.safetensors"
    bad.parent.mkdir()
    m = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{m}.lora_A.weight": torch.randn(4, 32), f"{m}.lora_B.weight": torch.randn(32, 4)},
              bad, metadata={"lora_adapter_metadata": _json.dumps(
                  {"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q(": 16}})})
    locked = zoo / "locked"
    write_random_peft(locked / "inner", llama_like(layers=1, d=32, d_kv=16), r=4, seed=9)
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 does for a user other than root
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = discover(zoo)
    monkeypatch.undo()
    assert "locked" in [i.name for i in items]
    import mosconv.pipeline

    real_compress = mosconv.pipeline.compress

    def compress(source, *args, **kwargs):
        if str(source).endswith("teamA/a1"):
            raise TypeError("a bug")
        return real_compress(source, *args, **kwargs)

    monkeypatch.setattr(mosconv.pipeline, "compress", compress)
    monkeypatch.setattr(mosconv.batch.run, "discover", lambda *a, **k: items)
    summary = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=8.0, search="truncation"))
    failed = {o.name: o.error for o in summary.adapters if o.status == "failed"}
    assert set(failed) == {"loop", "d/bad", "locked", "teamA/a1"}
    assert "loop.safetensors" in failed["loop"]
    assert "alpha_pattern key 'to_q(' is not a valid regular expression" in failed["d/bad"]
    assert str(locked) in failed["locked"]
    assert failed["teamA/a1"].endswith("teamA/a1: internal error: TypeError: a bug")
    assert summary.totals.converted == len(SMALL_NAMES) - 1
