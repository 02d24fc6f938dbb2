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
import re
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
from petune.artifacts import folder_size, left_by_dead_process
from petune.console import err, human_bytes, human_count, is_main_process, out
from petune.errors import UserError

#: bump when an entry's layout or meaning changes
CACHE_FORMAT = 2  # 2: meta.json records a digest of every file written
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


#: digests already taken in this process, by file identity: a run hashes its data for the cache
#: key and for the resume check, a large file once
_DIGESTS: dict[tuple, str] = {}


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of every file in a folder (names and contents)."""
    path = Path(path)
    if path.is_dir():
        return _digest_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
    if not path.is_file():
        return "missing"
    stat = path.stat()
    seen = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if seen not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[seen] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[seen]


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


def data_fingerprint(options: Options, tokenizer_folder: Path) -> dict:
    """What a run's data is prepared from, for ``--resume`` to compare (:func:`data_changes`):
    every task option, a file as the digest of its content (a moved file with the same
    bytes is no change), and the tokenizer's files."""
    def plain(value):
        if isinstance(value, Path):
            return {"file": str(value), "sha256": content_digest(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    dumped = json.loads(json.dumps(plain(options.model_dump(mode="python")), default=str))
    return {"options": dumped, "tokenizer": tokenizer_digest(tokenizer_folder)}


def data_changes(before: dict, now: dict) -> list[str]:
    """What differs between two :func:`data_fingerprint` results, for people (empty: nothing)."""
    def content(value):  # a file counts by its bytes, not by where it is
        if isinstance(value, dict):
            return value["sha256"] if set(value) == {"file", "sha256"} else {k: content(v) for k, v in value.items()}
        return [content(v) for v in value] if isinstance(value, list) else value

    def files(value) -> list[str]:
        if isinstance(value, dict):
            return [value["file"]] if set(value) == {"file", "sha256"} else [f for v in value.values() for f in files(v)]
        return [f for v in value for f in files(v)] if isinstance(value, list) else []

    changes = []
    old, new = before.get("options") or {}, now.get("options") or {}
    for key in sorted(set(old) | set(new)):
        if content(old.get(key)) == content(new.get(key)):
            continue
        if files(old.get(key)) or files(new.get(key)):
            changes.append(f"task.{key}: the data changed ({', '.join(dict.fromkeys(files(new.get(key))))})")
        else:
            changes.append(f"task.{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    if before.get("tokenizer") != now.get("tokenizer"):
        changes.append("the tokenizer's files (model.name) changed")
    return changes


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
    root = usable_root(root)
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
    data, note = write_entry(entry, key, data, tokenizer, seconds)
    return Prepared(data, tokenizer, note)


def usable_root(root: Path | None) -> Path | None:
    """``root``, made if needed, or None (with a warning: the run goes on without the cache)
    when it is a file or cannot be written."""
    if root is None:
        return None
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(0, "it is a file, not a folder")
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=root).cleanup()
    except OSError as exc:
        if is_main_process():
            err.print(f"[yellow]warning[/]: the data cache folder {escape(str(root))} cannot be used "
                      f"({exc.strerror or exc}); preparing the data without the cache", soft_wrap=True)
        return None
    return root


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in an entry but meta.json, by its path in the entry."""
    return {str(p.relative_to(folder)): content_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def check_entry(entry: Path, key: dict) -> tuple[dict | None, str | None]:
    """(meta, None) for a whole entry stored for ``key`` whose files are as written; else
    (None, what is wrong), the reason None when the entry is simply not there (or was never
    finished: its meta.json is written last)."""
    try:
        text = (entry / "meta.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"its meta.json cannot be read ({exc.strerror or exc})"
    try:
        meta = json.loads(text)
    except ValueError as exc:
        return None, f"its meta.json is damaged ({exc})"
    if not isinstance(meta, dict) or json.loads(json.dumps(key, default=str)) != meta.get("key"):
        return None, "it was stored for other inputs (a hand-edited entry, or a hash collision)"
    if not isinstance(meta.get("digests"), dict):
        return None, "its meta.json records no digests of its files"
    found = file_digests(entry)
    changed = sorted(set(found) ^ set(meta["digests"]) | {f for f in found if found[f] != meta["digests"].get(f)})
    if changed:
        return None, f"{', '.join(changed[:3])} changed since it was written"
    return meta, None


def read_entry(entry: Path, key: dict, folder: str) -> tuple[TaskData, object] | None:
    """The entry's data and tokenizer, or None when there is no whole, intact entry for
    ``key`` (a damaged one is reported; the rebuild replaces it)."""
    meta, problem = check_entry(entry, key)
    if meta is not None:
        try:
            data = _load_splits(entry, meta)
            from petune.models import load_tokenizer

            cached = load_tokenizer(entry / "tokenizer")
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            problem = f"it cannot be read ({exc})"
        else:
            cached.name_or_path = folder  # the model's folder, where tasks look up its config
            return data, cached
    if problem and is_main_process():
        err.print(f"[yellow]warning[/]: the data cache entry {escape(str(entry))} is not used: {escape(problem)}; "
                  "preparing the data again, to replace it")
    return None


def _load_splits(entry: Path, meta: dict) -> TaskData:
    from datasets import Dataset, load_from_disk

    splits = {name: Dataset.from_file(str(entry / f"{name}.arrow")) if (entry / f"{name}.arrow").is_file()
              else load_from_disk(str(entry / name)) for name in meta["splits"]}
    # held-out data alone (petune eval) has no train split
    return TaskData(**{"train": None, **splits}, state=meta["state"], notes=meta["notes"])


def write_entry(entry: Path, key: dict, data: TaskData, tokenizer, seconds: float) -> tuple[TaskData, str]:
    """Store ``data`` and ``tokenizer`` as ``entry`` (atomically: a temporary folder renamed
    into place). Returns the data to train on — read back memory-mapped when it was stored,
    else ``data`` itself — and what happened, for the plan."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # "Saving the dataset": petune says what it does in the plan
    built = f"built in {seconds:.1f} s"
    splits = {name: getattr(data, name) for name in SPLITS if getattr(data, name) is not None}
    try:
        meta = {"key": json.loads(json.dumps(key, default=str)), "state": data.state, "notes": data.notes,
                "splits": {name: len(split) for name, split in splits.items()}, "created": time.time(),
                "seconds": round(seconds, 3)}
        text = json.dumps(meta, indent=1)
        kept = json.loads(text)["state"] == data.state and json.loads(text)["notes"] == data.notes
    except (TypeError, ValueError):
        kept = False
    if not kept:  # tuples and the like would not come back as they were
        return data, f"{built}, not cached (the task's state or notes are not plain JSON)"
    if not all(isinstance(split, Dataset) for split in splits.values()):
        return data, f"{built}, not cached (the task's data is not datasets.Dataset splits)"
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name, split in splits.items():
            _store_split(split, tmp, name)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta["digests"] = file_digests(tmp)  # checked on every read: a changed byte rebuilds
        text = json.dumps(meta, indent=1)
        (tmp / "meta.json").write_text(text, encoding="utf-8")  # last: an entry without it is not whole
        stored = _put_in_place(tmp, entry, key)
        return _load_splits(stored, json.loads((stored / "meta.json").read_text(encoding="utf-8"))), \
            f"{built}, stored in {stored}"
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_main_process():
            err.print(f"[yellow]warning[/]: could not store the prepared data in the cache ({exc}); "
                      "the run goes on without it")
        return data, f"{built}, not stored ({type(exc).__name__}: {exc.strerror or exc})"


def _put_in_place(tmp: Path, entry: Path, key: dict) -> Path:
    """Rename the finished ``tmp`` to ``entry``; the folder the data is read from. When an
    entry is already there: another process's whole entry for the same key is kept (ours is
    dropped); anything else (damaged, or stored for other inputs) is set aside and replaced,
    never read."""
    try:
        os.rename(tmp, entry)
        return entry
    except OSError:
        pass
    if check_entry(entry, key)[0] is not None:  # another process stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
        return entry
    aside = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, aside)
        os.rename(tmp, entry)
    except OSError:
        return tmp  # read from our own folder this time; it is a .tmp- leftover for `petune cache clear`
    shutil.rmtree(aside, ignore_errors=True)
    return entry


def _store_split(split, folder: Path, name: str) -> None:
    """``folder/name.arrow`` when the split is one Arrow file on disk as it is (tasks that
    tokenize through ``encoding.encode_split``, whose scratch file it is): the file is moved,
    never read through this process's memory, so a large split costs no RSS here. Any other
    split (in memory, or a selection of a file): ``save_to_disk`` as ``folder/name``.
    datasets has no public way to ask "is this exactly one file?": the private attributes
    read here are checked against datasets' behaviour by tests/test_data_cache.py."""
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
#: an entry's folder name (:func:`entry_name`), and a temporary one (being written, killed, or set aside)
_ENTRY_NAME = re.compile(r"^[\w.-]+-[0-9a-f]{20}$")
_TMP_NAME = re.compile(r"^\.tmp-([\w.-]+-[0-9a-f]{20})-\d+-[0-9a-f]{8}$")


def not_a_cache_entry(path: Path) -> str | None:
    """Why ``path`` is not a folder the data cache wrote (what ``petune cache clear`` may
    remove); None when it is: an entry's name, and nothing in it but what an entry holds."""
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder" if not path.is_symlink() else f"it is a symbolic link (to {os.readlink(path)})"
    if not (_ENTRY_NAME.match(path.name) or _TMP_NAME.match(path.name)):
        return "its name is not a cache entry's (TASK-<20 hex digits>)"
    allowed = {"meta.json", "tokenizer", *SPLITS, *(f"{split}.arrow" for split in SPLITS)}
    other = sorted(child.name for child in path.iterdir() if child.name not in allowed)
    if other:
        return f"it holds what no cache entry holds: {', '.join(other[:5])}"
    return None


def entries(root: Path) -> list[dict]:
    """The entries under ``root`` (whole ones and ``.tmp-*`` leftovers), newest first."""
    return [r for r in survey(root) if not r.get("scratch") and "foreign" not in r]


def survey(root: Path) -> list[dict]:
    """What is under ``root``: its entries (whole ones and ``.tmp-*`` leftovers), newest first; the
    scratch folders of processes preparing data (``scratch``: True, ``running`` when their
    process may be alive); anything else is ``foreign`` (with the reason), never removed."""
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name == SCRATCH and folder.is_dir() and not folder.is_symlink():
            found += [{"name": f"{SCRATCH}/{part.name}", "path": str(part), "bytes": folder_size(part),
                       "complete": False, "scratch": True, "running": not left_by_dead_process(part)}
                      for part in sorted(folder.iterdir()) if part.is_dir() and not part.is_symlink()]
            continue
        if folder.name.startswith(".") and not folder.name.startswith(".tmp-"):
            continue  # hidden files of the system (.DS_Store, .nfs*) are neither entries nor in the way
        reason = not_a_cache_entry(folder)
        row = {"name": folder.name, "path": str(folder), "complete": False}
        if reason:
            found.append({**row, "bytes": 0, "foreign": reason})
            continue
        row["bytes"] = folder_size(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and not folder.name.startswith(".tmp-"):
            key = meta.get("key", {})
            row.update(complete=True, task=key.get("task"), files=list(key.get("files", {})),
                       splits=meta.get("splits", {}), created=meta.get("created"), seconds=meta.get("seconds"))
        found.append(row)
    return sorted(found, key=lambda r: -(r.get("created") or 0))


def cmd_cache(args) -> int:
    from petune import artifacts

    root = Path(args.dir).expanduser() if args.dir else cache_root()
    if root is None:
        raise UserError(f"the data cache is off (${ENV}={os.environ.get(ENV)})", hint=f"unset {ENV}, or give --dir")
    if root.exists() and not root.is_dir():
        raise UserError("not a folder", where=str(root), hint="give the data cache's folder")
    rows = survey(root)
    foreign = [r for r in rows if "foreign" in r]
    if args.action == "list":
        if args.json:
            print(json.dumps({"dir": str(root), "entries": [r for r in rows if not r.get("scratch") and r not in foreign],
                              "scratch": [r for r in rows if r.get("scratch")], "foreign": foreign}, indent=2))
            return 0
        table = Table(title=f"Data cache — {root}")
        for column in ("entry", "task", "rows", "size", "built", "files"):
            table.add_column(column, justify="right" if column in ("size", "rows") else "left")
        for r in rows:
            if "foreign" in r:
                table.add_row(escape(r["name"]), "[red]not an entry[/]", "", "", "", escape(r["foreign"]))
            elif r.get("scratch"):
                state = "[cyan]preparing[/]" if r["running"] else "[yellow]left by a dead process[/]"
                table.add_row(escape(r["name"]), state, "", human_bytes(r["bytes"]), "", "")
            elif not r["complete"]:
                table.add_row(escape(r["name"]), "[yellow]incomplete[/]", "", human_bytes(r["bytes"]), "", "")
            else:
                built = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r.get("created") else ""
                table.add_row(escape(r["name"]), r["task"] or "", ", ".join(
                    f"{k} {human_count(v)}" for k, v in r["splits"].items()), human_bytes(r["bytes"]), built,
                              escape(", ".join(Path(f).name for f in r["files"])))
        out.print(table)
        err.print(f"{len(rows) - len(foreign)} entries, {human_bytes(sum(r['bytes'] for r in rows))}"
                  + (f"; {len(foreign)} other item(s) that are not cache entries" if foreign else ""))
        return 0
    removable = [r for r in rows if "foreign" not in r and not r.get("running")]
    if args.entries:
        unknown = set(args.entries) - {r["name"] for r in rows}
        if unknown:
            raise UserError(f"no such cache entry: {', '.join(sorted(unknown))}", where=str(root),
                            hint="see petune cache list")
        foreign = [r for r in foreign if r["name"] in args.entries]
        chosen = [r for r in removable if r["name"] in args.entries]
    elif args.task:
        chosen = [r for r in removable if r.get("task") == args.task]
        foreign = []  # only entries can be a task's
    else:
        chosen = removable
    # the check every command that deletes output makes (home, the current folder, links, not ours)
    foreign += [{**r, "foreign": reason} for r in chosen
                if (reason := artifacts.why_not_replaceable(Path(r["path"]), [], _not_ours_to_clear, "cache clear"))]
    if foreign:
        listing = "; ".join(f"{r['name']} ({r['foreign']})" for r in foreign[:10])
        raise UserError(f"cache clear refused: {len(foreign)} item(s) here are not petune cache entries: {listing}"
                        f"{' ...' if len(foreign) > 10 else ''}; nothing was deleted", where=str(root),
                        hint="is this the data cache's folder? Remove entries by name (petune cache clear NAME ...), "
                             "or move the other items elsewhere")
    failed = []
    for r in chosen:
        try:
            shutil.rmtree(r["path"])
        except OSError as exc:
            failed.append(f"{r['name']} ({exc.strerror or exc})")
    if failed:
        raise UserError(f"could not remove {len(failed)} of {len(chosen)} item(s): {'; '.join(failed[:5])}",
                        where=str(root), hint="check the folder's permissions")
    scratch = sum(1 for r in chosen if r.get("scratch"))
    err.print(f"removed {len(chosen) - scratch} entries" + (f" and {scratch} scratch folder(s) of dead processes"
                                                             if scratch else "")
              + f", {human_bytes(sum(r['bytes'] for r in chosen))} freed from {root}")
    return 0


def _not_ours_to_clear(path: Path) -> str | None:
    """Cache entries and dead processes' scratch folders: what ``cache clear`` removes."""
    if path.parent.name == SCRATCH:
        return None if left_by_dead_process(path) else "a running preparation's scratch folder"
    return not_a_cache_entry(path)


@hookimpl
def register_commands(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list or clear the data cache (tokenized splits of earlier runs)")
    p.add_argument("action", choices=["list", "clear"], help="list: entries with sizes; clear: remove entries")
    p.add_argument("entries", nargs="*", help="clear: the entries to remove (default: all)")
    p.add_argument("--task", help="clear: only this task's entries")
    p.add_argument("--dir", help=f"the cache folder (default: ${ENV}, else $XDG_CACHE_HOME/petune/data)")
    p.add_argument("--json", action="store_true", help="list: print JSON")
    p.set_defaults(func=cmd_cache)
