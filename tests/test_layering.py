"""The layering rules of docs/architecture.md, enforced.

1. The generic core (the modules directly in ``supervision/``) never imports the product
   shell (``supervision.shell``) or the resource actors (``actors``).
2. The pure machines import without trio (or anything else asynchronous).
3. No import cycles among the project's modules (``if TYPE_CHECKING:`` imports excluded:
   they never run).

Read from the source with ``ast`` so that a violation hidden in a function body counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("supervision", "actors")
SHELL = "supervision.shell"
PURE_MACHINES = ("supervision.states", "supervision.backoff", "supervision.budget",
                 "supervision.breaker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports when it runs (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            for alias in node.names:  # "from pkg import submodule"
                out.add(f"{module}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_core(name: str) -> bool:
    return name.startswith("supervision") and not (name == SHELL or name.startswith(SHELL + "."))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _is_core(m)))
def test_core_never_imports_the_shell_or_the_actors(module: str) -> None:
    bad = sorted(m for m in GRAPH[module]
                 if m.startswith("actors") or m == SHELL or m.startswith(SHELL + "."))
    assert not bad, f"{module} (core) imports {bad}"


def test_the_shell_exists() -> None:
    # The rule above must not pass because the shell vanished or was renamed.
    assert any(m.startswith(SHELL + ".") for m in MODULES), f"no {SHELL} package"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_pure_machines_import_without_trio() -> None:
    code = (
        "import sys\n"
        f"for m in {PURE_MACHINES!r}: __import__(m)\n"
        "loaded = [m for m in ('trio', 'asyncpg', 'trio_asyncio', 'trio_websocket', 'numpy')"
        " if m in sys.modules]\n"
        "project = sorted(m for m in sys.modules if m.split('.')[0] in ('supervision', 'actors'))\n"
        "print(repr((loaded, project)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    loaded, project = eval(out)  # noqa: S307 - our own repr of two lists
    assert loaded == [], f"importing the pure machines loaded {loaded}"
    assert set(project) <= {"supervision", *PURE_MACHINES}, project
