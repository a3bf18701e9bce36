"""DoRA vs LoRA vs full fine-tuning for DreamBooth on the toy model: the whole experiment.

    python bench/dora_vs_lora.py [--out runs/dora-vs-lora] [--jobs 2] [--lrs 1e-4 3e-4 1e-3 3e-3]
                                 [--seeds 0 1 2] [--subject DIR] [--model DIR] [--steps N]

Methods (docs/dora-vs-lora.md): full fine-tuning of the UNet ("FT"), LoRA rank r, DoRA rank
r, DoRA rank r/2 ("DoRA†", the paper's half-rank setting); r = the trainer's default (8 on
the toy model). Everything else is the trainer's default recipe for the model (steps, prior
preservation with class images, AdamW, constant LR, Min-SNR), identical for all methods.

1. Learning-rate search, the same grid for every method: one run per (method, lr) with the
   first seed, scored by ``dorabooth eval`` on *selection* image seeds; each method keeps the
   lr with the highest subject fidelity + prompt fidelity (ties: the smaller lr).
2. The remaining seeds at each method's chosen lr.
3. Report, per method over the training seeds (mean ± sample std): subject fidelity, prompt
   fidelity and class leak on *report* image seeds (other images than the selection), the
   training wall time, the peak resident memory of the training process (CPU) or peak CUDA
   memory, and the ΔM/ΔD slopes of ``dorabooth analyze`` (with the plot).

Each (method, lr, seed) run trains and evaluates in its own process (``--jobs`` at a time),
so its peak memory is its own. Results are written as they come: ``OUT/results.json``,
``OUT/report.md``, ``OUT/analysis/analysis.{json,png}``; a rerun reuses finished runs.
Nothing here is tuned towards an outcome: the grid, seeds and selection rule are fixed above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dorabooth.testing.memory import PeakRSS  # noqa: E402  (after the path: the checkout's package)

METHODS = {  # name: TrainConfig fields
    "FT": dict(method="full"),
    "LoRA": dict(method="lora"),
    "DoRA": dict(method="dora"),
    "DoRA†": dict(method="dora", half_rank=True),
    # the DoRA family (issue 14), run with --methods: the same recipe, one thing changed
    "DoRA+conv": dict(method="dora", targets="attn+conv"),     # LoCon: the ResNet convolutions too
    "DVoRA": dict(method="dvora"),                             # DoRA on VeRA at its default rank
    "DoRA+pivotal": dict(method="dora", pivotal_tokens=2),     # pivotal tuning: 2 new tokens in the token's place
}
DEFAULT_METHODS = ("FT", "LoRA", "DoRA", "DoRA†")
SELECTION_SEEDS = (100, 101)          # image seeds for the lr choice
REPORT_SEEDS = (0, 1, 2)              # image seeds for the reported numbers


# =============================================================================================
# One run (in a child process): train, measure, evaluate
# =============================================================================================
def job(spec: dict) -> dict:
    """Train ``spec["config"]`` (unless ``spec["train"]`` is false), then evaluate it on each
    image-seed set of ``spec["evals"]``; returns the measurements."""
    import torch

    from dorabooth.config import TrainConfig
    from dorabooth.evaluate import evaluate_run
    from dorabooth.train import TrainingDiverged, train

    torch.set_num_threads(spec["threads"])
    config = TrainConfig.from_dict(spec["config"])
    out = {"evals": {}}
    if spec.get("train", True):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        try:
            with PeakRSS() as rss:
                train(config)
        except TrainingDiverged as e:          # a result for this lr, not a crash of the experiment
            return {**out, "diverged": str(e), "train_s": time.monotonic() - t0}
        seconds = time.monotonic() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak_mb
        out.update(train_s=seconds, peak_mb=peak,
                   memory_kind="cuda max allocated" if cuda else f"process RSS while training ({rss.how})",
                   rss_before_train_mb=0.0 if cuda else rss.start_mb, trainable=_trainable(Path(config.out)))
    for name, seeds in spec["evals"].items():
        res = evaluate_run(config.out, seeds=seeds, scorer="toy")
        out["evals"][name] = {"metrics": res["metrics"], "per_prompt": res["per_prompt"], "skipped": res["skipped"],
                              "seeds": list(seeds)}
    return out


def _trainable(run: Path) -> int | None:
    for line in (run / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "start":
            return event.get("trainable")
    return None


def run_job(spec: dict, folder: Path) -> dict:
    """Run ``job(spec)`` in a child process; finished work is cached in ``folder/result.json``
    (a later call with more ``evals`` only evaluates what is missing)."""
    result_file = folder / "result.json"
    done = json.loads(result_file.read_text()) if result_file.is_file() else None
    if done is not None and done.get("diverged"):
        return done
    if done is not None:
        missing = {k: v for k, v in spec["evals"].items() if k not in done["evals"]}
        if not missing:
            return done
        spec = {**spec, "train": False, "evals": missing}
    elif folder.exists():                                 # an unfinished run: start it again
        import shutil
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec_file = folder.parent / f".{folder.name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, __file__, "_job", str(spec_file)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {folder.name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if done is not None:
        result = {**done, "evals": {**done["evals"], **result["evals"]}}
    result_file.write_text(json.dumps(result, indent=1))
    spec_file.unlink(missing_ok=True)
    return result


# =============================================================================================
# The experiment
# =============================================================================================
def subject_folder(arg: str | None, out: Path) -> Path:
    if arg:
        return Path(arg)
    from dorabooth.models import asset_dir

    shipped = asset_dir("subjects") / "red-white-square"
    if (shipped / "subject.json").is_file():
        return shipped
    from dorabooth.toyworld.subjects import write_subjects       # the same files, written by their generator
    return write_subjects(out / "subjects")[0]


def config_for(args, subject: Path, info: dict, method: str, lr: float, seed: int, out: Path,
               class_dir: Path | None = None, checkpoint_every: int | None = None) -> dict:
    cfg = dict(images=str(subject), class_noun=info["class_noun"], token=info["token"],
               instance_prompt=info["instance_prompt"], class_prompt=info["class_prompt"],
               out=str(out), model=args.model, lr=lr, seed=seed,
               class_images=str(class_dir or args.out / "class-images"),
               checkpoint_every=args.checkpoint_every if checkpoint_every is None else checkpoint_every,
               keep_checkpoints=1000, sample_every=0,
               # attention adapters, the typed token and Min-SNR γ 5, as the study was run (the toy default
               # became all-linear on 2026-12-01, pivotal tuning and plain MSE later that day)
               **{"targets": "attn", "pivotal_tokens": 0, "min_snr_gamma": 5.0, **METHODS[method]})
    if args.steps:
        cfg["steps"] = args.steps
    if args.rank:
        cfg["rank"] = args.rank
    return cfg


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method.replace('†', '-half')}-lr{lr:g}-s{seed}"


def experiment(args) -> dict:
    from dorabooth.config import TrainConfig

    args.out.mkdir(parents=True, exist_ok=True)
    subject = subject_folder(args.subject, args.out)
    info = json.loads((subject / "subject.json").read_text())
    started = time.monotonic()
    prepare_class_images(args, subject, info)
    results: dict[str, dict] = {}
    log = lambda msg: print(f"[{time.monotonic() - started:7.1f}s] {msg}", flush=True)  # noqa: E731

    def submit(pool, method, lr, seed, evals):
        name = run_name(method, lr, seed)
        cfg = config_for(args, subject, info, method, lr, seed, args.out / "runs" / name)
        TrainConfig.from_dict(cfg)                                   # fail early on a bad config
        spec = {"config": cfg, "threads": args.threads, "evals": evals}
        return name, pool.submit(run_job, spec, args.out / "runs" / name)

    first = args.seeds[0]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [submit(pool, m, lr, first, {"selection": list(SELECTION_SEEDS)}) for m in args.methods for lr in args.lrs]
        for name, f in futures:
            results[name] = f.result()
            r = results[name]
            log(f"{name}: train {r['train_s']:.0f}s, " + (f"DIVERGED: {r['diverged'][:80]}" if r.get("diverged") else
                f"selection {_fmt_metrics(r['evals']['selection']['metrics'])}"))
        chosen = {m: choose_lr([(lr, results[run_name(m, lr, first)]) for lr in args.lrs]) for m in args.methods}
        log(f"chosen learning rates: {chosen}")
        futures = [submit(pool, m, chosen[m], s, {"report": list(REPORT_SEEDS)}) for m in args.methods for s in args.seeds]
        for name, f in futures:                        # the first seed's chosen run is only evaluated again
            r = results[name] = f.result()
            log(f"{name}: train {r['train_s']:.0f}s, " + (f"DIVERGED: {r['diverged'][:80]}" if r.get("diverged") else
                f"report {_fmt_metrics(r['evals']['report']['metrics'])}"))

    report_runs = {m: [run_name(m, chosen[m], s) for s in args.seeds] for m in args.methods}
    from dorabooth.analysis import analyze

    finished = [n for m in args.methods for n in report_runs[m] if not results[n].get("diverged")]
    analysis = analyze([args.out / "runs" / n for n in finished], args.out / "analysis")
    slopes = {r["run"]: r["fit"] for r in analysis["runs"]}
    data = {"subject": info, "subject_folder": str(subject), "model": args.model or "toy", "lrs": args.lrs,
            "seeds": args.seeds, "selection_image_seeds": list(SELECTION_SEEDS),
            "report_image_seeds": list(REPORT_SEEDS), "chosen_lr": chosen, "runs": results,
            "report_runs": report_runs, "summary": summarise(args, report_runs, results, slopes),
            "analysis": str(args.out / "analysis" / "analysis.json"), "wall_s": time.monotonic() - started,
            "threads_per_run": args.threads, "jobs": args.jobs, "resolved": _resolved(args.out / "runs")}
    (args.out / "results.json").write_text(json.dumps(data, indent=1))
    (args.out / "report.md").write_text(report(data))
    log(f"done: {args.out / 'report.md'}")
    return data


def replicate(args, data: dict) -> dict:
    """Every method at the lr the search chose, on each other sample subject, with the same
    training seeds; quality only (no checkpoints, no ΔM/ΔD). Written to
    ``OUT/replication.{json,md}``; finished runs are reused."""
    from dorabooth.evaluate import mean_std

    started = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - started:7.1f}s] replicate: {msg}", flush=True)  # noqa: E731
    from dorabooth.models import asset_dir

    shipped = sorted(p for p in asset_dir("subjects").iterdir() if (p / "subject.json").is_file())
    subjects = [p for p in shipped if p.name != data["subject"]["name"]]
    chosen, per_subject = data["chosen_lr"], {}
    per_subject[data["subject"]["name"]] = {m: [data["runs"][n]["evals"]["report"]["metrics"]
                                                for n in data["report_runs"][m] if not data["runs"][n].get("diverged")]
                                            for m in args.methods}
    for subject in subjects:
        info = json.loads((subject / "subject.json").read_text())
        root = args.out / "replicate" / subject.name
        prepare_class_images(args, subject, info, root / "class-images")
        runs: dict[str, list] = {m: [] for m in args.methods}
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = []
            for m in args.methods:
                for seed in args.seeds:
                    name = run_name(m, chosen[m], seed)
                    cfg = config_for(args, subject, info, m, chosen[m], seed, root / "runs" / name,
                                     class_dir=root / "class-images", checkpoint_every=0)
                    spec = {"config": cfg, "threads": args.threads, "evals": {"report": list(REPORT_SEEDS)}}
                    futures.append((m, name, pool.submit(run_job, spec, root / "runs" / name)))
            for m, name, f in futures:
                r = f.result()
                log(f"{subject.name}/{name}: " + (f"DIVERGED: {r['diverged'][:80]}" if r.get("diverged") else
                    f"train {r['train_s']:.0f}s, report {_fmt_metrics(r['evals']['report']['metrics'])}"))
                if not r.get("diverged"):
                    runs[m].append(r["evals"]["report"]["metrics"])
        per_subject[subject.name] = runs
    table = {}
    for m in args.methods:
        row = {}
        for key in ("subject_fidelity", "prompt_fidelity", "class_leak"):
            row[key] = {name: mean_std([r[key] for r in runs[m]]) for name, runs in per_subject.items()}
            row[key]["all"] = mean_std([r[key] for runs in per_subject.values() for r in runs[m]])
            row[key]["subject_means"] = mean_std([v[0] for name, v in row[key].items()
                                                  if name in per_subject and v[0] is not None])
        row["runs"] = sum(len(runs[m]) for runs in per_subject.values())
        table[m] = row
    out = {"chosen_lr": chosen, "seeds": args.seeds, "subjects": list(per_subject), "table": table,
           "wall_s": time.monotonic() - started}
    (args.out / "replication.json").write_text(json.dumps(out, indent=1))
    (args.out / "replication.md").write_text(replication_report(out))
    log(f"done: {args.out / 'replication.md'}")
    return out


def replication_report(rep: dict) -> str:
    subjects = rep["subjects"]
    lines = [f"Every method at its chosen lr {rep['chosen_lr']} on {len(subjects)} subjects, training seeds "
             f"{rep['seeds']}; mean ± std over the seeds per subject, then over all runs and over the "
             f"subjects' means. Replication wall time: {rep['wall_s'] / 60:.1f} min.", ""]
    for key in ("subject_fidelity", "prompt_fidelity", "class_leak"):
        lines += [f"{key.replace('_', ' ')}:", "",
                  "| method | " + " | ".join(subjects) + " | all runs | mean of subjects |",
                  "|---|" + "---:|" * (len(subjects) + 2)]
        for m, row in rep["table"].items():
            cells = [_pm(row[key][s]) for s in subjects] + [_pm(row[key]["all"]), _pm(row[key]["subject_means"])]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def prepare_class_images(args, subject: Path, info: dict, folder: Path | None = None) -> None:
    """Draw the shared class images once, before runs start in parallel (a 1-step LoRA run)."""
    from dorabooth.config import TrainConfig
    from dorabooth.train import train

    folder = folder or args.out / "class-images"
    if folder.is_dir() and any(folder.glob("*.png")):
        return
    warm = folder.parent / f"{folder.name}-run"
    import shutil
    shutil.rmtree(warm, ignore_errors=True)
    cfg = config_for(args, subject, info, "LoRA", args.lrs[0], 0, warm, class_dir=folder)
    cfg.update(steps=1, checkpoint_every=0)
    train(TrainConfig.from_dict(cfg))
    shutil.rmtree(warm, ignore_errors=True)


def _resolved(runs: Path) -> dict:
    """The trainer's resolved recipe of one run (steps, rank, class images, …) for the report."""
    for cfg in sorted(runs.glob("LoRA-*/config.json")):
        c = json.loads(cfg.read_text())["config"]
        return {k: c[k] for k in ("steps", "rank", "alpha", "resolution", "num_class_images", "prior_preservation",
                                  "batch_size", "lr_schedule", "optimizer", "weight_decay", "min_snr_gamma",
                                  "targets", "magnitude_axis", "checkpoint_every") if k in c}
    return {}


def choose_lr(candidates: list[tuple[float, dict]]) -> float:
    """The lr with the highest selection subject + prompt fidelity; ties go to the smaller lr."""
    def score(item):
        lr, res = item
        if res.get("diverged"):
            return (-1.0, -lr)
        m = res["evals"]["selection"]["metrics"]
        return ((m["subject_fidelity"] or 0.0) + (m["prompt_fidelity"] or 0.0), -lr)
    return max(candidates, key=score)[0]


def summarise(args, report_runs: dict, results: dict, slopes: dict) -> dict:
    from dorabooth.evaluate import mean_std

    out = {}
    for method, names in report_runs.items():
        diverged = [n for n in names if results[n].get("diverged")]
        names = [n for n in names if n not in diverged]
        rs = [results[n] for n in names]
        fits = [slopes[str(args.out / "runs" / n)] for n in names]
        row = {"runs": len(names), "diverged": diverged}
        if not rs:
            out[method] = row
            continue
        for key in ("subject_fidelity", "prompt_fidelity", "class_leak"):
            row[key] = mean_std([r["evals"]["report"]["metrics"][key] for r in rs])
        row["train_s"] = mean_std([r["train_s"] for r in rs])
        row["peak_mb"] = mean_std([r["peak_mb"] for r in rs])
        row["peak_increase_mb"] = mean_std([r["peak_mb"] - r["rss_before_train_mb"] for r in rs])
        row["trainable"] = rs[0]["trainable"]
        for key in ("all", "query", "query_within_step", "unet", "unet_within_step"):
            row[f"slope_{key}"] = mean_std([f[key]["slope"] for f in fits])
            row[f"pearson_{key}"] = mean_std([f[key]["pearson"] for f in fits])
        out[method] = row
    return out


def _f2(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))


def _pm(ms, spec=".3f") -> str:
    mean, std = ms
    return "n/a" if mean is None else f"{mean:{spec}} ± {std:{spec}}"


def report(data: dict) -> str:
    """The tables of docs/dora-vs-lora.md, from results.json."""
    s = data["summary"]
    lines = [f"Subject: {data['subject']['name']} (\"{data['subject']['instance_prompt']}\"), model: {data['model']}, "
             f"training seeds {data['seeds']}, lr grid {data['lrs']}, chosen lr {data['chosen_lr']}, "
             f"recipe {data['resolved']}. Wall time of the whole experiment: {data['wall_s'] / 60:.1f} min "
             f"({data['jobs']} runs at a time, {data['threads_per_run']} thread each).", "",
             "| method | trainable params | subject fidelity | prompt fidelity | class leak | train time (s) "
             "| peak memory (MB) | of which training (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, row in s.items():
        if not row["runs"]:
            lines.append(f"| {m} | all runs diverged: {', '.join(row['diverged'])} |" + " |" * 6)
            continue
        name = f"{m} ({row['runs']} runs; diverged: {', '.join(row['diverged'])})" if row["diverged"] else m
        lines.append(f"| {name} | {row['trainable']:,} | {_pm(row['subject_fidelity'])} | {_pm(row['prompt_fidelity'])} "
                     f"| {_pm(row['class_leak'])} | {_pm(row['train_s'], '.0f')} | {_pm(row['peak_mb'], '.0f')} "
                     f"| {_pm(row['peak_increase_mb'], '.0f')} |")
    lines += ["", "ΔM/ΔD fits (axis 'out', per output row; mean ± std over seeds):", "",
              "| method | slope (all layers) | r (all) | slope (query) | r (query) | slope (query, within step) "
              "| r (query, within step) | slope (UNet) | slope (UNet, within step) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, row in s.items():
        if not row["runs"]:
            continue
        lines.append(f"| {m} | {_pm(row['slope_all'], '.3g')} | {_pm(row['pearson_all'], '.2f')} "
                     f"| {_pm(row['slope_query'], '.3g')} | {_pm(row['pearson_query'], '.2f')} "
                     f"| {_pm(row['slope_query_within_step'], '.3g')} | {_pm(row['pearson_query_within_step'], '.2f')} "
                     f"| {_pm(row['slope_unet'], '.3g')} | {_pm(row['slope_unet_within_step'], '.3g')} |")
    lines += ["", "Learning-rate search (first seed; selection image seeds "
              f"{data['selection_image_seeds']}; subject / prompt fidelity):", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in data["lrs"]) + " |",
              "|---|" + "---:|" * len(data["lrs"])]
    for m in data["report_runs"]:
        cells = []
        for lr in data["lrs"]:
            res = data["runs"][run_name(m, lr, data["seeds"][0])]
            mark = " ←" if lr == data["chosen_lr"][m] else ""
            if res.get("diverged"):
                cells.append(f"diverged{mark}")
                continue
            met = res["evals"]["selection"]["metrics"]
            cells.append(f"{_f2(met['subject_fidelity'])} / {_f2(met['prompt_fidelity'])}{mark}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_job"]:                                    # the child process of run_job
        spec = json.loads(Path(argv[1]).read_text())
        print(json.dumps(job(spec)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "dora-vs-lora")
    p.add_argument("--model", default=None, help="base model (default: the embedded toy model)")
    p.add_argument("--subject", default=None, help="subject folder with subject.json (default: red-white-square)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3],
                   help="the lr grid, the same for every method (default 1e-4 3e-4 1e-3 3e-3: half-decade "
                        "steps across the full fine-tuning and adapter regimes; each value costs 4 runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
                   help=f"which methods (default {' '.join(DEFAULT_METHODS)}; also {' '.join(m for m in METHODS if m not in DEFAULT_METHODS)}); "
                        "finished runs in --out are reused, so a later call can add methods")
    p.add_argument("--steps", type=int, default=None, help="default: the trainer's default for the model")
    p.add_argument("--rank", type=int, default=None, help="r (default: the trainer's default); DoRA† uses r/2")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=50,
                   help="checkpoint cadence: the points of the ΔM/ΔD analysis (default 50)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--replicate", action="store_true",
                   help="then train every method at its chosen lr on the other sample subjects too (same seeds, "
                        "no lr search, no checkpoints; ≈ 7 min per subject here) and report them with the first")
    args = p.parse_args(argv)
    data = experiment(args)
    print(report(data))
    if args.replicate:
        print(replication_report(replicate(args, data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
