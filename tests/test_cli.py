"""The command line: stable flags, config from flags / files / a resumed run, progress output,
end-to-end train → generate → resume, errors without tracebacks."""

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from dorabooth import cli
from dorabooth.events import EventLog, ProgressBar, follow
from tiny_runs import make_subject, save_model

REPO = Path(__file__).resolve().parent.parent


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_train_flags_map_to_the_config():
    args = parse("train", "--images", "imgs", "--token", "zwx", "--class-noun", "cat", "--out", "run",
                 "--method", "lora", "--rank", "8", "--alpha", "4", "--half-rank", "--magnitude-axis", "in",
                 "--steps", "10", "--lr", "2e-4", "--resolution", "64", "--batch-size", "2", "--seed", "3",
                 "--no-prior-preservation", "--class-images", "cls", "--num-class-images", "5",
                 "--train-text-encoders", "--validation-prompt", "a zwx cat", "a zwx cat on grass",
                 "--sample-every", "5", "--checkpoint-every", "5", "--mixed-precision", "bf16", "--no-min-snr",
                 "--rslora", "--text-encoder-lr", "1e-5", "--flip", "--buckets")
    c = cli.train_config_from_args(args)
    assert (c.images, c.token, c.class_noun, c.out, c.method, c.rank, c.alpha, c.half_rank) == \
        ("imgs", "zwx", "cat", "run", "lora", 8, 4.0, True)
    assert (c.magnitude_axis, c.steps, c.lr, c.resolution, c.batch_size, c.seed) == ("in", 10, 2e-4, 64, 2, 3)
    assert (c.prior_preservation, c.class_images, c.num_class_images, c.train_text_encoders) == \
        (False, "cls", 5, True)
    assert c.validation_prompts == ("a zwx cat", "a zwx cat on grass")
    assert (c.sample_every, c.checkpoint_every, c.mixed_precision, c.min_snr_gamma) == (5, 5, "bf16", 0.0)
    assert (c.rslora, c.text_encoder_lr, c.flip, c.buckets) == (True, 1e-5, True, True)
    untouched = cli.train_config_from_args(parse("train", "--images", "i", "--class-noun", "dog", "--out", "o"))
    assert untouched.rank is None and untouched.prior_preservation and untouched.method == "dora"


def test_config_file_and_flags_override(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"config": {"images": "a", "class_noun": "dog", "out": "x",
                                                            "rank": 4, "lr": 1e-3}}))
    c = cli.train_config_from_args(parse("train", "--config", str(tmp_path / "c.json"), "--out", "y", "--lr", "1e-4"))
    assert (c.images, c.out, c.rank, c.lr) == ("a", "y", 4, 1e-4)


def test_missing_flags_and_bad_values_are_one_line_errors(capsys):
    assert cli.main(["train", "--images", "x", "--out", "o"]) == 1
    assert "missing --class-noun" in capsys.readouterr().err
    assert cli.main(["train", "--images", "x", "--out", "o", "--class-noun", "dog", "--resolution", "30"]) == 1
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("train", "--method", "qlora")


@pytest.mark.parametrize("lr", ["1e38", "1e300", "0"])
def test_a_learning_rate_out_of_range_is_one_error_line(tmp_path, lr):
    """issue 13 #2/#5: --lr 1e38 ended in an overflow traceback, 1e300 was queued: one line
    stating the range, before anything is loaded or written."""
    proc = subprocess.run([sys.executable, "-m", "dorabooth", "train", "--images", str(tmp_path), "--class-noun",
                           "dog", "--out", str(tmp_path / "run"), "--lr", lr], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 1 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == f"error: lr {float(lr)}: use a positive number of at most 1 (the range is (0, 1]; " \
                                  f"1e-4 to 1e-3 is usual)"


def test_help_names_the_stable_flags():
    out = subprocess.run([sys.executable, "-m", "dorabooth", "train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120).stdout
    for flag in ("--images", "--token", "--class-noun", "--out", "--model", "--method", "--rank", "--alpha",
                 "--half-rank", "--magnitude-axis", "--steps", "--lr", "--resolution", "--batch-size", "--seed",
                 "--prior-preservation", "--class-images", "--num-class-images", "--train-text-encoders",
                 "--validation-prompt", "--sample-every", "--checkpoint-every", "--resume", "--mixed-precision"):
        assert flag in out, flag
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--adapter", "--prompt", "--out", "--model", "--negative", "--n", "--steps", "--guidance",
                 "--seed", "--strength", "--width", "--height"):
        assert flag in help_text, flag


def test_progress_bar_from_events():
    stream = io.StringIO()
    bar = ProgressBar(stream=stream, every=2)
    log = EventLog(None, bar)
    log("device", device="CPU, 24 GiB", mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw",
        memory_estimate={"total": 2 * 2**30, "peak": 3 * 2**30})
    log("warning", message="bf16 on this CPU is emulated and slow")
    log("start", family="sdxl", model="toy", method="dora", total=4, step=0)
    log("skip", path="a.jpg", reason="not a readable image")
    for step in range(1, 5):
        log("step", step=step, total=4, loss=0.5 / step, it_s=2.0, eta_s=(4 - step) / 2.0)
    log("checkpoint", step=4, path="run/checkpoints/step-4")
    text = stream.getvalue()
    assert "skipped a.jpg: not a readable image" in text
    assert "device CPU, 24 GiB: mixed precision bf16, gradient checkpointing on, adamw, estimated peak 3.0 GiB" in text
    assert "warning: bf16 on this CPU is emulated and slow" in text
    assert "step 2/4 [############------------] loss 0.2500 2.00 it/s ETA 0:01" in text
    assert "step 1/4" not in text and "step 4/4" in text and "checkpoint saved" in text
    tty = io.StringIO()
    tty.isatty = lambda: True
    ProgressBar(stream=tty)({"type": "step", "step": 1, "total": 4, "loss": 1.0, "it_s": 1.0, "eta_s": 3})
    assert tty.getvalue().startswith("\rstep 1/4")


def test_follow_reads_a_growing_events_file(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)

    def writer():
        for i in range(3):
            log("step", step=i + 1, total=3, loss=1.0)
            time.sleep(0.05)
        log("done", adapter="a", steps=3)
    thread = threading.Thread(target=writer)
    thread.start()
    seen = [e["type"] for e in follow(path, poll=0.02, timeout=30)]
    thread.join()
    assert seen == ["step", "step", "step", "done"]


def test_train_generate_resume_end_to_end(tmp_path, capsys):
    model = str(save_model("sdxl", tmp_path / "model"))
    subject = make_subject(tmp_path / "subject")
    (subject / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    run = tmp_path / "run"
    common = ["--model", model, "--rank", "4", "--lr", "1e-3", "--num-class-images", "2",
              "--class-image-steps", "2"]
    assert cli.main(["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), "--steps", "2",
                     *common]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("adapter.safetensors") and "step 2/2" in err and "done:" in err
    assert "skipped logo.svg: not an image: .svg files are not read; save it as .png or .jpg" in err.splitlines()
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0     # the rest from config.json
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 3
    assert cli.main(["generate", "--adapter", str(run), "--prompt", "a photo of sks dog", "--out",
                     str(tmp_path / "images"), "--n", "2", "--steps", "2", "--strength", "0", "1", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["image"] * 4
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == \
        ["0000-s0-t0.png", "0001-s1-t0.png", "0002-s0-t1.png", "0003-s1-t1.png"]
    assert cli.main(["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), *common]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_toy_command_delegates_to_the_toy_world(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["toy", "build", "--help"])
    assert e.value.code == 0 and "--minutes" in capsys.readouterr().out


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "toy"])
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, kind):
    model = [] if kind == "toy" else ["--model", str(save_model(kind, tmp_path / "model"))]
    subject = make_subject(tmp_path / "subject")
    before = _tree(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), *model, "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: no weight loaded, nothing written")
    for text in ("mixed precision", "gradient checkpointing", "optimizer", "VAE", "frozen weights", "trainable (fp32)",
                 "optimizer state", "activations", "total", '"resolution": '):
        assert text in out, text
    assert _tree(tmp_path) == before and not run.exists()
    assert cli.main([*argv, "--json", "--gradient-checkpointing", "--mixed-precision", "auto"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["gradient_checkpointing"] is True and plan["device"]["auto"] == ["mixed_precision",
                                                                                            "optimizer"]
    terms = plan["memory_estimate"]["terms"]
    assert plan["memory_estimate"]["total"] == sum(terms.values()) and terms["trainable (fp32)"] > 0
    assert _tree(tmp_path) == before


def test_dry_run_validates_what_it_can(tmp_path, capsys):
    model = str(save_model("sd15", tmp_path / "model"))
    subject = make_subject(tmp_path / "subject")
    base = ["train", "--images", str(subject), "--class-noun", "dog", "--model", model, "--dry-run"]
    assert cli.main([*base, "--out", str(tmp_path / "r"), "--rank", "64"]) == 1
    assert "rank 64 is larger than min(in, out)" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*base[:2], str(empty), *base[3:], "--out", str(tmp_path / "r")]) == 1
    assert f"no image files in {empty}" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text(json.dumps({"config": {"images": "x", "class_noun": "dog",
                                                                           "out": "done"}}))
    assert cli.main([*base, "--out", str(tmp_path / "done")]) == 0       # no checkpoint yet: starts over in place
    capsys.readouterr()
    (tmp_path / "done" / "adapter.safetensors").write_bytes(b"")
    assert cli.main([*base, "--out", str(tmp_path / "done")]) == 1
    assert "already holds a run" in capsys.readouterr().err
    if __import__("dorabooth.optim").optim.optimizer_problem("adamw8bit"):
        assert cli.main([*base, "--out", str(tmp_path / "r"), "--optimizer", "adamw8bit"]) == 1
        assert "use --optimizer adamw" in capsys.readouterr().err


def test_device_flags():
    args = parse("train", "--images", "i", "--class-noun", "dog", "--out", "o", "--no-gradient-checkpointing",
                 "--optimizer", "auto", "--mixed-precision", "fp16", "--no-cache-latents")
    c = cli.train_config_from_args(args)
    assert (c.gradient_checkpointing, c.optimizer, c.mixed_precision, c.cache_latents) == (False, None, "fp16", False)
    untouched = cli.train_config_from_args(parse("train", "--images", "i", "--class-noun", "dog", "--out", "o"))
    assert (untouched.gradient_checkpointing, untouched.optimizer, untouched.mixed_precision) == (None, None, None)


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "PIL", "huggingface_hub")


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level names of the modules a ``python -X importtime`` run imported."""
    rows = [line.rpartition("|")[2] for line in importtime_stderr.splitlines() if line.startswith("import time:")]
    return {row.strip().split(".")[0] for row in rows[1:]}              # rows[0] is the header


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--version"], 0), (["train", "--help"], 0),
                                        (["export", "--help"], 0), (["train", "--method", "qlora"], 2),
                                        (["generate"], 2)])
def test_help_version_and_argument_errors_load_no_torch(argv, code):
    """`dorabooth --help` answered in 2–30 s while it imported torch (issue 12 #11): the face binds
    its names lazily and the command line imports the library only to run a command."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "dorabooth", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert run.returncode == code, run.stderr[-2000:]
    assert "dorabooth" in run.stdout + run.stderr
    heavy = _imported(run.stderr) & set(HEAVY)
    assert not heavy, f"`dorabooth {' '.join(argv)}` imported {sorted(heavy)}"
    print(f"dorabooth {' '.join(argv)}: {seconds:.2f} s (with -X importtime)")


def _python_without_site(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python -S -m dorabooth …`` in ``cwd``: a Python without site-packages, so neither an
    installed dorabooth nor torch & co.: what a user gets from a checkout with the wrong Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DORABOOTH_DEBUG")}
    return subprocess.run([sys.executable, "-S", "-m", "dorabooth", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_dorabooth_folder_in_the_current_directory_gives_one_clear_message(tmp_path):
    """issue 12 #16: `python -m dorabooth` beside a dorabooth/ checkout that cannot run (this
    Python lacks its dependencies, or the folder is incomplete) said it with an ImportError
    traceback. Now: what was loaded from where, what is missing, and the fix."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "dorabooth").symlink_to(REPO / "dorabooth", target_is_directory=True)
    assert _python_without_site(checkout, "--help").returncode == 0          # help needs no dependency
    run = _python_without_site(checkout, "generate", "--prompt", "a square", "--out", str(tmp_path / "images"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "cannot import" in run.stderr and "which dorabooth needs" in run.stderr
    assert f"loaded from {checkout / 'dorabooth'}: the dorabooth/ folder in the current directory" in run.stderr
    assert "Fix: " in run.stderr and "pip install" in run.stderr

    partial = tmp_path / "partial" / "dorabooth"                  # e.g. another version, or a half copy
    partial.mkdir(parents=True)
    for name in ("__init__.py", "__main__.py", "lazyface.py", "version.py", "importcheck.py"):
        (partial / name).write_text((REPO / "dorabooth" / name).read_text())
    run = _python_without_site(partial.parent, "--help")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"the dorabooth package in {partial} is incomplete or from another version" in run.stderr
    assert "No module named 'dorabooth.cli'" in run.stderr


NOISE = ("requires torchvision", "Loading pipeline components", "FutureWarning", "DeprecationWarning", "it/s]")


def test_third_party_noise_is_hidden_unless_verbose(tmp_path):
    """issue 12 #12: every command printed transformers' torchvision warnings and diffusers'
    loading bars. By default stderr holds only dorabooth's own lines; --verbose shows the rest."""
    argv = [sys.executable, "-m", "dorabooth", "generate", "--prompt", "a red star", "--steps", "1"]
    quiet = subprocess.run([*argv, "--out", str(tmp_path / "a")], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert [line for line in quiet.stderr.splitlines() if not line.startswith("wrote ")] == [], quiet.stderr
    assert not any(text in quiet.stderr for text in NOISE)
    verbose = subprocess.run([*argv, "--out", str(tmp_path / "b"), "--verbose"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert verbose.returncode == 0 and "wrote " in verbose.stderr
    assert "Loading pipeline components" in verbose.stderr          # diffusers' own bar, shown on request


def test_quiet_libraries_restores_what_it_changed(monkeypatch):
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from dorabooth.quiet import quiet_libraries

    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")                # the user's own setting wins
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            assert os.environ["DIFFUSERS_VERBOSITY"] == "info" and os.environ["TQDM_DISABLE"] == "1"
            assert diffusers_logging.get_verbosity() == logging.ERROR and not diffusers_logging.is_progress_bar_enabled()
            warnings.warn("library deprecation", FutureWarning)
            warnings.warn("ours", UserWarning)                       # e.g. EmulatedPrecisionWarning
    assert [str(w.message) for w in seen] == ["ours"]
    assert "TQDM_DISABLE" not in os.environ and os.environ["DIFFUSERS_VERBOSITY"] == "info"
    assert (diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()) == (level, bars)


def test_a_wrong_images_folder_is_reported_before_torch_loads_and_leaves_nothing(tmp_path):
    """issue 12 #10: a typo in --images was reported after the model loaded (70 s under load) and
    left a run folder that blocked the corrected re-run."""
    run = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dorabooth", "train", "--images",
                           str(tmp_path / "typo"), "--class-noun", "dog", "--out", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1 and f"image folder {tmp_path / 'typo'} does not exist" in proc.stderr
    assert not _imported(proc.stderr) & {"torch", "diffusers", "transformers"} and not run.exists()
    print(f"time to the error for a missing --images folder: {seconds:.2f} s (with -X importtime)")


def test_mistakes_found_before_the_model_loads_write_nothing(tmp_path, capsys):
    model = str(save_model("sd15", tmp_path / "model"))
    subject = make_subject(tmp_path / "subject")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (2, 2)).save(tiny / "a.png")
    (tmp_path / "file").write_text("x")
    run = tmp_path / "run"
    base = ["train", "--class-noun", "dog", "--model", model]
    for argv, message in [
        (["--images", str(tmp_path / "file"), "--out", str(run)], "is a file; point --images at the folder"),
        (["--images", str(tiny), "--out", str(run)], "no usable images in"),                  # 2 px: too small
        (["--images", str(subject), "--out", str(tmp_path / "file")], "--out"),
        (["--images", str(subject), "--out", str(run), "--model", str(tmp_path / "nope")], "no such file"),
        (["--images", str(subject), "--out", str(run), "--rank", "64"], "rank 64 is larger"),
        (["--images", str(subject), "--out", str(run), "--resume"], "no run to continue"),
    ]:
        assert cli.main([*base, *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv
        assert not run.exists(), argv


def test_a_run_that_failed_before_its_first_checkpoint_restarts_in_place(tmp_path, capsys, monkeypatch):
    """The corrected re-run of a run that failed before its first checkpoint starts over in the
    same folder, with or without --resume, whatever changed; its class images are kept only
    when they were drawn for the same class prompt and model."""
    import importlib

    trainer = importlib.import_module("dorabooth.train")
    model = str(save_model("sdxl", tmp_path / "model"))
    cats, dogs = make_subject(tmp_path / "cats"), make_subject(tmp_path / "dogs")
    common = ["--model", model, "--rank", "4", "--steps", "1", "--num-class-images", "1", "--class-image-steps", "1"]

    def fail_once(argv):
        def crash(*a, **k):
            raise RuntimeError("simulated crash before the first checkpoint")
        with monkeypatch.context() as m:
            m.setattr(trainer, "make_optimizer", crash)
            with pytest.raises(RuntimeError, match="simulated crash"):
                cli.main(argv)
        capsys.readouterr()

    run = tmp_path / "run"
    fail_once(["train", "--images", str(cats), "--class-noun", "dog", "--out", str(run), *common])
    assert (run / "config.json").is_file() and list((run / "class").glob("*.png")) and not (run / "checkpoints").exists()
    class_image = next((run / "class").glob("*.png")).read_bytes()
    assert cli.main(["train", "--images", str(dogs), "--class-noun", "dog", "--out", str(run), *common]) == 0
    err = capsys.readouterr().err
    assert "held a run that stopped before its first checkpoint: starting it again in place\n" in err
    assert json.loads((run / "config.json").read_text())["config"]["images"] == str(dogs)
    assert next((run / "class").glob("*.png")).read_bytes() == class_image                 # same class prompt: kept
    assert cli.main(["train", "--images", str(dogs), "--class-noun", "dog", "--out", str(run), *common]) == 1
    assert "already holds a run" in capsys.readouterr().err                                 # it has progress now

    other = tmp_path / "other"
    fail_once(["train", "--images", str(cats), "--class-noun", "cat", "--out", str(other), *common])
    assert cli.main(["train", "--resume", "--images", str(dogs), "--class-noun", "dog", "--out", str(other)]) == 0
    err = capsys.readouterr().err
    assert "differ" not in err and "class images were for other settings and are drawn again" in err
    recorded = json.loads((other / "config.json").read_text())["config"]
    assert (recorded["instance_prompt"], recorded["class_prompt"]) == ("a <s0><s1> dog", "a dog")   # not the cat's
    events = [json.loads(line)["type"] for line in (other / "events.jsonl").read_text().splitlines()]
    assert events[0] == "restart" and "error" not in events and events[-1] == "done"
    assert json.loads((other / "config.json").read_text())["config"]["class_noun"] == "dog"


def test_the_divergence_advice_works(tmp_path, capsys, monkeypatch):
    """issue 13 #6: after "loss became nan … lower --lr … --resume continues", `--resume --lr`
    was refused ("lr differ"). Now it continues with the new rate (the text encoders' rate, the
    old default, follows it) and clipping, recorded in config.json."""
    from dorabooth import losses

    model = str(save_model("sd15", tmp_path / "model"))
    subject = make_subject(tmp_path / "subject")
    run = tmp_path / "run"
    real, calls = losses.dreambooth_loss, {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss, parts = real(*args, **kw)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(losses, "dreambooth_loss", poisoned)
    argv = ["train", "--images", str(subject), "--class-noun", "dog", "--out", str(run), "--model", model,
            "--steps", "4", "--checkpoint-every", "2", "--rank", "4", "--lr", "1e-3", "--no-prior-preservation",
            "--train-text-encoders"]
    assert cli.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: training diverged: the loss became nan at step 3; it stopped and the last good checkpoint is "
        f"{run / 'checkpoints' / 'step-2'}. Lower --lr")
    assert errors[0].endswith("--resume with a lower --lr (or --max-grad-norm) continues from it")
    assert cli.main(["train", "--out", str(run), "--resume", "--lr", "2e-4", "--max-grad-norm", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 2 with lr 0.0002 (was 0.001)\n" in err and "differ" not in err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["config"]["lr"], saved["config"]["text_encoder_lr"], saved["config"]["max_grad_norm"]) == \
        (2e-4, 2e-4, 0.5)
    assert [(o["field"], o["old"], o["new"]) for o in saved["overrides"]] == \
        [("lr", 1e-3, 2e-4), ("max_grad_norm", 1.0, 0.5), ("text_encoder_lr", 1e-3, 2e-4)]
    assert (run / "adapter.safetensors").is_file()
