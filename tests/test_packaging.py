"""A wheel install works without the source tree: it carries the toy model, the sample
subjects, the prompt sets and the app, and ``shipped_path`` finds them in the
``dorabooth_assets`` / ``dorabooth_prompts`` packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dorabooth.evaluate import DEFAULT_PROMPTS
from dorabooth.models import asset_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_toy_model_subjects_and_app(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dorabooth-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dorabooth_{top}/{p.relative_to(REPO / top).as_posix()}"
               for top in ("assets", "prompts") for p in (REPO / top).rglob("*") if p.is_file()}
    assert shipped <= names, sorted(shipped - names)[:5]
    assert "dorabooth_assets/toy-sdxl/unet/diffusion_pytorch_model.safetensors" in names
    assert {"ui/app.py", "dorabooth/cli.py", "dorabooth/formats/layout.py"} <= names
    assert "dorabooth_prompts/toy-eval.json" in names


def test_asset_dir_prefers_the_source_tree_then_the_installed_package(tmp_path, monkeypatch):
    assert asset_dir("toy-sdxl") == REPO / "assets" / "toy-sdxl"
    assert DEFAULT_PROMPTS["toy"] == REPO / "prompts" / "toy-eval.json"
    (tmp_path / "dorabooth_assets" / "only-installed").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert asset_dir("only-installed") == tmp_path / "dorabooth_assets" / "only-installed"
    assert asset_dir("nowhere") == REPO / "assets" / "nowhere"          # errors then name the source path
