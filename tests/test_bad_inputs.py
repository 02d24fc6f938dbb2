"""Bad input never hurts: exit code 2, a message naming the culprit, no traceback, nothing written.

Each case builds a small recipe (tiny random models), breaks one thing, runs the CLI
in-process and checks the exit code, that the message names the key / file / line,
and that the output folder was not created.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest

from petune.cli import main

CLASSIFICATION = """\
[model]
name = "random:tiny-bert"

[task]
name = "classification"
train = "train.csv"
validation = "validation.csv"

[strategy]
name = "lora"
r = 4

[train]
max_steps = 2
batch_size = 2

[output]
dir = "{out}"
"""

NER = """\
[model]
name = "random:tiny-bert"

[task]
name = "ner"
train = "train.conll"
scheme = "{scheme}"

[strategy]
name = "{strategy}"

[train]
max_steps = 2
batch_size = 2

[output]
dir = "{out}"
"""

SFT = """\
[model]
name = "{model}"

[task]
name = "sft"
train = "train.jsonl"
max_length = 64

[strategy]
name = "lora"

[train]
max_steps = 2
batch_size = 2

[output]
dir = "{out}"
"""

GOOD_CSV = "text,label\n" + "".join(f"good movie {i},pos\nbad film {i},neg\n" for i in range(6))
GOOD_CONLL = "John B-PER\nSmith I-PER\nlives O\nin O\nParis B-LOC\n\nMary B-PER\nwent O\nhome O\n\n"
GOOD_SFT = "".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i}"}) + "\n" for i in range(6))


@dataclass
class Case:
    id: str
    recipe: str
    files: dict = field(default_factory=dict)
    args: list = field(default_factory=list)
    expect: list = field(default_factory=list)  # substrings of the error message
    command: str = "run"
    fmt: dict = field(default_factory=dict)


def classification(**files):
    return {"train.csv": GOOD_CSV, "validation.csv": GOOD_CSV, **files}


CASES = [
    Case("malformed-toml", CLASSIFICATION.replace("r = 4", "r = = 4"), classification(),
         expect=["recipe.toml:11:5", "invalid TOML"]),
    Case("unknown-key", CLASSIFICATION.replace("r = 4", "r = 4\nalpah = 8"), classification(),
         expect=["recipe.toml:12", "strategy.alpah: unknown key", "did you mean strategy.alpha?"]),
    Case("wrong-type", CLASSIFICATION.replace("max_steps = 2", 'max_steps = "2"'), classification(),
         expect=["train.max_steps: expected an integer, got '2'"]),
    Case("max-steps-zero", CLASSIFICATION.replace("max_steps = 2", "max_steps = 0"), classification(),
         expect=["train.max_steps", "greater than 0"]),
    Case("negative-learning-rate", CLASSIFICATION.replace("batch_size = 2", "batch_size = 2\nlearning_rate = -0.1"),
         classification(), expect=["train.learning_rate", "greater than 0", "-0.1"]),
    Case("unknown-section", CLASSIFICATION + "\n[trainer]\nepochs = 1\n", classification(),
         expect=["trainer: unknown key", "did you mean train?"]),
    Case("missing-data-file", CLASSIFICATION, {"validation.csv": GOOD_CSV},
         expect=["task.train", "file not found", "train.csv"]),
    Case("empty-data-file", CLASSIFICATION, classification(**{"train.csv": ""}), expect=["train.csv", "empty"]),
    Case("csv-missing-label-column", CLASSIFICATION.replace('train = "train.csv"', 'train = "train.csv"\nlabel_column = "label"'),
         classification(**{"train.csv": "text,sentiment\n" + "good,pos\nbad,neg\n" * 3}),
         expect=["train.csv", "label"]),
    Case("unseen-validation-label", CLASSIFICATION,
         classification(**{"validation.csv": "text,label\ngood,pos\nmeh,neutral\n"}),
         expect=["validation.csv", "neutral"]),
    Case("non-utf8-data", CLASSIFICATION, classification(**{"train.csv": b"text,label\ncaf\xe9 ok,pos\nbad,neg\n"}),
         expect=["train.csv", "UTF-8"]),
    Case("conll-wrong-columns", NER, {"train.conll": "John B-PER\nSmith\nlives O\n\n"},
         fmt={"scheme": "IOB2", "strategy": "lora"}, expect=["train.conll:2"]),
    Case("invalid-tag-sequence", NER, {"train.conll": "John O\nSmith I-PER\n\n" + GOOD_CONLL},
         fmt={"scheme": "IOB2", "strategy": "lora"}, expect=["train.conll:2", "I-PER"]),
    Case("sft-missing-output", SFT, {"train.jsonl": GOOD_SFT + json.dumps({"instruction": "x", "input": ""}) + "\n"},
         fmt={"model": "random:tiny-llama"}, expect=["train.jsonl:7", "output"]),
    Case("sft-empty-assistant-turn", SFT, {"train.jsonl": json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}) + "\n"},
         fmt={"model": "random:tiny-llama"}, expect=["train.jsonl:1", "assistant"]),
    Case("sft-invalid-json-line", SFT, {"train.jsonl": GOOD_SFT + "{not json\n"},
         fmt={"model": "random:tiny-llama"}, expect=["train.jsonl:7"]),
    Case("sft-on-encoder", SFT, {"train.jsonl": GOOD_SFT}, fmt={"model": "random:tiny-bert"},
         expect=["sft"]),
    Case("model-path-missing", CLASSIFICATION.replace("random:tiny-bert", "./no/such/model"), classification(),
         expect=["no/such/model", "not found"]),
    Case("hub-id-not-cached", CLASSIFICATION.replace("random:tiny-bert", "someone/not-cached-model"), classification(),
         expect=["someone/not-cached-model"]),
    Case("unknown-strategy", CLASSIFICATION.replace('name = "lora"', 'name = "lorra"'), classification(),
         expect=["strategy.name: unknown strategy 'lorra'", "did you mean 'lora'"]),
    Case("unknown-task", CLASSIFICATION.replace('name = "classification"', 'name = "clasification"'), classification(),
         expect=["task.name: unknown task 'clasification'"]),
    Case("incompatible-mix", NER.replace("\n[train]", "\nmethod = \"prompt\"\n\n[train]"), {"train.conll": GOOD_CONLL},
         fmt={"scheme": "IOB2", "strategy": "prompt_tuning"}, expect=["prompt", "token classification"]),
    Case("batch-larger-than-dataset", CLASSIFICATION.replace("batch_size = 2", "batch_size = 64"), classification(),
         expect=["train.batch_size", "larger than the training set"]),
    Case("read-only-output", CLASSIFICATION.replace("{out}", "/proc/petune-run"), classification(),
         expect=["/proc/petune-run", "cannot write"]),
    Case("eval-steps-missing", CLASSIFICATION + '\n[eval]\nstrategy = "steps"\n', classification(),
         expect=["eval: strategy = 'steps' needs eval.steps"]),
    Case("bad-set-syntax", CLASSIFICATION, classification(), args=["--set", "learning_rate"],
         expect=["--set 'learning_rate'", "section.key=value"]),
    Case("set-unknown-key", CLASSIFICATION, classification(), args=["--set", "train.lr=1e-4"],
         expect=["train.lr: unknown key", "(--set)"]),
    Case("resume-nothing", CLASSIFICATION, classification(), args=["--resume"], expect=["nothing to resume"]),
    Case("validate-unknown-key", CLASSIFICATION.replace("max_steps = 2", "max_step = 2"), classification(),
         command="validate", expect=["train.max_step: unknown key", "did you mean train.max_steps?"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    for name, content in case.files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    text = case.recipe.replace("{out}", str(out))
    for key, value in case.fmt.items():
        text = text.replace("{" + key + "}", value)
    (tmp_path / "recipe.toml").write_text(text)

    code = main([case.command, str(tmp_path / "recipe.toml"), *case.args])
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert code == 2, message
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in:\n{message}"
    assert "Traceback" not in message
    assert not out.exists(), f"partial artifacts written: {list(out.rglob('*'))}"
    assert not list(tmp_path.glob(".*.tmp*"))


def test_there_are_at_least_25_cases():
    assert len({c.id for c in CASES}) >= 25


def test_existing_output_folder_is_never_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, content in classification().items():
        (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (tmp_path / "recipe.toml").write_text(CLASSIFICATION.replace("{out}", str(out)))
    assert main(["run", str(tmp_path / "recipe.toml")]) == 2
    assert "output folder already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_predict_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--input", os.devnull]) == 2
    assert "not a finished petune run" in capsys.readouterr().err


def test_predict_input_is_checked_before_the_run_loads(tmp_path, capsys, monkeypatch):
    from petune import commands

    monkeypatch.setattr(commands, "_load", lambda *_: pytest.fail("the run loaded before its input was read"))
    assert main(["predict", str(tmp_path), str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), os.devnull, "--input", str(tmp_path / "b.csv")]) == 2
    assert "two inputs" in capsys.readouterr().err
