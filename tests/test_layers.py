"""The architecture a newcomer reads from the tree: packages in floors, no import running back up, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "volad"
#: Floors of volad's top-level packages and modules, lowest first, read top-down like the pipeline. A package may
#: import from floors below its own; packages on one floor are independent of each other.
LAYERS = [
    {"errors"},
    {"types", "io"},
    {"utils", "synthesis"},
    {"nn", "data"},
    {"methods", "export"},
    {"runs"},
    {"evaluation"},
    {"bundle", "engine"},
    {"pipelines"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The volad modules a file imports anywhere in it (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "volad":
            for alias in node.names:  # ``from volad.x import y`` imports module volad.x.y when it is one
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "volad"}
    return {m for m in out if m in modules}


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_package_imports_from_its_own_floor_or_above():
    modules = _modules()
    wrong = []
    for mod, path in modules.items():
        if mod == "volad":
            continue
        unit = _unit(mod)
        assert unit in LEVEL, f"{path}: volad.{unit} has no floor in this test"
        for target in _imports(path, modules):
            other = _unit(target)
            if other not in (unit, "volad") and LEVEL[other] >= LEVEL[unit]:
                wrong.append(f"{mod} imports {target} ({other} is on floor {LEVEL[other]}, {unit} on {LEVEL[unit]})")
    assert not wrong, "imports across or up the floors:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules_lazy_imports_included():
    """Tarjan's strongly connected components of the module graph: any component of two or more modules is a cycle."""
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_top_of_volad_holds_only_the_ground_floor_and_the_command():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == ["cli", "errors", "io", "types"], top


def test_tests_mirror_the_package():
    """Each test folder is named after the volad subpackage it tests (``bundles`` tests the bundle folders)."""
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders, "no test folders"
    strays = [f for f in folders if f != "bundles" and not (PACKAGE / f / "__init__.py").is_file()]
    assert not strays, f"test folders with no volad subpackage of that name: {strays}"
    loose = sorted(p.stem.removeprefix("test_") for p in tests.glob("test_*.py"))
    # cross-cutting tests: the floors, trustworthy runs, interruptions
    unmatched = [n for n in loose if not (PACKAGE / f"{n}.py").is_file() and n not in ("layers", "reliability", "interruptions")]
    assert not unmatched, f"top-level test files named after no top-level volad module: {unmatched}"
