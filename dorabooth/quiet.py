"""Third-party output the command line hides unless ``--verbose``: the libraries' log messages
below errors (transformers' "`CLIPImageProcessor` requires torchvision"), their progress bars
(diffusers' "Loading pipeline components...", the hub's downloads) and Python warnings raised
inside them or of the deprecation kinds (FutureWarning, DeprecationWarning). dorabooth's own
progress lines (events → ``events.ProgressBar``) and its own warnings are left alone.

The libraries read their settings from the environment when they are first imported, and the
command line imports them only to run a command, so setting the variables first is enough; a
library already imported (a test calling ``cli.main``) is set through its own API. Everything
is put back on exit; a variable the user set wins.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "torch", "safetensors",
             "tqdm", "PIL", "bitsandbytes", "torchao", "ray")
ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TQDM_DISABLE": "1"}       # diffusers' bars are tqdm's; dorabooth draws none with tqdm
_OWN_LOGGING = ("diffusers.utils.logging", "transformers.utils.logging", "huggingface_hub.utils.logging")
# bitsandbytes and torchao (diffusers imports them when installed) log their missing CPU kernels; torchao's
# import makes torch's pytree log a deprecation under its own logger.
_PLAIN_LOGGERS = ("accelerate", "peft", "torch", "bitsandbytes", "torchao", "torch.utils._pytree", "ray")


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Inside: the libraries say only errors (see the module docstring); ``enabled=False``
    (``--verbose``) changes nothing."""
    if not enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in ENVIRONMENT}
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    undo = [_quiet_loaded(sys.modules[name]) for name in _OWN_LOGGING if name in sys.modules]
    undo += [_quiet_logger(logging.getLogger(name)) for name in _PLAIN_LOGGERS]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
            yield
    finally:
        for restore in reversed(undo):
            restore()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quiet_loaded(module) -> Callable[[], None]:
    """An imported library's ``utils.logging``: errors only and, where it has them (diffusers,
    transformers), no progress bars; returns the undo."""
    level = module.get_verbosity()
    bars_on = getattr(module, "is_progress_bar_enabled", lambda: False)()
    module.set_verbosity_error()
    if bars_on:
        module.disable_progress_bar()

    def undo():
        module.set_verbosity(level)
        if bars_on:
            module.enable_progress_bar()
    return undo


def _quiet_logger(logger: logging.Logger) -> Callable[[], None]:
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    return lambda: logger.setLevel(level)
