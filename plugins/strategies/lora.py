"""LoRA through peft: frozen base, trainable low-rank updates, task head saved with them."""

from __future__ import annotations

from petune import hookimpl
from petune.api import Strategy
from petune_plugins.strategies._common import LoraOptions, apply_lora, merge_lora, restore_peft


class LoraStrategy(Strategy):
    name = "lora"
    description = "LoRA adapters on the linear layers (peft); the task head trains in full"
    Options = LoraOptions
    artifact = "adapter"

    def apply(self, model, task, options):
        return apply_lora(model, task, options)

    def save(self, model, path):
        model.save_pretrained(path)  # adapter_model.safetensors + adapter_config.json

    def restore(self, base, path, task, options):
        return restore_peft(base, path)

    def merge(self, model):
        return merge_lora(model)


@hookimpl
def register_strategies(register):
    register(LoraStrategy)
