"""Request bodies of the HTTP API (pydantic).

Types are strict (``"max_tokens": "5"`` is refused, not read as 5) so a wrong type is a 400
naming the field. Unknown fields are ignored: OpenAI clients send more than a small server
uses (``user``, ``logprobs`` ...); the ones that would change the answer and are not
supported (``n`` > 1, ``echo`` ...) are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: roles accepted in chat messages; OpenAI's newer "developer" role is a system message
ROLES = ("system", "developer", "user", "assistant")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value):
        values = [value] if isinstance(value, str) else value or []
        if any(not s for s in values):
            raise ValueError("stop strings must not be empty")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    echo: Literal[False] = False
    suffix: None = None


class PairInput(_Request):
    text: str = Field(min_length=1)
    text_pair: str | None = None


class PredictRequest(_Request):
    model: str = Field(min_length=1)
    inputs: list[Annotated[str, Field(min_length=1)] | PairInput] = Field(min_length=1)
