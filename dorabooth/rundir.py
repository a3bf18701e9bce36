"""The run folder (DESIGN §6): its layout, its lock, its ``config.json``, its checkpoints, and
what a path given as ``--adapter`` means. Nothing else in the package spells these names::

    RUN/config.json                 the resolved TrainConfig, dorabooth version, base model, family
    RUN/events.jsonl                one JSON event per line (dorabooth.events)
    RUN/instance/                   the prepared subject images and their manifest.json
    RUN/class/                      prior-preservation images (unless --class-images points elsewhere)
    RUN/checkpoints/step-N/         trainable tensors, optimizer, LR schedule and RNG state, adapter file
    RUN/samples/step-N/NN.png       validation images
    RUN/adapter.safetensors         the final adapter (dora / lora)
    RUN/unet/  RUN/text_encoder*/   the final weights of a full fine-tune (unet/ written last: it marks
                                    the run finished)
    RUN/.training.lock              host:pid of the process training the run
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:                  # not at run time: the command line checks a run folder before torch loads
    from .formats.subject import Subject

CONFIG = "config.json"
EVENTS = "events.jsonl"
INSTANCE = "instance"
CLASS = "class"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter.safetensors"          # final adapter, and each checkpoint's copy of it
FULL_UNET = "unet"                       # method "full": a diffusers UNet folder in the run
TRAINABLE = "trainable.safetensors"      # a checkpoint's trainable tensors (every method)
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"                     # a checkpoint's step, optimizer scalars, LR schedule
LOCK = ".training.lock"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # what save_lora_weights writes into a folder
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"   # what a diffusers UNet folder holds


# ---- config.json -----------------------------------------------------------------------------
def is_run(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def write_config(run: Path, config: TrainConfig, extra: dict[str, Any]) -> None:
    """``config.json``: the resolved config under ``"config"`` plus version, base model and family."""
    from .formats.files import write_json    # here, not at the top: the command line checks a run folder before torch loads

    write_json(Path(run) / CONFIG, {**extra, "config": config.to_dict()}, indent=2)


def config_data(run: str | os.PathLike) -> dict[str, Any]:
    """The whole ``config.json`` of a run folder; errors name the file and the fix."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a dorabooth run folder (no {CONFIG}); pass the folder "
                                f"`dorabooth train --out` created")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore it from a backup or start a new run") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path}: not a dorabooth run config (no \"config\" object)")
    return data


def read_config(run: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any]]:
    """The config of a run folder and the rest of its ``config.json`` (version, base model, family)."""
    data = config_data(run)
    return TrainConfig.from_dict(data.pop("config")), data


@dataclass(frozen=True)
class Run:
    """A run folder's ``config.json``, read once: its config and what it recorded about the base."""

    path: Path
    config: TrainConfig
    recorded: dict[str, Any]            # the rest of config.json: dorabooth_version, base_model, family, …

    @property
    def base_model(self) -> dict[str, Any]:
        bm = self.recorded.get("base_model")
        return bm if isinstance(bm, dict) else {}

    @property
    def base_id(self) -> str:
        """The base model as the user named it (hub id, path) or "toy"."""
        return str(self.base_model.get("id") or self.config.model or "toy")

    @property
    def base_weights(self) -> str:
        """Where to read the base weights: the local folder/file the run read them from while it
        is still there, else the base as the user named it."""
        path = self.base_model.get("path")
        return path if path and Path(path).exists() else (self.config.model or "toy")

    @property
    def base_ref(self) -> str:
        """How files made from the run name its base: "toy" and hub ids as they are (they resolve
        on any machine), a local base by the absolute path it was read from."""
        if self.base_id == "toy" or self.base_model.get("kind") == "hub":
            return self.base_id
        return str(self.base_model.get("path") or self.base_id)

    @property
    def base_hash(self) -> str | None:
        return self.base_model.get("hash")

    @property
    def family(self) -> str | None:
        return self.recorded.get("family")

    @property
    def subject(self) -> Subject:
        return subject_of(self.config, self.path)


def subject_of(config: TrainConfig, run: str | os.PathLike | None = None) -> Subject:
    """What a run trains: token, class noun, its prompts as the trainer resolves them, and how
    many photos it prepared (``instance/manifest.json``; None before they are prepared)."""
    from .formats.subject import Subject

    images = None
    manifest = Path(run) / INSTANCE / "manifest.json" if run is not None else None
    if manifest is not None and manifest.is_file():
        try:
            images = len(json.loads(manifest.read_text()).get("examples", []))
        except (OSError, json.JSONDecodeError, AttributeError):
            images = None
    return Subject(config.token, config.class_noun, config.resolved_instance_prompt, config.resolved_class_prompt,
                   images)


def read_run(run: str | os.PathLike) -> Run:
    path = Path(run)
    config, recorded = read_config(path)
    return Run(path, config, recorded)


# ---- checkpoints -----------------------------------------------------------------------------
def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step}"


def checkpoint_steps(run: Path, holding: str = STATE) -> list[int]:
    """Steps of the complete checkpoints (those holding ``holding``), oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / holding).is_file())


def latest_checkpoint(run: Path) -> Path | None:
    steps = checkpoint_steps(run)
    return checkpoint_dir(run, steps[-1]) if steps else None


def has_progress(run: str | os.PathLike) -> bool:
    """Whether a run got anywhere worth keeping: a complete checkpoint or its final result. A run
    folder without either (it stopped or failed before its first checkpoint) may be started
    again in place."""
    run = Path(run)
    return bool(checkpoint_steps(run)) or (run / ADAPTER).is_file() or (run / FULL_UNET / CONFIG).is_file()


def clear_attempt(run: Path, keep_class: bool) -> None:
    """Remove what an attempt that never reached a checkpoint left behind (``config.json``, its
    events, prepared images, samples, partial checkpoints; ``class/`` unless ``keep_class``), so
    that the run starts over in place. Only for folders without progress (:func:`has_progress`)."""
    run = Path(run)
    if has_progress(run):
        raise FileExistsError(f"{run} holds a checkpoint or a result; it is not cleared")
    for name in (INSTANCE, SAMPLES, CHECKPOINTS, *(() if keep_class else (CLASS,))):
        shutil.rmtree(run / name, ignore_errors=True)
    for name in (CONFIG, EVENTS):
        (run / name).unlink(missing_ok=True)


def final_result(run: Path, method: str) -> Path:
    """Where a finished run's result is: ``unet/`` for a full fine-tune, else ``adapter.safetensors``."""
    return Path(run) / (FULL_UNET if method == "full" else ADAPTER)


# ---- what --adapter points at ----------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSource:
    """What ``--adapter`` pointed at, resolved."""

    kind: str                 # "adapter" (LoRA/DoRA safetensors) | "full" (diffusers UNet folder, and
                              # in a run folder the fine-tuned text encoders beside it)
    path: Path
    model: str | None         # the base model a run folder was trained on (None: not known / toy)
    from_run: bool
    model_config: str | None = None   # its --model-config, for a single-file base


def resolve_adapter(adapter: str | os.PathLike) -> AdapterSource:
    """A run folder (its ``adapter.safetensors`` or ``unet/``), a folder with
    ``pytorch_lora_weights.safetensors``, or a ``.safetensors`` adapter file."""
    p = Path(adapter).expanduser()
    if p.is_dir() and is_run(p) and not (p / UNET_WEIGHTS).is_file():          # (a UNet folder has a config.json too)
        config, _ = read_config(p)
        if (p / ADAPTER).is_file():
            return AdapterSource("adapter", p / ADAPTER, config.model, True, config.model_config)
        if (p / FULL_UNET / CONFIG).is_file():
            return AdapterSource("full", p / FULL_UNET, config.model, True, config.model_config)
        hint = (" (a --method full run that did not finish: --resume it, then export it as a merged checkpoint)"
                if config.method == "full" else "; finish or --resume the run, or pass a checkpoint's adapter file")
        raise FileNotFoundError(f"run folder {p} has no final adapter yet (no {ADAPTER}){hint}")
    if p.is_dir() and (p / UNET_WEIGHTS).is_file():
        return AdapterSource("full", p, None, False)
    if p.is_dir() and (p / LORA_WEIGHT_NAME).is_file():
        return AdapterSource("adapter", p / LORA_WEIGHT_NAME, None, False)
    if p.is_file() and p.suffix == ".safetensors":
        return AdapterSource("adapter", p, None, False)
    if p.is_file():
        raise ValueError(f"--adapter {p}: only .safetensors adapter files are read")
    raise FileNotFoundError(f"--adapter {p}: not a run folder, adapter folder or .safetensors file")


def checkpoint_adapter(run: Path, step: int) -> Path:
    """``checkpoints/step-N/adapter.safetensors``; the error lists the checkpoints that have one."""
    path = checkpoint_dir(run, step) / ADAPTER
    if not path.is_file():
        have = [f"step-{s}" for s in checkpoint_steps(run, holding=ADAPTER)]
        raise FileNotFoundError(f"{path} does not exist; checkpoints with adapters: {', '.join(have) or 'none'}")
    return path


# ---- one trainer per run folder --------------------------------------------------------------
class RunBusy(RuntimeError):
    """Another process (or thread) is training this run folder right now."""


@contextmanager
def run_lock(run: Path):
    """One trainer per run folder: a second ``train`` / ``--resume`` of the same folder fails at
    once instead of interleaving checkpoints with the first. The lock file holds
    ``host:pid``; one left by a process that no longer runs on this machine is taken over."""
    lock = Path(run) / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
            except OSError:
                owner = ""
            if attempt == 0 and not _lock_owner_alive(owner):
                lock.unlink(missing_ok=True)              # left by a killed run: take it over
                continue
            raise RunBusy(f"{run} is being trained by another process ({owner or 'unknown'}); wait for it to "
                          f"finish or stop it, then --resume. If nothing is training it, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def run_busy(run: str | os.PathLike) -> str | None:
    """``host:pid`` of another live process training ``run`` now (its lock), or None (no lock, a
    dead owner's, or this process's own: its threads know their runs)."""
    try:
        owner = (Path(run) / LOCK).read_text().strip()
    except OSError:
        return None
    mine = owner == f"{socket.gethostname()}:{os.getpid()}"
    return owner if not mine and _lock_owner_alive(owner) else None


def _lock_owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True                                   # another machine's, or unreadable: assume it runs
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
