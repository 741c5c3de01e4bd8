"""CLI conventions: the weight file instead of its folder just works, a MoS folder given to
compress is named as such, --quiet prints nothing, --json prints JSON, exit codes 0/1/2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from factory import llama_like, write_random_peft

from mosconv.cli.commands import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    folder, _ = write_random_peft(tmp_path_factory.mktemp("polish") / "lora",
                                  llama_like(layers=2, d=16, d_kv=8), r=2, alpha=4)
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_weight_file_instead_of_folder(lora, tmp_path):
    res = invoke("compress", lora / "adapter_model.safetensors", tmp_path / "m", "--ratio", 2, "-q")
    assert res.exit_code == 0 and res.output == ""
    cfg = json.loads((tmp_path / "m" / "mos_config.json").read_text())
    assert cfg["source"]["format"] == "peft" and cfg["source"]["config"]["r"] == 2
    res = invoke("inspect", lora / "adapter_config.json", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["format"] == "peft"


def test_mos_folder_given_to_compress_and_lora_to_export(lora, tmp_path):
    assert invoke("compress", lora, tmp_path / "m", "-q").exit_code == 0
    res = invoke("compress", tmp_path / "m", tmp_path / "again")
    assert res.exit_code == 1 and "is a MoS adapter, not a LoRA" in res.output
    assert "export turns a MoS adapter back" in res.output and not (tmp_path / "again").exists()
    res = invoke("export", lora, tmp_path / "exp")
    assert res.exit_code == 1 and "not a MoS adapter" in res.output


def test_export_json_and_quiet(lora, tmp_path):
    assert invoke("compress", lora, tmp_path / "m", "-q").exit_code == 0
    res = invoke("export", tmp_path / "m", tmp_path / "e1", "--json")
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert info["r"] == info["lora_alpha"]
    res = invoke("export", tmp_path / "m", tmp_path / "e2", "--quiet")
    assert res.exit_code == 0 and res.output == ""


@pytest.mark.parametrize("args", [["compress"], ["compress", "a", "b", "--ratio", "x"],
                                  ["nosuchcommand"], ["inspect", "x", "--nosuchoption"],
                                  ["compress", "a", "b", "--search", "best"]])
def test_usage_errors_exit_2(args):
    res = invoke(*args)
    assert res.exit_code == 2 and "Usage:" in res.output and "Traceback" not in res.output


def test_verbose_logs_the_steps(lora, tmp_path):
    res = CliRunner().invoke(main, ["-v", "compress", str(lora), str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0
    for step in ("mosconv: reading", "mosconv: converting", "mosconv: writing"):
        assert step in res.output
    res = CliRunner().invoke(main, ["compress", str(lora), str(tmp_path / "n"), "-q"])
    assert res.exit_code == 0 and res.output == ""
