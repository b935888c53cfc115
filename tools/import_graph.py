"""Count peft_graft's internal import graph: modules, import edges, and edges that go up the layering.

The layers (lowest first) are those of ARCHITECTURE.md; an edge from a module to one in a higher layer is an
"upward" edge. Imports inside functions count too (they are still dependencies), imports under TYPE_CHECKING do not.
Also prints the largest classes and functions by line count.

    python tools/import_graph.py [src/peft_graft]
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# The layers of ARCHITECTURE.md, lowest first: module-name prefixes relative to the package ("" is the package
# itself). Old (pre-reorganisation) module names are listed too, so the same command measures both trees.
LAYER_MODULES = {
    0: ["errors", "utils", "compress", "_version", "atomic"],
    1: ["config"],
    2: ["_mixed_batch", "layer"],
    3: ["pack", "pack_format", "provenance", "cards"],
    4: ["model"],
    5: ["hub"],
    # glue: registers the tuner (model) and routes PEFT / transformers loading through the pack checks (hub)
    6: ["integrations", "_registration", "transformers_integration"],
    7: ["extraction", "checkpoint", "roles", "routing", "router"],
    8: ["ops", "export", "fusion", "evaluation", "tasks", "sandbox", "metrics", "transfer", "serving"],
    9: ["_demo", "bundled", "recipes", "finetune", "cli", ""],
}
LAYERS = [(prefix, level) for level, prefixes in LAYER_MODULES.items() for prefix in prefixes]


def layer_of(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or (prefix and module.startswith(prefix + ".")):
            return level
    raise SystemExit(f"no layer for module {module!r}: add it to LAYERS")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def internal_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(child) for statement in node.body for child in ast.walk(statement))
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] + ([f"{target}.{a.name}" if target else a.name for a in node.names])
            elif node.module and node.module.split(".")[0] == "peft_graft":
                target = node.module.removeprefix("peft_graft").lstrip(".")
                names = [target] + [f"{target}.{a.name}" if target else a.name for a in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peft_graft":
                    found.add(alias.name.removeprefix("peft_graft").lstrip("."))
    return found


@dataclass
class Graph:
    modules: int
    edges: int
    upward: list[tuple[str, str]]
    sizes: list[tuple[int, str]]  # (lines, "class|def module.name")


def measure(root: Path) -> Graph:
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    edges: set[tuple[str, str]] = set()
    sizes: list[tuple[int, str]] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        for name in internal_imports(tree, module, path.name == "__init__.py"):
            if name in files and name != module:
                edges.add((module, name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                sizes.append((node.end_lineno - node.lineno + 1, f"{kind} {module}.{node.name}"))
    upward = sorted((a, b) for a, b in edges if layer_of(b) > layer_of(a))
    return Graph(len(files), len(edges), upward, sizes)


def main() -> None:
    graph = measure(Path(sys.argv[1] if len(sys.argv) > 1 else "src/peft_graft"))
    print(f"modules: {graph.modules}  import edges: {graph.edges}  upward edges: {len(graph.upward)}")
    for a, b in graph.upward:
        print(f"  up: {a or '__init__'} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})")
    classes = sorted((s for s in graph.sizes if s[1].startswith("class")), reverse=True)[:5]
    functions = sorted((s for s in graph.sizes if s[1].startswith("def")), reverse=True)[:5]
    print("largest classes: " + ", ".join(f"{name.split(' ')[1]} {lines}" for lines, name in classes))
    print("largest functions: " + ", ".join(f"{name.split(' ')[1]} {lines}" for lines, name in functions))


if __name__ == "__main__":
    main()
