"""`python -m dorabooth.toyworld build --out DIR [--minutes N] [--seed S]`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dorabooth.toyworld")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the toy SDXL from scratch (resumes from --out)")
    b.add_argument("--out", required=True, help="build folder; the model lands in OUT/pipeline")
    b.add_argument("--minutes", type=float, default=120.0, help="wall-clock budget of the build")
    b.add_argument("--joint-minutes", type=float, default=None,
                   help="override the joint stage's total budget (extend a resumed build)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="N steps per stage (smoke test)")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from .recipe import build

    torch.set_num_threads(args.threads)

    def show(event):
        print(json.dumps(event), flush=True)

    path = build(args.out, minutes=args.minutes, seed=args.seed, on_event=show,
                 steps=args.steps, joint_minutes=args.joint_minutes)
    print(f"model written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
