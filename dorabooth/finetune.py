"""A full fine-tune's weights switched on a loaded pipeline, at a strength.

A ``--method full`` run leaves whole components (``unet/`` and, when they trained, the text
encoders beside it). :class:`FineTunedWeights` reads them next to the pipeline's own weights
and writes ``W0 + t·(W − W0)`` into the pipeline: ``t = 0`` puts back the base weights
exactly and ``t = 1`` the fine-tuned ones exactly (copies; other strengths blend in fp32).
Generation and the merged-checkpoint export both use it, so the two agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import rundir as rd
from .formats.files import read_safetensors
from .formats.layout import text_module
from .inject import TEXT_ENCODER_COMPONENTS, module_name


class FineTunedWeights:
    """(W0, W) of every fine-tuned tensor of ``pipe``, read from ``folder`` (a UNet folder, or a
    run's ``unet/`` whose fine-tuned ``text_encoder*/`` siblings come along)."""

    def __init__(self, pipe, folder: str | Path):
        self.pipe = pipe
        folder = Path(folder)
        parts = {"unet": folder}
        if folder.name == rd.FULL_UNET and rd.is_run(folder.parent):
            parts.update({d.name: d for d in sorted(folder.parent.glob("text_encoder*"))
                          if d.is_dir() and getattr(pipe, d.name, None) is not None})
        self.weights = {name: self._read(name, path) for name, path in parts.items()}

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
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no .safetensors weights (the fine-tuned {name} of a full fine-tune)")
        model = getattr(self.pipe, name)
        current = dict(model.named_parameters())
        trained = {k: v for f in files for k, v in read_safetensors(f, f"fine-tuned {name}")[0].items()}
        if name in TEXT_ENCODER_COMPONENTS:            # files and models with or without text_model.
            trained = {module_name(model, name, text_module(k)): v for k, v in trained.items()}
        unknown = sorted(set(trained) - set(current))
        wrong = [k for k in trained if k in current and trained[k].shape != current[k].shape]
        if unknown or wrong:
            raise ValueError(f"{folder}: the fine-tuned {name} does not fit this base model "
                             f"({len(unknown)} unknown and {len(wrong)} mis-shaped weights, e.g. "
                             f"{(unknown + wrong)[:2]}); use the base model it was trained from")
        base = {k: current[k].detach().clone() for k in trained}
        tuned = {k: v.to(current[k].device, current[k].dtype) for k, v in trained.items()}
        return base, tuned
