"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), written here.

peft has no bottleneck adapters, and the ``adapters`` package pins an older transformers
than petune needs, so this file adds them itself: small down → non-linearity → up blocks
inserted on a sublayer's output, before the transformer's own residual + norm.

* houlsby: after the attention output projection and after the feed-forward output;
* pfeiffer: after the feed-forward output only.

Where they go is found from the module layout, not a table of model names: each block of
the layer stack (see ``find_layers``) is either BERT-style (``attention.output.dense`` and
``output.dense``) or Llama/Gemma-style (``self_attn`` and ``mlp``). The adapter hangs off
the module it follows as a child named ``petune_adapter`` and runs in a forward hook, so
the base weights keep their names. Only adapters and the task head train. The up
projection starts at zero, so a fresh adapter is the identity and training starts from
the base model. ``train_layer_norms`` also trains the base model's normalisation layers, as
Houlsby et al. did (a few thousand weights; they help where the frozen features fit the task
least, e.g. extractive QA). Encoder-decoder models (T5, BART) are refused in ``check``: their two
stacks and cross-attention are not placed here. Saved as ``adapter_model.safetensors`` (adapters + head, and the norms
when they trained) plus
``adapter_config.json`` with ``"petune_adapter": "bottleneck"``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from petune import hookimpl
from petune.api import Options, Strategy
from petune.errors import Refusal, UserError
from petune_plugins.strategies._common import find_layers, head_modules

if TYPE_CHECKING:
    import torch

CONFIG_FILE, WEIGHTS_FILE, FORMAT = "adapter_config.json", "adapter_model.safetensors", "bottleneck"
_ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "swish": "SiLU", "tanh": "Tanh"}  # torch.nn class names


class AdapterOptions(Options):
    config: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only")
    reduction_factor: int = Field(16, ge=1, description="bottleneck size = hidden size / reduction_factor")
    bottleneck_size: int | None = Field(None, ge=1, description="bottleneck size, overrides reduction_factor")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    residual: bool = Field(True, description="add the adapter's input to its output (x + up(f(down(x)))); "
                                             "false replaces the sublayer output, which then starts at zero")
    train_layer_norms: bool = Field(False, description="also train the base model's LayerNorm/RMSNorm weights "
                                                       "(Houlsby et al. 2019 did)")


@functools.cache
def bottleneck_class():
    """The adapter module class, built on first use so loading the plugin does not import torch."""
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self, hidden: int, bottleneck: int, non_linearity: str, residual: bool):
            super().__init__()
            self.down = torch.nn.Linear(hidden, bottleneck)
            self.act = getattr(torch.nn, _ACTIVATIONS[non_linearity])()
            self.up = torch.nn.Linear(bottleneck, hidden)
            self.residual = residual
            torch.nn.init.normal_(self.down.weight, std=1e-2)
            torch.nn.init.zeros_(self.down.bias)
            torch.nn.init.zeros_(self.up.weight)  # zero output at init: near-identity with the residual
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)
            return x + h if self.residual else h

    return Bottleneck


def _run_adapter(module, args, output):
    if isinstance(output, tuple):  # attention modules return (hidden, weights, ...)
        return (module.petune_adapter(output[0]), *output[1:])
    return module.petune_adapter(output)


def adapter_sites(model: torch.nn.Module, config: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) pairs whose output gets an adapter, layer by layer."""
    prefix, layers = find_layers(model)
    sites = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "self_attn") and hasattr(layer, "mlp"):  # Llama, Gemma, Mistral, Qwen ...
            attn, ffn = "self_attn", "mlp"
        elif hasattr(getattr(getattr(layer, "attention", None), "output", None), "dense") and hasattr(
                getattr(layer, "output", None), "dense"):  # BERT, RoBERTa, ELECTRA ...
            attn, ffn = "attention.output.dense", "output.dense"
        else:
            raise Refusal(f"adapters do not know where to go in {type(layer).__name__}: they support BERT-style "
                          "encoders and Llama/Gemma-style decoders", hint="use strategy 'lora' for this model")
        for sub in ([attn] if config == "houlsby" else []) + [ffn]:
            sites.append((f"{prefix}.{i}.{sub}", layer.get_submodule(sub)))
    return sites


def norm_modules(model: torch.nn.Module) -> list[str]:
    """Names of the normalisation layers (LayerNorm, RMSNorm ...) holding their own weights.
    Found by class name, as no common base class covers every model's RMSNorm."""
    return [name for name, module in model.named_modules()
            if "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))]


def trained_base_modules(model: torch.nn.Module, setup: dict) -> list[str]:
    """Base-model modules that train next to the adapters, and are saved with them."""
    return list(setup["head_modules"]) + (norm_modules(model) if setup.get("train_layer_norms") else [])


def add_adapters(model: torch.nn.Module, setup: dict) -> None:
    import torch

    Bottleneck = bottleneck_class()
    for _, module in adapter_sites(model, setup["config"]):
        ref = next(p for p in module.parameters() if p.is_floating_point())
        # fp32 like peft's adapters, whatever the base dtype: stable optimiser updates
        adapter = Bottleneck(setup["hidden_size"], setup["bottleneck_size"], setup["non_linearity"], setup["residual"])
        module.add_module("petune_adapter", adapter.to(device=ref.device, dtype=torch.float32))
        module.register_forward_hook(_run_adapter)
    model.requires_grad_(False)
    trained = set(trained_base_modules(model, setup))
    for name, module in model.named_modules():
        if name.endswith("petune_adapter") or name in trained:
            module.requires_grad_(True)
    model.petune_adapter_setup = setup  # what save() writes next to the weights


class AdaptersStrategy(Strategy):
    name = "adapters"
    description = "bottleneck adapters (Houlsby / Pfeiffer) on BERT-style encoders and Llama-style decoders"
    Options = AdapterOptions
    artifact = "adapter"

    def check(self, task, model_info, options):
        if model_info is None:
            return
        if model_info.is_encoder_decoder:
            raise Refusal(f"bottleneck adapters go into one stack of BERT-style or Llama-style blocks; "
                          f"{model_info.name} is an encoder-decoder model ({model_info.model_type}: an encoder and a "
                          f"decoder with cross-attention), where petune does not place them", where="strategy.name",
                          hint="use strategy 'lora', 'prompt_tuning' or 'full' for encoder-decoder models")
        import torch
        from transformers import AutoModel

        try:  # build the skeleton on the meta device (no memory, no weights) to find the sites
            with torch.device("meta"):
                skeleton = AutoModel.from_config(model_info.config)
        except Exception:  # noqa: BLE001 - unusual configs: apply() still refuses with the same reason
            return
        adapter_sites(skeleton, options.config)

    def apply(self, model, task, options):
        hidden = int(model.config.get_text_config().hidden_size)
        setup = {"petune_adapter": FORMAT, "format_version": 1, "config": options.config, "hidden_size": hidden,
                 "bottleneck_size": options.bottleneck_size or max(1, hidden // options.reduction_factor),
                 "non_linearity": options.non_linearity, "residual": options.residual,
                 "train_layer_norms": options.train_layer_norms, "head_modules": head_modules(task, model)}
        add_adapters(model, setup)
        return model

    def save(self, model, path):
        from safetensors.torch import save_file

        setup = model.petune_adapter_setup
        trained = trained_base_modules(model, setup)
        weights = {name: t.detach().contiguous() for name, t in model.state_dict().items()
                   if ".petune_adapter." in name or any(name.startswith(m + ".") for m in trained)}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(weights, path / WEIGHTS_FILE, metadata={"format": "pt"})
        (path / CONFIG_FILE).write_text(json.dumps(setup, indent=2) + "\n")

    def restore(self, base, path, task, options):
        from safetensors.torch import load_file

        path = Path(path)
        try:
            setup = json.loads((path / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise UserError(f"no {CONFIG_FILE} in {path}", hint="is this an adapters run?") from None
        if setup.get("petune_adapter") != FORMAT:
            raise UserError(f"{path / CONFIG_FILE} is not a petune bottleneck adapter")
        add_adapters(base, setup)  # the saved setup, not today's options, says what was trained
        weights = load_file(path / WEIGHTS_FILE)
        norms = norm_modules(base) if setup.get("train_layer_norms") else []
        expected = {n for n in base.state_dict() if ".petune_adapter." in n or any(n.startswith(m + ".") for m in norms)}
        missing, unexpected = expected - weights.keys(), weights.keys() - base.state_dict().keys()
        if missing or unexpected:
            raise UserError(f"adapter in {path} does not fit this model: "
                            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        base.load_state_dict(weights, strict=False)
        return base

    def merge(self, model):
        raise Refusal("bottleneck adapters add non-linear layers; they cannot be merged into the base weights",
                      hint="use the adapter as is, or train with 'lora' to get a mergeable result")


@hookimpl
def register_strategies(register):
    register(AdaptersStrategy)
