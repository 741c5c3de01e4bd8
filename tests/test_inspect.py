"""``mosconv inspect`` on every zoo adapter: exact sizes, ranks and targets read from the files
here, and truncation errors recomputed here from dense updates and an independent greedy."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    ZOO_ADAPTERS,
    raw_lora_pairs,
    raw_tensors,
    reference_greedy_ranks,
    reference_singular_values,
    zoo_adapter_path,
    zoo_expected_scale,
    zoo_weight_file,
)

from mosconv.cli.commands import main
from mosconv.inspect import INSPECT_RATIOS, LORA_SCHEMA, inspect_lora
from mosconv.lora.read import read_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

RATIOS = (2, 4, 8, 16)
_LORA_FACTOR = re.compile(
    r"\.(lora_A|lora_B|lora_down|lora_up|lora_embedding_A|lora_embedding_B)(\.|$)"
    r"|_lora\.(down|up)\.weight$"
)


def run_inspect(*args) -> tuple[object, dict | None]:
    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    info = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return result, info


def expected_targets(name: str) -> set[str]:
    cfg = zoo_adapter_path(name) / "adapter_config.json"
    if cfg.is_file():
        return set(json.loads(cfg.read_text())["target_modules"])
    # legacy diffusers: to_q/k/v/out processors; diffusers' output projection is attn.to_out[0]
    keys = raw_tensors(zoo_weight_file(name))
    procs = {re.search(r"processor\.(to_\w+?)_lora\.", k)[1] for k in keys}
    return {"to_out.0" if p == "to_out" else p for p in procs}


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Reference:
    """What inspect should say about one zoo adapter, computed from its raw tensors."""

    def __init__(self, name: str):
        self.weights = zoo_weight_file(name)
        raw = raw_tensors(self.weights)
        self.lora_params = sum(t.numel() for k, t in raw.items() if _LORA_FACTOR.search(k))
        self.extra_params = sum(t.numel() for k, t in raw.items() if not _LORA_FACTOR.search(k))
        pairs = raw_lora_pairs(raw)
        assert sum(A.numel() + B.numel() for A, B in pairs.values()) == self.lora_params
        self.names = sorted(pairs, key=_natural)
        self.pairs = pairs
        self.ranks = sorted({int(A.shape[0]) for A, _ in pairs.values()})
        scale = zoo_expected_scale(name)
        self.spectra = {n: reference_singular_values(*pairs[n], scale) for n in self.names}
        self.costs = {n: int(pairs[n][0].shape[1] + pairs[n][1].shape[0]) for n in self.names}

    def truncation_error(self, ratio: int) -> tuple[int, int, float]:
        budget = self.lora_params // ratio
        ranks = reference_greedy_ranks(self.spectra, self.costs, budget)
        total = sum(float(np.sum(s**2)) for s in self.spectra.values())
        dropped = sum(float(np.sum(self.spectra[n][ranks[n] :] ** 2)) for n in self.names)
        params = sum(ranks[n] * self.costs[n] for n in self.names)
        return budget, params, math.sqrt(dropped / total)


@pytest.fixture(scope="module")
def references():
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        zoo_adapter_path(name)
        if name not in cache:
            cache[name] = Reference(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ZOO_ADAPTERS)
def test_zoo_inspect_json(name, references):
    ref = references(name)
    result, info = run_inspect(zoo_adapter_path(name), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert info["schema"] == LORA_SCHEMA and info["type"] == "lora"
    assert info["lora_params"] == ref.lora_params
    assert info["extra_params"] == ref.extra_params
    assert info["ranks"] == ref.ranks
    assert set(info["targets"]) == expected_targets(name)
    assert info["num_modules"] == len(ref.names)
    assert [m["name"] for m in info["modules"]] == ref.names
    assert info["dtype"] == ("float16" if "fp16" in name else "float32")
    assert info["format"] == ("diffusers-legacy" if name.startswith("sd15") else "peft")
    assert info["file_bytes"] == sum(
        p.stat().st_size
        for p in ref.weights.parent.iterdir()
        if p.name in ("adapter_config.json", ref.weights.name)
    )

    for m in info["modules"]:
        A, B = ref.pairs[m["name"]]
        s = ref.spectra[m["name"]]
        assert (m["r"], m["d_in"], m["d_out"]) == (A.shape[0], A.shape[1], B.shape[0])
        assert m["energy"] == pytest.approx(float(np.sum(s**2)), rel=1e-9)
        assert m["stable_rank"] == pytest.approx(float(np.sum(s**2) / s[0] ** 2), rel=1e-6)
    assert sum(k["modules"] for k in info["kinds"]) == info["num_modules"]
    assert sum(k["params"] for k in info["kinds"]) == info["lora_params"]
    assert info["num_kinds"] == len(info["kinds"]) == len({m["kind"] for m in info["modules"]})

    assert [t["ratio"] for t in info["truncation"]] == list(RATIOS) == list(INSPECT_RATIOS)
    for t in info["truncation"]:
        budget, params, rel = ref.truncation_error(t["ratio"])
        assert t["budget"] == budget
        assert t["params"] <= t["budget"]
        assert t["params"] == params
        assert t["relative_error"] == pytest.approx(rel, abs=1e-6), (name, t["ratio"])
    errors = [t["relative_error"] for t in info["truncation"]]
    assert errors == sorted(errors)  # a smaller budget never keeps more


def test_reference_spectrum_is_the_full_dense_svd(references):
    """The projected spectrum used above equals a full dense SVD (checked on one module of
    each zoo adapter small enough for a dense SVD to be quick)."""
    for name in ZOO_ADAPTERS:
        ref = references(name)
        n = ref.names[0]
        A, B = ref.pairs[n]
        if A.shape[1] * B.shape[0] > 1024 * 1024:
            continue
        dense = zoo_expected_scale(name) * (B.double().numpy() @ A.double().numpy())
        full = np.linalg.svd(dense, compute_uv=False)
        np.testing.assert_allclose(
            ref.spectra[n], full[: len(ref.spectra[n])], rtol=1e-9, atol=1e-12 * full[0]
        )
        assert np.all(full[len(ref.spectra[n]) :] <= 1e-9 * full[0])


@pytest.mark.parametrize("name", ["gpt2-tigrinya-lora", "sd15-diffusers-attnproc-r4"])
def test_zoo_inspect_human_output_has_the_kinds_table(name):
    path = zoo_adapter_path(name)
    result, _ = run_inspect(path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    _, info = run_inspect(path, "--json")
    header = next(line for line in out.splitlines() if line.startswith("kind "))
    assert header.split()[:5] == ["kind", "n", "shape", "r", "params"]
    assert "stable rank" in header and "dirs 90%" in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for k in info["kinds"]:
        row = rows[k["kind"]]
        assert row[1:4] == [
            str(k["modules"]),
            f"{k['d_out']}x{k['d_in']}",
            "/".join(map(str, k["ranks"])),
        ]
    assert f"LoRA params   {info['lora_params']:,}" in out
    for t in info["truncation"]:
        assert re.search(
            rf"^{t['ratio']}\s+{t['budget']:,}\s+{t['relative_error']:.4f}$", out, re.MULTILINE
        )


def test_gpt2_tigrinya_has_two_c_proj_kinds():
    _result, info = run_inspect(zoo_adapter_path("gpt2-tigrinya-lora"), "--json")
    kinds = {k["kind"]: k for k in info["kinds"]}
    c_proj = sorted((k["d_out"], k["d_in"]) for name, k in kinds.items() if ".c_proj[" in name)
    assert c_proj == [(768, 768), (768, 3072)]
    assert info["num_kinds"] == 3 and info["fan_in_fan_out"] is True


def test_inspect_the_weight_file_of_a_zoo_folder():
    name = "opt-125m-lora-ckpts/checkpoint-10"
    _, via_folder = run_inspect(zoo_adapter_path(name), "--json")
    _, via_file = run_inspect(zoo_weight_file(name), "--json")
    assert via_file == via_folder


# --------------------------------------------------------------------------- synthetic adapters


def test_inspect_synthetic_kohya_with_conv(make):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    w = make.kohya(
        {"lora_unet_mid_block_attentions_0_proj_in": (32, 32)},
        r=4,
        alphas={conv: 2},
        convs={conv: (12, 6, 3, 3)},
    )
    result, info = run_inspect(w.path, "--json")
    assert result.exit_code == 0, result.output
    assert info["format"] == "kohya"
    assert info["lora_params"] == sum(
        t.numel() for k, t in w.tensors.items() if "lora_" in k and "alpha" not in k
    )
    assert info["lora_alpha"] is None and info["scales"] == [0.5, 1.0]
    conv_kind = next(k for k in info["kinds"] if "conv" in k["kind"])
    assert (conv_kind["d_out"], conv_kind["d_in"]) == (12, 54)


def test_inspect_synthetic_peft_matches_direct_computation(make):
    w = make.peft(
        r=4,
        lora_alpha=8,
        embeddings={"model.embed_tokens": (50, 16)},
        extra={"base_model.model.score.weight": (3, 16)},
    )
    ad = read_adapter(w.path)
    info = inspect_lora(ad)
    json.dumps(info)  # JSON-ready
    assert info["targets"] == ["embed_tokens", "q_proj", "v_proj"]
    assert info["extra_tensors"] == {"base_model.model.score.weight": [3, 16]}
    assert info["extra_params"] == 48 and info["lora_alpha"] == 8 and info["scales"] == [2.0]
    spectra = {m.name: reference_singular_values(m.A, m.B, m.scale) for m in ad.modules}
    costs = {m.name: m.d_in + m.d_out for m in ad.modules}
    total = sum(float(np.sum(s**2)) for s in spectra.values())
    for t in info["truncation"]:
        ranks = reference_greedy_ranks(spectra, costs, ad.params // t["ratio"])
        dropped = sum(float(np.sum(spectra[n][ranks[n] :] ** 2)) for n in spectra)
        assert t["relative_error"] == pytest.approx(math.sqrt(dropped / total), abs=1e-9)


def test_inspect_targets_of_diffusers_to_out():
    from mosconv.lora.types import LoraAdapter, LoraModule, assign_kinds

    mods = [
        LoraModule(
            f"mid_block.attentions.0.transformer_blocks.0.attn1.{p}",
            torch.ones(1, 4),
            torch.ones(4, 1),
            1.0,
        )
        for p in ("to_q", "to_out.0")
    ]
    info = inspect_lora(LoraAdapter(format="diffusers", modules=assign_kinds(mods)))
    assert info["targets"] == ["to_out.0", "to_q"]


def test_a_mos_folder_named_by_its_config_file_keeps_its_report(tmp_path):
    """``inspect OUT/mos_config.json`` is ``inspect OUT``: the report (and --serving's name)
    were lost because report.json was looked for beside the file, inside it."""
    from factory import llama_like, write_random_peft

    from mosconv.mos.manifest import load_report

    lora, _ = write_random_peft(tmp_path / "lora", llama_like(2, 32, 16), r=4, alpha=8, seed=0)
    out = tmp_path / "mos"
    assert CliRunner().invoke(main, ["compress", str(lora), str(out), "-q"]).exit_code == 0
    assert load_report(out / "mos_config.json") == load_report(out)
    for args in (["--json"], ["--serving", "--json"]):
        by_file = json.loads(CliRunner().invoke(main, ["inspect", str(out / "mos_config.json"),
                                                       *args]).stdout)
        by_folder = json.loads(CliRunner().invoke(main, ["inspect", str(out), *args]).stdout)
        by_file.pop("path", None), by_folder.pop("path", None)
        assert by_file == by_folder
    assert by_file["members"][0]["name"] == "mos"
