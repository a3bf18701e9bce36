"""dorabooth: DreamBooth with DoRA for Stable Diffusion and SDXL.

The package face: re-exports only (the code lives in the modules named below; none of them
imports this file). On diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``::

    import dorabooth
    names = dorabooth.attach(pipe, rank=16, text_encoders=True)   # DoRA on attention + text encoders
    ...train...
    dorabooth.save_adapter(pipe, "out/")        # out/pytorch_lora_weights.safetensors
    dorabooth.load_adapter(pipe2, "out/")       # or stock: pipe2.load_lora_weights("out/")
    dorabooth.set_strength(pipe2, 0.7); dorabooth.merge(pipe2); dorabooth.detach(pipe2)

``dorabooth.train(config)``, ``dorabooth.generate(...)`` / ``dorabooth.Session`` and
``dorabooth.export(...)`` are the functions; their modules stay importable by path
(``from dorabooth.export import convert``). Each name is imported on first use
(``lazyface``), so ``import dorabooth`` and ``dorabooth --help`` load no torch.
"""

from . import lazyface
from .version import __version__

__all__ = ["__version__", "attach", "detach", "set_strength", "merge", "unmerge", "save_adapter", "load_adapter",
           "train", "generate", "TrainConfig", "Session", "export"]

lazyface.install(__name__, {      # public name → the module that defines it
    "attach": "adapters", "detach": "adapters", "set_strength": "adapters", "merge": "adapters",
    "unmerge": "adapters", "save_adapter": "adapters", "load_adapter": "adapters", "train": "train",
    "generate": "generate", "Session": "generate", "TrainConfig": "config", "export": "export",
})
