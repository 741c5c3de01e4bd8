"""docs/cli.md is exactly what the commands' --help print (regenerate with
``python -m mosconv.cli.docs > docs/cli.md``), and every command is in it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mosconv.cli.commands import main
from mosconv.cli.docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_md_matches_help():
    assert DOC.read_text() == render(), "docs/cli.md is stale: python -m mosconv.cli.docs > docs/cli.md"


def test_every_command_documented_and_help_works():
    text = DOC.read_text()
    for name in main.commands:
        assert f"## mosconv {name}\n" in text
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output


def test_version_and_help():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("mosconv, version ")
    res = CliRunner().invoke(main, [])
    assert res.exit_code in (0, 2) and "Usage:" in res.output


def test_python_dash_m_mosconv_is_the_command():
    """`python -m mosconv` failed (no mosconv/__main__.py)."""
    import subprocess
    import sys

    env_path = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "mosconv", "--help"], capture_output=True,
                          text=True, check=False, cwd=env_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mosconv [OPTIONS] COMMAND")
