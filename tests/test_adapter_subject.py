"""Files that explain themselves, and one report per file.

* Every adapter file we write (the run's own diffusers/PEFT file, an exported kohya file, an
  exported diffusers-lora file, a converted one) names its trigger word, instance prompt and
  class in the header fields tools display (``modelspec.*``, ``ss_*``), and reads back.
* ``export`` and ``adapter-info --consumers`` give the same report for the same file, measured
  against the base the run or file records (issue 12 point 13: the two disagreed, and both
  said "pass --model" for a run whose base was recorded).
"""

import json

import pytest

from dorabooth import TrainConfig, train
from dorabooth.describe import BaseSpec, adapter_info, report_base
from dorabooth.export import convert, export
from dorabooth.formats.adapter_files import read_adapter_file
from dorabooth.formats.files import read_metadata
from dorabooth.formats.subject import Subject, file_stem
from tiny_runs import make_subject, quick, save_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("subject")
    config = TrainConfig(images=str(make_subject(root / "photos")), out=str(root / "run"),
                         model=str(save_model("sd15", root / "base")), token="sks",
                         **quick(prior_preservation=False, train_text_encoders=True))
    train(config)
    return root / "run"


def _header(path):
    return read_metadata(path)[1]


def _check_names_the_subject(meta, kind):
    """The run is on a tiny test model, which gets the toy preset and its caption-style prompts."""
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    assert "sks dog" in meta["modelspec.title"] and "dog" in meta["modelspec.description"]
    assert "a sks dog" in meta["modelspec.description"] and "sks dog" in meta["modelspec.usage_hint"]
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks dog": {"a sks dog": 3}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_sks dog": {"n_repeats": 1, "img_count": 3}}
    assert (meta["dorabooth.token"], meta["dorabooth.class_noun"], meta["dorabooth.instance_prompt"]) == \
        ("sks", "dog", "a sks dog")
    if kind == "kohya":
        assert meta["ss_output_name"] == "sks-dog_dora"            # A1111's alias for <lora:…>


def test_every_adapter_file_names_its_trigger_word_and_class(run, tmp_path):
    own = run / "adapter.safetensors"
    kohya = export(run, format="kohya", out=tmp_path / "k.safetensors").path
    peft = export(run, format="diffusers-lora", out=tmp_path / "d").path
    back = convert(kohya, to="diffusers-lora", out=tmp_path / "from-kohya").path
    for path, kind in ((own, "diffusers"), (kohya, "kohya"), (peft, "diffusers"), (back, "diffusers")):
        _check_names_the_subject(_header(path), kind)
        subject = read_adapter_file(path).subject
        assert subject == Subject("sks", "dog", "a sks dog", "a dog", 3), path
    assert _header(kohya)["dorabooth.base_hash"].startswith("sha256")


def test_another_trainers_trigger_phrase_is_read():
    assert Subject.from_metadata({"modelspec.trigger_phrase": "ohwx woman"}).trigger == "ohwx woman"
    assert Subject.from_metadata({"ss_network_dim": "8"}) is None


def test_download_names_are_distinct_and_descriptive():
    s = Subject("sks", "Dog", "a photo of sks Dog")
    names = {file_stem(s, m, f, d) for m in ("dora", "lora") for f in ("kohya", "diffusers-lora")
             for d in ("fp16", "fp32")}
    assert len(names) == 8 and "sks-dog_dora_kohya_fp16" in names
    assert file_stem(None, "dora", "merged-single-file") == "adapter_dora_merged-single-file"


def test_export_and_adapter_info_give_one_report(run, tmp_path):
    """The same kohya file, no --model anywhere: both measure against the run's recorded base."""
    result = export(run, format="kohya", out=tmp_path / "k.safetensors")
    info = adapter_info(result.path, consumers=True)
    assert [v.to_dict() for v in result.report] == info["consumers"]
    for v in info["consumers"]:
        assert not any("--model" in n for n in v["notes"]), v
        assert v["max_rel_error"] is not None or v["status"] in ("fails to load", "not applied"), v
    assert adapter_info(run, consumers=True)["consumers"] == adapter_info(run / "adapter.safetensors",
                                                                           consumers=True)["consumers"]


def test_the_recorded_base_is_used_when_it_is_here_and_named_when_not(tmp_path):
    base, why = report_base(BaseSpec(), "toy")                       # the embedded toy: always here
    try:
        assert base is not None and base.info.id == "toy" and why == ""
    finally:
        base.weights.close()
    assert report_base(BaseSpec(), str(tmp_path / "gone"))[1].startswith(f"the recorded base {tmp_path / 'gone'} "
                                                                       f"is not on this computer")
    assert "pass --model org/model to download" in report_base(BaseSpec(), "org/model")[1]   # no download
    assert report_base(BaseSpec(), None) == (None, "pass --model to measure the weight error")
