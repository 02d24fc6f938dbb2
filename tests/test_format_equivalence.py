"""Every data format gives every task the same tokenized rows (issue 27): the bundled data of
each task, rewritten as .jsonl.gz, .jsonl.zst, Parquet and a ``save_to_disk`` Arrow folder, is
prepared to exactly the rows, state and notes its JSON Lines original gives."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets  # noqa: F401
import pytest
import zstandard
from helpers import validated_recipe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"
FORMATS = ("jsonl.gz", "jsonl.zst", "parquet", "arrow")


def classification_records():
    from petune_plugins.tasks import datafiles

    return [dict(r) for r in datafiles.read_records(DATA / "sentiment_train.csv")][:40]


def ner_records():
    records, tokens, tags = [], [], []
    for line in (DATA / "ner_train.conll").read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            token, *_, tag = line.split()
            tokens.append(token)
            tags.append(tag)
        elif tokens:
            records.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
    return records[:40]


def jsonl_records(name: str, n: int = 40):
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


# task name, model, task options, the records
CASES = {
    "sft": ("random:tiny-llama", {"format": "alpaca", "max_length": 96, "validation_split": 0.2},
            lambda: jsonl_records("instructions.jsonl")),
    "classification": ("random:tiny-bert", {"max_length": 32, "validation_split": 0.2}, classification_records),
    "ner": ("random:tiny-bert", {"format": "jsonl", "validation_split": 0.2}, ner_records),
    "qa": ("random:tiny-bert", {"max_length": 96, "doc_stride": 16, "max_question_length": 24,
                                 "validation_split": 0.2},
           lambda: jsonl_records("qa_validation.jsonl")),
    "seq2seq": ("random:tiny-t5", {"source_field": "document", "target_field": "summary", "validation_split": 0.2,
                                   "max_source_length": 64, "max_target_length": 32},
                lambda: jsonl_records("summaries_train.jsonl")),
    "preference": ("random:tiny-llama", {"max_length": 64, "validation_split": 0.2},
                   lambda: jsonl_records("preference_train.jsonl")),
    "reward": ("random:tiny-llama", {"max_length": 64, "validation_split": 0.2},
               lambda: jsonl_records("preference_train.jsonl")),
}


def write(records: list[dict], folder: Path, fmt: str) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    if fmt == "jsonl":
        path = folder / "train.jsonl"
        path.write_bytes(text)
    elif fmt == "jsonl.gz":
        path = folder / "train.jsonl.gz"
        path.write_bytes(gzip.compress(text))
    elif fmt == "jsonl.zst":
        path = folder / "train.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "train.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        from datasets import Dataset

        path = folder / "train_arrow"
        Dataset.from_list(records).save_to_disk(str(path))
    return path


def prepared(host, task_name: str, path: Path, folder: Path) -> dict:
    from petune.models import load_tokenizer

    model, options, _ = CASES[task_name]
    recipe = validated_recipe(host, folder, model=model, task={"name": task_name, "train": path, **options},
                              strategy={"name": "lora", "r": 4})
    task = host.task(task_name)
    tokenizer = load_tokenizer(_model_path(model))
    data = task.load_data(recipe.task, tokenizer)
    rows = {split: getattr(data, split).to_list() for split in ("train", "validation", "test")
            if getattr(data, split) is not None}
    # a row's place names its file ("train.parquet:12"): the same row number in every format
    return json.loads(json.dumps({"rows": rows, "state": data.state, "notes": data.notes}, default=str)
                      .replace(str(path), "FILE"))


def _model_path(name: str) -> Path:
    from petune_plugins.sources.random_init import RandomInitSource

    return RandomInitSource().resolve(name)


@pytest.mark.parametrize("task_name", list(CASES))
def test_every_format_gives_the_same_rows(host, tmp_path, task_name):
    records = CASES[task_name][2]()
    assert len(records) >= 10
    expected = prepared(host, task_name, write(records, tmp_path, "jsonl"), tmp_path)
    assert expected["rows"]["train"] and expected["rows"]["validation"]
    for fmt in FORMATS:
        got = prepared(host, task_name, write(records, tmp_path, fmt), tmp_path)
        assert got == expected, f"{task_name}: {fmt} differs from jsonl"
