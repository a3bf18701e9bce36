"""A full fine-tune's weights switched on a loaded pipeline, at a strength.

A ``--method full`` run leaves whole components (``unet/`` and, when they trained, the text
encoders beside it). :class:`FineTunedWeights` reads them next to the pipeline's own weights
and writes ``W0 + t·(W − W0)`` into the pipeline: ``t = 0`` puts back the base weights
exactly and ``t = 1`` the fine-tuned ones exactly (copies; other strengths blend in fp32).
Generation uses it; the merged-checkpoint export uses :class:`FineTunedSource`, the same
blend one tensor at a time from the files (nothing loaded whole), so the two agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import rundir as rd
from .formats.files import SafetensorsReader, read_safetensors
from .formats.layout import text_module
from .inject import TEXT_ENCODER_COMPONENTS, module_name


class FineTunedWeights:
    """(W0, W) of every fine-tuned tensor of ``pipe``, read from ``folder`` (a UNet folder, or a
    run's ``unet/`` whose fine-tuned ``text_encoder*/`` siblings come along)."""

    def __init__(self, pipe, folder: str | Path):
        self.pipe = pipe
        self.weights = {name: self._read(name, path) for name, path in fine_tuned_parts(pipe, folder).items()}

    @property
    def components(self) -> list[str]:
        """The pipeline components the fine-tune replaces (``unet``, ``text_encoder``…)."""
        return sorted(self.weights)

    @torch.no_grad()
    def apply(self, t: float) -> None:
        """Write W0 + t·(W − W0) into the pipeline's weights."""
        for component, (w0, w1) in self.weights.items():
            for name, p in getattr(self.pipe, component).named_parameters():
                if name not in w1:
                    continue
                if t in (0.0, 1.0):
                    p.copy_((w0 if t == 0.0 else w1)[name])
                else:
                    p.copy_(w0[name].float() + t * (w1[name].float() - w0[name].float()))

    def _read(self, name: str, folder: Path) -> tuple[dict, dict]:
        model = getattr(self.pipe, name)
        current = dict(model.named_parameters())
        trained = {_model_key(model, name, k): v for f in _files(name, folder)
                   for k, v in read_safetensors(f, f"fine-tuned {name}")[0].items()}
        _check_fits(folder, name, {k: tuple(v.shape) for k, v in trained.items()},
                    {k: tuple(v.shape) for k, v in current.items()})
        base = {k: current[k].detach().clone() for k in trained}
        tuned = {k: v.to(current[k].device, current[k].dtype) for k, v in trained.items()}
        return base, tuned


class FineTunedSource:
    """A weight source (``names``/``dtype``/``shape``/``read``, as :mod:`dorabooth.weights`):
    ``base`` (a source) with the full fine-tune in ``folder`` at strength ``t``, each tensor
    W0 + t·(W − W0) read from the files when asked, in the dtype the base stores it in."""

    def __init__(self, pipe, base, folder: str | Path, t: float):
        self.base, self.t = base, float(t)
        self.components = base.components
        self.tuned: dict[tuple[str, str], tuple[SafetensorsReader, str]] = {}
        for name, path in fine_tuned_parts(pipe, folder).items():
            model = getattr(pipe, name)
            found = {}
            for f in _files(name, path):
                reader = SafetensorsReader(f, f"fine-tuned {name}")
                found.update({_model_key(model, name, k): (reader, k) for k in reader})
            _check_fits(path, name, {k: r.shape(key) for k, (r, key) in found.items()},
                        {k: base.shape(name, k) for k in base.names(name)})
            self.tuned.update({(name, k): v for k, v in found.items()})

    @property
    def fine_tuned(self) -> list[str]:
        """The components the fine-tune replaces (``unet``, ``text_encoder``…)."""
        return sorted({c for c, _ in self.tuned})

    def names(self, component: str) -> list[str]:
        return self.base.names(component)

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        return self.base.shape(component, name)

    def dtype(self, component: str, name: str):
        return self.base.dtype(component, name)

    @torch.no_grad()
    def read(self, component: str, name: str) -> torch.Tensor:
        w0 = self.base.read(component, name)
        if (component, name) not in self.tuned or self.t == 0.0:
            return w0
        reader, key = self.tuned[(component, name)]
        w1 = reader[key]
        if self.t == 1.0:
            return w1.to(w0.dtype)
        return (w0.float() + self.t * (w1.float() - w0.float())).to(w0.dtype)

    def close(self) -> None:
        """Close the fine-tune's files (the base source is its owner's to close)."""
        for reader, _ in self.tuned.values():
            reader.close()


def fine_tuned_parts(pipe, folder: str | Path) -> dict[str, Path]:
    """``{component: folder}`` of a full fine-tune: ``folder`` is the UNet; a run's ``unet/``
    brings the fine-tuned ``text_encoder*/`` beside it (those the pipeline has)."""
    folder = Path(folder)
    parts = {"unet": folder}
    if folder.name == rd.FULL_UNET and rd.is_run(folder.parent):
        parts.update({d.name: d for d in sorted(folder.parent.glob("text_encoder*"))
                      if d.is_dir() and getattr(pipe, d.name, None) is not None})
    return parts


def _files(name: str, folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (the fine-tuned {name} of a full fine-tune)")
    return files


def _model_key(model, name: str, key: str) -> str:
    """A fine-tuned file's key in the model's own naming (text encoders with or without ``text_model.``)."""
    return module_name(model, name, text_module(key)) if name in TEXT_ENCODER_COMPONENTS else key


def _check_fits(folder: Path, name: str, trained: dict[str, tuple], current: dict[str, tuple]) -> None:
    unknown = sorted(set(trained) - set(current))
    wrong = [k for k in trained if k in current and tuple(trained[k]) != tuple(current[k])]
    if unknown or wrong:
        raise ValueError(f"{folder}: the fine-tuned {name} does not fit this base model "
                         f"({len(unknown)} unknown and {len(wrong)} mis-shaped weights, e.g. "
                         f"{(unknown + wrong)[:2]}); use the base model it was trained from")
