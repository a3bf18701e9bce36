"""A CLIP-compatible BPE tokenizer for the toy world, built from a word list.

`write_tokenizer(folder)` writes `vocab.json`, `merges.txt` and `tokenizer_config.json`
that `transformers.CLIPTokenizer.from_pretrained(folder)` loads. The vocabulary holds
CLIP's 256 byte symbols (alone and with `</w>`), so any text still tokenizes, then one
merge chain per known word so that each word in `WORDS` is a single token, then
`<|startoftext|>` and `<|endoftext|>`. Rare identifier tokens (`RARE_TOKENS`) are single
tokens that never occur in training captions.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .world import COLOURS, POSITIONS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

WORLD_WORDS = (
    list(SHAPES) + list(COLOURS) + list(POSITIONS) + list(SIZES)
    + ["a", "an", "at", "the", "on", "of", "with", "and", "half", "band", "thick",
       "background", "shape", "left", "right", "top", "bottom"]
)
COMMON_WORDS = [
    "photo", "picture", "image", "drawing", "painting", "render", "of", "in", "on", "the",
    "my", "is", "dog", "cat", "person", "man", "woman", "toy", "object", "style", "high",
    "quality", "close", "up", "center", "middle", "big", "tiny", "colour", "color",
    "two", "one", "plain", "simple", "sitting", "standing", "beach", "snow", "sks",
]
RARE_TOKENS = ["sks", "ohwx", "zwx", "xjy", "qwv", "vkz", "bnq", "pxq"]
WORDS = list(dict.fromkeys(WORLD_WORDS + COMMON_WORDS + RARE_TOKENS))


@lru_cache(1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a symbol list (lowest rank first, as CLIP does)."""
    word = list(word)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = word[i], word[i + 1]
        out, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(word[j])
                j += 1
        word = out
    return word


def _symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return chars


def build_vocab(words=WORDS):
    """(vocab: token -> id, merges: list of pairs) making each of `words` one token."""
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab_list)
    for _ in range(10):  # add merges until every word is a single token (a fixed point)
        changed = False
        for w in words:
            toks = _bpe(_symbols(w), ranks)
            while len(toks) > 1:  # join left to right with new (lowest-priority) merges
                pair = (toks[0], toks[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    changed = True
                joined = pair[0] + pair[1]
                if joined not in known:
                    known.add(joined)
                    vocab_list.append(joined)
                toks = [joined] + toks[2:]
        if not changed:
            break
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tokenizer(folder) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True, "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def load_tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
