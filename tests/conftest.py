"""Shared fixtures: a factory of small REAL adapter files, and the zoo of third-party adapters.

The factory writes files the way the tools that produce them do (``safetensors.torch.save_file``
for safetensors, ``torch.save`` of a plain dict for legacy PEFT ``.bin``), never through
mosconv's own writers, so a reader test cannot pass because writer and reader share a bug.
Every factory call returns a :class:`Written` that holds exactly the tensors put on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO_ROOT / ".." / "shared" / "zoo"

from factory import LLAMA_MODULES, AdapterFactory, Written  # noqa: F401  (shared with the test files)
from helpers import ZOO_ADAPTERS, one_thread  # noqa: F401  (shared with the test files)

PEFT_PREFIX = "base_model.model."


# modules_to_save tensors in both layouts PEFT has used.
MODULES_TO_SAVE_EXTRAS = {
    "base_model.model.classifier.modules_to_save.default.weight": (2, 16),
    "base_model.model.classifier.modules_to_save.default.bias": (2,),
    "base_model.model.score.weight": (3, 16),
}


@pytest.fixture
def single_thread():
    """Run a test on one BLAS / intra-op thread (torch and numpy), then restore: these tests
    do many small float64 products, where a second thread on a busy 2-core machine made them
    ~20-50x slower.  Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Print the shuffled run's seed where -q still shows it (pytest-randomly's own header
    line is hidden by -q), so that a failing order can be replayed."""
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed", None)
        terminalreporter.write_line(f"random test order: --randomly-seed={seed}")


# --------------------------------------------------------------------------- the zoo


def zoo_root() -> Path:
    """``../shared/zoo`` relative to the repo root; skip (with the reason) when it is absent."""
    if not ZOO_DIR.is_dir():
        pytest.skip(
            f"../shared/zoo not present: {ZOO_DIR.resolve()} does not exist "
            "(the zoo of real third-party adapters is not shipped with the repo)"
        )
    return ZOO_DIR


def zoo_adapter_path(name: str) -> Path:
    path = zoo_root() / name
    if not path.exists():
        pytest.skip(f"../shared/zoo not present: {name} is missing from {ZOO_DIR.resolve()}")
    return path


@pytest.fixture(scope="session")
def zoo() -> Path:
    return zoo_root()


@cache
def _read_zoo_cached(name: str):
    from mosconv.lora.read import read_adapter

    return read_adapter(ZOO_DIR / name)


def read_zoo(name: str):
    """The mosconv reading of a zoo adapter (cached: readers are pure)."""
    zoo_adapter_path(name)
    return _read_zoo_cached(name)


def zoo_weight_file(name: str) -> Path:
    folder = zoo_adapter_path(name)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert len(files) == 1, files
    return files[0]


@cache
def _raw_cached(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if p.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return torch.load(path, map_location="cpu", weights_only=True)


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file, read without mosconv."""
    return _raw_cached(str(path))


_RAW_LORA = re.compile(
    r"^(?P<mod>.+?)\.(?:(?P<peft>lora_A|lora_B)(?:\.default)?\.weight"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"|(?P<kohya>lora_down|lora_up)\.weight)$"
)
_RAW_LEGACY = re.compile(
    r"^(?P<mod>.+)\.processor\.(?P<proj>to_\w+?)_lora\.(?P<which>down|up)\.weight$"
)


def raw_lora_pairs(
    tensors: dict[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A/down, B/up)}`` parsed independently of mosconv's readers.

    Module names are as mosconv reports them: PEFT prefix removed, legacy diffusers
    ``to_out`` mapped to diffusers' ``to_out.0`` module.
    """
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _RAW_LEGACY.match(key)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            slots.setdefault(f"{m['mod']}.{proj}", {})["A" if m["which"] == "down" else "B"] = t
            continue
        m = _RAW_LORA.match(key)
        if m:
            which = m["peft"] or m["emb"] or m["kohya"]
            ab = "A" if which.endswith(("A", "down")) else "B"
            slots.setdefault(m["mod"].removeprefix(PEFT_PREFIX), {})[ab] = t
    return {mod: (s["A"], s["B"]) for mod, s in slots.items()}


def zoo_expected_scale(name: str) -> float:
    """The scale the zoo adapter's own config implies (PEFT: alpha / r; no config: 1)."""
    cfg_path = zoo_adapter_path(name) / "adapter_config.json"
    if not cfg_path.is_file():
        return 1.0
    cfg = json.loads(cfg_path.read_text())
    assert (
        not cfg.get("use_rslora") and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    )
    return cfg["lora_alpha"] / cfg["r"]


@pytest.fixture
def make(tmp_path: Path) -> AdapterFactory:
    """The adapter factory, writing under this test's ``tmp_path`` with seed 0."""
    return AdapterFactory(tmp_path / "adapters", seed=0)


def dense_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in float64, formed densely."""
    return scale * (B.double() @ A.double())


# --------------------------------------------------------------------------- references


def reference_singular_values(A: torch.Tensor, B: torch.Tensor, scale: float) -> np.ndarray:
    """Singular values of the dense ``scale * B @ A``, in numpy float64, descending, at most r.

    The dense update is formed, then projected onto an orthonormal basis ``Q`` of A's row
    space (which holds every row of dW, so ``dW @ Q`` has dW's singular values): a full
    dense SVD of the zoo's 6144 x 2048 modules would take seconds each.
    """
    A64, B64 = A.double().numpy(), B.double().numpy()
    dense = scale * (B64 @ A64)  # (d_out, d_in)
    Q, _ = np.linalg.qr(A64.T)  # (d_in, r)
    return np.linalg.svd(dense @ Q, compute_uv=False)


def reference_greedy_ranks(
    spectra: dict[str, list[float]], costs: dict[str, int], budget: int
) -> dict[str, int]:
    """Global-budget rank allocation, written independently of mosconv.fit.truncation: repeatedly
    take, among the modules whose next singular triplet still fits in what is left, the one
    with the largest sigma^2 / (d_in + d_out) (ties: the earlier module)."""
    ranks = {n: 0 for n in spectra}
    left = budget
    while True:
        best = None
        for pos, (n, s) in enumerate(spectra.items()):
            k = ranks[n]
            if k < len(s) and costs[n] <= left:
                key = (float(s[k]) ** 2 / costs[n], -pos)
                if best is None or key > best[0]:
                    best = (key, n)
        if best is None:
            return ranks
        ranks[best[1]] += 1
        left -= costs[best[1]]


# --------------------------------------------------------------------------- tiny real LM


@dataclass(frozen=True)
class TinyLM:
    """A tiny Llama folder (save_pretrained, real BPE tokenizer), a text file, and a LoRA
    for it whose effect on the outputs is clearly measurable."""

    model: Path
    data: Path
    lora: Path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> TinyLM:
    from factory import write_random_peft
    from helpers import prose, tiny_llama_modules, write_tiny_llama

    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_lm")
    model = write_tiny_llama(root / "model")
    data = root / "prose.txt"
    data.write_text(prose(40_000))
    lora, _ = write_random_peft(root / "lora", tiny_llama_modules(), r=4, alpha=8, seed=5,
                                b_std=0.5)
    return TinyLM(model=model, data=data, lora=lora)


@pytest.fixture(scope="module")
def shared_a_adapter(tmp_path_factory):
    """A read Llama-shaped LoRA whose layers share their ``A`` (as adapters trained from one
    seed do), so shared structures can win: for tests of conversion results and reports."""
    from factory import llama_like, write_random_peft

    from mosconv.lora.read import read_adapter

    folder, _ = write_random_peft(tmp_path_factory.mktemp("shared-a") / "lora", llama_like(),
                                  shared_A=True)
    return read_adapter(folder)
