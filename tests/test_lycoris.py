"""LyCORIS LoHa and LoKr single files (kohya layout, ``ss_network_module=lycoris.kohya``).

Every module read must give ``scale * B @ A`` equal to an independent dense reconstruction
from the raw tensors (Hadamard product of the dense products, ``torch.kron`` on the 4-D
tensors as LyCORIS's ``make_kron`` does) with LyCORIS's own scale, at the update's true
rank; inspect and compress must work on the files; the LyCORIS types mosconv does not read
must be refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_line_error, mos_dense

from mosconv import read_adapter
from mosconv.cli.commands import main
from mosconv.errors import FormatError, UnsupportedAdapterError
from mosconv.mos.format import REPORT_FILE, load_mos

META = {"ss_network_module": "lycoris.kohya"}
Q = "lora_unet_down_blocks_0_attentions_0_proj_in"
K = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
V = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV2 = "lora_unet_down_blocks_1_resnets_0_conv2"


pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- builders
# Each builder adds one module's tensors (exactly LyCORIS's key layout) and returns the
# module's independent dense reference (flattened to (out, in*kh*kw)), kernel shape or None,
# and the numel of its factors.


def _alpha(t: dict, mod: str, alpha: float | None) -> None:
    if alpha is not None:
        t[f"{mod}.alpha"] = torch.tensor(float(alpha))


def add_loha(make, t: dict, mod: str, d_out: int, d_in: int, r: int, *, scale: float,
             alpha: float | None, kernel: tuple[int, int] | None = None, r2: int | None = None):
    r2 = r2 or r
    tail = (d_in, *kernel) if kernel else (d_in,)
    t[f"{mod}.hada_w1_a"] = make.randn(d_out, r)
    t[f"{mod}.hada_w1_b"] = make.randn(r, *tail)
    t[f"{mod}.hada_w2_a"] = make.randn(d_out, r2)
    t[f"{mod}.hada_w2_b"] = make.randn(r2, *tail)
    _alpha(t, mod, alpha)
    return loha_reference(t, mod, scale), ((d_out, d_in, *kernel) if kernel else None)


def loha_reference(t: dict, mod: str, scale: float) -> torch.Tensor:
    w = {p: t[f"{mod}.{p}"].double() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    shape = (w["hada_w1_a"].shape[0], *w["hada_w1_b"].shape[1:])
    dense1 = (w["hada_w1_a"] @ w["hada_w1_b"].flatten(1)).reshape(shape)
    dense2 = (w["hada_w2_a"] @ w["hada_w2_b"].flatten(1)).reshape(shape)
    return (scale * dense1 * dense2).reshape(shape[0], -1)


def add_lokr(make, t: dict, mod: str, w1: tuple[int, int], w2: tuple[int, int], *, scale: float,
             alpha: float | None, r1: int | None = None, r2: int | None = None,
             kernel: tuple[int, int] | None = None, flat_w2b: bool = False):
    """``r1``/``r2`` None: that factor is stored full; else as ``_a @ _b`` of that rank."""
    (o1, i1), (o2, i2) = w1, w2
    if r1 is None:
        t[f"{mod}.lokr_w1"] = make.randn(o1, i1)
    else:
        t[f"{mod}.lokr_w1_a"] = make.randn(o1, r1)
        t[f"{mod}.lokr_w1_b"] = make.randn(r1, i1)
    tail = (i2, *kernel) if kernel else (i2,)
    if r2 is None:
        t[f"{mod}.lokr_w2"] = make.randn(o2, *tail)
    else:
        t[f"{mod}.lokr_w2_a"] = make.randn(o2, r2)
        b = make.randn(r2, *tail)
        t[f"{mod}.lokr_w2_b"] = b.flatten(1) if flat_w2b else b
    _alpha(t, mod, alpha)
    conv = (o1 * o2, i1 * i2, *kernel) if kernel and not flat_w2b else None
    return lokr_reference(t, mod, scale, kernel), conv


def lokr_reference(t: dict, mod: str, scale: float, kernel=None) -> torch.Tensor:
    """LyCORIS's ``make_kron``: ``w1`` unsqueezed to w2's dims, ``torch.kron`` on the (4-D)
    tensors, then flattened."""
    g = {k.split(".", 1)[1]: v.double() for k, v in t.items() if k.startswith(f"{mod}.lokr")}
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    else:
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"].flatten(1)
        if kernel:
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    dense = scale * torch.kron(w1, w2)
    return dense.reshape(dense.shape[0], -1)


def numel(t: dict, mod: str) -> int:
    return sum(v.numel() for k, v in t.items() if k.startswith(f"{mod}.") and k != f"{mod}.alpha")


def write(make, t: dict, name: str = "lyco.safetensors"):
    return make.raw_file(name, t, metadata=META)


def check_exact(adapter, refs: dict[str, tuple[torch.Tensor, tuple | None]], t: dict,
                every: bool = True) -> None:
    """Each module of ``refs`` (``every``: and no other) reproduces its reference to 1e-5 at
    the reference's numerical rank."""
    if every:
        assert sorted(m.name for m in adapter.modules) == sorted(refs)
    for name, (ref, conv) in refs.items():
        m = adapter.module(name)
        got = m.scale * (m.B.double() @ m.A.double())
        assert got.shape == ref.shape, name
        assert float((got - ref).norm() / ref.norm()) < 1e-5, name
        assert m.r == int(torch.linalg.matrix_rank(ref)), name
        assert m.conv_shape == conv, name
        assert m.A.dtype == m.B.dtype == torch.float32
        if m.source_type != "lora":
            assert m.stored_params == numel(t, name), name


# --------------------------------------------------------------------------- LoHa


def test_loha_linear_is_exact(make):
    t = {}
    refs = {Q: add_loha(make, t, Q, 24, 16, 3, alpha=1.5, scale=0.5),
            K: add_loha(make, t, K, 12, 40, 4, alpha=4, scale=1.0)}
    a = read_adapter(write(make, t).path)
    assert a.format == "lycoris-loha"
    check_exact(a, refs, t)
    assert a.module(Q).r == 9 and a.module(K).r == 12  # min(r1*r2, d_out, d_in)
    assert {m.source_type for m in a.modules} == {"loha"}
    assert a.stored_params == numel(t, Q) + numel(t, K)
    assert a.params == sum(m.r * (m.d_in + m.d_out) for m in a.modules)
    assert a.extra_tensors == {}


def test_loha_conv_is_exact(make):
    t = {}
    refs = {CONV: add_loha(make, t, CONV, 8, 6, 2, kernel=(3, 3), alpha=1, scale=0.5),
            CONV2: add_loha(make, t, CONV2, 40, 3, 2, kernel=(1, 1), alpha=2, scale=1.0)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    assert a.module(CONV).conv_shape == (8, 6, 3, 3) and a.module(CONV).d_in == 54
    assert a.module(CONV).kind.endswith("conv]")


def test_loha_flattened_conv_factors_are_read_as_a_matrix(make):
    """LyCORIS's own module saves non-Tucker conv LoHa as (r, in*kh*kw): exact, kernel unknown."""
    t = {}
    ref, _ = add_loha(make, t, CONV, 8, 6, 2, kernel=(3, 3), alpha=2, scale=1.0)
    t[f"{CONV}.hada_w1_b"] = t[f"{CONV}.hada_w1_b"].flatten(1)
    t[f"{CONV}.hada_w2_b"] = t[f"{CONV}.hada_w2_b"].flatten(1)
    check_exact(read_adapter(write(make, t).path), {CONV: (ref, None)}, t)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_loha_alpha_missing_or_zero_is_scale_one(make, alpha):
    """LyCORIS: ``alpha = lora_dim if alpha is None or alpha == 0`` (loha.py 130)."""
    t = {}
    refs = {Q: add_loha(make, t, Q, 16, 16, 2, alpha=alpha, scale=1.0)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    assert a.module(Q).scale == 1.0


def test_loha_true_rank_is_found(make):
    """w2 = 2 * ones: the update is 2 * w1a @ w1b, of rank r1 = 3, not r1 * r2 = 6."""
    t = {}
    add_loha(make, t, Q, 20, 24, 3, alpha=3, scale=1.0, r2=2)
    t[f"{Q}.hada_w2_a"] = torch.ones(20, 2)
    t[f"{Q}.hada_w2_b"] = torch.ones(2, 24)
    ref = loha_reference(t, Q, 1.0)
    a = read_adapter(write(make, t).path)
    check_exact(a, {Q: (ref, None)}, t)
    assert a.module(Q).r == 3


# --------------------------------------------------------------------------- LoKr


def test_lokr_w1_full_w2_lowrank(make):
    """dim = lokr_w2_a's columns (lokr.py 265-266): scale = alpha / 2."""
    t = {}
    refs = {Q: add_lokr(make, t, Q, (4, 4), (8, 6), r2=2, alpha=1, scale=0.5)}
    a = read_adapter(write(make, t).path)
    assert a.format == "lycoris-lokr"
    check_exact(a, refs, t)
    assert a.module(Q).r == 8  # rank 4 * rank 2
    assert a.module(Q).source_type == "lokr"


def test_lokr_w1_lowrank_w2_full(make):
    """dim = lokr_w1_a's columns (lokr.py 263-264): scale = alpha / 3."""
    t = {}
    refs = {Q: add_lokr(make, t, Q, (8, 10), (4, 5), r1=3, alpha=6, scale=2.0)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    assert a.module(Q).r == 12


def test_lokr_both_full_ignores_alpha(make):
    """Both W1 and W2 full: LyCORIS sets alpha = lora_dim, scale 1 (lokr.py 209-211)."""
    t = {}
    refs = {Q: add_lokr(make, t, Q, (2, 3), (5, 4), alpha=16, scale=1.0)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    assert a.module(Q).scale == 1.0 and a.module(Q).r == 8


def test_lokr_both_lowrank(make):
    t = {}
    refs = {Q: add_lokr(make, t, Q, (6, 8), (10, 12), r1=2, r2=2, alpha=1, scale=0.5)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    assert a.module(Q).r == 4


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_lokr_alpha_missing_or_zero_is_scale_one(make, alpha):
    t = {}
    refs = {Q: add_lokr(make, t, Q, (4, 4), (8, 6), r2=2, alpha=alpha, scale=1.0)}
    check_exact(read_adapter(write(make, t).path), refs, t)


def test_lokr_true_rank_is_found(make):
    """A rank-1 W1 times a rank-2 W2 is rank 2; an all-zero W2 (LyCORIS's init) is a rank-1
    zero pair."""
    t = {}
    add_lokr(make, t, Q, (4, 4), (8, 6), r2=2, alpha=2, scale=1.0)
    t[f"{Q}.lokr_w1"] = torch.outer(torch.arange(1.0, 5.0), torch.ones(4))
    add_lokr(make, t, K, (2, 2), (8, 8), r2=2, alpha=2, scale=1.0)
    t[f"{K}.lokr_w2_b"] = torch.zeros(2, 8)
    a = read_adapter(write(make, t).path)
    check_exact(a, {Q: (lokr_reference(t, Q, 1.0), None)}, t, every=False)
    assert a.module(Q).r == 2
    z = a.module(K)
    assert z.r == 1 and (z.d_out, z.d_in) == (16, 16)
    assert float(z.A.abs().sum() + z.B.abs().sum()) == 0.0


def test_kron_of_conv_tensors_is_kron_of_flattened_w2():
    """LyCORIS's ``kron(w1[:, :, None, None], w2)`` flattened to (o, i*kh*kw) equals
    ``kron(w1, w2.reshape(o2, -1))``."""
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(3, 2, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    four_d = torch.kron(w1[:, :, None, None], w2)
    assert four_d.shape == (12, 10, 3, 3)
    assert torch.equal(four_d.reshape(12, -1), torch.kron(w1, w2.reshape(4, -1)))


@pytest.mark.parametrize("r2, flat", [(None, False), (2, False), (2, True)],
                         ids=["w2-full", "w2b-4d", "w2b-flat"])
def test_lokr_conv_is_exact(make, r2, flat):
    t = {}
    refs = {CONV: add_lokr(make, t, CONV, (2, 2), (4, 3), r2=r2, kernel=(3, 3), alpha=1,
                           flat_w2b=flat, scale=1.0 if r2 is None else 0.5)}
    a = read_adapter(write(make, t).path)
    check_exact(a, refs, t)
    m = a.module(CONV)
    assert (m.d_out, m.d_in) == (8, 54)
    assert m.conv_shape == (None if flat else (8, 6, 3, 3))


# --------------------------------------------------------------------------- mixed files


def mixed(make, *, lora: bool = True, loha: bool = True):
    """A file with LoKr modules (linear and conv), optionally LoHa and plain kohya LoRA."""
    t, refs = {}, {}
    refs[Q] = add_lokr(make, t, Q, (4, 4), (8, 6), r2=2, alpha=1, scale=0.5)
    refs[CONV] = add_lokr(make, t, CONV, (2, 2), (4, 3), r2=2, kernel=(3, 3), alpha=2, scale=1.0)
    if loha:
        refs[K] = add_loha(make, t, K, 24, 16, 3, alpha=1.5, scale=0.5)
    if lora:
        t[f"{V}.lora_down.weight"] = make.randn(4, 16)
        t[f"{V}.lora_up.weight"] = make.randn(12, 4)
        t[f"{V}.alpha"] = torch.tensor(2.0)
        refs[V] = (0.5 * t[f"{V}.lora_up.weight"].double() @ t[f"{V}.lora_down.weight"].double(),
                   None)
    t["lora_unet_extra.bias"] = make.randn(3)
    return t, refs


@pytest.mark.parametrize("lora, loha, label", [
    (True, True, "lycoris-loha+lokr+lora"),
    (True, False, "lycoris-lokr+lora"),
    (False, True, "lycoris-loha+lokr"),
])
def test_mixed_file_reads_every_module(make, lora, loha, label):
    t, refs = mixed(make, lora=lora, loha=loha)
    a = read_adapter(write(make, t).path)
    assert a.format == label
    check_exact(a, refs, t)
    assert list(a.extra_tensors) == ["lora_unet_extra.bias"]
    if lora:
        assert a.module(V).source_type == "lora" and a.module(V).stored_params is None
    stored = sum(numel(t, name) for name in refs)
    assert a.stored_params == stored


def test_lycoris_wrapper_prefix_locon_modules_are_read(make):
    """LyCORIS's own wrapper names modules ``lycoris_<name>``: its LoCon (lora_down/lora_up)
    modules were kept as extra tensors next to the LoHa ones, left out of the conversion,
    and a LoCon-only file was refused as having no lora_down/lora_up keys."""
    t, refs = {}, {}
    loha = "lycoris_down_blocks_0_attn1_to_q"
    refs[loha] = add_loha(make, t, loha, 24, 16, 3, alpha=1.5, scale=0.5)
    locon = "lycoris_down_blocks_0_resnets_0_conv1"
    t[f"{locon}.lora_down.weight"] = make.randn(2, 4, 3, 3)
    t[f"{locon}.lora_up.weight"] = make.randn(6, 2, 1, 1)
    t[f"{locon}.alpha"] = torch.tensor(1.0)
    refs[locon] = (0.5 * t[f"{locon}.lora_up.weight"].double().flatten(1)
                   @ t[f"{locon}.lora_down.weight"].double().flatten(1), (6, 4, 3, 3))
    a = read_adapter(write(make, t).path)
    assert a.format == "lycoris-loha+lora" and not a.extra_tensors
    check_exact(a, refs, t)
    only = {k: v for k, v in t.items() if k.startswith(locon)}
    b = read_adapter(write(make, only, "locon.safetensors").path)
    assert [m.name for m in b.modules] == [locon] and b.module(locon).scale == 0.5


def test_reading_is_deterministic(make):
    t, _ = mixed(make)
    path = write(make, t).path
    a, b = read_adapter(path), read_adapter(path)
    for m in a.modules:
        n = b.module(m.name)
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B) and m.scale == n.scale


def test_float16_factors(make):
    t = {}
    add_loha(make, t, Q, 16, 16, 2, alpha=2, scale=1.0)
    t = {k: v.half() for k, v in t.items()}
    a = read_adapter(write(make, t).path)
    assert a.dtype == "float16"
    check_exact(a, {Q: (loha_reference(t, Q, 1.0), None)}, t)


def test_module_with_lora_and_loha_keys_is_an_error(make):
    t = {}
    add_loha(make, t, Q, 16, 16, 2, alpha=2, scale=1.0)
    t[f"{Q}.lora_down.weight"] = make.randn(2, 16)
    t[f"{Q}.lora_up.weight"] = make.randn(16, 2)
    w = write(make, t)
    assert_one_line_error(run("inspect", w.path), w.path, Q, "both")


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_inspect_shows_format_and_stored_params(make, kind):
    t = {}
    if kind == "loha":
        add_loha(make, t, Q, 24, 16, 3, alpha=1.5, scale=0.5)
        add_loha(make, t, CONV, 8, 6, 2, kernel=(3, 3), alpha=1, scale=0.5)
    else:
        add_lokr(make, t, Q, (4, 4), (8, 6), r2=2, alpha=1, scale=0.5)
        add_lokr(make, t, CONV, (2, 2), (4, 3), kernel=(3, 3), alpha=1, scale=1.0)
    w = write(make, t)
    stored = numel(t, Q) + numel(t, CONV)
    a = read_adapter(w.path)
    assert stored != a.params
    res = run("inspect", w.path)
    assert res.exit_code == 0, res.output
    assert f"lycoris-{kind}" in res.stdout
    assert f"{stored:,} stored in the file" in res.stdout
    assert f"LoRA-equivalent {a.params:,}" in res.stdout
    res = run("inspect", w.path, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == f"lycoris-{kind}"
    assert info["stored_params"] == stored
    assert info["lora_params"] == info["lora_equivalent_params"] == a.params
    assert sum(k["stored_params"] for k in info["kinds"]) == stored
    assert {m["source_type"] for m in info["modules"]} == {kind}
    assert info["truncation"][0]["budget"] == a.params // 2


def test_inspect_plain_lora_params_unchanged(make):
    w = make.kohya({"lora_unet_a_to_q": (16, 16)}, r=4)
    res = run("inspect", w.path, "--json")
    info = json.loads(res.stdout)
    assert info["stored_params"] == info["lora_params"] == info["lora_equivalent_params"] == 128
    text = run("inspect", w.path).stdout
    assert "LoRA params   128" in text and "stored in the file" not in text


# --------------------------------------------------------------------------- compress


@pytest.mark.parametrize("loha", [True, False], ids=["loha+lokr+lora", "lokr+lora"])
def test_compress_ratio1_reproduces_every_module(make, tmp_path, loha):
    t, refs = mixed(make, loha=loha)
    w = write(make, t)
    out = tmp_path / "mos"
    res = run("compress", w.path, out, "--ratio", "1")
    assert res.exit_code == 0, res.output
    mos = load_mos(out)
    for name, (ref, conv) in refs.items():
        got = mos_dense(mos, name)
        assert float((got - ref).norm() / ref.norm()) < 1e-5, name
        assert mos.module(name).conv_shape == conv
    report = json.loads((out / REPORT_FILE).read_text())
    tot = report["totals"]
    label = "lycoris-loha+lokr+lora" if loha else "lycoris-lokr+lora"
    assert tot["source_format"] == label and mos.source["format"] == label
    assert tot["source_params"] == sum(numel(t, name) for name in refs)
    assert tot["relative_error"] < 1e-5
    assert f"the {label} file stores {tot['source_params']:,}" in res.stdout
    larger = tot["mos_params"] > tot["source_params"]  # lossless costs a LoRA of the true rank
    assert ("note: the MoS adapter holds more parameters than the" in res.stdout) == larger


def test_compress_ratio8_reports_the_truncation_baseline(make, tmp_path):
    t, _ = mixed(make)
    w = write(make, t)
    out = tmp_path / "mos8"
    res = run("compress", w.path, out, "--ratio", "8")
    assert res.exit_code == 0, res.output
    tot = json.loads((out / REPORT_FILE).read_text())["totals"]
    a = read_adapter(w.path)
    assert tot["lora_params"] == a.params and tot["budget"] == a.params // 8
    assert tot["mos_params"] <= tot["budget"]
    assert 0 < tot["truncation_relative_error"] < 1
    assert tot["relative_error"] <= tot["truncation_relative_error"] + 1e-6
    assert f"truncation at the same budget {tot['truncation_relative_error']:.4f}" in res.stdout


# --------------------------------------------------------------------------- refused types


def _loha_keys(make, mod=Q):
    t = {}
    add_loha(make, t, mod, 8, 8, 2, alpha=2, scale=1.0)
    return t


REFUSED = {
    "loha-tucker": (lambda mk: {**_loha_keys(mk), f"{Q}.hada_t1": mk.randn(2, 2, 3, 3),
                                f"{Q}.hada_t2": mk.randn(2, 2, 3, 3)}, "LoHa Tucker", "hada_t1"),
    "lokr-tucker": (lambda mk: {f"{Q}.lokr_w1": mk.randn(2, 2), f"{Q}.lokr_w2_a": mk.randn(2, 4),
                                f"{Q}.lokr_w2_b": mk.randn(2, 4), f"{Q}.lokr_t2":
                                mk.randn(2, 2, 3, 3)}, "LoKr Tucker", "lokr_t2"),
    "locon-tucker": (lambda mk: {f"{Q}.lora_down.weight": mk.randn(2, 4, 1, 1),
                                 f"{Q}.lora_mid.weight": mk.randn(2, 2, 3, 3),
                                 f"{Q}.lora_up.weight": mk.randn(8, 2, 1, 1)},
                     "LoCon Tucker", "lora_mid"),
    "full": (lambda mk: {f"{Q}.diff": mk.randn(8, 8), f"{Q}.diff_b": mk.randn(8)},
             "full (diff)", ".diff"),
    "diag-oft": (lambda mk: {f"{Q}.oft_blocks": mk.randn(4, 2, 2), f"{Q}.alpha":
                             torch.tensor(0.0)}, "diag-OFT", "oft_blocks"),
    "boft": (lambda mk: {f"{Q}.oft_blocks": mk.randn(2, 4, 2, 2)}, "BOFT", "oft_blocks"),
    "glora": (lambda mk: {f"{Q}.{p}.weight": mk.randn(2, 8) for p in ("a1", "a2", "b1", "b2")},
              "GLoRA", "a1.weight"),
    "ia3": (lambda mk: {f"{Q}.weight": mk.randn(8), f"{Q}.on_input": torch.tensor(0)},
            "IA3", "on_input"),
    "dora": (lambda mk: {**_loha_keys(mk), f"{Q}.dora_scale": mk.randn(8, 1)}, "DoRA",
             "dora_scale"),
    "norm": (lambda mk: {f"{Q}.w_norm": mk.randn(8), f"{Q}.b_norm": mk.randn(8)}, "norm",
             "_norm"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_lycoris_types_are_refused(make, case):
    build, kind, key = REFUSED[case]
    t = build(make)
    add_lokr(make, t, K, (2, 2), (4, 4), r2=2, alpha=1, scale=0.5)  # a readable module too
    w = write(make, t, f"{case}.safetensors")
    line = assert_one_line_error(run("inspect", w.path), w.path, "LyCORIS", kind, Q, key,
                                 "not supported")
    assert "LoHa and LoKr" in line
    with pytest.raises(UnsupportedAdapterError):
        read_adapter(w.path)
    res = run("compress", w.path, w.path.parent / "out", "--ratio", "2")
    assert res.exit_code == 1 and "LyCORIS" in res.stderr


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("key", [f"{Q}.hada_w2_b", f"{K}.lokr_w2_a", f"{K}.lokr_w1"])
def test_nan_in_a_factor_is_one_line(make, key):
    t = {}
    add_loha(make, t, Q, 8, 8, 2, alpha=2, scale=1.0)
    add_lokr(make, t, K, (2, 2), (4, 4), r2=2, alpha=1, scale=0.5)
    t[key] = t[key].clone()
    t[key].view(-1)[1] = float("nan")
    w = write(make, t)
    line = assert_one_line_error(run("inspect", w.path), w.path, key, "NaN")
    assert "LyCORIS" not in line
    with pytest.raises(FormatError):
        read_adapter(w.path)


def _bad_shapes(mk):
    t = _loha_keys(mk)
    t[f"{Q}.hada_w2_b"] = mk.randn(3, 8)
    return t


def _missing(mk):
    t = _loha_keys(mk)
    del t[f"{Q}.hada_w2_a"]
    return t


def _int_factor(mk):
    t = _loha_keys(mk)
    t[f"{Q}.hada_w1_a"] = torch.ones(8, 2, dtype=torch.int32)
    return t


def _both_w1(mk):
    return {f"{Q}.lokr_w1": mk.randn(2, 2), f"{Q}.lokr_w1_a": mk.randn(2, 1),
            f"{Q}.lokr_w1_b": mk.randn(1, 2), f"{Q}.lokr_w2": mk.randn(4, 4)}


def _no_w2(mk):
    return {f"{Q}.lokr_w1": mk.randn(2, 2), f"{Q}.lokr_w2_a": mk.randn(4, 2)}


def _bad_alpha(mk):
    t = _loha_keys(mk)
    t[f"{Q}.alpha"] = torch.ones(2)
    return t


def _nan_alpha(mk):
    t = _loha_keys(mk)
    t[f"{Q}.alpha"] = torch.tensor(float("nan"))
    return t


@pytest.mark.parametrize("build, words", [
    (_bad_shapes, ("mismatched shapes", "hada_w2_a", "hada_w2_b")),
    (_missing, ("LoHa", "no hada_w2_a")),
    (_int_factor, ("hada_w1_a", "non-float")),
    (_both_w1, ("both lokr_w1 and lokr_w1_a",)),
    (_no_w2, ("no lokr_w2_b",)),
    (_bad_alpha, ("alpha", "scalar")),
    (_nan_alpha, ("non-finite scale",)),
], ids=["shapes", "missing", "int", "both-w1", "no-w2b", "alpha-shape", "alpha-nan"])
def test_malformed_modules_are_one_line_format_errors(make, build, words):
    w = write(make, build(make))
    assert_one_line_error(run("inspect", w.path), w.path, Q, *words)
    with pytest.raises(FormatError) as info:
        read_adapter(w.path)
    assert not isinstance(info.value, UnsupportedAdapterError)


def test_a_factorization_too_large_for_memory_is_refused(make):
    """Two full 128x128 LoKr factors (128 KiB) make a 16384x16384 update of rank 16384."""
    t = {f"{Q}.lokr_w1": make.randn(128, 128), f"{Q}.lokr_w2": make.randn(128, 128)}
    w = write(make, t)
    assert_one_line_error(run("inspect", w.path), w.path, Q, "exact LoRA factorization",
                          "rank 16384")
    with pytest.raises(UnsupportedAdapterError):
        read_adapter(w.path)
