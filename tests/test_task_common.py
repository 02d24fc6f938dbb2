"""What every task shares (petune_plugins/tasks/_common.py): one meaning of the split options, the
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


# -- shared helpers (issue 34): one of each -----------------------------------------------------
class _Tokenizer:
    """Just what ensure_pad_token reads and sets."""

    def __init__(self, vocab, pad=None, eos="</s>", bos="<s>", unk=None):
        self.vocab = dict.fromkeys(vocab, 0)
        self.pad_token, self.eos_token, self.bos_token, self.unk_token = pad, eos, bos, unk

    def get_vocab(self):
        return self.vocab

    def add_special_tokens(self, tokens):
        self.vocab[tokens["pad_token"]] = 0
        self.pad_token = tokens["pad_token"]


def test_one_pad_token_rule_for_encoders_and_causal_lms():
    from petune.errors import Refusal
    from petune_plugins.tasks._common import ensure_pad_token

    own = _Tokenizer(["<s>", "</s>", "[PAD]"], pad="[PAD]")
    assert not ensure_pad_token(own) and own.pad_token == "[PAD]"
    encoder = _Tokenizer(["<s>", "</s>", "<pad>"])
    assert ensure_pad_token(encoder) and encoder.pad_token == "</s>"  # an encoder pads with EOS
    causal = _Tokenizer(["<s>", "</s>", "<pad>"], pad="</s>")
    assert ensure_pad_token(causal, ["</s>", "<s>"], may_add=True) and causal.pad_token == "<pad>"  # apart from stops
    bare = _Tokenizer(["<s>", "</s>"])
    assert ensure_pad_token(bare, ["</s>", "<s>"], may_add=True) and bare.pad_token == "<pad>" and "<pad>" in bare.vocab
    with pytest.raises(Refusal, match="no pad, EOS or UNK"):
        ensure_pad_token(_Tokenizer(["a"], eos=None), ())


def test_evaluating_restores_the_mode_it_found():
    import torch

    from petune_plugins.tasks._common import evaluating, model_device

    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    for start in (True, False):
        model.train(start)
        with pytest.raises(RuntimeError), evaluating(model):
            assert not model.training and not model[0].training
            raise RuntimeError("inside")
        assert model.training is start and model[0].training is start
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters


def test_what_a_task_measured_before_training_has_one_shape():
    from types import SimpleNamespace

    from petune_plugins.tasks._common import StartingPoint, before_training, measure_before_training

    callbacks = []
    trainer = SimpleNamespace(add_callback=callbacks.append)
    assert before_training(trainer) == StartingPoint()  # nothing measured
    measure_before_training(trainer, lambda main: StartingPoint({"validation": {"accuracy": 0.5}}, ["s"] if main else []))
    (callback,) = callbacks
    callback.on_train_begin(None, SimpleNamespace(global_step=3, is_world_process_zero=True), None)  # resumed
    assert before_training(trainer) == StartingPoint()
    callback.on_train_begin(None, SimpleNamespace(global_step=0, is_world_process_zero=True), None)
    assert before_training(trainer) == StartingPoint({"validation": {"accuracy": 0.5}}, ["s"])
