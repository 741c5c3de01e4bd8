"""Safe writes: every output file goes to a temporary file in the same folder and is
moved into place with ``os.replace``, so a reader never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MosconvError
from .names import CALIB_FILE, CONFIG_FILE, PEFT_CONFIG, PEFT_WEIGHTS, REPORT_FILE, TENSOR_FILE

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    On any failure (disk full, permissions, interrupt) the temp file is removed and
    ``path`` is left as it was; OS errors become ``MosconvError("<path>: cannot write
    (<reason>)")``.
    """
    path = Path(path)
    tmp = None
    try:
        # the name cut so that a legal 255-byte name still has a legal temporary name
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp",
                                   dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise MosconvError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` (any value ``json.dumps`` takes: a config or report dict) as indented
    JSON, atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors deterministically (keys sorted by safetensors; contiguous CPU copies).

    ``metadata`` must have at most one key: safetensors writes several in hash-map order.
    """
    from safetensors.torch import save as st_save

    if metadata and len(metadata) > 1:
        raise ValueError("safetensors metadata with more than one key is not byte-deterministic")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata=metadata)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The files written into an output folder (atomic_write_*: ".<name>.<random>.tmp" until done).
OUTPUT_FILES = frozenset({CONFIG_FILE, TENSOR_FILE, REPORT_FILE, PEFT_CONFIG, *PEFT_WEIGHTS,
                          CALIB_FILE})
# What a folder holding another kind of adapter has: a MoS output is never written beside a
# PEFT LoRA, nor a LoRA export beside a MoS adapter (marker -> the other kind's files).
OTHER_OUTPUTS = {
    CONFIG_FILE: (PEFT_CONFIG, *PEFT_WEIGHTS),
    PEFT_CONFIG: (CONFIG_FILE, TENSOR_FILE),
}


def remove_stale_tmp(folder: Path, ours: Callable[[str], bool]) -> None:
    """Remove the temporary files (``.<name>.<random>.tmp``, :func:`atomic_write_bytes`) that
    a run killed mid-write left in ``folder`` for the file names ``ours`` accepts; anyone
    else's stay.

    Raises:
        OSError: one cannot be removed."""
    for stale in folder.glob(".*.tmp"):
        if ours(stale.name[1:].rsplit(".", 2)[0]) and stale.is_file():
            stale.unlink()


def missing_folders(out: str | Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, innermost first: what writing
    ``out`` creates, for :func:`remove_missing` to take back should the write fail."""
    made, p = [], Path(out).absolute()
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def remove_missing(made: list[Path]) -> None:
    """Undo :func:`missing_folders`: ``made[0]`` (the output) goes with its contents, its
    ancestors only while empty (another writer may have put something there since)."""
    if not made:
        return
    shutil.rmtree(made[0], ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def writing(out: Path, marker: str, overwrite: bool) -> Iterator[list[Path]]:
    """Check and create the output folder ``out`` (:func:`prepare_output_dir`, the old
    output left intact) and hold it for this process while the body writes it: another
    mosconv run writing the same folder at the same time is refused (it would mix its files
    with ours, or replace an output without being asked to). Yields the folders this call
    created; if the body fails they are removed (:func:`remove_missing`) while still held,
    so no other run's output in them is lost.

    Raises:
        MosconvError: as :func:`prepare_output_dir`, or the folder is being written."""
    made = missing_folders(out)
    prepare_output_dir(out, marker, overwrite, remove_marker=False)
    held = _hold(out)
    try:
        # again under the hold: another run may have finished an output here meanwhile;
        # it is refused without removing anything (the folder holds that output now)
        prepare_output_dir(out, marker, overwrite, remove_marker=False)
        try:
            yield made
        except BaseException:
            remove_missing(made)
            raise
    finally:
        if held is not None:
            os.close(held)


def _hold(folder: Path) -> int | None:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind), released
    when the returned descriptor closes; None where the system has no such locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None  # unreadable: the writes name the problem
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MosconvError(f"{folder}: another mosconv run is writing this folder; wait "
                           "for it to finish or write elsewhere") from None
    except OSError:  # a filesystem without locks
        os.close(fd)
        return None
    return fd


def missing(path: str | Path) -> str:
    """Why ``path`` (which is no file or folder as far as ``Path`` sees) cannot be opened:
    ``"no such file or folder"``, a link that points nowhere or into a loop, or a special
    file (a pipe, socket or device)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a link to {os.readlink(path)}, which does not exist or loops"
    if os.path.exists(path):
        return "not a file or folder: a pipe, socket or device"
    parts = str(path).split("/")
    if len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts) \
            and not os.path.exists(parts[0]):  # a Hugging Face Hub id, read as a local path
        return (f"no such file or folder (mosconv reads local files only: download a Hub "
                f"repository first, e.g. hf download {path} --local-dir {parts[1]})")
    return "no such file or folder"


def real_path(path: str | Path) -> Path:
    """``path`` with its links resolved, as far as they go: a link loop stops there instead
    of raising (``Path.resolve`` raises RuntimeError on one in Python 3.11); reading the
    path then gives the error that names it."""
    return Path(os.path.realpath(path))


def same_or_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    path, folder = real_path(path), real_path(folder)
    return path == folder or folder in path.parents


def prepare_output_dir(out: Path, marker: str, overwrite: bool, *,
                       remove_marker: bool = True) -> None:
    """Create ``out``; refuse to touch a folder holding a finished output unless ``overwrite``,
    and a folder holding another kind of adapter (:data:`OTHER_OUTPUTS`) in any case.

    ``marker`` is the file whose presence means "finished" (written last); with
    ``overwrite`` it is removed first (unless ``remove_marker`` is False: a check before
    the work, which leaves an old output intact should the work fail), so the folder
    never looks complete mid-write.

    What happens to an old output on ``overwrite``: its marker goes first, then each
    file is replaced atomically, the new marker last.  A run that fails in between (disk
    full, interrupt) leaves a folder without marker, which every reader treats as
    incomplete (``load_mos`` / ``read_adapter`` refuse it, ``batch`` redoes it): the old
    output is not restored, and files not yet replaced keep their old bytes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MosconvError(f"{out}: exists and is not a folder")
    for name in OTHER_OUTPUTS.get(marker, ()):
        if (out / name).exists():  # --overwrite replaces an output of ours, never another's
            raise MosconvError(f"{out}: holds another adapter ({name}); write to another folder")
    if (out / marker).exists():
        if not overwrite:
            raise MosconvError(f"{out}: already holds an output ({marker}); it is replaced only "
                               "when overwriting is asked for", options=("overwrite",))
        if remove_marker:
            try:
                (out / marker).unlink()
            except OSError as e:
                raise MosconvError(f"{out / marker}: cannot remove the old output's marker "
                                   f"({e.strerror or e})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out, OUTPUT_FILES.__contains__)
    except OSError as e:
        raise MosconvError(f"{out}: cannot create folder ({e.strerror or e})") from None
