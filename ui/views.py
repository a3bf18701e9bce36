"""Plain-language HTML for the page: progress bar, loss curve, photo and export reports.

Pure functions from handler results to HTML strings (no gradio), so what the user reads is
tested like any other output. Everything that came from a user or a file is escaped.
"""

from __future__ import annotations

import math
from html import escape

from dorabooth.events import format_clock as clock

from . import runs
from .runs import RunStatus
from .workspace import MAX_IMAGES, MIN_IMAGES


# ---- Train tab ---------------------------------------------------------------------------------
def progress_html(status: RunStatus | None) -> str:
    """A progress bar with one plain sentence; ``data-state`` carries the run state for tests."""
    if status is None:
        return _bar("idle", 0, "No run selected. Set up a subject, then press <b>Start training</b>.")
    s = status
    ckpt = f" from the checkpoint at step {s.checkpoint}" if s.checkpoint else " from the start"
    if s.state == runs.QUEUED:
        place = "next in line" if s.position == 1 else f"number {s.position} in line"
        return _bar(s.state, 0, f"Waiting: {place}. It starts when the training before it finishes.")
    if s.state == runs.STARTING:
        return _bar(s.state, None, "Loading the base model…")
    if s.state == runs.CLASS_IMAGES:
        return _bar(s.state, s.class_done / max(1, s.class_total),
                    f"Drawing class images with the base model (prior preservation): "
                    f"{s.class_done} / {s.class_total}")
    if s.state == runs.PREPARING:
        return _bar(s.state, None, "Preparing your photos…")
    if s.state == runs.TRAINING:
        speed = f" · {s.it_s:.2f} it/s · about {clock(s.eta_s)} left" if s.it_s else ""
        return _bar(s.state, s.step / max(1, s.total), f"Training: step {s.step} / {s.total}{speed}")
    if s.state == runs.FINISHED:
        took = f" in {clock(s.seconds)}" if s.seconds is not None else ""
        return _bar(s.state, 1.0, f"Finished: {s.step} steps{took}. Make images on the <b>Generate</b> tab or "
                                  f"download the adapter on the <b>Export</b> tab.")
    if s.state == runs.STOPPED:
        why = f" ({escape(s.message)})" if s.message else ""
        return _bar(s.state, s.step / max(1, s.total) if s.total else 0,
                    f"Stopped at step {s.step}{f' of {s.total}' if s.total else ''}{why}. "
                    f"<b>Resume</b> continues{ckpt}.")
    if s.state == runs.FAILED:
        return _bar(s.state, s.step / max(1, s.total) if s.total else 0,
                    f"Training failed: {escape(s.message)}<br>Your photos and checkpoints are kept; fix the cause "
                    f"and press <b>Resume</b>, or start a new run.")
    if s.state == runs.INTERRUPTED:
        return _bar(s.state, s.step / max(1, s.total) if s.total else 0,
                    f"The app was closed while this run trained (last step {s.step} / {s.total}). "
                    f"<b>Resume</b> continues{ckpt}.")
    return _bar(s.state, 0, "Not started yet. Press <b>Resume</b> to queue it.")


def _bar(state: str, fraction: float | None, text: str) -> str:
    if fraction is None:
        inner = '<div class="db-bar db-indeterminate"></div>'
        pct = ""
    else:
        fraction = min(1.0, max(0.0, fraction))
        inner = f'<div class="db-bar" style="width:{100 * fraction:.1f}%"></div>'
        pct = f' data-fraction="{fraction:.3f}"'
    return (f'<div class="db-progress" data-state="{escape(state)}"{pct}>'
            f'<div class="db-track">{inner}</div><div class="db-progress-text">{text}</div></div>')


PRECISION_NAMES = {"no": "fp32", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW"}
TARGET_NAMES = {"attn": "Attention", "cross-attn": "Cross-attention only",
                "attn+ff": "Attention + feed-forward", "all-linear": "Every linear layer",
                "attn+conv": "Attention + convolutions (Conv DoRA)", "all": "Every linear layer + convolutions"}
QUANTIZE_NAMES = {"none": "Full precision", "nf4": "4-bit NF4 (QDoRA)"}


def device_html(view) -> str:
    """The resolved device settings (``handlers.DeviceView``): one line, the reasons, warnings."""
    if view.refused:                  # the message itself is in the note beside the Advanced fields
        return ('<div class="db-warn" data-device-problem="refused">No estimate: these settings cannot train. The '
                'note under <b>Advanced settings</b> says what to change.</div>')
    if view.problem:
        return (f'<div class="db-warn" data-device-problem="1">These settings cannot run on '
                f'{escape(view.device)}: {escape(view.problem)}</div>')
    s, e = view.settings, view.estimate
    memory = f"{e.peak / 2**30:.1f} GiB" if e.peak >= 2**30 else f"{e.peak / 2**20:.0f} MiB"
    of = f" of {e.device_memory / 2**30:.0f} GiB" if e.device_memory else ""
    parts = [f"<b>{PRECISION_NAMES[s.mixed_precision]}</b>", f"VAE {s.vae_dtype}",
             f"gradient checkpointing <b>{'on' if s.gradient_checkpointing else 'off'}</b>",
             f"<b>{OPTIMIZER_NAMES[s.optimizer]}</b>", "latents cached" if s.cache_latents else "latents not cached",
             f"<b>{view.trainable:,}</b> trained parameters", f"estimated peak memory <b>{memory}</b>{of}"]
    attrs = (f'data-precision="{s.mixed_precision}" data-checkpointing="{str(s.gradient_checkpointing).lower()}" '
             f'data-optimizer="{s.optimizer}" data-vae="{s.vae_dtype}" data-trainable="{view.trainable}" '
             f'data-peak="{e.peak}"')
    reasons = "".join(f"<li>{escape(r)}</li>" for r in s.reasons)
    html = (f'<div class="db-details" {attrs}>Training on <b>{escape(view.device)}</b>: {" · ".join(parts)} '
            f'<details><summary>Why these settings</summary><ul>{reasons}</ul>'
            f'<pre>{escape(e.table())}</pre></details></div>')
    if e.device_memory and e.peak > e.device_memory:
        html += ('<div class="db-warn">The estimate is over this device\'s memory. Under Advanced settings: turn '
                 'gradient checkpointing on, pick bf16 or fp16 on a GPU, or leave the text encoders frozen.</div>')
    return html + "".join(f'<div class="db-warn">{escape(w)}</div>' for w in s.warnings)


def adapter_note_html(view) -> str:
    """The note beside the Advanced adapter fields: the config's refusal of the choices, else nothing."""
    return note_html(view.refused) if view.refused else ""


def run_details_html(status: RunStatus | None) -> str:
    """One line with the run's settings, and any photos the trainer skipped."""
    if status is None or not status.settings:
        return ""
    s = status.settings
    method = status.method_name + (" (half rank)" if s.get("method") == "dora" and s.get("half_rank") else "")
    axis = {"out": "for diffusers", "in": "for ComfyUI/A1111"}.get(s.get("magnitude_axis"), "")
    parts = [f"<b>{escape(method)}</b>" + (f" {axis}" if s.get("method") in ("dora", "dvora") else ""),
             *([f"layers: {escape(TARGET_NAMES.get(s['targets'], s['targets']))}"] if s.get("targets", "attn") != "attn"
               else []),
             *(["frozen base in 4-bit NF4 (QDoRA)"] if s.get("quantize_base", "none") != "none" else []),
             f"rank {s.get('rank', '?')}", f"{s.get('steps', '?')} steps", f"learning rate {s.get('lr', '?')}",
             "prior preservation " + ("on" if s.get("prior_preservation") else "off"),
             "text encoders " + ("trained" if s.get("train_text_encoders") else "frozen"),
             *([PRECISION_NAMES.get(s["mixed_precision"], s["mixed_precision"]),
                "gradient checkpointing " + ("on" if s.get("gradient_checkpointing") else "off"),
                OPTIMIZER_NAMES.get(s.get("optimizer"), str(s.get("optimizer")))] if s.get("mixed_precision") else []),
             f"prompt “{escape(status.instance_prompt)}”"]
    html = f'<div class="db-details">{" · ".join(parts)}</div>'
    html += "".join(f'<div class="db-warn">{escape(w)}</div>' for w in status.warnings)
    if status.skipped:
        items = "".join(f"<li><b>{escape(f)}</b>: {escape(r)}</li>" for f, r in status.skipped)
        html += f'<div class="db-warn">The trainer skipped these photos:<ul>{items}</ul></div>'
    return html



def smoothed(values: list[float], span: float) -> list[float]:
    """Exponential moving average over about ``span`` values, bias-corrected as Adam's moments
    are (Kingma & Ba 2015, §3): the first point is the first value, never pulled towards 0."""
    beta = 1 - 2 / (span + 1)
    avg, out = 0.0, []
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** t))
    return out


def loss_range(values: list[float], smooth: list[float]) -> tuple[float, float]:
    """The y-range: the 5th–95th percentile of the raw losses widened to hold the whole smoothed
    curve, plus a margin; single spikes run off the frame instead of flattening the rest."""
    ordered = sorted(values)
    lo = min(_percentile(ordered, 0.05), min(smooth))
    hi = max(_percentile(ordered, 0.95), max(smooth))
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 0.5
    return lo - pad, hi + pad


def _percentile(ordered: list[float], q: float) -> float:
    at = q * (len(ordered) - 1)
    i = int(at)
    return ordered[i] if i + 1 >= len(ordered) else ordered[i] + (at - i) * (ordered[i + 1] - ordered[i])


def loss_svg(losses: list[tuple[int, float]], total: int = 0, width: int = 520, height: int = 260) -> str:
    """The training loss per step (faint) and its smoothed curve (bold), as inline SVG with
    labelled axes; the y-range is robust (:func:`loss_range`)."""
    if not losses:
        return '<div class="db-plot db-empty">The loss curve appears here once training starts.</div>'
    left, right, top, bottom = 74, 14, 30, 40
    w, h = width - left - right, height - top - bottom
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    smooth = smoothed(values, span=max(4.0, len(values) / 8))          # diffusion losses are noisy per step
    lo, hi = loss_range(values, smooth)
    x_max = max(total, steps[-1], 1)

    def pt(step: float, value: float) -> str:
        y = min(max((value - lo) / (hi - lo), -0.02), 1.02)           # spikes stop at the frame
        return f"{left + w * step / x_max:.1f},{top + h * (1 - y):.1f}"

    ticks = "".join(f'<line x1="{left}" y1="{top + h * (1 - f):.1f}" x2="{left + w}" y2="{top + h * (1 - f):.1f}" '
                    f'class="db-grid"/><text x="{left - 6}" y="{top + h * (1 - f) + 4:.1f}" text-anchor="end">'
                    f'{lo + f * (hi - lo):.3g}</text>' for f in (0, 0.5, 1))
    raw = " ".join(pt(s, v) for s, v in _thin(losses))
    line = " ".join(pt(s, v) for s, v in _thin(list(zip(steps, smooth))))
    return (f'<div class="db-plot"><div class="db-section">Training loss</div>'
            f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="training loss per step" '
            f'data-first-smoothed="{smooth[0]:.6g}" data-y-min="{lo:.6g}" data-y-max="{hi:.6g}">'
            f'{ticks}'
            f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" class="db-axis"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" class="db-axis"/>'
            f'<text x="16" y="{top + h / 2:.1f}" text-anchor="middle" transform="rotate(-90 16 {top + h / 2:.1f})">'
            f'loss</text>'
            f'<text x="{left}" y="{top + h + 16}" text-anchor="middle">0</text>'
            f'<text x="{left + w}" y="{top + h + 16}" text-anchor="end">{x_max}</text>'
            f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">step</text>'
            f'<text x="{left + w}" y="{top - 12}" text-anchor="end">faint: each step · bold: smoothed '
            f'(now {smooth[-1]:.3g})</text>'
            f'<polyline points="{raw}" class="db-raw"/><polyline points="{line}" class="db-smooth"/>'
            f'</svg></div>')


def _thin(points: list, most: int = 400) -> list:
    if len(points) <= most:
        return points
    every = math.ceil(len(points) / most)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def sample_gallery(status: RunStatus | None) -> list[tuple[str, str]]:
    """Preview images, newest step first, captioned with their step."""
    if status is None:
        return []
    out = []
    for step, paths in reversed(status.samples):
        out += [(p, f"step {step}") for p in paths]
    return out


def previews_title(status: RunStatus | None) -> str:
    """The heading above the previews: what they show and the newest step (the gallery has no
    label of its own: gradio draws it over the first image)."""
    if status is None or not status.samples:
        return ('<div class="db-section">Previews</div><div class="db-details">Images of the training prompt, '
                'drawn with the adapter as it learns, appear here during training.</div>')
    step = status.samples[-1][0]
    return (f'<div class="db-section" data-newest-step="{step}">Previews: newest at step {step}'
            f'{f" of {status.total}" if status.total else ""}</div><div class="db-details">“'
            f'{escape(status.instance_prompt)}”, drawn with the adapter as it learns; newest first, each '
            f'captioned with its step.</div>')


def note_html(message: str, problem: bool = True) -> str:
    """One message beside the controls it is about: a problem to fix (red) or plain news."""
    kind = "db-problem" if problem else "db-info"
    return f'<div class="{kind}" role="{"alert" if problem else "status"}">{escape(message)}</div>'


# ---- Subject tab -------------------------------------------------------------------------------
def subject_summary_html(view) -> str:
    """How many photos, whether training can start, and each warning with its reason."""
    n, usable = len(view.photos), view.usable
    if n == 0:
        head = (f"No photos yet. Drop {MIN_IMAGES}–{MAX_IMAGES} photos of your subject above: different "
                f"angles, backgrounds and lighting; the subject clearly visible.")
    else:
        head = f"<b>{n} photo{'s' if n != 1 else ''}</b>, {usable} usable."
        if usable < MIN_IMAGES:
            head += f" Add at least {MIN_IMAGES - usable} more to train."
        elif not view.class_noun:
            head += " Now say what the subject is (the class noun) below."
        else:
            head += " Ready: go to the <b>Train</b> tab."
    html = f'<div class="db-summary">{head}</div>'
    uploads = [u for u in view.uploads if u.stored]
    refused = [u for u in view.uploads if u.problem]
    if uploads:
        html += f'<div class="db-ok">Added {len(uploads)} photo{"s" if len(uploads) != 1 else ""}.</div>'
    if refused:
        items = "".join(f"<li><b>{escape(u.file)}</b>: {escape(u.problem)}</li>" for u in refused)
        html += f'<div class="db-warn">Not added:<ul>{items}</ul></div>'
    warned = [p for p in view.photos if p.warnings]
    if warned:
        items = "".join(f"<li><b>{escape(p.name)}</b>: {escape('; '.join(p.warnings))}</li>" for p in warned)
        html += f'<div class="db-warn">Check these photos:<ul>{items}</ul></div>'
    return html


# ---- Export tab --------------------------------------------------------------------------------
STATUS_WORDS = {"exact": "✔ exact", "approximate": "≈ approximate", "not applied": "✘ not applied",
                "fails to load": "✘ fails to load"}


def advice_html(picks, use: str | None = None) -> str:
    """Which file to pick for ComfyUI, A1111, Forge and diffusers, each with its one-line reason
    (``dorabooth.formats.destinations.Pick``, derived from the consumer report). ``use``: the
    answer to "Where will you use it?" whose rows are marked."""
    from dorabooth.formats.destinations import FILE_WORDS, USE_OF_DESTINATION

    rows = ""
    for p in picks:
        mine = use is not None and USE_OF_DESTINATION[p.destination] == use
        result = "✔ exact" if p.format and p.exact else "✘ no file works"
        rows += (f'<tr class="db-{"exact" if p.exact and p.format else "fails-to-load"}{" db-mine" if mine else ""}" '
                 f'data-destination="{escape(p.destination)}" data-format="{escape(p.format)}">'
                 f'<td>{escape(p.destination)}</td><td>{result}</td><td>{escape(FILE_WORDS.get(p.format, "–"))}</td>'
                 f'<td>{escape(p.reason)}</td></tr>')
    return ('<table class="db-report db-advice"><thead><tr><th>Where</th><th>Result</th><th>Pick</th><th>Why</th>'
            f'</tr></thead><tbody>{rows}</tbody></table>')


def export_report_html(outcome) -> str:
    """The written file, how each destination applies it (from its consumer report, in words),
    and which file to pick where (derived from the same report)."""
    from dorabooth.formats.consumers import Verdict
    from dorabooth.formats.destinations import destination_rows, in_words

    size = outcome.path.stat().st_size if outcome.path.is_file() else 0
    html = (f'<div class="db-ok">Written: <code>{escape(outcome.path.name)}</code> ({_size(size)}). '
            f'Use the download link below.</div>')
    if outcome.format.startswith("merged"):
        html += ('<div class="db-details">A merged model is plain weights with your subject baked in: every tool '
                 'that loads the base model uses it exactly as trained, with no adapter support needed.</div>')
    if outcome.report:
        rows = ""
        for destination, v in destination_rows([Verdict(**d) for d in outcome.report]):
            kind = escape(v.status.replace(" ", "-"))
            rows += (f'<tr class="db-{kind}" data-destination="{escape(destination)}"><td>{escape(destination)}</td>'
                     f'<td>{escape(STATUS_WORDS.get(v.status, v.status))}</td>'
                     f'<td>{escape(destination)} {escape(in_words(v))}.</td></tr>')
        html += ('<table class="db-report"><thead><tr><th>Tool</th><th>This file</th><th>What happens</th></tr>'
                 f'</thead><tbody>{rows}</tbody></table>')
    if outcome.picks:
        html += '<div class="db-details"><b>Which file to pick where</b></div>' + advice_html(outcome.picks)
    for note in outcome.notes:
        html += f'<div class="db-details">{escape(note)}</div>'
    return html


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- Analyze tab -------------------------------------------------------------------------------
def analysis_html(outcome) -> str:
    """Each panel's fits in words, next to what the DoRA paper reports."""
    rows = ""
    for p in outcome.panels:
        within = p.get("slope_within")
        if within is None:
            reading = "not enough points for a fit"
        elif within < 0:
            reading = ("negative: at the same checkpoint, layers that turned more changed their size less — the "
                       "trade-off the paper reports for full fine-tuning and DoRA")
        else:
            reading = ("positive: at the same checkpoint, layers changed size and direction together — what the "
                       "paper reports for LoRA")
        rows += (f"<tr><td><b>{escape(p['label'])}</b><br><small>{escape(', '.join(p['runs']))}</small></td>"
                 f"<td>{p['n']} ({'query projections' if p['layers'] == 'query' else 'all layers'})</td>"
                 f"<td>{escape(_fit(p.get('slope'), p.get('pearson')))}</td>"
                 f"<td>{escape(_fit(within, p.get('pearson_within')))}</td><td>{escape(reading)}</td></tr>")
    few = [ref for ref, n in outcome.snapshots.items() if n < 3]
    note = ""
    if few:
        note = (f'<div class="db-warn">Few checkpoints in {escape(", ".join(few))}: each dot is one layer at one '
                f'checkpoint, so runs that kept more checkpoints give a clearer picture.</div>')
    axis = "each output row" if outcome.axis == "out" else "each input column"
    return (f'<div class="db-details">Each dot is one layer at one checkpoint: how far training moved its '
            f'<b>direction</b> (ΔD, across) and its <b>magnitude</b> (ΔM, up), with norms taken over {axis}. Over '
            f'all checkpoints both grow as training goes on; the slope <i>within</i> a checkpoint shows the '
            f'trade-off between layers. The DoRA paper found it negative for full fine-tuning and DoRA and '
            f'positive for LoRA.</div>'
            f'<table class="db-report"><thead><tr><th>Run</th><th>Points</th><th>Slope of ΔM on ΔD</th>'
            f'<th>Slope within a checkpoint</th><th>Reading</th></tr></thead><tbody>{rows}</tbody></table>{note}')


def _fit(slope, r) -> str:
    if slope is None:
        return "–"
    return f"{slope:.3g}" + ("" if r is None else f" (r = {r:.2f})")


def check_html(outcome) -> str:
    """Was the subject learned, does the class prompt still draw the class: the run's two prompts
    in words, scored where a reader exists (``ui.checks.CheckOutcome``)."""
    o = outcome
    n_s, n_c = len(o.subject_images), len(o.class_images)
    subject, klass = escape(o.subject_prompt), escape(o.class_prompt)
    if o.scorer is None:
        return (f'<div class="db-details" data-scored="0">No automatic reading for this base model: compare the two '
                f'rows by eye. Top: “{subject}” should show <b>your subject</b>. Bottom: “{klass}” should show an '
                f'ordinary {escape(o.class_noun)}, not your subject. (The command line\'s <code>dorabooth eval</code> '
                f'scores runs with CLIP/DINO models you have locally.)</div>')
    learned = round(o.learned * n_s)
    ok = o.learned >= 0.5
    head = (f'<div class="{"db-ok" if ok else "db-warn"}" data-learned="{o.learned:.3f}"><b>Subject '
            f'{"learned" if ok else "not learned yet"}</b>: {learned} of {n_s} images of “{subject}” show your '
            f'subject.{"" if ok else " Train longer (more steps) or check the photos."}</div>')
    leak = round((o.leak or 0) * n_c)
    if o.class_kept is not None:
        kept = round(o.class_kept * n_c)
        good = kept * 2 >= n_c and leak * 4 <= n_c
        line = (f"“{klass}” still draws an ordinary {escape(o.class_noun)} in {kept} of {n_c} images; your "
                f"subject appears in {leak}.")
    else:
        good = leak * 4 <= n_c
        line = f"your subject appears in {leak} of {n_c} images of “{klass}”."
    if leak * 4 > n_c:
        advice = " Your subject is leaking into the class: keep prior preservation on, or train fewer steps."
    else:
        advice = "" if good else (f" The class prompt no longer draws an ordinary {escape(o.class_noun)} well: "
                                  f"keep prior preservation on, or train fewer steps.")
    kept_attr = "" if o.class_kept is None else f"{o.class_kept:.3f}"
    head += (f'<div class="{"db-ok" if good else "db-warn"}" data-class-kept="{kept_attr}" data-leak="{o.leak:.3f}">'
             f'<b>Class prompt {"kept" if good else "affected"}</b>: {line}{advice}</div>')
    return head + ('<div class="db-details">Read by the toy world\'s shape and colour reader; the images are '
                   'below.</div>')
