"""One seed makes a run reproducible: bit-identical adapter weights and the same metrics on CPU."""

from __future__ import annotations

import json

import torch
from helpers import adapter_tensors, petune, tiny_classification_recipe


def test_same_seed_same_adapter_and_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        recipe = tiny_classification_recipe(folder, folder / "run", max_steps=12, save_steps=100)
        result = petune("run", recipe, "--set", "strategy.dropout=0.1", "--set", "eval.strategy='steps'",
                        "--set", "eval.steps=6")
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(folder / "run")
    a, b = (adapter_tensors(r) for r in runs)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((runs[0] / "metrics.json").read_text()) == json.loads((runs[1] / "metrics.json").read_text())
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["seed"] == 7 and "git_commit" in manifest and manifest["command"]
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])


def test_a_different_seed_changes_the_adapter(tmp_path):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run", max_steps=3, save_steps=100)
    first = petune("run", recipe)
    assert first.returncode == 0, first.stderr[-2000:]
    a = adapter_tensors(tmp_path / "run")
    second = petune("run", recipe, "--overwrite", "--set", "train.seed=8")
    assert second.returncode == 0, second.stderr[-2000:]
    b = adapter_tensors(tmp_path / "run")
    assert any(not torch.equal(a[k], b[k]) for k in a)
