"""Write a small, randomly initialized Llama causal LM that the example LoRA fits, plus text.

The model has the shapes of ``make_example_lora.py``'s adapter (8 layers, hidden 512, 8 heads,
2 KV heads: k/v of width 128), a small MLP, and a real byte-level BPE tokenizer trained on
English prose from Python's own ``pydoc_data.topics``; it is saved with ``save_pretrained`` so
that ``--base-model FOLDER`` loads it offline. It is NOT a trained language model: it exists
so that calibration, distillation, ``eval`` and ``mosconv.apply`` can be tried anywhere in
seconds. ``--text FILE`` also writes the prose (blank lines between documents).

    python examples/make_example_model.py example_model --text example_text.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE_SHAPE = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8,
                 "num_attention_heads": 8, "num_key_value_heads": 2}


def prose(chars: int | None = None) -> str:
    """English prose available offline (pydoc topics, sorted: deterministic)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text if chars is None else text[:chars]


def write_model(out: str | Path, *, seed: int = 0, vocab: int = 512,
                initializer_range: float = 0.02, **shape) -> Path:
    """Save a random Llama (``shape`` overrides :data:`EXAMPLE_SHAPE`) and its tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([prose(20_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), eos_token_id=fast.eos_token_id,
                      initializer_range=initializer_range, **{**EXAMPLE_SHAPE, **shape})
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output model folder")
    ap.add_argument("--text", default=None, help="also write English prose to this file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    write_model(args.out, seed=args.seed)
    if args.text:
        Path(args.text).write_text(prose())
    print(f"wrote example model to {args.out}" + (f" and text to {args.text}" if args.text else ""))


if __name__ == "__main__":
    main()
