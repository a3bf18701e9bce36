"""The package's layers (docs/architecture.md) as data, and the checks on its import graph.

Every import of a ``dorabooth`` module by another (at module level or inside a function)
is an edge. An edge may go down the layers or stay inside one, never up; the face
(``dorabooth/__init__.py``) is imported by no module of the package; ``train``, ``generate``
and ``export`` do not import each other; and the graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dorabooth"
FACE = PACKAGE

# Lowest first. A name ending in ".*" covers a subpackage and its modules.
LAYERS: list[tuple[str, set[str]]] = [
    ("leaves", {"version", "conventions", "lazyface", "importcheck", "quiet", "faults", "diskfull", "losses", "events",
                "families",
                "data", "config", "dora", "dvora", "dora_autograd", "optim", "ema", "formats.files", "formats.layout",
                "formats.single_file"}),
    ("model access", {"inject", "quantize", "pivotal", "models", "weights", "rundir", "devices", "specs", "memory", "preflight",
                      "formats",
                      "formats.*", "toyworld", "toyworld.*", "testing", "testing.*"}),
    ("pipeline API", {"adapters", "finetune", "merging", "describe"}),
    ("the trainer's rooms", {"checkpoints", "sampling", "inputs", "sharding"}),
    ("operations", {"train", "generate", "export"}),
    ("studies of runs", {"analysis", "evaluate"}),
    ("many runs", {"queue", "queue.*"}),
    ("entry points", {"cli", "analysis_cli", "export_cli", "queue_cli", "__main__"}),
]
SIBLINGS = {"train", "generate", "export"}       # none of them imports another


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def imports(name: str, source: str, modules: set[str], is_package: bool) -> set[str]:
    """The package modules that ``source`` (module ``name``) imports, anywhere in the file."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:        # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = package_modules(root)
    return {m: imports(m, p.read_text(), set(mods), p.name == "__init__.py") for m, p in mods.items()}


def layer_of(module: str) -> int | None:
    short = module.removeprefix(PACKAGE + ".")
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if short == n or (n.endswith(".*") and short.startswith(n[:-1])):
                return i
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule of the module docstring, in words."""
    found = []
    for module in sorted(graph):
        if module != FACE and layer_of(module) is None:
            found.append(f"{module} is in no layer: add it to tests/layering.py and docs/architecture.md")
    for module, targets in sorted(graph.items()):
        if module == FACE:
            continue
        for target in sorted(targets):
            short, tshort = module.removeprefix(PACKAGE + "."), target.removeprefix(PACKAGE + ".")
            if target == FACE:
                found.append(f"{module} imports the package face; import the module that defines the name")
            elif short in SIBLINGS and tshort in SIBLINGS:
                found.append(f"{module} imports its sibling {target} (train, generate and export stay apart)")
            elif None not in (layer_of(module), layer_of(target)) and layer_of(target) > layer_of(module):
                found.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]}), a higher layer")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def size_report(root: Path = ROOT, max_lines: int = 400, max_function: int = 60) -> list[str]:
    """Files over ``max_lines`` lines and functions over ``max_function`` (a soft report)."""
    rows = []
    for path in sorted([*(root / PACKAGE).rglob("*.py"), *(root / "ui").glob("*.py")]):
        text = path.read_text()
        rel = path.relative_to(root)
        n = len(text.splitlines())
        if n > max_lines:
            rows.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > max_function:
                    rows.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    return rows
