"""The app's workspace on disk: one folder per subject, holding its photos and its runs.

Layout (everything the UI makes is usable from the CLI too)::

    <workspace>/<subject>/subject.json        token, class noun, created
    <workspace>/<subject>/images/             the photos as uploaded (validated, decodable)
    <workspace>/<subject>/previews/           crops as the trainer will see them (a cache)
    <workspace>/<subject>/class-images/<key>/ prior-preservation images, reused across runs
    <workspace>/<subject>/runs/<run>/         a run folder (DESIGN §6) plus the UI's
                                              ui-request.json, generated/ and exports/

Owns: sanitising user-chosen names (no path traversal), bounded uploads (file size, count
and bytes per subject, bytes in the workspace, image decoding through
:func:`dorabooth.data.load_image`), bounded subjects and texts, duplicate detection, and
writing files under a temporary name before renaming them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from dorabooth import rundir as rd
from dorabooth.data import UnusableImage, cut_off_share, fit, load_image, looks_blank
from dorabooth.formats.files import atomic_file, write_bytes, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_UPLOAD_BYTES = 30 * 2**20          # per photo
MAX_IMAGES = 20                        # per subject
MAX_SUBJECT_BYTES = 200 * 2**20        # the photos of one subject together
MAX_WORKSPACE_BYTES = 4 * 2**30        # the photos of all subjects together
MAX_SUBJECTS = 200
MAX_TEXT = 500                         # characters in a token, class noun or prompt
MIN_IMAGES = 3                         # to start training
MAX_NAME = 48
NEAR_DUPLICATE = 6.0                   # mean |difference| of 16×16 thumbnails (0–255) below which photos match
CUT_OFF = 0.15                         # share of the subject outside the crop above which a photo is flagged
PREVIEW_SIDE = 256                     # crops are shown at least this large (nearest-neighbour)
SUBJECT_FILE = "subject.json"
REQUEST_FILE = "ui-request.json"       # what the UI asked the trainer for (a queued run has only this)


class UserError(ValueError):
    """A problem the user can fix; the message says how. Shown in the page as is."""


LAST_RUN = ".last-run"                   # in a subject's runs/: the number the newest run was given


def sanitize_name(name: str, what: str = "name") -> str:
    """A safe folder name from a user's text: ``"Rex the Dog!" -> "rex-the-dog"``.

    Letters (accents removed), digits, ``-`` and ``_`` only, at most 48 characters, never
    ``.``/``..`` or a hidden name; raises :class:`UserError` when nothing usable is left.
    """
    text = unicodedata.normalize("NFKD", str(name or "")).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    text = re.sub(r"-{2,}", "-", text)[:MAX_NAME].strip("-_")
    if not text:
        raise UserError(f"{what} {name!r} has no letters or digits; use something like 'my-dog'")
    return text




@dataclass
class UploadResult:
    """What happened to one uploaded file."""

    file: str                          # the name the user gave
    stored: str | None = None          # the name in images/ (None: refused)
    problem: str | None = None         # why it was refused


@dataclass
class Photo:
    """One stored photo of a subject, with what the trainer will make of it."""

    name: str
    path: Path
    width: int = 0
    height: int = 0
    warnings: list[str] = field(default_factory=list)
    usable: bool = True                # False: the trainer would skip it (reason in warnings)


@dataclass
class Subject:
    name: str
    folder: Path
    token: str = "sks"
    class_noun: str = ""
    instance_prompt: str = ""          # the training prompt; empty = "a photo of <token> <class noun>"
    class_prompt: str = ""             # prior-preservation prompt; empty = "a photo of <class noun>"

    @property
    def images(self) -> Path:
        return self.folder / "images"

    @property
    def runs(self) -> Path:
        return self.folder / "runs"


class Workspace:
    """The folder tree above; every path it returns is inside ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- subjects --------------------------------------------------------------------------
    def subjects(self) -> list[str]:
        """Subject names, most recently changed first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and (p / SUBJECT_FILE).is_file()]
        return [p.name for p in sorted(found, key=_last_change, reverse=True)]

    def subject(self, name: str, *, create: bool = False) -> Subject:
        safe = sanitize_name(name, "subject name")
        folder = self.root / safe
        meta = folder / SUBJECT_FILE
        if not meta.is_file():
            if not create:
                raise UserError(f"there is no subject called {safe!r} yet; upload photos to create it")
            if len(self.subjects()) >= MAX_SUBJECTS:
                raise UserError(f"the workspace holds at most {MAX_SUBJECTS} subjects; reuse one, or remove a "
                                f"subject's folder from {self.root}")
            (folder / "images").mkdir(parents=True, exist_ok=True)
            write_json(meta, {"name": safe, "token": "sks", "class_noun": "",
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2)
        data = json.loads(meta.read_text())
        return Subject(safe, folder, data.get("token") or "sks", data.get("class_noun") or "",
                       data.get("instance_prompt") or "", data.get("class_prompt") or "")

    def save_subject(self, name: str, *, token: str, class_noun: str, instance_prompt: str | None = None,
                     class_prompt: str | None = None) -> Subject:
        """Store the token and class noun (validated the way the trainer will), and optionally
        the training and class prompts."""
        subject = self.subject(name, create=True)
        token, class_noun = (token or "").strip(), " ".join((class_noun or "").split())
        for text, what in ((token, "token"), (class_noun, "class noun"), (instance_prompt, "training prompt"),
                           (class_prompt, "class prompt")):
            if text is not None and len(text) > MAX_TEXT:
                raise UserError(f"the {what} is {len(text)} characters long; use at most {MAX_TEXT}")
        if not token:
            raise UserError("the token is empty: type one rare made-up word, such as 'sks'")
        if " " in token:
            raise UserError(f"token {token!r}: use one rare made-up word without spaces, such as 'sks'")
        meta = subject.folder / SUBJECT_FILE
        data = json.loads(meta.read_text())
        data.update(token=token, class_noun=class_noun)
        if instance_prompt is not None:
            data["instance_prompt"] = " ".join(instance_prompt.split())
        if class_prompt is not None:
            data["class_prompt"] = " ".join(class_prompt.split())
        write_json(meta, data, indent=2)
        return self.subject(subject.name)

    # ---- photos ----------------------------------------------------------------------------
    def add_photos(self, name: str, files: list[str | os.PathLike]) -> list[UploadResult]:
        """Copy uploaded files into the subject's ``images/`` after checking each one.

        Refused (with the reason): other file types, files over 30 MiB, unreadable images,
        decompression bombs, exact duplicates, and anything beyond 20 photos or 200 MiB of a
        subject, or 4 GiB of photos in the workspace. The stored file is the uploaded bytes,
        unchanged, under a sanitised unique name.
        """
        subject = self.subject(name, create=True)
        subject.images.mkdir(parents=True, exist_ok=True)
        mine = self._photo_files(subject)
        known = {_sha256(p.read_bytes()): p.name for p in mine}
        count = len(known)
        held = sum(p.stat().st_size for p in mine)                       # this subject's photos
        total = self.photo_bytes()                                       # every subject's
        results = []
        for file in files:
            src = Path(file)
            result = UploadResult(src.name)
            results.append(result)
            suffix = src.suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                result.problem = f"not a photo type we read ({suffix or 'no extension'}); use JPG, PNG or WebP"
                continue
            size = src.stat().st_size
            if size > MAX_UPLOAD_BYTES:
                result.problem = (f"file is {size / 2**20:.0f} MiB; photos must be under "
                                  f"{MAX_UPLOAD_BYTES // 2**20} MiB (save it as JPG)")
                continue
            if count >= MAX_IMAGES:
                result.problem = f"a subject holds at most {MAX_IMAGES} photos; remove some first"
                continue
            if held + size > MAX_SUBJECT_BYTES:
                result.problem = (f"a subject's photos hold at most {MAX_SUBJECT_BYTES // 2**20} MiB together "
                                  f"({held / 2**20:.0f} MiB here already); remove some, or save them as JPG")
                continue
            if total + size > MAX_WORKSPACE_BYTES:
                result.problem = (f"the workspace's photos hold at most {MAX_WORKSPACE_BYTES / 2**30:g} GiB "
                                  f"together; remove photos or subjects you no longer need")
                continue
            try:
                load_image(src)                          # bounded decode; raises UnusableImage with a reason
            except UnusableImage as e:
                result.problem = str(e)
                continue
            data = src.read_bytes()
            digest = _sha256(data)
            if digest in known:
                result.problem = f"the same photo is already here as {known[digest]}"
                continue
            target = _unique(subject.images, sanitize_name(src.stem, "file name") if _has_word(src.stem)
                             else "photo", ".jpg" if suffix == ".jpeg" else suffix)
            write_bytes(target, data)
            known[digest] = target.name
            count += 1
            held += len(data)
            total += len(data)
            result.stored = target.name
        return results

    def photo_bytes(self) -> int:
        """Bytes of every subject's stored photos."""
        return sum(p.stat().st_size for name in self.subjects() for p in self._photo_files(self.subject(name)))

    def remove_photo(self, name: str, photo: str) -> None:
        subject = self.subject(name)
        path = subject.images / Path(photo).name          # a bare name, never a path
        if not path.is_file():
            raise UserError(f"{subject.name} has no photo called {photo!r}")
        path.unlink()
        for preview in (subject.folder / "previews").glob(f"{path.stem}.*"):
            preview.unlink(missing_ok=True)

    def photos(self, name: str, *, resolution: int | None = None) -> list[Photo]:
        """The stored photos with warnings: too small for ``resolution``, unreadable, blank, the
        subject cut off by the square crop, near-duplicates."""
        subject = self.subject(name)
        out: list[Photo] = []
        seen: list[tuple[bytes, str]] = []                  # (thumbnail, name) of the photos so far
        for path in self._photo_files(subject):
            photo = Photo(path.name, path)
            out.append(photo)
            try:
                image = load_image(path)
            except UnusableImage as e:
                photo.warnings.append(f"unreadable: {e}")
                photo.usable = False
                continue
            photo.width, photo.height = image.size
            if resolution is not None and min(image.size) < resolution // 2:
                photo.warnings.append(f"too small: {image.width}×{image.height} px; the trainer needs a short "
                                      f"side of at least {resolution // 2} px and will skip it")
                photo.usable = False
            elif resolution is not None and min(image.size) < resolution:
                photo.warnings.append(f"smaller than the training size ({resolution} px): it will be upscaled "
                                      f"and may look soft")
            if looks_blank(image):
                photo.warnings.append("looks blank (nearly one colour all over): is the subject in it?")
            elif resolution is not None and (cut := cut_off_share(image, (resolution, resolution))) >= CUT_OFF:
                photo.warnings.append(f"the square crop cuts off about {100 * cut:.0f}% of the subject: crop the "
                                      f"photo around the subject yourself, or turn on aspect-ratio buckets under "
                                      f"Advanced settings on the Train tab")
            thumb = _thumbnail(image)
            twin = next((name for other, name in seen if _thumb_distance(thumb, other) < NEAR_DUPLICATE), None)
            if twin is not None:
                photo.warnings.append(f"looks like a duplicate of {twin}: near-identical photos add "
                                      f"little and make overfitting likelier")
            seen.append((thumb, path.name))
        return out

    def preview(self, name: str, photo: Photo, resolution: int) -> Path:
        """The centre crop the trainer will train on, at ``resolution`` px, enlarged for display."""
        from PIL import Image

        folder = self.subject(name).folder / "previews"
        folder.mkdir(exist_ok=True)
        path = folder / f"{photo.path.stem}.r{resolution}.png"
        if path.is_file() and path.stat().st_mtime >= photo.path.stat().st_mtime:
            return path
        crop, _ = fit(load_image(photo.path), (resolution, resolution))
        if resolution < PREVIEW_SIDE:
            crop = crop.resize((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.NEAREST)
        with atomic_file(path) as tmp:
            crop.save(tmp, format="PNG")
        return path

    def _photo_files(self, subject: Subject) -> list[Path]:
        if not subject.images.is_dir():
            return []
        return sorted(p for p in subject.images.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))

    # ---- runs ------------------------------------------------------------------------------
    def new_run(self, name: str, label: str) -> Path:
        """A fresh run folder ``runs/NNN-label`` (numbered, never reused)."""
        subject = self.subject(name)
        subject.runs.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for n in self._run_names(subject) if (m := re.match(r"(\d+)-", n))]
        number = max(numbers, default=0) + 1
        run = subject.runs / f"{number:03d}-{sanitize_name(label, 'run label')}"
        run.mkdir()
        (subject.runs / LAST_RUN).write_text(f"{number:03d}-\n")  # a deleted newest run's number stays taken:
        return run                                                # the cluster's queue knows runs by it

    def _run_names(self, subject: Subject) -> list[str]:
        """The names taken in the subject's ``runs/`` (a new run is numbered after them), with the
        number last given out."""
        last = subject.runs / LAST_RUN
        return [p.name for p in subject.runs.iterdir() if p.name != LAST_RUN] + \
            ([last.read_text().strip()] if last.is_file() else [])

    def runs(self, name: str | None = None) -> list[Path]:
        """Run folders of one subject (or of all), newest first."""
        subjects = [name] if name else self.subjects()
        found = []
        for s in subjects:
            folder = self.root / sanitize_name(s, "subject name") / "runs"
            if folder.is_dir():
                found += sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                                 and ((p / REQUEST_FILE).is_file() or rd.is_run(p))),
                                key=lambda p: p.name, reverse=True)
        return found

    def run(self, ref: str) -> Path:
        """The run folder for ``subject/run`` (as listed in the app); refuses anything outside."""
        path = self.run_path(ref)
        if not path.is_dir():
            raise UserError(f"no run called {ref!r} in the workspace")
        return path

    def run_path(self, ref: str) -> Path:
        """Where the run ``subject/run`` is (or would be); refuses anything outside the workspace."""
        parts = str(ref or "").strip("/").split("/")
        if len(parts) != 2 or not parts[1]:
            raise UserError("choose a run first")
        subject, run = sanitize_name(parts[0], "subject name"), parts[1]
        if run in (".", "..") or "\\" in run or run.startswith("."):
            raise UserError(f"no run called {ref!r}")
        return self.root / subject / "runs" / run

    def rename_run(self, run: Path, name: str) -> Path:
        """``runs/001-old`` → ``runs/001-<name>``: the number (the order of runs) is kept."""
        number = re.match(r"(\d+)-", run.name)
        stem = sanitize_name(re.sub(r"^\d+-", "", str(name or "").strip()), "run name")
        target = run.parent / (f"{number.group(1)}-{stem}" if number else stem)
        if target == run:
            return run
        if target.exists():
            raise UserError(f"{run.parent.parent.name} already has a run called {target.name}; choose another name")
        run.rename(target)
        return target

    def delete_run(self, run: Path) -> None:
        """Remove a run folder: first renamed to a hidden name (so it is never listed half-deleted)."""
        hidden = run.with_name(f".deleted-{run.name}-{time.time_ns()}")
        run.rename(hidden)
        shutil.rmtree(hidden)

    def ref(self, run: Path) -> str:
        """``subject/run``: how the app names a run folder."""
        run = Path(run).resolve()
        return f"{run.parent.parent.name}/{run.name}"

    def class_images(self, name: str, class_noun: str, model: str) -> Path:
        """``class-images/<class noun>/<model>/``: prior images are reused by runs of the same base
        model and class (the folder name is readable and unique per model)."""
        stem = sanitize_name(Path(model).name or model, "model")[:24] if _has_word(model) else "model"
        tag = f"{stem}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"
        return self.subject(name).folder / "class-images" / sanitize_name(class_noun, "class noun") / tag


def _last_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for sub in ("images", "runs"):
        if (folder / sub).is_dir():
            times.append((folder / sub).stat().st_mtime)
    return max(times)


def _has_word(stem: str) -> bool:
    return bool(re.search(r"[A-Za-z0-9]", unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()))


def _unique(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    k = 2
    while path.exists():
        path = folder / f"{stem}-{k}{suffix}"
        k += 1
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _thumbnail(image) -> bytes:
    """16×16 RGB pixels: the same photo re-saved, resized or lightly edited gives nearly the same."""
    from PIL import Image

    return image.convert("RGB").resize((16, 16), Image.Resampling.BOX).tobytes()


def _thumb_distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two thumbnails, 0–255."""
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)

