"""``bench/sharded_full.py`` (issue 15, written for GPUs, not run on one yet) run as its CPU smoke:
the shipped configs/accelerate/ configs each train a full fine-tune on 2 CPU processes, and the
FSDP run's checkpoint resumes on 1 process. Keeps the script and the configs working."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_runs import save_model

NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None

REPO = Path(__file__).resolve().parent.parent


def test_the_sharded_bench_runs_every_shipped_config(tmp_path):
    model = save_model("sd15", tmp_path / "model")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/sharded_full.py", "--device", "cpu", "--gpus", "2", "--model",
                           str(model), "--resolution", "32", "--steps", "2", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    configs = ["ddp", "fsdp-full-shard", "fsdp-shard-grad-op"] + ([] if NO_DEEPSPEED else
                                                                  ["deepspeed-zero2", "deepspeed-zero3"])
    assert [(r["config"], r["ok"]) for r in results["runs"]] == [(c, True) for c in configs]
    resume = results["resume"]["resume"]
    assert results["resume"]["ok"] and (resume["processes_before"], resume["processes"]) == (2, 1)
    assert "| fsdp-full-shard | 2 |" in proc.stdout
