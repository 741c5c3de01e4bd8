"""The package's boundary rules (docs/architecture.md), read from the source; nothing is imported:

* stages import downward only: core < lora < fit and mos.types / mos.quant < mos.format < model <
  pipeline and inspect < batch < cli;
* ``fit/`` works on tensors in memory: no file-system module, no reader, writer or format, so
  ``convert()`` does no I/O;
* file names, key prefixes and kind ids of the LoRA and MoS formats are spelled in
  ``mosconv/names.py`` only, and the MoS tensor names in ``mosconv/mos/format.py`` only;
* only ``cli/`` imports click.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mosconv"
# the rank of each stage: a module may import from its own rank or below
RANKS = {
    "mosconv": 0, "mosconv.errors": 0, "mosconv.names": 0, "mosconv._threads": 0,
    "mosconv.fileio": 0,
    "mosconv.lora": 1,
    "mosconv.mos.types": 2, "mosconv.mos.quant": 2, "mosconv.fit": 2,
    "mosconv.mos.format": 3, "mosconv.mos": 3,
    "mosconv.model": 4,
    "mosconv.pipeline": 5, "mosconv.inspect": 5,
    "mosconv.batch": 6,
    "mosconv.cli": 7,
    "mosconv.__main__": 8,  # `python -m mosconv`: the command line, above everything
}
FILE_SYSTEM = {"os", "pathlib", "shutil", "tempfile", "glob", "io"}
FORMAT_LITERALS = {"base_model.model.", "adapter_model.safetensors", "adapter_model.bin",
                   "adapter_config.json", "mos_config.json", "mos_adapter.safetensors",
                   "report.json", "pools"}
TENSOR_PREFIXES = ("mos.pools.", "mos.routes.", "mos.weights.", "mos.cores.", "mos.scales.",
                   "mos.core_scales.", "extra.")


def module_name(path: Path) -> tuple[str, list[str]]:
    """``(module, package parts)`` of a file under mosconv/."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def rank(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RANKS:
            return RANKS[".".join(parts[:i])]
    raise AssertionError(f"{module}: no rank in RANKS (add the new module there)")


def files() -> list[tuple[Path, str, ast.Module]]:
    return [(p, module_name(p)[0], ast.parse(p.read_text())) for p in sorted(PKG.rglob("*.py"))]


def imports(path: Path, tree: ast.Module) -> tuple[set[str], set[str]]:
    """``(mosconv modules, other top-level modules)`` that a file imports (lazy ones too)."""
    _, pkg = module_name(path)
    ours, others = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.startswith("mosconv") else others).add(
                    a.name if a.name.startswith("mosconv") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg[: len(pkg) - (node.level - 1)])
                if node.module:
                    ours.add(f"{base}.{node.module}")
                else:  # from .. import x: x is a module or a name of the package
                    ours.update(f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/")
                                in _MODULE_PATHS else base for a in node.names)
            elif node.module and node.module.startswith("mosconv"):
                ours.add(node.module)
            elif node.module:
                others.add(node.module.split(".")[0])
    return ours, others


_MODULE_PATHS = {str(p.relative_to(PKG.parent).with_suffix("")).removesuffix("/__init__")
                 for p in PKG.rglob("*.py")}


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    mod = module_name(path)[0]
    ours, _ = imports(path, ast.parse(path.read_text()))
    upward = sorted(d for d in ours if rank(d) > rank(mod))
    assert not upward, f"{mod} (rank {rank(mod)}) imports {upward}"


def test_fitting_does_no_io():
    for path, mod, tree in files():
        if not mod.startswith("mosconv.fit"):
            continue
        ours, others = imports(path, tree)
        assert not others & FILE_SYSTEM, (mod, others & FILE_SYSTEM)
        bad = sorted(d for d in ours if d.startswith(("mosconv.mos.format", "mosconv.lora.read",
                                                      "mosconv.lora.write", "mosconv.fileio")))
        assert not bad, (mod, bad)


def _strings(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            text = head.value if isinstance(head, ast.Constant) else ""
            if (text == "k" and len(node.values) == 2
                    and isinstance(node.values[1], ast.FormattedValue)):
                yield node.lineno, "f'k{...}' (a kind id)"
            elif text:
                yield node.lineno, text


def test_format_names_have_one_owner():
    found = []
    for path, mod, tree in files():
        for line, text in _strings(tree):
            if mod != "mosconv.names" and (text in FORMAT_LITERALS or text.startswith("f'k{")):
                found.append((mod, line, text))
            if mod != "mosconv.mos.format" and text.startswith(TENSOR_PREFIXES):
                found.append((mod, line, text))
    assert not found, found


def test_only_the_cli_imports_click():
    users = sorted(mod for path, mod, tree in files() if "click" in imports(path, tree)[1])
    assert users and all(u.startswith("mosconv.cli") for u in users), users


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_library_errors_name_no_command_line_flags():
    """Library messages say what is wrong; the CLI adds its options (MosconvError.options)."""
    found = []
    for path, mod, tree in files():
        if mod.startswith("mosconv.cli"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for line, text in _strings(node.exc):
                    if _FLAG.search(text):
                        found.append((mod, line, text))
    assert not found, found


def test_reading_reports_and_manifests_needs_no_torch():
    """Batch bookkeeping (what is done, what to skip) and report readers start fast."""
    for mod in ("mosconv.fit.report", "mosconv.mos.manifest", "mosconv.names"):
        path = PKG.parent / (mod.replace(".", "/") + ".py")
        ours, others = imports(path, ast.parse(path.read_text()))
        assert "torch" not in others, mod
        for dep in ours:
            assert not dep.startswith(("mosconv.fit.measure", "mosconv.mos.format",
                                       "mosconv.mos.types", "mosconv.lora")), (mod, dep)


def test_cli_commands_are_short():
    """A command parses, calls the library and renders: at most 30 lines of body (options
    and settings live in cli/options.py, text output in cli/render.py)."""
    path = PKG / "cli" / "commands.py"
    long = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command"
                for d in node.decorator_list):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
            lines = node.end_lineno - body[0].lineno + 1
            if lines > 30:
                long.append((node.name, lines))
    assert not long, long
