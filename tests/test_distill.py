"""Distillation and evaluation on a tiny real causal LM (CPU): loss and held-out KL go down,
the model is left as it was, the numbers of evaluate() mean what they say, and errors."""

from __future__ import annotations

import pytest
import torch

import mosconv
from mosconv import ConfigError
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.model.data import read_texts, split_blocks, token_blocks
from mosconv.model.distill import DistillConfig, distill, evaluate, resolve_device
from mosconv.model.hf import load_base_model
from mosconv.model.runtime import adapter_names, apply, remove

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    model, tok = load_base_model(tiny_lm.model)
    blocks = token_blocks(tok, read_texts(tiny_lm.data), 32, 32 * 40)
    return model, blocks, mosconv.read_adapter(tiny_lm.lora)


def test_fewer_training_blocks_than_a_batch_are_counted_as_used(lm):
    """Each step takes every block when there are fewer than --batch-size: the report said
    steps x batch_size x seq_len tokens (twice those used here)."""
    model, blocks, adapter = lm
    mos = convert(adapter, ConvertConfig(ratio=4)).mos
    info = distill(model, adapter, mos, blocks[:2], blocks[2:4],
                   DistillConfig(steps=3, batch_size=4, device="cpu")).info
    assert info["steps"] == 3 and info["train_blocks"] == 2 and info["batch_size"] == 2
    assert info["train_tokens_seen"] == 3 * 2 * 32


def test_distill_lowers_loss_and_held_out_kl(lm):
    model, blocks, adapter = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mos = convert(adapter, ConvertConfig(ratio=4)).mos
    train, held = split_blocks(blocks, 0.2)
    torch.manual_seed(0)
    res = distill(model, adapter, mos, train, held,
                  DistillConfig(steps=40, lr=2e-2, eval_every=10, device="cpu", patience=0))
    info = res.info
    assert info["device"] == "cpu" and info["steps"] == 40
    assert info["kl_before"] > 0.5  # the LoRA changes the outputs a lot; the student lags
    assert info["kl_after"] < info["kl_before"] * 0.99
    losses = info["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert info["train_tokens_seen"] == 40 * 4 * 32 and info["held_out_blocks"] == 8
    # the trained pools are in the result, routes and structure unchanged
    assert res.mos.params == mos.params
    assert any(not torch.equal(res.mos.kinds[k].pool_A, mos.kinds[k].pool_A) for k in mos.kinds)
    for a, b in zip(res.mos.modules, mos.modules):
        assert torch.equal(a.routes_A, b.routes_A) and torch.equal(a.routes_B, b.routes_B)
    # the model is left as it was: no adapters, same weights, frozen
    assert adapter_names(model) == []
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    # the distilled adapter, evaluated independently, is closer to the teacher
    apply(model, adapter, name="teacher", activate=False)
    apply(model, mos, name="init", activate=False)
    apply(model, res.mos, name="distilled", activate=False)
    try:
        e0 = evaluate(model, held, "teacher", "init")
        e1 = evaluate(model, held, "teacher", "distilled")
    finally:
        remove(model)
    assert abs(e0["kl_teacher_student"] - info["kl_before"]) < 1e-6
    assert abs(e1["kl_teacher_student"] - info["kl_after"]) < 1e-6
    assert e1["effect_retained"] > e0["effect_retained"]


def test_evaluate_numbers(lm):
    model, blocks, adapter = lm
    apply(model, adapter, name="teacher", activate=False)
    apply(model, adapter, name="same", activate=False)
    try:
        e = evaluate(model, blocks[:4], "teacher", "same", batch_size=3)
    finally:
        remove(model)
    assert e["tokens"] == 4 * 32
    assert abs(e["kl_teacher_student"]) < 1e-6 and e["effect_retained"] == pytest.approx(1.0)
    assert e["kl_teacher_base"] > 0.01  # the LoRA changes the model measurably
    assert e["ppl_student"] == pytest.approx(e["ppl_teacher"])
    assert e["ppl_base"] != pytest.approx(e["ppl_teacher"])


def test_shared_pool_adapters_are_refused(lm):
    from dataclasses import replace

    model, blocks, adapter = lm
    mos = convert(adapter, ConvertConfig(ratio=4)).mos
    kind = next(iter(mos.kinds))
    shared = replace(mos, kinds={**mos.kinds, kind: replace(mos.kinds[kind], shared={"file": "x"})})
    train, held = split_blocks(blocks, 0.2)
    with pytest.raises(ConfigError, match="shared pool"):
        distill(model, adapter, shared, train, held, DistillConfig(steps=1, device="cpu"))
    assert adapter_names(model) == []


def test_devices_and_settings():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="steps"):
        DistillConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="lr"):
        DistillConfig(lr=-1).validate()
    for kw, msg in (({"hidden_weight": -0.5}, r"hidden_weight must be >= 0, got -0\.5"),
                    ({"hidden_weight": float("nan")}, "hidden_weight must be >= 0, got nan"),
                    ({"patience": -1}, "patience must be >= 0, got -1"),
                    ({"warmup": 1.0}, r"warmup must be in \[0, 1\), got 1\.0")):
        with pytest.raises(ConfigError, match=msg):  # names the one setting that is wrong
            DistillConfig(**kw).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distill_on_cuda(lm):
    model, blocks, adapter = lm
    train, held = split_blocks(blocks, 0.2)
    res = distill(model, adapter, convert(adapter, ConvertConfig(ratio=4)).mos, train, held,
                  DistillConfig(steps=10, device="cuda", eval_every=5))
    model.to("cpu")
    assert res.info["device"] == "cuda" and res.info["kl_after"] <= res.info["kl_before"]


def test_hidden_state_matching_term(lm):
    model, blocks, adapter = lm
    train, held = split_blocks(blocks, 0.2)
    mos = convert(adapter, ConvertConfig(ratio=4)).mos
    res = distill(model, adapter, mos, train, held,
                  DistillConfig(steps=10, lr=2e-2, eval_every=5, device="cpu", hidden_weight=1.0))
    assert res.info["hidden_weight"] == 1.0
    # the loss includes the (positive) hidden-state term, so it exceeds the held-out KL at start
    assert res.info["loss_first"] > res.info["kl_before"] * 0.5
    assert res.info["kl_after"] <= res.info["kl_before"]


def test_cores_are_trained(lm):
    """Format v2: a module's core is a parameter of distillation and comes back trained."""
    from dataclasses import replace

    model, blocks, adapter = lm
    mos = convert(adapter, ConvertConfig(ratio=4, search="truncation")).mos
    g = torch.Generator().manual_seed(0)
    mods = tuple(replace(m, core=torch.eye(m.r) + 0.1 * torch.randn(m.r, m.r, generator=g))
                 if m.r else m for m in mos.modules)
    cored = replace(mos, modules=mods)
    train, held = split_blocks(blocks, 0.2)
    torch.manual_seed(0)
    res = distill(model, adapter, cored, train, held,
                  DistillConfig(steps=5, lr=1e-2, eval_every=5, device="cpu", patience=0))
    assert res.info["kl_after"] < res.info["kl_before"]
    changed = [not torch.equal(a.core, b.core) for a, b in zip(res.mos.modules, mods) if b.core is not None]
    assert changed and all(changed)
    assert res.mos.params == cored.params


def test_distilled_quantized_adapter_is_quantized_again(tiny_lm, tmp_path):
    """compress --quantize int8 --distill: trained in float, stored as int8 again, and the
    report's error is that of the stored adapter."""
    from mosconv.fit.measure import measure
    from mosconv.mos.format import load_mos
    from mosconv.mos.quant import Storage
    from mosconv.pipeline import DataSpec, compress

    spec = DataSpec(base_model=tiny_lm.model, data=tiny_lm.data, max_tokens=32 * 40,
                    seq_len=32, device="cpu")
    res = compress(tiny_lm.lora, tmp_path / "m", ConvertConfig(ratio=4, quantize="int8"),
                   data=spec, distill=DistillConfig(steps=5, lr=1e-2, eval_every=5,
                                                    device="cpu", patience=0))
    mos = load_mos(tmp_path / "m")
    assert mos.storage == Storage("float16", "int8") and mos.info["distilled"] is True
    assert res.report.distill is not None and res.report.totals.quantize == "int8"
    got = measure(mos, mosconv.read_adapter(tiny_lm.lora), res.baseline.trunc)
    err = (sum(x.err_sq for x in got.values()) / sum(x.energy for x in got.values())) ** 0.5
    assert err == pytest.approx(res.report.totals.relative_error, rel=1e-9, abs=1e-12)
    # its KL baseline is truncation stored as int8 too (the weight line's is float32): say so
    from mosconv.cli.render import render_report
    assert "truncation at the same budget, stored alike (int8)" in render_report(res.report)
