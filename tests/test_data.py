"""data: reading plain text and JSONL files, token blocks, held-out split, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from mosconv import ConfigError, FormatError
from mosconv.model.data import read_texts, split_blocks, token_blocks


class CharTokenizer:
    """A real (if simple) tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 250) for c in text]}


def test_plain_text_documents(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first doc\nstill first\n\n\nsecond doc\n\n   \n")
    assert read_texts(p) == ["first doc\nstill first", "second doc"]


def test_jsonl_text_and_messages(tmp_path):
    p = tmp_path / "t.jsonl"
    lines = [{"text": "hello"}, {}, {"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}]
    p.write_text("\n".join(json.dumps(x) for x in lines[:1] + lines[2:]) + "\n\n")
    assert read_texts(p) == ["hello", "q\na"]
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": 1}) + "\n")
    with pytest.raises(FormatError, match=r"t\.jsonl:2: a JSONL record needs"):
        read_texts(p)
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(FormatError, match=r"t\.jsonl:2: invalid JSON"):
        read_texts(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n", b"\xff\xfe\x00bad"])
def test_empty_or_unreadable_data(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FormatError, match="empty.txt"):
        read_texts(p)
    with pytest.raises(FormatError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_token_blocks_shape_limit_and_eos():
    tok = CharTokenizer()
    blocks = token_blocks(tok, ["abcd", "efgh"], seq_len=3)
    assert blocks.dtype == torch.int64 and blocks.shape == (3, 3)  # 10 tokens -> 3 blocks
    assert blocks.reshape(-1).tolist()[4] == 0  # EOS after the first document
    assert token_blocks(tok, ["x" * 100], seq_len=8, max_tokens=20).shape == (2, 8)
    with pytest.raises(FormatError, match="fewer than one block"):
        token_blocks(tok, ["ab"], seq_len=8)
    with pytest.raises(ConfigError, match="seq_len"):
        token_blocks(tok, ["ab"], seq_len=1)
    with pytest.raises(ConfigError, match="max_tokens"):
        token_blocks(tok, ["ab"], seq_len=8, max_tokens=4)


def test_split_blocks():
    blocks = torch.arange(40).reshape(10, 4)
    train, held = split_blocks(blocks, 0.2)
    assert train.shape == (8, 4) and held.shape == (2, 4)
    assert torch.equal(torch.cat([train, held]), blocks)
    with pytest.raises(FormatError):
        split_blocks(blocks[:1], 0.2)
    with pytest.raises(ConfigError):
        split_blocks(blocks, 1.5)


@pytest.mark.parametrize("line, why", [("[" * 100_000 + "]" * 100_000, "recursion"),
                                       ('{"text": ' + "9" * 5001 + "}", "digits")])
def test_jsonl_that_python_cannot_parse_is_named(tmp_path, line, why):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(FormatError, match=rf"data.jsonl:2: invalid JSON \(.*{why}"):
        read_texts(path)
