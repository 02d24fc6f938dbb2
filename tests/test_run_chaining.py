"""A run as the next run's base (``model.name = runs/x``) when the next task needs another head
(issue 33, item 11): a reward model (one score) from a classification run (two labels) gets a
new head, with a note saying so, instead of a crash about ``ignore_mismatched_sizes``."""

from __future__ import annotations

import json

from helpers import tiny_classification_recipe, write_recipe

from petune.cli import main

PAIRS = "".join(json.dumps({"prompt": f"question {i} ?", "chosen": f"a good answer {i} .",
                            "rejected": f"bad {i}"}) + "\n" for i in range(8))


def test_a_reward_run_from_a_classification_run_gets_a_new_head(tmp_path, capsys):
    classifier = tmp_path / "cls"
    classifier.mkdir()
    assert main(["run", str(tiny_classification_recipe(classifier, classifier / "run", max_steps=2))]) == 0
    (tmp_path / "pairs.jsonl").write_text(PAIRS)
    recipe = write_recipe(tmp_path / "reward.toml", model=classifier / "run",
                          task={"name": "reward", "train": "pairs.jsonl", "max_length": 32},
                          strategy={"name": "lora", "r": 4}, output=tmp_path / "reward")
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    message = " ".join(capsys.readouterr().err.split())
    assert "a new head is drawn and trained" in message and "2 output(s)" in message
    # the run loads again (the same new-head path, then its trained head from the adapter)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "question 1 ?", "completion": "a good answer 1 ."}) + "\n")
    assert main(["predict", str(tmp_path / "reward"), str(tmp_path / "rows.jsonl")]) == 0  # INPUT, or --input
