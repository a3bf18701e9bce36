"""DoRA layer cost: dorabooth against PEFT, as time and peak-memory ratios to PEFT LoRA.

    python bench/dora_layer.py [--reps 7] [--only linear|conv|unet] [--json OUT]

Runs on one thread, every variant in this process, interleaved round-robin so machine noise
hits all alike; prints medians and ratios. Time is this process's CPU time
(``time.process_time``): with one thread it is the compute time, and it does not count the
time spent waiting for a core on a shared machine. Variants: PEFT LoRA (the reference), PEFT DoRA,
dorabooth LoRA, dorabooth DoRA with magnitude axis out and in.
Cases: (a) Linear(1280, 1280) on x : (2, 1024, 1280); (a') Conv2d(320, 320, 3×3, padding 1) on
x : (2, 320, 32, 32) (an SDXL ResNet conv; LoCon: A a 3×3 conv to r channels, B 1×1); (b) a reduced SDXL-like UNet
(block_out_channels 128/256/512, transformer_layers_per_block 1/2/2, cross_attention_dim
1024, text_time conditions, 32×32 latents, batch 2), r = 16 on to_q/to_k/to_v/to_out.0.
Measured: a training step (forward, backward, AdamW step), and eval forward un-merged
against merged. Peak memory = the most live tensor bytes during one step, from torch's
memory profiler (CPU has no allocator high-water mark).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dorabooth.dora import adapter_layer, dora_layers  # noqa: E402

RANK = 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ---- the variants ---------------------------------------------------------------------

def wrap_dorabooth(model, names, use_dora, axis="out"):
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, adapter_layer(getattr(parent, child), RANK, RANK,
                                             use_dora=use_dora, magnitude_axis=axis))
    return model


def wrap_peft(model, names, use_dora):
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(names), use_dora=use_dora,
                     init_lora_weights=True)
    return inject_adapter_in_model(cfg, model)


def perturb_and_freeze(model):
    """Non-zero B (as after some training) and only adapter parameters trainable."""
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    return model


def make_variants(base, target_names):
    variants = {
        "peft-lora": wrap_peft(copy.deepcopy(base), target_names, False),
        "peft-dora": wrap_peft(copy.deepcopy(base), target_names, True),
        "db-lora": wrap_dorabooth(copy.deepcopy(base), target_names, False),
        "db-dora-out": wrap_dorabooth(copy.deepcopy(base), target_names, True, "out"),
        "db-dora-in": wrap_dorabooth(copy.deepcopy(base), target_names, True, "in"),
    }
    return {k: perturb_and_freeze(m) for k, m in variants.items()}


# ---- cases ----------------------------------------------------------------------------

class LinearCase:
    name = "Linear(1280, 1280), x (2, 1024, 1280) requiring grad"

    def __init__(self):
        torch.manual_seed(0)
        self.base = nn.Sequential(nn.Linear(1280, 1280))
        self.targets = ["0"]
        self.x = torch.randn(2, 1024, 1280, requires_grad=True)   # an inner layer: upstream trains
        self.target = torch.randn(2, 1024, 1280)

    def forward(self, model):
        return model(self.x)

    def loss(self, model):
        return (self.forward(model) - self.target).square().mean()


class ConvCase:
    name = "Conv2d(320, 320, 3x3, padding 1), x (2, 320, 32, 32) requiring grad"

    def __init__(self):
        torch.manual_seed(0)
        self.base = nn.Sequential(nn.Conv2d(320, 320, 3, padding=1))
        self.targets = ["0"]
        self.x = torch.randn(2, 320, 32, 32, requires_grad=True)
        self.target = torch.randn(2, 320, 32, 32)

    def forward(self, model):
        return model(self.x)

    def loss(self, model):
        return (self.forward(model) - self.target).square().mean()


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(128, 256, 512), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=1024, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )


class UNetCase:
    name = "reduced SDXL UNet 128/256/512, 32x32 latents, batch 2"

    def __init__(self):
        torch.manual_seed(0)
        self.base = tiny_sdxl_unet()
        self.targets = [n for n, m in self.base.named_modules()
                        if isinstance(m, nn.Linear) and n.endswith(TARGETS) and ".attn" in n]
        self.inputs = dict(
            sample=torch.randn(2, 4, 32, 32), timestep=torch.tensor([500, 250]),
            encoder_hidden_states=torch.randn(2, 77, 1024),
            added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                               "time_ids": torch.tensor([[256., 256, 0, 0, 256, 256]] * 2)},
        )
        self.target = torch.randn(2, 4, 32, 32)

    def forward(self, model):
        return model(**self.inputs).sample

    def loss(self, model):
        return (self.forward(model) - self.target).square().mean()


# ---- measurement ----------------------------------------------------------------------

def train_step_fn(case, model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        case.loss(model).backward()
        opt.step()
    return step


def eval_fn(case, model):
    def run():
        with torch.no_grad():
            case.forward(model)
    return run


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Per variant: its median time, and per reference its median per-round time ratio.

    Every round runs all variants back to back, so a ratio taken within one round cancels
    the slow drifts of a shared machine; the median over rounds drops the spikes.
    """
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {ref: {k: statistics.median(a / b for a, b in zip(times[k], times[ref])) for k in fns}
             for ref in fns}
    return {"median_s": med, "ratio": ratio}


def peak_bytes(fn) -> tuple[int, int]:
    """(peak, added): the most live tensor bytes during one call, and that peak minus the
    tensors alive before the call (weights, optimizer state), from the profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    cur = peak = resident = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.PREEXISTING:
            resident += size
        if action in (Action.PREEXISTING, Action.CREATE):
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak, peak - resident


def bench_case(case, reps):
    variants = make_variants(case.base, case.targets)
    n_layers = len(dora_layers(variants["db-dora-out"]))
    steps = {k: train_step_fn(case, m) for k, m in variants.items()}
    for f in steps.values():                   # settle optimizer state before measuring memory
        f()
    t_train = interleaved(steps, reps)
    mem = {k: peak_bytes(f) for k, f in steps.items()}

    for m in variants.values():
        m.eval()
    evals = {f"{k} unmerged": eval_fn(case, m) for k, m in variants.items()}
    merged = copy.deepcopy(variants["db-dora-out"])
    for _, layer in dora_layers(merged):
        layer.merge()
    evals["db-dora-out merged"] = eval_fn(case, merged)
    merged_in = copy.deepcopy(variants["db-dora-in"])
    for _, layer in dora_layers(merged_in):
        layer.merge()
    evals["db-dora-in merged"] = eval_fn(case, merged_in)
    t_eval = interleaved(evals, reps)
    return {"case": case.name, "adapted_layers": n_layers, "train_s": t_train,
            "train_peak_bytes": mem, "eval_s": t_eval}


def report(r):
    tr, mem = r["train_s"], {k: v[0] for k, v in r["train_peak_bytes"].items()}
    added = {k: v[1] for k, v in r["train_peak_bytes"].items()}
    ref_m, ref_a = mem["peft-lora"], added["peft-lora"]
    print(f"\n## {r['case']} ({r['adapted_layers']} adapted layers, r={RANK})")
    print("| variant | train step (median) | time × PEFT LoRA | time × PEFT DoRA | peak MiB | peak × PEFT LoRA "
          "| step-added MiB | added × PEFT LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    for k, t in tr["median_s"].items():
        print(f"| {k} | {t * 1e3:.1f} ms | {tr['ratio']['peft-lora'][k]:.3f} | {tr['ratio']['peft-dora'][k]:.3f} "
              f"| {mem[k] / 2**20:.1f} | {mem[k] / ref_m:.3f} | {added[k] / 2**20:.1f} | {added[k] / ref_a:.3f} |")
    ev = r["eval_s"]
    print("\n| eval forward (no grad) | median | × dorabooth merged, same axis |")
    print("|---|---|---|")
    for k, t in ev["median_s"].items():
        axis = "in" if "-in" in k else "out"
        print(f"| {k} | {t * 1e3:.1f} ms | {ev['ratio'][f'db-dora-{axis} merged'][k]:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", choices=["linear", "conv", "unet"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import peft
    print(f"torch {torch.__version__}, peft {peft.__version__}, 1 thread, {args.reps} interleaved rounds, "
          "CPU time, medians of per-round ratios")
    cases = {"linear": LinearCase, "conv": ConvCase, "unet": UNetCase}
    results = []
    for key, cls in cases.items():
        if args.only and args.only != key:
            continue
        results.append(bench_case(cls(), args.reps))
        report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
