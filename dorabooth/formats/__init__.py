"""Adapter and checkpoint files dorabooth reads and writes (DESIGN §7), around one in-memory
adapter model, :class:`~.neutral.Adapter`.

``neutral``: the model; ``adapter_files``: any adapter file in, diffusers-lora / kohya out;
``diffusers_lora``: ``pytorch_lora_weights.safetensors`` in the diffusers/PEFT layout that
stock ``pipe.load_lora_weights()`` loads; ``kohya``: kohya/LyCORIS/OneTrainer files;
``single_file`` and ``layout``: original-layout checkpoints; ``consumers``: what other tools
make of a file; ``files``: every read and write.
"""

from .diffusers_lora import WEIGHT_NAME, read_adapter, write_adapter
from .neutral import Adapter, ModuleAdapter

__all__ = ["WEIGHT_NAME", "Adapter", "ModuleAdapter", "read_adapter", "write_adapter"]
