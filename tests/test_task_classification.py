"""The classification task: options, readers, label maps, metrics, real data, a short train, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from petune.api import ModelInfo
from petune.errors import DataError
from petune_plugins.tasks import reports
from petune_plugins.tasks._common import find_head_modules, seeded_split
from petune_plugins.tasks.classification import (
    ClassificationOptions,
    ClassificationTask,
    FileSettings,
    read_examples,
    sort_labels,
)

AG_NEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}  # ag_news/classes.txt, 1-based


def options(tmp_path=None, **values) -> ClassificationOptions:
    return ClassificationOptions.model_validate(values, context={"base_dir": tmp_path} if tmp_path else None)


def examples_of(opts: ClassificationOptions, split: str = "train", **kwargs):
    return read_examples(FileSettings.of(opts, getattr(opts, split)), **kwargs)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_path)


@pytest.fixture(scope="module")
def bert_info(tiny_bert_path):
    return ModelInfo.from_path("random:tiny-bert", tiny_bert_path)


SENTIMENT = "".join(f"{text}\t{label}\n" for text, label in [
    ("a good movie", "positive"), ("a bad film", "negative"), ("i loved it", "positive"),
    ("i hated it", "negative"), ("great story", "positive"), ("boring and far too long", "negative"),
] * 4)


# -- options --------------------------------------------------------------------------------
def test_options_paths_resolve_and_files_take_their_own_settings(tmp_path):
    opts = options(tmp_path, train="train.tsv", test={"path": "test.csv", "label_column": 0, "text_column": [1, 2]},
                   delimiter="tab")
    assert opts.train.path == tmp_path / "train.tsv" and opts.delimiter == "\t"
    assert opts.test.label_column == 0 and opts.test.text_column == [1, 2]
    dumped = opts.model_dump(mode="json")
    assert dumped["train"] == str(tmp_path / "train.tsv")  # a plain path stays a plain path in the resolved recipe
    assert dumped["test"] == {"path": str(tmp_path / "test.csv"), "text_column": [1, 2], "label_column": 0}


@pytest.mark.parametrize("values, message", [
    ({"train": "a.csv", "validation": "b.csv", "validation_split": 0.2}, "either a validation file"),
    ({"train": {"path": "a.csv", "label_colum": 0}}, "Extra inputs"),
    ({"train": 3}, "expected a file path"),
    ({"train": "a.csv", "delimiter": "::"}, "one character"),
    ({"train": "a.csv", "validation_split": 1.0}, "less than 1"),
])
def test_bad_options_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        options(**values)


def test_the_task_is_registered(host):
    assert isinstance(host.task("classification"), ClassificationTask)


# -- reading --------------------------------------------------------------------------------
def test_csv_with_header_by_name(tmp_path):
    path = write(tmp_path, "d.csv", "id,review,stars\n1,great,5\n2,poor,1\n")
    got = examples_of(options(train=str(path), text_column="review", label_column="stars"))
    assert [(e.text, e.label) for e in got] == [("great", "5"), ("poor", "1")]
    assert got[1].where == f"{path}:3"


def test_usual_column_names_are_found(tmp_path):
    path = write(tmp_path, "d.tsv", "sentence\tlabel\nfine film \t1\n")
    assert [(e.text, e.label) for e in examples_of(options(train=str(path)))] == [("fine film", "1")]


def test_tsv_without_header_by_position_and_label_first(tmp_path):
    path = write(tmp_path, "d.tsv", "World\tnews of the world\nSports\ta match\n")
    got = examples_of(options(train=str(path), header=False, label_column=0))
    assert [(e.text, e.label) for e in got] == [("news of the world", "World"), ("a match", "Sports")]
    auto = examples_of(options(train=str(write(tmp_path, "t.tsv", SENTIMENT))))  # 2 columns, no header
    assert (auto[0].text, auto[0].label) == ("a good movie", "positive")


def test_jsonl_with_integer_labels_and_pairs(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"premise": "a", "hypothesis": "b", "label": 2}\n'
                                      '{"premise": "c", "hypothesis": "d", "label": 10.0}\n')
    got = examples_of(options(train=str(path), text_column="premise", text_pair_column="hypothesis"))
    assert [(e.text, e.pair, e.label) for e in got] == [("a", "b", "2"), ("c", "d", "10")]
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]  # integers sort as numbers
    assert sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_joined_text_columns_and_label_map(tmp_path):
    path = write(tmp_path, "d.csv", '"3","Title one","Body one"\n"1","Title two","Body two"\n')
    got = examples_of(options(train=str(path), text_column=[1, 2], label_column=0, label_map=AG_NEWS_CLASSES))
    assert [(e.text, e.label) for e in got] == [("Title one Body one", "Business"), ("Title two Body two", "World")]


def test_positions_in_json_records_are_refused(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n')
    with pytest.raises(DataError, match="field names, not positions"):
        examples_of(options(train=str(path), text_column=0))


def test_missing_column_names_file_and_columns(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nx,1\n")
    with pytest.raises(DataError, match="'text': no such column") as err:
        examples_of(options(train=str(path), text_column="text"))
    assert err.value.where == f"{path}:1" and "sentence" in err.value.hint
    records = write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="no field 'label'") as err:
        examples_of(options(train=str(records)))
    assert err.value.where == f"{records}:2"


def test_ambiguous_table_asks_for_columns(tmp_path):
    path = write(tmp_path, "d.csv", "a long text,another text,x\nmore words,still more,y\n")
    with pytest.raises(DataError, match="which column holds the text") as err:
        examples_of(options(train=str(path)))
    assert "text_column" in err.value.hint


def test_empty_label_names_line(tmp_path):
    path = write(tmp_path, "d.tsv", "text\tlabel\na\tx\nb\t \n")
    with pytest.raises(DataError, match="empty label") as err:
        examples_of(options(train=str(path)))
    assert err.value.where == f"{path}:3"


# -- load_data: labels and splits -----------------------------------------------------------
def test_label_map_is_sorted_and_validation_split_is_seeded(tmp_path, bert_tokenizer):
    train = write(tmp_path, "train.tsv", SENTIMENT)
    task = ClassificationTask()
    data = task.load_data(options(train=str(train), validation_split=0.25, split_seed=1), bert_tokenizer)
    assert data.state["labels"] == ["negative", "positive"]
    assert len(data.train) == 18 and len(data.validation) == 6 and data.test is None
    again = task.load_data(options(train=str(train), validation_split=0.25, split_seed=1), bert_tokenizer)
    assert again.validation["input_ids"] == data.validation["input_ids"]
    assert set(data.train[0]) == {"input_ids", "attention_mask", "labels"}
    json.dumps(data.state)  # the runner saves it as task_state.json


def test_a_plain_path_can_replace_a_split(tmp_path, bert_tokenizer):
    """`petune eval --data FILE` puts a plain path where the recipe had a file table."""
    train = write(tmp_path, "train.tsv", SENTIMENT)
    opts = options(train=str(train), test={"path": str(train), "label_column": 1})
    swapped = opts.model_copy(update={"test": write(tmp_path, "other.tsv", "nice\tpositive\nbad\tnegative\n")})
    data = ClassificationTask().load_data(swapped, bert_tokenizer)
    assert data.test["labels"] == [1, 0]


def test_seeded_split():
    kept, held = seeded_split(list(range(100)), 0.1, 7, "x")
    assert len(held) == 10 and sorted(kept + held) == list(range(100)) and kept == sorted(kept)
    assert seeded_split(list(range(100)), 0.1, 7, "x") == (kept, held)
    assert seeded_split([1, 2, 3], 0.0, 7, "x") == ([1, 2, 3], [])
    with pytest.raises(DataError, match="cannot be split"):
        seeded_split([1], 0.5, 7, "only-one.csv")


def test_unseen_labels_name_file_lines_and_labels(tmp_path, bert_tokenizer):
    train = write(tmp_path, "train.tsv", SENTIMENT)
    test = write(tmp_path, "test.tsv", "ok\tpositive\nmeh\tneutral\nhmm\tneutral\nbah\tmixed\n")
    with pytest.raises(DataError, match="not in the training data") as err:
        ClassificationTask().load_data(options(train=str(train), test=str(test)), bert_tokenizer)
    assert err.value.where == str(test)
    assert "'neutral' (line 2, 3)" in err.value.message and "'mixed' (line 4)" in err.value.message
    assert "negative, positive" in err.value.hint


def test_label_column_that_is_text_and_single_class_are_refused(tmp_path, bert_tokenizer):
    texty = write(tmp_path, "t.tsv", "".join(f"label{i}\ttext number {i}\n" for i in range(30)))
    with pytest.raises(DataError, match="looks like text"):
        ClassificationTask().load_data(options(train=str(texty)), bert_tokenizer)
    single = write(tmp_path, "s.tsv", "a\tx\nb\tx\nc\tx\n")
    with pytest.raises(DataError, match="single label"):
        ClassificationTask().load_data(options(train=str(single)), bert_tokenizer)


def test_truncation_is_counted(tmp_path, bert_tokenizer):
    long_text = " ".join(["word"] * 50)
    train = write(tmp_path, "t.tsv", f"{long_text}\tpositive\nshort\tnegative\n" * 3)
    data = ClassificationTask().load_data(options(train=str(train), max_length=16, validation_split=0), bert_tokenizer)
    assert data.notes["truncated"] == 3 and max(len(x) for x in data.train["input_ids"]) == 16


# -- metrics --------------------------------------------------------------------------------
def test_macro_f1_by_hand():
    # class a: P 1/2 R 1/2 F 1/2; class b: P 2/3 R 1 F 4/5; class c: P 0 R 0 F 0; d: absent and never predicted
    report = reports.classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c", "d"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert report["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert report["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 * 0) / 5)
    assert report["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                        "support": 2}
    assert report["confusion_matrix"][0] == [1, 1, 0, 0] and report["confusion_matrix"][2] == [1, 0, 0, 0]


# -- real data ------------------------------------------------------------------------------
def test_sst2(shared_data, bert_tokenizer):
    opts = options(train=str(shared_data / "sst2/train.tsv"), validation=str(shared_data / "sst2/dev.tsv"),
                   max_rows=300)
    data = ClassificationTask().load_data(opts, bert_tokenizer)
    assert data.state["labels"] == ["0", "1"]
    assert len(data.train) == 300 and len(data.validation) == 300


def test_ag_news_both_formats(shared_data, bert_tokenizer):
    """Train on the TSV (text<TAB>class name, no header), test on the CSV ("class index",
    "title", "description"): title + description joined, indices renamed with label_map."""
    opts = options(train=str(shared_data / "ag_news/train_subset10k_alps.tsv"), max_rows=400,
                   test={"path": str(shared_data / "ag_news/test.csv"), "header": False, "text_column": [1, 2],
                         "label_column": 0, "label_map": AG_NEWS_CLASSES})
    data = ClassificationTask().load_data(opts, bert_tokenizer)
    assert data.state["labels"] == ["Business", "Sci/Tech", "Sports", "World"]
    assert data.notes["test_rows"] == 400 and len(data.validation) == 40
    first_test = examples_of(opts, "test", max_rows=1)[0]
    assert first_test.label == "Business" and first_test.text.startswith("Fears for T N pension after talks Unions")

    as_pair = options(train=str(shared_data / "ag_news/test.csv"), header=False, text_column=1, text_pair_column=2,
                      label_column=0, max_rows=200)
    paired = ClassificationTask().load_data(as_pair, bert_tokenizer)
    assert paired.state["labels"] == ["1", "2", "3", "4"] and paired.state["text_pair"]
    sep = bert_tokenizer.sep_token_id
    assert paired.train[0]["input_ids"].count(sep) == 2  # title [SEP] description [SEP]


# -- model, a short train, evaluate, predict ------------------------------------------------
def test_train_evaluate_predict(tmp_path, tiny_bert_path, bert_info, bert_tokenizer):
    train = write(tmp_path, "train.tsv", SENTIMENT)
    test = write(tmp_path, "test.jsonl", '{"text": "a good film", "label": "positive"}\n'
                                         '{"text": "boring", "label": "negative"}\n')
    opts = options(train=str(train), test=str(test), validation_split=0.25, max_length=32)
    task = ClassificationTask()
    task.check(bert_info, opts)
    data = task.load_data(opts, bert_tokenizer)
    model = task.build_model(bert_info, opts, data.state)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert task.head_modules(model) == ["classifier", "bert.pooler.dense"]  # the MLM checkpoint has no pooler

    run_dir = tmp_path / "run"
    args = {"output_dir": str(run_dir / "checkpoints"), "max_steps": 3, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8, "learning_rate": 1e-3, "eval_strategy": "steps", "eval_steps": 3,
            "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0,
            "metric_for_best_model": "eval_accuracy"}
    trainer = task.make_trainer(model=model, tokenizer=bert_tokenizer, data=data, options=opts, args=args, callbacks=[])
    trainer.train()
    metrics = task.evaluate(trainer, data, opts, run_dir)
    assert set(metrics) == {"validation", "test"}
    for split in metrics.values():
        assert {"accuracy", "macro_f1", "loss"} <= set(split) and all(isinstance(v, float) for v in split.values())
        assert 0.0 <= split["accuracy"] <= 1.0
    report = json.loads((run_dir / "reports/classification_report_test.json").read_text())
    assert report["support"] == 2 and set(report["per_class"]) == {"negative", "positive"}
    matrix = json.loads((run_dir / "reports/confusion_matrix_validation.json").read_text())
    assert sum(map(sum, matrix["matrix"])) == 6
    assert "macro avg" in (run_dir / "reports/classification_report_validation.txt").read_text()
    assert (run_dir / "plots/confusion_matrix_test.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run_dir.rglob("*.tmp"))

    rows = task.parse_inputs(opts, "a good movie\n\nboring film\n", "<stdin>")
    assert [r["text"] for r in rows] == ["a good movie", "boring film"]
    predictions = task.predict(model, bert_tokenizer, opts, data.state, rows)
    assert all(p["label"] in ("negative", "positive") for p in predictions)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)
    assert predictions[0]["probability"] == max(predictions[0]["probabilities"].values())
    lines = task.format_predictions(rows, predictions).splitlines()
    assert lines[0] == "text\tlabel\tprobability" and lines[1].startswith("a good movie\t")

    table_rows = task.parse_inputs(opts, "nice one\tpositive\nawful\tnegative\n", "in.tsv")
    assert [(r["text"], r["label"]) for r in table_rows] == [("nice one", "positive"), ("awful", "negative")]
    semicolons = task.parse_inputs(opts, "text;label\nnice, really;positive\nawful;negative\n", "in.csv")
    assert [(r["text"], r["label"]) for r in semicolons] == [("nice, really", "positive"), ("awful", "negative")]
    json_rows = task.parse_inputs(opts, '{"text": "fine"}\n', "in.jsonl")
    assert json_rows[0]["text"] == "fine" and json_rows[0]["label"] is None


def test_decoder_model_head_and_predict(tmp_path, tiny_llama_path):
    """A Llama-style model: its head is `score`, it needs the pad id, and drops token_type_ids."""
    from transformers import AutoTokenizer

    info = ModelInfo.from_path("random:tiny-llama", tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    opts = options(train=str(write(tmp_path, "t.tsv", SENTIMENT)))
    task = ClassificationTask()
    task.check(info, opts)
    data = task.load_data(opts, tokenizer)
    model = task.build_model(info, opts, data.state)
    assert find_head_modules(model) == ["score"] and model.config.pad_token_id == tokenizer.pad_token_id
    rows = task.parse_inputs(opts, "a good movie\ni hated it, the plot was thin and far too long\n", "-")
    predictions = task.predict(model, tokenizer, opts, data.state, rows)
    single = task.predict(model, tokenizer, opts, data.state, rows[1:])
    assert predictions[1]["probability"] == pytest.approx(single[0]["probability"], abs=1e-5)  # padding is harmless


def test_head_modules_make_an_adapter_complete(tmp_path, tiny_bert_path, bert_info, bert_tokenizer):
    """With head_modules as peft's modules_to_save, a saved adapter restores the same model,
    although the head (and tiny BERT's pooler) are drawn at random on every load."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    opts = options(train=str(write(tmp_path, "t.tsv", SENTIMENT)), max_length=16)
    task = ClassificationTask()
    data = task.load_data(opts, bert_tokenizer)
    torch.manual_seed(1)
    model = task.build_model(bert_info, opts, data.state)
    config = LoraConfig(task_type=task.peft_task_type, r=4, target_modules=["query", "value"],
                        modules_to_save=task.head_modules(model))
    model = get_peft_model(model, config)
    model.save_pretrained(tmp_path / "adapter")
    rows = task.parse_inputs(opts, "a good movie\nboring\n", "-")
    before = task.predict(model, bert_tokenizer, opts, data.state, rows)
    torch.manual_seed(2)
    restored = PeftModel.from_pretrained(task.build_model(bert_info, opts, data.state), tmp_path / "adapter")
    after = task.predict(restored, bert_tokenizer, opts, data.state, rows)
    assert [p["probability"] for p in after] == pytest.approx([p["probability"] for p in before], abs=1e-6)
