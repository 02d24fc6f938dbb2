"""Console output: results on stdout, progress and messages on stderr (so `--json` stays clean)."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

out = Console()
err = Console(stderr=True)


def is_main_process() -> bool:
    """Only the main process of a multi-process launch prints and writes."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def memory_in_use() -> str:
    """Peak accelerator memory if there is one, else this process's resident memory."""
    import torch

    if torch.cuda.is_available():
        return f"{human_bytes(torch.cuda.max_memory_allocated())} peak"
    import psutil

    return f"{human_bytes(psutil.Process().memory_info().rss)} RSS"


def key_value_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    """Splits as columns, metric names as rows."""
    splits = [s for s, m in metrics.items() if m]
    names = sorted({k for s in splits for k, v in metrics[s].items() if isinstance(v, (int, float))})
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold")
    for split in splits:
        table.add_column(split, justify="right")
    for name in names:
        cells = []
        for split in splits:
            value = metrics[split].get(name)
            cells.append("" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row(name, *cells)
    return table


def training_progress_callback(extra: dict[str, str] | None = None):
    """A TrainerCallback drawing one rich progress bar: step, ETA, loss, tokens/s, memory, and
    the logged values ``extra`` names (``{log key: label}``, the task's ``progress_metrics``)."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.task = None
            self.loss = None
            self.t0 = None
            self.tokens0 = 0
            self.extra = dict(extra or {})
            self.logged = {}

        def _fields(self, state) -> dict:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens0
            return {
                "loss": "—" if self.loss is None else f"{self.loss:.4f}",
                "tps": f"{tokens / elapsed:,.0f} tok/s" if tokens else "— tok/s",
                "mem": memory_in_use(),
                "extra": "".join(f"  {label} {self.logged[key]:.3g}" for key, label in self.extra.items()
                                 if key in self.logged),
            }

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.t0 = time.perf_counter()
            self.tokens0 = getattr(state, "num_input_tokens_seen", 0) or 0
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]}{task.fields[extra]}  {task.fields[tps]}  {task.fields[mem]}"),
                console=err, transient=False, refresh_per_second=2,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               loss="—", tps="— tok/s", mem="", extra="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, **self._fields(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is None or not logs:
                return
            if "loss" in logs:
                self.loss = logs["loss"]
            self.logged.update({k: v for k, v in logs.items() if k in self.extra and isinstance(v, (int, float))})
            if "eval_loss" in logs:
                shown = {k.removeprefix("eval_"): v for k, v in logs.items()
                         if k.startswith("eval_") and isinstance(v, float) and "runtime" not in k and "per_second" not in k}
                text = "  ".join(f"{k} {v:.4f}" for k, v in list(shown.items())[:6])
                self.progress.console.print(f"[dim]step {state.global_step}[/] eval  {text}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, **self._fields(state))
                self.progress.stop()
                self.progress = None

    return RichProgress()
