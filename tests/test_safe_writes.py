"""Safe writes: every output file goes to a temp file in the same folder and is
``os.replace``d into place, the marker (``mos_config.json`` / ``adapter_config.json``) last.

Each write step is failed in turn (``tempfile.mkstemp``, the file write, ``os.fsync``,
``os.replace`` raising ``OSError(ENOSPC)`` at the k-th call, for every k until the run
succeeds; and a KeyboardInterrupt at the k-th ``os.replace``) for ``compress``,
``export_lora`` and ``save_stats``, into a new folder and with ``overwrite`` over a complete
older output.  After every failure:

* no output looks complete: a marker is present only if every file is complete and valid
  (the output loads, and its files are exactly the old output's or exactly the new one's);
* no temp file is left anywhere; an unrelated file in the folder is untouched; the source
  files are byte-identical; a folder the run created is gone;
* a plain rerun succeeds and gives the reference bytes.

Policy on ``overwrite`` (see ``mosconv.fileio.prepare_output_dir``): the old marker is
removed just before the first new file is written, so a failed overwrite leaves a folder
that reads as incomplete (and a bad input, which fails before any write, leaves the old
output as it was).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factory import llama_like, write_random_peft

from mosconv import read_adapter
from mosconv.cli.commands import main
from mosconv.errors import MosconvError
from mosconv.fit.convert import ConvertConfig
from mosconv.model.calib import CalibStats, load_stats, save_stats
from mosconv.mos.format import CONFIG_FILE, load_mos
from mosconv.pipeline import compress, export_lora

KEEP = "keep-me.txt"
POINTS = ["mkstemp", "write", "fsync", "replace", "interrupt"]
ENOSPC = "No space left on device"


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ fault injection


class Faults:
    """Make the ``k``-th call of one write step fail; count whether it was reached."""

    def __init__(self, monkeypatch, point: str, k: int):
        self.point, self.k, self.calls, self.fired = point, k, 0, False
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
        real_fsync, real_replace = os.fsync, os.replace

        def mkstemp(*a, **kw):
            self._step("mkstemp")
            return real_mkstemp(*a, **kw)

        def fdopen(fd, *a, **kw):
            return _Writer(real_fdopen(fd, *a, **kw), self)

        def fsync(fd):
            self._step("fsync")
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self._step("replace")
            self._step("interrupt")
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def _step(self, point: str) -> None:
        if point != self.point:
            return
        self.calls += 1
        if self.calls == self.k:
            self.fired = True
            if point == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, ENOSPC)


class _Writer:
    """A file object whose ``write`` is a fault point."""

    def __init__(self, f, faults: Faults):
        self._f, self._faults = f, faults

    def write(self, data):
        self._faults._step("write")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


# ------------------------------------------------------------------ the three writers


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def digest_tree(folder: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files_of(folder).items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Sources, an old complete output and the reference (new) output of each writer."""
    root = tmp_path_factory.mktemp("safe")
    src = root / "src"
    lora, _ = write_random_peft(src / "lora", llama_like(layers=2, d=32, d_kv=16), r=4)
    new_cfg = ConvertConfig(ratio=4, search="truncation")
    old_cfg = ConvertConfig(ratio=2, search="truncation")
    compress(lora, root / "ref" / "compress", new_cfg)
    compress(lora, root / "old" / "compress", old_cfg)
    mos = src / "mos"
    compress(lora, mos, new_cfg)
    export_lora(mos, root / "ref" / "export")
    export_lora(root / "old" / "compress", root / "old" / "export")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    new_stats = CalibStats({"m": x.T @ x / 30}, 30, {"data": "new"})
    old_stats = CalibStats({"m": (x.T @ x / 30) * 2}, 30, {"data": "old"})
    for where, stats in (("ref", new_stats), ("old", old_stats)):
        (root / where / "calib").mkdir(parents=True)
        save_stats(stats, root / where / "calib" / "calib.safetensors")

    ops = {
        "compress": {
            "run": lambda out, overwrite: compress(lora, out, new_cfg, overwrite=overwrite),
            "marker": CONFIG_FILE, "load": load_mos},
        "export": {
            "run": lambda out, overwrite: export_lora(mos, out, overwrite=overwrite),
            "marker": "adapter_config.json", "load": read_adapter},
        "save_stats": {  # one file: it is its own marker; "overwrite" = over an older file
            "run": lambda out, overwrite: save_stats(new_stats, out / "calib.safetensors"),
            "marker": "calib.safetensors",
            "load": lambda out: load_stats(out / "calib.safetensors")},
    }
    for name, op in ops.items():
        op["new"] = files_of(root / "ref" / ("calib" if name == "save_stats" else name))
        op["old"] = files_of(root / "old" / ("calib" if name == "save_stats" else name))
        assert op["new"] != op["old"]
    return root, src, ops


def _prepare(root: Path, op: dict, case: str, name: str) -> Path:
    out = root / "runs" / name
    if out.exists():
        shutil.rmtree(out)
    if case == "overwrite":
        out.mkdir(parents=True)
        for rel, data in op["old"].items():
            (out / rel).write_bytes(data)
        (out / KEEP).write_text("not ours\n")
    elif name.startswith("save_stats"):
        out.mkdir(parents=True)  # save_stats writes a file: its folder exists
        (out / KEEP).write_text("not ours\n")
    return out


def _check_after(root: Path, src_digest: dict, op: dict, out: Path, case: str,
                 name: str, failed: bool) -> None:
    stray = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not stray, stray
    assert digest_tree(root / "src") == src_digest  # sources untouched
    if out.exists() and (case == "overwrite" or name.startswith("save_stats")):
        assert (out / KEEP).read_text() == "not ours\n"
    marker = out / op["marker"]
    if marker.exists():
        op["load"](out)  # complete and valid
        have = {k: v for k, v in files_of(out).items() if k != KEEP}
        assert have in (op["old"], op["new"]), sorted(have)  # never half old, half new
        if not failed:
            assert have == op["new"]
    else:
        assert failed, "a successful run left no marker"
        if case == "new" and not name.startswith("save_stats"):
            assert not out.exists(), sorted(out.rglob("*"))  # a folder we made is gone


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("case", ["new", "overwrite"])
@pytest.mark.parametrize("opname", ["compress", "export", "save_stats"])
def test_failure_at_every_write_step(world, monkeypatch, opname, case, point):
    root, src, ops = world
    op = ops[opname]
    src_digest = digest_tree(src)
    failures = 0
    for k in range(1, 40):
        name = f"{opname}-{case}-{point}-{k}"
        out = _prepare(root, op, case, name)
        with monkeypatch.context() as m:
            faults = Faults(m, point, k)
            try:
                op["run"](out, case == "overwrite")
                error = None
            except KeyboardInterrupt:
                error = "interrupt"
            except MosconvError as e:
                error = str(e)
        assert faults.fired == (error is not None), (name, error)
        _check_after(root, src_digest, op, out, case, name, error is not None)
        if error is None:
            break
        failures += 1
        if point != "interrupt":
            assert "\n" not in error and f"cannot write ({ENOSPC})" in error, error
            assert str(out) in error, error  # names the file it could not write
        # a plain rerun over what the failure left recovers completely
        op["run"](out, True)
        _check_after(root, src_digest, op, out, "rerun", name, False)
        shutil.rmtree(out)
    else:
        pytest.fail(f"{opname}: still failing after 39 faults at {point}")
    assert failures >= 1  # every writer reaches every step at least once


def test_bad_input_with_overwrite_leaves_the_old_output_intact(world, tmp_path):
    """A run that fails before writing anything (unreadable source) does not touch the
    old output: it stays complete and loadable."""
    root, _, ops = world
    out = _prepare(root, ops["compress"], "overwrite", "bad-input")
    before = files_of(out)
    bad = tmp_path / "broken"
    shutil.copytree(root / "src" / "lora", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(MosconvError, match="adapter_model.safetensors"):
        compress(bad, out, ConvertConfig(ratio=4, search="truncation"), overwrite=True)
    assert files_of(out) == before
    load_mos(out)


# ------------------------------------------------------------------ through the CLI

DISK_FULL = re.compile(r"^mosconv: error: (?P<path>.+): cannot write \(No space left on device\)$")


@pytest.mark.parametrize("point,k", [("replace", 1), ("write", 2), ("fsync", 2),
                                     ("mkstemp", 1)])
@pytest.mark.parametrize("command", ["compress", "export"])
def test_disk_full_through_the_cli(world, monkeypatch, tmp_path, command, point, k):
    _, src, _ = world
    out = tmp_path / "out"
    args = ([command, str(src / "lora"), str(out), "--search", "truncation", "-q"]
            if command == "compress" else [command, str(src / "mos"), str(out)])
    with monkeypatch.context() as m:
        faults = Faults(m, point, k)
        res = CliRunner().invoke(main, args)
    assert faults.fired
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output and "internal error" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    match = DISK_FULL.match(lines[0])
    assert match, lines[0]
    assert Path(match["path"]).parent == out  # the file it could not write, in OUT
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ two runs, one folder


def _held(folder: Path):
    """Hold ``folder`` as a running mosconv would (an flock on the folder itself)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize("command", ["compress", "export"])
def test_a_folder_another_run_is_writing_is_refused_and_left_alone(world, tmp_path, command):
    """A second run into a folder that a first one is writing is refused at once, and its
    failure removes nothing there (it used to remove the folder, the first run's finished
    output included, or to replace that output without --overwrite)."""
    pytest.importorskip("fcntl")
    _, src, _ = world
    out = tmp_path / "out"
    out.mkdir()
    (out / KEEP).write_text("the other run's")
    fd = _held(out)
    try:
        with pytest.raises(MosconvError, match="another mosconv run is writing"):
            if command == "compress":
                compress(src / "lora", out, ConvertConfig(ratio=4, search="truncation"))
            else:
                export_lora(src / "mos", out)
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == [KEEP]
    # once released, the folder is written as usual
    compress(src / "lora", out, ConvertConfig(ratio=4, search="truncation"))
    load_mos(out)


def test_an_output_finished_by_another_run_meanwhile_is_not_replaced(world, tmp_path,
                                                                   monkeypatch):
    """The check before the work is repeated once the folder is held: an output another
    run finished in between is neither replaced (no overwrite asked) nor removed, although
    this run created the folder."""
    from mosconv import fileio

    _, src, _ = world
    out = tmp_path / "new" / "out"
    real = fileio._hold

    def finished_meanwhile(folder):
        shutil.copytree(src / "mos", folder, dirs_exist_ok=True)
        return real(folder)

    monkeypatch.setattr(fileio, "_hold", finished_meanwhile)
    with pytest.raises(MosconvError, match="already holds an output"):
        compress(src / "lora", out, ConvertConfig(ratio=4, search="truncation"))
    assert files_of(out) == files_of(src / "mos")


def test_an_interrupted_export_overwrite_leaves_no_weights_without_config(world, tmp_path,
                                                                          monkeypatch):
    """Interrupted while its new weights are written, an export over an old one leaves
    neither file: the old weights without their config would be read by other tools."""
    from mosconv.lora import write

    _, src, _ = world
    out = tmp_path / "exp"
    export_lora(src / "mos", out)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "atomic_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_lora(src / "mos", out, overwrite=True)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]
    monkeypatch.undo()
    export_lora(src / "mos", out)  # without overwrite, an existing export is kept whole
    with pytest.raises(MosconvError, match="already holds an output"):
        export_lora(src / "mos", out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]


def test_a_legal_long_file_name_is_written(tmp_path):
    """The temporary name (``.<name>.<random>.tmp``) is cut so that a 250-byte name works."""
    from mosconv.fileio import atomic_write_bytes

    path = tmp_path / ("c" * 238 + ".safetensors")
    atomic_write_bytes(path, b"x")
    assert path.read_bytes() == b"x" and len(path.name) == 250
