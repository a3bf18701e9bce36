"""The experiment script's fixed rules: the lr choice, the memory probe, the replication table."""

import importlib.util
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dora_vs_lora.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dora_vs_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _res(subject, prompt):
    return {"evals": {"selection": {"metrics": {"subject_fidelity": subject, "prompt_fidelity": prompt}}}}


def test_choose_lr_takes_the_best_sum_and_the_smaller_lr_on_ties(bench):
    assert bench.choose_lr([(1e-4, _res(0.0, 1.0)), (1e-3, _res(0.8, 0.9))]) == 1e-3
    assert bench.choose_lr([(1e-4, _res(0.5, 1.0)), (1e-3, _res(1.0, 0.5))]) == 1e-4       # tie: smaller lr
    assert bench.choose_lr([(1e-4, _res(0.0, 0.0)), (1e-3, {"diverged": "nan", "evals": {}})]) == 1e-4
    assert bench.choose_lr([(1e-4, _res(None, 1.0)), (3e-4, _res(0.1, None))]) == 1e-4     # None counts as 0


def test_peak_rss_sees_an_allocation_made_while_it_watches(bench):
    with bench.PeakRSS() as rss:
        block = bytearray(120 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])                 # touch every page: resident
        time.sleep(0.05)
        del block
    assert rss.peak_mb - rss.start_mb >= 100, (rss.start_mb, rss.peak_mb, rss.how)


def test_replication_report_has_a_row_per_method_and_a_column_per_subject(bench):
    m = {"subject_fidelity": (0.9, 0.05), "prompt_fidelity": (1.0, 0.0), "class_leak": (0.0, 0.0)}
    row = {k: {"a": v, "b": v, "all": v, "subject_means": v} for k, v in m.items()}
    text = bench.replication_report({"chosen_lr": {"LoRA": 1e-3}, "seeds": [0, 1], "subjects": ["a", "b"],
                                     "table": {"LoRA": {**row, "runs": 4}}, "wall_s": 60.0})
    assert "| method | a | b | all runs | mean of subjects |" in text
    assert text.count("| LoRA | 0.900 ± 0.050 | 0.900 ± 0.050 |") == 1
    assert "Replication wall time: 1.0 min" in text


def test_every_method_is_a_valid_config_and_unknown_methods_are_refused(bench, tmp_path):
    """--methods: each entry (the DoRA family's too) makes a TrainConfig the trainer accepts."""
    import argparse

    from dorabooth.config import TrainConfig

    args = argparse.Namespace(model=None, out=tmp_path, checkpoint_every=50, steps=None, rank=None)
    info = dict(class_noun="square", token="sks", instance_prompt="a sks square", class_prompt="a square")
    configs = {m: TrainConfig.from_dict(bench.config_for(args, tmp_path, info, m, 1e-3, 0, tmp_path / m))
               for m in bench.METHODS}
    assert set(bench.DEFAULT_METHODS) < set(configs)
    assert configs["DoRA+conv"].targets == "attn+conv" and configs["DVoRA"].method == "dvora"
    assert configs["DoRA+pivotal"].pivotal_tokens == 2
    with pytest.raises(SystemExit):
        bench.main(["--methods", "nope", "--out", str(tmp_path)])
