"""Does the default recipe learn subjects we did not ship, with any identifier token? (issue 16)

    python bench/robustness.py [--quick] [--jobs 2] [--out runs/robustness] [--doc docs/robustness.md]
                               [--subjects N] [--tokens T ...] [--seeds S ...] [--steps N]

1. Subjects: ``SUBJECTS`` two-colour objects, one per (shape, pattern) of the toy world
   (5 shapes × 3 patterns = 15), each with its own colour pair (never one of the three shipped
   sample subjects, ``world.HELD_OUT``). Each subject's photos arrive as a user's would
   (``write_photos``): 5–8 JPEGs of 128–1024 px (some 4:3), the object rendered by the toy
   world's renderer, then moved (±6 %), rotated (±10°), rescaled (0.85–1.1×), with a camera's
   colour cast (gain, offset) and noise, on a plain background that differs per photo.
2. Runs: every subject × token (``TOKENS``: sks, ohwx, zwx and a made-up word the toy tokenizer
   does not know) × training seed, trained with the default recipe exactly as a user types it:
   ``dorabooth train --images DIR --token T --class-noun SHAPE --out RUN --seed S`` plus
   ``--class-images`` so that runs of one class noun share the 40 class images (drawn once per
   noun, before the runs start, by the same base model and sampler a run would use).
3. Score: ``dorabooth eval RUN`` (toy reader, the toy-eval prompt set, image seeds 0…5). A run
   *learns its subject* when subject fidelity ≥ 0.75 and class leak ≤ 0.1. Reported beside: the
   reader's measured shape accuracy on the toy model's own generations (``reader_accuracy``).

Each run trains and evaluates in its own process (``--jobs`` at a time, one torch thread each);
its result is cached in ``OUT/results/<run>.json``, so an interrupted bench resumes and re-runs
only the missing runs. ``--quick``: 4 subjects × 4 tokens × 1 seed, still the default recipe.
``--steps N`` changes the recipe and is printed in the table's title (for experiments only).

Two recipes, paired (``--versus FLAG …``): the bench runs recipe A (the default, plus any
``--train-flag``) into ``--out`` and recipe B (A plus the ``--versus`` flags) into
``--versus-out``, then compares them run by run on the same subject × token × seed cells: the
share learned by each, B − A subject fidelity with a 95 % interval from resampling *subjects*
(runs of one subject are not independent), wins/losses, an exact sign test and McNemar's exact
test on learned/not learned. ``python bench/robustness.py --versus=--method=lora`` is the
DoRA-vs-LoRA comparison of docs/dora-vs-lora.md on this set.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dorabooth.toyworld import world  # after the path: the checkout's package

TOKENS = ("sks", "ohwx", "zwx", "brelk")   # brelk: a made-up word, several byte tokens in the toy tokenizer
SEEDS = (0, 1)
N_SUBJECTS = 12                             # every shape and every pattern; 15 = every (shape, pattern) pair
QUICK = {"subjects": 4, "tokens": TOKENS, "seeds": (0,)}
FIDELITY_BAR = 0.75
EVAL_SEEDS = tuple(range(6))                # image seeds per prompt: 6 × 7 = 42 subject images per run
LEAK_BAR = 0.1
SUBJECT_SEED = 16                           # the number: fixes the colour pairs and the photos


# =============================================================================================
# Subjects and their photos
# =============================================================================================
@dataclass(frozen=True)
class Subject:
    shape: str
    pattern: str
    colour: str
    colour2: str

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.colour2}-{self.shape}-{self.pattern}"

    @property
    def combination(self) -> tuple:
        return (self.shape, self.pattern, self.colour, self.colour2)


def make_subjects(n: int = N_SUBJECTS, seed: int = SUBJECT_SEED) -> list[Subject]:
    """``n`` subjects, the (shape, pattern) pairs in an order that covers every shape and every
    pattern within the first 5, each with a colour pair no other subject uses; never a shipped
    subject's combination."""
    rng = random.Random(seed)
    kinds = [(world.SHAPES[i % 5], world.PATTERNS[(i % 5 + i // 5) % 3]) for i in range(15)]
    pairs = [(a, b) for a in world.COLOURS for b in world.COLOURS if a != b]
    rng.shuffle(pairs)
    if not 1 <= n <= len(kinds):
        raise ValueError(f"{n} subjects: the toy world has {len(kinds)} (shape, pattern) pairs; use 1 to {len(kinds)}")
    out = []
    for shape, pattern in kinds[:n]:
        for k, (a, b) in enumerate(pairs):
            if (shape, pattern, a, b) not in world.HELD_OUT:
                out.append(Subject(shape, pattern, a, b))
                del pairs[k]
                break
    return out


def photo(subject: Subject, background: str, side: int, rng: random.Random):
    """One photo as a user would take it: the toy world's rendering, moved, turned, rescaled,
    with a colour cast and noise, ``side`` px high (4:3 landscape one time in four)."""
    import numpy as np
    from PIL import Image

    scene = world.Scene(subject.shape, subject.colour, background, pattern=subject.pattern,
                        colour2=subject.colour2)
    base = world.render(scene, min(side, 256))
    if base.size[0] != side:
        base = base.resize((side, side), Image.Resampling.BICUBIC)
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.85, 1.1)
    dx, dy = (rng.uniform(-0.06, 0.06) * side for _ in range(2))
    fill = world.COLOURS[background]
    # inverse affine map (output -> input): rotate by `angle`, scale, shift, about the centre
    c, s = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
    cx = cy = side / 2
    a, b, d, e = c, s, -s, c
    coeffs = (a, b, cx - a * (cx + dx) - b * (cy + dy), d, e, cy - d * (cx + dx) - e * (cy + dy))
    img = base.transform((side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC, fillcolor=fill)
    if rng.random() < 0.25:                                  # landscape: more background at the sides
        wide = Image.new("RGB", (side * 4 // 3, side), fill)
        wide.paste(img, (side // 6, 0))
        img = wide
    arr = np.asarray(img, dtype=np.float32)
    gain = np.array([rng.uniform(0.92, 1.05) for _ in range(3)], dtype=np.float32)
    offset = np.array([rng.uniform(-8, 8) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 3, arr.shape).astype(np.float32)
    arr = np.clip(arr * gain + offset + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_photos(subject: Subject, folder: Path, seed: int = SUBJECT_SEED) -> list[Path]:
    """5–8 JPEG photos of ``subject`` in ``folder`` and ``subject.json`` (its combination, which
    ``dorabooth eval``'s toy scorer compares readings with). Deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{subject.name}")
    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = [c for c in world.COLOURS if c not in (subject.colour, subject.colour2)]
    rng.shuffle(backgrounds)
    paths = []
    for k in range(rng.randint(5, 8)):
        side = rng.choice((128, 192, 256, 384, 512, 768, 1024))
        img = photo(subject, backgrounds[k % len(backgrounds)], side, rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(60, 92))
        path = folder / f"IMG_{k + 1:04d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    info = {"name": subject.name, "class_noun": subject.shape,
            "combination": {"shape": subject.shape, "pattern": subject.pattern, "colour": subject.colour,
                            "colour2": subject.colour2},
            "images": [p.name for p in paths], "made_by": "bench/robustness.py"}
    (folder / "subject.json").write_text(json.dumps(info, indent=2) + "\n")
    return paths


# =============================================================================================
# Runs
# =============================================================================================
def run_name(subject: Subject, token: str, seed: int) -> str:
    return f"{subject.name}__{token}__s{seed}"


def train_argv(subject_dir: Path, subject: Subject, token: str, seed: int, run: Path, class_dir: Path,
               extra: list[str]) -> list[str]:
    """What the user types (plus the shared class-image folder and any experiment flags)."""
    return ["train", "--images", str(subject_dir), "--token", token, "--class-noun", subject.shape,
            "--out", str(run), "--seed", str(seed), "--class-images", str(class_dir), "--quiet", *extra]


def child(spec: dict) -> dict:
    """In the child process: train with the command line, then ``dorabooth eval``."""
    import torch

    torch.set_num_threads(1)
    from dorabooth.cli import main as cli
    from dorabooth.evaluate import evaluate_run

    t0 = time.monotonic()
    if spec.get("train_argv"):
        rc = cli(spec["train_argv"])
        if rc:
            raise SystemExit(f"dorabooth {' '.join(spec['train_argv'])} exited {rc}")
    t1 = time.monotonic()
    if not spec.get("eval", True):
        return {"train_s": t1 - t0}
    res = evaluate_run(spec["run"], seeds=spec.get("eval_seeds", (0, 1, 2)), scorer="toy")
    return {"train_s": t1 - t0, "eval_s": time.monotonic() - t1, "metrics": res["metrics"],
            "reader_accuracy": {k: v for k, v in res["reader_accuracy"].items() if k != "per_shape"},
            "scored_as": res["subject"], "per_prompt": [{k: p[k] for k in ("prompt", "kind", "subject")}
                                                      for p in res["per_prompt"]],
            "images": [{k: x[k] for k in ("prompt_index", "seed", "subject", "reading")} for x in res["images"]]}


def in_child(spec: dict, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], cwd=REPO, env=env, check=False,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['run']}: the run failed (exit {proc.returncode}); its log: {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def learned(metrics: dict) -> bool:
    f, leak = metrics.get("subject_fidelity"), metrics.get("class_leak")
    return f is not None and f >= FIDELITY_BAR and (leak or 0.0) <= LEAK_BAR


def do_run(out: Path, subject: Subject, token: str, seed: int, extra: list[str], eval_seeds) -> dict:
    """Train and score one run, or return its cached result."""
    name = run_name(subject, token, seed)
    result_file = out / "results" / f"{name}.json"
    run = out / "runs" / name
    argv = train_argv(out / "subjects" / subject.name, subject, token, seed, run,
                      out / "class-images" / subject.shape, extra)
    train_s = None
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done["argv"][1:] != argv:
            raise SystemExit(f"{result_file}: made by `{' '.join(done['argv'])}`, not by this recipe; give "
                             f"each recipe its own --out")
        if done.get("eval_seeds", [0, 1, 2]) == list(eval_seeds):
            return done
        if (run / "adapter.safetensors").is_file():            # scored with other image seeds: score again only
            train_s = done["train_s"]
    if train_s is None:
        shutil.rmtree(run, ignore_errors=True)                 # an unfinished run: start it again
    spec = {"run": str(run), "train_argv": argv if train_s is None else None, "eval_seeds": list(eval_seeds)}
    res = in_child(spec, out / "logs" / f"{name}.log")
    if train_s is not None:
        res["train_s"] = train_s
    res["eval_seeds"] = list(eval_seeds)
    res.update(name=name, subject=subject.name, shape=subject.shape, pattern=subject.pattern, token=token,
               seed=seed, learned=learned(res["metrics"]), argv=["dorabooth", *argv])
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(res, indent=1))
    for ckpt in (run / "checkpoints",):                        # the final adapter is enough to look again
        shutil.rmtree(ckpt, ignore_errors=True)
    return res


def same_for_every_token(extra: list[str]) -> bool:
    """True when the recipe names the subject with pivotal tokens (the toy model's default since
    2026-12-01, or ``--pivotal N``): they replace the typed token in every prompt, so runs that
    differ only in the token train bit for bit the same thing (pinned by
    tests/test_pivotal.py::test_with_pivotal_tuning_the_typed_token_changes_nothing_trained)."""
    from dorabooth.families import TRAIN_PRESETS

    flags = dict(a.split("=", 1) if "=" in a else (a, None) for a in extra if a.startswith("--"))
    for i, a in enumerate(extra):                       # "--pivotal 2" as two words
        if a.startswith("--") and "=" not in a and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            flags[a] = extra[i + 1]
    if "--model" in flags or flags.get("--method") == "full":
        return False
    n = flags.get("--pivotal")
    return int(n) > 0 if n is not None else bool(TRAIN_PRESETS["toy"].get("pivotal_tokens"))


def same_training(out: Path, first: dict, subject: Subject, token: str, seed: int, extra: list[str]) -> dict:
    """The result of ``token``'s run when it trains exactly what ``first`` (another token's run of
    the same subject and seed) trained: ``first``'s adapter and scores, under its own name and
    command line, marked ``same_training_as``."""
    name = run_name(subject, token, seed)
    argv = train_argv(out / "subjects" / subject.name, subject, token, seed, out / "runs" / name,
                      out / "class-images" / subject.shape, extra)
    res = {**first, "name": name, "token": token, "argv": ["dorabooth", *argv], "same_training_as": first["name"]}
    (out / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))
    return res


def prepare_class_images(out: Path, subject: Subject, extra: list[str]) -> None:
    """Draw the class images of ``subject.shape`` once (a 1-step run with the default recipe's
    class-image settings), so that parallel runs of the noun only read them."""
    folder = out / "class-images" / subject.shape
    if folder.is_dir() and any(folder.glob("*.png")):
        return
    warm = out / "class-images" / f".{subject.shape}-run"
    shutil.rmtree(warm, ignore_errors=True)
    argv = train_argv(out / "subjects" / subject.name, subject, "sks", 0, warm, folder,
                      [*extra, "--steps", "1", "--checkpoint-every", "0"])
    in_child({"run": str(warm), "train_argv": argv, "eval": False}, out / "logs" / f"class-{subject.shape}.log")
    shutil.rmtree(warm, ignore_errors=True)


def bench(out: Path, subjects: list[Subject], tokens, seeds, jobs: int = 2, extra=(), eval_seeds=EVAL_SEEDS,
          log=print, only=()) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra)
    for s in subjects:
        if not (out / "subjects" / s.name / "subject.json").is_file():
            write_photos(s, out / "subjects" / s.name)
    started = time.monotonic()
    first_of_noun = list({s.shape: s for s in reversed(subjects)}.values())
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda s: prepare_class_images(out, s, extra), first_of_noun))
        log(f"[{time.monotonic() - started:6.0f}s] class images ready for {[s.shape for s in first_of_noun]}")
        todo = [(s, t, seed) for seed in seeds for s in subjects for t in tokens
                if not only or any(o in run_name(s, t, seed) for o in only)]
        shared = same_for_every_token(extra)           # then one token's run per subject and seed trains
        trained = {}
        for s, t, seed in todo:
            if not shared or (s.name, seed) not in trained:
                trained[s.name, seed] = pool.submit(do_run, out, s, t, seed, extra, eval_seeds)
        results = []
        for s, t, seed in todo:
            r = trained[s.name, seed].result()
            if r["token"] != t:
                r = same_training(out, r, s, t, seed, extra)
            results.append(r)
            m = r["metrics"]
            how = (f"same training as {r['same_training_as']}" if "same_training_as" in r
                   else f"train {r['train_s']:.0f}s, eval {r['eval_s']:.0f}s")
            log(f"[{time.monotonic() - started:6.0f}s] {r['name']}: fidelity {m['subject_fidelity']:.2f}, "
                f"leak {m['class_leak']:.2f}, {'learned' if r['learned'] else 'NOT learned'} ({how})")
    return results


# =============================================================================================
# The table
# =============================================================================================
def _share(rows) -> str:
    k = sum(r["learned"] for r in rows)
    return f"{k}/{len(rows)} ({100 * k / len(rows):.0f} %)" if rows else "–"


def _median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2) if n else float("nan")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def table(results: list[dict], title: str) -> str:
    """Markdown: the share of runs that learn their subject per token, per subject, and the
    subject × token grid (learned runs / seeds)."""
    tokens = list(dict.fromkeys(r["token"] for r in results))
    subjects = list(dict.fromkeys(r["subject"] for r in results))
    fid = lambda rows: _median(r["metrics"]["subject_fidelity"] for r in rows)
    leak = lambda rows: _mean(r["metrics"]["class_leak"] for r in rows)
    lines = [title, "",
             (f"Learned = subject fidelity ≥ {FIDELITY_BAR} and class leak ≤ {LEAK_BAR}. "
              f"All runs: **{_share(results)}**, median fidelity {fid(results):.2f}, mean class leak "
              f"{leak(results):.3f}."), "",
             "| token | runs learned | median subject fidelity | mean class leak |", "|---|---:|---:|---:|"]
    for t in tokens:
        rows = [r for r in results if r["token"] == t]
        lines.append(f"| `{t}` | {_share(rows)} | {fid(rows):.2f} | {leak(rows):.3f} |")
    lines += ["", ("| subject | runs learned | median subject fidelity | mean class leak "
                   "| reader's shape accuracy on generations |"), "|---|---:|---:|---:|---:|"]
    for s in subjects:
        rows = [r for r in results if r["subject"] == s]
        acc = rows[0].get("reader_accuracy", {})
        acc_cell = f"{acc['subject_shape']} {acc['correct']}/{acc['n']}" if {"correct", "n"} <= set(acc) else "–"
        lines.append(f"| {s} | {_share(rows)} "
                     f"| {fid(rows):.2f} | {leak(rows):.3f} | {acc_cell} |")
    lines += ["", "Subject fidelity per run (subject × token; seeds separated by /, * = learned):", "",
              "| subject | " + " | ".join(f"`{t}`" for t in tokens) + " |", "|---|" + "---:|" * len(tokens)]
    for s in subjects:
        cells = []
        for t in tokens:
            rows = sorted((r for r in results if r["subject"] == s and r["token"] == t), key=lambda r: r["seed"])
            cells.append(" / ".join(f"{r['metrics']['subject_fidelity']:.2f}{'*' if r['learned'] else ''}"
                                    for r in rows) or "–")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of ``k`` successes in ``n`` fair coin flips (sign test, McNemar)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: list[dict], b: list[dict], label_a: str, label_b: str, title: str,
           boot: int = 10_000, seed: int = 0) -> str:
    """Markdown: recipe B against recipe A on the cells both ran (paired by run name)."""
    by_name = {r["name"]: r for r in b}
    pairs = [(r, by_name[r["name"]]) for r in a if r["name"] in by_name]
    if not pairs:
        raise ValueError("the two recipes share no run (subject × token × seed)")
    fa = lambda r: r["metrics"]["subject_fidelity"]
    diffs = [fa(y) - fa(x) for x, y in pairs]
    subjects = list(dict.fromkeys(x["subject"] for x, _ in pairs))
    per_subject = {s: [d for (x, _), d in zip(pairs, diffs) if x["subject"] == s] for s in subjects}
    rng = random.Random(seed)
    means = []
    for _ in range(boot):                                      # resample subjects, keep their runs together
        drawn = [d for _ in subjects for d in per_subject[rng.choice(subjects)]]
        means.append(sum(drawn) / len(drawn))
    means.sort()
    lo, hi = means[int(0.025 * boot)], means[int(0.975 * boot) - 1]
    # The counting tests count trainings, not runs: a result marked same_training_as is a copy of
    # another token's run (pivotal tuning trains the same thing for every token) and no new evidence.
    training = lambda r: r.get("same_training_as") or r["name"]
    distinct: dict[tuple[str, str], tuple[dict, dict]] = {}
    for x, y in pairs:
        distinct.setdefault((training(x), training(y)), (x, y))
    counted = list(distinct.values())
    wins = sum(fa(y) > fa(x) for x, y in counted)
    losses = sum(fa(y) < fa(x) for x, y in counted)
    only_a = sum(x["learned"] and not y["learned"] for x, y in counted)
    only_b = sum(y["learned"] and not x["learned"] for x, y in counted)
    unit = "runs" if len(counted) == len(pairs) else \
        f"of the {len(counted)} distinct trainings (the other runs' results are copies of theirs)"
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    med = lambda rows: _median(fa(r) for r in rows)
    leak = lambda rows: _mean(r["metrics"]["class_leak"] for r in rows)
    train = lambda rows: _median(r["train_s"] for r in rows if r.get("train_s") is not None)
    lines = [title, "",
             f"| | {label_a} | {label_b} |", "|---|---:|---:|",
             f"| runs learned | {_share(xs)} | {_share(ys)} |",
             f"| median subject fidelity | {med(xs):.2f} | {med(ys):.2f} |",
             f"| mean subject fidelity | {_mean(map(fa, xs)):.3f} | {_mean(map(fa, ys)):.3f} |",
             f"| mean class leak | {leak(xs):.3f} | {leak(ys):.3f} |",
             f"| median training time per run | {train(xs):.0f} s | {train(ys):.0f} s |", "",
             (f"Paired over {len(pairs)} runs ({len(subjects)} subjects): {label_b} − {label_a} subject fidelity "
              f"**{_mean(diffs):+.3f}** (95 % interval {lo:+.3f} … {hi:+.3f}, subjects resampled {boot} times); "
              f"{label_b} higher in {wins}, lower in {losses}, equal in {len(counted) - wins - losses} {unit} "
              f"(sign test p = {_binomial_two_sided(wins, wins + losses):.2g}); learned by only {label_a}: "
              f"{only_a}, by only {label_b}: {only_b} (McNemar exact p = "
              f"{_binomial_two_sided(only_a, only_a + only_b):.2g})."), "",
             f"| | {label_a} learned | {label_b} learned | mean fidelity {label_a} → {label_b} |", "|---|---:|---:|---:|"]
    for key, name in (("token", "`{}`"), ("subject", "{}")):
        for v in dict.fromkeys(x[key] for x in xs):
            rx = [x for x in xs if x[key] == v]
            ry = [y for _, y in pairs if y[key] == v]
            lines.append(f"| {name.format(v)} | {_share(rx)} | {_share(ry)} "
                         f"| {_mean(map(fa, rx)):.2f} → {_mean(map(fa, ry)):.2f} |")
    return "\n".join(lines) + "\n"


def machine_note(wall_s: float, jobs: int) -> str:
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "n/a"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, {os.cpu_count()} CPUs, "
            f"{jobs} runs at a time with 1 torch thread each, load average at the end {load}, "
            f"wall time {wall_s / 60:.1f} min")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "robustness")
    p.add_argument("--quick", action="store_true", help="4 subjects × 4 tokens × 1 seed (default recipe)")
    p.add_argument("--subjects", type=int, default=None, help=f"how many subjects (default {N_SUBJECTS})")
    p.add_argument("--tokens", nargs="+", default=None, help=f"default {' '.join(TOKENS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1)")
    p.add_argument("--steps", type=int, default=None, help="NOT the default recipe: for experiments only")
    p.add_argument("--train-flag", dest="train_flags", action="append", default=[], metavar="FLAG",
                   help="an extra `dorabooth train` flag (NOT the default recipe), e.g. --train-flag=--lr=3e-4")
    p.add_argument("--only", nargs="+", default=(), metavar="TEXT",
                   help="only the runs whose name (SUBJECT__TOKEN__sSEED) contains one of these")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--eval-seeds", type=int, default=len(EVAL_SEEDS), metavar="N",
                   help=f"image seeds 0…N-1 per eval prompt (default {len(EVAL_SEEDS)}); finished runs are "
                        f"scored again, not trained again")
    p.add_argument("--doc", type=Path, default=None, help="also write the table to this markdown file")
    p.add_argument("--versus", dest="versus_flags", action="append", default=[], metavar="FLAG",
                   help="also run recipe B = this recipe plus FLAG (repeatable; e.g. --versus=--method=lora) "
                        "and compare the two run by run")
    p.add_argument("--versus-out", type=Path, default=None,
                   help="recipe B's runs (default: OUT-versus-<flags>)")
    args = p.parse_args(argv)
    n = args.subjects or (QUICK["subjects"] if args.quick else N_SUBJECTS)
    tokens = args.tokens or (QUICK["tokens"] if args.quick else TOKENS)
    seeds = args.seeds or (QUICK["seeds"] if args.quick else SEEDS)
    extra = [*(["--steps", str(args.steps)] if args.steps else []), *args.train_flags]
    subjects = make_subjects(n)
    size = f"{n} subjects × {len(tokens)} tokens × {len(seeds)} seed(s)"
    if args.only:                                      # the runs whose name holds one of the texts
        size += f", only the runs named with {' / '.join(args.only)}"

    def run_recipe(out: Path, flags: list[str]) -> tuple[list[dict], str]:
        t0 = time.monotonic()
        results = bench(out, subjects, tokens, seeds, args.jobs, flags, only=args.only,
                        eval_seeds=tuple(range(args.eval_seeds)))
        recipe = "the default recipe" if not flags else f"NOT the default recipe: {' '.join(flags)}"
        title = (f"**{'Quick set' if args.quick else 'Robustness bench'}**: {size}, {recipe}, scored on "
                 f"{args.eval_seeds} image seeds per prompt. {machine_note(time.monotonic() - t0, args.jobs)}.")
        text = table(results, title)
        (out / "table.md").write_text(text)
        return results, text

    results, text = run_recipe(args.out, extra)
    if args.versus_flags:
        flags_b = [*extra, *args.versus_flags]
        slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in "".join(args.versus_flags)).strip("-")
        results_b, text_b = run_recipe(args.versus_out or args.out.with_name(f"{args.out.name}-versus-{slug}"),
                                       flags_b)
        label_a = " ".join(extra) or "default recipe"
        label_b = " ".join(args.versus_flags)                  # what B adds to A
        text = "\n".join([paired(results, results_b, label_a, label_b,
                                  f"**`{label_b}` against `{label_a}`** (B = A plus `{label_b}`), run by run "
                                  f"({size}, {args.eval_seeds} image seeds per prompt)."),
                          f"### {label_a}", "", text, f"### {label_b}", "", text_b])
    if args.doc:
        args.doc.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
