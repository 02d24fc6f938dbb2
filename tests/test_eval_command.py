"""`petune eval RUN` scores a finished run's held-out files without its training file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_recipe

from petune.cli import main
from petune.recipe import load_recipe
from petune.runner import run

CSV = "text,label\n" + "".join(f"a good movie {i},pos\na bad film {i},neg\n" for i in range(8))
CONLL = "".join("John B-PER\nSmith I-PER\nvisited O\nParis B-LOC\n.\tO\n\nAcme B-ORG\nhired O\nMary B-PER\n\n" for _ in range(4))
SFT = "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}) + "\n"
              for i in range(12))
SEQ2SEQ = "".join(json.dumps({"source": f"number {i}", "target": f"nummer {i}"}) + "\n" for i in range(12))
CONTEXT = "the quick brown fox jumps over the lazy dog . mary lives in paris and works for acme ."
QA = "".join(json.dumps({"id": str(i), "question": "where does mary live ?", "context": CONTEXT,
                         "answers": [{"text": "paris", "answer_start": CONTEXT.index("paris")}]}) + "\n"
             for i in range(12))

# task: (model, file suffix, rows, task options, a test metric)
TASKS = {
    "classification": ("random:tiny-bert", "csv", CSV, {}, "accuracy"),
    "ner": ("random:tiny-bert", "conll", CONLL, {}, "f1"),
    "sft": ("random:tiny-llama", "jsonl", SFT, {"max_length": 64}, "loss"),
    "seq2seq": ("random:tiny-llama", "jsonl", SEQ2SEQ, {"max_source_length": 32, "max_target_length": 16,
                                                        "max_new_tokens": 4}, "chrf"),
    "qa": ("random:tiny-bert", "jsonl", QA, {"max_length": 32, "doc_stride": 8, "max_question_length": 12}, "f1"),
}


def train_tiny_run(tmp_path: Path, host, task: str, *, validation_file: bool) -> Path:
    model, suffix, rows, task_options, _ = TASKS[task]
    for name in ("train", "validation", "test"):
        (tmp_path / f"{name}.{suffix}").write_text(rows)
    validation = {"validation": f"validation.{suffix}"} if validation_file else {}
    recipe = write_recipe(tmp_path / "recipe.toml", model=model,
                          task={"name": task, "train": f"train.{suffix}", **validation, "test": f"test.{suffix}",
                                **task_options},
                          strategy={"name": "lora", "r": 4}, train={"learning_rate": 1e-3}, eval={"strategy": "epoch"})
    assert run(load_recipe(recipe, host), host).status == "completed"
    return tmp_path / "run"


@pytest.mark.parametrize("task", list(TASKS))
def test_eval_needs_no_training_file(task, tmp_path, host):
    run_dir = train_tiny_run(tmp_path, host, task, validation_file=True)
    (tmp_path / f"train.{TASKS[task][1]}").rename(tmp_path / "moved")
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval")]) == 0
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    metric = TASKS[task][4]
    assert set(scored) == {"validation", "test"}
    assert scored["test"][metric] == pytest.approx(trained["test"][metric], abs=1e-4)


def test_eval_scores_the_validation_split_while_the_training_file_is_there(tmp_path, host, capsys):
    run_dir = train_tiny_run(tmp_path, host, "classification", validation_file=False)
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval")]) == 0
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == {"validation", "test"}

    (tmp_path / "train.csv").rename(tmp_path / "moved.csv")  # the split cannot be made again: test only, said so
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval2")]) == 0
    assert set(json.loads((tmp_path / "eval2" / "metrics.json").read_text())) == {"test"}
    said = " ".join(capsys.readouterr().err.split())
    assert "split off the training data" in said and "scoring the test data only" in said
    assert "train.csv" in said.replace(" ", "")  # a long temporary path may wrap inside the name


def test_eval_without_training_file_or_test_file_says_which_file_is_missing(tmp_path, host, capsys):
    run_dir = train_tiny_run(tmp_path, host, "classification", validation_file=False)
    (tmp_path / "train.csv").rename(tmp_path / "moved.csv")
    (tmp_path / "test.csv").rename(tmp_path / "moved_test.csv")
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval")]) == 2
    assert "test.csv" in " ".join(capsys.readouterr().err.split())
