"""docs/getting-started.md: every command runs, in order, in a fresh folder (pip installs
excepted: the test runs in the installed environment)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "getting-started.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.+?)\n```", DOC.read_text(), flags=re.DOTALL)


def argv(line: str) -> list[str]:
    args = shlex.split(line)
    if args[0] == "python3":
        return [sys.executable, str(ROOT / args[1]), *args[2:]]
    if args[0] == "mosconv":
        return [sys.executable, "-m", "mosconv.cli", *args[1:]]
    raise AssertionError(f"unexpected command in {DOC.name}: {line}")


@pytest.mark.slow
def test_getting_started_commands_run(tmp_path):
    pytest.importorskip("transformers")
    ran = 0
    for lang, body in blocks():
        if lang == "python":
            proc = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=600, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            ran += 1
            continue
        for line in body.splitlines():
            if not line.strip() or "pip install" in line:
                continue
            proc = subprocess.run(argv(line), cwd=tmp_path, capture_output=True, text=True,
                                  timeout=600, check=False)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr
            ran += 1
    assert ran >= 15
    assert (tmp_path / "example_mos_distilled" / "mos_config.json").is_file()
    assert (tmp_path / "zoo_mos" / "summary.json").is_file()


def test_install_line_matches_the_readme_pin():
    install = next(b for lang, b in blocks() if lang == "bash")
    assert "pip install torch==2.13.0" in install
