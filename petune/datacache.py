"""The data cache: a task's tokenized splits, built once and read back memory-mapped.

``petune run`` (and ``--resume``) and ``petune eval`` do not call the task's ``load_data`` /
``held_out_data`` directly: :func:`prepare` looks the result up here first. An entry is keyed by

* the task (its name, the method) and its resolved options;
* the contents of the files it reads (``Task.data_files``: by default every Path among the
  options; a folder counts with every file in it);
* the tokenizer as loaded (every file in its folder but the weights: vocabulary, merges,
  special tokens, chat template, and the model's config.json, whose length limit tasks read);
* the code: petune's version, this module's format, the source of the task plugin's modules
  and the files beside them (a changed task, template or shared reader rebuilds), and the
  versions of transformers, tokenizers, jinja2 and sentencepiece;
* the run's seed and, for ``eval``, the run's task state.

An entry holds each split as a ``datasets`` Arrow folder (``save_to_disk``; read back with
``load_from_disk``, memory-mapped, so a cached split costs no memory until a batch reads it),
the task state and plan notes (``meta.json``) and the tokenizer as the task left it (it may
have set a chat template or a pad token; a hit hands back that tokenizer, so a run from the
cache trains exactly as the run that built it). Entries are written into a temporary folder
and renamed into place when whole: a run killed while writing leaves a ``.tmp-*`` folder that
is never read (``petune cache clear`` removes it).

Where: ``[data] cache_dir`` in the recipe, else ``$PETUNE_DATA_CACHE``, else
``$XDG_CACHE_HOME/petune/data`` (``~/.cache/petune/data``). ``[data] cache = false`` or
``PETUNE_DATA_CACHE=off`` turns it off. ``petune cache list`` / ``petune cache clear``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from petune import __version__, hookimpl
from petune.api import DATA_SCRATCH, DATA_WORKERS, Options, Task, TaskData
from petune.console import err, human_bytes, human_count, is_main_process, out
from petune.errors import UserError

#: bump when an entry's layout or meaning changes
CACHE_FORMAT = 1
ENV = "PETUNE_DATA_CACHE"
SPLITS = ("train", "validation", "test")
_OFF = {"off", "0", "false", "no", "none"}
#: files of a model folder that are weights, not tokenizer or config: never hashed
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".npz"}


def cache_root(configured: str | None = None) -> Path | None:
    """The cache folder: ``configured`` (the recipe's), ``$PETUNE_DATA_CACHE``, else the XDG
    default; None when ``$PETUNE_DATA_CACHE`` says off."""
    value = configured or os.environ.get(ENV)
    if value and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "petune" / "data"


# -- the key ----------------------------------------------------------------------------------
def _digest_files(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of every file in a folder (names and contents)."""
    path = Path(path)
    if path.is_dir():
        return _digest_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
    if not path.is_file():
        return "missing"
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's files (its folder but the weights), or its saved form when it was not
    loaded from a folder. ``tokenizer``: a tokenizer, or its folder."""
    folder = Path(tokenizer if isinstance(tokenizer, (str, Path)) else getattr(tokenizer, "name_or_path", "") or "")
    if str(folder) and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in _WEIGHTS)
        return _digest_files(files)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _digest_files(sorted(p for p in Path(tmp).iterdir() if p.is_file()))


def code_modules(cls: type) -> list:
    """The modules of ``cls`` and its bases, and every module of the same top-level package
    they use (through their globals: imported modules, functions, classes), transitively."""
    import sys
    import types

    todo = [sys.modules.get(k.__module__) for k in cls.__mro__ if k.__module__.split(".")[0] not in ("builtins", "petune")]
    seen: dict[str, types.ModuleType] = {}
    while todo:
        module = todo.pop()
        if module is None or module.__name__ in seen or not getattr(module, "__file__", None):
            continue
        seen[module.__name__] = module
        if hasattr(module, "__path__"):
            continue  # a package's globals are its loaded submodules: only those used count
        top = module.__name__.split(".")[0]
        for value in vars(module).values():
            used = value if isinstance(value, types.ModuleType) else sys.modules.get(getattr(value, "__module__", None)
                                                                                       or "")
            if used is not None and used.__name__.split(".")[0] == top:
                todo.append(used)
    return list(seen.values())


def code_digest(cls: type) -> str:
    """The source of the task's modules (:func:`code_modules`) and the files beside them that
    are not Python (templates and other data a task reads): a changed task, template or
    shared reader rebuilds."""
    files = set()
    for module in code_modules(cls):
        source = Path(module.__file__)
        files.add(source)
        if "." in module.__name__:  # in a package: its data files too
            files.update(p for p in source.parent.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                         and "__pycache__" not in p.parts)
    return _digest_files(sorted(files), Path("/"))


def library_versions() -> dict[str, str]:
    """The libraries that turn text into tokens: a new version may tokenize differently."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "tokenizers", "jinja2", "sentencepiece"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def cache_key(task: Task, method: str, options: Options, tokenizer, extra: dict | None = None) -> dict:
    return {"cache_format": CACHE_FORMAT, "petune": __version__, "libraries": library_versions(),
            "task": task.name, "method": method,
            "code": code_digest(type(task)), "options": options.model_dump(mode="json"),
            "files": {str(p): content_digest(p) for p in task.data_files(options)},
            "tokenizer": tokenizer_digest(tokenizer), **(extra or {})}


def entry_name(task_name: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"{task_name}-{digest[:20]}"


# -- prepare ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    data: TaskData
    tokenizer: object
    #: one line for the plan: where the data came from
    note: str


#: the folder under the cache root where tasks write while preparing (never an entry)
SCRATCH = ".scratch"


@contextlib.contextmanager
def _preparing(num_proc: int, scratch: Path | None = None):
    """What a task reads while it prepares data: its worker count and scratch folder (petune.api)."""
    token, where = DATA_WORKERS.set(num_proc), DATA_SCRATCH.set(scratch)
    try:
        yield
    finally:
        DATA_WORKERS.reset(token)
        DATA_SCRATCH.reset(where)


def prepare(task: Task, method: str, options: Options, tokenizer, load: Callable[[object], TaskData], *,
            settings=None, extra: dict | None = None) -> Prepared:
    """``load(tokenizer)`` (the task's ``load_data`` or ``held_out_data``), from the cache when
    an entry for the same inputs exists, else built and stored. ``tokenizer``: a tokenizer, or
    the folder to load it from (loaded only on a miss: a hit brings its own). ``settings``: the
    recipe's ``[data]`` section (None: the defaults)."""
    from petune.models import load_tokenizer

    num_proc = getattr(settings, "num_proc", 1)
    root = cache_root(getattr(settings, "cache_dir", None)) if getattr(settings, "cache", True) else None
    if isinstance(tokenizer, (str, Path)):
        folder, tokenizer = str(tokenizer), None
    else:
        folder = getattr(tokenizer, "name_or_path", "")
    if root is None:
        tokenizer = tokenizer or load_tokenizer(folder)
        with _preparing(num_proc):
            return Prepared(load(tokenizer), tokenizer, "off")
    started = time.perf_counter()
    key = cache_key(task, method, options, tokenizer or folder, extra)
    entry = root / entry_name(task.name, key)
    hit = read_entry(entry, key, folder)
    if hit is not None:
        data, cached_tokenizer = hit
        return Prepared(data, cached_tokenizer, f"hit: {entry} ({time.perf_counter() - started:.1f} s)")
    tokenizer = tokenizer or load_tokenizer(folder)
    with _preparing(num_proc, root / SCRATCH):  # beside the entries: what is kept moves by a rename
        data = load(tokenizer)
    seconds = time.perf_counter() - started
    stored = write_entry(entry, key, data, tokenizer, seconds)
    if stored is None:
        return Prepared(data, tokenizer, "not cached (the task's data is not datasets.Dataset splits)")
    return Prepared(stored, tokenizer, f"built in {seconds:.1f} s, stored in {entry}")


def read_entry(entry: Path, key: dict, folder: str) -> tuple[TaskData, object] | None:
    """The entry's data and tokenizer, or None when there is no whole entry for ``key``."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if json.loads(json.dumps(key, default=str)) != meta.get("key"):
        return None  # a hash collision, or a hand-edited entry: never trusted
    try:
        data = _load_splits(entry, meta)
        from petune.models import load_tokenizer

        cached = load_tokenizer(entry / "tokenizer")
    except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
        err.print(f"[yellow]warning[/]: the data cache entry {escape(str(entry))} cannot be read ({exc}); "
                  "preparing the data again")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    cached.name_or_path = folder  # the model's folder, where tasks look up its config
    return data, cached


def _load_splits(entry: Path, meta: dict) -> TaskData:
    from datasets import Dataset, load_from_disk

    splits = {name: Dataset.from_file(str(entry / f"{name}.arrow")) if (entry / f"{name}.arrow").is_file()
              else load_from_disk(str(entry / name)) for name in meta["splits"]}
    # held-out data alone (petune eval) has no train split
    return TaskData(**{"train": None, **splits}, state=meta["state"], notes=meta["notes"])


def write_entry(entry: Path, key: dict, data: TaskData, tokenizer, seconds: float) -> TaskData | None:
    """Store ``data`` and ``tokenizer`` as ``entry`` (atomically: a temporary folder renamed
    into place) and return the data read back memory-mapped; None when it cannot be cached."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Saving the dataset": petune says what it does in the plan
    splits = {name: getattr(data, name) for name in SPLITS if getattr(data, name) is not None}
    try:
        meta = {"key": json.loads(json.dumps(key, default=str)), "state": data.state, "notes": data.notes,
                "splits": {name: len(split) for name, split in splits.items()}, "created": time.time(),
                "seconds": round(seconds, 3)}
        text = json.dumps(meta, indent=1)
        if json.loads(text)["state"] != data.state or json.loads(text)["notes"] != data.notes:
            return None  # tuples and the like would not come back as they were
    except (TypeError, ValueError):
        return None
    if not all(isinstance(split, Dataset) for split in splits.values()):
        return None
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name, split in splits.items():
            _store_split(split, tmp, name)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "meta.json").write_text(text, encoding="utf-8")  # last: an entry without it is not whole
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return _load_splits(entry, json.loads((entry / "meta.json").read_text(encoding="utf-8")))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_main_process():
            err.print(f"[yellow]warning[/]: could not store the prepared data in the cache ({exc}); "
                      "the run goes on without it")
        return data


def _store_split(split, folder: Path, name: str) -> None:
    """``folder/name.arrow`` when the split is one Arrow file on disk as it is (tasks that
    tokenize through ``encoding.encode_split``, whose scratch file it is): the file is moved,
    never read through this process's memory, so a large split costs no RSS here. Any other
    split (in memory, or a selection of a file): ``save_to_disk`` as ``folder/name``."""
    from datasets.table import MemoryMappedTable

    table = split.data
    # exactly the file: no selection, changed column or format (from_file itself records the
    # file's own features as a schema-metadata step)
    if (isinstance(table, MemoryMappedTable) and split._indices is None and split.format["type"] is None
            and all(step[0] == "replace_schema_metadata" for step in table.replays)):
        shutil.move(table.path, folder / f"{name}.arrow")  # a rename, or a copy in the kernel
        return
    split.save_to_disk(str(folder / name))


# -- petune cache -------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def entries(root: Path) -> list[dict]:
    """The entries under ``root`` (whole ones and ``.tmp-*`` leftovers), newest first."""
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name == SCRATCH:  # running preparations' files; a dead one's go next time
            continue
        row = {"name": folder.name, "path": str(folder), "bytes": folder_bytes(folder), "complete": False}
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if meta and not folder.name.startswith(".tmp-"):
            key = meta.get("key", {})
            row.update(complete=True, task=key.get("task"), files=list(key.get("files", {})),
                       splits=meta.get("splits", {}), created=meta.get("created"), seconds=meta.get("seconds"))
        found.append(row)
    return sorted(found, key=lambda r: -(r.get("created") or 0))


def cmd_cache(args) -> int:
    root = Path(args.dir).expanduser() if args.dir else cache_root()
    if root is None:
        raise UserError(f"the data cache is off (${ENV}={os.environ.get(ENV)})", hint=f"unset {ENV}, or give --dir")
    rows = entries(root)
    if args.action == "list":
        if args.json:
            print(json.dumps({"dir": str(root), "entries": rows}, indent=2))
            return 0
        table = Table(title=f"Data cache — {root}")
        for column in ("entry", "task", "rows", "size", "built", "files"):
            table.add_column(column, justify="right" if column in ("size", "rows") else "left")
        for r in rows:
            if not r["complete"]:
                table.add_row(escape(r["name"]), "[yellow]incomplete[/]", "", human_bytes(r["bytes"]), "", "")
                continue
            built = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r.get("created") else ""
            table.add_row(escape(r["name"]), r["task"] or "", ", ".join(f"{k} {human_count(v)}" for k, v in
                                                                        r["splits"].items()),
                          human_bytes(r["bytes"]), built, escape(", ".join(Path(f).name for f in r["files"])))
        out.print(table)
        err.print(f"{len(rows)} entries, {human_bytes(sum(r['bytes'] for r in rows))}")
        return 0
    if args.entries:
        chosen = [r for r in rows if r["name"] in args.entries]
    elif args.task:
        chosen = [r for r in rows if r.get("task") == args.task]
    else:
        chosen = rows
    unknown = set(args.entries or ()) - {r["name"] for r in rows}
    if unknown:
        raise UserError(f"no such cache entry: {', '.join(sorted(unknown))}", where=str(root),
                        hint="see petune cache list")
    for r in chosen:
        shutil.rmtree(r["path"], ignore_errors=True)
    err.print(f"removed {len(chosen)} entries, {human_bytes(sum(r['bytes'] for r in chosen))} freed from {root}")
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list or clear the data cache (tokenized splits of earlier runs)")
    p.add_argument("action", choices=["list", "clear"], help="list: entries with sizes; clear: remove entries")
    p.add_argument("entries", nargs="*", help="clear: the entries to remove (default: all)")
    p.add_argument("--task", help="clear: only this task's entries")
    p.add_argument("--dir", help=f"the cache folder (default: ${ENV}, else $XDG_CACHE_HOME/petune/data)")
    p.add_argument("--json", action="store_true", help="list: print JSON")
    p.set_defaults(func=cmd_cache)
