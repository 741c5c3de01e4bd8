"""Bad numbers through every command: a LoRA with NaN/Inf values, ranks that disagree between
``A`` and ``B`` or with the config, values too large to compute with, a calibration file with
NaN, and a base model whose outputs turn non-finite. Each gets exit 1, one line naming the
file and the module, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import PEFT_PREFIX
from helpers import assert_one_line_error
from safetensors.torch import load_file, save_file

from mosconv.cli.commands import main
from mosconv.model.calib import CalibStats, save_stats

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

Q0 = "model.layers.0.self_attn.q_proj"
A_KEY = f"{PEFT_PREFIX}{Q0}.lora_A.weight"
B_KEY = f"{PEFT_PREFIX}{Q0}.lora_B.weight"


def _set(key: str, i: int, j: int, value: float):
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        t[key] = t[key].clone()
        t[key][i, j] = value
    return edit


def _narrow_b(t: dict[str, torch.Tensor], cfg: dict) -> None:
    t[B_KEY] = t[B_KEY][:, :3].clone()


def _huge(t: dict[str, torch.Tensor], cfg: dict) -> None:
    t[A_KEY] = t[A_KEY].double() * 1e300


# case -> (edit of the tensors and config, words the message must hold besides the module)
CASES = {
    "nan-in-A": (_set(A_KEY, 1, 2, float("nan")), ("NaN or Inf",)),
    "inf-in-B": (_set(B_KEY, 0, 1, float("inf")), ("NaN or Inf",)),
    "minus-inf-in-A": (_set(A_KEY, 3, 0, float("-inf")), ("NaN or Inf",)),
    "A-B-ranks-differ": (_narrow_b, ("mismatched shapes",)),
    "config-r-differs": (lambda t, c: c.update(r=8), ("rank 4", "r=8")),
    "rank-pattern-differs": (lambda t, c: c.update(rank_pattern={"q_proj": 2}),
                             ("rank 4", "rank_pattern", "=2")),
    "overflow": (_huge, ("too large",)),
}


def bad_adapter(make, case: str) -> tuple[Path, Path]:
    """A PEFT folder with ``case`` applied; returns ``(folder, weights file)``."""
    edit, _ = CASES[case]
    w = make.peft(modules={Q0: (32, 32), "model.layers.0.self_attn.v_proj": (16, 32)})
    tensors, cfg = dict(w.tensors), dict(w.config)
    edit(tensors, cfg)
    make.write_tensors(w.weights, tensors)
    (w.path / "adapter_config.json").write_text(json.dumps(cfg))
    return w.path, w.weights


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_and_compress_refuse(make, tmp_path, case):
    folder, weights = bad_adapter(make, case)
    words = CASES[case][1]
    assert_one_line_error(run("inspect", folder), weights, Q0, *words)
    out = tmp_path / "out"
    assert_one_line_error(run("compress", folder, out, "--ratio", "8"), weights, Q0, *words)
    assert not out.exists()


@pytest.mark.parametrize("alpha", [1e-170, 1e-320])
def test_a_vanishing_scale_is_inspected_and_compressed(make, tmp_path, alpha):
    """An update so small that its singular values' squares underflow (``lora_alpha``
    1e-170) was an internal error (ZeroDivisionError in the stable rank)."""
    w = make.peft(modules={Q0: (32, 32)})
    (w.path / "adapter_config.json").write_text(json.dumps({**w.config, "lora_alpha": alpha}))
    res = run("inspect", w.path, "--json")
    assert res.exit_code == 0, res.output
    assert all(k["stable_rank_mean"] >= 1.0 for k in json.loads(res.stdout)["kinds"])
    assert run("compress", w.path, tmp_path / "out", "--ratio", "2", "-q").exit_code == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_calibrate_refuses_before_running_the_model(make, tiny_lm, tmp_path, case):
    folder, weights = bad_adapter(make, case)
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "stats.safetensors"
    res = run("calibrate", folder, out, "--base-model", tiny_lm.model, "--data", tiny_lm.data,
              "--max-tokens", 64, "--seq-len", 32)
    assert_one_line_error(res, weights, Q0, *CASES[case][1])
    assert list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared-pool"])
def test_batch_fails_the_bad_adapter_and_converts_the_others(make, tmp_path, shared):
    from mosconv.mos.format import CONFIG_FILE, load_mos

    zoo = tmp_path / "zoo"
    for i, case in enumerate(["nan-in-A", "config-r-differs"]):
        folder, _ = bad_adapter(make, case)
        shutil.copytree(folder, zoo / f"bad{i}")
    for i in range(2):
        shutil.copytree(make.peft(modules={Q0: (32, 32)}).path, zoo / f"good{i}")
    out = tmp_path / "out"
    res = run("batch", zoo, out, "--ratio", "4", "-q", *(["--shared-pool"] if shared else []))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mosconv: error:")]
    assert len(errors) == 2, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = {a["name"]: a for a in summary["adapters"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "bad0": "failed", "bad1": "failed", "good0": "converted", "good1": "converted"}
    assert "NaN or Inf" in rows["bad0"]["error"] and Q0 in rows["bad0"]["error"]
    assert "r=8" in rows["bad1"]["error"] and Q0 in rows["bad1"]["error"]
    for name in ("bad0", "bad1"):
        assert not (out / name / CONFIG_FILE).exists()
    for name in ("good0", "good1"):
        load_mos(out / name)


def test_compress_refuses_a_non_finite_calibration_file(make, tmp_path):
    w = make.peft(modules={Q0: (32, 32)})
    C = torch.eye(32, dtype=torch.float64)
    C[3, 3] = float("inf")
    stats = save_stats(CalibStats({Q0: C}, tokens=100), tmp_path / "c.safetensors")
    out = tmp_path / "out"
    res = run("compress", w.path, out, "--ratio", "4", "--calib", stats)
    assert_one_line_error(res, stats, "NaN or Inf", f"calib.{Q0}")
    assert not out.exists()


@pytest.fixture(scope="module")
def nan_model(tiny_lm, tmp_path_factory) -> Path:
    """The tiny Llama with an Inf in layer 0's input norm: every activation after it is
    non-finite (what an fp16 model that overflows gives)."""
    folder = shutil.copytree(tiny_lm.model, tmp_path_factory.mktemp("nan") / "model")
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    key = "model.layers.0.input_layernorm.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_calibrate_stops_on_non_finite_model_outputs(tiny_lm, nan_model, tmp_path):
    out = tmp_path / "stats.safetensors"
    res = run("calibrate", tiny_lm.lora, out, "--base-model", nan_model, "--data", tiny_lm.data,
              "--max-tokens", 64, "--seq-len", 32)
    assert_one_line_error(res, nan_model, Q0, "not finite", "batch 1")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compress_calib_from_text_stops_on_non_finite_model_outputs(tiny_lm, nan_model, tmp_path):
    out = tmp_path / "out"
    res = run("compress", tiny_lm.lora, out, "--ratio", "4", "--calib", tiny_lm.data,
              "--base-model", nan_model, "--max-tokens", 64, "--seq-len", 32)
    assert_one_line_error(res, nan_model, Q0, "not finite")
    assert not out.exists()


def test_distill_stops_on_non_finite_model_outputs(tiny_lm, nan_model, tmp_path):
    out = tmp_path / "out"
    res = run("compress", tiny_lm.lora, out, "--ratio", "4", "--distill", "--base-model",
              nan_model, "--data", tiny_lm.data, "--max-tokens", 256, "--seq-len", 32,
              "--steps", 2, "--device", "cpu")
    line = assert_one_line_error(res, nan_model, "distillation stopped", "not finite")
    assert "no adapter was written" in line
    assert not out.exists()


def test_distill_stops_when_training_diverges(tiny_lm, tmp_path):
    """A learning rate so large that the student blows up: the loss turns non-finite."""
    out = tmp_path / "out"
    res = run("compress", tiny_lm.lora, out, "--ratio", "4", "--distill", "--base-model",
              tiny_lm.model, "--data", tiny_lm.data, "--max-tokens", 256, "--seq-len", 32,
              "--steps", 30, "--lr", "1e30", "--device", "cpu")
    assert_one_line_error(res, tiny_lm.model, "distillation stopped", "not finite")
    assert not out.exists()
