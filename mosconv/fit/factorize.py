"""Exact factorization of LoRA updates and the metrics every stage shares.

``dW = scale * B @ A`` (``B: (d_out, r)``, ``A: (r, d_in)``) is factorized as
``U diag(S) V^T`` through a QR of each factor and an ``r x r`` SVD, never forming
the ``d_out x d_in`` matrix: ``O((d_in + d_out) r^2)`` instead of
``O(d_out d_in min(d_out, d_in))`` for a dense SVD.  Arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._threads import one_thread
from ..lora.types import LoraAdapter, LoraModule

_EPS = 1e-300


@dataclass(frozen=True)
class Factorization:
    """``dW = U @ diag(S) @ V.T``, singular values in descending order.

    Attributes:
        U: ``(d_out, k)`` orthonormal columns, float32.
        S: ``(k,)`` singular values, descending, float64.
        V: ``(d_in, k)`` orthonormal columns, float32.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    norm_sq: float | None = None  # exact ||U S V^T||^2 when U, V are not exactly orthonormal

    @property
    def energy(self) -> float:
        """``||dW||_F^2``."""
        return self.norm_sq if self.norm_sq is not None else float((self.S**2).sum())

    def double(self) -> Factorization:
        """The same factorization with float64 ``U`` and ``V`` (for accumulation).

        Its ``energy`` is the exact ``||U S V^T||^2`` of the float64 factors, so Gram-based
        errors against it do not inherit the float32 storage rounding (which the square
        root in a relative error would amplify to ~1e-4)."""
        U, V = self.U.double(), self.V.double()
        e = float(((U.T @ U) * (self.S[:, None] * (V.T @ V) * self.S[None, :])).sum())
        return Factorization(U, self.S, V, e)

    @property
    def d_out(self) -> int:
        return int(self.U.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.V.shape[0])


def factorize_pair(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> Factorization:
    """Exact SVD of ``scale * B @ A`` from its factors.

    Args:
        B: ``(d_out, r)``.
        A: ``(r, d_in)``.
        scale: scalar multiplying the product.
    """
    with one_thread():  # tall-skinny QR: threads give 10-100x outliers on a busy machine
        B = B.to(torch.float64)
        A = A.to(torch.float64)
        qb, rb = torch.linalg.qr(B)  # (d_out, k1), (k1, r)
        qa, ra = torch.linalg.qr(A.T)  # (d_in, k2), (k2, r)
        core = scale * (rb @ ra.T)  # (k1, k2)
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        U, V = (qb @ u).float(), (qa @ vh.T).float()
    # U, V are stored in float32 (orthonormal to ~1e-7; half the memory of the adapter in
    # float64); S stays float64.  Consumers upcast where they accumulate.
    return Factorization(U=U, S=s, V=V)


def factorize(module: LoraModule) -> Factorization:
    """Exact SVD of a module's ``dW = scale * B @ A``."""
    return factorize_pair(module.B, module.A, module.scale)


def factorize_adapter(adapter: LoraAdapter) -> dict[str, Factorization]:
    """Factorizations of every module, keyed by module name."""
    return {m.name: factorize(m) for m in adapter.modules}


def frob_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``<B1 @ A1, B2 @ A2>_F = tr((B1^T B2)(A2 A1^T))`` without forming either product."""
    B1, A1, B2, A2 = (t.to(torch.float64) for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def squared_error(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``||B1 A1 - B2 A2||_F^2`` from Gram matrices (clamped at 0 against rounding)."""
    e = frob_inner(B1, A1, B1, A1) + frob_inner(B2, A2, B2, A2) - 2 * frob_inner(B1, A1, B2, A2)
    return max(e, 0.0)


def relative_error(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``||B1 A1 - B2 A2||_F / ||B1 A1||_F`` (the first pair is the reference)."""
    ref = frob_inner(B1, A1, B1, A1)
    return math.sqrt(squared_error(B1, A1, B2, A2) / max(ref, _EPS))


def stable_rank(S: torch.Tensor) -> float:
    """``||dW||_F^2 / ||dW||_2^2``; 0 for a zero update."""
    top = float(S[0]) if S.numel() else 0.0
    return float(((S.double() / top) ** 2).sum()) if top > 0 else 0.0  # top**2 may underflow


def directions_for_energy(S: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest number of leading singular directions holding ``fraction`` of the energy."""
    e = S.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def energy_retained(ref_energy: float, err_sq: float) -> float:
    """``1 - err^2 / ||dW||^2``: the share of the update's energy kept."""
    return 1.0 - err_sq / ref_energy if ref_energy > 0 else 1.0


def fro_retained(kept_energy: float, ref_energy: float) -> float:
    """kohya's "fro retained": ``||dW_hat||_F / ||dW||_F``."""
    return math.sqrt(kept_energy / ref_energy) if ref_energy > 0 else 1.0
