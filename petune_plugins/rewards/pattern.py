"""``regex``: a format reward — ``reward`` when the completion matches a regular expression
(Python's ``re``), ``otherwise`` when it does not."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from petune.api import Options, Reward

FLAGS = {"ignorecase": re.IGNORECASE, "multiline": re.MULTILINE, "dotall": re.DOTALL, "verbose": re.VERBOSE}


class RegexOptions(Options):
    pattern: str = Field(min_length=1, description="a Python regular expression, e.g. '<think>.*</think>\\s*<answer>"
                                                   ".*</answer>' (TOML: write it in single quotes, no escaping)")
    match: Literal["search", "full"] = Field("search", description="search: the pattern anywhere in the completion; "
                                                                   "full: the whole completion must match it")
    flags: list[Literal["ignorecase", "multiline", "dotall", "verbose"]] = Field(
        default_factory=list, description="re flags: dotall lets '.' match newlines; multiline makes ^ and $ match "
                                          "at every line; ignorecase; verbose")
    strip: bool = Field(True, description="match the completion without its leading and trailing whitespace")
    reward: float = Field(1.0, description="the reward of a completion that matches")
    otherwise: float = Field(0.0, description="the reward of a completion that does not")

    @model_validator(mode="after")
    def _compiles(self):
        try:
            self.compiled()
        except re.error as exc:
            where = f" at position {exc.pos}" if exc.pos is not None else ""
            raise ValueError(f"the pattern is not a valid regular expression: {exc.msg}{where} in {self.pattern!r}"
                             " (TOML: write it in single quotes, so that backslashes stay as written)") from None
        return self

    def compiled(self) -> re.Pattern:
        flags = 0
        for name in self.flags:
            flags |= FLAGS[name]
        return re.compile(self.pattern, flags)  # re caches compiled patterns


class RegexReward(Reward):
    name = "regex"
    description = "format: `reward` when the completion matches a regular expression (search or full match)"
    Options = RegexOptions

    def score(self, prompts, completions, fields, options: RegexOptions) -> list[float | None]:
        pattern = options.compiled()
        find = pattern.fullmatch if options.match == "full" else pattern.search
        scores = []
        for completion in completions:
            text = completion if isinstance(completion, str) else ""
            scores.append(options.reward if find(text.strip() if options.strip else text) else options.otherwise)
        return scores
