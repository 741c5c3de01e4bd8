"""Small helpers shared by the tests: the zoo location with a skip helper, dense references
in float64, a cache of zoo conversions (so several tests can look at one conversion without
paying for it twice), a tiny Llama writer and one-line-error assertions.  Test adapters come
from :mod:`factory`.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import pytest
import torch
from factory import llama_like

REPO_ROOT = Path(__file__).resolve().parent.parent
# Real trained adapters (read-only, never copied into the repo); see ../shared/zoo/README.md.
ZOO = REPO_ROOT.parent / "shared" / "zoo"

ZOO_ADAPTERS = [
    "distilbert-imdb-seqcls",
    "gemma3-270m-svg-x3/final",
    "gemma3-270m-svg-x3/curriculum_stage1",
    "gpt2-great-tabular-bin",
    "gpt2-tigrinya-lora",
    "open-calm-1b-r1-fp16",
    "opt-125m-lora-ckpts/final",
    "opt-125m-lora-ckpts/checkpoint-10",
    "sd15-diffusers-attnproc-r4",
    "smollm-135m-medical-r16/5epochs",
]

PEFT_PREFIX = "base_model.model."


def zoo_path(name: str) -> Path:
    """Path of a zoo adapter; skips the test (saying why) when the zoo or the adapter is absent."""
    if not ZOO.is_dir():
        pytest.skip(f"zoo of real adapters not present: {ZOO} does not exist "
                    "(it lives next to the repo as ../shared/zoo and is not shipped with it)")
    path = ZOO / name
    if not path.exists():
        pytest.skip(f"zoo adapter {name} not present under {ZOO}")
    return path


@contextlib.contextmanager
def one_thread():
    """One torch / BLAS thread: these tests do many small products; on a busy 2-core
    machine extra threads only spin."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def dense(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * B @ A`` in float64."""
    return float(scale) * (B.double() @ A.double())


def mos_dense(mos, name: str) -> torch.Tensor:
    """The MoS update of one module, ``scale * B_l @ A_l`` in float64, from ``mos.assemble``."""
    m = mos.module(name)
    A, B = mos.assemble(m)
    return dense(A, B, m.scale)


@cache
def _zoo_conversion(name: str, ratio: float, search: str, seed: int, dtype: str):
    from mosconv import read_adapter
    from mosconv.fit.convert import ConvertConfig, convert

    adapter = read_adapter(ZOO / name)
    with one_thread():
        result = convert(adapter, ConvertConfig(ratio=ratio, search=search, seed=seed,
                                                dtype=dtype))
    return adapter, result


def zoo_conversion(name: str, ratio: float = 8.0, search: str = "fast", seed: int = 0,
                   dtype: str = "auto"):
    """``(adapter, ConvertResult)`` of a zoo adapter, cached for the whole session.

    Callers must not mutate the result (``report`` is a dict)."""
    zoo_path(name)
    return _zoo_conversion(name, float(ratio), search, seed, dtype)


def assert_same_mos(a, b) -> None:
    """Two MoS adapters hold identical tensors (bit for bit) and identical structure."""
    assert list(a.kinds) == list(b.kinds)
    for kind in a.kinds:
        pa, pb = a.kinds[kind], b.kinds[kind]
        assert (pa.kind, pa.d_in, pa.d_out, pa.nc, pa.public_A, pa.public_B) == \
            (pb.kind, pb.d_in, pb.d_out, pb.nc, pb.public_A, pb.public_B)
        assert pa.pool_A.dtype == pb.pool_A.dtype and pa.pool_B.dtype == pb.pool_B.dtype
        assert torch.equal(pa.pool_A, pb.pool_A) and torch.equal(pa.pool_B, pb.pool_B)
    assert len(a.modules) == len(b.modules)
    for ma, mb in zip(a.modules, b.modules):
        assert (ma.name, ma.kind, ma.r, ma.scale, tuple(ma.private_A), tuple(ma.private_B),
                ma.embedding, ma.conv_shape) == \
            (mb.name, mb.kind, mb.r, mb.scale, tuple(mb.private_A), tuple(mb.private_B),
             mb.embedding, mb.conv_shape)
        assert torch.equal(ma.routes_A.long(), mb.routes_A.long())
        assert torch.equal(ma.routes_B.long(), mb.routes_B.long())
        for wa, wb in ((ma.weights_A, mb.weights_A), (ma.weights_B, mb.weights_B),
                       (ma.core, mb.core)):
            assert (wa is None) == (wb is None)
            if wa is not None:
                assert torch.equal(wa, wb)
    assert list(a.extra_tensors) == list(b.extra_tensors) or \
        sorted(a.extra_tensors) == sorted(b.extra_tensors)
    for key, t in a.extra_tensors.items():
        assert t.dtype == b.extra_tensors[key].dtype
        assert torch.equal(t, b.extra_tensors[key]), key


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """``(header, data)`` of a safetensors file: the parsed JSON header (with its
    ``__metadata__``) and the raw tensor bytes after it."""
    import json
    import struct

    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


# safetensors keeps ``__metadata__`` in a Rust HashMap, so with two or more metadata keys
# the header's key order (and so the file's bytes) changes from one save to the next.
NONDETERMINISTIC_METADATA = (
    "package bug: mosconv.fileio.safetensors_bytes is not byte-deterministic: safetensors "
    "serializes the header __metadata__ ({'format', 'format_version'}) in HashMap order, "
    "which varies between calls, so two saves of the same MoS adapter differ in the header"
)


def lowrank_rel_diff(A1, B1, s1, A2, B2, s2) -> float:
    """``||s1 B1 A1 - s2 B2 A2||_F / ||s1 B1 A1||_F`` in float64 without forming the dense
    matrices: ``<X, Y> = tr((B_x^T B_y)(A_y A_x^T))`` (exact algebra, for wide modules)."""
    X = (A1.double(), float(s1) * B1.double())
    Y = (A2.double(), float(s2) * B2.double())

    def inner(p, q):
        return float(((p[1].T @ q[1]) * (p[0] @ q[0].T)).sum())

    xx, yy, xy = inner(X, X), inner(Y, Y), inner(X, Y)
    return max(xx + yy - 2 * xy, 0.0) ** 0.5 / xx ** 0.5


TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


def example_module(name: str):
    """The script ``examples/<name>.py`` imported as a module (they are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _example_model_module():
    return example_module("make_example_model")


def prose(chars: int = 60_000) -> str:
    """Real English prose available offline (Python's own pydoc topics), deterministic."""
    return _example_model_module().prose(chars)


def write_tiny_llama(out: Path, *, seed: int = 0, vocab: int = 256) -> Path:
    """A tiny randomly initialized Llama causal LM with a real (byte-level BPE) tokenizer
    trained on :func:`prose`, saved as a local model folder (examples/make_example_model.py
    with tiny shapes)."""
    # a wide initialization gives peaked next-token distributions, so that a LoRA's effect
    # on them (and a student's distance to it) is clearly measurable
    return _example_model_module().write_model(out, seed=seed, vocab=vocab,
                                               initializer_range=0.2, **TINY_LLAMA)


def tiny_llama_modules() -> dict[str, tuple[int, int]]:
    """The q/v modules of :func:`write_tiny_llama`'s model (q 32x32, v 16x32)."""
    return llama_like(layers=TINY_LLAMA["num_hidden_layers"], d=32, d_kv=16)


def assert_one_line_error(result, path: Path | str, *problem: str) -> str:
    """exit 1; stderr is one line 'mosconv: error: ...' naming ``path`` and every ``problem``."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("mosconv: error: "), line
    assert str(path) in line, (str(path), line)
    for word in problem:
        assert word.lower() in line.lower(), (word, line)
    assert "Traceback" not in result.output and "internal error" not in line, line
    assert "\x1b" not in line  # no terminal escape codes leak through
    assert isinstance(result.exception, SystemExit)
    return line
