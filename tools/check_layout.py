"""Checks the shape of the hostdev package: module size, import cycles, the dependency rule.

Reads the folders ``[tool.setuptools.package-dir]`` in ``pyproject.toml``
maps to import names, parses every module with ``ast`` (nothing is imported)
and prints one line per problem:

- a module of ``agent/``, ``messages/`` or ``mgmt/`` longer than 400 lines;
- modules of the hostdev package that import each other in a cycle. Every
  import counts, at any level: inside functions and under ``if
  TYPE_CHECKING:`` too. ``from hostdev.x import y`` where ``y`` is a
  submodule imports ``hostdev.x.y``; otherwise it imports ``hostdev.x``. So a
  package's ``__init__`` may import its submodules as long as they do not
  import the package back;
- an import that breaks the dependency rule (``agent -> messages <- mgmt``,
  only ``hostdev.demo`` imports both daemons; libvirt only in the agent,
  SQLAlchemy and Alembic only in mgmt, kombu and py-amqp only in the bus).

Exits 0 when there is nothing to say, 1 otherwise.
Run: ``.venv/bin/python tools/check_layout.py [project folder]``.
"""

from __future__ import annotations

import ast
import itertools
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Folders whose modules must stay short, and how short.
SIZE_LIMITED = ("hostdev.agent", "hostdev.messages", "hostdev.mgmt")
MAX_LINES = 400

#: (importing package, imported package, why): hostdev packages that must not meet.
FORBIDDEN_IMPORTS = (
    ("hostdev.agent", "hostdev.mgmt", "the agent never imports mgmt"),
    ("hostdev.mgmt", "hostdev.agent", "mgmt never imports the agent"),
    ("hostdev.messages", "hostdev.agent", "the protocol imports neither daemon"),
    ("hostdev.messages", "hostdev.mgmt", "the protocol imports neither daemon"),
    ("hostdev.messages", "hostdev.demo", "only the CLI's entry point finds the demo"),
    ("hostdev.agent", "hostdev.demo", "only the CLI's entry point finds the demo"),
    ("hostdev.mgmt", "hostdev.demo", "only the CLI's entry point finds the demo"),
)

#: Third-party top-level names, and the only hostdev packages that may import them.
THIRD_PARTY_OWNERS = {
    "libvirt": ("hostdev.agent",),
    "sqlalchemy": ("hostdev.mgmt",),
    "alembic": ("hostdev.mgmt",),
    "kombu": ("hostdev.messages.bus",),
    "amqp": ("hostdev.messages.bus",),
}


@dataclass(frozen=True)
class Module:
    """One source file of the package: its import name and where it lives."""

    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    """One import statement's target, with where it was written."""

    target: str
    line: int


@dataclass
class Graph:
    """Who imports whom: hostdev modules, and third-party top-level names."""

    modules: dict[str, Module]
    #: importer -> imported hostdev module -> first line importing it
    internal: dict[str, dict[str, int]] = field(default_factory=dict)
    #: importer -> third-party top-level name -> first line importing it
    external: dict[str, dict[str, int]] = field(default_factory=dict)


def find_modules(root: Path) -> dict[str, Module]:
    """Returns every module of the folders ``pyproject.toml`` maps to import names."""
    with open(root / "pyproject.toml", "rb") as file:
        package_dirs: dict[str, str] = (
            tomllib.load(file)["tool"]["setuptools"]["package-dir"])
    modules: dict[str, Module] = {}
    for package, folder in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            modules[name] = Module(name=name, path=path, is_package=is_package)
    return modules


def _imports(module: Module, tree: ast.AST, modules: Mapping[str, Module]
             ) -> Iterator[Import]:
    """Yields what each import statement of a module names, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                yield Import(submodule if submodule in modules else origin, node.lineno)


def _owner(name: str, modules: Mapping[str, Module]) -> str | None:
    """Returns the hostdev module an imported dotted name lives in (``None``: not ours)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph(modules: dict[str, Module]) -> Graph:
    """Parses every module and records its imports."""
    graph = Graph(modules)
    for name, module in modules.items():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
        internal = graph.internal.setdefault(name, {})
        external = graph.external.setdefault(name, {})
        for found in _imports(module, tree, modules):
            target = _owner(found.target, modules)
            if target is not None:
                if target != name:
                    internal.setdefault(target, found.line)
            elif found.target.partition(".")[0] != "hostdev":
                external.setdefault(found.target.partition(".")[0], found.line)
    return graph


def within(name: str, package: str) -> bool:
    """Whether module ``name`` is ``package`` or inside it."""
    return name == package or name.startswith(package + ".")


def oversized(graph: Graph, root: Path) -> list[str]:
    """Names each module of the size-limited packages longer than ``MAX_LINES``."""
    problems = []
    for name, module in sorted(graph.modules.items()):
        if any(within(name, package) for package in SIZE_LIMITED):
            lines = len(module.path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                problems.append(f"{module.path.relative_to(root)}: {lines} lines "
                                f"(more than {MAX_LINES}): {name}")
    return problems


def strongly_connected(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Returns the groups of two or more modules that all reach each other (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a long import chain cannot hit the recursion limit.
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(sorted(edges.get(target, {})))))
            elif target in on_stack:
                low[node] = min(low[node], index[target])

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)


def _shortest_cycle(first: str, group: Sequence[str],
                    edges: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Returns a shortest import path from ``first`` back to itself inside ``group``."""
    members = set(group)
    came_from: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges.get(node, {})):
                if target == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(came_from[path[-1]])
                    return [first, *reversed(path[:-1]), first]
                if target in members and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{first} is in a cycle but no path leads back to it")


def cycles(graph: Graph, root: Path) -> list[str]:
    """Names each group of modules importing each other, with one cycle and its lines."""
    problems = []
    for group in strongly_connected(graph.internal):
        path = _shortest_cycle(group[0], group, graph.internal)
        steps = ", ".join(
            f"{graph.modules[a].path.relative_to(root)}:{graph.internal[a][b]} imports {b}"
            for a, b in itertools.pairwise(path))
        problems.append(f"import cycle between {', '.join(group)}: {' -> '.join(path)} "
                        f"({steps})")
    return problems


def rule_violations(graph: Graph, root: Path) -> list[str]:
    """Names each import that breaks the dependency rule."""
    problems = []
    for name in sorted(graph.modules):
        where = graph.modules[name].path.relative_to(root)
        for target, line in sorted(graph.internal[name].items()):
            for importer, imported, why in FORBIDDEN_IMPORTS:
                if within(name, importer) and within(target, imported):
                    problems.append(f"{where}:{line}: {name} imports {target}: {why}")
        for library, line in sorted(graph.external[name].items()):
            owners = THIRD_PARTY_OWNERS.get(library)
            if owners is not None and not any(within(name, owner) for owner in owners):
                problems.append(f"{where}:{line}: {name} imports {library}: only "
                                f"{' and '.join(owners)} may")
    return problems


def check(root: Path) -> list[str]:
    """Returns every problem found in the project at ``root``, one line each."""
    graph = build_graph(find_modules(root))
    return oversized(graph, root) + cycles(graph, root) + rule_violations(graph, root)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the problems; returns 1 if there are any."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else Path(__file__).resolve().parents[1])
    problems = check(root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"layout: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
