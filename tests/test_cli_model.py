"""The model-facing commands through click's CliRunner on a tiny real causal LM:
``calibrate``, ``compress --calib``, ``compress --distill``, ``eval``, and their one-line
errors (empty data, unknown device, a base model that does not fit the adapter)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from factory import write_random_peft

import mosconv.model.hf
from mosconv.cli.commands import main
from mosconv.model.calib import is_stats_file
from mosconv.mos.format import CONFIG_FILE, load_mos

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in res.output
    return res


def model_args(tiny_lm, data=None, tokens=512):
    return ["--base-model", tiny_lm.model, "--data", data or tiny_lm.data,
            "--max-tokens", tokens, "--seq-len", 32, "--device", "cpu"]


def test_calibrate_then_compress_reuses_stats_without_the_model(tiny_lm, tmp_path, monkeypatch):
    stats = tmp_path / "calib.safetensors"
    res = run("calibrate", tiny_lm.lora, stats, *model_args(tiny_lm), "--json", "-q")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["tokens"] == 512 and summary["modules"] == 4 and summary["peak_rss_mib"] > 0
    assert is_stats_file(stats)

    def no_model(*a, **k):
        raise AssertionError("the base model must not be loaded when statistics are reused")

    # an existing file is replaced only when asked, checked before the model loads
    monkeypatch.setattr(mosconv.model.hf, "load_base_model", no_model)
    before = stats.read_bytes()
    res = run("calibrate", tiny_lm.lora, stats, *model_args(tiny_lm), "-q")
    assert res.exit_code == 1 and res.stderr == (
        f"mosconv: error: {stats}: already exists; it is replaced only when overwriting is "
        "asked for (use --overwrite)\n")
    assert stats.read_bytes() == before
    res = run("compress", tiny_lm.lora, tmp_path / "out", "--ratio", 4, "--calib", stats)
    assert res.exit_code == 0, res.output
    assert "data-aware error" in res.output and "data-aware truncation" in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    t = report["totals"]
    assert t["metric"] == "data" and t["calib_tokens"] == 512
    assert t["data_relative_error"] <= t["data_truncation_relative_error"] + 1e-6
    assert load_mos(tmp_path / "out").info["calib"]["data_sha256"]
    res = run("compress", tiny_lm.lora, tmp_path / "out2", "--calib", tmp_path / "nope.st")
    assert res.exit_code == 1 and res.stderr == (
        f"mosconv: error: {tmp_path / 'nope.st'}: no such file (calibration statistics, or a "
        "text to compute them from, were asked for)\n")


def test_compress_calib_from_text_saves_the_stats(tiny_lm, tmp_path):
    out = tmp_path / "out"
    res = run("compress", tiny_lm.lora, out, "--ratio", 4, "--calib", tiny_lm.data,
              "--base-model", tiny_lm.model, "--max-tokens", 256, "--seq-len", 32, "-q")
    assert res.exit_code == 0, res.output
    assert is_stats_file(out / "calib_stats.safetensors") and (out / CONFIG_FILE).is_file()


def test_compress_distill_and_eval(tiny_lm, tmp_path):
    out = tmp_path / "out"
    res = run("compress", tiny_lm.lora, out, "--ratio", 4, "--distill", "--steps", 12,
              "--lr", 0.02, *model_args(tiny_lm, tokens=1024))
    assert res.exit_code == 0, res.output
    assert "held-out KL(teacher||student)" in res.output
    d = json.loads((out / "report.json").read_text())["distill"]
    assert d["steps"] <= 12 and d["device"] == "cpu" and d["held_out_blocks"] == 3
    assert d["kl_after"] <= d["kl_before"] and d["truncation_kl"] > 0
    assert d["data_sha256"] and d["steps_per_s"] > 0
    assert load_mos(out).info["distilled"] is True

    res = run("eval", "--teacher", tiny_lm.lora, "--student", out, *model_args(tiny_lm), "--json")
    assert res.exit_code == 0, res.output
    e = json.loads(res.output)
    assert e["tokens"] == 512
    assert e["effect_retained"] == pytest.approx(1 - e["kl_teacher_student"] / e["kl_teacher_base"])
    assert e["ppl_base"] > 1 and e["ppl_teacher"] > 1 and e["ppl_student"] > 1
    res = run("eval", "--teacher", tiny_lm.lora, "--student", tiny_lm.lora, *model_args(tiny_lm))
    assert res.exit_code == 0 and "effect retained" in res.output


def _fails(res, *needles):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("mosconv: error: ")
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_bad_inputs_get_one_line_errors(tiny_lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    _fails(run("compress", tiny_lm.lora, out, "--distill", *model_args(tiny_lm, data=empty)),
           str(empty), "no text")
    assert not out.exists()  # nothing half-written left behind
    args = model_args(tiny_lm)
    args[args.index("--device") + 1] = "tpu"
    for cmd in (["compress", tiny_lm.lora, out, "--distill"],
                ["eval", "--teacher", tiny_lm.lora, "--student", tiny_lm.lora],
                ["calibrate", tiny_lm.lora, tmp_path / "c.safetensors"]):
        res = run(*cmd, *args)  # a usage error (exit 2), before any model loads
        assert res.exit_code == 2 and "'tpu' is not one of 'auto', 'cpu', 'cuda'" in res.output
    assert not out.exists()
    other, _ = write_random_peft(tmp_path / "other", {"model.layers.0.self_attn.q_proj": (48, 48)})
    _fails(run("compress", other, out, "--distill", *model_args(tiny_lm)),
           "model.layers.0.self_attn.q_proj", "do not match")
    _fails(run("calibrate", other, tmp_path / "c.safetensors", *model_args(tiny_lm)),
           "do not match")
    for cmd, what in ((["compress", tiny_lm.lora, out, "--distill"], "--distill"),
                      (["calibrate", tiny_lm.lora, tmp_path / "c.safetensors"], "calibrate"),
                      (["eval", "--teacher", tiny_lm.lora, "--student", tiny_lm.lora], "eval")):
        res = run(*cmd, "--data", tiny_lm.data)  # a usage error (exit 2), as for --refit
        assert res.exit_code == 2 and f"{what} needs --base-model" in res.output, res.output
    _fails(run("compress", tiny_lm.lora, out, "--calib", tiny_lm.data),
           "needs a base model (use --base-model)")
    _fails(run("eval", "--teacher", tiny_lm.lora, "--student", tiny_lm.lora,
               *model_args(tiny_lm)[:2], "--data", tmp_path / "missing.txt"), "not found")
    _fails(run("compress", tiny_lm.lora, out, "--distill",
               *["--base-model", tmp_path / "nomodel", "--data", tiny_lm.data]), "nomodel")
    assert not out.exists()
    res = run("compress", tiny_lm.lora, out, "--data", tiny_lm.data)
    assert res.exit_code == 2  # usage: --data without --distill or --calib


def test_cli_devices_are_the_library_devices():
    """The CLI lists the devices without importing torch; the two lists must not drift."""
    from mosconv.cli.options import DEVICES
    from mosconv.model.distill import DEVICES as LIBRARY

    assert DEVICES == LIBRARY


def test_max_tokens_below_seq_len_is_named_before_the_model_loads(tiny_lm, tmp_path,
                                                                 monkeypatch):
    """It came after loading the model, and named max_tokens, not the option."""
    import mosconv.model.hf

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mosconv.model.hf, "load_base_model", no_model)
    args = model_args(tiny_lm, tokens=16)
    for cmd in (["compress", tiny_lm.lora, tmp_path / "o", "--calib", tiny_lm.data],
                ["compress", tiny_lm.lora, tmp_path / "o", "--distill"],
                ["calibrate", tiny_lm.lora, tmp_path / "c.safetensors"]):
        res = run(*cmd, *args)
        _fails(res, "max_tokens must be at least seq_len (32), got 16",
               "--max-tokens", "--seq-len")
    assert not (tmp_path / "o").exists()
