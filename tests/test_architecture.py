"""The package's shape: imports flow one way along the layers docs/architecture.md lists, with
no cycle (imports inside functions included), and the predict function's code stays clear of
the training stack.

Read statically with `ast`, so an import that only runs on some path (a lazy import in a CLI
command, say) counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shared" / "bucketml"

# Lower layers first. A module may import its own layer's foundation and any layer below it;
# the groups sharing a layer (training and serving; local and cloud) never import each other.
LAYERS: list[set[str]] = [
    {"bucketml", "settings", "logs", "auth", "timestamps", "onnx_guard", "encoding"},
    {"contracts"},
    {"storage"},
    {"registry"},
    {"monitoring"},
    {"training", "serving"},
    {"steps"},
    {"local", "cloud"},
    {"console"},
    {"cli"},
]
TRAINING_STACK = ("pandas", "sklearn", "matplotlib", "scipy", "skl2onnx")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every bucketml module `path` imports, at any depth of its code, and every other top-level package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package uses absolute imports"
            base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: {m for m in imports_of(path, modules) if m in modules and m != name} for name, path in modules.items()}


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(group: str) -> int:
    for index, layer in enumerate(LAYERS):
        if group in layer:
            return index
    raise AssertionError(f"bucketml.{group} belongs to no layer: add it to LAYERS and to docs/architecture.md")


def test_every_module_belongs_to_a_layer():
    for module in graph():
        layer_of(group_of(module))


def test_imports_flow_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        own = group_of(module)
        for target in targets:
            other = group_of(target)
            if other == own or target == "bucketml":
                continue
            if layer_of(other) > layer_of(own) or (layer_of(other) == layer_of(own) and layer_of(own) > 0):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_lazy_imports_included():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path
                              else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def closure(start: set[str]) -> set[str]:
    edges = graph()
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def test_the_predict_function_imports_serving_and_the_layers_below_it_only():
    modules = module_names()
    entry = imports_of(ROOT / "functions" / "predict" / "main.py", modules)
    reached = closure({m for m in entry if m in modules})
    outside = sorted(m for m in reached if group_of(m) in {"training", "steps", "local", "cloud", "console", "cli"})
    assert not outside, f"predict reaches {outside}"
    assert any(group_of(m) == "serving" for m in reached)
    third_party = set()
    for module in reached:
        third_party.update(name.split(".")[0] for name in imports_of(modules[module], modules) if name not in modules)
    assert not third_party & set(TRAINING_STACK), f"predict's code imports {sorted(third_party & set(TRAINING_STACK))}"


def test_the_reader_counts_an_import_inside_a_function(tmp_path):
    """The CLI imports most commands' modules inside the command: the graph must see those."""
    source = tmp_path / "lazy.py"
    source.write_text("def command():\n    from bucketml.storage import open_storage\n    import bucketml.registry\n")
    assert imports_of(source, module_names()) >= {"bucketml.storage", "bucketml.registry"}
