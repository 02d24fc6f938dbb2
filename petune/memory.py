"""Peak training memory, predicted before anything loads: ``petune estimate`` and the plan.

What is counted (bytes, on the device that trains: GPU memory as torch's allocator counts
it, or the process's resident-memory growth on CPU):

weights
    Every parameter at its storage precision: the load dtype, or 4-bit for the linear
    layers a ``BitsAndBytesConfig(load_in_4bit)`` quantises — 0.5 byte per weight plus the
    quantisation constants (an fp32 absmax per block of 64: +0.0625 byte; with double
    quantisation an 8-bit absmax and fp32 second-level constants: +0.016 byte).
gradients
    One per trainable parameter, in that parameter's dtype.
optimizer
    AdamW (torch): two states per trainable parameter in its dtype (8 bytes for fp32
    LoRA weights); 8-bit AdamW: 2 bytes (tensors under 4096 values keep 32-bit states);
    paged optimisers live in CUDA unified memory, which torch's allocator does not count
    (shown, not added); SGD: none; Adafactor: factored second moments.
activations
    What autograd keeps for the backward pass, found by running the model's forward on
    the *meta device* (shapes only: no memory, no weights, well under a second even for
    8B) with a hook that records every tensor saved for backward, layer by layer.
    Attention is counted as a fused kernel keeps it (q, k, v, output, log-sum-exp: no
    seq × seq matrix), as SDPA does on GPU and CPU. With gradient checkpointing only each
    layer's input is kept, plus one layer's worth while it is recomputed. A backward
    workspace (gradients of the largest activations while a layer's backward runs) is
    added on top. With ``train.activation_offloading`` on a GPU, the kept tensors live in
    CPU memory: on the GPU, at most the in-flight ones (TRL keeps up to five saved tensors
    on the GPU while their copies run, and brings one layer's back for its backward): counted
    as two layers' worth. Packing and padding-free batches change nothing here: the estimate
    is for a batch of full-length examples, which they do not shorten.
logits & loss
    Plain cross-entropy (transformers' loss) materialises the full-vocabulary logits in
    fp32: at the start of backward, log-softmax output + its gradient + the gradient of
    the logits are alive together: 12 bytes × tokens × vocabulary. A task whose trainer
    computes the loss in chunks (TRL's fused LM head: ``loss_memory = "chunked"``) only
    holds one tile of 4096 tokens × 32768 vocabulary entries plus fp32 hidden-size
    gradients — on GPU, where a Triton kernel folds each tile; on CPU TRL folds tiles with
    torch ops, which adds about six tile-sized fp32 temporaries.
runtime
    GPU: cuBLAS workspaces and autocast's bf16 copies of fp32 trainable weights. CPU: the
    memory a training process touches besides the model (thread pools, kernels' scratch,
    the dataset and trainer objects), a constant measured with the tiny models.

The peak is ``weights + optimizer + max(activations + logits + head gradients,
gradients + optimizer-step temporaries)``: activations are freed during backward as
gradients appear. Batches are assumed padded to the task's ``max_length`` (the worst case).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

GiB = 2**30
MiB = 2**20
#: CPU: resident memory a petune training process adds besides the model (measured, tiny models)
CPU_RUNTIME_BYTES = 80 * MiB
#: GPU: cuBLAS / cuBLASLt workspaces and allocator rounding
CUDA_RUNTIME_BYTES = 64 * MiB
#: TRL's fused LM head tile: tokens × vocabulary entries
CHUNK_TOKENS, CHUNK_VOCAB = 4096, 32768
#: without Triton (CPU) TRL folds each tile with torch ops: this many tile-sized fp32 temporaries
CHUNK_TORCH_TEMPORARIES = 6
#: bitsandbytes keeps 32-bit optimizer states for tensors smaller than this
BNB_MIN_8BIT_SIZE = 4096
PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "runtime")


@dataclass
class MemoryEstimate:
    """Predicted peak training memory, in bytes, with its parts."""

    parts: dict[str, int]
    peak: int
    device: str
    capacity: int | None
    trainable: int
    total: int
    batch: int
    seq: int
    gradient_checkpointing: bool
    details: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    @property
    def warning(self) -> str | None:
        if self.fits:
            return None
        hint = ("turn on train.gradient_checkpointing, lower train.batch_size or task.max_length"
                if not self.gradient_checkpointing else "lower train.batch_size or task.max_length, or use qlora")
        return (f"predicted peak {human(self.peak)} is more than the {self.device} has "
                f"({human(self.capacity)}): {hint}")

    def as_dict(self) -> dict:
        return {"parts": self.parts, "peak": self.peak, "device": self.device, "capacity": self.capacity,
                "trainable": self.trainable, "total": self.total, "batch": self.batch, "seq": self.seq,
                "gradient_checkpointing": self.gradient_checkpointing, "details": self.details}


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# -- the device ------------------------------------------------------------------------------
def device_capacity(device: str) -> int | None:
    """Total memory of the CUDA device, or of the machine for CPU training."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory
        return None
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- parameters ----------------------------------------------------------------------------
def _quantised_bytes_per_param(quant) -> float:
    block = int(getattr(quant, "bnb_4bit_blocksize", 64) or 64) if quant is not None else 64
    if quant is not None and getattr(quant, "bnb_4bit_use_double_quant", False):
        return 0.5 + 1 / block + 4 / (block * 256)
    return 0.5 + 4 / block


def _is_4bit(quant) -> bool:
    return quant is not None and bool(getattr(quant, "load_in_4bit", False))


def _skipped(name: str, skip: list[str]) -> bool:
    parts = name.split(".")
    return any(s in parts or name.endswith("." + s) or ("." + s + ".") in ("." + name + ".") for s in skip)


def parameter_inventory(model, quant=None) -> dict:
    """Counts and bytes of a model's parameters (meta tensors are fine), with the linear
    weights that ``quant`` (a 4-bit BitsAndBytesConfig) would store in 4 bits."""
    import torch

    skip = list(getattr(quant, "llm_int8_skip_modules", None) or ["lm_head"]) if _is_4bit(quant) else []
    linear_weights = set()
    if _is_4bit(quant):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not _skipped(name, skip):
                linear_weights.add(id(module.weight))
    q_bytes = _quantised_bytes_per_param(quant)
    # frozen linear layers whose weight is stored packed in integers (a GGUF file's blocks): counted
    # at their real number of weights, their bytes as stored (bits per weight of each block type)
    packed_linears = {id(m.weight): m.in_features * m.out_features for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)
                      and not m.weight.is_floating_point() and getattr(m.weight, "quant_state", None) is None}
    seen = set()
    inv = {"total": 0, "trainable": 0, "weights": 0.0, "quantised": 0, "quantised_bytes": 0.0, "trainable_params": []}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        packed = packed_linears.get(id(p))
        if packed is not None:  # e.g. GGUF blocks: in × out weights stored in the tensor's own bytes
            inv["total"] += packed
            inv["quantised"] += packed
            inv["quantised_bytes"] += n * p.element_size()
            inv["weights"] += n * p.element_size()
            continue
        inv["total"] += n
        if p.requires_grad:
            inv["trainable"] += n
            inv["trainable_params"].append((name, tuple(p.shape), p.dtype))
            inv["weights"] += n * p.element_size()
        elif id(p) in linear_weights:
            inv["quantised"] += n
            inv["quantised_bytes"] += n * q_bytes
            inv["weights"] += n * q_bytes
        else:
            inv["weights"] += n * p.element_size()
    return inv


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype, device="meta").element_size()


def optimizer_bytes(trainable_params: list, optimizer: str) -> tuple[int, int]:
    """(bytes counted on the device, paged bytes) of the optimizer states."""
    counted = paged = 0
    for _, shape, dtype in trainable_params:
        n = math.prod(shape)
        size = _itemsize(dtype)
        if optimizer in ("adamw_torch", "adamw_torch_fused", "adamw"):
            counted += 2 * n * size
        elif optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
            b = 2 * n * 1 + 2 * 4 * math.ceil(n / 256) if n >= BNB_MIN_8BIT_SIZE else 8 * n
            if optimizer.startswith("paged"):
                paged += b
            else:
                counted += b
        elif optimizer == "paged_adamw_32bit":
            paged += 8 * n
        elif optimizer == "sgd":
            pass
        elif optimizer == "adafactor":
            counted += 4 * (shape[0] + math.prod(shape[1:])) if len(shape) >= 2 else 4 * n
        else:  # unknown: assume Adam-like
            counted += 2 * n * size
    return counted, paged


# -- activations: a forward pass on the meta device --------------------------------------------
class _SavedTensorLedger:
    """Bytes of the tensors autograd saves for backward, attributed to the layer running."""

    def __init__(self, param_storages: set):
        self.param_storages = param_storages
        self.seen: set = set()
        self.current: int | None = None
        self.per_layer: dict[int, int] = {}
        self.layer_input: dict[int, int] = {}
        self.layer_tokens: dict[int, int] = {}
        self.largest: dict[int, int] = {}
        self.outside = 0
        self.vocab_sized = 0
        self.vocab = 0

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            key = storage._cdata
            nbytes = storage.nbytes()
        except Exception:  # noqa: BLE001 — odd tensor subclasses: count their size
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in self.param_storages or key in self.seen:
            return t
        self.seen.add(key)
        if self.current is None:
            if self.vocab and t.dim() >= 1 and t.shape[-1] == self.vocab and t.is_floating_point():
                self.vocab_sized += nbytes
            else:
                self.outside += nbytes
        else:
            self.per_layer[self.current] = self.per_layer.get(self.current, 0) + nbytes
            self.largest[self.current] = max(self.largest.get(self.current, 0), nbytes)
        return t


@contextlib.contextmanager
def _fused_attention():
    """Make transformers' attention save what a fused SDPA kernel saves (q, k, v, out,
    logsumexp) instead of the meta device's math fallback, which keeps seq × seq scores."""
    import torch
    from transformers import AttentionInterface

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the estimate does no backward pass
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def attention(module, query, key, value, attention_mask, **kwargs):
        out = FusedAttention.apply(query, key, value)  # (batch, heads, seq, head_dim)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("petune_estimate", attention)
    yield "petune_estimate"


def _pages(nbytes: int, page: int = 4096) -> int:
    """Bytes of the memory pages a write of ``nbytes`` from a page boundary touches."""
    return -(-nbytes // page) * page


def _find_layers(model):
    """The transformer block stack: the ModuleList of same-class modules with the most parameters."""
    import torch

    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[1]):
                best = (module, size)
    return list(best[0]) if best else []


def _dummy_inputs(shape, batch: int, seq: int, vocab: int) -> dict:
    """A full-length training batch for a model of ``shape`` (a :class:`petune.api.ModelShape`)."""
    import torch

    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    inputs = {"input_ids": ids}  # full-length rows: the attention mask is all ones, which SDPA drops
    if shape.labels == "tokens":
        inputs["labels"] = ids
    elif shape.labels == "class":
        inputs["labels"] = torch.zeros((batch,), dtype=torch.long, device="meta")
    elif shape.labels == "span":
        inputs["start_positions"] = inputs["end_positions"] = torch.zeros((batch,), dtype=torch.long, device="meta")
    return inputs


def measure_activations(model, batch: int, seq: int, *, shape, vocab: int, autocast_dtype=None) -> dict:
    """Run ``model`` (on the meta device) forward once; return the bytes saved for backward
    per layer, outside the layers, of vocabulary-sized tensors (logits), each layer's input
    size and the largest single tensor a layer saves.

    ``autocast_dtype``: the mixed-precision compute dtype (bf16/fp16) — fp32 trainable
    weights are then cast to it for the pass, as autocast casts their matmul inputs."""
    import torch

    casts = []
    if autocast_dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype == torch.float32:
                casts.append((p, p.data))
                p.data = p.data.to(autocast_dtype)
    param_storages = set()
    for p in model.parameters():
        param_storages.add(p.untyped_storage()._cdata)
    for b in model.buffers():
        param_storages.add(b.untyped_storage()._cdata)
    ledger = _SavedTensorLedger(param_storages)
    ledger.vocab = vocab
    handles = []
    for index, layer in enumerate(_find_layers(model)):
        def pre(module, args, kwargs, index=index):
            ledger.current = index
            hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if isinstance(hidden, torch.Tensor):
                ledger.layer_input[index] = hidden.numel() * hidden.element_size()
                ledger.layer_tokens[index] = hidden.numel() // max(1, hidden.shape[-1])

        def post(module, args, output):
            ledger.current = None

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
            model(**_dummy_inputs(shape, batch, seq, vocab))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for p, data in casts:
            p.data = data
    return {"per_layer": ledger.per_layer, "layer_input": ledger.layer_input, "largest": ledger.largest,
            "tokens": max(ledger.layer_tokens.values(), default=batch * seq),
            "outside": ledger.outside, "vocab_sized": ledger.vocab_sized}


# -- the model skeleton --------------------------------------------------------------------------
def build_skeleton(config, shape, dtype, attn_implementation: str | None = None):
    """The task's model (``shape``: a :class:`petune.api.ModelShape`) built from ``config``
    on the meta device (no memory)."""
    import copy

    import torch
    import transformers

    config = copy.deepcopy(config)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = getattr(transformers, shape.auto_class)
    if shape.labels in ("class", "tokens") and not shape.causal_lm_loss and not getattr(config, "num_labels", None):
        config.num_labels = 2
    with torch.device("meta"):
        try:
            return auto.from_config(config, **kwargs)
        except (ValueError, TypeError):
            kwargs.pop("attn_implementation", None)
            return auto.from_config(config, **kwargs)


# -- the estimate ----------------------------------------------------------------------------------
def estimate(model, *, batch: int, seq: int, gradient_checkpointing: bool, shape, device: str,
             optimizer: str = "adamw_torch", autocast_dtype=None, quant=None, loss_memory: str = "logits",
             capacity: int | None = -1, frozen_copies: int = 0,
             activation_offloading: bool = False) -> MemoryEstimate:
    """Predict the training peak of ``model`` — a skeleton on the meta device with the
    strategy already applied (trainable flags and added modules as in training); ``shape``
    is the task's :class:`petune.api.ModelShape`; ``frozen_copies``: frozen copies of the
    weights the trainer keeps beside the model (a reference model)."""
    import torch

    config = model.config if hasattr(model, "config") else None
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    cuda = device.startswith("cuda")

    inv = parameter_inventory(model, quant)
    weights = int(inv["weights"]) * (1 + frozen_copies)
    gradients = sum(math.prod(shape) * _itemsize(dtype) for _, shape, dtype in inv["trainable_params"])
    opt_counted, opt_paged = optimizer_bytes(inv["trainable_params"], optimizer)

    # GPU kernels (flash / memory-efficient) fuse attention with its dropout; torch's CPU flash
    # kernel has no dropout, so with attention dropout SDPA falls back to the math path, which
    # keeps seq × seq probabilities — what the meta device's own SDPA keeps too
    attention_dropout = float(getattr(text, "attention_dropout", 0.0) or getattr(text, "attention_probs_dropout_prob", 0.0) or 0.0)
    fused = cuda or attention_dropout == 0.0
    with _fused_attention() as attn:
        skeleton_attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if fused:
            _set_attn(model, attn)
        try:
            acts = measure_activations(model, batch, seq, shape=shape, vocab=vocab,
                                       autocast_dtype=autocast_dtype)
        finally:
            if fused:
                _set_attn(model, skeleton_attn)
    layers = sorted(acts["per_layer"])
    per_layer = [acts["per_layer"][i] for i in layers]
    largest = max(acts["largest"].values(), default=0)
    if gradient_checkpointing and per_layer:
        kept = sum(acts["layer_input"].get(i, 0) for i in layers)
        recompute = max(per_layer)  # one layer's activations, while it is recomputed in backward
    else:
        kept = sum(per_layer)
        recompute = 0
    offloaded = 0
    if activation_offloading and cuda and per_layer:
        in_flight = 2 * (max(acts["layer_input"].get(i, 0) for i in layers) if gradient_checkpointing
                         else max(per_layer))
        offloaded = max(kept - in_flight, 0)
        kept -= offloaded
    base = kept + acts["outside"]
    workspace = 2 * largest  # gradients of the biggest activations while a layer's backward runs

    tokens = acts["tokens"]  # batch × seq, plus prompt tuning's virtual tokens
    compute_size = _itemsize(autocast_dtype) if autocast_dtype is not None else 4
    head_trainable = any(math.prod(s) >= vocab * hidden and s[0] == vocab
                         for _, s, _ in inv["trainable_params"]) if vocab and hidden else False
    if not shape.causal_lm_loss or not vocab:
        logits = acts["vocab_sized"]
    elif loss_memory == "chunked":
        # TRL's fused LM head: one [min(tokens, 4096), 32768] tile buffer whatever the vocabulary,
        # fp32 gradients of the hidden states, a few fp32 numbers per token
        n = min(tokens, CHUNK_TOKENS)
        tile = n * CHUNK_VOCAB * compute_size
        # on CPU only the tile's first min(vocab, 32768) columns are ever written, so fewer pages
        # become resident than are allocated
        row = CHUNK_VOCAB * compute_size
        tile_touched = n * min(row, _pages(min(vocab, CHUNK_VOCAB) * compute_size))
        rest = tokens * hidden * (4 + compute_size) + tokens * 8 * 4
        if not cuda:  # the torch fallback's temporaries: [n, min(vocab, 32768)] fp32 each
            rest += CHUNK_TORCH_TEMPORARIES * n * min(vocab, CHUNK_VOCAB) * 4
        logits = tile + rest
        resident_logits = (tile if cuda else tile_touched) + rest
        if head_trainable:
            logits += vocab * hidden * 4
            resident_logits += vocab * hidden * 4
    else:
        logits = 12 * tokens * vocab
    if loss_memory != "chunked" or not shape.causal_lm_loss or not vocab:
        resident_logits = logits

    outside_grads = 0
    layer_param_ids = {id(p) for layer in _find_layers(model) for p in layer.parameters()}
    for p in model.parameters():
        if p.requires_grad and id(p) not in layer_param_ids:
            outside_grads += p.numel() * p.element_size()
    if cuda and optimizer in ("adamw_torch", "adamw"):
        step_temp = gradients  # foreach AdamW: one temporary per state tensor, all at once
    else:
        step_temp = max((math.prod(s) * _itemsize(d) * 2 for _, s, d in inv["trainable_params"]), default=0)

    if cuda:
        runtime = CUDA_RUNTIME_BYTES
        if autocast_dtype is not None:  # autocast caches low-precision copies of fp32 weights it casts
            runtime += sum(math.prod(s) * _itemsize(autocast_dtype) for _, s, d in inv["trainable_params"]
                           if d == torch.float32)
    else:
        runtime = CPU_RUNTIME_BYTES

    # backward begins at the loss (logits and their gradients alive), then walks down the layers
    # (one recomputed layer + its gradients alive); the loss buffers are gone by then
    after_backward = gradients + step_temp

    def peak_with(loss_bytes: int) -> int:
        during_backward = base + max(loss_bytes, recompute + workspace) + outside_grads
        return weights + opt_counted + max(during_backward, after_backward)

    phase = "backward" if base + max(logits, recompute + workspace) + outside_grads >= after_backward \
        else "optimizer step"
    tensor_peak = peak_with(logits)  # every allocated byte (what CUDA's allocator counts)
    peak = (tensor_peak if cuda else peak_with(resident_logits)) + runtime
    parts = {"weights": weights, "gradients": gradients, "optimizer": opt_counted,
             "activations": base + recompute + workspace, "logits": logits, "runtime": runtime}
    if capacity == -1:
        capacity = device_capacity(device)
    details = {"tensor_peak": int(tensor_peak), "quantised_params": inv["quantised"],
               "quantised_bytes": inv["quantised_bytes"], "paged_optimizer_bytes": opt_paged,
               "activations_per_layer": per_layer[0] if per_layer else 0, "layers": len(per_layer),
               "activations_outside_layers": acts["outside"], "backward_workspace": workspace,
               "offloaded_to_cpu": int(offloaded),
               "loss_memory": loss_memory if shape.causal_lm_loss else "head", "optimizer": optimizer,
               "attention": "fused" if fused else "math (seq × seq)",
               "tokens": tokens, "peak_phase": phase}
    return MemoryEstimate(parts=parts, peak=int(peak), device=device, capacity=capacity, trainable=inv["trainable"],
                          total=inv["total"], batch=batch, seq=seq, gradient_checkpointing=gradient_checkpointing,
                          details=details)


def _set_attn(model, name):
    if name is None:
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            with contextlib.suppress(Exception):  # a config that refuses the name keeps its own
                config._attn_implementation = name


# -- from a recipe ----------------------------------------------------------------------------------
def loss_memory_of(task, options=None, batch: int = 1, config=None, device: str | None = None) -> str:
    """How a task's trainer computes the loss: "chunked" (no full-vocabulary logits, e.g.
    TRL's fused LM head) or "logits" (``Task.loss_memory``)."""
    if options is not None and config is not None:
        return task.loss_memory(options, batch, config, device)
    return "logits"


def _dtypes(recipe, device: str):
    import torch

    from petune import precision

    dtype = precision.resolve(recipe.model.dtype, device, weights=True).torch_dtype
    setting = precision.training_precision(recipe.train.precision, device)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)
    return dtype, autocast


DEFAULT_SEQ = 128  # tokens assumed for a task that does not say its sequence length


def recipe_seq_len(recipe, task) -> int:
    """The sequence length the recipe's task options allow (``Task.sequence_length``)."""
    return task.sequence_length(recipe.task) or DEFAULT_SEQ


def estimate_recipe(recipe, host, *, device: str | None = None, model_info=None, batch: int | None = None,
                    seq: int | None = None) -> MemoryEstimate:
    """Predict a recipe's peak training memory from the model's config alone."""
    from petune.api import ModelShape
    from petune.models import resolve_model

    device = device or default_device()
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    info = model_info or resolve_model(recipe.model.name, host.model_sources())
    task.check(info, recipe.task)  # refuse here what the run would refuse
    described = task.model_shape(info.config)
    shape = described or ModelShape()
    dtype, autocast = _dtypes(recipe, device)
    load_kwargs = strategy.load_kwargs(recipe.strategy)
    quant = load_kwargs.get("quantization_config")
    model = build_skeleton(info.config, shape, dtype)
    model = apply_strategy(strategy, model, task, recipe.strategy)
    task.prepare_skeleton(model, _is_4bit(quant))
    batch = batch or recipe.train.batch_size
    est = estimate(model, batch=batch * task.sequences_per_example(recipe.task),
                   seq=seq or recipe_seq_len(recipe, task),
                   gradient_checkpointing=recipe.train.gradient_checkpointing, shape=shape,
                   device=device, optimizer=recipe.train.optimizer, autocast_dtype=autocast, quant=quant,
                   loss_memory=loss_memory_of(task, recipe.task, batch, info.config, device),
                   frozen_copies=int(task.frozen_reference(recipe.task, strategy)),
                   activation_offloading=recipe.train.activation_offloading)
    est.details["model_described"] = described is not None
    generated = task.generation_cache(recipe.task, batch)
    if generated:
        add_generation(est, info.config, *generated, _itemsize(dtype) if autocast is None else _itemsize(autocast))
    return est


def add_generation(est: MemoryEstimate, config, sequences: int, tokens: int, itemsize: int) -> None:
    """Count a trainer's generation (e.g. GRPO's completions) in ``est``: the key/value cache of
    ``sequences`` × ``tokens`` and one position's fp32 logits per sequence, beside the weights and
    optimizer states (gradients are freed by then). The peak is the larger of training and this."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or (int(getattr(text, "hidden_size", 0) or 0) // max(heads, 1)))
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    cache = 2 * layers * kv_heads * head_dim * sequences * tokens * itemsize
    logits = 2 * sequences * vocab * 4  # the step's logits and their softmax
    est.parts["generation"] = cache + logits
    during = est.parts["weights"] + est.parts["optimizer"] + cache + logits + est.parts["runtime"]
    est.details.update(generated_sequences=sequences, generated_tokens=tokens)
    if during > est.peak:
        est.peak, est.details["peak_phase"] = int(during), "generation"


def model_shape_of(task, config):
    """The task's :class:`petune.api.ModelShape`; the bare base model where it gives none."""
    from petune.api import ModelShape

    return task.model_shape(config) or ModelShape()


def apply_strategy(strategy, model, task, options):
    """``strategy.apply`` on a meta skeleton, with the options the strategy gives for one
    (``Strategy.skeleton_options``: no initialisation that reads real weights)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notes from peft/transformers internals
        return strategy.apply(model, task, strategy.skeleton_options(options))


# -- showing it --------------------------------------------------------------------------------------
def _bits_per_weight(details: dict) -> float:
    return 8 * details.get("quantised_bytes", 0) / details["quantised_params"]


def estimate_table(est: MemoryEstimate, title: str = "Memory estimate"):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("part", style="bold")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    notes = {
        "weights": f"{est.total:,} parameters" + (f", {est.details['quantised_params']:,} quantised at "
                                                   f"{_bits_per_weight(est.details):.2f} bits per weight"
                                                   if est.details.get("quantised_params") else ""),
        "gradients": f"{est.trainable:,} trainable",
        "optimizer": est.details.get("optimizer", "") + (f" (+{human(est.details['paged_optimizer_bytes'])} paged)"
                                                         if est.details.get("paged_optimizer_bytes") else ""),
        "activations": f"batch {est.batch} × {est.seq} tokens, "
                       + ("gradient checkpointing" if est.gradient_checkpointing else "no checkpointing")
                       + f", {est.details.get('layers', 0)} layers"
                       + (f", {human(est.details['offloaded_to_cpu'])} offloaded to CPU memory"
                          if est.details.get("offloaded_to_cpu") else ""),
        "logits": {"chunked": "loss in chunks (no full logits)", "logits": "full-vocabulary fp32 logits",
                   "head": "task head"}.get(est.details.get("loss_memory"), ""),
        "runtime": "CUDA workspaces, autocast copies" if est.device.startswith("cuda") else "process overhead (measured)",
        "generation": (f"key/value cache of {est.details.get('generated_sequences')} sequences × "
                       f"{est.details.get('generated_tokens')} tokens"),
    }
    for part in [*PARTS, *(["generation"] if "generation" in est.parts else [])]:
        table.add_row(part, human(est.parts[part]), notes.get(part, ""))
    table.add_row("[bold]peak[/]", f"[bold]{human(est.peak)}[/]",
                  f"at the {est.details.get('peak_phase', 'backward')}; parts do not all coexist")
    table.add_row("device", human(est.capacity) if est.capacity else "—",
                  est.device + ("" if est.capacity else " (not on this machine)")
                  + ("" if est.fits else "  [bold red]does not fit[/]"))
    return table


def plan_row(recipe, host, model_info=None, device: str | None = None) -> tuple[str, str]:
    """One line for ``petune run --dry-run``'s plan: ("memory", "≈ 13.2 GiB peak on cuda (of 79 GiB)")."""
    try:
        est = estimate_recipe(recipe, host, device=device, model_info=model_info)
    except Exception as exc:  # noqa: BLE001 — an estimate must never stop a run
        return ("memory", f"no estimate ({type(exc).__name__}: {exc})")
    text = f"≈ {human(est.peak)} peak on {est.device}" + (f" (of {human(est.capacity)})" if est.capacity else "")
    task = host.task(recipe.task_name)
    if task.sequence_length(recipe.task) is None:
        text += f" (task {task.name!r} does not say its sequence length: {DEFAULT_SEQ} tokens assumed)"
    if not est.details.get("model_described", True):
        text += f" (task {task.name!r} does not describe its model: the base model without head is estimated)"
    if not est.fits:
        text += f"  [bold red]warning:[/] {est.warning}"
    return ("memory", text)
