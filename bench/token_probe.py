"""What an identifier token brings to the toy model before any training (issue 16 #2, "find why").

    python bench/token_probe.py [--tokens sks ohwx zwx brelk ...] [--seeds 8] [--json OUT]

Per token, on the embedded toy model (no adapter):
- ``pieces``: how the toy tokenizer splits it (a known rare token is one piece; a made-up word
  is several byte pieces, none seen in training);
- ``nearest``: the world word whose embedding row is most similar (cosine, text encoder 1 and 2),
  e.g. a rare token whose random row happens to lie near "green";
- ``separation``: how far the instance prompt's conditioning is from the class prompt's,
  ‖c("a T shape") − c("a shape")‖ / ‖c("a shape")‖ over the token's and the noun's positions
  (the text encoders are causal: only those positions and later ones can change), mean over
  the 5 shapes — DreamBooth has to tell the two prompts apart with what the token adds here;
- ``drawn``: what the base model draws for "a T shape" (``--seeds`` images per shape, read by the
  toy reader): share with the named shape, and the commonest object colour — a token that already
  means a colour or breaks the shape gives the subject a head start or a handicap.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENS = ("sks", "ohwx", "zwx", "brelk", "xjy", "qwv", "vkz", "bnq", "pxq")


def probe(tokens, seeds: int = 8) -> dict:
    import torch

    from dorabooth import families as fam
    from dorabooth.generate import Session
    from dorabooth.toyworld import read, world
    from dorabooth.toyworld.tokenizer import WORLD_WORDS

    torch.set_num_threads(1)
    session = Session(None)
    pipe = session.pipe
    family = session.family
    tok = pipe.tokenizer
    words = list(dict.fromkeys(WORLD_WORDS))
    out = {}
    with torch.no_grad():
        tables = [pipe.text_encoder.get_input_embeddings().weight, pipe.text_encoder_2.get_input_embeddings().weight]
        word_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
        for t in tokens:
            ids = tok(t, add_special_tokens=False).input_ids
            row = {"pieces": tok.convert_ids_to_tokens(ids), "norm": [], "nearest": []}
            for table in tables:
                e = table[ids].mean(0)
                cos = torch.nn.functional.cosine_similarity(table[word_ids], e[None], dim=1)
                k = int(cos.argmax())
                row["norm"].append(round(float(e.norm()), 3))
                row["nearest"].append([words[k], round(float(cos[k]), 3)])
            noun, whole, pooled = [], [], []
            for shape in world.SHAPES:
                (inst, cls), (pi, pc) = fam.encode_prompts(family, pipe, [f"a {t} {shape}", f"a {shape}"])
                n_inst = len(tok(f"a {t} {shape}").input_ids) - 1        # index of the noun in the instance prompt
                noun.append(float((inst[n_inst - 1] - cls[2]).norm() / cls[2].norm()))
                whole.append(float((inst - cls).norm() / cls.norm()))   # every position (EOS padding too)
                pooled.append(float((pi - pc).norm() / pc.norm()))
            row["separation"] = {k: round(sum(v) / len(v), 3) for k, v in
                                 (("noun", noun), ("context", whole), ("pooled", pooled))}
            drawn, colours = 0, Counter()
            for shape in world.SHAPES:
                for image in session.generate(f"a {t} {shape}", seeds=list(range(seeds))):
                    r = read(image)
                    drawn += r["shape"] == shape
                    colours[r["colour"] if r["pattern"] is None else "+".join(r["colours"] or ())] += 1
            row["drawn_shape_share"] = round(drawn / (seeds * len(world.SHAPES)), 3)
            row["commonest_colours"] = colours.most_common(3)
            out[t] = row
            print(t, json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", default=list(TOKENS))
    p.add_argument("--seeds", type=int, default=8, help="images per shape and token (default 8)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    data = probe(args.tokens, args.seeds)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
