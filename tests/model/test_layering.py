"""The model package's imports point one way: to lmforge.config and lmforge.errors, never up to training,
checkpoints or distribution; and no module of lmforge imports itself back in a circle."""

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmforge modules it imports, top level and inside functions alike."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from pkg import name`: the module or the package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_model_package_imports_only_config_and_errors():
    graph = import_graph()
    allowed = {"lmforge", "lmforge.config", "lmforge.errors"}
    upward = {
        name: sorted(t for t in targets if not t.startswith("lmforge.model") and t not in allowed)
        for name, targets in graph.items()
        if name.startswith("lmforge.model")
    }
    assert not {name: targets for name, targets in upward.items() if targets}


def test_no_import_circles():
    graph = import_graph()
    circles = [cycle for name in sorted(graph) if (cycle := cycle_through(graph, name))]
    assert not circles, "\n".join(" -> ".join(cycle) for cycle in circles)
