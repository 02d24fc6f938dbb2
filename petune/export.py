"""``petune export RUN_DIR --format gguf|ollama``: a causal-LM run, merged, as one GGUF file
that llama.cpp and Ollama load, written with the ``gguf`` package (llama.cpp's own Python
library: its writer, tensor-name maps and vocabulary readers).

What llama.cpp expects differs from transformers' layout in a few documented ways, handled
per architecture in :data:`ARCHITECTURES`: Llama/Mistral q/k rows interleaved for its rope,
Gemma's norms stored as ``1 + weight``, a tied output layer not written at all. The
tokenizer: where the base model came from a GGUF file (the packaged Gemma 3), that file's
tokenizer metadata is reused as is (tokens, scores, types), tokens the run added appended;
otherwise the run's tokenizer is read with gguf's vocabulary classes (byte-level BPE, or the
base's SentencePiece model). The run's chat template, special tokens and stop tokens go into
the metadata. After writing, the file is read back with ``gguf.GGUFReader``: every tensor's
name, shape and type, and its dequantised values against the merged weights.

``--format ollama`` also writes a ``Modelfile`` beside the file: the chat template translated
to Ollama's Go template (for the layouts petune knows), stop tokens, default parameters.

``--format gguf-lora`` writes the run's LoRA adapter alone in llama.cpp's adapter format
(``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; for every
adapted weight ``<its name in the base file>.lora_a`` holding A ``[r, in]`` and ``.lora_b``
holding B ``[out, r]``, B's rows in llama.cpp's layout), to load beside the base GGUF
(``llama-cli -m base.gguf --lora adapter.gguf``). No merge, no model load: the adapter's
own tensors are converted. For a run whose strategy trained against the GGUF file's own
quantisation (:meth:`petune.api.Strategy.base_is_gguf_file`), ``--format ollama`` writes
this adapter and a Modelfile with ``FROM <the base file>`` and ``ADAPTER <the adapter>``:
the model Ollama runs is the one that was trained.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from petune import hookimpl
from petune.console import err, out
from petune.errors import UserError


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's "llama" graph expects q/k rows interleaved per head
    norm_offset: float = 0.0  # added to every norm weight (Gemma computes x * (1 + w), llama.cpp x * w)
    head_dim_keys: bool = False  # write attention.key_length/value_length
    sliding_window: bool = False


#: transformers model_type → how llama.cpp lays it out. Mistral runs as llama.cpp's "llama".
ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2"),
    "qwen3": Architecture("QWEN3", head_dim_keys=True),
    "gemma3_text": Architecture("GEMMA3", norm_offset=1.0, head_dim_keys=True, sliding_window=True),
}

#: --quant → (GGML type of matrices, file type). Vectors (norms, biases) stay float32, as
#: llama.cpp's own converter keeps them.
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
#: the first line of every Modelfile petune writes: what ``--overwrite`` may replace
MODELFILE_MARK = "# written by petune export"
#: Largest tolerated |stored − merged| per --quant, relative to the tensor's largest |value|.
READBACK_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}


# -- the model ------------------------------------------------------------------------------
def architecture_of(config) -> Architecture:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export does not support model type {config.model_type!r}",
                        hint=f"supported: {', '.join(sorted(ARCHITECTURES))}; `petune merge` writes a transformers "
                             "folder any model type can use")
    rope = _rope(config)
    kinds = {p.get("rope_type", "default") for p in rope.values()} if rope else {"default"}
    if kinds - {"default"}:
        raise UserError(f"GGUF export does not write rope scaling ({', '.join(sorted(kinds - {'default'}))}) yet",
                        hint="export a model with plain rope, or use `petune merge` and llama.cpp's converter")
    return arch


def _rope(config) -> dict:
    """Rope settings per attention type: {"full_attention": {...}} or one entry for all layers."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return params
    if params:
        return {"full_attention": params}
    theta = getattr(config, "rope_theta", None)
    return {"full_attention": {"rope_theta": theta, "rope_type": "default"}} if theta else {}


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def tensors_for_gguf(model, arch: Architecture):
    """(gguf name, hf name, float32 numpy array in llama.cpp's layout) for every weight."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue  # llama.cpp reads a missing output.weight as "tied to token_embd"
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"no GGUF name for the weight {hf_name!r} of {type(model).__name__}",
                            hint="this model's layout differs from what llama.cpp expects for "
                                 f"{config.model_type}; use `petune merge` and llama.cpp's own converter")
        array = tensor.detach().float().cpu().numpy()
        if arch.norm_offset and name.endswith("norm.weight"):
            array = array + arch.norm_offset
        if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            array = _interleave_rope_rows(array, heads)
        yield name, hf_name, array


def _interleave_rope_rows(array, heads: int):
    """transformers rotates the two halves of each head's rows; llama.cpp's "llama" rope
    rotates neighbouring pairs. Reorder rows (0, d/2, 1, d/2+1, ...) within each head."""
    rows = array.shape[0] // heads
    return array.reshape(heads, 2, rows // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _encode(array, quant: str):
    """(data, raw GGML type or None) for the writer: matrices in the chosen type, vectors in F32."""
    import gguf
    import numpy as np

    if array.ndim < 2 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "f16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if array.shape[-1] % block:  # rows that do not split into whole blocks: 16-bit, as llama.cpp does
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), kind), kind


# -- metadata -------------------------------------------------------------------------------
def add_model_metadata(writer, config, arch: Architecture, quant: str, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    rope = _rope(config)
    full = rope.get("full_attention") or next(iter(rope.values()), {})
    if full.get("rope_theta"):
        writer.add_rope_freq_base(float(full["rope_theta"]))
    local = rope.get("sliding_attention")
    if local and local.get("rope_theta"):
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if arch.permute_qk:
        writer.add_rope_dimension_count(head_dim(config))
    if arch.head_dim_keys:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if arch.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][1]))
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None
    merges: list[str]
    source: str  # said in the report
    extra: dict  # other tokenizer.ggml.* fields to keep (from a source GGUF)


def vocabulary(tokenizer, base_gguf: Path | None, base_folder: Path, rows: int) -> Vocabulary:
    """The token table for ``rows`` embedding rows."""
    import gguf

    if base_gguf is not None:
        vocab = _vocabulary_from_gguf(base_gguf)
    else:
        with tempfile.TemporaryDirectory(prefix="petune-vocab-") as folder:
            tokenizer.save_pretrained(folder)
            vocab = _vocabulary_from_folder(Path(folder), base_folder)
    # tokens the run added (e.g. a pad token), then unused rows of a padded embedding matrix
    known = len(vocab.tokens)
    special = set(tokenizer.all_special_ids)
    for token_id in range(known, len(tokenizer)):
        vocab.tokens.append(tokenizer.convert_ids_to_tokens(token_id).encode("utf-8"))
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.CONTROL if token_id in special else gguf.TokenType.USER_DEFINED))
    if len(vocab.tokens) > rows:
        raise UserError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {rows} embedding rows",
                        hint="the run's tokenizer and model do not belong together")
    for i in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    return vocab


def _vocabulary_from_gguf(path: Path) -> Vocabulary:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def value(key, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    tokens = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in value("tokenizer.ggml.tokens", [])]
    if not tokens:
        raise UserError("the base model's GGUF file has no token list", where=str(path))
    extra = {key: field for key, field in fields.items() if key.startswith("tokenizer.ggml.") and key not in {
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.model", "tokenizer.ggml.pre"}}
    return Vocabulary(tokens, list(value("tokenizer.ggml.scores", [0.0] * len(tokens))),
                      list(value("tokenizer.ggml.token_type", [1] * len(tokens))), value("tokenizer.ggml.model"),
                      value("tokenizer.ggml.pre"), list(value("tokenizer.ggml.merges", [])),
                      f"the base model's GGUF ({path.name})", extra)


def _vocabulary_from_folder(folder: Path, base_folder: Path) -> Vocabulary:
    import gguf

    try:
        bpe = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError):
        bpe = None
    if bpe is not None:
        tokens, scores, types = _columns(bpe.all_tokens())
        merges = gguf.SpecialVocab(folder, load_merges=True).merges
        return Vocabulary(tokens, scores, types, "gpt2", _pre_tokenizer(folder), merges, "the run's tokenizer (BPE)",
                          {})
    if (base_folder / "tokenizer.model").is_file():
        spm = gguf.vocab.SentencePieceVocab(base_folder)
        tokens, scores, types = _columns(spm.all_tokens())
        return Vocabulary(tokens, scores, types, "llama", None, [], "the base's SentencePiece model", {})
    raise UserError("cannot write this tokenizer as GGUF: it is neither byte-level BPE nor backed by a SentencePiece "
                    "tokenizer.model in the base model's folder", where=str(base_folder),
                    hint="export a run whose base has a tokenizer.model, or came from a GGUF file")


def _columns(items):
    tokens, scores, types = [], [], []
    for text, score, kind in items:
        tokens.append(text if isinstance(text, bytes) else str(text).encode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    return tokens, scores, types


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the way the text is split before BPE, read from tokenizer.json:
    GPT-2's byte-level split, Llama 3's (digits in groups of three) or Qwen 2's (single digits)."""
    import json

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    patterns = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if not patterns and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt2"
    regex = " ".join(patterns)
    if r"\p{N}{1,3}" in regex:
        return "llama-bpe"
    if r"\p{N}" in regex and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex:
        return "qwen2"
    raise UserError("this tokenizer splits text in a way petune cannot name for llama.cpp "
                    f"(pre-tokenizer {regex[:80]!r})", hint="supported: GPT-2, Llama 3 and Qwen 2 style BPE")


def add_tokenizer_metadata(writer, vocab: Vocabulary, tokenizer, stop_tokens: list[str]) -> None:
    import gguf

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    kept = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
            "tokenizer.ggml.add_space_prefix"}
    for key, field in vocab.extra.items():  # the source GGUF's flags (add_bos, add_space_prefix ...)
        if key in kept and field.types and field.types[0] == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, bool(field.contents()))
    if not vocab.extra:
        writer.add_add_bos_token(_adds_bos(tokenizer))
        writer.add_add_eos_token(False)
    # the run's own special tokens: training may have changed the pad token
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    ends = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    ends = [i for i in ends if isinstance(i, int) and i != tokenizer.unk_token_id and i != tokenizer.eos_token_id]
    if ends:  # the token an answer ends with, when it is not EOS (Gemma's <end_of_turn>, ChatML's <|im_end|>)
        writer.add_eot_token_id(int(ends[0]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


# -- writing and reading back ---------------------------------------------------------------
@dataclass
class Written:
    path: Path
    tensors: dict  # gguf name -> (hf name, numpy shape, GGML type name)
    expected: dict  # gguf name -> float32 array written (for the read-back check)
    vocab_source: str


def write_gguf(model, tokenizer, path: Path, *, quant: str, name: str, base_gguf: Path | None, base_folder: Path,
               stop_tokens: list[str]) -> Written:
    import gguf

    config = model.config
    arch = architecture_of(config)
    vocab = vocabulary(tokenizer, base_gguf, base_folder, int(config.vocab_size))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    add_model_metadata(writer, config, arch, quant, name)
    add_tokenizer_metadata(writer, vocab, tokenizer, stop_tokens)
    tensors, expected = {}, {}
    for gguf_name, hf_name, array in tensors_for_gguf(model, arch):
        data, raw = _encode(array, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        kind = raw.name if raw is not None else {"float32": "F32", "float16": "F16"}[str(data.dtype)]
        tensors[gguf_name] = (hf_name, tuple(array.shape), kind)
        expected[gguf_name] = array
    _write_out(writer)
    return Written(path, tensors, expected, vocab.source)


def read_back(written: Written, quant: str, tokenizer) -> list[str]:
    """Problems found reading the file with gguf.GGUFReader (empty: it holds what was meant)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(written.path)
    problems = []
    found = {t.name: t for t in reader.tensors}
    for name in sorted(set(written.tensors) ^ set(found)):
        problems.append(f"tensor {name} {'missing from' if name in written.tensors else 'unexpected in'} the file")
    for name, (hf_name, shape, kind) in written.tensors.items():
        tensor = found.get(name)
        if tensor is None:
            continue
        stored_shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        if stored_shape != shape or tensor.tensor_type.name != kind:
            problems.append(f"{name} ({hf_name}): {tensor.tensor_type.name} {stored_shape}, expected {kind} {shape}")
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        want = written.expected[name]
        scale = float(np.abs(want).max()) or 1.0
        diff = float(np.abs(values - want).max()) / scale if values.size else 0.0
        if not math.isfinite(diff) or diff > READBACK_TOLERANCE[quant] + 1e-7:
            problems.append(f"{name} ({hf_name}) differs from the merged weight by {diff:.3g} of its largest value")
    fields = reader.fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != len(written.expected["token_embd.weight"]):
        problems.append("the token list does not have one token per embedding row")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        stored = fields.get("tokenizer.chat_template")
        if stored is None or stored.contents() != template:
            problems.append("the chat template did not survive the round trip")
    return problems


def summary_table(written: Written, quant: str) -> Table:
    from collections import Counter

    counts = Counter(kind for _, _, kind in written.tensors.values())
    table = Table(title=f"GGUF export — {written.path}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    size = written.path.stat().st_size
    table.add_row("tensors", ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
    table.add_row("size", f"{size / 2**20:.1f} MiB")
    table.add_row("tokenizer", written.vocab_source)
    table.add_row("read back", f"names, shapes, types and values match the merged weights (within "
                               f"{READBACK_TOLERANCE[quant]:g} of each tensor's largest value for {quant})")
    return table


# -- the command ----------------------------------------------------------------------------
def export_run(run_dir: Path, out_file: Path, *, fmt: str, quant: str, overwrite: bool = False) -> Written:
    from petune import artifacts
    from petune.merge import auto_class_for
    from petune.models import find_source
    from petune.plugins import get_host
    from petune.run_folders import load_run, read_finished_run
    from petune.runner import inputs_of

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not written by petune", hint=f"choose one of: {', '.join(QUANTS)}")
    adapter_only = fmt == "gguf-lora" or (fmt == "ollama" and _trained_on_gguf_file(Path(run_dir)))
    out_file = Path(os.path.abspath(Path(out_file).expanduser()))
    if out_file.suffix.lower() != ".gguf":
        raise UserError("the output file must end in .gguf", where=str(out_file))
    modelfile_path = out_file.parent / "Modelfile"
    # every output path is checked before anything is loaded or written
    targets = {out_file: not_a_gguf_file} | ({modelfile_path: not_a_petune_modelfile} if fmt == "ollama" else {})
    for target, ours in targets.items():
        if target.is_dir() and not target.is_symlink():
            raise UserError("a folder is in the way of the file to write (--overwrite replaces files only)",
                            where=str(target), hint="pick another --out, or move the folder away")
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise UserError("file already exists", where=str(target), hint="pass --overwrite or pick another --out")
            recipe = read_finished_run(Path(run_dir), get_host())[0]
            artifacts.refuse_to_replace(target, [Path(run_dir), *inputs_of(recipe)], ours, reader="the export",
                                        hint="--overwrite replaces only a GGUF file and a Modelfile petune export "
                                             "wrote; pick another --out")
        artifacts.check_writable(target)
    if adapter_only:
        return _export_adapter(Path(run_dir), out_file, fmt=fmt, modelfile_path=modelfile_path)
    host = get_host()
    with err.status(f"loading {run_dir} ..."):
        run = load_run(run_dir, host, dequantized=True)  # merged into the trained base, dequantised
    config = run.model.config
    arch_name = (getattr(run.model, "get_base_model", lambda: run.model)().config.architectures or [""])[0]
    auto = auto_class_for(arch_name) or auto_class_for(type(getattr(run.model, "get_base_model",
                                                                    lambda: run.model)()).__name__)
    if getattr(auto, "__name__", "") != "AutoModelForCausalLM":
        raise UserError(f"GGUF export is for causal language models; this run's model is "
                        f"{type(getattr(run.model, 'get_base_model', lambda: run.model)()).__name__} (task "
                        f"{run.task.name!r})", where=str(run_dir),
                        hint="`petune merge` writes any run as a transformers folder")
    architecture_of(config)  # refuse before the merge, with the reason
    with host.blame("strategy", run.strategy.name, "merge"):
        merged = run.model if run.strategy.artifact == "model" else run.strategy.merge(run.model)
    stop_tokens = run.task.stop_tokens(run.state)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # written beside the output under a temporary name, renamed into place only when read back whole
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix="petune-export-") as work:
            source = find_source(run.recipe.model.name, host.model_sources())
            base_gguf = source.gguf_file(run.recipe.model.name, Path(work))
            base_folder = source.resolve(run.recipe.model.name)
            with err.status(f"writing {out_file.name} ({quant}) ..."):
                written = write_gguf(merged, run.tokenizer, tmp, quant=quant, name=run.dir.name, base_gguf=base_gguf,
                                     base_folder=base_folder, stop_tokens=stop_tokens)
        with err.status("reading the file back ..."):
            problems = read_back(written, quant, run.tokenizer)
        if problems:
            raise UserError("the written GGUF does not hold the merged model: " + "; ".join(problems[:5]),
                            where=str(out_file))
        notes = []
        if fmt == "ollama":
            from petune.ollama import modelfile

            text, notes = modelfile(out_file, run.tokenizer, stop_tokens, config)
            artifacts.write_text(modelfile_path, text)  # before the GGUF moves into place: all or nothing new
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)
    written.path = out_file
    out.print(summary_table(written, quant))
    if fmt == "ollama":
        for note in notes:
            err.print(f"[yellow]note[/]: {escape(note)}")
        out.print(f"[green]wrote[/] {escape(str(modelfile_path))}; load it with: "
                  f"ollama create {escape(_ollama_name(run.dir.name))} -f {escape(str(modelfile_path))}")
    return written


# -- the adapter alone, as llama.cpp's LoRA GGUF ------------------------------------------------
@dataclass
class LoraWritten:
    path: Path
    base_gguf: Path
    alpha: float
    rank: int
    tensors: dict  # gguf name -> numpy shape


def _trained_on_gguf_file(run_dir: Path) -> bool:
    from petune.plugins import get_host
    from petune.run_folders import read_finished_run

    recipe, _, strategy, _ = read_finished_run(run_dir, get_host())
    return bool(strategy.base_is_gguf_file(recipe.strategy))


def lora_tensors_for_gguf(adapter_dir: Path, config, base_names: set[str]) -> tuple[float, int, dict]:
    """(alpha for llama.cpp, rank, {gguf name: float32 array}) from a peft LoRA adapter folder:
    ``<base weight>.lora_a`` = A [r, in], ``.lora_b`` = B [out, r] with B's rows in the base
    file's layout (llama's interleaved q/k rows). llama.cpp scales by alpha / r, so a
    rank-stabilised adapter (alpha / sqrt(r)) is written with alpha · sqrt(r)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    try:
        settings = json.loads((adapter_dir / "adapter_config.json").read_text())
        weights = load_file(adapter_dir / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the run's adapter: {exc}", where=str(adapter_dir)) from None
    if settings.get("peft_type") != "LORA" or settings.get("use_dora"):
        kind = "DoRA" if settings.get("use_dora") else settings.get("peft_type")
        raise UserError(f"llama.cpp's adapter format holds plain LoRA; this run's adapter is {kind}",
                        where=str(adapter_dir), hint="use --format gguf (the merged model) for this run")
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise UserError("the adapter has per-layer ranks or alphas, which llama.cpp's adapter format cannot state",
                        where=str(adapter_dir), hint="use --format gguf (the merged model) for this run")
    arch = architecture_of(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config.num_hidden_layers)
    rank = int(settings["r"])
    alpha = float(settings["lora_alpha"]) * (math.sqrt(rank) if settings.get("use_rslora") else 1.0)
    tensors = {}
    for key, array in sorted(weights.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"the adapter holds {key!r}, which is not a LoRA matrix (a trained head or embedding); "
                            "llama.cpp's adapter format cannot hold it", where=str(adapter_dir),
                            hint="use --format gguf (the merged model) for this run")
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or name not in base_names:
            raise UserError(f"the adapted layer {module!r} has no weight {name or '(no GGUF name)'} in the base file",
                            where=str(adapter_dir))
        array = array.astype("float32")
        if ".lora_B." in key and arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            array = _interleave_rope_rows(array, heads)
        tensors[name + (".lora_a" if ".lora_A." in key else ".lora_b")] = array
    if not tensors:
        raise UserError("the run's adapter holds no LoRA matrices", where=str(adapter_dir))
    return alpha, rank, tensors


def write_lora_gguf(adapter_dir: Path, config, base_gguf: Path, path: Path, *, name: str) -> LoraWritten:
    import gguf

    from petune.gguf_tensors import read_table

    table = read_table(base_gguf)  # names only: gguf-py's reader would build the whole vocabulary first
    base_arch = table.architecture
    alpha, rank, tensors = lora_tensors_for_gguf(adapter_dir, config, {t.name for t in table.tensors})
    writer = gguf.GGUFWriter(path, base_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)  # float32, as llama.cpp's converter writes them with --outtype f32
    _write_out(writer)
    return LoraWritten(path, base_gguf, alpha, rank, {k: tuple(v.shape) for k, v in tensors.items()})


def _write_out(writer) -> None:
    """A GGUFWriter's header, metadata and tensors into its file, closed whatever happens."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_lora_gguf(path: Path) -> tuple[float, dict]:
    """(alpha, {gguf base weight name: (A [r, in], B [out, r])}) from a llama.cpp LoRA GGUF."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)

    def text(key):
        f = reader.fields.get(key)
        return bytes(f.parts[f.data[0]]).decode() if f is not None else None

    if text("general.type") != "adapter" or text("adapter.type") != "lora":
        raise UserError("not a llama.cpp LoRA adapter (general.type / adapter.type)", where=str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    pairs: dict = {}
    for tensor in reader.tensors:
        base, _, part = tensor.name.rpartition(".")
        pairs.setdefault(base, {})[part] = np.array(tensor.data, dtype=np.float32).reshape(
            [int(n) for n in reversed(tensor.shape)])
    return alpha, {base: (p["lora_a"], p["lora_b"]) for base, p in pairs.items()}


def _export_adapter(run_dir: Path, out_file: Path, *, fmt: str, modelfile_path: Path) -> LoraWritten:
    from petune import artifacts
    from petune.api import ModelInfo
    from petune.models import find_source
    from petune.plugins import get_host
    from petune.run_folders import read_finished_run

    host = get_host()
    recipe, _, strategy, _ = read_finished_run(run_dir, host)
    source = find_source(recipe.model.name, host.model_sources())
    folder = source.resolve(recipe.model.name)
    config = ModelInfo.from_path(recipe.model.name, folder).text_config
    adapter_dir = run_dir / strategy.artifact
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"--format {fmt} writes a LoRA adapter, and this run has none (strategy "
                        f"{recipe.strategy_name!r} saves a {strategy.artifact})", where=str(run_dir),
                        hint="use --format gguf (the merged model)")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # the base file: persistent when the source has one on disk (the user's file, the packaged model's cached copy)
    work = Path(tempfile.mkdtemp(prefix="petune-export-", dir=out_file.parent))
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        base_gguf = source.gguf_file(recipe.model.name, work)
        if base_gguf is None:
            raise UserError(f"--format {fmt}: the run's base {recipe.model.name!r} is not a GGUF file, so there is "
                            "no base file for llama.cpp to apply the adapter to", where=str(run_dir),
                            hint="use --format gguf (the merged model)")
        if fmt == "ollama" and work in base_gguf.parents:
            raise UserError(f"the base file of {recipe.model.name!r} is not kept on disk for Ollama's FROM",
                            where=str(run_dir), hint="use --format gguf (the merged model)")
        with err.status(f"writing {out_file.name} (LoRA adapter) ..."):
            written = write_lora_gguf(adapter_dir, config, base_gguf, tmp, name=run_dir.name)
        alpha, pairs = read_lora_gguf(tmp)  # read back: every tensor, its shape, alpha
        shapes = {f"{base}.lora_a": tuple(a.shape) for base, (a, _) in pairs.items()}
        shapes |= {f"{base}.lora_b": tuple(b.shape) for base, (_, b) in pairs.items()}
        if alpha != written.alpha or shapes != written.tensors:
            raise UserError("the written adapter does not read back as written", where=str(out_file))
        if fmt == "ollama":
            artifacts.write_text(modelfile_path, "\n".join([
                f"{MODELFILE_MARK}; create the model with: ollama create NAME -f {modelfile_path}",
                "# the base exactly as trained against (its own quantisation) and the run's LoRA adapter",
                f"FROM {base_gguf}", f"ADAPTER ./{out_file.name}",
                "# greedy, as `petune generate` answers by default",
                "PARAMETER temperature 0", ""]))
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    written.path, written.base_gguf = out_file, base_gguf
    table = Table(title=f"{out_file.name}: LoRA adapter for {base_gguf.name} (rank {written.rank}, alpha "
                        f"{written.alpha:g})")
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    for tensor_name, shape in list(written.tensors.items())[:6]:
        table.add_row(tensor_name, " × ".join(map(str, shape)))
    if len(written.tensors) > 6:
        table.add_row(f"... {len(written.tensors) - 6} more", "")
    out.print(table)
    out.print(f"[green]wrote[/] {escape(str(out_file))}; use it with: llama-cli -m {escape(str(base_gguf))} "
              f"--lora {escape(str(out_file))}")
    if fmt == "ollama":
        out.print(f"[green]wrote[/] {escape(str(modelfile_path))}; load it with: "
                  f"ollama create {escape(_ollama_name(run_dir.name))} -f {escape(str(modelfile_path))}")
    return written


def not_a_gguf_file(path: Path) -> str | None:
    """Why ``path`` is not a GGUF file (what ``--overwrite`` may replace with one); None when it is."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None if magic == b"GGUF" else "it is not a GGUF file"


def not_a_petune_modelfile(path: Path) -> str | None:
    """Why ``path`` is not a Modelfile petune export wrote; None when it is."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None if first.startswith(MODELFILE_MARK) else "it is not a Modelfile petune export wrote"


def _ollama_name(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "petune-model"


def cmd_export(args) -> int:
    export_run(args.run_dir, Path(args.out), fmt=args.format, quant=args.quant, overwrite=args.overwrite)
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a causal-LM run as a GGUF file (llama.cpp, Ollama)")
    p.add_argument("run_dir", type=Path, help="a finished run folder")
    p.add_argument("--format", choices=["gguf", "gguf-lora", "ollama"], default="gguf",
                   help="gguf: the merged model as one file; gguf-lora: the LoRA adapter alone, in llama.cpp's "
                        "adapter format, for the run's base GGUF; ollama: the file and a Modelfile beside it (for a "
                        "run trained on a GGUF file's own quantisation: the adapter, FROM the base file)")
    p.add_argument("--quant", default="f16", help=f"weight type of the matrices: {', '.join(QUANTS)} (default f16)")
    p.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_export)
