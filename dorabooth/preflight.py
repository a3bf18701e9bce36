"""Checks of a training request that need neither torch nor the model, so that a mistake is
reported in about a second and leaves nothing behind: the subject folder holds image files, the
run folder can take the run, a class-image folder is a folder.

The command line calls :func:`check_request` before it imports the trainer; ``train.preflight``
calls it again and adds what needs the model's configs and the device (family defaults, the
memory plan, the optimizer, the images at the resolved resolution), still before a weight is
loaded or a file is written.

The run folder's rule: a new run needs a folder without progress; ``--resume`` continues a
run with progress (a checkpoint or a result) and the same recipe (learning rates and clipping may
change: ``config.RESUME_OVERRIDES``); a run that stopped or failed
before its first checkpoint has nothing to continue, so it is started again in place, with or
without ``--resume`` and whatever the settings now (``rundir.has_progress``).
"""

from __future__ import annotations

from pathlib import Path

from . import rundir as rd
from .config import TrainConfig
from .data import IMAGE_SUFFIXES, list_images


def check_request(config: TrainConfig) -> None:
    """Raise, with the fix, for what is wrong with ``config`` that shows without the model."""
    if not list_images(config.images):
        raise ValueError(f"no image files in {config.images}; add 3–20 photos of the subject "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    if config.prior_preservation and config.class_images and Path(config.class_images).is_file():
        raise NotADirectoryError(f"--class-images {config.class_images} is a file; pass a folder (it is created "
                                 f"if missing) or leave it out to use RUN_DIR/class")
    check_run_folder(config, Path(config.out))


def check_run_folder(config: TrainConfig, run: Path) -> None:
    """A new run needs a folder without progress; --resume needs a run to continue."""
    if run.exists() and not run.is_dir():
        raise FileExistsError(f"--out {run} is a file; choose a folder for the run")
    if not rd.is_run(run):
        if config.resume:
            raise FileNotFoundError(f"--resume: {run} has no config.json, so there is no run to continue; "
                                    f"start it without --resume")
        return
    if rd.has_progress(run) and not config.resume:
        raise FileExistsError(f"{run} already holds a run (config.json and a checkpoint); pass --resume to "
                              f"continue it, or choose another --out")


def check_resume_recipe(resolved: TrainConfig, run: Path) -> None:
    """--resume of a run with progress: what it learns must not change (``TrainConfig.recipe_differences``
    of the resolved configs); a run without progress starts over, so anything may."""
    if not (resolved.resume and rd.is_run(run) and rd.has_progress(run)):
        return
    previous, _ = rd.read_config(run)
    changed = previous.recipe_differences(resolved)
    if changed:
        raise ValueError(f"--resume: {', '.join(changed)} differ from the run in {run}; resume with the same "
                         f"settings (a resume may change --steps, --lr, --text-encoder-lr, --max-grad-norm and "
                         f"the run mechanics) or start a new run folder")
