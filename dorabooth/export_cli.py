"""``dorabooth export``, ``convert`` and ``adapter-info``: argparse wiring over :mod:`dorabooth.export`.

``cli.py`` calls :func:`add_export_commands` with its subparsers; every handler returns an
exit code and raises ``ValueError``/``OSError`` with a message for the user.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .conventions import ADAPTER_FORMATS, EXPORT_DTYPES, EXPORT_FORMATS

EXPORT_EPILOG = """\
--strength T applies to the --adapter before it (default 1.0); with several adapters they are
merged one after another (docs/export.md).
Adapter formats: diffusers-lora (diffusers/PEFT, magnitude axis 'out' only) and kohya
(ComfyUI/A1111/LyCORIS; dora_scale (out, 1) or (1, in)). Checkpoints: merged-diffusers (a
pipeline folder) and merged-single-file (one .safetensors in the original SD/SDXL layout).
After writing an adapter file, a report says how diffusers, ComfyUI, A1111 and LyCORIS
will apply it.
"""


def _add_base(p) -> None:
    p.add_argument("--model", metavar="M",
                   help="base model: hub id, diffusers folder or .safetensors (default: the one the adapter records)")
    p.add_argument("--model-config", dest="model_config", metavar="DIR",
                   help="for a .safetensors --model: the diffusers folder with its configs")


class _AdapterAction(argparse.Action):
    """--adapter A [--strength T] … → [[A, T], …]; a --strength belongs to the adapter before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, "adapters", None) or []
        if option_string == "--adapter":
            items.append([values, 1.0])
        else:
            if not items:
                parser.error("--strength must follow an --adapter")
            items[-1][1] = float(values)
        namespace.adapters = items


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="write an adapter file or a merged checkpoint",
                       description="Export adapters: kohya / diffusers-lora files, or checkpoints with adapters merged.",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action=_AdapterAction, dest="adapters", metavar="RUN_DIR_OR_FILE", required=True,
                   help="a run folder or an adapter file (repeat to merge several)")
    p.add_argument("--strength", action=_AdapterAction, dest="adapters", metavar="T",
                   help="strength of the adapter before it (default 1.0)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, metavar="PATH", help="file (.safetensors) or folder to write")
    _add_base(p)
    p.add_argument("--dtype", choices=EXPORT_DTYPES, help="merge in fp32, then cast (default: the base's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_run_export)

    p = sub.add_parser("convert", help="convert an adapter file between formats",
                       description="Read any DoRA/LoRA file (diffusers/PEFT, kohya, LyCORIS, OneTrainer) and "
                                   "write it as diffusers-lora or kohya. A magnitude axis is never changed.")
    p.add_argument("input", metavar="IN_FILE")
    p.add_argument("--to", required=True, choices=ADAPTER_FORMATS)
    p.add_argument("--out", required=True, metavar="PATH")
    _add_base(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_convert)

    p = sub.add_parser("adapter-info", help="describe an adapter file",
                       description="Format, family, method, rank, alpha, magnitude axis, modules, unknown keys; "
                                   "with --consumers, how diffusers/ComfyUI/A1111/LyCORIS will apply it.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--consumers", action="store_true", help="per-tool report (errors need the base: --model)")
    _add_base(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_info)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"path": str(result.path), "format": result.format,
                          "consumers": [v.to_dict() for v in result.report], "notes": result.notes}, indent=2))
        return
    print(f"wrote {result.format}: {result.path}")
    for note in result.notes:
        print(f"  {note}")
    if result.report:
        print("how other tools will apply this file (weight error vs. dorabooth, strength 1):")
        for v in result.report:
            print(v.line())
            for n in v.notes:
                print(f"          note: {n}")


def _run_export(args) -> int:
    from .export import export

    pairs = [(a, t) for a, t in args.adapters]
    result = export(pairs, format=args.format, out=args.out, model=args.model, model_config=args.model_config,
                    dtype=args.dtype, overwrite=args.overwrite,
                    on_event=None if args.json else (lambda e: None))
    _print_result(result, args.json)
    return 0


def _run_convert(args) -> int:
    from .export import convert

    result = convert(args.input, to=args.to, out=args.out, model=args.model, model_config=args.model_config,
                     overwrite=args.overwrite)
    _print_result(result, args.json)
    return 0


def _run_info(args) -> int:
    from .describe import adapter_info

    info = adapter_info(Path(args.file), consumers=args.consumers, model=args.model, model_config=args.model_config)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    comps = ", ".join(f"{c} {n}" for c, n in info["modules_per_component"].items())
    conv = f"; {info['conv_modules']} of them Conv2d (LoCon)" if info.get("conv_modules") else ""
    print(f"{info['file']}\n  format         {info['format']}\n  family         {info['family'] or 'unknown'}"
          f"\n  method         {info['method']}\n  magnitude axis {info['magnitude_axis'] or '-'}"
          f"\n  rank           {', '.join(map(str, info['rank']))}"
          f"\n  alpha          {', '.join(f'{a:g}' for a in info['alpha'])}"
          f"\n  modules        {info['modules']} ({comps}{conv})"
          f"\n  base model     {info['base_model'] or '-'}"
          f"\n  trigger        {info['trigger'] or '-'}" + (f" (trained as \"{info['instance_prompt']}\")"
                                                         if info['instance_prompt'] else ""))
    if info.get("pivotal"):
        piv = info["pivotal"]
        where = (f"{piv['embeddings']} ({', '.join(f'{k} {r[0]}×{r[1]}' for k, r in piv['rows'].items())})"
                 if piv.get("embeddings") else f"MISSING: {piv.get('problem')}")
        print(f"  pivotal tokens {''.join(piv['tokens'])}; embeddings {where}")
    if "vera_seed" in info:
        print(f"  DVoRA          seed {info['vera_seed']}, {info['trainable']:,} trained numbers (d, b, m; A and B "
              f"rebuilt from the seed)")
    unknown = info["unknown_keys"]
    print(f"  unknown keys   {len(unknown)}" + (f" (e.g. {', '.join(unknown[:3])})" if unknown else ""))
    if args.consumers:
        report = info.get("consumers")
        if isinstance(report, str):
            print(f"  consumers: {report}")
        else:
            from .formats.consumers import Verdict
            for note in info.get("notes", []):
                print(f"  note: {note}")
            for d in report:
                v = Verdict(**d)
                print(v.line())
                for n in v.notes:
                    print(f"          note: {n}")
    return 0
