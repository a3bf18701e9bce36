"""The layers hold (docs/architecture.md), and the checker catches each kind of violation."""

import pytest

from layering import FACE, LAYERS, import_graph, imports, layer_of, violations


def test_the_package_keeps_its_layers():
    graph = import_graph()
    assert "dorabooth.train" in graph and "dorabooth.formats.kohya" in graph
    assert violations(graph) == []


def test_the_face_is_only_a_face():
    """Re-exports and nothing else: its own imports, ``__all__`` and the name → module table
    that ``lazyface.install`` binds lazily; no function, class or branch of its own."""
    import ast

    from layering import ROOT

    text = (ROOT / "dorabooth" / "__init__.py").read_text()
    assert len(text.splitlines()) < 40
    tree = ast.parse(text)
    kinds = [type(node).__name__ for node in tree.body[1:]]            # after the docstring
    assert set(kinds) <= {"ImportFrom", "Assign", "Expr"}, kinds
    assert all(node.level == 1 for node in tree.body if isinstance(node, ast.ImportFrom))
    calls = [node.value for node in tree.body[1:] if isinstance(node, ast.Expr)]
    assert [ast.unparse(c.func) for c in calls] == ["lazyface.install"]


def test_the_face_serves_every_public_name_from_its_module():
    import importlib

    import dorabooth

    table = dorabooth._exports
    assert sorted(dorabooth.__all__) == sorted(["__version__", *table])
    for name, module in table.items():
        assert getattr(dorabooth, name) is getattr(importlib.import_module(f"dorabooth.{module}"), name)
    assert dorabooth.dora.DoRALinear and "attach" in dir(dorabooth)       # submodules still load on access
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        dorabooth.nonexistent


def test_public_names_are_not_shadowed_by_submodules():
    """Importing a submodule binds its name on the package: a module named like a public
    function (merge.py beside dorabooth.merge) would silently replace the function."""
    import importlib
    import inspect

    import dorabooth
    from layering import package_modules

    for module in package_modules():                # every submodule imported, as a long session would
        if module.endswith("__main__"):
            continue
        importlib.import_module(module)
    for name in dorabooth.__all__:
        assert not inspect.ismodule(getattr(dorabooth, name)), f"dorabooth.{name} is a module"


def _graph(**edges):
    return {f"dorabooth.{m}" if m != "face" else FACE: {f"dorabooth.{t}" if t != "face" else FACE for t in ts}
            for m, ts in edges.items()}


@pytest.mark.parametrize("edges, words", [
    ({"train": {"face"}, "face": {"train"}}, "imports the package face"),
    ({"export": {"generate"}, "generate": set()}, "imports its sibling"),
    ({"evaluate": set(), "generate": set(), "train": {"generate"}}, "imports its sibling"),
    ({"models": {"generate"}, "generate": set()}, "a higher layer"),
    ({"dora": {"inject"}, "inject": set()}, "a higher layer"),
    ({"inject": {"rundir"}, "rundir": {"models"}, "models": {"inject"}}, "import cycle"),
    ({"brand_new": set()}, "is in no layer"),
])
def test_the_checker_catches(edges, words):
    found = violations(_graph(**edges))
    assert any(words in v for v in found), found


def test_imports_inside_functions_count():
    source = "def f():\n    from .generate import Session\n    from . import rundir as rd\n"
    mods = {"dorabooth.export", "dorabooth.generate", "dorabooth.rundir", "dorabooth"}
    assert imports("dorabooth.export", source, mods, False) == {"dorabooth.generate", "dorabooth.rundir"}
    assert imports("dorabooth.export", "import dorabooth\n", mods, False) == {FACE}


def test_layers_name_each_module_once():
    names = [n for _, group in LAYERS for n in group]
    assert len(names) == len(set(names))
    assert layer_of("dorabooth.formats.kohya") == layer_of("dorabooth.rundir")
    assert layer_of("dorabooth.formats.files") < layer_of("dorabooth.rundir") < layer_of("dorabooth.train")
