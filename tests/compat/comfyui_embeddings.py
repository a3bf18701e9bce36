"""Run ComfyUI's own prompt tokenizers on dorabooth's pivotal-tuning embeddings files (not a test module).

Usage: ``python tests/compat/comfyui_embeddings.py DIR`` with a ComfyUI checkout on ``sys.path``
(``PYTHONPATH=$DORABOOTH_COMFYUI``). ``DIR/embeddings.json`` lists, per case, its family
("sd15" or "sdxl"), an embeddings folder and a prompt that names a file in it as ComfyUI's users
write it (``embedding:NAME``). ComfyUI's ``SDTokenizer`` / ``SDXLTokenizer`` find the file, load it
(``comfy.sd1_clip.load_embed`` with the encoder's ``embedding_key``: ``clip_l``, ``clip_g``) and put
its vectors in the token list, where its CLIP encoders take them in place of token embeddings.
``DIR/result.json`` receives, per case and encoder, the vectors found in the prompt's tokens and
their positions. tests/test_pivotal.py writes the input and checks the output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def run(case: dict) -> dict:
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if case["family"] == "sdxl":
        tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=case["folder"])
    else:
        tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=case["folder"])
    tokens = tokenizer.tokenize_with_weights(case["prompt"])
    found = {}
    for encoder, batches in tokens.items():                  # "l" (clip_l), "g" (clip_g)
        flat = [t for batch in batches for t, _weight in batch]
        found[encoder] = {"positions": [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)],
                          "vectors": [t.tolist() for t in flat if isinstance(t, torch.Tensor)]}
    return found


def main(folder: str) -> None:
    folder = Path(folder)
    cases = json.loads((folder / "embeddings.json").read_text())
    (folder / "result.json").write_text(json.dumps({name: run(case) for name, case in cases.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
