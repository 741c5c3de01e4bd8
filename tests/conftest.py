"""Shared fixtures: a factory of small REAL adapter files, and the zoo of third-party adapters.

The factory writes files the way the tools that produce them do (``safetensors.torch.save_file``
for safetensors, ``torch.save`` of a plain dict for legacy PEFT ``.bin``), never through
mosconv's own writers, so a reader test cannot pass because writer and reader share a bug.
Every factory call returns a :class:`Written` that holds exactly the tensors put on disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO_ROOT / ".." / "shared" / "zoo"

from helpers import ZOO_ADAPTERS, one_thread  # noqa: F401  (shared with the test files)

PEFT_PREFIX = "base_model.model."

# A small Llama-like module set: name -> (d_out, d_in).  GQA: v is narrower than q.
LLAMA_MODULES = {
    f"model.layers.{i}.self_attn.{proj}": shape
    for i in range(3)
    for proj, shape in (("q_proj", (24, 16)), ("v_proj", (8, 16)))
}

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


# --------------------------------------------------------------------------- the factory


@dataclass
class Written:
    """An adapter the factory wrote.

    Attributes:
        path: the folder (PEFT) or the file (single-file formats) to hand to a reader.
        weights: the weight file itself.
        tensors: exactly the tensors written, by key.
        config: the ``adapter_config.json`` written, or None.
    """

    path: Path
    weights: Path
    tensors: dict[str, torch.Tensor]
    config: dict | None = None
    extra_keys: list[str] = field(default_factory=list)


class AdapterFactory:
    """Writes small real adapters under ``root``; each call gets a fresh sub-folder."""

    def __init__(self, root: Path, seed: int = 0):
        self.root = Path(root)
        self.gen = torch.Generator().manual_seed(seed)
        self._n = 0

    # ---- helpers

    def folder(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (0.1 * torch.randn(*shape, generator=self.gen)).to(dtype)

    def write_tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write ``tensors`` as safetensors (by suffix) or a legacy ``torch.save`` dict."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if path.suffix == ".safetensors":
            save_file(tensors, str(path), metadata=metadata)
        else:
            torch.save(dict(tensors), str(path))
        return path

    def raw_peft(
        self,
        tensors: dict[str, torch.Tensor],
        config: dict | None,
        weights: str = "safetensors",
        name: str = "raw",
    ) -> Written:
        """A PEFT folder holding exactly ``tensors`` and ``config`` (None: no config file)."""
        d = self.folder(name)
        wf = self.write_tensors(d / f"adapter_model.{weights}", tensors)
        if config is not None:
            (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return Written(d, wf, dict(tensors), config)

    def raw_file(
        self,
        filename: str,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str] | None = None,
    ) -> Written:
        d = self.folder(Path(filename).stem)
        wf = self.write_tensors(d / filename, tensors, metadata)
        return Written(wf, wf, dict(tensors))

    # ---- PEFT

    def peft(
        self,
        modules: dict[str, tuple[int, int]] | None = None,
        *,
        r: int = 4,
        ranks: dict[str, int] | None = None,
        lora_alpha: float | None = 8,
        use_rslora: bool | None = None,
        rank_pattern: dict | None = None,
        alpha_pattern: dict | None = None,
        fan_in_fan_out: bool | None = None,
        embeddings: dict[str, tuple[int, int]] | None = None,
        extra: dict[str, tuple[int, ...] | torch.Tensor] | None = None,
        dora: bool = False,
        use_dora: bool | None = None,
        old_config: bool = False,
        adapter_name_in_keys: bool = False,
        weights: str = "safetensors",
        dtype: torch.dtype = torch.float32,
        config: dict | None = None,
        metadata: dict[str, str] | None = None,
        name: str = "peft",
    ) -> Written:
        """A PEFT LoRA folder.

        Args:
            modules: module name (without ``base_model.model.``) -> ``(d_out, d_in)``.
            r: the config's ``r`` and every module's rank unless ``ranks`` says otherwise.
            ranks: per-module tensor ranks (write a matching ``rank_pattern`` yourself).
            lora_alpha: the config's ``lora_alpha``; None leaves the field out.
            embeddings: module name -> ``(num_embeddings, embedding_dim)`` for
                ``lora_embedding_A`` ``(r, num_emb)`` / ``lora_embedding_B`` ``(dim, r)``.
            extra: key -> shape (random float32) or tensor, written verbatim.
            dora: also write ``lora_magnitude_vector`` tensors (as PEFT does for DoRA).
            use_dora: the config's ``use_dora`` field (None: left out).
            old_config: write only ``target_modules``, ``peft_type``, ``r``, ``lora_alpha``
                (the schema of early PEFT releases).
            adapter_name_in_keys: ``...lora_A.default.weight`` keys, as some old files have.
            weights: ``safetensors`` or ``bin`` (``torch.save`` of a plain dict).
            dtype: storage dtype of the LoRA factors.
            config: extra config fields (override the generated ones).
        """
        modules = LLAMA_MODULES if modules is None else modules
        ranks = ranks or {}
        tensors: dict[str, torch.Tensor] = {}
        ad = ".default" if adapter_name_in_keys else ""
        for mod, (d_out, d_in) in modules.items():
            rm = ranks.get(mod, r)
            tensors[f"{PEFT_PREFIX}{mod}.lora_A{ad}.weight"] = self.randn(rm, d_in, dtype=dtype)
            tensors[f"{PEFT_PREFIX}{mod}.lora_B{ad}.weight"] = self.randn(d_out, rm, dtype=dtype)
            if dora:
                tensors[f"{PEFT_PREFIX}{mod}.lora_magnitude_vector{ad}.weight"] = self.randn(d_out)
        for mod, (num_emb, dim) in (embeddings or {}).items():
            rm = ranks.get(mod, r)
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_A{ad}"] = self.randn(
                rm, num_emb, dtype=dtype
            )
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_B{ad}"] = self.randn(dim, rm, dtype=dtype)
        extra_keys = []
        for key, spec in (extra or {}).items():
            tensors[key] = spec if isinstance(spec, torch.Tensor) else self.randn(*spec)
            extra_keys.append(key)

        targets = sorted({m.rsplit(".", 1)[-1] for m in [*modules, *(embeddings or {})]})
        cfg: dict = {"peft_type": "LORA", "r": r, "target_modules": targets}
        if lora_alpha is not None:
            cfg["lora_alpha"] = lora_alpha
        if not old_config:
            cfg.update(
                {
                    "base_model_name_or_path": "tiny-llama-for-tests",
                    "task_type": "CAUSAL_LM",
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "inference_mode": True,
                    "init_lora_weights": True,
                    "lora_dropout": 0.0,
                    "modules_to_save": None,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "use_rslora": False,
                    "use_dora": False,
                }
            )
        for key, value in (
            ("use_rslora", use_rslora),
            ("rank_pattern", rank_pattern),
            ("alpha_pattern", alpha_pattern),
            ("fan_in_fan_out", fan_in_fan_out),
            ("use_dora", use_dora),
        ):
            if value is not None:
                cfg[key] = value
        cfg.update(config or {})

        d = self.folder(name)
        wf = self.write_tensors(d / f"adapter_model.{weights}", tensors, metadata)
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        return Written(d, wf, tensors, cfg, extra_keys)

    # ---- single-file image-model formats

    def diffusers(
        self,
        modules: dict[str, tuple[int, int]],
        *,
        r: int = 4,
        alphas: dict[str, float] | None = None,
        extra: dict[str, tuple[int, ...]] | None = None,
        dtype: torch.dtype = torch.float32,
        filename: str = "pytorch_lora_weights.safetensors",
    ) -> Written:
        """diffusers PEFT-style single file: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``
        (module names include the ``unet.`` / ``text_encoder.`` prefix), optional ``.alpha``."""
        tensors = {}
        for mod, (d_out, d_in) in modules.items():
            tensors[f"{mod}.lora_A.weight"] = self.randn(r, d_in, dtype=dtype)
            tensors[f"{mod}.lora_B.weight"] = self.randn(d_out, r, dtype=dtype)
        for mod, alpha in (alphas or {}).items():
            tensors[f"{mod}.alpha"] = torch.tensor(float(alpha))
        for key, shape in (extra or {}).items():
            tensors[key] = self.randn(*shape)
        w = self.raw_file(filename, tensors)
        w.extra_keys = list(extra or {})
        return w

    def diffusers_legacy(
        self,
        blocks: dict[str, tuple[int, int]],
        *,
        r: int = 4,
        projs: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out"),
        filename: str = "pytorch_lora_weights.safetensors",
    ) -> Written:
        """Legacy diffusers attention-processor file: ``<block>.processor.to_q_lora.down.weight``.

        ``blocks``: attention block path -> ``(width, cross_attention_dim)``; to_k/to_v read
        the cross-attention input, to_q/to_out the block width.
        """
        tensors = {}
        for block, (width, cross) in blocks.items():
            for proj in projs:
                d_in = cross if proj in ("to_k", "to_v") else width
                tensors[f"{block}.processor.{proj}_lora.down.weight"] = self.randn(r, d_in)
                tensors[f"{block}.processor.{proj}_lora.up.weight"] = self.randn(width, r)
        return self.raw_file(filename, tensors)

    def kohya(
        self,
        modules: dict[str, tuple[int, int]],
        *,
        r: int = 4,
        alphas: dict[str, float | None] | None = None,
        convs: dict[str, tuple[int, int, int, int]] | None = None,
        alpha_dtype: torch.dtype = torch.float32,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, str] | None = None,
        filename: str = "lora.safetensors",
    ) -> Written:
        """kohya / sd-scripts file: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight``
        and a scalar ``.alpha`` per module (``alphas[mod] = None`` leaves it out; default r).

        ``convs``: module -> ``(out, in, kh, kw)``, a LoCon conv module with down
        ``(r, in, kh, kw)`` and up ``(out, r, 1, 1)``.
        """
        alphas = alphas or {}
        tensors = {}
        for mod, (d_out, d_in) in modules.items():
            tensors[f"{mod}.lora_down.weight"] = self.randn(r, d_in, dtype=dtype)
            tensors[f"{mod}.lora_up.weight"] = self.randn(d_out, r, dtype=dtype)
        for mod, (c_out, c_in, kh, kw) in (convs or {}).items():
            tensors[f"{mod}.lora_down.weight"] = self.randn(r, c_in, kh, kw, dtype=dtype)
            tensors[f"{mod}.lora_up.weight"] = self.randn(c_out, r, 1, 1, dtype=dtype)
        for mod in [*modules, *(convs or {})]:
            alpha = alphas.get(mod, r)
            if alpha is not None:
                tensors[f"{mod}.alpha"] = torch.tensor(float(alpha), dtype=alpha_dtype)
        return self.raw_file(filename, tensors, metadata)


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
    from helpers import prose, tiny_llama_modules, write_random_peft, write_tiny_llama

    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_lm")
    model = write_tiny_llama(root / "model")
    data = root / "prose.txt"
    data.write_text(prose(40_000))
    lora, _ = write_random_peft(root / "lora", tiny_llama_modules(), r=4, alpha=8, seed=5,
                                b_std=0.5)
    return TinyLM(model=model, data=data, lora=lora)
