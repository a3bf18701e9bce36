"""``dorabooth-ui``: the Gradio page, as layout and event wiring over ``ui.handlers``.

Tabs follow the user's path: Subject → Train → Generate → Export → Analyze. Each event
calls one handler (plain functions, tested without a browser) and maps its result onto
components; every handler is wrapped by :func:`shown` so an error reaches the page as a
readable message, never a stack trace. A 1-second timer redraws the selected run from its
folder, so the page shows the same thing after a reload.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from html import escape
from types import SimpleNamespace

import gradio as gr

from . import handlers as h
from . import views
from .workspace import MAX_IMAGES, MAX_UPLOAD_BYTES, MIN_IMAGES, UserError, sanitize_name

log = logging.getLogger("dorabooth.ui")
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


def shown(fn):
    """Turn any exception into a readable message in the page (details go to the terminal)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(escape(str(e)), title="Please check", print_exception=False) from None
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            message = (f"Something went wrong: {e}. Nothing you uploaded or trained was lost; the details are in "
                       f"the terminal running dorabooth-ui.")
            raise gr.Error(escape(message), print_exception=False) from None
    return wrapper


CSS = """
.db-header h1 { margin: 0 0 2px 0; font-size: 1.6em; }
.db-header p { margin: 0; opacity: .8; }
.db-progress { margin: 4px 0 8px 0; }
.db-track { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.dark .db-track { background: var(--neutral-700); }
.db-bar { height: 100%; background: var(--color-accent); border-radius: 7px; transition: width .6s ease; }
.db-progress[data-state="finished"] .db-bar { background: #16a34a; }
.db-progress[data-state="failed"] .db-bar, .db-progress[data-state="interrupted"] .db-bar { background: #dc2626; }
.db-progress[data-state="stopped"] .db-bar { background: #d97706; }
.db-indeterminate { width: 30%; animation: db-slide 1.4s ease-in-out infinite; }
@keyframes db-slide { from { margin-left: -30%; } to { margin-left: 100%; } }
.db-progress-text { margin-top: 6px; }
.db-details { opacity: .85; margin: 4px 0; }
.db-warn { border-left: 4px solid #d97706; padding: 4px 10px; margin: 6px 0; background: rgba(217,119,6,.08); }
.db-ok { border-left: 4px solid #16a34a; padding: 4px 10px; margin: 6px 0; background: rgba(22,163,74,.08); }
.db-warn ul { margin: 2px 0 2px 18px; }
.db-plot svg text { font-size: 11px; fill: var(--body-text-color-subdued); }
.db-plot .db-axis { stroke: var(--border-color-primary); }
.db-plot .db-raw { fill: none; stroke: var(--color-accent); stroke-opacity: .3; stroke-width: 1; }
.db-plot .db-smooth { fill: none; stroke: var(--color-accent); stroke-width: 2.5; }
.db-empty { padding: 40px 10px; text-align: center; opacity: .7; border: 1px dashed var(--border-color-primary);
            border-radius: 8px; }
.db-report { width: 100%; border-collapse: collapse; margin-top: 8px; border: none !important; }
.db-report th, .db-report td { text-align: left; padding: 6px 8px; vertical-align: top; border: none !important;
                               border-bottom: 1px solid var(--border-color-primary) !important; }
.db-report tr.db-exact td:nth-child(2) { color: #16a34a; font-weight: 600; }
.db-report tr.db-approximate td:nth-child(2) { color: #d97706; font-weight: 600; }
.db-report tr.db-not-applied td:nth-child(2), .db-report tr.db-fails-to-load td:nth-child(2) { color: #dc2626;
                                                                                             font-weight: 600; }
#db-crops .fixed-height { min-height: 190px !important; max-height: none !important; }
#db-gallery .fixed-height { min-height: 280px !important; max-height: none !important; }
footer { display: none !important; }
"""

SUBJECT_INTRO = f"""Give the model a new word for your subject. Drop **{MIN_IMAGES}–{MAX_IMAGES} photos**
(JPG, PNG or WebP, up to {MAX_UPLOAD_BYTES // 2**20} MB each): different angles, backgrounds and lighting, with
the subject clearly visible. Below you see each photo cropped the way the trainer will see it."""

CHECK_TEXT = """Did training work? **Analyze** draws your training prompt and the plain class prompt a few
times each with the run: the first should show your subject, the second an ordinary one of its class (if your
subject shows up there too, it has leaked into the class). Below that, the paper's view of the same run."""

ANALYZE_TEXT = """How did training change each layer? The DoRA paper splits every weight change into a change of
**magnitude** (how large each weight row is) and of **direction** (where it points), and shows that DoRA, like full
fine-tuning, trades one against the other while LoRA moves both together. **Analyze** draws it for the run (and
the runs to compare); the result is also saved in the run folder."""


def build(ctx: h.Context) -> gr.Blocks:
    """The page: five tabs laid out into ``c`` (a namespace of components), then wired."""
    c = SimpleNamespace()
    # Uploaded files are copied into the workspace; gradio's copies are deleted after an hour.
    with gr.Blocks(title="dorabooth", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.HTML(f'<div class="db-header"><h1>dorabooth</h1><p>Teach an image model your subject from a few photos '
                f'(DreamBooth with DoRA). Base model: {escape(ctx.info.label)}. Workspace: '
                f'<code>{escape(str(ctx.workspace.root))}</code></p></div>')
        with gr.Tabs():
            with gr.Tab("1 · Subject", id="subject", elem_id="tab-subject"):
                _subject_tab(ctx, c)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train"):
                _train_tab(ctx, c)
            with gr.Tab("3 · Generate", id="generate", elem_id="tab-generate") as c.generate_tab:
                _generate_tab(ctx, c)
            with gr.Tab("4 · Export", id="export", elem_id="tab-export") as c.export_tab:
                _export_tab(ctx, c)
            with gr.Tab("5 · Analyze", id="analyze", elem_id="tab-analyze") as c.analyze_tab:
                _analyze_tab(ctx, c)
        _wire_subject(ctx, c, demo)
        _wire_train(ctx, c)
        _wire_results(ctx, c)
        _wire_export_choice(ctx, c)
    return demo


# ---- layout ------------------------------------------------------------------------------------
def _subject_tab(ctx: h.Context, c) -> None:
    gr.Markdown(SUBJECT_INTRO)
    with gr.Row():
        c.subject = gr.Dropdown(label="Subject name", allow_custom_value=True, scale=2, elem_id="db-subject",
                                info="Pick one you made before, or type a new name.")
        c.token = gr.Textbox(label="Token", value="sks", scale=1, elem_id="db-token",
                             info="A rare made-up word for your subject.")
        c.class_noun = gr.Textbox(label="Class noun", scale=1, placeholder="dog", elem_id="db-class-noun",
                                  info="What it is: dog, person, mug, …")
    samples = h.sample_subjects(ctx)
    with gr.Row(visible=bool(samples), elem_id="db-samples"):
        c.sample = gr.Dropdown(label="No photos at hand? Try a sample subject", choices=samples,
                               value=samples[0] if samples else None, scale=3,
                               info="Toy-world subjects the embedded model has never seen.")
        c.use_sample = gr.Button("Use this sample", scale=1, elem_id="db-use-sample")
    c.upload = gr.File(label="Drop photos here (many at once)", file_count="multiple",
                       file_types=[".jpg", ".jpeg", ".png", ".webp"], elem_id="db-upload", height=140)
    c.subject_summary = gr.HTML(elem_id="db-subject-summary")
    c.crops = gr.Gallery(label="Prepared crops: what the trainer will see", columns=6, object_fit="contain",
                         allow_preview=False, fit_columns=False, elem_id="db-crops")
    with gr.Row():
        c.photo = gr.Dropdown(label="Photo to remove", info="Or click a crop above.", scale=3, elem_id="db-photo")
        c.remove = gr.Button("Remove photo", scale=1, variant="secondary", elem_id="db-remove")


def _train_tab(ctx: h.Context, c) -> None:
    preset = h.preset_values(ctx, "balanced")
    c.train_intro = gr.HTML(elem_id="db-train-intro")
    c.preset = gr.Radio(label="Preset", choices=h.preset_choices(ctx), value="balanced", info=_preset_info(ctx),
                        elem_id="db-preset")
    with gr.Row():
        c.method = gr.Radio(label="Method", choices=list(h.METHOD_LABELS), value="DoRA (recommended)",
                            info="DoRA learns each weight's size and direction separately and usually beats LoRA "
                                 "at the same size. DoRA† uses half the rank: a smaller file.")
        with gr.Column():
            c.use = gr.Radio(label="Where will you use it?", choices=list(h.USES), value="Not sure", elem_id="db-use")
            c.use_note = gr.HTML(_use_note("Not sure", "DoRA (recommended)"), elem_id="db-use-note")
    c.device = gr.HTML(_device_html(ctx, h.TrainSettings()), elem_id="db-device")
    with gr.Accordion("Advanced settings", open=False, elem_id="db-advanced"):
        with gr.Row():
            c.steps = gr.Number(label="Steps", value=preset["steps"], precision=0, minimum=1, elem_id="db-steps")
            c.rank = gr.Number(label="Rank", value=preset["rank"], precision=0, minimum=1,
                               info="Adapter size: higher learns more detail, bigger file.")
            c.lr = gr.Number(label="Learning rate", value=preset["lr"])
            c.seed = gr.Number(label="Seed", value=0, precision=0)
        with gr.Row():
            c.prior = gr.Checkbox(label="Prior preservation", value=True, elem_id="db-prior",
                                  info="Also trains on images the base model draws of the class, so 'a dog' does "
                                       "not turn into your dog.")
            c.class_images = gr.Number(label="Class images", value=preset["class_images"], precision=0, minimum=1)
            c.text_encoders = gr.Checkbox(label="Train the text encoders too", value=preset["train_text_encoders"],
                                          info="Can capture a likeness faster; more likely to overfit.")
        c.instance_prompt = gr.Textbox(label="Training prompt", placeholder="(empty: a photo of <token> <class noun>)",
                                       info="What each photo is captioned with while training; it must contain "
                                            "the token.")
        auto = h.device_view(ctx, h.TrainSettings()).auto
        with gr.Row():
            c.precision = gr.Radio(label="Precision", value="auto", elem_id="db-precision",
                                   choices=[(f"auto ({views.PRECISION_NAMES.get(auto.get('precision'), '?')})", "auto"),
                                            ("fp32", "no"), ("fp16", "fp16"), ("bf16", "bf16")],
                                   info="bf16/fp16 halve the frozen weights and most activations on a GPU.")
            c.checkpointing = gr.Radio(label="Gradient checkpointing", value="auto", elem_id="db-checkpointing",
                                       choices=[(f"auto ({auto.get('checkpointing', '?')})", "auto"), ("on", "on"),
                                                ("off", "off")],
                                       info="Less memory for about a third more time per step.")
            c.optimizer = gr.Radio(label="Optimizer", value="auto", elem_id="db-optimizer",
                                   choices=[(f"auto ({views.OPTIMIZER_NAMES.get(auto.get('optimizer'), '?')})", "auto"),
                                            ("AdamW", "adamw"), ("8-bit AdamW", "adamw8bit")],
                                   info="8-bit AdamW (bitsandbytes, CUDA) keeps a quarter of the optimizer state.")
    with gr.Row():
        c.start = gr.Button("Start training", variant="primary", elem_id="db-start")
        c.stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="db-stop")
        c.resume = gr.Button("Resume", interactive=False, elem_id="db-resume")
    c.run = gr.Dropdown(label="Run", info="Every run of this subject; training continues if you close the page.",
                        elem_id="db-run")
    c.progress = gr.HTML(views.progress_html(None), elem_id="db-progress")
    c.details = gr.HTML()
    with gr.Row(equal_height=False):
        c.loss = gr.HTML(views.loss_svg([]), elem_id="db-loss")
        c.previews = gr.Gallery(label="Preview images during training", columns=4, height=260, object_fit="contain",
                                fit_columns=False, elem_id="db-previews")
    c.seen = gr.State(None)                     # what the timer last drew (redraw only on change)
    c.timer = gr.Timer(1.0)


def _generate_tab(ctx: h.Context, c) -> None:
    gr.Markdown("Make images with a trained subject. Use its token in the prompt, e.g. *a photo of sks dog on the "
                "beach*. Images are saved in the run folder.")
    c.gen_run = gr.Dropdown(label="Trained subject", elem_id="db-gen-run", info="Every finished run in the workspace.")
    c.prompt = gr.Textbox(label="Prompt", lines=2, elem_id="db-prompt")
    c.negative = gr.Textbox(label="Negative prompt (optional)", placeholder="blurry, low quality")
    with gr.Row():
        c.n = gr.Slider(1, 8, value=2, step=1, label="Number of images")
        c.gen_steps = gr.Slider(1, 100, value=ctx.info.generate["steps"], step=1, label="Steps",
                                info="More steps: more detail, slower.")
        c.guidance = gr.Slider(0, 15, value=ctx.info.generate["guidance"], step=0.5, label="Guidance",
                               info="How closely to follow the prompt.")
    with gr.Row():
        c.strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Strength",
                               info="0 = the base model, 1 = as trained.")
        c.gen_seed = gr.Number(label="Seed", value=0, precision=0)
        c.random_seed = gr.Checkbox(label="New random seed each time", value=True)
    c.generate = gr.Button("Generate", variant="primary", elem_id="db-generate")
    c.gen_note = gr.HTML()
    c.gallery = gr.Gallery(label="Images", columns=4, height="auto", object_fit="contain", fit_columns=False,
                           elem_id="db-gallery")


def _export_tab(ctx: h.Context, c) -> None:
    gr.Markdown("Download your subject for the tool you use. The report says which tools apply the file exactly as "
                "trained, which only approximately (and by how much), and which not.")
    c.exp_run = gr.Dropdown(label="Trained subject", elem_id="db-exp-run")
    c.exp_use = gr.Radio(label="Where will you use it?", choices=list(h.EXPORT_USES), elem_id="db-exp-use")
    c.exp_hint = gr.HTML(elem_id="db-exp-hint")
    with gr.Row(visible=False, elem_id="db-retrain-row") as c.retrain_row:
        c.retrain = gr.Button("Retrain for ComfyUI / A1111 / Forge (same photos and settings)", elem_id="db-retrain")
    c.fmt = gr.Radio(label="Format", choices=[(v[0], k) for k, v in h.EXPORT_FORMATS.items()], value="kohya",
                     elem_id="db-format")
    c.fmt_help = gr.Markdown(h.EXPORT_FORMATS["kohya"][1])
    c.dtype = gr.Radio(label="Precision", choices=list(h.EXPORT_DTYPES.items()), value="fp32",
                       info="fp32 keeps the adapter exactly as trained; fp16 halves a merged model's size.")
    c.export = gr.Button("Export", variant="primary", elem_id="db-export")
    c.exp_report = gr.HTML(elem_id="db-exp-report")
    c.suggestion = [c.exp_use, c.fmt, c.exp_hint, c.retrain_row]        # what _export_suggestion fills
    c.download = gr.File(label="Download", interactive=False, elem_id="db-download")


def _analyze_tab(ctx: h.Context, c) -> None:
    gr.Markdown(CHECK_TEXT)
    with gr.Row():
        c.ana_run = gr.Dropdown(label="Trained subject", elem_id="db-ana-run")
        c.ana_more = gr.Dropdown(label="Compare with (optional, for the plot below)", multiselect=True,
                                 info="e.g. a LoRA and a DoRA run of the same subject.")
    c.analyze = gr.Button("Analyze", variant="primary", elem_id="db-analyze")
    c.check_text = gr.HTML(elem_id="db-check")
    with gr.Row():
        c.check_subject = gr.Gallery(label="Your prompt: should show your subject", columns=4, height=220,
                                     object_fit="contain", allow_preview=False, elem_id="db-check-subject")
        c.check_class = gr.Gallery(label="The class prompt: should show an ordinary one", columns=4, height=220,
                                   object_fit="contain", allow_preview=False, elem_id="db-check-class")
    with gr.Accordion("How training changed each layer (the DoRA paper's magnitude/direction plot)", open=False,
                      elem_id="db-ana-more"):
        gr.Markdown(ANALYZE_TEXT)
        c.ana_axis = gr.Radio(label="Norms taken", choices=list(h.AXIS_LABELS.items()), value="out")
        c.ana_plot = gr.Image(label="Magnitude vs direction change", type="filepath", interactive=False,
                              elem_id="db-ana-plot", height=420)
        c.ana_text = gr.HTML(elem_id="db-ana-text")


# ---- wiring ------------------------------------------------------------------------------------
def _newest_or(ctx: h.Context, keep: str | None) -> tuple[list, str | None]:
    """(finished-run choices, the run to select): ``keep`` while it is still listed, else the newest."""
    choices = h.list_runs(ctx, finished_only=True)
    refs = [ref for _, ref in choices]
    return choices, (keep if keep in refs else (refs[0] if refs else None))


def _wire_subject(ctx: h.Context, c, demo: gr.Blocks) -> None:
    outputs = [c.subject, c.token, c.class_noun, c.subject_summary, c.crops, c.photo, c.train_intro,
               c.instance_prompt]

    def show(view: h.SubjectView, *, keep_typing: bool = False):
        """Values for ``outputs``. Token, class noun and prompt boxes are the user's: a reply to
        an upload or a save leaves them alone, so it cannot overwrite newer typing."""
        kept = gr.skip() if keep_typing else None
        return (gr.update(choices=h.subject_names(ctx) or [view.name], value=view.name),
                kept or view.token, kept or view.class_noun, views.subject_summary_html(view), view.previews,
                gr.update(choices=[p.name for p in view.photos], value=None), _train_intro(view),
                kept or view.instance_prompt)

    def runs_of(name: str, select: bool = True):
        choices = h.list_runs(ctx, name) if name in h.subject_names(ctx) else []
        return gr.update(choices=choices, value=choices[0][1] if choices and select else None)

    @shown
    def on_load():
        names = h.subject_names(ctx)
        view = h.open_subject(ctx, names[0]) if names else _empty_view("my-subject")
        finished, newest = _newest_or(ctx, None)             # one scan of the workspace for both lists
        fmt, hint = gr.skip(), ""                          # worked out when the Export tab opens
        return (*show(view), runs_of(view.name), gr.update(choices=finished, value=newest),
                gr.update(choices=finished, value=newest),
                gr.update(choices=h.preset_choices(ctx), info=_preset_info(ctx)),
                h.default_prompt(ctx, newest) if newest else gr.skip(), fmt, hint)

    demo.load(on_load, None, [*outputs, c.run, c.gen_run, c.exp_run, c.preset, c.prompt, c.fmt, c.exp_hint])

    @shown
    def on_subject(name):
        safe = sanitize_name(name, "subject name") if (name or "").strip() else "my-subject"
        if safe not in h.subject_names(ctx):           # a new name: keep what is typed in the other boxes
            return (*show(_empty_view(safe), keep_typing=True), runs_of(safe))
        return (*show(h.open_subject(ctx, safe)), runs_of(safe))

    c.subject.input(on_subject, c.subject, [*outputs, c.run])
    c.subject.select(on_subject, c.subject, [*outputs, c.run])

    @shown
    def on_upload(name, files, token, class_noun):
        return (*show(h.upload_photos(ctx, name or "my-subject", files or [], token, class_noun),
                      keep_typing=True), None)

    c.upload.upload(on_upload, [c.subject, c.upload, c.token, c.class_noun], [*outputs, c.upload])

    @shown
    def on_use_sample(name):
        view = h.use_sample(ctx, name)
        return (*show(view), runs_of(view.name, select=False))

    c.use_sample.click(on_use_sample, c.sample, [*outputs, c.run])

    @shown
    def on_save(name, token, class_noun):
        if not (name or "").strip():
            raise UserError("give the subject a name first")
        return show(h.save_subject(ctx, name, token, class_noun), keep_typing=True)

    for box in (c.token, c.class_noun):
        box.blur(on_save, [c.subject, c.token, c.class_noun], outputs)
        box.submit(on_save, [c.subject, c.token, c.class_noun], outputs)

    @shown
    def on_remove(name, photo):
        if not photo:
            raise UserError("choose a photo to remove (click a crop, or pick it in the list)")
        return show(h.remove_photo(ctx, name, photo), keep_typing=True)

    c.remove.click(on_remove, [c.subject, c.photo], outputs)

    def on_crop_select(evt: gr.SelectData):
        caption = (evt.value or {}).get("caption") or ""
        return caption.removeprefix("⚠ ").split(":")[0]

    c.crops.select(on_crop_select, None, c.photo)


def _wire_train(ctx: h.Context, c) -> None:
    @shown
    def on_preset(name):
        v = h.preset_values(ctx, name)
        return v["steps"], v["rank"], v["lr"]

    # .input, not .change: the page load refreshes the preset's choices, and a .change fired by that
    # refresh would reset steps/rank/lr the user has already typed (seen in CI: 4 steps became 600).
    c.preset.input(on_preset, c.preset, [c.steps, c.rank, c.lr])

    @shown
    def on_device_choice(method, rank, prior, text_encoders, precision, checkpointing, optimizer):
        settings = h.TrainSettings(method=method, rank=_int(rank, "rank"), prior_preservation=prior,
                                   train_text_encoders=text_encoders, precision=precision,
                                   checkpointing=checkpointing, optimizer=optimizer)
        return views.device_html(h.device_view(ctx, settings))

    for box in (c.use, c.method):                  # the axis the answer trains, in words
        box.change(shown(_use_note), [c.use, c.method], c.use_note, show_progress="hidden")

    device_inputs = [c.method, c.rank, c.prior, c.text_encoders, c.precision, c.checkpointing, c.optimizer]
    for box in device_inputs:                      # what the estimate depends on
        box.change(on_device_choice, device_inputs, c.device, show_progress="hidden")

    @shown
    def on_start(name, token, class_noun, preset, method, use, steps, rank, lr, seed, prior, class_images,
                 text_encoders, instance_prompt, precision, checkpointing, optimizer):
        if not (name or "").strip():
            raise UserError("name the subject and upload photos on the Subject tab first")
        subject = h.save_subject(ctx, name, token, class_noun, instance_prompt or "")
        settings = h.TrainSettings(preset=preset, method=method, use=use, rank=_int(rank, "rank"),
                                   steps=_int(steps, "steps"), lr=_float(lr, "learning rate"),
                                   prior_preservation=prior, class_images=_int(class_images, "class images"),
                                   train_text_encoders=text_encoders, seed=_int(seed, "seed") or 0,
                                   instance_prompt=instance_prompt, precision=precision,
                                   checkpointing=checkpointing, optimizer=optimizer)
        ref = h.start_training(ctx, subject.name, settings)
        return gr.update(choices=h.list_runs(ctx, subject.name), value=ref), None

    c.start.click(on_start, [c.subject, c.token, c.class_noun, c.preset, c.method, c.use, c.steps, c.rank, c.lr,
                             c.seed, c.prior, c.class_images, c.text_encoders, c.instance_prompt, c.precision,
                             c.checkpointing, c.optimizer], [c.run, c.seen])

    @shown
    def on_stop(ref):
        gr.Info(h.stop_training(ctx, ref))

    c.stop.click(on_stop, c.run, None)

    @shown
    def on_resume(ref):
        gr.Info(h.resume_training(ctx, ref))
        return None

    c.resume.click(on_resume, c.run, c.seen)

    def on_tick(ref, last):
        """Redraw the selected run from its folder; parts that did not change are skipped (no flicker)."""
        idle = (gr.update(interactive=False), gr.update(interactive=False), last)
        if not ref:
            return (views.progress_html(None), "", gr.skip(), gr.skip(), *idle)
        try:
            status = h.run_status(ctx, ref)
        except Exception as e:                         # a deleted run, a broken file: say so, keep ticking
            return (views.progress_html(None).replace("No run selected.", escape(str(e))), "", gr.skip(),
                    gr.skip(), *idle)
        key = (ref, len(status.losses), tuple(len(p) for _, p in status.samples), status.state)
        changed = key != last
        return (views.progress_html(status), views.run_details_html(status),
                views.loss_svg(status.losses, status.total) if changed else gr.skip(),
                views.sample_gallery(status) if changed else gr.skip(),
                gr.update(interactive=status.active), gr.update(interactive=status.resumable), key)

    tick_outputs = [c.progress, c.details, c.loss, c.previews, c.stop, c.resume, c.seen]
    c.timer.tick(on_tick, [c.run, c.seen], tick_outputs, show_progress="hidden", queue=False)
    c.run.change(on_tick, [c.run, c.seen], tick_outputs, show_progress="hidden")


def _wire_results(ctx: h.Context, c) -> None:
    """Generate, Export and Analyze: each lists the finished runs when its tab is opened, keeping
    the run the user picked (and their prompt, format and dtype) while it is still listed.
    Prompt and format follow the run on a user's pick (.input) or when the tab's refresh
    changes the run — never on a refresh alone, which would overwrite what the user typed."""
    @shown
    def on_generate_tab(current, prompt):
        choices, chosen = _newest_or(ctx, current)
        refill = chosen and (chosen != current or not (prompt or "").strip())
        return gr.update(choices=choices, value=chosen), h.default_prompt(ctx, chosen) if refill else gr.skip()

    c.generate_tab.select(on_generate_tab, [c.gen_run, c.prompt], [c.gen_run, c.prompt])
    c.gen_run.input(shown(lambda ref: h.default_prompt(ctx, ref) if ref else ""), c.gen_run, c.prompt)

    @shown
    def on_export_tab(current, hint):
        choices, chosen = _newest_or(ctx, current)
        again = chosen != current or not hint
        return (gr.update(choices=choices, value=chosen),
                *(_export_suggestion(ctx, chosen) if again else (gr.skip(),) * 4))

    c.export_tab.select(on_export_tab, [c.exp_run, c.exp_hint], [c.exp_run, *c.suggestion])

    @shown
    def on_analyze_tab(current, more):
        choices, chosen = _newest_or(ctx, current)
        refs = {ref for _, ref in choices}
        return (gr.update(choices=choices, value=chosen),
                gr.update(choices=choices, value=[r for r in (more or []) if r in refs]))

    c.analyze_tab.select(on_analyze_tab, [c.ana_run, c.ana_more], [c.ana_run, c.ana_more])

    @shown
    def on_generate(ref, prompt, negative, n, steps, guidance, strength, seed, random_seed):
        if not ref:
            raise UserError("no trained subject yet: train one on the Train tab first")
        result = h.generate_images(ctx, ref, prompt, negative=negative, n=int(n), steps=int(steps),
                                   guidance=float(guidance), seed=None if random_seed else _int(seed, "seed") or 0,
                                   strength=float(strength))
        last = result.seed + len(result.images) - 1
        note = (f'<div class="db-ok">{len(result.images)} image(s), seed {result.seed}'
                f'{f"–{last}" if last > result.seed else ""}, saved in '
                f'<code>{escape(str(result.images[0].parent))}</code>.</div>')
        return [(str(p), f"seed {result.seed + i}") for i, p in enumerate(result.images)], note, result.seed

    c.generate.click(on_generate, [c.gen_run, c.prompt, c.negative, c.n, c.gen_steps, c.guidance, c.strength,
                                   c.gen_seed, c.random_seed], [c.gallery, c.gen_note, c.gen_seed])

    def on_format(fmt):
        return h.EXPORT_FORMATS.get(fmt, ("", ""))[1], ("fp16" if fmt.startswith("merged") else "fp32")

    c.fmt.change(on_format, c.fmt, [c.fmt_help, c.dtype])

    @shown
    def on_export(ref, fmt, dtype):
        if not ref:
            raise UserError("no trained subject yet: train one on the Train tab first")
        outcome = h.export_run(ctx, ref, fmt, dtype)
        return views.export_report_html(outcome), str(outcome.path)

    c.export.click(on_export, [c.exp_run, c.fmt, c.dtype], [c.exp_report, c.download])

    @shown
    def on_analyze(ref, more, axis):
        if not ref:
            raise UserError("no trained subject yet: train one on the Train tab first")
        check = h.check_run(ctx, ref)
        outcome = h.analyze_runs(ctx, [ref, *(more or [])], axis)
        return (views.check_html(check), check.subject_images, check.class_images, str(outcome.plot),
                views.analysis_html(outcome))

    c.analyze.click(on_analyze, [c.ana_run, c.ana_more, c.ana_axis],
                    [c.check_text, c.check_subject, c.check_class, c.ana_plot, c.ana_text])


def _wire_export_choice(ctx: h.Context, c) -> None:
    """The Export tab's "Where will you use it?": the run's answer when it is picked, the format
    and advice for the answer, and for a run trained for diffusers exported for ComfyUI / A1111 /
    Forge the choice between the merged checkpoint and a retrain (one click, same photos and settings)."""
    c.exp_run.input(shown(lambda ref: _export_suggestion(ctx, ref)), c.exp_run, c.suggestion)
    c.exp_use.input(shown(lambda ref, use: _export_suggestion(ctx, ref, h.EXPORT_USES.get(use))),
                    [c.exp_run, c.exp_use], c.suggestion)

    @shown
    def on_retrain(ref):
        new = h.retrain_for(ctx, ref, "comfy")
        subject = new.split("/")[0]
        note = (f'<div class="db-ok">Started <b>{escape(new)}</b>: the same photos and settings, trained for '
                f'ComfyUI / A1111 / Forge. Follow it on the <b>Train</b> tab; when it finishes, export its '
                f'ComfyUI / A1111 / Forge adapter here.</div>')
        return note, gr.update(choices=h.list_runs(ctx, subject), value=new)

    c.retrain.click(on_retrain, c.exp_run, [c.exp_report, c.run])


def _export_suggestion(ctx: h.Context, ref: str | None, use: str | None = None):
    """Values for ``c.suggestion`` (answer, format, hint html, retrain row): what to export for
    ``use`` (default: what the run was trained for); no run: leave everything as it is."""
    if not ref:
        return gr.skip(), gr.skip(), "", gr.update(visible=False)
    use = use or h.run_use(ctx.workspace.run(ref))
    fmt, line, advice = h.suggested_export(ctx, ref, use)
    retrain = h.retrain_offer(advice, use)
    html = f'<div class="db-details" data-use="{escape(use)}">{escape(line)}</div>'
    if retrain:
        html = ('<div class="db-warn" data-choice="retrain">This run was trained for diffusers. For ComfyUI, A1111 '
                'or Forge, choose: <b>the merged checkpoint</b> (selected below: exact there, as large as the base '
                'model), or <b>retrain</b>: one click starts a new run with the same photos and settings, trained '
                'for these tools, whose small adapter file is exact there.</div>')
    label = next(k for k, v in h.EXPORT_USES.items() if v == use)
    return label, fmt or gr.skip(), html + views.advice_html(advice.picks, use), gr.update(visible=retrain)


def _use_note(use: str, method: str) -> str:
    advice = h.use_advice(use, h.METHOD_LABELS.get(method, {}).get("method", "dora"))
    return f'<div class="db-details">{escape(advice)}</div>'


def _device_html(ctx: h.Context, settings: h.TrainSettings) -> str:
    return views.device_html(h.device_view(ctx, settings))


def _preset_info(ctx: h.Context) -> str:
    what = " · ".join(f"{k.capitalize()}: {v['text']}" for k, v in h.PRESETS.items())
    when = ("Times are measured from your runs on this computer." if h.measured_speed(ctx)
            else "Times appear after your first run on this computer.")
    return f"Step counts for this base model. {what}. {when}"


def _empty_view(name: str) -> h.SubjectView:
    return h.SubjectView(name, "sks", "", [], [])


def _train_intro(view: h.SubjectView) -> str:
    if not view.photos:
        return ('<div class="db-warn">No photos yet: add them on the <b>Subject</b> tab first.</div>')
    what = f"“{escape(view.instance_prompt or f'a photo of {view.token} {view.class_noun or chr(8230)}')}”"
    state = ("" if view.ready else
             ' <span class="db-warn">Not ready: ' + (f"add photos (at least {MIN_IMAGES} usable)." if view.usable
                                                    < MIN_IMAGES else "set the class noun on the Subject tab.")
             + "</span>")
    return (f'<div class="db-details">Subject <b>{escape(view.name)}</b>: {view.usable} usable photos, trained '
            f'as {what}.{state}</div>')


def _int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    if float(value) != int(value):
        raise UserError(f"{what}: use a whole number")
    return int(value)


def _float(value, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: use a number, e.g. 0.0001") from None


def launch(demo: gr.Blocks, ctx: h.Context, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; files are served from the workspace only."""
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                allowed_paths=[str(ctx.workspace.root)], max_file_size=MAX_UPLOAD_BYTES, quiet=False,
                theme=gr.themes.Soft(), css=CSS, footer_links=[], ssr_mode=False, run_history=False,
                inbrowser=False)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dorabooth-ui", description="Start the dorabooth app in your browser: upload photos, train, "
                                         "generate, export.")
    parser.add_argument("--model", metavar="M", help="base model: hub id, diffusers folder or .safetensors file "
                                                     "(default: the embedded toy model)")
    parser.add_argument("--model-config", dest="model_config", metavar="DIR",
                        help="for a single .safetensors --model without internet: the diffusers folder with its "
                             "configs (as for `dorabooth train --model-config`)")
    parser.add_argument("--workspace", metavar="DIR", default="dorabooth-workspace",
                        help="where subjects, photos and runs are kept (default: ./dorabooth-workspace)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                                                            "computer only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)             # gradio's own requests, each logged
    try:
        ctx = h.make_context(args.workspace, args.model, model_config=args.model_config)
        ctx.info                                          # a missing or unreadable model fails here, readably
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"dorabooth-ui: {e}", file=sys.stderr)
        return 2
    waiting = h.recover_queue(ctx)
    if waiting:
        log.info("queued again after a restart: %s", ", ".join(waiting))
    demo = build(ctx)
    try:
        launch(demo, ctx, host=args.host, port=args.port, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
