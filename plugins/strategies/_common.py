"""Helpers the first-party strategies share: finding the transformer blocks, the task
head, quantisation checks, and the peft plumbing used by lora, qlora and prompt_tuning.

Private to ``petune_plugins.strategies``; third-party strategies should not import it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from petune.api import ModelInfo, Options, Task
from petune.errors import Refusal, UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


# -- model anatomy -------------------------------------------------------------------------
def find_layers(model: "torch.nn.Module") -> tuple[str, "torch.nn.ModuleList"]:
    """The stack of transformer blocks (``bert.encoder.layer``, ``model.layers`` ...): the
    ModuleList of same-class modules holding the most parameters. Generic on purpose: no
    table of architectures to keep up to date."""
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (name, module, size)
    if best is None:
        raise Refusal(f"cannot find the transformer layers of {type(model).__name__}")
    return best[0], best[1]


def head_modules(task: Task, model: "torch.nn.Module") -> list[str]:
    """The task's head module names, checked to exist (a typo would silently train nothing)."""
    names = list(task.head_modules(model))
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"task {task.name!r} names head module {name!r}, which {type(model).__name__} does not have") from None
    return names


def is_4bit(model: "torch.nn.Module") -> bool:
    """True when some weights are bitsandbytes 4-bit (packed, with a quant_state)."""
    return any(getattr(p, "quant_state", None) is not None for p in model.parameters())


def quantization_method(model_info: ModelInfo | None) -> str | None:
    """The quantisation a checkpoint's weights still have when loaded (``gptq``, ``awq``,
    ``bitsandbytes`` ...). GGUF does not count: transformers dequantises it on load."""
    if model_info is None:
        return None
    qc = getattr(model_info.config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = str(getattr(method, "value", method) or "unknown")
    return None if method == "gguf" else method


# -- peft: shared by lora, qlora and prompt_tuning ---------------------------------------------
class LoraOptions(Options):
    """LoRA: train low-rank updates ``B·A`` beside frozen linear layers."""

    r: int = Field(16, ge=1, description="rank of the update matrices")
    alpha: int = Field(32, ge=1, description="scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output layer) or module names, e.g. ['q_proj', 'v_proj']")
    use_dora: bool = Field(False, description="DoRA: also train a magnitude vector per output feature")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train as well")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva", "corda"] = Field(
        "default", description=(
            "how A and B start: default (B = 0, A Kaiming-uniform); gaussian (A normal); pissa (top-r singular "
            "vectors of each target weight: one full SVD per layer at start, O(d^3), minutes per 7B model on a CPU); "
            "olora (QR of each target weight: cheaper than pissa); loftq (qlora only: fits the adapter to the 4-bit "
            "quantisation error, an SVD per layer plus a read of the full-precision checkpoint); eva, corda: refused "
            "(they need a pass over the training data before training)"))
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+ (Hayou et al., 2024): LoRA's B matrices learn this many times faster than "
                                "A (e.g. 16); the recipe's learning_rate is A's")


# Initialisations that start from the base weights and move part of them into the adapter: the
# base is rewritten during training, so the saved adapter is converted back (to rank 2r) against
# the untouched base with peft's path_initial_model_for_weight_conversion.
_REWRITES_BASE = {"pissa", "olora"}
_NEEDS_DATA = {"eva": "EVA", "corda": "CorDA"}


def check_lora_init(options: LoraOptions, *, quantised: bool) -> None:
    """Refuse initialisations that cannot work here, before anything loads."""
    init = options.init
    if init in _NEEDS_DATA:
        raise Refusal(f"init = {init!r}: {_NEEDS_DATA[init]} initialises the adapter from activations of a pass over "
                      "the training data, and petune applies a strategy before the task's data loader exists",
                      where="strategy.init", hint="use init = 'pissa' or 'olora' (data-free) or 'default'")
    if init == "loftq" and not quantised:
        raise Refusal("init = 'loftq' fits the adapter to the error of 4-bit quantisation; this base is not quantised",
                      where="strategy.init", hint="use strategy 'qlora' for LoftQ, or init = 'pissa' here")
    if init == "loftq":
        import torch

        if not torch.cuda.is_available():
            raise Refusal("init = 'loftq': peft's LoftQ initialisation runs on a CUDA GPU only, and none is available",
                          where="strategy.init", hint="use init = 'default' here, or run on a GPU")
    if init in _REWRITES_BASE and quantised:
        raise Refusal(f"init = {init!r} moves part of each base weight into the adapter, which a 4-bit base cannot take",
                      where="strategy.init", hint="use init = 'loftq' on a 4-bit base, or strategy 'lora' for "
                      f"{init!r}")
    if init in _REWRITES_BASE and options.use_rslora:
        raise Refusal(f"init = {init!r} with use_rslora: peft cannot convert the trained adapter back to the "
                      "original base with rank-stabilised scaling", where="strategy.use_rslora", hint="set it to false")


def _check_target_names(model: "torch.nn.Module", names: list[str]) -> None:
    """peft matches a name against the end of a module path; say which names match nothing."""
    paths = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"target_modules {missing} match no module of {type(model).__name__}",
                        where="strategy.target_modules", hint=f"linear layers here: {', '.join(linear)}")


def lora_config(options: LoraOptions, task: Task, model: "torch.nn.Module"):
    from peft import LoraConfig

    targets = options.target_modules
    if isinstance(targets, list):
        _check_target_names(model, targets)
    return LoraConfig(
        task_type=task.peft_task_type_for(model.config),
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        bias=options.bias,
        init_lora_weights=_PEFT_INIT.get(options.init, True),
        # the head is trained in full and saved with the adapter: a reloaded classifier
        # must not come back with the base model's random head
        modules_to_save=head_modules(task, model) or None,
    )


_PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}  # loftq: after wrapping


def apply_lora(model: "PreTrainedModel", task: Task, options: LoraOptions):
    import tempfile

    from peft import get_peft_model

    if any(p.is_meta for p in model.parameters()):
        # a weightless skeleton (the memory estimate): same parameters, nothing to decompose
        options = options.model_copy(update={"init": "default"})
    # Frozen embeddings give inputs that need no grad; with (reentrant) gradient
    # checkpointing nothing would then reach the adapters. Cheap insurance either way.
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(options, task, model))
    if options.init in _REWRITES_BASE:
        # the adapter as initialised, for converting the trained one back at save time
        initial = tempfile.TemporaryDirectory(prefix="petune-lora-init-")
        peft_model.save_pretrained(initial.name)
        peft_model._petune_initial_adapter = initial  # removed with the model
    elif options.init == "loftq":
        from peft import replace_lora_weights_loftq

        try:
            # reads the full-precision weights from the model's local folder (petune resolves every model to one)
            replace_lora_weights_loftq(peft_model, model_path=str(getattr(model, "name_or_path", "") or ""))
        except (ValueError, OSError, KeyError) as exc:
            raise UserError(f"LoftQ initialisation failed: {exc}", where="strategy.init",
                            hint="LoftQ needs the base as a local safetensors checkpoint; or use init = 'default'") from None
    return peft_model


def save_lora(model, path: Path) -> None:
    """Save the adapter; one initialised from the base weights (PiSSA, OLoRA) is converted into
    a plain LoRA adapter (rank 2r) for the original base, so any peft user can load it."""
    initial = getattr(model, "_petune_initial_adapter", None)
    if initial is None:
        model.save_pretrained(path)
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        model.save_pretrained(path, path_initial_model_for_weight_conversion=initial.name)
        # peft's conversion keeps only the LoRA matrices: put the trained head (modules_to_save) back
        weights = Path(path) / "adapter_model.safetensors"
        converted = load_file(weights)
        head = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()
                if k not in converted and "lora_" not in k}
        if head:
            save_file({**converted, **head}, weights, metadata={"format": "pt"})


def loraplus_optimizer(model, options: LoraOptions, optimizer_cls: type, optimizer_kwargs: dict):
    """LoRA+'s parameter groups (peft's ``create_loraplus_optimizer``) in the recipe's
    optimizer; None without ``loraplus_lr_ratio`` (the trainer's own optimizer then)."""
    if options.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    kwargs = dict(optimizer_kwargs)
    lr = kwargs.pop("lr")
    kwargs["loraplus_weight_decay"] = kwargs.pop("weight_decay", 0.0)
    return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls, lr=lr,
                                     loraplus_lr_ratio=options.loraplus_lr_ratio, **kwargs)


def restore_peft(base: "PreTrainedModel", path: Path):
    """Load an adapter saved by ``save_pretrained`` onto a fresh base (plain peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path))


def merge_lora(model) -> "PreTrainedModel":
    """Fold LoRA into the base weights and return the plain transformers model."""
    if is_4bit(model):
        warnings.warn(
            "merging LoRA into 4-bit weights: they are dequantised, summed and quantised again, which "
            "loses accuracy. Load the base unquantised (bf16/fp32), restore the adapter on it, then merge.",
            UserWarning, stacklevel=2)
    return model.merge_and_unload()
