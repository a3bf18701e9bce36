"""Real scale: dorabooth DoRA and LoRA beside diffusers' own DreamBooth LoRA script (issue 11).

    python bench/real_scale.py [--family sdxl|sd15] [--device cpu|cuda] [--resolution 256] [--steps 5]
                               [--rank 16] [--runs NAME …] [--repeats 1] [--diffusers-script PATH]
                               [--out runs/real-scale] [--no-readme]

On a full-size fixture (``dorabooth.testing.fullsize``: published configs, random weights; built
first when missing), each run trains ``--steps`` steps in its own process, one after the other:

- ``diffusers DoRA`` / ``diffusers LoRA``: ``examples/dreambooth/train_dreambooth_lora_sdxl.py``
  (SD 1.5: ``train_dreambooth_lora.py``, which has no ``--use_dora``) run unchanged with its own
  flags (``bench/diffusers_launch.py`` only makes ``import torchvision`` work with a CPU torch);
- ``dorabooth DoRA`` / ``dorabooth LoRA``: ``dorabooth.train(TrainConfig(...))``.

The same settings on both sides (``SETTINGS``): the same folder and images, instance prompt,
resolution, batch 1, rank = alpha, adapters on the UNet's attention projections (to_q, to_k,
to_v, to_out.0) and not on the text encoders (both tools' default; prompt embeddings computed
once), no prior preservation, the VAE encoding every step's image (the diffusers scripts cannot
cache latents, so ``cache_latents=False``), AdamW lr 1e-4 constant, weight decay 1e-2, grad-norm
clip 1, plain MSE loss, gradient checkpointing, seed 0, fp32 (``--mixed-precision``: bf16 on
cuda by default), no validation images, ``HF_HUB_OFFLINE=1``.

Measured from outside, the same way for every run: the time at which each step's progress
marker appears (diffusers' tqdm bar "Steps: …| n/N", dorabooth's "step" event), so a step is
the time between two markers and the first one is excluded (it pays one-off costs); the CPU
time of the process tree at those moments; the peak resident memory of the process tree
(sampled every 10 ms) from its start until the last step's marker (and on cuda the GPU memory
nvidia-smi reports for it). A run is stopped once its last step is reported: what follows is
not training (diffusers then loads a second full pipeline to reload the adapter; dorabooth
writes the adapter and draws a sample image). Runs whose system memory would run out are
stopped before the machine's other processes are hit.

Results: ``OUT/results.json``, the table printed, and the table written into ``bench/README.md``
between the markers for this family, device and resolution. Helpers: ``bench/measure.py``
(watching a run), ``bench/diffusers_examples.py`` (finding diffusers' script and torchvision),
``bench/diffusers_launch.py`` (running it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (after the path: the script runs from anywhere)
from bench.diffusers_examples import find_script, script_written_for, torchvision_path  # noqa: E402
from bench.measure import Measurement, StepClock, measure, step_durations  # noqa: E402,F401  (tests use them here)

SCRIPTS = {"sdxl": "train_dreambooth_lora_sdxl.py", "sd15": "train_dreambooth_lora.py"}
FIXTURES = {"sdxl": "sdxl", "sd15": "sd15"}          # dorabooth.testing.fullsize names
RUNS = ("diffusers DoRA", "dorabooth DoRA", "dorabooth LoRA", "diffusers LoRA")
SUBJECT = "red-white-square"
SETTINGS = dict(prompt="a photo of sks square", class_noun="square", token="sks", lr=1e-4, weight_decay=1e-2,
                max_grad_norm=1.0, seed=0, batch_size=1)
MEMORY_FLOOR_MB = 1024       # a run is stopped when the machine's available memory falls below this
README = REPO / "bench" / "README.md"

DIFFUSERS_STEP = re.compile(r"Steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
DORABOOTH_STEP = re.compile(r"real_scale step (\d+)/(\d+)")


# =============================================================================================
# Settings → command lines
# =============================================================================================
def available_runs(family: str) -> tuple[str, ...]:
    """The runs a family can have: diffusers' SD 1.x script has no DoRA."""
    return tuple(r for r in RUNS if not (family == "sd15" and r == "diffusers DoRA"))


def reference_run(names) -> str:
    """What the ratios divide by: diffusers' DoRA where it ran, else diffusers' LoRA."""
    for name in ("diffusers DoRA", "diffusers LoRA"):
        if name in names:
            return name
    raise ValueError("the ratios need a diffusers run: keep 'diffusers DoRA' or 'diffusers LoRA' in --runs")


def diffusers_args(args, model: Path, images: Path, out: Path, dora: bool) -> list[str]:
    """The diffusers script's own flags for SETTINGS."""
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", SETTINGS["prompt"], "--output_dir", str(out), "--resolution", str(args.resolution),
            "--train_batch_size", str(SETTINGS["batch_size"]), "--max_train_steps", str(args.steps),
            "--rank", str(args.rank), "--learning_rate", str(SETTINGS["lr"]), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--adam_weight_decay", str(SETTINGS["weight_decay"]),
            "--max_grad_norm", str(SETTINGS["max_grad_norm"]), "--mixed_precision", args.mixed_precision,
            "--seed", str(SETTINGS["seed"]), "--checkpointing_steps", str(args.steps + 1)]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.family == "sd15":
        argv.append("--pre_compute_text_embeddings")      # the SDXL script does this by itself
    if dora:
        argv.append("--use_dora")
    return argv


def dorabooth_config(args, model: Path, images: Path, out: Path, method: str) -> dict:
    """TrainConfig fields for SETTINGS."""
    return dict(images=str(images), out=str(out), model=str(model), method=method, rank=args.rank,
                alpha=float(args.rank), targets="attn", train_text_encoders=False, resolution=args.resolution,
                prior_preservation=False, steps=args.steps, lr=SETTINGS["lr"], lr_schedule="constant",
                warmup_steps=0, batch_size=SETTINGS["batch_size"], weight_decay=SETTINGS["weight_decay"],
                max_grad_norm=SETTINGS["max_grad_norm"], min_snr_gamma=0.0, seed=SETTINGS["seed"],
                mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                cache_latents=False, flip=False, token=SETTINGS["token"], class_noun=SETTINGS["class_noun"],
                instance_prompt=SETTINGS["prompt"], checkpoint_every=0, sample_every=0)


def child_env(args, extra_path: Path | None = None) -> dict:
    """A run's environment: offline, unbuffered, the repository (and torchvision's folder) on the path."""
    env = child_env_plain(extra_path)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def child_env_plain(extra_path: Path | None = None) -> dict:
    paths = [str(REPO), str(extra_path) if extra_path else "", os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# =============================================================================================
# Step markers and the table
# =============================================================================================
def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def ratio(value, reference) -> float | None:
    return None if value is None or not reference else value / reference


def summarise(measurements: list[Measurement]) -> dict[str, dict]:
    """Per variant over its repeats: the median of all measured steps, the largest peaks."""
    runs: dict[str, list[Measurement]] = {}
    for m in measurements:
        runs.setdefault(m.name, []).append(m)
    out = {}
    for name, ms in runs.items():
        ok = [m for m in ms if m.ok]
        out[name] = {"step_s": median(s for m in ok for s in m.step_s),
                     "cpu_step_s": median(s for m in ok for s in m.cpu_step_s),
                     "steps_measured": sum(len(m.step_s) for m in ok), "setup_s": median(m.setup_s for m in ok),
                     "errors": [m.error for m in ms if not m.ok]}
        for key in ("peak_rss_mb", "rss_at_start_mb", "peak_training_rss_mb", "peak_gpu_mb"):
            values = [getattr(m, key) for m in ok if getattr(m, key) is not None]
            out[name][key] = max(values) if values else None
    return out


def table(summary: dict[str, dict], reference: str) -> str:
    """The markdown table: one row per variant, ratios against ``reference``."""
    ref = summary.get(reference, {})
    gpu = any(row.get("peak_gpu_mb") is not None for row in summary.values())
    head = (f"| run | s/step (median) | × {reference} | CPU s/step | × {reference} | peak RSS (GB) | × {reference} "
            "| RSS at training start (GB) | peak RSS while training (GB) "
            + ("| peak GPU (GB) | × " + reference + " " if gpu else "") + "| load + prepare (s) |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for name, row in summary.items():
        if row["step_s"] is None:
            lines.append(f"| {name} | failed: {'; '.join(e or '?' for e in row['errors'])[:300]} |"
                         + " |" * (head.count("|") - 3))
            continue
        cells = [_num(row["step_s"], ".2f"), _x(ratio(row["step_s"], ref.get("step_s"))),
                 _num(row["cpu_step_s"], ".2f"), _x(ratio(row["cpu_step_s"], ref.get("cpu_step_s"))),
                 _num(_gb(row["peak_rss_mb"]), ".2f"), _x(ratio(row["peak_rss_mb"], ref.get("peak_rss_mb"))),
                 _num(_gb(row["rss_at_start_mb"]), ".2f"), _num(_gb(row["peak_training_rss_mb"]), ".2f")]
        if gpu:
            cells += [_num(_gb(row["peak_gpu_mb"]), ".2f"), _x(ratio(row["peak_gpu_mb"], ref.get("peak_gpu_mb")))]
        cells.append(_num(row["setup_s"], ".0f"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gb(mb):
    return None if mb is None else mb * 2**20 / 1e9


def _num(x, spec) -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def readme_key(data: dict) -> str:
    """Which README block a result goes to: family, device, resolution (and threads when set)."""
    threads = data.get("threads")
    return f"{data['family']} {data['device']} {data['resolution']}px" + (f" {threads}-thread" if threads else "")


def update_readme(text: str, key: str, block: str) -> str:
    """``text`` with the block between ``<!-- real-scale KEY -->`` and ``<!-- /real-scale KEY -->``
    replaced by ``block`` (appended at the end, markers included, when they are not there)."""
    begin, end = f"<!-- real-scale {key} -->", f"<!-- /real-scale {key} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + begin + "\n" + block.strip() + "\n" + end + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + begin + "\n" + block.strip() + "\n" + end + "\n"


# =============================================================================================
# Preparing: fixture, images, diffusers' script, torchvision
# =============================================================================================
def prepare(family: str, resolution: int, out: Path) -> tuple[Path, Path]:
    """(fixture folder, image folder), made in a child process so that this one never imports
    torch (its memory is not the runs', but it is the machine's)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_prepare", family, str(resolution), str(out)],
                          cwd=REPO, env=child_env_plain(), stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"preparing the {family} fixture and images failed (exit {proc.returncode}; output above)")
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(paths["model"]), Path(paths["images"])


def prepare_child(family: str, resolution: int, out: Path) -> int:
    from dorabooth.testing import fullsize

    name = FIXTURES[family]
    if not fullsize.is_built(name):
        print(f"building the full-size {name} fixture (random weights; minutes) …", file=sys.stderr, flush=True)
        fullsize.build(name, on_progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps({"model": str(fullsize.paths(name)[0]), "images": str(subject_images(out, resolution))}))
    return 0


def subject_images(out: Path, resolution: int) -> Path:
    """The sample subject's photos as ``resolution``-px PNGs in a folder of images only (the
    diffusers scripts open every file in it)."""
    from PIL import Image

    from dorabooth.models import asset_dir

    source = asset_dir("subjects") / SUBJECT
    if not (source / "subject.json").is_file():
        from dorabooth.toyworld.subjects import write_subjects
        source = next(p for p in write_subjects(out / "subjects") if p.name == SUBJECT)
    folder = out / f"images-{resolution}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.png")):
        target = folder / path.name
        if not target.is_file():
            Image.open(path).convert("RGB").resize((resolution, resolution), Image.LANCZOS).save(target)
    return folder


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    mem = None
    if Path("/proc/meminfo").is_file():
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores" + (f", {mem:.0f} GiB RAM" if mem else "")


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "diffusers", "transformers", "peft", "accelerate")}


# =============================================================================================
# The benchmark
# =============================================================================================
def plan(args) -> list[str]:
    """The runs in order: ``--repeats`` rounds, each starting one variant later."""
    names = list(args.runs)
    return [names[(i + r) % len(names)] for r in range(args.repeats) for i in range(len(names))]


def run_variant(args, name: str, model: Path, images: Path, script: Path, pydeps: Path | None, slot: Path) -> Measurement:
    if slot.exists():
        shutil.rmtree(slot)
    slot.mkdir(parents=True)
    tool, method = name.split()
    if tool == "diffusers":
        argv = [sys.executable, str(REPO / "bench" / "diffusers_launch.py"), str(script),
                *diffusers_args(args, model, images, slot / "output", dora=method == "DoRA")]
        env = child_env(args, pydeps)
    else:
        spec = slot / "config.json"
        spec.write_text(json.dumps(dorabooth_config(args, model, images, slot / "run", method.lower()), indent=1))
        argv = [sys.executable, str(Path(__file__).resolve()), "_dorabooth", str(spec)]
        env = child_env(args)
    return measure(name, argv, env, REPO, DIFFUSERS_STEP if tool == "diffusers" else DORABOOTH_STEP, args.steps,
                   slot / "log.txt", gpu=args.device == "cuda", timeout_s=args.timeout_min * 60,
                   memory_floor_mb=MEMORY_FLOOR_MB)


def benchmark(args) -> dict:
    out = args.out / f"{args.family}-{args.device}-{args.resolution}px"
    out.mkdir(parents=True, exist_ok=True)
    model, images = prepare(args.family, args.resolution, args.out)
    model = Path(args.model) if args.model else model
    needs_diffusers = any(r.startswith("diffusers") for r in args.runs)
    script = (find_script(SCRIPTS[args.family], args.diffusers_script, args.diffusers_repo, args.diffusers_tag)
              if needs_diffusers else None)
    pydeps = torchvision_path() if needs_diffusers else None
    print(f"fixture {model}\nimages {images}\ndiffusers script {script}", flush=True)
    measurements = []
    for i, name in enumerate(plan(args)):
        print(f"[{i + 1}/{len(plan(args))}] {name} …", flush=True)
        m = run_variant(args, name, model, images, script, pydeps, out / f"{i:02d}-{name.replace(' ', '-')}")
        measurements.append(m)
        print(f"    {_brief(m)}", flush=True)
    summary = summarise(measurements)
    reference = reference_run(args.runs)
    data = {"family": args.family, "device": args.device, "resolution": args.resolution, "steps": args.steps,
            "rank": args.rank, "mixed_precision": args.mixed_precision, "threads": args.threads,
            "gradient_checkpointing": args.gradient_checkpointing, "reference": reference,
            "machine": machine(), "versions": versions(), "model": str(model),
            "model_note": f"model {model}" if args.model else f"the full-size {args.family} fixture (random weights)",
            "diffusers_script": str(script) if script else None,
            "script_written_for": script_written_for(script) if script else None, "settings": SETTINGS,
            "date": time.strftime("%Y-%m-%d"), "summary": summary,
            "measurements": [asdict(m) for m in measurements]}
    (out / "results.json").write_text(json.dumps(data, indent=1))
    return data


def _brief(m: Measurement) -> str:
    if not m.ok:
        return f"FAILED: {m.error}"
    return (f"setup {m.setup_s:.0f} s, first step {m.first_step_s:.1f} s, steps {[round(s, 1) for s in m.step_s]} s "
            f"(CPU {[round(s, 1) for s in m.cpu_step_s]} s), peak RSS {m.peak_rss_mb / 1024:.2f} GiB"
            + (f", peak GPU {m.peak_gpu_mb / 1024:.2f} GiB" if m.peak_gpu_mb is not None else ""))


def report(data: dict) -> str:
    """The table with what it was measured on, as written to the README."""
    data = {"threads": None, "model_note": f"model {data.get('model')}", **data}
    v, script, threads = data["versions"], data["diffusers_script"], data["threads"]
    command = (f"python bench/real_scale.py --family {data['family']} --device {data['device']} --resolution "
               f"{data['resolution']} --steps {data['steps']}" + (f" --threads {threads}" if threads else ""))
    where = data["machine"] + (f" ({threads} torch thread{'s' * (threads != 1)} per run)" if threads
                               else " (torch's default threads)")
    stack = ", ".join(f"{name} {v[name]}" for name in ("torch", "diffusers", "transformers", "peft", "accelerate"))
    what = (f"On {data['model_note']}, {data['resolution']} px, batch 1, rank {data['rank']}, mixed precision "
            f"{data['mixed_precision']}, gradient checkpointing {'on' if data['gradient_checkpointing'] else 'off'}; "
            f"{data['steps']} steps, the first excluded")
    if script:
        what += f"; diffusers' `{Path(script).name}` written for diffusers {data['script_written_for']}"
    return f"Measured {data['date']} by `{command}`: {where}; {stack}. {what}.\n\n" + table(data["summary"], data["reference"]) + "\n"


def dorabooth_child(spec_file: str) -> int:
    """The dorabooth side, in its own process: train, printing a marker per step."""
    from dorabooth.config import TrainConfig
    from dorabooth.train import train

    config = TrainConfig.from_dict(json.loads(Path(spec_file).read_text()))

    def on_event(event: dict) -> None:
        if event["type"] == "start":
            print(f"real_scale step {event['step']}/{event['total']}", flush=True)
        elif event["type"] == "step":
            print(f"real_scale step {event['step']}/{event['total']} loss {event['loss']}", flush=True)

    train(config, on_event)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(SCRIPTS), default="sdxl")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resolution", type=int, default=256, help="image side in px (default 256; 1024 on a GPU)")
    p.add_argument("--steps", type=int, default=5,
                   help="training steps per run; the first is excluded (default 5: on SDXL the diffusers DoRA run's "
                        "second step still paid warm-up, 2.6× its later steps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (OMP_NUM_THREADS; default: torch's own, all cores). With 1, a run's "
                        "CPU time is its compute time even on a busy machine")
    p.add_argument("--rank", type=int, default=16, help="rank = alpha (default 16)")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: no (fp32) on cpu, bf16 on cuda")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--runs", nargs="+", default=None,
                   help=f"which variants, in this order (default: all the family has: {', '.join(RUNS)})")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all runs, each starting one later (default 1)")
    p.add_argument("--diffusers-script", dest="diffusers_script", default=None,
                   help="path of diffusers' examples/dreambooth script (default: cached copy for the installed version)")
    p.add_argument("--diffusers-repo", dest="diffusers_repo", default=None,
                   help="a git clone or mirror of huggingface/diffusers to take the script from")
    p.add_argument("--diffusers-tag", dest="diffusers_tag", default=None,
                   help="tag to take the script at (default: v<installed diffusers version>)")
    p.add_argument("--model", default=None,
                   help="a diffusers folder of the family instead of the full-size fixture (e.g. assets/toy-sdxl "
                        "for a quick check of the bench itself)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "real-scale")
    p.add_argument("--timeout-min", dest="timeout_min", type=float, default=90.0, help="per run (default 90)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="run nothing: report an earlier run's results.json again (table, README block)")
    p.add_argument("--no-readme", dest="readme", action="store_false", help="do not write the table into bench/README.md")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.model:
        args.model = str(Path(args.model).resolve())
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    allowed = available_runs(args.family)
    args.runs = args.runs or list(allowed)
    unknown = [r for r in args.runs if r not in allowed]
    if unknown:
        p.error(f"--runs {unknown}: choose from {list(allowed)} (quote each: --runs 'dorabooth DoRA' …)")
    if not any(r.startswith("diffusers") for r in args.runs):
        p.error("--runs: keep 'diffusers DoRA' or 'diffusers LoRA': the ratios are against diffusers' script")
    if args.steps < 2:
        p.error("--steps: at least 2 (the first step is excluded)")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: use a multiple of 8")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_dorabooth"]:
        return dorabooth_child(argv[1])
    if argv[:1] == ["_prepare"]:
        return prepare_child(argv[1], int(argv[2]), Path(argv[3]))
    args = parse_args(argv)
    if args.report:                                          # an earlier run's results, reported again
        data = json.loads(Path(args.report).read_text())
        data["summary"] = summarise([Measurement(**m) for m in data["measurements"]])
    else:
        if args.device == "cuda":
            probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"])
            if probe.returncode:
                raise SystemExit("--device cuda: torch sees no CUDA device here")
        data = benchmark(args)
    table_text = report(data)
    print("\n" + table_text)
    if args.readme and all(row["step_s"] is not None for row in data["summary"].values()):
        README.write_text(update_readme(README.read_text(), readme_key(data), table_text))
        print(f"written to {README} ({readme_key(data)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
