"""Bytes, not just parameters: --dtype, --quantize, --size-ratio and format v3's storage.

Quantization primitives, the stored error equal to the reported one, sizes on the real zoo,
the truncation baseline at equal bytes, PEFT loading an export of a quantized adapter,
byte-determinism and corrupt quantized tensors."""

from __future__ import annotations

import json

import pytest
import torch
from factory import llama_like, write_random_peft
from helpers import ZOO_ADAPTERS, assert_one_line_error, safetensors_parts, zoo_path
from safetensors.torch import load_file, save_file

from mosconv import FormatError, read_adapter
from mosconv.cli import main
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.mos.format import load_mos, save_mos
from mosconv.mos.quant import (
    Storage,
    dequantize,
    encode,
    pack_int4,
    quantize,
    snap,
    unpack_int4,
)
from mosconv.names import CONFIG_FILE, TENSOR_FILE
from mosconv.pipeline import compress, export_lora

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT32_ZOO = [n for n in ZOO_ADAPTERS if n != "open-calm-1b-r1-fp16"]


# ---------------------------------------------------------------- primitives


def test_int4_packing_round_trips_every_value_and_odd_widths():
    q = torch.arange(-7, 8, dtype=torch.int8).repeat(3, 1)  # 15 columns: odd
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, 8)
    assert torch.equal(unpack_int4(packed, 15), q)
    # column 2k in the low nibble, 2k+1 in the high one, two's complement
    assert int(packed[0, 0]) == ((-7) & 0xF) | (((-6) & 0xF) << 4)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_groups_scales_and_bounds(quant):
    x = torch.randn(5, 150, generator=torch.Generator().manual_seed(0))
    q, s = quantize(x, quant, 64)
    qmax = {"int8": 127, "int4": 7}[quant]
    assert s.dtype == torch.float16 and tuple(s.shape) == (5, 3)  # groups 64, 64, 22
    assert int(q.abs().max()) == qmax
    y = dequantize(q, s, 64)
    step = s.float().repeat_interleave(64, dim=1)[:, :150]
    assert bool(((y - x).abs() <= step / 2 + 1e-6).all())  # rounding to the nearest step


@pytest.mark.parametrize("storage", [Storage("float16"), Storage("bfloat16"),
                                     Storage("float32", "int8"), Storage("float32", "int4")])
@pytest.mark.parametrize("scale", [1.0, 1e-6, 0.0])
def test_snap_is_a_fixed_point_that_encode_stores_exactly(storage, scale):
    """What the fit measures (snapped values) is what the file holds, also for values whose
    float16 scales are subnormal, and for zero rows."""
    x = scale * torch.randn(4, 130, generator=torch.Generator().manual_seed(1))
    y = snap(x, storage)
    assert torch.equal(snap(y, storage), y)
    values, scales = encode(y, storage)
    if storage.quantized:
        q = unpack_int4(values, 130) if storage.quantize == "int4" else values
        assert torch.equal(dequantize(q, scales, 64), y)
    else:
        assert values.dtype == storage.torch_dtype and torch.equal(values.float(), y)


# ---------------------------------------------------------------- sizes on the real zoo


def _bf16_copy(src, dest):
    """A PEFT folder like ``src`` with its LoRA factors stored as bfloat16."""
    dest.mkdir()
    (dest / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()},
              str(dest / "adapter_model.safetensors"))
    return dest


@pytest.mark.parametrize("source", ["float16", "bfloat16"])
def test_half_precision_sources_keep_their_dtype_and_shrink_by_the_ratio(source, tmp_path):
    if source == "float16":
        src = zoo_path("open-calm-1b-r1-fp16")
    else:
        src = _bf16_copy(zoo_path("opt-125m-lora-ckpts/final"), tmp_path / "bf16")
    res = compress(src, tmp_path / "mos", ConvertConfig(ratio=8))
    ref = convert(read_adapter(src), ConvertConfig(ratio=8, dtype="float32"))
    t = res.report.totals
    assert t.dtype == source and t.file_bytes_ratio >= 7.5
    assert abs(t.relative_error - ref.report.totals.relative_error) < 1e-3
    _, tensors = safetensors_parts(tmp_path / "mos" / TENSOR_FILE)[0], load_file(
        str(tmp_path / "mos" / TENSOR_FILE))
    pools = [v for k, v in tensors.items() if k.startswith("mos.pools.")]
    assert pools and all(p.dtype == getattr(torch, source) for p in pools)
    assert not any(k.startswith("mos.routes.") for k in tensors)  # private: implicit


@pytest.mark.parametrize("name", FLOAT32_ZOO)
def test_zoo_quantized_sizes_and_errors(name, tmp_path):
    adapter = read_adapter(zoo_path(name))
    plain = convert(adapter, ConvertConfig(ratio=8)).report.totals
    for quant, least in (("int8", 28), ("int4", 50)):
        t = compress(zoo_path(name), tmp_path / quant,
                     ConvertConfig(ratio=8, quantize=quant)).report.totals
        assert t.quantize == quant and t.tensor_bytes_ratio >= least, (quant, t)
        if not adapter.extra_tensors:  # a classifier head passed through dominates a file
            assert t.file_bytes_ratio >= least, (quant, t.file_bytes_ratio)
        assert t.mos_params <= t.budget
        if quant == "int8":
            assert t.relative_error <= plain.relative_error + 0.01
        # never worse than truncation stored alike in no more bytes
        assert t.relative_error <= t.truncation_equal_bytes_relative_error + 1e-9
        assert t.truncation_equal_bytes_tensor_bytes <= t.mos_tensor_bytes


@pytest.mark.parametrize("name", ZOO_ADAPTERS)
def test_zoo_size_ratio_32_fits_and_beats_the_equal_bytes_baseline(name):
    adapter = read_adapter(zoo_path(name))
    res = convert(adapter, ConvertConfig(size_ratio=32, quantize="auto"))
    t = res.report.totals
    assert t.mos_tensor_bytes <= t.size_budget_bytes == adapter.tensor_bytes // 32
    assert t.relative_error <= t.truncation_equal_bytes_relative_error + 1e-9
    assert t.size_choices[0]["relative_error"] == t.relative_error
    assert res.mos.info["size_ratio"] == 32.0
    # the chosen storage beats float32 truncation at --ratio 32 where that keeps anything
    r32 = convert(adapter, ConvertConfig(ratio=32, dtype="float32")).report.totals
    assert t.relative_error <= r32.relative_error + 1e-9


def test_reported_error_is_the_stored_error(tmp_path):
    """The report's error is measured on the stored values: reloading gives the same."""
    from mosconv.fit.measure import measure

    src = zoo_path("gpt2-tigrinya-lora")
    res = compress(src, tmp_path / "m", ConvertConfig(ratio=8, quantize="int4"))
    loaded = load_mos(tmp_path / "m")
    adapter = read_adapter(src)
    got = measure(loaded, adapter, res.baseline.trunc)
    err = sum(x.err_sq for x in got.values()) / sum(x.energy for x in got.values())
    assert err ** 0.5 == pytest.approx(res.report.totals.relative_error, rel=1e-9, abs=1e-12)
    tb = loaded.tensor_bytes()
    on_disk = sum(v.numel() * v.element_size()
                  for k, v in load_file(str(tmp_path / "m" / TENSOR_FILE)).items()
                  if not k.startswith("extra."))
    assert tb["total"] == on_disk == res.report.totals.mos_tensor_bytes


# ---------------------------------------------------------------- round trips, determinism


@pytest.mark.parametrize("dtype,quant", [("float32", "none"), ("float16", "none"),
                                         ("bfloat16", "none"), ("float16", "int8"),
                                         ("float16", "int4")])
def test_round_trips_are_byte_deterministic(dtype, quant, tmp_path):
    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=3, d=64, d_kv=32),
                                  r=8, seed=3)
    cfg = ConvertConfig(ratio=4, dtype=dtype, quantize=quant)
    compress(folder, tmp_path / "a", cfg)
    compress(folder, tmp_path / "b", cfg)
    a = (tmp_path / "a" / TENSOR_FILE).read_bytes()
    assert a == (tmp_path / "b" / TENSOR_FILE).read_bytes()
    mos = load_mos(tmp_path / "a")
    assert mos.storage == Storage(dtype, quant)
    save_mos(mos, tmp_path / "c")  # load -> save gives the same tensor bytes
    assert (tmp_path / "c" / TENSOR_FILE).read_bytes() == a


# ---------------------------------------------------------------- PEFT and apply


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_peft_loads_export_of_quantized_adapter_and_matches_apply(quant, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from mosconv.model.runtime import apply

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().eval().save_pretrained(tmp_path / "base")
    modules = {f"model.layers.{i}.self_attn.{p}": shape
               for i in range(2) for p, shape in (("q_proj", (64, 64)), ("v_proj", (32, 64)))}
    write_random_peft(tmp_path / "lora", modules, r=4, alpha=8, seed=1, b_std=0.05)
    compress(tmp_path / "lora", tmp_path / "mos", ConvertConfig(ratio=2, quantize=quant))
    export_lora(tmp_path / "mos", tmp_path / "exp")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    with torch.no_grad():
        plain = base(ids).logits.clone()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exp").eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    ours = apply(LlamaForCausalLM.from_pretrained(tmp_path / "base").float().eval(),
                 tmp_path / "mos")
    with torch.no_grad():
        want = ours(ids).logits
    assert float((got - plain).abs().max()) > 1e-3
    assert float((got - want).abs().max()) < 1e-4
    from mosconv.model.runtime import merge

    merged = merge(ours)  # folded into the weights: the same outputs
    with torch.no_grad():
        assert float((merged(ids).logits - want).abs().max()) < 1e-4


def test_export_dtype(tmp_path):
    src = zoo_path("open-calm-1b-r1-fp16")
    compress(src, tmp_path / "m", ConvertConfig(ratio=8, quantize="int8"))
    export_lora(tmp_path / "m", tmp_path / "auto")  # quantized: exact in float32
    export_lora(tmp_path / "m", tmp_path / "f16", dtype="float16")
    compress(src, tmp_path / "h", ConvertConfig(ratio=8))  # float16 storage
    export_lora(tmp_path / "h", tmp_path / "h_auto")
    for name, want in (("auto", torch.float32), ("f16", torch.float16),
                       ("h_auto", torch.float16)):
        t = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert {v.dtype for v in t.values()} == {want}, name


# ---------------------------------------------------------------- bad input


def _quantized(tmp_path, quant="int4"):
    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=64, d_kv=32), r=4)
    compress(folder, tmp_path / "m", ConvertConfig(ratio=2, quantize=quant))
    return tmp_path / "m"


def _rewrite(folder, change):
    path = folder / TENSOR_FILE
    t = load_file(str(path))
    change(t)
    save_file(t, str(path), metadata={"format": "mosconv.mos.v3"})


@pytest.mark.parametrize("case,words", [
    ("scales-wrong-size", ("mos.scales.k0.A", "expected float16")),
    ("scales-non-finite", ("mos.scales.k0.A", "non-finite")),
    ("scales-negative", ("mos.scales.k0.A", "negative")),
    ("scales-missing", ("mos.scales.k0.A", "missing")),
    ("packed-wrong-size", ("mos.pools.k0.A", "int4, two per byte")),
    ("values-float", ("mos.pools.k0.A", "expected uint8")),
])
def test_corrupt_quantized_tensors_give_one_line_errors(case, words, tmp_path):
    folder = _quantized(tmp_path)

    def change(t):
        if case == "scales-wrong-size":
            t["mos.scales.k0.A"] = torch.cat([t["mos.scales.k0.A"]] * 2, dim=1)
        elif case == "scales-non-finite":
            t["mos.scales.k0.A"][0, 0] = float("inf")
        elif case == "scales-negative":
            t["mos.scales.k0.A"][0, 0] = -1.0
        elif case == "scales-missing":
            del t["mos.scales.k0.A"]
        elif case == "packed-wrong-size":
            t["mos.pools.k0.A"] = t["mos.pools.k0.A"][:, 1:].contiguous()
        else:
            t["mos.pools.k0.A"] = t["mos.pools.k0.A"].float()

    _rewrite(folder, change)
    with pytest.raises(FormatError) as e:
        load_mos(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / TENSOR_FILE) in msg
    for w in words:
        assert w in msg, msg
    from click.testing import CliRunner

    res = CliRunner().invoke(main, ["export", str(folder), str(tmp_path / "x")])
    assert_one_line_error(res, folder / TENSOR_FILE, words[0])


def test_corrupt_storage_config_is_named(tmp_path):
    folder = _quantized(tmp_path, "int8")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["storage"]["quantize"] = "int3"
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="storage.quantize"):
        load_mos(folder)


def test_a_group_wider_than_the_rows_costs_no_memory(tmp_path):
    """A ``storage.group`` at least as wide as a row is one group per row (the file's scales
    say so); decoding must not pad rows out to it (10**9 took tens of GB)."""
    folder = _quantized(tmp_path, "int8")
    before = load_mos(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["storage"]["group"] = 10**9
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(quantize(x, "int8", 40),
                                                 quantize(x, "int8", 10**12)))
    q, s = quantize(x, "int8", 40)
    assert torch.equal(dequantize(q, s, 40), dequantize(q, s, 10**12))
    assert max(max(p.pool_A.shape[1], p.pool_B.shape[1]) for p in before.kinds.values()) <= 64
    after = load_mos(folder)  # every row was one group of the default 64: the same values
    for k, p in before.kinds.items():
        assert torch.equal(p.pool_A, after.kinds[k].pool_A)
        assert torch.equal(p.pool_B, after.kinds[k].pool_B)


def test_size_ratio_and_ratio_together_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    res = CliRunner().invoke(main, ["compress", str(zoo_path("gpt2-tigrinya-lora")),
                                    str(tmp_path / "o"), "--ratio", "8", "--size-ratio", "32"])
    assert res.exit_code == 2 and "not both" in res.output
    assert not (tmp_path / "o").exists()


def test_quantize_auto_needs_a_size_ratio(tmp_path):
    from click.testing import CliRunner

    from mosconv.cli.commands import main

    with pytest.raises(Exception, match="size"):
        ConvertConfig(quantize="auto").validate()
    for cmd in ("compress", "batch"):  # a usage error (exit 2), as --ratio with --size-ratio
        res = CliRunner().invoke(main, [cmd, str(tmp_path / "in"), str(tmp_path / "o"),
                                        "--ratio", "8", "--quantize", "auto"])
        assert res.exit_code == 2 and "--quantize auto chooses by size: it needs --size-ratio" \
            in res.output
        assert not (tmp_path / "o").exists()


def test_batch_passes_the_storage(tmp_path):
    from click.testing import CliRunner

    from mosconv.batch.run import BatchConfig, run_batch
    from mosconv.errors import ConfigError

    zoo = tmp_path / "zoo"
    for i in range(2):
        write_random_peft(zoo / f"a{i}", llama_like(layers=2, d=64, d_kv=32), r=4, seed=i)
    summary = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=4, quantize="int4"))
    assert summary.failed == 0
    for i in range(2):
        mos = load_mos(tmp_path / "out" / f"a{i}")
        assert mos.storage.quantize == "int4"
        assert json.loads((tmp_path / "out" / f"a{i}" / CONFIG_FILE).read_text())[
            "batch"]["quantize"] == "int4"
    again = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=4, quantize="int4"))
    assert all(a.status == "skipped" for a in again.adapters)
    with pytest.raises(ConfigError, match="size ratio"):
        BatchConfig(quantize="auto").validate()
    res = CliRunner().invoke(main, ["batch", str(zoo), str(tmp_path / "o2"), "--shared-pool",
                                    "--size-ratio", "16", "--quiet"])
    assert res.exit_code == 0, res.output  # shared pools take a byte budget too


@pytest.mark.parametrize("storage", [Storage("float16"), Storage("float16", "int8"),
                                     Storage("float16", "int4")])
def test_cored_adapters_are_stored_and_read_back(storage, tmp_path):
    """Format v2's cores (zoo members) take the storage too: quantized with their scales."""
    from dataclasses import replace

    from mosconv.fit.storage import store

    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=64, d_kv=32), r=4)
    adapter = read_adapter(folder)
    mos = convert(adapter, ConvertConfig(ratio=2, search="truncation", dtype="float32")).mos
    g = torch.Generator().manual_seed(0)
    mos = replace(mos, modules=tuple(
        replace(m, core=torch.eye(m.r) + 0.1 * torch.randn(m.r, m.r, generator=g))
        if m.r else m for m in mos.modules))
    stored = store(mos, adapter, storage)
    save_mos(stored, tmp_path / "m")
    back = load_mos(tmp_path / "m")
    assert back.storage == storage
    for a, b in zip(stored.modules, back.modules):
        assert (a.core is None) == (b.core is None)
        if a.core is not None:
            assert torch.equal(a.core, b.core)
    names = set(load_file(str(tmp_path / "m" / TENSOR_FILE)))
    assert any(n.startswith("mos.cores.") for n in names)
    assert any(n.startswith("mos.core_scales.") for n in names) == storage.quantized
