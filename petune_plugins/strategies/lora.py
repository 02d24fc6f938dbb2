"""LoRA through peft: frozen base, trainable low-rank updates, task head saved with them."""

from __future__ import annotations

from petune import hookimpl
from petune.api import Strategy
from petune_plugins.strategies._common import (
    LoraOptions,
    apply_lora,
    check_lora_init,
    contiguous_head_input,
    init_plan,
    loraplus_optimizer,
    merge_lora,
    prepare_lora,
    quantization_method,
    restore_peft,
    save_lora,
)


class LoraStrategy(Strategy):
    name = "lora"
    description = "LoRA adapters on the linear layers (peft); the task head trains in full"
    Options = LoraOptions
    artifact = "adapter"

    def check(self, task, model_info, options):
        check_lora_init(options, quantised=quantization_method(model_info) is not None)

    def apply(self, model, task, options):
        return apply_lora(model, task, options)

    def training_plan(self, options):
        return init_plan(options)

    def prepare(self, model, task, options, batches, total_steps):
        prepare_lora(model, options, batches)  # EVA, CorDA: from the task's own training batches

    def make_optimizer(self, model, options, optimizer_cls, optimizer_kwargs):
        return loraplus_optimizer(model, options, optimizer_cls, optimizer_kwargs)

    def save(self, model, path):
        save_lora(model, path)  # adapter_model.safetensors + adapter_config.json

    def restore(self, base, path, task, options):
        return restore_peft(base, path)

    def for_inference(self, model, options):
        contiguous_head_input(model)
        return model

    def merge(self, model):
        return merge_lora(model)


@hookimpl
def register_strategies(register):
    register(LoraStrategy)
