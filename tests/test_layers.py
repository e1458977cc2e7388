"""The packages stay layered: lower layers never import higher ones, and no files or packages import in a circle.

Layers, lowest first: data and models (independent of each other), losses, evaluation, train. A component
owns its settings and train/config.py composes them, so nothing below train needs train. Every import is
read with `ast` (module level, inside functions, under TYPE_CHECKING), so a lazy import counts too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import (
    PACKAGES,
    ROOT,
    import_edges,
    imported_names,
    module_name,
    package_of,
    project_modules,
)

# The project packages each package may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "data": frozenset(),
    "models": frozenset(),
    "losses": frozenset({"data", "models"}),
    "evaluation": frozenset({"data", "models", "losses"}),
    "train": frozenset({"data", "models", "losses", "evaluation"}),
}


def layer_violations(modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(file, imported module) for every import of a package that the file's package may not import."""
    return {
        (modules[module].relative_to(ROOT).as_posix(), target)
        for module, targets in import_edges(modules).items()
        for target in targets
        if package_of(target) != package_of(module) and package_of(target) not in ALLOWED[package_of(module)]
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted: the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_kind_of_import_is_read() -> None:
    source = """
import cycletune.models.cache
from cycletune.models import generator
from cycletune.models.lora import frozen
from . import bridge
from .scoring import caption_scores
if TYPE_CHECKING:
    from cycletune.losses.phases import PhaseOutput
def later():
    import cycletune.train.config as config
    from cycletune.data.shapes import WORDS
"""
    names = set(imported_names(source, "models.tiny", is_package=False))
    expected = {
        "models.cache",
        "models.generator",
        "models.lora",
        "models.bridge",
        "models.scoring",
        "losses.phases",
        "train.config",
        "data.shapes",
    }
    assert expected <= names


def test_lower_layers_never_import_higher_ones() -> None:
    violations = sorted(layer_violations(project_modules()))
    assert not violations, "imports that run back up the layers (file, imported module):\n" + "\n".join(
        map(str, violations)
    )


def test_no_import_circle_between_files() -> None:
    found = circles(import_edges(project_modules()))
    assert not found, "files that import each other in a circle:\n" + "\n".join(", ".join(c) for c in found)


def test_no_import_circle_between_packages() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for module, targets in import_edges(modules).items():
        for target in targets:
            if package_of(target) != package_of(module):
                graph[package_of(module)].add(package_of(target))
    assert not circles(graph), f"packages that import each other in a circle: {circles(graph)}"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_circles_are_found(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert circles(graph) == expected


RECIPE = "train.cycle"
MAX_FILE_LINES = 500


def repository_files() -> list[Path]:
    """Every Python file of the project and its tests (not the virtual environment or run folders)."""
    return sorted(path for folder in (*PACKAGES, "tests") for path in (ROOT / folder).rglob("*.py"))


def test_no_file_imports_the_recipe() -> None:
    """The recipe is run (`accelerate launch train/cycle.py`), never imported: what others need lives in
    components, so the recipe can change without breaking a tool or a test."""
    importers = [
        path.relative_to(ROOT).as_posix()
        for path in repository_files()
        if RECIPE in imported_names(path.read_text(), module_name(path), path.name == "__init__.py")
    ]
    assert not importers, f"files that import the recipe {RECIPE}: {importers}"


def test_every_file_name_belongs_to_one_package() -> None:
    """A file name says which concept it holds, so it names one file (package markers aside)."""
    folders: dict[str, set[str]] = {}
    for path in (path for package in PACKAGES for path in (ROOT / package).rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            folders.setdefault(path.name, set()).add(path.parent.relative_to(ROOT).as_posix())
    repeated = {name: sorted(where) for name, where in folders.items() if len(where) > 1}
    assert not repeated, f"file names in more than one package: {repeated}"


def test_no_file_outside_the_tests_is_over_the_size_limit() -> None:
    lengths = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_FILE_LINES}
    assert not too_long, f"files over {MAX_FILE_LINES} lines (split them by concept): {too_long}"
