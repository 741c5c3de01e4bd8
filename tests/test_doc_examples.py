"""The printed examples of docs/inspect.md and docs/format.md are what mosconv prints and writes
today (paths under /tmp in the docs stand for the test's own folder), and format.md's reference
``assemble`` reads what mosconv writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mosconv.fit.convert import ConvertConfig
from mosconv.mos.format import load_mos
from mosconv.pipeline import compress

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def run(*args: str, cwd: Path = ROOT) -> str:
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


def block_after(text: str, first_line: str) -> str:
    """The rest of the fenced block of ``text`` that starts with ``first_line``, after it."""
    start = text.index(first_line + "\n") + len(first_line) + 1
    return text[start:text.index("```", start)]


def test_inspect_md_mos_example_is_current(zoo, tmp_path):
    out = tmp_path / "tig_mos"
    run("-m", "mosconv.cli", "compress", "../shared/zoo/gpt2-tigrinya-lora", str(out),
        "--ratio", "8", "-q")
    printed = run("-m", "mosconv.cli", "inspect", str(out)).replace(str(out), "/tmp/tig_mos")
    assert printed == block_after((DOCS / "inspect.md").read_text(), "$ mosconv inspect /tmp/tig_mos")


def test_format_md_real_example_is_current(tmp_path):
    lora, mos = tmp_path / "exlora", tmp_path / "exmos"
    printed = run(str(ROOT / "examples" / "make_example_lora.py"), str(lora))
    printed += run("-m", "mosconv.cli", "compress", str(lora), str(mos), "--ratio", "8",
                   "--overwrite")
    printed = printed.replace(str(lora), "/tmp/exlora").replace(str(mos), "/tmp/exmos")
    doc = DOCS / "format.md"
    assert printed == block_after(doc.read_text(), "$ python examples/make_example_lora.py /tmp/exlora && "
                                       "mosconv compress /tmp/exlora /tmp/exmos --ratio 8 --overwrite")
    # The report excerpt: every totals field as written.
    report = json.loads((mos / "report.json").read_text())
    text = doc.read_text()
    excerpt = text[text.index('  "schema": "mosconv.report/1"'):]
    totals = excerpt[excerpt.index('"totals": {'):excerpt.index('"kinds": [')]
    for key, value in report["totals"].items():
        if isinstance(value, dict):
            continue
        assert f'"{key}": {json.dumps(value)},' in totals or f'"{key}": {json.dumps(value)}\n' \
            in totals, key
    # The config excerpt's version, index bytes and storage; the tensor list and header.
    config = json.loads((mos / "mos_config.json").read_text())
    assert f'"format_version": {config["format_version"]},' in text
    assert f'"index_bytes": {config["index_bytes"]},' in text
    with safe_open(mos / "mos_adapter.safetensors", "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert f"Its tensors, {len(names)} in all, are the pools" in text
    assert all(n.startswith("mos.pools.") for n in names)
    assert f'header metadata is `{json.dumps(meta)}`' in text


def reference_assemble():
    """format.md's reference implementation, executed as written."""
    code = re.search(r"A reference implementation .+?```python\n(.+?)```",
                     (DOCS / "format.md").read_text(), flags=re.DOTALL).group(1)
    space: dict = {}
    exec(compile(code, "format.md", "exec"), space)  # noqa: S102  (the repo's own doc)
    return space["assemble"]


def test_format_md_shared_kind_example_is_current(tmp_path):
    doc = DOCS / "format.md"
    section = doc.read_text().split("### A shared kind", 1)[1]
    code = re.search(r"```python\n(.+?)```", section, flags=re.DOTALL).group(1)
    code = code.replace("/tmp/shex", str(tmp_path))
    exec(compile(code, "format.md", "exec"), {})  # noqa: S102  (the repo's own doc)
    printed = run("-m", "mosconv.cli", "compress", str(tmp_path / "lora"), str(tmp_path / "mos"),
                  "--ratio", "4", "--overwrite").replace(str(tmp_path), "/tmp/shex")
    assert printed == block_after(section, "prints:\n\n```")
    config = json.loads((tmp_path / "mos" / "mos_config.json").read_text())
    kind, first, second = config["kinds"][0], config["modules"][0], config["modules"][1]
    assert (f"Its kind has `nc: {kind['nc']}, pool_A: {kind['pool_A']}, pool_B: {kind['pool_B']}, "
            f"public_A: {kind['public_A']}, public_B: {kind['public_B']}`") in section
    assert f"`private_A: {first['private_A']}`" in section
    assert f"`{second['private_A']}`" in section


def shared_and_private_lora(path: Path) -> Path:
    """q_proj: one A for every layer (a shared kind, stored routes); v_proj: independent
    draws (private, implicit routes)."""
    from mosconv.lora.write import write_peft_folder

    g = torch.Generator().manual_seed(0)
    d, r = 128, 8
    A0 = torch.randn(r, d, generator=g) / d ** 0.5
    decay = torch.exp(-torch.arange(r) / 3.0)
    mods = []
    for layer in range(6):
        mods.append((f"model.layers.{layer}.self_attn.q_proj", A0.clone(),
                     0.02 * torch.randn(d, r, generator=g) * decay, False))
        mods.append((f"model.layers.{layer}.self_attn.v_proj",
                     torch.randn(r, d, generator=g) / d ** 0.5,
                     0.02 * torch.randn(d, r, generator=g) * decay, False))
    write_peft_folder(path, mods, {"peft_type": "LORA", "r": r, "lora_alpha": 16,
                                   "target_modules": ["q_proj", "v_proj"]}, overwrite=True)
    return path


def test_format_md_reference_assemble_reads_what_mosconv_writes(tmp_path):
    out = tmp_path / "mos"
    compress(shared_and_private_lora(tmp_path / "lora"), out, ConvertConfig(ratio=4.0))
    config = json.loads((out / "mos_config.json").read_text())
    assert config["format_version"] == 3
    tensors = load_file(out / "mos_adapter.safetensors")
    kinds = {k["id"]: k for k in config["kinds"]}
    mos = load_mos(out)
    assemble = reference_assemble()
    implicit = stored = 0
    for module in config["modules"]:
        assert not module.get("core")
        A, B = assemble(tensors, kinds[module["kind"]], module)
        A2, B2 = mos.assemble(module["name"])
        assert torch.equal(A, A2) and torch.equal(B, B2), module["name"]
        implicit += "implicit_routes" in module
        stored += "implicit_routes" not in module
    assert implicit and stored
