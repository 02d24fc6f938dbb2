"""train.report_to passes experiment trackers through to the trainer; tensorboard logs land in the run."""

from __future__ import annotations

from helpers import petune, tiny_classification_recipe


def test_tensorboard_event_file_holds_the_training_loss(tmp_path):
    import tensorboard  # noqa: F401
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run", max_steps=6, save_steps=100)
    result = petune("run", recipe, "--set", 'train.report_to=["tensorboard"]', "--set", "train.logging_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file in the run folder"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    assert len(accumulator.Scalars("train/loss")) >= 3


def test_unknown_tracker_is_refused(tmp_path):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    result = petune("validate", recipe, "--set", 'train.report_to=["tensorbored"]')
    assert result.returncode == 2 and "train.report_to.0" in result.stderr and "'tensorboard'" in result.stderr
