"""Everything between a built model and ``trainer.train()``: the dtypes and precision for this
device, TrainingArguments from [train]/[eval]/[distributed], the task's trainer with petune's
changes, and the strategy's last preparation and optimizer. ``petune run`` and ``petune bench``
both build their trainer with :func:`build_trainer`, so a benchmark measures what users run."""

from __future__ import annotations

from pathlib import Path

from petune import checkpoints, precision, speed
from petune.api import Strategy, Task, TaskData
from petune.console import training_progress_callback
from petune.errors import UserError
from petune.plugins import PluginHost
from petune.recipe import Recipe


def build_trainer(recipe: Recipe, host: PluginHost, task: Task, strategy: Strategy, *, model, tokenizer, data: TaskData,
                  run_dir: Path, model_type: str | None, extra_callbacks: list = ()) -> tuple[object, list]:
    """The task's trainer for this model and data, as a run trains it: arguments from the recipe,
    petune's callbacks (progress, checkpoints, early stopping, the strategy's own, ``extra_callbacks``
    — e.g. the ``trainer_callbacks`` hook's), petune's changes to the trainer, activation offloading, the
    strategy's ``prepare`` and its optimizer. Returns the trainer and its callbacks."""
    args = training_arguments(recipe, run_dir, task, data, model_type=model_type)
    with host.blame("strategy", strategy.name, "trainer_callbacks"):
        own = list(strategy.trainer_callbacks(recipe.strategy))
    callbacks = [training_progress_callback(task.progress_metrics(recipe.task)),
                 *checkpoints.callbacks(recipe.train.save_total_limit), *early_stopping(recipe), *own,
                 *extra_callbacks]
    with host.blame("task", task.name, "make_trainer"):
        trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=recipe.task,
                                    args=args, callbacks=callbacks)
    prepare_trainer(trainer)
    speed.offload_activations(trainer, recipe.train, precision.cuda_device())
    with host.blame("strategy", strategy.name, "prepare"):  # e.g. an initialisation from training batches
        strategy.prepare(trainer.model, task, recipe.strategy, training_batches(trainer), planned_steps(trainer))
    use_strategy_optimizer(trainer, strategy, recipe, host)
    return trainer, callbacks



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
        dataloader_pin_memory=precision.cuda_device(),
        use_cpu=not precision.cuda_device(),
        average_tokens_across_devices=task.token_level_loss,
        **precision_flags(t.precision),
        **speed.training_arguments(t, precision.cuda_device(), model_type),
        **distributed_arguments(recipe),
    )
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
