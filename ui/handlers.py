"""What the app does, as plain functions: no gradio here, so each one is tested directly.

Every handler takes the app's :class:`Context` (workspace, base model, training worker,
loaded generation model) and plain values, calls dorabooth's public API, and returns plain
data that ``ui/app.py`` wires into components and ``ui/views.py`` turns into HTML. Problems
the user can fix raise :class:`UserError` (a ``ValueError``) with a message saying what to
do; the app shows it in the page.
"""

from __future__ import annotations

import gc
import json
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.config import MAX_SEED, QUANTIZE_BASE, TARGET_PRESETS, TrainConfig, default_prompts
from dorabooth.devices import DeviceInfo
from dorabooth.specs import ModelSpec
from dorabooth.models import asset_dir
from dorabooth.formats.destinations import AXIS_FOR_USE as _AXIS_FOR_USE
from dorabooth.formats.destinations import USES as _USE_LABELS

from . import runs
from .checks import CheckOutcome, check_run  # noqa: F401  (the Analyze tab's lead lives there)
from .exporting import (  # noqa: F401  (the Export tab's handlers live there)
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    EXPORT_USES,
    MAGNITUDE_METHODS,
    ExportOutcome,
    export_run,
    retrain_offer,
    run_advice,
    run_use,
    suggested_export,
    use_advice,
)
from .runs import RunStatus, live_status
from .store import StoreWorkspace, open_workspace
from .users import USERS_DIR, Limits, UserLine, check_disk, user_folder_name, user_root
from .worker import TrainingWorker
from .workspace import (
    MIN_IMAGES,
    REQUEST_FILE,
    Photo,
    UploadResult,
    UserError,
    Workspace,
)


# =============================================================================================
# The base model: what it is and what it trains best with
# =============================================================================================
@dataclass(frozen=True)
class ModelInfo:
    id: str                      # what the user passed ("toy" for the embedded model)
    family: str                  # sd1 | sd2 | sdxl
    resolution: int              # training / generation side in px
    defaults: dict               # steps, lr, rank, num_class_images, prompt_style (the trainer's family defaults)
    generate: dict               # steps, guidance
    device: str                  # "CPU (…)" or the GPU's name
    spec: ModelSpec | None = field(default=None, repr=False, compare=False)   # the configs it was read from

    @property
    def label(self) -> str:
        name = "the embedded toy model" if self.id == "toy" else self.id
        return f"{name} ({self.family.upper()} architecture, {self.resolution} px) on {self.device}"


def describe_model(model: str | None, model_config: str | None = None, device: DeviceInfo | None = None) -> ModelInfo:
    """Family, resolution and the trainer's defaults for ``model`` (None = the embedded toy),
    from its configs alone (``dorabooth.specs.model_spec``): no weight is loaded."""
    from dorabooth.devices import detect_device
    from dorabooth.families import generate_defaults
    from dorabooth.specs import model_spec

    spec = model_spec(model, model_config)
    defaults = spec.defaults
    gen = generate_defaults(spec.family, spec.view)
    return ModelInfo("toy" if model in (None, "toy", "toy-sdxl") else str(model), spec.family.name,
                     int(defaults["resolution"]),
                     {k: defaults.get(k) for k in ("steps", "lr", "rank", "dvora_rank", "num_class_images",
                                                  "train_text_encoders", "targets", "prompt_style")},
                     {"steps": gen["steps"], "guidance": gen["guidance"]}, (device or detect_device()).name, spec)


# =============================================================================================
# The app's state: one object, passed to every handler
# =============================================================================================
class SessionCache:
    """One loaded generation model (``dorabooth.generate.Session``), reused between clicks and
    released before training starts so the two never hold the device's memory together."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: object = None
        self._session = None

    def use(self, model: str | None, fn, model_config: str | None = None):
        from dorabooth import Session

        with self._lock:
            if self._session is None or self._key != (model, model_config):
                self._drop()
                self._session = Session(model, model_config=model_config)
                self._key = (model, model_config)
            return fn(self._session)

    def release(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._session is None:
            return
        self._session = None
        self._key = None
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


SAMPLES = asset_dir("subjects")                    # made for the toy model


@dataclass
class Context:
    workspace: Workspace
    model: str | None = None           # base model for new runs (None = the embedded toy)
    model_config: str | None = None    # configs for a single-file ``model`` (a diffusers folder)
    samples: Path | None = None        # sample subjects to offer (None: assets/subjects with the toy model)
    worker: TrainingWorker = None      # type: ignore[assignment]
    sessions: SessionCache = field(default_factory=SessionCache)
    starting: threading.Lock = field(default_factory=threading.Lock)   # one Start at a time (double clicks)
    limits: Limits = field(default_factory=Limits)   # of this workspace (each user's, with separate users)
    separate_users: bool = False       # each login its own workspace under WORKSPACE/users (ui.users)
    user: str | None = None            # whose context this is (None: the app's, or no logins)
    _info: ModelInfo | None = None
    _device: DeviceInfo | None = None  # the training device (detected once; tests describe one)
    _users: dict = field(default_factory=dict)      # user → their Context (with separate users)

    @property
    def device(self) -> DeviceInfo:
        if self._device is None:
            from dorabooth.devices import detect_device
            self._device = detect_device()
        return self._device

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = describe_model(self.model, self.model_config, self.device)
        return self._info

    def for_user(self, user: str | None) -> Context:
        """The context a request of ``user`` (the login's name; None without logins) works in: with
        separate users, their own workspace ``WORKSPACE/users/<user>`` and their view of the
        training line; otherwise this one."""
        if not self.separate_users:
            return self
        if not user:
            raise UserError("log in first: this app keeps each user's subjects and runs apart")
        with self.starting:
            if user not in self._users:
                self._users[user] = self._context_at(user_root(self.workspace.root, user), user)
            return self._users[user]

    def users(self) -> list[Context]:
        """With separate users, a context per user folder in the workspace (after a restart)."""
        folder = self.workspace.root / USERS_DIR
        if not self.separate_users or not folder.is_dir():
            return []
        return [self.for_user(p.name) for p in sorted(folder.iterdir())
                if p.is_dir() and user_folder_name(p.name) == p.name]

    def _context_at(self, root: Path, user: str) -> Context:
        store = isinstance(self.workspace, StoreWorkspace)       # an object store: the user's folder there too
        workspace = self.workspace.at(root) if store else Workspace(root)
        as_user = getattr(self.worker, "as_user", None)
        worker = (as_user(user, store=workspace if store else None) if as_user else UserLine(self.worker, root))
        self.device, self.info                       # detected once, shared
        return replace(self, workspace=workspace, worker=worker, user=user, separate_users=False, _users={})

    def close(self) -> None:
        self.worker.close()
        self.sessions.release()


def make_context(workspace: str | Path, model: str | None = None, *, model_config: str | None = None,
                 samples: str | Path | None = None, train=None, device: DeviceInfo | None = None,
                 cluster: str | None = None, separate_users: bool = False, limits: Limits | None = None,
                 mirror: str | Path | None = None) -> Context:
    """The app's state. ``train`` replaces ``dorabooth.train`` (tests); ``device`` describes the
    training device instead of detecting it (tests); ``cluster``: train on that Ray cluster
    (``ui.cluster``) instead of in this process, one run at a time; ``separate_users``: each login
    gets a workspace of its own (:meth:`Context.for_user`), ``limits`` on each. ``workspace`` may be
    an object store's URL with a cluster (``ui.store``: the app works in ``mirror``, a local copy)."""
    store = open_workspace(workspace, cluster=cluster, mirror=mirror)
    ctx = Context(store, model, model_config, Path(samples) if samples else None, _device=device,
                  limits=limits or Limits(), separate_users=separate_users)
    if cluster:
        from .cluster import ClusterWorker
        remote = store if isinstance(store, StoreWorkspace) else None
        ctx.worker = ClusterWorker(remote.url if remote else store.root, cluster, max_queued=ctx.limits.max_queued,
                                   store=remote)
    else:
        ctx.worker = TrainingWorker(train=train, before_train=ctx.sessions.release)
    return ctx


# =============================================================================================
# Subject: photos, token, class noun
# =============================================================================================
@dataclass
class SubjectView:
    name: str
    token: str
    class_noun: str
    photos: list[Photo]
    previews: list[tuple[str, str]]             # (crop png, caption) as the trainer will see them
    uploads: list[UploadResult] = field(default_factory=list)
    instance_prompt: str = ""                   # the training prompt chosen for this subject ("" = default)

    @property
    def usable(self) -> int:
        return sum(p.usable for p in self.photos)

    @property
    def ready(self) -> bool:
        return self.usable >= MIN_IMAGES and bool(self.class_noun)


def subject_names(ctx: Context) -> list[str]:
    return ctx.workspace.subjects()


def open_subject(ctx: Context, name: str, uploads: list[UploadResult] | None = None) -> SubjectView:
    subject = ctx.workspace.subject(name)
    resolution = ctx.info.resolution
    photos = ctx.workspace.photos(subject.name, resolution=resolution)
    previews = []
    for photo in photos:
        if photo.width:                                  # readable
            caption = photo.name if not photo.warnings else f"⚠ {photo.name}: {photo.warnings[0]}"
            previews.append((str(ctx.workspace.preview(subject.name, photo, resolution)), caption))
    return SubjectView(subject.name, subject.token, subject.class_noun, photos, previews, uploads or [],
                       subject.instance_prompt)


def upload_photos(ctx: Context, name: str, files: list[str], token: str | None = None,
                  class_noun: str | None = None) -> SubjectView:
    """Add uploaded files to a subject (created if new); refused files come back with the reason."""
    if not files:
        raise UserError("no files were uploaded; drop 3–20 photos (JPG, PNG or WebP) on the box")
    check_disk(ctx.workspace.root, ctx.limits, sum(Path(f).stat().st_size for f in files), what="this upload")
    subject = ctx.workspace.subject(name, create=True)
    if token is not None or class_noun is not None:
        ctx.workspace.save_subject(subject.name, token=token or subject.token,
                                   class_noun=class_noun if class_noun is not None else subject.class_noun)
    results = ctx.workspace.add_photos(subject.name, [str(f) for f in files])
    return open_subject(ctx, subject.name, results)


def _samples_dir(ctx: Context) -> Path | None:
    """The shipped sample subjects (``assets/subjects/<name>/``) go with the toy model only:
    they are drawn in its toy world."""
    return ctx.samples or (SAMPLES if ctx.info.id == "toy" else None)


def sample_subjects(ctx: Context) -> list[str]:
    folder = _samples_dir(ctx)
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "subject.json").is_file())


def use_sample(ctx: Context, sample: str) -> SubjectView:
    """Copy a sample subject's photos, token, class noun and prompt into the workspace."""
    if sample not in sample_subjects(ctx):
        raise UserError(f"there is no sample subject called {sample!r}")
    folder = _samples_dir(ctx) / sample
    info = json.loads((folder / "subject.json").read_text())
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    view = upload_photos(ctx, sample, photos, info.get("token") or "sks", info.get("class_noun") or "")
    ctx.workspace.save_subject(view.name, token=view.token, class_noun=view.class_noun,
                               instance_prompt=info.get("instance_prompt") or "",
                               class_prompt=info.get("class_prompt") or "")
    return open_subject(ctx, view.name, view.uploads)


def remove_photo(ctx: Context, name: str, photo: str) -> SubjectView:
    ctx.workspace.remove_photo(name, photo)
    return open_subject(ctx, name)


def save_subject(ctx: Context, name: str, token: str, class_noun: str,
                 instance_prompt: str | None = None) -> SubjectView:
    ctx.workspace.save_subject(name, token=token, class_noun=class_noun, instance_prompt=instance_prompt)
    return open_subject(ctx, name)


# =============================================================================================
# Train: presets, settings, the queue
# =============================================================================================
# Multipliers of the trainer's family defaults (steps, rank); learning rate stays the family's.
PRESETS = {
    "quick": dict(steps=0.5, rank=1, text="a first look: fewer steps, the likeness may be loose"),
    "balanced": dict(steps=1.0, rank=1, text="the recommended settings for this model"),
    "best quality": dict(steps=1.5, rank=2, text="more steps and a larger adapter: slower, a bigger file"),
}
METHOD_LABELS = {
    "DoRA (recommended)": dict(method="dora", half_rank=False),
    "LoRA": dict(method="lora", half_rank=False),
    "DoRA† (half rank)": dict(method="dora", half_rank=True),
    "DVoRA (fewest parameters)": dict(method="dvora", half_rank=False),
}
# "Where will you use it?": answer → the magnitude axis that makes the small file exact there
# (dorabooth.formats.destinations says why "Not sure" trains axis "in").
USES = {_USE_LABELS[k]: _AXIS_FOR_USE[k] for k in ("comfy", "diffusers", "unsure")}
NEW_RUN = "(new run)"                  # a config's ``out`` before its run folder is made
MAX_GENERATE_STEPS = 1000              # sampler steps per image the Generate tab may ask for
MAX_PROMPT = 2000                      # characters in a prompt or negative prompt
# The Advanced overrides of the device settings: "auto" = what dorabooth.devices resolves.
PRECISIONS = {"auto": None, "no": "no", "fp16": "fp16", "bf16": "bf16"}
CHECKPOINTING = {"auto": None, "on": True, "off": False}
OPTIMIZERS = {"auto": None, "adamw": "adamw", "adamw8bit": "adamw8bit"}
# The Advanced adapter choices (their words: ui/views.py): which UNet layers train, and how the
# frozen base of the adapted layers is held (QDoRA: 4-bit NF4).
TARGETS = TARGET_PRESETS
QUANTIZE = QUANTIZE_BASE


PIVOTAL_TOKENS = 2      # new tokens per text encoder when the app's "Pivotal tuning" is on (diffusers' advanced script's 2)


@dataclass
class TrainSettings:
    """What the Train tab asks for; ``None`` = the preset's value."""

    preset: str = "balanced"
    method: str = "DoRA (recommended)"
    use: str = "Not sure"
    rank: int | None = None
    steps: int | None = None
    lr: float | None = None
    prior_preservation: bool = True
    class_images: int | None = None
    train_text_encoders: bool | None = None    # None: the family default
    seed: int = 0
    instance_prompt: str | None = None     # default "a photo of <token> <class noun>"
    precision: str = "auto"                # auto | no | fp16 | bf16 (PRECISIONS)
    checkpointing: str = "auto"            # auto | on | off
    optimizer: str = "auto"                # auto | adamw | adamw8bit
    buckets: bool = False                  # aspect-ratio buckets instead of a square centre crop
    targets: str | None = None             # UNet layers that train (TARGETS); None: the family default
    quantize_base: str = "none"            # none | nf4: the adapted layers' frozen weights in 4 bit (QDoRA)
    pivotal: bool | None = None            # pivotal tuning: PIVOTAL_TOKENS new tokens trained in the token's place; None: the family default


def preset_values(ctx: Context, preset: str) -> dict:
    """Steps, rank and learning rate a preset means on this model."""
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p, d = PRESETS[preset], ctx.info.defaults
    return {"steps": max(1, round(d["steps"] * p["steps"])), "rank": int(d["rank"] * p["rank"]), "lr": d["lr"],
            "class_images": d["num_class_images"], "train_text_encoders": bool(d.get("train_text_encoders")),
            "targets": d["targets"], "pivotal": bool(d.get("pivotal_tokens"))}


def default_rank(ctx: Context, preset: str, method: str) -> int:
    """The rank the form shows for a preset and a method label: the preset's, except DVoRA's own
    default (the family's ``dvora_rank``: VeRA's 256 capped at the UNet's narrowest width; the
    same for every preset, since it is at that cap already)."""
    if METHOD_LABELS.get(method, {}).get("method") == "dvora":
        return int(ctx.info.defaults["dvora_rank"])
    return preset_values(ctx, preset)["rank"]


def rank_for_method(ctx: Context, preset: str, before: str, method: str, rank: int | None) -> int | None:
    """The rank box after the method changes from ``before`` to ``method``: the new method's
    default while the box still holds the old one's (or is empty), else what the user typed."""
    if rank is None or rank == default_rank(ctx, preset, before):
        return default_rank(ctx, preset, method)
    return rank


def measured_speed(ctx: Context) -> float | None:
    """Training steps per second measured by earlier runs of this base model (median), if any."""
    speeds = []
    for run in ctx.workspace.runs():
        settings = runs.run_settings(run)
        if settings.get("_base_model") != ctx.info.id:
            continue
        steps = [e for e in runs.read_events(run) if e.get("type") == "step" and e.get("it_s")]
        if steps:
            speeds.append(float(steps[-1]["it_s"]))
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def preset_choices(ctx: Context) -> list[tuple[str, str]]:
    """(label, preset) with the real step counts and, once measured here, the time they take."""
    speed = measured_speed(ctx)
    out = []
    for name in PRESETS:
        steps = preset_values(ctx, name)["steps"]
        when = f", about {_duration(steps / speed)}" if speed else ""
        out.append((f"{name.capitalize()} — {steps} steps{when}", name))
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def prompt_style(ctx: Context) -> str:
    """How this model's default prompts are phrased ("photo" or, on the toy model, "caption")."""
    return ctx.info.defaults.get("prompt_style", "photo")


def example_prompt(ctx: Context, token: str, class_noun: str) -> str:
    """The training prompt a run gets when none is written (``config.default_prompts``)."""
    return default_prompts(token, class_noun, prompt_style(ctx))[0]


def build_config(ctx: Context, subject_name: str, settings: TrainSettings, run: Path | None = None):
    """The TrainConfig for a run of ``subject_name`` into the folder ``run`` (None: not made yet),
    validated by TrainConfig itself, and the device settings by ``dorabooth.memory.plan_run``
    (e.g. bf16 on a GPU without it)."""
    subject = ctx.workspace.subject(subject_name)
    if not subject.class_noun:
        raise UserError("say what the subject is (the class noun, e.g. 'dog') on the Subject tab first")
    usable = sum(p.usable for p in ctx.workspace.photos(subject.name, resolution=ctx.info.resolution))
    if usable < MIN_IMAGES:
        raise UserError(f"{subject.name} has {usable} usable photo(s); add at least {MIN_IMAGES} on the Subject tab")
    instance_default, class_default = default_prompts(subject.token, subject.class_noun, prompt_style(ctx))
    prompt = " ".join((settings.instance_prompt or "").split()) or None
    if prompt is not None and subject.token not in prompt.split():
        raise UserError(f"the training prompt must contain the token {subject.token!r}, e.g. '{instance_default}'")
    # a stored class prompt (from a sample subject) only while it still names the class noun; the
    # defaults written out, so a queued run shows the prompts it will train with
    class_prompt = subject.class_prompt if subject.class_noun in subject.class_prompt.split() else class_default
    prompt = prompt or instance_default
    config = TrainConfig(
        images=str(subject.images), class_noun=subject.class_noun, out=str(run or NEW_RUN), token=subject.token,
        instance_prompt=prompt, class_prompt=class_prompt, model=ctx.model, model_config=ctx.model_config,
        class_images=str(ctx.workspace.class_images(subject.name, subject.class_noun, ctx.info.id)),
        **_recipe(ctx, settings))
    _plan(ctx, config)
    return config


def _recipe(ctx: Context, settings: TrainSettings) -> dict:
    """The TrainConfig fields the Train tab decides (preset values where a box is empty)."""
    if settings.method not in METHOD_LABELS:
        raise UserError(f"method {settings.method!r}: choose one of {', '.join(METHOD_LABELS)}")
    if settings.use not in USES:
        raise UserError(f"choose where the adapter will be used: {', '.join(USES)}")
    preset = preset_values(ctx, settings.preset)

    def given(value, default):                    # an empty box means the preset's value; a 0 is checked
        return default if value is None else value

    targets = given(settings.targets, preset["targets"])
    for value, choices, what in ((settings.precision, PRECISIONS, "precision"),
                                 (settings.checkpointing, CHECKPOINTING, "gradient checkpointing"),
                                 (settings.optimizer, OPTIMIZERS, "optimizer"), (targets, TARGETS, "layers"),
                                 (settings.quantize_base, QUANTIZE, "frozen base weights")):
        if value not in choices:
            raise UserError(f"{what} {value!r}: choose one of {', '.join(choices)}")

    steps = int(given(settings.steps, preset["steps"]))
    return dict(
        **METHOD_LABELS[settings.method], magnitude_axis=USES[settings.use],
        rank=int(given(settings.rank, default_rank(ctx, settings.preset, settings.method))), steps=steps,
        lr=float(given(settings.lr, preset["lr"])), targets=targets, quantize_base=settings.quantize_base,
        prior_preservation=bool(settings.prior_preservation),
        num_class_images=int(given(settings.class_images, preset["class_images"])),
        train_text_encoders=(preset["train_text_encoders"] if settings.train_text_encoders is None
                             else bool(settings.train_text_encoders)), seed=int(settings.seed),
        sample_every=max(1, steps // 4), mixed_precision=PRECISIONS[settings.precision],
        gradient_checkpointing=CHECKPOINTING[settings.checkpointing], optimizer=OPTIMIZERS[settings.optimizer],
        buckets=bool(settings.buckets), pivotal_tokens=PIVOTAL_TOKENS if given(settings.pivotal, preset["pivotal"]) else 0)


def _plan(ctx: Context, config: TrainConfig):
    from dorabooth.memory import plan_run
    from dorabooth.quantize import check_quantize_available

    check_quantize_available(config.quantize_base)     # QDoRA without torchao: said now, not when the run fails
    return plan_run(config, ctx.info.spec, ctx.device)


@dataclass
class DeviceView:
    """What the Train tab shows about the device: the resolved settings (the same resolver the
    trainer uses), what "auto" means for each override, the memory estimate and the trained
    parameter count, or why the chosen settings cannot run (``problem``: on this device;
    ``refused``: the config itself, e.g. DVoRA on convolutions, shown beside the Advanced fields)."""

    device: str
    settings: object = None            # dorabooth.devices.DeviceSettings (None with a problem)
    estimate: object = None            # dorabooth.memory.MemoryEstimate
    auto: dict = field(default_factory=dict)      # field → the value "auto" resolves to
    problem: str = ""
    refused: str = ""                  # TrainConfig's own message for these choices
    trainable: int = 0                 # parameters that train (dorabooth.specs.trainable_parameters)


def device_view(ctx: Context, settings: TrainSettings) -> DeviceView:
    """The device settings, memory estimate and trained parameters for the Train tab's current choices."""
    from dorabooth.quantize import check_quantize_available
    from dorabooth.specs import trainable_parameters

    recipe = _recipe(ctx, settings)
    try:
        draft = TrainConfig(images="subject", class_noun="subject", out="run", model=ctx.model,
                            model_config=ctx.model_config, **recipe)
        check_quantize_available(draft.quantize_base)
    except ValueError as e:                  # the config refuses the choices, e.g. DVoRA on convolutions
        return DeviceView(ctx.device.label, refused=str(e))
    auto_values: dict = {}
    try:
        auto = _plan(ctx, replace(draft, mixed_precision=None, gradient_checkpointing=None, optimizer=None)).settings
        auto_values = {"precision": auto.mixed_precision, "optimizer": auto.optimizer,
                       "checkpointing": "on" if auto.gradient_checkpointing else "off"}
        plan = _plan(ctx, draft)
    except ValueError as e:                  # e.g. bf16 on a GPU without it, a rank too large for a layer
        return DeviceView(ctx.device.label, auto=auto_values, problem=str(e))
    trainable = sum(trainable_parameters(ctx.info.spec, plan.config).values())
    return DeviceView(ctx.device.label, plan.settings, plan.estimate, auto_values, trainable=trainable)


def start_training(ctx: Context, subject_name: str, settings: TrainSettings) -> str:
    """Queue a new run; returns its reference ``subject/run``. The run folder holds the request
    (the config and the Train tab's ``settings``) at once, so it is listed (and survives a
    restart) even while it waits.

    Idempotent while it matters: if a run of this subject with the same config is queued or
    training, its reference comes back and nothing new is queued (a double click on Start).
    """
    subject = ctx.workspace.subject(subject_name)
    label = f"{METHOD_LABELS.get(settings.method, {}).get('method', 'run')}-{settings.preset}"
    with ctx.starting:
        config = build_config(ctx, subject.name, settings)     # checked before any folder is made
        twin = live_twin(ctx, config)
        if twin is not None:
            return twin
        check_queue_room(ctx)
        run = ctx.workspace.new_run(subject.name, label)
        config = replace(config, out=str(run))
        request = {"config": config.to_dict(), "settings": asdict(settings), "preset": settings.preset,
                   "method_label": settings.method, "use": settings.use,
                   "requested": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (run / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
        ctx.worker.submit(run, config)
    return ctx.workspace.ref(run)


def check_queue_room(ctx: Context) -> None:
    """At most ``ctx.limits.max_queued`` runs of a workspace train or wait at once (a script cannot
    queue thousands; with separate users, per user), and the workspace is within its disk quota."""
    limit = ctx.limits.max_queued
    if len(ctx.worker.line()) >= limit:
        whose = "of yours " if ctx.user else ""
        raise UserError(f"{limit} runs {whose}are training or waiting already (the most the queue holds"
                        f"{' for one user' if ctx.user else ''}): wait for one to finish, or stop one, then start "
                        f"this one")
    check_disk(ctx.workspace.root, ctx.limits, what="a new run")


def live_twin(ctx: Context, config: TrainConfig) -> str | None:
    """The queued or training run asked for with the same config (its folder aside), if any."""
    for run in ctx.worker.line():
        try:
            asked = _request_config(run)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if replace(asked, out=NEW_RUN) == replace(config, out=NEW_RUN):
            return ctx.workspace.ref(run)
    return None


def live_run(ctx: Context) -> str | None:
    """The run the worker trains now, else the first one waiting; None when the line is empty."""
    line = ctx.worker.line()
    return ctx.workspace.ref(line[0]) if line else None


def run_form(ctx: Context, ref: str) -> TrainSettings | None:
    """The Train tab's settings a run was started with (None: it was not started from the app)."""
    form = runs.read_request(ctx.workspace.run(ref)).get("settings")
    if not isinstance(form, dict):
        return None
    known = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in form.items() if k in known})


def delete_run(ctx: Context, ref: str) -> str:
    """Delete a run folder with everything in it; a queued or training run is refused."""
    check_idle(ctx, ref, "delete")
    ctx.workspace.delete_run(ctx.workspace.run(ref))
    return f"Deleted {ref}."


def rename_run(ctx: Context, ref: str, name: str) -> str:
    """Rename a run (its folder keeps its number: ``001-<name>``); returns the new reference."""
    check_idle(ctx, ref, "rename")
    return ctx.workspace.ref(ctx.workspace.rename_run(ctx.workspace.run(ref), name))


def check_idle(ctx: Context, ref: str, what: str) -> None:
    """Refuse (UserError saying what to do) to ``what`` a run that is queued or training."""
    run = ctx.workspace.run(ref)
    position = ctx.worker.position(run)
    if position is not None:
        doing = "training" if position == 0 else "waiting to train"
        raise UserError(f"{ref} is {doing}; press Stop (and wait until it has stopped) before you {what} it")
    owner = rd.run_busy(run)
    if owner is not None:
        raise UserError(f"{ref} is being trained right now by another process ({owner}); wait for it to "
                        f"finish or stop it there, then {what} it")


def _request_config(run: Path) -> TrainConfig:
    """The config the app asked for, pointed at the folder the run is in now (it may have been renamed)."""
    return replace(TrainConfig.from_dict(runs.read_request(run)["config"]), out=str(run))


def stop_training(ctx: Context, ref: str) -> str:
    run = ctx.workspace.run(ref)
    outcome = ctx.worker.stop(run)
    return {"stopping": "Stopping after the current step; a checkpoint is kept so you can resume.",
            "removed": "Taken out of the queue; press Resume to queue it again.",
            "idle": "This run is not training."}[outcome]


def resume_training(ctx: Context, ref: str) -> str:
    """Queue a stopped, failed or interrupted run again, continuing from its newest checkpoint."""
    run = ctx.workspace.run(ref)
    owner = rd.run_busy(run)
    if owner is not None:
        raise UserError(f"{ref} is being trained right now by another process ({owner}, e.g. `dorabooth train` "
                        f"in a terminal); wait for it to finish, or stop it there")
    status = run_status(ctx, ref)
    if not status.resumable:
        raise UserError(f"{ref} is {status.state}; only stopped, failed or interrupted runs can be resumed")
    if rd.is_run(run):                                 # out: the folder may have been renamed since
        config = replace(rd.read_config(run)[0], resume=True, out=str(run))
    else:                                              # it never started: start it as requested
        config = _request_config(run)
    check_queue_room(ctx)
    position = ctx.worker.submit(run, config)
    return "Resuming." if position == 0 else f"Queued to resume: {_place(position)}."


def _place(position: int) -> str:
    return "next in line" if position == 1 else f"number {position} in line"


def _finished_run(ctx: Context, ref: str) -> tuple[Path, RunStatus]:
    """The folder and status of a finished run; a readable error for any other."""
    run = ctx.workspace.run(ref)
    status = live_status(ctx.worker, run)
    if not status.finished:
        raise UserError(f"{ref} has no trained adapter yet ({status.state}); pick a finished run")
    return run, status


def run_status(ctx: Context, ref: str) -> RunStatus:
    run = ctx.workspace.run(ref)
    return live_status(ctx.worker, run)


def list_runs(ctx: Context, subject_name: str | None = None, *, finished_only: bool = False) -> list[tuple[str, str]]:
    """(label, ref) of every run (of one subject, or all), newest first."""
    out = []
    for run in ctx.workspace.runs(subject_name):
        status = live_status(ctx.worker, run)
        if finished_only and not status.finished:
            continue
        out.append((run_label(ctx, run, status), ctx.workspace.ref(run)))
    return out


def run_label(ctx: Context, run: Path, status: RunStatus) -> str:
    return f"{ctx.workspace.ref(run)} · {status.method_name}, {status.settings.get('steps', '?')} steps"


def recover_queue(ctx: Context) -> list[str]:
    """After a restart: queue again the runs that were waiting (request written, never started);
    with separate users, every user's."""
    if ctx.separate_users:
        return [f"{user.user}: {ref}" for user in ctx.users() for ref in recover_queue(user)]
    waiting = []
    for run in ctx.workspace.runs():
        if (run / REQUEST_FILE).is_file() and not (run / rd.EVENTS).exists() and ctx.worker.position(run) is None:
            waiting.append(run)
    waiting.sort(key=lambda r: (r / REQUEST_FILE).stat().st_mtime)
    for run in waiting:
        ctx.worker.submit(run, _request_config(run))
    return [ctx.workspace.ref(r) for r in waiting]


# =============================================================================================
# Generate
# =============================================================================================
@dataclass
class GenerateResult:
    images: list[Path]
    seed: int


def default_prompt(ctx: Context, ref: str) -> str:
    """The prompt the run was trained with: it brings the subject out."""
    return run_status(ctx, ref).instance_prompt


def generate_images(ctx: Context, ref: str, prompt: str, *, negative: str = "", n: int = 1,
                    steps: int | None = None, guidance: float | None = None, seed: int | None = 0,
                    strength: float = 1.0) -> GenerateResult:
    """Images of ``prompt`` with a finished run's adapter, saved in ``<run>/generated/``.

    ``seed=None`` draws a random seed (returned, so a good image can be made again).
    """
    from dorabooth import generate

    run, status = _finished_run(ctx, ref)
    if not (prompt or "").strip():
        raise UserError("write a prompt, e.g. 'a photo of sks dog on the beach'")
    if max(len(prompt), len(negative or "")) > MAX_PROMPT:
        raise UserError(f"the prompt is too long: use at most {MAX_PROMPT} characters")
    if not 1 <= int(n) <= 16:
        raise UserError("number of images: choose 1 to 16")
    if steps is not None and not 1 <= int(steps) <= MAX_GENERATE_STEPS:
        raise UserError(f"steps {steps}: use 1 to {MAX_GENERATE_STEPS} sampler steps")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= 50):
        raise UserError(f"guidance {guidance}: use 0 to 50 (5–8 is usual)")
    if not (math.isfinite(strength) and 0 <= strength <= 3):
        raise UserError("strength: use 0 (the base model) to about 1.5 (at most 3)")
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise UserError(f"seed {seed}: use a whole number from 0 to {MAX_SEED}")
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    check_disk(ctx.workspace.root, ctx.limits, what="generating")
    settings = status.settings                       # the base model the run was trained on
    paths = ctx.sessions.use(settings.get("model"), lambda session: generate(
        prompt.strip(), out=run / "generated", adapter=run, negative=(negative or "").strip() or None, n=int(n),
        steps=int(steps) if steps else None, guidance=guidance, seed=seed, strength=float(strength),
        session=session), model_config=settings.get("model_config"))
    return GenerateResult([Path(p) for p in paths], seed)


# =============================================================================================
# Export: ui/exporting.py (which file for which tool, the export, download names)
# =============================================================================================
def retrain_for(ctx: Context, ref: str, use: str = "comfy") -> str:
    """Start a new run of ``ref``'s subject with its recorded photos and settings, trained for
    ``use`` (its magnitude axis); returns the new run's reference. Asking again while that run
    waits, trains or is finished gives the same run."""
    from dorabooth.formats.destinations import AXIS_FOR_USE
    from dorabooth.formats.destinations import USES as USE_LABELS

    run, status = _finished_run(ctx, ref)
    if status.settings.get("method") not in MAGNITUDE_METHODS:
        raise UserError(f"{ref} is a {status.method_name} run: its files work the same everywhere; no need to retrain")
    for other in ctx.workspace.runs(run.parent.parent.name):
        request = runs.read_request(other)
        if request.get("retrain_of") == ref and request.get("use") == USE_LABELS[use] \
                and not live_status(ctx.worker, other).resumable:
            return ctx.workspace.ref(other)
    config = rd.read_config(run)[0]
    if config.magnitude_axis == AXIS_FOR_USE[use]:
        raise UserError(f"{ref} is trained for {USE_LABELS[use]} already: export its adapter file")
    label = f"{config.method}-for-{'comfyui' if use == 'comfy' else use}"
    check_queue_room(ctx)
    new = ctx.workspace.new_run(run.parent.parent.name, label)
    config = replace(config, out=str(new), magnitude_axis=AXIS_FOR_USE[use], resume=False)
    request = {"config": config.to_dict(), "preset": status.settings.get("_preset"),
               "method_label": runs.read_request(run).get("method_label"), "use": USE_LABELS[use], "retrain_of": ref,
               "requested": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (new / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
    ctx.worker.submit(new, config)
    return ctx.workspace.ref(new)


# =============================================================================================
# Analyze
# =============================================================================================
AXIS_LABELS = {"per output row (dorabooth's magnitude axis)": "out", "per input column (the paper's notation)": "in"}


@dataclass
class AnalysisOutcome:
    plot: Path
    axis: str
    panels: list[dict]            # label, runs, slope, pearson, n (query projections, else all layers)
    snapshots: dict[str, int]     # run ref -> number of checkpoints analysed


def analyze_runs(ctx: Context, refs: list[str], axis: str = "out") -> AnalysisOutcome:
    """The DoRA paper's magnitude/direction analysis of one run, or several side by side.

    Written to ``<first run>/analysis/<axis>[-<hash of the others>]/`` (analysis.json and .png).
    """
    from dorabooth.analysis import analyze

    refs = [r for r in dict.fromkeys(refs or []) if r]
    if not refs:
        raise UserError("choose a trained run to analyse")
    if axis not in AXIS_LABELS.values():
        raise UserError("axis: choose per output row ('out') or per input column ('in')")
    folders = []
    for ref in refs:
        status = run_status(ctx, ref)
        if not (status.finished or status.checkpoint):
            raise UserError(f"{ref} has no checkpoints yet ({status.state}); train it first")
        folders.append(ctx.workspace.run(ref))
    import hashlib
    tag = axis if len(refs) == 1 else f"{axis}-{hashlib.sha1('|'.join(refs).encode()).hexdigest()[:8]}"
    data = analyze(folders, folders[0] / "analysis" / tag, axis=axis)
    panels = []
    for panel in data["panels"]:
        which = "query" if panel["fit"]["query"].get("n") else "all"
        pooled, within = panel["fit"][which], panel["fit"][f"{which}_within_step"]
        panels.append({"label": panel["label"], "runs": [ctx.workspace.ref(Path(r)) for r in panel["runs"]],
                       "layers": which, "n": pooled.get("n", 0),
                       "slope": pooled.get("slope"), "pearson": pooled.get("pearson"),
                       "slope_within": within.get("slope"), "pearson_within": within.get("pearson")})
    snaps = {ctx.workspace.ref(Path(r["run"])): len(r["steps"]) for r in data["runs"]}
    return AnalysisOutcome(Path(data["plot"]), axis, panels, snaps)
