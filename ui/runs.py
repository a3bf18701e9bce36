"""What a run folder says about itself: state, progress, loss curve, previews.

Everything here is read from the run folder (``events.jsonl``, ``config.json``, the UI's
``ui-request.json``) plus the worker's queue position (and, with ``--cluster``, the events the
workers stream), never from a browser session, so the page shows the same run after a reload,
in another tab, or after the app restarted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dorabooth import events
from dorabooth import rundir as rd
from dorabooth.config import default_instance_prompt

from .workspace import REQUEST_FILE

# States, in the words the page uses.
QUEUED, STARTING, CLASS_IMAGES, PREPARING, TRAINING = "queued", "starting", "class images", "preparing", "training"
FINISHED, STOPPED, FAILED, INTERRUPTED, NOT_STARTED = "finished", "stopped", "failed", "interrupted", "not started"
ACTIVE = (QUEUED, STARTING, CLASS_IMAGES, PREPARING, TRAINING)


@dataclass
class RunStatus:
    run: Path
    state: str
    position: int | None = None           # in the worker's line (0 = running)
    step: int = 0
    total: int = 0
    it_s: float | None = None
    eta_s: float | None = None
    class_done: int = 0
    class_total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)   # (step, loss), one per step
    samples: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, png paths), oldest first
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (file, reason)
    warnings: list[str] = field(default_factory=list)               # e.g. bf16 emulated on this CPU
    message: str = ""                     # error text, or why a run stopped
    seconds: float | None = None          # training time of a finished run
    checkpoint: int | None = None         # newest checkpoint step
    settings: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def resumable(self) -> bool:
        return self.state in (STOPPED, FAILED, INTERRUPTED, NOT_STARTED)

    @property
    def method_name(self) -> str:
        """"DoRA", "DoRA†" (half rank), "LoRA", "DVoRA" or "full fine-tune", as the page names methods."""
        s = self.settings
        names = {"dora": "DoRA†" if s.get("half_rank") else "DoRA", "lora": "LoRA", "dvora": "DVoRA",
                 "full": "full fine-tune"}
        return names.get(s.get("method"), str(s.get("method", "?")))

    @property
    def instance_prompt(self) -> str:
        """The prompt the run was trained with (the trainer's default when none was given)."""
        s = self.settings
        return s.get("instance_prompt") or default_instance_prompt(s.get("token", "sks"), s.get("class_noun", ""))


def read_events(run: str | Path) -> list[dict]:
    """The run's events (the complete, well-formed lines of its ``events.jsonl``)."""
    return events.read_events(Path(run) / rd.EVENTS)


def run_settings(run: str | Path) -> dict:
    """The run's config: the resolved ``config.json`` once training started, else the request."""
    run = Path(run)
    for name, key in ((rd.CONFIG, "config"), (REQUEST_FILE, "config")):
        path = run / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            settings = dict(data.get(key, {}))
            settings["_resolved"] = name == rd.CONFIG
            settings["_preset"] = read_request(run).get("preset")
            settings["_base_model"] = (data.get("base_model") or {}).get("id")
            return settings
    return {}


def read_request(run: str | Path) -> dict:
    """What the app asked for (``ui-request.json``: config, the Train tab's settings, preset);
    {} for a run the app did not start."""
    try:
        return json.loads((Path(run) / REQUEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def live_status(worker, run: str | Path) -> RunStatus:
    """The run's state as the page shows it: ``worker``'s queue position and, where the worker
    streams the run's events (``worker.events``; a cluster's), those; else its ``events.jsonl``."""
    return read_status(run, worker.position(run), worker.events(run))


def read_status(run: str | Path, position: int | None = None, events: list[dict] | None = None) -> RunStatus:
    """The run's state from its events (``events``, else its ``events.jsonl``); ``position``
    comes from the worker (None: not in line)."""
    run = Path(run)
    status = RunStatus(run, NOT_STARTED, position=position, settings=run_settings(run))
    phase = None
    losses: dict[int, float] = {}
    for e in read_events(run) if events is None else events:
        kind = e.get("type")
        if kind == "class_images":
            phase, status.class_done, status.class_total = CLASS_IMAGES, e.get("done", 0), e.get("total", 0)
        elif kind == "prepared":
            phase = PREPARING
        elif kind in ("start", "resume"):
            phase = TRAINING
            status.step = e.get("step", status.step)
            status.total = e.get("total", status.total)
            status.message = ""
        elif kind == "step":
            phase = TRAINING
            status.step, status.total = e.get("step", status.step), e.get("total", status.total)
            status.it_s, status.eta_s = e.get("it_s"), e.get("eta_s")
            if isinstance(e.get("loss"), (int, float)):
                losses[status.step] = float(e["loss"])
        elif kind == "sample":
            status.samples.append((e.get("step", 0), [_in_run(run, p) for p in e.get("paths", [])]))
        elif kind == "checkpoint":
            status.checkpoint = e.get("step")
        elif kind == "skip":
            status.skipped.append((e.get("path", "?"), e.get("reason", "")))
        elif kind in ("warning", "retry") and e.get("message") not in status.warnings:
            status.warnings.append(e.get("message", ""))          # a retry: its worker died (a cluster)
        elif kind == "done":
            phase, status.seconds = FINISHED, e.get("seconds")
            status.step = e.get("steps", status.step)
            status.total = max(status.total, status.step)
        elif kind == "stopped":
            phase, status.message = STOPPED, e.get("message", "")
            status.step = e.get("step", status.step)
        elif kind == "error":
            phase, status.message = FAILED, _plain_error(e.get("message", "unknown error"))
        elif kind == "job" and e.get("state") in ("failed", "cancelled"):   # streamed: the queue ended it
            phase, status.message = (FAILED if e["state"] == "failed" else STOPPED), e.get("message", "")
    status.losses = sorted(losses.items())
    if position is not None:
        running_again = phase in (None, FINISHED, STOPPED, FAILED)   # resumed, nothing new written yet
        status.state = QUEUED if position > 0 else (STARTING if running_again else phase)
    elif phase is None:
        status.state = NOT_STARTED
    elif phase in (FINISHED, STOPPED, FAILED):
        status.state = phase
    else:
        status.state = INTERRUPTED
    return status


def _in_run(run: Path, path: str) -> str:
    """A sample's path in the run folder as it is now: events record absolute paths, and the
    folder may have been renamed since (``samples/step-N/NN.png`` keeps its place inside)."""
    p = Path(path)
    return str(run / rd.SAMPLES / p.parent.name / p.name) if p.parent.parent.name == rd.SAMPLES else path


def _plain_error(message: str) -> str:
    """``"ValueError: resolution 30 …"`` → ``"resolution 30 …"``: the type name tells a user nothing."""
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier() and (head.endswith("Error") or head.endswith("Exception")
                                         or head in ("TrainingDiverged", "DiskFull")):
        return rest
    return message
