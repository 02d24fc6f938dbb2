"""The plugin contract holds in the code: the core asks plugins only through petune/api.py,
its modules import each other without a cycle, and it does not import the benchmarks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import write_recipe

from petune.api import Generates, Predicts, Task, require
from petune.errors import UserError

CORE = Path(__file__).resolve().parents[1] / "petune"


def core_sources() -> dict[str, str]:
    return {str(p.relative_to(CORE.parent)): p.read_text(encoding="utf-8") for p in sorted(CORE.rglob("*.py"))}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from petune import cli` imports petune.cli
    return found


def test_no_capability_probes_on_tasks_in_the_core():
    probe = re.compile(r"\b(getattr|hasattr)\(\s*[\w.]*task\b\s*,")
    found = [f"{name}:{i}" for name, text in core_sources().items()
             for i, line in enumerate(text.splitlines(), 1) if probe.search(line)]
    assert not found, f"ask through petune/api.py instead: {found}"


def test_the_core_knows_no_peft_task_types():
    """What differs per task comes from the task (petune/api.py), not from branching on its type."""
    kinds = re.compile(r"""["'](SEQ_CLS|TOKEN_CLS|CAUSAL_LM|SEQ_2_SEQ_LM|QUESTION_ANS)["']""")
    found = [f"{name}:{i}" for name, text in core_sources().items() if name != "petune/api.py"
             for i, line in enumerate(text.splitlines(), 1) if kinds.search(line) or "peft_task_type" in line]
    assert not found, f"ask the task through petune/api.py instead: {found}"


@pytest.mark.parametrize("name", ["max_source_length", "max_target_length", "lora_magnitude_vector",
                                  "trainable_bf16_on_4bit", "init_text"])
def test_the_core_does_not_read_first_party_option_names(name):
    found = [path for path, text in core_sources().items() if name in text]
    assert not found, f"{name!r} belongs to a plugin, read in {found}"


def test_core_imports_have_no_cycle_and_never_the_benchmarks():
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    assert not [name for name, path in modules.items() if any(m.split(".")[0] == "benchmarks"
                                                             for m in imports_of(path))]
    # a module importing its own package's __init__ is how Python loads it, not a cycle
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    cycles, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles in petune/: {cycles}"


class BareTask(Task):
    name = "bare"


def test_a_command_needing_a_capability_the_task_lacks_names_it():
    with pytest.raises(UserError) as info:
        require(BareTask(), Predicts, where="runs/x")
    assert "task 'bare' cannot predict (it does not implement Predicts)" in str(info.value)
    with pytest.raises(UserError, match="cannot generate text"):
        require(BareTask(), Generates)


# -- a third-party task with only the required methods ------------------------------------------
def test_a_minimal_third_party_task_runs_evaluates_estimates_and_is_refused_by_predict_and_serve(tmp_path):
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(CORE.parent / "examples" / "petune-task-example")],
                   check=True, capture_output=True)
    rows = "".join(f"a fine film {i},{i % 5}.0\nnot good at all {i},0.5\n" for i in range(8))
    for name in ("train.csv", "validation.csv"):
        (tmp_path / name).write_text("text,score\n" + rows)
    run_dir = tmp_path / "run"
    write_recipe(tmp_path / "recipe.toml", model="random:tiny-bert",
                 task={"name": "text_regression", "train": "train.csv", "validation": "validation.csv"},
                 strategy={"name": "lora", "r": 4}, train={"batch_size": 4}, eval={"strategy": "epoch"},
                 output=run_dir)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", COLUMNS="200")

    def petune(*args):
        return subprocess.run([sys.executable, "-m", "petune", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600, cwd=tmp_path, check=False)

    trained = petune("run", tmp_path / "recipe.toml")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "mse" in (run_dir / "metrics.json").read_text()
    evaluated = petune("eval", run_dir)
    assert evaluated.returncode == 0 and "mse" in evaluated.stdout, evaluated.stderr[-3000:]
    estimated = petune("estimate", tmp_path / "recipe.toml", "--device", "cpu")
    assert estimated.returncode == 0 and "batch 4 × 128" in estimated.stdout, estimated.stderr[-3000:]
    for command in (["predict", run_dir], ["serve", run_dir, "--port", "0"]):
        refused = petune(*command)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "task 'text_regression' cannot predict (it does not implement Predicts)" in refused.stderr


def test_the_contract_summary_lists_every_method_and_what_is_required():
    """petune/api.py's docstring is the contract at a glance: it must name every method of
    each plugin class, and exactly the ones marked required as required."""
    import re

    from petune import api

    doc = " ".join(api.__doc__.split())
    for cls in (api.Task, api.Strategy, api.ModelSource, api.Reward):
        entry = re.search(rf"\*\*{cls.__name__}\*\* — required: (.*?); optional(?:, with a default)?: (.*?);", doc)
        assert entry, f"no summary line for {cls.__name__}"
        required, optional = (set(re.findall(r"``(\w+)``", part)) for part in entry.groups())
        methods = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
        marked = {n for n in methods if getattr(vars(cls)[n], "__petune_required__", False)}
        assert required - {"name", "Options", "peft_task_type"} == marked, cls.__name__
        assert optional == methods - marked, cls.__name__


def test_a_plugin_missing_a_required_method_is_refused_at_registration():
    from demo_plugins import demo_host, plugin_module

    from petune.api import Task
    from petune.plugins import PluginOrigin

    class HalfTask(Task):
        name = "half"
        peft_task_type = "SEQ_CLS"

        def load_data(self, options, tokenizer):
            raise AssertionError("never called")

    half = plugin_module("half", register_tasks=lambda register: register(HalfTask))
    host = demo_host((PluginOrigin("half-package", "0.1", "half"), half))
    failure = next(str(f) for f in host.failures if "half-package" in str(f))
    assert "HalfTask does not implement build_model, evaluate, make_trainer" in failure
    assert "half" not in host.registry["task"] and host.task("sft").name == "sft"  # the rest works
