"""One big run on many GPUs (issue 15): a full fine-tune of a full-size UNet under DDP, the two
shipped FSDP configs and the two DeepSpeed ZeRO configs, then a resume of the sharded run on half
the processes.

    python bench/sharded_full.py --gpus 8 [--family sdxl|sd15] [--model DIR] [--steps 6]
                                 [--resolution 1024] [--out runs/sharded-full]
    python bench/sharded_full.py --device cpu --gpus 2 --model TINY_DIR --resolution 32 --steps 2   # smoke

NOT RUN YET: no GPU was lent to this project when it was written (the trainer's FSDP and
DeepSpeed paths are tested on CPU processes over gloo, ``tests/test_sharding.py``). For each config
in ``configs/accelerate/`` (``ddp.yaml``, ``fsdp-full-shard.yaml``, ``fsdp-shard-grad-op.yaml``,
``deepspeed-zero2.yaml``, ``deepspeed-zero3.yaml``, with ``num_processes`` set to ``--gpus``) it
runs ``accelerate launch -m dorabooth train --method full --no-train-text-encoders --optimizer
adamw`` for ``--steps`` steps on the full-size fixture
(``dorabooth.testing.fullsize``: published configs, random weights; or ``--model``), with a
checkpoint half way, and measures from outside (``bench/measure.py``) the seconds per step
and the peak GPU memory of all processes together (nvidia-smi), printed per process. A run
that does not fit is reported as such (DDP of an SDXL UNet in fp32 with AdamW needs ~41 GB of
weights, gradients and moments per GPU before activations). Then the FSDP full-shard run's
checkpoint is resumed on ``--gpus // 2`` processes to its end: the ``resume`` event must say
``processes_before`` = ``--gpus``. Results: ``OUT/results.json`` and the table printed (paste
it into ``bench/README.md`` and ``docs/scaling.md``).

``--device cpu`` runs the same script on CPU processes (gloo; FSDP2 through
``DORABOOTH_FSDP_ON_CPU=1``, DeepSpeed through its CPU accelerator, no GPU memory measured) with a small ``--model``: the smoke test
``tests/test_bench_sharded.py`` runs it that way, so the script itself is known to work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import measure  # noqa: E402
from bench.real_scale import prepare, subject_images  # noqa: E402

CONFIGS = ["ddp", "fsdp-full-shard", "fsdp-shard-grad-op", "deepspeed-zero2", "deepspeed-zero3"]
STEP = re.compile(r'"type": "step", "time": [0-9.]+, "step": (\d+), "total": (\d+)')


def config_file(name: str, processes: int, out: Path, device: str = "cuda") -> Path:
    """The shipped config with ``num_processes`` = ``processes`` (on ``cpu``: CPU processes, fp32)."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())
    data["num_processes"] = processes
    if device == "cpu" and name.startswith("deepspeed"):          # DeepSpeed joins CPU processes itself
        data.update(mixed_precision="no")
    elif device == "cpu":
        data.update(use_cpu=True, mixed_precision="no", distributed_type="MULTI_CPU" if name == "ddp" else "FSDP")
        data.pop("gpu_ids", None)
    path = out / f"{name}-{processes}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train_argv(config: Path, model: Path, images: Path, run: Path, steps: int, resolution: int, *extra: str) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "dorabooth",
            "train", "--images", str(images), "--class-noun", "toy", "--out", str(run), "--model", str(model),
            "--method", "full", "--no-train-text-encoders", "--no-prior-preservation", "--resolution",
            str(resolution), "--steps", str(steps), "--checkpoint-every", str(max(1, steps // 2)), "--lr", "1e-5",
            "--sample-every", "0", "--optimizer", "adamw", "--json", *extra]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs of this machine to use (at least 2)")
    p.add_argument("--family", choices=["sdxl", "sd15"], default="sdxl")
    p.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: the full-size fixture)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "sharded-full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run on CPU processes (needs a small --model)")
    args = p.parse_args(argv)
    if args.gpus < 2:
        p.error("--gpus: sharding needs at least 2 processes")
    if args.device == "cpu" and args.model is None:
        p.error("--device cpu: give a small --model (a full-size UNet does not train on CPUs in reasonable time)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        model, images = args.model, subject_images(args.out, args.resolution)
    else:
        fixture, images = prepare(args.family, args.resolution, args.out)
        model = args.model or fixture
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **({"DORABOOTH_FSDP_ON_CPU": "1"} if args.device == "cpu" else {})}
    rows = []
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if not have_deepspeed:
        print("deepspeed is not installed: the DeepSpeed configs are left out (pip install deepspeed)", flush=True)
    for name in [c for c in CONFIGS if have_deepspeed or not c.startswith("deepspeed")]:
        run = args.out / f"run-{name}"
        argv_ = train_argv(config_file(name, args.gpus, args.out, args.device), model, images, run, args.steps,
                           args.resolution)
        m = measure(name, argv_, env, REPO, STEP, args.steps, args.out / f"{name}.log", gpu=args.device == "cuda",
                    timeout_s=3600)
        rows.append({"config": name, "processes": args.gpus, "ok": m.ok, "error": m.error,
                     "median_step_s": statistics.median(m.step_s) if m.step_s else None,
                     "peak_gpu_mb_total": m.peak_gpu_mb,
                     "peak_gpu_mb_per_process": m.peak_gpu_mb / args.gpus if m.peak_gpu_mb else None})
        print(json.dumps(rows[-1]), flush=True)
    resumed = resume_with_fewer(args, model, images, env)
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "resume": resumed}, indent=2))
    print("\n| config | processes | s/step (median) | peak GPU memory per process |\n|---|---:|---:|---:|")
    for r in rows:
        step = f"{r['median_step_s']:.2f}" if r["median_step_s"] else "—"
        mem = f"{r['peak_gpu_mb_per_process'] / 1024:.1f} GiB" if r["peak_gpu_mb_per_process"] else "—"
        print(f"| {r['config']} | {r['processes']} | {step} | {mem}{'' if r['ok'] else ' (failed: see log)'} |")
    print(f"\nresume of fsdp-full-shard on {args.gpus // 2} processes: {resumed}")
    return 0 if all(r["ok"] for r in rows if r["config"] != "ddp") and resumed.get("ok") else 1


def resume_with_fewer(args, model: Path, images: Path, env: dict) -> dict:
    """The FSDP full-shard run (stopped after its last step, so its last checkpoint is half way)
    resumed on half the processes to its end."""
    run = args.out / "run-fsdp-full-shard"
    half = max(1, args.gpus // 2)
    argv_ = train_argv(config_file("fsdp-full-shard", half, args.out, args.device), model, images, run, args.steps,
                       args.resolution, "--resume")
    proc = subprocess.run(argv_, cwd=REPO, env=env, capture_output=True, text=True)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    resume = next((e for e in events if e.get("type") == "resume"), {})
    ok = (proc.returncode == 0 and resume.get("processes_before") == args.gpus
          and resume.get("processes") == half and events and events[-1].get("type") == "done")
    return {"ok": ok, "returncode": proc.returncode, "resume": resume,
            "error": None if ok else proc.stderr[-2000:]}


if __name__ == "__main__":
    raise SystemExit(main())
