"""Helpers the first-party strategies share: finding the transformer blocks, the task
head, quantisation checks, and the peft plumbing used by lora, qlora and prompt_tuning.

Private to ``petune_plugins.strategies``; third-party strategies should not import it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from petune.api import ModelInfo, Options, Task, contiguous_head_input  # noqa: F401 - re-exported for the strategies
from petune.errors import Refusal, UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


# -- model anatomy -------------------------------------------------------------------------
def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
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


def head_modules(task: Task, model: torch.nn.Module) -> list[str]:
    """The task's head module names, checked to exist (a typo would silently train nothing)."""
    names = list(task.head_modules(model))
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"task {task.name!r} names head module {name!r}, which {type(model).__name__} does not have") from None
    return names


def is_4bit(model: torch.nn.Module) -> bool:
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
            "quantisation error, an SVD per layer plus a read of the full-precision checkpoint); eva (A from the "
            "principal directions of each target layer's inputs over the first init_batches training batches: "
            "forward passes plus an incremental SVD per layer); corda (lora only: A, B from each weight's SVD "
            "weighted by the covariance of its inputs over init_batches training batches, keeping the residual: "
            "forward passes one sequence at a time, an in x in covariance, its inverse and one SVD per layer)"))
    init_batches: int = Field(16, ge=1, description=(
        "eva, corda: how many of the task's training batches (as the trainer draws them) the initialisation "
        "reads before step 1"))
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+ (Hayou et al., 2024): LoRA's B matrices learn this many times faster than "
                                "A (e.g. 16); the recipe's learning_rate is A's")


# Initialisations that start from the base weights and move part of them into the adapter: the
# base is rewritten during training, so the saved adapter is converted back (to rank 2r) against
# the untouched base with peft's path_initial_model_for_weight_conversion.
_REWRITES_BASE = {"pissa", "olora", "corda"}
# Initialisations computed from the task's own training batches (Strategy.prepare), after apply
_FROM_DATA = {"eva", "corda"}

# What each initialisation costs before step 1 (the plan shows it)
INIT_COST = {
    "gaussian": "none (random, like the default)",
    "pissa": "one full SVD of every target weight at start: O(d³) each; seconds for small models, minutes for a 7B "
             "model on a CPU",
    "olora": "one QR decomposition of every target weight at start: cheaper than PiSSA's SVD",
    "loftq": "alternating 4-bit quantisation + SVD of every target weight, and one read of the full-precision "
             "checkpoint",
    "eva": "one forward pass over {n} training batches with an incremental SVD of each target layer's inputs per "
           "batch (stopping early where every layer's components have converged); ranks stay r everywhere (EVA's "
           "rho = 1), so the counts above hold",
    "corda": "forward passes over {n} training batches, one sequence at a time; an in × in input covariance, its "
             "inverse and one SVD per target layer; the base keeps the residual, the saved adapter is converted "
             "to a plain LoRA of rank 2r",
}


def check_lora_init(options: LoraOptions, *, quantised: bool) -> None:
    """Refuse initialisations that cannot work here, before anything loads."""
    init = options.init
    if init == "corda":
        try:
            import peft.tuners.lora.corda  # noqa: F401
        except ImportError as exc:  # peft 0.21's CorDA module imports the 'attrs' package, which peft does not require
            raise Refusal(f"init = 'corda': the installed peft's CorDA module cannot be imported ({exc})",
                          where="strategy.init", hint=f"install what it names (pip install {exc.name or 'attrs'}), "
                          "or use init = 'eva' or 'pissa'") from None
    if init == "corda" and quantised:
        raise Refusal("init = 'corda' moves part of each base weight into the adapter (as PiSSA does), which a 4-bit "
                      "base cannot take: peft's CorDA needs 16/32-bit weights", where="strategy.init",
                      hint="use init = 'eva' (data-driven, leaves the base as it is) or 'loftq' on a 4-bit base, or "
                           "strategy 'lora' for 'corda'")
    if init in _FROM_DATA and options.use_dora:
        raise Refusal(f"init = {init!r} with use_dora: peft initialises DoRA's magnitudes from the weights before "
                      f"{init!r} has read any data", where="strategy.use_dora", hint="set it to false")
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


def check_target_names(model: torch.nn.Module, names: list[str]) -> None:
    """peft matches a name against the end of a module path; say which names match nothing."""
    paths = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"target_modules {missing} match no module of {type(model).__name__}",
                        where="strategy.target_modules", hint=f"linear layers here: {', '.join(linear)}")


def lora_config(options: LoraOptions, task: Task, model: torch.nn.Module):
    from peft import EvaConfig, LoraConfig

    targets = options.target_modules
    if isinstance(targets, list):
        check_target_names(model, targets)
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
        # EVA keeps rank r in every layer (rho = 1): the plan's counts hold after it ran
        eva_config=EvaConfig(rho=1.0) if options.init == "eva" else None,
        # the head is trained in full and saved with the adapter: a reloaded classifier
        # must not come back with the base model's random head
        modules_to_save=head_modules(task, model) or None,
    )


# loftq: after wrapping; eva: B = 0 now, A from data in prepare_lora; corda: default now, both from data later
_PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva"}


def init_plan(options: LoraOptions) -> dict[str, str]:
    """The plan's row on what the initialisation costs before training."""
    cost = INIT_COST.get(options.init)
    return {f"init {options.init}": cost.format(n=options.init_batches)} if cost else {}


def apply_lora(model: PreTrainedModel, task: Task, options: LoraOptions):
    from peft import get_peft_model

    if any(p.is_meta for p in model.parameters()):
        # a weightless skeleton (the memory estimate): same parameters, nothing to decompose
        options = options.model_copy(update={"init": "default"})
    # Frozen embeddings give inputs that need no grad; with (reentrant) gradient
    # checkpointing nothing would then reach the adapters. Cheap insurance either way.
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(options, task, model))
    if options.init in _REWRITES_BASE and options.init not in _FROM_DATA:
        _keep_initial_adapter(peft_model)
    elif options.init == "loftq":
        from peft import replace_lora_weights_loftq

        try:
            # reads the full-precision weights from the model's local folder (petune resolves every model to one)
            replace_lora_weights_loftq(peft_model, model_path=str(getattr(model, "name_or_path", "") or ""))
        except (ValueError, OSError, KeyError) as exc:
            raise UserError(f"LoftQ initialisation failed: {exc}", where="strategy.init",
                            hint="LoftQ needs the base as a local safetensors checkpoint; or use init = 'default'") from None
    return peft_model


def _keep_initial_adapter(peft_model) -> None:
    """The adapter as initialised, for converting the trained one back at save time."""
    import tempfile

    initial = tempfile.TemporaryDirectory(prefix="petune-lora-init-")
    peft_model.save_pretrained(initial.name)
    peft_model._petune_initial_adapter = initial  # removed with the model


def prepare_lora(model, options: LoraOptions, batches) -> None:
    """EVA and CorDA: initialise the adapter from the task's own training batches (in place)."""
    import itertools

    if options.init not in _FROM_DATA or any(p.is_meta for p in model.parameters()):
        return
    taken = list(itertools.islice(batches, options.init_batches))
    if not taken:
        raise UserError(f"init = {options.init!r} needs training batches, and the task's data loader gave none",
                        where="strategy.init")
    if options.init == "eva":
        _eva_init(model, taken)
    else:
        _corda_init(model, taken)


def _token_mask(inputs: dict):
    """Which positions are real tokens: the attention mask, minus positions whose token-level
    labels are ignored (-100) when the labels have one per token."""
    import torch

    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask", torch.ones_like(ids) if ids is not None else None)
    labels = inputs.get("labels")
    if mask is None:
        return None
    mask = mask.bool()
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape and (labels != -100).any():
        mask = mask & (labels != -100)
    return mask


def _eva_init(model, batches: list[dict]) -> None:
    import torch
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import SVDHook

    def layer_inputs(layer_input, mask, name):
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            return x[mask].contiguous()  # real tokens only
        # e.g. a decoder's inputs, which the encoder's mask does not describe; contiguous, as peft's
        # hashing views it flat (an attention output can come transposed)
        return x.reshape(-1, x.shape[-1]).contiguous()

    calls = 0

    def forward(model, inputs):
        # peft cycles over the batches until every layer's top components stop moving (cosine >= tau),
        # which few, short sequences may never reach (a pooler sees one vector per sequence): one
        # pass over the batches it was given, then the components as estimated so far are taken
        nonlocal calls
        out = model(**inputs)
        calls += 1
        if calls >= len(batches):
            for module in model.modules():
                for hook in module._forward_hooks.values():
                    if isinstance(hook, SVDHook) and hasattr(hook.svd, "components_"):
                        hook.converged[:] = True
        return out

    with torch.no_grad():
        try:
            initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, show_progress_bar=False,
                                        prepare_model_inputs_fn=lambda inputs, _: _token_mask(inputs),
                                        prepare_layer_inputs_fn=layer_inputs)
        except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
            raise UserError(f"EVA initialisation failed: {exc}", where="strategy.init",
                            hint="raise strategy.init_batches (more tokens per layer), or use init = 'default'") from None


def _corda_init(model, batches: list[dict]) -> None:
    """peft's CorDA, on the adapter petune already applied: the covariance of the inputs of each
    LoRA layer's base layer, its eigens, then ``corda_init`` on each LoRA layer (which moves the
    top directions out of the base into A and B)."""
    import copy

    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = model.peft_config["default"]
    # peft's hooks find layers by name: here the frozen base layer inside each LoRA layer
    hooked = copy.copy(config)
    hooked.target_modules = {"base_layer"}
    hooked.corda_config = CordaConfig(corda_method="ipm")

    def run_model():  # peft's CorDA hook takes one sequence at a time
        for inputs in batches:
            mask = inputs.get("attention_mask")
            rows = len(next(v for v in inputs.values() if isinstance(v, torch.Tensor)))
            for i in range(rows):
                one = {}
                for key, value in inputs.items():
                    if not isinstance(value, torch.Tensor):
                        one[key] = value
                    elif mask is not None and value.shape == mask.shape:
                        one[key] = value[i][mask[i].bool()].unsqueeze(0)  # no padding in the covariance
                    else:
                        one[key] = value[i:i + 1]
                model(**one)

    training = model.training
    with torch.no_grad():
        try:
            preprocess_corda(model, hooked, run_model=run_model)
            for module in model.modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    module.corda_init("default", "corda")
        except (ValueError, RuntimeError, TypeError) as exc:
            raise UserError(f"CorDA initialisation failed: {exc}", where="strategy.init",
                            hint="raise strategy.init_batches, or use init = 'pissa' (data-free)") from None
    model.train(training)
    config.init_lora_weights = "corda"
    _keep_initial_adapter(model)


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


def restore_peft(base: PreTrainedModel, path: Path):
    """Load an adapter saved by ``save_pretrained`` onto a fresh base (plain peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path))


def merge_lora(model) -> PreTrainedModel:
    """Fold LoRA into the base weights and return the plain transformers model."""
    if is_4bit(model):
        warnings.warn(
            "merging LoRA into 4-bit weights: they are dequantised, summed and quantised again, which "
            "loses accuracy. Load the base unquantised (bf16/fp32), restore the adapter on it, then merge.",
            UserWarning, stacklevel=2)
    return model.merge_and_unload()


def fold_lora_into_kept_weights(model) -> int:
    """Inference on a CPU: a LoRA layer over a base layer that keeps a dequantised weight (a
    4-bit or GGUF layer after ``for_inference``; it offers ``petune_fold(delta)``) computes one
    matmul with ``weight + scale·B·A`` instead of three: most of a generated token's time on a
    small model is spent in these small extra matmuls (benchmarks/RESULTS.md). The fold is
    made for the adapter active at each forward and made again when another one is activated
    (``petune serve`` switches adapters on one base) or when adapters are disabled (the base
    alone, e.g. "before" evaluations); a layer in training mode, with several active adapters
    or a LoRA variant (DoRA ...) computes as peft does. Base layers offer the fold only for a
    float32 weight: rounded to bfloat16, the sum moves the outputs (the Quickstart's held-out
    loss 0.196 → 0.191), so a bf16 model keeps peft's separate, exact path. Returns how many
    layers fold."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer in model.modules():
        base = layer.get_base_layer() if isinstance(layer, LoraLayer) else None
        if base is None or not callable(getattr(base, "petune_fold", None)):
            continue
        layer.forward = _folding_forward(layer, base, layer.forward)
        count += 1
    return count


def _folding_forward(layer, base, peft_forward):
    folded: list = [None]  # the adapter whose delta the base's kept weight holds

    def forward(x, *args, **kwargs):
        name = _single_plain_adapter(layer) if kwargs.get("adapter_names") is None else None
        if name != folded[0]:
            base.petune_fold(None if name is None else layer.get_delta_weight(name).float())
            folded[0] = name
        if name is None:
            return peft_forward(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        return base(x, *args, **kwargs)

    return forward


def _single_plain_adapter(layer) -> str | None:
    """The one plain LoRA adapter this layer would apply in eval mode, else None."""
    if layer.training or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(active[0]):
        return None
    return active[0]
