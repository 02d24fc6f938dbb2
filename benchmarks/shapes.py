"""Model shapes the suite trains: random weights from a config, nothing downloaded.

* ``tiny-llama`` / ``tiny-bert``: petune's own ``random:`` test models (2 layers, hidden 64),
  for the smoke run in CI.
* ``small-llama`` / ``small-bert``: ~20M-parameter CPU shapes, big enough that memory and
  step time are the model's rather than the interpreter's.
* ``llama-3.2-1b`` / ``llama-3-8b``: the published Llama shapes (config values only), for GPU.
* ``gemma-3-270m``: the packaged Gemma 3 270M itself (real weights, resolved through petune's
  model sources as the Quickstart does), for the Quickstart case (``--cases quickstart``).

Every shape without a ``source`` is written once to petune's cache
(``~/.cache/petune/bench/<shape>-v<N>``) as a normal transformers folder: config, random
weights (seed 0) and a small tokenizer borrowed from the tiny random model of the same
family. Both sides of the benchmark load that same folder with ``from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

_VERSION = 1  # bump when a config below changes


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "llama" (a causal LM, Gemma too: task sft) | "bert" (encoder, task classification)
    device: str  # where the suite runs it: "cpu" | "cuda"
    config: dict = field(default_factory=dict)
    source: str | None = None  # a petune model name that already exists (random:tiny-*, gemma-3-270m)
    #: default batch × sequence length for this shape
    batch: int = 2
    seq: int = 128
    #: real-length cases: rows per batch and max_length (examples are cut there; within the
    #: model's positions)
    real_batch: int = 4
    real_seq: int = 512

    @property
    def task(self) -> str:
        return "sft" if self.family == "llama" else "classification"

    @property
    def peft_task_type(self) -> str:
        return "CAUSAL_LM" if self.family == "llama" else "SEQ_CLS"


_LLAMA_3 = {"vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072}

SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("tiny-llama", "llama", "cpu", source="random:tiny-llama", batch=4, seq=128, real_seq=256),
    Shape("tiny-bert", "bert", "cpu", source="random:tiny-bert", batch=4, seq=96),
    Shape("small-llama", "llama", "cpu", batch=2, seq=256, config={
        "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
        "num_key_value_heads": 2, "vocab_size": 16000, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}),
    Shape("small-bert", "bert", "cpu", batch=4, seq=256, config={
        "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 6,
        "vocab_size": 16000, "max_position_embeddings": 512, "type_vocab_size": 2}),
    Shape("llama-3.2-1b", "llama", "cuda", batch=2, seq=2048, real_seq=2048, config={
        **_LLAMA_3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
        "tie_word_embeddings": True}),
    Shape("llama-3-8b", "llama", "cuda", batch=2, seq=2048, real_seq=2048, config={
        **_LLAMA_3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
        "tie_word_embeddings": False}),
    # the Quickstart's (recipes/qlora_sft.toml): batch_size 4, max_length 128
    Shape("gemma-3-270m", "llama", "cpu", source="gemma-3-270m", batch=4, seq=128),
    # a GGUF file of a shape above, random blocks in Q4_K_M's types (``gguf-of:``): QLoRA on the
    # file's own blocks (quant_type "gguf"); tiny for the CPU dry run
    Shape("llama-3-8b-q4_k_m", "llama", "cuda", source="gguf-of:llama-3-8b", batch=2, seq=2048, real_seq=2048),
    Shape("tiny-llama-256", "llama", "cpu", batch=4, seq=128, config={  # rows of whole 256-weight k-quant blocks
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": False}),
    Shape("tiny-llama-q4_k_m", "llama", "cpu", source="gguf-of:tiny-llama-256", batch=4, seq=128, real_seq=256),
]}

SMOKE_SHAPES = ("tiny-llama", "tiny-bert")
CPU_SHAPES = ("small-llama", "small-bert")
GPU_SHAPES = ("llama-3.2-1b", "llama-3-8b")


def build_config(shape: Shape, tokenizer=None):
    """The transformers config of a shape (no weights)."""
    from transformers import BertConfig, LlamaConfig

    special = {}
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_token_id}
        if shape.family == "llama":
            special.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if shape.family == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **special, **shape.config)
    return BertConfig(architectures=["BertForMaskedLM"], **special, **shape.config)


def model_path(shape: Shape | str, device: str = "cpu") -> Path:
    """A local folder with the shape's config, random weights and a tokenizer (built once)."""
    from petune.models import cache_dir
    from petune_plugins.sources.random_init import RandomInitSource

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    if shape.source is not None and shape.source.startswith("random:"):
        return RandomInitSource().resolve(shape.source)
    if shape.source is not None and shape.source.startswith("gguf-of:"):  # the file's config and tokenizer
        from petune_plugins.sources.gguf_file import GgufFileSource

        return GgufFileSource().resolve(str(gguf_path(shape)))
    if shape.source is not None:  # through petune's model sources (the packaged Gemma's GGUF)
        from petune.models import resolve_model
        from petune.plugins import get_host

        return resolve_model(shape.source, get_host().model_sources()).path
    path = cache_dir("bench") / f"{shape.name}-v{_VERSION}"
    if (path / "petune_bench.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _materialise(shape, tmp, device)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def model_name(shape: Shape | str, own_defaults: bool = False) -> str:
    """What a recipe names the shape's model: its source as a recipe names it (the Quickstart
    case), a ``gguf-of:`` shape's .gguf file, else the folder :func:`model_path` builds."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    if shape.source is not None and shape.source.startswith("gguf-of:"):
        return str(gguf_path(shape))
    return shape.source if own_defaults else str(model_path(shape))


def gguf_path(shape: Shape) -> Path:
    """A GGUF file of the shape named by its ``gguf-of:`` source, with random blocks (written once)."""
    from petune.models import cache_dir

    path = cache_dir("bench") / f"{shape.name}-v{_VERSION}.gguf"
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        _write_random_gguf(SHAPES[shape.source.removeprefix("gguf-of:")], tmp)
        tmp.rename(path)
    return path


def _write_random_gguf(base: Shape, path: Path) -> None:
    """The base shape as llama.cpp lays out a Q4_K_M file — Q4_K for the embedding and most
    linear layers, Q6_K for the output layer and ffn_down, F32 norms — with random blocks whose
    f16 scales are set so weights stay small and centred (a forward stays finite). Only
    timings and memory are measured on it. The tokenizer is the tiny random model's, as the
    other shapes borrow it."""
    import gguf
    import numpy as np

    from petune_plugins.sources.random_init import RandomInitSource

    folder = RandomInitSource().resolve(f"random:tiny-{base.family}")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tiny = json.loads((folder / "config.json").read_text())
    config = {**tiny, **base.config}
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"random {base.name}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    add_bpe_tokenizer(writer, tokenizer, tiny)
    rng = np.random.default_rng(0)

    def blocks(rows: int, row_length: int, kind) -> np.ndarray:
        per_block, size = gguf.GGML_QUANT_SIZES[kind]
        if row_length % per_block:
            raise ValueError(f"{base.name}: rows of {row_length} are not whole {kind.name} blocks of {per_block}")
        data = rng.integers(0, 256, (rows, row_length // per_block, size), dtype=np.uint8)
        if kind == gguf.GGMLQuantizationType.Q4_K:  # w = d·scale·q − dmin·min: dmin = 7.5·d centres it
            data[..., 0:2] = np.array([2e-5], dtype=np.float16).view(np.uint8)
            data[..., 2:4] = np.array([1.5e-4], dtype=np.float16).view(np.uint8)
        else:  # Q6_K: w = d·scale·(q − 32), d last
            data[..., size - 2:size] = np.array([5e-6], dtype=np.float16).view(np.uint8)
        return data.reshape(rows, -1)

    q4, q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    ffn, q_rows, kv_rows = config["intermediate_size"], heads * head_dim, kv_heads * head_dim
    writer.add_tensor("token_embd.weight", blocks(config["vocab_size"], hidden, q4), raw_dtype=q4)
    for i in range(layers):
        for name, rows, row_length, kind in (("attn_q", q_rows, hidden, q4), ("attn_k", kv_rows, hidden, q4),
                                             ("attn_v", kv_rows, hidden, q4), ("attn_output", hidden, q_rows, q4),
                                             ("ffn_gate", ffn, hidden, q4), ("ffn_up", ffn, hidden, q4),
                                             ("ffn_down", hidden, ffn, q6)):
            writer.add_tensor(f"blk.{i}.{name}.weight", blocks(rows, row_length, kind), raw_dtype=kind)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    if not config.get("tie_word_embeddings"):
        writer.add_tensor("output.weight", blocks(config["vocab_size"], hidden, q6), raw_dtype=q6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_bpe_tokenizer(writer, tokenizer: dict, config: dict) -> None:
    """A tokenizer.json's byte-level BPE (petune's tiny random models') as GGUF metadata, with the
    config's special token ids (the first four tokens are the control ones)."""
    import gguf

    vocab = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 4 else gguf.TokenType.NORMAL for i in range(len(vocab))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
    writer.add_add_bos_token(True)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])


def _materialise(shape: Shape, folder: Path, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, LlamaForCausalLM

    from petune_plugins.sources.random_init import RandomInitSource

    tokenizer = AutoTokenizer.from_pretrained(RandomInitSource().resolve(f"random:tiny-{shape.family}"))
    config = build_config(shape, tokenizer)
    # GPU shapes are stored in bf16 (what they train in); initialised on the GPU, which is quick
    dtype = torch.bfloat16 if shape.device == "cuda" else torch.float32
    init_device = "cuda" if shape.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cls = LlamaForCausalLM if shape.family == "llama" else BertForMaskedLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(init_device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "petune_bench.json").write_text(json.dumps({"shape": shape.name, "version": _VERSION}))
    del model


def ensure_built(names) -> None:
    """Build the shapes' folders, each in a subprocess (a GPU shape initialises on the GPU,
    which the calling process should not hold on to)."""
    import os
    import subprocess
    import sys

    from petune.models import cache_dir

    repo = Path(__file__).resolve().parents[1]
    for name in names:
        shape = SHAPES[name]
        if shape.source is None and not (cache_dir("bench") / f"{name}-v{_VERSION}" / "petune_bench.json").exists():
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
            subprocess.run([sys.executable, "-m", f"{__package__ or 'benchmarks'}.shapes", name], cwd=repo, env=env,
                           check=True)
        else:
            model_path(shape)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(model_path(arg))
