"""The rooms of docs/architecture.md, enforced over launcher/'s imports (ast; lazy imports
inside functions count too): which room may import which, no import cycles between
modules, and no `_private` name imported from another module. Imports under
`if TYPE_CHECKING:` are annotations only: they obey the rooms but make no cycle and do
not count against a leaf registry."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "launcher"

# the house's base: anything may import these, they import only each other
BASE = {"launcher", "launcher.errors", "launcher.assets", "launcher.compat", "launcher.atomic"}
# leaf registries any room may read (the recipe schema's choices come from them); they
# import nothing heavy at module level and only the base and other registries
REGISTRIES = {
    "launcher.train.tasks",
    "launcher.train.optim",
    "launcher.train.metrics",
    "launcher.dist.strategies",
    "launcher.dist.contract",
    "launcher.data.formats",
    "launcher.data.example",
    "launcher.models.families",
}
# room -> the rooms it may import (besides itself, the base and the registries)
ALLOWED = {
    "recipe": set(),
    "data": {"recipe"},
    "models": {"recipe", "dist"},  # dist's pure planning values (strategies, ModelFacts)
    "dist": {"recipe"},
    "objectives": {"recipe"},
    "train": {"recipe", "data", "models", "dist", "objectives"},
    "tools": {"recipe", "data", "models"},
    "cli": {"recipe", "data", "models", "dist", "objectives", "train", "tools"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def imports(runtime: bool = False) -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported launcher module, names imported from it, line)]; `runtime`:
    without the annotation-only imports."""
    found: dict[str, list[tuple[str, list[str], int]]] = {}
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        mod, edges = module_name(path), []
        tree = ast.parse(path.read_text())
        skip = _type_only(tree) if runtime else set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges += [(a.name, [], node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [a.name for a in node.names]
                # `from launcher.x import y` where y is a module counts as importing it
                subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
                edges += [(node.module, names, node.lineno)] + [(s, [], node.lineno) for s in subs]
        found[mod] = [e for e in edges if e[0] == "launcher" or e[0].startswith("launcher.")]
    return found


def room(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_every_import_follows_the_rooms_table():
    bad = []
    runtime = {(m, t, line) for m, e in imports(runtime=True).items() for t, _, line in e}
    for mod, edges in imports().items():
        for target, _names, line in edges:
            if target in BASE or target == mod:
                continue
            if mod in BASE:
                bad.append(f"{mod}:{line} (base) imports {target}")
                continue
            if target in REGISTRIES:
                continue
            if mod in REGISTRIES and room(target) != room(mod) and (mod, target, line) in runtime:
                bad.append(f"{mod}:{line} (a leaf registry) imports {target}")
                continue
            here, there = room(mod), room(target)
            if here is None or there is None or there == here:
                continue
            if there not in ALLOWED[here]:
                bad.append(f"{mod}:{line} ({here}) imports {target} ({there})")
    assert not bad, "imports against docs/architecture.md's rooms:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in e if t != m} for m, e in imports(runtime=True).items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own submodules is not a cycle between modules
    real = [c for c in cycles if not all(x.startswith(c.split(" -> ")[0]) for x in c.split(" -> "))]
    assert not real, "import cycles:\n" + "\n".join(real)


def test_no_private_names_cross_modules():
    bad = [
        f"{mod}:{line} imports {name} from {target}"
        for mod, edges in imports().items()
        for target, names, line in edges
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != mod
    ]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)
