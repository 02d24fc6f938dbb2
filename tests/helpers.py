"""Helpers for tests that run petune end to end on tiny models.

Recipes: every test builds its recipe through recipe_data (the dict), write_recipe (a TOML file for
the CLI) or validated_recipe (a Recipe for the runner in-process), so a change to the recipe format
is made here. Tests that check the text of a recipe file itself (TOML errors, line numbers,
comments) write that text by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# [strategy] options (beside the name) that keep each strategy small on the tiny models
TINY_STRATEGY_OPTIONS = {
    "full": {},
    "lora": {"r": 4},
    "qlora": {"r": 4, "compute_dtype": "float32"},
    "adapters": {"config": "houlsby", "reduction_factor": 4},
    "prompt_tuning": {"num_virtual_tokens": 4, "init": "random"},
}

# what a test's recipe gets unless it says otherwise: two small steps, no evaluation while training
# (eval={"strategy": "epoch"} asks for petune's own default)
TINY_TRAIN = {"max_steps": 2, "batch_size": 2}
TINY_EVAL = {"strategy": "no"}


def tiny_strategy(name: str, **options) -> dict:
    """A [strategy] table: ``name`` with its TINY_STRATEGY_OPTIONS, then ``options`` over them."""
    return {"name": name, **TINY_STRATEGY_OPTIONS.get(name, {}), **options}


def recipe_data(model: str | Path | dict = "random:tiny-llama", task: dict | None = None, strategy: dict | None = None,
                train: dict | None = None, eval: dict | None = None, output: str | Path | dict | None = None,
                **sections) -> dict:
    """A recipe as the dict its TOML file reads into: the one place tests build recipes.

    ``model``: a model name, or the whole [model] table. ``task`` and ``strategy``: their tables, with
    ``name``. ``train`` and ``eval``: merged over TINY_TRAIN and TINY_EVAL. ``output``: the run folder,
    or the whole [output] table; None leaves [output] out. ``sections``: any other table ([data],
    [distributed]) as given. Paths become strings, as TOML holds them."""
    data = {"model": {"name": model} if isinstance(model, str | Path) else model}
    if task is not None:
        data["task"] = task
    if strategy is not None:
        data["strategy"] = strategy
    data["train"] = {**TINY_TRAIN, **(train or {})}
    data["eval"] = {**TINY_EVAL, **(eval or {})}
    if output is not None:
        data["output"] = output if isinstance(output, dict) else {"dir": output}
    data.update(sections)
    return _plain(data)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def write_recipe(path: Path, **recipe) -> Path:
    """recipe_data(**recipe) written as TOML at ``path``; the run folder defaults to ``run`` beside
    it (``output=None``: no [output] table)."""
    from petune.artifacts import write_toml

    path = Path(path)
    recipe.setdefault("output", path.parent / "run")
    write_toml(path, recipe_data(**recipe))
    return path


def validated_recipe(host, folder: Path, **recipe):
    """recipe_data(**recipe) validated as if read from ``folder``/recipe.toml (data paths resolve
    against ``folder``; the run folder defaults to ``folder``/run), for the runner in-process."""
    from petune.recipe import validate

    recipe.setdefault("output", Path(folder) / "run")
    return validate(recipe_data(**recipe), host, path=Path(folder) / "recipe.toml")


def write_classification_data(folder: Path, n: int = 40) -> None:
    rows = "".join(f"a good movie number {i},pos\na bad film number {i},neg\n" for i in range(n // 2))
    (folder / "train.csv").write_text("text,label\n" + rows)
    (folder / "validation.csv").write_text("text,label\n" + rows[: 200])


def tiny_classification_recipe(folder: Path, out: Path, *, max_steps: int = 20, save_steps: int = 5) -> Path:
    """A LoRA classification run on tiny-bert, its data written beside the recipe."""
    write_classification_data(folder)
    return write_recipe(folder / "recipe.toml", model="random:tiny-bert",
                        task={"name": "classification", "train": "train.csv", "validation": "validation.csv",
                              "max_length": 32},
                        strategy={"name": "lora", "r": 4, "alpha": 8},
                        train={"batch_size": 4, "learning_rate": 1e-3, "seed": 7, "logging_steps": 5,
                               "save_steps": save_steps, "max_steps": max_steps},
                        output=out)


def petune(*args, cwd=REPO, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "petune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False, **kwargs)


def start_petune(*args, cwd=REPO) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "petune", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
