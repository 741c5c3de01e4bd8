"""Zoo groups stored in a float dtype (``batch --shared-pool --dtype``, and ``auto``: the
members' source dtype): the pool file, the cores and the own shards all take it, errors are
measured on the stored values, and bytes are counted as stored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_batch import files_of, write_lora_like

from mosconv.batch.run import BatchConfig, run_batch
from mosconv.cli import main
from mosconv.errors import ConfigError
from mosconv.lora.read import read_adapter
from mosconv.mos.format import load_mos
from mosconv.names import POOLS_DIR, TENSOR_FILE

RATIO = 8.0

pytestmark = pytest.mark.usefixtures("single_thread")


def write_zoo(root: Path, n: int, dtype: str, start: int = 0) -> None:
    """``n`` adapters trained from one init (so the group shares bases), stored in ``dtype``."""
    for i in range(start, start + n):
        folder = write_lora_like(root / f"task{i}", i, layers=2, d=64, d_kv=32, r=8)
        f = folder / "adapter_model.safetensors"
        save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}, str(f))


def dtypes_of(path: Path) -> set[str]:
    """The dtypes of a file's pools and cores (a member's) or of its bases (a pool file)."""
    return {str(t.dtype).removeprefix("torch.") for k, t in load_file(path).items()
            if k.startswith(("mos.pools.", "mos.cores.", "k"))}


def error_of(src, mos) -> float:
    """Energy-weighted relative error of the loaded MoS adapter against its source (float64)."""
    err = energy = 0.0
    for m in src.modules:
        ref = m.scale * (m.B.double() @ m.A.double())
        mm = mos.module(m.name)
        A, B = mos.assemble(mm)
        err += float((ref - mm.scale * (B.double() @ A.double())).pow(2).sum())
        energy += float(ref.pow(2).sum())
    return math.sqrt(err / energy)


def tensor_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(path).values())


def pool_path(out: Path) -> Path:
    return next((out / POOLS_DIR).glob("*.safetensors"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_group_keeps_its_source_dtype(dtype, tmp_path):
    zoo16, zoo32 = tmp_path / "zoo16", tmp_path / "zoo32"
    write_zoo(zoo16, 4, dtype)
    write_zoo(zoo32, 4, "float32")
    out16, out32 = tmp_path / "out16", tmp_path / "out32"
    s16 = run_batch(zoo16, out16, BatchConfig(ratio=RATIO, shared_pool=True))
    s32 = run_batch(zoo32, out32, BatchConfig(ratio=RATIO, shared_pool=True))
    assert s16.failed == s32.failed == 0
    assert s16.totals.shared_pool_params == s32.totals.shared_pool_params > 0
    # the pool file and every member's own tensors are stored in the source's dtype
    short = dtype
    assert dtypes_of(pool_path(out16)) == {short}
    assert dtypes_of(pool_path(out32)) == {"float32"}
    assert tensor_bytes(pool_path(out32)) == 2 * tensor_bytes(pool_path(out16))
    for a16, a32 in zip(s16.adapters, s32.adapters):
        assert dtypes_of(out16 / a16.name / TENSOR_FILE) == {short}
        mos = load_mos(out16 / a16.name)
        assert mos.storage.dtype == dtype
        assert any(m.core is not None for m in mos.modules)
        # the reported error is the error of what was stored (rounded bases, cores, shards)
        src = read_adapter(zoo16 / a16.name)
        assert error_of(src, mos) == pytest.approx(a16.relative_error, rel=1e-4)
        # and rounding costs little next to the float32 group's
        assert a16.relative_error < a32.relative_error + 0.01
        # own tensors take half the bytes (routes aside)
        rep16 = json.loads((out16 / a16.name / "report.json").read_text())["totals"]
        rep32 = json.loads((out32 / a32.name / "report.json").read_text())["totals"]
        b16, b32 = rep16["mos_bytes"], rep32["mos_bytes"]
        assert b16["cores"] * 2 == b32["cores"] > 0
        assert b16["shards"] * 2 == b32["shards"]


def test_dtype_is_a_choice(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo, 3, "float16")
    res = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool", "--dtype",
                                    "float32", "--quiet"])
    assert res.exit_code == 0, res.output
    assert dtypes_of(pool_path(out)) == {"float32"}
    assert load_mos(out / "task0").storage.dtype == "float32"
    cfg = json.loads((out / "task0" / "mos_config.json").read_text())
    assert cfg["batch"]["dtype"] == "float32"
    # a rerun asking for another dtype refits the group in it
    res = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool", "--dtype",
                                    "bfloat16", "--quiet"])
    assert res.exit_code == 0, res.output
    assert dtypes_of(pool_path(out)) == {"bfloat16"}
    assert load_mos(out / "task2").storage.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="size ratio"):  # quantize auto chooses by size
        BatchConfig(shared_pool=True, quantize="auto").validate()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_group(quant, tmp_path):
    """``--shared-pool --quantize``: the pool file holds integer values with float16 scales,
    the members' cores and own shards are quantized too, the reported errors are those of
    what was stored, and adapters joining the group are stored the same way."""
    from mosconv.pipeline import export_lora

    zoo, out, ref = tmp_path / "zoo", tmp_path / "out", tmp_path / "ref"
    write_zoo(zoo, 4, "float32")
    s32 = run_batch(zoo, ref, BatchConfig(ratio=RATIO, shared_pool=True))
    sq = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, quantize=quant))
    assert sq.failed == 0 and sq.totals.shared_pool_params == s32.totals.shared_pool_params > 0
    pools = load_file(pool_path(out))
    values = {k: t for k, t in pools.items() if not k.endswith(".scales")}
    want = torch.int8 if quant == "int8" else torch.uint8
    assert values and all(t.dtype == want for t in values.values())
    assert all(pools[f"{k}.scales"].dtype == torch.float16 for k in values)
    # bytes: values at 1 (int8) or 1/2 (int4) byte, plus a float16 scale per 64 values
    g = sq.groups[0]
    assert g.pool_bytes == tensor_bytes(pool_path(out)) < s32.groups[0].pool_bytes / (
        3.5 if quant == "int8" else 6.0)
    for a, a32 in zip(sq.adapters, s32.adapters):
        mos = load_mos(out / a.name)
        assert mos.storage.quantize == quant and mos.storage.group == 64
        assert error_of(read_adapter(zoo / a.name), mos) == pytest.approx(a.relative_error,
                                                                          rel=1e-4)
        assert a.relative_error < a32.relative_error + (0.01 if quant == "int8" else 0.05)
        assert a.relative_error < a.truncation_relative_error
    exp = export_lora(out / "task0", tmp_path / "exp")
    assert read_adapter(exp).params > 0
    # newcomers: fitted against the quantized bases, stored quantized, files untouched
    before = files_of(out)
    write_zoo(zoo, 2, "float32", start=4)
    again = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, quantize=quant))
    assert [a.status for a in again.adapters] == ["skipped"] * 4 + ["converted"] * 2
    after = files_of(out)
    assert all(after[p] == d for p, d in before.items() if not p.endswith(".members.json"))
    for a in again.adapters[4:]:
        mos = load_mos(out / a.name)
        assert mos.storage.quantize == quant
        assert error_of(read_adapter(zoo / a.name), mos) == pytest.approx(a.relative_error,
                                                                          rel=1e-4)


QUANT_POOL_LIES = {
    "scales-missing": (lambda t, k: t.pop(f"{k}.scales"), "scales {k}.scales are missing"),
    "scales-negative": (lambda t, k: t.update({f"{k}.scales": -t[f"{k}.scales"]}),
                        "scales {k}.scales hold non-finite or negative values"),
    "scales-wrong-shape": (lambda t, k: t.update({f"{k}.scales": t[f"{k}.scales"][:, :1].repeat(
        1, t[f"{k}.scales"].shape[1] + 1)}), "scales {k}.scales have shape"),
    "values-float": (lambda t, k: t.update({k: t[k].float()}), "shared pool tensor {k} has shape"),
    "values-missing": (lambda t, k: t.pop(k), "shared pool tensor {k} is missing"),
}


@pytest.mark.parametrize("lie", list(QUANT_POOL_LIES))
def test_a_changed_quantized_pool_file_is_refused(lie, tmp_path):
    """A quantized group's pool file whose values or scales are wrong (with the members'
    recorded sha256 forged to match, so the content checks are reached) is refused with one
    line naming the file and the tensor."""
    import hashlib

    from safetensors.torch import save

    from mosconv.errors import FormatError

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo, 3, "float32")
    run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True, quantize="int8"))
    path = pool_path(out)
    tensors = load_file(path)
    key = min(k for k in tensors if not k.endswith(".scales"))
    how, words = QUANT_POOL_LIES[lie]
    how(tensors, key)
    data = save(tensors, {"format": "mosconv.pools.v1"})
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    users = []
    for member in ("task0", "task1", "task2"):
        cfg_path = out / member / "mos_config.json"
        cfg = json.loads(cfg_path.read_text())
        for k in cfg["kinds"]:
            if k.get("shared_pool"):
                k["shared_pool"]["sha256"] = digest
                if key in (k["shared_pool"]["key_A"], k["shared_pool"]["key_B"]):
                    users.append(member)
        cfg_path.write_text(json.dumps(cfg))
    assert users
    with pytest.raises(FormatError) as e:
        load_mos(out / users[0])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and words.format(k=key) in msg, msg


def test_a_mixed_group_is_stored_in_the_widest_dtype(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo, 2, "float16")
    write_zoo(zoo, 1, "bfloat16", start=2)  # float16 with bfloat16: neither holds the other
    summary = run_batch(zoo, out, BatchConfig(ratio=RATIO, shared_pool=True))
    assert summary.failed == 0 and summary.totals.shared_pool_params > 0
    assert dtypes_of(pool_path(out)) == {"float32"}


def test_newcomers_are_stored_like_their_group(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo, 4, "float16")
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    assert run_batch(zoo, out, config).totals.shared_pool_params > 0
    before = files_of(out)
    write_zoo(zoo, 2, "float16", start=4)
    again = run_batch(zoo, out, config)
    assert [a.status for a in again.adapters] == ["skipped"] * 4 + ["converted"] * 2
    after = files_of(out)
    for path, data in before.items():
        if not path.endswith(".members.json"):
            assert after[path] == data, path
    for a in again.adapters[4:]:
        assert dtypes_of(out / a.name / TENSOR_FILE) == {"float16"}
        mos = load_mos(out / a.name)
        assert mos.storage.dtype == "float16"
        assert error_of(read_adapter(zoo / a.name), mos) == pytest.approx(a.relative_error,
                                                                          rel=1e-4)
        assert a.relative_error < a.truncation_relative_error


def test_summary_counts_each_group_with_its_pool_once(tmp_path):
    """``summary.json``: per group its pool file once, apart from the members' own parts, in
    parameters and in bytes as stored; the zoo totals add them up the same way."""
    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo / "g16", 3, "float16")
    for i in range(2):  # another base model: a second group, float32
        write_lora_like(zoo / "g32" / f"b{i}", i, layers=2, d=64, d_kv=32, r=8, base="other-lm")
    res = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary == json.loads((out / "summary.json").read_text())
    groups = {g["adapters"]: g for g in summary["groups"]}
    assert sorted(groups) == [2, 3]
    total_pool_bytes = 0
    for g in summary["groups"]:
        rows = [a for a in summary["adapters"] if a["group"] == g["group"]]
        pool = out / g["pool_file"]
        assert g["pool_bytes"] == tensor_bytes(pool)
        assert g["pool_params"] == sum(t.numel() for t in load_file(pool).values())
        assert g["local_params"] == sum(a["local_params"] for a in rows)
        assert g["mos_params"] == g["pool_params"] + g["local_params"]
        assert g["mos_tensor_bytes"] == g["pool_bytes"] + sum(a["mos_tensor_bytes"] for a in rows)
        assert g["lora_tensor_bytes"] == sum(a["lora_tensor_bytes"] for a in rows)
        energy = sum(a["energy"] for a in rows)
        err = math.sqrt(sum(a["energy"] * a["relative_error"] ** 2 for a in rows) / energy)
        assert g["relative_error"] == pytest.approx(err)
        assert g["relative_error"] < g["truncation_relative_error"]
        total_pool_bytes += g["pool_bytes"]
    # the float16 group's own tensors and pools take 2 bytes a value, the float32 one's 4
    g16, g32 = groups[3], groups[2]
    assert g16["pool_bytes"] == 2 * g16["pool_params"] and g32["pool_bytes"] == 4 * g32["pool_params"]
    t = summary["totals"]
    assert t["shared_pool_bytes"] == total_pool_bytes
    assert t["mos_tensor_bytes"] == total_pool_bytes + sum(
        a["mos_tensor_bytes"] for a in summary["adapters"])
    assert t["lora_tensor_bytes"] == sum(a["lora_tensor_bytes"] for a in summary["adapters"])
    text = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool"]).output
    assert "tensor bytes" in text and text.count("\ngroup ") == 2


def test_a_group_under_a_size_ratio(tmp_path):
    """``--shared-pool --size-ratio S``: the group's tensors (pool file once, members' own,
    routes and scales) fit its members' LoRA bytes / S; the storage and parameter ratio with
    the lowest group error are chosen; the group beats each member converted alone at the
    same byte budget, and every member beats truncation at its own equal bytes."""
    from mosconv.fit.zoo import fit_group

    zoo, out = tmp_path / "zoo", tmp_path / "out"
    write_zoo(zoo, 4, "float32")
    res = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool",
                                    "--size-ratio", "24", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    (g,) = summary["groups"]
    assert g["pool_file"] is not None
    assert g["mos_tensor_bytes"] <= g["lora_tensor_bytes"] / 24
    assert g["mos_tensor_bytes"] == tensor_bytes(out / g["pool_file"]) + sum(
        a["mos_tensor_bytes"] for a in summary["adapters"])
    storages = set()
    for a in summary["adapters"]:
        mos = load_mos(out / a["name"])
        storages.add(mos.storage)
        assert error_of(read_adapter(zoo / a["name"]), mos) == pytest.approx(
            a["relative_error"], rel=1e-4)
        rep = json.loads((out / a["name"] / "report.json").read_text())["totals"]
        assert rep["size_ratio"] == 24.0
        assert a["relative_error"] < rep["truncation_equal_bytes_relative_error"]
        cfg = json.loads((out / a["name"] / "mos_config.json").read_text())
        assert cfg["batch"]["size_ratio"] == 24.0
    assert len(storages) == 1  # one storage for the group
    # the same fit through the API: the group against each member alone at its byte budget
    adapters = [read_adapter(zoo / f"task{i}") for i in range(4)]
    fit = fit_group(adapters, 8.0, size_ratio=24.0, quantize="auto")
    assert fit.mode == "shared" and fit.storage == storages.pop()
    assert fit.totals.shared_relative_error == pytest.approx(g["relative_error"], rel=1e-9)
    assert fit.totals.shared_relative_error < fit.totals.independent_relative_error
    # a rerun skips; a newcomer joins at the group's parameter ratio, in its storage
    again = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool",
                                      "--size-ratio", "24", "--json"])
    assert {a["status"] for a in json.loads(again.output)["adapters"]} == {"skipped"}
    write_zoo(zoo, 1, "float32", start=4)
    again = CliRunner().invoke(main, ["batch", str(zoo), str(out), "--shared-pool",
                                      "--size-ratio", "24", "--json"])
    rows = json.loads(again.output)["adapters"]
    assert [a["status"] for a in rows] == ["skipped"] * 4 + ["converted"]
    new = load_mos(out / "task4")
    assert new.storage == fit.storage
    assert rows[4]["mos_tensor_bytes"] <= rows[4]["lora_tensor_bytes"] / 24
    # its report says the byte ratio and stands next to it converted alone under it
    from mosconv.fit.convert import ConvertConfig, convert

    alone = convert(read_adapter(zoo / "task4"),
                    ConvertConfig(size_ratio=24.0, quantize="auto")).report.totals
    rep = json.loads((out / "task4" / "report.json").read_text())["totals"]
    assert rep["size_ratio"] == 24.0 and rep["size_budget_bytes"] == alone.size_budget_bytes
    assert rep["truncation_equal_bytes_relative_error"] == \
        alone.truncation_equal_bytes_relative_error
    assert rows[4]["relative_error"] < alone.relative_error


def test_a_sized_group_takes_the_storage_that_serves_its_members_best_alone():
    """The storage a sized group is fitted in: the lowest energy-weighted error of its
    members' own conversions at the byte ratio; one some member could not be converted in
    is not a candidate; without any choice for every member, all are tried."""
    from types import SimpleNamespace

    from mosconv.fit.zoo import _best_alone
    from mosconv.mos.quant import Storage

    def member(energy, **errs):
        choices = [{"dtype": "float16" if q != "float32" else "float32",
                    "quantize": q if q in ("int8", "int4") else "none", "relative_error": e}
                   for q, e in errs.items()]
        return SimpleNamespace(energy=energy, alone=SimpleNamespace(
            totals=SimpleNamespace(size_choices=choices)))

    f32, i8, i4 = Storage("float32"), Storage("float16", "int8"), Storage("float16", "int4")
    both = [member(1.0, float32=0.5, int8=0.3, int4=0.2), member(9.0, float32=0.5, int8=0.1,
                                                                  int4=0.2)]
    assert _best_alone([f32, i8, i4], both) == [i8]  # 9 x 0.01 + 0.09 < 9 x 0.04 + 0.04
    assert _best_alone([f32, i8, i4], [member(1.0, float32=0.5, int4=0.2),
                                       member(1.0, float32=0.5, int8=0.1, int4=0.3)]) == [i4]
    assert _best_alone([f32, i8], [member(1.0, int4=0.2)]) == [f32, i8]
    assert _best_alone([i8], both) == [i8]
