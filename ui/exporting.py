"""The Export tab's handlers: which file for which tool, the export itself, download names.

The advice (:func:`run_advice`) comes from the consumer report of the adapter files the run
can be written as — the report ``dorabooth export`` attaches to each file, computed here by
exporting those files (fp32) into the run's ``exports/.advice/`` — turned into one pick per
destination by :func:`dorabooth.formats.destinations.picks`. The report shown after an export
is that file's own report, and the advice beside it is derived from it again, so the hint and
the report cannot disagree. Downloads are named after the subject, method, format and dtype
(``sks-dog_dora_kohya_fp16.safetensors``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.formats.destinations import COMFY_LIKE, TOOL, USES, Pick, hint, pick_for, picks
from dorabooth.formats.subject import file_stem

from .runs import live_status
from .users import check_disk
from .workspace import UserError

EXPORT_FORMATS = {
    "kohya": ("ComfyUI / A1111 / Forge adapter",
              "One small .safetensors in the kohya layout. Put it in ComfyUI's models/loras or A1111's / Forge's "
              "models/Lora folder and use it with the base model it was trained on."),
    "diffusers-lora": ("diffusers / Python adapter",
                       "One small .safetensors for `pipe.load_lora_weights(file)` in diffusers or "
                       "`dorabooth.load_adapter`. Only for runs trained for diffusers; always full precision."),
    "merged-single-file": ("Merged checkpoint (one file)",
                           "The base model with your subject baked in, as one .safetensors checkpoint: "
                           "ComfyUI's models/checkpoints, A1111's / Forge's models/Stable-diffusion, or diffusers' "
                           "from_single_file. Exact in every tool that loads the base; as large as the base model."),
    "merged-diffusers": ("Merged model folder (diffusers)",
                         "The base model with your subject baked in, as a diffusers pipeline folder "
                         "(downloaded as a .zip) for `DiffusionPipeline.from_pretrained`."),
}
EXPORT_DTYPES = {"fp32 (full precision)": "fp32", "fp16 (half the size)": "fp16", "bf16": "bf16"}
# "Where will you use it?" at export: the training answers, "Not sure" meaning "anywhere".
EXPORT_USES = {USES["comfy"]: "comfy", USES["diffusers"]: "diffusers", "Not sure: anywhere": "unsure"}
ADVICE_DIR = ".advice"
MAGNITUDE_METHODS = ("dora", "dvora")       # trained with a magnitude axis; a DVoRA run exports as an ordinary DoRA


def _finished(ctx, ref: str):
    run = ctx.workspace.run(ref)
    status = live_status(ctx.worker, run)
    if not status.finished:
        raise UserError(f"{ref} has no trained adapter yet ({status.state}); pick a finished run")
    return run, status


def _base_model(run: Path) -> str | None:
    """Where the run's base weights are (to measure the consumer report's errors)."""
    try:
        return rd.read_run(run).base_weights
    except (OSError, ValueError):
        return None


@dataclass
class Advice:
    """Per destination, which file to pick and why; ``reports``: adapter format → verdict dicts."""

    method: str
    axis: str | None
    picks: list[Pick]
    reports: dict[str, list[dict]] = field(default_factory=dict)


def run_advice(ctx, ref: str) -> Advice:
    """What to pick for ComfyUI, A1111, Forge and diffusers, from the consumer report of each
    adapter file the run can be written as (cached while the run's adapter is unchanged)."""
    from dorabooth import export
    from dorabooth.formats.consumers import Verdict

    run, status = _finished(ctx, ref)
    s = status.settings
    method = s.get("method", "dora")
    axis = s.get("magnitude_axis") if method in MAGNITUDE_METHODS else None
    if method == "full":
        merged = [Pick(d, "merged-diffusers" if d == "diffusers" else "merged-single-file", True,
                       "A full fine-tune is a whole model: the merged checkpoint is exact.") for d in TOOL]
        return Advice(method, None, merged)
    folder = run / "exports" / ADVICE_DIR
    adapter = run / rd.ADAPTER
    key = f"{adapter.stat().st_mtime_ns}-{adapter.stat().st_size}"
    cache = folder / "reports.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        reports = json.loads(cache.read_text())["reports"]
    else:
        reports = {}
        for fmt in ("kohya", *(("diffusers-lora",) if axis != "in" else ())):
            out = folder / f"{fmt}.safetensors"
            result = export(run, format=fmt, out=out, model=_base_model(run), model_config=s.get("model_config"),
                            overwrite=True)
            reports[fmt] = [v.to_dict() for v in result.report]
            out.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "reports": reports}))
    verdicts = {fmt: [Verdict(**d) for d in report] for fmt, report in reports.items()}
    return Advice(method, axis, picks(verdicts, method, axis), reports)


def suggested_export(ctx, ref: str, use: str | None = None) -> tuple[str, str, Advice]:
    """(format, one-line hint, advice) for a run and an answer to "Where will you use it?"
    (default: what was answered when it was trained)."""
    run, status = _finished(ctx, ref)
    advice = run_advice(ctx, ref)
    use = use or run_use(run)
    pick = pick_for(use, advice.picks) if use != "unsure" else None
    if advice.method == "full":
        return "merged-single-file", "A full fine-tune is a whole model: it exports as a merged checkpoint.", advice
    if pick is None:
        return _anywhere(advice.picks) + (advice,)
    return pick.format, hint(pick), advice


def _anywhere(picks_: list[Pick]) -> tuple[str, str]:
    """(format, line) for "Not sure": the merged checkpoint for every tool that loads the base."""
    if any(p.format for p in picks_ if p.destination in COMFY_LIKE):
        return "merged-single-file", ("Not sure where: the merged checkpoint (one file) is exact in every tool that "
                                      "loads this base model, diffusers included. The table says which small file is "
                                      "exact where.")
    return "merged-diffusers", ("Not sure where: ComfyUI, A1111 and Forge cannot load this base model, so take the "
                                "merged model folder for diffusers: it is exact there.")


def run_use(run: Path) -> str:
    """The answer to "Where will you use it?" a run was started with (``comfy``, ``diffusers``,
    ``unsure``), else what its axis was trained for."""
    from .workspace import REQUEST_FILE

    try:
        asked = json.loads((run / REQUEST_FILE).read_text()).get("use")
    except (OSError, json.JSONDecodeError):
        asked = None
    for key, label in USES.items():
        if asked in (key, label):
            return key
    try:
        axis = rd.read_config(run)[0].magnitude_axis
    except (OSError, ValueError):
        return "unsure"
    return "comfy" if axis == "in" else "diffusers"


def retrain_offer(advice: Advice, use: str) -> bool:
    """A run trained for diffusers, exported for ComfyUI / A1111 / Forge: offer to retrain it for them."""
    return use == "comfy" and any(p.retrain for p in advice.picks if p.destination in COMFY_LIKE)


@dataclass
class ExportOutcome:
    path: Path                      # the file to download (a folder is zipped)
    format: str
    report: list[dict]              # consumer verdicts (adapter formats)
    notes: list[str]
    picks: list[Pick] = field(default_factory=list)      # what to pick per destination, with this report in


def _zip(folder: Path, stem: str, files: list[Path]) -> Path:
    """``folder/<stem>.zip`` holding ``files`` side by side (written whole, then renamed)."""
    import zipfile

    tmp, path = folder / f".{stem}.zip.tmp", folder / f"{stem}.zip"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:      # safetensors do not compress
        for f in files:
            z.write(f, f.name)
    tmp.replace(path)
    return path


def export_run(ctx, ref: str, fmt: str, dtype: str = "fp32") -> ExportOutcome:
    """Write ``<run>/exports/<format>-<dtype>/<name>`` with dorabooth's exporter; returns the download."""
    from dorabooth import export
    from dorabooth.formats.consumers import Verdict
    from dorabooth.pivotal import EXPORT_SUFFIX, is_identifier

    run, status = _finished(ctx, ref)
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    s = status.settings
    if fmt == "diffusers-lora" and s.get("method") in MAGNITUDE_METHODS and s.get("magnitude_axis") == "in":
        raise UserError("this run was trained for ComfyUI / A1111 / Forge (one magnitude per input), which the "
                        "diffusers format cannot hold; export it as 'ComfyUI / A1111 / Forge adapter' or as a "
                        "merged checkpoint")
    dtype = "fp32" if fmt == "diffusers-lora" else dtype          # that format is always written in fp32
    check_disk(ctx.workspace.root, ctx.limits, what="an export")
    info = rd.read_run(run) if rd.is_run(run) else None
    subject = info.subject if info is not None else None
    if subject is not None and is_identifier(subject.token):      # pivotal tokens: named by the word typed
        subject = replace(subject, token=info.config.token)
    stem = file_stem(subject, s.get("method", "dora"), fmt, dtype)
    folder = run / "exports" / f"{fmt}-{dtype}"
    out = folder / (stem if fmt == "merged-diffusers" else f"{stem}.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    result = export(run, format=fmt, out=out, model=_base_model(run), model_config=s.get("model_config"),
                    dtype=dtype, overwrite=True)
    path = Path(result.path)
    embeddings = path.with_name(path.stem + EXPORT_SUFFIX)     # pivotal tuning's embeddings
    if path.is_file() and embeddings.is_file():        # pivotal tuning: the file and its embeddings, one download
        path = _zip(folder, stem, [path, embeddings])
    elif path.is_dir():                                # a folder downloads as one zip
        archive = shutil.make_archive(str(folder / f".{stem}.zip.tmp"), "zip", root_dir=path.parent, base_dir=path.name)
        path = folder / f"{stem}.zip"
        Path(archive).replace(path)
    report = [v.to_dict() for v in result.report]
    advice = run_advice(ctx, ref)
    if report:                                         # this file's own report decides its rows
        verdicts = {f: [Verdict(**d) for d in r] for f, r in {**advice.reports, fmt: report}.items()}
        advice = Advice(advice.method, advice.axis, picks(verdicts, advice.method, advice.axis), advice.reports)
    return ExportOutcome(path, fmt, report, list(result.notes), advice.picks)


USE_ADVICE = {
    "comfy": "Trains the kind of DoRA that ComfyUI, A1111 and Forge apply exactly: the small adapter file works "
             "there as trained. For diffusers you would export a merged model, which is exact too.",
    "diffusers": "Trains the kind of DoRA that diffusers stores: the small adapter file loads in diffusers. For "
                 "ComfyUI, A1111 or Forge you would export a merged checkpoint, which is exact there.",
    "unsure": "Trains for ComfyUI / A1111 / Forge: the small adapter file is exact in three of the four tools, and "
              "for diffusers the merged model is exact. You choose the file when you export.",
}


def use_advice(use_label: str, method: str = "dora") -> str:
    """What the Train tab says under "Where will you use it?"."""
    use = next((k for k, v in USES.items() if v == use_label), None)
    if use is None:
        raise UserError(f"choose where you will use it: {', '.join(USES.values())}")
    if method == "lora":
        return "LoRA works the same in every tool: this choice only matters for DoRA."
    return USE_ADVICE[use]
