"""``length``: rewards completions whose length is within [``min``, ``max``].

The length is counted in ``unit``: characters, or words (runs of non-space characters). Inside
the range the reward is ``inside``; beyond either end it falls linearly, reaching ``outside``
``falloff`` units past the end, and stays there further out::

    reward
    inside  |        ________________
            |       /                \\
    outside |______/                  \\______
            +------+---+----------+---+------> length
                     min        max
            (falloff units each side)

``falloff = 0`` (the default) makes it a step: ``inside`` or ``outside``. A negative ``outside``
is a penalty. Only ``min`` or only ``max`` leaves the other side open; ``min = max`` aims at one
length.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from petune.api import Options, Reward


class LengthOptions(Options):
    unit: Literal["characters", "words"] = Field("words", description="what is counted: characters, or words "
                                                                      "(runs of non-space characters)")
    min: int | None = Field(None, ge=0, description="the shortest length rewarded in full (none: no lower end)")
    max: int | None = Field(None, ge=0, description="the longest length rewarded in full (none: no upper end)")
    falloff: int = Field(0, ge=0, description="units beyond min or max over which the reward falls linearly from "
                                              "`inside` to `outside` (0: a step)")
    inside: float = Field(1.0, description="the reward of a completion within [min, max]")
    outside: float = Field(0.0, description="the reward of one `falloff` units or more outside it (negative: a "
                                            "penalty)")

    @model_validator(mode="after")
    def _a_range(self):
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both: the range of lengths rewarded in full")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


def measure(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


def length_reward(length: int, options: LengthOptions) -> float:
    """The reward of a completion ``length`` units long (see the module doc)."""
    below = options.min - length if options.min is not None else 0
    above = length - options.max if options.max is not None else 0
    beyond = max(below, above, 0)
    if beyond == 0:
        return options.inside
    if beyond >= options.falloff:
        return options.outside
    return options.inside + (options.outside - options.inside) * beyond / options.falloff


class LengthReward(Reward):
    name = "length"
    description = "length: `inside` for completions within [min, max] characters or words, falling linearly outside"
    Options = LengthOptions

    def score(self, prompts, completions, fields, options: LengthOptions) -> list[float | None]:
        return [length_reward(measure(c if isinstance(c, str) else "", options.unit), options) for c in completions]
