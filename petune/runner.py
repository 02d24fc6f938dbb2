"""The pipeline: recipe → model → data → strategy → train → save → evaluate → report.

It knows no concrete strategy or task: everything that varies is a plugin (petune/api.py).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from petune import artifacts, checkpoints, datacache, memory, precision, speed
from petune.api import ModelInfo, Strategy, Task, TaskData, count_parameters, paths_in
from petune.console import err, human_count, is_main_process, key_value_table, metrics_table, out
from petune.errors import UserError
from petune.models import loading_weights, resolve_model
from petune.plugins import PluginHost
from petune.recipe import Recipe
from petune.run_folders import already_completed, keep_first_start
from petune.run_log import RunLog
from petune.runs import plot_learning_rate
from petune.trainer_setup import build_trainer, model_dtype, precision_plan, report_inside_run, world_size


@dataclass
class Run:
    """What lifecycle hooks receive: the plan of one run."""

    recipe: Recipe
    dir: Path
    task: Task
    strategy: Strategy
    model_info: ModelInfo | None = None
    data: TaskData | None = None


@dataclass
class RunResult:
    status: str  # "completed" | "failed" | "interrupted" | "planned"
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0


@dataclass(frozen=True)
class Start:
    """Where training starts: the checkpoint to resume from (None: step 0), whether it had
    already finished training, and whether the whole run had completed (nothing to do)."""

    checkpoint: Path | None = None
    finished: bool = False
    completed: bool = False


# -- the flow -------------------------------------------------------------------------------
def run(recipe: Recipe, host: PluginHost, *, dry_run: bool = False, resume: bool = False, overwrite: bool = False,
        accept_changed_data: bool = False) -> RunResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    log = RunLog()  # what the libraries say, for the run folder's run.log
    try:
        return _run(recipe, host, log, dry_run=dry_run, resume=resume, overwrite=overwrite,
                    accept_changed_data=accept_changed_data)
    finally:
        log.close()


def _run(recipe: Recipe, host: PluginHost, log: RunLog, *, dry_run: bool, resume: bool, overwrite: bool,
         accept_changed_data: bool = False) -> RunResult:
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    check_recipe(recipe, host, task, strategy)  # refuse what is impossible before anything loads
    start = Start() if dry_run else where_to_start(recipe, strategy, resume=resume, overwrite=overwrite)
    if start.completed:
        err.print(f"[green]nothing to do[/]: {recipe.output_dir} is a completed run (resume continues only unfinished runs)")
        return RunResult("completed", metrics=artifacts.read_json(recipe.output_dir / "metrics.json"))
    info = check_model(recipe, host, task, strategy)
    data_used = datacache.data_fingerprint(recipe.task, info.path)
    if start.checkpoint is not None and not accept_changed_data:
        check_same_data(recipe.output_dir, data_used, recipe)
    prepared = prepare_data(recipe, host, task, info)
    model = build_trainable_model(recipe, host, task, strategy, info, prepared.data.state)
    the_run = Run(recipe, recipe.output_dir, task, strategy, info, prepared.data)
    show_plan(the_run, host, model, prepared)
    if dry_run:
        trainable, total = count_parameters(model)
        return RunResult("planned", trainable_parameters=trainable, total_parameters=total)
    return train_and_report(the_run, host, log, model, prepared.tokenizer, start, data_used,
                            resume=resume, overwrite=overwrite)


def train_and_report(run: Run, host: PluginHost, log: RunLog, model, tokenizer, start: Start, data_used: dict, *,
                     resume: bool, overwrite: bool) -> RunResult:
    """Train in the run folder, save what was trained, evaluate it and write the results; the
    manifest says how it ended, whatever happens."""
    recipe = run.recipe
    trainable, total = count_parameters(model)
    check_disk_space(run.dir, recipe, run.strategy, trainable, total)
    if resume:
        err.print(f"resuming from {start.checkpoint}" if start.checkpoint else
                  "[yellow]no valid checkpoint: starting from step 0[/]")
    lock, manifest = open_run_folder(run, host, log, start, data_used, trainable, total, resume=resume,
                                     overwrite=overwrite)
    host.call("on_run_start", run=run)
    result = RunResult("failed", trainable_parameters=trainable, total_parameters=total)
    try:
        report_inside_run(recipe.train.report_to, run.dir)
        trainer, callbacks = build_trainer(
            recipe, host, run.task, run.strategy, model=model, tokenizer=tokenizer, data=run.data, run_dir=run.dir,
            model_type=run.model_info.model_type,
            extra_callbacks=[cb for cbs in host.call("trainer_callbacks", run=run) for cb in cbs])
        train(trainer, start)
        if checkpoints.stop_requested(callbacks):
            result.status, result.error = "interrupted", "stopped by a signal after writing a checkpoint"
            err.print(f"[yellow]stopped[/] at step {trainer.state.global_step}; continue with: "
                      f"petune run {recipe.path} --resume" + "".join(f" --set {o}" for o in recipe.overrides))
            return result
        save_trained(run, trainer, tokenizer)
        result.metrics = evaluate_trained(run, host, trainer)
        result.status = "completed"
        write_results(run, trainer, result.metrics)
        return result
    except KeyboardInterrupt:
        result.status, result.error = "interrupted", "stopped by the user"
        raise
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(exc, recipe) from exc
        raise
    except BaseException as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        close_run_folder(run, host, manifest, lock, result)


# -- the steps --------------------------------------------------------------------------------
def check_recipe(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy) -> None:
    """The checks that need no model: the strategy × task mix and the recipe as a whole."""
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, None, recipe.strategy)
        strategy.check_recipe(recipe)
    speed.check(recipe.train, precision.cuda_device())  # e.g. fused kernels asked for on a CPU


def where_to_start(recipe: Recipe, strategy: Strategy, *, resume: bool, overwrite: bool) -> Start:
    """Make the run folder ready (refusing to replace what petune did not write) and find the
    checkpoint ``--resume`` continues from."""
    run_dir = recipe.output_dir
    if is_main_process():
        artifacts.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, protected=inputs_of(recipe))
    if not resume:
        return Start()
    checkpoint = checkpoints.newest_valid(run_dir)
    finished = checkpoint is not None and checkpoints.training_finished(checkpoint, recipe.train.max_steps,
                                                                        recipe.train.epochs)
    return Start(checkpoint, finished, already_completed(run_dir, strategy) and (finished or checkpoint is None))


def check_model(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy) -> ModelInfo:
    """The model's config, refused by the task or the strategy where they cannot use it."""
    info = resolve_model(recipe.model.name, host.model_sources())
    with host.blame("task", task.name, "check"):
        task.check(info, recipe.task)
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, info, recipe.strategy)
    speed.check(recipe.train, precision.cuda_device(), info.model_type)  # e.g. no fused kernels for this model
    return info


def prepare_data(recipe: Recipe, host: PluginHost, task: Task, info: ModelInfo) -> datacache.Prepared:
    """The task's tokenized data and tokenizer, from the data cache when nothing changed."""
    from transformers import set_seed

    set_seed(recipe.train.seed)  # one seed for data order, head and adapter initialisation
    with host.blame("task", task.name, "load_data"):
        prepared = datacache.prepare(task, "load_data", recipe.task, info.path,
                                     lambda tok: task.load_data(recipe.task, tok), settings=recipe.data,
                                     extra={"seed": recipe.train.seed})
    check_batch_size(recipe, prepared.data)
    return prepared


def build_trainable_model(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy, info: ModelInfo, state: dict):
    load_kwargs = {"dtype": model_dtype(recipe.model.dtype), "trust_remote_code": False,
                   **strategy.load_kwargs(recipe.strategy)}
    with loading_weights(info.path), host.blame("task", task.name, "build_model"):
        model = task.build_model(info, recipe.task, state, **load_kwargs)
    with host.blame("strategy", strategy.name, "apply"):
        return strategy.apply(model, task, recipe.strategy)


def open_run_folder(run: Run, host: PluginHost, log: RunLog, start: Start, data_used: dict, trainable: int, total: int,
                    *, resume: bool, overwrite: bool) -> tuple[object, dict]:
    """Lock the run folder and write what a run folder holds from the start (run.log,
    recipe.toml, task_state.json, manifest.json). Returns the lock and the manifest."""
    lock = None
    if is_main_process():
        lock = artifacts.start_run_dir(run.dir, overwrite=overwrite, resume=resume, protected=inputs_of(run.recipe))
        log.write_to(run.dir / "run.log")
        artifacts.write_toml(run.dir / "recipe.toml", run.recipe.resolved())
        artifacts.write_json(run.dir / "task_state.json", run.data.state)
    manifest = artifacts.new_manifest(run.recipe, host.listing())
    manifest.update(trainable_parameters=trainable, total_parameters=total, data=data_used,
                    resumed_from=str(start.checkpoint) if start.checkpoint else None)
    if resume:
        keep_first_start(manifest, run.dir)
    if is_main_process():
        artifacts.write_json(run.dir / "manifest.json", manifest)
    return lock, manifest


def train(trainer, start: Start) -> None:
    """Train from the start point; a checkpoint that had finished training is only restored."""
    resumed_at = checkpoints.state_of(start.checkpoint)["global_step"] if start.checkpoint else 0
    if start.finished:
        err.print(f"training had reached step {resumed_at}: writing the final artifacts only")
        checkpoints.restore(trainer, start.checkpoint)
        return
    try:
        trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
    finally:
        checkpoints.release_signals()  # where training raised
    whole_run_train_loss(trainer.state.log_history, resumed_at)


def save_trained(run: Run, trainer, tokenizer) -> None:
    if is_main_process():
        artifacts.write_dir(run.dir / run.strategy.artifact, lambda p: run.strategy.save(trainer.model, p))
        artifacts.write_dir(run.dir / "tokenizer", tokenizer.save_pretrained)


def evaluate_trained(run: Run, host: PluginHost, trainer) -> dict:
    with host.blame("strategy", run.strategy.name, "for_inference"):  # nothing trains from here on
        trainer.model = run.strategy.for_inference(trainer.model, run.recipe.strategy)
    with host.blame("task", run.task.name, "evaluate"):
        return run.task.evaluate(trainer, run.data, run.recipe.task, run.dir)


def write_results(run: Run, trainer, metrics: dict) -> None:
    if is_main_process():
        artifacts.write_json(run.dir / "metrics.json", metrics)
        artifacts.write_json(run.dir / "log_history.json", trainer.state.log_history)
        artifacts.plot_loss(trainer.state.log_history, run.dir / "plots" / "loss.png")
        plot_learning_rate(trainer.state.log_history, run.dir / "plots" / "lr.png")
        out.print(metrics_table(f"Results — {run.dir}", metrics))


def close_run_folder(run: Run, host: PluginHost, manifest: dict, lock, result: RunResult) -> None:
    """Record how the run ended (a full disk must not hide the error that matters), release the lock."""
    manifest.update(status=result.status, ended=artifacts.now(), error=result.error)
    if is_main_process():
        try:
            artifacts.write_json(run.dir / "manifest.json", manifest)
        except OSError as exc:
            err.print(f"[yellow]warning[/]: could not update {run.dir / 'manifest.json'}: {exc}")
    if lock is not None:
        lock.release()
    host.call("on_run_end", run=run, result=result)


def inputs_of(recipe: Recipe) -> list[Path]:
    """Files and folders the recipe reads, which ``--overwrite`` must never delete: the
    recipe itself (unless it is the run's own copy) and every path among the options."""
    paths = [] if recipe.path is None else [Path(recipe.path)]
    if paths and paths[0].resolve() == (recipe.output_dir / "recipe.toml").resolve():
        paths = []  # re-running a run's own recipe.toml: it is rewritten, nothing is lost
    paths += [*paths_in(recipe.task), *paths_in(recipe.strategy)]
    model = Path(recipe.model.name).expanduser()
    return paths + ([model] if model.exists() else [])


def check_same_data(run_dir: Path, data_used: dict, recipe: Recipe) -> None:
    """``--resume`` continues on the data the checkpoint was trained on: a changed file, task
    option or tokenizer is a user error naming it (a run from before petune recorded its data
    has nothing to compare)."""
    try:
        before = artifacts.read_json(run_dir / "manifest.json").get("data")
    except (OSError, ValueError, AttributeError):
        before = None
    changes = datacache.data_changes(before, data_used) if isinstance(before, dict) else []
    if changes:
        again = f"petune run {recipe.path} --resume" + "".join(f" --set {o}" for o in recipe.overrides)
        raise UserError("--resume refused: the run's data changed since it started: " + "; ".join(changes),
                        where=str(run_dir / "manifest.json"),
                        hint=f"restore the data the run started on, continue on the new data on purpose with "
                             f"{again} --accept-changed-data, or start over with --overwrite")


def whole_run_train_loss(log_history: list[dict], resumed_at: int) -> None:
    """The trainer's final ``train_loss`` averages only the steps since the resume; make it
    cover the whole run. Steps before the resume are taken from the logged losses (each
    the mean over its logging interval; exact when save_steps is a multiple of logging_steps)."""
    final = next((h for h in reversed(log_history) if "train_loss" in h), None)
    if final is None or not 0 < resumed_at < final["step"]:
        return
    before, previous = 0.0, 0
    for h in log_history:
        if "loss" in h and previous < h["step"] <= resumed_at:
            before += h["loss"] * (h["step"] - previous)
            previous = h["step"]
    if previous < resumed_at and previous > 0:  # unlogged tail before the checkpoint: its last logged mean
        before += before / previous * (resumed_at - previous)
    segment = final["train_loss"] * (final["step"] - resumed_at)
    final["train_loss"] = (before + segment) / final["step"]


def disk_full(exc: OSError, recipe: Recipe) -> UserError:
    saved = checkpoints.newest_valid(recipe.output_dir)
    resume = f"petune run {recipe.path} --resume" + "".join(f" --set {o}" for o in recipe.overrides)
    return UserError(f"the disk is full ({exc.filename or 'while writing'}): "
                     + (f"the newest whole checkpoint is {saved}" if saved else "no checkpoint was saved yet"),
                     where=str(recipe.output_dir),
                     hint=f"free some space, then continue with: {resume}" if saved else
                          "free some space (or lower train.save_total_limit) and run again")






def check_batch_size(recipe: Recipe, data: TaskData) -> None:
    n = len(data.train)
    if n == 0:
        raise UserError("the training set is empty after loading", where="task.train")
    if recipe.train.batch_size > n:
        raise UserError(f"batch_size {recipe.train.batch_size} is larger than the training set ({n} examples)",
                        where="train.batch_size", hint=f"use train.batch_size <= {n}, or more training data")


def check_disk_space(run_dir: Path, recipe: Recipe, strategy: Strategy, trainable: int, total: int) -> None:
    """Refuse to start a run whose checkpoints and artifacts cannot fit on the disk."""
    import shutil

    # per checkpoint: trainable weights (fp32) + two Adam states; full models also save every weight
    checkpoint = trainable * 12 + (total * 4 if strategy.artifact == "model" else 0)
    final = trainable * 4 + (total * 4 if strategy.artifact == "model" else 0)
    needed = checkpoint * (recipe.train.save_total_limit + 1) + final + 50 * 2**20
    # on --resume the run's own checkpoints are rotated out as new ones arrive: their space counts as free
    needed -= artifacts.folder_size(run_dir / "checkpoints")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        from petune.console import human_bytes

        raise UserError(f"not enough disk space: the run needs about {human_bytes(needed)} "
                        f"({recipe.train.save_total_limit} checkpoints of {human_bytes(checkpoint)} + final artifacts), "
                        f"{human_bytes(free)} is free", where=str(parent),
                        hint="free some space, lower train.save_total_limit, or set output.dir on a larger disk")


def show_plan(run: Run, host: PluginHost, model, prepared: datacache.Prepared) -> None:
    """The plan: what trains on what, how, and what the plugins say it will cost."""
    if not is_main_process():
        return
    r, data = run.recipe, run.data
    trainable, total = count_parameters(model)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in
                      (("train", data.train), ("validation", data.validation), ("test", data.test)) if split is not None)
    per_step = r.train.batch_size * world_size() * r.train.grad_accum
    rows = [
        ("model", f"{r.model.name}  ({run.model_info.model_type}, {run.model_info.path})"),
        ("task", f"{r.task_name}  {_options_text(r.task)}"),
        ("strategy", f"{r.strategy_name}  {_options_text(r.strategy, run.strategy.resolved_options(r.strategy))}"),
        ("data", sizes),
        ("parameters", f"{human_count(trainable)} trainable of {human_count(total)} ({100 * trainable / max(total, 1):.3f}%)"),
        ("batch", f"{r.train.batch_size} per device × {world_size()} process(es) × grad_accum {r.train.grad_accum} = "
                  + f"{per_step} per step"),
        ("distributed", r.distributed.backend if world_size() > 1 else "single process"),
        ("schedule", f"max_steps {r.train.max_steps}" if r.train.max_steps else f"{r.train.epochs:g} epochs"),
        ("output", str(run.dir)),
    ]
    with host.blame("task", run.task.name, "training_plan"):
        rows += run.task.training_plan(model, prepared.tokenizer, r.task).items()
    with host.blame("strategy", run.strategy.name, "training_plan"):  # e.g. what an initialisation costs
        rows += run.strategy.training_plan(r.strategy).items()
    rows += [("speed", speed.plan(r.train, precision.cuda_device(), run.model_info.model_type)), *precision_plan(r),
             memory.plan_row(r, host, run.model_info), ("data cache", prepared.note)]
    rows += [(f"note: {k}", v) for k, v in data.notes.items()]
    err.print(key_value_table("Plan", rows))


def _options_text(options, resolved: dict[str, str] | None = None) -> str:
    """``key=value`` for each set option; ``resolved`` replaces the values chosen on this machine."""
    values = {**options.model_dump(mode="json"), **(resolved or {})}
    return " ".join(f"{k}={v}" for k, v in values.items() if v is not None)
