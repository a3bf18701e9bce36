"""Which file to pick for the tool a user works in, derived from the consumer report.

The app asks "Where will you use it?" in plain words (:data:`USES`) and trains the magnitude
axis that makes the small adapter file exact there (:data:`AXIS_FOR_USE`). At export it turns
the per-tool report of each adapter file a run can be written as (:mod:`.consumers`: the same
verdicts ``dorabooth export`` prints) into one :class:`Pick` per destination: the file, whether
it is exact there, and a one-line reason for the app's user. The hint before an export and the
advice beside its report both come from :func:`picks`, so they cannot disagree with the report.

Forge applies LoRA/DoRA with ComfyUI's own code (``backend/patcher/lora.py`` in
lllyasviel/stable-diffusion-webui-forge: ComfyUI's key maps and ``weight_decompose``), so its
verdict is ComfyUI's.

"Not sure" trains axis ``in``. What the consumer report measures (docs/export.md, rank 4,
large updates, SDXL / SD 1.5):

* axis ``in`` → the kohya file is exact in ComfyUI, A1111 and Forge (3 of the 4
  destinations); diffusers cannot hold it as an adapter (its format stores one magnitude per
  output) and drops the magnitudes of the kohya file (25–27 % off), so diffusers users get the
  merged model folder — exact, as every merged checkpoint is — or dorabooth's own loader.
* axis ``out`` → exact as an adapter file in diffusers only, and there only while the text
  encoders are not trained (with transformers 5, ``load_lora_weights`` drops their magnitudes:
  2.4–28 % off); ComfyUI and Forge 0.5–7 % off, A1111 44–49 % off.

So ``in`` makes the small file exact in more places, and the merged checkpoint covers the
rest either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .consumers import Verdict

DESTINATIONS = ("ComfyUI", "A1111", "Forge", "diffusers")
TOOL = {"ComfyUI": "ComfyUI", "A1111": "A1111", "Forge": "ComfyUI", "diffusers": "diffusers"}
COMFY_LIKE = ("ComfyUI", "A1111", "Forge")
USES = {"comfy": "ComfyUI / A1111 / Forge", "diffusers": "diffusers / Python", "unsure": "Not sure"}
AXIS_FOR_USE = {"comfy": "in", "diffusers": "out", "unsure": "in"}
USE_OF_DESTINATION = {"ComfyUI": "comfy", "A1111": "comfy", "Forge": "comfy", "diffusers": "diffusers"}
FILE_WORDS = {"kohya": "the ComfyUI / A1111 / Forge adapter file", "diffusers-lora": "the diffusers adapter file",
              "merged-single-file": "the merged checkpoint (one file)",
              "merged-diffusers": "the merged model folder"}
MERGED = {"ComfyUI": "merged-single-file", "A1111": "merged-single-file", "Forge": "merged-single-file",
          "diffusers": "merged-diffusers"}
PREFERRED = {"diffusers": ("diffusers-lora", "kohya")}            # else ("kohya", "diffusers-lora")


@dataclass(frozen=True)
class Pick:
    destination: str          # ComfyUI | A1111 | Forge | diffusers
    format: str               # the file to export; "" when no file made from this base works there
    exact: bool
    reason: str               # one line, for the app's user (:func:`hint` puts the file in front)
    retrain: bool = False     # a run trained for ComfyUI / A1111 / Forge (axis "in") would make the small file exact


def picks(reports: Mapping[str, Sequence[Verdict]], method: str, axis: str | None) -> list[Pick]:
    """One :class:`Pick` per destination from ``reports`` (adapter format → its verdicts): the
    first adapter file that is exact there, else the merged checkpoint (exact in every tool that
    loads the base), else nothing (the tool cannot load the base model)."""
    by = {fmt: {v.consumer: v for v in verdicts} for fmt, verdicts in reports.items()}
    return [_pick(d, by, method, axis) for d in DESTINATIONS]


def _pick(destination: str, by: Mapping[str, Mapping[str, Verdict]], method: str, axis: str | None) -> Pick:
    tool = TOOL[destination]
    like = "" if tool == destination else f", as {tool} does (Forge uses ComfyUI's code for adapters)"
    order = [f for f in PREFERRED.get(destination, ("kohya", "diffusers-lora")) if tool in by.get(f, {})]
    verdicts = [(f, by[f][tool]) for f in order]
    if any(v.base_problem for _, v in verdicts):
        return Pick(destination, "", False, f"{destination} cannot load this base model at all, so no file made "
                                            f"from it works there; use it with dorabooth or diffusers")
    for fmt, v in verdicts:
        if v.status == "exact":
            return Pick(destination, fmt, True, f"{destination} applies it exactly as trained{like}.")
    merged = MERGED[destination]
    best = verdicts[0][1] if verdicts else None
    if best is None:
        why = "no adapter file can be made for this run"
    elif best.status == "approximate":
        off = f" (weights off by up to {100 * best.max_rel_error:.3g}%)" if best.max_rel_error is not None else ""
        why = f"{destination} would apply {FILE_WORDS[verdicts[0][0]]} only approximately{off}{like}"
    else:
        why = f"{destination} cannot use {FILE_WORDS[verdicts[0][0]]} ({best.status}){like}"
    retrain = destination in COMFY_LIKE and method != "lora" and axis == "out"
    return Pick(destination, merged, True, f"{why}; the merged one has your subject baked in and is exact.", retrain)


def _first_up(text: str) -> str:
    return text[:1].upper() + text[1:]


def hint(pick: Pick) -> str:
    """The pick as one sentence: ``"The merged checkpoint (one file): ComfyUI would …"``."""
    return f"{_first_up(FILE_WORDS[pick.format])}: {pick.reason}" if pick.format else pick.reason


def pick_for(use: str, picks_: Sequence[Pick]) -> Pick:
    """The pick for an answer to "Where will you use it?": ComfyUI's for "ComfyUI / A1111 / Forge"
    (the three differ only where A1111 cannot load a base ComfyUI loads; every row is shown too)."""
    destination = {"comfy": "ComfyUI", "diffusers": "diffusers"}.get(use)
    if destination is None:
        raise ValueError(f"use {use!r}: choose one of {', '.join(k for k in USES if k != 'unsure')}")
    return next(p for p in picks_ if p.destination == destination)


def in_words(v: Verdict) -> str:
    """One verdict for the app's user: what the tool does with the file, without formulas."""
    if v.status == "exact":
        return "applies it exactly as trained"
    if v.status == "approximate":
        off = f": weights off by up to {100 * v.max_rel_error:.3g}%" if v.max_rel_error is not None else ""
        skipped = f"; {v.total - v.applied} of {v.total} layers are skipped" if v.applied < v.total else ""
        return f"applies it only approximately{off}{skipped}"
    if v.status == "not applied":
        return "does not read this file"
    return "cannot load this base model at all" if v.base_problem else "refuses this file"


def destination_rows(verdicts: Sequence[Verdict]) -> list[tuple[str, Verdict]]:
    """(destination, the verdict that decides it) for ComfyUI, A1111, Forge and diffusers."""
    by = {v.consumer: v for v in verdicts}
    return [(d, by[TOOL[d]]) for d in DESTINATIONS if TOOL[d] in by]
