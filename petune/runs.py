"""Run folders at a glance: listing (``petune runs``), side-by-side comparison
(``petune compare``) and the training curves drawn from a run's ``log_history``.

Everything here reads the files a run leaves (manifest.json, metrics.json, log_history.json,
recipe.toml, checkpoints/*/trainer_state.json) and loads no model, so it is fast and works on
runs of any task or strategy, finished or not.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from petune.errors import UserError

#: folders inside a run that never hold another run (not searched)
_RUN_PARTS = {"checkpoints", "adapter", "model", "tokenizer", "plots", "reports", "eval", "explain", "tensorboard"}
_MAX_DEPTH = 4
STATUS_STYLE = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan",
                "died": "red", "unreadable": "red"}


@dataclass
class RunInfo:
    """What a run folder says about itself."""

    dir: Path
    name: str
    status: str
    task: str | None = None
    strategy: str | None = None
    model: str | None = None
    started: datetime | None = None
    ended: datetime | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    metric: str | None = None  # the metric that ranks runs of this task (eval.metric, else the task's)
    metric_value: float | None = None
    metric_source: str | None = None  # "validation" (metrics.json) or "eval, step N" (log history)
    metrics: dict = field(default_factory=dict)  # metrics.json: {split: {name: value}}
    log_history: list = field(default_factory=list)
    error: str | None = None

    @property
    def wall_seconds(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended or (datetime.now(UTC) if self.status == "running" else None)
        return None if end is None else max((end - self.started).total_seconds(), 0.0)

    def to_json(self) -> dict:
        return {"dir": str(self.dir), "name": self.name, "status": self.status, "task": self.task,
                "strategy": self.strategy, "model": self.model,
                "started": self.started.isoformat() if self.started else None,
                "ended": self.ended.isoformat() if self.ended else None, "wall_seconds": self.wall_seconds,
                "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
                "metric": self.metric, "metric_value": self.metric_value, "metric_source": self.metric_source,
                "metrics": self.metrics, "error": self.error}


# -- reading ----------------------------------------------------------------------------------
def find_runs(root: str | Path) -> list[Path]:
    """Folders under ``root`` (``root`` itself included) that hold a manifest.json."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("not a folder", where=str(root), hint="give the folder your runs are in (default runs/)")
    found = []
    for current, dirs, files in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        if "manifest.json" in files:
            found.append(Path(current))
            dirs[:] = [d for d in dirs if d not in _RUN_PARTS]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_DEPTH else []
    return found


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _time(value) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _step_of(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.rpartition("-")[2])
    except ValueError:
        return -1


def read_log_history(run_dir: Path) -> list[dict]:
    """log_history.json (written when a run completes), else the newest checkpoint's
    trainer_state.json (an interrupted or failed run)."""
    history = _read_json(run_dir / "log_history.json")
    if isinstance(history, list):
        return history
    for checkpoint in sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=_step_of, reverse=True):
        state = _read_json(checkpoint / "trainer_state.json")
        if isinstance(state, dict) and isinstance(state.get("log_history"), list):
            return state["log_history"]
    return []


def lower_is_better(metric: str) -> bool:
    name = metric.removeprefix("eval_")
    return name.endswith("loss") or name in ("perplexity", "wer", "cer")


def best_in_history(history: list[dict], metric: str) -> tuple[float, int] | None:
    """(best value, step) of ``eval_<metric>`` over the logged evaluations."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    points = [(float(h[key]), int(h.get("step", 0))) for h in history
              if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    if not points:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(points, key=lambda p: p[0])


def _process_gone(manifest: dict) -> bool:
    """A "running" manifest whose process is known to be gone (same host, pid not alive)."""
    pid, host = manifest.get("pid"), manifest.get("hostname")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _recipe_metric(run_dir: Path) -> str | None:
    try:
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metric = recipe.get("eval", {}).get("metric")
    return metric if isinstance(metric, str) else None


def read_run(run_dir: str | Path, *, root: Path | None = None,
             primary_metric: Callable[[str], str | None] | None = None) -> RunInfo:
    """A run folder's manifest, metrics and log history. ``primary_metric(task_name)`` gives a
    task's ranking metric when the recipe sets no eval.metric (default: accuracy, f1, loss —
    the first the run has)."""
    run_dir = Path(run_dir)
    name = str(run_dir.relative_to(root)) if root is not None and run_dir != root else run_dir.name
    manifest = _read_json(run_dir / "manifest.json")
    if not isinstance(manifest, dict):
        return RunInfo(run_dir, name or str(run_dir), "unreadable", error="manifest.json is missing or not JSON")
    status = str(manifest.get("status") or "unknown")
    if status == "running" and _process_gone(manifest):
        status = "died"
    info = RunInfo(run_dir, name or str(run_dir), status, task=manifest.get("task"), strategy=manifest.get("strategy"),
                   model=manifest.get("model"), started=_time(manifest.get("started")),
                   ended=_time(manifest.get("ended")),
                   trainable_parameters=manifest.get("trainable_parameters"),
                   total_parameters=manifest.get("total_parameters"), error=manifest.get("error"))
    metrics = _read_json(run_dir / "metrics.json")
    info.metrics = metrics if isinstance(metrics, dict) else {}
    info.log_history = read_log_history(run_dir)

    metric = _recipe_metric(run_dir)
    if metric is None and primary_metric is not None and info.task:
        metric = primary_metric(info.task)
    if metric is None:
        seen = {k for split in info.metrics.values() if isinstance(split, dict) for k in split}
        seen |= {k.removeprefix("eval_") for h in info.log_history for k in h if k.startswith("eval_")}
        metric = next((m for m in ("accuracy", "f1", "loss") if m in seen), None)
    info.metric = metric
    if metric:
        validation = info.metrics.get("validation")
        final = validation.get(metric) if isinstance(validation, dict) else None
        if isinstance(final, (int, float)):
            info.metric_value, info.metric_source = float(final), "validation"
        elif (best := best_in_history(info.log_history, metric)) is not None:
            info.metric_value, info.metric_source = best[0], f"eval, step {best[1]}"
        else:
            for split, values in info.metrics.items():
                if isinstance(values, dict) and isinstance(values.get(metric), (int, float)):
                    info.metric_value, info.metric_source = float(values[metric]), split
                    break
    return info


def list_runs(root: str | Path, primary_metric: Callable[[str], str | None] | None = None) -> list[RunInfo]:
    """Every run under ``root``, oldest first."""
    root = Path(root)
    runs = [read_run(path, root=root, primary_metric=primary_metric) for path in find_runs(root)]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: (r.started or oldest, r.name))


# -- text -------------------------------------------------------------------------------------
def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _metric_text(run: RunInfo) -> str:
    if run.metric is None or run.metric_value is None:
        return "—"
    where = "" if run.metric_source == "validation" else f" ({run.metric_source})"
    return f"{run.metric} {run.metric_value:.4f}{where}"


def _params(n) -> str:
    from petune.console import human_count

    return human_count(n) if isinstance(n, int) else "—"


def _status(run: RunInfo) -> str:
    style = STATUS_STYLE.get(run.status)
    return f"[{style}]{run.status}[/]" if style else run.status


def runs_table(runs: list[RunInfo], title: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column, justify in (("run", "left"), ("task", "left"), ("strategy", "left"), ("model", "left"),
                            ("status", "left"), ("metric", "right"), ("wall time", "right"),
                            ("trainable", "right"), ("started", "left")):
        table.add_column(column, justify=justify, style="bold" if column == "run" else None)
    for run in runs:
        started = run.started.astimezone().strftime("%Y-%m-%d %H:%M") if run.started else "—"
        wall = human_duration(run.wall_seconds) + ("…" if run.status == "running" else "")
        table.add_row(escape(run.name), run.task or "—", run.strategy or "—", escape(run.model or "—"),
                      _status(run),
                      _metric_text(run), wall, _params(run.trainable_parameters), started)
    return table


def short_names(runs: list[RunInfo]) -> list[str]:
    """Folder names, or longer paths where two runs share a folder name."""
    names = [r.dir.name for r in runs]
    if len(set(names)) == len(names):
        return names
    try:
        common = Path(os.path.commonpath([str(r.dir.resolve()) for r in runs]))
        return [str(r.dir.resolve().relative_to(common)) or r.dir.name for r in runs]
    except ValueError:
        return [str(r.dir) for r in runs]


def compare_table(runs: list[RunInfo]):
    """Runs as columns; run facts, then every final metric (split, name), then the best logged
    evaluation of each run's metric. The best value of each metric row is bold."""
    from rich.markup import escape
    from rich.table import Table

    names = short_names(runs)
    table = Table(title="Comparison", title_justify="left")
    table.add_column("", style="bold")
    for name in names:
        table.add_column(escape(name), justify="right")
    table.add_row("task", *[r.task or "—" for r in runs])
    table.add_row("strategy", *[r.strategy or "—" for r in runs])
    table.add_row("model", *[escape(r.model or "—") for r in runs])
    table.add_row("status", *[_status(r) for r in runs])
    table.add_row("trainable", *[_params(r.trainable_parameters) for r in runs])
    table.add_row("wall time", *[human_duration(r.wall_seconds) for r in runs])
    steps = [max((int(h.get("step", 0)) for h in r.log_history), default=None) for r in runs]
    table.add_row("steps", *[_number(s) for s in steps])
    table.add_section()

    rows: list[tuple[str, str]] = []
    for run in runs:
        for split, values in run.metrics.items():
            if isinstance(values, dict):
                rows += [(split, k) for k, v in values.items()
                         if isinstance(v, (int, float)) and (split, k) not in rows]
    for split, metric in rows:
        values = [r.metrics[split].get(metric) if isinstance(r.metrics.get(split), dict) else None for r in runs]
        table.add_row(f"{split} {metric}", *_highlight(values, metric))
    table.add_section()
    for metric in dict.fromkeys(r.metric for r in runs if r.metric):
        best = [best_in_history(r.log_history, metric) if r.metric == metric else None for r in runs]
        cells = _highlight([b[0] if b else None for b in best], metric)
        cells = [f"{c} (step {b[1]})" if b else c for c, b in zip(cells, best)]
        table.add_row(f"best eval {metric}", *cells)
    return table


def _highlight(values: list, metric: str) -> list[str]:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if len(numbers) < 2 or metric in ("examples", "tokens", "support"):
        return [_number(v) for v in values]
    best = (min if lower_is_better(metric) else max)(numbers)
    return [f"[bold green]{_number(v)}[/]" if v == best else _number(v) for v in values]


# -- pictures ---------------------------------------------------------------------------------
def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _series(history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(h["step"], h[key]) for h in history
            if "step" in h and isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]


def plot_comparison(runs: list[RunInfo], path: str | Path) -> Path:
    """One PNG: train loss (solid) and eval loss (dashed) of every run, and each run's eval metric."""
    from petune import artifacts

    names = short_names(runs)
    figure = _figure((13, 4.8))
    loss_axes, metric_axes = figure.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    plotted_metric = False
    for run, name, colour in zip(runs, names, colours):
        train, evals = _series(run.log_history, "loss"), _series(run.log_history, "eval_loss")
        if train:
            loss_axes.plot(*zip(*train), color=colour, label=f"{name} train")
        if evals:
            loss_axes.plot(*zip(*evals), "o--", color=colour, markersize=4, label=f"{name} eval")
        if run.metric and run.metric != "loss":
            points = _series(run.log_history, f"eval_{run.metric}")
            if points:
                metric_axes.plot(*zip(*points), "o-", color=colour, markersize=4, label=f"{name} ({run.metric})")
                plotted_metric = True
    for axes, title, ylabel in ((loss_axes, "Loss (solid: train, dashed: eval)", "loss"),
                                (metric_axes, "Eval metric", "value")):
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    if not loss_axes.lines:
        loss_axes.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=loss_axes.transAxes)
    if not plotted_metric:
        metric_axes.text(0.5, 0.5, "no eval metric logged", ha="center", va="center", transform=metric_axes.transAxes)
    artifacts.save_figure(figure, Path(path))
    return Path(path)


def plot_learning_rate(log_history: list[dict], path: str | Path) -> Path:
    """The learning-rate schedule as trained (the ``learning_rate`` of each training log)."""
    from petune import artifacts

    figure = _figure((7, 4))
    axes = figure.add_subplot(1, 1, 1)
    points = _series(log_history, "learning_rate")
    if points:
        axes.plot(*zip(*points), color="tab:green", marker="." if len(points) < 50 else None)
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        axes.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title("Learning rate")
    axes.grid(alpha=0.3)
    artifacts.save_figure(figure, Path(path))
    return Path(path)
