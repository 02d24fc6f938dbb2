"""A GGUF file (llama.cpp's format): ``~/models/gemma-3-270m-q4_k_m.gguf``.

The weights stay in the file. What transformers needs besides them — the config, the
generation settings and the tokenizer, all in the file's metadata — is written once into a
small folder cached by the file's content (no weights: a few MB, about 15 s for Gemma's
262k-token vocabulary)::

    <petune cache>/models/gguf/<first 16 hex of the file's sha256>/
        config.json  generation_config.json  tokenizer.json  tokenizer_config.json
        petune_gguf.json (written last: what, from which file)

A task builds the model from that folder with :func:`petune.api.load_pretrained`, which hands
it to this module's weights loader: strategy qlora with ``quant_type = "gguf"`` keeps the
file's blocks as stored (``gguf_backend``), every other strategy gets the file's tensors
dequantised (by torch, in seconds) and loaded as from a converted checkpoint — bitsandbytes
quantises them for NF4 as usual. Nothing dense is written to disk.

The folder builds in a ``<digest>.tmp-<pid>`` folder and is renamed into place, so a crash
never leaves a half-written cache that looks whole. :func:`described` is shared with the
``packaged`` source.
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
from petune.api import ModelSource, register_weights_loader
from petune.errors import UserError
from petune.models import cache_dir

_FORMAT = 2  # bump when the cached layout changes; older caches are then rebuilt (1: dense weights)
MARKER = "petune_gguf.json"
#: Chat-turn terminators that a GGUF's generation settings lose; generation should stop on them too.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def cache_folder(digest: str) -> Path:
    """Where the description of the GGUF file with this sha256 lives (may not exist yet)."""
    return cache_dir("models", "gguf") / digest[:16]


#: sha256 of a GGUF file -> how to get the file itself (registered by the sources that resolve it)
_FILES: dict[str, Callable[[], Path]] = {}


def register_file(digest: str, produce: Callable[[], Path]) -> None:
    """Remember where the GGUF file with this sha256 is (or how to write it), for
    :func:`gguf_for_folder`. Sources call it from ``resolve``, which runs in every process
    before a model loads."""
    _FILES[digest] = produce


def gguf_for_folder(folder: Path) -> Path | None:
    """The GGUF file a described folder stands for (the weights loader reads it; exports name
    it as the base): the one a source resolved in this process, else the one the folder was
    described from when it is still there; None for any other folder."""
    info = _marker(Path(folder))
    if info is None:
        return None
    produce = _FILES.get(info.get("sha256"))
    if produce is not None:
        return produce()
    path = Path(info.get("file", ""))
    return path if path.is_absolute() and path.is_file() else None


def _marker(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == _FORMAT else None


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


def is_described(folder: Path) -> bool:
    return _marker(folder) is not None


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


def described(digest: str, produce_gguf: Callable[[], Path], *, label: str) -> Path:
    """The cached folder describing the GGUF file with sha256 ``digest`` (config, generation
    settings, tokenizer; no weights), written first when needed. ``produce_gguf()`` returns
    the file, which must stay where it is: the weights are read from it."""
    target = cache_folder(digest)
    if is_described(target):
        return target
    _remove_stale_work(target)
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        console = _console()
        if not console.is_terminal:  # the status line below only shows on a terminal
            console.print(f"Reading {label}'s config and tokenizer once (cached for next runs) ...", soft_wrap=True)
        started = time.perf_counter()
        with console.status(f"Reading {label}'s config and tokenizer once (cached for next runs) ..."):
            gguf = produce_gguf()
            out = work / "model"
            describe_gguf(gguf, out)
            info = {"format": _FORMAT, "sha256": digest, "source": gguf.name, "file": str(gguf.resolve()),
                    "weights": "in the GGUF file", "transformers": _transformers_version()}
            (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            _publish(out, target)
        console.print(f"Read {label}'s config and tokenizer in {time.perf_counter() - started:.0f} s, cached in "
                      f"{target}", soft_wrap=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def describe_gguf(gguf: Path, out: Path) -> None:
    """Write the config, generation settings and tokenizer in ``gguf``'s metadata into ``out``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from petune_plugins.strategies.gguf_backend import reader_of

    try:
        reader_of(gguf)
    except (ValueError, OSError) as exc:
        raise UserError(f"{gguf} is not a readable GGUF file: {exc}", where="model.name",
                        hint="check the file is complete (compare its sha256 with the publisher's)") from exc
    try:
        with _parsed_once(gguf), _quiet_progress_bars():
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as exc:  # how transformers says "unsupported GGUF"
        raise UserError(f"transformers {_transformers_version()} cannot read {gguf}: {exc}", where="model.name",
                        hint="use a GGUF of an architecture transformers supports, or a Hub id / local folder "
                             "of the original model") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds no weights; the loader reads the file's own
    generation = GenerationConfig.from_model_config(config)
    _finish_generation_settings(config, generation, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_from_file(auto_class, folder: Path, kwargs: dict):
    """The weights loader for described folders (see :func:`petune.api.load_pretrained`)."""
    info = _marker(folder)
    if info is None:
        return None
    gguf = gguf_for_folder(folder)
    if gguf is None:
        raise UserError(f"the GGUF file behind {folder} is gone ({info.get('file', '?')})", where="model.name",
                        hint="put the file back, or give its new path as model.name")
    from petune_plugins.strategies import gguf_backend

    return gguf_backend.load_model(auto_class, folder, gguf, kwargs)


register_weights_loader(_load_from_file)


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


def _finish_generation_settings(config, generation, tokenizer) -> None:
    """Restore what the Hub folder would have had: a finite max length and chat-turn
    terminators among the end-of-sequence ids (e.g. Gemma's ``<end_of_turn>``)."""
    max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = max_positions
    eos = generation.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in eos_ids:
            eos_ids.append(token_id)
    if len(eos_ids) > 1:
        generation.eos_token_id = eos_ids


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
        if is_described(target):
            return
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)
    try:
        out.rename(target)
    except OSError:
        if not is_described(target):
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
    description = "a .gguf file, its weights read as stored (config and tokenizer cached by content)"
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
        return described(digest, lambda: path, label=path.name)

    def gguf_file(self, name: str, workdir: Path) -> Path | None:
        path = Path(name.strip()).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        return path if path.is_file() else None


@hookimpl
def register_model_sources(register):
    register(GgufFileSource)
