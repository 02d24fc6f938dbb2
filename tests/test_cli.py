"""The petune command: exit codes, messages without tracebacks, listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_recipe

REPO = Path(__file__).resolve().parents[1]


def petune(*args, cwd=REPO, input=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "petune", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, input=input, check=False)


# written as text: two tests check the line and column their errors name
RECIPE = """\
[model]
name = "random:tiny-bert"

[task]
name = "classification"
train = "train.csv"

[strategy]
name = "lora"
r = 4

[output]
dir = "runs/x"
"""


@pytest.fixture
def recipe_dir(tmp_path) -> Path:
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(10)))
    return tmp_path


def test_plugins_json_lists_every_first_party_plugin():
    result = petune("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(set(r) == {"name", "kind", "package", "version"} for r in rows)
    kinds = {(r["kind"], r["name"]) for r in rows}
    assert {("strategy", s) for s in ("full", "lora", "qlora", "adapters", "prompt_tuning")} <= kinds
    assert {("task", t) for t in ("classification", "ner", "sft")} <= kinds


def valid_recipe(folder: Path) -> Path:
    return write_recipe(folder / "r.toml", model="random:tiny-bert", task={"name": "classification", "train": "train.csv"},
                        strategy={"name": "lora", "r": 4}, output="runs/x")


def test_validate_ok(recipe_dir):
    result = petune("validate", str(valid_recipe(recipe_dir)))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_validate_misspelt_strategy_key_exits_2_with_suggestion(recipe_dir):
    (recipe_dir / "r.toml").write_text(RECIPE.replace("r = 4", "rr = 4"))
    result = petune("validate", str(recipe_dir / "r.toml"))
    assert result.returncode == 2
    assert "strategy.rr: unknown key — did you mean strategy.r?" in result.stderr
    assert "r.toml:10" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_toml_syntax_error_exits_2_with_line_and_column(recipe_dir):
    (recipe_dir / "r.toml").write_text(RECIPE.replace('r = 4', 'r = 4 4'))
    result = petune("validate", str(recipe_dir / "r.toml"))
    assert result.returncode == 2
    assert "line 10, column" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_set_overrides_on_validate(recipe_dir):
    result = petune("validate", str(valid_recipe(recipe_dir)), "--set", "train.learning_rate=-1")
    assert result.returncode == 2 and "train.learning_rate" in result.stderr and "greater than 0" in result.stderr


def test_missing_recipe_file_exits_2():
    result = petune("validate", "nope/none.toml")
    assert result.returncode == 2 and "recipe file not found" in result.stderr


def test_bad_arguments_exit_2():
    assert petune("run").returncode == 2
    assert petune("frobnicate").returncode == 2


def test_recipes_lists_bundled_recipes():
    result = petune("recipes")
    assert result.returncode == 0
    assert "qlora_sft.toml" in result.stdout


def test_env_reports_versions_and_device():
    result = petune("env")
    assert result.returncode == 0
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "pluggy", "device"):
        assert name in result.stdout
