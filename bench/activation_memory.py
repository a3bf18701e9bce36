"""Activation memory of one training step on the full-size fixtures, measured on the CPU.

    python bench/activation_memory.py --fixture sd15 --resolutions 256 512 [--checkpointing off on]
                                      [--precision no bf16] [--batch 1] [--component unet]
                                      [--json OUT.jsonl]

What the trainer does for one micro-batch, on one component of a full-size fixture
(``dorabooth.testing.fullsize``, random weights, published configs): the component loaded
in the weight dtype (fp32, or bf16 frozen weights for ``--precision bf16``), DoRA r = 16 on the
trainer's default targets (UNet ``attn``; text encoders q/k/v/out_proj) with the trainable
tensors in fp32, gradient checkpointing as asked, then one forward in ``train()`` mode (under
CPU autocast for bf16, as accelerate runs it) and one backward of an MSE loss.

Each point runs in its own process (the allocator starts empty; freed pages are returned to
the system with glibc's ``malloc_trim`` before the baseline is taken), under
``flock /tmp/fullsize.lock`` (one full-size job at a time on a shared machine). The process's
resident set is sampled every 5 ms (``PeakRSS`` of ``bench/dora_vs_lora.py``); the activation
term is ``peak − baseline − gradient bytes``, where the baseline is taken right before the
forward (weights, adapters and inputs resident) and the gradient bytes are all trainable
parameters' fp32 gradients (they are allocated during backward). ``--component vae-encode``
/ ``vae-decode`` measure the no-grad VAE pass instead (fp32; what caching latents and
decoding sample images add). ``--component trainer`` runs the real trainer for one step
(no prior preservation) and compares the process's peak RSS during that step with the
estimate of ``dorabooth train --dry-run``. Results are JSON lines, one per point.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LOCK = "/tmp/fullsize.lock"
RANK = 16


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc's
    malloc_trim), so that the baseline is the live memory: freed-but-kept pages from loading
    would otherwise be reused during the step and hide part of it."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:                    # not glibc: the baseline may include freed pages
        pass


def point(args) -> dict:
    """One measurement in this process."""
    import torch

    from bench.dora_vs_lora import PeakRSS
    from dorabooth import inject
    from dorabooth.testing import fullsize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, _ = fullsize.paths(args.fixture)
    if not fullsize.is_built(args.fixture):
        raise SystemExit(f"{args.fixture} is not built: python -m dorabooth.testing.fullsize build {args.fixture}")
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16}[args.precision]
    t0 = time.perf_counter()
    component, model = args.component, None
    if component.startswith("vae"):
        return _vae_point(args, folder, load_s=time.perf_counter() - t0)
    if component == "unet":
        from diffusers import UNet2DConditionModel
        model = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=weight_dtype)
        targets = "attn"
    else:
        import transformers
        cls = getattr(transformers, fullsize.CONFIGS[args.fixture][component]["architectures"][0])
        model = cls.from_pretrained(str(folder / component), dtype=weight_dtype)
        targets = inject.TEXT_ENCODER_TARGETS
    load_s = time.perf_counter() - t0
    inject.inject(model, targets, rank=RANK, alpha=float(RANK))
    for p in model.parameters():                       # as train.place: trainable fp32, frozen weight dtype
        p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
    if args.checkpointing == "on":
        if component == "unet":
            model.enable_gradient_checkpointing()
        else:
            model.gradient_checkpointing_enable()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs, target = _inputs(args, model, component, weight_dtype)
    release_freed_memory()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        with autocast:
            out = model(**inputs)
        pred = out.sample if component == "unet" else out.hidden_states[-2 if args.fixture == "sdxl" else -1]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
    step_s = time.perf_counter() - t0
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    added = (rss.peak_mb - rss.start_mb) * 2**20
    return {"fixture": args.fixture, "component": component, "precision": args.precision,
            "checkpointing": args.checkpointing, "resolution": args.resolution, "batch": args.batch,
            "latent": args.resolution // 8, "trainable": trainable, "baseline_bytes": int(rss.start_mb * 2**20),
            "peak_added_bytes": int(added), "grad_bytes": grads, "activation_bytes": int(added - grads),
            "load_s": round(load_s, 1), "step_s": round(step_s, 1), "threads": args.threads, "rss": rss.how,
            "torch": torch.__version__}


def trainer_point(args) -> dict:
    """The whole trainer (``dorabooth.train``) on the fixture for one step, against the plan's
    estimate: the process's peak RSS during step 1 minus its RSS after the imports (the Python
    and library baseline), compared with ``plan_run(...).estimate.total``."""
    import tempfile
    import threading

    import numpy as np
    import torch
    from PIL import Image

    from bench.dora_vs_lora import PeakRSS
    from dorabooth.config import TrainConfig
    from dorabooth.testing import fullsize
    from dorabooth.train import dry_run, train

    torch.set_num_threads(args.threads)
    folder, _ = fullsize.paths(args.fixture)
    tmp = Path(tempfile.mkdtemp(prefix="trainer-point-"))
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8)).save(
            images / f"{i}.png")
    config = TrainConfig(images=str(images), class_noun="dog", out=str(tmp / "run"), model=str(folder),
                         resolution=args.resolution, steps=2, prior_preservation=False, sample_every=0,
                         checkpoint_every=0, mixed_precision=args.precision,
                         gradient_checkpointing=args.checkpointing == "on")
    plan = dry_run(config)
    stop, marks = threading.Event(), {}
    with PeakRSS() as rss:
        baseline = rss.start_mb

        def on_event(e):
            if e["type"] == "start":
                marks["start_mb"], rss.peak_mb = rss._now_mb(), rss._now_mb()
            elif e["type"] == "step" and "step_peak_mb" not in marks:
                marks["step_peak_mb"] = rss.peak_mb
                stop.set()
        t0 = time.perf_counter()
        train(config, on_event=on_event, stop=stop)
    mib = 2**20
    return {"fixture": args.fixture, "component": "trainer", "precision": args.precision,
            "checkpointing": args.checkpointing, "resolution": args.resolution, "batch": 1,
            "latent": args.resolution // 8, "baseline_bytes": int(baseline * mib),
            "before_step_bytes": int((marks["start_mb"] - baseline) * mib),
            "step_peak_bytes": int((marks["step_peak_mb"] - baseline) * mib),
            "estimate": plan.estimate.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
            "threads": args.threads, "rss": rss.how, "torch": torch.__version__}


def _vae_point(args, folder, load_s) -> dict:
    """No-grad VAE encode (of images) or decode (of latents) in fp32: the transient while
    latents are cached and sample images decoded."""
    import torch
    from diffusers import AutoencoderKL

    from bench.dora_vs_lora import PeakRSS

    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    side = args.resolution
    x = (torch.randn(args.batch, 3, side, side, generator=g) if args.component == "vae-encode"
         else torch.randn(args.batch, 4, side // 8, side // 8, generator=g))
    release_freed_memory()
    t0 = time.perf_counter()
    with PeakRSS() as rss, torch.no_grad():
        out = vae.encode(x).latent_dist.mean if args.component == "vae-encode" else vae.decode(x).sample
    step_s = time.perf_counter() - t0
    added = (rss.peak_mb - rss.start_mb) * 2**20
    return {"fixture": args.fixture, "component": args.component, "precision": "no", "checkpointing": "off",
            "resolution": side, "batch": args.batch, "latent": side // 8, "baseline_bytes": int(rss.start_mb * 2**20),
            "peak_added_bytes": int(added), "output_bytes": out.numel() * 4, "activation_bytes": int(added),
            "step_s": round(step_s, 1), "threads": args.threads, "rss": rss.how, "torch": torch.__version__}


def _inputs(args, model, component, weight_dtype):
    import torch

    b = args.batch
    g = torch.Generator().manual_seed(1)
    if component != "unet":
        ids = torch.randint(0, 49407, (b, 77), generator=g)
        width = model.config.hidden_size
        return {"input_ids": ids, "output_hidden_states": True}, torch.randn(b, 77, width, generator=g)
    cfg = model.config
    side = args.resolution // 8
    inputs = {"sample": torch.randn(b, cfg.in_channels, side, side, generator=g).to(weight_dtype),
              "timestep": torch.randint(0, 1000, (b,), generator=g),
              "encoder_hidden_states": torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(weight_dtype)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, pooled, generator=g).to(weight_dtype),
            "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution,
                                       args.resolution]] * b, dtype=weight_dtype)}
    return inputs, torch.randn(b, cfg.out_channels, side, side, generator=g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", choices=("sd15", "sd21", "sdxl"), required=True)
    p.add_argument("--component", default="unet",
                   choices=("unet", "text_encoder", "text_encoder_2", "vae-encode", "vae-decode", "trainer"))
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--precision", nargs="+", choices=("no", "bf16"), default=["no"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT", help="append results here (JSON lines)")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)       # a child: one measurement
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        args.checkpointing, args.precision, args.batch = args.checkpointing[0], args.precision[0], args.batch[0]
        print(json.dumps(trainer_point(args) if args.component == "trainer" else point(args)), flush=True)
        return 0
    resolutions = args.resolutions if args.component.startswith(("unet", "vae", "trainer")) else [0]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    for precision in args.precision:
        for ckpt in args.checkpointing:
            for batch in args.batch:
                for res in resolutions:
                    cmd = ["flock", LOCK, sys.executable, __file__, "--point", "--fixture", args.fixture,
                           "--component", args.component, "--resolution", str(res), "--checkpointing", ckpt,
                           "--precision", precision, "--batch", str(batch), "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
                        {"fixture": args.fixture, "resolution": res, "checkpointing": ckpt, "precision": precision,
                         "batch": batch, "error": proc.stderr.strip()[-800:]})
                    print(line, flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
