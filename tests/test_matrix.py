"""The five supervised tasks (classification, ner, sft, qa, seq2seq) with each of the five core
strategies (full, lora, qlora, adapters, prompt_tuning), a few steps each on tiny models; refusals
have reasons. Elsewhere: preference and reward by strategy in tests/test_task_preference.py and
tests/test_task_reward.py, the peft strategy's methods in tests/test_peft_methods.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_STRATEGY_OPTIONS, tiny_strategy, write_recipe

from petune.errors import Refusal
from petune.recipe import load_recipe
from petune.runner import run

CSV = "text,label\n" + "".join(f"a good movie {i},pos\na bad film {i},neg\n" for i in range(8))
CONLL = "".join("John B-PER\nSmith I-PER\nvisited O\nParis B-LOC\n.\tO\n\nAcme B-ORG\nhired O\nMary B-PER\n\n" for _ in range(4))
QA = "".join(json.dumps({"question": f"Where does {name} live?", "context": f"{name} lives in {city} .",
                            "answers": [{"text": city, "answer_start": len(name) + 10}]}) + "\n"
             for name, city in [("Anna", "Paris"), ("Ben", "Rome"), ("Carl", "Oslo"), ("Dora", "Lima")] * 3)
PAIRS = "".join(json.dumps({"source": f"a good movie {i}", "target": f"good {i}"}) + "\n" for i in range(8))
SFT = "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}) + "\n" for i in range(12))

TASKS = {
    "classification": ("random:tiny-bert", "data.csv", CSV, {}),
    "ner": ("random:tiny-bert", "data.conll", CONLL, {}),
    "sft": ("random:tiny-llama", "data.jsonl", SFT, {"max_length": 64, "num_sample_generations": 1}),
    "qa": ("random:tiny-bert", "data.jsonl", QA, {"max_length": 32, "doc_stride": 8, "max_question_length": 12}),
    "seq2seq": ("random:tiny-t5", "data.jsonl", PAIRS, {"max_source_length": 16, "max_target_length": 8,
                                                        "max_new_tokens": 4}),
}
STRATEGIES = TINY_STRATEGY_OPTIONS
# Mixes a strategy refuses, with words its reason must contain.
REFUSED = {("prompt_tuning", "ner"): "token classification", ("prompt_tuning", "qa"): "start/end logits",
           ("adapters", "seq2seq"): "encoder-decoder"}
EXPECTED_METRICS = {"classification": {"accuracy", "macro_f1"}, "ner": {"f1", "precision", "recall", "token_accuracy"},
                    "sft": {"loss", "perplexity"}, "qa": {"exact_match", "f1", "loss"},
                    "seq2seq": {"loss", "bleu", "chrf", "rougeL"}}


def matrix_recipe(folder: Path, task: str, strategy: str, *, train=None, eval=None) -> Path:
    """The task's data and a recipe in ``folder``, evaluating on the training file (each epoch, unless ``eval``)."""
    model, data_name, data, task_options = TASKS[task]
    (folder / data_name).write_text(data)
    return write_recipe(folder / "recipe.toml", model=model,
                        task={"name": task, "train": data_name, "validation": data_name, **task_options},
                        strategy=tiny_strategy(strategy), train={"learning_rate": 1e-3, **(train or {})},
                        eval=eval or {"strategy": "epoch"})


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("task", list(TASKS))
def test_task_strategy_mix(task, strategy, tmp_path, host):
    recipe = load_recipe(matrix_recipe(tmp_path, task, strategy), host)
    if (strategy, task) in REFUSED:
        with pytest.raises(Refusal, match=REFUSED[strategy, task]):
            run(recipe, host)
        assert not (tmp_path / "run").exists()
        return
    result = run(recipe, host)
    assert result.status == "completed"
    assert 0 < result.trainable_parameters <= result.total_parameters
    if strategy != "full":
        assert result.trainable_parameters < result.total_parameters / 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert EXPECTED_METRICS[task] <= set(metrics["validation"])
    for name in ("recipe.toml", "manifest.json", "task_state.json", "tokenizer", "plots/loss.png", "log_history.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / ("model" if strategy == "full" else "adapter")).is_dir()


def test_qlora_survives_evaluation_during_training(tmp_path, host):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode; training must go on after it."""
    recipe = matrix_recipe(tmp_path, "classification", "qlora", train={"max_steps": 3, "logging_steps": 1},
                           eval={"strategy": "steps", "steps": 1})
    result = run(load_recipe(recipe, host), host)
    assert result.status == "completed"
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert sum("eval_loss" in h for h in history) >= 3
