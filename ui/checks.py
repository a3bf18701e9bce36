"""What the Analyze tab leads with: was the subject learned, and does the class prompt still
draw the class — the run's own two prompts, a few seeds each, with the images.

On the embedded toy model the toy world's reader scores the images (``dorabooth.evaluate``,
scorer ``toy``): the share of instance-prompt images that show the subject, and of
class-prompt images that still show the class (their shape is the class noun) rather than
the subject. On any other base there is no reader here (``dorabooth eval --clip/--dino``
scores with local CLIP/DINO models), so the images are shown to judge by eye.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dorabooth import rundir as rd

from .runs import live_status
from .workspace import UserError

SEEDS = (0, 1, 2, 3)


@dataclass
class CheckOutcome:
    subject_prompt: str
    class_prompt: str
    class_noun: str
    subject_images: list[tuple[str, str]] = field(default_factory=list)   # (png, caption)
    class_images: list[tuple[str, str]] = field(default_factory=list)
    learned: float | None = None        # share of subject-prompt images that show the subject
    class_kept: float | None = None     # share of class-prompt images that still show the class
    leak: float | None = None           # share of class-prompt images that show the subject
    scorer: str | None = None           # "toy", or None: judge by eye


def check_run(ctx, ref: str, *, seeds=SEEDS, steps: int | None = None) -> CheckOutcome:
    """Images of the run's instance prompt and class prompt (``<run>/analysis/check/``), scored
    where a reader exists."""
    from dorabooth.evaluate import evaluate_run, is_toy_base, read_eval_run

    run = ctx.workspace.run(ref)
    status = live_status(ctx.worker, run)
    if not status.finished:
        raise UserError(f"{ref} has no trained adapter yet ({status.state}); pick a finished run")
    er = read_eval_run(run)
    folder = run / "analysis" / "check"
    folder.mkdir(parents=True, exist_ok=True)
    out = CheckOutcome(er.instance_prompt, er.class_prompt, er.class_noun)
    settings = status.settings
    if is_toy_base(er):
        prompts = folder / "prompts.json"
        prompts.write_text(json.dumps({"name": "app-check", "prompts": [
            {"prompt": "{instance}", "kind": "subject"}, {"prompt": "{class_prompt}", "kind": "class"}]}))
        result = ctx.sessions.use(settings.get("model"), lambda session: evaluate_run(
            run, prompts=prompts, seeds=list(seeds), scorer="toy", steps=steps, save_images=folder,
            session=session), model_config=settings.get("model_config"))
        _scored(out, result)
    else:
        ctx.sessions.use(settings.get("model"), lambda session: _unscored(out, session, run, folder, seeds, steps),
                         model_config=settings.get("model_config"))
    return out


def _scored(out: CheckOutcome, result: dict) -> None:
    from dorabooth.toyworld.world import SHAPES

    rows = {0: [], 1: []}
    for row in result["images"]:
        rows[row["prompt_index"]].append(row)
    out.scorer = "toy"
    out.learned = _share(r["subject"] for r in rows[0])
    out.leak = _share(r["subject"] for r in rows[1])
    if out.class_noun in SHAPES:
        out.class_kept = _share(r["reading"]["shape"] == out.class_noun and not r["subject"] for r in rows[1])
    out.subject_images = [(r["path"], _caption(r, "your subject" if r["subject"] else "not your subject"))
                          for r in rows[0]]
    out.class_images = [(r["path"], _caption(r, "your subject" if r["subject"] else r["reading"]["shape"] or "?"))
                        for r in rows[1]]


def _unscored(out: CheckOutcome, session, run: Path, folder: Path, seeds, steps) -> None:
    from dorabooth.generate import save_png

    session.use_adapter(rd.resolve_adapter(run))
    session.set_strength(1.0)
    rows = ((out.subject_prompt, out.subject_images), (out.class_prompt, out.class_images))
    for i, (prompt, into) in enumerate(rows):
        for seed, image in zip(seeds, session.generate(prompt, seeds=list(seeds), steps=steps)):
            into.append((str(save_png(image, folder, f"{i:03d}-s{seed}.png")), f"seed {seed}"))


def _share(flags) -> float | None:
    flags = [bool(f) for f in flags]
    return sum(flags) / len(flags) if flags else None


def _caption(row: dict, reads: str) -> str:
    return f"seed {row['seed']}: reads as {reads}"
