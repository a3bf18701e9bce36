"""``dorabooth analyze`` and ``dorabooth eval``: argparse wiring over :mod:`dorabooth.analysis`
and :mod:`dorabooth.evaluate`.

``cli.py`` merges :data:`COMMANDS` into its own; each builder registers a handler that
returns an exit code and raises ``ValueError``/``OSError`` with a message for the user.
"""

from __future__ import annotations

import argparse
import json
import sys

from .conventions import MAGNITUDE_AXES

ANALYZE_EPILOG = """\
For every adapted weight W (out, in) and every saved checkpoint t of each run:
  dM = mean_i |m_t,i - m_0,i|    dD = mean_i (1 - cos(W_t,i, W_0,i))
with i over output rows (--axis out, the default: dorabooth's and PEFT's magnitude axis) or
input columns (--axis in: the DoRA paper's notation). DoRA/LoRA use the merged weights,
full fine-tunes the weights themselves. Train with --checkpoint-every N and a large enough
--keep-checkpoints to get more than a few points per layer.
"""


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="magnitude/direction analysis (DoRA paper Fig. 2) of trained runs",
                       description="Write DIR/analysis.json and DIR/analysis.png: dM against dD per layer "
                                   "and checkpoint, with the fitted slope and Pearson r per run.",
                       epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (dorabooth train --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--axis", choices=MAGNITUDE_AXES, default="out",
                   help="norms per output row (out, default) or per input column (in)")
    p.add_argument("--plot-layers", dest="plot_layers", choices=("query", "all"), default="query",
                   help="plot the query projections as the paper does (default) or every adapted layer")
    p.add_argument("--json", action="store_true", help="print analysis.json instead of the table")
    p.set_defaults(handler=run_analyze)


def run_analyze(args) -> int:
    from .analysis import analyze, summary_table

    data = analyze(args.runs, args.out, axis=args.axis, plot_layers=args.plot_layers)
    print(json.dumps(data) if args.json else summary_table(data))
    if not args.json:
        print(f"wrote {args.out}/analysis.json and {data['plot']}", file=sys.stderr)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="subject and prompt fidelity of trained runs",
                       description="Generate images over a prompt set and several seeds and score subject "
                                   "fidelity and prompt fidelity: by the toy world's reader on the toy model, "
                                   "by DINO / CLIP similarity (local model folders) on real models.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (dorabooth train --out)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt set (.json or .txt; a name looks in prompts/); default: toy-eval.json for the "
                        "toy scorer, dreambooth-objects.txt for embeddings")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S",
                   help="one image per prompt and seed (default 0 1 2)")
    p.add_argument("--scorer", choices=("auto", "toy", "embedding"), default="auto",
                   help="auto: embedding when --clip/--dino are given, toy for toy-model runs")
    p.add_argument("--clip", metavar="DIR", help="local CLIP model folder (CLIP-I, CLIP-T); never downloaded")
    p.add_argument("--dino", metavar="DIR", help="local DINO/DINOv2 model folder (DINO score); never downloaded")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="evaluate checkpoints/step-STEP (default: final)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (family default)")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance (family default)")
    p.add_argument("--out", metavar="FILE.json", help="one JSON for all runs (default: RUN/eval.json each)")
    p.add_argument("--save-images", dest="save_images", metavar="DIR", help="also write the images, per run")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from .evaluate import evaluate, format_table

    results = evaluate(args.runs, out=args.out, save_images=args.save_images, prompts=args.prompts,
                       seeds=args.seeds, scorer=args.scorer, clip=args.clip, dino=args.dino,
                       checkpoint=args.checkpoint, steps=args.steps, guidance=args.guidance)
    print(json.dumps({"runs": results}) if args.json else format_table(results))
    return 0


COMMANDS = {"analyze": add_analyze, "eval": add_eval}
