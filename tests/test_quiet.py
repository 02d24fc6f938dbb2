"""Library chatter a user cannot act on stays out of the terminal (issue 20, item 11)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from helpers import REPO, petune, tiny_classification_recipe

from petune import quiet

NOISE = ("LOAD REPORT", "Loading weights", "gemm_4bit_forward")


def test_bitsandbytes_kernel_message_goes_to_petunes_log_not_stderr():
    script = """
import logging
from petune import quiet
quiet.quiet_libraries()
kept = []
class Keep(logging.Handler):
    def emit(self, record):
        kept.append(record.getMessage())
logging.getLogger("petune").addHandler(Keep())
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "No module named 'kernels'")
log.warning("another bitsandbytes warning")
print(kept)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr  # logging's last-resort handler would print it
    assert "another bitsandbytes warning" in done.stderr  # only the known message is kept out
    assert "gemm_4bit_forward" in done.stdout  # ... and it reached petune's logger (a run's log file)


def test_quiet_libraries_is_idempotent():
    quiet.quiet_libraries()
    quiet.quiet_libraries()
    for name in quiet.DIVERTED:
        assert sum(isinstance(f, quiet._Divert) for f in logging.getLogger(name).filters) == 1


def test_dry_run_prints_no_load_report(tmp_path):
    """The tiny model's checkpoint lacks the classifier head: transformers would print its table."""
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    done = petune("run", recipe, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "trainable" in done.stdout + done.stderr  # the plan is still shown
    for text in NOISE:
        assert text not in done.stderr and text not in done.stdout, text


def test_weight_loading_bars_are_off_unless_asked_for():
    """eval, predict and generate load weights outside the training run, which turns bars off itself."""
    script = ("from petune import quiet; quiet.quiet_libraries(); "
              "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert done.stdout.strip() == "False", done.stderr
    asked = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                           cwd=REPO, env=dict(env, HF_HUB_DISABLE_PROGRESS_BARS="0"))
    assert asked.stdout.strip() == "True", asked.stderr  # a user's own setting wins
