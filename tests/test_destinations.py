"""Which file to pick for ComfyUI, A1111, Forge and diffusers, derived from the consumer report
(dorabooth/formats/destinations.py): one rule, so the app's hint and its report agree."""

import re

import pytest

from dorabooth.formats.consumers import Verdict
from dorabooth.formats.destinations import AXIS_FOR_USE, DESTINATIONS, in_words, pick_for, picks

JARGON = re.compile(r"PR #|#\d|‖|--[a-z]|_row|_col|wd_on|dora_scale|lora_magnitude")


def v(consumer, status, err=None, applied=10, total=10, base_problem=False):
    return Verdict(consumer, status, applied, total, "why", "instead", err, None, None, [], base_problem)


def report(diffusers, comfy, a1111):
    return [v("diffusers", *diffusers), v("ComfyUI", *comfy), v("A1111", *a1111), v("LyCORIS", "not applied")]


def by_destination(ps):
    return {p.destination: p for p in ps}


def test_axis_in_run_kohya_exact_in_comfy_tools_merged_for_diffusers():
    ps = by_destination(picks({"kohya": report(("approximate", 0.25), ("exact", 0.0), ("exact", 0.0))}, "dora", "in"))
    assert [ps[d].format for d in DESTINATIONS] == ["kohya", "kohya", "kohya", "merged-diffusers"]
    assert all(p.exact and not p.retrain for p in ps.values())
    assert "25%" in ps["diffusers"].reason and "exact" in ps["diffusers"].reason
    assert "Forge" in ps["Forge"].reason and "ComfyUI" in ps["Forge"].reason       # Forge is ComfyUI's code


def test_axis_out_run_offers_merged_or_retrain_for_comfy_tools():
    reports = {"kohya": report(("approximate", 0.28), ("approximate", 0.069), ("approximate", 0.49)),
               "diffusers-lora": report(("exact", 0.0), ("approximate", 0.33), ("not applied",))}
    ps = by_destination(picks(reports, "dora", "out"))
    assert ps["diffusers"].format == "diffusers-lora" and not ps["diffusers"].retrain
    for d in ("ComfyUI", "A1111", "Forge"):
        assert ps[d].format == "merged-single-file" and ps[d].retrain, d
    assert "6.9%" in ps["ComfyUI"].reason and "49%" in ps["A1111"].reason
    assert pick_for("comfy", list(ps.values())).format == "merged-single-file"


def test_a_base_the_tool_cannot_load_gets_no_file_and_no_retrain():
    fails = ("fails to load", None, 0, 10, True)
    ps = by_destination(picks({"kohya": report(("approximate", 0.1), fails, fails)}, "dora", "out"))
    assert ps["ComfyUI"].format == ps["A1111"].format == ps["Forge"].format == ""
    assert not any(p.retrain for p in ps.values()) and "cannot load this base model" in ps["A1111"].reason


def test_lora_is_exact_everywhere_and_never_retrained():
    exact = ("exact", 0.0)
    ps = picks({"kohya": report(exact, exact, exact), "diffusers-lora": report(exact, ("approximate", 0.3),
                                                                               ("not applied",))}, "lora", None)
    assert [p.format for p in ps] == ["kohya", "kohya", "kohya", "diffusers-lora"] and not any(p.retrain for p in ps)


@pytest.mark.parametrize("verdict, words", [
    (v("ComfyUI", "exact", 0.0), "applies it exactly as trained"),
    (v("ComfyUI", "approximate", 0.0691, 8, 10), "applies it only approximately: weights off by up to 6.91%; "
                                                  "2 of 10 layers are skipped"),
    (v("A1111", "not applied"), "does not read this file"),
    (v("A1111", "fails to load", base_problem=True), "cannot load this base model at all"),
])
def test_verdicts_in_words(verdict, words):
    assert in_words(verdict) == words


def test_advice_is_written_for_the_apps_user():
    reports = {"kohya": report(("approximate", 0.28), ("approximate", 0.069), ("approximate", 0.49)),
               "diffusers-lora": report(("approximate", 0.0691), ("approximate", 0.33), ("not applied",))}
    for p in picks(reports, "dora", "out"):
        assert not JARGON.search(p.reason), p.reason
    assert AXIS_FOR_USE == {"comfy": "in", "diffusers": "out", "unsure": "in"}
