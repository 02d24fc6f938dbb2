"""A finished run folder, read back: its recipe, plugins and task state, and its model rebuilt
from the folder alone (what eval, predict, generate, chat, serve, merge, export and explain use)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petune import artifacts
from petune.api import Strategy, Task
from petune.errors import UserError
from petune.models import load_tokenizer, loading_weights, resolve_model
from petune.plugins import PluginHost
from petune.recipe import Recipe, load_recipe
from petune.trainer_setup import model_dtype


@dataclass
class LoadedRun:
    dir: Path
    recipe: Recipe
    task: Task
    strategy: Strategy
    state: dict
    model: object
    tokenizer: object


def read_finished_run(run_dir: Path, host: PluginHost) -> tuple[Recipe, Task, Strategy, dict]:
    """A finished run's recipe, plugins and task state (nothing heavy loads), or a UserError
    saying what is missing."""
    for needed in ("recipe.toml", "task_state.json", "tokenizer"):
        if not (run_dir / needed).exists():
            raise UserError(f"not a finished petune run (no {needed})", where=str(run_dir),
                            hint="give the output folder of a completed `petune run`")
    recipe = load_recipe(run_dir / "recipe.toml", host, check_paths=False)
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    if not (run_dir / strategy.artifact).exists():
        raise UserError(f"the run has no {strategy.artifact}/ folder (did it finish?)", where=str(run_dir))
    return recipe, task, strategy, artifacts.read_json(run_dir / "task_state.json")


def load_run(run_dir: str | Path, host: PluginHost, *, quantized: bool = True, dequantized: bool = False) -> LoadedRun:
    """Rebuild a finished run's model (base + trained weights) from its folder alone.
    ``dequantized=True``: the base as trained, turned into plain 16/32-bit weights by the
    strategy (for merging and export: the weights the run computed with, merged without
    re-quantising). ``quantized=False``: the original checkpoint in 16/32-bit even for
    4-bit strategies."""
    run_dir = Path(run_dir)
    recipe, task, strategy, state = read_finished_run(run_dir, host)
    info = resolve_model(recipe.model.name, host.model_sources())
    load_kwargs = {"dtype": model_dtype(recipe.model.dtype), "trust_remote_code": False}
    if quantized or dequantized:
        load_kwargs.update(strategy.load_kwargs(recipe.strategy))
    with loading_weights(info.path), host.blame("task", task.name, "build_model"):
        base = task.build_model(info, recipe.task, state, **load_kwargs)
    if dequantized:
        with host.blame("strategy", strategy.name, "dequantize"):
            base = strategy.dequantize(base, recipe.strategy)
    with host.blame("strategy", strategy.name, "restore"):
        model = strategy.restore(base, run_dir / strategy.artifact, task, recipe.strategy)
    if not dequantized:  # merge and export read the weights themselves
        with host.blame("strategy", strategy.name, "for_inference"):
            model = strategy.for_inference(model, recipe.strategy)
    model.eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    return LoadedRun(run_dir, recipe, task, strategy, state, model, tokenizer)


def already_completed(run_dir: Path, strategy: Strategy) -> bool:
    try:
        manifest = artifacts.read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        return False
    return (manifest.get("status") == "completed" and (run_dir / strategy.artifact).exists()
            and (run_dir / "metrics.json").exists())


def keep_first_start(manifest: dict, run_dir: Path) -> None:
    """A resumed run keeps the time it first started; each resume is listed."""
    try:
        before = artifacts.read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        return
    manifest["resumes"] = [*before.get("resumes", []), manifest["started"]]
    manifest["started"] = before.get("started", manifest["started"])
