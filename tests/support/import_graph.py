"""The project's import graph, read with `ast`: which project modules each file imports, anywhere in it.

Used by tests/test_layers.py (layers, circles) and tests/test_architecture_picture.py (the README picture).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("data", "models", "losses", "evaluation", "train")
# The installed namespace of the packages (pyproject.toml's package-dir).
NAMESPACE = "cycletune"


def module_name(path: Path) -> str:
    """models/cache.py -> 'models.cache'; models/__init__.py -> 'models'."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {
        module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert modules, f"no project modules found under {ROOT}"
    return modules


def imported_names(source: str, module: str, is_package: bool) -> Iterator[str]:
    """Every module name `source` imports, anywhere in the file; `from a import b` yields 'a.b' and 'a'
    (the caller keeps whichever is a module). Relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (_in_checkout(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            base = _in_checkout(base)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _in_checkout(name: str) -> str:
    """cycletune.models.cache (the installed name every import uses) -> models.cache (its folder here)."""
    return name.removeprefix(f"{NAMESPACE}.")


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a name that is not a module file is dropped)."""
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        names = imported_names(path.read_text(), module, path.name == "__init__.py")
        edges[module] = {name for name in names if name in modules and name != module}
    return edges


def package_of(module: str) -> str:
    return module.split(".")[0]
