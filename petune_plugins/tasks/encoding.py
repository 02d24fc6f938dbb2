"""Tokenizing a split in batches, written to Arrow as it goes (issue 27: bounded memory).

A task that tokenizes row by row into Python lists holds every token id of the split as a
Python int (36 bytes each) until the end: many times the file's size. :func:`encode_split`
encodes ``batch_size`` items at a time, appends each batch's columns to an Arrow file and
hands back that file as a memory-mapped ``datasets.Dataset``; only one batch per process is
in memory. With the recipe's ``[data] num_proc`` above 1 (:func:`petune.api.data_workers`),
batches are encoded by that many forked processes, in order. A progress bar shows rows/s.

    dataset, counts = encode_split(items, encode_batch, desc="train")

``encode_batch(items) -> (columns, counts)``: the columns of the rows it keeps (a dict of
equal-length lists) and counts, summed over the batches (``combine`` names other ways, e.g.
``{"shortest": min}``). Errors raised in a worker (``UserError`` and its kinds) reach the
caller as they were raised, with their place and hint.

``items`` may be a list or a :class:`Spool`: the items a task parsed from its files, written to
disk as they are read, so that even the parsed records of a file of millions of rows never lie
in memory together; ``spool.subset(positions)`` is the seeded train/validation split of one.

    spool = Spool.write(iter_examples(path))      # one pass over the file, one batch in memory
    train, validation = spool.subset(held, inside=False), spool.subset(held, inside=True)
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from petune.api import data_scratch, data_workers
from petune.artifacts import left_by_dead_process, mark_owner
from petune.console import err, is_main_process
from petune.errors import UserError

Encode = Callable[[list], tuple[dict[str, list], dict[str, int]]]
_ENCODE: Encode | None = None  # the function forked workers run (inherited, never pickled)
_SCRATCH: dict[Path, Path] = {}  # scratch root -> this process's folder in it


def _scratch() -> Path:
    """A folder for this process's Arrow files, removed at exit (the data cache moves what it
    keeps out of it first): inside the data cache while the core prepares a task's data for it
    (:func:`petune.api.data_scratch`), else in the system's temporary folder. A process killed
    before its exit leaves its folder behind: the next one removes the folders of processes
    that are gone (a 1M-row file leaves gigabytes)."""
    root = data_scratch() or Path(tempfile.gettempdir())
    if root not in _SCRATCH:
        root.mkdir(parents=True, exist_ok=True)
        _remove_orphans(root)
        folder = Path(tempfile.mkdtemp(prefix=f"petune-tokens-{os.getpid()}-", dir=root))
        mark_owner(folder)  # who works here: another process removes it only when we are certainly gone
        atexit.register(shutil.rmtree, folder, True)
        _SCRATCH[root] = folder
    return _SCRATCH[root]


def _remove_orphans(root: Path) -> None:
    """Remove the scratch folders of processes that are certainly gone (a pid alone says
    nothing across containers or a shared disk: see petune.artifacts.left_by_dead_process)."""
    for folder in root.glob("petune-tokens-*-*"):
        if folder.is_dir() and not folder.is_symlink() and left_by_dead_process(folder):
            shutil.rmtree(folder, ignore_errors=True)


class Spool:
    """Items (any picklable objects) in an Arrow stream file on disk, one pickled item per row.

    Written in one pass as the items come (:meth:`write`); read back a batch at a time through
    a plain file, not a memory map, so reading holds one batch, never the file's pages. A
    subset (:meth:`subset`) is a view: the same file, the items at some positions."""

    def __init__(self, path: Path, count: int, first=None, positions: frozenset[int] | None = None,
                 inside: bool = True, whole: Spool | None = None):
        self.path, self.count, self.first = path, count, first
        self._positions, self._inside = positions, inside
        self._whole = whole  # a subset keeps the whole alive: the file goes when the last view does
        if whole is None:
            weakref.finalize(self, path.unlink, missing_ok=True)

    @classmethod
    def write(cls, items: Iterable, *, desc: str = "", batch_size: int = 1000) -> Spool:
        """Spool ``items`` (read as they come); ``desc`` names them on the progress line."""
        import time

        import pyarrow as pa

        schema = pa.schema([("item", pa.large_binary())])
        path = _scratch() / f"spool-{time.time_ns()}.arrow"
        count, first, batch = 0, None, []
        started = time.perf_counter()
        with (pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer,
              _progress(None, f"reading {desc}") as progress):
            line = progress.add_task(desc, total=None, rate="")

            def flush():
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_binary())], schema=schema))
                batch.clear()
                rate = count / max(time.perf_counter() - started, 1e-9)
                progress.update(line, completed=count, rate=f"{rate:,.0f} rows/s")

            for item in items:
                if count == 0:
                    first = item
                batch.append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
                count += 1
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        return cls(path, count, first)

    def subset(self, positions: set[int], *, inside: bool) -> Spool:
        """The items at ``positions`` (``inside``) or at every other position, in file order.
        ``positions``: positions in this spool's whole file (a spool read whole)."""
        if self._positions is not None:
            raise ValueError("a subset of a subset is not supported")
        return Spool(self.path, self.count, self.first, frozenset(positions), inside, whole=self)

    def __len__(self) -> int:
        if self._positions is None:
            return self.count
        return len(self._positions) if self._inside else self.count - len(self._positions)

    def batches(self, size: int) -> Iterator[list]:
        """Lists of up to ``size`` items, in file order."""
        import pyarrow as pa

        batch, position = [], 0
        with pa.OSFile(str(self.path), "rb") as source:
            for record_batch in pa.ipc.open_stream(source):
                for raw in record_batch.column(0).to_pylist():
                    if self._positions is None or (position in self._positions) == self._inside:
                        batch.append(pickle.loads(raw))
                        if len(batch) >= size:
                            yield batch
                            batch = []
                    position += 1
        if batch:
            yield batch

    def __iter__(self) -> Iterator:
        for batch in self.batches(1000):
            yield from batch


def _run(items: list):
    try:
        return "ok", _ENCODE(items)
    except UserError as exc:  # keyword arguments do not survive pickling: send the parts
        return "error", (type(exc), exc.message, exc.where, exc.hint)


def _worker_signals() -> None:
    """In a forked worker: SIGTERM ends it, whatever handler the parent holds (a training's
    stop-on-signal handler swallows it, and Pool.terminate() then waits on the workers forever);
    Ctrl-C is the parent's to handle (it terminates the pool)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(items: Sequence | Spool, size: int):
    if isinstance(items, Spool):
        yield from items.batches(size)
        return
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _progress(total: int | None, label: str):
    """A transient bar (``total=None``: a count without a bar) with rows/s; only in the main
    process, and only for splits large enough to take a while."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = ([BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                TimeRemainingColumn()] if total is not None else
               [TextColumn("{task.completed:,} rows"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn()])
    return Progress(TextColumn(label), *columns, console=err, transient=True,
                    disable=not is_main_process() or (total is not None and total < 2000))


def encode_split(items: Sequence | Spool, encode: Encode, *, desc: str, batch_size: int = 1000,
                 combine: dict[str, Callable[[int, int], int]] | None = None):
    """``(dataset, counts)``: the rows ``encode`` keeps of ``items``, as a memory-mapped Dataset."""
    global _ENCODE
    import time

    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    combine = combine or {}
    counts: dict[str, int] = {}
    path = _scratch() / f"{desc}-{time.time_ns()}.arrow"
    writer, rows = ArrowWriter(path=str(path)), 0
    workers = min(data_workers(), max(1, len(items) // batch_size))
    _ENCODE = encode
    pool = None
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals)
            results = pool.imap(_run, _batches(items, batch_size))
        else:
            results = map(_run, _batches(items, batch_size))
        started = time.perf_counter()
        with _progress(len(items), f"tokenizing {desc}") as progress:
            bar = progress.add_task(desc, total=len(items), rate="")
            done = 0
            for status, value in results:
                if status == "error":
                    kind, message, where, hint = value
                    raise kind(message, where=where, hint=hint)
                columns, batch_counts = value
                for key, n in batch_counts.items():
                    counts[key] = combine.get(key, int.__add__)(counts[key], n) if key in counts else n
                kept = len(next(iter(columns.values()), []))
                if kept:
                    writer.write_batch(columns)
                    rows += kept
                done = min(done + batch_size, len(items))
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(bar, completed=done, rate=f"{rate:,.0f} rows/s")
    finally:
        _ENCODE = None
        if pool is not None:
            pool.terminate()
    if not rows:
        writer.close()
        return Dataset.from_dict({}), counts
    writer.finalize()
    return Dataset.from_file(str(path)), counts
