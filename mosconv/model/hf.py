"""Load a local base model (transformers folder or GGUF file) for the runtime; never online."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, FormatError
from ..fileio import missing

if TYPE_CHECKING:  # transformers is optional and imported only when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """Without transformers' GGUF de-quantizing progress bar (a plain tqdm that its
    ``disable_progress_bar`` does not reach)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf
        bar = gguf.tqdm
    except (ImportError, AttributeError):
        yield
        return
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def load_base_model(path: str | Path, *, gguf_file: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a causal LM from a local folder, in eval mode and frozen.

    Args:
        path: a model folder, or a ``.gguf`` file (then ``gguf_file`` is its name).
        gguf_file: name of a GGUF file inside ``path`` (transformers dequantizes it).
        dtype: dtype of the loaded weights.
        device: where the model is put.

    Raises:
        FormatError: ``path`` or the GGUF file is missing, or transformers cannot load it.
        ConfigError: transformers is not installed.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no network, ever
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FormatError(f"{path}: {missing(path)}")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FormatError(f"{path / gguf_file}: no such GGUF file")
    if gguf_file is None and path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ConfigError(f"{path}: a folder of GGUF files ({', '.join(ggufs[:3])}"
                              f"{', ...' if len(ggufs) > 3 else ''}) and no config.json: name "
                              "the file to load", options=("gguf_file",))
        raise FormatError(f"{path}: not a model folder (no config.json and no .gguf file)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("loading a base model needs transformers: "
                          "pip install 'mosconv[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mosconv shows its own progress; keep stderr clean
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings would break the one-line error
    try:
        with _quiet_gguf():
            # never code from the folder (auto_map): transformers would ask on stdin
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                      trust_remote_code=False, **extra)
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=False,
                                                         dtype=dtype, **extra)
    except Exception as e:  # noqa: BLE001  (transformers raises anything; report it in one line)
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else ""
        if "custom code" in first:
            raise FormatError(f"{path}: its config names Python code in the folder (auto_map); "
                              "mosconv never runs code from a model folder") from None
        raise FormatError(f"{path}: cannot load a model ({type(e).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
