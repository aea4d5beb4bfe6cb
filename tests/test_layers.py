"""The layering rules of README's "Layout" section, checked from the source: imports only run downward,
and no module imports itself back through others (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "shardwise"

# Which top-level part of shardwise may import which (besides itself). Bottom first.
ALLOWED = {
    "errors": set(),  # the ShardwiseError family; imports nothing from shardwise
    "configfile": {"errors"},  # the strict YAML / dataclass loader
    "optim": {"errors"},  # the optimizer knows nothing of configs, data, models or training
    "data": {"errors"},
    "models": {"errors", "data"},  # data: the offline asset cache resolves model folders
    "train": {"errors", "configfile", "optim", "data", "models"},
    "launch": {"errors"},  # python -m shardwise.launch: accelerate launch with one error line
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The shardwise modules ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from . import faults` imports the module shardwise.train.faults, not a name of the package
            submodules = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(target)
    # a module's own packages are always initialised before it: importing them closes no circle
    found = {m for m in found if not name.startswith(m + ".")}
    return {m for m in found if m == "shardwise" or m.startswith("shardwise.")}


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel / "__init__.py").is_file()


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


SOURCES = sorted(SRC.rglob("*.py"))
GRAPH = {module_name(p): {m for m in imports(p) if _is_module(m) and m != module_name(p)} for p in SOURCES}


def test_every_source_file_belongs_to_a_layer():
    parts = {part(m) for m in GRAPH} - {""}
    assert parts <= set(ALLOWED), f"add {parts - set(ALLOWED)} to ALLOWED and to README's layout section"


def test_imports_only_run_downward():
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if part(module) and part(target) != part(module) and part(target) not in ALLOWED[part(module)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    circles = []
    for start in GRAPH:  # depth-first search for a path from each module back to itself
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH.get(node, ()):
                if nxt == start:
                    circles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    found = {frozenset(c) for c in circles}
    assert not found, "import circles: " + "; ".join(" -> ".join(sorted(c)) for c in found)
