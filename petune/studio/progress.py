"""Progress of a run the studio started, as JSON lines the studio streams to the page.

One line per event: ``begin`` (step, max_steps), ``step`` (at most twice a second: step,
epoch, elapsed, eta, tokens_per_second, memory), ``log`` (what the trainer logged: loss,
learning_rate, eval_*) and ``end``. Runs in the ``petune run`` process."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

STEP_INTERVAL = 0.5  # seconds between two step events


def progress_events(path: Path):
    from transformers import TrainerCallback

    from petune.console import memory_in_use

    class StudioEvents(TrainerCallback):
        def __init__(self):
            self.file = None
            self.t0 = self.last = 0.0
            self.step0 = self.tokens0 = 0

        def write(self, event: str, **fields) -> None:
            if self.file is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = path.open("a", encoding="utf-8")
            clean = {k: v for k, v in fields.items() if not (isinstance(v, float) and not math.isfinite(v))}
            self.file.write(json.dumps({"event": event, "time": time.time(), **clean}) + "\n")
            self.file.flush()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self.last = time.perf_counter()
            self.step0 = state.global_step
            self.tokens0 = getattr(state, "num_input_tokens_seen", 0) or 0
            self.write("begin", step=state.global_step, max_steps=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            last = state.global_step >= state.max_steps or control.should_training_stop or control.should_save
            if now - self.last < STEP_INTERVAL and not last:
                return
            self.last = now
            elapsed, done = now - self.t0, state.global_step - self.step0
            tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens0
            eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
            self.write("step", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
                       elapsed=elapsed, eta=eta, tokens_per_second=tokens / elapsed if tokens and elapsed else None,
                       memory=memory_in_use())

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                self.write("log", step=state.global_step, **numbers)

        def on_train_end(self, args, state, control, **kwargs):
            self.write("end", step=state.global_step, max_steps=state.max_steps)
            if self.file is not None:
                self.file.close()
                self.file = None

    return StudioEvents()
