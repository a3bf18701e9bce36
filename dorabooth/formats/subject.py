"""What an adapter was trained on, written into every adapter file so that a downloaded file
explains itself: its trigger word, instance prompt and class.

Header entries (:meth:`Subject.metadata`, in every adapter file we write)::

    dorabooth.token / .class_noun / .instance_prompt / .class_prompt / .images
    modelspec.trigger_phrase   "sks dog"          SAI model spec: the phrase to put in prompts
    modelspec.usage_hint       one line: what to write in the prompt
    ss_tag_frequency           {"1_sks dog": {"a photo of sks dog": 5}}   kohya: caption per dataset dir
    ss_dataset_dirs            {"1_sks dog": {"n_repeats": 1, "img_count": 5}}

The two ``ss_*`` entries use kohya's DreamBooth naming (a dataset folder ``<repeats>_<token>
<class>``, each image captioned with the instance prompt): what A1111's Lora card, Civitai and
trigger-word extensions read the training words from. Tools that read ``modelspec.trigger_phrase``
split it on commas, so it holds one phrase. Title, description and the A1111 alias
(``ss_output_name``) are composed by the writers from :meth:`Subject.title` and :meth:`Subject.slug`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

METHOD_WORDS = {"dora": "DoRA", "lora": "LoRA", "dvora": "DVoRA", "mixed": "DoRA/LoRA", "full": "full fine-tune"}


@dataclass(frozen=True)
class Subject:
    token: str
    class_noun: str
    instance_prompt: str
    class_prompt: str = ""
    images: int | None = None                  # subject photos trained on, when known

    @property
    def trigger(self) -> str:
        """What to write in a prompt to bring the subject out: ``"sks dog"``."""
        return f"{self.token} {self.class_noun}".strip()

    def title(self, method: str) -> str:
        """``"sks dog (DoRA)"``."""
        return f"{self.trigger} ({METHOD_WORDS.get(method, method)})"

    def slug(self, method: str) -> str:
        """A file-name-safe name: ``"sks-dog_dora"``."""
        return f"{slugify(self.trigger)}_{slugify(method)}"

    def usage_hint(self) -> str:
        return (f'Write "{self.trigger}" in the prompt (trained as "{self.instance_prompt}"); '
                f'leave it out for an ordinary {self.class_noun or "image"}.')

    def metadata(self) -> dict[str, str]:
        """The header entries above (strings, as safetensors headers hold them)."""
        folder = f"1_{self.trigger}"
        count = self.images or 1
        meta = {
            "dorabooth.token": self.token,
            "dorabooth.class_noun": self.class_noun,
            "dorabooth.instance_prompt": self.instance_prompt,
            "modelspec.trigger_phrase": self.trigger,
            "modelspec.usage_hint": self.usage_hint(),
            "ss_tag_frequency": json.dumps({folder: {self.instance_prompt: count}}),
            "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": count}}),
        }
        if self.class_prompt:
            meta["dorabooth.class_prompt"] = self.class_prompt
        if self.images is not None:
            meta["dorabooth.images"] = str(self.images)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Subject | None:
        """Ours from ``dorabooth.*``; another trainer's from ``modelspec.trigger_phrase`` alone; else None."""
        token = meta.get("dorabooth.token")
        if token:
            images = meta.get("dorabooth.images")
            return cls(token, meta.get("dorabooth.class_noun", ""), meta.get("dorabooth.instance_prompt", token),
                       meta.get("dorabooth.class_prompt", ""), int(images) if images and images.isdigit() else None)
        trigger = (meta.get("modelspec.trigger_phrase") or "").strip()
        if trigger:
            token, _, noun = trigger.partition(" ")
            return cls(token, noun, trigger)
        return None


AXIS_WORDS = {"out": "one magnitude per output feature (as diffusers/PEFT store it)",
              "in": "one magnitude per input feature (applied exactly by ComfyUI, A1111 and Forge)"}


def description(subject: Subject | None, method: str, axis: str | None, base_model: str | None) -> str:
    """``modelspec.description`` in words: what the adapter is of, on which base, how to prompt it."""
    kind = f"{METHOD_WORDS.get(method, method)} adapter" + (f" for {base_model}" if base_model else "")
    how = f" {METHOD_WORDS.get(method, method)} with {AXIS_WORDS[axis]}." if axis in AXIS_WORDS else ""
    if subject is None:
        return f"{kind}, made with dorabooth.{how}"
    trained = f" from {subject.images} photos" if subject.images else ""
    return (f'DreamBooth {kind}: "{subject.trigger}" is a {subject.class_noun}, learned{trained} as '
            f'"{subject.instance_prompt}". Write "{subject.trigger}" in the prompt.{how} Made with dorabooth.')


def slugify(text: str) -> str:
    """Lower-case letters, digits and ``-`` only: ``"sks Dog!"`` → ``"sks-dog"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "adapter"


def file_stem(subject: Subject | None, method: str, fmt: str, dtype: str | None = None) -> str:
    """A distinct, descriptive download name: ``sks-dog_dora_kohya_fp16``."""
    head = subject.slug(method) if subject is not None else f"adapter_{slugify(method)}"
    return "_".join([head, slugify(fmt), *([slugify(dtype)] if dtype else [])])
