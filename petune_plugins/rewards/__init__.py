"""petune's built-in rewards, for tasks that learn from rewards (``grpo``).

A recipe names each reward in a ``[[task.rewards]]`` table with its weight; the rest of the
table is the reward's options (unknown keys are errors)::

    [[task.rewards]]
    name = "math_answer"
    weight = 1.0
    field = "answer"

    [[task.rewards]]
    name = "regex"
    weight = 0.2
    pattern = '<think>.*</think>\\s*<answer>.*</answer>'
    flags = ["dotall"]
    match = "full"

The rewards and their options (defaults in parentheses):

* ``math_answer`` (:mod:`~petune_plugins.rewards.math_answer`) — ``correct`` when the completion's
  final answer equals the row's reference answer, else ``wrong``. Options: ``field`` ("answer":
  the data field with the reference; rows without one are not scored), ``extract`` ("auto" |
  "boxed" | "after_marker" | "last_number"), ``marker`` ("####"), ``compare`` ("auto": math-verify
  when installed, ``pip install 'petune[math]'``, else plain numbers | "math_verify" | "numbers"),
  ``correct`` (1.0), ``wrong`` (0.0). Numbers are normalised: ``1,000`` = ``1 000`` = ``1000.0`` =
  ``$1000`` = ``\\boxed{1000}``, ``3/4`` = ``0.75``.
* ``regex`` (:mod:`~petune_plugins.rewards.pattern`) — a format reward: ``reward`` when the
  completion matches, else ``otherwise``. Options: ``pattern`` (required; checked to compile),
  ``match`` ("search" | "full"), ``flags`` ([]: any of "ignorecase", "multiline", "dotall",
  "verbose"), ``strip`` (true: surrounding whitespace removed first), ``reward`` (1.0),
  ``otherwise`` (0.0).
* ``length`` (:mod:`~petune_plugins.rewards.length`) — ``inside`` for a length within [``min``,
  ``max``], falling linearly to ``outside`` over ``falloff`` units beyond either end. Options:
  ``unit`` ("words" | "characters"), ``min`` and ``max`` (none; at least one), ``falloff`` (0: a
  step), ``inside`` (1.0), ``outside`` (0.0; negative for a penalty).
* ``json`` (:mod:`~petune_plugins.rewards.json_output`) — ``valid`` when the completion is or holds
  JSON (satisfying ``schema`` when given), ``valid_but_schema_fails`` when it does not satisfy it,
  ``invalid`` when there is no JSON. Options: ``extract`` ("auto" | "whole" | "fenced" |
  "first_value"), ``schema`` (none; an inline table or a .json file, checked to be a valid JSON
  Schema), ``valid`` (1.0), ``valid_but_schema_fails`` (0.5), ``invalid`` (0.0).
* ``reward_model`` (:mod:`~petune_plugins.rewards.reward_model`) — ``scale`` × the score a
  finished ``reward`` run gives the prompt and completion (as ``petune predict`` on that run).
  Options: ``run`` (required: the run's folder, relative to the recipe), ``scale`` (1.0),
  ``batch_size`` (8), ``unscorable`` (none: an empty completion is not scored).

A completion a reward cannot read scores that reward's lowest value (``wrong``, ``otherwise``,
``invalid``; ``reward_model``: ``unscorable``), never an error.
"""

from __future__ import annotations

from petune import hookimpl
from petune_plugins.rewards.json_output import JsonReward
from petune_plugins.rewards.length import LengthReward
from petune_plugins.rewards.math_answer import MathAnswer
from petune_plugins.rewards.pattern import RegexReward
from petune_plugins.rewards.reward_model import RewardModel

__all__ = ["JsonReward", "LengthReward", "MathAnswer", "RegexReward", "RewardModel"]


@hookimpl
def register_rewards(register):
    for reward in (MathAnswer, RegexReward, LengthReward, JsonReward, RewardModel):
        register(reward)
