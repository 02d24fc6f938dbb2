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
        """Dequantise once and compute from the dense weight from now on (inference only)."""
        self._dense = self.dequantized()

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
def _cached_reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def reader_of(path: Path):
    """A parsed ``GGUFReader`` of ``path``, shared by the check, the estimate and the load of
    one run: parsing a large vocabulary's metadata takes seconds each time."""
    stat = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def check_types(gguf_path: Path) -> None:
    """Refuse a file holding a tensor type the backend cannot dequantise (naming it)."""
    reader = reader_of(gguf_path)
    for tensor in reader.tensors:
        gguf_quants.check_supported(tensor.tensor_type.name, where=f"{tensor.name} in {gguf_path.name}")


def swap_in_blocks(model: torch.nn.Module, gguf_path: Path, compute_dtype: torch.dtype, *,
                   keep_quantised: bool = True) -> Swapped:
    """Put the file's tensors into ``model`` (in place): quantised weights of linear layers
    as :class:`GGUFLinear` blocks (``keep_quantised``; else dequantised into the plain
    layer), every other mapped tensor as floats in its parameter's dtype."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = reader_of(gguf_path)
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    config = model.config.to_dict()
    if hasattr(model.config, "get_text_config"):
        config = {**model.config.get_text_config().to_dict(), **config}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    modules = dict(model.named_modules())
    # the output layer stays dense, as bitsandbytes leaves it: fused losses (TRL's chunked
    # cross-entropy) read its weight directly, and tied models share it with the embeddings
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = Swapped(compute_dtype=str(compute_dtype).removeprefix("torch."))
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        gguf_quants.check_supported(type_name, where=f"{tensor.name} in {gguf_path.name}")
        if tensor.name not in names:
            continue
        hf_name = names[tensor.name]
        owner_name, _, attr = hf_name.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        quantised = type_name not in gguf_quants.FLOAT_TYPES
        if getattr(owner, attr).is_meta:  # a weightless skeleton (memory estimates): shapes only, nothing read
            if quantised and attr == "weight" and type(owner) is torch.nn.Linear and owner is not output:
                blocks = torch.empty(owner.out_features, gguf_quants.row_bytes(type_name, owner.in_features),
                                     dtype=torch.uint8, device="meta")
                _replace(model, modules, owner_name, owner, blocks, type_name, compute_dtype, done)
            continue
        raw = torch.from_numpy(np.ascontiguousarray(tensor.data).view(np.uint8).copy())
        raw = raw.reshape(*tensor.data.shape[:-1], -1) if raw.dim() > 1 else raw
        if (keep_quantised and quantised and attr == "weight" and type(owner) is torch.nn.Linear and owner is not output
                and raw.dim() == 2 and raw.shape[0] == owner.out_features):
            permuted = processor.process(weights=raw.numpy(), name=tensor.name, tensor_key_mapping=names,
                                         parsed_parameters={"tensors": {}})
            blocks = torch.from_numpy(permuted.weights.copy())
            if blocks.dtype == torch.uint8 and blocks.shape == raw.shape:
                _replace(model, modules, owner_name, owner, blocks, type_name, compute_dtype, done)
                continue
        _put_dense(owner, attr, raw, type_name, tensor.name, processor, names)
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


def _put_dense(owner, attr, raw, type_name, gguf_name, processor, names) -> None:
    target = getattr(owner, attr)
    if raw.dim() == 2 and raw.shape[0] == target.shape[0] and target.dim() == 2:
        # a matrix (an embedding): the processor only reorders rows, which it may do on the
        # raw rows; then dequantised a slice of rows at a time, straight into the parameter
        # (the 262k-row Gemma embedding would otherwise take two float32 copies at once)
        n = raw.shape[0]
        probe = processor.process(weights=np.arange(n, dtype=np.float64)[:, None], name=gguf_name,
                                  tensor_key_mapping=names, parsed_parameters={"tensors": {}}).weights.reshape(-1)
        if probe.shape == (n,) and np.array_equal(np.sort(probe), np.arange(n)):  # only reorders rows
            rows = raw[torch.from_numpy(probe.astype(np.int64))]
            with torch.no_grad():
                for start in range(0, rows.shape[0], 8192):
                    chunk = _dequantize(rows[start:start + 8192].contiguous(), type_name, torch.float32)
                    target[start:start + 8192].copy_(chunk.to(target.dtype))
            return
    values = _dequantize(raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.reshape(1, -1), type_name,
                         torch.float32)
    result = processor.process(weights=values.numpy(), name=gguf_name, tensor_key_mapping=names,
                               parsed_parameters={"tensors": {}})
    values = torch.from_numpy(result.weights.copy()).reshape(target.shape)
    with torch.no_grad():
        target.copy_(values.to(target.dtype))


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
