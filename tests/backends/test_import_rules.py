"""The package layout's import rules (docs/architecture.md, "Where code lives"), read from the
source with ``ast`` so that a violation fails here rather than in a user's environment:

- an in-tree backend (``tessellm/backends/<name>/``) imports neither the engine
  (``tessellm.core``, ``tessellm.entrypoints``) nor another in-tree backend; what two backends
  share lives in ``tessellm.kernels`` or ``tessellm.backends.reference``;
- ``tessellm.kernels`` imports neither ``tessellm.backends`` nor ``tessellm.core``;
- no import cycle among ``tessellm``'s modules through module-level imports. Imports inside a
  function run at call time, after every module involved has loaded, so they cannot deadlock an
  import and are not counted (they are still subject to the first two rules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tessellm

ROOT = Path(tessellm.__file__).parent
BACKENDS = ROOT / "backends"
IN_TREE = sorted(p.name for p in BACKENDS.iterdir()
                 if p.is_dir() and (p / "plugin.py").exists())


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every ``import``/``from ... import`` of ``tessellm``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` is not an import
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m == "tessellm" or m.startswith("tessellm.")]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_backends_import_neither_the_engine_nor_each_other():
    bad = []
    for name in IN_TREE:
        for path in sorted((BACKENDS / name).rglob("*.py")):
            for mod, line in _imports(path):
                others = [o for o in IN_TREE if o != name
                          and _under(mod, f"tessellm.backends.{o}")]
                if (_under(mod, "tessellm.core") or _under(mod, "tessellm.entrypoints")
                        or others):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}")
    assert not bad, "backends reaching past the contract:\n" + "\n".join(bad)


def test_kernels_import_no_backend_and_no_engine():
    bad = [f"{path.relative_to(ROOT.parent)}:{line} imports {mod}"
           for path in sorted((ROOT / "kernels").rglob("*.py"))
           for mod, line in _imports(path)
           if _under(mod, "tessellm.backends") or _under(mod, "tessellm.core")]
    assert not bad, "tessellm.kernels must stay engine- and backend-free:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for mod, _ in _imports(path, top_level_only=True):
            while mod and mod not in modules:  # `from pkg import name` names an attribute
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _is_package_reexport(cycle: list[str]) -> bool:
    """``pkg/__init__`` importing its own submodule, which imports a sibling through ``pkg``:
    Python resolves that without a partial module, so it is not a cycle that can bite."""
    return all(_under(m, cycle[0]) or _under(cycle[0], m) for m in cycle)


def test_no_import_cycles():
    graph = _graph()
    cycle = _find_cycle(graph)
    while cycle and _is_package_reexport(cycle):
        graph[cycle[-2]].discard(cycle[-1])
        cycle = _find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a file importing the engine and one importing a backend are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import tessellm.core.scheduler\nfrom tessellm.backends.cuda import ops\n")
    mods = [m for m, _ in _imports(bad)]
    assert "tessellm.core.scheduler" in mods and "tessellm.backends.cuda" in mods
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
