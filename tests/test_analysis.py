"""ΔM/ΔD analysis: the measure on a hand-computed weight, the fit, and `dorabooth analyze` on
tiny 3-checkpoint runs of each method (checked against the adapter layers' own merge)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis_runs import STEPS, tiny_run
from dorabooth.analysis import analyze, fit_line, magnitude_direction, read_run, snapshots
from dorabooth.cli import main

# A 3×2 weight (out = 3 rows, in = 2 columns) and an update of it.
W0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
W1 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])


def test_magnitude_direction_by_hand_rows():
    # rows: norms 1, 1, √2 → 2, 1, √2: |Δm| = 1, 0, 0; cos = 1, 1, (1 − 1)/2 = 0
    dM, dD = magnitude_direction(W0, W1, "out")
    assert dM == pytest.approx(1 / 3, abs=1e-15)
    assert dD == pytest.approx(1 / 3, abs=1e-15)


def test_magnitude_direction_by_hand_columns():
    # columns: (1,0,1), (0,1,1) → (2,0,1), (0,1,−1): norms √2, √2 → √5, √2; cos = 3/√10, 0
    dM, dD = magnitude_direction(W0, W1, "in")
    assert dM == pytest.approx((math.sqrt(5) - math.sqrt(2)) / 2, abs=1e-15)
    assert dD == pytest.approx(((1 - 3 / math.sqrt(10)) + 1) / 2, abs=1e-15)


def test_magnitude_direction_scale_and_rotation():
    assert magnitude_direction(W0, 3 * W0) == pytest.approx((2 * (2 + math.sqrt(2)) / 3, 0.0), abs=1e-12)
    assert magnitude_direction(W0, W0.clone()) == (0.0, 0.0)   # exact, not 1 − 0.99999…
    tiny = W0 + 1e-5 * torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]])   # below fp32's 1 − cos resolution
    assert magnitude_direction(W0, tiny)[1] > 0
    with pytest.raises(ValueError, match="axis"):
        magnitude_direction(W0, W1, "rows")
    with pytest.raises(ValueError, match="one shape"):
        magnitude_direction(W0, W1.T)


def test_fit_line():
    fit = fit_line([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["pearson"] == pytest.approx(1.0) and fit["n"] == 3
    fit = fit_line([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 3.0, 1.0])
    # slope = Σdx·dy / Σdx² = (−1.5·1.25 − 0.5·0.25 + 0.5·0.25 − 1.5·1.75)… computed: −0.9
    assert fit["slope"] == pytest.approx(-0.9)
    assert fit["pearson"] == pytest.approx(-0.9 * math.sqrt(5 / 4.75))
    assert fit_line([1.0], [2.0])["slope"] is None
    assert fit_line([1.0, 1.0], [2.0, 3.0])["slope"] is None
    assert fit_line([1.0, 2.0], [3.0, 3.0]) == {"n": 2, "slope": 0.0, "intercept": 3.0, "pearson": None}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    runs = [tiny_run(tmp_path_factory, m) for m in ("dora", "lora", "full")]
    out = tmp_path_factory.mktemp("analysis")
    assert main(["analyze", *map(str, runs), "--out", str(out)]) == 0
    return runs, out, json.loads((out / "analysis.json").read_text())


def test_analyze_writes_json_and_plot(analysed):
    runs, out, data = analysed
    assert data["axis"] == "out" and "output row" in data["axis_meaning"]
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["label"] for r in data["runs"]] == ["DoRA r=4", "LoRA r=4", "FT"]
    assert [p["label"] for p in data["panels"]] == ["DoRA r=4", "LoRA r=4", "FT"]
    for r in data["runs"]:
        assert r["steps"] == list(range(1, STEPS + 1))          # 3 checkpoints + the final result
        layers = {p["layer"] for p in r["points"]}
        assert len(r["points"]) == len(layers) * STEPS == r["fit"]["all"]["n"]
        assert all(p["dM"] >= 0 and p["dD"] >= 0 for p in r["points"])
        assert any(p["dD"] > 0 for p in r["points"])
        assert r["fit"]["query"]["n"] == sum(p["query"] for p in r["points"]) > 0
        assert r["fit"]["unet"]["n"] == sum(p["layer"].startswith("unet.") for p in r["points"])
        for key in ("all", "query", "unet", "all_within_step", "query_within_step", "unet_within_step"):
            assert set(r["fit"][key]) == {"n", "slope", "intercept", "pearson"}
            assert r["fit"][key]["slope"] is not None and math.isfinite(r["fit"][key]["slope"])
    dora, lora, full = data["runs"]
    assert any(p["layer"].startswith("text_encoder") and p["layer"].endswith("q_proj") for p in dora["points"])
    # Full fine-tuning is measured on the same layers the adapters use (UNet attention projections).
    assert {p["layer"] for p in full["points"]} == {p["layer"] for p in lora["points"]}


def _pipe_with(run, adapter_file):
    import dorabooth
    from dorabooth.models import load_pipeline

    pipe, _ = load_pipeline(read_run(run).base)
    dorabooth.load_adapter(pipe, adapter_file)
    return pipe


def test_dora_and_lora_points_match_the_layers_own_merge(analysed):
    """ΔM/ΔD of the analysis = those of DoRALinear.merged_weight() after load_adapter, at every step."""
    from dorabooth.inject import pipeline_dora_modules

    runs, _, data = analysed
    for run, result in zip(runs[:2], data["runs"][:2]):
        for step, path in snapshots(read_run(run)):
            layers = pipeline_dora_modules(_pipe_with(run, path))
            points = {p["layer"]: p for p in result["points"] if p["step"] == step}
            assert set(points) == set(layers)
            for name, layer in list(layers.items())[::7]:
                W0 = layer.base_layer.weight
                dM, dD = magnitude_direction(W0, layer.merged_weight(1.0))
                assert points[name]["dM"] == pytest.approx(dM, rel=1e-4, abs=1e-9)
                assert points[name]["dD"] == pytest.approx(dD, rel=1e-3, abs=1e-12)
                if layer.use_dora:       # DoRA's merged row norms are its magnitude vector
                    m = layer.lora_magnitude_vector.detach().double()
                    ref = (m - W0.double().norm(dim=1)).abs().mean()
                    assert points[name]["dM"] == pytest.approx(float(ref), rel=1e-4, abs=1e-6)   # m is fp32


def test_full_points_match_the_saved_weights(analysed):
    runs, _, data = analysed
    full, result = runs[2], data["runs"][2]
    base = load_file(str(read_run(full).base + "/unet/diffusion_pytorch_model.safetensors"))
    ckpt = load_file(str(full / "checkpoints" / "step-2" / "trainable.safetensors"))
    final = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    for p in result["points"][:: 5]:
        key = p["layer"].removeprefix("unet.") + ".weight"
        W = ckpt["unet." + key] if p["step"] == 2 else final[key] if p["step"] == STEPS else None
        if W is not None:
            assert (p["dM"], p["dD"]) == pytest.approx(magnitude_direction(base[key], W), rel=1e-9)


def test_full_fine_tune_of_the_text_encoders_is_measured_on_the_adapters_layers(tmp_path_factory, analysed):
    """FT that also trained the text encoders: the same layers as a DoRA run with text-encoder
    adapters (UNet attention + q/k/v/out_proj of each encoder), read from the checkpoint and the
    final text_encoder*/ folders."""
    from safetensors import safe_open

    runs, _, data = analysed
    run = tiny_run(tmp_path_factory, "full-te")
    result = analyze([run], tmp_path_factory.mktemp("analysis-full-te"))["runs"][0]
    layers = {p["layer"] for p in result["points"]}
    assert layers == {p["layer"] for p in data["runs"][0]["points"]}            # the DoRA run's layers
    assert any(k.startswith("text_encoder_2.") for k in layers)
    base = read_run(run).base
    ckpt = load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    checked = 0
    for p in result["points"]:
        component, _, module = p["layer"].partition(".")
        if not component.startswith("text_encoder") or p["step"] not in (2, STEPS):
            continue
        names = [f"{module}.weight", f"{module.removeprefix('text_model.')}.weight"]
        W0 = W = None
        for f in (Path(base) / component).glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                W0 = next((fh.get_tensor(n) for n in names if n in fh.keys()), W0)
        if p["step"] == 2:
            W = next(ckpt[f"{component}.{n}"] for n in names if f"{component}.{n}" in ckpt)
        else:
            for f in (run / component).glob("*.safetensors"):
                with safe_open(str(f), framework="pt") as fh:
                    W = next((fh.get_tensor(n) for n in names if n in fh.keys()), W)
        assert (p["dM"], p["dD"]) == pytest.approx(magnitude_direction(W0, W), rel=1e-9)
        checked += 1
    assert checked > 0


def test_analyze_axis_in_and_errors(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory, "dora-in")
    data = analyze([run], tmp_path / "a", axis="in")
    assert data["axis"] == "in" and "input column" in data["axis_meaning"]
    assert data["runs"][0]["trained_magnitude_axis"] == "in"
    assert main(["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 1
    assert "not a dorabooth run folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        analyze([empty], tmp_path / "c")


def test_analyze_refuses_a_changed_base_model(tmp_path_factory, tmp_path):
    import shutil

    run = tiny_run(tmp_path_factory, "lora")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    base = tmp_path / "base"
    shutil.copytree(read_run(run).base, base)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["base_model"]["path"] = str(base)
    (copy / "config.json").write_text(json.dumps(cfg))
    analyze([copy], tmp_path / "ok")                          # same weights elsewhere: fine
    (base / "unet" / "config.json").write_text((base / "unet" / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="has changed since the run was trained"):
        analyze([copy], tmp_path / "changed")


def test_magnitude_direction_of_a_conv_uses_its_dora_norm_vectors():
    """LoCon weights (out, in, kh, kw): per output channel over in×kh×kw, per input channel over out×kh×kw."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, 3, 3, generator=g)
    W = W0 * torch.linspace(0.5, 1.5, 6).view(-1, 1, 1, 1) + 0.1 * torch.randn(6, 4, 3, 3, generator=g)
    assert magnitude_direction(W0, W, "out") == magnitude_direction(W0.reshape(6, -1), W.reshape(6, -1), "out")
    cols = [w.transpose(0, 1).reshape(4, -1).T for w in (W0, W)]            # (out·kh·kw, in): one column per input
    assert magnitude_direction(W0, W, "in") == pytest.approx(magnitude_direction(*cols, "in"), rel=1e-12)
    dM, dD = magnitude_direction(W0, W0 * 2.0, "out")
    assert dD < 1e-12 and dM > 0                                               # scaling moves only the magnitude
