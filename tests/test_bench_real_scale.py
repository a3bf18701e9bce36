"""bench/real_scale.py's own logic: step markers, ratios, the README block, arguments, both
sides' settings, and watching another process's memory. No full-size run here."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_scale", BENCH / "real_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_diffusers_tqdm_markers_are_timed_when_they_arrive_even_split_across_reads(bench):
    clock = bench.StepClock(bench.DIFFUSERS_STEP)
    assert clock.feed("Loading weights: 100%|██████████| 68/68 [00:00<00:00]\n", 1.0) == []   # not "Steps:"
    assert clock.feed("\rSteps:   0%|          | 0/3 [00:00<?, ?it/s]", 10.0) == [0]
    assert clock.feed("\rSteps:  33%|███▎      | 1/3 [00:40<01:20, 40.0s/it]", 50.0) == [1]
    assert clock.feed("\rSteps:  33%|███▎      | 1/3 [00:40<01:20, 40.0s/it, loss=0.1, lr=0.0001]", 50.1) == []
    assert clock.feed("\rSteps:  67%|██████▋   | 2", 80.0) == []                            # split marker …
    assert clock.feed("/3 [01:10<00:35, 35.0s/it]", 81.0) == [2]                           # … found on arrival
    assert clock.feed("\rSteps: 100%|██████████| 3/3 [01:40<00:00, 33.3s/it]", 112.0) == [3]
    assert clock.seen == {0: 10.0, 1: 50.0, 2: 81.0, 3: 112.0} and clock.total == 3
    assert bench.step_durations(clock.seen) == [31.0, 31.0]                  # steps 2 and 3; step 1 excluded
    assert bench.step_durations(clock.seen, skip=0) == [40.0, 31.0, 31.0]


def test_dorabooth_markers(bench):
    clock = bench.StepClock(bench.DORABOOTH_STEP)
    assert clock.feed("real_scale step 0/3\nreal_scale step 1/3 loss 0.2\n", 5.0) == [0, 1]
    assert clock.feed("real_scale step 2/3 loss 0.1\nreal_scale step 3/3 loss 0.3\n", 9.0) == [2, 3]
    assert bench.step_durations(clock.seen) == [4.0, 0.0]


def _m(bench, name, steps, cpu, peak, ok=True, error=None):
    return bench.Measurement(name, ok=ok, error=error, setup_s=60.0, step_s=steps, cpu_step_s=cpu, first_step_s=9.0,
                             peak_rss_mb=peak, rss_at_start_mb=peak and peak / 2, peak_training_rss_mb=peak and peak / 2)


def test_table_gives_medians_and_ratios_against_the_reference(bench):
    ms = [_m(bench, "diffusers DoRA", [10.0, 12.0], [20.0, 22.0], 16000.0),
          _m(bench, "dorabooth DoRA", [8.0, 9.0], [15.0, 17.0], 12000.0),
          _m(bench, "dorabooth LoRA", [], [], None, ok=False, error="exited with code -9")]
    summary = bench.summarise(ms)
    assert summary["diffusers DoRA"]["step_s"] == 11.0 and summary["dorabooth DoRA"]["cpu_step_s"] == 16.0
    text = bench.table(summary, "diffusers DoRA")
    lines = text.splitlines()
    assert lines[0].startswith("| run | s/step (median) | × diffusers DoRA | CPU s/step |")
    assert lines[2] == "| diffusers DoRA | 11.00 | 1.000 | 21.00 | 1.000 | 16.78 | 1.000 | 8.39 | 8.39 | 60 |"
    assert lines[3] == (f"| dorabooth DoRA | 8.50 | {8.5 / 11:.3f} | 16.00 | {16 / 21:.3f} | 12.58 | 0.750 | 6.29 "
                        "| 6.29 | 60 |")
    assert "| dorabooth LoRA | failed: exited with code -9 |" in lines[4]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_repeats_pool_steps_and_keep_the_largest_peak(bench):
    summary = bench.summarise([_m(bench, "a", [1.0, 2.0], [1.0, 1.0], 100.0), _m(bench, "a", [3.0, 4.0], [1.0, 1.0], 300.0)])
    assert summary["a"]["step_s"] == 2.5 and summary["a"]["steps_measured"] == 4 and summary["a"]["peak_rss_mb"] == 300.0


def test_readme_block_is_replaced_between_its_markers_or_appended(bench):
    text = "# Benchmarks\n\n## Real scale\n\nprose\n"
    once = bench.update_readme(text, "sdxl cpu 256px", "| table 1 |")
    assert once.endswith("<!-- real-scale sdxl cpu 256px -->\n| table 1 |\n<!-- /real-scale sdxl cpu 256px -->\n")
    twice = bench.update_readme(once + "after\n", "sdxl cpu 256px", "| table 2 |\n")
    assert "| table 1 |" not in twice and "| table 2 |" in twice and twice.endswith("after\n")
    other = bench.update_readme(twice, "sdxl cuda 1024px", "| gpu |")
    assert "| table 2 |" in other and "| gpu |" in other


def test_arguments(bench, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = bench.parse_args([])
    assert (args.family, args.device, args.resolution, args.steps, args.rank) == ("sdxl", "cpu", 256, 5, 16)
    assert args.mixed_precision == "no" and args.gradient_checkpointing and args.threads is None
    env = bench.child_env(args)
    assert env["HF_HUB_OFFLINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "" and "OMP_NUM_THREADS" not in env
    assert bench.readme_key(vars(args)) == "sdxl cpu 256px"
    one = bench.parse_args(["--threads", "1"])
    assert bench.child_env(one)["OMP_NUM_THREADS"] == "1" and bench.readme_key(vars(one)) == "sdxl cpu 256px 1-thread"
    assert args.runs == ["diffusers DoRA", "dorabooth DoRA", "dorabooth LoRA", "diffusers LoRA"]
    assert bench.reference_run(args.runs) == "diffusers DoRA"
    assert bench.parse_args(["--device", "cuda", "--resolution", "1024"]).mixed_precision == "bf16"
    sd15 = bench.parse_args(["--family", "sd15"])
    assert "diffusers DoRA" not in sd15.runs and bench.reference_run(sd15.runs) == "diffusers LoRA"
    args = bench.parse_args(["--runs", "dorabooth DoRA", "diffusers DoRA", "--repeats", "2"])
    assert bench.plan(args) == ["dorabooth DoRA", "diffusers DoRA", "diffusers DoRA", "dorabooth DoRA"]
    for bad in (["--family", "sd15", "--runs", "diffusers DoRA"], ["--runs", "dorabooth DoRA"], ["--steps", "1"],
                ["--resolution", "250"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_both_sides_get_the_same_settings(bench, tmp_path):
    from dorabooth.config import TrainConfig

    args = bench.parse_args([])
    argv = bench.diffusers_args(args, tmp_path / "model", tmp_path / "images", tmp_path / "out", dora=True)
    flags = dict(zip(argv[::2], argv[1::2]))           # flags with a value come first
    assert flags["--resolution"] == "256" and flags["--rank"] == "16" and flags["--max_train_steps"] == "5"
    assert flags["--instance_prompt"] == bench.SETTINGS["prompt"] and flags["--mixed_precision"] == "no"
    assert float(flags["--learning_rate"]) == bench.SETTINGS["lr"]
    assert float(flags["--adam_weight_decay"]) == bench.SETTINGS["weight_decay"]
    assert {"--gradient_checkpointing", "--use_dora"} <= set(argv) and "--pre_compute_text_embeddings" not in argv
    assert "--use_dora" not in bench.diffusers_args(args, tmp_path, tmp_path, tmp_path, dora=False)
    sd15 = bench.parse_args(["--family", "sd15"])
    assert "--pre_compute_text_embeddings" in bench.diffusers_args(sd15, tmp_path, tmp_path, tmp_path, dora=False)

    cfg = TrainConfig.from_dict(bench.dorabooth_config(args, tmp_path / "model", tmp_path / "images", tmp_path / "run",
                                                       "dora"))
    assert (cfg.rank, cfg.alpha, cfg.resolution, cfg.steps, cfg.lr) == (16, 16.0, 256, 5, 1e-4)
    assert cfg.instance_prompt == bench.SETTINGS["prompt"] and cfg.weight_decay == bench.SETTINGS["weight_decay"]
    assert not cfg.prior_preservation and not cfg.train_text_encoders and not cfg.cache_latents
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "no" and cfg.targets == "attn"
    assert cfg.min_snr_gamma == 0                       # diffusers' default loss: plain MSE
    assert cfg.checkpoint_every == 0


def test_script_version_is_read_from_its_check(bench, tmp_path):
    script = tmp_path / "train.py"
    script.write_text('from diffusers.utils import check_min_version\ncheck_min_version("0.40.0")\n')
    assert bench.script_written_for(script) == "0.40.0"


def test_peak_rss_of_another_process_tree_and_its_cpu_time():
    sys.path.insert(0, str(BENCH.parent))
    from bench.measure import PeakRSS, cpu_seconds

    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'b = bytearray(150 * 2**20); b[::4096] = b\"x\" * len(b[::4096]);"
            " import time; time.sleep(1.0)'])\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            "child.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakRSS(proc.pid, every_s=0.01, tree_every_s=0.05) as rss:
        cpu = 0.0
        while proc.poll() is None:
            cpu = max(cpu, cpu_seconds(proc.pid))
            time.sleep(0.05)
    assert rss.peak_mb - rss.start_mb >= 120, (rss.start_mb, rss.peak_mb)      # the grandchild's 150 MB counted
    assert rss.peak_since_mark_mb is None
    assert cpu >= 0.2


def test_peak_since_mark_and_freeze():
    sys.path.insert(0, str(BENCH.parent))
    from bench.measure import PeakRSS

    with PeakRSS(every_s=0.005) as rss:
        block = bytearray(100 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.05)
        del block
        rss.mark()
        time.sleep(0.05)
        frozen = rss.freeze()
        late = bytearray(200 * 2**20)
        late[::4096] = b"x" * len(late[::4096])
        time.sleep(0.05)
        del late
    assert rss.peak_mb == frozen and rss.peak_mb - rss.start_mb >= 80
    assert rss.peak_since_mark_mb < rss.peak_mb - 50                     # the 100 MB before the mark is not in it


def test_report_says_how_and_where_it_was_measured(bench):
    summary = bench.summarise([_m(bench, "diffusers DoRA", [10.0], [20.0], 1000.0),
                               _m(bench, "dorabooth DoRA", [5.0], [10.0], 800.0)])
    data = {"date": "2026-11-30", "family": "sdxl", "device": "cpu", "resolution": 256, "steps": 5, "threads": 1,
            "machine": "a CPU, 2 cores", "rank": 16, "mixed_precision": "no", "gradient_checkpointing": True,
            "versions": dict.fromkeys(("torch", "diffusers", "transformers", "peft", "accelerate"), "1.0"),
            "diffusers_script": "/x/train_dreambooth_lora_sdxl.py", "script_written_for": "0.40.0",
            "model_note": "the full-size sdxl fixture (random weights)", "summary": summary,
            "reference": "diffusers DoRA"}
    text = bench.report(data)
    assert text.startswith("Measured 2026-11-30 by `python bench/real_scale.py --family sdxl --device cpu "
                           "--resolution 256 --steps 5 --threads 1`: a CPU, 2 cores (1 torch thread per run);")
    assert "`train_dreambooth_lora_sdxl.py` written for diffusers 0.40.0." in text
    assert "| dorabooth DoRA | 5.00 | 0.500 | 10.00 | 0.500 |" in text
