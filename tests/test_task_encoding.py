"""The tasks that tokenize through encode_split (issue 27) give the same rows with ``[data] num_proc = 2``
(batches encoded by forked workers) as with one process: same columns, values, order, notes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petune.api import DATA_WORKERS, data_workers
from petune_plugins.tasks import classification, encoding, ner, preference, qa, reward, seq2seq

BATCH = 3  # rows per batch: several batches, and two workers, on a few rows


@pytest.fixture
def calls(monkeypatch):
    """Small batches in every converted task; records (items, workers) of each encode_split call."""
    seen = []

    def small_batches(items, encode, **kwargs):
        seen.append((len(items), data_workers()))
        return encoding.encode_split(items, encode, **{**kwargs, "batch_size": BATCH})

    for module in (classification, ner, preference, qa, reward, seq2seq):
        monkeypatch.setattr(module, "encode_split", small_batches)
    return seen


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(task, options, model_path: Path, workers: int):
    from transformers import AutoTokenizer

    token = DATA_WORKERS.set(workers)  # as petune/datacache.py does around load_data
    try:
        return task.load_data(options, AutoTokenizer.from_pretrained(model_path))  # fresh: load_data may change it
    finally:
        DATA_WORKERS.reset(token)


def same_data(task, options, model_path: Path, calls: list):
    one = load(task, options, model_path, 1)
    calls.clear()
    two = load(task, options, model_path, 2)
    assert any(workers == 2 and items >= 2 * BATCH for items, workers in calls)  # the forked path ran
    for split in ("train", "validation", "test"):
        a, b = getattr(one, split), getattr(two, split)
        assert (a is None) == (b is None), split
        if a is not None:
            assert a.cache_files and b.cache_files  # written to Arrow, read back memory-mapped
            assert a.features == b.features and a.to_list() == b.to_list(), split
    assert one.notes == two.notes and one.state == two.state
    return one


def path_of(name: str) -> Path:
    from petune_plugins.sources.random_init import RandomInitSource

    return RandomInitSource().resolve(f"random:{name}")


def test_classification(tmp_path, calls, tiny_bert_path):
    rows = [{"text": f"a {'good' if i % 2 else 'bad'} movie number {i}" + " indeed" * (i % 7), "text_pair": f"pair {i}",
             "label": "pos" if i % 2 else "neg"} for i in range(24)]
    options = classification.ClassificationOptions(train=write_jsonl(tmp_path / "train.jsonl", rows),
                                                   text_pair_column="text_pair", max_length=16, validation_split=0.25)
    data = same_data(classification.ClassificationTask(), options, tiny_bert_path, calls)
    assert 0 < data.notes["truncated"] < 24 and len(data.train) == 18


def test_ner(tmp_path, calls, tiny_bert_path):
    sentences = ["John B-PER\nSmith I-PER\nlives O\nin O\nNew B-LOC\nYork I-LOC\n. O",
                 "Mary B-PER\nvisited O\nAcme B-ORG\nCorporation I-ORG"]
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(sentences * 4) + "\n")
    options = ner.NerOptions(train=path, validation=path, max_length=8, stride=2, label_all_subtokens=True)
    data = same_data(ner.NerTask(), options, tiny_bert_path, calls)
    assert data.notes["train_split_sentences"] > 0
    assert data.train["sentence_index"] == sorted(data.train["sentence_index"])  # counted in the whole split
    assert max(data.train["sentence_index"]) == data.notes["train_sentences"] - 1


def test_qa(tmp_path, calls, tiny_bert_path):
    rows = []
    for i in range(14):
        context = f"story {i}: " + " ".join(f"word{j}" for j in range(40)) + f" it is in paris{i} now"
        answers = [] if i < 4 else [{"text": f"paris{i}", "answer_start": context.index(f"paris{i}")}]
        rows.append({"id": f"q{i}", "question": f"where is it {i}?", "context": context, "answers": answers})
    # the first batches have no answer (the column's type comes from the whole split), the test file none at all
    options = qa.QaOptions(train=write_jsonl(tmp_path / "train.jsonl", rows), validation_split=0,
                           test=write_jsonl(tmp_path / "test.jsonl", [{**r, "answers": []} for r in rows[:8]]),
                           max_length=40, doc_stride=8, max_question_length=8)
    data = same_data(qa.QaTask(), options, tiny_bert_path, calls)
    assert data.notes["train_windows"] > data.notes["train_questions"] == 14
    assert sorted(set(data.train["example_index"])) == list(range(14))  # counted in the whole split
    assert data.train["answers"][-1] == ["paris13"] and data.test["answers"][0] == []


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_seq2seq(tmp_path, calls, model):
    rows = [{"source": f"the quick brown fox number {i} " * (1 + i % 3), "target": [f"der fuchs {i}", f"ein fuchs {i}"]}
            for i in range(10)]
    options = seq2seq.Seq2SeqOptions(train=write_jsonl(tmp_path / "train.jsonl", rows), validation_split=0.3,
                                     max_source_length=12, train_targets="each")
    data = same_data(seq2seq.Seq2SeqTask(), options, path_of(model), calls)
    assert len(data.train) == 14 and data.notes["train_source_truncated"] > 0


def preference_rows(n: int) -> list[dict]:
    return [{"prompt": f"how was the movie number {i} ?" + " please think" * (i % 4 * 6),
             "chosen": "the movie was good" + " indeed" * (i % 3), "rejected": "the movie was bad"} for i in range(n)]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference(tmp_path, calls, tiny_llama_path, method):
    options = preference.PreferenceOptions(train=write_jsonl(tmp_path / "train.jsonl", preference_rows(16)),
                                           method=method, max_length=48, validation_split=0.5)
    data = same_data(preference.PreferenceTask(), options, tiny_llama_path, calls)
    assert data.notes["train_dropped_cut_to_nothing"] > 0
    if method == "kto":  # held-out pairs become KTO's unpaired rows when its trainer is made
        singles = [run_in(workers, preference._trl_singles, data.validation, 3).to_list() for workers in (1, 2)]
        assert singles[0] == singles[1] and len(singles[0]) == 2 * len(data.validation)


def run_in(workers: int, function, *args):
    token = DATA_WORKERS.set(workers)
    try:
        return function(*args)
    finally:
        DATA_WORKERS.reset(token)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_reward(tmp_path, calls, model):
    options = reward.RewardOptions(train=write_jsonl(tmp_path / "train.jsonl", preference_rows(16)), max_length=48,
                                   validation_split=0.5)
    data = same_data(reward.RewardTask(), options, path_of(model), calls)
    assert data.notes["train_answers_cut"] > 0


def test_an_error_in_a_worker_names_file_and_line(tmp_path, calls, tiny_llama_path, monkeypatch):
    from petune.errors import DataError

    render = preference.PairEncoder.prompt_text

    def refuse_one(self, prompt, where):
        if "number 7 ?" in json.dumps(prompt):
            raise DataError("cannot render this prompt", where=where)
        return render(self, prompt, where)

    monkeypatch.setattr(preference.PairEncoder, "prompt_text", refuse_one)
    path = write_jsonl(tmp_path / "train.jsonl", preference_rows(16))
    with pytest.raises(DataError, match="cannot render") as info:
        load(preference.PreferenceTask(), preference.PreferenceOptions(train=path, validation_split=0), tiny_llama_path, 2)
    assert info.value.where == f"{path}:8" and calls[-1][1] == 2


def _signal_dispositions(items: list) -> tuple[dict, dict]:
    import os
    import signal

    return ({"pid": [os.getpid()] * len(items), "term": [signal.getsignal(signal.SIGTERM) is signal.SIG_DFL] * len(items),
             "int": [signal.getsignal(signal.SIGINT) is signal.SIG_IGN] * len(items)}, {"examples": len(items)})


@pytest.mark.timeout(120)
def test_workers_take_sigterm_whatever_handler_this_process_holds():
    """A training that raised leaves its stop-on-signal handler for SIGTERM in the process (a test
    process, a notebook); forked workers inherited it and could swallow Pool.terminate()'s SIGTERM,
    so the pool's clean-up waited on them forever. Workers end on SIGTERM and leave Ctrl-C to us."""
    import os
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    token = DATA_WORKERS.set(2)
    try:
        dataset, counts = encoding.encode_split(list(range(12)), _signal_dispositions, desc="t", batch_size=3)
    finally:
        DATA_WORKERS.reset(token)
        signal.signal(signal.SIGTERM, previous)
    assert counts == {"examples": 12} and os.getpid() not in dataset["pid"]  # encoded by the workers
    assert all(dataset["term"]) and all(dataset["int"])
