"""CLI conventions: the weight file instead of its folder just works, a MoS folder given to
compress is named as such, --quiet prints nothing, --json prints JSON, exit codes 0/1/2."""

from __future__ import annotations

import json
import shutil
import sys

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


def test_outputs_never_go_where_the_input_or_another_adapter_is(lora, tmp_path):
    src = tmp_path / "lora"
    shutil.copytree(lora, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out in (src, tmp_path):  # the input's folder, a folder holding it
        res = invoke("compress", src, out, "--overwrite")
        assert res.exit_code == 1 and "holds the input adapter" in res.stderr
    assert invoke("compress", src, tmp_path / "m", "-q").exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(lora, other)
    res = invoke("compress", src, other, "--overwrite")  # another LoRA: never mixed in
    assert res.exit_code == 1 and "holds another adapter (adapter_config.json)" in res.stderr
    assert sorted(p.name for p in other.iterdir()) == sorted(before)
    res = invoke("export", tmp_path / "m", tmp_path / "m", "--overwrite")
    assert res.exit_code == 1 and "holds the input adapter" in res.stderr
    assert invoke("compress", src, tmp_path / "m2", "-q").exit_code == 0
    res = invoke("export", tmp_path / "m", tmp_path / "m2", "--overwrite")  # a MoS adapter
    assert res.exit_code == 1 and "holds another adapter (mos_config.json)" in res.stderr
    assert not (tmp_path / "m2" / "adapter_config.json").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # unrelated files are kept: a MoS output may go to a folder that holds some
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine\n")
    assert invoke("compress", src, tmp_path / "notes", "-q").exit_code == 0
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine\n"


def test_a_failed_run_takes_back_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    res = invoke("compress", tmp_path / "missing", out)
    assert res.exit_code == 1 and not (tmp_path / "a").exists()
    (tmp_path / "keep").mkdir()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    res = invoke("compress", bad, tmp_path / "keep" / "x" / "out")
    assert res.exit_code == 1 and sorted(tmp_path.iterdir()) == [bad, tmp_path / "keep"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_the_recorded_command_leaves_out_what_only_changes_the_screen(lora, tmp_path,
                                                                     monkeypatch):
    outs = []
    for extra in ([], ["-q", "--overwrite"], ["--json"]):
        out = tmp_path / "m"
        monkeypatch.setattr(sys, "argv", ["mosconv", "compress", str(lora), str(out), *extra])
        assert invoke("compress", lora, out, *extra).exit_code == 0
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
        shutil.rmtree(out)
    assert outs[0] == outs[1] == outs[2]
    cfg = json.loads(outs[1]["mos_config.json"])
    assert cfg["command"] == f"mosconv compress {lora} {tmp_path / 'm'}"


def test_an_empty_budget_warns(lora, tmp_path):
    res = invoke("compress", lora, tmp_path / "m", "--ratio", "1e9", "-q")
    assert res.exit_code == 0 and res.stdout == ""
    assert res.stderr == (f"mosconv: warning: a budget of 0 parameters holds nothing: "
                          f"{tmp_path / 'm'} is an all-zero adapter (error 1.0); lower the "
                          "ratio\n")
    assert invoke("compress", lora, tmp_path / "n", "-q").stderr == ""
    # an untrained adapter (B = 0) is all zeros to begin with: nothing to warn about
    zero, _ = write_random_peft(tmp_path / "zero", llama_like(layers=1, d=16, d_kv=8), r=2,
                                b_std=0.0)
    res = invoke("compress", zero, tmp_path / "z", "--ratio", "8", "-q")
    assert res.exit_code == 0 and res.stderr == ""


def test_internal_error_hint_names_the_global_option(lora, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("mosconv.pipeline.convert", boom)
    res = invoke("compress", lora, tmp_path / "m")
    assert res.exit_code == 1
    assert res.stderr == ("mosconv: error: internal error: RuntimeError: a bug (rerun as "
                          "mosconv -v COMMAND ... for the traceback)\n")
    res = CliRunner().invoke(main, ["-v", "compress", str(lora), str(tmp_path / "m")])
    assert "Traceback" in res.output and "rerun as" not in res.output


def test_refit_without_shared_pool_is_a_usage_error(lora, tmp_path):
    res = invoke("batch", lora, tmp_path / "o", "--refit")
    assert res.exit_code == 2 and "--refit is used with --shared-pool" in res.output
    assert not (tmp_path / "o").exists()


def test_inspect_says_which_alpha_a_config_without_one_gets(tmp_path):
    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=1, d=16, d_kv=8), r=2,
                                  alpha=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    res = invoke("inspect", folder)
    assert res.exit_code == 0
    assert "alpha - (PEFT's default 8), scales [4.0]" in res.output


@pytest.mark.parametrize("args", [["--steps", "5"], ["--lr", "0.1"], ["--base-model", "m"],
                                  ["--device", "cpu"], ["--max-tokens", "64"]])
def test_model_options_without_their_mode_are_usage_errors(lora, tmp_path, args):
    res = invoke("compress", lora, tmp_path / "m", *args)
    assert res.exit_code == 2 and f"{args[0]} is used with --distill" in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args", [["--held-out", "0"], ["--held-out", "1"], ["--lr", "-1"],
                                  ["--hidden-weight", "-1"]])
def test_bad_distillation_values_are_usage_errors(lora, tmp_path, args):
    res = invoke("compress", lora, tmp_path / "m", "--distill", *args)
    assert res.exit_code == 2 and f"Invalid value for '{args[0]}'" in res.output


def test_a_peft_adapter_saved_under_its_name_is_pointed_to(lora, tmp_path):
    shutil.copytree(lora, tmp_path / "saved" / "myadapter")
    res = invoke("inspect", tmp_path / "saved")
    assert res.exit_code == 1
    assert f"the adapter in {tmp_path / 'saved' / 'myadapter'}? (PEFT saves" in res.stderr


def test_the_fitting_bar_knows_its_total(monkeypatch):
    """``compress`` tells its bar how many kinds (or storages) there are once it has read the
    adapter: the bar shows 2/3, not a bare count."""
    import io

    from mosconv.cli.options import Bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    with Bars(False) as bars:
        size, tick = bars.sizer("fitting kinds", "kind"), bars.counter("fitting kinds", "kind")
        size(3)
        tick()
        tick()
        bar = bars.bars["fitting kinds"]
        assert (bar.total, bar.n) == (3, 2)
    with Bars(True) as quiet:
        assert quiet.sizer("fitting kinds", "kind") is None


@pytest.mark.parametrize("sized", [False, True])
def test_compress_announces_as_many_steps_as_it_makes(tmp_path, sized):
    from factory import llama_like, write_random_peft

    from mosconv.fit.convert import ConvertConfig
    from mosconv.pipeline import compress

    lora, _ = write_random_peft(tmp_path / "lora", llama_like(2, 32, 16), r=4, seed=0)
    totals, steps = [], []
    config = ConvertConfig(size_ratio=8, quantize="auto") if sized else ConvertConfig()
    compress(lora, tmp_path / "out", config, progress=steps.append,
             progress_total=totals.append)
    assert totals == [len(steps)] and steps
