"""The floors of the house, checked from the imports: nothing imports upward.

docs/architecture.md states the same order. A module may import its own
component and anything on a lower floor; ``inference`` imports nothing of the
app at all (it reports through hooks), and the pure rules (``routing``,
``conversation``) never touch Matrix libraries or the database.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hivebridge"

#: Bottom to top; a component is a top-level module or package of hivebridge.
FLOORS: list[set[str]] = [
    {"config", "logs", "metrics", "utc", "reload", "bounded"},
    {"db"},
    {"permissions", "registration", "security", "web"},
    {"inference", "matrix"},
    {"conversation", "routing", "catalogue", "devserver"},
    {"personas"},
    {"commands"},
    {"handler", "admin"},
    {"app"},
    {"demo", "cli", "console", "__main__"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
PURE = {"routing", "conversation"}


def component(module: str) -> str:
    """``hivebridge.personas.replies`` -> ``personas``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
            found += [f"{name}.{alias.name}" for alias in node.names if node.module is None]
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def test_every_component_has_a_floor() -> None:
    missing = {component(m) for m, _ in modules()} - set(FLOOR) - {""}
    assert not missing, f"give these a floor in FLOORS and docs/architecture.md: {missing}"


def test_nothing_imports_upward() -> None:
    upward = []
    for module, path in modules():
        mine = component(module)
        if not mine:
            continue
        for imported in imports_of(path):
            if not imported.startswith("hivebridge."):
                continue
            theirs = component(imported)
            if theirs != mine and FLOOR[theirs] > FLOOR[mine]:
                upward.append(f"{module} -> {imported}")
    assert not upward, "\n".join(upward)


def test_inference_knows_nothing_of_the_app() -> None:
    leaks = [
        f"{module} -> {imported}"
        for module, path in modules()
        if component(module) == "inference"
        for imported in imports_of(path)
        if imported.startswith("hivebridge.") and component(imported) != "inference"
    ]
    assert not leaks, "\n".join(leaks)


def test_pure_rules_touch_no_matrix_library_or_database() -> None:
    leaks = [
        f"{module} -> {imported}"
        for module, path in modules()
        if component(module) in PURE
        for imported in imports_of(path)
        if imported.split(".")[0] in ("mautrix", "aiohttp", "asyncpg")
        or imported.startswith("hivebridge.db")
    ]
    assert not leaks, "\n".join(leaks)


def test_commands_are_imported_only_by_the_handler_and_the_root() -> None:
    """The two doors into the bridge (Matrix and the admin API) run commands, and the root."""
    allowed = {"commands", "handler", "admin", "app"}
    found = [
        f"{module} -> {imported}"
        for module, path in modules()
        if component(module) not in allowed
        for imported in imports_of(path)
        if imported.startswith("hivebridge.commands")
    ]
    assert not found, "\n".join(found)
