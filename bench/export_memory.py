"""Host memory and time of exports (issue 11: "≤ 4 GB RSS for a merged or kohya export of
full-size SDXL").

    python bench/export_memory.py --model DIR_OR_FILE [--model-config DIR] --adapter FILE
                                  [--formats kohya merged-single-file …] [--dtype fp16] [--json OUT]
    python bench/export_memory.py --model DIR --make-adapter FILE [--rank 16]

Each export runs as ``python -m dorabooth export`` in its own process, whose resident set size
is sampled every 5 ms from its start to its end (``dorabooth.testing.memory.run_sampled``); the
adapter-file formats include the per-tool report, which reads every adapted base weight. The
outputs are written to a temporary folder and removed. ``--make-adapter`` writes a rank-r DoRA
adapter (UNet attention and both text encoders, random non-zero B and magnitudes off ‖W0‖ by
a few %) on the base loaded in fp16: something to export. Full-size fixtures: run under the
shared lock (``flock /tmp/fullsize.lock python bench/export_memory.py …``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BAR_GB = 4.0
OUT_NAMES = {"kohya": "adapter.safetensors", "diffusers-lora": "adapter", "merged-single-file": "merged.safetensors",
             "merged-diffusers": "merged"}


def make_adapter(model: str, model_config: str | None, out: str, rank: int, seed: int = 0) -> Path:
    import torch

    import dorabooth
    from dorabooth.models import load_pipeline

    pipe, base = load_pipeline(model, dtype=torch.float16, single_file_config=model_config)
    dorabooth.attach(pipe, rank=rank, text_encoders=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [(n, p) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
                        for n, p in getattr(pipe, c).named_parameters() if p.requires_grad]:
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=g)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
    return dorabooth.save_adapter(pipe, out, base_model=base.path)


def measure(model: str, model_config: str | None, adapter: str, formats: list[str], dtype: str | None) -> list[dict]:
    from dorabooth.testing.memory import run_sampled

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for fmt in formats:
        folder = Path(tempfile.mkdtemp(prefix="export-memory-"))
        command = [sys.executable, "-m", "dorabooth", "export", "--adapter", adapter, "--format", fmt,
                   "--out", str(folder / OUT_NAMES[fmt]), "--model", model]
        command += ["--model-config", model_config] if model_config else []
        command += ["--dtype", dtype] if dtype and fmt.startswith("merged") else []
        try:
            result = run_sampled(command, env=env)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if result["returncode"]:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result['output'][-3000:]}")
        rows.append({"format": fmt, "dtype": dtype if fmt.startswith("merged") else None,
                     "peak_gb": round(result["peak_mb"] * 2**20 / 1e9, 2), "seconds": round(result["seconds"], 1),
                     "written_gb": round(size / 1e9, 2), "passed": result["peak_mb"] * 2**20 <= BAR_GB * 1e9})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-config")
    parser.add_argument("--adapter", help="the adapter file to export")
    parser.add_argument("--formats", nargs="+", default=["kohya", "merged-single-file"], choices=tuple(OUT_NAMES))
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="for merged formats (default: the base's)")
    parser.add_argument("--make-adapter", metavar="FILE", help="write a random DoRA adapter for --model and stop")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.make_adapter:
        print(make_adapter(args.model, args.model_config, args.make_adapter, args.rank))
        return 0
    if not args.adapter:
        parser.error("--adapter (or --make-adapter) is required")
    rows = measure(args.model, args.model_config, args.adapter, args.formats, args.dtype)
    for r in rows:
        print(f"{r['format']:<20} {r['dtype'] or '':<5} peak RSS {r['peak_gb']:6.2f} GB  {r['seconds']:7.1f} s  "
              f"written {r['written_gb']:.2f} GB  {'PASS' if r['passed'] else 'FAIL'} (bar {BAR_GB} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
