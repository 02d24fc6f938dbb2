"""Small in-process plugins for testing the core without the first-party plugins."""

from __future__ import annotations

import types

from pydantic import Field

from petune import hookimpl
from petune.api import DataPath, Options, Strategy, Task
from petune.errors import Refusal
from petune.plugins import PluginHost, PluginOrigin


class DemoStrategyOptions(Options):
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"


class DemoStrategy(Strategy):
    name = "demo_strategy"
    description = "a strategy for tests"
    Options = DemoStrategyOptions

    def check(self, task, model_info, options):
        if task.name == "demo_refused_task":
            raise Refusal("demo_strategy cannot train demo_refused_task: no head to attach to")

    # the demo plugins are validated and planned, never trained
    def apply(self, model, task, options):
        raise AssertionError("demo_strategy never trains")

    def restore(self, base, path, task, options):
        raise AssertionError("demo_strategy never trains")


class DemoTaskOptions(Options):
    train: DataPath
    validation: DataPath | None = None
    max_length: int = Field(128, ge=8)


class DemoTask(Task):
    name = "demo_task"
    description = "a task for tests"
    Options = DemoTaskOptions
    peft_task_type = "SEQ_CLS"

    def load_data(self, options, tokenizer):
        raise AssertionError("demo_task never trains")

    def build_model(self, model_info, options, state, **load_kwargs):
        raise AssertionError("demo_task never trains")

    def make_trainer(self, *, model, tokenizer, data, options, args, callbacks):
        raise AssertionError("demo_task never trains")

    def evaluate(self, trainer, data, options, run_dir):
        raise AssertionError("demo_task never trains")


class DemoRefusedTask(DemoTask):
    name = "demo_refused_task"


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def demo_module():
    return plugin_module(
        "demo",
        register_strategies=lambda register: register(DemoStrategy),
        register_tasks=lambda register: (register(DemoTask), register(DemoRefusedTask)),
    )


def demo_host(*extra) -> PluginHost:
    origin = PluginOrigin("demo-plugins", "1.0", "demo")
    return PluginHost(autoload=False, strict=False, extra=[(origin, demo_module()), *extra])
