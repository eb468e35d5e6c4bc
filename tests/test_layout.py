"""The project's layout rules (docs/architecture.md, "What may import what"), read off the source with ``ast``.

Every import counts, at module level or inside a function: a function-level import does not hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "service", "trainer")
MAX_LINES = 650


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every import of project modules in ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from package import module`
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in found if target.split(".")[0] in PACKAGES]


IMPORTS = {name: imports_of(name) for name in MODULES}
GRAPH = {name: sorted({target for target, _, _ in IMPORTS[name] if target in MODULES and target != name})
         for name in MODULES}


def circles() -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each as one circle through it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    return found


def test_the_modules_are_found():
    assert {"protocol.config", "service.selector", "trainer.client.api", "trainer.launch.run"} <= set(MODULES)


def test_no_import_circle():
    assert circles() == [], "modules that import each other, directly or through others"


def test_protocol_imports_nothing_of_service_or_trainer():
    bad = [(name, target, line) for name in MODULES if name.startswith("protocol")
           for target, _, line in IMPORTS[name] if target.split(".")[0] in ("service", "trainer")]
    assert bad == []


def test_service_imports_nothing_of_trainer():
    bad = [(name, target, line) for name in MODULES if name.startswith("service")
           for target, _, line in IMPORTS[name] if target.split(".")[0] == "trainer"]
    assert bad == []


def test_one_trainer_module_names_service():
    naming = sorted({name for name in MODULES if name.startswith("trainer")
                     for target, _, _ in IMPORTS[name] if target.split(".")[0] == "service"})
    assert naming == ["trainer.client.cluster"], "only the module that starts the selector may import service/"


def test_rooms_of_trainer_import_one_way():
    """A room imports only rooms listed before it; ``trainer.cli`` and ``trainer.files`` are leaves every room may
    use, and the entry modules (``trainer.run``, ``trainer.experiment``, ``trainer.api``, ``trainer.console``) only
    re-export or dispatch."""
    order = ["trainer.cli", "trainer.files", "trainer.data", "trainer.client", "trainer.integrations", "trainer.builtin",
             "trainer.launch", "trainer.experiments", "trainer.api", "trainer.run", "trainer.experiment", "trainer.console"]

    def room(name: str) -> int | None:
        return next((i for i, r in enumerate(order) if name == r or name.startswith(r + ".")), None)

    assert [name for name in MODULES if name.startswith("trainer.") and room(name) is None] == [], \
        "a module of trainer/ outside every room: add its room to the order"
    bad = []
    for name in MODULES:
        if not name.startswith("trainer.") or room(name) is None:
            continue
        for target, _, line in IMPORTS[name]:
            if target.startswith("trainer.") and room(target) is not None and room(target) > room(name):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert bad == []


def test_no_private_name_crosses_modules():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {n} from {target}"
           for name in MODULES for target, names, line in IMPORTS[name] for n in names if n.startswith("_")]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    n_lines = len(MODULES[name].read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {n_lines} lines, split it"


def test_entry_points_for_users():
    import trainer
    from trainer.api import AdaptiveSubset
    from trainer.client.api import AdaptiveSubset as client_subset

    assert trainer.AdaptiveSubset is AdaptiveSubset is client_subset
