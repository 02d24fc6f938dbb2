"""Bounded memory while preparing data (issue 27): a task's records are spooled to disk as they
are read (``encoding.Spool``), split without loading them, and tokenized a batch at a time; the
parsed records of a whole file are never in memory together."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from petune_plugins.tasks import chat_records
from petune_plugins.tasks._common import seeded_split
from petune_plugins.tasks.encoding import Spool, encode_split

pytest.importorskip("pyarrow")


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"question number {i} " + "word " * (i % 17), "input": "" if i % 3 else f"context {i}",
             "output": f"answer {i} " + "text " * (i % 23)} for i in range(n)]


def test_a_spool_gives_back_its_items_and_splits_like_a_list():
    items = [{"n": i, "text": f"row {i}"} for i in range(2345)]
    spool = Spool.write(iter(items), batch_size=100)
    assert len(spool) == 2345 and spool.first == items[0]
    assert list(spool) == items
    assert [len(b) for b in spool.batches(1000)] == [1000, 1000, 345]
    train, held = seeded_split(spool, 0.1, 7, "x")
    list_train, list_held = seeded_split(items, 0.1, 7, "x")
    assert (len(train), len(held)) == (len(list_train), len(list_held))
    assert list(train) == list_train and list(held) == list_held
    # the tokenizing step takes a spool as it takes a list
    def encode(batch):
        return {"n": [x["n"] for x in batch]}, {"rows": len(batch)}
    dataset, counts = encode_split(held, encode, desc="held", batch_size=50)
    assert dataset["n"] == [x["n"] for x in list_held] and counts == {"rows": len(list_held)}


def test_the_spool_file_goes_with_its_last_view():
    import gc

    spool = Spool.write(iter(range(10)))
    path = spool.path
    view = spool.subset({1, 2}, inside=True)
    del spool
    gc.collect()
    assert path.exists() and list(view) == [1, 2]
    del view
    gc.collect()
    assert not path.exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet"])
def test_sft_reads_every_format_to_the_same_examples(tmp_path, suffix):
    rows = alpaca_rows(1500)
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    spool, fmt = chat_records.read_examples(path, "auto", None)
    examples = list(spool)
    assert fmt == "alpaca" and len(examples) == 1500
    assert [e.messages for e in examples] == [chat_records.to_conversation(r, "alpaca") for r in rows]
    capped, _ = chat_records.read_examples(path, "auto", 10)
    assert len(capped) == 10


def test_reading_a_large_file_holds_a_batch_not_the_file(tmp_path):
    """The records of a 30,000-row file are parsed, checked and spooled while Python holds far
    less than the file's size (a list of parsed records holds several times the file)."""
    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in alpaca_rows(30_000))
    size = path.stat().st_size
    (spool, _), peak = peak_while(lambda: chat_records.read_examples(path, "alpaca", None))
    assert len(spool) == 30_000
    assert peak < size / 4, f"peak {peak:,} bytes of Python objects for a {size:,}-byte file"


def test_a_bad_record_deep_in_a_streamed_file_names_its_line(tmp_path):
    from petune.errors import DataError

    rows = [json.dumps(r) for r in alpaca_rows(2500)]
    rows[2200] = json.dumps({"instruction": "no answer here"})
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(DataError) as caught:
        chat_records.read_examples(path, "auto", None)
    assert caught.value.where == f"{path}:2201" and "'output'" in caught.value.message


def test_scratch_folders_of_killed_processes_are_removed(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from petune import artifacts
    from petune_plugins.tasks import encoding

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    identity = "import json; from petune.artifacts import process_identity; print(json.dumps(process_identity()))"
    gone = subprocess.run([sys.executable, "-c", identity], capture_output=True, text=True, check=True)
    dead = json.loads(gone.stdout)
    me = artifacts.process_identity()
    owners = {"orphan": dead,  # certainly gone: removed
              "alive": {**me, "pid": os.getppid(), "start": artifacts._process_start(os.getppid())},
              # issue 33: the same pid in another PID namespace (a container) or on another host sharing the
              # disk says nothing about that process: kept
              "other-namespace": {**dead, "pid_namespace": "pid:[1]"}, "other-host": {**dead, "host": "elsewhere"},
              "unmarked": None}
    folders = {}
    for name, owner in owners.items():
        folders[name] = folder = tmp_path / f"petune-tokens-{dead['pid']}-{name}"
        folder.mkdir()
        (folder / "train.arrow").write_bytes(b"x" * 100)
        if owner is not None:
            (folder / artifacts.OWNER_FILE).write_text(json.dumps(owner))
    old = tmp_path / f"petune-tokens-{dead['pid']}-old-unmarked"  # nobody touched it for weeks: removed
    old.mkdir()
    (old / "train.arrow").write_bytes(b"x")
    weeks_ago = os.stat(old).st_mtime - 30 * 24 * 3600
    for path in (old / "train.arrow", old):
        os.utime(path, (weeks_ago, weeks_ago))
    monkeypatch.setattr(encoding, "_SCRATCH", {})
    scratch = encoding._scratch()
    assert sorted(p.name.rpartition(f"{dead['pid']}-")[2] for p in tmp_path.glob(f"petune-tokens-{dead['pid']}-*")) \
        == ["alive", "other-host", "other-namespace", "unmarked"]
    assert scratch.parent == tmp_path and scratch.name.startswith(f"petune-tokens-{subprocess.os.getpid()}-")
    assert json.loads((scratch / artifacts.OWNER_FILE).read_text())["pid"] == os.getpid()


# -- the other tasks that read records files: classification, preference, reward, seq2seq --------
def peak_while(read) -> tuple[object, int]:
    """What ``read()`` returns and the peak of Python allocations while it ran (the modules a
    spool imports on first use are imported before: the test may run alone)."""
    Spool.write(iter([0]))
    tracemalloc.start()
    try:
        result = read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def write_rows(path: Path, rows) -> int:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path.stat().st_size


def test_classification_reads_a_large_file_a_batch_at_a_time(tmp_path):
    from petune_plugins.tasks.classification import ClassificationOptions, FileSettings, spool_examples

    path = tmp_path / "train.jsonl"
    size = write_rows(path, ({"text": f"review number {i} " + "good words " * (i % 13), "label": f"class{i % 5}"}
                             for i in range(25_000)))
    options = ClassificationOptions.model_validate({"train": str(path)})
    labels: set[str] = set()
    spool, peak = peak_while(lambda: spool_examples(FileSettings.of(options, options.train), labels=labels))
    assert len(spool) == 25_000 and labels == {f"class{i}" for i in range(5)}
    assert peak < size / 4, f"peak {peak:,} bytes of Python objects for a {size:,}-byte file"
    last = list(spool.batches(1000))[-1][-1]
    assert (last.text, last.label, last.where) == (("review number 24999 " + "good words " * (24999 % 13)).strip(),
                                                   "class4", f"{path}:25000")


def pair_rows(n: int):
    return ({"prompt": f"question {i} " + "about things " * (i % 7), "chosen": f"good answer {i} " + "yes " * (i % 5),
             "rejected": f"bad answer {i}"} for i in range(n))


def test_preference_reads_a_large_file_a_batch_at_a_time(tmp_path):
    from petune_plugins.tasks import preference

    path = tmp_path / "pairs.jsonl"
    size = write_rows(path, pair_rows(25_000))
    (spool, fmt, dropped), peak = peak_while(lambda: preference.read_preferences(path, "auto", None))
    assert (len(spool), fmt, dropped) == (25_000, "pairs", {})
    assert peak < size / 4, f"peak {peak:,} bytes of Python objects for a {size:,}-byte file"
    assert spool.first.where == f"{path}:1" and spool.first.chosen == [{"role": "assistant", "content": "good answer 0 "}]


def test_reward_reads_a_large_file_a_batch_at_a_time(tmp_path):
    from petune_plugins.tasks.preference import read_splits
    from petune_plugins.tasks.reward import RewardOptions

    path = tmp_path / "pairs.jsonl"
    rows = list(pair_rows(25_000))
    rows[7]["rejected"] = rows[7]["chosen"]  # dropped and counted while spooling
    size = write_rows(path, rows)
    del rows
    options = RewardOptions.model_validate({"train": str(path)})
    (examples, fmt, notes), peak = peak_while(lambda: read_splits(options))
    assert (len(examples["train"]), fmt, notes) == (24_999, "pairs", {"train_dropped_identical": 1})
    assert peak < size / 4, f"peak {peak:,} bytes of Python objects for a {size:,}-byte file"


def test_seq2seq_reads_a_large_file_a_batch_at_a_time(tmp_path):
    from petune_plugins.tasks.seq2seq import DataFile, Seq2SeqOptions, read_split

    path = tmp_path / "train.jsonl"
    size = write_rows(path, ({"source": f"source sentence {i} " + "words " * (i % 11),
                              "target": [f"reference {i}", f"other reference {i}"]} for i in range(25_000)))
    options = Seq2SeqOptions.model_validate({"train": str(path)})
    (spool, blank), peak = peak_while(lambda: read_split(DataFile(path=path), options))
    assert (len(spool), blank) == (25_000, 0)
    assert peak < size / 4, f"peak {peak:,} bytes of Python objects for a {size:,}-byte file"
    assert spool.first.references == ["reference 0", "other reference 0"] and spool.first.where == f"{path}:1"
