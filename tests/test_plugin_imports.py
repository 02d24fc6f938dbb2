"""The first-party plugins use each other through public names only (issue 34, item 3): no
``from petune_plugins.x import _private`` and no ``module._private`` across modules, and a
module that declares ``__all__`` is used only through the names it lists. A package's
``_common`` modules are shared by their siblings on purpose (their names are public to them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "petune_plugins"
PACKAGE = "petune_plugins"
#: the modules a new causal-LM task (e.g. GRPO) builds on: each states its public API
SHARED = ("tasks.causal_lm", "tasks.chat_records", "tasks.chat_templates", "tasks.sft", "tasks.preference")


def module_name(path: Path) -> str:
    parts = path.relative_to(PLUGINS).with_suffix("").parts
    return ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def module_file(name: str) -> Path | None:
    """The file of a module under ``petune_plugins`` (None when it is not one)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = PLUGINS.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def declared_all(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, importer: str) -> list[str]:
    """Private names (and names missing from ``__all__``) that ``importer``'s source takes from
    other first-party plugin modules."""
    found = []
    modules: dict[str, str] = {}  # local alias -> plugin module it names
    package = importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            target = module_file(node.module)
            if target is None:
                continue
            exported = declared_all(target)
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if module_file(submodule) is not None:  # a module, not a name
                    modules[alias.asname or alias.name] = submodule
                    if private(alias.name) and node.module != package:
                        found.append(f"line {node.lineno}: imports the private module {submodule} of another package")
                    continue
                if private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                elif exported is not None and alias.name not in exported and node.module != importer:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name} (not in its __all__)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if module_file(alias.name) is not None and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and modules[node.value.id] != importer:
            if private(node.attr):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
            else:
                exported = declared_all(module_file(modules[node.value.id]))
                if exported is not None and node.attr not in exported and \
                        module_file(f"{modules[node.value.id]}.{node.attr}") is None:
                    found.append(f"line {node.lineno}: {node.value.id}.{node.attr} (not in its __all__)")
    return found


def plugin_files() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugins_import_only_public_names_of_each_other(path):
    assert violations(path.read_text(encoding="utf-8"), module_name(path)) == []


def test_the_check_catches_private_imports_and_attributes():
    source = ("from petune_plugins.tasks.sft import _BadRow, SftTask\n"
              "from petune_plugins.tasks import sft, _common\n"
              "from petune_plugins.tasks.causal_lm import not_exported\n"
              "sft._template_for(None, {})\n"
              "sft.SftTask\n")
    found = violations(source, "petune_plugins.tasks.reward")
    assert [f.split(": ", 1)[1] for f in found] == [
        "from petune_plugins.tasks.sft import _BadRow",
        "from petune_plugins.tasks.causal_lm import not_exported (not in its __all__)",
        "sft._template_for",
    ]
    # another package's _common is private to it
    assert violations("from petune_plugins.strategies import _common\n", "petune_plugins.tasks.sft")


@pytest.mark.parametrize("name", SHARED)
def test_shared_modules_declare_a_public_api_that_exists(name):
    import importlib

    exported = declared_all(module_file(f"{PACKAGE}.{name}"))
    assert exported, f"{name} has no __all__"
    module = importlib.import_module(f"{PACKAGE}.{name}")
    assert [n for n in exported if not hasattr(module, n)] == []
    assert not [n for n in exported if private(n)]
