"""The README's two commands: the first one runs here (minus its pip installs), the second
is exactly what .ci/run runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.DOTALL)[:2]


def test_ci_runs_the_readme_test_command():
    _, test_cmd = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci.splitlines()


def test_readme_first_command_runs(tmp_path):
    first, _ = readme_commands()
    steps = [s.strip() for s in first.split("&&")]
    assert any("pip install torch==2.13.0" in s for s in steps)
    run = [s for s in steps if "pip install" not in s]
    assert run and any(s.startswith("mosconv compress") for s in run)
    for step in run * 2:  # twice: the command must also work on a second run
        argv = shlex.split(step)
        if argv[0] == "python3":
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        elif argv[0] == "mosconv":
            argv = [sys.executable, "-m", "mosconv.cli", *argv[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "example_mos"
    report = json.loads((out / "report.json").read_text())
    t = report["totals"]
    assert t["mos_params"] <= t["lora_params"] / 8
    assert t["relative_error"] <= t["truncation_relative_error"] + 1e-6
    assert (out / "mos_config.json").is_file()


def test_readme_python_uses_the_public_api():
    """Every ``mosconv.X`` of the README's Python block is exported by the package itself."""
    import mosconv

    block = re.search(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    used = set(re.findall(r"\bmosconv\.(\w+)", block.group(1)))
    assert used and used <= set(mosconv.__all__), used - set(mosconv.__all__)
    for name in mosconv.__all__:
        assert getattr(mosconv, name) is not None, name


def test_the_api_names_a_path_given_for_an_adapter_and_a_missing_module(tmp_path):
    import mosconv
    from mosconv.errors import ConfigError

    script = ROOT / "examples" / "make_example_lora.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "lora")], check=True,
                   capture_output=True)
    with pytest.raises(ConfigError, match=r"convert takes a LoraAdapter \(mosconv.read_adapter"
                                          r"\(path\) reads one\), got PosixPath"):
        mosconv.convert(tmp_path / "lora", mosconv.ConvertConfig(ratio=8))
    result = mosconv.convert(mosconv.read_adapter(tmp_path / "lora"))
    with pytest.raises(ConfigError, match="no module 'nope' in this MoS adapter"):
        result.mos.assemble("nope")
    assert mosconv.run_batch is mosconv.batch.run.run_batch
