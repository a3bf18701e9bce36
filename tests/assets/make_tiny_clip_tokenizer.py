"""Writes tests/assets/tiny-clip-tokenizer/: a CLIP BPE tokenizer with a 523-token vocabulary.

The vocabulary is CLIP's byte alphabet (256 symbols, plus each with the end-of-word
marker `</w>`), a few merges for common test words, and the two special tokens. Load it
with `CLIPTokenizer.from_pretrained(folder)`: in transformers 5, `CLIPTokenizer(vocab_file=…)`
silently ignores the files (see /work/shared/notes/toyworld.md).

Run from the repository root (dorabooth installed): `python tests/assets/make_tiny_clip_tokenizer.py`.
"""

import json
from pathlib import Path

from dorabooth.toyworld.tokenizer import bytes_to_unicode   # CLIP's reversible byte -> character map

MERGES = ["o f</w>", "t h", "th e</w>", "s k", "sk s</w>", "d o", "do g</w>", "p h", "ph o"]


def main(folder: Path = Path(__file__).parent / "tiny-clip-tokenizer") -> None:
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {folder} ({len(tokens)} tokens)")


if __name__ == "__main__":
    main()
