"""The app's handler functions, called directly (no browser): uploads, the training queue,
run states read from disk, generation, export, analysis, and the page's error messages."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from dorabooth.rundir import LOCK

from ui import handlers as h
from ui import runs, views
from ui.users import Limits
from ui.workspace import UserError, Workspace, sanitize_name
from ui_fixtures import FakeTrainer, make_photos, wait_for_run


def _wait_for_state(ctx, ref, state, timeout=30.0):
    deadline = time.monotonic() + timeout
    while h.run_status(ctx, ref).state != state:
        assert time.monotonic() < deadline, f"{ref} never reached {state}"
        time.sleep(0.05)


# ---- names and uploads -------------------------------------------------------------------------
@pytest.mark.parametrize("text, safe", [("Rex the Dog!", "rex-the-dog"), ("../../etc/passwd", "etc-passwd"),
                                        ("Ünïcödé  café", "unicode-cafe"), (".hidden", "hidden"),
                                        ("a" * 80, "a" * 48)])
def test_names_are_sanitised(text, safe):
    assert sanitize_name(text) == safe


@pytest.mark.parametrize("text", ["", "   ", "../..", "ダックス"])
def test_names_without_letters_are_refused_with_a_hint(text):
    with pytest.raises(UserError, match="my-dog"):
        sanitize_name(text)


def test_uploads_are_checked_and_refused_with_reasons(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    good = make_photos(tmp_path / "up", n=3)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8100, 8100)).save(bomb)                  # 66 MP: refused before decoding
    duplicate = tmp_path / "again.png"
    duplicate.write_bytes(good[0].read_bytes())
    results = ws.add_photos("Rex", [*good, text, broken, bomb, duplicate])
    by_file = {r.file: r for r in results}
    assert [by_file[p.name].stored for p in good] == ["photo-0.png", "photo-1.png", "photo-2.png"]
    assert "JPG, PNG or WebP" in by_file["notes.txt"].problem
    assert "not a readable image" in by_file["broken.png"].problem
    assert "MP" in by_file["bomb.png"].problem
    assert "already here as photo-0.png" in by_file["again.png"].problem
    assert sorted(p.name for p in (tmp_path / "ws" / "rex" / "images").iterdir()) == \
        ["photo-0.png", "photo-1.png", "photo-2.png"]

    monkeypatch.setattr("ui.workspace.MAX_IMAGES", 4)
    monkeypatch.setattr("ui.workspace.MAX_UPLOAD_BYTES", 2000)
    more = make_photos(tmp_path / "more", n=2, seed=5)
    big = tmp_path / "big.png"
    big.write_bytes(good[1].read_bytes() + b"\0" * 3000)
    results = ws.add_photos("Rex", [*more, big])
    assert results[0].stored and "at most 4 photos" in results[1].problem
    assert "MiB" in results[2].problem


def test_photo_warnings_small_and_near_duplicate(tmp_path):
    ws = Workspace(tmp_path / "ws")
    photos = make_photos(tmp_path / "up", n=2, size=64)
    tiny = tmp_path / "tiny.png"
    Image.open(photos[0]).resize((20, 20)).save(tiny)
    resaved = tmp_path / "resaved.jpg"
    Image.open(photos[1]).save(resaved, quality=90)           # other bytes, same picture
    ws.add_photos("rex", [*photos, tiny, resaved])
    listed = {p.name: p for p in ws.photos("rex", resolution=64)}
    assert not listed["tiny.png"].usable and "too small" in listed["tiny.png"].warnings[0]
    assert any("duplicate of photo-1.png" in w for w in listed["resaved.jpg"].warnings)
    assert listed["photo-0.png"].usable and not listed["photo-0.png"].warnings


def test_paths_from_the_page_cannot_leave_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.add_photos("rex", make_photos(tmp_path / "up", n=1))
    with pytest.raises(UserError):
        ws.remove_photo("rex", "../subject.json")
    assert (tmp_path / "ws" / "rex" / "subject.json").is_file()
    for ref in ("rex/..", "rex/../../x", "../rex/x", "rex", ""):
        with pytest.raises(UserError):
            ws.run(ref)


# ---- the queue, with a stand-in trainer ----------------------------------------------------
@pytest.fixture
def fake(tmp_path, tiny_model):
    trainer = FakeTrainer()
    ctx = h.make_context(tmp_path / "ws", tiny_model, train=trainer)
    h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
    yield ctx, trainer
    trainer.release.set()
    ctx.close()


def test_one_run_at_a_time_the_next_waits_with_its_position(fake):
    ctx, trainer = fake
    first = h.start_training(ctx, "rex", h.TrainSettings(steps=3, prior_preservation=False))
    second = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=2, prior_preservation=False))
    _wait_for_state(ctx, first, runs.TRAINING)
    queued = h.run_status(ctx, second)
    assert queued.state == runs.QUEUED and queued.position == 1
    assert "next in line" in views.progress_html(queued)
    assert [ref for _, ref in h.list_runs(ctx, "rex")] == [second, first]      # newest first, queued included

    assert "Taken out of the queue" in h.stop_training(ctx, second)
    assert h.run_status(ctx, second).state == runs.STOPPED
    assert "Stopping" in h.stop_training(ctx, first)
    assert wait_for_run(ctx, first).state == runs.STOPPED
    assert trainer.started == ["001-dora-balanced"]

    h.resume_training(ctx, second)                                 # never started: starts as requested
    trainer.release.set()
    status = wait_for_run(ctx, second)
    assert status.finished and status.losses == [(1, 1.0), (2, 0.5)]
    with pytest.raises(UserError, match="only stopped, failed or interrupted"):
        h.resume_training(ctx, second)


def test_state_comes_from_the_run_folder(fake):
    """A reload, another tab or a restarted app sees the same run: nothing is kept in the page."""
    ctx, _ = fake
    run = ctx.workspace.new_run("rex", "dora-quick")
    (run / "ui-request.json").write_text(json.dumps({"config": {"method": "dora", "steps": 8}}))
    ref = ctx.workspace.ref(run)
    assert h.run_status(ctx, ref).state == runs.NOT_STARTED
    events = [{"type": "class_images", "done": 1, "total": 4},
              {"type": "start", "step": 0, "total": 8},
              {"type": "step", "step": 1, "total": 8, "loss": 0.5, "it_s": 2.0, "eta_s": 3.5},
              {"type": "checkpoint", "step": 1, "path": "c"},
              {"type": "step", "step": 2, "total": 8, "loss": 0.4, "it_s": 2.0, "eta_s": 3.0}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"type": "step", "st')
    status = h.run_status(ctx, ref)
    assert status.state == runs.INTERRUPTED and status.resumable and status.checkpoint == 1
    assert "Resume</b> continues from the checkpoint at step 1" in views.progress_html(status)
    assert status.position is None and status.step == 2 and status.losses == [(1, 0.5), (2, 0.4)]
    with open(run / "events.jsonl", "a") as f:
        f.write('ep": 3, "total": 8, "loss": 0.3}\n')               # the half-written line completes
        f.write(json.dumps({"type": "error", "message": "ValueError: rank 99 exceeds min(in, out)"}) + "\n")
    status = h.run_status(ctx, ref)
    assert status.state == runs.FAILED and status.message == "rank 99 exceeds min(in, out)"
    assert status.losses[-1] == (3, 0.3)


def test_a_waiting_run_is_queued_again_after_a_restart(fake, tmp_path, tiny_model):
    ctx, trainer = fake
    first = h.start_training(ctx, "rex", h.TrainSettings(steps=1, prior_preservation=False))
    waiting = h.start_training(ctx, "rex", h.TrainSettings(steps=1, prior_preservation=False, seed=1))
    _wait_for_state(ctx, first, runs.TRAINING)
    ctx.worker.close(timeout=5)                                    # the app stops; the first run checkpoints
    assert h.run_status(ctx, first).state == runs.STOPPED
    restarted = h.make_context(tmp_path / "ws", tiny_model, train=trainer)
    try:
        assert h.recover_queue(restarted) == [waiting]
        trainer.release.set()
        assert wait_for_run(restarted, waiting).finished
    finally:
        restarted.close()


def test_start_is_idempotent_while_the_same_run_is_live(fake):
    """A double click on Start (or a second click) queues nothing new while a run of the same
    subject and settings waits or trains; other settings, or the same after it ended, do."""
    ctx, trainer = fake
    settings = h.TrainSettings(steps=2, prior_preservation=False)
    first = h.start_training(ctx, "rex", settings)
    assert h.start_training(ctx, "rex", h.TrainSettings(steps=2, prior_preservation=False)) == first
    clicks = []                                                    # two requests at once: still one run
    threads = [threading.Thread(target=lambda: clicks.append(h.start_training(ctx, "rex", settings)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clicks == [first, first]
    other = h.start_training(ctx, "rex", h.TrainSettings(steps=2, prior_preservation=False, seed=1))
    assert other != first and h.start_training(ctx, "rex", replace(settings, seed=1)) == other   # queued: same
    assert [ref for _, ref in h.list_runs(ctx, "rex")] == [other, first]
    trainer.release.set()
    assert wait_for_run(ctx, first).finished and wait_for_run(ctx, other).finished
    again = h.start_training(ctx, "rex", settings)                 # ended: a new run with the same settings
    assert again not in (first, other) and wait_for_run(ctx, again).finished


def test_a_reload_finds_the_live_run_and_the_settings_it_was_started_with(fake):
    ctx, trainer = fake
    assert h.live_run(ctx) is None
    asked = h.TrainSettings(preset="quick", method="LoRA", use="ComfyUI / A1111 / Forge", steps=7, rank=2, lr=2e-4,
                            prior_preservation=False, seed=3, checkpointing="on", optimizer="adamw", buckets=True)
    ref = h.start_training(ctx, "rex", asked)
    waiting = h.start_training(ctx, "rex", replace(asked, seed=4))
    _wait_for_state(ctx, ref, runs.TRAINING)
    assert h.live_run(ctx) == ref                                  # the training one, not the one waiting
    assert h.run_form(ctx, ref) == asked and h.run_form(ctx, waiting) == replace(asked, seed=4)
    config = json.loads((ctx.workspace.run(ref) / "ui-request.json").read_text())["config"]
    assert (config["buckets"], config["method"], config["magnitude_axis"], config["gradient_checkpointing"]) == \
        (True, "lora", "in", True)
    trainer.release.set()
    wait_for_run(ctx, waiting)
    assert h.live_run(ctx) is None


def test_runs_are_renamed_and_deleted_but_never_while_live(fake):
    ctx, trainer = fake
    ref = h.start_training(ctx, "rex", h.TrainSettings(steps=2, prior_preservation=False))
    _wait_for_state(ctx, ref, runs.TRAINING)
    for action in (lambda: h.delete_run(ctx, ref), lambda: h.rename_run(ctx, ref, "best")):
        with pytest.raises(UserError, match="is training; press Stop"):
            action()
    assert "Stopping" in h.stop_training(ctx, ref)
    assert wait_for_run(ctx, ref).state == runs.STOPPED

    renamed = h.rename_run(ctx, ref, "First try!")
    assert renamed == "rex/001-first-try" and not (ctx.workspace.root / "rex" / "runs" / "001-dora-balanced").exists()
    assert h.rename_run(ctx, renamed, "002-first-try") == renamed                   # a typed number is not doubled
    h.resume_training(ctx, renamed)                                # the trainer is pointed at the new folder
    trainer.release.set()
    done = wait_for_run(ctx, renamed)
    assert done.finished and trainer.started[-1] == "001-first-try"

    other = h.start_training(ctx, "rex", h.TrainSettings(steps=1, prior_preservation=False, seed=1))
    wait_for_run(ctx, other)
    other = h.rename_run(ctx, other, "first try")                  # the numbers keep two names apart
    assert other == "rex/002-first-try"
    assert h.delete_run(ctx, renamed) == "Deleted rex/001-first-try."
    assert [ref for _, ref in h.list_runs(ctx, "rex")] == [other]
    assert [p.name for p in (ctx.workspace.root / "rex" / "runs").iterdir() if p.name.startswith(".")] == [".last-run"]
    with pytest.raises(UserError, match="no run called"):
        h.delete_run(ctx, renamed)
    with pytest.raises(UserError, match="no letters or digits"):
        h.rename_run(ctx, other, "!!!")
    assert h.rename_run(ctx, other, "../../escape") == "rex/002-escape"            # a name, never a path
    h.delete_run(ctx, "rex/002-escape")                          # the newest run's number is not given out again:
    assert ctx.workspace.new_run("rex", "next").name == "003-next"   # a cluster's queue knows runs by it


def test_previews_are_found_after_a_rename(fake):
    """Events record absolute sample paths; a renamed folder's previews are read from where they are now."""
    ctx, _ = fake
    run = ctx.workspace.new_run("rex", "dora-quick")
    (run / "ui-request.json").write_text(json.dumps({"config": {"method": "dora", "steps": 2}}))
    (run / "samples" / "step-2").mkdir(parents=True)
    (run / "samples" / "step-2" / "00.png").write_bytes(b"png")
    (run / "events.jsonl").write_text(json.dumps({"type": "sample", "step": 2,
                                                  "paths": [str(run / "samples" / "step-2" / "00.png")]}) + "\n")
    moved = h.rename_run(ctx, ctx.workspace.ref(run), "renamed")
    [(step, [path])] = h.run_status(ctx, moved).samples
    assert step == 2 and Path(path).is_file() and "001-renamed" in path


def test_training_needs_photos_and_a_class_noun(fake, tmp_path):
    ctx, _ = fake
    ctx.workspace.save_subject("rex", token="sks", class_noun="")
    with pytest.raises(UserError, match="class noun"):
        h.start_training(ctx, "rex", h.TrainSettings())
    h.upload_photos(ctx, "cat", make_photos(tmp_path / "cat", n=2, seed=9), "zwx", "cat")
    with pytest.raises(UserError, match="2 usable photo"):
        h.start_training(ctx, "cat", h.TrainSettings())
    with pytest.raises(ValueError, match="token"):
        ctx.workspace.save_subject("cat", token="two words", class_noun="cat")
    ctx.workspace.save_subject("rex", token="sks", class_noun="dog")
    zeros = {"steps": "steps 0: train at least 1 step", "rank": "rank 0", "class_images": "use at least 1",
             "lr": r"lr 0.0: use a positive number .*\(0, 1\]"}
    for field, message in zeros.items():                           # a 0 is refused, not replaced by the preset
        with pytest.raises(ValueError, match=message):
            h.start_training(ctx, "rex", h.TrainSettings(**{field: 0}))
    made = ctx.workspace.root / "cat" / "runs"
    assert not made.exists() or not list(made.iterdir())                    # no empty run left behind


def test_the_queue_and_generation_are_bounded(fake, monkeypatch):
    """issue 13 #2: a script could queue runs without end, and ask Generate for any number of
    steps or any seed; each is refused with the limit."""
    ctx, trainer = fake
    monkeypatch.setattr(ctx, "limits", Limits(max_queued=2))
    refs = [h.start_training(ctx, "rex", h.TrainSettings(steps=1, seed=seed, prior_preservation=False))
            for seed in (1, 2)]
    with pytest.raises(UserError, match="2 runs are training or waiting already"):
        h.start_training(ctx, "rex", h.TrainSettings(steps=1, seed=3, prior_preservation=False))
    assert len(h.list_runs(ctx, "rex")) == 2                                  # no folder for the refused one
    trainer.release.set()
    assert all(wait_for_run(ctx, ref).finished for ref in refs)
    for kwargs, message in [({"steps": 10**6}, "steps 1000000: use 1 to 1000"), ({"seed": -1}, "seed -1"),
                            ({"seed": 2**40}, "from 0 to 4294967295"), ({"guidance": float("inf")}, "guidance inf"),
                            ({"strength": 1e9}, "strength"), ({"negative": "x" * 5000}, "at most 2000 characters")]:
        with pytest.raises(UserError, match=message):
            h.generate_images(ctx, refs[0], "a sks dog", **kwargs)


def test_a_custom_training_prompt_must_name_the_token(fake):
    ctx, trainer = fake
    with pytest.raises(UserError, match="must contain the token 'sks'"):
        h.start_training(ctx, "rex", h.TrainSettings(instance_prompt="a photo of a dog"))
    ref = h.start_training(ctx, "rex", h.TrainSettings(steps=1, prior_preservation=False,
                                                       instance_prompt="  a sks  dog "))
    trainer.release.set()
    assert wait_for_run(ctx, ref).finished
    assert h.default_prompt(ctx, ref) == "a sks dog"               # Generate starts from the training prompt


def test_default_prompts_follow_the_models_phrasing(fake):
    """The toy family's captions say "a sks dog", not "a photo of …" (issue 12 #14): the app's
    example, the error's example and a queued run's recorded prompts use the model's style."""
    ctx, _ = fake
    assert h.prompt_style(ctx) == "caption"                        # tiny test models get the toy preset
    assert h.example_prompt(ctx, "sks", "dog") == "a sks dog"
    with pytest.raises(UserError, match="e.g. 'a sks dog'"):
        h.build_config(ctx, "rex", h.TrainSettings(instance_prompt="a dog"))
    config = h.build_config(ctx, "rex", h.TrainSettings())
    assert (config.instance_prompt, config.class_prompt) == ("a sks dog", "a dog")
    photo = replace(ctx.info, defaults={**ctx.info.defaults, "prompt_style": "photo"})
    assert h.example_prompt(replace(ctx, _info=photo), "sks", "dog") == "a photo of sks dog"


def test_a_sample_subject_is_copied_into_the_workspace(tmp_path, tiny_model):
    samples = tmp_path / "samples"
    photos = make_photos(samples / "blue-yellow-circle", n=4, seed=3)
    (samples / "blue-yellow-circle" / "subject.json").write_text(json.dumps(
        {"token": "ohwx", "class_noun": "circle", "instance_prompt": "a ohwx circle", "class_prompt": "a circle",
         "images": [p.name for p in photos]}))
    ctx = h.make_context(tmp_path / "ws", tiny_model, samples=samples)
    try:
        assert h.sample_subjects(ctx) == ["blue-yellow-circle"]
        view = h.use_sample(ctx, "blue-yellow-circle")
        assert (view.name, view.token, view.class_noun, view.instance_prompt) == \
            ("blue-yellow-circle", "ohwx", "circle", "a ohwx circle")
        assert view.ready and len(view.photos) == 4
        run = ctx.workspace.new_run(view.name, "check")
        config = h.build_config(ctx, view.name, h.TrainSettings(instance_prompt=view.instance_prompt), run)
        assert (config.instance_prompt, config.class_prompt) == ("a ohwx circle", "a circle")
        ctx.workspace.save_subject(view.name, token="ohwx", class_noun="ball")
        config = h.build_config(ctx, view.name, h.TrainSettings(), run)
        assert config.class_prompt == "a ball"                         # stale sample prompt: the default instead
        with pytest.raises(UserError):
            h.use_sample(ctx, "../ws")
    finally:
        ctx.close()
    plain = h.make_context(tmp_path / "ws2", tiny_model)               # not the toy model: no samples
    try:
        assert h.sample_subjects(plain) == []
    finally:
        plain.close()


def test_presets_give_real_step_counts(fake):
    ctx, _ = fake
    assert ctx.info.family == "sdxl" and ctx.info.resolution == 32
    steps = ctx.info.defaults["steps"]                             # the trainer's own default for this model
    values = {p: h.preset_values(ctx, p)["steps"] for p in h.PRESETS}
    assert values == {"quick": round(steps / 2), "balanced": steps, "best quality": round(steps * 1.5)}
    labels = [label for label, _ in h.preset_choices(ctx)]
    assert labels[0] == f"Quick — {round(steps / 2)} steps"        # no time until one run was measured


# ---- the device settings the Train tab shows ----------------------------------------------------
def test_train_tab_shows_the_resolved_device_settings(fake, tiny_model, tmp_path):
    from dorabooth.devices import DeviceInfo

    ctx, _ = fake
    view = h.device_view(ctx, h.TrainSettings())                  # this machine, the toy preset
    assert view.settings.gradient_checkpointing is False and view.auto["checkpointing"] == "off"
    assert view.settings.vae_dtype == "fp32" and view.estimate.total > 0
    html = views.device_html(view)
    assert 'data-checkpointing="false"' in html and "estimated peak memory" in html and "Why these settings" in html
    on = h.device_view(ctx, h.TrainSettings(checkpointing="on"))
    assert on.settings.gradient_checkpointing is True and on.auto["checkpointing"] == "off"   # auto is still off

    t4 = DeviceInfo("cuda", "Tesla T4", 15 * 2**30, bf16=False, fp16=True, adamw8bit_problem=None)
    gpu = h.make_context(tmp_path / "ws-gpu", tiny_model, device=t4)
    try:
        assert "on Tesla T4" in gpu.info.label
        view = h.device_view(gpu, h.TrainSettings())
        assert (view.settings.mixed_precision, view.settings.optimizer) == ("fp16", "adamw8bit")
        assert view.auto == {"precision": "fp16", "checkpointing": "off", "optimizer": "adamw8bit"}
        assert 'data-precision="fp16"' in views.device_html(view) and "8-bit AdamW" in views.device_html(view)
        refused = h.device_view(gpu, h.TrainSettings(precision="bf16"))
        assert "has no bf16 support" in refused.problem and refused.auto["precision"] == "fp16"
        assert "cannot run on Tesla T4" in views.device_html(refused)
        h.upload_photos(gpu, "rex", make_photos(tmp_path / "up-gpu"), "sks", "dog")
        run = gpu.workspace.new_run("rex", "check")
        config = h.build_config(gpu, "rex", h.TrainSettings(precision="no", optimizer="adamw", checkpointing="on"), run)
        assert (config.mixed_precision, config.optimizer, config.gradient_checkpointing) == ("no", "adamw", True)
        assert h.build_config(gpu, "rex", h.TrainSettings(), run).mixed_precision is None        # auto until it runs
        with pytest.raises(ValueError, match="no bf16 support"):
            h.build_config(gpu, "rex", h.TrainSettings(precision="bf16"), run)
        with pytest.raises(UserError, match="precision 'fp8'"):
            h.device_view(gpu, h.TrainSettings(precision="fp8"))
    finally:
        gpu.close()


# ---- a real run on the tiny model: train, generate, export, analyse -------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("trained")
    ctx = h.make_context(root / "ws", tiny_model)
    view = h.upload_photos(ctx, "Rex", make_photos(root / "up"), "sks", "dog")
    assert view.name == "rex" and view.ready and len(view.previews) == 3
    assert Image.open(view.previews[0][0]).size == (256, 256)      # 32 px crop, enlarged for display
    ref = h.start_training(ctx, "rex", h.TrainSettings(preset="quick", steps=2, class_images=2, checkpointing="on"))
    yield ctx, ref, wait_for_run(ctx, ref)
    ctx.close()


def test_training_runs_in_the_background_and_finishes(trained):
    ctx, ref, status = trained
    assert status.finished, status.message
    assert status.step == 2 and len(status.losses) == 2 and status.samples
    run = ctx.workspace.run(ref)
    assert (run / "adapter.safetensors").is_file() and (run / "config.json").is_file()
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["gradient_checkpointing"] is True and saved["mixed_precision"] in ("no", "bf16", "fp16")  # resolved
    assert "gradient checkpointing on" in views.run_details_html(status)
    assert len(list((ctx.workspace.root / "rex" / "class-images" / "dog").glob("model-*/*.png"))) == 2  # prior
    assert h.list_runs(ctx, finished_only=True) == [(f"{ref} · DoRA, 2 steps", ref)]
    assert "steps, about" in h.preset_choices(ctx)[0][0]           # measured on this machine now
    assert h.default_prompt(ctx, ref) == "a sks dog"                    # the toy-sized preset's phrasing


def test_generate_saves_images_in_the_run(trained):
    ctx, ref, _ = trained
    result = h.generate_images(ctx, ref, "a photo of sks dog", n=2, steps=2, seed=7, strength=0.5)
    assert [p.parent.name for p in result.images] == ["generated", "generated"] and result.seed == 7
    assert Image.open(result.images[0]).size == (32, 32)
    again = h.generate_images(ctx, ref, "a photo of sks dog", n=1, steps=2, seed=None)
    assert 0 <= again.seed < 2**31
    with pytest.raises(UserError, match="write a prompt"):
        h.generate_images(ctx, ref, "  ")


@pytest.mark.parametrize("fmt, name", [("kohya", "sks-dog_dora_kohya_fp32.safetensors"),
                                       ("merged-diffusers", "sks-dog_dora_merged-diffusers_fp32.zip")])
def test_export_writes_a_download_with_a_report(trained, fmt, name):
    ctx, ref, _ = trained                              # trained for "Not sure": axis in
    outcome = h.export_run(ctx, ref, fmt, "fp32")
    assert outcome.path.name == name and outcome.path.stat().st_size > 0
    assert ctx.workspace.run(ref) in outcome.path.parents
    if fmt == "kohya":
        verdict = {v["consumer"]: v for v in outcome.report}["diffusers"]
        assert verdict["applied"] == verdict["total"] > 0 and verdict["status"] == "approximate"
    html = views.export_report_html(outcome)
    assert name in html and ("Tool" in html or "every tool" in html)
    with pytest.raises(UserError, match="diffusers format cannot hold"):
        h.export_run(ctx, ref, "diffusers-lora")


def test_analysis_plot_of_a_run(trained):
    ctx, ref, _ = trained
    outcome = h.analyze_runs(ctx, [ref], "out")
    assert outcome.plot.is_file() and outcome.panels[0]["label"].startswith("DoRA")
    assert "Slope" in views.analysis_html(outcome)


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path, tiny_model):
    """The real trainer: Stop after step 2 keeps a checkpoint; Resume continues to the end."""
    from dorabooth import train

    def stop_after_two(config, on_event=None, stop=None):
        def watch(event):
            if event["type"] == "step" and event["step"] == 2 and not config.resume:
                stop.set()
        return train(config, on_event=watch, stop=stop)

    ctx = h.make_context(tmp_path / "ws", tiny_model, train=stop_after_two)
    try:
        h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
        ref = h.start_training(ctx, "rex", h.TrainSettings(steps=4, prior_preservation=False))
        stopped = wait_for_run(ctx, ref)
        assert stopped.state == runs.STOPPED and stopped.step == 2 and stopped.checkpoint == 2
        assert "Resume</b> continues from the checkpoint at step 2" in views.progress_html(stopped)
        busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "another trainer"
        try:
            (ctx.workspace.run(ref) / LOCK).write_text(f"{socket.gethostname()}:{busy.pid}")
            with pytest.raises(UserError, match="being trained right now by another process"):
                h.resume_training(ctx, ref)
        finally:
            busy.kill()
            busy.wait()
        h.resume_training(ctx, ref)                     # its lock is stale now: taken over
        done = wait_for_run(ctx, ref)
        assert done.finished, done.message
        assert [s for s, _ in done.losses] == [1, 2, 3, 4]
    finally:
        ctx.close()


def test_unfinished_runs_cannot_be_used(fake):
    ctx, _ = fake
    ref = h.start_training(ctx, "rex", h.TrainSettings(steps=5, prior_preservation=False))
    with pytest.raises(UserError, match="no trained adapter yet"):
        h.generate_images(ctx, ref, "a photo of sks dog")
    with pytest.raises(UserError, match="no trained adapter yet"):
        h.export_run(ctx, ref, "kohya")


# ---- what the page shows -----------------------------------------------------------------------
def test_views_say_what_happens_in_plain_words():
    status = runs.RunStatus(Path("r"), runs.TRAINING, position=0, step=3, total=10, it_s=2.0, eta_s=3.5,
                            losses=[(1, 1.0), (2, 0.8), (3, 0.9)])
    html = views.progress_html(status)
    assert 'data-state="training"' in html and "step 3 / 10" in html and "0:04 left" in html
    assert "<polyline" in views.loss_svg(status.losses, 10)
    failed = runs.RunStatus(Path("r"), runs.FAILED, message="<script>alert(1)</script>")
    assert "<script>" not in views.progress_html(failed)
    assert "loss curve appears" in views.loss_svg([])


def test_page_problems_are_one_note_never_error_badges():
    """A handler's problem goes to its note as one message, every other output untouched; no
    gr.Error (gradio would put a red badge over every output: the fields to fix)."""
    pytest.importorskip("gradio")
    from ui.app import on

    wired = {}

    def event(fn, inputs, outputs, **kwargs):                      # stands in for e.g. button.click
        wired.update(fn=fn, outputs=outputs, kwargs=kwargs)

    note, box, other = object(), object(), object()

    def handler(kind):
        if kind == "mistake":
            raise UserError("the token is empty: type one rare made-up word, such as 'sks'")
        if kind == "bug":
            raise KeyError("boom")
        return "value", "more"

    on(event, handler, ["kind"], [box, other], note, trigger_mode="once")
    assert wired["outputs"] == [box, other, note]
    assert wired["kwargs"] == {"trigger_mode": "once", "show_progress_on": [box, other]}   # no spinner on the note
    assert wired["fn"]("fine") == ("value", "more", "")                 # success clears the note
    mistake = wired["fn"]("mistake")
    assert list(mistake) == [note] and "db-problem" in mistake[note] and "the token is empty" in mistake[note]
    bug = wired["fn"]("bug")
    assert "Something went wrong" in bug[note] and "Traceback" not in bug[note]

    on(event, lambda: "<b>done</b>", [], box, box)                     # a handler that writes its own note
    assert wired["outputs"] == [box] and wired["fn"]() == "<b>done</b>"


def test_the_loss_curve_is_smoothed_from_its_first_value_with_a_robust_range():
    assert views.smoothed([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])   # no climb from 0
    first = views.smoothed([1.0, 0.0], span=3)
    assert first[0] == 1.0 and 0 < first[1] < 1
    losses = [(i, 0.1 + 0.01 * (i % 3)) for i in range(1, 100)] + [(100, 5.0)]     # one spike
    lo, hi = views.loss_range([v for _, v in losses], views.smoothed([v for _, v in losses], 12))
    assert 0 < lo < 0.1 and 0.12 < hi < 1.0                        # the spike does not flatten the rest
    svg = views.loss_svg(losses, 200)
    assert ">loss</text>" in svg and ">step</text>" in svg and 'data-first-smoothed="0.11"' in svg


def test_blank_and_cut_off_photos_are_flagged_on_the_subject_tab(tmp_path):
    import numpy as np

    ws = Workspace(tmp_path / "ws")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (96, 96), (252, 252, 250)).save(blank)
    wide = np.full((100, 200, 3), 235, np.uint8)
    wide[35:65, 20:180] = (30, 60, 200)                            # a long subject, side on
    Image.fromarray(wide).save(tmp_path / "wide.png")
    ws.add_photos("rex", [*make_photos(tmp_path / "up", n=2), blank, tmp_path / "wide.png"])
    listed = {p.name: p for p in ws.photos("rex", resolution=32)}
    assert listed["blank.png"].warnings == ["looks blank (nearly one colour all over): is the subject in it?"]
    assert re.match(r"the square crop cuts off about 3[78]% of the subject", listed["wide.png"].warnings[0])  # 60/160
    assert "aspect-ratio buckets" in listed["wide.png"].warnings[0]
    assert not listed["photo-0.png"].warnings and all(p.usable for p in listed.values())   # warnings only


def test_console_script_reports_a_missing_model(tmp_path, capsys):
    pytest.importorskip("gradio")
    from ui.app import main

    assert main(["--model", str(tmp_path / "nope"), "--workspace", str(tmp_path / "ws")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_full_fine_tune_from_the_command_line_exports_as_a_merged_checkpoint(tmp_path, tiny_model):
    """A `dorabooth train --method full` run written into the workspace: the app lists it,
    suggests the merged checkpoint and exports it; adapter formats are refused with the reason."""
    from dorabooth import TrainConfig, train

    ctx = h.make_context(tmp_path / "ws", tiny_model)
    try:
        h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
        train(TrainConfig(images=str(tmp_path / "up"), class_noun="dog", out=str(tmp_path / "ws/rex/runs/001-full"),
                          model=tiny_model, method="full", steps=2, prior_preservation=False, sample_every=0))
        ref = "rex/001-full"
        assert ref in [r for _, r in h.list_runs(ctx, finished_only=True)]
        fmt, why, _ = h.suggested_export(ctx, ref)
        assert fmt == "merged-single-file" and "whole model" in why
        outcome = h.export_run(ctx, ref, fmt)
        assert outcome.path.is_file() and outcome.path.suffix == ".safetensors"
        with pytest.raises(ValueError, match="not an adapter"):
            h.export_run(ctx, ref, "kohya")
    finally:
        ctx.close()
