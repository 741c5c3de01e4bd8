"""Serving a converted zoo: every adapter attached once with its group's pools held once,
mixed batches (one adapter per row) equal to PEFT's mixed batches with the exported LoRAs,
under generate too, memory you can see, and clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import example_module

import mosconv
from mosconv import ConfigError, FormatError
from mosconv.batch.run import BatchConfig, run_batch
from mosconv.pipeline import export_lora

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

NAMES = ["zoo/task00", "zoo/task01", "zoo/task02", "zoo/task03"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama, a zoo of four LoRAs on it (examples/synthetic_zoo.py: two init seeds, a
    shared output subspace) converted with shared pools, each member exported to a PEFT LoRA."""
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve")
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().eval().save_pretrained(root / "base")
    example_module("synthetic_zoo").write_zoo(root / "zoo" / "zoo", 4, d=64, d_kv=32, r=8,
                                              layers=2, base="tiny-llama")
    summary = run_batch(root / "zoo", root / "out", BatchConfig(ratio=4, shared_pool=True))
    assert summary.failed == 0 and (root / "out" / "pools").is_dir()
    for n in NAMES:
        export_lora(root / "out" / n, root / "exp" / n)
    return root, LlamaForCausalLM


def _base(root, cls):
    return cls.from_pretrained(root / "base").float().eval()


def _uncached(model, ids):
    """The logits with the factor cache off (and emptied), then back on."""
    mosconv.set_factor_cache(0)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        mosconv.set_factor_cache(256 * 2**20)


def _peft(root, cls):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(root, cls), root / "exp" / NAMES[0],
                                      adapter_name=NAMES[0].replace("/", "_"))
    for n in NAMES[1:]:
        model.load_adapter(root / "exp" / n, adapter_name=n.replace("/", "_"))
    return model.eval()


def test_zoo_is_attached_with_its_pools_once(served):
    root, cls = served
    model = mosconv.apply(_base(root, cls), root / "out")
    assert mosconv.adapter_names(model) == NAMES
    report = mosconv.memory_report(model)
    assert report["adapters"] == 4 and report["shared_bytes"] > 0
    assert report["total_bytes"] == report["shared_bytes"] + sum(report["adapter_bytes"].values())
    assert report["total_bytes"] < report["lora_total_bytes"]
    # one copy of the group's pool file entries, whatever the number of members
    n_shared = sum(p.numel() for p in model.mos_shared_pools.parameters())
    assert n_shared * 4 == report["shared_bytes"]
    mosconv.remove(model, NAMES[0])
    assert hasattr(model, "mos_shared_pools")
    mosconv.remove(model)
    assert not hasattr(model, "mos_shared_pools") and not hasattr(model, "mos_adapters")


def test_mixed_batch_equals_peft_row_by_row(served):
    root, cls = served
    ids = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(1))
    rows = ["zoo/task01", "zoo/task00", None, "zoo/task03", "zoo/task01", "zoo/task02"]
    ours = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(ours, rows)
    peft = _peft(root, cls)
    peft_rows = [r.replace("/", "_") if r else "__base__" for r in rows]
    with torch.no_grad():
        got = ours(ids).logits
        want = peft(ids, adapter_names=peft_rows).logits
        plain = _base(root, cls)(ids).logits
    assert float((got - want).abs().max()) < 1e-4
    # members with a shared basis and a core each went through one pass for their rows
    layers = [m for m in ours.modules() if isinstance(m, mosconv.AdapterLayer)]
    assert any(m.shared_basis_rows >= 2 for m in layers)
    assert float((got[2] - plain[2]).abs().max()) < 1e-6  # None: the base model
    assert float((got[0] - plain[0]).abs().max()) > 1e-3  # the adapters do act
    # each row as if its adapter were the only one active
    for i, r in enumerate(rows):
        mosconv.set_active(ours, r)
        with torch.no_grad():
            one = ours(ids[i:i + 1]).logits
        assert float((one[0] - got[i]).abs().max()) < 1e-5


def test_mixed_batch_under_generate(served):
    root, cls = served
    ids = torch.randint(1, 128, (4, 5), generator=torch.Generator().manual_seed(2))
    rows = ["zoo/task02", None, "zoo/task00", "zoo/task02"]
    ours = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(ours, rows)
    peft = _peft(root, cls)
    peft_rows = [r.replace("/", "_") if r else "__base__" for r in rows]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = ours.generate(ids, **kw)
        want = peft.generate(input_ids=ids, adapter_names=peft_rows, **kw)
        rep = ours.generate(ids, num_return_sequences=2, num_beams=2, **kw)
    assert torch.equal(got, want)
    assert rep.shape[0] == 8  # rows repeated by generate follow their adapter


def test_bad_input(served, tmp_path):
    import shutil

    root, cls = served
    model = mosconv.apply(_base(root, cls), root / "out")
    with pytest.raises(ConfigError, match="zoo/nope"):
        mosconv.set_active(model, ["zoo/task00", "zoo/nope"])
    mosconv.set_active(model, ["zoo/task00", "zoo/task01", "zoo/task02"])
    with pytest.raises(ConfigError, match="3 adapter names for a batch of 4 rows"):
        model(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="mixed batch"):
        mosconv.merge(model)
    # a zoo folder whose pool file is missing: one line naming it, nothing attached
    shutil.copytree(root / "out", tmp_path / "out")
    for f in (tmp_path / "out" / "pools").glob("*.safetensors"):
        f.unlink()
    fresh = _base(root, cls)
    with pytest.raises(FormatError, match="pool file") as e:
        mosconv.apply(fresh, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert mosconv.adapter_names(fresh) == []
    with pytest.raises(ConfigError, match="already attached"):
        mosconv.apply(model, root / "out")


def test_a_zoo_reads_its_pool_file_once_and_checks_every_member(served, tmp_path, monkeypatch):
    import json
    import shutil

    from mosconv import fileio

    root, cls = served
    calls = []
    real = fileio.sha256_file
    monkeypatch.setattr(fileio, "sha256_file", lambda p: calls.append(p) or real(p))
    model = mosconv.apply(_base(root, cls), root / "out")
    assert len(mosconv.adapter_names(model)) == 4 and len(calls) == 1  # hashed once
    # a member recording another sha256 of the pool file is refused, with nothing attached
    shutil.copytree(root / "out", tmp_path / "out")
    cfg_path = tmp_path / "out" / "zoo" / "task02" / "mos_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in cfg["kinds"]:
        if k.get("shared_pool"):
            k["shared_pool"]["sha256"] = "0" * 64
    cfg_path.write_text(json.dumps(cfg))
    fresh = _base(root, cls)
    with pytest.raises(FormatError, match="task02.*sha256"):
        mosconv.apply(fresh, tmp_path / "out")
    assert mosconv.adapter_names(fresh) == []


def test_factor_cache_is_bounded_and_never_stale(served):
    from mosconv.model.runtime import FACTORS

    root, cls = served
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    model = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(model, "zoo/task00")
    try:
        mosconv.set_factor_cache(4096)  # a few modules' factors at most
        with torch.no_grad():
            first = model(ids).logits
            again = model(ids).logits
        assert 0 < FACTORS.bytes <= 4096 and torch.equal(first, again)
        # an in-place change of a pool (an optimizer step) is seen at the next forward
        with torch.no_grad():
            for kp in [*model.mos_adapters.modules(), *model.mos_shared_pools.modules()]:
                if hasattr(kp, "pool_B"):
                    kp.pool_B.mul_(2.0)
            changed = model(ids).logits
        mosconv.set_factor_cache(0)
        with torch.no_grad():
            fresh = model(ids).logits
        assert FACTORS.bytes == 0
        assert float((changed - first).abs().max()) > 1e-4
        assert torch.equal(changed, fresh)
    finally:
        mosconv.set_factor_cache(256 * 2**20)


def test_a_fused_optimizer_step_is_seen(served):
    """AdamW(fused=True) (transformers' Trainer default) updates the pools without bumping
    their version counters: trainable adapters are not cached, so eval after a step sees it."""
    root, cls = served
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    model = mosconv.apply(_base(root, cls), root / "out" / NAMES[0], name="a",
                          trainable=True)
    params = mosconv.trainable_parameters(model, "a")
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    with torch.no_grad():
        before = model(ids).logits
    model(ids).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().max()) > 1e-4 and torch.equal(after, _uncached(model, ids))


def test_shared_pools_follow_a_cast_after_attaching(served):
    """``model.half()`` after attaching: members attached later find the group's one copy,
    and the state_dict has the names of the same zoo attached to a float16 base."""
    root, cls = served
    model = mosconv.apply(_base(root, cls), [root / "out" / n for n in NAMES[:2]],
                          name=NAMES[:2])
    model.half()
    mosconv.apply(model, [root / "out" / n for n in NAMES[2:]], name=NAMES[2:])
    fresh = mosconv.apply(_base(root, cls).half(), root / "out")
    assert mosconv.memory_report(model)["shared_bytes"] == \
        mosconv.memory_report(fresh)["shared_bytes"]
    assert list(model.mos_shared_pools) == list(fresh.mos_shared_pools)
    fresh.load_state_dict(model.state_dict())  # strict: the same names


def test_inference_mode_in_either_order(served):
    """Adapters attached and run under torch.inference_mode serve outside it too, and a
    forward under it leaves nothing behind that breaks training after it (the caches)."""
    root, cls = served
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(5))
    rows = ["zoo/task00", "zoo/task01", "zoo/task02", None]
    ref = mosconv.apply(_base(root, cls), root / "out")
    with torch.no_grad():
        mosconv.set_active(ref, "zoo/task01")
        one = ref(ids).logits
        mosconv.set_active(ref, rows)
        mixed = ref(ids).logits
    model = _base(root, cls)
    with torch.inference_mode():
        mosconv.apply(model, root / "out")  # attached inside
        mosconv.set_active(model, "zoo/task01")
        assert torch.equal(model(ids).logits, one)
        mosconv.set_active(model, rows)
        assert torch.equal(model(ids).logits, mixed)
    assert not any(p.is_inference() for p in model.parameters() if p is not None)
    with torch.no_grad():  # and outside
        assert torch.equal(model(ids).logits, mixed)
    for names in ("zoo/task01", rows):  # gradient through the adapters after inference mode
        mosconv.set_active(model, names)
        with torch.inference_mode():
            model(ids)
        params = [p for n in ["zoo/task00", "zoo/task01", "zoo/task02"]
                  for p in mosconv.trainable_parameters(model, n)]
        for p in params:
            p.requires_grad_(True)
        model(ids).logits.square().mean().backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_pools_replaced_through_data_are_seen(served):
    """``p.data = new`` changes the storage the cache keyed on: the next forward sees it."""
    root, cls = served
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    model = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(model, "zoo/task00")
    with torch.no_grad():
        first = model(ids).logits
        for p in model.mos_shared_pools.parameters():
            p.data = p.data * 2.0
        changed = model(ids).logits
    assert float((changed - first).abs().max()) > 1e-4 and torch.equal(changed, _uncached(model, ids))


def test_joint_pass_inputs_are_kept_and_never_stale(served):
    """The joint pass keeps its gathered cores between forwards; an in-place change of a core
    or of the shared pools is seen at the next forward."""
    root, cls = served
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    rows = ["zoo/task00", "zoo/task01", "zoo/task02", "zoo/task00"]
    model = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(model, rows)
    layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)]

    def per_row():
        outs = []
        for i, r in enumerate(rows):
            mosconv.set_active(model, r)
            outs.append(model(ids[i:i + 1]).logits)
        mosconv.set_active(model, rows)
        return torch.cat(outs)

    with torch.no_grad():
        first = model(ids).logits
        assert any(m._joint for m in layers)  # kept for the next forward
        assert torch.equal(model(ids).logits, first)
        for m in layers:
            for d in m.deltas.values():
                if getattr(d, "core", None) is not None:
                    d.core.mul_(3.0)
        cores = model(ids).logits
        assert float((cores - first).abs().max()) > 1e-4
        assert float((cores - per_row()).abs().max()) < 1e-5
        model.mos_shared_pools.apply(lambda k: hasattr(k, "pool_A") and k.pool_A.mul_(0.5))
        pools = model(ids).logits
        assert float((pools - cores).abs().max()) > 1e-4
        assert float((pools - per_row()).abs().max()) < 1e-5
        # an update through .data is not counted by PyTorch: set_factor_cache empties the
        # joint passes' kept cores too (they were kept across it before)
        assert torch.equal(model(ids).logits, pools) and any(m._joint for m in layers)
        for m in layers:
            for d in m.deltas.values():
                if getattr(d, "core", None) is not None:
                    d.core.data.mul_(3.0)
        mosconv.set_factor_cache(256 * 2**20)
        data = model(ids).logits
        assert float((data - pools).abs().max()) > 1e-4
        assert float((data - per_row()).abs().max()) < 1e-5


def test_joint_pass_keeps_nothing_with_the_factor_cache_off(served):
    root, cls = served
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    model = mosconv.apply(_base(root, cls), root / "out")
    mosconv.set_active(model, ["zoo/task00", "zoo/task01", "zoo/task02", "zoo/task00"])
    layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)]
    mosconv.set_factor_cache(0)
    try:
        with torch.no_grad():
            off = model(ids).logits
        assert not any(m._joint for m in layers)
    finally:
        mosconv.set_factor_cache(256 * 2**20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, off)
    assert any(m._joint for m in layers)


def test_adapters_of_different_base_models_are_refused(served, tmp_path):
    import json
    import shutil

    root, cls = served
    for n in NAMES[:2]:
        shutil.copytree(root / "out" / n, tmp_path / n)
    cfg_path = tmp_path / NAMES[1] / "mos_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["source"]["base_model"] = "another-model"
    cfg_path.write_text(json.dumps(cfg))
    model = _base(root, cls)
    with pytest.raises(ConfigError, match="different base models"):
        mosconv.apply(model, [tmp_path / n for n in NAMES[:2]])
    assert mosconv.adapter_names(model) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mixed_batch_on_gpt2_conv1d_equals_peft(tmp_path):
    """GPT-2's Conv1D layers (fan_in_fan_out): a list of four MoS folders, mixed rows."""
    pytest.importorskip("peft")
    from factory import write_random_peft
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from mosconv.fit.convert import ConvertConfig
    from mosconv.pipeline import compress

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "base")
    modules = {f"transformer.h.{i}.attn.c_attn": (192, 64) for i in range(2)}
    modules.update({f"transformer.h.{i}.mlp.c_fc": (256, 64) for i in range(2)})
    names = [f"g{i}" for i in range(4)]
    for i, n in enumerate(names):
        write_random_peft(tmp_path / "lora" / n, modules, r=4, alpha=8, seed=i, b_std=0.05,
                          fan_in_fan_out=True)
        compress(tmp_path / "lora" / n, tmp_path / "mos" / n, ConvertConfig(ratio=2))
        export_lora(tmp_path / "mos" / n, tmp_path / "exp" / n)
    ids = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(4))
    rows = ["g2", "g0", None, "g3", "g2"]
    ours = mosconv.apply(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
                         [tmp_path / "mos" / n for n in names])
    mosconv.set_active(ours, rows)
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
                                     tmp_path / "exp" / "g0", adapter_name="g0")
    for n in names[1:]:
        peft.load_adapter(tmp_path / "exp" / n, adapter_name=n)
    with torch.no_grad():
        got = ours(ids).logits
        want = peft.eval()(ids, adapter_names=[r or "__base__" for r in rows]).logits
    assert float((got - want).abs().max()) < 1e-4


def test_inspect_serving_agrees_with_memory_report(served):
    import json

    from click.testing import CliRunner

    from mosconv.cli import main

    root, cls = served
    res = CliRunner().invoke(main, ["inspect", str(root / "out"), "--serving", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    model = mosconv.apply(_base(root, cls), root / "out")
    mem = mosconv.memory_report(model)
    assert info["adapters"] == 4 and info["shared_pool_files"] == 1
    assert info["shared_bytes"] == mem["shared_bytes"]
    assert info["total_bytes"] == mem["total_bytes"]
    assert info["lora_total_bytes"] == mem["lora_total_bytes"]
    assert [m["name"] for m in info["members"]] == NAMES
    text = CliRunner().invoke(main, ["inspect", str(root / "out"), "--serving"]).output
    assert "4 adapters: shared pools" in text and "as LoRAs" in text


@pytest.mark.parametrize("summary", ['{"adapters": "x"}', '{"adapters": ["x"]}', "[1]",
                                     '{"adapters": [{"name": 3, "status": "converted"}]}'])
def test_a_summary_of_the_wrong_shape_is_named(tmp_path, summary):
    """It was an internal AttributeError."""
    from click.testing import CliRunner

    from mosconv.cli import main

    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "summary.json").write_text(summary)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "z"), "--serving"])
    assert res.exit_code == 1
    assert res.output.strip() == (f"mosconv: error: {tmp_path / 'z' / 'summary.json'}: not a "
                                  "batch summary (no adapters list)")


def test_rerouted_members_share_one_pass(served, tmp_path):
    """Members of a group re-routed by the fit (each core spanning some of a module's basis
    rows, tests/test_zoo_routes.py): a mixed batch sends all their rows through one pass over
    the rows any of them routes to, and each row equals its adapter alone."""
    root, cls = served
    example_module("synthetic_zoo").write_zoo(tmp_path / "zoo" / "zoo", 8, d=64, d_kv=32, r=8,
                                              layers=2, base="tiny-llama")
    summary = run_batch(tmp_path / "zoo", tmp_path / "out", BatchConfig(ratio=8, shared_pool=True))
    assert summary.failed == 0 and summary.totals.shared_pool_params > 0
    model = mosconv.apply(_base(root, cls), tmp_path / "out")
    names = mosconv.adapter_names(model)
    layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)]
    rerouted = [m for m in layers
                if len({tuple(m.deltas[n].routes_A.tolist()) for n in names}) > 1
                and all(m.deltas[n].basis_key() is not None for n in names)]
    assert rerouted  # some layer whose members route to different basis rows
    ids = torch.randint(0, 128, (8, 5), generator=torch.Generator().manual_seed(3))
    mosconv.set_active(model, names)
    with torch.no_grad():
        got = model(ids).logits
    assert [m.shared_basis_rows for m in rerouted] == [8] * len(rerouted)  # one pass each
    for i, n in enumerate(names):
        mosconv.set_active(model, n)
        with torch.no_grad():
            one = model(ids[i:i + 1]).logits
        assert float((one[0] - got[i]).abs().max()) < 1e-5


def _mixed_batch_like_peft(root, cls, tmp_path, names: list[str]):
    """The zoo written to ``tmp_path / "out"`` applied by mosconv, a mixed batch of its
    first three members and the base: equal to PEFT's with the exported LoRAs, row by row.
    Returns the mosconv model after that batch."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(_base(root, cls), export_lora(
        tmp_path / "out" / names[0], tmp_path / "exp" / names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(export_lora(tmp_path / "out" / n, tmp_path / "exp" / n),
                          adapter_name=n)
    model = mosconv.apply(_base(root, cls), tmp_path / "out")
    rows = [names[0], names[2], names[1], names[2], None]
    ids = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(4))
    mosconv.set_active(model, rows)
    with torch.no_grad():
        got = model(ids).logits
        want = peft.eval()(ids, adapter_names=[r or "__base__" for r in rows]).logits
    assert float((got - want).abs().max()) < 1e-4
    return model


def test_tied_members_serve_like_their_exported_loras(served, tmp_path):
    """Checkpoints of one run fitted with tied modules (every member routing to the same pool
    rows, no core): a mixed batch equals PEFT's with the exported LoRAs, row by row."""
    from test_zoo import _tied_modules, _write_checkpoints

    from mosconv.mos.format import load_mos

    root, cls = served
    _write_checkpoints(tmp_path / "zoo", n=3, layers=2, base="tiny-llama")
    summary = run_batch(tmp_path / "zoo", tmp_path / "out", BatchConfig(ratio=8, shared_pool=True))
    assert summary.failed == 0 and summary.totals.shared_pool_params > 0
    names = [a.name for a in summary.adapters]
    assert _tied_modules([load_mos(tmp_path / "out" / n) for n in names])
    model = _mixed_batch_like_peft(root, cls, tmp_path, names)
    # the tied members' rows went through one pass (no core: the identity between the rows)
    layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)]
    tied = [m for m in layers if all(m.deltas[n].core is None and m.deltas[n].basis_key()
                                     for n in names)]
    assert tied and all(m.shared_basis_rows == 4 for m in tied)


def test_members_of_a_sharded_kind_serve_like_their_exported_loras(served, tmp_path,
                                                                    monkeypatch):
    """A group whose leftover budget bought a partial column (its kind stored in shards,
    ``nc > 1``; narrow shards allowed here so the tiny model's kinds qualify): a mixed batch
    equals PEFT's with the exported LoRAs, and the sharded kind's members still share one
    pass (a run of ``nc`` routes per basis row)."""
    from test_zoo import _write_checkpoints

    from mosconv.fit import zoo
    from mosconv.mos.format import load_mos

    monkeypatch.setattr(zoo, "REMAINDER_MIN_WIDTH", 4)
    root, cls = served
    _write_checkpoints(tmp_path / "zoo", n=3, layers=2, base="tiny-llama", noise=1.0)
    summary = run_batch(tmp_path / "zoo", tmp_path / "out",
                        BatchConfig(ratio=10, shared_pool=True))  # 20 params left: 16 shards
    assert summary.failed == 0 and summary.totals.shared_pool_params > 0
    names = [a.name for a in summary.adapters]
    loaded = load_mos(tmp_path / "out" / names[0])
    sharded = {k for k, p in loaded.kinds.items() if p.nc > 1}
    assert sharded
    model = _mixed_batch_like_peft(root, cls, tmp_path, names)
    # the sharded kind's members went through one pass
    layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)
              and m.deltas[names[0]]._pools[0].nc > 1]
    assert layers and all(m.deltas[n].basis_key() for m in layers for n in names)
    assert all(m.shared_basis_rows == 4 for m in layers)
