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
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from petune.api import data_workers
from petune.console import err, is_main_process
from petune.errors import UserError

Encode = Callable[[list], tuple[dict[str, list], dict[str, int]]]
_ENCODE: Encode | None = None  # the function forked workers run (inherited, never pickled)
_SCRATCH: list[Path] = []


def _scratch() -> Path:
    """A folder for this process's Arrow files, removed at exit (the data cache copies what it keeps)."""
    if not _SCRATCH:
        folder = Path(tempfile.mkdtemp(prefix="petune-tokens-"))
        atexit.register(shutil.rmtree, folder, True)
        _SCRATCH.append(folder)
    return _SCRATCH[0]


def _run(items: list):
    try:
        return "ok", _ENCODE(items)
    except UserError as exc:  # keyword arguments do not survive pickling: send the parts
        return "error", (type(exc), exc.message, exc.where, exc.hint)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _progress(total: int, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"tokenizing {desc}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                    disable=not is_main_process() or total < 2000)


def encode_split(items: Sequence, encode: Encode, *, desc: str, batch_size: int = 1000,
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

            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_run, _batches(items, batch_size))
        else:
            results = map(_run, _batches(items, batch_size))
        started = time.perf_counter()
        with _progress(len(items), desc) as progress:
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
