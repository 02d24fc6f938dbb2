"""Checkpoints and resume: a run killed with SIGKILL resumes to the same result; Ctrl-C checkpoints."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from helpers import adapter_tensors, petune, start_petune, tiny_classification_recipe

from petune import checkpoints


def wait_for_checkpoint(proc, run_dir, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(checkpoints.is_valid(p) for p in (run_dir / "checkpoints").glob("checkpoint-*")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with the same seed."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = tiny_classification_recipe(folder, folder / "run", max_steps=60, save_steps=10)
    result = petune("run", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    recipe = tiny_classification_recipe(tmp_path, run_dir, max_steps=60, save_steps=10)
    proc = start_petune("run", recipe)
    wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "adapter").exists()
    # a half-written checkpoint from the crash must be skipped, not trusted
    broken = run_dir / "checkpoints" / "checkpoint-999"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{ half written")

    again = petune("run", recipe)  # no --resume: refuse to touch the folder
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = petune("run", recipe, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping incomplete or corrupt checkpoint" in resumed.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"]
    steps = [h["step"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]
    assert steps[-1] == 60

    mine, theirs = adapter_tensors(run_dir), adapter_tensors(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_classification_recipe(tmp_path, run_dir, max_steps=100000, save_steps=20)
    proc = start_petune("run", recipe)
    wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    newest = checkpoints.newest_valid(run_dir)
    assert newest is not None
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["global_step"] == int(newest.name.split("-")[1]) > 0


def test_resume_without_a_run_is_an_error(tmp_path):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "nothing-here")
    result = petune("run", recipe, "--resume")
    assert result.returncode == 2 and "nothing to resume" in result.stderr
