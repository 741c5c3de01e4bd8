"""The ``mosconv compress`` / ``inspect`` (MoS folder) / ``export`` commands, through click's
CliRunner: outputs, tables, JSON, refusal to overwrite, determinism, failed runs that leave
no finished-looking folder, and one-line errors without tracebacks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from factory import llama_like, write_random_peft
from helpers import one_thread, safetensors_parts, zoo_path

import mosconv.mos.format
from mosconv.batch.run import BatchConfig
from mosconv.cli.commands import main
from mosconv.errors import ConfigError
from mosconv.fit.convert import ConvertConfig
from mosconv.mos.format import CONFIG_FILE, REPORT_FILE, TENSOR_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A small random PEFT adapter (4 layers x q/v) on which sharing wins at ratio 2."""
    folder, _ = write_random_peft(tmp_path_factory.mktemp("cli") / "lora",
                                  llama_like(layers=4, d=32, d_kv=16), r=4, alpha=8)
    return folder


@pytest.fixture(scope="module")
def compressed(lora, tmp_path_factory):
    """``(out, CliRunner result)`` of ``mosconv compress LORA OUT --ratio 2`` (default search)."""
    out = tmp_path_factory.mktemp("cli_out") / "mos"
    with one_thread():
        res = run("compress", lora, out, "--ratio", "2")
    assert res.exit_code == 0, res.output
    return out, res


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *words, codes=(1,)):
    """Exit code in ``codes``, exactly one ``mosconv: error:`` line naming ``words``, and no
    traceback anywhere."""
    assert res.exit_code in codes, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if 1 in codes and res.exit_code == 1:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mosconv: error:")]
        assert len(errors) == 1, res.stderr
        assert res.stderr.strip().splitlines()[-1] == errors[0]
        for w in words:
            assert w in errors[0], errors[0]
    return res


# ------------------------------------------------------------------ compress


def test_compress_writes_three_files_and_prints_table(lora, compressed):
    out, res = compressed
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, REPORT_FILE, TENSOR_FILE])
    report = json.loads((out / REPORT_FILE).read_text())
    t = report["totals"]
    text = res.stdout
    for header in ("kind", "structure", "rel.err", "trunc.err"):
        assert header in text
    assert f"relative error {t['relative_error']:.4f}" in text
    assert f"truncation at the same budget {t['truncation_relative_error']:.4f}" in text
    for k in report["kinds"]:
        assert k["kind"] in text
        assert f"{k['relative_error']:.4f}" in text
        assert f"{k['truncation_relative_error']:.4f}" in text
    assert f"wrote {out}" in text
    assert t["mos_params"] <= t["lora_params"] / 2
    assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert list(cfg)[:15] == ["format", "format_version", "mosconv_version", "ratio", "seed",
                              "search", "iters", "routing_weights", "lora_params", "budget", "metric",
                              "command",
                              "params", "local_params", "index_bytes"]
    assert cfg["command"].startswith("mosconv")
    assert cfg["ratio"] == 2.0 and cfg["seed"] == 0 and cfg["search"] == "fast"
    assert cfg["source"]["path"] == str(lora)
    assert [f["name"] for f in cfg["source"]["files"]] == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    assert all(len(f["sha256"]) == 64 for f in cfg["source"]["files"])


@pytest.mark.parametrize("storage", [["--quantize", "int4"], ["--dtype", "float16"]])
def test_a_baseline_in_float32_is_labelled_so(lora, tmp_path, storage):
    """Truncation at the same parameters is measured in float32: next to an int4 or float16
    adapter's error it read 'at the same budget' (and int4 is worse than it)."""
    with one_thread():
        res = run("compress", lora, tmp_path / "o", "--ratio", "2", *storage)
    assert res.exit_code == 0, res.output
    t = json.loads((tmp_path / "o" / REPORT_FILE).read_text())["totals"]
    assert (f"truncation at the same params in float32 {t['truncation_relative_error']:.4f}"
            in res.stdout and "same budget" not in res.stdout)
    assert f"truncation stored alike in <= these bytes " \
           f"{t['truncation_equal_bytes_relative_error']:.4f}" in res.stdout
    assert t["relative_error"] <= t["truncation_equal_bytes_relative_error"] + 1e-9


def test_compress_json_prints_the_report(lora, tmp_path):
    res = run("compress", lora, tmp_path / "o", "--ratio", "3", "--search", "truncation", "--json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    t = printed["totals"]
    for key in ("lora_params", "mos_params", "budget", "relative_error",
                "truncation_relative_error", "index_bytes", "mos_file_bytes"):
        assert key in t, key
    assert t["mos_params"] <= t["lora_params"] / 3
    assert printed == json.loads((tmp_path / "o" / REPORT_FILE).read_text())


def test_compress_quiet_prints_nothing(lora, tmp_path):
    res = run("compress", lora, tmp_path / "o", "--search", "truncation", "-q")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    assert (tmp_path / "o" / CONFIG_FILE).is_file()


def test_existing_output_needs_overwrite(lora, tmp_path):
    out = tmp_path / "o"
    assert run("compress", lora, out, "--ratio", "2", "--search", "truncation", "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = run("compress", lora, out, "--ratio", "4", "--search", "truncation", "-q")
    assert_one_line_error(res, str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    res = run("compress", lora, out, "--ratio", "4", "--search", "truncation", "-q", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / CONFIG_FILE).read_text())["ratio"] == 4.0


def test_same_seed_gives_same_tensors(lora, tmp_path):
    for name in ("a", "b"):
        res = run("compress", lora, tmp_path / name, "--ratio", "2", "--seed", "5", "-q")
        assert res.exit_code == 0, res.output
    assert safetensors_parts(tmp_path / "a" / TENSOR_FILE) == \
        safetensors_parts(tmp_path / "b" / TENSOR_FILE)


def test_same_seed_gives_byte_identical_file(lora, tmp_path):
    files = set()
    for i in range(5):  # the bug shows about every other save; five runs catch it reliably
        res = run("compress", lora, tmp_path / f"o{i}", "--ratio", "2", "--seed", "5", "-q")
        assert res.exit_code == 0, res.output
        files.add((tmp_path / f"o{i}" / TENSOR_FILE).read_bytes())
    assert len(files) == 1


# ------------------------------------------------------------------ failed runs


def test_corrupt_input_fails_cleanly(lora, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    res = run("compress", bad, tmp_path / "o", "--search", "truncation")
    assert_one_line_error(res, "adapter_model.safetensors")
    assert not (tmp_path / "o").exists()  # a folder the failed run created is removed


def test_missing_input_fails_cleanly(tmp_path):
    res = run("compress", tmp_path / "nothing", tmp_path / "o")
    assert_one_line_error(res, str(tmp_path / "nothing"))
    assert not (tmp_path / "o" / CONFIG_FILE).exists()


def _fail_on(monkeypatch, name):
    real = getattr(mosconv.mos.format, name)

    def failing(path, data):
        if path.name == failing.target:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(mosconv.mos.format, name, failing)
    return failing


@pytest.mark.parametrize("fn, target", [("atomic_write_bytes", TENSOR_FILE),
                                        ("atomic_write_json", REPORT_FILE),
                                        ("atomic_write_json", CONFIG_FILE)])
@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "existing-folder"])
def test_failed_save_leaves_no_config(lora, tmp_path, monkeypatch, fn, target, existed):
    out = tmp_path / "o"
    if existed:
        out.mkdir()
        (out / "keep.txt").write_text("not ours")
    _fail_on(monkeypatch, fn).target = target
    res = run("compress", lora, out, "--search", "truncation")
    assert_one_line_error(res, "No space left on device")
    assert not (out / CONFIG_FILE).exists()
    if existed:  # a folder that was there before stays, with what it held
        assert (out / "keep.txt").read_text() == "not ours"
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    else:
        assert not out.exists()


def test_failed_overwrite_does_not_leave_old_output_looking_complete(lora, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert run("compress", lora, out, "--search", "truncation", "-q").exit_code == 0
    _fail_on(monkeypatch, "atomic_write_bytes").target = TENSOR_FILE
    res = run("compress", lora, out, "--search", "truncation", "--overwrite")
    assert_one_line_error(res, "No space left on device")
    assert not (out / CONFIG_FILE).exists()


@pytest.mark.parametrize("option", ["--ratio", "--size-ratio"])
@pytest.mark.parametrize("ratio", ["0.5", "0", "-1", "nan", "inf"])
def test_bad_ratio_is_a_usage_error(lora, tmp_path, ratio, option):
    res = run("compress", lora, tmp_path / "o", option, ratio)
    assert_one_line_error(res, codes=(2,))
    assert f"Invalid value for '{option}': must be a finite number >= 1" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_is_a_usage_error(lora, tmp_path, seed):
    for command in ("compress", "batch"):
        res = run(command, lora, tmp_path / "o", "--seed", seed)
        assert_one_line_error(res, codes=(2,))
        assert "Invalid value for '--seed'" in res.output and "0<=x<=4294967295" in res.output
        assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="seed must be an integer in 0 .. 2..32 - 1"):
        ConvertConfig(seed=int(seed)).validate()
    with pytest.raises(ConfigError, match="seed must be an integer"):
        BatchConfig(seed=int(seed)).validate()
    assert run("compress", lora, tmp_path / "o", "--seed", str(2**32 - 1), "-q").exit_code == 0


def test_non_numeric_ratio_is_usage_error(lora, tmp_path):
    res = run("compress", lora, tmp_path / "o", "--ratio", "eight")
    assert_one_line_error(res, codes=(2,))
    assert "ratio" in res.output


# ------------------------------------------------------------------ inspect on a MoS folder


def test_inspect_mos_folder(compressed):
    out, _ = compressed
    res = run("inspect", out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / CONFIG_FILE).read_text())
    report = json.loads((out / REPORT_FILE).read_text())
    assert "MoS adapter" in res.stdout and "format v3" in res.stdout
    assert f"{cfg['params']:,}" in res.stdout
    assert f"relative error {report['totals']['relative_error']:.4f}" in res.stdout


def test_inspect_mos_folder_json(compressed):
    out, _ = compressed
    res = run("inspect", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert info["type"] == "mos"
    assert info["format_version"] == 3
    assert info["params"] == info["local_params"] == cfg["params"]
    assert [k["own_params"] for k in info["kinds"]] == [
        k["params"] for k in info["report"]["kinds"]]
    assert info["index_bytes"] == cfg["index_bytes"]
    assert info["num_modules"] == len(cfg["modules"]) == 8
    assert info["num_kinds"] == len(info["kinds"]) == 2
    assert info["report"] == json.loads((out / REPORT_FILE).read_text())
    # the config file itself names the folder too
    res = run("inspect", out / CONFIG_FILE, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["params"] == cfg["params"]


def test_inspect_incomplete_mos_folder_is_an_error(compressed, tmp_path):
    out, _ = compressed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((out / CONFIG_FILE).read_text())  # no tensor file
    res = run("inspect", broken)
    assert_one_line_error(res, TENSOR_FILE)


# ------------------------------------------------------------------ export


def test_export_command(compressed, tmp_path):
    out, _ = compressed
    exp = tmp_path / "exp"
    res = run("export", out, exp)
    assert res.exit_code == 0, res.output
    assert f"wrote {exp}" in res.stdout
    assert (exp / "adapter_config.json").is_file() and (exp / "adapter_model.safetensors").is_file()
    cfg = json.loads((exp / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"]
    before = (exp / "adapter_model.safetensors").read_bytes()

    res = run("export", out, exp)
    assert_one_line_error(res, str(exp), "--overwrite")
    assert (exp / "adapter_model.safetensors").read_bytes() == before

    res = run("export", out, exp, "--overwrite")
    assert res.exit_code == 0, res.output
    # the exported folder is a LoRA mosconv reads again
    res = run("inspect", exp, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_modules"] == 8


def test_export_of_non_mos_folder_is_an_error(lora, tmp_path):
    res = run("export", lora, tmp_path / "exp")
    assert_one_line_error(res, str(lora))
    assert not (tmp_path / "exp" / "adapter_config.json").exists()


def test_export_refuses_diffusers_legacy_source(tmp_path):
    src = zoo_path("sd15-diffusers-attnproc-r4")
    res = run("compress", src, tmp_path / "mos", "--ratio", "8", "--search", "truncation", "-q")
    assert res.exit_code == 0, res.output
    res = run("export", tmp_path / "mos", tmp_path / "exp")
    assert_one_line_error(res, "diffusers-legacy")
    assert not (tmp_path / "exp" / "adapter_config.json").exists()


def test_only_our_own_temporary_files_are_cleaned(lora, tmp_path):
    """A killed run's temporary files go; a user's ``.notes.tmp`` (file or folder) stays."""
    out = tmp_path / "o"
    out.mkdir()
    (out / ".notes.tmp").write_text("precious")
    (out / ".cache.tmp").mkdir()
    (out / f".{CONFIG_FILE}.x1y2z3.tmp").write_text("{")  # ours, from a killed run
    res = run("compress", lora, out, "--search", "truncation", "-q")
    assert res.exit_code == 0, res.output
    assert (out / ".notes.tmp").read_text() == "precious" and (out / ".cache.tmp").is_dir()
    assert not (out / f".{CONFIG_FILE}.x1y2z3.tmp").exists()


def test_float16_overflow_names_the_file_and_the_fix(tmp_path):
    """A float16 source whose update float16 cannot hold once converted: the error said
    only "values too large for float16"."""
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "d"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{p}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32, generator=g).sign().half() * 6e4
            tensors[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=g).sign().half() * 6e4
    save_file(tensors, src / "adapter_model.safetensors")
    res = run("compress", src, tmp_path / "o")
    assert_one_line_error(res, f"{src}: values too large for float16", "(use --dtype)")
    assert not (tmp_path / "o").exists()
    assert run("compress", src, tmp_path / "o", "--dtype", "float32", "-q").exit_code == 0


def test_recorded_command_leaves_out_what_changes_no_output_byte():
    """What is printed or drawn (--plot and its file) and --overwrite are not recorded, so a
    conversion with or without them writes the same mos_config.json."""
    from mosconv.cli.commands import recorded_command

    argv = ["compress", "lora", "out", "--ratio", "8", "--plot", "e.png", "-q", "--json",
            "--plot=f.png", "--overwrite", "--seed", "1"]
    assert recorded_command(argv) == "mosconv compress lora out --ratio 8 --seed 1"
