"""Progress events: one JSON object per step, sample, checkpoint, skip or error.

Long operations (training, class-image generation, generation) report through one
``on_event(event: dict)`` callback. :class:`EventLog` also appends each event as a line to
``events.jsonl`` so another process (the UI, ``tail -f``) can follow a run;
:func:`follow` reads such a file as it grows; :class:`ProgressBar` turns the same events
into a terminal progress line (step, loss, it/s, ETA).

Every event has ``type`` and ``time`` (Unix seconds). Types written by the trainer:
``device`` (the resolved precision, checkpointing, optimizer and memory estimate), ``warning``
(message), ``start``, ``skip`` (path, reason), ``prepared``, ``class_images`` (done, total),
``step`` (step, total, loss, lr, it_s, eta_s), ``checkpoint`` (step, path), ``sample``
(step, paths), ``stopped``, ``error`` (message), ``done`` (adapter, steps), ``restart``
(message: the folder's earlier run never reached a checkpoint and starts over in place),
``cleaned`` (paths: temporaries killed writers left, removed), ``override`` (step, field, old,
new, message: a --resume changed the learning rate or clipping), ``finished`` (step, adapter,
message: --resume of a finished run; passed to ``on_event`` only, nothing is written).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import diskfull

EventCallback = Callable[[dict], None]


def stop_requested(stop) -> bool:
    """``stop`` (anything with ``is_set()``, e.g. a ``threading.Event``, or None) asks a long
    operation to stop at its next safe point."""
    return stop is not None and stop.is_set()


class EventLog:
    """Builds events, appends them to ``path`` (if given) and passes them to ``on_event``. An
    append that runs out of space raises :class:`~dorabooth.diskfull.DiskFull` naming ``path``."""

    def __init__(self, path: str | Path | None = None, on_event: EventCallback | None = None):
        self.path = Path(path) if path is not None else None
        self.on_event = on_event

    def __call__(self, type: str, **fields) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **fields}
        if self.path is not None:
            with diskfull.naming(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, default=str) + "\n")
        if self.on_event is not None:
            self.on_event(event)
        return event


def read_events(path: str | Path) -> list[dict]:
    """The complete, well-formed event lines of an ``events.jsonl`` file ([] when there is none
    yet); a half-written last line (a writer mid-append) and damaged lines are left out."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_events(f)


def parse_events(lines) -> list[dict]:
    """:func:`read_events` of the lines of an ``events.jsonl`` (a file, or its text split with
    ``splitlines(keepends=True)``): a last line without its newline and damaged lines left out."""
    events = []
    for line in lines:
        if not line.endswith("\n"):
            break
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def follow(path: str | Path, *, poll: float = 0.5, until: tuple[str, ...] = ("done", "error", "stopped"),
           timeout: float | None = None) -> Iterator[dict]:
    """Yield events from ``path`` as they are appended, until one of type ``until`` arrives."""
    path = Path(path)
    start = time.monotonic()
    pos = 0
    partial = ""
    while True:
        if path.exists():
            with open(path, encoding="utf-8") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            partial += chunk
            *lines, partial = partial.split("\n")
            for line in lines:
                if line.strip():
                    event = json.loads(line)
                    yield event
                    if event.get("type") in until:
                        return
        if timeout is not None and time.monotonic() - start > timeout:
            return
        time.sleep(poll)


def format_clock(seconds: float | None) -> str:
    """Seconds as "m:ss" or "h:mm:ss" ("?" when unknown), for progress displays."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """An ``on_event`` callback drawing ``step 12/400 [###---] loss 0.083 2.1 it/s ETA 3:05``.

    On a terminal the line is redrawn in place; otherwise a line is printed every
    ``every`` steps. Skips, checkpoints and samples are printed as their own lines; errors
    are left to the caller (the CLI prints the exception once).
    """

    def __init__(self, stream=None, width: int = 24, every: int = 10):
        self.stream = stream or sys.stderr
        self.width = width
        self.every = every
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def _line(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "step":
            step, total = event["step"], event["total"]
            done = int(self.width * step / max(total, 1))
            bar = "#" * done + "-" * (self.width - done)
            text = (f"step {step}/{total} [{bar}] loss {event['loss']:.4f} "
                    f"{event.get('it_s', 0):.2f} it/s ETA {format_clock(event.get('eta_s'))}")
            if self.tty:
                self.stream.write("\r" + text)
                self.stream.flush()
                self._open = True
            elif step % self.every == 0 or step == total:
                self._line(text)
        elif kind == "class_images":
            text = f"class images {event['done']}/{event['total']}"
            if self.tty:
                self.stream.write("\r" + text)
                self.stream.flush()
                self._open = True
            else:
                self._line(text)
        elif kind == "skip":
            self._line(f"skipped {event['path']}: {event['reason']}")
        elif kind in ("checkpoint", "sample", "prepared", "start", "done", "stopped", "image", "device", "warning",
                      "restart", "override", "finished"):
            self._line(_describe(event))
        elif kind == "error" and self._open:
            self._line("")                # end the bar's line; the caller prints the error itself


def _describe(event: dict) -> str:
    kind = event["type"]
    if kind == "checkpoint":
        return f"checkpoint saved: {event['path']}"
    if kind == "sample":
        return f"samples at step {event['step']}: {len(event['paths'])} image(s) in {Path(event['paths'][0]).parent}"
    if kind == "prepared":
        return f"prepared {event['images']} subject image(s) at {event['sizes']} px"
    if kind == "start":
        return f"training {event['method']} on {event['family']} ({event['model']}) for {event['total']} steps"
    if kind == "done":
        return f"done: {event['adapter']} ({format_clock(event.get('seconds'))})"
    if kind == "stopped":
        return f"stopped at step {event['step']}; resume with --resume"
    if kind == "image":
        return f"wrote {event['path']}"
    if kind == "warning":
        return f"warning: {event['message']}"
    if kind in ("restart", "override", "finished"):
        return event["message"]
    if kind == "device":
        estimate = (event.get("memory_estimate") or {}).get("peak")
        return (f"device {event['device']}: mixed precision {event['mixed_precision']}, gradient checkpointing "
                f"{'on' if event['gradient_checkpointing'] else 'off'}, {event['optimizer']}"
                + (f", estimated peak {estimate / 2**30:.1f} GiB" if estimate else ""))
    return json.dumps(event)
