"""What a run folder guarantees under abuse: --overwrite deletes only petune runs, model
folders never run code, resume of a finished run does not train, old checkpoints go only
after the new one is whole, one process per run folder, a full disk is a user error."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import adapter_tensors, petune, tiny_classification_recipe
from safetensors.torch import load_file

from petune import artifacts, checkpoints
from petune.cli import main
from petune.errors import UserError


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 6-step run with checkpoints at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = tiny_classification_recipe(folder, folder / "run", max_steps=6, save_steps=3)
    result = petune("run", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_run(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(finished, tmp_path / "copy")
    run_dir = tmp_path / "copy" / "run"
    recipe = tmp_path / "copy" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(str(finished / "run"), str(run_dir)))
    return recipe, run_dir


# -- 1. --overwrite replaces only petune runs -------------------------------------------------
def test_overwrite_refuses_the_current_folder(tmp_path, monkeypatch, capsys):
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "unused")
    before = files_of(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "--set", "output.dir=.", "--overwrite"]) == 2
    assert "current folder" in capsys.readouterr().err
    assert files_of(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    recipe = tiny_classification_recipe(tmp_path, precious)
    assert main(["run", str(recipe), "--overwrite"]) == 2
    assert "not a petune run" in capsys.readouterr().err
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_overwrite_refuses_a_run_folder_that_holds_the_data(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    recipe = tiny_classification_recipe(data, data)  # the data and the output in one folder
    artifacts.write_json(data / "manifest.json", {"status": "failed", "started": "x", "versions": {}})
    before = files_of(data)
    assert main(["run", str(recipe), "--overwrite"]) == 2
    assert "which this run reads" in capsys.readouterr().err
    assert files_of(data) == before


def test_overwrite_refuses_the_home_folder_and_its_parents(tmp_path):
    assert "home folder" in artifacts.why_not_replaceable(Path.home(), [])
    assert "home folder" in artifacts.why_not_replaceable(Path.home().parent, [])
    assert "not a petune run" in artifacts.why_not_replaceable(tmp_path, [])


# -- 2. a model folder never runs code ----------------------------------------------------------
def test_model_folder_with_custom_code_is_refused_and_never_run(tmp_path, monkeypatch, capsys):
    model = tmp_path / "evil-model"
    model.mkdir()
    marker = tmp_path / "pwned"
    (model / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (model / "model.safetensors").write_bytes(b"{}")
    (model / "tokenizer.json").write_text("{}")
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    result = petune("run", recipe, "--set", f"model.name={model}", input="y\ny\ny\n")  # a "yes" must not matter
    assert result.returncode == 2, result.stderr[-3000:]
    assert "own Python code" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    assert main(["estimate", str(recipe), "--set", f"model.name={model}"]) == 2
    assert "own Python code" in capsys.readouterr().err
    assert not marker.exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_with_code_are_refused_with_a_message(tmp_path, tiny_bert_path, capsys):
    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_bert_path, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": Payload(marker)}, model / "pytorch_model.bin")
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run")
    assert main(["run", str(recipe), "--set", f"model.name={model}"]) == 2
    assert "pickled weights" in capsys.readouterr().err
    assert not marker.exists()


# -- 5. resume of a finished schedule does not train --------------------------------------------
def test_resume_of_a_completed_run_does_nothing(finished, tmp_path):
    recipe, run_dir = copy_run(finished, tmp_path)
    before = files_of(run_dir)
    result = petune("run", recipe, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to do" in result.stderr
    assert files_of(run_dir) == before


def test_resume_after_a_crash_past_the_last_checkpoint_only_writes_artifacts(finished, tmp_path):
    recipe, run_dir = copy_run(finished, tmp_path)
    shutil.rmtree(run_dir / "adapter")  # the crash came between the last checkpoint and the artifacts
    (run_dir / "metrics.json").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    artifacts.write_json(run_dir / "manifest.json", {**manifest, "status": "failed"})
    result = petune("run", recipe, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final artifacts only" in result.stderr
    steps = [h["step"] for h in json.loads((run_dir / "log_history.json").read_text())]
    assert max(steps) <= 6 and (run_dir / "metrics.json").exists()  # no "7/6 steps"
    saved = load_file(str(run_dir / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"))
    final = adapter_tensors(run_dir)
    assert saved.keys() == final.keys()
    for name in saved:
        torch.testing.assert_close(final[name], saved[name], rtol=0, atol=0, msg=name)
    new_manifest = json.loads((run_dir / "manifest.json").read_text())
    assert new_manifest["status"] == "completed"
    assert new_manifest["started"] == manifest["started"] and len(new_manifest["resumes"]) == 1  # item 9


def test_run_files_share_the_runs_permissions(finished):
    mask = os.umask(0)
    os.umask(mask)
    for path in (finished / "run" / "adapter").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


# -- 6. the last whole checkpoint survives until the next one is whole -------------------------
def test_a_whole_checkpoint_exists_at_every_moment_with_save_total_limit_1(tmp_path, monkeypatch):
    from transformers import Trainer

    run_dir = tmp_path / "run"
    recipe = tiny_classification_recipe(tmp_path, run_dir, max_steps=6, save_steps=2)
    seen = []
    original = Trainer._save_checkpoint

    def save_then_look(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # the trainer has written the new checkpoint; petune has not yet marked it whole
        seen.append(sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if checkpoints.is_valid(p)))

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_look)
    assert main(["run", str(recipe), "--set", "train.save_total_limit=1"]) == 0
    assert seen == [[], ["checkpoint-2"], ["checkpoint-4"]]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-6"]


# -- 7. one process per run folder -----------------------------------------------------------
HOLD_LOCK = """
import sys, time
from pathlib import Path
from petune.artifacts import RunLock
lock = RunLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_cannot_take_a_run_folder_in_use(finished, tmp_path, capsys):
    recipe, run_dir = copy_run(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_of(run_dir)
        for flag in ("--resume", "--overwrite"):
            assert main(["run", str(recipe), flag]) == 2
            message = capsys.readouterr().err
            assert "in use by another petune process" in message and f"pid {holder.pid}" in message
        assert files_of(run_dir) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert artifacts.RunLock.holder(run_dir) is None  # the kernel released it with the process


# -- 8. a full disk is the user's environment, not a petune bug -------------------------------
def test_disk_full_is_a_user_error_that_says_how_to_resume(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_classification_recipe(tmp_path, run_dir, max_steps=4, save_steps=2)

    def no_space(path, fill):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifacts, "write_dir", no_space)
    assert main(["run", str(recipe)]) == 2
    message = capsys.readouterr().err
    assert "disk is full" in message and "--resume" in message and "checkpoint-4" in message
    assert "bug in petune" not in message
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


# -- 9. the final train_loss covers the whole run ---------------------------------------------
def test_resumed_train_loss_averages_every_step():
    from petune.runner import whole_run_train_loss

    # steps 1-4 logged at 2 and 4 (mean 3.0 and 1.0), resumed at 4; steps 5-8 average 0.5
    history = [{"loss": 3.0, "step": 2}, {"loss": 1.0, "step": 4}, {"loss": 0.5, "step": 8},
               {"train_loss": 0.5, "step": 8}]
    whole_run_train_loss(history, resumed_at=4)
    assert history[-1]["train_loss"] == pytest.approx((3.0 * 2 + 1.0 * 2 + 0.5 * 4) / 8)


# -- 11. what is kept off the terminal is kept in the run's log ------------------------------
def test_the_run_log_keeps_what_the_terminal_does_not_show(finished):
    log = (finished / "run" / "run.log").read_text(encoding="utf-8")
    assert "LOAD REPORT" in log  # the tiny classifier's new head, reported by transformers


def test_disk_check_on_resume_counts_the_runs_own_checkpoints_as_free(tmp_path, monkeypatch, host):
    """A resumed run rotates its old checkpoints out: their bytes need not be free twice."""
    import shutil as shutil_module
    from collections import namedtuple

    from petune.recipe import load_recipe
    from petune.runner import check_disk_space

    recipe = load_recipe(tiny_classification_recipe(tmp_path, tmp_path / "run"), host)
    strategy = host.strategy("lora")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"\0" * 30 * 2**20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(0, 0, 70 * 2**20))
    check_disk_space(tmp_path / "run", recipe, strategy, trainable=2**20, total=2**22)  # needs 90 MiB, 30 of them held by the old checkpoint
    shutil_module.rmtree(checkpoint)
    with pytest.raises(UserError, match="not enough disk space"):
        check_disk_space(tmp_path / "run", recipe, strategy, trainable=2**20, total=2**22)


def test_a_training_that_raises_gives_the_signal_handlers_back():
    """The stop-on-signal handlers go back when training raises (on_train_end never runs), so they do
    not outlive the run in this process nor reach the processes it forks later (a data pool's workers)."""
    import signal
    from types import SimpleNamespace

    from petune.runner import Start, train

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = checkpoints.callbacks()[-1]

    def failing_train(**_):
        stop.on_train_begin(None, None, None)
        assert signal.getsignal(signal.SIGTERM) == stop._handler  # installed while training
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        train(SimpleNamespace(train=failing_train), Start(checkpoint=None, finished=False))
    assert {sig: signal.getsignal(sig) for sig in before} == before
