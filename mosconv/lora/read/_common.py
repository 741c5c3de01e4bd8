"""Validation shared by the readers: pair A with B, check shapes and values."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...errors import FormatError
from ..types import LoraModule
from ._io import check_finite


def make_module(
    path: Path,
    name: str,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    scale: float,
    *,
    embedding: bool = False,
) -> LoraModule:
    """Build a validated :class:`LoraModule` from a down (A) and up (B) tensor.

    Conv weights of shape ``(r, in, kh, kw)`` / ``(out, r, 1, 1)`` are flattened to
    matrices (exact: a kxk conv followed by a 1x1 conv is one kxk conv).
    """
    if down is None or up is None:
        missing = "down/A" if down is None else "up/B"
        raise FormatError(f"{path}: module {name} has no {missing} tensor")
    for key, t in (("A", down), ("B", up)):
        if not t.is_floating_point():
            raise FormatError(f"{path}: module {name} {key} has non-float dtype {t.dtype}")
        check_finite(path, f"{name}.{key}", t)
    conv_shape = None
    if down.dim() == 4:
        if up.dim() != 4 or tuple(up.shape[2:]) != (1, 1):
            raise FormatError(
                f"{path}: module {name} has conv down {tuple(down.shape)} "
                f"but up {tuple(up.shape)} (expected (out, r, 1, 1))"
            )
        conv_shape = (int(up.shape[0]), int(down.shape[1]), int(down.shape[2]), int(down.shape[3]))
        down = down.reshape(down.shape[0], -1)
        up = up.reshape(up.shape[0], up.shape[1])
    if down.dim() != 2 or up.dim() != 2:
        raise FormatError(
            f"{path}: module {name} has A {tuple(down.shape)} and B {tuple(up.shape)}; "
            "expected 2-D matrices"
        )
    if up.shape[1] != down.shape[0]:
        raise FormatError(
            f"{path}: module {name} has mismatched shapes A {tuple(down.shape)} and "
            f"B {tuple(up.shape)} (B's columns must equal A's rows)"
        )
    if down.shape[0] == 0 or down.shape[1] == 0 or up.shape[0] == 0:
        raise FormatError(f"{path}: module {name} has an empty factor")
    if not math.isfinite(scale):
        raise FormatError(f"{path}: module {name} has a non-finite scale ({scale}): check its "
                          "alpha and rank")
    A = down.detach().to(torch.float32).contiguous()
    B = up.detach().to(torch.float32).contiguous()
    # the sources were checked finite above; only a float64 one can overflow float32 here
    wide = torch.float64 in (down.dtype, up.dtype)
    overflow = wide and not (torch.isfinite(A).all() and torch.isfinite(B).all())
    # ||dW||_F <= |scale| ||A||_F ||B||_F: its square (the energy every metric uses) must be
    # a float64 number
    bound = abs(scale) * float(A.double().norm()) * float(B.double().norm())
    if overflow or not math.isfinite(bound * bound):
        raise FormatError(f"{path}: module {name} has values too large to compute with "
                          "(they overflow float32, or scale * |B| * |A| overflows)")
    return LoraModule(
        name=name,
        A=A,
        B=B,
        scale=float(scale),
        embedding=embedding,
        conv_shape=conv_shape,
        stored_bytes=down.numel() * down.element_size() + up.numel() * up.element_size(),
    )
