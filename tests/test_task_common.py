"""What every task shares (plugins/tasks/_common.py): one meaning of the split options, the
shared reader's formats, and task objects that keep nothing between calls."""

from __future__ import annotations

import gzip
import json

import pytest
from pydantic import ValidationError

from petune.api import ModelInfo

TINY = {"classification": "tiny-bert", "ner": "tiny-bert", "qa": "tiny-bert", "seq2seq": "tiny-t5", "sft": "tiny-llama",
        "preference": "tiny-llama", "reward": "tiny-llama"}


def records(task: str, n: int) -> list[dict]:
    """``n`` records each task reads as one example (one sentence, question, pair ...)."""
    rows = []
    for i in range(n):
        name = ["Anna", "Ben", "Carl"][i % 3]
        rows.append({
            "classification": {"text": f"a good movie {i}" if i % 2 else f"a bad film {i}", "label": ["neg", "pos"][i % 2]},
            "ner": {"tokens": [name, "visited", "Paris", str(i)], "tags": ["B-PER", "O", "B-LOC", "O"]},
            "qa": {"id": str(i), "question": f"Where does {name} live?", "context": f"{name} lives in Paris {i} .",
                   "answers": [{"text": "Paris", "answer_start": len(name) + 10}]},
            "seq2seq": {"source": f"a good movie {i}", "target": f"good {i}"},
            "sft": {"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)},
            "preference": {"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": str(2 * i + 1)},
            "reward": {"prompt": f"Add {i} and {i}.", "chosen": str(2 * i), "rejected": str(2 * i + 1)},
        }[task])
    return rows


def write_gz(path, rows):
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def model_paths():
    from petune_plugins.sources.random_init import RandomInitSource

    return {name: RandomInitSource().resolve(f"random:{name}") for name in set(TINY.values())}


def task_and_options(host, task: str, **values):
    plugin = host.task(task)
    extra = {"sft": {"max_length": 64}, "qa": {"max_length": 32, "doc_stride": 8, "max_question_length": 12},
             "seq2seq": {"max_source_length": 16, "max_target_length": 8},
             "preference": {"max_length": 64, "num_sample_generations": 0}, "reward": {"max_length": 64}}.get(task, {})
    return plugin, plugin.Options.model_validate({**extra, **values})


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # fresh: load_data may change it


@pytest.mark.parametrize("task", list(TINY))
def test_validation_split_zero_with_a_validation_file_means_no_split(task, tmp_path, host, model_paths):
    """Every task reads train as .jsonl.gz and validation as Parquet, and with validation_split = 0
    keeps all training rows and validates on the file; a share above 0 with a file is refused."""
    write_gz(tmp_path / "train.jsonl.gz", records(task, 12))
    write_parquet(tmp_path / "validation.parquet", records(task, 4))
    files = {"train": str(tmp_path / "train.jsonl.gz"), "validation": str(tmp_path / "validation.parquet")}
    plugin, options = task_and_options(host, task, **files, validation_split=0)
    assert options.split_ratio == 0
    data = plugin.load_data(options, tokenizer_of(model_paths[TINY[task]]))
    rows = {"classification": "train_rows", "ner": "train_sentences", "qa": "train_questions",
            "seq2seq": "train_rows"}.get(task)
    if rows is not None:
        assert data.notes[rows] == 12
    else:  # sft: one row per example; preference, reward: one per pair
        assert len(data.train) == 12
    assert data.validation is not None and data.validation.num_rows >= 4
    with pytest.raises(ValidationError, match="either a validation file or validation_split"):
        plugin.Options.model_validate({**files, "validation_split": 0.2})


@pytest.mark.parametrize("task", list(TINY))
def test_task_objects_keep_nothing_between_calls(task, tmp_path, host, model_paths):
    """check() then load_data() on one instance gives what load_data() alone gives on a fresh
    one, and neither check() nor build_model() leaves anything on the instance."""
    write_gz(tmp_path / "train.jsonl.gz", records(task, 12))
    plugin, options = task_and_options(host, task, train=str(tmp_path / "train.jsonl.gz"), validation_split=0.25)
    path = model_paths[TINY[task]]
    info = ModelInfo.from_path(TINY[task], path)
    checked = type(plugin)()
    checked.check(info, options)
    assert vars(checked) == {}
    after_check = checked.load_data(options, tokenizer_of(path))
    fresh = type(plugin)().load_data(options, tokenizer_of(path))
    assert after_check.state == fresh.state and after_check.notes == fresh.notes
    for split in ("train", "validation"):
        assert getattr(after_check, split).to_dict() == getattr(fresh, split).to_dict()
    checked.build_model(info, options, after_check.state)
    assert vars(checked) == {}
