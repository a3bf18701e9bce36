"""SD 1.5, SD 2.1 (768, v-prediction) and SDXL base at full size, with random fp16 weights.

A fixture for shapes, memory and speed (never for image quality): each family's published
configs (below, as on the hub: ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-2-1``, ``stabilityai/stable-diffusion-xl-base-1.0``; version
stamps left out), the real CLIP tokenizer (:mod:`.clip_bpe`), written as

    <root>/<name>/diffusers/           save_pretrained layout, fp16 safetensors, model_index.json
    <root>/<name>/<name>.safetensors   original single-file layout (our exporter's key map)
    <root>/<name>/BUILT.json           written last: what was built, sizes, seconds, peak RSS

``<root>`` is ``$DORABOOTH_FIXTURES`` or ``~/.cache/dorabooth/fullsize``; a built family is
skipped. Every component is created on the meta device (parameters only: buffers such as
CLIP's ``position_ids`` stay real), cast to fp16 there, and each parameter is then filled in
fp16 from a seeded generator: N(0, 0.02²) for matrices, convolutions and embeddings, ones
for norm weights, zeros for biases; no fp32 copy of a model ever exists. The SD pipelines
are written without the safety checker and feature extractor (``[null, null]``, as
``stabilityai/stable-diffusion-2-1`` publishes them; dorabooth never loads one).

    python -m dorabooth.testing.fullsize build sd15 sd21 sdxl [--out DIR]
    python -m dorabooth.testing.fullsize check sd15 [--out DIR]    # reload both files, compare
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
import zlib
from pathlib import Path

import torch

from . import clip_bpe

NAMES = ("sd15", "sd21", "sdxl")
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}    # dorabooth.families names
SEED = 0
INIT_STD = 0.02
MARKER = "BUILT.json"

# ---- the published configs ------------------------------------------------------------------
_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
}
_CLIP_TEXT = {   # as the SD repositories publish them (bos/eos/pad ids 0/2/1: transformers' legacy argmax pooling)
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "max_position_embeddings": 77, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
    "initializer_range": 0.02, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_L = {**_CLIP_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
          "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}
OPENCLIP_H = {**_CLIP_TEXT, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
              "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}     # 24 layers, last one dropped
OPENCLIP_BIGG = {**_CLIP_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                 "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                 "num_hidden_layers": 32, "projection_dim": 1280}
_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
EOS_PAD = {"model_max_length": 77, "pad_token": clip_bpe.EOS}   # openai/clip-vit-large-patch14's tokenizer
BANG_PAD = {"model_max_length": 77, "pad_token": "!"}           # SD 2.x / SDXL tokenizer_2: pad id 0
_NO_CHECKER = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

CONFIGS: dict[str, dict] = {
    "sd15": {
        "model_index": {"_class_name": "StableDiffusionPipeline", **_NO_CHECKER,
                        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                        "vae": ["diffusers", "AutoencoderKL"]},
        "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
                 "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                 "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "downsample_padding": 1,
                 "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
                 "sample_size": 64, "up_block_types": _SD_UP},
        "vae": {**_VAE, "sample_size": 512},
        "text_encoder": CLIP_L,
        "tokenizer": EOS_PAD,
        "scheduler": {"_class_name": "PNDMScheduler", **_SCALED_LINEAR},
    },
    "sd21": {
        "model_index": {"_class_name": "StableDiffusionPipeline", **_NO_CHECKER,
                        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                        "vae": ["diffusers", "AutoencoderKL"]},
        "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
                 "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                 "cross_attention_dim": 1024, "down_block_types": _SD_DOWN, "downsample_padding": 1,
                 "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                 "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
                 "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
                 "up_block_types": _SD_UP, "upcast_attention": True, "use_linear_projection": True},
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": OPENCLIP_H,
        "tokenizer": BANG_PAD,
        "scheduler": {"_class_name": "DDIMScheduler", **_SCALED_LINEAR, "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                        "add_watermarker": None, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                        "text_encoder": ["transformers", "CLIPTextModel"],
                        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
                 "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                 "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                 "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
                 "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
                 "cross_attention_norm": None,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
                 "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                 "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
                 "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
                 "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
                 "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
                 "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
                 "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
                 "time_embedding_type": "positional", "timestep_post_act": None,
                 "transformer_layers_per_block": [1, 2, 10],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "upcast_attention": None, "use_linear_projection": True},
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": CLIP_L,
        "text_encoder_2": OPENCLIP_BIGG,
        "tokenizer": EOS_PAD,
        "tokenizer_2": BANG_PAD,
        "scheduler": {"_class_name": "EulerDiscreteScheduler", **_SCALED_LINEAR, "interpolation_type": "linear",
                      "prediction_type": "epsilon", "sample_max_value": 1.0, "timestep_spacing": "leading",
                      "use_karras_sigmas": False},
    },
}
# Parameter counts of the published models (what the configs above must instantiate).
PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


def cache_root() -> Path:
    return Path(os.environ.get("DORABOOTH_FIXTURES") or Path.home() / ".cache" / "dorabooth" / "fullsize")


def weight_components(name: str) -> list[str]:
    """The nn.Module components of a family, in the order they are built."""
    return [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in CONFIGS[name]]


# ---- building ---------------------------------------------------------------------------------
def empty_component(name: str, component: str) -> torch.nn.Module:
    """The component with its parameters on the meta device (no memory) and its buffers real."""
    from accelerate import init_empty_weights

    config = CONFIGS[name][component]
    with init_empty_weights(include_buffers=False):
        if component.startswith("text_encoder"):
            import transformers

            cls = getattr(transformers, config["architectures"][0])
            return cls(transformers.CLIPTextConfig(**config))
        import diffusers

        cls = getattr(diffusers, config["_class_name"])
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@torch.no_grad()
def materialise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every meta parameter an fp16 CPU value from a seeded generator, one tensor at a time."""
    torch.nn.Module.to(module, torch.float16)   # meta parameters: only their dtype changes (buffers: cast)
    g = torch.Generator().manual_seed(seed)
    for pname, p in list(module.named_parameters()):
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = torch.empty(p.shape, dtype=torch.float16)
        if leaf == "bias":
            value.zero_()
        elif isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            value.fill_(1.0)
        elif p.ndim >= 2:                     # Linear (out, in), Conv (out, in, kh, kw), Embedding (n, d)
            value.normal_(0.0, INIT_STD, generator=g)
        else:
            raise ValueError(f"{pname} {tuple(p.shape)} of {type(owner).__name__}: no init rule for it")
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return module.eval()


def _seed(name: str, component: str) -> int:
    return SEED + zlib.crc32(f"{name}/{component}".encode())


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def is_built(name: str, root: str | os.PathLike | None = None) -> bool:
    return (Path(root or cache_root()) / name / MARKER).is_file()


def paths(name: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(diffusers folder, single file) of a fixture."""
    base = Path(root or cache_root()) / name
    return base / "diffusers", base / f"{name}.safetensors"


def build(name: str, out_dir: str | os.PathLike | None = None, *, on_progress=print) -> Path:
    """Build fixture ``name`` (sd15 | sd21 | sdxl) under ``out_dir`` (default :func:`cache_root`),
    unless it is already built; returns ``<out_dir>/<name>``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown fixture {name!r}; choose from {', '.join(NAMES)}")
    root = Path(out_dir or cache_root())
    base = root / name
    if is_built(name, root):
        on_progress(f"{name}: already built in {base} (delete the folder to rebuild)")
        return base
    if base.exists():
        on_progress(f"{name}: removing an unfinished build in {base}")
        shutil.rmtree(base)
    folder, single = paths(name, root)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    states, report = {}, {}
    for component in weight_components(name):
        t = time.perf_counter()
        module = materialise(empty_component(name, component), _seed(name, component))
        module.save_pretrained(str(folder / component))
        states[component] = module.state_dict()
        n = sum(p.numel() for p in module.parameters())
        del module
        report[component] = {"params": n, "seconds": round(time.perf_counter() - t, 1)}
        on_progress(f"{name} {component}: {n:,} params, {time.perf_counter() - t:.1f} s, peak RSS {_gb(peak_rss())}")
    _write_rest(name, folder, root)
    t = time.perf_counter()
    _write_single_file(name, states, single)
    del states
    on_progress(f"{name} single file: {_gb(_size(single))}, {time.perf_counter() - t:.1f} s, peak RSS {_gb(peak_rss())}")
    info = {"name": name, "family": FAMILY[name], "components": report, "seconds": round(time.perf_counter() - start, 1),
            "folder_bytes": _size(folder), "single_file_bytes": _size(single), "peak_rss_bytes": peak_rss(),
            "seed": SEED, "init_std": INIT_STD, "versions": _versions()}
    (base / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    on_progress(f"{name}: built in {info['seconds']:.0f} s; folder {_gb(info['folder_bytes'])}, single file "
                f"{_gb(info['single_file_bytes'])}, peak RSS {_gb(info['peak_rss_bytes'])} → {base}")
    return base


def _write_rest(name: str, folder: Path, root: Path) -> None:
    """Tokenizers, scheduler and model_index.json."""
    import diffusers

    config = CONFIGS[name]
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in config:
            clip_bpe.write_tokenizer(folder / tok, root, pad_token=config[tok]["pad_token"])
    scheduler = config["scheduler"]
    cls = getattr(diffusers, scheduler["_class_name"])
    cls.from_config({k: v for k, v in scheduler.items() if not k.startswith("_")}).save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": config["model_index"]["_class_name"], "_diffusers_version": diffusers.__version__,
             **config["model_index"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_single_file(name: str, states: dict, path: Path) -> None:
    """The original single-file layout through :class:`dorabooth.formats.single_file.Mapper`
    (the exporter's key map); every diffusers weight must read back from it unchanged."""
    from safetensors.torch import save_file

    from ..formats.single_file import Mapper, modelspec

    family = FAMILY[name]
    mapper = Mapper(family, CONFIGS[name]["unet"], CONFIGS[name]["vae"])
    original = mapper.to_original(states)
    for component, sd in states.items():
        for key, value in sd.items():
            if mapper.target(component, key) is not None and not torch.equal(mapper.read(original, component, key), value):
                raise AssertionError(f"{component}.{key} does not read back from the single-file layout")
    config = CONFIGS[name]
    meta = modelspec(family, f"dorabooth full-size fixture {name} (random weights)",
                     resolution=config["unet"]["sample_size"] * 2 ** (len(config["vae"]["block_out_channels"]) - 1),
                     prediction_type=config["scheduler"].get("prediction_type", "epsilon"))
    tmp = path.with_suffix(".tmp")
    save_file(original, str(tmp), metadata=meta)
    tmp.replace(path)


def _versions() -> dict:
    import diffusers
    import safetensors
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


# ---- checking ---------------------------------------------------------------------------------
LOADERS = ("load_pipeline", "diffusers")


@torch.no_grad()
def check(name: str, out_dir: str | os.PathLike | None = None, *, loader: str = "load_pipeline",
          on_progress=print) -> dict:
    """Load the single file in fp16, with the built folder as its config, through ``loader``
    (:func:`dorabooth.models.load_pipeline`, or stock ``from_single_file`` alone); compare every
    weight with the folder's files; run each component once on small inputs (:func:`_forward`).
    Raises on a missing or different weight or a non-finite activation."""
    from ..families import detect_family

    folder, single = paths(name, out_dir)
    if not is_built(name, out_dir):
        raise FileNotFoundError(f"{name} is not built under {folder.parent.parent}; run "
                                f"`python -m dorabooth.testing.fullsize build {name}` first")
    t = time.perf_counter()
    pipe = _load_single_file(name, single, folder, loader)
    load_s = time.perf_counter() - t
    on_progress(f"{name}: single file loaded by {loader} in {load_s:.1f} s ({type(pipe).__name__}), "
                f"peak RSS {_gb(peak_rss())}")
    compared = 0
    for component in weight_components(name):
        loaded = getattr(pipe, component).state_dict()
        seen = set()
        for file in sorted((folder / component).glob("*.safetensors")):
            for key, value in _read_tensors(file):
                if key not in loaded or not torch.equal(loaded[key], value):
                    raise AssertionError(f"{name} {component}.{key}: the single file's value "
                                         f"{'is missing' if key not in loaded else 'differs from the folder'}")
                seen.add(key)
        if seen != set(loaded):
            raise AssertionError(f"{name} {component}: not in the folder's files: {sorted(set(loaded) - seen)[:5]}")
        compared += len(seen)
    family = detect_family(pipe)
    outputs = _forward(name, pipe)
    on_progress(f"{name}: {compared:,} weights equal; family {family.name}, prediction {family.prediction_type}; "
                f"largest activation " + ", ".join(f"{k} {v:.3g}" for k, v in outputs.items())
                + f"; peak RSS {_gb(peak_rss())}")
    return {"loader": loader, "load_seconds": round(load_s, 1), "weights_compared": compared, "family": family.name,
            "prediction_type": family.prediction_type, "largest_activation": outputs, "peak_rss_bytes": peak_rss()}


def _load_single_file(name: str, single: Path, folder: Path, loader: str):
    if loader == "load_pipeline":
        from ..models import load_pipeline

        return load_pipeline(str(single), dtype=torch.float16, single_file_config=str(folder))[0]
    if loader != "diffusers":
        raise ValueError(f"loader {loader!r}: choose from {', '.join(LOADERS)}")
    import diffusers

    from ..models import NO_SAFETY_CHECKER

    cls = getattr(diffusers, CONFIGS[name]["model_index"]["_class_name"])
    extra = {} if name == "sdxl" else dict(NO_SAFETY_CHECKER)
    return cls.from_single_file(str(single), config=str(folder), torch_dtype=torch.float16, **extra)


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}


def _read_tensors(path: Path):
    """(key, tensor) of a safetensors file, one tensor at a time with plain reads (not mapped, so
    a 5 GB file does not count in this process's RSS while it is compared)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for key, spec in header.items():
            if key == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            yield key, torch.frombuffer(data, dtype=_DTYPES[spec["dtype"]]).reshape(spec["shape"])


def _forward(name: str, pipe, latent: int = 8) -> dict[str, float]:
    """One forward of each component on small inputs (``latent``² latents); returns the largest
    |activation| of any submodule's output. Text encoders and UNet run in fp16; the VAE in fp32
    (CPU fp16 convolutions take minutes; SDXL upcasts its VAE anyway), where staying below
    fp16's 65,504 everywhere stands for "finite in fp16"."""
    from ..families import added_conditions, detect_family, encode_prompts, sdxl_time_ids

    family = detect_family(pipe)
    largest: dict[str, float] = {}

    def track(component: str, module: torch.nn.Module):
        def hook(_module, _inputs, output):
            outputs = [output] if isinstance(output, torch.Tensor) else \
                list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, tuple) else []
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    if not torch.isfinite(t).all():
                        raise AssertionError(f"{name}: a non-finite {t.dtype} activation in {component}")
                    largest[component] = max(largest.get(component, 0.0), t.abs().max().item())
        return [m.register_forward_hook(hook) for m in module.modules()]

    pipe.vae.to(torch.float32)
    handles = [h for c in ("unet", "vae", *family.text_encoders) for h in track(c, getattr(pipe, c))]
    try:
        hidden, pooled = encode_prompts(family, pipe, ["a photo of a cat"])
        size = latent * 8
        cond = added_conditions(family, pooled, [sdxl_time_ids((size, size), (0, 0), (size, size))])
        sample = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
        pipe.unet(sample.half(), torch.tensor([500]), encoder_hidden_states=hidden, added_cond_kwargs=cond)
        pipe.vae.decode(sample / pipe.vae.config.scaling_factor)
    finally:
        for h in handles:
            h.remove()
    if max(largest.values()) >= torch.finfo(torch.float16).max:
        raise AssertionError(f"{name}: activations exceed fp16's range: {largest}")
    return largest


# ---- command line -----------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dorabooth.testing.fullsize", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "check"))
    parser.add_argument("names", nargs="+", choices=NAMES, metavar="NAME", help=" | ".join(NAMES))
    parser.add_argument("--out", default=None, help=f"cache root (default $DORABOOTH_FIXTURES or {cache_root()})")
    parser.add_argument("--loader", choices=LOADERS, default="load_pipeline",
                        help="check: load the single file through dorabooth's load_pipeline or stock from_single_file")
    args = parser.parse_args(argv)
    for name in args.names:                      # one full-size model in memory at a time
        if args.command == "build":
            build(name, args.out)
        else:
            check(name, args.out, loader=args.loader)


if __name__ == "__main__":
    main()
