"""The NER task: CoNLL/JSONL reading, tag schemes, sub-token alignment, windows, strict metrics,
real CoNLL-2003, a short train, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from petune.api import ModelInfo
from petune.errors import DataError
from petune_plugins.tasks.ner import (
    NerOptions,
    NerTask,
    Sentence,
    detect_scheme,
    encode_sentences,
    entities,
    looks_like_conll,
    ner_report,
    normalise,
    parse_tags,
    plan_windows,
    read_conll,
    read_sentences,
    to_iob2,
    words_from_windows,
)

CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Smith NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
New NNP B-NP B-LOC
York NNP I-NP I-LOC
. . O O

Mary NNP B-NP B-PER
visited VBD B-VP O
Paris NNP B-NP B-LOC
for IN B-PP O
Acme NNP B-NP B-ORG
Corporation NNP I-NP I-ORG
"""


def options(**values) -> NerOptions:
    return NerOptions.model_validate(values)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def tags_of(*sequences: str) -> list[list[tuple]]:
    return [parse_tags(Sentence(s.split(), s.split(), "x", line=1)) for s in sequences]


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_path)


def test_the_task_is_registered(host):
    assert isinstance(host.task("ner"), NerTask)
    with pytest.raises(ValidationError, match="either a validation file"):
        options(train="a.txt", validation="b.txt", validation_split=0.1)


# -- reading --------------------------------------------------------------------------------
def test_conll_sentences_docstart_and_lines(tmp_path):
    path = write(tmp_path, "train.txt", CONLL)
    sentences = read_conll(path)
    assert [s.tokens[:2] for s in sentences] == [["John", "Smith"], ["Mary", "visited"]]
    assert sentences[0].tags[:3] == ["B-PER", "I-PER", "O"]
    assert sentences[1].where(2) == f"{path}:13"
    assert len(read_conll(path, max_sentences=1)) == 1


def test_conll_tabs_allow_spaces_in_tokens(tmp_path):
    path = write(tmp_path, "d.conll", "New York\tB-LOC\nis\tO\n\n\nnice\tO\n")
    sentences = read_conll(path)
    assert sentences[0].tokens == ["New York", "is"] and len(sentences) == 2


def test_malformed_conll_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.txt", "John B-PER\nSmith\n")
    with pytest.raises(DataError, match="one column") as err:
        read_conll(path)
    assert err.value.where == f"{path}:2" and "last column" in err.value.hint
    with pytest.raises(DataError, match="empty"):
        read_conll(write(tmp_path, "empty.txt", ""))


def test_jsonl_with_string_and_integer_tags(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"tokens": ["Ann", "ran"], "tags": ["B-PER", "O"]}\n'
                                      '{"tokens": ["Bo"], "ner_tags": [1]}\n')
    with pytest.raises(DataError, match="need their names") as err:
        read_sentences(path, options(train=str(path)))
    assert err.value.where == f"{path}:2"
    sentences = read_sentences(path, options(train=str(path), tag_names=["O", "B-PER", "I-PER"]))
    assert [s.tags for s in sentences] == [["B-PER", "O"], ["B-PER"]]
    mismatch = write(tmp_path, "m.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match="2 tokens but 1 tags") as err:
        read_sentences(mismatch, options(train=str(mismatch)))
    assert err.value.where == f"{mismatch}:1"


# -- tag schemes ----------------------------------------------------------------------------
def test_iob1_to_iob2():
    iob1 = tags_of("I-PER I-PER O I-LOC B-LOC I-LOC I-ORG")
    assert detect_scheme(iob1) == "IOB1"
    assert to_iob2(iob1[0]) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]


def test_bioes_and_bilou_to_iob2():
    bioes = tags_of("S-PER O B-LOC I-LOC E-LOC B-ORG E-ORG S-ORG")
    assert detect_scheme(bioes) == "BIOES"
    assert to_iob2(bioes[0]) == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-ORG", "I-ORG", "B-ORG"]
    bilou = tags_of("U-PER B-LOC L-LOC")
    assert detect_scheme(bilou) == "BIOES" and to_iob2(bilou[0]) == ["B-PER", "B-LOC", "I-LOC"]


def test_iob2_is_detected_and_kept():
    iob2 = tags_of("B-PER I-PER O B-LOC B-LOC", "O O")
    assert detect_scheme(iob2) == "IOB2" and to_iob2(iob2[0]) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]


@pytest.mark.parametrize("scheme, text, line, message", [
    ("IOB2", "a B-PER\nb O\nc I-PER\n", 3, "'I-PER' after 'O'"),
    ("IOB2", "a S-PER\n", 1, "BIOES tag"),
    ("IOB1", "a O\nb B-PER\n", 2, "B- only separates"),
    ("BIOES", "a B-PER\nb O\n", 2, "not closed with E-PER"),
    ("BIOES", "a O\nb E-PER\n", 2, "starts with B- or is S-"),
    ("BIOES", "a B-PER\nb I-PER\n", 2, "ends inside a PER entity"),
])
def test_declared_scheme_is_strict(tmp_path, scheme, text, line, message):
    path = write(tmp_path, "d.txt", text)
    with pytest.raises(DataError, match=message) as err:
        normalise(read_conll(path), scheme)
    assert err.value.where == f"{path}:{line}" and "auto" in err.value.hint


def test_auto_scheme_repairs_and_bad_tags_are_named(tmp_path):
    sentences = read_conll(write(tmp_path, "d.txt", "a I-PER\nb I-PER\nc O\nd I-PER\n"))
    assert normalise(sentences, "auto") == "IOB1"
    assert sentences[0].tags == ["B-PER", "I-PER", "O", "B-PER"]
    path = write(tmp_path, "e.txt", "a O\nb PER\n")
    with pytest.raises(DataError, match="'PER' of token 'b' is not O or B-") as err:
        normalise(read_conll(path), "auto")
    assert err.value.where == f"{path}:2"


def test_entities_from_tags():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]


# -- metrics --------------------------------------------------------------------------------
def test_strict_mode_differs_from_lenient():
    """An entity predicted as I-PER I-PER (no B-) is invalid IOB2: the lenient conlleval-style
    count accepts it as the gold PER span; strict mode does not."""
    from seqeval.metrics import f1_score

    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["I-PER", "I-PER", "O", "B-LOC"]]
    assert f1_score(gold, predicted) == pytest.approx(1.0)  # lenient default
    report = ner_report(gold, predicted)
    # strict: LOC right (1 of 1 predicted entities, 1 of 2 gold) -> P 1, R 1/2, F 2/3
    assert report["precision"] == pytest.approx(1.0) and report["recall"] == pytest.approx(0.5)
    assert report["f1"] == pytest.approx(2 / 3)
    assert report["per_type"]["PER"]["f1"] == 0.0 and report["per_type"]["LOC"]["f1"] == 1.0
    assert report["token_accuracy"] == pytest.approx(3 / 4)


def test_metrics_without_entities():
    report = ner_report([["O", "O"]], [["O", "O"]])
    assert report["f1"] == 0.0 and report["token_accuracy"] == 1.0 and report["per_type"] == {}


# -- sub-tokens and windows -----------------------------------------------------------------
def test_first_subtoken_carries_the_label(bert_tokenizer):
    words = ["john", "neuyork"]  # "neuyork" is several word pieces in the tiny vocabulary
    pieces = bert_tokenizer(words, is_split_into_words=True).word_ids()
    assert pieces.count(1) > 1
    encoded = encode_sentences(bert_tokenizer, [words], 32, 4, tag_ids=[[1, 3]], continue_id={1: 2, 3: 4})
    labels = encoded.columns["labels"][0]
    assert labels == [-100, 1, 3] + [-100] * (pieces.count(1) - 1) + [-100]
    assert encoded.columns["word_index"][0] == [-1, 0, 1] + [-1] * (pieces.count(1) - 1) + [-1]
    every = encode_sentences(bert_tokenizer, [words], 32, 4, tag_ids=[[1, 3]], continue_id={1: 2, 3: 4},
                             label_all_subtokens=True)
    assert every.columns["labels"][0] == [-100, 1, 3] + [4] * (pieces.count(1) - 1) + [-100]  # B -> I


def test_plan_windows():
    assert plan_windows([1] * 5, 10, 2) == [(0, 5)]
    assert plan_windows([1] * 10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert plan_windows([1, 9, 1], 4, 2) == [(0, 1), (1, 2), (2, 3)]  # a word longer than a window stands alone
    assert plan_windows([1] * 6, 4, 10) == [(0, 4), (2, 6)]  # overlap is at most half a window


def test_long_sentence_every_word_scored_once_and_mapped_back(bert_tokenizer):
    words = ("the quick brown fox jumps over the lazy dog and mary visited paris in june " * 4).split()
    tags = [i % 3 for i in range(len(words))]
    encoded = encode_sentences(bert_tokenizer, [words, ["short", "one"]], 16, 3, tag_ids=[tags, [0, 1]],
                               continue_id={0: 0, 1: 2, 2: 2})
    columns = encoded.columns
    assert encoded.stats["split_sentences"] == 1 and encoded.stats["windows"] > 3
    assert max(len(ids) for ids in columns["input_ids"]) <= 16  # never truncated, windowed
    scored = [(s, w) for s, row in zip(columns["sentence_index"], columns["word_index"]) for w in row if w >= 0]
    assert sorted(scored) == [(0, w) for w in range(len(words))] + [(1, 0), (1, 1)]  # each word exactly once
    # predicting the labels back: the windows map back to the original word tags
    predicted, gold = words_from_windows(columns["labels"], columns["sentence_index"], columns["word_index"],
                                         gold=columns["labels"])
    assert predicted == [tags, [0, 1]] and gold == predicted
    # the scoring window is the one where the word is most central
    windows = plan_windows([1] * len(words), 14, 3)
    k = next(k for k, row in enumerate(columns["word_index"]) if 5 in row)
    assert windows[k][0] <= 5 < windows[k][1]


def test_word_the_tokenizer_drops_still_gets_a_tag(bert_tokenizer):
    encoded = encode_sentences(bert_tokenizer, [["john", "\u200b", "smith"]], 32, 4, tag_ids=[[1, 0, 2]],
                               continue_id={0: 0, 1: 2, 2: 2})
    assert encoded.stats["unknown_words"] == 1
    assert encoded.columns["word_index"][0][:4] == [-1, 0, 1, 2]
    assert encoded.columns["input_ids"][0][2] == bert_tokenizer.unk_token_id


# -- load_data ------------------------------------------------------------------------------
def test_load_data_labels_and_unseen_types(tmp_path, bert_tokenizer):
    train = write(tmp_path, "train.txt", CONLL)
    data = NerTask().load_data(options(train=str(train), validation=str(train)), bert_tokenizer)
    assert data.state["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert data.notes["tag_scheme"] == "IOB2" and data.state["max_length"] == 128  # min(256, tiny BERT's 128)
    json.dumps(data.state)
    test = write(tmp_path, "test.txt", "Bob B-PER\n\nUN B-MISC\nsays O\nWHO I-GPE\n")
    with pytest.raises(DataError, match="not in the training data") as err:
        NerTask().load_data(options(train=str(train), test=str(test)), bert_tokenizer)
    assert err.value.where == str(test)
    assert f"'MISC' (first at {test}:3)" in err.value.message and "'GPE'" in err.value.message


def test_conll2003(shared_data, bert_tokenizer):
    opts = options(train=str(shared_data / "conll2003/train.txt"), validation=str(shared_data / "conll2003/valid.txt"),
                   max_sentences=200, max_length=64)
    data = NerTask().load_data(opts, bert_tokenizer)
    assert data.state["labels"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert data.notes["train_sentences"] == 200 and data.notes["tag_scheme"] == "IOB2"
    first = read_conll(shared_data / "conll2003/train.txt", max_sentences=1)[0]
    assert first.tokens[:3] == ["EU", "rejects", "German"] and first.tags[:3] == ["B-ORG", "O", "B-MISC"]
    words = sum(len(s.tokens) for s in read_conll(shared_data / "conll2003/valid.txt", max_sentences=200))
    assert sum(w >= 0 for row in data.validation["word_index"] for w in row) == words


# -- a short train, evaluate, predict -------------------------------------------------------
def test_train_evaluate_predict(tmp_path, tiny_bert_path, bert_tokenizer):
    info = ModelInfo.from_path("random:tiny-bert", tiny_bert_path)
    train = write(tmp_path, "train.txt", CONLL * 4)
    opts = options(train=str(train), validation=str(train), test=str(train), max_length=8, stride=2)
    task = NerTask()
    task.check(info, opts)
    data = task.load_data(opts, bert_tokenizer)
    assert data.notes["validation_split_sentences"] > 0  # windows are exercised in evaluation too
    model = task.build_model(info, opts, data.state)
    assert task.head_modules(model) == ["classifier"] and model.config.num_labels == 7

    run_dir = tmp_path / "run"
    args = {"output_dir": str(run_dir / "checkpoints"), "max_steps": 3, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "learning_rate": 1e-3, "eval_strategy": "steps", "eval_steps": 3,
            "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0,
            "metric_for_best_model": "eval_f1"}
    trainer = task.make_trainer(model=model, tokenizer=bert_tokenizer, data=data, options=opts, args=args, callbacks=[])
    trainer.train()
    eval_metrics = [log for log in trainer.state.log_history if "eval_f1" in log]
    assert eval_metrics and "eval_token_accuracy" in eval_metrics[0]
    metrics = task.evaluate(trainer, data, opts, run_dir)
    assert set(metrics) == {"validation", "test"}
    assert {"precision", "recall", "f1", "token_accuracy", "loss"} <= set(metrics["test"])
    assert metrics["test"]["f1"] == pytest.approx(eval_metrics[-1]["eval_f1"])  # same words, same scores
    report = json.loads((run_dir / "reports/ner_report_test.json").read_text())
    assert report["words"] == 4 * 13 and report["sentences"] == 8 and report["mode"] == "seqeval strict, IOB2"
    assert "micro avg" in (run_dir / "reports/ner_report_validation.txt").read_text()

    rows = task.parse_inputs(opts, "John  Smith visited New York\nMary\n", "<stdin>")
    predictions = task.predict(model, bert_tokenizer, opts, data.state, rows)
    assert predictions[0]["tokens"] == ["John", "Smith", "visited", "New", "York"]
    assert len(predictions[0]["tags"]) == 5 and len(predictions[1]["tags"]) == 1
    for entity in predictions[0]["entities"]:
        assert rows[0].text[entity["char_start"]:entity["char_end"]] == entity["text"]
        assert entity["text"].split() == predictions[0]["tokens"][entity["start"]:entity["end"]]
    text = task.format_predictions(rows, predictions)
    assert text.split("\n\n")[1] == f"Mary\t{predictions[1]['tags'][0]}\n"
    assert text.splitlines()[0].startswith("John\t")


def test_predict_inputs(tmp_path):
    task = NerTask()
    opts = options(train="x.txt")
    conll = task.parse_inputs(opts, "John\nSmith\n\nMary\n", "in.txt")
    assert [s.tokens for s in conll] == [["John", "Smith"], ["Mary"]]
    tagged = task.parse_inputs(opts, CONLL, "in.txt")
    assert [s.tokens[0] for s in tagged] == ["John", "Mary"] and tagged[0].offsets is None
    jsonl = task.parse_inputs(opts, '{"tokens": ["a", "b"]}\n{"text": "c d"}\n', "in.jsonl")
    assert [s.tokens for s in jsonl] == [["a", "b"], ["c", "d"]] and jsonl[1].offsets == [(0, 1), (2, 3)]
    assert looks_like_conll("EU B-ORG\nrejects O\n") and not looks_like_conll("John lives in Paris\nSo do I\n")
