"""Multi-process training through accelerate (gloo on the CPU) and the [distributed] section."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, petune, tiny_classification_recipe


def losses(run_dir):
    return [(h["step"], h["loss"]) for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    for folder in (single, double):
        folder.mkdir()
    # in order, both see the same examples in each optimizer step (the base model's own dropout
    # still draws different masks per process, hence a tolerance rather than equality)
    same = ["--set", "train.shuffle=false", "--set", "strategy.dropout=0.0", "--set", "train.logging_steps=1"]
    one = petune("run", tiny_classification_recipe(single, single / "run", max_steps=10, save_steps=5),
                 "--set", "train.batch_size=8", *same)
    assert one.returncode == 0, one.stderr[-3000:]
    two = petune("run", tiny_classification_recipe(double, double / "run", max_steps=10, save_steps=5),
                 "--set", "train.batch_size=4", *same, "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and "= 8 per step" in two.stderr  # effective batch in the plan
    assert two.stderr.count("Plan") == 1  # only the main process prints

    run = double / "run"
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]

    a, b = losses(single / "run"), losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 10
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=0.02)
    assert sum(lb for _, lb in b) / len(b) == pytest.approx(sum(la for _, la in a) / len(a), rel=0.005)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "distributed").glob("*.toml")), ids=lambda p: p.name)
def test_multi_gpu_example_recipes_validate(recipe):
    result = petune("validate", recipe)
    assert result.returncode == 0, result.stderr


def test_distributed_section_is_validated(tmp_path):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    bad = petune("validate", recipe, "--set", "distributed.backend=fsdpp")
    assert bad.returncode == 2 and "distributed.backend" in bad.stderr and "'fsdp'" in bad.stderr
    mismatch = petune("validate", recipe, "--set", "distributed.deepspeed.zero_stage=3")
    assert mismatch.returncode == 2 and "needs backend = 'deepspeed'" in mismatch.stderr
    typo = petune("validate", recipe, "--set", "distributed.backend=fsdp", "--set", "distributed.fsdp.cpu_ofload=true")
    assert typo.returncode == 2 and "distributed.fsdp.cpu_ofload: unknown key — did you mean distributed.fsdp.cpu_offload?" in typo.stderr


def test_qlora_with_fsdp_needs_quant_storage(tmp_path):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    refused = petune("validate", recipe, "--set", "strategy.name=qlora", "--set", "distributed.backend=fsdp")
    assert refused.returncode == 2 and "quant_storage" in refused.stderr
    ok = petune("validate", recipe, "--set", "strategy.name=qlora", "--set", "distributed.backend=fsdp",
                "--set", "strategy.quant_storage=bfloat16", "--set", "strategy.compute_dtype=bfloat16")
    assert ok.returncode == 0, ok.stderr
