"""A keyword reward as a third-party petune reward: the share of required keywords present.

A completion containing 2 of 4 keywords scores 0.5. Keywords match as whole words (``cat``
is not found in ``concatenate``), case-insensitively unless ``case_sensitive = true``.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from petune import hookimpl
from petune.api import Options, Reward


class KeywordOptions(Options):
    keywords: list[str] = Field(min_length=1, description="the words or phrases a good completion contains")
    case_sensitive: bool = Field(False, description="match keywords with their case as written")

    @field_validator("keywords")
    @classmethod
    def _not_blank(cls, keywords: list[str]) -> list[str]:
        blank = [i for i, k in enumerate(keywords) if not k.strip()]
        if blank:
            raise ValueError(f"keyword {blank[0]} is empty: give words or phrases")
        return keywords


def keyword_share(text: str, keywords: list[str], case_sensitive: bool) -> float:
    flags = 0 if case_sensitive else re.IGNORECASE
    found = sum(1 for k in keywords if re.search(rf"(?<!\w){re.escape(k.strip())}(?!\w)", text, flags))
    return found / len(keywords)


class KeywordReward(Reward):
    name = "keywords"
    description = "the share of required keywords in the completion — petune's third-party reward example"
    Options = KeywordOptions

    def score(self, prompts, completions, fields, options):
        return [keyword_share(c, options.keywords, options.case_sensitive) for c in completions]


@hookimpl
def register_rewards(register):
    register(KeywordReward)
