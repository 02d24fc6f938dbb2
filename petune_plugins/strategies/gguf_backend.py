"""QLoRA on a GGUF file's own quantisation (``strategy.quant_type = "gguf"``).

The base is built as transformers builds it from the model folder (config, embeddings,
norms), then every linear layer whose weight the GGUF file stores quantised is swapped for a
:class:`GGUFLinear` that keeps the file's raw blocks (uint8, exactly as on disk) and
dequantises them in each forward with :mod:`gguf_quants` (torch ops: CPU and CUDA), to the
compute dtype. Its backward dequantises again instead of keeping the dense weight alive, as
bitsandbytes does. The blocks never train; LoRA (or any peft method wrapping ``nn.Linear``)
trains beside them: a ``GGUFLinear`` *is* an ``nn.Linear`` to peft, whose weight is a uint8
parameter (so peft keeps the adapter in float32, as on a 4-bit base).

The non-quantised tensors (norms, and embeddings the layers do not own) are read from the
file too, so the model computes with the file's values, not with the folder's bf16 copy.

GGUF names map to transformers names as transformers' own GGUF loader maps them
(``get_gguf_hf_weights_map`` and the per-architecture tensor processors: llama's q/k rows
permuted back for its rope — a permutation of rows, so it is applied to the rows of blocks —
and Gemma's norms stored as 1 + w).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from petune.errors import Refusal
from petune_plugins.strategies import gguf_quants


def _dequantize(blocks: torch.Tensor, type_name: str, dtype: torch.dtype) -> torch.Tensor:
    """The blocks as ``dtype`` weights. On a CPU in one thread: dequantising is many small
    elementwise ops, and splitting each over threads costs more than it saves — on a busy
    machine far more (the 270M Gemma's layers: 1.3 s in one thread, 16-25 s in two, measured
    on 2 shared cores). The matmuls keep torch's threads."""
    if blocks.device.type != "cpu" or torch.get_num_threads() == 1:
        return gguf_quants.dequantize(blocks, type_name).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return gguf_quants.dequantize(blocks, type_name).to(dtype)
    finally:
        torch.set_num_threads(threads)


class _Matmul(torch.autograd.Function):
    """x·Wᵀ (+ b) with W dequantised from blocks in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, blocks, type_name, dtype, bias):
        weight = _dequantize(blocks, type_name, dtype)
        ctx.save_for_backward(blocks)
        ctx.type_name, ctx.dtype = type_name, dtype
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (blocks,) = ctx.saved_tensors
        weight = _dequantize(blocks, ctx.type_name, ctx.dtype)
        return grad.to(ctx.dtype) @ weight, None, None, None, None


class GGUFLinear(torch.nn.Linear):
    """A frozen linear layer whose weight stays in a GGUF file's blocks (``weight``: uint8
    ``[out_features, bytes_per_row]``), dequantised to ``compute_dtype`` for every matmul."""

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.gguf_type = type_name
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(blocks, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self._dense: torch.Tensor | None = None  # for_inference: dequantised once

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(self.weight, self.gguf_type, dtype or self.compute_dtype)

    def keep_dequantized(self) -> None:
        """Dequantise once and compute from the dense weight from now on (inference only); a
        LoRA adapter may then be folded into it (``petune_fold``, see _common.fold_lora_into_kept_weights)."""
        self._dense = self.dequantized()
        if self.compute_dtype == torch.float32:  # see _common.fold_lora_into_kept_weights
            self.petune_fold = self._fold

    def _fold(self, delta: torch.Tensor | None) -> None:
        """Keep ``weight + delta`` (summed in float32) as the dense weight; None: the weight alone."""
        weight = self.dequantized(torch.float32)
        self._dense = (weight if delta is None else weight + delta.to(weight.device)).to(self.compute_dtype)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self._dense is not None:
            out = torch.nn.functional.linear(x.to(self.compute_dtype), self._dense, bias)
        else:
            out = _Matmul.apply(x.to(self.compute_dtype), self.weight, self.gguf_type, self.compute_dtype, bias)
        return out.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf={self.gguf_type}"


@dataclass
class Swapped:
    """What :func:`swap_in_blocks` did, for the plan."""

    compute_dtype: str
    quantised: Counter = field(default_factory=Counter)  # type -> layers
    weights: Counter = field(default_factory=Counter)  # type -> weights
    nbytes: Counter = field(default_factory=Counter)  # type -> bytes of blocks
    dense: Counter = field(default_factory=Counter)  # type -> tensors put in place as floats

    def rows(self) -> dict[str, str]:
        kept = ", ".join(f"{t}: {self.quantised[t]} layers, {self.weights[t] / 1e6:.1f}M weights, "
                         f"{self.nbytes[t] / 2**20:.1f} MiB ({gguf_quants.bits_per_weight(t):g} bit/weight)"
                         for t in sorted(self.quantised))
        total = sum(self.nbytes.values())
        dense = ", ".join(f"{n} {t}" for t, n in sorted(self.dense.items()))
        return {"gguf base": f"linear layers kept in the file's blocks, dequantised per forward to "
                             f"{self.compute_dtype}: {kept or 'none'} (total {total / 2**20:.1f} MiB)",
                "gguf dense": f"tensors read from the file as floats (embeddings, norms): {dense or 'none'}"}


@functools.lru_cache(maxsize=4)
def _cached_table(path: str, size: int, mtime_ns: int):
    from petune.gguf_tensors import read_table

    return read_table(Path(path))


def reader_of(path: Path):
    """The tensor table of ``path`` (:mod:`petune.gguf_tensors`), shared by the check, the estimate
    and the load of one run."""
    stat = Path(path).stat()
    return _cached_table(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def check_types(gguf_path: Path) -> None:
    """Refuse a file holding a tensor type the backend cannot dequantise (naming it)."""
    reader = reader_of(gguf_path)
    for tensor in reader.tensors:
        gguf_quants.check_supported(tensor.tensor_type.name, where=f"{tensor.name} in {gguf_path.name}")


def _mapping(model, reader):
    """(tensor processor, GGUF name -> transformers name) for ``model``, as transformers'
    own GGUF loader maps them."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture = reader.architecture
    config = model.config.to_dict()
    if hasattr(model.config, "get_text_config"):
        config = {**model.config.get_text_config().to_dict(), **config}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    return processor, get_gguf_hf_weights_map(model, processor)


def _raw(tensor) -> torch.Tensor:
    """A file tensor's bytes as uint8, one row of blocks per row (a copy: the reader's memory map is read-only)."""
    raw = torch.from_numpy(np.ascontiguousarray(tensor.data).view(np.uint8).copy())
    return raw.reshape(*tensor.data.shape[:-1], -1) if raw.dim() > 1 else raw


def swap_in_blocks(model: torch.nn.Module, gguf_path: Path, compute_dtype: torch.dtype, *,
                   fill_meta: bool = False) -> Swapped:
    """Put the file's tensors into ``model`` (in place): quantised weights of linear layers
    as :class:`GGUFLinear` blocks, every other mapped tensor as floats in its parameter's
    dtype. Parameters on the meta device (a weightless skeleton) get shapes only (memory
    estimates: nothing is read), or, with ``fill_meta``, the file's values."""
    reader = reader_of(gguf_path)
    processor, names = _mapping(model, reader)
    modules = dict(model.named_modules())
    # the output layer stays dense, as bitsandbytes leaves it: fused losses (TRL's chunked
    # cross-entropy) read its weight directly, and tied models share it with the embeddings
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = Swapped(compute_dtype=str(compute_dtype).removeprefix("torch."))
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        gguf_quants.check_supported(type_name, where=f"{tensor.name} in {gguf_path.name}")
        owner_name, _, attr = names.get(tensor.name, "").rpartition(".")
        owner = modules.get(owner_name) if owner_name else None
        if owner is None:
            continue
        target = getattr(owner, attr)
        blocks_here = (type_name not in gguf_quants.FLOAT_TYPES and attr == "weight"
                       and type(owner) is torch.nn.Linear and owner is not output)
        if target.is_meta and not fill_meta:  # shapes only
            if blocks_here:
                blocks = torch.empty(owner.out_features, gguf_quants.row_bytes(type_name, owner.in_features),
                                     dtype=torch.uint8, device="meta")
                _replace(model, modules, owner_name, owner, blocks, type_name, compute_dtype, done)
            continue
        raw = _raw(tensor)
        if blocks_here and raw.dim() == 2 and raw.shape[0] == owner.out_features:
            permuted = processor.process(weights=raw.numpy(), name=tensor.name, tensor_key_mapping=names,
                                         parsed_parameters={"tensors": {}})
            blocks = torch.from_numpy(permuted.weights.copy())
            if blocks.dtype == torch.uint8 and blocks.shape == raw.shape:
                _replace(model, modules, owner_name, owner, blocks, type_name, compute_dtype, done)
                continue
        value = _dense(raw, type_name, tensor.name, processor, names, target.shape, target.dtype)
        if target.is_meta:
            setattr(owner, attr, torch.nn.Parameter(value, requires_grad=target.requires_grad))
        else:
            with torch.no_grad():
                target.copy_(value)
        done.dense[type_name] += 1
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return done


def _replace(model, modules, owner_name, owner, blocks, type_name, compute_dtype, done: Swapped) -> None:
    parent_name, _, child = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = GGUFLinear(blocks, type_name, owner.in_features, owner.out_features, owner.bias, compute_dtype)
    setattr(parent, child, layer)
    modules[owner_name] = layer
    done.quantised[type_name] += 1
    done.weights[type_name] += owner.in_features * owner.out_features
    done.nbytes[type_name] += blocks.numel()


def dense_state_dict(skeleton: torch.nn.Module, gguf_path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the file the model (a meta skeleton: names and shapes) maps, dequantised
    to ``dtype`` under its transformers name: what a converted checkpoint would hold. Types the
    torch dequantiser does not read go through llama.cpp's numpy reference."""
    reader = reader_of(gguf_path)
    processor, names = _mapping(skeleton, reader)
    expected = dict(skeleton.state_dict())
    weights = {}
    for tensor in reader.tensors:
        name = names.get(tensor.name)
        if name is None or name not in expected:
            continue
        weights[name] = _dense(_raw(tensor), tensor.tensor_type.name, tensor.name, processor, names,
                               expected[name].shape, dtype, tensor=tensor)
    return weights


def _dense(raw, type_name, gguf_name, processor, names, shape, dtype, tensor=None) -> torch.Tensor:
    """One file tensor as floats of ``shape`` and ``dtype``, reordered as the architecture's
    processor reorders it (llama's q/k rows, Gemma's 1 + w norms)."""
    def floats(data):
        if type_name in gguf_quants.SUPPORTED or tensor is None:
            return _dequantize(data, type_name, torch.float32)
        import gguf

        return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))

    if raw.dim() == 2 and len(shape) == 2 and raw.shape[0] == shape[0] and type_name in gguf_quants.SUPPORTED:
        # a matrix (an embedding): the processor only reorders rows, which it may do on the
        # raw rows; then dequantised a slice of rows at a time, straight into the result
        # (the 262k-row Gemma embedding would otherwise take two float32 copies at once)
        n = raw.shape[0]
        probe = processor.process(weights=np.arange(n, dtype=np.float64)[:, None], name=gguf_name,
                                  tensor_key_mapping=names, parsed_parameters={"tensors": {}}).weights.reshape(-1)
        if probe.shape == (n,) and np.array_equal(np.sort(probe), np.arange(n)):  # only reorders rows
            rows = raw[torch.from_numpy(probe.astype(np.int64))]
            out = torch.empty(shape, dtype=dtype)
            for start in range(0, n, 8192):
                out[start:start + 8192] = floats(rows[start:start + 8192].contiguous())
            return out
    values = floats(raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.reshape(1, -1))
    result = processor.process(weights=values.numpy(), name=gguf_name, tensor_key_mapping=names,
                               parsed_parameters={"tensors": {}})
    return torch.from_numpy(result.weights.copy()).reshape(shape).to(dtype)


def dequantize_layers(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Every :class:`GGUFLinear` back to a plain ``nn.Linear`` holding its dequantised weight
    (the values training computed with), for merging and exports."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GGUFLinear):
            weight = module.dequantized(dtype)
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            plain.requires_grad_(False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def gguf_layers(model: torch.nn.Module) -> list[GGUFLinear]:
    return [m for m in model.modules() if isinstance(m, GGUFLinear)]


def require_layers(model: torch.nn.Module, gguf_path: Path) -> None:
    if not gguf_layers(model):
        raise Refusal(f"no linear layer of {type(model).__name__} matches a quantised tensor of {gguf_path.name}",
                      where="strategy.quant_type", hint="use quant_type = \"nf4\" for this model")


def add_gguf_lora(model: torch.nn.Module, adapter_path: Path, gguf_architecture: str) -> int:
    """Apply a llama.cpp LoRA adapter GGUF to ``model`` (in place, as forward hooks adding
    ``alpha / r · B·A·x`` to each adapted layer's output), mapping its names and B's rows back
    as :func:`swap_in_blocks` maps the base file's. Returns how many layers were adapted."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from petune.export import read_lora_gguf

    alpha, pairs = read_lora_gguf(adapter_path)
    config = model.config.get_text_config().to_dict() if hasattr(model.config, "get_text_config") else {}
    processor = TENSOR_PROCESSORS.get(gguf_architecture, TensorProcessor)(config={**config, **model.config.to_dict()})
    names = get_gguf_hf_weights_map(model, processor)
    for base_name, (a, b) in pairs.items():
        module = model.get_submodule(names[base_name].rpartition(".")[0])
        b = processor.process(weights=b, name=base_name, tensor_key_mapping=names,
                              parsed_parameters={"tensors": {}}).weights
        down, up = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
        scale = alpha / down.shape[0]

        def hook(mod, args, output, down=down, up=up, scale=scale):
            x = args[0]
            delta = (x.to(torch.float32) @ down.T @ up.T) * scale
            return output + delta.to(output.dtype)

        module.register_forward_hook(hook)
    return len(pairs)


#: a ``from_pretrained`` keyword a strategy's ``load_kwargs`` gives to keep the file's blocks
#: (:class:`GGUFLinear`), computing in this dtype; without it the base loads dense
KEEP_BLOCKS = "petune_gguf_blocks"


def load_model(auto_class, folder: Path, gguf_path: Path, kwargs: dict):
    """``auto_class.from_pretrained(folder, **kwargs)`` for a folder whose weights stay in
    ``gguf_path`` (config and tokenizer only). With :data:`KEEP_BLOCKS`, a weightless
    skeleton gets the file's blocks and floats (nothing dense is ever built); without it,
    transformers loads the file's tensors dequantised, as from a converted checkpoint
    (bitsandbytes then quantises them as usual)."""
    from transformers import AutoConfig, GenerationConfig

    kwargs = dict(kwargs)
    compute = kwargs.pop(KEEP_BLOCKS, None)
    with_info = kwargs.pop("output_loading_info", False)
    model_kwargs = {k: kwargs.pop(k) for k in ("dtype", "attn_implementation", "device_map", "quantization_config",
                                               "ignore_mismatched_sizes", "low_cpu_mem_usage") if k in kwargs}
    kwargs.pop("trust_remote_code", None)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)  # e.g. num_labels
    dtype = model_kwargs.get("dtype")
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    skeleton = _skeleton(auto_class, config, dtype, model_kwargs.get("attn_implementation"))
    if compute is None:
        weights = dense_state_dict(skeleton, gguf_path, dtype)
        model_class = type(skeleton)  # an Auto class takes no state dict without a folder of weights
        del skeleton
        model, info = model_class.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True,
                                                  **model_kwargs)
    else:
        model = skeleton
        model._petune_gguf_swapped = swap_in_blocks(model, gguf_path, getattr(torch, str(compute).removeprefix(
            "torch.")), fill_meta=True)
        missing = _initialise_missing(model)
        info = {"missing_keys": missing, "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        device_map = model_kwargs.get("device_map")
        if isinstance(device_map, dict) and "" in device_map:  # the whole model on one device
            model.to(device_map[""])
        model.eval()
    model.name_or_path = model.config._name_or_path = str(folder)
    if (Path(folder) / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return (model, info) if with_info else model


def _skeleton(auto_class, config, dtype, attn_implementation):
    """The model with every parameter on the meta device (buffers real: rotary tables)."""
    from accelerate import init_empty_weights

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        return auto_class.from_config(config, dtype=dtype, **extra)


def _initialise_missing(model) -> list[str]:
    """Parameters the file has no tensor for (a new task head) get real memory and the
    model's own initialisation, as ``from_pretrained`` gives missing weights. Returns their names."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    for owner_name in sorted({name.rpartition(".")[0] for name in missing}):
        owner = model.get_submodule(owner_name)
        owner.to_empty(device="cpu", recurse=False)
        model._init_weights(owner)
    return missing
