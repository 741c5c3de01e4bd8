"""export: a MoS folder back to a plain PEFT LoRA folder (scale folded, lora_alpha == r),
checked against the source adapter, against the MoS update, and by loading it with PEFT
into small randomly initialized transformers models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factory import llama_like, write_random_peft
from helpers import PEFT_PREFIX, dense, lowrank_rel_diff, mos_dense, zoo_path
from safetensors.torch import load_file

from mosconv import FormatError, MosconvError, read_adapter
from mosconv.fit.convert import ConvertConfig
from mosconv.lora.write import write_peft_folder
from mosconv.mos.format import load_mos
from mosconv.pipeline import compress, export_lora

pytestmark = pytest.mark.usefixtures("single_thread")


LOSSLESS = ConvertConfig(ratio=1, search="truncation", dtype="float32")
# Fields export rewrites; every other field of the source config must come back unchanged.
REWRITTEN = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora"}


def _pattern_value(patterns: dict, default, name: str):
    """What PEFT uses for module ``name``: the matching pattern's value, else the default."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), name)
    return patterns.get(key, default)


def _check_peft_config(cfg: dict, ranks: dict[str, int]) -> None:
    """lora_alpha == r everywhere, as PEFT resolves rank_pattern / alpha_pattern; the most
    common rank is the top-level r."""
    from collections import Counter

    assert cfg["peft_type"] == "LORA"
    assert cfg["lora_alpha"] == cfg["r"]
    counts = Counter(ranks.values())
    assert counts[cfg["r"]] == max(counts.values())
    assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, r in ranks.items():
        assert _pattern_value(rp, cfg["r"], name) == r, name
        assert _pattern_value(ap, cfg["lora_alpha"], name) == r, name


def _export_ratio1(name, tmp_path):
    src = zoo_path(name)
    compress(src, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    return read_adapter(src), read_adapter(tmp_path / "exp")


@pytest.mark.parametrize("name", [
    "distilbert-imdb-seqcls", "gpt2-tigrinya-lora", "open-calm-1b-r1-fp16",
    "gpt2-great-tabular-bin", "opt-125m-lora-ckpts/final",
])
def test_zoo_ratio1_export_gives_back_original_updates(name, tmp_path):
    source, exported = _export_ratio1(name, tmp_path)
    assert [m.name for m in exported.modules] == [m.name for m in source.modules]
    for s, e in zip(source.modules, exported.modules):
        assert e.scale == 1.0  # scale folded into B
        assert e.embedding == s.embedding
        assert lowrank_rel_diff(s.A, s.B, s.scale, e.A, e.B, e.scale) < 1e-5, s.name

    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    _check_peft_config(cfg, {m.name: m.r for m in exported.modules})
    for key, value in source.config.items():
        if key not in REWRITTEN:
            assert cfg.get(key) == value, key
    assert cfg.get("fan_in_fan_out", False) == source.fan_in_fan_out
    assert exported.fan_in_fan_out == source.fan_in_fan_out


def test_lowrank_rel_diff_agrees_with_dense():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    A2, B2 = A1 + 0.01 * torch.randn(3, 7, generator=g), torch.randn(5, 2, generator=g)[:, :1]
    A2 = A2[:1]
    ref = dense(A1, B1, 2.0)
    want = float((dense(A2, B2, 0.5) - ref).norm() / ref.norm())
    assert lowrank_rel_diff(A1, B1, 2.0, A2, B2, 0.5) == pytest.approx(want, rel=1e-9)


def test_ratio1_export_of_embedding_module(tmp_path):
    folder, pairs = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8),
                                      embeddings={"model.embed_tokens": (40, 16)})
    compress(folder, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    keys = set(load_file(str(tmp_path / "exp" / "adapter_model.safetensors")))
    assert f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_A" in keys
    assert f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_B" in keys
    exported = read_adapter(tmp_path / "exp")
    for name, (A, B) in pairs.items():
        e = exported.module(name)
        assert e.embedding == (name == "model.embed_tokens")
        assert lowrank_rel_diff(A, B, 8 / 4, e.A, e.B, e.scale) < 1e-5, name


def test_distilbert_extra_tensors_come_back_bit_identical(tmp_path):
    src = zoo_path("distilbert-imdb-seqcls")
    compress(src, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    before = load_file(str(src / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "exp" / "adapter_model.safetensors"))
    extra = [k for k in before if "lora_" not in k]
    assert any("classifier" in k for k in extra)
    assert sorted(k for k in after if "lora_" not in k) == sorted(extra)
    for key in extra:
        assert after[key].dtype == before[key].dtype, key
        assert after[key].shape == before[key].shape, key
        assert torch.equal(after[key], before[key]), key
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", "score"]
    assert cfg["task_type"] == "SEQ_CLS"


def test_gpt2_tigrinya_keeps_fan_in_fan_out(tmp_path):
    _, exported = _export_ratio1("gpt2-tigrinya-lora", tmp_path)
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert exported.fan_in_fan_out is True
    # two kinds named c_proj (attn 768x768, mlp 768x3072) both come back
    shapes = {(m.name.split(".")[-2], m.d_out, m.d_in) for m in exported.modules
              if m.name.endswith("c_proj")}
    assert shapes == {("attn", 768, 768), ("mlp", 768, 3072)}


def test_export_refuses_diffusers_legacy_source(tmp_path):
    compress(zoo_path("sd15-diffusers-attnproc-r4"), tmp_path / "mos", LOSSLESS)
    with pytest.raises(FormatError) as e:
        export_lora(tmp_path / "mos", tmp_path / "exp")
    msg = str(e.value)
    assert "\n" not in msg
    assert "diffusers-legacy" in msg and str(tmp_path / "mos") in msg
    assert not (tmp_path / "exp" / "adapter_config.json").exists()


def test_export_matches_mos_update_including_rank_zero_modules(tmp_path):
    """At a tight budget some modules get rank 0: they are exported as a zero pair; every
    other module's exported update is exactly the MoS update."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for name, (d_out, d_in) in llama_like(layers=4, d=32, d_kv=16).items():
        tiny = 1e-4 if name.startswith("model.layers.3.") else 1.0
        rows.append((name, torch.randn(4, d_in, generator=g),
                     tiny * torch.randn(d_out, 4, generator=g), False))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
           "target_modules": ["q_proj", "v_proj"]}
    write_peft_folder(tmp_path / "lora", rows, cfg)
    compress(tmp_path / "lora", tmp_path / "mos", ConvertConfig(ratio=8))
    export_lora(tmp_path / "mos", tmp_path / "exp")
    mos = load_mos(tmp_path / "mos")
    assert any(m.r == 0 for m in mos.modules)  # the point of this case
    exported = read_adapter(tmp_path / "exp")
    assert [m.name for m in exported.modules] == [m.name for m in mos.modules]
    for e in exported.modules:
        m = mos.module(e.name)
        assert e.r == max(m.r, 1)
        got, want = dense(e.A, e.B, e.scale), mos_dense(mos, e.name)
        if m.r == 0:
            assert float(got.abs().max()) == 0.0
        else:
            assert float((got - want).norm()) <= 1e-6 * float(want.norm()), e.name
    exp_cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    _check_peft_config(exp_cfg, {m.name: m.r for m in exported.modules})


def test_export_of_rslora_source_folds_its_scale(tmp_path):
    """use_rslora (scale alpha / sqrt(r)) becomes false in the export, with the scale folded,
    so PEFT applies exactly the source update."""
    folder, pairs = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8),
                                      r=4, alpha=8, config={"use_rslora": True})
    compress(folder, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False
    exported = read_adapter(tmp_path / "exp")
    for name, (A, B) in pairs.items():
        e = exported.module(name)
        assert e.scale == 1.0
        assert lowrank_rel_diff(A, B, 8 / math.sqrt(4), e.A, e.B, e.scale) < 1e-5, name


def test_export_derives_target_modules_when_source_has_none(tmp_path):
    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8),
                                  config={"target_modules": None})
    compress(folder, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_export_refuses_to_overwrite(tmp_path):
    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8))
    compress(folder, tmp_path / "mos", LOSSLESS)
    export_lora(tmp_path / "mos", tmp_path / "exp")
    before = (tmp_path / "exp" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(MosconvError, match="already holds an output") as e:
        export_lora(tmp_path / "mos", tmp_path / "exp")
    assert e.value.options == ("overwrite",)
    assert (tmp_path / "exp" / "adapter_model.safetensors").read_bytes() == before
    export_lora(tmp_path / "mos", tmp_path / "exp", overwrite=True)
    assert (tmp_path / "exp" / "adapter_config.json").is_file()


def test_export_never_replaces_the_lora_it_came_from(tmp_path):
    """``export mos lora --overwrite`` replaced the trained LoRA with its lossy
    reconstruction; the source is known by the files mos_config.json records."""
    import shutil

    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8))
    compress(folder, tmp_path / "mos", ConvertConfig(ratio=4))
    shutil.copytree(folder, tmp_path / "moved")  # found by content, wherever it is
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for target in (folder, tmp_path / "moved"):
        with pytest.raises(MosconvError, match="holds the LoRA this MoS adapter was converted "
                                               "from"):
            export_lora(tmp_path / "mos", target, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    export_lora(tmp_path / "mos", tmp_path / "exp")  # another folder: fine
    export_lora(tmp_path / "mos", tmp_path / "exp", overwrite=True)  # its own output too


def test_a_failed_export_into_an_existing_folder_leaves_no_weights_behind(tmp_path,
                                                                         monkeypatch):
    """A disk full while the config was written left adapter_model.safetensors alone in the
    folder, which then read as a diffusers file of scale 1 (x lora_alpha / r off)."""
    import mosconv.lora.write

    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8))
    compress(folder, tmp_path / "mos", LOSSLESS)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "notes.txt").write_text("mine")

    def disk_full(path, data):
        raise MosconvError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(mosconv.lora.write, "atomic_write_json", disk_full)
    with pytest.raises(MosconvError, match="No space left"):
        export_lora(tmp_path / "mos", tmp_path / "exp")
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["notes.txt"]


def test_peft_weights_without_their_config_are_refused(tmp_path):
    """Read as a single file they got scale 1, not PEFT's lora_alpha / r."""
    import shutil

    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "adapter_model.safetensors", bare)
    for path in (bare, bare / "adapter_model.safetensors"):
        with pytest.raises(FormatError, match="PEFT weights without adapter_config.json beside "
                                              r"them: their scale \(lora_alpha / r\) is unknown"):
            read_adapter(path)


def test_export_of_missing_mos_folder_is_format_error(tmp_path):
    with pytest.raises(FormatError, match="not a MoS adapter"):
        export_lora(tmp_path / "nothing", tmp_path / "exp")


# ------------------------------------------------------------------ loading with PEFT


def _patched_logits(model_cls, base_dir, mos, ids, conv1d: bool):
    """Logits of the base model whose weights get ``W += scale * B_l @ A_l`` by hand."""
    model = model_cls.from_pretrained(base_dir).float().eval()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for m in mos.modules:
            A, B = mos.assemble(m)
            delta = m.scale * (B.double() @ A.double())
            w = mods[m.name].weight
            # Conv1D weights are (in, out); an embedding's update is (B @ A).T
            w += (delta.T if conv1d or m.embedding else delta).to(w.dtype)
        return model(ids).logits


def _peft_round_trip(tmp_path, model_cls, config, modules, *, fan_in_fan_out: bool,
                     embeddings=None):
    from peft import PeftModel

    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    model.save_pretrained(tmp_path / "base")
    names = dict(model.named_modules())
    for name, (d_out, d_in) in modules.items():  # the module names and shapes are the model's
        w = names[name].weight
        assert tuple(w.shape) == ((d_in, d_out) if fan_in_fan_out else (d_out, d_in)), name
    for name, shape in (embeddings or {}).items():
        assert tuple(names[name].weight.shape) == shape, name

    write_random_peft(tmp_path / "lora", modules, r=4, alpha=8, seed=1, b_std=0.05,
                      fan_in_fan_out=fan_in_fan_out, embeddings=embeddings)
    compress(tmp_path / "lora", tmp_path / "mos", ConvertConfig(ratio=2))
    export_lora(tmp_path / "mos", tmp_path / "exp")
    mos = load_mos(tmp_path / "mos")
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is fan_in_fan_out
    _check_peft_config(cfg, {m.name: max(m.r, 1) for m in mos.modules})

    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    base = model_cls.from_pretrained(tmp_path / "base").float().eval()
    with torch.no_grad():
        plain = base(ids).logits.clone()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exp").eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    # PEFT built each module with the exported rank and scale 1
    lora_layers = {n: mod for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")}
    for m in mos.modules:
        layer = lora_layers[f"{PEFT_PREFIX}{m.name}"]
        assert layer.r["default"] == max(m.r, 1), m.name
        assert layer.scaling["default"] == 1.0, m.name

    want = _patched_logits(model_cls, tmp_path / "base", mos, ids, conv1d=fan_in_fan_out)
    assert float((got - plain).abs().max()) > 1e-3  # the adapter does change the output
    assert float((got - want).abs().max()) < 1e-4
    return mos


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations seen by peft
def test_peft_loads_export_llama(tmp_path):
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    modules = {f"model.layers.{i}.self_attn.{p}": shape
               for i in range(2) for p, shape in (("q_proj", (64, 64)), ("v_proj", (32, 64)))}
    embeddings = {"model.embed_tokens": (128, 64)}  # lora_embedding_A / _B, update (B @ A).T
    mos = _peft_round_trip(tmp_path, LlamaForCausalLM, config, modules, fan_in_fan_out=False,
                           embeddings=embeddings)
    assert mos.module("model.embed_tokens").embedding
    assert len({m.r for m in mos.modules}) > 1  # per-module ranks go through rank_pattern


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_loads_export_gpt2_conv1d(tmp_path):
    pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    modules = {}
    for i in range(2):
        modules[f"transformer.h.{i}.attn.c_attn"] = (192, 64)
        modules[f"transformer.h.{i}.attn.c_proj"] = (64, 64)
        modules[f"transformer.h.{i}.mlp.c_proj"] = (64, 256)
    mos = _peft_round_trip(tmp_path, GPT2LMHeadModel, config, modules, fan_in_fan_out=True)
    assert len(mos.kinds) == 3  # attn.c_proj and mlp.c_proj are different kinds
    assert math.isfinite(mos.params)


@pytest.mark.parametrize("pad", ["auto", 32])
def test_export_pads_ranks_for_servers(pad, tmp_path):
    """--pad-rank: one rank for every module (vLLM/LoRAX read only the top-level r); the
    updates are unchanged."""
    from click.testing import CliRunner

    from mosconv.cli import main

    folder, _ = write_random_peft(tmp_path / "lora", llama_like(layers=2, d=16, d_kv=8), r=4)
    compress(folder, tmp_path / "mos", ConvertConfig(ratio=2))
    export_lora(tmp_path / "mos", tmp_path / "plain")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "mos"), str(tmp_path / "pad"),
                                    "--pad-rank", str(pad)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "pad" / "adapter_config.json").read_text())
    want = 8 if pad == "auto" else 32
    assert cfg["r"] == cfg["lora_alpha"] == want and not cfg["rank_pattern"]
    plain, padded = read_adapter(tmp_path / "plain"), read_adapter(tmp_path / "pad")
    for a, b in zip(plain.modules, padded.modules):
        assert b.r == want and b.scale == 1.0
        assert torch.equal(dense(a.A, a.B, a.scale), dense(b.A, b.B, b.scale))
    res = CliRunner().invoke(main, ["export", str(tmp_path / "mos"), str(tmp_path / "x"),
                                    "--pad-rank", "1"])
    assert res.exit_code == 1 and "above the rank 1" in res.output
    assert not (tmp_path / "x").exists()
