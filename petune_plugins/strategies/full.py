"""Full fine-tuning: every weight trains, or only the top N transformer layers.

Parameters fall in three groups by where they sit around the layer stack: below it (the
embeddings, incl. position embeddings and their norm), in it (layer i), above it (final
norm, pooler, output layer). ``train_top_layers = N`` trains the top N layers and
everything above; ``train_embeddings = false`` freezes the group below — including an output
layer tied to the input embeddings (same tensor), since memory is usually why people
freeze them. The task head always trains. 8-bit / paged AdamW is a [train] optimizer choice.
"""

from __future__ import annotations

from pydantic import Field

from petune import hookimpl
from petune.api import Options, Strategy
from petune.errors import Refusal
from petune_plugins.strategies._common import find_layers, head_modules, quantization_method


class FullOptions(Options):
    train_top_layers: int | None = Field(
        None, ge=0, description="train only the top N transformer layers (and what is above them); 0 = head only")
    train_embeddings: bool = Field(True, description="train the input embeddings (and a tied output layer)")


class FullStrategy(Strategy):
    name = "full"
    description = "full fine-tuning (optionally only the top N layers); saves the whole model"
    Options = FullOptions
    artifact = "model"

    def check(self, task, model_info, options):
        method = quantization_method(model_info)
        if method is not None:
            raise Refusal(f"model {model_info.name!r} is quantised ({method}); its weights cannot be trained in full",
                          where="strategy.name", hint="use strategy 'lora' on it")
        top = options.train_top_layers
        if model_info is not None and top is not None and model_info.num_layers and top > model_info.num_layers:
            raise Refusal(f"train_top_layers = {top}, but {model_info.name!r} has only {model_info.num_layers} layers",
                          where="strategy.train_top_layers")

    def apply(self, model, task, options):
        model.requires_grad_(True)
        if options.train_top_layers is not None or not options.train_embeddings:
            _, layers = find_layers(model)
            if options.train_top_layers is not None and options.train_top_layers > len(layers):
                raise Refusal(f"train_top_layers = {options.train_top_layers}, but the model has only {len(layers)} layers",
                              where="strategy.train_top_layers")
            first_trained = len(layers) - (options.train_top_layers if options.train_top_layers is not None else len(layers))
            layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
            below = True  # named_parameters follows registration order: embeddings come first
            for _, param in model.named_parameters():
                if id(param) in layer_of:
                    below = False
                    param.requires_grad_(layer_of[id(param)] >= first_trained)
                elif below:
                    param.requires_grad_(options.train_embeddings)
        for name in head_modules(task, model):
            model.get_submodule(name).requires_grad_(True)
        return model

    def save(self, model, path):
        model.save_pretrained(path)  # safetensors, config included

    def restore(self, base, path, task, options):
        return type(base).from_pretrained(path)

    def merge(self, model):
        raise Refusal("strategy 'full' has nothing to merge: its model/ folder already is a complete model")


@hookimpl
def register_strategies(register):
    register(FullStrategy)
