"""User text for calibration, distillation and evaluation: files in, token blocks out.

A data file is plain text (``.txt`` or anything that is not ``.jsonl``; the whole file is
one stream of text, blank lines separate documents) or JSON Lines (``.jsonl``: one object
per line with a ``text`` string, or chat ``messages`` whose ``content`` strings are
joined).  Documents are tokenized, joined with the tokenizer's EOS token and cut into
fixed-length blocks ``(n, seq_len)``: no padding, so every position is a real token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ConfigError, FormatError


class Tokenizer(Protocol):
    """What :func:`token_blocks` needs of a tokenizer: a transformers tokenizer has it."""

    @property
    def eos_token_id(self) -> int | None:
        """Id of the token that ends a document, or None (documents are then not separated)."""

    def __call__(self, text: str, *, add_special_tokens: bool) -> Mapping[str, list[int]]:
        """``{"input_ids": [...]}``: the token ids of ``text``."""


def read_texts(path: str | Path) -> list[str]:
    """The documents of a data file (see the module docstring).

    Raises:
        FormatError: missing or unreadable file, invalid JSON Lines, no text at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: data file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read data file as UTF-8 text ({e})") from None
    if "\x00" in raw:  # valid UTF-8, but no text holds NUL characters
        raise FormatError(f"{path}: holds NUL bytes: a binary file, not text")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # a 5000-digit number, absurd nesting
                why = str(e).splitlines()[0][:120] if str(e) else "nested too deep"
                raise FormatError(f"{path}:{i}: invalid JSON ({why})") from None
            docs.append(_record_text(path, i, rec))
    else:
        docs = [d.strip() for d in raw.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise FormatError(f"{path}: data file holds no text")
    return docs


def _record_text(path: Path, line: int, rec: object) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        parts = [m.get("content") for m in rec["messages"] if isinstance(m, dict)]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise FormatError(f"{path}:{line}: a JSONL record needs a 'text' string or chat 'messages'")


def token_blocks(tokenizer: Tokenizer, texts: list[str], seq_len: int,
                 max_tokens: int | None = None, *, source: str = "data") -> torch.Tensor:
    """Tokenize ``texts`` and cut the stream into ``(n, seq_len)`` int64 blocks.

    At most ``max_tokens`` tokens (rounded down to whole blocks) are used; the tail that
    does not fill a block is dropped.

    Raises:
        ConfigError: ``seq_len < 2`` or ``max_tokens < seq_len``.
        FormatError: the text is shorter than one block.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ConfigError(f"max_tokens must be at least seq_len ({seq_len}), got {max_tokens}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    limit = max_tokens if max_tokens is not None else float("inf")
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= limit:
            break
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise FormatError(f"{source}: {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def split_blocks(blocks: torch.Tensor, held_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` blocks: the last ``held_out`` share (at least one block) is held
    out; deterministic, no shuffling (neighbouring text stays on one side)."""
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must be in (0, 1), got {held_out}")
    if blocks.shape[0] < 2:
        raise FormatError(f"need at least 2 blocks of text for a held-out split, got {blocks.shape[0]}")
    k = max(1, round(blocks.shape[0] * held_out))
    return blocks[:-k], blocks[-k:]
