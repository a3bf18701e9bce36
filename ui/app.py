"""``dorabooth-ui``: the Gradio page, as layout and event wiring over ``ui.handlers``.

Tabs follow the user's path: Subject → Train → Generate → Export → Analyze. Each event
calls one handler (plain functions, tested without a browser) and maps its result onto
components; :func:`on` wires each one so that a problem becomes one plain message in a note
beside the controls that caused it (never a stack trace, never gradio's error badges over
the form). A 1-second timer redraws the selected run from its folder, so the page shows the
same thing after a reload; a reload while a run trains opens the Train tab with that run's
settings.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import signal
import sys
from dataclasses import asdict
from html import escape
from types import SimpleNamespace

import gradio as gr

from dorabooth.quiet import quiet_libraries

from . import handlers as h
from . import views
from .users import MAX_QUEUED, Limits, check_logins
from .security import check_exposure, is_loopback, private_upload_folder, read_auth, received_uploads
from .store import check_store
from .workspace import MAX_IMAGES, MAX_UPLOAD_BYTES, MIN_IMAGES, UserError, sanitize_name

log = logging.getLogger("dorabooth.ui")
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


def shown(fn, note):
    """``fn`` with its problems turned into a message for the component ``note``.

    A mistake the user can fix (``UserError`` and the like) returns ``{note: message}``, so
    every other output stays as it was; anything else is logged to the terminal and
    reported the same way. No ``gr.Error``: gradio marks every output of a failed event with
    a red "Error" badge, which covers the very field to fix.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            return {note: views.note_html(str(e))}
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            return {note: views.note_html(f"Something went wrong: {e}. Nothing you uploaded or trained was lost; "
                                          f"the details are in the terminal running dorabooth-ui.")}
    return wrapper


def on(event, fn, inputs, outputs, note, **kwargs):
    """Wire ``fn`` to ``event`` (e.g. ``button.click``): its result goes to ``outputs``, a
    problem to ``note`` (:func:`shown`), and a success clears ``note``, unless ``fn`` writes
    ``note`` itself (``note`` among ``outputs``)."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    writes_note = any(o is note for o in outputs)
    safe = shown(fn, note)

    @functools.wraps(fn)
    def handler(*args):
        result = safe(*args)
        if writes_note or isinstance(result, dict):
            return result
        if not outputs:
            return ""
        return (result, "") if len(outputs) == 1 else (*result, "")

    # No progress overlay on the note: on an empty note it takes room, shifting the page under the
    # pointer (a click on "Use this sample" that blurred the class noun box was lost that way).
    shown_on = [o for o in outputs if o is not note]
    if shown_on:
        kwargs.setdefault("show_progress_on", shown_on)
    else:
        kwargs.setdefault("show_progress", "hidden")
    return event(handler, inputs, outputs if writes_note else [*outputs, note], **kwargs)


def per_user(app: h.Context, fn):
    """``fn(ctx, *inputs)`` as an event function: ``ctx`` is the context of the user who sent the
    event (``app.for_user``: their own workspace when users are kept apart, ``ui.users``)."""
    def event(request: gr.Request, *inputs):
        return fn(app.for_user(request.username if request is not None else None), *inputs)

    event.__name__ = event.__qualname__ = fn.__name__       # gradio names the event's API route after it
    return event


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
.db-problem { border-left: 4px solid #dc2626; padding: 6px 10px; margin: 4px 0; background: rgba(220,38,38,.08); }
.db-info { border-left: 4px solid var(--color-accent); padding: 6px 10px; margin: 4px 0;
           background: rgba(99,102,241,.08); }
.db-section { font-weight: 600; margin: 6px 0 2px 0; }
.db-plot svg text { font-size: 13px; fill: var(--body-text-color-subdued); }
.db-plot .db-axis { stroke: var(--border-color-primary); }
.db-plot .db-grid { stroke: var(--border-color-primary); stroke-opacity: .5; stroke-dasharray: 3 3; }
.db-plot svg { overflow: visible; }
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
        with gr.Tabs(elem_id="db-tabs") as c.tabs:
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
    c.subject_note = gr.HTML(elem_id="db-subject-note")      # problems with the boxes above, in words
    samples = h.sample_subjects(ctx)
    with gr.Row(visible=bool(samples), elem_id="db-samples"):
        # radio buttons, not a dropdown: tabbing out of the class noun would open a dropdown's list over the form
        c.sample = gr.Radio(label="No photos at hand? Try a sample subject", choices=samples,
                            value=samples[0] if samples else None, scale=3, elem_id="db-sample",
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
    c.photo_note = gr.HTML(elem_id="db-photo-note")


def _train_tab(ctx: h.Context, c) -> None:
    preset = h.preset_values(ctx, "balanced")
    c.train_intro = gr.HTML(elem_id="db-train-intro")
    c.preset = gr.Radio(label="Preset", choices=h.preset_choices(ctx), value="balanced", info=_preset_info(ctx),
                        elem_id="db-preset")
    with gr.Row():
        c.method = gr.Radio(label="Method", choices=list(h.METHOD_LABELS), value="DoRA (recommended)",
                            elem_id="db-method",
                            info="DoRA learns each weight's size and direction separately and usually beats LoRA "
                                 "at the same size. DoRA† uses half the rank: a smaller file. DVoRA trains only "
                                 "scaling vectors on frozen random matrices: far fewer trained parameters; it "
                                 "exports as an ordinary DoRA file.")
        with gr.Column():
            c.use = gr.Radio(label="Where will you use it?", choices=list(h.USES), value="Not sure", elem_id="db-use")
            c.use_note = gr.HTML(_use_note("Not sure", "DoRA (recommended)"), elem_id="db-use-note")
    c.device = gr.HTML(_device_html(ctx, h.TrainSettings()), elem_id="db-device")
    with gr.Accordion("Advanced settings", open=False, elem_id="db-advanced") as c.advanced:
        with gr.Row():
            # no minimum=: gradio would refuse a 0 with error badges over the whole tab; the trainer's
            # own check says "steps 0: train at least 1 step" in the note instead
            c.steps = gr.Number(label="Steps", value=preset["steps"], precision=0, elem_id="db-steps")
            c.rank = gr.Number(label="Rank", value=preset["rank"], precision=0, elem_id="db-rank",
                               info=RANK_INFO["dora"])
            c.lr = gr.Number(label="Learning rate", value=preset["lr"])
            c.seed = gr.Number(label="Seed", value=0, precision=0)
        with gr.Row():
            c.prior = gr.Checkbox(label="Prior preservation", value=True, elem_id="db-prior",
                                  info="Also trains on images the base model draws of the class, so 'a dog' does "
                                       "not turn into your dog.")
            c.class_images = gr.Number(label="Class images", value=preset["class_images"], precision=0)
            c.text_encoders = gr.Checkbox(label="Train the text encoders too", value=preset["train_text_encoders"],
                                          info="Can capture a likeness faster; more likely to overfit.")
        _adapter_fields(c, preset["targets"], preset["pivotal"])
        c.instance_prompt = gr.Textbox(label="Training prompt", placeholder=f"(empty: {h.example_prompt(ctx, '<token>', '<class noun>')})",
                                       info="What each photo is captioned with while training; it must contain "
                                            "the token.")
        auto = h.device_view(ctx, h.TrainSettings()).auto
        gr.HTML('<div class="db-section">Speed and memory</div><div class="db-details">“auto” is what the trainer '
                'picks for this device and model (in brackets); the line above the settings says why.</div>')
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
        c.buckets = gr.Checkbox(label="Aspect-ratio buckets", value=False, elem_id="db-buckets",
                                info="Train wide and tall photos at their own shape (about the same pixel count) "
                                     "instead of cropping a square from the middle. Off: the trainer's default.")
    with gr.Row():
        c.start = gr.Button("Start training", variant="primary", elem_id="db-start")
        c.stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="db-stop")
        c.resume = gr.Button("Resume", interactive=False, elem_id="db-resume")
    c.train_note = gr.HTML(elem_id="db-train-note")
    with gr.Row(equal_height=True):
        # allow_custom_value: the timer sends the selected run every second, and a value that a rename or
        # delete just took out of the choices would otherwise fail gradio's own check with "Error" badges
        # (the handlers say "no run called …" instead)
        c.run = gr.Dropdown(label="Run", info="Every run of this subject; training continues if you close the page.",
                            elem_id="db-run", scale=3, allow_custom_value=True)
        c.new_name = gr.Textbox(label="New name", placeholder="e.g. long-ears", elem_id="db-new-name", scale=2,
                                info="Renames the selected run (its number stays).")
        with gr.Column(scale=1, min_width=120):
            c.rename = gr.Button("Rename", elem_id="db-rename", size="sm")
            c.delete = gr.Button("Delete…", elem_id="db-delete", size="sm")
    with gr.Row(visible=False, elem_id="db-confirm") as c.confirm:
        c.confirm_text = gr.HTML(scale=3)
        c.confirm_delete = gr.Button("Yes, delete it", variant="stop", elem_id="db-confirm-delete", scale=1)
        c.cancel_delete = gr.Button("Cancel", elem_id="db-cancel-delete", scale=1)
    c.run_note = gr.HTML(elem_id="db-run-note")
    c.progress = gr.HTML(views.progress_html(None), elem_id="db-progress")
    c.details = gr.HTML()
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c.previews_title = gr.HTML(views.previews_title(None), elem_id="db-previews-title")
            # no label: gradio draws it over the first image
            c.previews = gr.Gallery(show_label=False, columns=3, height=330, object_fit="contain",
                                    fit_columns=False, elem_id="db-previews")
        with gr.Column(scale=2):
            c.loss = gr.HTML(views.loss_svg([]), elem_id="db-loss")
    # the form, by TrainSettings field: on_start reads it, a reload during training restores it
    c.form = dict(preset=c.preset, method=c.method, use=c.use, rank=c.rank, steps=c.steps, lr=c.lr,
                  prior_preservation=c.prior, class_images=c.class_images, train_text_encoders=c.text_encoders,
                  seed=c.seed, instance_prompt=c.instance_prompt, precision=c.precision,
                  checkpointing=c.checkpointing, optimizer=c.optimizer, buckets=c.buckets, targets=c.targets,
                  quantize_base=c.quantize, pivotal=c.pivotal)
    c.method_was = gr.State(c.method.value)     # the method the rank box was filled for (h.rank_for_method)
    c.seen = gr.State(None)                     # what the timer last drew (redraw only on change)
    c.timer = gr.Timer(1.0)


RANK_INFO = {"dora": "Adapter size: higher learns more detail, bigger file.",
             "dvora": "DVoRA: its frozen random matrices' size; a higher rank trains hardly more."}


def _adapter_fields(c, targets: str, pivotal: bool) -> None:
    """Advanced: which layers the adapter trains (Conv DoRA among them; ``targets``, the model's
    default, preselected) and the frozen base in 4 bit (QDoRA), with one note beside them for
    choices the trainer refuses (e.g. DVoRA on convolutions)."""
    gr.HTML('<div class="db-section">Adapter</div>')
    with gr.Row(elem_id="db-adapter-row"):
        c.targets = gr.Radio(label="Layers to adapt", value=targets, elem_id="db-targets", scale=2,
                             choices=[(views.TARGET_NAMES[t], t) for t in h.TARGETS],
                             info="Preselected: this model's default (attention on SD/SDXL, every linear layer "
                                  "on the toy model). With convolutions (Conv DoRA, also called LoCon) the ResNet "
                                  "convolutions "
                                  "train too: a larger file (at the same rank about 4× on SD 1.5, 1.2× on SDXL); "
                                  "ComfyUI, A1111, Forge and diffusers load it.")
        c.quantize = gr.Radio(label="Frozen base weights", value="none", elem_id="db-quantize", scale=1,
                              choices=[(views.QUANTIZE_NAMES[q], q) for q in h.QUANTIZE],
                              info="4-bit NF4 (QDoRA) holds the adapted layers' frozen weights in 4 bit: less "
                                   "memory, slower steps. Needs dorabooth[qdora].")
        c.pivotal = gr.Checkbox(label="Pivotal tuning", value=pivotal, elem_id="db-pivotal", scale=1,
                                info="Trains two new words for the subject (<s0><s1>; prompts with your token "
                                     "use them) beside the adapter; exports add a small embeddings file to use "
                                     "with it. Preselected: this model's default (on for the toy model).")
    c.adapter_note = gr.HTML(elem_id="db-adapter-note")     # the trainer's refusal of these choices, in words


def _generate_tab(ctx: h.Context, c) -> None:
    gr.Markdown("Make images with a trained subject. Use its token in the prompt, e.g. *a photo of sks dog on the "
                "beach*. Images are saved in the run folder.")
    c.gen_run = gr.Dropdown(label="Trained subject", elem_id="db-gen-run", info="Every finished run in the workspace.",
                            allow_custom_value=True)                 # a run deleted meanwhile: a note, no badges
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
    c.gen_note = gr.HTML(elem_id="db-gen-note")
    c.gallery = gr.Gallery(label="Images", columns=4, height="auto", object_fit="contain", fit_columns=False,
                           elem_id="db-gallery")


def _export_tab(ctx: h.Context, c) -> None:
    gr.Markdown("Download your subject for the tool you use. The report says which tools apply the file exactly as "
                "trained, which only approximately (and by how much), and which not.")
    c.exp_run = gr.Dropdown(label="Trained subject", elem_id="db-exp-run",
                            allow_custom_value=True)                 # a run deleted meanwhile: a note, no badges
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
    c.exp_note = gr.HTML(elem_id="db-exp-note")
    c.exp_report = gr.HTML(elem_id="db-exp-report")
    c.suggestion = [c.exp_use, c.fmt, c.exp_hint, c.retrain_row]        # what _export_suggestion fills
    c.download = gr.File(label="Download", interactive=False, elem_id="db-download")


def _analyze_tab(ctx: h.Context, c) -> None:
    gr.Markdown(CHECK_TEXT)
    with gr.Row():
        c.ana_run = gr.Dropdown(label="Trained subject", elem_id="db-ana-run",
                                allow_custom_value=True)             # a run deleted meanwhile: a note, no badges
        c.ana_more = gr.Dropdown(label="Compare with (optional, for the plot below)", multiselect=True,
                                 info="e.g. a LoRA and a DoRA run of the same subject.")
    c.analyze = gr.Button("Analyze", variant="primary", elem_id="db-analyze")
    c.ana_note = gr.HTML(elem_id="db-ana-note")
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


def _wire_subject(app: h.Context, c, demo: gr.Blocks) -> None:
    u = functools.partial(per_user, app)
    outputs = [c.subject, c.token, c.class_noun, c.subject_summary, c.crops, c.photo, c.train_intro,
               c.instance_prompt]

    def show(ctx: h.Context, view: h.SubjectView, *, keep_typing: bool = False):
        """Values for ``outputs``. Token, class noun and prompt boxes are the user's: a reply to
        an upload or a save leaves them alone, so it cannot overwrite newer typing."""
        kept = gr.skip() if keep_typing else None
        return (gr.update(choices=h.subject_names(ctx) or [view.name], value=view.name),
                kept or view.token, kept or view.class_noun, views.subject_summary_html(view), view.previews,
                gr.update(choices=[p.name for p in view.photos], value=None), _train_intro(ctx, view),
                kept or view.instance_prompt)

    def runs_of(ctx: h.Context, name: str, select: bool | str = True):
        """The run list of a subject: the newest run selected, or the run ``select`` names."""
        choices = h.list_runs(ctx, name) if name in h.subject_names(ctx) else []
        chosen = select if isinstance(select, str) else (choices[0][1] if choices and select else None)
        return gr.update(choices=choices, value=chosen)

    # the form boxes a reload restores; the preset and the prompt have their own places in on_load's outputs
    restored = [name for name in c.form if name not in ("preset", "instance_prompt")]

    def on_load(ctx):
        """The newest subject, or, while a run trains or waits, that run: its subject, its
        settings in the form and the Train tab (so a reload shows what is going on)."""
        live = h.live_run(ctx)
        form = h.run_form(ctx, live) if live else None
        names = h.subject_names(ctx)
        name = live.split("/")[0] if live else (names[0] if names else None)
        view = h.open_subject(ctx, name) if name else _empty_view("my-subject")
        finished, newest = _newest_or(ctx, None)             # one scan of the workspace for both lists
        fmt, hint = gr.skip(), ""                          # worked out when the Export tab opens
        values = asdict(form) if form else {}
        return (*show(ctx, view), runs_of(ctx, view.name, live or True), gr.update(choices=finished, value=newest),
                gr.update(choices=finished, value=newest),
                gr.update(choices=h.preset_choices(ctx), info=_preset_info(ctx), **_value(values, "preset")),
                h.default_prompt(ctx, newest) if newest else gr.skip(), fmt, hint,
                gr.Tabs(selected="train") if live else gr.skip(), gr.update(open=True) if form else gr.skip(),
                _value(values, "method").get("value", gr.skip()),
                *(_value(values, name).get("value", gr.skip()) for name in restored))

    on(demo.load, u(on_load), None, [*outputs, c.run, c.gen_run, c.exp_run, c.preset, c.prompt, c.fmt, c.exp_hint,
                                  c.tabs, c.advanced, c.method_was, *(c.form[name] for name in restored)],
       c.subject_note)

    def on_subject(ctx, name):
        safe = sanitize_name(name, "subject name") if (name or "").strip() else "my-subject"
        if safe not in h.subject_names(ctx):           # a new name: keep what is typed in the other boxes
            return (*show(ctx, _empty_view(safe), keep_typing=True), runs_of(ctx, safe))
        return (*show(ctx, h.open_subject(ctx, safe)), runs_of(ctx, safe))

    on(c.subject.input, u(on_subject), c.subject, [*outputs, c.run], c.subject_note)
    on(c.subject.select, u(on_subject), c.subject, [*outputs, c.run], c.subject_note)

    def on_upload(ctx, name, files, token, class_noun):
        files = received_uploads(demo, files or [])
        return (*show(ctx, h.upload_photos(ctx, name or "my-subject", files, token, class_noun),
                      keep_typing=True), None)

    on(c.upload.upload, u(on_upload), [c.subject, c.upload, c.token, c.class_noun], [*outputs, c.upload],
       c.subject_note)

    def on_use_sample(ctx, name):
        view = h.use_sample(ctx, name)
        return (*show(ctx, view), runs_of(ctx, view.name, select=False))

    on(c.use_sample.click, u(on_use_sample), c.sample, [*outputs, c.run], c.subject_note)

    def on_save(ctx, name, token, class_noun):
        if not (name or "").strip():
            raise UserError("give the subject a name first")
        return show(ctx, h.save_subject(ctx, name, token, class_noun), keep_typing=True)

    for box in (c.token, c.class_noun):
        on(box.blur, u(on_save), [c.subject, c.token, c.class_noun], outputs, c.subject_note)
        on(box.submit, u(on_save), [c.subject, c.token, c.class_noun], outputs, c.subject_note)

    def on_remove(ctx, name, photo):
        if not photo:
            raise UserError("choose a photo to remove (click a crop, or pick it in the list)")
        return show(ctx, h.remove_photo(ctx, name, photo), keep_typing=True)

    on(c.remove.click, u(on_remove), [c.subject, c.photo], outputs, c.photo_note)

    def on_crop_select(evt: gr.SelectData):
        caption = (evt.value or {}).get("caption") or ""
        return caption.removeprefix("⚠ ").split(":")[0]

    c.crops.select(on_crop_select, None, c.photo)


def _wire_train(app: h.Context, c) -> None:
    u = functools.partial(per_user, app)

    def on_preset(ctx, name, method):
        v = h.preset_values(ctx, name)
        return v["steps"], h.default_rank(ctx, name, method), v["lr"]

    # .input, not .change: the page load refreshes the preset's choices, and a .change fired by that
    # refresh would reset steps/rank/lr the user has already typed (seen in CI: 4 steps became 600).
    on(c.preset.input, u(on_preset), [c.preset, c.method], [c.steps, c.rank, c.lr], c.train_note)

    def on_method(ctx, preset, before, method, rank):
        """DVoRA's own default rank in the box, unless the user typed one (h.rank_for_method)."""
        rank = h.rank_for_method(ctx, preset, before, method, _int(rank, "rank"))
        kind = "dvora" if h.METHOD_LABELS.get(method, {}).get("method") == "dvora" else "dora"
        return gr.update(value=rank, info=RANK_INFO[kind]), method

    on(c.method.input, u(on_method), [c.preset, c.method_was, c.method, c.rank], [c.rank, c.method_was], c.train_note)

    def on_device_choice(ctx, method, rank, prior, text_encoders, precision, checkpointing, optimizer, targets,
                         quantize, pivotal):
        settings = h.TrainSettings(method=method, rank=_int(rank, "rank"), prior_preservation=prior,
                                   train_text_encoders=text_encoders, precision=precision,
                                   checkpointing=checkpointing, optimizer=optimizer, targets=targets,
                                   quantize_base=quantize, pivotal=bool(pivotal))
        view = h.device_view(ctx, settings)
        # a refusal (e.g. DVoRA with convolutions) is said beside the Advanced fields: open them
        return views.device_html(view), views.adapter_note_html(view), gr.update(open=True) if view.refused else gr.skip()

    for box in (c.use, c.method):                  # the axis the answer trains, in words
        on(box.change, _use_note, [c.use, c.method], c.use_note, c.train_note, show_progress="hidden")

    device_inputs = [c.method, c.rank, c.prior, c.text_encoders, c.precision, c.checkpointing, c.optimizer,
                     c.targets, c.quantize, c.pivotal]
    for box in device_inputs:                      # what the estimate depends on
        on(box.change, u(on_device_choice), device_inputs, [c.device, c.adapter_note, c.advanced], c.train_note,
           show_progress="hidden")

    form = list(c.form.values())

    def on_start(ctx, name, token, class_noun, *values):
        if not (name or "").strip():
            raise UserError("name the subject and upload photos on the Subject tab first")
        subject = h.save_subject(ctx, name, token, class_noun, dict(zip(c.form, values))["instance_prompt"] or "")
        before = {ref for _, ref in h.list_runs(ctx, subject.name)}
        ref = h.start_training(ctx, subject.name, _settings(c, values))
        note = (views.note_html("A run with these settings is already training or waiting: it is shown below, and "
                                "no second one was queued.", problem=False) if ref in before else "")
        return gr.update(choices=h.list_runs(ctx, subject.name), value=ref), None, note

    # one Start at a time, and no clicks while one is handled: a double click queues one run
    on(c.start.click, u(on_start), [c.subject, c.token, c.class_noun, *form], [c.run, c.seen, c.train_note],
       c.train_note, concurrency_limit=1, trigger_mode="once")

    on(c.stop.click, u(lambda ctx, ref: views.note_html(h.stop_training(ctx, ref), problem=False)), c.run,
       [c.train_note], c.train_note)
    on(c.resume.click, u(lambda ctx, ref: (None, views.note_html(h.resume_training(ctx, ref), problem=False))),
       c.run, [c.seen, c.train_note], c.train_note)

    # ---- rename and delete the selected run (not while it trains or waits) -----------------------
    def on_rename(ctx, ref, name):
        if not (name or "").strip():
            raise UserError("type the run's new name first")
        renamed = h.rename_run(ctx, ref, name)
        return (gr.update(choices=h.list_runs(ctx, renamed.split("/")[0]), value=renamed), "",
                views.note_html(f"Renamed to {renamed}.", problem=False))

    for event in (c.rename.click, c.new_name.submit):
        on(event, u(on_rename), [c.run, c.new_name], [c.run, c.new_name, c.run_note], c.run_note)

    def on_delete_asked(ctx, ref):
        h.check_idle(ctx, ref, "delete")
        question = (f'<div class="db-warn">Delete <b>{escape(ref)}</b> with its checkpoints, previews, generated '
                    f'images and exports? This cannot be undone.</div>')
        return gr.update(visible=True), question

    on(c.delete.click, u(on_delete_asked), c.run, [c.confirm, c.confirm_text], c.run_note)

    def on_delete(ctx, ref):
        message = h.delete_run(ctx, ref)
        remaining = h.list_runs(ctx, ref.split("/")[0])
        return (gr.update(choices=remaining, value=remaining[0][1] if remaining else None), gr.update(visible=False),
                views.note_html(message, problem=False))

    on(c.confirm_delete.click, u(on_delete), c.run, [c.run, c.confirm, c.run_note], c.run_note)
    c.cancel_delete.click(lambda: gr.update(visible=False), None, c.confirm)
    c.run.input(lambda: (gr.update(visible=False), "", ""), None, [c.confirm, c.run_note, c.train_note])

    # ---- the selected run, redrawn from its folder ---------------------------------------------
    def on_tick(ctx, ref, last, subject, *values):
        """Redraw the selected run from its folder; parts that did not change are skipped (no
        flicker). Start is "Training…" and not clickable while the selected run is queued or
        training and the form asks for exactly that run."""
        idle = (gr.update(interactive=False), gr.update(interactive=False), _start_button(None, False), last)
        if not ref:
            return (views.progress_html(None), "", gr.skip(), gr.skip(), gr.skip(), *idle)
        try:
            status = h.run_status(ctx, ref)
        except Exception as e:                         # a deleted run, a broken file: say so, keep ticking
            return (views.progress_html(None).replace("No run selected.", escape(str(e))), "", gr.skip(),
                    gr.skip(), gr.skip(), *idle)
        key = (ref, len(status.losses), tuple(len(p) for _, p in status.samples), status.state)
        changed = key != last
        return (views.progress_html(status), views.run_details_html(status),
                views.loss_svg(status.losses, status.total) if changed else gr.skip(),
                views.sample_gallery(status) if changed else gr.skip(),
                views.previews_title(status) if changed else gr.skip(),
                gr.update(interactive=status.active), gr.update(interactive=status.resumable),
                _start_button(status, status.active and _asks_for(ctx, c, ref, subject, values)), key)

    tick_inputs = [c.run, c.seen, c.subject, *form]
    tick_outputs = [c.progress, c.details, c.loss, c.previews, c.previews_title, c.stop, c.resume, c.start, c.seen]
    c.timer.tick(u(on_tick), tick_inputs, tick_outputs, show_progress="hidden", queue=False)
    c.run.change(u(on_tick), tick_inputs, tick_outputs, show_progress="hidden")


def _start_button(status, running_this: bool):
    """Start: not clickable while the form asks for the run that is queued or training."""
    if running_this:
        return gr.update(value="Waiting in line…" if status.state == "queued" else "Training…", interactive=False)
    return gr.update(value="Queue another run" if status is not None and status.active else "Start training",
                     interactive=True)


def _asks_for(ctx: h.Context, c, ref: str, subject: str | None, values) -> bool:
    """Whether the Train tab's form (subject and settings) is the one run ``ref`` was started with."""
    try:
        same_subject = sanitize_name(subject or "", "subject name") == ref.split("/")[0]
        return same_subject and h.run_form(ctx, ref) == _settings(c, values)
    except (UserError, ValueError, OSError):
        return False


def _settings(c, values) -> h.TrainSettings:
    """The Train tab's form values (in ``c.form`` order) as TrainSettings; numbers checked."""
    v = dict(zip(c.form, values))
    return h.TrainSettings(**{**v, "rank": _int(v["rank"], "rank"), "steps": _int(v["steps"], "steps"),
                              "lr": _float(v["lr"], "learning rate"),
                              "class_images": _int(v["class_images"], "class images"),
                              "seed": _int(v["seed"], "seed") or 0, "prior_preservation": bool(v["prior_preservation"]),
                              "train_text_encoders": bool(v["train_text_encoders"]), "buckets": bool(v["buckets"]),
                              "pivotal": bool(v["pivotal"]),
                              "instance_prompt": v["instance_prompt"] or ""})


def _value(values: dict, name: str) -> dict:
    """``{"value": …}`` for a form box restored from a run's settings; {} to leave it alone."""
    if name not in values:
        return {}
    value = values[name]
    return {"value": "" if value is None and name == "instance_prompt" else value}


def _wire_results(app: h.Context, c) -> None:
    """Generate, Export and Analyze: each lists the finished runs when its tab is opened, keeping
    the run the user picked (and their prompt, format and dtype) while it is still listed.
    Prompt and format follow the run on a user's pick (.input) or when the tab's refresh
    changes the run — never on a refresh alone, which would overwrite what the user typed.
    Problems (e.g. no trained run yet) go to each tab's note, under its main button."""
    u = functools.partial(per_user, app)

    def on_generate_tab(ctx, current, prompt):
        choices, chosen = _newest_or(ctx, current)
        refill = chosen and (chosen != current or not (prompt or "").strip())
        return gr.update(choices=choices, value=chosen), h.default_prompt(ctx, chosen) if refill else gr.skip()

    on(c.generate_tab.select, u(on_generate_tab), [c.gen_run, c.prompt], [c.gen_run, c.prompt], c.gen_note)
    on(c.gen_run.input, u(lambda ctx, ref: h.default_prompt(ctx, ref) if ref else ""), c.gen_run, [c.prompt],
       c.gen_note)

    def on_export_tab(ctx, current, hint):
        choices, chosen = _newest_or(ctx, current)
        again = chosen != current or not hint
        return (gr.update(choices=choices, value=chosen),
                *(_export_suggestion(ctx, chosen) if again else (gr.skip(),) * 4))

    on(c.export_tab.select, u(on_export_tab), [c.exp_run, c.exp_hint], [c.exp_run, *c.suggestion], c.exp_note)

    def on_analyze_tab(ctx, current, more):
        choices, chosen = _newest_or(ctx, current)
        refs = {ref for _, ref in choices}
        return (gr.update(choices=choices, value=chosen),
                gr.update(choices=choices, value=[r for r in (more or []) if r in refs]))

    on(c.analyze_tab.select, u(on_analyze_tab), [c.ana_run, c.ana_more], [c.ana_run, c.ana_more], c.ana_note)

    def on_generate(ctx, ref, prompt, negative, n, steps, guidance, strength, seed, random_seed):
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

    on(c.generate.click, u(on_generate), [c.gen_run, c.prompt, c.negative, c.n, c.gen_steps, c.guidance, c.strength,
                                       c.gen_seed, c.random_seed], [c.gallery, c.gen_note, c.gen_seed], c.gen_note)

    def on_format(fmt):
        return h.EXPORT_FORMATS.get(fmt, ("", ""))[1], ("fp16" if fmt.startswith("merged") else "fp32")

    c.fmt.change(on_format, c.fmt, [c.fmt_help, c.dtype])

    def on_export(ctx, ref, fmt, dtype):
        if not ref:
            raise UserError("no trained subject yet: train one on the Train tab first")
        outcome = h.export_run(ctx, ref, fmt, dtype)
        return views.export_report_html(outcome), str(outcome.path)

    on(c.export.click, u(on_export), [c.exp_run, c.fmt, c.dtype], [c.exp_report, c.download], c.exp_note)

    def on_analyze(ctx, ref, more, axis):
        if not ref:
            raise UserError("no trained subject yet: train one on the Train tab first")
        check = h.check_run(ctx, ref)
        outcome = h.analyze_runs(ctx, [ref, *(more or [])], axis)
        return (views.check_html(check), check.subject_images, check.class_images, str(outcome.plot),
                views.analysis_html(outcome))

    on(c.analyze.click, u(on_analyze), [c.ana_run, c.ana_more, c.ana_axis],
       [c.check_text, c.check_subject, c.check_class, c.ana_plot, c.ana_text], c.ana_note)


def _wire_export_choice(app: h.Context, c) -> None:
    """The Export tab's "Where will you use it?": the run's answer when it is picked, the format
    and advice for the answer, and for a run trained for diffusers exported for ComfyUI / A1111 /
    Forge the choice between the merged checkpoint and a retrain (one click, same photos and settings)."""
    u = functools.partial(per_user, app)
    on(c.exp_run.input, u(lambda ctx, ref: _export_suggestion(ctx, ref)), c.exp_run, c.suggestion, c.exp_note)
    on(c.exp_use.input, u(lambda ctx, ref, use: _export_suggestion(ctx, ref, h.EXPORT_USES.get(use))),
       [c.exp_run, c.exp_use], c.suggestion, c.exp_note)

    def on_retrain(ctx, ref):
        new = h.retrain_for(ctx, ref, "comfy")
        subject = new.split("/")[0]
        note = (f'<div class="db-ok">Started <b>{escape(new)}</b>: the same photos and settings, trained for '
                f'ComfyUI / A1111 / Forge. Follow it on the <b>Train</b> tab; when it finishes, export its '
                f'ComfyUI / A1111 / Forge adapter here.</div>')
        return note, gr.update(choices=h.list_runs(ctx, subject), value=new)

    on(c.retrain.click, u(on_retrain), c.exp_run, [c.exp_report, c.run], c.exp_note)


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


def _train_intro(ctx: h.Context, view: h.SubjectView) -> str:
    if not view.photos:
        return ('<div class="db-warn">No photos yet: add them on the <b>Subject</b> tab first.</div>')
    what = f"“{escape(view.instance_prompt or h.example_prompt(ctx, view.token, view.class_noun or chr(8230)))}”"
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


def launch(demo: gr.Blocks, ctx: h.Context, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           auth: list[tuple[str, str]] | None = None):
    """Serve the page; files are served from the workspace only (with separate users, each user's
    from their own folder only); ``auth``: the (user, password) pairs that may log in (None: no
    login, for a loopback address or ``--insecure``)."""
    from starlette.middleware import Middleware

    from .users import OwnFilesOnly

    demo.queue(default_concurrency_limit=1)
    guard = [Middleware(OwnFilesOnly, workspace=ctx.workspace.root)] if ctx.separate_users else []
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                app_kwargs={"middleware": guard},
                allowed_paths=[str(ctx.workspace.root)], max_file_size=MAX_UPLOAD_BYTES, quiet=False,
                theme=gr.themes.Soft(), css=CSS, footer_links=[], ssr_mode=False, run_history=False,
                inbrowser=False, auth=auth or None, auth_message="dorabooth: log in with the user and password "
                                                                "given to dorabooth-ui (--auth / --auth-file).")
    return demo


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:                                               # before anything is loaded, made or served
        logins = read_auth(args.auth, args.auth_file)
        check_exposure(args.host, logins, args.insecure)
        check_logins(logins)
        limits = Limits(max_queued=args.max_queued, disk_bytes=_quota(args.disk_quota))
        check_store(args.workspace, args.cluster)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with quiet_libraries(not args.verbose):          # as the command line: the libraries say only errors
        return _serve(args, logins, limits)


def _quota(gigabytes: float | None) -> int | None:
    if gigabytes is None:
        return None
    if not gigabytes > 0:
        raise ValueError(f"--disk-quota {gigabytes}: give the gigabytes each workspace may hold, e.g. 20")
    return int(gigabytes * 1e9)


def _serve(args, logins, limits) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)             # gradio's own requests, each logged
    if not logins and not is_loopback(args.host):
        log.warning("--insecure: serving on %s without a login; anyone who reaches it can use the app", args.host)
    try:
        ctx = h.make_context(args.workspace, args.model, model_config=args.model_config, samples=args.samples,
                             cluster=args.cluster, separate_users=bool(logins) and not args.shared_workspace,
                             limits=limits, mirror=args.mirror)
        ctx.info                                          # a missing or unreadable model fails here, readably
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"dorabooth-ui: {e}", file=sys.stderr)
        return 2
    if ctx.separate_users and ctx.workspace.subjects():
        log.warning("the subjects in %s are not shown: with logins each user has a folder of their own under %s/users "
                    "(move a subject's folder into one, or start with --shared-workspace)", ctx.workspace.root,
                    ctx.workspace.root)
    waiting = h.recover_queue(ctx)
    if waiting:
        log.info("queued again after a restart: %s", ", ".join(waiting))
    uploads = private_upload_folder()
    signal.signal(signal.SIGTERM, _interrupt)       # a stop (kill, systemd) closes the server and cleans up
    demo = build(ctx)
    try:
        launch(demo, ctx, host=args.host, port=args.port, block=True, auth=logins)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.close()
        if uploads is not None:
            shutil.rmtree(uploads, ignore_errors=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dorabooth-ui", description="Start the dorabooth app in your browser: upload photos, train, "
                                         "generate, export. docs/security.md says what it protects and what not.")
    parser.add_argument("--model", metavar="M", help="base model: hub id, diffusers folder or .safetensors file "
                                                     "(default: the embedded toy model)")
    parser.add_argument("--model-config", dest="model_config", metavar="DIR",
                        help="for a single .safetensors --model without internet: the diffusers folder with its "
                             "configs (as for `dorabooth train --model-config`)")
    parser.add_argument("--workspace", metavar="DIR|URL", default="dorabooth-workspace",
                        help="where subjects, photos and runs are kept (default: ./dorabooth-workspace); with "
                             "--cluster also an object store, s3://bucket/ws, gs://… or any fsspec URL (the "
                             "workers train into it, the app keeps a local copy: --mirror)")
    parser.add_argument("--mirror", metavar="DIR", default=None,
                        help="with a --workspace URL: the local folder the app copies the runs it shows into "
                             "(default: ~/.cache/dorabooth/workspaces/<hash of the URL>)")
    parser.add_argument("--samples", metavar="DIR", help="sample subjects to offer, one folder each with photos and "
                                                         "a subject.json (default: the toy world's, with the toy "
                                                         "model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                                                            "computer only); any other needs --auth or --insecure")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login (the password is visible to other "
                                                            "users of this computer in the process list: prefer "
                                                            "--auth-file)")
    parser.add_argument("--auth-file", dest="auth_file", metavar="FILE",
                        help="require a login from this file: one USER:PASS a line")
    parser.add_argument("--cluster", metavar="ADDR", default=None,
                        help="train on a Ray cluster, several runs at once: auto (one started on this machine with "
                             "`ray start --head`), ray://HOST:PORT or HOST:PORT; the workspace must be a folder "
                             "every worker reaches at the same path, or an object store's URL (docs/scaling.md). "
                             "Default: in this process, one run at a time")
    parser.add_argument("--shared-workspace", dest="shared_workspace", action="store_true",
                        help="with logins: every user sees and changes the same subjects and runs (default: each "
                             "login has a workspace of its own, WORKSPACE/users/<user>)")
    parser.add_argument("--max-queued", dest="max_queued", type=int, default=MAX_QUEUED, metavar="N",
                        help=f"runs training or waiting at once, per user (default: {MAX_QUEUED})")
    parser.add_argument("--disk-quota", dest="disk_quota", type=float, default=None, metavar="GB",
                        help="gigabytes each user's workspace may hold (photos, runs, images, exports); checked "
                             "before each upload, run, generation and export (default: no quota)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a --host other computers can reach without a login (anyone reaching it can "
                             "read and change the workspace)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own log messages and warnings (hidden by default)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
