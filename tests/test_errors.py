"""One test per documented error, through the CLI: ``mosconv inspect`` on a bad input exits 1
with ONE line ``mosconv: error: <file>: <problem>`` on stderr and no traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA_MODULES, PEFT_PREFIX
from helpers import assert_one_line_error
from safetensors.torch import load_file, save_file

from mosconv.cli.commands import main
from mosconv.errors import ConfigError, FormatError, MosconvError, UnsupportedAdapterError
from mosconv.lora.read import read_adapter

Q0 = "model.layers.0.self_attn.q_proj"

pytestmark = pytest.mark.usefixtures("single_thread")


def run_inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def assert_raises_format_error(path: Path, cls=FormatError) -> FormatError:
    """The library raises the documented class (FormatError: a ValueError and a MosconvError)."""
    with pytest.raises(cls) as info:
        read_adapter(path)
    assert isinstance(info.value, (MosconvError, ValueError))
    return info.value


# --------------------------------------------------------------------------- paths and formats


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-adapter"
    assert_one_line_error(run_inspect(missing), missing, "no such file or folder")
    assert_raises_format_error(missing)


def test_unknown_format_folder_with_a_txt(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.txt").write_text("not an adapter")
    assert_one_line_error(run_inspect(d), d, "unknown adapter format")
    assert_raises_format_error(d)


def test_unknown_format_file_suffix(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    assert_one_line_error(run_inspect(f), f, "unknown adapter format")


def test_unknown_format_safetensors_with_unrelated_keys(make):
    w = make.raw_file(
        "model.safetensors", {"encoder.weight": torch.ones(4, 4), "encoder.bias": torch.ones(4)}
    )
    assert_one_line_error(run_inspect(w.path), w.path, "unknown adapter format")
    assert_raises_format_error(w.path)


def test_several_weight_files_and_no_config(make):
    a = make.diffusers({"unet.x.to_q": (8, 8)}, filename="a.safetensors")
    make.write_tensors(a.path.parent / "b.safetensors", dict(a.tensors))
    assert_one_line_error(run_inspect(a.path.parent), a.path.parent, "several weight files")


def test_peft_config_but_no_weights(tmp_path):
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert_one_line_error(run_inspect(d), d, "no adapter_model.safetensors")


# --------------------------------------------------------------------------- corrupt files


def test_truncated_safetensors(make):
    w = make.peft()
    data = w.weights.read_bytes()
    w.weights.write_bytes(data[: len(data) // 2])
    line = assert_one_line_error(run_inspect(w.path), w.weights, "truncated")
    assert "corrupt or truncated safetensors" in line
    assert_raises_format_error(w.path)


def test_truncated_real_zoo_safetensors(tmp_path):
    """Half of a real third-party file (written to tmp_path, never into the repo)."""
    from conftest import zoo_weight_file

    src = zoo_weight_file("opt-125m-lora-ckpts/final")
    f = tmp_path / "half.safetensors"
    data = src.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_inspect(f), f, "truncated")


def test_safetensors_shorter_than_its_header(make):
    w = make.peft()
    w.weights.write_bytes(b"\x01\x02\x03")
    assert_one_line_error(run_inspect(w.path), w.weights, "not a safetensors file")


def test_corrupt_header_garbage_bytes(make):
    w = make.peft()
    w.weights.write_bytes(bytes(range(256)) * 64)  # header length decodes to ~5e17
    assert_one_line_error(run_inspect(w.path), w.weights, "corrupt safetensors header")
    assert_raises_format_error(w.path)


def test_corrupt_header_not_json(make):
    w = make.peft()
    junk = b"{not json at all\xff\xfe" + b" " * 40
    w.weights.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    assert_one_line_error(run_inspect(w.path), w.weights, "corrupt safetensors header", "JSON")


def test_corrupt_header_metadata_not_an_object(make):
    w = make.peft()
    header = json.dumps({"__metadata__": ["x"]}).encode()
    w.weights.write_bytes(struct.pack("<Q", len(header)) + header)
    assert_one_line_error(run_inspect(w.path), w.weights, "__metadata__")


def test_corrupt_bin_checkpoint(make):
    w = make.peft(weights="bin")
    data = w.weights.read_bytes()
    w.weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_inspect(w.path), w.weights, "corrupt or truncated checkpoint")


def test_bin_whose_tensor_data_was_altered_fails_its_crc(make):
    """torch.load does not check the CRCs torch.save writes: altered values were read."""
    import zipfile

    w = make.peft(weights="bin")
    data = bytearray(w.weights.read_bytes())
    with zipfile.ZipFile(w.weights) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 8)
    n, extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + n + extra  # the entry's data, past its local header
    data[start:start + 4] = bytes(b ^ 0xFF for b in data[start:start + 4])
    w.weights.write_bytes(bytes(data))
    assert_one_line_error(run_inspect(w.path), w.weights, "does not match its CRC")


class _Payload:
    """Unpickling this opens (creates) a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_weights_only_refuses_is_never_executed(make, tmp_path):
    marker = tmp_path / "pickle-was-executed"
    w = make.peft(weights="bin")
    state = dict(w.tensors)
    state["base_model.model.payload"] = _Payload(marker)
    torch.save(state, w.weights)
    line = assert_one_line_error(run_inspect(w.path), w.weights, "refused to load",
                                 "objects other than tensors", "never unpickles code")
    assert not marker.exists()
    assert "Unsupported global" in line  # the reason, not torch's advice to disable the check
    assert "`weights_only` set" not in line and "Re-running" not in line
    err = assert_raises_format_error(w.path)
    assert "Unsupported global" in str(err) and "\x1b" not in str(err)
    assert not marker.exists()


def test_bin_that_is_not_a_flat_state_dict(make):
    w = make.peft(weights="bin")
    torch.save({"state_dict": dict(w.tensors)}, w.weights)
    assert_one_line_error(run_inspect(w.path), w.weights, "not a state dict of named tensors")


# --------------------------------------------------------------------------- configs


def test_config_not_json(make):
    w = make.peft()
    cfg = w.path / "adapter_config.json"
    cfg.write_text("{'r': 8,")
    assert_one_line_error(run_inspect(w.path), cfg, "not valid JSON")


def test_config_not_an_object(make):
    w = make.peft()
    cfg = w.path / "adapter_config.json"
    cfg.write_text("[1, 2]")
    assert_one_line_error(run_inspect(w.path), cfg, "not a JSON object")


@pytest.mark.parametrize("field,value", [("lora_alpha", "sixteen"), ("r", 4.5)])
def test_config_field_not_a_number(make, field, value):
    w = make.peft(config={field: value})
    assert_one_line_error(
        run_inspect(w.path), w.path / "adapter_config.json", field, "must be a number"
    )


def test_config_rank_pattern_not_an_object(make):
    w = make.peft(config={"rank_pattern": ["q_proj", 2]})
    assert_one_line_error(
        run_inspect(w.path), w.path / "adapter_config.json", "rank_pattern", "must be an object"
    )


# --------------------------------------------------------------------------- refused adapters


def test_dora_refused_by_config(make):
    w = make.peft(dora=True, use_dora=True)
    line = assert_one_line_error(
        run_inspect(w.path), w.path / "adapter_config.json", "DoRA", "not supported"
    )
    assert "use_dora" in line
    assert_raises_format_error(w.path, UnsupportedAdapterError)


def test_dora_refused_by_magnitude_tensor(make):
    """A DoRA file whose config does not say so is still refused, by its tensors."""
    w = make.peft(dora=True)
    assert w.config["use_dora"] is False
    line = assert_one_line_error(run_inspect(w.path), w.weights, "DoRA", "not supported")
    assert "lora_magnitude_vector" in line


def test_lora_bias_refused_by_config_and_by_tensor(make):
    """PEFT's lora_bias adds lora_B.bias to each module: not B @ A alone (it used to be
    dropped without a word, the bias read as an adapter name)."""
    w = make.peft(config={"lora_bias": True})
    assert_one_line_error(run_inspect(w.path), w.path / "adapter_config.json", "lora_bias=true",
                          "not supported")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    w = make.peft(extra={key: (8,)}, name="bias")
    line = assert_one_line_error(run_inspect(w.path), w.weights, "lora_bias", "not supported")
    assert key in line


def test_diffusers_dora_and_lora_bias_refused_by_tensor_and_metadata(make):
    mods = {"unet.down.attn1.to_q": (8, 8)}
    for extra, what in (({"unet.down.attn1.to_q.lora_magnitude_vector": (8,)}, "DoRA"),
                        ({"unet.down.attn1.to_q.lora_B.bias": (8,)}, "lora_bias")):
        w = make.diffusers(mods, extra=extra, filename=f"{what}.safetensors")
        assert_one_line_error(run_inspect(w.path), w.path, what, "not supported")
    w = make.diffusers(mods, filename="meta.safetensors")
    tensors = load_file(w.path)
    save_file(tensors, w.path, metadata={"lora_adapter_metadata": json.dumps(
        {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})})
    assert_one_line_error(run_inspect(w.path), w.path, "unet.use_dora=true", "not supported")


def test_non_lora_peft_type_refused(make):
    w = make.peft(config={"peft_type": "LOHA"})
    assert_one_line_error(run_inspect(w.path), w.path / "adapter_config.json", "LOHA", "not LORA")


def test_base_modifying_init_refused(make):
    w = make.peft(config={"init_lora_weights": "pissa_niter_4"})
    assert_one_line_error(
        run_inspect(w.path), w.path / "adapter_config.json", "pissa", "base weights"
    )


@pytest.mark.parametrize("init, hint", [
    ("astra", "path_initial_model_for_weight_conversion"), ("lora_ga", "not supported"),
    ("loftq", "not supported")])
def test_more_base_modifying_inits_refused(make, init, hint):
    w = make.peft(config={"init_lora_weights": init})
    line = assert_one_line_error(run_inspect(w.path), w.path / "adapter_config.json", init,
                                 "base weights")
    assert hint in line


def test_eva_initialisation_is_read(make):
    """EVA only sets lora_A (and the ranks): the base is untouched, the update is B @ A."""
    w = make.peft(config={"init_lora_weights": "eva"})
    assert run_inspect(w.path).exit_code == 0


@pytest.mark.parametrize("field, value, what", [
    ("kasa_config", {"sv_init": "random"}, "KaSA"), ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}, "BD-LoRA"),
    ("use_qalora", True, "QA-LoRA"), ("alora_invocation_tokens", [1, 2], "aLoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow")])
def test_peft_variants_that_are_not_b_at_a_refused(make, field, value, what):
    w = make.peft(config={field: value})
    line = assert_one_line_error(run_inspect(w.path), w.path / "adapter_config.json", field,
                                 what)
    assert "not supported" in line
    tensors = {"unet.blk.to_q.lora_A.weight": torch.ones(2, 8),
               "unet.blk.to_q.lora_B.weight": torch.ones(8, 2)}
    hdr = make.raw_file("lora.safetensors", tensors,
                        {"lora_adapter_metadata": json.dumps({f"unet.{field}": value})})
    assert_one_line_error(run_inspect(hdr.path), hdr.path, field, "not supported")


def test_per_expert_target_parameters_refused(make):
    """peft's target_parameters on a 3-D (experts, ., .) parameter stores E updates of rank r
    stacked: named as such, not as a rank that disagrees with the config."""
    w = make.peft(r=8, config={"r": 2, "target_parameters": ["experts.gate_up_proj"]})
    line = assert_one_line_error(run_inspect(w.path), w.weights, "4 updates of rank 2",
                                 "per expert")
    assert "not supported" in line
    plain = make.peft(r=8, config={"r": 2})  # without target_parameters: a wrong r
    assert_one_line_error(run_inspect(plain.path), plain.weights, "rank 8", "r=2")


def test_a_hub_id_is_told_to_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(run_inspect("someuser/some-lora"), "someuser/some-lora",
                                 "no such file or folder", "local files only")
    assert "hf download someuser/some-lora --local-dir some-lora" in line
    (tmp_path / "someuser").mkdir()  # an existing folder: a local path after all
    assert "hf download" not in assert_one_line_error(
        run_inspect("someuser/some-lora"), "someuser/some-lora", "no such file or folder")


def test_lycoris_tensors_refused(make):
    """LoHa/LoKr are read (tests/test_lycoris.py); an incomplete LoHa module is a format
    error naming the missing factor, and a Tucker LoHa is refused as LyCORIS."""
    tensors = {
        "lora_unet_x_to_q.lora_down.weight": torch.ones(2, 8),
        "lora_unet_x_to_q.lora_up.weight": torch.ones(8, 2),
        "lora_unet_y_to_q.hada_w1_a": torch.ones(8, 2),
    }
    w = make.raw_file("loha.safetensors", tensors)
    line = assert_one_line_error(run_inspect(w.path), w.path, "LoHa", "lora_unet_y_to_q")
    assert "hada_w1_b" in line
    assert not isinstance(assert_raises_format_error(w.path), UnsupportedAdapterError)
    tensors["lora_unet_y_to_q.hada_t1"] = torch.ones(2, 2, 3, 3)
    w = make.raw_file("tucker.safetensors", tensors)
    line = assert_one_line_error(run_inspect(w.path), w.path, "LyCORIS", "Tucker", "not supported")
    assert "hada_t1" in line
    assert_raises_format_error(w.path, UnsupportedAdapterError)


# --------------------------------------------------------------------------- invalid tensors


def test_mismatched_a_b_shapes(make):
    w = make.peft()
    t = dict(w.tensors)
    t[f"{PEFT_PREFIX}{Q0}.lora_B.weight"] = torch.ones(24, 3)  # A has 4 rows
    make.write_tensors(w.weights, t)
    line = assert_one_line_error(run_inspect(w.path), w.weights, "mismatched shapes", Q0)
    assert "(4, 16)" in line and "(24, 3)" in line
    assert_raises_format_error(w.path)


def test_factor_not_a_matrix(make):
    w = make.peft()
    t = dict(w.tensors)
    t[f"{PEFT_PREFIX}{Q0}.lora_A.weight"] = torch.ones(4, 16, 2)
    make.write_tensors(w.weights, t)
    assert_one_line_error(run_inspect(w.path), w.weights, "expected 2-D matrices", Q0)


def test_factor_a_scalar(make):
    w = make.peft()
    t = dict(w.tensors)
    t[f"{PEFT_PREFIX}{Q0}.lora_A.weight"] = torch.tensor(1.0)
    make.write_tensors(w.weights, t)
    assert_one_line_error(run_inspect(w.path), w.weights, "expected 2-D matrices", Q0)


def test_kohya_conv_up_not_1x1(make):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    w = make.raw_file(
        "locon.safetensors",
        {
            f"{conv}.lora_down.weight": torch.ones(4, 6, 3, 3),
            f"{conv}.lora_up.weight": torch.ones(12, 4, 3, 3),
        },
    )
    assert_one_line_error(run_inspect(w.path), w.path, "expected (out, r, 1, 1)", conv)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_non_finite_values(make, bad, factor):
    w = make.peft()
    t = dict(w.tensors)
    key = f"{PEFT_PREFIX}{Q0}.{factor}.weight"
    t[key] = t[key].clone()
    t[key][1, 2] = bad
    make.write_tensors(w.weights, t)
    assert_one_line_error(run_inspect(w.path), w.weights, "NaN or Inf", Q0)
    assert_raises_format_error(w.path)


def test_non_finite_values_single_file(make):
    w = make.kohya({"lora_unet_x_to_q": (8, 8)})
    t = dict(w.tensors)
    t["lora_unet_x_to_q.lora_up.weight"] = torch.full((8, 4), float("nan"))
    make.write_tensors(w.path, t)
    assert_one_line_error(run_inspect(w.path), w.path, "NaN or Inf", "lora_unet_x_to_q")


def test_integer_factor(make):
    w = make.peft()
    t = dict(w.tensors)
    t[f"{PEFT_PREFIX}{Q0}.lora_A.weight"] = torch.ones(4, 16, dtype=torch.int32)
    make.write_tensors(w.weights, t)
    assert_one_line_error(run_inspect(w.path), w.weights, "non-float dtype", Q0)


def test_rank_zero(make):
    w = make.peft(ranks={Q0: 0})
    assert_one_line_error(run_inspect(w.path), w.weights, "rank 0", Q0)


def test_rank_zero_kohya(make):
    w = make.raw_file(
        "lora.safetensors",
        {
            "lora_unet_x_to_q.lora_down.weight": torch.ones(0, 8),
            "lora_unet_x_to_q.lora_up.weight": torch.ones(8, 0),
        },
    )
    assert_one_line_error(run_inspect(w.path), w.path, "empty factor", "lora_unet_x_to_q")


def test_empty_adapter(make):
    """A config and a safetensors file with no LoRA tensors at all (only modules_to_save)."""
    w = make.raw_peft(
        {"base_model.model.classifier.weight": torch.ones(2, 16)},
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
    )
    assert_one_line_error(run_inspect(w.path), w.weights, "empty adapter")
    assert_raises_format_error(w.path)


def test_unpaired_diffusers_a(make):
    w = make.raw_file(
        "pytorch_lora_weights.safetensors",
        {"unet.x.alpha": torch.tensor(4.0), "unet.x.lora_A.weight": torch.ones(2, 2)},
    )
    # an A without B is not "empty": it is unpaired
    assert_one_line_error(run_inspect(w.path), w.path, "no up/B tensor", "unet.x")


@pytest.mark.parametrize("drop,missing", [("lora_B", "up/B"), ("lora_A", "down/A")])
def test_unpaired_factor(make, drop, missing):
    w = make.peft()
    t = {k: v for k, v in w.tensors.items() if k != f"{PEFT_PREFIX}{Q0}.{drop}.weight"}
    make.write_tensors(w.weights, t)
    assert_one_line_error(run_inspect(w.path), w.weights, f"has no {missing} tensor", Q0)
    assert_raises_format_error(w.path)


def test_unpaired_kohya_down(make):
    w = make.kohya({"lora_unet_x_to_q": (8, 8), "lora_unet_y_to_k": (8, 8)})
    t = {k: v for k, v in w.tensors.items() if k != "lora_unet_y_to_k.lora_up.weight"}
    make.write_tensors(w.path, t)
    assert_one_line_error(run_inspect(w.path), w.path, "has no up/B tensor", "lora_unet_y_to_k")


# --------------------------------------------------------------------------- usage


def test_unknown_option_is_a_usage_error(make):
    w = make.peft()
    result = CliRunner().invoke(main, ["inspect", str(w.path), "--no-such-option"])
    assert result.exit_code == 2
    assert "no such option" in result.output.lower()
    assert "Traceback" not in result.output


def test_missing_argument_is_a_usage_error():
    result = CliRunner().invoke(main, ["inspect"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_error_classes():
    assert issubclass(FormatError, ValueError) and issubclass(FormatError, MosconvError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, MosconvError)
    assert issubclass(UnsupportedAdapterError, FormatError)
    assert not issubclass(MosconvError, ValueError)


def test_valid_adapter_is_not_an_error(make):
    """The baseline for every test above: the unmodified factory adapter inspects fine."""
    w = make.peft()
    result = run_inspect(w.path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"{len(LLAMA_MODULES)} in 2 kinds" in result.stdout


def test_an_unreadable_input_is_the_library_s_one_line_error(make, monkeypatch):
    """click does not judge readability (its check gave a 4-line usage error, exit 2, for an
    unreadable folder): the reader's own error names the file, exit 1."""
    import os

    w = make.peft()
    monkeypatch.setattr(os, "access", lambda *a, **kw: False)
    assert run_inspect(w.path).exit_code == 0  # nothing asks os.access any more
