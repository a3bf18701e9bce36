"""Host memory from process start to the first training step (issue 11, "Memory at load").

    python bench/load_memory.py --model DIR_OR_FILE [--model-config DIR] [--mixed-precision no|fp16|bf16]
                                [--resolution 256] [--until step|start] [--method dora|lora|full]
                                [--rank 16] [--json OUT]

Starts ``dorabooth train`` (gradient checkpointing on, no prior preservation, one step) in a
child process and samples that process's resident set size every 5 ms from its start
(``/proc/<pid>/statm``: anonymous and file-backed pages, so a memory-mapped weight file
counts), noting the peak so far at each event: ``prepared`` (weights loaded, images
prepared), ``start`` (adapters attached, embeddings and latents cached: right before the
first step) and ``step`` (the first step done). The child is stopped there (``--until``;
``start`` measures everything but the step, for precisions this CPU only emulates, bf16).

Prints the peaks, the bytes of every weight of the model (UNet, VAE, text encoders) in the
run's weight dtype (fp32 for ``--mixed-precision no``, else bf16/fp16), and the ratio of the
peak to those bytes against the bar of 1.25. Full-size fixtures: run under the shared lock
(``flock /tmp/fullsize.lock python bench/load_memory.py …``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BAR = 1.25
SUBJECT = REPO / "assets" / "subjects" / "red-white-square"
EVENTS = ("prepared", "start", "step")
ITEMSIZE = {"no": 4, "fp16": 2, "bf16": 2}


def child(spec: dict, code: str | None = None) -> None:
    """Train one step as ``spec`` says, printing each event's type on stdout as it comes.
    ``code``: another dorabooth checkout to import (a before/after comparison)."""
    if code:
        sys.path.insert(0, code)
    from dorabooth.config import TrainConfig
    from dorabooth.train import train

    def on_event(event):
        print(json.dumps({"type": event["type"], "message": event.get("message")}), flush=True)

    train(TrainConfig(**spec), on_event)


def subject_images(folder: Path, size: int) -> Path:
    """The shipped sample subject (64 px) scaled up to ``size`` px: what the trainer needs."""
    from PIL import Image

    folder.mkdir(parents=True)
    for path in sorted(SUBJECT.glob("*.png")):
        Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(folder / path.name)
    return folder


def weight_bytes(model: str, model_config: str | None, itemsize: int) -> tuple[int, dict[str, int]]:
    """(bytes of every weight of the model's UNet, VAE and text encoders at ``itemsize`` bytes
    each, parameter count per component), from the configs alone (nothing is loaded)."""
    from dorabooth.models import open_pipeline

    pipe, _, weights = open_pipeline(model, single_file_config=model_config)
    counts = {c: sum(t.numel() for t in getattr(pipe, c).state_dict().values() if t.is_floating_point())
              for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
    if weights is not None:
        weights.close()
    return sum(counts.values()) * itemsize, counts


def measure(args) -> dict:
    from dorabooth.testing.memory import PeakRSS

    run = Path(tempfile.mkdtemp(prefix="load-memory-")) / "run"
    images = subject_images(run.parent / "images", args.resolution)
    spec = dict(images=str(images), class_noun="square", out=str(run), model=args.model,
                model_config=args.model_config, method=args.method, rank=args.rank,
                resolution=args.resolution, steps=args.steps, mixed_precision=args.mixed_precision,
                gradient_checkpointing=True, prior_preservation=False, sample_every=0, checkpoint_every=0,
                seed=0)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(run.parent / "stderr.log", "w+")         # a file, not a pipe: a full pipe would stall the child
    t0 = time.monotonic()
    try:
        command = [sys.executable, __file__, "--child", json.dumps(spec)] + (["--code", args.code] if args.code else [])
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        seen: dict[str, float] = {}
        done = threading.Event()
        with PeakRSS(pid=proc.pid) as rss:
            def read_events():
                for line in proc.stdout:
                    try:
                        event = json.loads(line)
                        kind = event["type"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if kind == "error":
                        seen["error: " + str(event.get("message"))] = time.monotonic() - t0
                    if kind in EVENTS and kind not in seen:
                        rss.mark(kind)
                        seen[kind] = time.monotonic() - t0
                    if kind == args.until or kind == "error":
                        done.set()
                        return
                done.set()
            reader = threading.Thread(target=read_events, daemon=True)
            reader.start()
            done.wait()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)       # what follows the measured event is not measured
        proc.wait()
        log.seek(0)
        if args.until not in seen:
            raise RuntimeError(f"the training process (exit status {proc.returncode}) stopped before its first "
                               f"{args.until!r} event; events seen: {list(seen)}; its last output:\n" + log.read()[-3000:])
    finally:
        log.close()
        shutil.rmtree(run.parent, ignore_errors=True)
    total, counts = weight_bytes(args.model, args.model_config, ITEMSIZE[args.mixed_precision])
    peak = rss.marks[args.until] * 2**20
    return {"model": args.model, "code": args.code or str(REPO), "mixed_precision": args.mixed_precision,
            "method": args.method, "resolution": args.resolution, "until": args.until, "rss": rss.how,
            "peak_mb": {k: round(v, 1) for k, v in rss.marks.items()},
            "seconds": {k: round(v, 1) for k, v in seen.items()},
            "weight_bytes": total, "parameters": counts, "ratio": round(peak / total, 3),
            "bar": BAR, "passed": peak <= BAR * total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers folder or .safetensors file")
    parser.add_argument("--model-config", help="for a .safetensors --model: its diffusers folder")
    parser.add_argument("--mixed-precision", choices=tuple(ITEMSIZE), default="no")
    parser.add_argument("--method", choices=("dora", "lora", "full"), default="dora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--until", choices=("start", "step"), default="step",
                        help="stop at the first step's end (step) or right before it (start)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--code", help="train with the dorabooth package of this checkout (before/after "
                                       "comparisons; default: this one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child), args.code)
        return 0
    if not args.model:
        parser.error("--model is required")
    result = measure(args)
    gb = result["weight_bytes"] / 1e9
    print(f"{args.model} ({args.mixed_precision}, {args.method}, {args.resolution} px, until {args.until}):")
    for kind, mb in result["peak_mb"].items():
        print(f"  peak RSS up to '{kind}' ({result['seconds'][kind]:.0f} s): {mb * 2**20 / 1e9:.2f} GB")
    print(f"  weights in the run's dtype: {gb:.2f} GB; bar {BAR} x = {BAR * gb:.2f} GB; "
          f"ratio {result['ratio']:.3f} -> {'PASS' if result['passed'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
