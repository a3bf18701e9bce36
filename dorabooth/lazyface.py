"""The package face, bound lazily: ``dorabooth.train``, ``dorabooth.attach`` … are imported from
their modules the first time they are read, so ``import dorabooth`` (and with it
``dorabooth --help`` and ``python -m dorabooth``) loads no torch.

:func:`install` gives the package module the class :class:`LazyFace`, which differs from a
plain module in three ways:

- a public name is imported from the module that defines it on first read, then kept;
- the import system binds every submodule it loads on its package, so once anyone imports
  ``dorabooth/train.py`` the name ``dorabooth.train`` would become that module; for a public
  name the function is bound instead (the module stays in ``sys.modules``:
  ``from dorabooth.train import dry_run`` works as before);
- any other submodule loads on attribute access (``dorabooth.rundir``), as it did when the
  face imported everything at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class LazyFace(types.ModuleType):
    """A package module whose public names come from their modules on first use."""

    def __getattr__(self, name: str):
        exports = self.__dict__.get("_exports", {})
        if name in exports:
            value = getattr(importlib.import_module(f"{self.__name__}.{exports[name]}"), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            value = importlib.import_module(f"{self.__name__}.{name}")
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        exports = self.__dict__.get("_exports", {})
        if name in exports and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(importlib.import_module(f"{self.__name__}.{exports[name]}"), name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_exports", {})})


def install(package: str, exports: dict[str, str]) -> None:
    """Make ``sys.modules[package]`` a :class:`LazyFace` serving ``exports`` (public name → the
    module, relative to the package, that defines it)."""
    module = sys.modules[package]
    module._exports = dict(exports)
    module.__class__ = LazyFace
