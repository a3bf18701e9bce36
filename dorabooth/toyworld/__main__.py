"""Command line of the toy-world recipe.

    python -m dorabooth.toyworld build --out DIR [--minutes N] [--seed S]
    python -m dorabooth.toyworld evaluate --model DIR_OR_BUILD [--n 200]
    python -m dorabooth.toyworld check --model DIR_OR_BUILD --subject SUBJECT_DIR
    python -m dorabooth.toyworld package --build BUILD --dest assets/toy-sdxl
    python -m dorabooth.toyworld subjects --out DIR

`--model` takes a pipeline folder, or a build folder (its last checkpoint's EMA weights).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(model: str, rescale_unseen: bool = True):
    from diffusers import StableDiffusionXLPipeline

    from .recipe import pipeline_from_checkpoint

    if (Path(model) / "model_index.json").exists():
        return StableDiffusionXLPipeline.from_pretrained(model, use_safetensors=True)
    return pipeline_from_checkpoint(model, rescale_unseen)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dorabooth.toyworld")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the toy SDXL from scratch (resumes from --out)")
    b.add_argument("--out", required=True, help="build folder; the model lands in OUT/pipeline")
    b.add_argument("--minutes", type=float, default=120.0, help="wall-clock budget of the build")
    b.add_argument("--joint-minutes", type=float, default=None,
                   help="override the joint stage's total budget (extend a resumed build)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="N steps per stage (smoke test)")
    e = sub.add_parser("evaluate", help="caption-following scores read by the reader")
    e.add_argument("--model", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=1234)
    c = sub.add_parser("check", help="quick DreamBooth-DoRA fine-tune on a sample subject")
    c.add_argument("--model", required=True)
    c.add_argument("--subject", required=True)
    c.add_argument("--steps", type=int, default=400)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--samples", type=int, default=32)
    c.add_argument("--token-lr", type=float, default=None,
                   help="also train the identifier's embedding row at this lr")
    c.add_argument("--no-rescale", action="store_true",
                   help="(build folders) keep unseen tokens' tiny random embeddings")
    c.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("package", help="copy a finished build to DEST, score it, draw samples")
    k.add_argument("--build", required=True)
    k.add_argument("--dest", required=True)
    k.add_argument("--n", type=int, default=200)
    s = sub.add_parser("subjects", help="write the sample subjects")
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    def show(event):
        print(json.dumps(event), flush=True)

    if args.command == "build":
        from .recipe import build

        path = build(args.out, minutes=args.minutes, seed=args.seed, on_event=show,
                     steps=args.steps, joint_minutes=args.joint_minutes)
        print(f"model written to {path}", file=sys.stderr)
    elif args.command == "evaluate":
        from .scoring import evaluate

        show(evaluate(load(args.model), n=args.n, seed=args.seed))
    elif args.command == "check":
        from .dreambooth_check import check

        show(check(load(args.model, not args.no_rescale), args.subject, steps=args.steps,
                   lr=args.lr, n_samples=args.samples, seed=args.seed, token_lr=args.token_lr,
                   on_event=show))
    elif args.command == "package":
        from .card import package

        package(args.build, args.dest, n_eval=args.n, on_event=show)
    elif args.command == "subjects":
        from .subjects import write_subjects

        for d in write_subjects(args.out):
            print(d)


if __name__ == "__main__":
    main()
