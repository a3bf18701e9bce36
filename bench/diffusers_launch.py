"""Run a diffusers example script exactly as ``python SCRIPT ARGS…`` would, on a CPU torch.

    python bench/diffusers_launch.py SCRIPT [ARGS…]

The dreambooth examples import ``torchvision`` for their image transforms (pure Python).
PyPI's torchvision wheels are CUDA builds: with the CPU torch their C extension does not load,
and ``import torchvision`` then fails in ``_meta_registrations`` ("operator torchvision::nms
does not exist"), the two fake-kernel registrations there that do not check for the extension.
When, and only when, that happens, this launcher declares the schemas of those two operators
(``nms`` and ``qnms``, as torchvision's C++ declares them; no kernel: calling one still fails)
and imports torchvision again. The script itself runs unchanged through ``runpy`` as
``__main__`` with ``sys.argv = [SCRIPT, ARGS…]`` and the script's folder first on ``sys.path``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None                      # kept alive: dropping a torch.library.Library removes its schemas


def import_torchvision() -> str:
    """Import torchvision; returns "native" or "schemas declared" (see the module docstring)."""
    global _library
    try:
        import torchvision  # noqa: F401
        return "native"
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401,F811
    return "schemas declared"


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    how = import_torchvision()
    print(f"diffusers_launch: torchvision imported ({how}); running {argv[0]}", file=sys.stderr, flush=True)
    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)         # as `python SCRIPT` would have it
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
