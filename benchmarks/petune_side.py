"""The petune side: the pipeline of ``petune.runner.run``, step by step, on synthetic data.

Everything a real run does per step is here — the recipe is validated by petune's schemas,
the model is built by ``runner.build_trainable_model`` (the task plugin's ``build_model``
with the strategy plugin's ``load_kwargs``, then the strategy's ``apply``), the trainer is
the task plugin's ``make_trainer`` with ``runner.training_arguments`` and the runner's
callbacks (progress bar, checkpoint marking, signal handling) — except reading data files:
the task gets a fixed-length synthetic dataset instead, the same rows as the baseline.

Real-length cases (``case.data``): the task reads that Alpaca file itself (``load_data``, as
``petune run`` does) with petune's defaults — loss on the answers, padding-free batches where
the model keeps a row's examples apart (else padded), or packed rows for the variant
``packing`` — and the Alpaca chat template, the layout the baseline writes by hand, so both
sides train on the same tokens. The variant ``no-kernels`` sets ``train.kernels = "off"``
(petune's default uses Liger's fused kernels where they are installed on a GPU). The variant
``no-cpu-bf16`` runs with ``PETUNE_CPU_BF16=0``: what "auto" picks on a CPU without native
bf16 (float32), measured on one that has it.

Two deliberate differences from ``petune run``, both outside the measured steps:
checkpoints are not written (``save_strategy = "no"``: the final checkpoint would come after
the last measured step) and nothing is evaluated after training.
"""

from __future__ import annotations

from pathlib import Path

from .harness import (
    Case,
    Meter,
    StepClock,
    TokenCounter,
    count_training_steps,
    dir_size,
    model_dtypes,
    result_record,
    set_threads,
    synthetic_rows,
    trainer_clock_callback,
)
from .shapes import SHAPES, model_path


def recipe_data(case: Case, model: str, data_file: Path) -> dict:
    """The recipe this case stands for, as a TOML-shaped dict."""
    shape = SHAPES[case.shape]
    task = {"name": shape.task, "train": str(data_file), "max_length": case.seq}
    if case.data:
        task.update(train=case.data, format="alpaca", chat_template="alpaca", validation_split=0.0)
        if case.variant == "packing":
            task["packing"] = True
    if shape.task == "sft":
        task["num_sample_generations"] = 0
    else:
        task["validation_split"] = 0.0
    return {
        "model": {"name": model, "dtype": "auto"},
        "task": task,
        "strategy": {"name": case.strategy, **case.strategy_options},
        "train": {"max_steps": case.total_steps, "batch_size": case.batch, "learning_rate": 2e-4,
                  "gradient_checkpointing": case.gradient_checkpointing, "optimizer": case.optimizer,
                  "precision": "auto", **({"kernels": "off"} if case.variant == "no-kernels" else {})},
        "eval": {"strategy": "no"},
        "output": {"dir": str(Path(case.work_dir) / "run")},
    }


def synthetic_task_data(case: Case, tokenizer, vocab_size: int):
    from datasets import Dataset

    from petune.api import TaskData

    shape = SHAPES[case.shape]
    rows = synthetic_rows(case, vocab_size, shape.family, tokenizer.pad_token_id)
    if shape.family == "llama":
        eos = tokenizer.eos_token_id
        state = {"format": "synthetic", "chat_template": "plain", "pad_token_id": tokenizer.pad_token_id,
                 "pad_token": tokenizer.pad_token, "stop_tokens": [tokenizer.eos_token],
                 "stop_token_ids": [eos] if eos is not None else [], "loss_on": "all", "max_length": case.seq}
    else:
        state = {"labels": ["0", "1"], "max_length": case.seq, "pad_token_id": tokenizer.pad_token_id,
                 "text_pair": False}
    return TaskData(train=Dataset.from_dict(rows), state=state, notes={"synthetic_rows": len(rows["input_ids"])})


def run(case: Case) -> dict:
    if case.variant == "no-cpu-bf16":  # this process only: a case runs in a process of its own
        import os

        from petune import precision

        os.environ["PETUNE_CPU_BF16"] = "0"
        precision.cpu_native_bf16.cache_clear()
    meter = Meter(case.device)
    meter.start()
    set_threads(case)
    from transformers import AutoConfig, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    from petune import checkpoints, runner
    from petune.api import count_parameters
    from petune.console import training_progress_callback
    from petune.models import resolve_model
    from petune.plugins import PluginHost
    from petune.recipe import validate

    hf_logging.disable_progress_bar()  # as runner.run does
    host = PluginHost()
    work = Path(case.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / ("synthetic.jsonl" if SHAPES[case.shape].task == "sft" else "synthetic.csv")
    data_file.write_text('{"prompt": "a", "completion": "b"}\n' if data_file.suffix == ".jsonl" else "text,label\na,0\nb,1\n")

    path = model_path(case.shape)
    # the Quickstart case names its model as the recipe does: resolved through petune's sources
    model_name = SHAPES[case.shape].source if case.own_defaults else str(path)
    recipe = validate(recipe_data(case, model_name, data_file), host, check_paths=False)
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    if hasattr(runner, "check_recipe"):
        runner.check_recipe(recipe, host, task, strategy)
    else:
        strategy.check(task, None, recipe.strategy)
    info = resolve_model(recipe.model.name, host.model_sources())
    task.check(info, recipe.task)
    strategy.check(task, info, recipe.strategy)

    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    vocab = AutoConfig.from_pretrained(info.path).vocab_size
    data = task.load_data(recipe.task, tokenizer) if case.data else synthetic_task_data(case, tokenizer, vocab)
    if hasattr(runner, "check_batch_size"):
        runner.check_batch_size(recipe, data)
    model = runner.build_trainable_model(recipe, host, task, strategy, info, data.state)
    trainable, total = count_parameters(model)

    args = runner.training_arguments(recipe, recipe.output_dir, task, data)
    args["save_strategy"] = "no"  # see the module docstring
    clock = StepClock(case.device)
    memory: dict = {}
    callbacks = [training_progress_callback(), *checkpoints.callbacks(), *runner.early_stopping(recipe)]
    the_run = runner.Run(recipe, recipe.output_dir, task, strategy, info, data)
    callbacks += [cb for cbs in host.call("trainer_callbacks", run=the_run) for cb in cbs]  # installed plugins'
    callbacks.append(trainer_clock_callback(case, clock, meter, memory))
    trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=recipe.task, args=args,
                                callbacks=callbacks)
    runner.prepare_trainer(trainer)
    if case.variant == "plain-loss":
        _plain_loss(trainer)
    elif case.variant not in ("", "packing", "no-kernels", "no-cpu-bf16") or (case.variant == "packing" and not case.data):
        raise ValueError(f"unknown petune variant {case.variant!r}" + (" (packing needs real-length data)"
                                                                       if case.variant == "packing" else ""))
    counter = TokenCounter() if case.data else None
    if counter is not None:
        count_training_steps(trainer, counter)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    artifact = work / strategy.artifact
    strategy.save(trainer.model, artifact)
    extra = {"trainer": type(trainer).__name__, "kernels": "liger" if trainer.args.use_liger_kernel else "off",
             "tokens_seen": int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
             "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
             **model_dtypes(trainer.model)}
    if counter is not None:
        extra.update(counter.summary(clock, case.warmup, case.steps), examples=len(data.train))
        extra["tokens_per_s"] = extra["useful_tokens_per_s"]
    return result_record(case, clock=clock, memory=memory or meter.read(), trainable=trainable, total=total,
                         artifact_bytes=dir_size(artifact), losses=losses, extra=extra)



def _plain_loss(trainer) -> None:
    """Experiment: let an SFT trainer compute the loss as transformers' Trainer does (the
    model's cross-entropy over full-vocabulary logits) instead of TRL's fused LM head."""
    import types

    from transformers import Trainer

    trainer.compute_loss = types.MethodType(Trainer.compute_loss, trainer)
