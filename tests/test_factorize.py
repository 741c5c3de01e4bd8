"""Exact factorization, the shared metrics and the global-budget truncation baseline,
checked against dense float64 computations done here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ZOO_ADAPTERS, dense_update, read_zoo, reference_greedy_ranks

from mosconv.fit.factorize import (
    directions_for_energy,
    energy_retained,
    factorize,
    factorize_adapter,
    factorize_pair,
    fro_retained,
    frob_inner,
    relative_error,
    squared_error,
    stable_rank,
)
from mosconv.fit.truncation import allocate, budget_for_ratio, truncate
from mosconv.lora.read import read_adapter
from mosconv.lora.types import LoraAdapter, LoraModule, assign_kinds

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_exact_factorization(f, dense: torch.Tensor, tol: float, what=""):
    k = f.S.numel()
    # U, V are stored in float32 (half the memory), S in float64
    assert f.U.dtype == torch.float32 and f.S.dtype == F64 and f.V.dtype == torch.float32
    assert f.U.shape == (dense.shape[0], k) and f.V.shape == (dense.shape[1], k)
    assert torch.all(f.S[:-1] >= f.S[1:]) and torch.all(f.S >= 0), what
    ref = float(torch.linalg.vector_norm(dense))
    # ||dense - U diag(S) V^T||_F, in place: the zoo's largest modules are 6144 x 2048
    err = float(torch.linalg.vector_norm(dense.addmm_(f.U.double() * f.S, f.V.double().T, alpha=-1)))
    assert err <= tol * ref, (what, err / ref)
    eye = torch.eye(k, dtype=F64)
    # float32 storage of U, V: orthonormal to float32 precision
    torch.testing.assert_close(f.U.double().T @ f.U.double(), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(f.V.double().T @ f.V.double(), eye, atol=1e-5, rtol=0)
    assert f.energy == pytest.approx(ref**2, rel=1e-10)


# --------------------------------------------------------------------------- exact factorization


@pytest.mark.parametrize("name", ZOO_ADAPTERS)
def test_zoo_factorization_is_exact(name):
    ad = read_zoo(name)
    facts = factorize_adapter(ad)
    assert list(facts) == [m.name for m in ad.modules]
    for m in ad.modules:
        f = facts[m.name]
        assert (f.d_out, f.d_in) == (m.d_out, m.d_in) and f.S.numel() <= m.r
        assert_exact_factorization(f, dense_update(m.A, m.B, m.scale), 1e-5, m.name)


@pytest.mark.parametrize("d_out,d_in,r", [(24, 16, 4), (8, 40, 8), (5, 5, 7), (64, 1, 1)])
def test_factorize_pair_random(d_out, d_in, r):
    g = gen(d_out * 100 + d_in)
    B, A = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    f = factorize_pair(B, A, 0.37)
    assert f.S.numel() == min(d_out, d_in, r)
    torch.testing.assert_close(
        f.S, torch.linalg.svdvals(dense_update(A, B, 0.37))[: f.S.numel()], rtol=1e-10, atol=1e-12
    )
    assert_exact_factorization(f, dense_update(A, B, 0.37), 1e-6)


def test_factorize_rank_deficient_and_zero():
    g = gen(3)
    B = torch.randn(20, 1, generator=g, dtype=F64) @ torch.randn(1, 6, generator=g, dtype=F64)
    A = torch.randn(6, 30, generator=g, dtype=F64)  # rank 1 with r = 6
    f = factorize_pair(B, A)
    assert f.S[0] > 0 and float(f.S[1:].abs().max()) <= 1e-12 * float(f.S[0])
    assert stable_rank(f.S) == pytest.approx(1.0, rel=1e-10)
    assert directions_for_energy(f.S, 0.999) == 1
    z = factorize_pair(torch.zeros(20, 4), torch.randn(4, 30, generator=g))
    assert z.energy == 0.0 and stable_rank(z.S) == 0.0 and directions_for_energy(z.S) == 0


def test_factorize_negative_scale_and_conv_and_embedding_modules(make):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    ad = LoraAdapter(
        format="peft",
        modules=assign_kinds(
            [
                LoraModule(
                    "a",
                    torch.randn(3, 10, generator=gen(1)),
                    torch.randn(7, 3, generator=gen(2)),
                    -1.5,
                ),
            ]
        ),
    )
    m = ad.modules[0]
    assert_exact_factorization(factorize(m), dense_update(m.A, m.B, m.scale), 1e-6)
    kohya = read_adapter(make.kohya({}, r=4, alphas={conv: 2}, convs={conv: (12, 6, 3, 3)}).path)
    peft = read_adapter(make.peft({"x.q_proj": (24, 16)}, embeddings={"x.embed": (50, 16)}).path)
    for m in (*kohya.modules, *peft.modules):
        assert_exact_factorization(factorize(m), dense_update(m.A, m.B, m.scale), 1e-6, m.name)


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(4))
def test_frob_inner_squared_and_relative_error_match_dense(seed):
    g = gen(seed)
    d_out, d_in = 17, 23
    B1, A1 = torch.randn(d_out, 4, generator=g), torch.randn(4, d_in, generator=g)
    B2, A2 = torch.randn(d_out, 6, generator=g), torch.randn(6, d_in, generator=g)
    W1, W2 = B1.double() @ A1.double(), B2.double() @ A2.double()
    assert frob_inner(B1, A1, B2, A2) == pytest.approx(float((W1 * W2).sum()), rel=1e-10)
    assert frob_inner(B1, A1, B1, A1) == pytest.approx(float((W1 * W1).sum()), rel=1e-12)
    dense_sq = float(torch.linalg.matrix_norm(W1 - W2) ** 2)
    assert squared_error(B1, A1, B2, A2) == pytest.approx(dense_sq, rel=1e-10)
    assert relative_error(B1, A1, B2, A2) == pytest.approx(
        math.sqrt(dense_sq) / float(torch.linalg.matrix_norm(W1)), rel=1e-10
    )
    # a close approximation: the Gram route must not lose the small difference
    B3 = B1 + 1e-4 * torch.randn(d_out, 4, generator=g)
    W3 = B3.double() @ A1.double()
    rel = float(torch.linalg.matrix_norm(W1 - W3) / torch.linalg.matrix_norm(W1))
    assert relative_error(B1, A1, B3, A1) == pytest.approx(rel, rel=1e-6)
    assert squared_error(B1, A1, B1, A1) <= 1e-12 * float((W1 * W1).sum())
    assert relative_error(B1, A1, B1, A1) < 1e-6


def test_stable_rank_known_spectra():
    assert stable_rank(torch.tensor([4.0, 3.0], dtype=F64)) == pytest.approx(25 / 16)
    assert stable_rank(torch.ones(5, dtype=F64)) == pytest.approx(5.0)
    assert stable_rank(torch.tensor([2.0, 0.0, 0.0], dtype=F64)) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(3, dtype=F64)) == 0.0
    assert stable_rank(torch.zeros(0, dtype=F64)) == 0.0


def test_directions_for_energy_known_spectra():
    S = torch.tensor([0.5, 0.3, 0.2], dtype=F64).sqrt()  # energies 0.5, 0.3, 0.2
    assert directions_for_energy(S, 0.9) == 3
    assert directions_for_energy(S, 0.8) == 2  # exactly 0.8 after rounding: still 2
    assert directions_for_energy(S, 0.5) == 1
    assert directions_for_energy(S, 0.51) == 2
    assert directions_for_energy(S, 1.0) == 3
    assert directions_for_energy(torch.ones(10, dtype=F64), 0.9) == 9
    assert directions_for_energy(torch.tensor([3.0, 0, 0, 0], dtype=F64)) == 1
    assert directions_for_energy(torch.zeros(4, dtype=F64)) == 0


def test_energy_and_fro_retained():
    assert energy_retained(10.0, 2.5) == pytest.approx(0.75)
    assert energy_retained(0.0, 0.0) == 1.0
    assert fro_retained(2.5, 10.0) == pytest.approx(0.5)
    assert fro_retained(1.0, 0.0) == 1.0


# --------------------------------------------------------------------------- truncation


def random_adapter(seed: int) -> LoraAdapter:
    """6-8 modules of mixed shapes and ranks with trained-LoRA-like decaying spectra."""
    g = gen(seed)
    shapes = [(24, 16), (8, 16), (32, 48), (48, 32), (16, 16), (40, 8), (12, 90), (64, 64)]
    n = 6 + seed % 3
    mods = []
    for i, (d_out, d_in) in enumerate(shapes[:n]):
        r = int(torch.randint(2, 9, (1,), generator=g))
        decay = torch.exp(-torch.arange(r, dtype=torch.float32) * float(torch.rand(1, generator=g)))
        B = torch.randn(d_out, r, generator=g) * decay
        A = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
        mods.append(
            LoraModule(f"model.layers.{i}.proj", A, B, float(torch.rand(1, generator=g)) * 4)
        )
    return LoraAdapter(format="peft", modules=assign_kinds(mods))


def dense_truncation_error(adapter: LoraAdapter, ranks: dict[str, int]) -> tuple[dict, dict]:
    """Per-module ``||dW - dW_k||^2`` and ``||dW||^2`` from a dense float64 SVD."""
    err, energy = {}, {}
    for m in adapter.modules:
        W = dense_update(m.A, m.B, m.scale)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = ranks[m.name]
        Wk = (U[:, :k] * S[:k]) @ Vh[:k]
        err[m.name] = float(torch.linalg.matrix_norm(W - Wk) ** 2)
        energy[m.name] = float(torch.linalg.matrix_norm(W) ** 2)
    return err, energy


@pytest.mark.parametrize("seed", range(5))
def test_truncation_matches_dense_svd_truncation(seed):
    ad = random_adapter(seed)
    facts = factorize_adapter(ad)
    costs = {m.name: m.d_in + m.d_out for m in ad.modules}
    spectra = {
        n: [float(x) for x in torch.linalg.svdvals(dense_update(m.A, m.B, m.scale))[: m.r]]
        for n, m in zip(facts, ad.modules)
    }
    budgets = [0, 1, min(costs.values()), ad.params, ad.params * 3]
    budgets += [budget_for_ratio(ad.params, q) for q in (1.5, 2, 3, 4, 8, 16)]
    budgets += [int(x) for x in torch.randint(0, ad.params, (6,), generator=gen(seed + 100))]
    for budget in budgets:
        t = truncate(facts, budget)
        assert t.budget == budget
        assert t.params <= budget
        assert t.params == sum(t.ranks[m.name] * costs[m.name] for m in ad.modules)
        assert all(0 <= t.ranks[m.name] <= m.r for m in ad.modules)
        # greedy by energy per parameter, as the independent reference does it
        assert t.ranks == reference_greedy_ranks(spectra, costs, budget), budget
        # nothing else fits: every module's next triplet costs more than what is left
        left = budget - t.params
        assert all(
            t.ranks[m.name] == facts[m.name].S.numel() or costs[m.name] > left for m in ad.modules
        )
        # the error is the dense SVD truncation error with the same per-module ranks
        err, energy = dense_truncation_error(ad, t.ranks)
        for n in err:
            assert t.energy[n] == pytest.approx(energy[n], rel=1e-10)
            assert t.err_sq[n] == pytest.approx(err[n], rel=1e-7, abs=1e-12 * energy[n])
        dense_rel = math.sqrt(sum(err.values()) / sum(energy.values()))
        assert t.relative_error == pytest.approx(dense_rel, rel=1e-7, abs=1e-10)
    assert truncate(facts, 0).relative_error == pytest.approx(1.0)
    assert truncate(facts, ad.params).relative_error < 1e-6


def test_truncation_error_is_not_above_uniform_rank_cut():
    """At the budget of a uniform rank cut, the greedy baseline is at least as good."""
    ad = random_adapter(7)
    facts = factorize_adapter(ad)
    uniform = {m.name: min(2, m.r) for m in ad.modules}
    budget = sum(uniform[m.name] * (m.d_in + m.d_out) for m in ad.modules)
    err, energy = dense_truncation_error(ad, uniform)
    assert (
        truncate(facts, budget).relative_error
        <= math.sqrt(sum(err.values()) / sum(energy.values())) + 1e-12
    )


def test_allocate_is_by_energy_per_parameter_not_energy():
    # x: more energy but 10x the cost; y: less energy, much more per parameter
    counts = allocate(
        {"x": torch.tensor([10.0]), "y": torch.tensor([5.0])}, {"x": 200, "y": 20}, 200
    )
    assert counts == {"x": 0, "y": 1}


def test_allocate_skips_what_no_longer_fits_and_takes_cheaper():
    gains = {"x": torch.tensor([100.0, 90.0]), "y": torch.tensor([2.0])}
    counts = allocate(gains, {"x": 200, "y": 20}, 230)
    assert counts == {"x": 1, "y": 1}  # x's second (200) no longer fits; y's (20) does


def test_allocate_ties_go_to_module_order_then_prefix():
    gains = {"b": torch.tensor([1.0, 1.0]), "a": torch.tensor([1.0, 1.0])}
    assert allocate(gains, {"b": 10, "a": 10}, 10) == {"b": 1, "a": 0}
    assert allocate(gains, {"b": 10, "a": 10}, 30) == {"b": 2, "a": 1}
    assert allocate(gains, {"b": 10, "a": 10}, 9) == {"b": 0, "a": 0}


@pytest.mark.parametrize(
    "params,ratio,budget",
    [
        (1000, 8, 125),
        (1001, 8, 125),
        (1000, 3, 333),
        (96, 3, 32),
        (3, 0.1, 30),
        (797184, 16, 49824),
        (100, 1, 100),
        (7, 8, 0),
        (10, 2.5, 4),
        (11, 1.1, 10),  # 1.1 as typed: 11/10 (the float just above it would give 9)
        (3, 1.5, 2),
        (16, 1.00000000003125, 15),  # just above 16/16: 15 (a tolerance gave 16 > 16 / R)
    ],
)
def test_budget_for_ratio(params, ratio, budget):
    assert budget_for_ratio(params, ratio) == budget
    assert isinstance(budget_for_ratio(params, ratio), int)
