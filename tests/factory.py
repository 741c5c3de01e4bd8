"""The one factory of test adapters.

* :class:`AdapterFactory` (the ``make`` fixture) writes small REAL adapter files the way the
  tools that produce them do (``safetensors.torch.save_file`` for safetensors, ``torch.save``
  of a plain dict for legacy PEFT ``.bin``), never through mosconv's own writers, so a reader
  test cannot pass because writer and reader share a bug.  Every call returns a
  :class:`Written` that holds exactly the tensors put on disk.
* :func:`write_random_peft` writes a random PEFT folder through mosconv's writer, for tests
  of everything after reading (conversion, format, runtime, CLI); :func:`llama_like` gives
  a Llama-shaped module set for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."

# A small Llama-like module set: name -> (d_out, d_in).  GQA: v is narrower than q.
LLAMA_MODULES = {
    f"model.layers.{i}.self_attn.{proj}": shape
    for i in range(3)
    for proj, shape in (("q_proj", (24, 16)), ("v_proj", (8, 16)))
}


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



# --------------------------------------------------------------------------- via mosconv's writer


def write_random_peft(
    out: Path,
    modules: dict[str, tuple[int, int]],
    *,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    fan_in_fan_out: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    shared_A: bool = False,
    b_std: float = 1.0,
    embeddings: dict[str, tuple[int, int]] | None = None,
) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Write a random PEFT LoRA folder with :func:`mosconv.lora.write.write_peft_folder`.

    Args:
        modules: module name (without ``base_model.model.``) -> ``(d_out, d_in)``.
        shared_A: every module of the same ``d_in`` gets the same ``A`` (as adapters
            trained from one seed have), with its own random ``B``.
        config: fields that override the generated adapter_config.json.
        embeddings: embedding module name -> ``(num_embeddings, embedding_dim)``, written as
            PEFT's ``lora_embedding_A (r, num_embeddings)`` / ``lora_embedding_B (dim, r)``.

    Returns:
        ``(folder, {name: (A, B)})`` with ``A: (r, d_in)``, ``B: (d_out, r)`` float32 as written.
    """
    from mosconv.lora.write import write_peft_folder

    g = torch.Generator().manual_seed(seed)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shared: dict[int, torch.Tensor] = {}
    rows = []
    for name, (d_out, d_in) in modules.items():
        if shared_A:
            if d_in not in shared:
                shared[d_in] = torch.randn(r, d_in, generator=g)
            A = shared[d_in].clone()
        else:
            A = torch.randn(r, d_in, generator=g)
        B = torch.randn(d_out, r, generator=g) * b_std
        pairs[name] = (A, B)
        rows.append((name, A, B, False))
    for name, (num_emb, dim) in (embeddings or {}).items():
        A = torch.randn(r, num_emb, generator=g)
        B = torch.randn(dim, r, generator=g) * b_std
        pairs[name] = (A, B)
        rows.append((name, A, B, True))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-test-model",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1]
                                  for n in [*modules, *(embeddings or {})]}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    cfg.update(config or {})
    write_peft_folder(Path(out), rows, cfg, extra)
    return Path(out), pairs


def llama_like(layers: int = 4, d: int = 32, d_kv: int = 16) -> dict[str, tuple[int, int]]:
    """A Llama-shaped module set (q: d x d, v: d_kv x d) over ``layers`` layers."""
    return {
        f"model.layers.{i}.self_attn.{proj}": shape
        for i in range(layers)
        for proj, shape in (("q_proj", (d, d)), ("v_proj", (d_kv, d)))
    }
