"""Run ComfyUI's own model detection and LoRA key maps on dorabooth's files (not a test module).

Usage: ``python tests/compat/comfyui_keys.py DIR`` with a ComfyUI checkout on ``sys.path``
(``PYTHONPATH=$DORABOOTH_COMFYUI``) and a Python that can import it. ``DIR/models.json`` says,
per model, its family, the key shapes of its single file and a kohya file to load;
``DIR/result.json`` receives what ComfyUI did. tests/test_interop_fullsize.py writes the input
and checks the output when ``DORABOOTH_COMFYUI`` is set. Nothing here reimplements ComfyUI:
every answer comes from its functions (comfy/model_detection.py, comfy/lora.py, comfy/sd.py's
``load_lora_for_models`` steps), on meta tensors: no weights are allocated.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch


def _comfy():
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.supported_models_base

    return comfy


def run(spec: dict, folder: Path) -> dict:
    comfy = _comfy()
    prefix = "model.diffusion_model."
    # meta tensors, but 1-D ones real zeros (as the fixtures' biases): SD20.model_type reads a norm bias
    sd = {k: torch.zeros(s) if len(s) <= 1 else torch.empty(s, device="meta") for k, s in spec["shapes"].items()}
    model_config = comfy.model_detection.model_config_from_unet(sd, prefix)
    found = type(model_config).__name__ if model_config is not None else None
    if model_config is None:           # no supported model: name the keys as ComfyUI's BASE config would
        model_config = comfy.supported_models_base.BASE(comfy.model_detection.detect_unet_config(sd, prefix))
    model = model_config.get_model(sd, prefix, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    clip_missing = None
    target = model_config.clip_target(state_dict=sd) if found else None
    if target is not None:
        clip = target.clip(device="meta", dtype=torch.float16)
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        clip_state = clip.state_dict()
        shapes.update({k: list(v.shape) for k, v in clip_state.items()})
        clip_sd = model_config.process_clip_state_dict(dict(sd))       # what CLIP.load_sd gets
        clip_missing = sorted(k for k in clip_state if k not in clip_sd and not k.endswith(".logit_scale"))
    from safetensors.torch import load_file

    lora = comfy.lora_convert.convert_lora(load_file(str(folder / spec["file"])))
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    patched = {x: key_map[x] for x in key_map if f"{x}.lora_up.weight" in lora and key_map[x] in patches}
    return {"class": found, "unet_config": {k: v for k, v in model_config.unet_config.items()
                                            if isinstance(v, (int, list, type(None), bool, str))},
            "patched": patched, "shapes": {k: shapes.get(k) for k in set(patched.values())},
            "not_loaded": [m.split(": ", 1)[1] for m in messages if m.startswith("lora key not loaded")],
            "clip_missing": clip_missing}


def main() -> None:
    folder = Path(sys.argv[1])
    models = json.loads((folder / "models.json").read_text())
    result = {name: run(spec, folder) for name, spec in models.items()}
    (folder / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
