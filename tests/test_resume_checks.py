"""``--resume`` continues on the data the checkpoint was trained on (issue 33, item 5): a changed
training file, task option or tokenizer is exit 2 naming it, unless ``--accept-changed-data``;
a run folder moved with its data (same bytes elsewhere) resumes."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import tiny_classification_recipe

from petune import artifacts
from petune.cli import main


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 4-step run cut back to its step-2 checkpoint, as if killed after it."""
    folder = tmp_path_factory.mktemp("interrupted")
    recipe = tiny_classification_recipe(folder, folder / "run", max_steps=4, save_steps=2)
    assert main(["run", str(recipe)]) == 0
    run_dir = folder / "run"
    for gone in ("adapter", "checkpoints/checkpoint-4", "metrics.json"):
        path = run_dir / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["options"]["train"]["sha256"]  # what the run was prepared from
    artifacts.write_json(run_dir / "manifest.json", {**manifest, "status": "failed"})
    return folder


def copy(interrupted, tmp_path):
    shutil.copytree(interrupted, tmp_path / "copy")
    recipe = tmp_path / "copy" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(str(interrupted), str(tmp_path / "copy")))
    return recipe


def said(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_resume_refuses_changed_training_data_unless_asked(interrupted, tmp_path, capsys):
    recipe = copy(interrupted, tmp_path)
    train = recipe.parent / "train.csv"
    train.write_text(train.read_text().replace("good", "great"))
    before = (recipe.parent / "run" / "manifest.json").read_text()
    assert main(["run", str(recipe), "--resume"]) == 2
    message = said(capsys)
    assert "task.train: the data changed" in message and "train.csv" in message
    assert "--accept-changed-data" in message
    assert (recipe.parent / "run" / "manifest.json").read_text() == before  # nothing trained, nothing written
    assert main(["run", str(recipe), "--resume", "--accept-changed-data"]) == 0
    assert json.loads((recipe.parent / "run" / "manifest.json").read_text())["status"] == "completed"


def test_resume_refuses_a_changed_task_option(interrupted, tmp_path, capsys):
    recipe = copy(interrupted, tmp_path)
    assert main(["run", str(recipe), "--resume", "--set", "task.max_length=24"]) == 2
    assert "task.max_length: 32 then, 24 now" in said(capsys)


def test_resume_of_a_moved_run_with_the_same_data_goes_on(interrupted, tmp_path, capsys):
    recipe = copy(interrupted, tmp_path)  # every path differs, every byte is the same
    assert main(["run", str(recipe), "--resume"]) == 0
    assert "resuming from" in said(capsys)


def test_accept_changed_data_goes_with_resume(interrupted, tmp_path, capsys):
    assert main(["run", str(copy(interrupted, tmp_path)), "--accept-changed-data"]) == 2
    assert "goes with --resume" in said(capsys)
