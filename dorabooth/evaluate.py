"""Subject fidelity and prompt fidelity of a trained run (``dorabooth eval``).

A run's final adapter (or full fine-tune, or one checkpoint's adapter) generates one image
per prompt of a prompt set (``prompts/``) and seed; each image is scored by one of two
scorers:

- ``toy``: the embedded toy world's attribute reader (:func:`dorabooth.toyworld.read`).
  Subject fidelity = share of subject-prompt images that read as the subject (shape,
  pattern and colours); prompt fidelity = share of images of prompts with expectations
  (e.g. ``"background": "blue"``) that show every expected attribute; class leak = share of
  class-prompt images that read as the subject (prior preservation failing). Each result
  carries the reader's measured shape accuracy on the toy model's own generations
  (``reader_accuracy``: for the subject's shape and per shape, from
  ``toyworld.reader.GENERATED_SHAPE_ACCURACY``), and the table prints it beside the scores.
- ``embedding``: the metrics DreamBooth papers report, from local model folders the user
  passes (nothing is downloaded): DINO (ViT/DINOv2 CLS features) and CLIP-I = mean cosine
  similarity of generated and real subject images; CLIP-T = mean cosine similarity of a
  generated image and its prompt with the subject token removed. Subject fidelity = DINO
  (else CLIP-I), prompt fidelity = CLIP-T.

Prompt sets are JSON (``{"name", "prompts": [{"prompt", "kind", "expect"}]}``) or plain
text (one prompt per line, ``#`` comments). Placeholders: ``{instance}`` (the run's instance
prompt), ``{class_prompt}``, ``{token}``, ``{class_noun}``. ``kind`` is ``subject``
(default) or ``class``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import rundir as rd
from .analysis import run_info
from .data import list_images
from .events import EventLog
from .formats.files import write_json
from .generate import Session, save_png
from .models import TOY_ALIASES, TOY_MODEL, refuse_pickled_weights, shipped_path

PROMPTS_DIR = shipped_path("prompts")
DEFAULT_PROMPTS = {"toy": PROMPTS_DIR / "toy-eval.json", "embedding": PROMPTS_DIR / "dreambooth-objects.txt"}
SCORERS = ("auto", "toy", "embedding")
DEFAULT_SEEDS = (0, 1, 2)


# =============================================================================================
# Prompt sets
# =============================================================================================
@dataclass(frozen=True)
class EvalPrompt:
    template: str
    kind: str = "subject"                               # subject | class
    expect: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[EvalPrompt, ...]
    source: str


def load_prompts(path: str | os.PathLike) -> PromptSet:
    """A prompt set from a ``.json`` or plain-text file; a bare name looks in ``prompts/``."""
    p = Path(path)
    if not p.exists() and not p.suffix and (PROMPTS_DIR / p).with_suffix(".json").is_file():
        p = (PROMPTS_DIR / p).with_suffix(".json")
    elif not p.exists() and (PROMPTS_DIR / p.name).is_file():
        p = PROMPTS_DIR / p.name
    if not p.is_file():
        known = ", ".join(sorted(f.name for f in PROMPTS_DIR.glob("*"))) if PROMPTS_DIR.is_dir() else "none"
        raise FileNotFoundError(f"prompt set {path}: no such file (sets in {PROMPTS_DIR}: {known})")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        items = []
        for i, item in enumerate(data.get("prompts", [])):
            item = {"prompt": item} if isinstance(item, str) else item
            kind = item.get("kind", "subject")
            if kind not in ("subject", "class") or not item.get("prompt"):
                raise ValueError(f"{p}: prompt {i} needs a non-empty 'prompt' and kind 'subject' or 'class'")
            items.append(EvalPrompt(item["prompt"], kind, dict(item.get("expect", {}))))
        name = data.get("name", p.stem)
    else:
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        items = [EvalPrompt(ln) for ln in lines if ln and not ln.startswith("#")]
        name = p.stem
    if not items:
        raise ValueError(f"{p}: the prompt set is empty")
    return PromptSet(name, tuple(items), str(p))


def fill(template: str, fields: Mapping[str, str]) -> str:
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(f"prompt {template!r}: unknown placeholder {e}; use {{instance}}, {{class_prompt}}, "
                         f"{{token}} or {{class_noun}}") from None


# =============================================================================================
# Runs
# =============================================================================================
@dataclass(frozen=True)
class EvalRun:
    path: Path
    method: str
    label: str
    base: str                     # base model folder / file / id
    base_id: str
    token: str
    class_noun: str
    instance_prompt: str
    class_prompt: str
    images: str                   # the subject photos the run was given
    seed: int | None
    lr: float | None

    @property
    def fields(self) -> dict[str, str]:
        return {"instance": self.instance_prompt, "class_prompt": self.class_prompt, "token": self.token,
                "class_noun": self.class_noun}


def read_eval_run(run: str | os.PathLike) -> EvalRun:
    """The run's facts for evaluation; its prompts exactly as the trainer resolved them."""
    r = rd.read_run(run)
    info, config = run_info(r), r.config
    return EvalRun(path=info.path, method=info.method, label=info.label, base=info.base,
                   base_id=r.base_id, token=config.identifier, class_noun=config.class_noun,
                   instance_prompt=config.resolved_instance_prompt, class_prompt=config.resolved_class_prompt,
                   images=config.images or "", seed=info.seed, lr=info.lr)


def adapter_of(run: EvalRun, checkpoint: int | None) -> rd.AdapterSource:
    """What to load for the run: its final adapter / unet, or a checkpoint's adapter file."""
    if checkpoint is None:
        return rd.resolve_adapter(run.path)
    if run.method == "full":
        raise ValueError(f"{run.path}: evaluating a checkpoint of a full fine-tune is not supported (its "
                         f"checkpoints hold training state, not a UNet folder); evaluate the final unet/")
    return rd.AdapterSource("adapter", rd.checkpoint_adapter(run.path, checkpoint), run.base, True)


def is_toy_base(run: EvalRun) -> bool:
    if run.base_id in TOY_ALIASES:
        return True
    try:
        return Path(run.base).resolve() == TOY_MODEL.resolve()
    except OSError:
        return False


def subject_images(run: EvalRun) -> list[Path]:
    """The run's prepared subject images (``instance/``), else the photos it was given."""
    for folder in (run.path / rd.INSTANCE, Path(run.images)):
        if folder.is_dir():
            found = list_images(folder)
            if found:
                return found
    raise FileNotFoundError(f"{run.path}: no subject images (neither instance/ nor {run.images}) to compare with")


# =============================================================================================
# Scorers
# =============================================================================================
class ToyScorer:
    """The toy world's attribute reader. The subject is ``subject.json``'s combination next to
    the run's photos (the sample subjects), else what most of its photos read as."""

    name = "toy"

    def __init__(self, run: EvalRun):
        from PIL import Image

        from .toyworld import read

        self.read = read
        info = Path(run.images) / "subject.json"
        if info.is_file():
            c = json.loads(info.read_text())["combination"]
            self.subject = (c["shape"], c.get("pattern"), c["colour"], c.get("colour2"))
            self.source = str(info)
        else:
            votes: dict[tuple, int] = {}
            for p in subject_images(run):
                with Image.open(p) as im:
                    key = self._identity(read(im))
                votes[key] = votes.get(key, 0) + 1
            self.subject = max(votes, key=votes.get)
            self.source = "majority reading of the subject photos"
        self.colours = {c for c in self.subject[2:] if c}

    @staticmethod
    def _identity(r: Mapping) -> tuple:
        if r["pattern"] is not None and r["colours"]:
            return (r["shape"], r["pattern"], *r["colours"])
        return (r["shape"], None, r["colour"], None)

    def usable(self, prompt: EvalPrompt) -> str | None:
        """Why the reader cannot judge ``prompt`` for this subject (None if it can)."""
        bg = prompt.expect.get("background")
        if bg is not None and bg in self.colours:
            return f"background {bg} is a colour of the subject"
        return None

    def score(self, images, prompt: EvalPrompt, text: str) -> list[dict]:
        out = []
        for image in images:
            r = self.read(image)
            subject = self._identity(r) == self.subject
            follows = all(r.get(k) == v for k, v in prompt.expect.items()) if prompt.expect else None
            out.append({"subject": subject, "prompt": follows,
                        "reading": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}})
        return out

    def describe(self) -> dict:
        """What scored the images, with the reader's measured shape accuracy on the toy model's
        own generations (``toyworld.reader.GENERATED_SHAPE_ACCURACY``): for the subject's shape,
        and per shape."""
        from .toyworld.reader import READER_SET, shape_accuracy

        per_shape = shape_accuracy()
        return {"scorer": "toy", "subject": list(self.subject), "subject_from": self.source,
                "reader_accuracy": {"subject_shape": self.subject[0], **per_shape.get(self.subject[0], {}),
                                    "per_shape": per_shape,
                                    "measured_on": f"toy-model generations labelled by eye ({READER_SET})"}}


class EmbeddingScorer:
    """DINO / CLIP-I / CLIP-T from local model folders (``--dino DIR``, ``--clip DIR``)."""

    name = "embedding"

    def __init__(self, run: EvalRun, clip: str | None = None, dino: str | None = None):
        from PIL import Image

        if clip is None and dino is None:
            raise ValueError("the embedding scorer needs --clip DIR and/or --dino DIR: local copies of e.g. "
                             "openai/clip-vit-large-patch14 and facebook/dinov2-small (nothing is downloaded)")
        self.run = run
        self.clip = _load_clip(clip) if clip else None
        self.dino = _load_dino(dino) if dino else None
        self.paths = {"clip": clip, "dino": dino}
        refs = []
        for p in subject_images(run):
            with Image.open(p) as im:
                refs.append(im.convert("RGB"))
        self.ref = {}
        if self.clip:
            self.ref["clip_i"] = self._clip_images(refs)
        if self.dino:
            self.ref["dino"] = self._dino_images(refs)

    def usable(self, prompt: EvalPrompt) -> str | None:
        return None

    @torch.no_grad()
    def _clip_images(self, images) -> torch.Tensor:
        model, processor = self.clip
        inputs = processor(images=list(images), return_tensors="pt")
        return _unit(_features(model.get_image_features(pixel_values=inputs["pixel_values"])))

    @torch.no_grad()
    def _clip_text(self, text: str) -> torch.Tensor:
        model, processor = self.clip
        inputs = processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        return _unit(_features(model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs.get("attention_mask"))))

    @torch.no_grad()
    def _dino_images(self, images) -> torch.Tensor:
        model, processor = self.dino
        inputs = processor(images=list(images), return_tensors="pt")
        return _unit(model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0])   # CLS: (N, D)

    def score(self, images, prompt: EvalPrompt, text: str) -> list[dict]:
        rows = [{} for _ in images]
        if self.dino:
            for row, s in zip(rows, (self._dino_images(images) @ self.ref["dino"].T).mean(1).tolist()):
                row["dino"] = s
        if self.clip:
            feats = self._clip_images(images)
            plain = " ".join(w for w in text.split() if w != self.run.token)     # the prompt without the token
            t = self._clip_text(plain)
            for row, si, st in zip(rows, (feats @ self.ref["clip_i"].T).mean(1).tolist(), (feats @ t.T)[:, 0].tolist()):
                row["clip_i"], row["clip_t"] = si, st
        for row in rows:
            row["subject"] = row.get("dino", row.get("clip_i"))
            row["prompt"] = row.get("clip_t") if prompt.kind == "subject" else None
        return rows

    def describe(self) -> dict:
        return {"scorer": "embedding", "models": self.paths,
                "subject_fidelity": "DINO" if self.dino else "CLIP-I", "prompt_fidelity": "CLIP-T" if self.clip else None}


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features, 5 a model output holding them as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _model_folder(path: str, flag: str, example: str) -> str:
    p = Path(path).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise FileNotFoundError(f"{flag} {path}: not a local model folder (needs config.json and weights). dorabooth "
                                f"never downloads evaluation models; on a machine with internet run e.g. "
                                f"`huggingface-cli download {example} --local-dir DIR` and pass {flag} DIR")
    refuse_pickled_weights(p, f"Download its .safetensors weights instead (`huggingface-cli download {example} "
                              f"--include '*.safetensors' '*.json' '*.txt' --local-dir DIR`) or re-save it with "
                              f"save_pretrained")
    return str(p)


def _load_clip(path: str):
    from transformers import CLIPModel, CLIPProcessor

    folder = _model_folder(path, "--clip", "openai/clip-vit-large-patch14")
    return (CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval(),
            CLIPProcessor.from_pretrained(folder, local_files_only=True))


def _load_dino(path: str):
    from transformers import AutoImageProcessor, AutoModel

    folder = _model_folder(path, "--dino", "facebook/dinov2-small")
    return (AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval(),
            AutoImageProcessor.from_pretrained(folder, local_files_only=True))


def make_scorer(run: EvalRun, scorer: str = "auto", clip: str | None = None, dino: str | None = None):
    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r}: choose one of {', '.join(SCORERS)}")
    if scorer == "auto":
        if clip or dino:
            scorer = "embedding"
        elif is_toy_base(run):
            scorer = "toy"
        else:
            raise ValueError(f"{run.path} was trained on {run.base_id}, not the toy model: pass --clip DIR and/or "
                             f"--dino DIR (local CLIP / DINOv2 folders; nothing is downloaded), or --scorer toy "
                             f"if its images are toy-world pictures")
    return ToyScorer(run) if scorer == "toy" else EmbeddingScorer(run, clip=clip, dino=dino)


# =============================================================================================
# Evaluation
# =============================================================================================
def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def evaluate_run(run: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
                 seeds: Sequence[int] = DEFAULT_SEEDS, scorer: str = "auto", clip: str | None = None,
                 dino: str | None = None, checkpoint: int | None = None, steps: int | None = None,
                 guidance: float | None = None, save_images: str | os.PathLike | None = None,
                 session=None, on_event: Callable[[dict], None] | None = None) -> dict:
    """Generate ``len(seeds)`` images per prompt with ``run`` and score them (module docstring).

    ``session``: a :class:`dorabooth.generate.Session` on the run's base model to reuse."""
    if not seeds:
        raise ValueError("give at least one seed")
    emit = EventLog(None, on_event)
    r = read_eval_run(run)
    sc = make_scorer(r, scorer, clip, dino)
    pset = load_prompts(prompts if prompts is not None else DEFAULT_PROMPTS[sc.name])
    source = adapter_of(r, checkpoint)
    if session is None:
        session = Session(r.base)
    session.use_adapter(source)
    session.set_strength(1.0)
    per_prompt, skipped, images_out = [], [], []
    for i, item in enumerate(pset.prompts):
        text = fill(item.template, r.fields)
        why = sc.usable(item)
        if why is not None:
            skipped.append({"prompt": text, "reason": why})
            continue
        images = session.generate(text, seeds=list(seeds), steps=steps, guidance=guidance)
        rows = sc.score(images, item, text)
        for seed, image, row in zip(seeds, images, rows):
            row.update(prompt_index=i, seed=seed)
            if save_images is not None:
                row["path"] = str(save_png(image, save_images, f"{i:03d}-s{seed}.png"))
            images_out.append(row)
        per_prompt.append({"prompt": text, "kind": item.kind, "expect": dict(item.expect), "n": len(rows),
                           "subject": _mean(x["subject"] for x in rows),
                           "prompt_fidelity": _mean(x["prompt"] for x in rows)})
        emit("eval", run=str(r.path), done=i + 1, total=len(pset.prompts))
    subj = [x for x in images_out if pset.prompts[x["prompt_index"]].kind == "subject"]
    cls = [x for x in images_out if pset.prompts[x["prompt_index"]].kind == "class"]
    metrics = {"subject_fidelity": _mean(x["subject"] for x in subj),
               "prompt_fidelity": _mean(x["prompt"] for x in subj),
               "n_images": len(images_out)}
    if sc.name == "toy":
        metrics["class_leak"] = _mean(x["subject"] for x in cls)
    else:
        for k in ("dino", "clip_i", "clip_t"):
            metrics[k] = _mean(x.get(k) for x in subj)
    return {"run": str(r.path), "label": r.label, "method": r.method, "seed": r.seed, "lr": r.lr,
            "snapshot": "final" if checkpoint is None else f"step-{checkpoint}", "prompt_set": pset.name,
            "prompt_file": pset.source, "seeds": list(seeds), **sc.describe(), "metrics": metrics,
            "per_prompt": per_prompt, "skipped": skipped, "images": images_out}


def evaluate(runs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
             save_images: str | os.PathLike | None = None, **kwargs) -> list[dict]:
    """Evaluate several runs (one loaded base model per distinct base); write the JSON.

    ``out``: a ``.json`` file for all results; by default each run gets ``RUN/eval.json``
    (``RUN/eval-step-N.json`` for a checkpoint). ``save_images``: a folder that gets one
    subfolder of PNGs per run. Other keyword arguments go to :func:`evaluate_run`."""
    if not runs:
        raise ValueError("give at least one run folder")
    sessions: dict[str, object] = {}
    results = []
    for run in runs:
        base = read_eval_run(run).base
        if base not in sessions:
            sessions[base] = Session(base)
        images = None if save_images is None else Path(save_images) / Path(run).name
        result = evaluate_run(run, session=sessions[base], save_images=images, **kwargs)
        results.append(result)
        if out is None:
            name = "eval.json" if result["snapshot"] == "final" else f"eval-{result['snapshot']}.json"
            write_json(Path(run) / name, result)
    if out is not None:
        write_json(Path(out), {"runs": results})
    return results


def format_table(results: Sequence[Mapping]) -> str:
    """One row per run: subject fidelity, prompt fidelity (and class leak / DINO, CLIP-I, CLIP-T);
    for the toy scorer also the reader's shape accuracy for the subject's shape, and a line of
    its accuracy per shape under the table."""
    toy = bool(results) and results[0].get("scorer") == "toy"
    extra = ["class_leak"] if toy else ["dino", "clip_i", "clip_t"]
    head = f"{'run':<28} {'label':<12} {'seed':>4} {'lr':>8} {'subject':>8} {'prompt':>8}" + "".join(
        f" {k:>10}" for k in extra) + (f" {'reader':>14}" if toy else "") + f" {'images':>6}"
    rows = [head, "-" * len(head)]
    for res in results:
        m = res["metrics"]
        rows.append(f"{Path(res['run']).name[:28]:<28} {res['label']:<12} {_fmt(res['seed'], 'd'):>4} "
                    f"{_fmt(res['lr'], '.0e'):>8} {_fmt(m['subject_fidelity'], '.3f'):>8} "
                    f"{_fmt(m['prompt_fidelity'], '.3f'):>8}"
                    + "".join(f" {_fmt(m.get(k), '.3f'):>10}" for k in extra)
                    + (f" {_reader_cell(res.get('reader_accuracy', {})):>14}" if toy else "")
                    + f" {m['n_images']:>6}")
    if toy and results[0].get("reader_accuracy"):
        acc = results[0]["reader_accuracy"]
        rows.append(f"reader: shape read right on {acc['measured_on']}: " + ", ".join(
            f"{shape} {v['correct']}/{v['n']}" for shape, v in acc["per_shape"].items()))
    return "\n".join(rows)


def _reader_cell(acc: Mapping) -> str:
    """The reader's shape accuracy for the subject's shape: "star 71/71"."""
    return f"{acc['subject_shape']} {acc['correct']}/{acc['n']}" if acc.get("n") else "n/a"


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None without values)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


__all__ = ["evaluate", "evaluate_run", "format_table", "load_prompts", "make_scorer", "mean_std", "PromptSet",
           "EvalPrompt", "DEFAULT_PROMPTS", "SCORERS"]
