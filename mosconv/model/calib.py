"""Calibration statistics: the input second moment of every adapted module.

For module ``m`` with inputs ``x_t`` (``d_in`` each, over ``n`` tokens), the statistic is
``C_m = (1/n) sum_t x_t x_t^T`` (``d_in x d_in``, float64), so that the data-aware error of
an approximation ``dW'`` is ``||(dW - dW') X||_F^2 / n = tr((dW - dW') C (dW - dW')^T)``.

Collection streams the text through the base model in batches, with forward pre-hooks that
add ``X^T X`` of each batch to a float64 accumulator: memory is the model, one batch of
activations and one ``d_in x d_in`` matrix per module, whatever the number of tokens.
Modules that see the same input tensor (``q``/``k``/``v`` of one attention block) share one
product per batch.

The file (``.safetensors``): tensor ``calib.<module name>`` per module (float64) and one
metadata key ``mosconv.calib`` holding JSON (tokens, base model, data file and sha256).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, NumericalError
from ..fileio import atomic_write_bytes, safetensors_bytes

CALIB_SCHEMA = "mosconv.calib/1"
_META_KEY = "mosconv.calib"


@dataclass(frozen=True)
class CalibStats:
    """Input second moments of adapted modules.

    Attributes:
        moments: module name -> ``(d_in, d_in)`` float64 ``(1/n) X^T X``.
        tokens: ``n``, the number of tokens seen.
        info: provenance (base model, data file and sha256, seq_len, ...): JSON values,
            stored in the file's metadata.
    """

    moments: dict[str, torch.Tensor]
    tokens: int
    info: dict[str, Any] = field(default_factory=dict)


def collect_moments(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                    blocks: torch.Tensor, *, batch_size: int = 4,
                    progress: Callable[[int], None] | None = None,
                    info: Mapping[str, Any] | None = None) -> CalibStats:
    """Run ``model`` on ``blocks`` ``(n_blocks, seq_len)`` and collect the input second
    moment of each module in ``modules`` (adapter module name -> layer of ``model``).

    ``progress`` is called with the number of tokens of each finished batch.
    """
    sums: dict[str, torch.Tensor] = {}
    # The last input seen, held by reference: q/k/v of one block are called with the same
    # tensor object, so ``is`` (plus its version counter, against in-place edits) finds the
    # sharing. Holding the reference keeps its memory from being handed to a later input; a
    # key made of the address (``data_ptr``) collides when the allocator reuses freed memory.
    last: dict[str, Any] = {"input": None, "version": -1, "value": None}
    state = {"batch": 0}
    hooks: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if last["input"] is not x or last["version"] != x._version:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                value = flat.T @ flat
                if not bool(torch.isfinite(value).all()):
                    raise NumericalError(
                        f"module {name}: its input is not finite (NaN or Inf) in batch "
                        f"{state['batch'] + 1}: the base model overflows in its dtype or holds "
                        "NaN/Inf weights; no statistics were written")
                last["input"], last["version"], last["value"] = x, x._version, value
            acc = sums.get(name)
            sums[name] = last["value"].clone() if acc is None else acc.add_(last["value"])
        return hook

    for name, layer in modules.items():
        hooks.append(layer.register_forward_pre_hook(make_hook(name)))
    device = next(model.parameters()).device
    tokens = 0
    try:
        with torch.no_grad():
            for i, start in enumerate(range(0, blocks.shape[0], batch_size)):
                state["batch"] = i
                batch = blocks[start:start + batch_size].to(device)
                model(input_ids=batch)
                last["input"] = last["value"] = None
                tokens += batch.numel()
                if progress:
                    progress(batch.numel())
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    missing = [n for n in modules if n not in sums]
    if missing:
        raise FormatError(f"{missing[0]}: the model never called this module on the data")
    moments = {n: (sums[n] / tokens).cpu() for n in modules}
    return CalibStats(moments=moments, tokens=tokens, info=dict(info or {}))


def save_stats(stats: CalibStats, path: str | Path) -> Path:
    """Write ``stats`` to one ``.safetensors`` file (atomic)."""
    path = Path(path)
    meta = {"schema": CALIB_SCHEMA, "tokens": stats.tokens, **stats.info}
    tensors = {f"calib.{n}": m.contiguous() for n, m in stats.moments.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, {_META_KEY: json.dumps(meta)}))
    return path


def is_stats_file(path: str | Path) -> bool:
    """Whether ``path`` is a calibration file written by :func:`save_stats`."""
    from ..lora.read._header import read_safetensors_header

    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        _, meta = read_safetensors_header(p)
    except (FormatError, OSError, ValueError):
        return False
    return _META_KEY in (meta or {})


def load_stats(path: str | Path) -> CalibStats:
    """Read a calibration file and validate every matrix (square, finite, symmetric).

    Raises:
        FormatError: not a calibration file, or a corrupt matrix.
    """
    from ..lora.read._io import load_tensor_file

    path = Path(path)
    tensors, meta = load_tensor_file(path)

    def refuse(why: str) -> FormatError:
        return FormatError(f"{path}: not a mosconv calibration file ({why})")

    if _META_KEY not in meta:
        raise refuse(f"no {_META_KEY!r} metadata")
    try:
        info = json.loads(meta[_META_KEY])
    except (ValueError, RecursionError) as e:  # also absurd numbers or nesting
        raise refuse(f"metadata is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(info, dict):
        raise refuse("metadata is not a JSON object")
    if info.get("schema") != CALIB_SCHEMA:
        raise refuse(f"schema {str(info.get('schema'))[:60]!r}")
    tokens = info.pop("tokens", None)
    if not isinstance(tokens, int) or isinstance(tokens, bool):
        raise refuse(f"tokens {str(tokens)[:60]!r} is not an integer")
    info.pop("schema")
    moments: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith("calib."):
            raise FormatError(f"{path}: unexpected tensor {key[:80]!r} in a calibration file")
        name = key.removeprefix("calib.")
        if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
            raise FormatError(f"{path}: {key} is not a square matrix (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            raise FormatError(f"{path}: {key} has dtype {t.dtype}, expected float")
        t = t.to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"{path}: {key} is not a finite square matrix (NaN or Inf)")
        # symmetric: (C - C^T) v ~ 0 for a fixed generic v (two mat-vecs, no n x n temporary)
        v = torch.linspace(-1.0, 2.0, t.shape[0], dtype=torch.float64).exp()
        if float((t @ v - t.T @ v).norm()) > 1e-6 * float(t.norm()) * float(v.norm()):
            raise FormatError(f"{path}: {key} is not symmetric (a second moment X^T X is)")
        moments[name] = t
    if tokens < 1 or not moments:
        raise FormatError(f"{path}: calibration file holds no statistics")
    return CalibStats(moments=moments, tokens=tokens, info=info)
