"""Pivotal tuning on the toy model: subject fidelity with and without ``--pivotal`` at equal steps.

    python bench/pivotal.py [--out runs/pivotal] [--seeds 0 1 2] [--subjects red-white-square ...]
                            [--tokens 2] [--lr 1e-3] [--jobs 1] [--threads 2]

Variants, everything else the trainer's default toy recipe (600 steps, DoRA rank 8, text
encoders with adapters, prior preservation), DoRA at the lr the DoRA-vs-LoRA search chose (1e-3):
``none`` (the rare token), ``class`` (``--pivotal 2 --pivotal-init class``) and ``random``
(``--pivotal 2 --pivotal-init random``); the pivotal rows learn at --text-encoder-lr = lr. Each
run trains and is scored in its own process by ``dorabooth eval``'s toy reader on the report
image seeds {0, 1, 2} (bench/dora_vs_lora.py's ``run_job``); results go to ``OUT/results.json``
and ``OUT/report.md``; a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import dora_vs_lora as dvl

VARIANTS = {"none": {"pivotal_tokens": 0}, "class": {"pivotal_tokens": 2, "pivotal_init": "class"},
            "random": {"pivotal_tokens": 2, "pivotal_init": "random"}}


def run_variant(args, subject: Path, info: dict, variant: str, seed: int) -> dict:
    name = f"{subject.name}-{variant}-s{seed}"
    cfg = dvl.config_for(args, subject, info, "DoRA", args.lr, seed, args.out / "runs" / name,
                         class_dir=args.out / f"class-{subject.name}", checkpoint_every=0)
    cfg.update(VARIANTS[variant])
    if "pivotal_tokens" in cfg:
        cfg["pivotal_tokens"] = args.tokens
    spec = {"config": cfg, "threads": args.threads, "evals": {"report": list(dvl.REPORT_SEEDS)}}
    return dvl.run_job(spec, args.out / "runs" / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "pivotal")
    p.add_argument("--model", default=None)
    p.add_argument("--subjects", nargs="+", default=["red-white-square"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.rank, args.checkpoint_every, args.lrs = None, 0, [args.lr]
    from dorabooth.models import asset_dir

    started = time.monotonic()
    results: dict = {}
    for subject_name in args.subjects:
        subject = asset_dir("subjects") / subject_name
        info = json.loads((subject / "subject.json").read_text())
        dvl.prepare_class_images(args, subject, info, args.out / f"class-{subject_name}")
        for seed in args.seeds:
            for variant in args.variants:
                r = run_variant(args, subject, info, variant, seed)
                m = r["evals"]["report"]["metrics"]
                results.setdefault(subject_name, {}).setdefault(variant, []).append(
                    {"seed": seed, "train_s": r.get("train_s"), **m})
                print(f"[{time.monotonic() - started:6.0f}s] {subject_name} {variant} seed {seed}: "
                      f"subject {m['subject_fidelity']} prompt {m['prompt_fidelity']} leak {m['class_leak']} "
                      f"({r.get('train_s', 0):.0f}s)", flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    header = ("| subject | variant | subject fidelity (per seed) | median | prompt fidelity (median) | class leak "
              "(median) | train s (median) |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|"]
    for subject_name, by_variant in results.items():
        for variant, rows in by_variant.items():
            sf = [r["subject_fidelity"] for r in rows]
            lines.append(f"| {subject_name} | {variant} | {', '.join(f'{x:.3f}' for x in sf)} | "
                         f"{statistics.median(sf):.3f} | {statistics.median(r['prompt_fidelity'] for r in rows):.3f} | "
                         f"{statistics.median(r['class_leak'] for r in rows):.3f} | "
                         f"{statistics.median(r['train_s'] or 0 for r in rows):.0f} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
