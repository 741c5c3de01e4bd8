"""The MoS on-disk format: bit-identical round trip, smallest route dtypes, the paper's
assembly formula, and one-line FormatErrors for broken folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factory import llama_like, write_random_peft
from helpers import assert_same_mos, one_thread, safetensors_parts
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mosconv import FormatError, read_adapter
from mosconv.fit.convert import ConvertConfig, convert
from mosconv.mos.format import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    REPORT_FILE,
    TENSOR_FILE,
    load_mos,
    route_dtype,
    save_mos,
)
from mosconv.mos.types import KindPools, MosAdapter, MosModule, assemble

pytestmark = pytest.mark.usefixtures("single_thread")


EXTRA = {
    "base_model.model.classifier.modules_to_save.default.weight": torch.arange(12.0).reshape(3, 4),
    "base_model.model.classifier.modules_to_save.default.bias": torch.tensor([1.5, -2.0, 0.25]),
    "base_model.model.score.weight": torch.ones(2, 4, dtype=torch.float16),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted synthetic adapter with shared pools and extra tensors (slot weights are
    covered by the hand-built round trip: on random data unweighted candidates win)."""
    root = tmp_path_factory.mktemp("fmt")
    folder, _ = write_random_peft(root / "lora", llama_like(layers=6, d=64, d_kv=32), r=8,
                                  alpha=16, shared_A=True, extra=EXTRA)
    adapter = read_adapter(folder)
    with one_thread():
        res = convert(adapter, ConvertConfig(ratio=4, seed=3))
    return res


def _hand_built(pool_sizes=((5, 4),), nc=2, r=2, d_in=4, d_out=6, weights=False, scale=0.5):
    """One module per kind; kind ``i`` has pools of ``pool_sizes[i]`` shards."""
    g = torch.Generator().manual_seed(0)
    kinds, modules = {}, []
    for i, (na, nb) in enumerate(pool_sizes):
        kind = f"layers.*.proj{i}[{d_out}x{d_in}]"
        kinds[kind] = KindPools(kind, d_in, d_out, nc,
                                torch.randn(na, d_in // nc, generator=g),
                                torch.randn(nb, d_out // nc, generator=g), 0, 0)
        ra = torch.randint(0, na, (r * nc,), generator=g)
        rb = torch.randint(0, nb, (r * nc,), generator=g)
        ra[0], rb[0] = na - 1, nb - 1  # the largest index must survive the narrow dtype
        wa = torch.randn(r * nc, generator=g) if weights else None
        wb = torch.randn(r * nc, generator=g) if weights else None
        modules.append(MosModule(f"layers.0.proj{i}", kind, r, scale, ra, rb, wa, wb))
    return MosAdapter(kinds=kinds, modules=tuple(modules),
                      source={"format": "peft", "config": {"r": r}}, info={"ratio": 2.0})


# ------------------------------------------------------------------ round trip


def test_round_trip_is_bit_identical(converted, tmp_path):
    mos = converted.mos
    assert any(p.public_A > 0 for p in mos.kinds.values())  # shared pools are exercised
    save_mos(mos, tmp_path / "m", converted.report)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == \
        sorted([CONFIG_FILE, TENSOR_FILE, REPORT_FILE])
    back = load_mos(tmp_path / "m")
    assert_same_mos(mos, back)
    for key, t in EXTRA.items():
        assert back.extra_tensors[key].dtype == t.dtype
        assert torch.equal(back.extra_tensors[key], t)
    assert back.source == json.loads(json.dumps(mos.source))
    assert back.info == json.loads(json.dumps(mos.info))

    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert cfg["format"] == FORMAT_NAME and cfg["format_version"] == FORMAT_VERSION == 1
    assert cfg["params"] == mos.params and cfg["index_bytes"] == mos.index_bytes
    assert [m["name"] for m in cfg["modules"]] == [m.name for m in mos.modules]
    assert [k["kind"] for k in cfg["kinds"]] == list(mos.kinds)
    report = json.loads((tmp_path / "m" / REPORT_FILE).read_text())
    assert report["totals"]["mos_file_bytes"] == (tmp_path / "m" / TENSOR_FILE).stat().st_size

    # saving what was loaded gives the same header and the same tensor bytes
    save_mos(back, tmp_path / "m2")
    assert safetensors_parts(tmp_path / "m" / TENSOR_FILE) == \
        safetensors_parts(tmp_path / "m2" / TENSOR_FILE)


def test_saving_is_byte_deterministic(tmp_path):
    """Same adapter, same bytes: the file may be checksummed or compared byte for byte."""
    mos = _hand_built(weights=True)
    files = set()
    for i in range(12):
        save_mos(mos, tmp_path / f"m{i}")
        files.add((tmp_path / f"m{i}" / TENSOR_FILE).read_bytes())
    assert len(files) == 1


def test_round_trip_hand_built_with_weights(tmp_path):
    mos = _hand_built(weights=True)
    save_mos(mos, tmp_path / "m")
    assert_same_mos(mos, load_mos(tmp_path / "m"))
    # the folder may also be named by one of its files
    assert_same_mos(mos, load_mos(tmp_path / "m" / CONFIG_FILE))


def test_save_refuses_existing_output_without_overwrite(tmp_path):
    from mosconv.errors import MosconvError

    mos = _hand_built()
    save_mos(mos, tmp_path / "m")
    with pytest.raises(MosconvError, match="already holds an output") as e:
        save_mos(mos, tmp_path / "m")
    assert e.value.options == ("overwrite",)
    save_mos(mos, tmp_path / "m", overwrite=True)
    assert_same_mos(mos, load_mos(tmp_path / "m"))


# ------------------------------------------------------------------ route dtypes


@pytest.mark.parametrize("size, dtype", [
    (1, torch.uint8), (255, torch.uint8), (256, torch.uint8),
    (257, torch.int16), (2**15, torch.int16),
    (2**15 + 1, torch.int32), (2**31, torch.int32),
    (2**31 + 1, torch.int64),
])
def test_route_dtype_is_smallest_that_holds_every_index(size, dtype):
    assert route_dtype(size) == dtype
    info = torch.iinfo(dtype)
    assert info.min <= 0 and size - 1 <= info.max


def test_saved_routes_use_smallest_dtype(tmp_path):
    # kinds with pools of 256 (uint8), 257 (int16) and 40000 (int32) shards of length 1
    mos = _hand_built(pool_sizes=((256, 8), (257, 300), (40000, 40000)), nc=2, r=1,
                      d_in=2, d_out=2)
    save_mos(mos, tmp_path / "m")
    want = {"0": ("A", torch.uint8, "B", torch.uint8), "1": ("A", torch.int16, "B", torch.int16),
            "2": ("A", torch.int32, "B", torch.int32)}
    on_disk = load_file(str(tmp_path / "m" / TENSOR_FILE))
    with safe_open(str(tmp_path / "m" / TENSOR_FILE), framework="pt") as f:
        assert f.metadata() == {"format": f"{FORMAT_NAME}.v1"}
    for i, (sa, da, sb, db) in want.items():
        assert on_disk[f"mos.routes.layers.0.proj{i}.{sa}"].dtype == da
        assert on_disk[f"mos.routes.layers.0.proj{i}.{sb}"].dtype == db
    for key, t in on_disk.items():
        if key.startswith("mos.pools."):
            assert t.dtype == torch.float32
    back = load_mos(tmp_path / "m")
    assert_same_mos(mos, back)
    assert all(m.routes_A.dtype == torch.int64 for m in back.modules)
    index_bytes = 2 * (1 + 2 + 4) * 2  # per kind: 2 slots per side, 2 sides
    assert mos.index_bytes == back.index_bytes == index_bytes


# ------------------------------------------------------------------ assembly


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "weighted"])
def test_assembly_follows_paper_formula(weights):
    nc, r, d_in, d_out = 2, 2, 4, 6
    sA, sB = d_in // nc, d_out // nc
    pool_A = torch.arange(5 * sA, dtype=torch.float32).reshape(5, sA) + 1
    pool_B = -torch.arange(4 * sB, dtype=torch.float32).reshape(4, sB) - 1
    idx_A = torch.tensor([4, 0, 2, 2])  # repeats allowed
    idx_B = torch.tensor([1, 3, 0, 1])
    wA = torch.tensor([0.5, -1.0, 2.0, 3.0]) if weights else None
    wB = torch.tensor([1.5, 0.25, -2.0, 1.0]) if weights else None
    kind = f"x.*.p[{d_out}x{d_in}]"
    pools = KindPools(kind, d_in, d_out, nc, pool_A, pool_B)
    m = MosModule("x.0.p", kind, r, 0.75, idx_A, idx_B, wA, wB)
    mos = MosAdapter(kinds={kind: pools}, modules=(m,))

    A, B = mos.assemble("x.0.p")
    assert A.shape == (r, d_in) and B.shape == (d_out, r)
    for j in range(r):
        for i in range(nc):
            s = j * nc + i
            wa = 1.0 if wA is None else float(wA[s])
            wb = 1.0 if wB is None else float(wB[s])
            assert torch.equal(A[j, i * sA:(i + 1) * sA], wa * pool_A[idx_A[s]])
            assert torch.equal(B[i * sB:(i + 1) * sB, j], wb * pool_B[idx_B[s]])
    A2, B2 = assemble(pools, m)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    # the explicit product for one entry, to pin the orientation of dW = scale * B @ A
    dW = m.scale * (B @ A)
    assert dW.shape == (d_out, d_in)
    assert float(dW[4, 1]) == pytest.approx(0.75 * sum(float(B[4, j] * A[j, 1]) for j in range(r)))


def test_rank_zero_module_assembles_to_empty():
    kind = "x.*.p[6x4]"
    pools = KindPools(kind, 4, 6, 2, torch.zeros(0, 2), torch.zeros(0, 3))
    m = MosModule("x.0.p", kind, 0, 1.0, torch.zeros(0, dtype=torch.int64),
                  torch.zeros(0, dtype=torch.int64))
    A, B = assemble(pools, m)
    assert A.shape == (0, 4) and B.shape == (6, 0)


# ------------------------------------------------------------------ load errors


@pytest.fixture
def saved(tmp_path) -> Path:
    save_mos(_hand_built(pool_sizes=((5, 4), (3, 3))), tmp_path / "m")
    return tmp_path / "m"


def _rewrite_tensors(folder: Path, change) -> None:
    path = folder / TENSOR_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def _rewrite_config(folder: Path, change) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    change(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def _expect_error(folder: Path, names: str, *words: str) -> str:
    with pytest.raises(FormatError) as e:
        load_mos(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert names in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _set(key, value):
    def change(t):
        t[key] = value
    return change


def test_load_error_routes_out_of_range(saved):
    _rewrite_tensors(saved, _set("mos.routes.layers.0.proj0.A",
                                 torch.tensor([0, 5, 1, 2], dtype=torch.uint8)))
    _expect_error(saved, str(saved / TENSOR_FILE), "layers.0.proj0", "outside")


def test_load_error_pool_of_wrong_shape(saved):
    _rewrite_tensors(saved, _set("mos.pools.k0.A", torch.zeros(5, 3)))
    _expect_error(saved, str(saved / TENSOR_FILE), "mos.pools.k0.A", "shape")


def test_load_error_pool_missing(saved):
    _rewrite_tensors(saved, lambda t: t.pop("mos.pools.k1.B"))
    _expect_error(saved, str(saved / TENSOR_FILE), "k1")


def test_load_error_routes_missing_or_wrong_length(saved):
    _rewrite_tensors(saved, lambda t: t.pop("mos.routes.layers.0.proj1.B"))
    _expect_error(saved, str(saved / TENSOR_FILE), "layers.0.proj1")


def test_load_error_routes_wrong_length(saved):
    _rewrite_tensors(saved, _set("mos.routes.layers.0.proj0.B", torch.zeros(3, dtype=torch.uint8)))
    _expect_error(saved, str(saved / TENSOR_FILE), "layers.0.proj0", "expected 4")


def test_load_error_nan_in_pool(saved):
    _rewrite_tensors(saved, _set("mos.pools.k0.B", torch.full((4, 3), float("nan"))))
    _expect_error(saved, str(saved / TENSOR_FILE), "NaN")


def test_load_error_missing_tensor_file(saved):
    (saved / TENSOR_FILE).unlink()
    _expect_error(saved, TENSOR_FILE)


def test_load_error_truncated_tensor_file(saved):
    data = (saved / TENSOR_FILE).read_bytes()
    (saved / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    _expect_error(saved, str(saved / TENSOR_FILE))


@pytest.mark.parametrize("version", [4, 0, "1", None])
def test_load_error_wrong_format_version(saved, version):
    _rewrite_config(saved, lambda c: c.update(format_version=version))
    _expect_error(saved, str(saved / CONFIG_FILE), "format_version")


def test_load_error_wrong_format_name(saved):
    _rewrite_config(saved, lambda c: c.update(format="something.else"))
    _expect_error(saved, str(saved / CONFIG_FILE), "format")


def test_load_error_unknown_kind(saved):
    _rewrite_config(saved, lambda c: c["modules"][0].update(kind="k9"))
    _expect_error(saved, str(saved / CONFIG_FILE), "k9")


def test_load_error_corrupt_config_json(saved):
    (saved / CONFIG_FILE).write_text("{not json")
    _expect_error(saved, str(saved / CONFIG_FILE))


def test_load_error_no_config_means_incomplete(saved):
    (saved / CONFIG_FILE).unlink()
    msg = _expect_error(saved, str(saved), CONFIG_FILE)
    assert "not a MoS adapter" in msg


def test_load_error_missing_folder(tmp_path):
    _expect_error(tmp_path / "nowhere", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("change, words", [
    (lambda c: c["kinds"][0].pop("nc"), ["nc"]),
    (lambda c: c["modules"][0].update(r="two"), []),
    (lambda c: c["modules"][0].update(r=[2]), []),
    (lambda c: c["modules"][1].pop("name"), ["name"]),
    (lambda c: c["kinds"][1].update(nc=4), ["nc=4"]),
    (lambda c: c["modules"][0].update(scale=float("nan")), ["scale"]),
    (lambda c: c["modules"][0].update(weights=True), ["weights", "layers.0.proj0"]),
    (lambda c: c.update(kinds=None), []),
    (lambda c: c.update(modules=[]), ["'modules' is empty"]),
], ids=["no-nc", "r-str", "r-list", "no-name", "nc-not-dividing", "nan-scale",
        "weights-missing", "kinds-null", "no-modules"])
def test_load_error_bad_config_fields(saved, change, words):
    _rewrite_config(saved, change)
    with pytest.raises(FormatError) as e:
        load_mos(saved)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(saved) in msg, msg
    for w in words:
        assert w in msg, msg


def test_load_error_negative_route(saved):
    _rewrite_tensors(saved, _set("mos.routes.layers.0.proj0.A",
                                 torch.tensor([0, -1, 1, 2], dtype=torch.int16)))
    _expect_error(saved, str(saved / TENSOR_FILE), "layers.0.proj0", "outside")


def test_unknown_tensors_and_fields_are_ignored(saved):
    mos = load_mos(saved)
    _rewrite_tensors(saved, _set("mos.future.something", torch.ones(3)))
    _rewrite_config(saved, lambda c: c.update(future_field={"x": 1}))
    back = load_mos(saved)
    assert_same_mos(mos, back)
    assert back.info["future_field"] == {"x": 1}


def test_load_error_pool_count_disagrees_with_config(saved):
    _rewrite_config(saved, lambda c: c["kinds"][0].update(pool_A=7))
    _expect_error(saved, str(saved), "pool")


def test_config_layout_and_file_modes(converted, tmp_path):
    """Key order, 2-space indent and trailing newline of mos_config.json; usual file modes
    (0666 minus the umask); no temporary files left behind."""
    import os

    save_mos(converted.mos, tmp_path / "m", converted.report)
    text = (tmp_path / "m" / CONFIG_FILE).read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "format": "mosconv.mos",\n')
    cfg = json.loads(text)
    assert list(cfg) == ["format", "format_version", "mosconv_version", "ratio", "seed", "search", "iters",
                         "routing_weights", "lora_params", "budget", "metric", "params", "local_params",
                         "index_bytes",
                         "source", "kinds", "modules"]  # no command: save_mos called directly
    assert [k["id"] for k in cfg["kinds"]] == [f"k{i}" for i in range(len(cfg["kinds"]))]
    assert list(cfg["kinds"][0]) == ["id", "kind", "d_in", "d_out", "nc", "pool_A", "pool_B",
                                     "public_A", "public_B"]
    assert list(cfg["modules"][0]) == ["name", "kind", "r", "scale", "private_A", "private_B",
                                       "weights", "embedding", "conv_shape"]
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "m").iterdir():
        assert not p.name.endswith(".tmp"), p
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ------------------------------------------------------------------ format v2: cores


def _with_cores(r_A: int = 3) -> MosAdapter:
    """Two kinds; the first module carries an ``(r, r_A)`` core, the second none."""
    mos = _hand_built(pool_sizes=((5, 4), (6, 3)), nc=2, r=2)
    g = torch.Generator().manual_seed(1)
    m0, m1 = mos.modules
    pa = mos.kinds[m0.kind].pool_A.shape[0]
    m0 = replace(m0, routes_A=torch.randint(0, pa, (r_A * 2,), generator=g),
                 core=torch.randn(m0.r, r_A, generator=g))
    return replace(mos, modules=(m0, m1))


@pytest.mark.parametrize("r_A", [1, 2, 3])
def test_cores_round_trip_as_format_v2(tmp_path, r_A):
    mos = _with_cores(r_A)
    save_mos(mos, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 2
    assert cfg["modules"][0]["core"] is True and cfg["modules"][0]["r_A"] == r_A
    assert "core" not in cfg["modules"][1]
    assert cfg["params"] == mos.params == sum(p.params for p in mos.kinds.values()) + 2 * r_A
    back = load_mos(tmp_path / "m")
    assert_same_mos(mos, back)
    m = back.modules[0]
    pools = back.kinds[m.kind]
    # dW = scale * B_l @ C_l @ A_l, with A_l of r_A rows gathered as in v1
    a = pools.pool_A[m.routes_A].reshape(r_A, pools.d_in)
    b = pools.pool_B[m.routes_B].reshape(m.r, pools.d_out).T
    A, B = back.assemble(m)
    assert A.shape[0] == B.shape[1] == min(m.r, r_A)
    assert torch.allclose(B @ A, b @ m.core @ a, atol=1e-6)


def test_no_core_still_writes_format_v1(tmp_path):
    save_mos(_hand_built(), tmp_path / "m")
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["format_version"] == 1


@pytest.fixture
def saved_v2(tmp_path):
    return save_mos(_with_cores(3), tmp_path / "v2")


def test_load_error_core_of_wrong_shape(saved_v2):
    _rewrite_tensors(saved_v2, _set("mos.cores.layers.0.proj0", torch.zeros(2, 2)))
    _expect_error(saved_v2, str(saved_v2 / TENSOR_FILE), "layers.0.proj0", "(2, 3)")


def test_load_error_core_missing_or_not_finite(saved_v2):
    _rewrite_tensors(saved_v2, _set("mos.cores.layers.0.proj0",
                                    torch.full((2, 3), float("inf"))))
    _expect_error(saved_v2, str(saved_v2 / TENSOR_FILE), "mos.cores.layers.0.proj0")
    _rewrite_tensors(saved_v2, lambda t: t.pop("mos.cores.layers.0.proj0"))
    _expect_error(saved_v2, str(saved_v2 / TENSOR_FILE), "core of module layers.0.proj0")


def test_load_error_core_in_a_v1_file(saved_v2):
    _rewrite_config(saved_v2, lambda c: c.update(format_version=1))
    _expect_error(saved_v2, str(saved_v2 / CONFIG_FILE), "has a core", "format_version 1")


def test_load_error_r_A_disagrees_with_routes(saved_v2):
    _rewrite_config(saved_v2, lambda c: c["modules"][0].update(r_A=2))
    _expect_error(saved_v2, str(saved_v2 / TENSOR_FILE), "layers.0.proj0", "expected 4")
