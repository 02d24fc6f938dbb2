"""The petune side: ``petune run``'s own stages on synthetic data.

The recipe is validated by petune's schemas and checked by ``runner.check_recipe`` and
``runner.check_model``; the model is built by ``runner.build_trainable_model`` (the task's
``build_model`` with the strategy's ``load_kwargs``, then ``apply``); the trainer by
``trainer_setup.build_trainer``, the very function ``petune run`` calls (arguments, callbacks,
the task's ``make_trainer``, petune's trainer changes, activation offloading, the strategy's
``prepare`` and optimizer). Only the data source differs: the task gets a fixed-length
synthetic dataset, the same rows as the baseline (tests/test_bench.py checks both paths build
the same trainer).

Real-length cases (``case.data``): the task reads that Alpaca file itself (``load_data``, as
``petune run`` does) with petune's defaults — loss on the answers, padding-free batches where
the model keeps a row's examples apart (else padded), or packed rows for the variant
``packing`` — and the Alpaca chat template, the layout the baseline writes by hand, so both
sides train on the same tokens. The variant ``no-kernels`` sets ``train.kernels = "off"``
(petune's default uses Liger's fused kernels where they are installed on a GPU). The variant
``no-cpu-bf16`` runs with ``PETUNE_CPU_BF16=0``: what "auto" picks on a CPU without native
bf16 (float32), measured on one that has it.

Two deliberate differences from ``petune run``, both outside the measured steps: checkpoints
are not written (``save_strategy`` is turned off on the built trainer: the final checkpoint
would come after the last measured step) and nothing is evaluated after training.
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
from .shapes import SHAPES, model_name


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


def build(case: Case, extra_callbacks: list = ()):
    """The case's recipe, plugins and trainer, built by ``petune run``'s own stages; only the
    data source differs. Returns (trainer, strategy, data, trainable, total)."""
    from transformers import AutoConfig, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    from petune import runner, trainer_setup
    from petune.api import count_parameters
    from petune.plugins import PluginHost
    from petune.recipe import validate

    hf_logging.disable_progress_bar()  # as runner.run does
    host = PluginHost()
    work = Path(case.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / ("synthetic.jsonl" if SHAPES[case.shape].task == "sft" else "synthetic.csv")
    data_file.write_text('{"prompt": "a", "completion": "b"}\n' if data_file.suffix == ".jsonl" else "text,label\na,0\nb,1\n")

    # the Quickstart case names its model as the recipe does (resolved through petune's sources),
    # a GGUF shape by its file
    recipe = validate(recipe_data(case, model_name(case.shape, case.own_defaults), data_file), host,
                      check_paths=False)
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    runner.check_recipe(recipe, host, task, strategy)
    info = runner.check_model(recipe, host, task, strategy)

    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    vocab = AutoConfig.from_pretrained(info.path).vocab_size
    data = task.load_data(recipe.task, tokenizer) if case.data else synthetic_task_data(case, tokenizer, vocab)
    runner.check_batch_size(recipe, data)
    model = runner.build_trainable_model(recipe, host, task, strategy, info, data.state)
    trainable, total = count_parameters(model)
    the_run = runner.Run(recipe, recipe.output_dir, task, strategy, info, data)
    hooks = [cb for cbs in host.call("trainer_callbacks", run=the_run) for cb in cbs]  # installed plugins'
    trainer, _ = trainer_setup.build_trainer(recipe, host, task, strategy, model=model, tokenizer=tokenizer, data=data,
                                             run_dir=recipe.output_dir, model_type=info.model_type,
                                             extra_callbacks=[*hooks, *extra_callbacks])
    return trainer, strategy, data, trainable, total


def run(case: Case) -> dict:
    if case.variant == "no-cpu-bf16":  # this process only: a case runs in a process of its own
        import os

        from petune import precision

        os.environ["PETUNE_CPU_BF16"] = "0"
        precision.cpu_native_bf16.cache_clear()
    if case.variant not in ("", "packing", "no-kernels", "no-cpu-bf16", "plain-loss") or (
            case.variant == "packing" and not case.data):
        raise ValueError(f"unknown petune variant {case.variant!r}" + (" (packing needs real-length data)"
                                                                       if case.variant == "packing" else ""))
    meter = Meter(case.device)
    meter.start()
    set_threads(case)
    clock = StepClock(case.device)
    memory: dict = {}
    trainer, strategy, data, trainable, total = build(case, [trainer_clock_callback(case, clock, meter, memory)])
    from transformers.trainer_utils import SaveStrategy

    trainer.args.save_strategy = SaveStrategy.NO  # see the module docstring
    if case.variant == "plain-loss":
        _plain_loss(trainer)
    counter = TokenCounter() if case.data else None
    if counter is not None:
        count_training_steps(trainer, counter)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    artifact = Path(case.work_dir) / strategy.artifact
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
