"""The in-memory LoRA adapter every reader produces and every later stage consumes.

A module's update is ``dW = scale * B @ A`` with ``A`` of shape ``(r, d_in)`` and
``B`` of shape ``(d_out, r)``, always in the ``(out, in)`` orientation of a
``torch.nn.Linear`` weight, whatever the source format stores (GPT-2 ``Conv1D``
adapters only differ in how the runtime applies the update, recorded in
``fan_in_fan_out``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

_NUMBER = re.compile(r"(?<=[._])\d+(?=[._]|$)")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module.

    Attributes:
        name: module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        A: ``(r, d_in)`` float32 down projection.
        B: ``(d_out, r)`` float32 up projection.
        scale: effective scaling (``alpha / r``, ``alpha / sqrt(r)``, or 1).
        kind: the module kind (name pattern without layer numbers plus shape), set by
            :func:`assign_kinds`.
        layer: position of the module inside its kind (0-based, natural name order).
        embedding: True for PEFT ``lora_embedding_A/B`` (the update is ``(B @ A).T``).
        conv_shape: kernel shape ``(out, in, kh, kw)`` for a kohya conv module flattened
            to a matrix, else None.
        stored_params: parameters the source FILE stores for this module (the numel of its
            factor tensors) when they differ in kind from ``A``/``B`` (LyCORIS LoHa/LoKr,
            whose ``A``/``B`` are an exact factorization of the update), else None.
        source_type: how the source stores the update: ``lora`` (``B @ A``), ``loha``
            (Hadamard product of two low-rank products) or ``lokr`` (Kronecker product).
        stored_bytes: bytes of the module's factor tensors in the source file, as stored
            (None: ``file_params`` float32 values).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str = ""
    layer: int = 0
    embedding: bool = False
    conv_shape: tuple[int, ...] | None = None
    stored_params: int | None = None
    source_type: str = "lora"
    stored_bytes: int | None = None

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def params(self) -> int:
        """LoRA parameters of this module: ``r * (d_in + d_out)``."""
        return self.r * (self.d_in + self.d_out)

    @property
    def file_params(self) -> int:
        """Parameters the source file stores: ``stored_params`` if set, else ``params``."""
        return self.stored_params if self.stored_params is not None else self.params

    @property
    def file_bytes(self) -> int:
        """Bytes of the module's factors in the source file, as stored."""
        return self.stored_bytes if self.stored_bytes is not None else 4 * self.file_params


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from disk.

    Attributes:
        format: ``peft``, ``diffusers``, ``diffusers-legacy``, ``kohya``, or for a LyCORIS
            file ``lycoris-`` and its module types joined by ``+`` in the order ``loha``,
            ``lokr``, ``lora`` (``lycoris-loha``, ``lycoris-lokr``, ``lycoris-loha+lokr``,
            ``lycoris-lokr+lora``, ...).
        modules: the adapted modules in natural name order.
        extra_tensors: every non-LoRA tensor of the source (``modules_to_save``,
            biases, ...) under its original key, passed through untouched.
        config: the source's own configuration (``adapter_config.json``, PEFT's JSON as
            read), or ``{}``.
        metadata: the safetensors header metadata of the source (strings only).
        base_model: base model name or path, when the source says it.
        task_type: PEFT task type, when the source says it.
        dtype: the source's storage dtype of the LoRA factors, e.g. ``float16``.
        source_files: the files the adapter was read from.
        fan_in_fan_out: True when the base layers are GPT-2 style ``Conv1D``.
        source_bytes: size of the tensor file the adapter was read from, as stored (0 when
            it was not read from disk): the reference of the report's file size ratio.
    """

    format: str
    modules: tuple[LoraModule, ...]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None
    dtype: str = "float32"
    source_files: tuple[Path, ...] = ()
    fan_in_fan_out: bool = False
    source_bytes: int = 0

    @property
    def params(self) -> int:
        """LoRA parameters, ``sum r * (d_in + d_out)``: the reference of every ratio."""
        return sum(m.params for m in self.modules)

    @property
    def stored_params(self) -> int:
        """Parameters the source files store for the modules (``params`` for plain LoRA;
        the LoHa/LoKr factors' own count for LyCORIS)."""
        return sum(m.file_params for m in self.modules)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the LoRA factor tensors as the source stores them (pass-through tensors
        and file headers apart): what a MoS adapter's tensor bytes compare with."""
        return sum(m.file_bytes for m in self.modules)

    @property
    def kinds(self) -> dict[str, list[LoraModule]]:
        """Modules grouped by kind, in first-seen order."""
        out: dict[str, list[LoraModule]] = {}
        for m in self.modules:
            out.setdefault(m.kind, []).append(m)
        return out

    def module(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def name_pattern(name: str) -> str:
    """The module name with its layer numbers replaced by ``*``."""
    return _NUMBER.sub("*", name)


def assign_kinds(modules: list[LoraModule]) -> tuple[LoraModule, ...]:
    """Sort modules and give each its kind and layer index.

    Modules of one kind share the name pattern without layer numbers AND the same
    ``(d_out, d_in)`` shape (and embedding/conv flags), so GPT-2's ``attn.c_proj``
    and ``mlp.c_proj`` are two kinds and SD blocks of different widths are too.
    """
    modules = sorted(modules, key=lambda m: natural_key(m.name))
    counts: dict[str, int] = {}
    out: list[LoraModule] = []
    for m in modules:
        tag = "emb" if m.embedding else ("conv" if m.conv_shape else "")
        kind = f"{name_pattern(m.name)}[{m.d_out}x{m.d_in}{tag}]"
        layer = counts.get(kind, 0)
        counts[kind] = layer + 1
        out.append(replace(m, kind=kind, layer=layer))
    return tuple(out)
