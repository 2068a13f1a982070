"""No volad module imports from a layer above its own (data never imports methods; a benchmark is not a library)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "volad"
# Lowest first; a module may import from its own layer or any layer below it.
LAYERS = [
    {"errors", "types", "cli_format", "distributed"},
    {"io", "progress", "tracking"},
    {"nn", "synthesis", "calibration", "ema"},
    {"data"},
    {"methods", "scoring", "prediction"},
    {"export", "checkpoint", "rundir", "runs"},
    {"evaluation", "inference"},
    {"validation"},
    {"engine", "fusion"},
    {"overrides", "bundles"},
    {"tuning", "protocol", "bench", "budget"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    """Top-level volad modules (``volad.<x>``) that a file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "volad":
            parts = node.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("volad.")}
    return out


def test_no_module_imports_from_a_layer_above_it():
    seen, upward = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue
        mod = parts[0].removesuffix(".py")
        seen.add(mod)
        for target in _imports(path) - {mod, "__version__"}:
            assert target in LEVEL, f"{path}: imports volad.{target}, which has no layer in this test"
            if LEVEL[target] > LEVEL[mod]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports volad.{target}")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)
    assert seen <= set(LEVEL), f"modules without a layer: {sorted(seen - set(LEVEL))}"


def test_tests_mirror_the_package():
    """Each test folder is named after the volad subpackage it tests (``bundles`` tests the bundle folders)."""
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders, "no test folders"
    strays = [f for f in folders if f != "bundles" and not (PACKAGE / f / "__init__.py").is_file()]
    assert not strays, f"test folders with no volad subpackage of that name: {strays}"
    loose = sorted(p.stem.removeprefix("test_") for p in tests.glob("test_*.py"))
    unmatched = [n for n in loose if not (PACKAGE / f"{n}.py").is_file() and n not in ("layers", "reliability", "interruptions")]
    assert not unmatched, f"top-level test files named after no top-level volad module: {unmatched}"
