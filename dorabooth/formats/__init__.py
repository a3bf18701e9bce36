"""Adapter and checkpoint files dorabooth reads and writes (DESIGN §7).

``diffusers_lora``: ``pytorch_lora_weights.safetensors`` in the diffusers/PEFT layout that
stock ``pipe.load_lora_weights()`` loads.
"""

from .diffusers_lora import WEIGHT_NAME, AdapterFile, ComponentAdapter, read_adapter, write_adapter

__all__ = ["WEIGHT_NAME", "AdapterFile", "ComponentAdapter", "read_adapter", "write_adapter"]
