"""Build the embedded tiny causal LM offline: a byte-level BPE tokenizer and a small random GPT-2.

    python -m node.models.build_tiny                 # rebuilds node/models/tiny (what ships)
    python -m node.models.build_tiny OUT --size 30m  # a ~30 M-parameter model for benchmarks

Nothing is downloaded. The weights are random (seeded), so the model's answers are not
meaningful: it exists so that `make run` and the tests exercise the real transformers path
with no network. Real hosts configure a real model in ``[providers.hf_local] models``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["build", "SIZES", "TINY_DIR", "MODEL_ID"]

MODEL_ID = "accelmesh-tiny"
TINY_DIR = Path(__file__).resolve().parent / "tiny"

# name -> (n_embd, n_layer, n_head, n_positions)
SIZES = {
    "tiny": (64, 2, 2, 1024),  # ~0.2 M parameters (196,736), ~0.8 MB: ships in the package
    "30m": (512, 9, 8, 512),  # ~29 M parameters: the hf_local benchmark model
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "accelmesh is a peer to peer inference mesh for language models.",
    "Every host runs a daemon that advertises its providers and accelerators.",
    "Any peer can submit a prompt and the mesh picks the best peer to serve it.",
    "Answers are content addressed and shared through a distributed hash table.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "0123456789 + - * / = ( ) [ ] { } < > | : ; , . ! ?",
]


def build(out: str | os.PathLike[str], size: str = "tiny", *, chat_template: bool = True) -> Path:
    """Write a tokenizer and a randomly initialised GPT-2 of `size` to `out`; return the path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    n_embd, n_layer, n_head, n_positions = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    eos = "<|endoftext|>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    if chat_template:
        hf_tok.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(hf_tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(TINY_DIR), help=f"output directory (default {TINY_DIR})")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--no-chat-template", action="store_true", help="leave the tokenizer without a chat template")
    args = parser.parse_args()
    path = build(args.out, args.size, chat_template=not args.no_chat_template)
    total = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
