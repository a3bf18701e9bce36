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
    .NAME.tmp-PID  .NAME.old-PID    files being written / folders being replaced (formats.files);
    checkpoints/.tmp-step-N/        a checkpoint being written, .old-step-N/ one being deleted; a
                                    start or --resume removes those a killed process left
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import faults
from .config import TrainConfig
from .events import read_events

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
    return TrainConfig.from_dict(recorded_recipe(data.pop("config"))), data


def recorded_recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded (resolved) config with what older versions left unsaid or spelled another
    way made explicit, so it reads as what that run trained with, not as today's defaults."""
    config = dict(config)
    config.setdefault("pivotal_tokens", 0)           # written before pivotal tuning existed: trained without it
    config.setdefault("min_snr_gamma", 5.0)          # before the field existed: Min-SNR γ 5 for every model
    if config["min_snr_gamma"] is None:              # "plain MSE" until Min-SNR became a family default
        config["min_snr_gamma"] = 0.0                # (a resolved config never holds None since)
    return config


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
    return Subject(config.identifier, config.class_noun, config.resolved_instance_prompt, config.resolved_class_prompt,
                   images)


def read_run(run: str | os.PathLike) -> Run:
    path = Path(run)
    config, recorded = read_config(path)
    return Run(path, config, recorded)


# ---- checkpoints -----------------------------------------------------------------------------
RESUME_FILES = (STATE, TRAINABLE, OPTIMIZER, "rng-0.safetensors")   # what resuming from a checkpoint reads


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step}"


def checkpoint_steps(run: Path, holding: str | None = None) -> list[int]:
    """Steps of the complete checkpoints, oldest first: ``step-N`` folders holding every file
    resuming reads (and ``holding`` when given). A folder missing one is not listed (a deletion
    killed half-way; rotation renames a checkpoint away before deleting it, so only older
    versions left such folders)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    needed = (*RESUME_FILES, *((holding,) if holding else ()))
    return sorted(int(p.name[5:]) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
                  and all((p / name).is_file() for name in needed))


def latest_checkpoint(run: Path) -> Path | None:
    steps = checkpoint_steps(run)
    return checkpoint_dir(run, steps[-1]) if steps else None


def remove_checkpoint(run: Path, step: int) -> None:
    """Delete ``checkpoints/step-N/`` atomically: renamed to ``.old-step-N`` first, so that a
    kill half-way leaves no partial ``step-N`` (the start of the next run removes the rest)."""
    folder = checkpoint_dir(run, step)
    trash = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return
    faults.reach("rotation", step)
    shutil.rmtree(trash, ignore_errors=True)


def has_progress(run: str | os.PathLike) -> bool:
    """Whether a run got anywhere worth keeping: a complete checkpoint or its final result. A run
    folder without either (it stopped or failed before its first checkpoint) may be started
    again in place."""
    run = Path(run)
    return bool(checkpoint_steps(run)) or (run / ADAPTER).is_file() or (run / FULL_UNET / CONFIG).is_file()


def finished_step(run: str | os.PathLike, method: str) -> int | None:
    """The step a finished run's result was written at (its last ``done`` event), or None when
    the result (``adapter.safetensors`` / ``unet/``) is not there."""
    run = Path(run)
    if not (run / (f"{FULL_UNET}/{CONFIG}" if method == "full" else ADAPTER)).is_file():
        return None
    done = [e for e in read_events(run / EVENTS) if e.get("type") == "done"]
    steps = done[-1].get("steps") if done else None
    return steps if isinstance(steps, int) else None


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


# Temporaries of atomic writes: ``.NAME.tmp-PID`` (a file or folder being written) and
# ``.NAME.old-PID`` (a folder being replaced), see formats.files.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def remove_stale_temporaries(run: Path, also: tuple[Path, ...] = ()) -> list[Path]:
    """Remove what killed writers left in the run folder: ``checkpoints/.tmp-step-N``,
    ``.old-step-N`` and incomplete ``step-N`` (only this run's trainer writes those: call it
    holding the run's lock), and ``.NAME.tmp-PID`` / ``.NAME.old-PID`` of processes that no
    longer run, in the run folder, its checkpoints, samples, instance and class folders and the
    folders ``also`` (a shared class folder). Returns what was removed."""
    run = Path(run)
    ckpts, samples = run / CHECKPOINTS, run / SAMPLES
    stale = [*ckpts.glob(".tmp-step-*"), *ckpts.glob(".old-step-*")] if ckpts.is_dir() else []
    folders = [run, ckpts, samples, run / INSTANCE, run / CLASS, *also,
               *(p for root in (ckpts, samples) if root.is_dir() for p in root.glob("step-*"))]
    if ckpts.is_dir():                                 # incomplete step-N/: half deleted by an older version
        complete = {f"step-{s}" for s in checkpoint_steps(run)}
        stale += [p for p in ckpts.glob("step-*") if p.is_dir() and p.name not in complete]
    for folder in dict.fromkeys(folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMPORARY.match(p.name)
            if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                stale.append(p)
    stale = list(dict.fromkeys(stale))                 # (a folder given twice under one name)
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


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


def pivotal_alias(source: AdapterSource) -> tuple[str, str] | None:
    """(typed token, pivotal identifier) when ``source`` is a run's adapter (final or a checkpoint's)
    trained with pivotal tuning: its prompts may keep naming the subject by the typed word ("a sks
    cross" draws with "<s0><s1>"). None otherwise (an adapter file alone: name it ``<s0><s1>``)."""
    if source.kind != "adapter":
        return None
    run = source.path.parent if source.from_run else None
    if run is None and source.path.parent.parent.name == CHECKPOINTS:
        run = source.path.parents[2]
    if run is None or not is_run(run):
        return None
    config, _ = read_config(run)
    return (config.token.strip(), config.identifier) if config.pivotal_tokens else None


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
    if p.is_dir() and (p / ADAPTER).is_file() and p.parent.name == CHECKPOINTS:     # a checkpoint folder
        return AdapterSource("adapter", p / ADAPTER, None, False)
    if p.is_file() and p.suffix == ".safetensors":
        return AdapterSource("adapter", p, None, False)
    if p.is_file():
        raise ValueError(f"--adapter {p}: only .safetensors adapter files are read")
    gone = _checkpoint_of(p)
    if gone is not None and not p.exists():
        run, step = gone
        raise FileNotFoundError(_no_checkpoint(run, step))
    raise FileNotFoundError(f"--adapter {p}: not a run folder, adapter folder or .safetensors file")


def checkpoint_adapter(run: Path, step: int) -> Path:
    """``checkpoints/step-N/adapter.safetensors``; the error lists the checkpoints that have one."""
    path = checkpoint_dir(run, step) / ADAPTER
    if not path.is_file():
        raise FileNotFoundError(_no_checkpoint(Path(run), step))
    return path


def _checkpoint_of(path: Path) -> tuple[Path, int] | None:
    """(run folder, step) when ``path`` is, or lies in, a run's ``checkpoints/step-N``."""
    for folder in (path, *path.parents):
        name = folder.name
        if folder.parent.name == CHECKPOINTS and name.startswith("step-") and name[5:].isdigit() \
                and is_run(folder.parent.parent):
            return folder.parent.parent, int(name[5:])
    return None


def _no_checkpoint(run: Path, step: int) -> str:
    """Why ``checkpoints/step-N`` cannot be used: rotated away (the run wrote it) or never written."""
    have = ", ".join(f"step-{s}" for s in checkpoint_steps(run, holding=ADAPTER)) or "none"
    written = any(e.get("type") == "checkpoint" and e.get("step") == step for e in read_events(run / EVENTS))
    why = ("no longer exists: the run keeps only its newest checkpoints (--keep-checkpoints) and deleted it"
           if written else "does not exist: the run never wrote it")
    return (f"checkpoint step-{step} of {run} {why}; checkpoints with adapters now: {have}. Pass one of "
            f"those, or the run folder for its final adapter")


# ---- one trainer per run folder --------------------------------------------------------------
class RunBusy(RuntimeError):
    """Another process (or thread) is training this run folder right now."""


@contextmanager
def run_lock(run: Path):
    """One trainer per run folder: a second ``train`` / ``--resume`` of the same folder fails at
    once instead of interleaving checkpoints with the first. The lock file holds ``host:pid``,
    written whole before it gets the lock's name (a hard link, which fails when the lock
    exists), so a lock is never empty; one left by a process that no longer runs on this machine
    is taken over, and so is an empty one (older versions wrote the name first) after a few seconds."""
    lock = Path(run) / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for attempt in range(3):
        if _create_lock(lock, me):
            break
        owner = _lock_owner(lock)
        if owner is None:                                  # released meanwhile: try again
            continue
        if attempt < 2 and _lock_stale(lock, owner):
            lock.unlink(missing_ok=True)                   # left by a killed run: take it over
            continue
        raise RunBusy(f"{run} is being trained by another process ({owner or 'unknown: the lock is empty'}); "
                      f"wait for it to finish or stop it, then --resume. If nothing is training it, delete {lock}")
    else:
        raise RunBusy(f"{run}: its lock {lock} keeps changing hands; is another trainer starting? Try again")
    try:
        yield
    finally:
        if _lock_owner(lock) == me:                       # (not a lock another process took over)
            lock.unlink(missing_ok=True)


EMPTY_LOCK_GRACE_S = 5.0        # an empty lock younger than this may be an older version's, being written


def _create_lock(lock: Path, me: str) -> bool:
    """Write ``me`` into a temporary file and link it to ``lock``; False when a lock exists.
    Where the file system has no hard links, create the lock exclusively and write it (on a
    failed write it is removed). Nothing is left behind on an error."""
    tmp = lock.with_name(f"{lock.name}.tmp-{os.getpid()}")
    try:
        try:
            tmp.write_text(me)
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError:
            lock.unlink(missing_ok=True)
            raise
        return True
    except OSError as e:
        raise OSError(e.errno, f"cannot write the lock {lock} ({e.strerror}); free space on that disk or fix "
                               f"its permissions, then run the command again") from None
    finally:
        tmp.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> str | None:
    """The lock's ``host:pid`` ("" when empty or unreadable), or None when there is no lock."""
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _lock_stale(lock: Path, owner: str) -> bool:
    """A lock nobody holds: its process is gone from this machine, or it has been empty for a
    few seconds (only a writer that died between creating and writing it leaves one)."""
    if not owner:
        try:
            return time.time() - lock.stat().st_mtime > EMPTY_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    return not _lock_owner_alive(owner)


def run_busy(run: str | os.PathLike) -> str | None:
    """``host:pid`` of another live process training ``run`` now (its lock), or None (no lock, a
    dead owner's, or this process's own: its threads know their runs)."""
    lock = Path(run) / LOCK
    owner = _lock_owner(lock)
    if owner is None or owner == f"{socket.gethostname()}:{os.getpid()}" or _lock_stale(lock, owner):
        return None
    return owner or "unknown"


def _lock_owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True                                   # another machine's, or unreadable: assume it runs
    return _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
