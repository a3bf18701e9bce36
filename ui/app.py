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

import gradio as gr

from . import handlers as h
from . import views
from .workspace import MAX_IMAGES, MAX_UPLOAD_BYTES, MIN_IMAGES, UserError

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
footer { display: none !important; }
"""

SUBJECT_INTRO = f"""Give the model a new word for your subject. Drop **{MIN_IMAGES}–{MAX_IMAGES} photos**
(JPG, PNG or WebP, up to {MAX_UPLOAD_BYTES // 2**20} MB each): different angles, backgrounds and lighting, with
the subject clearly visible. Below you see each photo cropped the way the trainer will see it."""

USE_HELP = """**Why this matters (DoRA only):** DoRA keeps one learned *magnitude* per row or per column of
each weight. diffusers and PEFT can only store the per-row (output) kind; ComfyUI applies the per-column (input)
kind exactly and A1111 applies only that kind. Pick where you will use the adapter; a merged checkpoint from the
Export tab works everywhere either way. LoRA has no magnitude, so it fits every tool."""

ANALYZE_TEXT = """How did training change each layer? The DoRA paper splits every weight change into a change of
**magnitude** (how large each weight row is) and of **direction** (where it points), and shows that DoRA, like full
fine-tuning, trades one against the other while LoRA moves both together. Pick a run (and others to compare) and
press **Analyze**; the result is also saved in the run folder."""


def build(ctx: h.Context) -> gr.Blocks:
    info = ctx.info
    preset_default = h.preset_values(ctx, "balanced")
    # Uploaded files are copied into the workspace; gradio's copies are deleted after an hour.
    with gr.Blocks(title="dorabooth", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.HTML(f'<div class="db-header"><h1>dorabooth</h1><p>Teach an image model your subject from a few photos '
                f'(DreamBooth with DoRA). Base model: {escape(info.label)}. Workspace: '
                f'<code>{escape(str(ctx.workspace.root))}</code></p></div>')
        with gr.Tabs():
            # ---- 1. Subject ------------------------------------------------------------------
            with gr.Tab("1 · Subject", id="subject", elem_id="tab-subject"):
                gr.Markdown(SUBJECT_INTRO)
                with gr.Row():
                    subject = gr.Dropdown(label="Subject name", allow_custom_value=True, scale=2, elem_id="db-subject",
                                          info="Pick one you made before, or type a new name.")
                    token = gr.Textbox(label="Token", value="sks", scale=1, elem_id="db-token",
                                       info="A rare made-up word for your subject.")
                    class_noun = gr.Textbox(label="Class noun", scale=1, placeholder="dog", elem_id="db-class-noun",
                                            info="What it is: dog, person, mug, …")
                samples = h.sample_subjects(ctx)
                with gr.Row(visible=bool(samples), elem_id="db-samples"):
                    sample = gr.Dropdown(label="No photos at hand? Try a sample subject", choices=samples,
                                         value=samples[0] if samples else None, scale=3,
                                         info="Toy-world subjects the embedded model has never seen.")
                    use_sample = gr.Button("Use this sample", scale=1, elem_id="db-use-sample")
                upload = gr.File(label="Drop photos here (many at once)", file_count="multiple",
                                 file_types=[".jpg", ".jpeg", ".png", ".webp"], elem_id="db-upload", height=140)
                subject_summary = gr.HTML(elem_id="db-subject-summary")
                crops = gr.Gallery(label="Prepared crops: what the trainer will see", columns=6,
                                   object_fit="contain", allow_preview=False, fit_columns=False,
                                   elem_id="db-crops")
                with gr.Row():
                    photo = gr.Dropdown(label="Photo to remove", info="Or click a crop above.", scale=3,
                                        elem_id="db-photo")
                    remove = gr.Button("Remove photo", scale=1, variant="secondary", elem_id="db-remove")

            # ---- 2. Train --------------------------------------------------------------------
            with gr.Tab("2 · Train", id="train", elem_id="tab-train"):
                train_intro = gr.HTML(elem_id="db-train-intro")
                preset = gr.Radio(label="Preset", choices=h.preset_choices(ctx), value="balanced",
                                  info=_preset_info(ctx))
                with gr.Row():
                    method = gr.Radio(label="Method", choices=list(h.METHODS), value="DoRA (recommended)",
                                      info="DoRA learns each weight's size and direction separately and usually "
                                           "beats LoRA at the same size. DoRA† uses half the rank: a smaller file.")
                    use = gr.Radio(label="Where will you use the adapter?", choices=list(h.USES),
                                   value="diffusers / Python")
                gr.Markdown(USE_HELP)
                with gr.Accordion("Advanced settings", open=False, elem_id="db-advanced"):
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=preset_default["steps"], precision=0, minimum=1,
                                          elem_id="db-steps")
                        rank = gr.Number(label="Rank", value=preset_default["rank"], precision=0, minimum=1,
                                         info="Adapter size: higher learns more detail, bigger file.")
                        lr = gr.Number(label="Learning rate", value=preset_default["lr"])
                        seed = gr.Number(label="Seed", value=0, precision=0)
                    with gr.Row():
                        prior = gr.Checkbox(label="Prior preservation", value=True, elem_id="db-prior",
                                            info="Also trains on images the base model draws of the class, so "
                                                 "'a dog' does not turn into your dog.")
                        class_images = gr.Number(label="Class images", value=preset_default["class_images"],
                                                 precision=0, minimum=1)
                        text_encoders = gr.Checkbox(label="Train the text encoders too", value=False,
                                                    info="Can capture a likeness faster; more likely to overfit.")
                    instance_prompt = gr.Textbox(label="Training prompt",
                                                 placeholder="(empty: a photo of <token> <class noun>)",
                                                 info="What each photo is captioned with while training; it "
                                                      "must contain the token.")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="db-start")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="db-stop")
                    resume = gr.Button("Resume", interactive=False, elem_id="db-resume")
                run = gr.Dropdown(label="Run", info="Every run of this subject; training continues if you close "
                                                    "the page.", elem_id="db-run")
                progress = gr.HTML(views.progress_html(None), elem_id="db-progress")
                details = gr.HTML()
                with gr.Row(equal_height=False):
                    loss = gr.HTML(views.loss_svg([]), elem_id="db-loss")
                    previews = gr.Gallery(label="Preview images during training", columns=4, height=260,
                                          object_fit="contain", fit_columns=False, elem_id="db-previews")
                seen = gr.State(None)           # what the timer last drew (redraw only on change)
                timer = gr.Timer(1.0)

            # ---- 3. Generate -----------------------------------------------------------------
            with gr.Tab("3 · Generate", id="generate", elem_id="tab-generate") as generate_tab:
                gr.Markdown("Make images with a trained subject. Use its token in the prompt, e.g. "
                            "*a photo of sks dog on the beach*. Images are saved in the run folder.")
                gen_run = gr.Dropdown(label="Trained subject", elem_id="db-gen-run",
                                      info="Every finished run in the workspace.")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="db-prompt")
                negative = gr.Textbox(label="Negative prompt (optional)", placeholder="blurry, low quality")
                with gr.Row():
                    n = gr.Slider(1, 8, value=2, step=1, label="Number of images")
                    gen_steps = gr.Slider(1, 100, value=info.generate["steps"], step=1, label="Steps",
                                          info="More steps: more detail, slower.")
                    guidance = gr.Slider(0, 15, value=info.generate["guidance"], step=0.5, label="Guidance",
                                         info="How closely to follow the prompt.")
                with gr.Row():
                    strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Strength",
                                         info="0 = the base model, 1 = as trained.")
                    gen_seed = gr.Number(label="Seed", value=0, precision=0)
                    random_seed = gr.Checkbox(label="New random seed each time", value=True)
                generate = gr.Button("Generate", variant="primary", elem_id="db-generate")
                gen_note = gr.HTML()
                gallery = gr.Gallery(label="Images", columns=4, height="auto", object_fit="contain",
                                     fit_columns=False, elem_id="db-gallery")

            # ---- 4. Export -------------------------------------------------------------------
            with gr.Tab("4 · Export", id="export", elem_id="tab-export") as export_tab:
                gr.Markdown("Download your subject for the tool you use. The report says which tools apply the "
                            "file exactly as trained, which only approximately (and by how much), and which not.")
                exp_run = gr.Dropdown(label="Trained subject", elem_id="db-exp-run")
                exp_hint = gr.HTML()
                fmt = gr.Radio(label="Format", choices=[(v[0], k) for k, v in h.EXPORT_FORMATS.items()],
                               value="kohya", elem_id="db-format")
                fmt_help = gr.Markdown(h.EXPORT_FORMATS["kohya"][1])
                dtype = gr.Radio(label="Precision", choices=list(h.EXPORT_DTYPES.items()), value="fp32",
                                 info="fp32 keeps the adapter exactly as trained; fp16 halves a merged model's size.")
                export = gr.Button("Export", variant="primary", elem_id="db-export")
                exp_report = gr.HTML(elem_id="db-exp-report")
                download = gr.File(label="Download", interactive=False, elem_id="db-download")

            # ---- 5. Analyze ------------------------------------------------------------------
            with gr.Tab("5 · Analyze", id="analyze", elem_id="tab-analyze") as analyze_tab:
                gr.Markdown(ANALYZE_TEXT)
                with gr.Row():
                    ana_run = gr.Dropdown(label="Trained subject", elem_id="db-ana-run")
                    ana_more = gr.Dropdown(label="Compare with (optional)", multiselect=True,
                                           info="e.g. a LoRA and a DoRA run of the same subject.")
                ana_axis = gr.Radio(label="Norms taken", choices=list(h.AXES.items()), value="out")
                analyze = gr.Button("Analyze", variant="primary", elem_id="db-analyze")
                ana_plot = gr.Image(label="Magnitude vs direction change", type="filepath", interactive=False,
                                    elem_id="db-ana-plot", height=420)
                ana_text = gr.HTML(elem_id="db-ana-text")

        # ================= wiring =============================================================
        def subject_outputs(view: h.SubjectView):
            names = [p.name for p in view.photos]
            return (gr.update(choices=h.subject_names(ctx) or [view.name], value=view.name), view.token,
                    view.class_noun, views.subject_summary_html(view), view.previews,
                    gr.update(choices=names, value=None), _train_intro(view), view.instance_prompt)

        def typed_kept(outputs):
            """Token, class noun and prompt boxes are the user's: a reply must not overwrite newer typing."""
            out = list(outputs)
            out[1], out[2], out[7] = gr.skip(), gr.skip(), gr.skip()
            return tuple(out)

        subject_view = [subject, token, class_noun, subject_summary, crops, photo, train_intro, instance_prompt]

        @shown
        def on_load():
            names = h.subject_names(ctx)
            name = names[0] if names else "my-subject"
            view = h.open_subject(ctx, name) if names else _empty_view(name)
            runs_of = h.list_runs(ctx, view.name) if names else []
            ref = runs_of[0][1] if runs_of else None
            return (*subject_outputs(view), gr.update(choices=runs_of, value=ref), *_finished_runs(2),
                    gr.update(choices=h.preset_choices(ctx), info=_preset_info(ctx)))

        def _finished_runs(copies: int):
            choices = h.list_runs(ctx, finished_only=True)
            first = choices[0][1] if choices else None
            return [gr.update(choices=choices, value=first)] * copies

        demo.load(on_load, None, [*subject_view, run, gen_run, exp_run, preset])

        @shown
        def on_subject(name):
            name = (name or "").strip()
            if not name:
                return (*subject_outputs(_empty_view("my-subject")), gr.update(choices=[], value=None))
            from .workspace import sanitize_name
            safe = sanitize_name(name, "subject name")
            if safe not in h.subject_names(ctx):               # a new name: keep what is typed in the other boxes
                return (*typed_kept(subject_outputs(_empty_view(safe))), gr.update(choices=[], value=None))
            view = h.open_subject(ctx, safe)
            runs_of = h.list_runs(ctx, view.name)
            return (*subject_outputs(view), gr.update(choices=runs_of, value=runs_of[0][1] if runs_of else None))

        subject.input(on_subject, subject, [*subject_view, run])
        subject.select(on_subject, subject, [*subject_view, run])

        @shown
        def on_upload(name, files, token_, class_noun_):
            view = h.upload_photos(ctx, name or "my-subject", files or [], token_, class_noun_)
            return (*typed_kept(subject_outputs(view)), None)

        upload.upload(on_upload, [subject, upload, token, class_noun], [*subject_view, upload])

        @shown
        def on_use_sample(name):
            view = h.use_sample(ctx, name)
            return (*subject_outputs(view), gr.update(choices=h.list_runs(ctx, view.name), value=None))

        use_sample.click(on_use_sample, sample, [*subject_view, run])

        @shown
        def on_save(name, token_, class_noun_):
            if not (name or "").strip():
                raise UserError("give the subject a name first")
            return typed_kept(subject_outputs(h.save_subject(ctx, name, token_, class_noun_)))

        for box in (token, class_noun):
            box.blur(on_save, [subject, token, class_noun], subject_view)
            box.submit(on_save, [subject, token, class_noun], subject_view)

        @shown
        def on_remove(name, photo_name):
            if not photo_name:
                raise UserError("choose a photo to remove (click a crop, or pick it in the list)")
            return typed_kept(subject_outputs(h.remove_photo(ctx, name, photo_name)))

        remove.click(on_remove, [subject, photo], subject_view)

        def on_crop_select(evt: gr.SelectData):
            caption = (evt.value or {}).get("caption") or ""
            return caption.removeprefix("⚠ ").split(":")[0]

        crops.select(on_crop_select, None, photo)

        # ---- train -----------------------------------------------------------------------------
        @shown
        def on_preset(name):
            v = h.preset_values(ctx, name)
            return v["steps"], v["rank"], v["lr"]

        preset.change(on_preset, preset, [steps, rank, lr])

        @shown
        def on_start(name, token_, class_noun_, preset_, method_, use_, steps_, rank_, lr_, seed_, prior_,
                     class_images_, text_encoders_, instance_prompt_):
            if not (name or "").strip():
                raise UserError("name the subject and upload photos on the Subject tab first")
            h.save_subject(ctx, name, token_, class_noun_, instance_prompt_ or "")
            settings = h.TrainSettings(preset=preset_, method=method_, use=use_, rank=_int(rank_, "rank"),
                                       steps=_int(steps_, "steps"), lr=_float(lr_, "learning rate"),
                                       prior_preservation=prior_, class_images=_int(class_images_, "class images"),
                                       train_text_encoders=text_encoders_, seed=_int(seed_, "seed") or 0,
                                       instance_prompt=instance_prompt_)
            ref = h.start_training(ctx, name, settings)
            runs_of = h.list_runs(ctx, h.run_status(ctx, ref).run.parent.parent.name)
            return gr.update(choices=runs_of, value=ref), None

        start.click(on_start, [subject, token, class_noun, preset, method, use, steps, rank, lr, seed, prior,
                               class_images, text_encoders, instance_prompt], [run, seen])

        @shown
        def on_stop(ref):
            gr.Info(h.stop_training(ctx, ref))

        stop.click(on_stop, run, None)

        @shown
        def on_resume(ref):
            gr.Info(h.resume_training(ctx, ref))
            return None

        resume.click(on_resume, run, seen)

        def on_tick(ref, last):
            """Redraw the selected run; parts that did not change are skipped (no flicker)."""
            if not ref:
                return (views.progress_html(None), "", gr.skip(), gr.skip(), gr.update(interactive=False),
                        gr.update(interactive=False), last)
            try:
                status = h.run_status(ctx, ref)
            except Exception as e:                     # a deleted run, a broken file: say so, keep ticking
                return (views.progress_html(None).replace("No run selected.", escape(str(e))), "", gr.skip(),
                        gr.skip(), gr.update(interactive=False), gr.update(interactive=False), last)
            key = (ref, len(status.losses), tuple(len(p) for _, p in status.samples), status.state)
            changed = key != last
            return (views.progress_html(status), views.run_details_html(status),
                    views.loss_svg(status.losses, status.total) if changed else gr.skip(),
                    views.sample_gallery(status) if changed else gr.skip(),
                    gr.update(interactive=status.active), gr.update(interactive=status.resumable), key)

        tick_outputs = [progress, details, loss, previews, stop, resume, seen]
        timer.tick(on_tick, [run, seen], tick_outputs, show_progress="hidden", queue=False)
        run.change(on_tick, [run, seen], tick_outputs, show_progress="hidden")

        # ---- generate --------------------------------------------------------------------------
        @shown
        def on_finished_runs():
            return _finished_runs(1)[0]

        @shown
        def on_gen_run(ref):
            return h.default_prompt(ctx, ref) if ref else ""

        gen_run.change(on_gen_run, gen_run, prompt)

        @shown
        def on_generate(ref, prompt_, negative_, n_, steps_, guidance_, strength_, seed_, random_):
            if not ref:
                raise UserError("no trained subject yet: train one on the Train tab first")
            result = h.generate_images(ctx, ref, prompt_, negative=negative_, n=int(n_), steps=int(steps_),
                                       guidance=float(guidance_), seed=None if random_ else _int(seed_, "seed") or 0,
                                       strength=float(strength_))
            folder = result.images[0].parent if result.images else ""
            note = (f'<div class="db-ok">{len(result.images)} image(s) with seed {result.seed}'
                    f'{"–" + str(result.seed + len(result.images) - 1) if len(result.images) > 1 else ""}, saved in '
                    f'<code>{escape(str(folder))}</code>.</div>')
            return [(str(p), f"seed {result.seed + i}") for i, p in enumerate(result.images)], note, result.seed

        generate.click(on_generate, [gen_run, prompt, negative, n, gen_steps, guidance, strength, gen_seed,
                                     random_seed], [gallery, gen_note, gen_seed])

        # ---- export ----------------------------------------------------------------------------
        def on_format(f):
            return h.EXPORT_FORMATS.get(f, ("", ""))[1], ("fp16" if f.startswith("merged") else "fp32")

        fmt.change(on_format, fmt, [fmt_help, dtype])

        @shown
        def on_exp_run(ref):
            if not ref:
                return gr.skip(), ""
            fmt_, hint = h.suggested_export(ctx, ref)
            return fmt_, f'<div class="db-details">{escape(hint)}</div>'

        exp_run.change(on_exp_run, exp_run, [fmt, exp_hint])

        @shown
        def on_export(ref, fmt_, dtype_):
            if not ref:
                raise UserError("no trained subject yet: train one on the Train tab first")
            outcome = h.export_run(ctx, ref, fmt_, dtype_)
            return views.export_report_html(outcome), str(outcome.path)

        export.click(on_export, [exp_run, fmt, dtype], [exp_report, download])

        @shown
        def on_analyze_tab():
            choices = h.list_runs(ctx, finished_only=True)
            return (gr.update(choices=choices, value=choices[0][1] if choices else None),
                    gr.update(choices=choices, value=[]))

        analyze_tab.select(on_analyze_tab, None, [ana_run, ana_more])

        @shown
        def on_analyze(ref, more, axis):
            if not ref:
                raise UserError("no trained subject yet: train one on the Train tab first")
            outcome = h.analyze_runs(ctx, [ref, *(more or [])], axis)
            return str(outcome.plot), views.analysis_html(outcome)

        analyze.click(on_analyze, [ana_run, ana_more, ana_axis], [ana_plot, ana_text])
        generate_tab.select(on_finished_runs, None, gen_run)
        export_tab.select(on_finished_runs, None, exp_run)
    return demo


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
    return float(value)


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
