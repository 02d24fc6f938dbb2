"""QLoRA: base weights loaded in 4-bit (bitsandbytes NF4/FP4), LoRA adapters trained on top.

Preparing the quantised model deliberately avoids peft's ``prepare_model_for_kbit_training``:
it upcasts every non-quantised parameter (embeddings, norms, head) to fp32, which costs
gigabytes and halves speed on large models for no gain here. Instead: the base stays in its
load dtype, inputs are made to require grad (so gradient checkpointing reaches the adapters),
and peft keeps the LoRA weights themselves in fp32. Gradient checkpointing, when the recipe
asks for it, is switched on by the trainer with ``use_reentrant=False``.

``quant_type = "gguf"`` (for a GGUF base: a ``.gguf`` file or the packaged Gemma) keeps the
file's own quantisation instead: no bitsandbytes, no re-quantisation; the linear layers hold
the file's blocks and dequantise them per forward (:mod:`gguf_backend`), so the adapter
trains against exactly the model llama.cpp runs, and goes back to it as a GGUF LoRA
(``petune export RUN --format gguf-lora``).

Merging: folding LoRA into 4-bit weights re-quantises them and rounds the update away; folding
it into the original 16-bit checkpoint gives a model the adapter was never trained with (the
adapter learnt to correct the 4-bit rounding too). The merge path loads the base in 4-bit as
training did, dequantises it at once to plain 16/32-bit weights (the values bitsandbytes
computed with: :meth:`QloraStrategy.dequantize`), restores the adapter on them and merges
there, so the merged model computes what ``petune generate`` on the run computes. Merging a
4-bit model directly still works but warns.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from petune import hookimpl, precision
from petune.api import Strategy
from petune.errors import Refusal
from petune_plugins.strategies._common import (
    LoraOptions,
    apply_lora,
    check_lora_init,
    contiguous_head_input,
    fold_lora_into_kept_weights,
    head_modules,
    init_plan,
    loraplus_optimizer,
    merge_lora,
    prepare_lora,
    quantization_method,
    restore_peft,
    save_lora,
)

# Kept in full precision when quantising: output layers and the usual task-head names.
# (Giving bitsandbytes any skip list replaces transformers' own default, which only covers
# the output layer and misses e.g. BERT's ``classifier``.) apply() double-checks the head.
_UNQUANTISED = ["lm_head", "embed_out", "score", "classifier", "qa_outputs", "pooler.dense"]


class QloraOptions(LoraOptions):
    """LoRA options plus how the frozen base is quantised."""

    quant_type: Literal["nf4", "fp4", "gguf"] = Field(
        "nf4", description="4-bit data type; NF4 suits normally distributed weights; gguf: a GGUF base keeps the "
                           "file's own quantisation (Q4_K, Q8_0 ...), dequantised per forward, no bitsandbytes")
    double_quant: bool = Field(True, description="quantise the quantisation constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantised to for matmuls; auto: the fastest the "
                            "device computes natively (bfloat16 on recent GPUs and CPUs with bf16, else float32)")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; FSDP needs it equal to the other weights'")


class QloraStrategy(Strategy):
    name = "qlora"
    description = "LoRA on a 4-bit (NF4) quantised base via bitsandbytes"
    Options = QloraOptions
    artifact = "adapter"

    def check(self, task, model_info, options):
        if options.quant_type == "gguf":
            return _check_gguf(model_info, options)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise Refusal(f"qlora needs bitsandbytes, which cannot be imported ({exc})",
                          where="strategy.name", hint="pip install bitsandbytes, or use strategy 'lora'") from None
        method = quantization_method(model_info)
        if method is not None:
            raise Refusal(f"model {model_info.name!r} is already quantised ({method}); qlora would quantise it again",
                          where="strategy.name", hint="use strategy 'lora' on this model")
        check_lora_init(options, quantised=True)

    def check_recipe(self, recipe):
        options = recipe.strategy
        if options.quant_type == "gguf" and recipe.distributed.backend in ("fsdp", "deepspeed"):
            raise Refusal(f"quant_type = \"gguf\" with {recipe.distributed.backend}: the GGUF blocks cannot be "
                          "sharded", where="strategy.quant_type", hint="use DDP, or quant_type = \"nf4\"")
        if recipe.distributed.backend in ("fsdp", "deepspeed") and options.quant_storage == "uint8":
            # FSDP/ZeRO-3 flatten all weights of a layer into one tensor: the packed 4-bit
            # weights must be stored in the same dtype as the rest of the model.
            raise Refusal(f"qlora with {recipe.distributed.backend} needs the 4-bit weights stored in the model's "
                          "float dtype", where="strategy.quant_storage",
                          hint=f"set strategy.quant_storage = \"{_compute_dtype(options).dtype}\" (same as compute_dtype)")

    def load_kwargs(self, options):
        from accelerate import PartialState

        if options.quant_type == "gguf":  # the GGUF weights loader keeps the file's blocks as stored
            from petune_plugins.strategies.gguf_backend import KEEP_BLOCKS

            return {KEEP_BLOCKS: _compute_dtype(options, PartialState().device).dtype}
        import torch
        from transformers import BitsAndBytesConfig

        return {
            # bitsandbytes weights cannot be moved after loading (the Trainer does not try),
            # so they load straight onto this process's device (its GPU under DDP, else CPU).
            "device_map": {"": PartialState().device},
            "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.quant_type,
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, _compute_dtype(options, PartialState().device).dtype),
            llm_int8_skip_modules=_UNQUANTISED,
            bnb_4bit_quant_storage=getattr(torch, options.quant_storage),
            ),
        }

    def apply(self, model, task, options):
        if options.quant_type == "gguf":
            # loaded with the blocks (load_kwargs), or a skeleton for estimates: swapped here
            self._gguf_swapped = getattr(model, "_petune_gguf_swapped", None) or _swap_gguf(model, options)
            model = apply_lora(model, task, options)
            model.train()
            return model
        for name in head_modules(task, model):
            if any(getattr(p, "quant_state", None) is not None for p in model.get_submodule(name).parameters()):
                raise Refusal(f"the task head {name!r} was loaded in 4-bit and cannot train",
                              hint="report this model to petune: its head name is not in the skip list")
        model = _keep_trainable_layout(apply_lora(model, task, options))
        model.train()
        return model

    def training_plan(self, options):
        from accelerate import PartialState

        compute = _compute_dtype(options, PartialState().device)
        warning = precision.emulation_warning(compute.dtype, "strategy.compute_dtype", PartialState().device)
        swapped = getattr(self, "_gguf_swapped", None) if options.quant_type == "gguf" else None
        rows = {**init_plan(options), **(swapped.rows() if swapped else {})}
        return {**rows, **({"warning": warning} if warning else {})}

    def resolved_options(self, options):
        # bitsandbytes' own settings say nothing about a GGUF file's blocks: the plan says so
        unused = {"double_quant": "n/a (gguf)", "quant_storage": "n/a (gguf)"} if options.quant_type == "gguf" else {}
        if options.compute_dtype != "auto":
            return unused
        from accelerate import PartialState

        return {**unused, "compute_dtype": str(_compute_dtype(options, PartialState().device))}

    def prepare(self, model, task, options, batches, total_steps):
        prepare_lora(model, options, batches)  # EVA: from the task's own training batches

    def make_optimizer(self, model, options, optimizer_cls, optimizer_kwargs):
        return loraplus_optimizer(model, options, optimizer_cls, optimizer_kwargs)

    def save(self, model, path):
        save_lora(model, path)

    def restore(self, base, path, task, options):
        # bitsandbytes' own inference kernels, as plain peft gets them: a reloaded adapter
        # gives the same outputs here and in any other tool (see _keep_trainable_layout)
        if options.quant_type == "gguf" and not _has_blocks(base) and not getattr(base, "_petune_gguf_dequantized", False):
            _swap_gguf(base, options)  # the blocks training computed with (unless dequantize() did it)
        return restore_peft(base, path)

    def dequantize(self, base, options):
        # transformers swaps every 4-bit Linear for a plain one holding bitsandbytes'
        # dequantised weight, and drops the quantisation config; the rest keeps its dtype
        if options.quant_type == "gguf":
            from petune_plugins.strategies import gguf_backend

            if not _has_blocks(base):
                _swap_gguf(base, options)
            base = gguf_backend.dequantize_layers(base, base.dtype)
            base._petune_gguf_dequantized = True
            return base
        return base.dequantize()

    def for_inference(self, model, options):
        # bitsandbytes dequantises every 4-bit weight again for every forward; on a CPU that
        # is most of a generated token's time, so the dequantised weights are kept instead
        # (memory of a 16/32-bit base; a GPU keeps its fused 4-bit kernels and its memory)
        contiguous_head_input(model)
        if options.quant_type == "gguf":
            from petune_plugins.strategies import gguf_backend

            for layer in gguf_backend.gguf_layers(model):
                if layer.weight.device.type == "cpu":
                    layer.keep_dequantized()
        else:
            for module in model.modules():
                if _is_4bit_linear(module) and module.weight.device.type == "cpu":
                    _keep_dequantised(module, _compute_dtype(options, "cpu").torch_dtype)
        fold_lora_into_kept_weights(model)  # one matmul per layer instead of three
        return model

    def merge(self, model):
        return merge_lora(model)

    def base_is_gguf_file(self, options):
        return options.quant_type == "gguf"


def _compute_dtype(options, device=None) -> precision.Choice:
    return precision.resolve(options.compute_dtype, device)


def _gguf_file(folder):
    from petune_plugins.sources.gguf_file import gguf_for_folder

    return gguf_for_folder(folder) if folder else None


def _check_gguf(model_info, options) -> None:
    check_lora_init(options, quantised=True)
    if options.init == "loftq":
        raise Refusal("init = 'loftq' fits the adapter to bitsandbytes' 4-bit error, not to a GGUF file's",
                      where="strategy.init", hint="use init = 'default' or 'eva' with quant_type = \"gguf\"")
    if model_info is None:
        return
    path = _gguf_file(model_info.path)
    if path is None:
        raise Refusal(f"quant_type = \"gguf\" keeps a GGUF file's quantisation, and model {model_info.name!r} is "
                      "not a GGUF file", where="strategy.quant_type",
                      hint="set model.name to a .gguf file (or \"gemma-3-270m\"), or use quant_type = \"nf4\"")
    from petune_plugins.strategies import gguf_backend

    gguf_backend.check_types(path)


def _swap_gguf(model, options):
    """The GGUF file's blocks into ``model``'s linear layers (see gguf_backend)."""
    from petune_plugins.strategies import gguf_backend

    path = _gguf_file(getattr(model, "name_or_path", None))
    if path is None:
        raise Refusal(f"quant_type = \"gguf\": the model in {getattr(model, 'name_or_path', '?')} was not "
                      "resolved from a GGUF file", where="strategy.quant_type",
                      hint="set model.name to a .gguf file (or \"gemma-3-270m\"), or use quant_type = \"nf4\"")
    swapped = gguf_backend.swap_in_blocks(model, path, _compute_dtype(options).torch_dtype)
    gguf_backend.require_layers(model, path)
    return swapped


def _has_blocks(model) -> bool:
    from petune_plugins.strategies import gguf_backend

    return bool(gguf_backend.gguf_layers(model))


def _is_4bit_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)  # peft's LoRA wrapper around one is not


def _keep_dequantised(module, compute_dtype) -> None:
    """Swap a 4-bit Linear's forward for a plain matmul on its weight dequantised once in
    ``compute_dtype``: the values bitsandbytes' own forward computes with, dequantised again
    on every call."""
    import copy

    import bitsandbytes as bnb
    import torch

    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked for bnb's CPU kernels: leave it
        return
    state = copy.copy(state)
    state.dtype = module.compute_dtype or compute_dtype
    kept = [bnb.functional.dequantize_4bit(module.weight.data, state)]
    bias = None if module.bias is None else module.bias.detach().to(kept[0].dtype)

    def forward(x):
        return torch.nn.functional.linear(x.to(kept[0].dtype), kept[0], bias).to(x.dtype)

    def fold(delta):  # a LoRA adapter folded in (see _common.fold_lora_into_kept_weights)
        weight = bnb.functional.dequantize_4bit(module.weight.data, state)
        kept[0] = weight if delta is None else (weight.float() + delta).to(weight.dtype)

    module.forward = forward
    if kept[0].dtype == torch.float32:  # see _common.fold_lora_into_kept_weights
        module.petune_fold = fold


def _keep_trainable_layout(model):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for faster inference the
    first time a layer runs in eval mode, then computes in bf16 whatever compute_dtype says,
    and never unpacks them for training: an evaluation mid-training would break the next
    step. Reloaded models keep bitsandbytes' default: the repacked kernels compute in bf16,
    so their outputs differ from the training-time ones by bf16 rounding."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@hookimpl
def register_strategies(register):
    register(QloraStrategy)
