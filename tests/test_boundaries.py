"""Boundary rules of the package, read from the source (no import is run):

* the fitting modules work on tensors in memory: they import no file-system module
  (``os``, ``pathlib``, ``shutil``) and no reader or writer, so ``convert()`` does no I/O;
* every file name, key prefix and kind id of the LoRA and MoS formats is spelled in
  ``mosconv/names.py`` only (the format modules and the readers import it from there);
* only the command line imports click.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mosconv"
FITTING = ["convert", "datafit", "factorize", "fit", "report", "truncation", "zoo"]
FILE_SYSTEM = {"os", "pathlib", "shutil", "tempfile", "glob"}
IO_MODULES = {"readers", "writers", "fileio", "pipeline", "batch", "cli"}
# literals that belong to names.py: PEFT file names and key prefix, MoS file names, kind ids,
# the shared pool folder
FORMAT_LITERALS = ["base_model.model.", "adapter_model.safetensors", "adapter_model.bin",
                   "adapter_config.json", "mos_config.json", "mos_adapter.safetensors"]


def sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PKG.parent)): ast.parse(p.read_text())
            for p in sorted(PKG.rglob("*.py"))}


def imported(tree: ast.Module) -> set[str]:
    """Top-level names of absolute imports and first parts of relative ones (``.readers``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
            elif node.module:
                out.add("." + node.module.split(".")[0])
    return out


@pytest.mark.parametrize("name", FITTING)
def test_fitting_modules_do_no_io(name):
    names = imported(ast.parse((PKG / f"{name}.py").read_text()))
    assert not names & FILE_SYSTEM, (name, names & FILE_SYSTEM)
    assert not {n.lstrip(".") for n in names if n.startswith(".")} & IO_MODULES, (name, names)


def test_format_names_are_spelled_in_names_py_only():
    found = []
    for path, tree in sources().items():
        if path == "mosconv/names.py":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)  # exact names
                    and (node.value in FORMAT_LITERALS or node.value == "pools")):
                found.append((path, node.lineno, node.value))
            if isinstance(node, ast.JoinedStr):  # an f"k{i}" kind id built by hand
                parts = node.values
                if (len(parts) == 2 and isinstance(parts[0], ast.Constant)
                        and parts[0].value == "k" and isinstance(parts[1], ast.FormattedValue)):
                    found.append((path, node.lineno, "f'k{...}'"))
    assert not found, found


def test_only_the_cli_imports_click():
    users = sorted(p for p, tree in sources().items() if "click" in imported(tree))
    assert users == ["mosconv/_cli_docs.py", "mosconv/cli.py"], users
