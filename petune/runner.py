"""The pipeline: recipe → model → data → strategy → train → save → evaluate → report.

It knows no concrete strategy or task: everything that varies is a plugin (petune/api.py).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from petune import artifacts, checkpoints, datacache, memory, precision, speed
from petune.api import ModelInfo, Strategy, Task, TaskData, count_parameters, paths_in
from petune.console import (
    err,
    human_count,
    is_main_process,
    key_value_table,
    metrics_table,
    out,
    training_progress_callback,
)
from petune.errors import UserError
from petune.models import load_tokenizer, loading_weights, resolve_model
from petune.plugins import PluginHost
from petune.recipe import Recipe, load_recipe
from petune.run_log import RunLog
from petune.runs import plot_learning_rate


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
    run_dir = recipe.output_dir
    if not dry_run and is_main_process():
        artifacts.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, protected=inputs_of(recipe))
    resume_from = checkpoints.newest_valid(run_dir) if resume and not dry_run else None
    finished = resume_from is not None and checkpoints.training_finished(resume_from, recipe.train.max_steps,
                                                                         recipe.train.epochs)
    if resume and not dry_run and already_completed(run_dir, strategy) and (finished or resume_from is None):
        err.print(f"[green]nothing to do[/]: {run_dir} is a completed run (resume continues only unfinished runs)")
        return RunResult("completed", metrics=artifacts.read_json(run_dir / "metrics.json"))

    info = resolve_model(recipe.model.name, host.model_sources())
    with host.blame("task", task.name, "check"):
        task.check(info, recipe.task)
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, info, recipe.strategy)
    data_used = datacache.data_fingerprint(recipe.task, info.path)
    if resume_from is not None and not accept_changed_data:
        check_same_data(run_dir, data_used, recipe)

    from transformers import set_seed

    set_seed(recipe.train.seed)  # one seed for data order, head and adapter initialisation
    with host.blame("task", task.name, "load_data"):  # from the data cache when nothing changed
        prepared = datacache.prepare(task, "load_data", recipe.task, info.path,
                                     lambda tok: task.load_data(recipe.task, tok), settings=recipe.data,
                                     extra={"seed": recipe.train.seed})
    data, tokenizer = prepared.data, prepared.tokenizer
    check_batch_size(recipe, data)
    model = build_trainable_model(recipe, host, task, strategy, info, data.state)
    trainable, total = count_parameters(model)
    the_run = Run(recipe, run_dir, task, strategy, info, data)
    with host.blame("task", task.name, "training_plan"):
        training_rows = list(task.training_plan(model, tokenizer, recipe.task).items())
    with host.blame("strategy", strategy.name, "training_plan"):  # e.g. what an initialisation costs
        training_rows += list(strategy.training_plan(recipe.strategy).items())
    training_rows += [("speed", speed.plan(recipe.train, _has_cuda(), info.model_type)), *precision_plan(recipe)]
    show_plan(the_run, trainable, total, extra=[*training_rows, memory.plan_row(recipe, host, info), ("data cache", prepared.note)])
    if dry_run:
        return RunResult("planned", trainable_parameters=trainable, total_parameters=total)

    check_disk_space(run_dir, recipe, strategy, trainable, total)
    if resume:
        err.print(f"resuming from {resume_from}" if resume_from else "[yellow]no valid checkpoint: starting from step 0[/]")
    lock = None
    if is_main_process():
        lock = artifacts.start_run_dir(run_dir, overwrite=overwrite, resume=resume, protected=inputs_of(recipe))
        log.write_to(run_dir / "run.log")
        artifacts.write_toml(run_dir / "recipe.toml", recipe.resolved())
        artifacts.write_json(run_dir / "task_state.json", data.state)
    manifest = artifacts.new_manifest(recipe, host.listing())
    manifest.update(trainable_parameters=trainable, total_parameters=total, resumed_from=str(resume_from) if resume_from else None,
                    data=data_used)
    if resume:
        keep_first_start(manifest, run_dir)
    if is_main_process():
        artifacts.write_json(run_dir / "manifest.json", manifest)
    host.call("on_run_start", run=the_run)

    result = RunResult("failed", trainable_parameters=trainable, total_parameters=total)
    try:
        args = training_arguments(recipe, run_dir, task, data, model_type=info.model_type)
        callbacks = [training_progress_callback(), *checkpoints.callbacks(recipe.train.save_total_limit),
                     *early_stopping(recipe)]
        callbacks += [cb for cbs in host.call("trainer_callbacks", run=the_run) for cb in cbs]
        with host.blame("task", task.name, "make_trainer"):
            trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=recipe.task,
                                        args=args, callbacks=callbacks)
        prepare_trainer(trainer)
        speed.offload_activations(trainer, recipe.train, _has_cuda())
        with host.blame("strategy", strategy.name, "prepare"):  # e.g. an initialisation from training batches
            strategy.prepare(trainer.model, task, recipe.strategy, training_batches(trainer), planned_steps(trainer))
        use_strategy_optimizer(trainer, strategy, recipe, host)
        resumed_at = checkpoints.state_of(resume_from)["global_step"] if resume_from else 0
        if finished:
            err.print(f"training had reached step {resumed_at}: writing the final artifacts only")
            checkpoints.restore(trainer, resume_from)
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            whole_run_train_loss(trainer.state.log_history, resumed_at)
        if checkpoints.stop_requested(callbacks):
            result.status, result.error = "interrupted", "stopped by a signal after writing a checkpoint"
            err.print(f"[yellow]stopped[/] at step {trainer.state.global_step}; continue with: "
                      f"petune run {recipe.path} --resume" + "".join(f" --set {o}" for o in recipe.overrides))
            return result

        if is_main_process():
            artifacts.write_dir(run_dir / strategy.artifact, lambda p: strategy.save(trainer.model, p))
            artifacts.write_dir(run_dir / "tokenizer", tokenizer.save_pretrained)
        with host.blame("strategy", strategy.name, "for_inference"):  # nothing trains from here on
            trainer.model = strategy.for_inference(trainer.model, recipe.strategy)
        with host.blame("task", task.name, "evaluate"):
            result.metrics = task.evaluate(trainer, data, recipe.task, run_dir)
        result.status = "completed"
        if is_main_process():
            artifacts.write_json(run_dir / "metrics.json", result.metrics)
            artifacts.write_json(run_dir / "log_history.json", trainer.state.log_history)
            artifacts.plot_loss(trainer.state.log_history, run_dir / "plots" / "loss.png")
            plot_learning_rate(trainer.state.log_history, run_dir / "plots" / "lr.png")
            out.print(metrics_table(f"Results — {run_dir}", result.metrics))
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
        manifest.update(status=result.status, ended=artifacts.now(), error=result.error)
        if is_main_process():
            try:
                artifacts.write_json(run_dir / "manifest.json", manifest)
            except OSError as exc:  # a full disk must not hide the error that matters
                err.print(f"[yellow]warning[/]: could not update {run_dir / 'manifest.json'}: {exc}")
        if lock is not None:
            lock.release()
        host.call("on_run_end", run=the_run, result=result)


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


def check_recipe(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy) -> None:
    """The checks that need no model: the strategy × task mix and the recipe as a whole."""
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, None, recipe.strategy)
        strategy.check_recipe(recipe)
    speed.check(recipe.train, _has_cuda())  # e.g. fused kernels asked for on a CPU


def build_trainable_model(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy, info: ModelInfo, state: dict):
    load_kwargs = {"dtype": model_dtype(recipe.model.dtype), "trust_remote_code": False,
                   **strategy.load_kwargs(recipe.strategy)}
    with loading_weights(info.path), host.blame("task", task.name, "build_model"):
        model = task.build_model(info, recipe.task, state, **load_kwargs)
    with host.blame("strategy", strategy.name, "apply"):
        return strategy.apply(model, task, recipe.strategy)


# -- loading a finished run -----------------------------------------------------------------
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


# -- pieces ---------------------------------------------------------------------------------
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_dtype(name: str):
    """The dtype weights load in: [model] dtype, "auto" chosen for this device (petune/precision.py)."""
    return precision.resolve(name, weights=True).torch_dtype


def precision_flags(setting: str) -> dict:
    """TrainingArguments' bf16/fp16 flags for [train] precision; "auto" trains in the
    dtype the device computes natively."""
    setting = precision.training_precision(setting)
    return {"bf16": setting == "bf16", "fp16": setting == "fp16"}


def precision_plan(recipe: Recipe) -> list[tuple[str, str]]:
    """Plan rows: the dtype weights load in, the training precision, and a warning for an
    explicit choice this device would emulate (petune/precision.py)."""
    weights = precision.resolve(recipe.model.dtype, weights=True)
    flags = precision_flags(recipe.train.precision)
    training = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
    how = "auto" if recipe.train.precision == "auto" else "set in the recipe"
    rows = [("precision", f"weights {weights}, training {training} ({how})")]
    for setting, dtype in (("model.dtype", weights.dtype),
                           ("train.precision", {"bf16": "bfloat16", "fp16": "float16"}.get(training))):
        warning = dtype and precision.emulation_warning(dtype, setting)
        if warning:
            rows.append(("warning", warning))
    return rows


def training_arguments(recipe: Recipe, run_dir: Path, task: Task, data: TaskData, model_type: str | None = None) -> dict:
    """transformers.TrainingArguments keyword arguments from [train] and [eval] (``model_type``:
    the base model's, for the fused kernels; None leaves that to transformers)."""
    t, e = recipe.train, recipe.eval
    eval_strategy = e.strategy if data.validation is not None else "no"
    metric = e.metric or task.primary_metric_for(recipe.task)
    keep_best = e.early_stopping_patience is not None and eval_strategy != "no"
    args = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=e.steps,
        save_strategy=eval_strategy if keep_best else "steps",
        save_steps=e.steps if keep_best and eval_strategy == "steps" else t.save_steps,
        save_total_limit=None,  # petune deletes old checkpoints only after marking the new one (checkpoints.rotate)
        load_best_model_at_end=keep_best,
        metric_for_best_model=metric,
        greater_is_better=not metric.endswith("loss") and metric != "perplexity",
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_cuda(),
        use_cpu=not _has_cuda(),
        average_tokens_across_devices=task.token_level_loss,
        **precision_flags(t.precision),
        **speed.training_arguments(t, _has_cuda(), model_type),
        **distributed_arguments(recipe),
    )
    report_inside_run(t.report_to, run_dir)
    return args


def report_inside_run(report_to: list[str], run_dir: Path) -> None:
    """Experiment trackers log into the run folder, and wandb stays offline without an API key."""
    import os

    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "wandb" in report_to:
        os.environ["WANDB_DIR"] = str(run_dir)
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
    if "mlflow" in report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())


def distributed_arguments(recipe: Recipe) -> dict:
    """FSDP / DeepSpeed settings for the HF Trainer; DDP needs none (the launcher sets it up)."""
    d = recipe.distributed
    if d.backend == "fsdp":
        f = d.fsdp
        return {"fsdp": f"{f.sharding_strategy} auto_wrap" + (" offload" if f.cpu_offload else ""),
                "fsdp_config": {"activation_checkpointing": f.activation_checkpointing,
                                "use_orig_params": f.use_orig_params, "cpu_ram_efficient_loading": True}}
    if d.backend == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("distributed.backend = 'deepspeed' needs the deepspeed package", where="distributed.backend",
                            hint="pip install deepspeed (on the GPU machines), or use backend 'fsdp'") from None
        ds = d.deepspeed
        if ds.config_file is not None:
            return {"deepspeed": str(ds.config_file)}
        zero: dict = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {"deepspeed": {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "train_batch_size": "auto"}}
    return {}


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_trainer(trainer) -> None:
    """What petune changes on every Trainer it drives (runs, eval, benchmarks)."""
    remove_trainer_printing(trainer)
    count_parameters_once(trainer)


def training_batches(trainer):
    """The trainer's own training batches (its sampler, collator and batch size), on the
    model's device; lazy: no data loader is built until the first batch is asked for."""
    import torch

    for batch in trainer.get_train_dataloader():
        yield {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def planned_steps(trainer) -> int | None:
    """The optimizer steps the run will take, as the trainer will count them (max_steps, or
    epochs × steps per epoch); None when it cannot tell (a data loader without a length)."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    try:
        steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    except (TypeError, AttributeError, ValueError):
        return None
    return steps if isinstance(steps, int) and steps > 0 else None


def use_strategy_optimizer(trainer, strategy: Strategy, recipe: Recipe, host: PluginHost) -> None:
    """The strategy's own optimizer (``Strategy.make_optimizer``), built with the recipe's
    optimizer class and settings; the trainer keeps it and checkpoints its state."""
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    optimizer_kwargs = {"weight_decay": trainer.args.weight_decay, **optimizer_kwargs}
    with host.blame("strategy", strategy.name, "make_optimizer"):
        optimizer = strategy.make_optimizer(trainer.model, recipe.strategy, optimizer_cls, optimizer_kwargs)
    if optimizer is not None:
        trainer.optimizer = optimizer


def remove_trainer_printing(trainer) -> None:
    """Our rich progress bar replaces the trainer's own printing of raw log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)


def count_parameters_once(trainer) -> None:
    """The Trainer's FLOP counter (for ``total_flos``) walks every parameter on every step:
    2.6 ms per step on a 20M-parameter model, measured in the CPU benchmark. The count does
    not change while training, so take it once."""
    model = trainer.model
    name = getattr(model, "main_input_name", "input_ids")
    if not hasattr(model, "num_parameters"):
        return
    count = []

    def floating_point_ops(inputs) -> int:
        if name not in inputs:
            return 0
        if not count:
            count.append(model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[name].numel() * count[0]

    trainer.floating_point_ops = floating_point_ops


def early_stopping(recipe: Recipe) -> list:
    if recipe.eval.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=recipe.eval.early_stopping_patience)]


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
    needed -= folder_size(run_dir / "checkpoints")
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


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def show_plan(run: Run, trainable: int, total: int, extra: list[tuple[str, str]] = ()) -> None:
    if not is_main_process():
        return
    r = run.recipe
    data = run.data
    sizes = ", ".join(f"{name} {len(split)}" for name, split in
                      (("train", data.train), ("validation", data.validation), ("test", data.test)) if split is not None)
    rows = [
        ("model", f"{r.model.name}  ({run.model_info.model_type}, {run.model_info.path})"),
        ("task", f"{r.task_name}  {_options_text(r.task)}"),
        ("strategy", f"{r.strategy_name}  {_options_text(r.strategy, run.strategy.resolved_options(r.strategy))}"),
        ("data", sizes),
        ("parameters", f"{human_count(trainable)} trainable of {human_count(total)} ({100 * trainable / max(total, 1):.3f}%)"),
        ("batch", f"{r.train.batch_size} per device × {world_size()} process(es) × grad_accum {r.train.grad_accum}"
                  f" = {r.train.batch_size * world_size() * r.train.grad_accum} per step"),
        ("distributed", r.distributed.backend if world_size() > 1 else "single process"),
        ("schedule", f"max_steps {r.train.max_steps}" if r.train.max_steps else f"{r.train.epochs:g} epochs"),
        ("output", str(run.dir)),
    ]
    rows += list(extra)
    rows += [(f"note: {k}", v) for k, v in data.notes.items()]
    err.print(key_value_table("Plan", rows))


def _options_text(options, resolved: dict[str, str] | None = None) -> str:
    """``key=value`` for each set option; ``resolved`` replaces the values chosen on this machine."""
    values = {**options.model_dump(mode="json"), **(resolved or {})}
    return " ".join(f"{k}={v}" for k, v in values.items() if v is not None)
