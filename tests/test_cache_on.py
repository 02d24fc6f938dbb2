"""The eval, predict and resume tests again with the data cache on, as users run them (the suite
runs with it off: tests/conftest.py). Issue 33: ``petune eval RUN --data FILE`` crashed on
classification and seq2seq runs whenever the cache was on, and no test saw it.

Each module here gets its own cache folder (never the user's, never shared between workers);
the tests below are the other modules' own, collected again under it."""

from __future__ import annotations

import json
import os

import pytest
from test_data_formats import test_predict_reads_compressed_inputs_and_refuses_columnar_ones  # noqa: F401
from test_eval_command import (  # noqa: F401
    TASKS,
    test_eval_needs_no_training_file,
    test_eval_scores_the_validation_split_while_the_training_file_is_there,
    test_eval_without_training_file_or_test_file_says_which_file_is_missing,
    train_tiny_run,
)
from test_reliability import (  # noqa: F401
    finished,
    test_resume_after_a_crash_past_the_last_checkpoint_only_writes_artifacts,
    test_resume_of_a_completed_run_does_nothing,
)
from test_resume import reference, test_sigkill_then_resume_matches_uninterrupted_run  # noqa: F401
from test_task_seq2seq import test_eval_command_with_a_line_aligned_test_file  # noqa: F401

from petune import datacache
from petune.cli import main


@pytest.fixture(scope="module", autouse=True)
def data_cache_on(tmp_path_factory):
    """The cache on, in a folder of this module's own (module scope: the trained runs the
    imported fixtures share are prepared with it on too)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("data-cache")
        patch.setenv(datacache.ENV, str(folder))
        yield folder


def test_the_cache_is_on_here(data_cache_on):
    assert os.environ[datacache.ENV] == str(data_cache_on)


@pytest.mark.parametrize("task", ["classification", "seq2seq"])
def test_eval_data_file_with_the_cache_on(task, tmp_path, host, data_cache_on):
    """The file tables of classification and seq2seq: --data gives a table the cache key can dump."""
    run_dir = train_tiny_run(tmp_path, host, task, validation_file=False)
    suffix = {"classification": "csv", "seq2seq": "jsonl"}[task]
    other = tmp_path / f"other.{suffix}"
    other.write_text((tmp_path / f"test.{suffix}").read_text())
    for out in ("eval", "eval-again"):  # built, then read from the cache
        assert main(["eval", str(run_dir), "--data", str(other), "--out", str(tmp_path / out)]) == 0
        assert TASKS[task][4] in json.loads((tmp_path / out / "metrics.json").read_text())["test"]
    assert any(e["complete"] for e in datacache.entries(data_cache_on))
