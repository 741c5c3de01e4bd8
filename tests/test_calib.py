"""Calibration statistics on a tiny real causal LM: values against an independent
computation, shared inputs, the file round trip, reuse without the model, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factory import write_random_peft

import mosconv
from mosconv import ConfigError, FormatError
from mosconv.fileio import safetensors_bytes
from mosconv.model.calib import CalibStats, collect_moments, is_stats_file, load_stats, save_stats
from mosconv.model.data import read_texts, token_blocks
from mosconv.model.hf import load_base_model
from mosconv.model.runtime import find_layers
from mosconv.pipeline import DataSpec, calibrate

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    model, tok = load_base_model(tiny_lm.model)
    blocks = token_blocks(tok, read_texts(tiny_lm.data), 32, 32 * 6)
    return model, tok, blocks, mosconv.read_adapter(tiny_lm.lora)


def test_moments_match_an_independent_computation(lm):
    model, _, blocks, adapter = lm
    layers = find_layers(model, adapter)
    stats = collect_moments(model, layers, blocks, batch_size=4)  # 2 batches: 4 + 2 blocks
    seen = {n: [] for n in layers}
    hooks = [layer.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0]))
             for n, layer in layers.items()]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in hooks:
        h.remove()
    assert stats.tokens == blocks.numel()
    for name, xs in seen.items():
        X = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
        ref = X.T @ X / X.shape[0]
        C = stats.moments[name]
        assert C.dtype == torch.float64 and C.shape == (32, 32)
        assert torch.allclose(C, ref, rtol=1e-4, atol=1e-6), name
    q = stats.moments["model.layers.0.self_attn.q_proj"]
    v = stats.moments["model.layers.0.self_attn.v_proj"]
    assert torch.equal(q, v)  # same input tensor: one product, the same statistic


class _ReusedStorage(torch.nn.Module):
    """Two linears whose inputs are different tensors on the same memory, each fresh (version 0)
    and of the same shape: what the allocator does when it frees one module's input and hands
    its address to the next module's input. Made deterministic here with one numpy buffer that
    both inputs are built on (``torch.from_numpy`` gives a new tensor, version 0, same address)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.buf: np.ndarray | None = None

    def forward(self, input_ids):
        x = torch.sin(input_ids.double().unsqueeze(-1) * torch.arange(1, 9)).float()
        if self.buf is None or self.buf.shape != tuple(x.shape):
            self.buf = np.zeros(tuple(x.shape), dtype=np.float32)
        self.buf[...] = x.numpy()
        y = self.a(torch.from_numpy(self.buf))
        self.buf[...] = torch.tanh(3 * y).numpy()  # a's input is dead; b's lands on its memory
        return self.b(torch.from_numpy(self.buf))


def test_moments_do_not_collide_when_memory_is_reused():
    torch.manual_seed(0)
    model = _ReusedStorage().eval()
    blocks = torch.arange(40).reshape(5, 8) % 7
    stats = collect_moments(model, {"a": model.a, "b": model.b}, blocks, batch_size=2)
    seen = {"a": [], "b": []}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].detach().clone()))
        for n, layer in (("a", model.a), ("b", model.b))]
    with torch.no_grad():
        for start in range(0, 5, 2):
            model(blocks[start:start + 2])
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        X = torch.cat(xs).reshape(-1, 8).double()
        ref = X.T @ X / X.shape[0]
        assert torch.allclose(stats.moments[name], ref, rtol=1e-10, atol=1e-12), name
    assert not torch.allclose(stats.moments["a"], stats.moments["b"], rtol=1e-2)


def test_stats_file_round_trip_and_determinism(lm, tmp_path):
    model, _, blocks, adapter = lm
    stats = collect_moments(model, find_layers(model, adapter), blocks, info={"data": "x"})
    a, b = save_stats(stats, tmp_path / "a.safetensors"), save_stats(stats, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert is_stats_file(a) and not is_stats_file(tmp_path / "missing.safetensors")
    back = load_stats(a)
    assert back.tokens == stats.tokens and back.info == {"data": "x"}
    for n, C in stats.moments.items():
        assert torch.equal(back.moments[n], C)


def test_stats_file_errors(tmp_path):
    p = tmp_path / "lora.safetensors"
    p.write_bytes(safetensors_bytes({"x": torch.zeros(2, 2)}))
    assert not is_stats_file(p)
    with pytest.raises(FormatError, match="not a mosconv calibration file"):
        load_stats(p)
    bad = CalibStats({"m": torch.full((3, 3), float("nan"), dtype=torch.float64)}, 10)
    save_stats(bad, tmp_path / "nan.safetensors")
    with pytest.raises(FormatError, match="not a finite square matrix"):
        load_stats(tmp_path / "nan.safetensors")


def test_calibrate_pipeline_and_shape_mismatch(tiny_lm, tmp_path):
    spec = DataSpec(base_model=tiny_lm.model, data=tiny_lm.data, max_tokens=256, seq_len=32)
    stats = calibrate(tiny_lm.lora, spec, tmp_path / "c.safetensors")
    assert stats.tokens == 256 and len(stats.moments) == 4
    assert stats.info["data_sha256"] and load_stats(tmp_path / "c.safetensors").tokens == 256
    other, _ = write_random_peft(tmp_path / "other", {"model.layers.0.self_attn.q_proj": (48, 48)})
    with pytest.raises(ConfigError, match="base model and adapter do not match"):
        calibrate(other, spec)
    with pytest.raises(ConfigError, match="needs a base model and a text file") as e:
        calibrate(tiny_lm.lora, DataSpec(data=tiny_lm.data))
    assert e.value.options == ("base_model", "data") and "--" not in str(e.value)


def test_quantized_data_aware_private_kinds_are_rounded_not_refitted_for_weights(lm, tmp_path):
    """With --quantize, private kinds were refitted for the weight error, which raised their
    data-aware error far above rounding (0.453 -> 0.568 on smollm-medical); now rounded."""
    from mosconv.fit.convert import ConvertConfig, convert

    model, _, blocks, adapter = lm
    stats = collect_moments(model, find_layers(model, adapter), blocks, info={})
    got = convert(adapter, ConvertConfig(ratio=4, quantize="int8", search="truncation"),
                  calib=stats).report
    float32 = convert(adapter, ConvertConfig(ratio=4, search="truncation"), calib=stats).report
    for k, f in zip(got.kinds, float32.kinds):
        assert k.structure.structure == "private"
        assert k.data.data_relative_error <= f.data.data_relative_error + 0.01  # rounding only


def test_calib_files_that_are_not_what_they_seem(tiny_lm, tmp_path):
    """A truncated stats file was read as calibration text; a file of NUL bytes too; a
    stats file for another adapter did not name the file; a failed run with statistics
    computed from text left the old output without its marker."""
    from mosconv.pipeline import compress

    spec = DataSpec(base_model=tiny_lm.model, data=tiny_lm.data, max_tokens=256, seq_len=32)
    stats = calibrate(tiny_lm.lora, spec, tmp_path / "c.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "c.safetensors").read_bytes()[:600])
    with pytest.raises(FormatError, match=f"{cut}: not a calibration file mosconv wrote"):
        compress(tiny_lm.lora, tmp_path / "o1", calib=cut, data=spec)
    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"\0" * 3000)
    with pytest.raises(FormatError, match="holds NUL bytes: a binary file, not text"):
        read_texts(zeros)
    other, _ = write_random_peft(tmp_path / "other", {"model.layers.0.self_attn.o_proj": (32, 32)})
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'c.safetensors'}: calibration "
                                          "statistics have no entry"):
        compress(other, tmp_path / "o2", calib=tmp_path / "c.safetensors")
    assert stats.tokens == 256
    old = tmp_path / "old"
    compress(tiny_lm.lora, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    from mosconv.model.distill import DistillConfig

    one_block = DataSpec(base_model=tiny_lm.model, data=tiny_lm.data, max_tokens=32, seq_len=32,
                         device="cpu")
    with pytest.raises(mosconv.MosconvError, match=rf"{tiny_lm.data}: need at least 2 blocks"):
        compress(tiny_lm.lora, old, calib=tiny_lm.data, data=one_block, overwrite=True,
                 distill=DistillConfig(steps=1, device="cpu"))
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_overwrite_drops_an_old_outputs_statistics_unless_they_are_read(tiny_lm, tmp_path):
    """An output's calib_stats.safetensors describes that output: --overwrite without
    statistics from text left the old adapter's in place (later passed to --calib, they
    would have been another adapter's and text's)."""
    from mosconv.names import CALIB_FILE
    from mosconv.pipeline import compress

    spec = DataSpec(base_model=tiny_lm.model, data=tiny_lm.data, max_tokens=128, seq_len=32)
    out = tmp_path / "out"
    compress(tiny_lm.lora, out, calib=tiny_lm.data, data=spec)
    kept = (out / CALIB_FILE).read_bytes()
    compress(tiny_lm.lora, out, calib=out / CALIB_FILE, overwrite=True)  # read from it: kept
    assert (out / CALIB_FILE).read_bytes() == kept
    elsewhere = tmp_path / "stats.safetensors"
    elsewhere.write_bytes(kept)
    compress(tiny_lm.lora, out, calib=elsewhere, overwrite=True)
    assert not (out / CALIB_FILE).exists() and elsewhere.read_bytes() == kept
    compress(tiny_lm.lora, out, calib=tiny_lm.data, data=spec, overwrite=True)
    compress(tiny_lm.lora, out, overwrite=True)  # the weight metric: none
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mos_adapter.safetensors", "mos_config.json", "report.json"])
