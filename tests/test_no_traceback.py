"""Every CLI command on bad inputs: missing paths, corrupt files, bad option values, files of
the wrong kind.  Each must end with exit code 1 (failure) or 2 (usage), no traceback and no
"internal error"; a failure is ONE line ``mosconv: error: ...`` on stderr (nothing on
stdout), a usage error is click's ``Usage:`` / ``Error:``.

calibrate and eval never load a model here: they are given no base model, or one that does
not exist (a guard fails the test if a real model load is attempted).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factory import llama_like, write_random_peft
from helpers import one_thread
from safetensors.torch import save_file

from mosconv.cli.commands import main
from mosconv.fit.convert import ConvertConfig
from mosconv.model.calib import CalibStats, save_stats
from mosconv.mos.format import CONFIG_FILE, REPORT_FILE, TENSOR_FILE
from mosconv.pipeline import compress


@pytest.fixture(autouse=True)
def _guards(monkeypatch):
    """One thread; and no real model is ever loaded by these tests."""
    import mosconv.model.hf

    real = mosconv.model.hf.load_base_model

    def guarded(path, *a, **kw):
        if Path(path).exists():
            pytest.fail(f"test_no_traceback tried to load a real model from {path}")
        return real(path, *a, **kw)

    monkeypatch.setattr(mosconv.model.hf, "load_base_model", guarded)
    with one_thread():
        yield


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, by name."""
    root = tmp_path_factory.mktemp("notb")
    p: dict[str, Path] = {"root": root, "missing": root / "no-such-thing"}
    mods = llama_like(layers=2, d=32, d_kv=16)
    lora, _ = write_random_peft(root / "lora", mods, r=4)
    p["lora"] = lora
    with one_thread():
        compress(lora, root / "mos", ConvertConfig(ratio=4, search="truncation"))
    p["mos"] = root / "mos"
    p["empty_dir"] = root / "empty"
    p["empty_dir"].mkdir()
    p["txt"] = root / "notes.txt"
    p["txt"].write_text("not an adapter\n")
    p["data"] = root / "data.txt"
    p["data"].write_text("some text for calibration\n" * 20)

    def broken(name: str, change) -> Path:
        d = _copy(lora, root / name)
        change(d)
        return d

    st = "adapter_model.safetensors"
    data = (lora / st).read_bytes()
    p["truncated"] = broken("truncated", lambda d: (d / st).write_bytes(data[: len(data) // 2]))
    p["garbage"] = broken("garbage", lambda d: (d / st).write_bytes(bytes(range(256)) * 8))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [2**40, 2**40]
    raw = json.dumps(header).encode()
    p["huge_shape"] = broken("huge-shape", lambda d: (d / st).write_bytes(
        struct.pack("<Q", len(raw)) + raw + data[8 + n:]))
    p["bad_config_json"] = broken("bad-json", lambda d: (d / "adapter_config.json")
                                  .write_text("{'r': 8,"))
    cfg = json.loads((lora / "adapter_config.json").read_text())
    p["bad_config_type"] = broken("bad-type", lambda d: (d / "adapter_config.json").write_text(
        json.dumps({**cfg, "r": "8", "lora_alpha": [16]})))
    p["bad_fan_in"] = broken("bad-fan-in", lambda d: (d / "adapter_config.json").write_text(
        json.dumps({**cfg, "fan_in_fan_out": "false"})))

    def bin_pickle(d: Path, pkl: bytes) -> None:
        (d / st).unlink()
        with zipfile.ZipFile(d / "adapter_model.bin", "w") as z:
            z.writestr("adapter_model/data.pkl", pkl)
            z.writestr("adapter_model/version", "3\n")

    p["bin_crash"] = broken("bin-crash", lambda d: bin_pickle(
        d, b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R."))

    def legacy(d: Path) -> None:
        from safetensors.torch import load_file

        t = load_file(d / st)
        (d / st).unlink()
        torch.save(t, d / "adapter_model.bin", _use_new_zipfile_serialization=False)

    p["bin_legacy"] = broken("bin-legacy", legacy)

    def mos_broken(name: str, change) -> Path:
        d = _copy(p["mos"], root / name)
        change(d)
        return d

    mcfg = json.loads((p["mos"] / CONFIG_FILE).read_text())

    def routes_out_of_range(d: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(d / TENSOR_FILE), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        # format v3 stores no routes for a module that uses its private range in order:
        # store the first such module's A routes, pointing outside the pool
        cfg = json.loads((d / CONFIG_FILE).read_text())
        m = next(m for m in cfg["modules"] if "A" in m.get("implicit_routes", []) and m["r"])
        m["implicit_routes"].remove("A")
        (d / CONFIG_FILE).write_text(json.dumps(cfg))
        t[f"mos.routes.{m['name']}.A"] = torch.full((m["r"],), 10_000, dtype=torch.int32)
        save_file(t, str(d / TENSOR_FILE), metadata=meta)

    p["mos_routes"] = mos_broken("mos-routes", routes_out_of_range)
    p["mos_bad_json"] = mos_broken("mos-json", lambda d: (d / CONFIG_FILE).write_text("[{"))
    p["mos_null_kinds"] = mos_broken("mos-null", lambda d: (d / CONFIG_FILE).write_text(
        json.dumps({**mcfg, "kinds": None})))
    shared = {"file": "../pools/gone.safetensors", "sha256": "0" * 64, "key_A": "k0.A",
              "key_B": None, "n_A": 1, "n_B": 0}
    p["mos_no_pool"] = mos_broken("mos-no-pool", lambda d: (d / CONFIG_FILE).write_text(
        json.dumps({**mcfg, "kinds": [{**mcfg["kinds"][0], "shared_pool": shared},
                                      *mcfg["kinds"][1:]]})))
    p["mos_bad_report"] = mos_broken("mos-report", lambda d: (d / REPORT_FILE).write_text(
        json.dumps({"totals": {}, "kinds": []})))
    p["mos_no_tensors"] = mos_broken("mos-no-tensors", lambda d: (d / TENSOR_FILE).unlink())
    kohya = root / "kohya" / "style.safetensors"
    kohya.parent.mkdir()
    save_file({"lora_unet_a_to_q.lora_down.weight": torch.randn(2, 8),
               "lora_unet_a_to_q.lora_up.weight": torch.randn(8, 2)}, str(kohya))
    with one_thread():
        compress(kohya, root / "mos-kohya", ConvertConfig(ratio=2, search="truncation"))
    p["mos_kohya"] = root / "mos-kohya"

    x = torch.randn(10, 32, dtype=torch.float64)
    stats = CalibStats({n: x.T @ x / 10 for n in mods}, 10, {"data": "x"})
    p["calib"] = save_stats(stats, root / "calib.safetensors")
    bad = CalibStats({n: torch.full((32, 32), float("nan"), dtype=torch.float64) for n in mods},
                     10, {"data": "x"})
    p["calib_nan"] = save_stats(bad, root / "calib-nan.safetensors")

    zoo = root / "zoo"
    _copy(lora, zoo / "good")
    _copy(p["truncated"], zoo / "broken")
    p["zoo"] = zoo
    p["zoo_list"] = root / "zoo.txt"
    p["zoo_list"].write_text("lora\nno-such-adapter\n")
    p["existing_out"] = root / "existing-out"
    p["existing_out"].mkdir()
    (p["existing_out"] / CONFIG_FILE).write_text("{}")
    (p["existing_out"] / "adapter_config.json").write_text("{}")
    return p


def _out(w) -> str:
    return str(w["root"] / "outs" / f"o{len(list((w['root']).glob('outs/*')))}")


# (command line builder) -> expected exit codes; one line per case
CASES = {
    # ---- inspect
    "inspect-missing": lambda w: ["inspect", w["missing"]],
    "inspect-empty-dir": lambda w: ["inspect", w["empty_dir"]],
    "inspect-txt": lambda w: ["inspect", w["txt"]],
    "inspect-truncated": lambda w: ["inspect", w["truncated"]],
    "inspect-garbage": lambda w: ["inspect", w["garbage"]],
    "inspect-huge-shape": lambda w: ["inspect", w["huge_shape"]],
    "inspect-bad-config-json": lambda w: ["inspect", w["bad_config_json"]],
    "inspect-bad-config-type": lambda w: ["inspect", w["bad_config_type"], "--json"],
    "inspect-bad-fan-in": lambda w: ["inspect", w["bad_fan_in"]],
    "inspect-bin-crash": lambda w: ["inspect", w["bin_crash"]],
    "inspect-bin-legacy": lambda w: ["inspect", w["bin_legacy"]],
    "inspect-mos-routes": lambda w: ["inspect", w["mos_routes"]],
    "inspect-mos-bad-json": lambda w: ["inspect", w["mos_bad_json"]],
    "inspect-mos-null-kinds": lambda w: ["inspect", w["mos_null_kinds"]],
    "inspect-mos-no-pool": lambda w: ["inspect", w["mos_no_pool"]],
    "inspect-mos-bad-report": lambda w: ["inspect", w["mos_bad_report"]],
    "inspect-mos-bad-report-json": lambda w: ["inspect", w["mos_bad_report"], "--json"],
    "inspect-mos-no-tensors": lambda w: ["inspect", w["mos_no_tensors"]],
    "inspect-calib-file": lambda w: ["inspect", w["calib"]],
    "inspect-no-arg": lambda w: ["inspect"],
    "inspect-bad-option": lambda w: ["inspect", w["lora"], "--frobnicate"],
    # ---- compress
    "compress-missing": lambda w: ["compress", w["missing"], _out(w)],
    "compress-truncated": lambda w: ["compress", w["truncated"], _out(w), "-q"],
    "compress-huge-shape": lambda w: ["compress", w["huge_shape"], _out(w), "-q"],
    "compress-bad-config": lambda w: ["compress", w["bad_config_type"], _out(w), "-q"],
    "compress-bin-crash": lambda w: ["compress", w["bin_crash"], _out(w), "-q"],
    "compress-a-mos-folder": lambda w: ["compress", w["mos"], _out(w), "-q"],
    "compress-a-calib-file": lambda w: ["compress", w["calib"], _out(w), "-q"],
    "compress-txt": lambda w: ["compress", w["txt"], _out(w), "-q"],
    "compress-ratio-zero": lambda w: ["compress", w["lora"], _out(w), "--ratio", "0"],
    "compress-ratio-below-one": lambda w: ["compress", w["lora"], _out(w), "--ratio", "0.5"],
    "compress-ratio-nan": lambda w: ["compress", w["lora"], _out(w), "--ratio", "nan"],
    "compress-ratio-inf": lambda w: ["compress", w["lora"], _out(w), "--ratio", "inf"],
    "compress-ratio-word": lambda w: ["compress", w["lora"], _out(w), "--ratio", "eight"],
    "compress-search-bogus": lambda w: ["compress", w["lora"], _out(w), "--search", "best"],
    "compress-iters-negative": lambda w: ["compress", w["lora"], _out(w), "--iters", "-1"],
    "compress-seed-word": lambda w: ["compress", w["lora"], _out(w), "--seed", "x"],
    "compress-out-exists": lambda w: ["compress", w["lora"], w["existing_out"], "-q"],
    "compress-out-is-a-file": lambda w: ["compress", w["lora"], w["txt"], "-q"],
    "compress-calib-missing": lambda w: ["compress", w["lora"], _out(w), "--calib",
                                         w["missing"], "-q"],
    "compress-calib-nan": lambda w: ["compress", w["lora"], _out(w), "--calib", w["calib_nan"],
                                     "-q"],
    "compress-calib-text-no-model": lambda w: ["compress", w["lora"], _out(w), "--calib",
                                               w["data"], "-q"],
    "compress-calib-text-missing-model": lambda w: [
        "compress", w["lora"], _out(w), "--calib", w["data"], "--base-model", w["missing"],
        "-q"],
    "compress-distill-no-model": lambda w: ["compress", w["lora"], _out(w), "--distill", "-q"],
    "compress-distill-missing-model": lambda w: [
        "compress", w["lora"], _out(w), "--distill", "--base-model", w["missing"], "--data",
        w["data"], "-q"],
    "compress-data-without-distill": lambda w: ["compress", w["lora"], _out(w), "--data",
                                                w["data"]],
    "compress-held-out-bad": lambda w: [
        "compress", w["lora"], _out(w), "--distill", "--held-out", "2", "--base-model",
        w["missing"], "--data", w["data"], "-q"],
    "compress-steps-zero": lambda w: ["compress", w["lora"], _out(w), "--distill", "--steps",
                                      "0"],
    "compress-no-args": lambda w: ["compress"],
    # ---- export
    "export-missing": lambda w: ["export", w["missing"], _out(w)],
    "export-a-lora": lambda w: ["export", w["lora"], _out(w)],
    "export-empty-dir": lambda w: ["export", w["empty_dir"], _out(w)],
    "export-mos-routes": lambda w: ["export", w["mos_routes"], _out(w)],
    "export-mos-bad-json": lambda w: ["export", w["mos_bad_json"], _out(w)],
    "export-mos-no-pool": lambda w: ["export", w["mos_no_pool"], _out(w)],
    "export-mos-no-tensors": lambda w: ["export", w["mos_no_tensors"], _out(w)],
    "export-kohya-source": lambda w: ["export", w["mos_kohya"], _out(w)],
    "export-out-exists": lambda w: ["export", w["mos"], w["existing_out"]],
    "export-out-is-a-file": lambda w: ["export", w["mos"], w["txt"]],
    "export-calib-file": lambda w: ["export", w["calib"], _out(w)],
    "export-one-arg": lambda w: ["export", w["mos"]],
    # ---- batch
    "batch-missing": lambda w: ["batch", w["missing"], _out(w), "-q"],
    "batch-empty-dir": lambda w: ["batch", w["empty_dir"], _out(w), "-q"],
    "batch-one-broken": lambda w: ["batch", w["zoo"], _out(w), "-q"],
    "batch-one-broken-shared": lambda w: ["batch", w["zoo"], _out(w), "-q", "--shared-pool"],
    "batch-list-with-missing": lambda w: ["batch", w["zoo_list"], _out(w), "-q"],
    "batch-binary-list": lambda w: ["batch", w["calib"], _out(w), "-q"],
    # (a zoo of one: batch checks the ratio per adapter, one line per failed adapter)
    "batch-ratio-below-one": lambda w: ["batch", w["lora"], _out(w), "--ratio", "0.5", "-q"],
    "batch-jobs-zero": lambda w: ["batch", w["zoo"], _out(w), "--jobs", "0"],
    "batch-engine-bogus": lambda w: ["batch", w["zoo"], _out(w), "--engine", "spark"],
    "batch-no-args": lambda w: ["batch"],
    # ---- calibrate (no model is ever loaded)
    "calibrate-no-model": lambda w: ["calibrate", w["lora"], _out(w) + ".safetensors", "-q"],
    "calibrate-no-data": lambda w: ["calibrate", w["lora"], _out(w) + ".safetensors",
                                    "--base-model", w["missing"], "-q"],
    "calibrate-missing-model": lambda w: ["calibrate", w["lora"], _out(w) + ".safetensors",
                                          "--base-model", w["missing"], "--data", w["data"],
                                          "-q"],
    "calibrate-bad-lora": lambda w: ["calibrate", w["truncated"], _out(w) + ".safetensors",
                                     "--base-model", w["missing"], "--data", w["data"], "-q"],
    "calibrate-missing-gguf": lambda w: ["calibrate", w["lora"], _out(w) + ".safetensors",
                                         "--base-model", w["missing"], "--gguf-file", "m.gguf",
                                         "--data", w["data"], "-q"],
    "calibrate-out-not-safetensors": lambda w: ["calibrate", w["lora"], _out(w) + ".bin"],
    "calibrate-seq-len-one": lambda w: ["calibrate", w["lora"], _out(w) + ".safetensors",
                                        "--seq-len", "1"],
    "calibrate-no-args": lambda w: ["calibrate"],
    # ---- eval (no model is ever loaded)
    "eval-no-model": lambda w: ["eval", "--teacher", w["lora"], "--student", w["mos"]],
    "eval-missing-model": lambda w: ["eval", "--teacher", w["lora"], "--student", w["mos"],
                                     "--base-model", w["missing"], "--data", w["data"]],
    "eval-missing-teacher-option": lambda w: ["eval", "--student", w["mos"]],
    "eval-bad-teacher": lambda w: ["eval", "--teacher", w["truncated"], "--student", w["mos"],
                                   "--base-model", w["missing"], "--data", w["data"]],
    "eval-batch-size-zero": lambda w: ["eval", "--teacher", w["lora"], "--student", w["mos"],
                                       "--batch-size", "0"],
    # ---- the group
    "unknown-command": lambda w: ["frobnicate"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clean_line(w, case):
    args = [str(a) for a in CASES[case](w)]
    res = CliRunner().invoke(main, args)
    out = res.output
    assert res.exit_code in (1, 2), (case, res.exit_code, out, res.exception)
    assert isinstance(res.exception, SystemExit), (case, repr(res.exception))
    assert "Traceback" not in out and "internal error" not in out, (case, out)
    if res.exit_code == 2:
        assert "Usage:" in out and "Error:" in out, (case, out)
        return
    assert res.stdout == "", (case, res.stdout)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, (case, res.stderr)
    assert lines[0].startswith("mosconv: error: "), (case, lines[0])
    assert len(lines[0]) < 1000, (case, lines[0])
