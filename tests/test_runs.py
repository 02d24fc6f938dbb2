"""petune runs / petune compare on real tiny runs, and the learning-rate plot."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_recipe
from PIL import Image
from rich.console import Console

from petune import runs
from petune.errors import UserError

DATA_ROWS = "".join(f"the movie was good {i},positive\nthe film was bad {i},negative\n" for i in range(20))


def make_run(host, folder: Path, name: str, strategy: dict, *, steps: int = 4) -> Path:
    from petune import runner
    from petune.recipe import load_recipe

    run_dir = folder / "runs" / name
    recipe = write_recipe(folder / f"{name}.toml", model="random:tiny-bert",
                          task={"name": "classification", "train": "train.csv", "validation_split": 0.2,
                                "max_length": 16},
                          strategy=strategy, train={"max_steps": steps, "batch_size": 8, "logging_steps": 1,
                                                    "save_steps": 2},
                          eval={"strategy": "steps", "steps": 2}, output=run_dir)
    result = runner.run(load_recipe(recipe, host), host)
    assert result.status == "completed", result.error
    return run_dir


def read(path: Path):
    return json.loads(path.read_text())


def write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def runs_root(host, tmp_path_factory) -> Path:
    """runs/: two finished runs (lora, full), one interrupted at step 2, one whose process died."""
    folder = tmp_path_factory.mktemp("runs")
    (folder / "train.csv").write_text("text,label\n" + DATA_ROWS)
    make_run(host, folder, "a_lora", {"name": "lora", "r": 4})
    make_run(host, folder, "b_full", {"name": "full"})

    # interrupted: what a run stopped after its step-2 checkpoint leaves (no final metrics, no log_history.json)
    stopped = folder / "runs" / "c_stopped"
    shutil.copytree(folder / "runs" / "a_lora", stopped)
    for name in ("metrics.json", "log_history.json", "adapter", "tokenizer"):
        target = stopped / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for checkpoint in (stopped / "checkpoints").glob("checkpoint-*"):
        if checkpoint.name != "checkpoint-2":
            shutil.rmtree(checkpoint)
    manifest = read(stopped / "manifest.json")
    manifest.update(status="interrupted", error="stopped by a signal after writing a checkpoint")
    write(stopped / "manifest.json", manifest)

    # "running", but its process is gone
    died = folder / "runs" / "nested" / "d_died"
    shutil.copytree(stopped, died)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    manifest.update(status="running", ended=None, pid=gone.pid, hostname=socket.gethostname())
    write(died / "manifest.json", manifest)
    return folder / "runs"


def parse(argv: list[str]):
    from petune import inspect_commands

    parser = argparse.ArgumentParser(prog="petune")
    inspect_commands.add_to(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.fixture
def terminal(monkeypatch):
    from petune import inspect_commands

    buffer = io.StringIO()
    monkeypatch.setattr(inspect_commands, "out", Console(file=buffer, width=250, color_system=None))
    return buffer


def test_runs_lists_status_metric_time_and_parameters(runs_root, capsys):
    capsys.readouterr()
    args = parse(["runs", str(runs_root), "--json"])
    assert args.func(args) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"a_lora", "b_full", "c_stopped", "nested/d_died"}
    assert {name: r["status"] for name, r in listed.items()} == {
        "a_lora": "completed", "b_full": "completed", "c_stopped": "interrupted", "nested/d_died": "died"}
    for name in ("a_lora", "b_full"):
        run = listed[name]
        manifest = read(runs_root / name / "manifest.json")
        assert (run["task"], run["model"]) == ("classification", "random:tiny-bert")
        assert run["metric"] == "accuracy" and run["metric_source"] == "validation"
        assert run["metric_value"] == read(runs_root / name / "metrics.json")["validation"]["accuracy"]
        assert run["trainable_parameters"] == manifest["trainable_parameters"] > 0
        assert run["wall_seconds"] is not None and run["wall_seconds"] >= 0
    assert listed["a_lora"]["strategy"] == "lora" and listed["b_full"]["strategy"] == "full"
    assert listed["a_lora"]["trainable_parameters"] < listed["b_full"]["trainable_parameters"]
    # the interrupted run's metric comes from its last checkpoint's log history
    stopped = listed["c_stopped"]
    history = read(runs_root / "c_stopped" / "checkpoints" / "checkpoint-2" / "trainer_state.json")["log_history"]
    step2 = next(h for h in history if "eval_accuracy" in h)
    assert (stopped["metric_value"], stopped["metric_source"]) == (step2["eval_accuracy"], "eval, step 2")
    assert stopped["metrics"] == {}


def test_runs_table(runs_root, terminal):
    args = parse(["runs", str(runs_root)])
    assert args.func(args) == 0
    table = terminal.getvalue()
    lines = {line.split("│")[1].strip(): line for line in table.splitlines() if line.startswith("│")}
    assert "completed" in lines["a_lora"] and "lora" in lines["a_lora"] and "accuracy" in lines["a_lora"]
    assert "interrupted" in lines["c_stopped"] and "(eval, step 2)" in lines["c_stopped"]
    assert "died" in lines["nested/d_died"]


def test_runs_on_a_folder_without_runs(tmp_path, terminal, capsys):
    args = parse(["runs", str(tmp_path)])
    assert args.func(args) == 0
    assert terminal.getvalue() == ""
    with pytest.raises(UserError, match="not a folder"):
        args = parse(["runs", str(tmp_path / "missing")])
        args.func(args)


def test_compare_table_and_png(runs_root, terminal):
    args = parse(["compare", str(runs_root / "a_lora"), str(runs_root / "b_full"), str(runs_root / "c_stopped")])
    assert args.func(args) == 0
    png = runs_root / "compare.png"  # default: beside the runs
    assert Image.open(png).format == "PNG"
    table = terminal.getvalue()
    header = next(line for line in table.splitlines() if "a_lora" in line)
    assert header.index("a_lora") < header.index("b_full") < header.index("c_stopped")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in table.splitlines() if line.startswith("│")}
    assert rows["status"] == ["completed", "completed", "interrupted"]
    assert rows["strategy"] == ["lora", "full", "lora"]
    for i, name in enumerate(("a_lora", "b_full")):
        accuracy = read(runs_root / name / "metrics.json")["validation"]["accuracy"]
        assert rows["validation accuracy"][i] == f"{accuracy:.4f}"
    assert rows["validation accuracy"][2] == "—"
    assert rows["best eval accuracy"][2].endswith("(step 2)")


def test_compare_out_and_refusals(runs_root, tmp_path, terminal):
    out = tmp_path / "pictures" / "c.png"
    args = parse(["compare", str(runs_root / "b_full"), "--out", str(out)])
    assert args.func(args) == 0
    assert Image.open(out).format == "PNG"
    with pytest.raises(UserError, match="not a run folder"):
        args = parse(["compare", str(runs_root / "b_full"), str(tmp_path)])
        args.func(args)
    with pytest.raises(UserError, match=r"\.png"):
        args = parse(["compare", str(runs_root / "b_full"), "--out", str(tmp_path / "c.pdf")])
        args.func(args)


def test_best_in_history_knows_which_way_is_better():
    history = [{"eval_loss": 0.5, "eval_accuracy": 0.7, "step": 2}, {"eval_loss": 0.4, "eval_accuracy": 0.6, "step": 4},
               {"loss": 0.1, "step": 5}]
    assert runs.best_in_history(history, "accuracy") == (0.7, 2)
    assert runs.best_in_history(history, "loss") == (0.4, 4)
    assert runs.best_in_history(history, "f1") is None


def test_human_duration():
    assert [runs.human_duration(s) for s in (None, 5, 65, 3725)] == ["—", "5s", "1m 05s", "1h 02m"]


def test_plot_learning_rate(runs_root, tmp_path):
    history = read(runs_root / "a_lora" / "log_history.json")
    assert any("learning_rate" in h for h in history)
    png = runs.plot_learning_rate(history, tmp_path / "plots" / "lr.png")
    assert Image.open(png).format == "PNG"
    empty = runs.plot_learning_rate([], tmp_path / "empty.png")
    assert Image.open(empty).format == "PNG"
