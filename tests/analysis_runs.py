"""Tiny trained runs shared by tests/test_analysis.py and tests/test_evaluate.py.

Each run is a real ``dorabooth.train`` run on the tiny SDXL test model (tests/tiny_runs.py):
4 steps with a checkpoint after steps 1, 2 and 3 (all kept) and the final result at step 4,
so a run folder holds exactly what a user's run with ``--checkpoint-every 1`` holds. Runs are
built once per test session under pytest's base temp folder and reused.
"""

from pathlib import Path

from tiny_runs import make_subject, quick, save_model

STEPS = 4
METHODS = {  # name: TrainConfig overrides
    "dora": dict(method="dora", train_text_encoders=True),
    "dora-in": dict(method="dora", magnitude_axis="in"),
    "lora": dict(method="lora"),
    "full": dict(method="full"),
    "full-te": dict(method="full", train_text_encoders=True),
}


def tiny_run(tmp_path_factory, name: str, subject: Path | None = None) -> Path:
    """The run folder of ``METHODS[name]``, trained on first use (``subject``: its photos)."""
    from dorabooth.config import TrainConfig
    from dorabooth.train import train

    root = tmp_path_factory.getbasetemp() / "analysis-runs"
    run = root / (name if subject is None else f"{name}-{subject.name}")
    if (run / "events.jsonl").is_file() and '"done"' in (run / "events.jsonl").read_text():
        return run
    model = save_model("sdxl", root / "model-sdxl")
    images = subject if subject is not None else make_subject(root / "subject")
    config = TrainConfig(images=str(images), out=str(run), model=str(model), class_images=str(root / "class"),
                         **quick(**METHODS[name], steps=STEPS, checkpoint_every=1, keep_checkpoints=STEPS,
                                 prior_preservation=False, lr=1e-2))
    train(config)
    return run
