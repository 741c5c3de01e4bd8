"""Robustness: the readers, ``load_mos`` and ``load_stats`` on truncated, bit-flipped and
structurally odd inputs (property-based, hypothesis, fixed budget, derandomized).

Every case must either load (a bit flip inside tensor data can give a valid file) or raise
a :class:`~mosconv.errors.MosconvError` whose message is one line naming the file; never
another exception, never a hang (each case has a hard 5 s alarm) and never a giant
allocation (address space is capped at +1 GiB during each case, and RSS may not grow by
more than 200 MiB).  Cases that are always invalid (``must_fail``) must raise.

The number of cases run is printed in pytest's terminal summary ("test_fuzz: N cases ran")
and checked against the budget by the last test of the module.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import resource
import shutil
import signal
import struct
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from factory import AdapterFactory, llama_like, write_random_peft
from helpers import one_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mosconv import read_adapter
from mosconv.errors import FormatError, MosconvError
from mosconv.model.calib import CalibStats, load_stats, save_stats
from mosconv.mos.format import (
    CONFIG_FILE,
    TENSOR_FILE,
    load_mos,
    save_mos,
)
from mosconv.mos.types import KindPools, MosAdapter, MosModule

CASE_SECONDS = 5.0
RSS_LIMIT = 200 * 2**20  # bytes of RSS growth allowed per case
AS_HEADROOM = 2**30  # address space a case may add before allocations fail

# examples per property test (the deterministic tables below add their own rows)
BUDGET = {
    "safetensors_truncated": 120,
    "safetensors_bitflips": 200,
    "safetensors_lying_header": 250,
    "single_file_bitflips": 100,
    "peft_config": 250,
    "bin_truncated": 60,
    "bin_bitflips": 120,
    "mos_config": 250,
    "mos_tensors": 200,
    "mos_bytes": 150,
    "shared_pool": 100,
    "calib": 150,
}
# MOSCONV_FUZZ_SCALE=10 multiplies every budget; MOSCONV_FUZZ_RANDOM=1 draws new inputs
# each run (exploration) instead of the fixed, derandomized ones
SCALE = float(os.environ.get("MOSCONV_FUZZ_SCALE", "1"))
BUDGET = {k: max(1, round(v * SCALE)) for k, v in BUDGET.items()}
FUZZ = {"deadline": None, "database": None, "print_blob": False,
        "derandomize": os.environ.get("MOSCONV_FUZZ_RANDOM", "") in ("", "0"),
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                  HealthCheck.function_scoped_fixture]}
CASES: Counter = Counter()


def fuzz(name: str):
    return settings(max_examples=BUDGET[name], **FUZZ)


# ------------------------------------------------------------------ the guard


class Hang(BaseException):
    """Raised by the alarm: a case ran past CASE_SECONDS (BaseException: nothing catches it)."""


def _on_alarm(signum, frame):
    raise Hang(f"case ran longer than {CASE_SECONDS} s")


def _statm() -> tuple[int, int]:
    """``(address space, resident)`` bytes of this process."""
    with open("/proc/self/statm") as f:
        size, resident = f.read().split()[:2]
    page = resource.getpagesize()
    return int(size) * page, int(resident) * page


def run_case(label: str, fn, root: Path, *, must_fail: bool = False, words: tuple = ()):
    """Run ``fn()`` under the time and memory bounds; return its result or its MosconvError.

    Any other exception propagates (the test fails, hypothesis shrinks the input).
    """
    CASES[label] += 1
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm0, rss0 = _statm()
    cap = vm0 + AS_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    old = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    outcome = None
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            outcome = fn()
        except MosconvError as e:
            outcome = e
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    finally:
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    assert seconds < CASE_SECONDS, (label, seconds)
    grown = _statm()[1] - rss0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak0
    assert grown < RSS_LIMIT and peak < RSS_LIMIT, (label, grown, peak)
    if isinstance(outcome, MosconvError):
        msg = str(outcome)
        assert msg and "\n" not in msg and "\r" not in msg, (label, msg)
        assert str(root) in msg, (label, str(root), msg)  # names the file (or its folder)
        for bad in ("MemoryError", "can't allocate", "cannot allocate", "Traceback"):
            assert bad not in msg, (label, msg)
        for w in words:
            assert w.lower() in msg.lower(), (label, w, msg)
    elif must_fail:
        pytest.fail(f"{label}: expected a MosconvError, loaded fine")
    return outcome


class _CaseReport:
    """Adds "test_fuzz: N cases ran" to pytest's terminal summary (nothing is printed
    while the tests run)."""

    def pytest_terminal_summary(self, terminalreporter):
        if CASES:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
            terminalreporter.write_line(
                f"test_fuzz: {sum(CASES.values())} cases ran ({parts})")


@pytest.fixture(scope="module", autouse=True)
def _module_setup(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("mosconv-fuzz-cases"):
        pm.register(_CaseReport(), "mosconv-fuzz-cases")
    with one_thread():  # many tiny tensors: a second thread only spins
        yield
    _check_budgets()  # after the module's last test, in whatever order they ran


# ------------------------------------------------------------------ byte-level helpers


def st_parts(data: bytes) -> tuple[dict, bytes, int]:
    """``(header, tensor bytes, header length)`` of safetensors bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:], n


def st_bytes(header: dict | bytes, body: bytes, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + body


def flip(data: bytes, bits: list[int]) -> bytes:
    b = bytearray(data)
    for bit in bits:
        bit %= len(b) * 8
        b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def fresh_copy(src: Path, dst: Path) -> Path:
    """``dst`` as a fresh copy of the file or folder ``src``."""
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def bit_positions(data: bytes, header_len: int | None = None):
    """1-6 bit positions, half the time inside the first ``header_len + 8`` bytes."""
    anywhere = st.integers(0, len(data) * 8 - 1)
    if header_len is None:
        return st.lists(anywhere, min_size=1, max_size=6)
    head = st.integers(0, (header_len + 8) * 8 - 1)
    return st.lists(st.one_of(head, anywhere), min_size=1, max_size=6)


# JSON values of every type, with the ones readers trip on most.
INTERESTING = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**40, 10**30, -(10**30), 0.5,
               1e308, float("nan"), float("inf"), float("-inf"), "", "4", "abc", "k0", [],
               [1], [0, 0], [-1, 2], {}, {"a": 1}, [[1, 2]], "(", "\n"]
json_values = st.one_of(
    st.sampled_from(INTERESTING),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=5,
    ),
)
DELETE = object()
new_value = st.one_of(st.just(DELETE), json_values)

# Whole JSON documents that break naive parsers (for every JSON file mosconv reads).
BAD_JSON_TEXTS = {
    "empty": b"",
    "garbage": b"\x00\xff\xfe garbage",
    "not-utf8": b'{"a": "\xff\xfe"}',
    "truncated": b'{"a": [1, 2',
    "list": b"[1, 2, 3]",
    "string": b'"hello"',
    "null": b"null",
    "number": b"42",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge-int": b'{"a": ' + b"9" * 5000 + b"}",
    "nan": b'{"r": NaN, "lora_alpha": Infinity}',
    "bom": b'\xef\xbb\xbf{"a": 1}',
}


# ------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The module's scratch folder; ``src/`` (the sound inputs) exists whichever fixture
    runs first (a random test order found calib_file writing into a missing src/)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "src").mkdir()
    return root


SMALL = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8)}


@pytest.fixture(scope="module")
def peft_st(root) -> Path:
    """A tiny PEFT folder (safetensors, with one extra tensor and metadata)."""
    w = AdapterFactory(root / "src", seed=1).peft(
        SMALL, r=2, extra={"base_model.model.score.weight": (2, 8)}, metadata={"format": "pt"},
        name="peft-st")
    read_adapter(w.path)  # sound, and warms up the code paths
    return w.path


@pytest.fixture(scope="module")
def peft_bin(root) -> Path:
    w = AdapterFactory(root / "src", seed=2).peft(SMALL, r=2, weights="bin", name="peft-bin")
    read_adapter(w.path)
    return w.path


@pytest.fixture(scope="module")
def kohya_file(root) -> Path:
    w = AdapterFactory(root / "src", seed=3).kohya(
        {"lora_unet_a_to_q": (8, 8)}, r=2, convs={"lora_unet_b_conv": (4, 2, 3, 3)},
        metadata={"ss_sd_model_name": "x"})
    read_adapter(w.path)
    return w.path


def _hand_built_mos() -> MosAdapter:
    """Slot weights, an embedding and a conv module (conversions of random LoRAs lack them)."""
    g = torch.Generator().manual_seed(0)
    kind = "x.*.p[6x4]"
    pools = KindPools(kind, 4, 6, 2, torch.randn(5, 2, generator=g),
                      torch.randn(4, 3, generator=g), 2, 1)
    mods = []
    for i, (emb, conv) in enumerate([(False, None), (True, None), (False, (6, 1, 2, 2))]):
        r = 2
        mods.append(MosModule(
            f"x.{i}.p", kind, r, 0.5 + i, torch.randint(0, 5, (r * 2,), generator=g),
            torch.randint(0, 4, (r * 2,), generator=g), torch.randn(r * 2, generator=g),
            torch.randn(r * 2, generator=g), (2, 5), (1, 4), emb, conv))
    return MosAdapter(kinds={kind: pools}, modules=tuple(mods),
                      extra_tensors={"score.weight": torch.ones(2, 2)},
                      source={"format": "peft", "config": {"r": 2}}, info={"ratio": 2.0})


@pytest.fixture(scope="module")
def mos_dirs(root) -> dict[str, Path]:
    """A converted adapter (public and private pools) and a hand-built one (slot weights,
    embedding, conv)."""
    from mosconv.fit.convert import ConvertConfig, convert

    lora, _ = write_random_peft(root / "src" / "lora", llama_like(layers=2, d=32, d_kv=16),
                                r=4, shared_A=True,
                                extra={"base_model.model.score.weight": torch.ones(2, 32)})
    res = convert(read_adapter(lora), ConvertConfig(ratio=4, seed=0, iters=1))
    out = {"converted": save_mos(res.mos, root / "src" / "mos-conv", res.report),
           "hand": save_mos(_hand_built_mos(), root / "src" / "mos-hand")}
    for p in out.values():
        assert_loads_and_assembles(p)
    return out


@pytest.fixture(scope="module")
def shared_out(root) -> Path:
    """``batch --shared-pool`` output: members refer to ``pools/<group>.safetensors``."""
    from test_batch import write_lora_like

    from mosconv.batch.run import BatchConfig, run_batch

    zoo = root / "src" / "zoo"
    for i in range(3):
        write_lora_like(zoo / f"t{i}", i, layers=2, d=64, d_kv=32, r=8)
    out = root / "src" / "zoo-out"
    run_batch(zoo, out, BatchConfig(ratio=8.0, shared_pool=True))
    cfg = json.loads((out / "t0" / CONFIG_FILE).read_text())
    assert any(k.get("shared_pool") for k in cfg["kinds"]), "no shared pools to fuzz"
    load_mos(out / "t0")
    return out


@pytest.fixture(scope="module")
def calib_file(root) -> Path:
    g = torch.Generator().manual_seed(0)
    moments = {}
    for name, d in (("model.layers.0.self_attn.q_proj", 8), ("model.layers.0.mlp.up", 4)):
        x = torch.randn(20, d, generator=g, dtype=torch.float64)
        moments[name] = x.T @ x / 20
    path = save_stats(CalibStats(moments, 20, {"data": "x.txt", "seq_len": 4}),
                      root / "src" / "calib.safetensors")
    load_stats(path)
    return path


def assert_loads_and_assembles(folder: Path):
    """A MoS folder that loads must be usable: every module assembles to its shapes."""
    mos = load_mos(folder)
    for m in mos.modules:
        p = mos.kinds[m.kind]
        A, B = mos.assemble(m)
        assert A.shape == (m.r, p.d_in) and B.shape == (p.d_out, m.r)
        assert bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
        assert math.isfinite(m.scale)
    return mos


def assert_adapter_sound(ad) -> None:
    for m in ad.modules:
        assert m.A.dim() == 2 and m.B.dim() == 2 and m.B.shape[1] == m.A.shape[0] > 0
        assert math.isfinite(m.scale), m.name


def read_checked(path: Path):
    ad = read_adapter(path)
    assert_adapter_sound(ad)
    return ad


# ------------------------------------------------------------------ safetensors


@given(data=st.data())
@fuzz("safetensors_truncated")
def test_safetensors_truncated_anywhere(root, peft_st, data):
    src = (peft_st / "adapter_model.safetensors").read_bytes()
    cut = data.draw(st.integers(0, len(src) - 1))
    case = fresh_copy(peft_st, root / "case-trunc")
    (case / "adapter_model.safetensors").write_bytes(src[:cut])
    run_case("safetensors_truncated", lambda: read_checked(case), case, must_fail=True)


@given(data=st.data())
@fuzz("safetensors_bitflips")
def test_safetensors_bit_flips(root, peft_st, data):
    src = (peft_st / "adapter_model.safetensors").read_bytes()
    _, _, n = st_parts(src)
    bits = data.draw(bit_positions(src, n))
    case = fresh_copy(peft_st, root / "case-flip")
    (case / "adapter_model.safetensors").write_bytes(flip(src, bits))
    run_case("safetensors_bitflips", lambda: read_checked(case), case)


@given(data=st.data())
@fuzz("single_file_bitflips")
def test_single_file_truncation_and_bit_flips(root, kohya_file, data):
    src = kohya_file.read_bytes()
    _, _, n = st_parts(src)
    if data.draw(st.booleans()):
        mutated = src[:data.draw(st.integers(0, len(src) - 1))]
    else:
        mutated = flip(src, data.draw(bit_positions(src, n)))
    case = root / "case-kohya" / kohya_file.name
    case.parent.mkdir(exist_ok=True)
    case.write_bytes(mutated)
    run_case("single_file_bitflips", lambda: read_checked(case), case.parent,
             must_fail=len(mutated) < len(src))


dims = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**40, 2**63, 2**64 + 1]),
                 st.integers(-5, -1), st.just(2.0), st.just("8"))
lying_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL",
                                        "F8_E4M3", "F8_E5M2", "C64", "U16", "F4", "F6_E2M3",
                                        "f32", "XYZ", ""]), json_values),
    "shape": st.one_of(st.lists(dims, max_size=4), st.just([2**40, 2**40]), json_values),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-10, 400), dims), max_size=3),
                              json_values),
})


@given(data=st.data())
@fuzz("safetensors_lying_header")
def test_safetensors_lying_header(root, peft_st, data):
    """Headers that lie: offsets out of range / overlapping / reversed, shapes that disagree
    with their byte range (up to [2**40, 2**40]), unknown dtypes, a header length field
    that disagrees with the header, non-UTF-8 bytes, duplicate keys, metadata that is not
    strings, entries of the wrong type."""
    src = (peft_st / "adapter_model.safetensors").read_bytes()
    header, body, n = st_parts(src)
    header = copy.deepcopy(header)
    keys = sorted(k for k in header if k != "__metadata__")
    how = data.draw(st.sampled_from(["entry", "field", "swap", "metadata", "length", "raw",
                                     "dup", "body"]))
    length = None
    raw = None
    if how == "entry":  # replace one entry (or add a new one)
        key = data.draw(st.sampled_from([*keys, "base_model.model.new.lora_A.weight"]))
        header[key] = data.draw(st.one_of(lying_entry, json_values))
    elif how == "field":  # one field of one entry
        key = data.draw(st.sampled_from(keys))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = data.draw(st.one_of(new_value, lying_entry.map(lambda e: e.get(field))))
        if value is DELETE:
            header[key].pop(field)
        else:
            header[key][field] = value
    elif how == "swap":  # two entries exchange offsets, or one takes another's (overlap)
        a, b = data.draw(st.lists(st.sampled_from(keys), min_size=2, max_size=2))
        oa = header[a]["data_offsets"]
        header[a]["data_offsets"] = header[b]["data_offsets"]
        if data.draw(st.booleans()):
            header[b]["data_offsets"] = oa
        if data.draw(st.booleans()):
            header[a]["data_offsets"] = header[a]["data_offsets"][::-1]
    elif how == "metadata":
        header["__metadata__"] = data.draw(st.one_of(
            json_values, st.dictionaries(st.text(max_size=4), json_values, max_size=3)))
    elif how == "length":  # the 8-byte length field lies
        length = data.draw(st.one_of(st.integers(0, n + 64), st.just(len(src)),
                                     st.just(2**64 - 1), st.just(100 * 2**20 + 1)))
    elif how == "raw":  # arbitrary bytes inside the header
        raw = bytearray(json.dumps(header).encode())
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos:pos + 1] = data.draw(st.sampled_from(
            [b"\xff", b"\xc3", b"\x00", b"\n", b"\\", b'"', b"{", b"}", b"\xe2\x82"]))
        raw = bytes(raw)
    elif how == "dup":  # one key written twice (json.dumps cannot do that)
        key = data.draw(st.sampled_from(keys))
        text = json.dumps(header)
        entry = json.dumps({key: header[key]})[1:-1]
        raw = (text[:-1] + ", " + entry + "}").encode()
    else:  # body longer or shorter than the header says
        body = body + b"\0" * data.draw(st.integers(1, 16)) if data.draw(st.booleans()) \
            else body[:-data.draw(st.integers(1, 16))]
    case = fresh_copy(peft_st, root / "case-lie")
    (case / "adapter_model.safetensors").write_bytes(st_bytes(raw or header, body, length))
    run_case("safetensors_lying_header", lambda: read_checked(case), case)


def _mutated_header(peft_st: Path, dst: Path, change) -> Path:
    src = (peft_st / "adapter_model.safetensors").read_bytes()
    header, body, _ = st_parts(src)
    out = change(copy.deepcopy(header), body)
    case = fresh_copy(peft_st, dst)
    (case / "adapter_model.safetensors").write_bytes(
        out if isinstance(out, bytes) else st_bytes(out, body))
    return case


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _set_entry(key, **fields):
    def change(h, body):
        h[key].update(fields)
        return h
    return change


def _lie_len(extra):
    def change(h, body):
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw) + extra) + raw + body
    return change


def _dup(h, body):
    text = json.dumps(h)
    return st_bytes((text[:-1] + ", " + json.dumps({A0: h[A0]})[1:-1] + "}").encode(), body)


def _offsets(fn):
    def change(h, body):
        h[A0]["data_offsets"] = fn(h[A0]["data_offsets"], h[B0]["data_offsets"])
        return h
    return change


def _raw_header(text: bytes):
    return lambda h, body: st_bytes(text, body)


# (change, words the message must hold): every one is refused, from the header
HEADER_LIES = {
    "huge-shape": (_set_entry(A0, shape=[2**40, 2**40]), ("declares shape", "more than")),
    "huge-shape-3d": (_set_entry(A0, shape=[2**20, 2**20, 2**20]), ("declares shape",)),
    "shape-product": (_set_entry(A0, shape=[3, 3]), ("declares shape",)),
    "negative-dim": (_set_entry(A0, shape=[-2, 8]), ("invalid shape",)),
    "offsets-out-of-range": (_offsets(lambda a, b: [a[0], a[1] + 10**9]), ("data_offsets",)),
    "offsets-past-end": (_offsets(lambda a, b: [a[0] + 10**6, a[1] + 10**6]), ("truncated",)),
    "offsets-reversed": (_offsets(lambda a, b: a[::-1]), ("data_offsets",)),
    "offsets-overlap": (_offsets(lambda a, b: b), ("overlap",)),
    "offsets-not-ints": (_offsets(lambda a, b: ["0", "64"]), ("data_offsets",)),
    "unknown-dtype": (_set_entry(A0, dtype="F33"), ("dtype",)),
    "dtype-not-a-string": (_set_entry(A0, dtype=4), ("dtype",)),
    "sub-byte-dtype": (_set_entry(A0, dtype="F4"), ("dtype",)),
    "wrong-dtype-size": (_set_entry(A0, dtype="F64"), ("declares shape",)),
    "length-past-file": (_lie_len(10**6), ("header",)),
    "length-huge": (lambda h, body: struct.pack("<Q", 2**63) + json.dumps(h).encode() + body,
                    ("header",)),
    "non-utf8": (lambda h, body: st_bytes(json.dumps(h).encode()[:-1] + b', "\xff\xfe": 1}',
                                          body), ("not valid JSON",)),
    "duplicate-key": (_dup, ("duplicate key",)),
    "metadata-int": (lambda h, body: {**h, "__metadata__": {"format": 1}}, ("__metadata__",)),
    "metadata-null": (lambda h, body: {**h, "__metadata__": {"format": None}},
                      ("__metadata__",)),
    "metadata-nested": (lambda h, body: {**h, "__metadata__": {"a": {"b": "c"}}},
                        ("__metadata__",)),
    "entry-not-object": (lambda h, body: {**h, A0: [1, 2]}, ("not an object",)),
    "trailing-bytes": (lambda h, body: st_bytes(h, body + b"\0" * 8), ("cover",)),
    "header-list": (lambda h, body: st_bytes(b"[]", body), ("not a JSON object",)),
    **{f"json-{k}": (_raw_header(v), ()) for k, v in BAD_JSON_TEXTS.items()},
}


@pytest.mark.parametrize("lie", list(HEADER_LIES))
def test_safetensors_header_lies_are_refused(root, peft_st, lie):
    change, words = HEADER_LIES[lie]
    case = _mutated_header(peft_st, root / f"case-lie-{lie}", change)
    run_case("header_table", lambda: read_adapter(case), case, must_fail=True, words=words)


def test_huge_declared_shape_is_refused_before_any_allocation(root, peft_st, monkeypatch):
    """Refused from the header alone: neither safetensors nor torch.empty is reached."""
    import mosconv.lora.read._io as io_mod

    case = _mutated_header(peft_st, root / "case-huge",
                           _set_entry(A0, shape=[2**40, 2**40]))

    def forbidden(*a, **k):
        raise AssertionError("reached tensor allocation with a header that declares 4 TiB")

    monkeypatch.setattr(io_mod, "safe_open", forbidden)
    monkeypatch.setattr(torch, "empty", forbidden)
    err = run_case("header_table", lambda: read_adapter(case), case, must_fail=True,
                   words=("declares shape [1099511627776, 1099511627776]", "more than"))
    assert isinstance(err, FormatError)


def test_float8_tensors_are_read_or_refused_cleanly(root):
    """A real float8 file (safetensors F8_E4M3): isfinite is not implemented for float8."""
    d = AdapterFactory(root / "src", seed=9).raw_file(
        "f8.safetensors", {"lora_unet_a_to_q.lora_down.weight": torch.ones(2, 8).to(torch.float8_e4m3fn),
                           "lora_unet_a_to_q.lora_up.weight": torch.ones(8, 2).to(torch.float8_e4m3fn)})
    ad = run_case("header_table", lambda: read_checked(d.path), d.path.parent)
    assert not isinstance(ad, MosconvError), ad
    bad = torch.ones(8, 2).to(torch.float8_e5m2)
    bad[0, 0] = float("inf")
    d = AdapterFactory(root / "src", seed=9).raw_file(
        "f8inf.safetensors", {"lora_unet_a_to_q.lora_down.weight": torch.ones(2, 8).to(torch.float8_e5m2),
                              "lora_unet_a_to_q.lora_up.weight": bad})
    run_case("header_table", lambda: read_adapter(d.path), d.path.parent, must_fail=True,
             words=("NaN or Inf",))


# ------------------------------------------------------------------ PEFT configs and .bin files

CONFIG_FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                 "use_dora", "use_rslora", "fan_in_fan_out", "peft_type",
                 "base_model_name_or_path", "task_type", "init_lora_weights",
                 "modules_to_save", "bias"]
pattern_values = st.dictionaries(
    st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "(", "[a-", "*", "x)",
                     "(?i)q_proj", ""]), json_values, max_size=3)


@given(data=st.data())
@fuzz("peft_config")
def test_peft_config_wrong_types_missing_keys_garbage(root, peft_st, data):
    cfg = json.loads((peft_st / "adapter_config.json").read_text())
    how = data.draw(st.sampled_from(["fields", "fields", "fields", "text", "top"]))
    if how == "fields":
        for field in data.draw(st.lists(st.sampled_from(CONFIG_FIELDS), min_size=1, max_size=3)):
            value = data.draw(st.one_of(new_value, pattern_values) if field.endswith("_pattern")
                              else new_value)
            if value is DELETE:
                cfg.pop(field, None)
            else:
                cfg[field] = value
        text = json.dumps(cfg).encode()
    elif how == "text":
        text = data.draw(st.one_of(st.sampled_from(list(BAD_JSON_TEXTS.values())),
                                   st.binary(max_size=40)))
    else:
        text = json.dumps(data.draw(json_values)).encode()
    case = fresh_copy(peft_st, root / "case-cfg")
    (case / "adapter_config.json").write_bytes(text)
    run_case("peft_config", lambda: read_checked(case), case)


# (config change, words): each must be refused with a message naming the field
CONFIG_LIES = {
    "r-string": ({"r": "8"}, ("r",)),
    "r-float": ({"r": 2.5}, ("r",)),
    "r-bool": ({"r": True}, ("r",)),
    "r-list": ({"r": [2]}, ("r",)),
    "alpha-string": ({"lora_alpha": "16"}, ("lora_alpha",)),
    "alpha-nan": ({"lora_alpha": float("nan")}, ("lora_alpha",)),
    "alpha-inf": ({"lora_alpha": float("inf")}, ("lora_alpha",)),
    "alpha-huge-int": ({"lora_alpha": 10**400}, ("scale",)),
    "alpha-dict": ({"lora_alpha": {"a": 1}}, ("lora_alpha",)),
    "target-modules-int": ({"target_modules": 3}, ("target_modules",)),
    "target-modules-mixed": ({"target_modules": ["q_proj", 1]}, ("target_modules",)),
    "rank-pattern-list": ({"rank_pattern": ["q_proj", 2]}, ("rank_pattern",)),
    "rank-pattern-string-value": ({"rank_pattern": {"q_proj": "2"}}, ("rank_pattern",)),
    "rank-pattern-bad-regex": ({"rank_pattern": {"q_proj(": 2}}, ("rank_pattern", "regular")),
    "alpha-pattern-string-value": ({"alpha_pattern": {"q_proj": "x"}}, ("alpha_pattern",)),
    "alpha-pattern-nan": ({"alpha_pattern": {"q_proj": float("nan")}}, ("alpha_pattern",)),
    "alpha-pattern-global-flag": ({"alpha_pattern": {"(?i)q_proj": 2}}, ("alpha_pattern",)),
    "use-dora-string": ({"use_dora": "false"}, ("use_dora",)),
    "use-rslora-int": ({"use_rslora": 1}, ("use_rslora",)),
    "fan-in-fan-out-string": ({"fan_in_fan_out": "false"}, ("fan_in_fan_out",)),
    "base-model-list": ({"base_model_name_or_path": ["x"]}, ("base_model_name_or_path",)),
    "task-type-int": ({"task_type": 1}, ("task_type",)),
}


@pytest.mark.parametrize("lie", list(CONFIG_LIES) + [f"json-{k}" for k in BAD_JSON_TEXTS])
def test_peft_config_lies_are_refused(root, peft_st, lie):
    case = fresh_copy(peft_st, root / f"case-cfg-{lie}")
    cfg_path = case / "adapter_config.json"
    if lie.startswith("json-"):
        cfg_path.write_bytes(BAD_JSON_TEXTS[lie[5:]])
        words = ()
    else:
        change, words = CONFIG_LIES[lie]
        cfg = {**json.loads(cfg_path.read_text()), **change}
        cfg_path.write_text(json.dumps(cfg))
    run_case("config_table", lambda: read_adapter(case), case, must_fail=True, words=words)


def test_missing_config_keys_use_peft_defaults(root, peft_st):
    """A config holding nothing but {} is valid (PEFT's defaults); the tensors define r."""
    case = fresh_copy(peft_st, root / "case-cfg-empty")
    (case / "adapter_config.json").write_text("{}")
    ad = run_case("config_table", lambda: read_checked(case), case)
    assert not isinstance(ad, MosconvError), ad
    assert {m.scale for m in ad.modules} == {8 / 2}  # PEFT's default lora_alpha=8, r=2


@given(data=st.data())
@fuzz("bin_truncated")
def test_bin_truncated(root, peft_bin, data):
    src = (peft_bin / "adapter_model.bin").read_bytes()
    cut = data.draw(st.integers(0, len(src) - 1))
    case = fresh_copy(peft_bin, root / "case-bin-trunc")
    (case / "adapter_model.bin").write_bytes(src[:cut])
    run_case("bin_truncated", lambda: read_checked(case), case, must_fail=True)


@given(data=st.data())
@fuzz("bin_bitflips")
def test_bin_bit_flips(root, peft_bin, data, monkeypatch):
    """Never unpickled with code execution: every torch.load call says weights_only=True."""
    src = (peft_bin / "adapter_model.bin").read_bytes()
    bits = data.draw(bit_positions(src, 600))  # half in the zip header and the pickle
    case = fresh_copy(peft_bin, root / "case-bin-flip")
    (case / "adapter_model.bin").write_bytes(flip(src, bits))
    real = torch.load
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    try:
        run_case("bin_bitflips", lambda: read_checked(case), case)
    finally:
        monkeypatch.undo()
    assert all(c is True for c in calls), calls


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _torch_zip(pkl: bytes, compression=zipfile.ZIP_STORED) -> bytes:
    """A torch.save-style zip whose data.pkl is ``pkl``."""
    return _zip({"adapter_model/data.pkl": pkl, "adapter_model/byteorder": b"little",
                 "adapter_model/version": b"3\n"}, compression)


def _size_lie(data: bytes) -> bytes:
    """The central directory says data.pkl holds 2**31 bytes."""
    b = bytearray(data)
    cd = b.index(b"PK\x01\x02")
    b[cd + 20:cd + 28] = struct.pack("<II", 2**31, 2**31)
    return bytes(b)


# damaged pickles that made torch.load raise TypeError / AssertionError (not caught before),
# and zips that declare more than they hold
BIN_CRAFTED = {
    "rebuild-without-args": (_torch_zip(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R."),
                             ("_rebuild_tensor_v2",)),
    "persistent-id-int": (_torch_zip(b"\x80\x02K\x01Q."), ("saved_id",)),
    "persistent-id-short": (_torch_zip(b"\x80\x02X\x07\x00\x00\x00storageK\x01\x86Q."),
                            ("checkpoint",)),
    "deflated-entry": (_torch_zip(b"\x80\x02}." + b" " * 10_000, zipfile.ZIP_DEFLATED),
                       ("zip entry",)),
    "entry-size-lie": (_size_lie(_torch_zip(b"\x80\x02}.")), ("checkpoint",)),
    "empty-zip": (_zip({}), ("checkpoint",)),
    "not-a-state-dict": (_torch_zip(b"\x80\x02]."), ("state dict",)),
    "zip-magic-only": (b"PK\x03\x04", ("checkpoint",)),
}


@pytest.mark.parametrize("case_name", list(BIN_CRAFTED))
def test_bin_crafted_checkpoints_are_refused(root, peft_bin, case_name):
    data, words = BIN_CRAFTED[case_name]
    case = fresh_copy(peft_bin, root / f"case-bin-{case_name}")
    (case / "adapter_model.bin").write_bytes(data)
    run_case("bin_table", lambda: read_adapter(case), case, must_fail=True, words=words)


def test_pre_zip_torch_format_is_refused(root, peft_bin):
    """torch's pre-1.6 format declares storage sizes inside the pickle and torch allocates
    them before reading: refused by its magic, with a hint."""
    case = fresh_copy(peft_bin, root / "case-bin-legacy")
    tensors = torch.load(case / "adapter_model.bin", weights_only=True)
    torch.save(tensors, case / "adapter_model.bin", _use_new_zipfile_serialization=False)
    run_case("config_table", lambda: read_adapter(case), case, must_fail=True,
             words=("not a torch.save zip",))


# ------------------------------------------------------------------ MoS folders

KIND_FIELDS = ["id", "kind", "d_in", "d_out", "nc", "pool_A", "pool_B", "public_A", "public_B",
               "shared_pool"]
MODULE_FIELDS = ["name", "kind", "r", "scale", "private_A", "private_B", "weights",
                 "embedding", "conv_shape"]
TOP_FIELDS = ["format", "format_version", "kinds", "modules", "source"]


def _mutate_config(cfg: dict, data) -> dict:
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "kind", "module", "module", "source"]))
        if where == "top":
            obj, field = cfg, data.draw(st.sampled_from(TOP_FIELDS))
        elif where == "source":
            if not isinstance(cfg.get("source"), dict):
                continue
            obj, field = cfg["source"], data.draw(st.sampled_from(["config", "format",
                                                                    "metadata"]))
        else:
            items = cfg.get("kinds" if where == "kind" else "modules")
            if not isinstance(items, list) or not items:
                continue
            obj = data.draw(st.sampled_from(items))
            if not isinstance(obj, dict):
                continue
            field = data.draw(st.sampled_from(KIND_FIELDS if where == "kind" else MODULE_FIELDS))
        value = data.draw(new_value)
        if value is DELETE:
            obj.pop(field, None)
        else:
            obj[field] = value
    return cfg


@given(data=st.data())
@fuzz("mos_config")
def test_mos_config_json_fields(root, mos_dirs, data):
    """Fields of the wrong type (strings for ints, lists for objects, null), out of range,
    missing, or of another version."""
    which = data.draw(st.sampled_from(sorted(mos_dirs)))
    case = fresh_copy(mos_dirs[which], root / "case-mos-cfg")
    cfg = json.loads((case / CONFIG_FILE).read_text())
    (case / CONFIG_FILE).write_text(json.dumps(_mutate_config(cfg, data)))
    run_case("mos_config", lambda: assert_loads_and_assembles(case), case)


def _tensor_values(data, like: torch.Tensor) -> torch.Tensor:
    """A replacement for a tensor: other shape, dtype or values (NaN, out-of-range ints)."""
    how = data.draw(st.sampled_from(["values", "shape", "dtype", "nan", "empty"]))
    if how == "values":
        vals = data.draw(st.lists(st.integers(-300, 300), min_size=like.numel(),
                                  max_size=like.numel()))
        dtype = like.dtype if not like.dtype.is_floating_point else torch.float32
        if dtype == torch.uint8:
            dtype = data.draw(st.sampled_from([torch.int16, torch.int64, torch.int8]))
        t = torch.tensor(vals, dtype=torch.int64).clamp(-128, 127) if dtype == torch.int8 \
            else torch.tensor(vals, dtype=torch.int64)
        return t.to(dtype).reshape(like.shape)
    if how == "shape":
        shape = data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
        return torch.zeros(shape, dtype=like.dtype)
    if how == "dtype":
        dtype = data.draw(st.sampled_from([torch.float16, torch.float64, torch.int32,
                                           torch.bool, torch.uint8, torch.bfloat16]))
        return like.to(dtype)
    if how == "nan":
        t = like.to(torch.float32).clone()
        if t.numel():
            t.reshape(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return t
    return torch.zeros((0,) * max(like.dim(), 1), dtype=like.dtype)


def _rewrite_tensors(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


@given(data=st.data())
@fuzz("mos_tensors")
def test_mos_tensors(root, mos_dirs, data):
    """Routes out of range (negative, >= pool size), pools of the wrong shape, missing
    tensors, NaN, other dtypes."""
    which = data.draw(st.sampled_from(sorted(mos_dirs)))
    case = fresh_copy(mos_dirs[which], root / "case-mos-t")
    path = case / TENSOR_FILE

    def change(tensors):
        for _ in range(data.draw(st.integers(1, 2))):
            key = data.draw(st.sampled_from(sorted(tensors)))
            if data.draw(st.integers(0, 4)) == 0:
                del tensors[key]
            else:
                tensors[key] = _tensor_values(data, tensors[key])
            if not tensors:
                break

    _rewrite_tensors(path, change)
    run_case("mos_tensors", lambda: assert_loads_and_assembles(case), case)


@given(data=st.data())
@fuzz("mos_bytes")
def test_mos_files_truncated_or_flipped(root, mos_dirs, data):
    which = data.draw(st.sampled_from(sorted(mos_dirs)))
    name = data.draw(st.sampled_from([TENSOR_FILE, CONFIG_FILE]))
    case = fresh_copy(mos_dirs[which], root / "case-mos-b")
    src = (case / name).read_bytes()
    truncated = data.draw(st.booleans())
    if truncated:
        mutated = src[:data.draw(st.integers(0, len(src) - 1))]
    else:
        n = st_parts(src)[2] if name == TENSOR_FILE else None
        mutated = flip(src, data.draw(bit_positions(src, n)))
    (case / name).write_bytes(mutated)
    run_case("mos_bytes", lambda: assert_loads_and_assembles(case), case,
             must_fail=truncated and name == TENSOR_FILE)


def _first_kind(cfg: dict) -> dict:
    return cfg["kinds"][0]


def _first_module(cfg: dict) -> dict:
    return cfg["modules"][0]


# (change of the config dict or "tensors:<how>", words) on the converted adapter
MOS_LIES = {
    "format-version-4": (lambda c: c.update(format_version=4), ("format_version",)),
    "format-version-string": (lambda c: c.update(format_version="1"), ("format_version",)),
    "format-version-bool": (lambda c: c.update(format_version=True), ("format_version",)),
    "format-version-missing": (lambda c: c.pop("format_version"), ("format_version",)),
    "kinds-dict": (lambda c: c.update(kinds={"k0": {}}), ("kinds",)),
    "kinds-null": (lambda c: c.update(kinds=None), ("kinds",)),
    "modules-missing": (lambda c: c.pop("modules"), ("modules",)),
    "modules-string": (lambda c: c.update(modules="m"), ("modules",)),
    "source-list": (lambda c: c.update(source=[]), ("source",)),
    "source-config-string": (lambda c: c["source"].update(config="r=4"), ("source.config",)),
    "kind-entry-list": (lambda c: c["kinds"].__setitem__(0, ["k0"]), ("kinds[0]",)),
    "nc-string": (lambda c: _first_kind(c).update(nc="16"), ("nc",)),
    "nc-zero": (lambda c: _first_kind(c).update(nc=0), ("nc",)),
    "nc-float-inf": (lambda c: _first_kind(c).update(nc=float("inf")), ("nc",)),
    "nc-not-dividing": (lambda c: _first_kind(c).update(nc=3), ("does not divide",)),
    "d-in-null": (lambda c: _first_kind(c).update(d_in=None), ("d_in",)),
    "pool-a-wrong": (lambda c: _first_kind(c).update(pool_A=_first_kind(c)["pool_A"] + 1),
                     ("pool_A",)),
    "public-a-too-big": (lambda c: _first_kind(c).update(public_A=10**6), ("public_A",)),
    "public-a-negative": (lambda c: _first_kind(c).update(public_A=-1), ("public_A",)),
    "kind-id-duplicate": (lambda c: c["kinds"][1].update(id=c["kinds"][0]["id"]), ("twice",)),
    "module-kind-unknown": (lambda c: _first_module(c).update(kind="k9"), ("k9",)),
    "module-kind-int": (lambda c: _first_module(c).update(kind=0), ("kind",)),
    "module-name-null": (lambda c: _first_module(c).update(name=None), ("name",)),
    "module-name-duplicate": (lambda c: c["modules"][1].update(name=c["modules"][0]["name"]),
                              ("name",)),
    "module-name-newline": (lambda c: _first_module(c).update(name="a\nb"), ("name",)),
    "r-string": (lambda c: _first_module(c).update(r="2"), ("r is",)),
    "r-negative": (lambda c: _first_module(c).update(r=-1), ("r is",)),
    "r-too-big": (lambda c: _first_module(c).update(r=_first_module(c)["r"] + 1),
                  ("entries",)),
    "scale-nan": (lambda c: _first_module(c).update(scale=float("nan")), ("scale",)),
    "scale-inf": (lambda c: _first_module(c).update(scale=float("inf")), ("scale",)),
    "scale-string": (lambda c: _first_module(c).update(scale="0.5"), ("scale",)),
    "scale-null": (lambda c: _first_module(c).update(scale=None), ("scale",)),
    "private-string": (lambda c: _first_module(c).update(private_A="ab"), ("private_A",)),
    "private-out-of-pool": (lambda c: _first_module(c).update(private_B=[0, 10**6]),
                            ("private_B",)),
    "weights-string": (lambda c: _first_module(c).update(weights="false"), ("weights",)),
    "weights-claimed": (lambda c: _first_module(c).update(weights=True), ("weights",)),
    "embedding-int": (lambda c: _first_module(c).update(embedding=1), ("embedding",)),
    "conv-shape-string": (lambda c: _first_module(c).update(conv_shape="3x3"), ("conv_shape",)),
    "conv-shape-wrong": (lambda c: _first_module(c).update(conv_shape=[1, 1, 1, 1]),
                         ("conv_shape",)),
    "routes-negative": ("tensors:routes-negative", ("outside",)),
    "routes-past-pool": ("tensors:routes-past-pool", ("outside",)),
    "routes-float": ("tensors:routes-float", ("dtype",)),
    "routes-2d": ("tensors:routes-2d", ("1-D",)),
    "routes-missing": ("tensors:routes-missing", ("missing",)),
    "pool-wrong-width": ("tensors:pool-wrong-width", ("shape",)),
    "pool-1d": ("tensors:pool-1d", ("shape",)),
    "pool-int": ("tensors:pool-int", ("float",)),
    "pool-missing": ("tensors:pool-missing", ("missing",)),
    "pool-nan": ("tensors:pool-nan", ("NaN",)),
    "no-tensor-file": ("tensors:delete-file", ("file not found",)),
    **{f"json-{k}": (v, ()) for k, v in BAD_JSON_TEXTS.items()},
}


def _tensor_lie(how: str, cfg: dict):
    m = cfg["modules"][0]
    kid = m["kind"]
    routes = f"mos.routes.{m['name']}.A"

    def change(t):
        if how == "routes-negative":
            t[routes] = torch.full_like(t[routes], -1, dtype=torch.int16)
        elif how == "routes-past-pool":
            n = next(k["pool_A"] for k in cfg["kinds"] if k["id"] == kid)
            t[routes] = torch.full_like(t[routes], n, dtype=torch.int32)
        elif how == "routes-float":
            t[routes] = t[routes].to(torch.float32)
        elif how == "routes-2d":
            t[routes] = t[routes].reshape(1, -1)
        elif how == "routes-missing":
            del t[routes]
        elif how == "pool-wrong-width":
            t[f"mos.pools.{kid}.A"] = torch.zeros(t[f"mos.pools.{kid}.A"].shape[0], 7)
        elif how == "pool-1d":
            t[f"mos.pools.{kid}.B"] = t[f"mos.pools.{kid}.B"].reshape(-1)
        elif how == "pool-int":
            t[f"mos.pools.{kid}.A"] = t[f"mos.pools.{kid}.A"].to(torch.int32)
        elif how == "pool-missing":
            del t[f"mos.pools.{kid}.B"]
        elif how == "pool-nan":
            t[f"mos.pools.{kid}.A"] = t[f"mos.pools.{kid}.A"].clone()
            t[f"mos.pools.{kid}.A"][0, 0] = float("nan")
    return change


@pytest.mark.parametrize("lie", list(MOS_LIES))
def test_mos_lies_are_refused(root, mos_dirs, lie):
    change, words = MOS_LIES[lie]
    case = fresh_copy(mos_dirs["converted"], root / f"case-mos-{lie}")
    cfg_path = case / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    if isinstance(change, bytes):
        cfg_path.write_bytes(change)
    elif change == "tensors:delete-file":
        (case / TENSOR_FILE).unlink()
    elif isinstance(change, str):
        _rewrite_tensors(case / TENSOR_FILE, _tensor_lie(change.split(":", 1)[1], cfg))
    else:
        change(cfg)
        cfg_path.write_text(json.dumps(cfg))
    run_case("mos_table", lambda: load_mos(case), case, must_fail=True, words=words)


SHARED_LIES = {
    "pool-file-missing": ("delete", ("missing",)),
    "pool-file-renamed": ("rename", ("missing",)),
    "pool-file-flipped": ("flip", ("sha256",)),
    "pool-file-is-folder": ("folder", ("missing",)),
    "sha256-other": (lambda ref: ref.update(sha256="0" * 64), ("sha256",)),
    "sha256-null": (lambda ref: ref.update(sha256=None), ("sha256",)),
    "file-int": (lambda ref: ref.update(file=3), ("file",)),
    "file-nul": (lambda ref: ref.update(file="a\0b"), ("file",)),
    "n-a-string": (lambda ref: ref.update(n_A="4"), ("n_A",)),
    "n-a-negative": (lambda ref: ref.update(n_A=-1), ("n_A",)),
    "n-a-too-big": (lambda ref: ref.update(n_A=ref["n_A"] + 1), ("shared pool tensor",)),
    "key-a-list": (lambda ref: ref.update(key_A=["k0.A"]), ("shared pool tensor",)),
    "key-a-other": (lambda ref: ref.update(key_A="nope"), ("shared pool tensor",)),
    "shared-pool-list": ("list", ("shared_pool",)),
}


def _shared_case(shared_out: Path, dst: Path) -> tuple[Path, Path, dict]:
    """A copy of the whole batch output; returns (member folder, pool file, member config)."""
    out = fresh_copy(shared_out, dst)
    member = out / "t0"
    cfg = json.loads((member / CONFIG_FILE).read_text())
    ref = next(k["shared_pool"] for k in cfg["kinds"] if k.get("shared_pool"))
    return member, (member / ref["file"]).resolve(), cfg


@pytest.mark.parametrize("lie", list(SHARED_LIES))
def test_shared_pool_lies_are_refused(root, shared_out, lie):
    how, words = SHARED_LIES[lie]
    member, pool, cfg = _shared_case(shared_out, root / f"case-shared-{lie}")
    if how == "delete":
        pool.unlink()
    elif how == "rename":
        pool.rename(pool.with_name("renamed.safetensors"))
    elif how == "flip":
        pool.write_bytes(flip(pool.read_bytes(), [len(pool.read_bytes()) * 4]))
    elif how == "folder":
        pool.unlink()
        pool.mkdir()
    elif how == "list":
        for k in cfg["kinds"]:
            if k.get("shared_pool"):
                k["shared_pool"] = [k["shared_pool"]]
    else:
        for k in cfg["kinds"]:
            if k.get("shared_pool"):
                how(k["shared_pool"])
    (member / CONFIG_FILE).write_text(json.dumps(cfg))
    run_case("shared_table", lambda: load_mos(member), member.parent, must_fail=True,
             words=words)


@given(data=st.data())
@fuzz("shared_pool")
def test_shared_pool_refs_and_file(root, shared_out, data):
    member, pool, cfg = _shared_case(shared_out, root / "case-shared")
    if data.draw(st.booleans()):
        src = pool.read_bytes()
        if data.draw(st.booleans()):
            pool.write_bytes(src[:data.draw(st.integers(0, len(src) - 1))])
        else:
            pool.write_bytes(flip(src, data.draw(bit_positions(src, st_parts(src)[2]))))
    else:
        refs = [k["shared_pool"] for k in cfg["kinds"] if k.get("shared_pool")]
        ref = data.draw(st.sampled_from(refs))
        field = data.draw(st.sampled_from(["file", "sha256", "key_A", "key_B", "n_A", "n_B"]))
        value = data.draw(st.one_of(new_value, st.sampled_from(
            ["../pools/other.safetensors", "../t1/mos_adapter.safetensors", ".", "/dev/null"])))
        if value is DELETE:
            ref.pop(field, None)
        else:
            ref[field] = value
        (member / CONFIG_FILE).write_text(json.dumps(cfg))
    run_case("shared_pool", lambda: assert_loads_and_assembles(member), member.parent)


# ------------------------------------------------------------------ calibration files


def _calib_variant(data, src: Path, dst: Path) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    how = data.draw(st.sampled_from(["meta", "meta-field", "tensor", "bytes", "bytes"]))
    if how == "bytes":
        raw = src.read_bytes()
        if data.draw(st.booleans()):
            dst.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        else:
            dst.write_bytes(flip(raw, data.draw(bit_positions(raw, st_parts(raw)[2]))))
        return
    if how == "meta":
        meta["mosconv.calib"] = data.draw(st.one_of(
            st.sampled_from([v.decode("utf-8", "replace") for v in BAD_JSON_TEXTS.values()]),
            json_values.map(json.dumps), st.text(max_size=10)))
    elif how == "meta-field":
        info = json.loads(meta["mosconv.calib"])
        field = data.draw(st.sampled_from(["tokens", "schema", "data", "seq_len"]))
        value = data.draw(new_value)
        if value is DELETE:
            info.pop(field, None)
        else:
            info[field] = value
        meta["mosconv.calib"] = json.dumps(info)
    else:
        key = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[key]
        kind = data.draw(st.sampled_from(["non-square", "nan", "asym", "dtype", "1d", "extra",
                                          "delete", "empty"]))
        if kind == "non-square":
            tensors[key] = t[:, :-1].contiguous()
        elif kind == "nan":
            t = t.clone()
            t[0, -1] = data.draw(st.sampled_from([float("nan"), float("inf")]))
            tensors[key] = t
        elif kind == "asym":
            t = t.clone()
            t[0, -1] += 1.0
            tensors[key] = t
        elif kind == "dtype":
            tensors[key] = t.to(data.draw(st.sampled_from([torch.float32, torch.float16,
                                                           torch.int64, torch.bool])))
        elif kind == "1d":
            tensors[key] = t.reshape(-1)
        elif kind == "extra":
            tensors["other.thing"] = torch.zeros(2, 2)
        elif kind == "delete":
            del tensors[key]
        else:
            tensors[key] = torch.zeros(0, 0, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)


@given(data=st.data())
@fuzz("calib")
def test_calibration_files(root, calib_file, data):
    case = root / "case-calib" / "calib.safetensors"
    case.parent.mkdir(exist_ok=True)
    _calib_variant(data, calib_file, case)

    def load():
        stats = load_stats(case)
        assert stats.tokens >= 1 and stats.moments
        for t in stats.moments.values():
            assert t.dim() == 2 and t.shape[0] == t.shape[1] > 0
            assert bool(torch.isfinite(t).all())
        return stats

    run_case("calib", load, case.parent)


CALIB_LIES = {
    "non-square": (lambda t, m: t.update({k: v[:, :-1].contiguous() for k, v in t.items()}),
                   ("square",)),
    "nan": (lambda t, m: t.update({k: v.fill_diagonal_(float("nan")) for k, v in t.items()}),
            ("NaN",)),
    "not-symmetric": (lambda t, m: t.update({k: v.triu() for k, v in t.items()}), ("symmetric",)),
    "meta-not-json": (lambda t, m: m.update({"mosconv.calib": "{tokens: 3"}), ("JSON",)),
    "meta-list": (lambda t, m: m.update({"mosconv.calib": "[1, 2]"}), ("object",)),
    "meta-tokens-string": (lambda t, m: m.update({"mosconv.calib": json.dumps(
        {"schema": "mosconv.calib/1", "tokens": "20"})}), ("tokens",)),
    "meta-tokens-inf": (lambda t, m: m.update({"mosconv.calib": json.dumps(
        {"schema": "mosconv.calib/1", "tokens": float("inf")})}), ("tokens",)),
    "meta-tokens-zero": (lambda t, m: m.update({"mosconv.calib": json.dumps(
        {"schema": "mosconv.calib/1", "tokens": 0})}), ("no statistics",)),
    "meta-schema": (lambda t, m: m.update({"mosconv.calib": json.dumps(
        {"schema": "other/2", "tokens": 20})}), ("schema",)),
    "meta-missing": (lambda t, m: m.clear(), ("mosconv.calib",)),
    "meta-deep": (lambda t, m: m.update({"mosconv.calib": "[" * 100_000 + "]" * 100_000}),
                  ("JSON",)),
    "no-tensors": (lambda t, m: t.clear(), ("no statistics",)),
}


@pytest.mark.parametrize("lie", list(CALIB_LIES))
def test_calibration_lies_are_refused(root, calib_file, lie):
    change, words = CALIB_LIES[lie]
    with safe_open(str(calib_file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors, meta)
    case = root / f"case-calib-{lie}" / "calib.safetensors"
    case.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(case), metadata=meta)
    run_case("calib_table", lambda: load_stats(case), case.parent, must_fail=True, words=words)


# ------------------------------------------------------------------ the count


def _check_budgets() -> None:
    """Each property test that ran used its whole budget (a strategy that ran out of
    distinct inputs would show here); checked when the module's tests are done (module
    fixture teardown), so it holds in any test order.  The total is in the terminal
    summary line ``test_fuzz: N cases ran``."""
    ran = {name for name in BUDGET if CASES[name]}
    for name in ran:
        if SCALE == 1:
            assert CASES[name] == BUDGET[name], (name, CASES[name], BUDGET[name])
        else:  # a scaled budget may exceed the distinct inputs (e.g. truncation offsets)
            assert CASES[name] <= BUDGET[name], (name, CASES[name], BUDGET[name])
    if len(ran) == len(BUDGET) and SCALE == 1:
        assert sum(CASES[n] for n in BUDGET) == sum(BUDGET.values())
