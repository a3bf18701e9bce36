"""``dorabooth`` command line: argparse subcommands over the library; no logic of its own.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> exit code``
registered in ``COMMANDS``; new ones (export, convert, adapter-info, analyze, eval) add a
pair there. Flag names are a stable interface for scripts: add, don't rename.
Progress is printed from the same events the Python API's ``on_event`` receives.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .conventions import MAGNITUDE_AXES

TRAIN_EPILOG = """\
Defaults marked "family default" depend on the base model (see the README's table):
resolution, steps, learning rate, rank, number of class images. Mixed precision, gradient
checkpointing and the optimizer default to "auto": chosen for the device (bf16 on GPUs that
have it, else fp16; checkpointing on for SDXL; 8-bit AdamW where bitsandbytes works). The
resolved values are written to RUN_DIR/config.json; `--dry-run` prints them with a peak
memory estimate without loading a weight or writing a file. `--resume` continues RUN_DIR
from its newest checkpoint (other flags may be left out; they come from RUN_DIR/config.json;
--steps, --lr, --text-encoder-lr, --pivotal-lr and --max-grad-norm may change, the changes are recorded there).
Mistakes (folders, numbers, model, run folder) are reported before the model loads, and
nothing is written for them; a run that stopped or failed before its first checkpoint is
started again in place by the corrected command, with or without --resume.
Multi-GPU: accelerate launch -m dorabooth train ...
"""


def _flag(p, *names, **kw):
    """Flags default to "not given" so that --config / a resumed run's config.json fill them."""
    kw.setdefault("default", argparse.SUPPRESS)
    return p.add_argument(*names, **kw)


def _bool(p, name, help):
    return _flag(p, name, action=argparse.BooleanOptionalAction, help=help)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a DreamBooth adapter on a few photos of a subject",
                       description="Train a DreamBooth DoRA/LoRA adapter (or a full UNet fine-tune).",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("subject")
    _flag(g, "--images", metavar="DIR", help="folder of 3–20 subject photos; name.txt beside name.jpg = caption")
    _flag(g, "--token", help="rare word that will mean the subject (default: sks)")
    _flag(g, "--class-noun", dest="class_noun", help="what the subject is, e.g. dog")
    _flag(g, "--out", metavar="RUN_DIR", help="run folder to create (or continue with --resume)")
    _flag(g, "--instance-prompt", dest="instance_prompt",
          help='default: "a <token> <class noun>" on the toy model (its captions\' phrasing), '
               '"a photo of <token> <class noun>" on SD/SDXL')
    _flag(g, "--class-prompt", dest="class_prompt",
          help='default: "a <class noun>" on the toy model, "a photo of a <class noun>" on SD/SDXL')
    _flag(g, "--model", metavar="M",
          help="base model: hub id, diffusers folder or .safetensors file (default: the embedded toy model)")
    _flag(g, "--model-config", dest="model_config", metavar="DIR",
          help="for a .safetensors --model: the diffusers folder (or hub id) with its configs")
    g = p.add_argument_group("method")
    _flag(g, "--method", choices=("dora", "lora", "dvora", "full"),
          help="default: dora; dvora = DoRA on VeRA (frozen random A, B; trains d, b, m); full = fine-tune the whole UNet")
    _flag(g, "--rank", type=int, metavar="N", help="adapter rank (family default; dvora: 256, at most the narrowest UNet width)")
    _flag(g, "--alpha", type=float, metavar="A", help="scale = alpha / rank (default alpha = rank)")
    _bool(g, "--half-rank", "DoRA†: the DoRA paper's half-rank setting (uses rank // 2)")
    _flag(g, "--magnitude-axis", dest="magnitude_axis", choices=MAGNITUDE_AXES,
          help="out (default; PEFT/diffusers files) or in (kohya dora_scale (1, in): A1111/ComfyUI)")
    _bool(g, "--rslora", "rank-stabilised scale alpha / sqrt(rank)")
    _flag(g, "--quantize-base", dest="quantize_base", choices=("none", "nf4"),
          help="nf4: QDoRA, the adapted layers' frozen weights held in 4-bit NF4 (about 1/4 of bf16; "
               "dora/lora; needs dorabooth[qdora])")
    _flag(g, "--targets", help="UNet targets: attn, cross-attn, attn+ff, all-linear, attn+conv, all (with ResNet convs: LoCon), or "
                          "module names (family default: attn on SD/SDXL, all-linear on the toy model)")
    _bool(g, "--train-text-encoders", "train the text encoder(s) too (both on SDXL): adapters on them, or with "
                                       "--method full the whole encoders; family default: "
                                       "on for the toy model, off for SD/SDXL")
    _flag(g, "--text-encoder-lr", dest="text_encoder_lr", type=float, metavar="LR", help="default: --lr")
    _flag(g, "--pivotal", dest="pivotal_tokens", type=int, metavar="N",
          help="pivotal tuning: N new tokens <s0>…<sN-1> (1–16; 2 is usual) per text encoder take the token's "
               "place in the prompts and train beside the adapter; 0 = off (family default: 2 on the toy model, "
               "off for SD/SDXL)")
    _flag(g, "--pivotal-init", dest="pivotal_init", choices=("class", "random"),
          help="start the new tokens as std-scaled noise (random, default: as diffusers' advanced script) or as the "
               "class noun's embedding (class)")
    _flag(g, "--pivotal-lr", dest="pivotal_lr", type=float, metavar="LR",
          help="learning rate of the new token embeddings (default: --text-encoder-lr)")
    _flag(g, "--pivotal-stop", dest="pivotal_stop", type=float, metavar="F",
          help="train the new token embeddings only for the first fraction F of the steps (default: all)")
    g = p.add_argument_group("data")
    _flag(g, "--resolution", type=int, metavar="PX", help="training side in pixels (family default)")
    _bool(g, "--buckets", "aspect-ratio buckets instead of a centre crop")
    _bool(g, "--flip", "random horizontal flips")
    g = p.add_argument_group("prior preservation")
    _bool(g, "--prior-preservation", "class images keep the class as the base model drew it (default: on)")
    _flag(g, "--class-images", dest="class_images", metavar="DIR",
          help="class image folder, reused across runs (default: RUN_DIR/class)")
    _flag(g, "--num-class-images", dest="num_class_images", type=int, metavar="N",
          help="generate with the base model up to N class images (family default)")
    _flag(g, "--prior-loss-weight", dest="prior_loss_weight", type=float, metavar="W", help="default: 1.0")
    _flag(g, "--class-image-steps", dest="class_image_steps", type=int, metavar="N",
          help="sampler steps per class image (family default)")
    g = p.add_argument_group("optimisation")
    _flag(g, "--steps", type=int, metavar="N", help="optimizer steps (family default)")
    _flag(g, "--lr", type=float, metavar="LR", help="learning rate (family default)")
    _flag(g, "--lr-schedule", dest="lr_schedule", choices=("constant", "cosine", "linear"), help="default: constant")
    _flag(g, "--warmup-steps", dest="warmup_steps", type=int, metavar="N", help="linear warm-up (default 0)")
    _flag(g, "--batch-size", dest="batch_size", type=int, metavar="N", help="subject images per step (default 1)")
    _flag(g, "--grad-accum", dest="grad_accum", type=int, metavar="N", help="gradient accumulation (default 1)")
    _flag(g, "--max-grad-norm", dest="max_grad_norm", type=float, metavar="X", help="clip (default 1.0)")
    _flag(g, "--optimizer", choices=("auto", "adamw", "adamw8bit", "prodigy"),
          help="default auto: adamw8bit where bitsandbytes works (CUDA), else adamw; prodigy (pip install "
               "prodigyopt) sets its own step size, --lr defaults to 1.0 with it")
    _flag(g, "--loraplus-ratio", dest="loraplus_ratio", type=float, metavar="λ",
          help="LoRA+: the up matrices (lora_B) learn at λ × --lr, A and the magnitude at --lr (default off; "
               "the paper suggests 16)")
    _flag(g, "--ema-decay", dest="ema_decay", type=float, metavar="D",
          help="keep an EMA of the adapter weights (e.g. 0.999) for previews and the final adapter (default off)")
    _flag(g, "--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0.01)")
    _flag(g, "--min-snr-gamma", dest="min_snr_gamma", type=float, metavar="G", help="Min-SNR γ (default 5 on SD/SDXL; "
          "the toy model trains with plain MSE)")
    _bool(g, "--min-snr", "Min-SNR loss weighting (--no-min-snr: plain MSE)")
    _flag(g, "--noise-offset", dest="noise_offset", type=float, metavar="X", help="default 0")
    _flag(g, "--seed", type=int, metavar="N", help="default 0")
    g = p.add_argument_group("speed and memory")
    _flag(g, "--mixed-precision", dest="mixed_precision", choices=("auto", "no", "fp16", "bf16"),
          help="default auto: bf16 on GPUs that support it, else fp16 (VAE fp32); no (fp32) on a CPU")
    _bool(g, "--gradient-checkpointing", "trade compute for memory (default auto: on for SDXL, and where the "
                                         "memory estimate exceeds 90%% of the device)")
    _bool(g, "--cache-latents", "encode images with the VAE once (default: on)")
    g = p.add_argument_group("run")
    _flag(g, "--validation-prompt", dest="validation_prompts", nargs="+", metavar="TEXT",
          help="preview prompts (default: the instance prompt)")
    _flag(g, "--sample-every", dest="sample_every", type=int, metavar="N",
          help="preview images every N steps (default: only at the end)")
    _flag(g, "--checkpoint-every", dest="checkpoint_every", type=int, metavar="N",
          help="checkpoint every N steps (default: steps / 4)")
    _flag(g, "--keep-checkpoints", dest="keep_checkpoints", type=int, metavar="K", help="default 2")
    _bool(g, "--resume", "continue RUN_DIR from its newest checkpoint")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the resolved config, device settings and a peak memory estimate; load no weight, "
                        "write nothing")
    _flag(g, "--config", dest="config_file", metavar="FILE",
          help="start from a JSON config (e.g. another run's config.json); flags override it")
    _output_flags(p)
    p.set_defaults(handler=_run_train)


def _output_flags(p) -> None:
    p.add_argument("--json", action="store_true", help="print events as JSON lines on stdout instead of a bar")
    p.add_argument("--quiet", action="store_true", help="print only errors and the result path")


def train_config_from_args(args):
    """A TrainConfig from --config / RUN_DIR/config.json (with --resume) overlaid with the flags given."""
    from .config import TrainConfig
    from .rundir import is_run, read_config, recorded_recipe

    given = {k: v for k, v in vars(args).items()
             if k not in ("handler", "command", "json", "quiet", "verbose", "config_file", "min_snr", "dry_run")}
    for name in ("mixed_precision", "optimizer"):                  # "auto": the device decides
        if given.get(name) == "auto":
            given[name] = None
    if "min_snr" in vars(args) and not args.min_snr:
        given["min_snr_gamma"] = 0.0
    base: dict = {}
    if getattr(args, "config_file", None):
        try:
            data = json.loads(Path(args.config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config_file}: {getattr(e, 'strerror', None) or e}; pass a JSON "
                             f"config such as a run's config.json") from None
        base = recorded_recipe(data["config"]) if isinstance(data.get("config"), dict) else data   # a run's config.json
        for mechanic in ("out", "resume"):
            base.pop(mechanic, None)
    if given.get("resume") and given.get("out") and is_run(given["out"]):
        base = read_config(given["out"])[0].to_dict()
    merged = {**_text_encoder_lr_follows(_prompts_follow_the_subject(base, given), given), **given}
    missing = [f"--{n.replace('_', '-')}" for n in ("images", "class_noun", "out") if not merged.get(n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (e.g. dorabooth train --images DIR --class-noun dog "
                         f"--out RUN_DIR)")
    return TrainConfig.from_dict(merged)


def _prompts_follow_the_subject(base: dict, given: dict) -> dict:
    """``base`` (a recorded config) without the prompts that were only the defaults for its token
    and class noun when the flags change either: they are derived again for the new subject (a
    run's config.json records its resolved prompts)."""
    from .config import PROMPT_STYLES, default_prompts, pivotal_identifier

    old = (base.get("token") or "sks", base.get("class_noun") or "")
    new = (given.get("token") or old[0], given.get("class_noun") or old[1])
    if new == old or not old[1]:
        return base
    pivotal = pivotal_identifier(base.get("pivotal_tokens") or 0)       # what named the subject
    defaults = {p for style in PROMPT_STYLES for name in {old[0], pivotal or old[0]}
                for p in default_prompts(name, old[1], style)}
    return {k: v for k, v in base.items() if not (k in ("instance_prompt", "class_prompt") and v in defaults)}


def _text_encoder_lr_follows(base: dict, given: dict) -> dict:
    """``base`` without its text-encoder learning rate when that was only the default (the same
    as its --lr) and a new --lr is given: it follows the new --lr (``--resume --lr``)."""
    if "lr" in given and "text_encoder_lr" not in given and base.get("text_encoder_lr") == base.get("lr"):
        return {k: v for k, v in base.items() if k != "text_encoder_lr"}
    return base


def _run_train(args) -> int:
    import warnings

    from .preflight import check_request

    config = train_config_from_args(args)
    check_request(config)                      # a wrong folder costs a second, before torch and the model load

    from .devices import EmulatedPrecisionWarning
    from .train import dry_run, train

    if args.dry_run:
        plan = dry_run(config)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.describe())
        return 0
    warnings.simplefilter("ignore", EmulatedPrecisionWarning)       # the progress output prints it
    with _stop_on_signal() as stop:
        result = train(config, on_event=_reporter(args), stop=stop)
    if result.main_process:
        if result.adapter is not None:
            print(result.adapter)
        else:
            print(f"stopped at step {result.step}: {result.run_dir}")
            print(f"stopped after step {result.step} with a checkpoint; continue with --resume" if result.step
                  else "stopped before the first step (class images drawn so far are kept); run the command "
                       "again to start", file=sys.stderr)
    return 128 + stop.signum if result.stopped and stop is not None else 0


class _StopRequest:
    """Set by the first Ctrl-C / SIGTERM: the trainer finishes its step, writes a checkpoint and
    returns (``train(stop=)``); ``signum`` is the signal that asked."""

    def __init__(self):
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


@contextmanager
def _stop_on_signal():
    """While training in the foreground of one process: the first Ctrl-C or SIGTERM (a kill, a
    scheduler's preemption, systemd) asks for a stop after the current step with a checkpoint, so
    nothing since the last one is lost; a second one stops at once (KeyboardInterrupt). Several
    processes (accelerate launch) keep the immediate stop: a checkpoint needs all of them."""
    stop = _StopRequest()
    if (threading.current_thread() is not threading.main_thread()
            or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        yield None
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with a trained adapter",
                       description="Generate PNGs (parameters in the PNG text) from a base model + adapter.")
    p.add_argument("--adapter", metavar="RUN_DIR_OR_FILE",
                   help="a run folder (brings its base model), or an adapter .safetensors; omit for the base model")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--model", metavar="M", help="base model (default: the run's, else the embedded toy model)")
    p.add_argument("--model-config", dest="model_config", metavar="DIR",
                   help="for a .safetensors --model: the diffusers folder (or hub id) with its configs")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--n", type=int, default=1, metavar="N", help="images per strength (default 1)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (family default)")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance (family default)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="first seed; image i uses N + i (default 0)")
    p.add_argument("--strength", type=float, nargs="+", default=[1.0], metavar="T",
                   help="adapter strength(s): 0 = base model, 1 = as trained (default 1); several values "
                        "reuse the loaded model")
    p.add_argument("--width", type=int, metavar="PX", help="default: the model's native size")
    p.add_argument("--height", type=int, metavar="PX", help="default: the model's native size")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="run the adapter unmerged (slower; default merges it into the weights)")
    _output_flags(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    from .generate import generate

    if args.n < 1:
        raise ValueError("--n: generate at least 1 image")
    generate(args.prompt, out=args.out, adapter=args.adapter, model=args.model, negative=args.negative,
             model_config=args.model_config, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
             strength=args.strength if len(args.strength) > 1 else args.strength[0],
             width=args.width, height=args.height, merge=args.merge, on_event=_reporter(args))
    if args.quiet:
        print(Path(args.out))
    return 0


def _add_toy(sub) -> None:
    p = sub.add_parser("toy", help="the embedded toy world: `dorabooth toy build --out DIR` trains the toy model",
                       description="Toy-world commands, passed to `python -m dorabooth.toyworld`.")
    p.add_argument("toy_args", nargs=argparse.REMAINDER, metavar="build ...",
                   help="e.g. build --out DIR [--minutes N] (see `dorabooth toy build --help`)")
    p.set_defaults(handler=_run_toy)


def _run_toy(args) -> int:
    from .toyworld.__main__ import main as toy_main

    toy_main(args.toy_args or ["--help"])
    return 0


def _reporter(args):
    if getattr(args, "json", False):
        return lambda event: print(json.dumps(event), flush=True)
    if getattr(args, "quiet", False):
        return None
    from .events import ProgressBar
    return ProgressBar()


def _add_export(sub) -> None:
    from .export_cli import add_export_commands   # export, convert, adapter-info
    add_export_commands(sub)


# name → parser builder; each builder registers its handler with set_defaults(handler=…).
COMMANDS = {"train": _add_train, "generate": _add_generate, "export": _add_export, "toy": _add_toy}
# Modules whose own COMMANDS dict is merged in (skipped only if the module does not exist).
COMMAND_MODULES = ("analysis_cli", "queue_cli")


def _extension_commands() -> dict:
    import importlib

    found = {}
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue
            raise
        found.update(module.COMMANDS)
    return found


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="dorabooth", description="DreamBooth with DoRA for Stable Diffusion / SDXL.")
    parser.add_argument("--version", action="version", version=f"dorabooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in {**COMMANDS, **_extension_commands()}.values():
        add(sub)
    for p in (parser, *sub.choices.values()):
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show the libraries' own messages, progress bars and warnings (hidden by default)")
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError)


def _user_error(e: Exception) -> bool:
    """An error whose message says what to change (printed without a traceback)."""
    if isinstance(e, USER_ERRORS) or _message(e) is not None:
        return True                                 # (no import: a mistake found before torch loads stays fast)
    from .checkpoints import TrainingDiverged
    from .rundir import RunBusy
    return isinstance(e, (TrainingDiverged, RunBusy))


def _message(e: Exception) -> str | None:
    """The one line for an ordinary failure that arrives without a message of ours: a full disk
    that no write helper named (safetensors' own error is no OSError), a number that overflowed."""
    from .diskfull import AGAIN, DiskFull, is_disk_full

    if is_disk_full(e) and not isinstance(e, DiskFull):
        return f"disk full ({e}): free space on the output's disk and {AGAIN}"
    if isinstance(e, OverflowError) or (isinstance(e, RuntimeError) and "without overflow" in str(e)):
        return f"a number overflowed ({e}): a value given (a learning rate, a strength, a scale) is far too large"
    return None


def main(argv=None) -> int:
    from .quiet import quiet_libraries

    args = build_parser().parse_args(argv)
    try:
        with quiet_libraries(not getattr(args, "verbose", False)):
            return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; a run continues from its last checkpoint with --resume", file=sys.stderr)
        return 130
    except ImportError as e:
        if os.environ.get("DORABOOTH_DEBUG") or e.name is None:      # no name: a message of its own
            raise
        from .importcheck import explain_import_error
        print(f"error: {explain_import_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("DORABOOTH_DEBUG") or not _user_error(e):
            raise
        print(f"error: {_message(e) or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
