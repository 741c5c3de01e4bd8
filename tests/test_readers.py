"""Readers: every supported format -> LoraAdapter with the right A, B, scale, kind and extras."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LLAMA_MODULES,
    MODULES_TO_SAVE_EXTRAS,
    PEFT_PREFIX,
    ZOO_ADAPTERS,
    dense_update,
    raw_lora_pairs,
    raw_tensors,
    read_zoo,
    zoo_adapter_path,
    zoo_expected_scale,
    zoo_weight_file,
)

from mosconv.errors import FormatError, UnsupportedAdapterError
from mosconv.lora.read import read_adapter, resolve_adapter_path
from mosconv.lora.read.peft import pattern_key
from mosconv.lora.types import name_pattern, natural_key

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_factors_written(adapter, written, a_key, b_key):
    """Every module's A/B equal the written tensors (upcast to float32), bit for bit."""
    assert len(adapter.modules) > 0
    for m in adapter.modules:
        A = written.tensors[a_key(m.name)]
        B = written.tensors[b_key(m.name)]
        assert m.A.dtype == torch.float32 and m.B.dtype == torch.float32
        assert torch.equal(m.A, A.float()), m.name
        assert torch.equal(m.B, B.float()), m.name
        assert m.A.shape == (m.r, m.d_in) and m.B.shape == (m.d_out, m.r)


def peft_a(name):
    return f"{PEFT_PREFIX}{name}.lora_A.weight"


def peft_b(name):
    return f"{PEFT_PREFIX}{name}.lora_B.weight"


# --------------------------------------------------------------------------- PEFT scaling


def test_peft_scale_is_alpha_over_r(make):
    w = make.peft(r=4, lora_alpha=8)
    ad = read_adapter(w.path)
    assert ad.format == "peft"
    assert [m.name for m in ad.modules] == sorted(LLAMA_MODULES, key=natural_key)
    assert all(m.scale == 2.0 for m in ad.modules)
    assert_factors_written(ad, w, peft_a, peft_b)
    assert ad.base_model == "tiny-llama-for-tests" and ad.task_type == "CAUSAL_LM"
    assert ad.dtype == "float32" and ad.fan_in_fan_out is False
    assert ad.config == w.config
    assert ad.params == sum(4 * (d_in + d_out) for d_out, d_in in LLAMA_MODULES.values())


def test_peft_scale_non_integer_alpha(make):
    ad = read_adapter(make.peft(r=8, lora_alpha=12).path)
    assert all(m.scale == 12 / 8 for m in ad.modules)


def test_peft_rslora_scale_is_alpha_over_sqrt_r(make):
    ad = read_adapter(make.peft(r=8, lora_alpha=16, use_rslora=True).path)
    assert all(m.scale == 16 / math.sqrt(8) for m in ad.modules)


def test_peft_rank_and_alpha_patterns_match_as_regex_suffixes(make):
    modules = {
        f"model.layers.{i}.self_attn.{p}": (24, 16)
        for i in (0, 1, 11)
        for p in ("q_proj", "v_proj")
    }
    modules["model.layers.0.mlp.down_proj"] = (16, 32)
    rank_pattern = {"layers.1.self_attn.q_proj": 2, r"layers\.(0|11)\.self_attn\.v_proj": 6}
    alpha_pattern = {
        "layers.11.self_attn.q_proj": 3,  # "." is a regex wildcard, but it must still end the name
        "proj": 100,  # not a suffix at a "." boundary of any name: never matches
        "down_proj": 5,
    }
    ranks = {
        "model.layers.1.self_attn.q_proj": 2,
        "model.layers.0.self_attn.v_proj": 6,
        "model.layers.11.self_attn.v_proj": 6,
    }
    w = make.peft(
        modules,
        r=4,
        lora_alpha=8,
        ranks=ranks,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    ad = read_adapter(w.path)
    expected = {
        "model.layers.0.self_attn.q_proj": 8 / 4,
        "model.layers.0.self_attn.v_proj": 8 / 6,  # rank from the pattern, alpha from lora_alpha
        "model.layers.1.self_attn.q_proj": 8 / 2,  # "layers.1." does not also match layers.11
        "model.layers.1.self_attn.v_proj": 8 / 4,
        "model.layers.11.self_attn.q_proj": 3 / 4,
        "model.layers.11.self_attn.v_proj": 8 / 6,
        "model.layers.0.mlp.down_proj": 5 / 4,
    }
    assert {m.name: m.scale for m in ad.modules} == expected
    assert {m.name: m.r for m in ad.modules} == {n: ranks.get(n, 4) for n in modules}
    assert_factors_written(ad, w, peft_a, peft_b)


def test_peft_rank_pattern_with_rslora(make):
    mods = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
    w = make.peft(
        mods,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        ranks={"model.layers.0.self_attn.v_proj": 9},
        rank_pattern={"v_proj": 9},
        alpha_pattern={"v_proj": 6},
    )
    ad = read_adapter(w.path)
    assert ad.module("model.layers.0.self_attn.q_proj").scale == 8 / 2
    assert ad.module("model.layers.0.self_attn.v_proj").scale == 6 / 3


def test_pattern_key_first_match_wins_like_peft():
    patterns = {"q_proj": 1, r"layers\.0\.self_attn\.q_proj": 2}
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(patterns, "q_proj") == "q_proj"  # a whole name matches too
    assert pattern_key(patterns, "model.layers.0.self_attn.xq_proj") is None
    assert pattern_key({}, "model.layers.0.q_proj") is None


def test_peft_old_config_schema(make):
    """Early PEFT configs: only target_modules, peft_type, r and lora_alpha."""
    w = make.peft(r=4, lora_alpha=16, old_config=True)
    assert set(w.config) == {"target_modules", "peft_type", "r", "lora_alpha"}
    ad = read_adapter(w.path)
    assert all(m.scale == 4.0 for m in ad.modules)
    assert ad.base_model is None and ad.task_type is None and ad.fan_in_fan_out is False
    assert_factors_written(ad, w, peft_a, peft_b)


def test_peft_config_without_lora_alpha_uses_peft_default_8(make):
    """PEFT's LoraConfig defaults lora_alpha to 8 (not to r)."""
    ad = read_adapter(make.peft(r=16, lora_alpha=None, old_config=True).path)
    assert all(m.scale == 8 / 16 for m in ad.modules)


def test_peft_keys_with_adapter_name(make):
    w = make.peft(adapter_name_in_keys=True)
    ad = read_adapter(w.path)
    assert len(ad.modules) == len(LLAMA_MODULES) and not ad.extra_tensors
    assert_factors_written(
        ad,
        w,
        lambda n: f"{PEFT_PREFIX}{n}.lora_A.default.weight",
        lambda n: f"{PEFT_PREFIX}{n}.lora_B.default.weight",
    )


def test_peft_legacy_bin_reads_like_safetensors(make):
    w = make.peft(weights="bin", extra={"base_model.model.score.weight": (3, 16)})
    assert w.weights.name == "adapter_model.bin"
    ad = read_adapter(w.path)
    assert ad.source_files[-1] == w.weights
    assert all(m.scale == 2.0 for m in ad.modules)
    assert_factors_written(ad, w, peft_a, peft_b)
    assert torch.equal(
        ad.extra_tensors["base_model.model.score.weight"],
        w.tensors["base_model.model.score.weight"],
    )


def test_peft_fan_in_fan_out_keeps_linear_orientation(make):
    """GPT-2 Conv1D adapters: PEFT still stores A (r, d_in) and B (d_out, r)."""
    mods = {f"transformer.h.{i}.attn.c_attn": (48, 16) for i in range(2)}
    w = make.peft(mods, fan_in_fan_out=True)
    ad = read_adapter(w.path)
    assert ad.fan_in_fan_out is True
    for m in ad.modules:
        assert (m.d_out, m.d_in) == (48, 16)
    assert_factors_written(ad, w, peft_a, peft_b)


def test_peft_extra_tensors_pass_through_bit_identical(make):
    extra = {k: make.randn(*s) for k, s in MODULES_TO_SAVE_EXTRAS.items()}
    extra["base_model.model.classifier.weight"] = make.randn(2, 16).to(torch.bfloat16)
    extra["base_model.model.embed.position_ids"] = torch.arange(7, dtype=torch.int64)
    extra["base_model.model.model.norm.weight"] = make.randn(16).half()
    w = make.peft(extra=extra)
    ad = read_adapter(w.path)
    assert set(ad.extra_tensors) == set(extra)
    for key, t in extra.items():
        got = ad.extra_tensors[key]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t), key
    assert {m.name for m in ad.modules} == set(LLAMA_MODULES)


def test_peft_embedding_lora(make):
    w = make.peft(
        {"model.layers.0.self_attn.q_proj": (24, 16)},
        r=4,
        embeddings={"model.embed_tokens": (50, 16)},
    )
    ad = read_adapter(w.path)
    emb = ad.module("model.embed_tokens")
    assert emb.embedding is True
    assert (emb.r, emb.d_in, emb.d_out) == (4, 50, 16)  # A (r, num_emb), B (dim, r)
    assert torch.equal(emb.A, w.tensors[f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_A"])
    assert torch.equal(emb.B, w.tensors[f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_B"])
    assert emb.scale == 2.0
    assert "emb" in emb.kind
    assert ad.module("model.layers.0.self_attn.q_proj").embedding is False
    assert not ad.extra_tensors


def test_peft_safetensors_metadata_kept(make):
    ad = read_adapter(make.peft(metadata={"format": "pt", "note": "x"}).path)
    assert ad.metadata == {"format": "pt", "note": "x"}


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("which", ["weights", "config"])
def test_passing_a_file_of_a_peft_folder_reads_the_folder(make, weights, which):
    w = make.peft(weights=weights)
    target = w.weights if which == "weights" else w.path / "adapter_config.json"
    assert resolve_adapter_path(target) == ("peft", w.path)
    via_file, via_folder = read_adapter(target), read_adapter(w.path)
    assert via_file.format == "peft"
    assert [(m.name, m.scale) for m in via_file.modules] == [
        (m.name, m.scale) for m in via_folder.modules
    ]
    for a, b in zip(via_file.modules, via_folder.modules):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_adapter_read_as_float32(make, dtype, name):
    w = make.peft(dtype=dtype)
    ad = read_adapter(w.path)
    assert ad.dtype == name
    assert_factors_written(ad, w, peft_a, peft_b)  # exact: every half value is a float32


# --------------------------------------------------------------------------- kinds and layers


def test_kinds_split_same_pattern_of_different_shapes(make):
    mods = {f"transformer.h.{i}.attn.c_proj": (16, 16) for i in range(3)}
    mods.update({f"transformer.h.{i}.mlp.c_proj": (16, 64) for i in range(3)})
    mods.update({f"transformer.h.{i}.attn.c_attn": (48, 16) for i in range(3)})
    ad = read_adapter(make.peft(mods).path)
    kinds = ad.kinds
    assert len(kinds) == 3
    for ms in kinds.values():
        assert len({(m.d_out, m.d_in) for m in ms}) == 1
        assert len({name_pattern(m.name) for m in ms}) == 1
        assert [m.layer for m in ms] == [0, 1, 2]
        assert [m.name.split(".")[2] for m in ms] == ["0", "1", "2"]


def test_kinds_split_sd_blocks_of_different_widths(make):
    blocks = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (32, 32),
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1": (32, 32),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1": (64, 64),
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1": (64, 64),
    }
    ad = read_adapter(make.diffusers_legacy(blocks, projs=("to_q",)).path)
    kinds = ad.kinds
    assert len(kinds) == 2
    pattern = "down_blocks.*.attentions.*.transformer_blocks.*.attn1.to_q"
    assert sorted(kinds) == sorted(f"{pattern}[{w}x{w}]" for w in (32, 64))
    for ms in kinds.values():
        assert [m.layer for m in ms] == [0, 1]


def test_layer_index_follows_natural_order(make):
    mods = {f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in (10, 2, 0, 1)}
    ad = read_adapter(make.peft(mods).path)
    assert [(m.name.split(".")[2], m.layer) for m in ad.modules] == [
        ("0", 0),
        ("1", 1),
        ("2", 2),
        ("10", 3),
    ]


# --------------------------------------------------------------------------- diffusers and kohya

SD_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 48),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (64, 64),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (48, 48),
}


def test_diffusers_peft_style_scale_1_without_alpha(make):
    w = make.diffusers(SD_MODULES, r=4, extra={"unet.conv_in.bias": (8,)})
    ad = read_adapter(w.path)
    assert ad.format == "diffusers"
    assert {m.name for m in ad.modules} == set(SD_MODULES)
    assert all(m.scale == 1.0 for m in ad.modules)
    assert_factors_written(ad, w, lambda n: f"{n}.lora_A.weight", lambda n: f"{n}.lora_B.weight")
    assert torch.equal(ad.extra_tensors["unet.conv_in.bias"], w.tensors["unet.conv_in.bias"])
    assert ad.source_files == (w.weights,)


def _diffusers_loaded_scales(path, component):
    """The scales diffusers gives a component of a file with neither alphas nor a header
    config: its loader's ``get_peft_kwargs`` (``r = lora_alpha =`` the first ``lora_B``'s
    rank of the file as safetensors loads it, the most common rank as ``r``, the others in
    ``rank_pattern``), then stock PEFT builds the layers."""
    import collections

    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    sd = {k.removeprefix(f"{component}."): v for k, v in load_file(path).items()
          if k.startswith(f"{component}.")}
    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    alpha = next(iter(rank.values()))  # diffusers: r = lora_alpha = the first rank
    r = collections.Counter(rank.values()).most_common()[0][0]
    pattern = {k.split(".lora_B.")[0]: v for k, v in rank.items() if v != r}
    names = sorted({k.split(".lora_")[0] for k in sd})
    model = torch.nn.Module()
    for n in names:
        a = sd[f"{n}.lora_A.weight"]
        parent = model
        for part in n.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(n.split(".")[-1], torch.nn.Linear(a.shape[1], sd[f"{n}.lora_B.weight"].shape[0]))
    config = LoraConfig(r=r, lora_alpha=alpha, rank_pattern=pattern, target_modules=names)
    model = inject_adapter_in_model(config, model)
    return {f"{component}.{n}": model.get_submodule(n).scaling["default"] for n in names}


def test_diffusers_mixed_ranks_without_alphas_scale_as_diffusers_loads_them(make):
    """No ``.alpha`` and no header config: diffusers takes the first rank as ``lora_alpha``
    for every module of a component, so a rank-4 module after rank-8 ones gets scale 2."""
    pytest.importorskip("peft")
    g = torch.Generator().manual_seed(0)
    ranks = {"unet.blk.to_q": 4, "unet.blk.to_k": 8, "unet.blk.to_v": 8,
             "text_encoder.enc.q_proj": 2, "text_encoder.enc.v_proj": 6}
    tensors = {}
    for mod, r in ranks.items():
        tensors[f"{mod}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        tensors[f"{mod}.lora_B.weight"] = torch.randn(16, r, generator=g)
    w = make.raw_file("pytorch_lora_weights.safetensors", tensors)
    ad = read_adapter(w.path)
    want = {**_diffusers_loaded_scales(w.path, "unet"),
            **_diffusers_loaded_scales(w.path, "text_encoder")}
    got = {m.name: m.scale for m in ad.modules}
    assert got == pytest.approx(want) and got["unet.blk.to_q"] == 2.0
    assert got["text_encoder.enc.q_proj"] == 1.0 and got["text_encoder.enc.v_proj"] == 2 / 6
    # a component with an .alpha keeps the alphas' rule (alpha / r, else 1)
    alpha = {**tensors, "unet.blk.to_k.alpha": torch.tensor(4.0)}
    ad = read_adapter(make.raw_file("with_alpha.safetensors", alpha).path)
    assert [ad.module(f"unet.blk.{p}").scale for p in ("to_q", "to_k", "to_v")] == [1, 0.5, 1]
    assert ad.module("text_encoder.enc.q_proj").scale == 1.0


def test_diffusers_peft_style_alpha_keys(make):
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ad = read_adapter(make.diffusers(SD_MODULES, r=4, alphas={q: 2}).path)
    assert ad.module(q).scale == 0.5
    assert all(m.scale == 1.0 for m in ad.modules if m.name != q)
    assert not ad.extra_tensors  # alphas are consumed, not passed through


def test_diffusers_legacy_attention_processor_keys(make):
    blocks = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2": (32, 48),
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1": (64, 64),
    }
    w = make.diffusers_legacy(blocks, r=4)
    ad = read_adapter(w.path)
    assert ad.format == "diffusers-legacy"
    expected = {f"{b}.{p}" for b in blocks for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert {m.name for m in ad.modules} == expected
    assert all(m.scale == 1.0 for m in ad.modules)

    def key(n, which):
        block, proj = n.rsplit(".to_", 1)
        proj = "to_" + proj.removesuffix(".0")
        return f"{block}.processor.{proj}_lora.{which}.weight"

    assert_factors_written(ad, w, lambda n: key(n, "down"), lambda n: key(n, "up"))
    cross = ad.module("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert (cross.d_out, cross.d_in) == (32, 48)


def test_diffusers_file_found_in_a_folder_without_config(make):
    w = make.diffusers(SD_MODULES)
    assert resolve_adapter_path(w.path.parent) == ("file", w.path)
    assert len(read_adapter(w.path.parent).modules) == len(SD_MODULES)


KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (48, 48),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (48, 48),
}


def test_kohya_scale_alpha_over_r_and_missing_alpha_is_1(make):
    q0, q1, te0, te1 = KOHYA
    w = make.kohya(
        KOHYA,
        r=8,
        alphas={q0: 4, q1: None, te0: 1, te1: 8},
        metadata={"ss_sd_model_name": "v1-5-pruned.safetensors"},
    )
    ad = read_adapter(w.path)
    assert ad.format == "kohya"
    assert {m.name: m.scale for m in ad.modules} == {q0: 0.5, q1: 1.0, te0: 1 / 8, te1: 1.0}
    assert_factors_written(
        ad, w, lambda n: f"{n}.lora_down.weight", lambda n: f"{n}.lora_up.weight"
    )
    assert not ad.extra_tensors
    assert ad.base_model == "v1-5-pruned.safetensors"
    assert ad.metadata["ss_sd_model_name"] == "v1-5-pruned.safetensors"


def test_kohya_fp16_alpha_and_factors(make):
    q0 = next(iter(KOHYA))
    w = make.kohya(
        {q0: KOHYA[q0]}, r=4, alphas={q0: 3}, alpha_dtype=torch.float16, dtype=torch.float16
    )
    ad = read_adapter(w.path)
    assert ad.dtype == "float16" and ad.module(q0).scale == 0.75


def test_kohya_kinds_split_blocks_of_different_widths(make):
    ad = read_adapter(make.kohya(KOHYA).path)
    assert len(ad.kinds) == 3  # two unet widths, one text-encoder kind of two layers
    te = [m for m in ad.modules if m.name.startswith("lora_te_")]
    assert len({m.kind for m in te}) == 1 and [m.layer for m in te] == [0, 1]


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_kohya_conv_module_flattened_exactly(make, kernel):
    """A kxk down conv followed by a 1x1 up conv is the single kxk conv reshape(B @ A)."""
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    c_out, c_in = 12, 6
    w = make.kohya({}, r=4, alphas={conv: 2}, convs={conv: (c_out, c_in, *kernel)})
    ad = read_adapter(w.path)
    m = ad.module(conv)
    down = w.tensors[f"{conv}.lora_down.weight"]  # (r, in, kh, kw)
    up = w.tensors[f"{conv}.lora_up.weight"]  # (out, r, 1, 1)
    assert m.conv_shape == (c_out, c_in, *kernel)
    assert (m.r, m.d_in, m.d_out) == (4, c_in * kernel[0] * kernel[1], c_out)
    assert m.scale == 0.5
    assert "conv" in m.kind
    assert torch.equal(m.A, down.flatten(1)) and torch.equal(m.B, up.flatten(1))

    kernel_w = (m.B.double() @ m.A.double()).reshape(m.conv_shape)
    x = torch.randn(2, c_in, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pad = kernel[0] // 2
    composed = F.conv2d(F.conv2d(x, down.double(), padding=pad), up.double())
    single = F.conv2d(x, kernel_w, padding=pad)
    torch.testing.assert_close(single, composed, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the zoo


def test_zoo_holds_every_listed_adapter(zoo):
    missing = [name for name in ZOO_ADAPTERS if not (zoo / name).is_dir()]
    assert not missing, f"{zoo}: missing {missing}"


@pytest.mark.parametrize("name", ZOO_ADAPTERS)
def test_zoo_reads_with_exact_factors_and_scale(name):
    ad = read_zoo(name)
    raw = raw_tensors(zoo_weight_file(name))
    pairs = raw_lora_pairs(raw)
    assert {m.name for m in ad.modules} == set(pairs)
    scale = zoo_expected_scale(name)
    for m in ad.modules:
        A, B = pairs[m.name]
        assert m.scale == scale
        assert torch.equal(m.A, A.float()) and torch.equal(m.B, B.float())
        assert m.A.shape == (m.r, m.d_in) and m.B.shape == (m.d_out, m.r)
    lora_keys = {k for k in raw if any(t in k for t in ("lora_A", "lora_B", "_lora."))}
    assert set(ad.extra_tensors) == set(raw) - lora_keys
    expected_format = "diffusers-legacy" if name.startswith("sd15") else "peft"
    assert ad.format == expected_format


def test_zoo_distilbert_modules_to_save_pass_through():
    name = "distilbert-imdb-seqcls"
    ad = read_zoo(name)
    raw = raw_tensors(zoo_weight_file(name))
    expected = {k for k in raw if "classifier" in k}
    assert expected and expected <= set(ad.extra_tensors)
    for key in ad.extra_tensors:
        assert ad.extra_tensors[key].dtype == raw[key].dtype
        assert torch.equal(ad.extra_tensors[key], raw[key]), key
    assert ad.task_type == "SEQ_CLS"


def test_zoo_gpt2_tigrinya_kinds():
    ad = read_zoo("gpt2-tigrinya-lora")
    assert ad.fan_in_fan_out is True
    kinds = ad.kinds
    assert len(kinds) == 3
    by_pattern = {name_pattern(ms[0].name): ms for ms in kinds.values()}
    assert set(by_pattern) == {
        "transformer.h.*.attn.c_attn",
        "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_proj",
    }
    attn_proj, mlp_proj = (
        by_pattern["transformer.h.*.attn.c_proj"],
        by_pattern["transformer.h.*.mlp.c_proj"],
    )
    assert attn_proj[0].kind != mlp_proj[0].kind
    assert {(m.d_out, m.d_in) for m in attn_proj} == {(768, 768)}
    assert {(m.d_out, m.d_in) for m in mlp_proj} == {(768, 3072)}
    for ms in kinds.values():
        assert [m.layer for m in ms] == list(range(12))
        assert [int(m.name.split(".")[2]) for m in ms] == list(range(12))


def test_zoo_sd15_kinds_by_width():
    ad = read_zoo("sd15-diffusers-attnproc-r4")
    assert len(ad.modules) == 128
    for ms in ad.kinds.values():
        assert len({(m.d_out, m.d_in) for m in ms}) == 1
        assert [m.layer for m in ms] == list(range(len(ms)))
    q_kinds = {k for k in ad.kinds if k.startswith("down_blocks.") and ".attn1.to_q[" in k}
    assert {k.split("[")[1] for k in q_kinds} == {"320x320]", "640x640]", "1280x1280]"}


def test_zoo_open_calm_fp16_read_as_float32():
    ad = read_zoo("open-calm-1b-r1-fp16")
    assert ad.dtype == "float16"
    assert all(
        m.A.dtype == torch.float32 and (m.r, m.d_in, m.d_out) == (1, 2048, 6144) for m in ad.modules
    )
    assert all(m.scale == 32.0 for m in ad.modules)


def test_zoo_legacy_bin():
    ad = read_zoo("gpt2-great-tabular-bin")
    assert ad.source_files[-1].name == "adapter_model.bin"
    assert len(ad.modules) == 12 and all(m.scale == 4.0 for m in ad.modules)


def test_zoo_weight_file_path_reads_the_folder():
    name = "opt-125m-lora-ckpts/final"
    via_file = read_adapter(zoo_adapter_path(name) / "adapter_model.safetensors")
    via_folder = read_zoo(name)
    assert via_file.format == "peft" and via_file.config == via_folder.config
    assert [(m.name, m.scale) for m in via_file.modules] == [
        (m.name, m.scale) for m in via_folder.modules
    ]
    for a, b in zip(via_file.modules, via_folder.modules):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


# --------------------------------------------------------------------------- against PEFT itself


def test_scales_and_updates_match_peft(tmp_path):
    """Adapters saved by PEFT itself read back with PEFT's own scaling and delta weights:
    rslora, rank_pattern, alpha_pattern, embedding, Conv1D fan_in_fan_out, modules_to_save."""
    peft = pytest.importorskip("peft")
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 24), nn.Linear(16, 8)

    class Tiny(nn.Module):
        def __init__(self, conv1d=False):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.layers = nn.ModuleList(Block() for _ in range(3))
            self.c_attn = Conv1D(48, 16) if conv1d else nn.Linear(16, 48)
            self.classifier = nn.Linear(16, 2)

    cases = {
        "rslora-patterns": {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "emb"],
            "rank_pattern": {"layers.1.q_proj": 2, "v_proj": 6},
            "alpha_pattern": {r"layers\.2\.q_proj": 5},
            "modules_to_save": ["classifier"],
        },
        "conv1d": {"r": 8, "lora_alpha": 32, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    }
    for label, kw in cases.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(
            Tiny(conv1d=kw.get("fan_in_fan_out", False)),
            peft.LoraConfig(init_lora_weights=False, **kw),
        )
        for safe in (True, False):
            out = tmp_path / f"{label}-{safe}"
            model.save_pretrained(out, safe_serialization=safe)
            ad = read_adapter(out)
            layers = {
                n.removeprefix("base_model.model."): mod
                for n, mod in model.named_modules()
                if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling
            }
            assert {m.name for m in ad.modules} == set(layers), label
            for m in ad.modules:
                layer = layers[m.name]
                assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-15), (
                    label,
                    m.name,
                )
                delta = layer.get_delta_weight("default").double()
                if m.embedding:
                    delta = delta.T  # PEFT returns (num_embeddings, dim)
                elif kw.get("fan_in_fan_out") and m.name == "c_attn":
                    delta = delta.T  # Conv1D weight is (in, out)
                torch.testing.assert_close(
                    dense_update(m.A, m.B, m.scale), delta, rtol=1e-5, atol=1e-7
                )
            if "modules_to_save" in kw:
                sd = model.state_dict()
                assert {
                    "base_model.model.classifier.weight",
                    "base_model.model.classifier.bias",
                } == set(ad.extra_tensors)
                for key, t in ad.extra_tensors.items():
                    src = [
                        v
                        for k, v in sd.items()
                        if k.endswith("classifier.modules_to_save.default." + key.rsplit(".", 1)[1])
                    ]
                    assert torch.equal(t, src[0])


def test_old_config_scale_matches_peft_loading(make):
    """An early-schema config (no lora_alpha at all) loads in PEFT with its defaults."""
    peft = pytest.importorskip("peft")
    from torch import nn

    mods = {f"layers.{i}.q_proj": (24, 16) for i in range(2)}
    w = make.peft(mods, r=16, lora_alpha=None, old_config=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 24)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    model = peft.PeftModel.from_pretrained(Tiny(), str(w.path))
    ad = read_adapter(w.path)
    for m in ad.modules:
        layer = model.get_submodule(f"base_model.model.{m.name}")
        assert m.scale == layer.scaling["default"]
    assert json.loads((w.path / "adapter_config.json").read_text()) == w.config


def test_diffusers_header_config_sets_the_scale_as_diffusers_loads_it(make):
    """Recent diffusers ``save_lora_weights`` writes the LoraConfig into the header
    (``lora_adapter_metadata``): lora_alpha / r, alpha_pattern per module, rsLoRA."""
    from safetensors.torch import load_file, save_file

    mods = {"unet.down.attn1.to_q": (8, 8), "unet.down.attn1.to_k": (8, 8),
            "text_encoder.layers.0.q_proj": (8, 8)}
    w = make.diffusers(mods, r=4, alphas={"unet.down.attn1.to_k": 2.0})
    save_file(load_file(w.path), w.path, metadata={"lora_adapter_metadata": json.dumps({
        "unet.r": 4, "unet.lora_alpha": 16, "text_encoder.r": 4, "text_encoder.lora_alpha": 4,
        "text_encoder.use_rslora": True, "text_encoder.alpha_pattern": {"q_proj": 8}})})
    scales = {m.name: m.scale for m in read_adapter(w.path).modules}
    assert scales == {"unet.down.attn1.to_q": 16 / 4,
                      "unet.down.attn1.to_k": 2.0 / 4,  # its own .alpha tensor first
                      "text_encoder.layers.0.q_proj": 8 / math.sqrt(4)}
    plain = make.diffusers(mods, r=4, filename="plain.safetensors")  # no header: alpha = r
    assert {m.scale for m in read_adapter(plain.path).modules} == {1.0}


@pytest.mark.parametrize("header, message", [
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q(": 16}},
     "alpha_pattern key 'to_q(' is not a valid regular expression"),
    ({"unet.lora_alpha": "8"}, "unet.lora_alpha must be a number, got '8'"),
    ({"unet.lora_alpha": 8, "unet.use_rslora": "false"},
     "unet.use_rslora must be true or false, got 'false'"),
    ({"unet.alpha_pattern": {"to_q": True}}, "alpha_pattern['to_q'] must be a number"),
    ({"unet.alpha_pattern": [1]}, "alpha_pattern must be an object"),
])
def test_diffusers_header_config_of_the_wrong_type_is_refused(make, header, message):
    """A header value of the wrong type gave a wrong scale silently (a string alpha was
    skipped, "false" counted as true) or an internal error (a bad regex)."""
    from safetensors.torch import load_file, save_file

    w = make.diffusers({"unet.down.attn1.to_q": (8, 8)}, r=4)
    save_file(load_file(w.path), w.path,
              metadata={"lora_adapter_metadata": json.dumps(header)})
    with pytest.raises(FormatError, match=re.escape(message)) as e:
        read_adapter(w.path)
    assert str(w.path) in str(e.value)


def test_diffusers_model_level_header_without_a_component_prefix(make):
    """A model's ``save_lora_adapter`` writes one LoraConfig, unprefixed, over unprefixed keys
    (diffusers loads it as ``LoraConfig(**metadata)``); it was read with scale 1."""
    from safetensors.torch import load_file, save_file

    mods = {"down.attn1.to_q": (8, 8), "down.attn1.to_k": (8, 8)}
    w = make.diffusers(mods, r=4)
    tensors = load_file(w.path)
    for rslora, scales in ((False, {16 / 4, 8 / 4}), (True, {16 / 2, 8 / 2})):
        save_file(tensors, w.path, metadata={"lora_adapter_metadata": json.dumps(
            {"r": 4, "lora_alpha": 8, "use_rslora": rslora, "alpha_pattern": {"to_q": 16},
             "peft_type": "LORA"})})
        ad = read_adapter(w.path)
        assert {m.name: m.scale for m in ad.modules}["down.attn1.to_q"] == max(scales)
        assert {m.scale for m in ad.modules} == scales
    save_file(tensors, w.path, metadata={"lora_adapter_metadata": json.dumps(
        {"r": 4, "use_dora": True})})
    with pytest.raises(UnsupportedAdapterError, match="use_dora=true in its metadata"):
        read_adapter(w.path)
    save_file(tensors, w.path, metadata={"lora_adapter_metadata": json.dumps(
        {"r": 4, "unet.r": 4})})
    with pytest.raises(FormatError, match="mixes fields with and without a component prefix"):
        read_adapter(w.path)


@pytest.mark.parametrize("header, message", [
    ({"unet.r": 8, "unet.lora_alpha": 8},
     ("module unet.down.attn1.to_q has rank 4 in its tensors but its header "
      "lora_adapter_metadata gives unet.r=8")),
    ({"unet.r": 4, "unet.rank_pattern": {"to_q": 16}},
     "gives unet.rank_pattern['to_q']=16"),
])
def test_diffusers_header_rank_that_is_not_the_tensors_is_refused(make, header, message):
    """As for a PEFT folder: the scale depends on r and diffusers could not load the file
    (it gave alpha over the header's r without a word)."""
    from safetensors.torch import load_file, save_file

    w = make.diffusers({"unet.down.attn1.to_q": (8, 8)}, r=4)
    save_file(load_file(w.path), w.path, metadata={"lora_adapter_metadata": json.dumps(header)})
    with pytest.raises(FormatError, match=re.escape(message)) as e:
        read_adapter(w.path)
    assert str(w.path) in str(e.value)


def test_lora_factors_in_another_layout_are_refused_not_passed_through(make):
    """A text encoder's ``lora_linear_layer`` keys next to diffusers-legacy UNet keys were
    kept as extra tensors: the conversion and its error covered part of the adapter."""
    from safetensors.torch import load_file, save_file

    w = make.diffusers_legacy({"down.attn1": (8, 8)}, r=4)
    tensors = load_file(w.path)
    key = "text_encoder.layers.0.q_proj.lora_linear_layer.down.weight"
    tensors[key] = torch.randn(4, 8)
    tensors[key.replace(".down.", ".up.")] = torch.randn(8, 4)
    save_file(tensors, w.path)
    with pytest.raises(FormatError, match=re.escape(
            f"tensor {key} looks like a LoRA factor but is not in the diffusers-legacy "
            "layout")):
        read_adapter(w.path)


def test_diffusers_header_nested_too_deep_is_not_json(make):
    from safetensors.torch import load_file, save_file

    w = make.diffusers({"unet.down.attn1.to_q": (8, 8)}, r=4)
    save_file(load_file(w.path), w.path,
              metadata={"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(FormatError, match="lora_adapter_metadata is not valid JSON"):
        read_adapter(w.path)


def test_kohya_alpha_zero_is_scale_1_and_an_alpha_of_several_values_is_refused(make):
    """sd-scripts reads alpha 0 as alpha = r (it wiped the module here); a non-scalar
    .alpha is no alpha anyone defines (it was passed through as an extra tensor)."""
    from safetensors.torch import load_file, save_file

    q0 = next(iter(KOHYA))
    w = make.kohya({q0: KOHYA[q0]}, r=4, alphas={q0: 0})
    assert read_adapter(w.path).module(q0).scale == 1.0
    tensors = load_file(w.path)
    tensors[f"{q0}.alpha"] = torch.tensor([4.0, 4.0])
    save_file(tensors, w.path)
    with pytest.raises(FormatError, match=rf"alpha tensor {q0}\.alpha has shape \[2\], "
                                          "expected one number"):
        read_adapter(w.path)


@pytest.mark.parametrize("keys, message", [
    (["lora_A.default.weight", "lora_B.default.weight", "lora_A.other.weight",
      "lora_B.other.weight"], "tensors of several adapters"),
    (["lora_A.default.weight", "lora_B.other.weight"], "tensors of several adapters"),
    (["lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"],
     "both give module model.layers.0.self_attn.q_proj a factor"),
    (["lora_A.weight", "lora_B.weight", "!lora_A.weight", "!lora_B.weight"],
     "both give module model.layers.0.self_attn.q_proj a factor"),
])
def test_peft_keys_that_clash_are_refused(tmp_path, keys, message):
    """Two tensors for one factor of one module (two adapter names, a prefixed and an
    unprefixed key, a linear and an embedding pair): one was dropped without a word."""
    from safetensors.torch import save_file

    mod = "model.layers.0.self_attn.q_proj"
    tensors = {}
    for k in keys:
        prefix = "" if k.startswith("!") else "base_model.model."
        shape = (4, 32) if "_A" in k else (32, 4)
        tensors[f"{prefix}{mod}.{k.lstrip('!')}"] = torch.randn(shape)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(FormatError, match=re.escape(message)):
        read_adapter(tmp_path / "a")


@pytest.mark.parametrize("how", ["dangling link", "folder", "link loop", "pipe"])
def test_peft_folder_whose_config_is_not_a_file_is_refused(tmp_path, how):
    """The weights were read as a diffusers file without the config's scale (x2 here)."""
    from factory import write_random_peft

    folder, _ = write_random_peft(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 8)},
                                  r=4, alpha=8)
    config = folder / "adapter_config.json"
    config.unlink()
    if how == "folder":
        config.mkdir()
    elif how == "pipe":
        os.mkfifo(config)
    else:
        config.symlink_to("missing.json" if how == "dangling link" else config.name)
    want = {"folder": "a folder", "pipe": "a pipe, socket or device"}.get(
        how, "which does not exist or loops")
    with pytest.raises(FormatError, match=rf"adapter_config\.json: cannot read \(.*{want}"):
        read_adapter(folder)


def test_a_link_loop_is_named_as_one(tmp_path):
    (tmp_path / "x.safetensors").symlink_to("x.safetensors")
    with pytest.raises(FormatError, match=r"x\.safetensors: a link to x\.safetensors, which "
                                          "does not exist or loops"):
        read_adapter(tmp_path / "x.safetensors")


def test_a_special_file_is_named_as_one(tmp_path):
    """A pipe named like an adapter file was refused with 'Not a directory'."""
    os.mkfifo(tmp_path / "x.safetensors")
    for path in (tmp_path / "x.safetensors", Path("/dev/null")):
        with pytest.raises(FormatError, match=rf"{re.escape(str(path))}: not a file or folder: "
                                              "a pipe, socket or device"):
            read_adapter(path)


def test_paths_that_are_not_utf8_are_read(tmp_path):
    """The safetensors library takes UTF-8 paths only; such a folder was called corrupt."""
    import os
    import shutil

    from factory import write_random_peft

    from mosconv.fit.convert import ConvertConfig
    from mosconv.mos.format import load_mos
    from mosconv.pipeline import compress

    folder, _ = write_random_peft(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 8)},
                                  r=4, alpha=8)
    odd = tmp_path / os.fsdecode(b"odd\xff")
    try:
        shutil.copytree(folder, odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    want = read_adapter(folder).modules[0]
    got = read_adapter(odd).modules[0]
    assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B) and got.scale == want.scale
    out = tmp_path / os.fsdecode(b"mos\xfe")
    compress(odd, out, ConvertConfig(ratio=2))
    assert load_mos(out).params > 0
