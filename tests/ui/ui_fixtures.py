"""Helpers for the app's tests: a tiny SDXL-architecture model on disk, photo-like images, and
the app served on a free port for the browser tests."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import make_sdxl_pipeline

CHROMIUM = Path("/usr/bin/chromium")         # Debian's; Playwright drives it (no browser download)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def save_tiny_model(folder: Path) -> Path:
    """The tiny SDXL test pipeline (tests/tiny_models.py) as a diffusers folder, 32 px native.

    The UNet is fully convolutional, so a larger ``sample_size`` only changes the native
    resolution (16 → 32 px) the trainer and generator pick; the weights are the same.
    """
    pipe = make_sdxl_pipeline()
    pipe.unet.register_to_config(sample_size=16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_photos(folder: Path, n: int = 3, size: int = 64, seed: int = 0) -> list[Path]:
    """Distinct photo-like images: a coloured disc on a gradient, one per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rng = np.random.default_rng(seed * 100 + i)
        base = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255),
                         np.full_like(xx, rng.uniform(0, 255))], -1)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        base[disc] = rng.uniform(0, 255, 3)
        path = folder / f"photo {i}.png"
        Image.fromarray(base.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def save_comfy_loadable_model(folder: Path) -> Path:
    """A small SD 1.x-architecture diffusers folder that ComfyUI's checkpoint loader accepts (its
    SD15 model: 320 base channels, 768-wide cross-attention, no linear projections; any depth),
    so adapter files made on it get real ComfyUI verdicts. A1111 still refuses it (its config
    is fixed). 16 px native (the VAE halves), one resolution level."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import _scheduler, tiny_text_encoder, tiny_tokenizer, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320,),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(0), text_encoder=tiny_text_encoder(hidden=768), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@contextlib.contextmanager
def serve_app(tmp_path: Path, model: str, *args: str, timeout: float = 120):
    """``dorabooth-ui`` (``python -m ui.app``, what the console script runs) on a free port with
    ``model`` and a workspace in ``tmp_path``; yields (url, workspace). ``args``: more flags."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workspace = tmp_path / "workspace"
    log_path = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ui.app", "--model", model, "--workspace", str(workspace),
                                 "--host", "127.0.0.1", "--port", str(port), *args],
                                cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"dorabooth-ui did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        try:
            yield url, workspace
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_run(ctx, ref, timeout=120.0):
    """The run's status once it is no longer queued or training; an assertion after ``timeout`` s."""
    from ui import handlers as h

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = h.run_status(ctx, ref)
        if not status.active:
            return status
        time.sleep(0.2)
    raise AssertionError(f"{ref} still {h.run_status(ctx, ref).state} after {timeout} s")


class FakeTrainer:
    """Writes the trainer's events; holds each run until released or stopped."""

    def __init__(self):
        self.release = threading.Event()
        self.started = []

    def __call__(self, config, on_event=None, stop=None):
        from dorabooth.events import EventLog

        emit = EventLog(Path(config.out) / "events.jsonl")
        self.started.append(Path(config.out).name)
        emit("start", step=0, total=config.steps, family="sdxl", model="fake", method=config.method)
        for step in range(1, config.steps + 1):
            while not self.release.is_set():
                if stop is not None and stop.is_set():
                    emit("checkpoint", step=step - 1, path="x")
                    emit("stopped", step=step - 1)
                    return
                time.sleep(0.02)
            emit("step", step=step, total=config.steps, loss=1.0 / step, lr=1e-3, it_s=5.0, eta_s=0.1)
        Path(config.out, "adapter.safetensors").write_bytes(b"")
        emit("done", adapter="x", steps=config.steps, seconds=0.5)


def call_event(client, api: str, data: list):
    """One event as a browser would send it, with the client's login cookie: the data go as
    given (``Client.predict`` would upload a local path itself, which is a real upload)."""
    import httpx

    base = client.src.rstrip("/") + "/gradio_api/call/" + api.lstrip("/")
    event = httpx.post(base, json={"data": data}, cookies=client.cookies, timeout=30).json()["event_id"]
    reply = httpx.get(f"{base}/{event}", cookies=client.cookies, timeout=60).text
    kind = reply.split("\n", 1)[0].removeprefix("event: ")
    payload = reply.split("data: ", 1)[1].split("\n", 1)[0]
    return kind, json.loads(payload)


def upload_files(client, photos) -> list[dict]:
    """Upload ``photos`` as the browser does; FileData of the server's copies, for ``call_event``."""
    import httpx

    files = [("files", (p.name, p.read_bytes())) for p in photos]
    paths = httpx.post(client.src.rstrip("/") + "/gradio_api/upload", files=files, cookies=client.cookies,
                       timeout=30).json()
    return [{"path": path, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}} for path, p in zip(paths, photos)]
