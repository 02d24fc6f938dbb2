"""``reward_model``: the score a finished petune ``reward`` run gives each completion, times ``scale``.

The run (a sequence classifier trained on preference pairs, :mod:`petune_plugins.tasks.reward`)
is loaded once per run by :meth:`RewardModel.prepare`, onto the training device, and scores a
(prompt, completion) exactly as ``petune predict`` scores the record
``{"prompt": messages, "completion": text}``: same chat template or text pair, same lengths
and cuts (the reward task's ``parse_inputs`` and ``predict`` do it). A completion the model
cannot score (empty, or cut to nothing) gets ``unscorable`` (None: not applicable).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pydantic import Field, model_validator

from petune.api import DataPath, Options, Reward
from petune.errors import Refusal, UserError

WHERE = "reward_model.run"


class RewardModelOptions(Options):
    run: DataPath = Field(description="the folder of a finished petune run of the `reward` task (relative to the "
                                      "recipe)")
    scale: float = Field(1.0, description="the reward is scale × the model's score")
    batch_size: int = Field(8, ge=1, description="completions scored at once")
    unscorable: float | None = Field(None, description="the reward of a completion the model cannot score (empty, "
                                                       "or cut to nothing); none: not applicable")

    @model_validator(mode="after")
    def _a_reward_run(self):
        if self.run.exists():  # cheap checks now; prepare() reads the run fully
            refusal = not_a_reward_run(self.run)
            if refusal is not None:
                raise ValueError(f"{refusal.message} ({refusal.hint})")
        return self


def not_a_reward_run(run_dir: Path) -> UserError | None:
    """Why ``run_dir`` cannot be used, read from its recipe alone (nothing loads), or None."""
    if not (run_dir / "recipe.toml").is_file():
        return UserError(f"{run_dir} is not a finished petune run (no recipe.toml)", where=WHERE,
                         hint="give the output folder of a completed `petune run` of the reward task")
    try:
        task = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8")).get("task", {}).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return UserError(f"cannot read {run_dir / 'recipe.toml'}: {exc}", where=WHERE)
    if task != "reward":
        return Refusal(f"{run_dir} is a run of the {task!r} task, not of the 'reward' task: only a reward model "
                       f"scores completions", where=WHERE,
                       hint="train one with [task] name = \"reward\" on preference pairs, and give its folder")
    return None


class RewardModel(Reward):
    name = "reward_model"
    description = "a trained petune reward model (a `reward` run): scale × its score of the prompt and completion"
    Options = RewardModelOptions

    def prepare(self, options: RewardModelOptions, device) -> None:
        from petune.plugins import get_host
        from petune.run_folders import load_run, read_finished_run

        run_dir = Path(options.run)
        if not run_dir.is_dir():
            raise UserError(f"the reward model's run folder {run_dir} does not exist", where=WHERE,
                            hint="give the output folder of a completed `petune run` of the reward task")
        refusal = not_a_reward_run(run_dir)
        if refusal is not None:
            raise refusal
        host = get_host()
        try:
            read_finished_run(run_dir, host)  # refuses an unfinished run before weights load
        except UserError as exc:
            raise UserError(f"{run_dir}: {exc.message}", where=WHERE, hint=exc.hint) from None
        loaded = load_run(run_dir, host)
        if device is not None:
            loaded.model.to(device)
        self._loaded = loaded

    def score(self, prompts, completions, fields, options: RewardModelOptions) -> list[float | None]:
        from petune.errors import DataError

        loaded = self.__dict__.get("_loaded")
        if loaded is None:  # scored without prepare(): on the CPU
            self.prepare(options, None)
            loaded = self._loaded
        task, task_options = loaded.task, loaded.recipe.task
        rows, at = [], []  # rows as `petune predict` reads them from JSON Lines, and their completion's index
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            record = json.dumps({"prompt": prompt, "completion": completion})
            try:
                rows += task.parse_inputs(task_options, record, f"completion {i}.jsonl")
                at.append(i)
            except DataError:  # e.g. an empty completion: nothing to score
                continue
        scores: list[float | None] = [options.unscorable] * len(completions)
        for start in range(0, len(rows), options.batch_size):
            batch = rows[start:start + options.batch_size]
            predicted = task.predict(loaded.model, loaded.tokenizer, task_options, loaded.state, batch)
            for i, prediction in zip(at[start:start + options.batch_size], predicted):
                if prediction["score"] is not None:
                    scores[i] = options.scale * prediction["score"]
        return scores
