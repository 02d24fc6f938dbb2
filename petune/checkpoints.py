"""Checkpoints that survive crashes, resume from the newest valid one, and a clean stop on Ctrl-C.

The HF Trainer writes ``checkpoints/checkpoint-N/`` in place. A checkpoint only counts
once petune has seen the trainer finish it and written ``petune-complete.json`` into it
(atomically), so a crash mid-write leaves a folder without the marker: never mistaken
for a whole checkpoint, skipped with a warning on ``--resume``.

petune, not the trainer, deletes old checkpoints (``train.save_total_limit``), and only
after the new one is marked: the trainer deletes before petune can mark, so a crash in
between could leave no whole checkpoint at all.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

from petune import artifacts
from petune.console import err, is_main_process

MARKER = "petune-complete.json"


def _step(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def is_valid(path: Path) -> bool:
    """A checkpoint is whole when petune marked it and its trainer state parses."""
    try:
        marker = json.loads((path / MARKER).read_text())
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all((path / name).exists() for name in marker.get("files", []))


def newest_valid(run_dir: Path) -> Path | None:
    """The newest whole checkpoint; broken ones are reported and skipped."""
    candidates = sorted((p for p in (run_dir / "checkpoints").glob("checkpoint-*") if _step(p) >= 0), key=_step, reverse=True)
    for path in candidates:
        if is_valid(path):
            return path
        err.print(f"[yellow]warning[/]: skipping incomplete or corrupt checkpoint {path}")
    return None


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def training_finished(checkpoint: Path, max_steps: int | None, epochs: float) -> bool:
    """Whether the checkpoint already holds the end of the schedule, so a resume must not
    train again (the trainer would run one step past the end)."""
    state = state_of(checkpoint)
    step = state.get("global_step", 0)
    if max_steps:
        return step >= max_steps
    # an epoch schedule: the checkpoint knows its step count if the epochs did not change
    return state.get("num_train_epochs") == epochs and step >= state.get("max_steps", float("inf"))


def restore(trainer, checkpoint: Path) -> None:
    """Load a checkpoint's weights and trainer state without training (the end of the
    schedule was reached before a crash: only the final artifacts are missing)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))  # the trainer's own loader knows peft and full models
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def rotate(output_dir: Path, keep: int | None, also_keep: str | None = None) -> None:
    """Delete all but the newest ``keep`` whole checkpoints (and ``also_keep``, the best one)."""
    if keep is None:
        return
    found = sorted((p for p in Path(output_dir).glob("checkpoint-*") if _step(p) >= 0), key=_step, reverse=True)
    whole = [p for p in found if is_valid(p)]
    kept = {p.resolve() for p in whole[:keep]} | ({Path(also_keep).resolve()} if also_keep else set())
    newest = whole[0] if whole else None
    for path in found:
        # a checkpoint newer than the newest whole one is being written: leave it alone
        if path.resolve() in kept or newest is None or _step(path) > _step(newest):
            continue
        shutil.rmtree(path, ignore_errors=True)


_holding_signals: list = []  # StopOnSignal callbacks whose handlers are installed


def release_signals() -> None:
    """SIGINT/SIGTERM back to the handlers they had before training, where a training raised
    (``on_train_end`` never ran): the stop-on-signal handler would outlive it in this process
    and be inherited by every process forked later (a data pool's workers then ignored the
    SIGTERM that ends them)."""
    for holder in list(_holding_signals):
        holder.restore()


def callbacks(save_total_limit: int | None = None) -> list:
    """Mark finished checkpoints, then delete the old ones; stop cleanly (with a
    checkpoint) on SIGINT/SIGTERM."""
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not is_main_process():
                return
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER)
                artifacts.write_json(path / MARKER, {"step": state.global_step, "files": files})
            rotate(Path(args.output_dir), save_total_limit, state.best_model_checkpoint)

    class StopOnSignal(TrainerCallback):
        """First Ctrl-C / SIGTERM: checkpoint at the end of this step and stop.
        A second Ctrl-C stops at once."""

        def __init__(self):
            self.requested = False
            self._previous = {}

        def _handler(self, signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            err.print(f"\n[yellow]{signal.Signals(signum).name}[/]: saving a checkpoint, then stopping "
                      "(press Ctrl-C again to stop at once)")

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not in the main thread: leave signals alone
                    pass
            _holding_signals.append(self)

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.restore()

        def restore(self):
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()
            if self in _holding_signals:
                _holding_signals.remove(self)

    return [MarkCompleteCheckpoints(), StopOnSignal()]


def stop_requested(callback_list: list) -> bool:
    return any(getattr(cb, "requested", False) for cb in callback_list)
