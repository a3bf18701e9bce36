"""Is the toy base personalizable? A quick DreamBooth-DoRA fine-tune with plain peft.

`check(pipe, subject_dir)` fine-tunes DoRA (rank 8, UNet attention to_q/to_k/to_v/
to_out.0, text encoders frozen) on a sample subject with prior preservation (class images
drawn by the base), using the base's own objective, and reads samples before and after:
- `subject`: instance-prompt samples that read as the subject (shape, pattern, colours);
- `class_shape`: class-prompt samples that still draw the class noun's shape;
- `class_leak`: class-prompt samples that read as the subject;
- `described`: (before only) samples of the spelled-out description that read as it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import models, reader
from .recipe import TIME_IDS, diffusion_inputs, encode_prompts, min_snr_weight
from .scoring import generate


def is_subject(image, combo: dict) -> bool:
    r = reader.read(image)
    return (r["shape"] == combo["shape"] and r["pattern"] == combo["pattern"]
            and r["colours"] == (combo["colour"], combo["colour2"]))


def rates(pipe, info: dict, n: int, seed: int, described: bool = False) -> dict:
    combo = info["combination"]
    inst = generate(pipe, [info["instance_prompt"]] * n, seed)
    cls = generate(pipe, [info["class_prompt"]] * n, seed + 1)
    out = {"subject": np.mean([is_subject(im, combo) for im in inst]),
           "class_shape": np.mean([reader.read(im)["shape"] == combo["shape"] for im in cls]),
           "class_leak": np.mean([is_subject(im, combo) for im in cls])}
    if described:
        desc = generate(pipe, [info["description"]] * n, seed + 2)
        out["described"] = np.mean([is_subject(im, combo) for im in desc])
    return {k: round(float(v), 3) for k, v in out.items()}


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    size = pipe.default_sample_size * pipe.vae_scale_factor
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BOX))
                                      .copy()) for im in images])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def embed(pipe, prompt: str, n: int):
    ctx, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    return ctx.expand(n, -1, -1), pooled.expand(n, -1)


def train_token_rows(pipe, token: str) -> list:
    """Make only `token`'s embedding row trainable in both text encoders."""
    token_id = pipe.tokenizer.convert_tokens_to_ids(token + "</w>")
    rows = []
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.requires_grad_(False)
        weight = te.get_input_embeddings().weight
        weight.requires_grad_(True)
        mask = torch.zeros_like(weight)
        mask[token_id] = 1
        weight.register_hook(lambda grad, mask=mask: grad * mask)
        rows.append(weight)
    return rows


def check(pipe, subject_dir, steps: int = 400, lr: float = 3e-4, rank: int = 8,
          n_class: int = 32, batch: int = 4, n_samples: int = 32, seed: int = 0,
          prior_weight: float = 1.0, token_lr: float | None = None, on_event=None) -> dict:
    from peft import LoraConfig

    subject_dir = Path(subject_dir)
    info = json.loads((subject_dir / "subject.json").read_text())
    pipe.set_progress_bar_config(disable=True)
    before = rates(pipe, info, n_samples, seed, described=True)
    inst = encode_images(pipe, [Image.open(subject_dir / f) for f in info["images"]])
    cls = encode_images(pipe, generate(pipe, [info["class_prompt"]] * n_class, seed + 99))
    cls_ctx, cls_pooled = embed(pipe, info["class_prompt"], batch)
    inst_ids = pipe.tokenizer(info["instance_prompt"], padding="max_length", truncation=True,
                              max_length=pipe.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
    token_params = train_token_rows(pipe, info["token"]) if token_lr else []

    def instance_embeds():
        with torch.set_grad_enabled(bool(token_params)):
            return encode_prompts(pipe.text_encoder, pipe.text_encoder_2, inst_ids)

    fixed = None if token_params else instance_embeds()      # re-encoded per step only while its row trains
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(2 * batch, 1)

    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, use_dora=True, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": params}]
    if token_params:  # the identifier's embedding row, in both text encoders
        groups.append({"params": token_params, "lr": token_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr, weight_decay=1e-2)
    alphas_cumprod = models.make_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    unet.train()
    for step in range(steps):
        z = torch.cat([inst[torch.randint(len(inst), (batch,), generator=g)],
                       cls[torch.randint(len(cls), (batch,), generator=g)]])
        inst_ctx, inst_pooled = fixed or instance_embeds()
        ctx = torch.cat([inst_ctx.expand(batch, -1, -1), cls_ctx])
        pooled = torch.cat([inst_pooled.expand(batch, -1), cls_pooled])
        noisy, t, v, a_t = diffusion_inputs(z, alphas_cumprod, g)
        pred = unet(noisy, t, ctx, added_cond_kwargs={"text_embeds": pooled,
                                                      "time_ids": time_ids}).sample
        per = F.mse_loss(pred, v, reduction="none").mean(dim=(1, 2, 3)) \
            * min_snr_weight(a_t, 5.0)
        loss = per[:batch].mean() + prior_weight * per[batch:].mean()  # prior preservation
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_event is not None and (step + 1) % 50 == 0:
            on_event({"stage": "dreambooth", "step": step + 1, "loss": round(loss.item(), 4)})
    unet.eval()
    train_s = time.time() - start
    after = rates(pipe, info, n_samples, seed + 1000)
    return {"subject": info["name"], "steps": steps, "lr": lr, "rank": rank, "token_lr": token_lr,
            "train_s": round(train_s, 1), "before": before, "after": after}
