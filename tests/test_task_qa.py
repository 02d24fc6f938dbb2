"""The qa task: SQuAD answer normalisation and EM/F1 by hand, SQuAD v1.1/v2 and JSONL reading,
windows with offset mappings (an answer crossing a window boundary), n-best post-processing
and the no-answer threshold, every strategy through the runner, predict on a finished run,
and real SQuAD / XQuAD rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_strategy, write_recipe

from petune.errors import DataError, Refusal
from petune_plugins.tasks import text_metrics
from petune_plugins.tasks.qa import (
    QaExample,
    QaOptions,
    QaTask,
    ReadStats,
    make_windows,
    parse_examples,
    postprocess,
    read_examples,
)


@pytest.fixture
def bert_tokenizer(tiny_bert_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_path)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- SQuAD normalisation, EM and F1 (hand-computed) -------------------------------------------
@pytest.mark.parametrize("text, normal", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an apple, a day!  ", "apple day"),
    ("Theatre (the) and THE end.", "theatre and end"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("rock-'n'-roll", "rocknroll"),
    ("", ""),
])
def test_official_normalisation(text, normal):
    assert text_metrics.normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    assert text_metrics.squad_scores("Paris.", ["paris"]) == (1.0, 1.0)
    # prediction [big, red, dog] vs gold [red, dog, barked]: 2 shared, P = R = 2/3
    em, f1 = text_metrics.squad_scores("the big red dog", ["red dog barked"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)
    # max over gold answers: the second gold [big, red, dog, runs] gives P 1, R 3/4, F1 6/7
    em, f1 = text_metrics.squad_scores("the big red dog", ["red dog barked", "a big red dog runs"])
    assert em == 0.0 and f1 == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: [a... ] -> [dog, dog] vs [dog]: P 1/2, R 1
    assert text_metrics.token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert text_metrics.squad_scores("", []) == (1.0, 1.0)  # SQuAD v2: right "no answer"
    assert text_metrics.squad_scores("paris", []) == (0.0, 0.0)
    assert text_metrics.squad_scores("", ["paris"]) == (0.0, 0.0)


def test_metrics_over_questions_with_unanswerable_ones():
    metrics = text_metrics.squad_metrics(["paris", "the big red dog", "", "x"],
                                         [["Paris"], ["red dog barked"], [], []])
    assert metrics["exact_match"] == pytest.approx(100 * 2 / 4)
    assert metrics["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert metrics["has_answer_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics["no_answer_exact_match"] == pytest.approx(50.0)
    assert "has_answer_f1" not in text_metrics.squad_metrics(["a"], [["a"]])


# -- reading ----------------------------------------------------------------------------------
SQUAD_V2 = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
    "context": "Mary lives in Paris. John lives in Rome.",
    "qas": [{"id": "q1", "question": "Where does Mary live?", "answers": [{"text": "Paris", "answer_start": 14}],
             "is_impossible": False},
            {"id": "q2", "question": "Where does Anna live?", "answers": [], "is_impossible": True,
             "plausible_answers": [{"text": "Rome", "answer_start": 35}]},
            {"id": "q3", "question": "Where does John live?", "answers": [{"text": "Rome", "answer_start": 33}]}]}]}]}


def test_squad_json_with_unanswerable_questions_and_a_repaired_start(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD_V2, indent=1))
    examples, stats = read_examples(path)
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    assert examples[0].answers == [("Paris", 14)] and examples[1].answers == []
    assert examples[2].answers == [("Rome", 35)] and stats.repaired == 1  # 33 was off by two
    assert examples[2].where.startswith(f"{path}:")


def test_records_layouts_and_bad_answers(tmp_path):
    rows = [{"question": "q?", "context": "abc Paris def", "answers": {"text": ["Paris"], "answer_start": [4]}},
            {"question": "q?", "context": "abc Paris def", "answers": ["Paris"], "id": "x"},
            {"question": "q?", "context": "abc Paris def", "answers": []}]
    examples = parse_examples("".join(json.dumps(r) + "\n" for r in rows), "d.jsonl", ReadStats())
    assert [e.answers for e in examples] == [[("Paris", 4)], [("Paris", 4)], []]
    assert examples[1].id == "x" and examples[0].where == "d.jsonl:1"
    as_list = parse_examples(json.dumps(rows), "d.json", ReadStats())
    assert len(as_list) == 3
    with pytest.raises(DataError, match="'Rome' does not occur in its context") as info:
        parse_examples(json.dumps({"question": "q", "context": "abc", "answers": [{"text": "Rome", "answer_start": 0}]}),
                       "e.jsonl", ReadStats())
    assert info.value.where == "e.jsonl:1"
    with pytest.raises(DataError, match="missing 'context'"):
        parse_examples(json.dumps({"question": "q", "answers": []}), "e.jsonl", ReadStats())


# -- windows ----------------------------------------------------------------------------------
def long_context(answer_at_word: int, words: int = 60) -> tuple[str, str]:
    filler = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    tokens = [filler[i % len(filler)] for i in range(words)]
    tokens[answer_at_word:answer_at_word + 3] = ["new", "york", "corporation"]
    return " ".join(tokens[:words]), "new york corporation"


def test_answer_crossing_a_window_boundary(bert_tokenizer):
    question = "where does john smith work ?"
    q_len = len(bert_tokenizer(question, add_special_tokens=False)["input_ids"])
    max_length, stride = 32, 8
    room = max_length - q_len - 3  # [CLS] q [SEP] context [SEP]
    context, answer = long_context(answer_at_word=room - 1)  # "new" ends window 1, "york ..." spills over
    example = QaExample("a", question, context, [(answer, context.index(answer))])
    windows = make_windows(bert_tokenizer, [example], max_length=max_length, doc_stride=stride,
                           max_question_length=16).columns
    assert len(windows["input_ids"]) >= 2 and set(windows["example_index"]) == {0}
    first = windows["offset_mapping"][0]
    held = [w for w in range(len(windows["input_ids"])) if windows["start_positions"][w] != windows["cls_index"][w]]
    # the first window holds only part of the answer: labelled "not here" (CLS), never a cut span
    assert windows["start_positions"][0] == windows["end_positions"][0] == windows["cls_index"][0] == 0
    assert max(end for _, end in first) < context.index(answer) + len(answer)
    assert held and held[0] >= 1
    for w in held:
        s, e = windows["start_positions"][w], windows["end_positions"][w]
        offsets = windows["offset_mapping"][w]
        assert context[offsets[s][0]:offsets[e][1]] == answer  # the span maps back to the exact characters

    # post-processing: logits favour the answer in the window that holds it, a decoy in window 0
    n = len(windows["input_ids"])
    starts = [[0.0] * len(windows["input_ids"][w]) for w in range(n)]
    ends = [[0.0] * len(windows["input_ids"][w]) for w in range(n)]
    w = held[0]
    starts[w][windows["start_positions"][w]] = ends[w][windows["end_positions"][w]] = 5.0
    decoy = next(k for k, (a, _) in enumerate(first) if a >= 0)
    starts[0][decoy] = ends[0][decoy] = 3.0
    [prediction] = postprocess(windows, starts, ends, n_best=5, max_answer_length=10)
    assert prediction["answer"] == answer and context[prediction["start"]:prediction["end"]] == answer
    assert 0 < prediction["score"] <= 1


def test_answers_no_window_can_hold_are_counted(bert_tokenizer):
    context = " ".join(["word"] * 20 + ["the"] * 40 + ["end"])
    answer = " ".join(["the"] * 40)
    example = QaExample("a", "what ?", context, [(answer, context.index(answer))])
    stats = make_windows(bert_tokenizer, [example], max_length=32, doc_stride=8, max_question_length=8,
                         max_answer_length=30).stats
    assert stats["answers_in_no_window"] == 1 and stats["windows"] > 1


def test_long_questions_are_cut_and_counted(bert_tokenizer):
    example = QaExample("a", "what is the capital of france ? " * 10, "the capital of france is paris .",
                        [("paris", 25)])
    windows = make_windows(bert_tokenizer, [example], max_length=32, doc_stride=4, max_question_length=6)
    assert windows.stats["questions_cut"] == 1
    assert windows.columns["start_positions"][0] != 0  # the answer still fits


def test_postprocess_limits_and_no_answer_threshold():
    windows = {"example_index": [0], "offset_mapping": [[[-1, -1], [0, 4], [5, 9], [10, 14], [-1, -1]]],
               "cls_index": [0], "example_id": ["q"], "context": ["abcd efgh ijkl"]}
    starts, ends = [[1.0, 4.0, 0.0, 0.0, 9.0]], [[1.0, 0.0, 0.0, 4.0, 9.0]]  # the [SEP] position never counts
    [p] = postprocess(windows, starts, ends, n_best=5, max_answer_length=3)
    assert p["answer"] == "abcd efgh ijkl" and (p["start"], p["end"]) == (0, 14)
    [p] = postprocess(windows, starts, ends, n_best=5, max_answer_length=2)  # 3 tokens are too long now
    assert p["answer"] in ("abcd", "ijkl", "abcd efgh", "efgh ijkl")
    # no-answer: null score 2 vs best span 8 -> answer; a threshold below -6 flips it to ""
    [p] = postprocess(windows, starts, ends, max_answer_length=3, no_answer=True)
    assert p["answer"] == "abcd efgh ijkl" and p["null_score"] == 2.0
    [p] = postprocess(windows, starts, ends, max_answer_length=3, no_answer=True, null_score_diff_threshold=-7.0)
    assert p["answer"] == "" and p["start"] is None


# -- the task ---------------------------------------------------------------------------------
def profile_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        city = ["paris", "london", "new york"][i % 3]
        name = ["john smith", "mary"][i % 2]
        context = f"the quick brown fox jumps over the lazy dog . {name} lives in {city} and works for acme corporation ."
        rows.append({"id": str(i), "question": f"where does {name} live ?", "context": context,
                     "answers": [{"text": city, "answer_start": context.index(city)}]})
    return rows


REFUSED = {"prompt_tuning": "start/end logits"}


def qa_recipe(tmp_path: Path, strategy: str, model: str = "random:tiny-bert", steps: int = 2) -> Path:
    write_jsonl(tmp_path / "train.jsonl", profile_rows(24))
    if strategy == "prefix_tuning":  # the prompt_tuning strategy's prefix method
        options = {"name": "prompt_tuning", "method": "prefix", "num_virtual_tokens": 4}
    else:
        options = tiny_strategy(strategy)
    return write_recipe(tmp_path / "recipe.toml", model=model,
                        task={"name": "qa", "train": "train.jsonl", "validation_split": 0.25, "test": "train.jsonl",
                              "max_length": 32, "doc_stride": 8, "max_question_length": 12},
                        strategy=options, train={"max_steps": steps, "batch_size": 4, "learning_rate": 1e-3},
                        eval={"strategy": "epoch"})


@pytest.mark.parametrize("strategy", ["lora", "prefix_tuning"])  # every strategy: tests/test_matrix.py
def test_every_strategy_trains_and_scores(strategy, tmp_path, host):
    from petune.recipe import load_recipe
    from petune.run_folders import load_run
    from petune.runner import run

    recipe = load_recipe(qa_recipe(tmp_path, strategy), host)
    if strategy in REFUSED:
        with pytest.raises(Refusal, match=REFUSED[strategy]):
            run(recipe, host)
        return
    result = run(recipe, host)
    assert result.status == "completed"
    if strategy != "full":
        assert 0 < result.trainable_parameters < result.total_parameters / 2
    for split in ("validation", "test"):
        assert {"exact_match", "f1", "loss", "questions", "windows"} <= set(result.metrics[split])
    assert result.metrics["test"]["questions"] == 24
    rows = [json.loads(line) for line in (tmp_path / "run" / "reports" / "qa_predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"id", "question", "answers", "prediction", "start", "end", "score", "f1"} <= set(rows[0])
    assert len(json.loads((tmp_path / "run" / "reports" / "predictions_test.json").read_text())) == 24
    loaded = load_run(tmp_path / "run", host)  # the head (and adapters) come back with the run
    assert loaded.task.name == "qa"


def test_training_learns_and_predict_returns_offsets(tmp_path, host):
    from petune import run_folders, runner
    from petune.recipe import load_recipe

    result = runner.run(load_recipe(qa_recipe(tmp_path, "full", steps=60), host), host)
    assert result.metrics["test"]["exact_match"] > 60  # the tiny model learns where the city is
    loaded = run_folders.load_run(tmp_path / "run", host)
    task = loaded.task
    text = "\n".join(json.dumps({"question": r["question"], "context": r["context"]}) for r in profile_rows(3))
    rows = task.parse_inputs(loaded.recipe.task, text, "in.jsonl")
    predictions = task.predict(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state, rows)
    for row, p in zip(rows, predictions):
        assert set(p) == {"answer", "score", "start", "end"} and 0 <= p["score"] <= 1
        assert row.context[p["start"]:p["end"]] == p["answer"]
    lines = [json.loads(line) for line in task.format_predictions(rows, predictions).splitlines()]
    assert lines[0]["where"] == "in.jsonl:1" and lines[0]["answer"] == predictions[0]["answer"]
    assert sum(p["answer"] == r["answers"][0]["text"] for p, r in zip(predictions, profile_rows(3))) >= 2


def test_decoder_models_get_their_pretrained_body(tiny_llama_path, tmp_path):
    """transformers leaves LlamaForQuestionAnswering's body random when loading a causal-LM
    checkpoint (its weights sit under another prefix); build_model puts them in."""
    from transformers import AutoModelForCausalLM

    from petune.api import ModelInfo

    model = QaTask().build_model(ModelInfo.from_path("llama", tiny_llama_path), QaOptions(train="x.jsonl"), {})
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert torch.equal(model.transformer.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert QaTask().head_modules(model) == ["qa_outputs"]


def test_check_refuses_models_without_a_span_head_and_bad_windows(tmp_path, tiny_bert_path, bert_tokenizer):
    from transformers import Gemma3TextConfig

    from petune.api import ModelInfo

    write_jsonl(tmp_path / "t.jsonl", profile_rows(2))
    options = QaOptions(train=tmp_path / "t.jsonl")
    gemma = ModelInfo("gemma", tmp_path, Gemma3TextConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8))
    with pytest.raises(Refusal, match="no question-answering head"):
        QaTask().check(gemma, options)
    with pytest.raises(Refusal, match="more than the model takes"):
        QaTask().check(ModelInfo.from_path("bert", tiny_bert_path), QaOptions(train=tmp_path / "t.jsonl", max_length=512))
    with pytest.raises(DataError, match="file not found"):
        QaTask().check(ModelInfo.from_path("bert", tiny_bert_path), QaOptions(train=tmp_path / "nope.json"))
    task = QaTask()
    task.check(ModelInfo.from_path("bert", tiny_bert_path), options)
    with pytest.raises(Refusal, match="windows would not advance"):
        task.settings(QaOptions(train=tmp_path / "t.jsonl", max_length=64, max_question_length=32, doc_stride=40),
                      bert_tokenizer)


# -- real data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", ["squad/train-v1.1.first11articles.json", "xquad/xquad.en.json"])
def test_real_squad_rows_map_every_answer(shared_data, relative, bert_tokenizer, tiny_bert_path):
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} not in shared data")
    examples, _ = read_examples(path, max_rows=300)
    assert len(examples) == 300 and all(e.answers for e in examples)
    assert all(e.context[s:s + len(t)] == t for e in examples for t, s in e.answers)
    windows = make_windows(bert_tokenizer, examples, max_length=128, doc_stride=32, max_question_length=32)
    cols = windows.columns
    assert windows.stats["windows"] > 300  # long contexts need several windows
    for w in range(len(cols["input_ids"])):
        s, e = cols["start_positions"][w], cols["end_positions"][w]
        if s == cols["cls_index"][w]:
            continue
        example = examples[cols["example_index"][w]]
        text, start = example.answers[0]
        offsets = cols["offset_mapping"][w]
        # the labelled tokens cover the answer exactly (the tiny tokenizer lower-cases; offsets are raw)
        assert offsets[s][0] <= start and offsets[e][1] >= start + len(text)
        assert example.context[offsets[s][0]:offsets[e][1]].strip().startswith(text.split()[0][:1])
    held = {cols["example_index"][w] for w in range(len(cols["input_ids"])) if cols["start_positions"][w] != cols["cls_index"][w]}
    assert len(held) + windows.stats["answers_in_no_window"] == 300
