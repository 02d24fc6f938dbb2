"""A GGUF file (llama.cpp's format): ``~/models/gemma-3-270m-q4_k_m.gguf``.

transformers reads GGUF files but dequantises them on every load (tens of seconds) and
keeps a quantizer on the model that refuses ``save_pretrained``. So the file is converted
once into a plain transformers folder and cached by content::

    <petune cache>/models/gguf/<first 16 hex of the file's sha256>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  petune_gguf.json (written last: what, from where, how)

Weights are stored in bfloat16 when the file is quantized: the 4-8 bit blocks already cost
far more precision than bfloat16 rounding, and float32 would double the cache (about 1 GB
instead of 0.5 GB for a 270M model). Unquantized files keep their float type. The runner
loads the folder in whatever dtype the recipe asks for.

The conversion builds in a ``<digest>.tmp-<pid>`` folder and renames it into place, so a
crash never leaves a half-written cache that looks whole. :func:`converted` is shared with
the ``packaged`` source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import UserError
from petune.models import cache_dir

_FORMAT = 1  # bump when the cached layout changes; older caches are then rebuilt
MARKER = "petune_gguf.json"
#: Chat-turn terminators that a GGUF's generation settings lose; generation should stop on them too.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}


def cache_folder(digest: str) -> Path:
    """Where the conversion of the GGUF file with this sha256 lives (may not exist yet)."""
    return cache_dir("models", "gguf") / digest[:16]


#: sha256 of a GGUF file -> how to get the file itself (registered by the sources that resolve it)
_FILES: dict[str, Callable[[], Path]] = {}


def register_file(digest: str, produce: Callable[[], Path]) -> None:
    """Remember where the GGUF file with this sha256 is (or how to write it), for
    :func:`gguf_for_folder`. Sources call it from ``resolve``, which runs in every process
    before a model loads."""
    _FILES[digest] = produce


def gguf_for_folder(folder: Path) -> Path | None:
    """The GGUF file a converted folder was made from, when this process resolved it (the
    GGUF QLoRA backend reads its quantised blocks; exports name it as the base), else None."""
    try:
        digest = json.loads((Path(folder) / MARKER).read_text()).get("sha256")
    except (OSError, ValueError):
        return None
    produce = _FILES.get(digest)
    return produce() if produce is not None else None


def kept_copy(digest: str, name: str, write: Callable[[Path], Path]) -> Path:
    """A GGUF file written once into the cache (``write(path)``), for sources whose file is
    not on disk as such (the packaged Gemma's chunks)."""
    target = cache_dir("models", "gguf", "files", digest[:16]) / name
    if target.is_file():
        return target
    tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def is_converted(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a multi-GB file is hashed once."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir("models", "gguf", "sha256") / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    tmp = memo.with_name(f"{key}.tmp-{os.getpid()}")
    tmp.write_text(digest.hexdigest())
    tmp.replace(memo)
    return digest.hexdigest()


def converted(digest: str, produce_gguf: Callable[[Path], Path], *, label: str) -> Path:
    """The cached transformers folder for the GGUF file with sha256 ``digest``, converting it
    first when needed. ``produce_gguf(workdir)`` returns the .gguf path: an existing file, or
    one it writes into ``workdir`` (deleted afterwards)."""
    target = cache_folder(digest)
    if is_converted(target):
        return target
    _remove_stale_work(target)
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        console = _console()
        if not console.is_terminal:  # the status line below only shows on a terminal
            console.print(f"Converting {label} to a transformers folder once (cached for next runs) ...",
                          soft_wrap=True)
        started = time.perf_counter()
        with console.status(f"Converting {label} once (cached for next runs) ...") as status:
            gguf = produce_gguf(work)
            out = work / "model"
            dtype = convert_gguf(gguf, out, progress=lambda step: status.update(f"Converting {label}: {step} ..."))
            info = {"format": _FORMAT, "sha256": digest, "source": gguf.name, "dtype": dtype,
                    "transformers": _transformers_version()}
            (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            _publish(out, target)
        console.print(f"Converted {label} in {time.perf_counter() - started:.0f} s, cached in {target}", soft_wrap=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path, *, progress: Callable[[str], None] = lambda step: None) -> str:
    """Write ``gguf`` as a transformers folder (dense weights + tokenizer) into ``out``.
    Returns the dtype the weights were stored in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _parsed_once(gguf):
            dtype = storage_dtype(gguf)
            progress("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            progress("dequantising the weights")
            with _quiet_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype), **_dense_loading()
                )
    except (ValueError, KeyError, NotImplementedError) as exc:  # how transformers says "unsupported GGUF"
        raise UserError(f"transformers {_transformers_version()} cannot load {gguf}: {exc}", where="model.name",
                        hint="use a GGUF of an architecture transformers supports, or a Hub id / local folder "
                             "of the original model") from exc
    _drop_quantizer(model)
    _finish_generation_settings(model, tokenizer)
    progress("saving")
    with _quiet_progress_bars():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return dtype


def storage_dtype(gguf: Path) -> str:
    """bfloat16 for quantized files; an unquantized file keeps its own float type."""
    import gguf as gguf_py

    try:
        reader = gguf_py.GGUFReader(gguf)
    except (ValueError, OSError) as exc:
        raise UserError(f"{gguf} is not a readable GGUF file: {exc}", where="model.name",
                        hint="check the file is complete (compare its sha256 with the publisher's)") from exc
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    if matrix_types and matrix_types <= _FLOAT_TYPES.keys():
        widest = next(name for name in ("F64", "F32", "F16", "BF16") if name in matrix_types)
        return _FLOAT_TYPES[widest]
    return "bfloat16"


@contextmanager
def _parsed_once(gguf: Path) -> Iterator[None]:
    """Parse the file's metadata once for the whole conversion. transformers builds a new
    ``GGUFReader`` for the config, the tokenizer and the weights, and re-reads every field
    each time; a Gemma 3 vocabulary alone is 262k fields, read an element at a time (each
    parse took about 15 s of a 60 s conversion, four times over)."""
    import copy

    import gguf as gguf_py
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real_reader, real_load = gguf_py.GGUFReader, gguf_utils.load_gguf_checkpoint
    target = gguf.resolve()
    readers: dict = {}
    metadata: dict = {}

    def reader(path, *args, **kwargs):
        if Path(path).resolve() != target or args or kwargs:
            return real_reader(path, *args, **kwargs)
        if "reader" not in readers:
            readers["reader"] = real_reader(path)
        return readers["reader"]

    def load(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs or Path(path).resolve() != target:
            return real_load(path, return_tensors=return_tensors, **kwargs)
        if "parsed" not in metadata:
            metadata["parsed"] = real_load(path, return_tensors=False)
        return copy.deepcopy(metadata["parsed"])  # callers pop keys from what they get

    gguf_py.GGUFReader, gguf_utils.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf_py.GGUFReader, gguf_utils.load_gguf_checkpoint = real_reader, real_load


def _dense_loading() -> dict:
    """Ask transformers for dense weights. Newer versions can keep GGUF blocks packed (when
    the `kernels` package has a matmul for them), which would not survive save_pretrained."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model) -> None:
    """save_pretrained refuses a model that still carries a GGUF quantizer; ours is dense.
    transformers 5.23 already drops both when dequantize=True; older ones keep them."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else config.json says "gguf" and reloading fails
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights are still packed after dequantising: {packed[:3]}")


def _finish_generation_settings(model, tokenizer) -> None:
    """Restore what the Hub folder would have had: a finite max length and chat-turn
    terminators among the end-of-sequence ids (e.g. Gemma's ``<end_of_turn>``)."""
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = max_positions
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in eos_ids:
            eos_ids.append(token_id)
    if len(eos_ids) > 1:
        model.generation_config.eos_token_id = eos_ids


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers' own tqdm bars would garble the rich status line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:  # the GGUF reader uses plain tqdm, not transformers' switchable one
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _publish(out: Path, target: Path) -> None:
    """Move the finished folder into place in one rename; a folder left by an older format
    is swapped out, and a concurrent run that finished first wins."""
    old = None
    if target.exists():
        if is_converted(target):
            return
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)
    try:
        out.rename(target)
    except OSError:
        if not is_converted(target):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_work(target: Path) -> None:
    """Delete work folders left by conversions whose process is gone (crash, kill -9)."""
    for leftover in target.parent.glob(f"{target.name}.*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


class GgufFileSource(ModelSource):
    name = "gguf"
    description = "a .gguf file, converted once to a transformers folder (cached by content)"
    priority = 25  # before `local`, which would otherwise claim "./model.gguf" as a path

    def claims(self, name: str) -> bool:
        return name.strip().lower().endswith(".gguf")

    def resolve(self, name: str) -> Path:
        path = Path(name.strip()).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "not found"
            raise UserError(f"GGUF file {what}: {path}", where="model.name",
                            hint=f"check the path (relative paths start from the current directory, {Path.cwd()})")
        digest = file_sha256(path)
        register_file(digest, lambda: path)
        return converted(digest, lambda work: path, label=path.name)

    def gguf_file(self, name: str, workdir: Path) -> Path | None:
        path = Path(name.strip()).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        return path if path.is_file() else None


@hookimpl
def register_model_sources(register):
    register(GgufFileSource)
