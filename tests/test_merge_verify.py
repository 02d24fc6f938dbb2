"""`petune merge` checks what it wrote: the merged folder, loaded by plain transformers,
computes what the run computes; a damaged folder is caught and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_strategy, write_recipe

from petune.cli import main
from petune.recipe import load_recipe
from petune.runner import run

CSV = "text,label\n" + "".join(f"a good movie {i},pos\na bad film {i},neg\n" for i in range(8))
CONLL = "".join("John B-PER\nSmith I-PER\nvisited O\nParis B-LOC\n.\tO\n\n" for _ in range(6))
SFT = "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}) + "\n"
              for i in range(12))

# name: (model, task, data suffix, rows, task options, strategy options)
RUNS = {
    "lora-classification": ("random:tiny-bert", "classification", "csv", CSV, {}, tiny_strategy("lora")),
    "dora-ner": ("random:tiny-bert", "ner", "conll", CONLL, {}, tiny_strategy("lora", use_dora=True)),
    "lora-sft": ("random:tiny-llama", "sft", "jsonl", SFT, {"max_length": 64}, tiny_strategy("lora")),
    "qlora-sft": ("random:tiny-llama", "sft", "jsonl", SFT, {"max_length": 64}, tiny_strategy("qlora")),
    "full-sft": ("random:tiny-llama", "sft", "jsonl", SFT, {"max_length": 64}, tiny_strategy("full")),
    "adapters-classification": ("random:tiny-bert", "classification", "csv", CSV, {}, tiny_strategy("adapters")),
}


def train(folder: Path, host, kind: str) -> Path:
    model, task, suffix, rows, task_options, strategy = RUNS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"train.{suffix}").write_text(rows)
    recipe = write_recipe(folder / "recipe.toml", model=model,
                          task={"name": task, "train": f"train.{suffix}", **task_options}, strategy=strategy,
                          train={"learning_rate": 5e-2})
    assert run(load_recipe(recipe, host), host).status == "completed"
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, host):
    """Each kind of run trained once for the whole module (tiny models, two steps)."""
    trained = {}

    def get(kind: str) -> Path:
        if kind not in trained:
            trained[kind] = train(tmp_path_factory.mktemp(kind), host, kind)
        return trained[kind]

    return get


def said(capsys) -> tuple[str, str]:
    """What was printed, with rich's line wrapping undone."""
    captured = capsys.readouterr()
    return " ".join(captured.out.split()), " ".join(captured.err.split())


@pytest.mark.parametrize("kind", ["lora-classification", "dora-ner", "lora-sft", "qlora-sft", "full-sft"])
def test_merge_is_verified(kind, runs, tmp_path, capsys):
    assert main(["merge", str(runs(kind)), "--out", str(tmp_path / "merged")]) == 0
    printed, notes = said(capsys)
    if kind.startswith("qlora"):  # merged into the trained base dequantised, never into 4-bit weights
        assert "never into 4-bit weights" in notes
    assert "verified: largest logit difference" in printed and "within the float32 tolerance" in printed
    assert "argmax agrees at" in printed
    if kind.endswith("sft"):  # a causal LM: greedy continuations compared too
        assert "greedy continuations equal for 4/4 inputs" in printed
    # the folder needs no petune and no peft
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not any("lora" in key for key in config)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_qlora_merge_computes_what_the_4bit_run_computes(runs, tmp_path, host):
    """The adapter learnt on the 4-bit weights: merged into the dequantised ones, the model
    answers as the run does (``petune generate``); merged into the original checkpoint, it
    would not. The tiny model's weights are random, so NF4's rounding is large here."""
    import torch
    from transformers import AutoModelForCausalLM

    from petune.merge import encode, logits_of
    from petune.run_folders import load_run

    run_dir = runs("qlora-sft")
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    as_trained = load_run(run_dir, host)  # 4-bit, as petune generate loads it
    original = load_run(run_dir, host, quantized=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = encode(as_trained.tokenizer, as_trained.model, "Add 3 and 3.")
    want = logits_of(as_trained.model, batch)["logits"]
    torch.testing.assert_close(logits_of(merged, batch)["logits"], want, rtol=1e-4, atol=1e-4)
    assert (logits_of(original.model, batch)["logits"] - want).abs().max() > 1e-2  # the rounding the adapter saw


def _merged_copy(runs, tmp_path) -> tuple[Path, Path]:
    run_dir = runs("lora-classification")
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    return run_dir, tmp_path / "merged"


def test_corrupted_merge_is_caught(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run_dir, merged = _merged_copy(runs, tmp_path)
    weights = load_file(merged / "model.safetensors")
    damaged = "classifier.weight"  # the trained head (saved through modules_to_save)
    weights[damaged] = weights[damaged] * 1.5 + 0.05
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(merged), "--verify-only"]) == 2
    _, message = said(capsys)
    assert "does not compute what the run computes" in message
    assert damaged in message and "'logits'" in message  # names the output and the weight that differ
    assert main(["merge", str(run_dir), "--out", str(merged), "--verify-only", "--force"]) == 0


def test_lost_head_is_caught(runs, tmp_path, capsys):
    """A classification head missing from the folder would be initialised at random on load."""
    from safetensors.torch import load_file, save_file

    run_dir, merged = _merged_copy(runs, tmp_path)
    weights = load_file(merged / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier")}, merged / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(merged), "--verify-only"]) == 2
    _, message = said(capsys)
    assert "missing from the folder" in message and "classifier.weight" in message


def test_bottleneck_adapters_refused_with_reason(runs, tmp_path, capsys):
    assert main(["merge", str(runs("adapters-classification")), "--out", str(tmp_path / "merged")]) == 2
    assert "non-linear" in said(capsys)[1]
    assert not (tmp_path / "merged").exists()


def test_existing_folder_needs_overwrite(tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")
    assert main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "merged")]) == 2
    assert "--overwrite" in said(capsys)[1]
