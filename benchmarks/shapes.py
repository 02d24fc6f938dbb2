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
    if shape.source is not None:  # through petune's model sources (a packaged GGUF converts once)
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
