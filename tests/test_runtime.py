"""runtime: attach MoS / LoRA adapters to tiny randomly initialized transformers models and
compare with PEFT loading the exported (or original) LoRA; pools stored once; merge, remove,
switching, training, and the errors (each leaving the model unchanged)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factory import write_random_peft
from torch import nn

import mosconv
from mosconv import ConfigError, FormatError, UnsupportedAdapterError, read_adapter
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.lora.types import LoraAdapter, LoraModule
from mosconv.model.runtime import AdapterLayer
from mosconv.mos.format import load_mos, save_mos
from mosconv.pipeline import export_lora

pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("single_thread")]


class Case:
    """A tiny base model with a LoRA folder, its MoS conversion and the MoS export."""

    def __init__(self, root: Path, base: nn.Module, modules: dict, *, fan_in_fan_out: bool,
                 config: ConvertConfig, shared_A: bool = False) -> None:
        self.base, self.root = base, root
        self.lora, _ = write_random_peft(root / "lora", modules, r=4, alpha=8, seed=1,
                                         b_std=0.05, fan_in_fan_out=fan_in_fan_out,
                                         shared_A=shared_A)
        result = convert(read_adapter(self.lora), config)
        self.report = result.report
        self.mos_dir = save_mos(result.mos, root / "mos", result.report)
        self.mos = load_mos(self.mos_dir)
        self.export = export_lora(self.mos_dir, root / "exp")
        self.ids = torch.randint(0, base.config.vocab_size, (2, 7),
                                 generator=torch.Generator().manual_seed(2))

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(self.ids).logits.clone()

    def peft_logits(self, folder: Path) -> torch.Tensor:
        from peft import PeftModel

        return self.logits(PeftModel.from_pretrained(self.fresh(), folder).eval())


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).float().eval()
    modules = {f"model.layers.{i}.self_attn.{p}": s for i in range(layers)
               for p, s in (("q_proj", (32, 32)), ("v_proj", (16, 32)), ("o_proj", (32, 32)))}
    return model, modules


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, modules = _llama(2)
    return Case(tmp_path_factory.mktemp("llama"), model, modules, fan_in_fan_out=False,
                config=ConvertConfig(ratio=2))


@pytest.fixture(scope="module")
def llama_shared(tmp_path_factory):
    """Layers share their A directions; the thorough search keeps shared pools."""
    model, modules = _llama(4)
    case = Case(tmp_path_factory.mktemp("llama_shared"), model, modules, fan_in_fan_out=False,
                config=ConvertConfig(ratio=4, search="thorough"), shared_A=True)
    assert any(k["structure"] != "private" for k in case.report.to_json()["kinds"])
    return case


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(cfg).float().eval()
    modules = {}
    for i in range(2):
        modules[f"transformer.h.{i}.attn.c_attn"] = (96, 32)
        modules[f"transformer.h.{i}.attn.c_proj"] = (32, 32)
        modules[f"transformer.h.{i}.mlp.c_proj"] = (32, 128)
    return Case(tmp_path_factory.mktemp("gpt2"), model, modules, fan_in_fan_out=True,
                config=ConvertConfig(ratio=2))


CASES = ["llama", "llama_shared", "gpt2"]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def _assert_plain(model: nn.Module) -> None:
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not hasattr(model, "mos_adapters")


def _unique_numel(model: nn.Module) -> int:
    ptrs = {}
    for p in model.parameters():
        ptrs[p.data_ptr()] = p.numel()
    return sum(ptrs.values())


# ------------------------------------------------------------------ equivalence with PEFT


@pytest.mark.parametrize("case", CASES)
def test_mos_matches_peft_on_export(case, request):
    c = request.getfixturevalue(case)
    plain = c.logits(c.base)
    want = c.peft_logits(c.export)
    model = mosconv.apply(c.fresh(), c.mos_dir)
    got = c.logits(model)
    assert float((want - plain).abs().max()) > 1e-3  # the adapter changes the output
    assert float((got - want).abs().max()) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_lora_matches_peft(case, request):
    c = request.getfixturevalue(case)
    model = mosconv.apply(c.fresh(), c.lora)
    assert float((c.logits(model) - c.peft_logits(c.lora)).abs().max()) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_pools_stored_once(case, request):
    c = request.getfixturevalue(case)
    base_numel = _unique_numel(c.base)
    base_keys = set(c.base.state_dict())
    model = mosconv.apply(c.fresh(), c.mos)
    assert _unique_numel(model) == base_numel + c.mos.params
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in c.base.parameters()) + c.mos.params
    sd = model.state_dict()
    pool_keys = sorted(k for k in sd if k.endswith((".pool_A", ".pool_B")))
    n_kinds = len(c.mos.kinds)
    assert pool_keys == sorted(f"mos_adapters.default.k{i}.pool_{s}"
                               for i in range(n_kinds) for s in "AB")
    assert len({sd[k].data_ptr() for k in pool_keys}) == 2 * n_kinds
    assert not any(k.endswith("pool_A") for k in sd if k not in pool_keys)
    new = set(sd) - {k for k in sd if k.replace(".base.", ".") in base_keys}
    assert all(k.startswith("mos_adapters.") or ".deltas.default." in k for k in new)
    params = mosconv.trainable_parameters(model, "default")
    assert sum(p.numel() for p in params) == c.mos.params
    assert len({id(p) for p in params}) == len(params)


def test_shared_case_has_shared_pools_and_weights(llama_shared):
    shared = [k for k in llama_shared.report.to_json()["kinds"] if k["structure"] != "private"]
    assert shared and all(k["public_A"] + k["public_B"] > 0 for k in shared)
    routed = {}
    for m in llama_shared.mos.modules:  # several modules route into one public pool
        routed.setdefault(m.kind, []).append(m)
    assert any(len(v) > 1 for v in routed.values())


# ------------------------------------------------------------------ merge, remove, switch


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_attached(case, request):
    c = request.getfixturevalue(case)
    model = mosconv.apply(c.fresh(), c.mos_dir)
    attached = c.logits(model)
    types = {n: type(m) for n, m in c.base.named_modules()}
    keys = list(c.base.state_dict())
    merged = mosconv.merge(model)
    assert merged is model
    _assert_plain(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert list(model.state_dict()) == keys
    assert float((c.logits(model) - attached).abs().max()) < 1e-4
    assert float((c.logits(model) - c.logits(c.base)).abs().max()) > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_remove_restores_state_dict(case, request):
    c = request.getfixturevalue(case)
    model = c.fresh()
    before = _state(model)
    originals = {n: m for n, m in model.named_modules()}
    mosconv.apply(model, c.mos_dir, name="mos")
    mosconv.apply(model, c.lora, name="lora")
    assert mosconv.adapter_names(model) == ["mos", "lora"]
    mosconv.remove(model, "mos")
    assert mosconv.adapter_names(model) == ["lora"] and not hasattr(model, "mos_adapters")
    mosconv.remove(model)
    _assert_plain(model)
    _assert_same_state(model, before)
    assert all(dict(model.named_modules())[n] is m for n, m in originals.items())
    assert torch.equal(c.logits(model), c.logits(c.base))


def test_switch_between_adapters(llama):
    c = llama
    model = c.fresh()
    mosconv.apply(model, c.mos_dir, name="mos")
    mosconv.apply(model, c.lora, name="lora", activate=False)
    assert mosconv.active_adapter(model) == "mos"
    mos_out = c.logits(model)
    mosconv.set_active(model, "lora")
    assert float((c.logits(model) - c.peft_logits(c.lora)).abs().max()) < 1e-4
    mosconv.set_active(model, None)
    assert torch.equal(c.logits(model), c.logits(c.base))
    mosconv.set_active(model, "mos")
    assert torch.equal(c.logits(model), mos_out)
    mosconv.merge(model, "lora")  # a named adapter, not the active one
    _assert_plain(model)
    assert float((c.logits(model) - c.peft_logits(c.lora)).abs().max()) < 1e-4
    with pytest.raises(ConfigError):
        mosconv.set_active(model, "mos")
    with pytest.raises(ConfigError):
        mosconv.merge(model)


def test_suffix_matching_base_model_without_head(gpt2):
    """An adapter trained on GPT2LMHeadModel (``transformer.h.0...``) on a bare GPT2Model."""
    c = gpt2
    full = mosconv.apply(c.fresh(), c.mos_dir)
    bare = mosconv.apply(copy.deepcopy(c.base.transformer), c.mos_dir)
    with torch.no_grad():
        want = full.transformer(c.ids).last_hidden_state
        got = bare(c.ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert isinstance(bare.h[0].attn.c_attn, AdapterLayer)


# ------------------------------------------------------------------ training, dtypes


def _with_slot_weights(case: Case, out: Path) -> Path:
    """The shared case's MoS adapter with random per-slot weights on every module."""
    g = torch.Generator().manual_seed(5)
    mods = tuple(replace(m, weights_A=1 + 0.5 * torch.randn(m.routes_A.numel(), generator=g),
                         weights_B=1 + 0.5 * torch.randn(m.routes_B.numel(), generator=g))
                 for m in case.mos.modules)
    return save_mos(replace(case.mos, modules=mods), out)


def test_slot_weights_match_peft(llama_shared, tmp_path):
    c = llama_shared
    mos_dir = _with_slot_weights(c, tmp_path / "mos")
    mos = load_mos(mos_dir)
    export = export_lora(mos_dir, tmp_path / "exp")
    model = mosconv.apply(c.fresh(), mos_dir)
    assert float((c.logits(model) - c.peft_logits(export)).abs().max()) < 1e-4
    params = mosconv.trainable_parameters(model, "default")
    n_slots = sum(m.weights_A.numel() + m.weights_B.numel() for m in mos.modules)
    assert sum(p.numel() for p in params if p.dim() == 1) == n_slots
    assert _unique_numel(model) == _unique_numel(c.base) + mos.params
    merged = c.logits(model)
    mosconv.merge(model)
    assert float((c.logits(model) - merged).abs().max()) < 1e-4


def test_trainable_gradients_reach_adapter_only(llama_shared, tmp_path):
    c = llama_shared
    model = c.fresh().requires_grad_(False)
    mosconv.apply(model, _with_slot_weights(c, tmp_path / "mos"), trainable=True)
    params = mosconv.trainable_parameters(model, "default")
    assert all(p.requires_grad for p in params) and any(p.dim() == 1 for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    model(c.ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    base = mosconv.apply(c.fresh(), c.mos_dir, name="frozen")  # base model's flags untouched
    assert all(p.requires_grad for n, p in base.named_parameters() if "mos_adapters" not in n
               and ".deltas." not in n)
    assert not any(p.requires_grad for p in mosconv.trainable_parameters(base, "frozen"))
    lora = mosconv.apply(c.fresh().requires_grad_(False), c.lora, trainable=True)
    assert len(mosconv.trainable_parameters(lora, "default")) == 2 * len(c.mos.modules)


def test_dtype_cast_and_autocast(llama):
    c = llama
    model = mosconv.apply(c.fresh().to(torch.bfloat16), c.mos_dir)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert c.logits(model).dtype == torch.bfloat16
    ref = c.logits(mosconv.apply(c.fresh(), c.mos_dir))
    model32 = mosconv.apply(c.fresh(), c.mos_dir)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model32(c.ids).logits.float()
    assert float((got - ref).abs().max()) < 0.1


# ------------------------------------------------------------------ errors, model unchanged


def _lora(*modules: LoraModule) -> LoraAdapter:
    return LoraAdapter(format="peft", modules=tuple(modules))


def _pair(name: str, d_out: int, d_in: int, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(3)
    return LoraModule(name, torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g),
                      1.0, **kw)


def _raises_unchanged(model: nn.Module, cls, adapter, *words: str, **kw) -> None:
    before = _state(model)
    names = mosconv.adapter_names(model)
    with pytest.raises(cls) as info:
        mosconv.apply(model, adapter, **kw)
    assert type(info.value) is cls
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    _assert_same_state(model, before)
    assert mosconv.adapter_names(model) == names


Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"


def test_shape_mismatch(llama):
    model = llama.fresh()
    bad = _lora(_pair(Q0, 32, 32), _pair(Q1, 48, 32))  # the second one is wrong
    _raises_unchanged(model, ConfigError, bad, Q1, "base model and adapter do not match",
                      "(32, 32)", "(48, 32)")
    _assert_plain(model)


def test_missing_and_ambiguous_module(llama, gpt2):
    model = llama.fresh()
    missing = "model.layers.7.self_attn.q_proj"
    _raises_unchanged(model, ConfigError, _lora(_pair(Q0, 32, 32), _pair(missing, 32, 32)),
                      missing, "not found in the base model")
    _raises_unchanged(model, ConfigError, _lora(_pair("self_attn.q_proj", 32, 32)),
                      "self_attn.q_proj", "not found in the base model")  # several matches
    _assert_plain(model)


def test_unsupported_layers(llama):
    model = llama.fresh()
    _raises_unchanged(model, UnsupportedAdapterError,
                      _lora(_pair(Q0, 32, 32), _pair("model.embed_tokens", 32, 64)),
                      "model.embed_tokens", "Embedding")
    _raises_unchanged(model, UnsupportedAdapterError,
                      _lora(_pair("model.embed_tokens", 32, 64, embedding=True)),
                      "model.embed_tokens", "embedding")
    _raises_unchanged(model, UnsupportedAdapterError,
                      _lora(_pair(Q0, 32, 32, conv_shape=(32, 32, 1, 1))), Q0, "conv")
    _assert_plain(model)


def test_a_peft_model_is_refused_by_name(llama):
    """A model already holding PEFT's LoRA layers: the message names PEFT's class and the way
    back to the base model (it said "base layer Linear is not supported")."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(llama.fresh(), llama.lora)
    with pytest.raises(UnsupportedAdapterError,
                       match=r"already holds PEFT adapter layers \(peft\.tuners\.lora\."
                             r"layer\.Linear\).*PeftModel\.unload\(\)"):
        mosconv.apply(model, llama.mos_dir)
    assert mosconv.adapter_names(model) == []


def test_duplicate_name_and_bad_arguments(llama):
    c = llama
    model = mosconv.apply(c.fresh(), c.mos_dir, name="x")
    _raises_unchanged(model, ConfigError, c.lora, "'x'", "already attached", name="x")
    _raises_unchanged(model, ConfigError, c.lora, "a.b", name="a.b")
    _raises_unchanged(model, ConfigError, 42, "int")
    _raises_unchanged(model, FormatError, c.root / "nope", "nope")
    for call in (lambda: mosconv.set_active(model, "y"), lambda: mosconv.remove(model, "y"),
                 lambda: mosconv.trainable_parameters(model, "y")):
        with pytest.raises(ConfigError, match="'y': not attached"):
            call()
    assert mosconv.adapter_names(model) == ["x"]


def test_load_base_model_errors(tmp_path):
    from mosconv.model.hf import load_base_model

    with pytest.raises(FormatError, match="no such file or folder"):
        load_base_model(tmp_path / "missing")
    with pytest.raises(FormatError, match="no such GGUF file"):
        load_base_model(tmp_path, gguf_file="model.gguf")
    with pytest.raises(FormatError, match="not a model folder") as info:
        load_base_model(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="cannot load a model") as info:
        load_base_model(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    gguf = tmp_path / "ggufs"
    gguf.mkdir()
    (gguf / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"a folder of GGUF files \(m.Q4.gguf\) and no "
                                          "config.json: name the file to load") as info:
        load_base_model(gguf)
    assert info.value.options == ("gguf_file",)


def test_a_model_folder_s_own_code_is_never_run(tmp_path, monkeypatch, capfd):
    """A config or tokenizer naming code in the folder (auto_map) is refused, without
    transformers' stdin prompt, even with "y" waiting there, and the code does not run."""
    import io
    import json

    from mosconv.model.hf import load_base_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evilmodel", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    for name in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (model / f"{name}.py").write_text(f"open({str(tmp_path / name)!r}, 'w').write('ran')\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    with pytest.raises(FormatError, match="never runs code from a model folder") as info:
        load_base_model(model)
    assert str(model) in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.glob("*_evil"))
    assert "custom code" not in capfd.readouterr().out


def test_modules_to_save_are_refused_unless_the_lora_part_alone_is_asked_for(llama):
    model = llama.fresh()
    head = "base_model.model.lm_head.weight"
    ad = LoraAdapter(format="peft", modules=(_pair(Q0, 32, 32),),
                     extra_tensors={head: torch.zeros(3, 4)})
    _raises_unchanged(model, UnsupportedAdapterError, ad, head, "modules_to_save",
                      "extra='ignore'")
    _raises_unchanged(model, ConfigError, ad, "'refuse' or 'ignore'", extra="apply")
    with pytest.raises(ConfigError, match="torch.nn.Module, got NoneType"):
        mosconv.apply(None, ad)
    mosconv.apply(model, ad, extra="ignore")
    assert mosconv.adapter_names(model) == ["default"]
    # a kohya scale left without its factors changes nothing PEFT would apply
    alone = LoraAdapter(format="kohya", modules=(_pair(Q0, 32, 32),),
                        extra_tensors={"lora_unet_x.alpha": torch.tensor(4.0)})
    mosconv.apply(model, alone, name="k")


def test_an_adapter_in_the_active_mixed_batch_is_not_removed(llama):
    c = llama
    model = mosconv.apply(c.fresh(), c.mos_dir, name="a")
    mosconv.apply(model, c.lora, name="b")
    mosconv.set_active(model, ["a", "b"])
    with pytest.raises(ConfigError, match="'a': rows of the active mixed batch use it"):
        mosconv.remove(model, "a")
    assert mosconv.adapter_names(model) == ["a", "b"]
    mosconv.set_active(model, "b")
    mosconv.remove(model, "a")
    assert mosconv.adapter_names(model) == ["b"]
    mosconv.set_active(model, ["b", None])
    mosconv.remove(model)  # everything: the mixed batch goes with it
    _assert_plain(model)


def test_joint_zoo_members_apply_merge_export_and_train_their_cores(tmp_path):
    """Format v2 adapters from a joint zoo fit (shared bases, a core each): apply gives
    PEFT's logits on the exported LoRA, merge the same, and the cores are trainable."""
    from safetensors.torch import load_file, save_file
    from test_batch import write_lora_like

    from mosconv.batch.run import BatchConfig, run_batch

    base, _ = _llama(2)
    zoo = tmp_path / "zoo"
    for i in range(2):
        write_lora_like(zoo / f"t{i}", i, layers=2, d=32, d_kv=16, r=4)
    # a later checkpoint of t0 (B grown by 10%, a little noise): both sides shared, cores pay
    later = shutil.copytree(zoo / "t0", zoo / "t0-later")
    t = load_file(str(later / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(5)
    t = {k: v * 1.1 + 0.01 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
         for k, v in t.items()}
    save_file(t, str(later / "adapter_model.safetensors"))
    summary = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=4.0, shared_pool=True))
    assert summary.failed == 0
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits.clone()

    cored = 0
    for a in summary.adapters:
        mos_dir = tmp_path / "out" / a.name
        mos = load_mos(mos_dir)
        cored += sum(m.core is not None for m in mos.modules)
        exp = export_lora(mos_dir, tmp_path / "exp" / a.name)
        from peft import PeftModel

        want = logits(PeftModel.from_pretrained(copy.deepcopy(base), exp).eval())
        model = copy.deepcopy(base)
        mosconv.apply(model, mos_dir, name="m")
        assert float((logits(model) - want).abs().max()) < 1e-4
        params = mosconv.trainable_parameters(model, "m")
        assert sum(p.numel() for p in params) == mos.params  # pools (shared rows too) + cores
        mosconv.merge(model, "m")
        assert float((logits(model) - want).abs().max()) < 1e-4
    assert cored > 0


def test_merge_refuses_a_weight_tied_to_another(tmp_path):
    """An lm_head tied to the input embeddings: merging would change the embeddings too (the
    merged model would differ from the attached one); refused, the model left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lora, _ = write_random_peft(tmp_path / "lora", {"lm_head": (64, 32),
                                                    "model.layers.0.self_attn.q_proj": (32, 32)},
                                r=4, alpha=8, seed=1, b_std=0.3)
    mosconv.apply(model, lora)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"lm_head: its weight is tied to "
                                          r"model\.embed_tokens\.weight"):
        mosconv.merge(model)
    assert mosconv.adapter_names(model) == ["default"]
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.lm_head.base.weight = nn.Parameter(model.lm_head.base.weight.detach().clone())
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attached = model(ids).logits
        emb = model.model.embed_tokens.weight.clone()
        mosconv.merge(model)  # untied: merged as attached, the embeddings untouched
        assert float((model(ids).logits - attached).abs().max()) < 1e-4
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_adapter_names_in_the_order_attached(llama):
    """Adapters on different layers: listed as attached, not as the layers are walked."""
    model = llama.fresh()
    for name, target in (("late", Q1), ("early", Q0), ("both", Q0)):
        mosconv.apply(model, _lora(_pair(target, 32, 32)), name=name, activate=False)
    assert mosconv.adapter_names(model) == ["late", "early", "both"]
    mosconv.remove(model, "late")
    mosconv.apply(model, _lora(_pair(Q1, 32, 32)), name="late", activate=False)
    assert mosconv.adapter_names(model) == ["early", "both", "late"]
