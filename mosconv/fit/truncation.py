"""The baseline users would pick instead of MoS: global-budget SVD rank truncation.

Every module's exact singular triplets compete for one parameter budget: a triplet
of a module costs ``d_in + d_out`` parameters and keeps ``sigma^2`` of energy.
Triplets are taken greedily by energy per parameter (ties by module order, then
triplet index); a triplet that no longer fits is skipped and cheaper ones may still
be taken, until nothing fits.  Because a module's triplets are sorted, each
module keeps a prefix: a per-module rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .factorize import Factorization


@dataclass(frozen=True)
class Truncation:
    """Result of global-budget truncation.

    Attributes:
        ranks: kept rank per module name.
        params: parameters used, ``sum(rank * (d_in + d_out))``.
        budget: the parameter budget it was given.
        err_sq: per-module squared Frobenius error (energy of dropped triplets).
        energy: per-module ``||dW||_F^2``.
    """

    ranks: dict[str, int]
    params: int
    budget: int
    err_sq: dict[str, float]
    energy: dict[str, float]

    @property
    def relative_error(self) -> float:
        """Energy-weighted over all modules: ``sqrt(sum err^2 / sum ||dW||^2)``."""
        total = sum(self.energy.values())
        return math.sqrt(sum(self.err_sq.values()) / total) if total > 0 else 0.0


def allocate(
    gains: dict[str, torch.Tensor], costs: dict[str, int], budget: int
) -> dict[str, int]:
    """Greedy prefix allocation: ``gains[name][i]`` is the gain of the i-th item of
    ``name`` (non-increasing in i), each costing ``costs[name]``.  Returns counts."""
    order = list(gains)
    items = []
    for pos, name in enumerate(order):
        g = gains[name].double().tolist()
        c = costs[name]
        for i, v in enumerate(g):
            if v > 0:  # a zero-energy triplet would spend budget for nothing
                items.append((-v / c, pos, i))
    items.sort()
    counts = {name: 0 for name in order}
    left = budget
    for _, pos, i in items:
        name = order[pos]
        c = costs[name]
        if c <= left and counts[name] == i:
            counts[name] += 1
            left -= c
    return counts


def truncate(facts: dict[str, Factorization], budget: int) -> Truncation:
    """Global-budget truncation of factorized modules under ``budget`` parameters."""
    gains = {n: f.S**2 for n, f in facts.items()}
    costs = {n: f.d_in + f.d_out for n, f in facts.items()}
    ranks = allocate(gains, costs, int(budget))
    err_sq = {n: float((f.S[ranks[n]:] ** 2).sum()) for n, f in facts.items()}
    energy = {n: f.energy for n, f in facts.items()}
    params = sum(ranks[n] * costs[n] for n in facts)
    return Truncation(ranks=ranks, params=params, budget=int(budget), err_sq=err_sq, energy=energy)


def budget_for_ratio(lora_params: int, ratio: float) -> int:
    """Parameter budget ``floor(lora_params / ratio)`` (see :func:`floor_div`)."""
    return floor_div(lora_params, ratio)


def floor_div(n: int, ratio: float) -> int:
    """``floor(n / ratio)`` exactly, ``ratio`` taken as the decimal it prints as: ``1.1`` is
    11/10 (the binary float just above it would lose one), and a ratio just above ``n / k``
    gives ``k - 1`` (a tolerance added before the floor gave ``k``)."""
    from fractions import Fraction

    return math.floor(Fraction(int(n)) / Fraction(repr(float(ratio))))
