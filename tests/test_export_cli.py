"""``dorabooth export | convert | adapter-info`` on tiny models: arguments, output, errors."""

import argparse
import json

import pytest
from safetensors import safe_open

import dorabooth
from dorabooth.config import TrainConfig
from dorabooth.export_cli import add_export_commands
from export_helpers import BUILDERS, adapted


def run(argv):
    parser = argparse.ArgumentParser(prog="dorabooth")
    add_export_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    BUILDERS["sd15"]().save_pretrained(d / "base")
    out = dorabooth.save_adapter(adapted("sd15", "out"), d / "a_out")
    inn = dorabooth.save_adapter(adapted("sd15", "in", seed=3), d / "a_in")
    return d, out, inn


def test_export_kohya_prints_the_consumer_report(files, capsys):
    d, out, inn = files
    assert run(["export", "--adapter", str(inn), "--format", "kohya", "--out", str(d / "in.safetensors"),
                "--model", str(d / "base")]) == 0
    text = capsys.readouterr().out
    assert "wrote kohya" in text
    for consumer in ("diffusers", "ComfyUI", "A1111", "LyCORIS"):
        assert consumer in text
    assert "ComfyUI   fails to load" in text and "LyCORIS   fails to load" in text     # a tiny base: no ComfyUI model
    with safe_open(str(d / "in.safetensors"), framework="pt") as f:
        assert any(k.endswith("dora_scale") for k in f.keys())


def test_convert_and_refusal(files, capsys):
    d, out, inn = files
    assert run(["convert", str(out), "--to", "kohya", "--out", str(d / "o.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "kohya" and {c["consumer"] for c in result["consumers"]} == \
        {"diffusers", "ComfyUI", "A1111", "LyCORIS"}
    assert run(["convert", str(d / "o.safetensors"), "--to", "diffusers-lora", "--out", str(d / "back")]) == 0
    with pytest.raises(ValueError, match="per-input magnitude"):
        run(["convert", str(d / "in.safetensors") if (d / "in.safetensors").exists() else str(inn),
             "--to", "diffusers-lora", "--out", str(d / "never")])


def test_adapter_info(files, capsys):
    d, out, inn = files
    assert run(["adapter-info", str(out)]) == 0
    text = capsys.readouterr().out
    for field in ("format", "family         sd1", "method         dora", "magnitude axis out", "rank           4",
                  "alpha          8", "unknown keys   0"):
        assert field in text
    assert run(["adapter-info", str(inn), "--consumers", "--model", str(d / "base"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["magnitude_axis"] == "in"
    assert all(v["max_rel_error"] is not None or v["status"] in ("fails to load", "not applied")
               for v in info["consumers"])


def test_export_merged_with_strengths(files):
    d, out, inn = files
    assert run(["export", "--adapter", str(out), "--strength", "0.7", "--adapter", str(inn),
                "--format", "merged-single-file", "--out", str(d / "m.safetensors"), "--model", str(d / "base"),
                "--dtype", "bf16"]) == 0
    with safe_open(str(d / "m.safetensors"), framework="pt") as f:
        adapters = json.loads(f.metadata()["dorabooth.adapters"])
    assert [a["strength"] for a in adapters] == [0.7, 1.0]
    with pytest.raises(SystemExit):
        run(["export", "--strength", "0.5", "--adapter", str(out), "--format", "kohya", "--out", str(d / "x")])


def test_run_folder_records_its_base_model(files, tmp_path, capsys):
    d, out, inn = files
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter.safetensors").write_bytes(out.read_bytes())
    config = TrainConfig(images=str(d), class_noun="dog", out=str(run_dir), model=str(d / "base"))
    (run_dir / "config.json").write_text(json.dumps({"base_model": {"id": "tiny", "path": str(d / "base")},
                                                     "config": config.to_dict()}))
    assert run(["export", "--adapter", str(run_dir), "--format", "merged-diffusers", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    meta = json.loads((tmp_path / "m" / "dorabooth_export.json").read_text())
    assert meta["dorabooth.base_model"] == str(d / "base") and meta["dorabooth.base_hash"].startswith("sha256")
    empty = tmp_path / "unfinished"
    empty.mkdir()
    full = TrainConfig(images=str(d), class_noun="dog", out=str(empty), method="full")
    (empty / "config.json").write_text(json.dumps({"config": full.to_dict()}))
    with pytest.raises(FileNotFoundError, match="no adapter.safetensors.*--method full"):
        run(["export", "--adapter", str(empty), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
