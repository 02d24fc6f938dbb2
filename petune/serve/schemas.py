"""Request bodies of the HTTP API (pydantic).

Types are strict (``"max_tokens": "5"`` is refused, not read as 5) so a wrong type is a 400
naming the field. Unknown fields are ignored: OpenAI clients send more than a small server
uses (``user``, ``logprobs`` ...); the ones that would change the answer and are not
supported (``n`` > 1, ``echo`` ...) are refused by name.

Every text field must be valid Unicode (JSON's ``"\\ud800"`` escape is not), and the fields
whose length drives work are bounded: the run name, each stop string (the stop matcher's
work grows with its length), the number of messages. The body size limit (``--max-body-bytes``)
and the prompt-token limit (``--max-prompt-tokens``) bound the rest.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

#: roles accepted in chat messages; OpenAI's newer "developer" role is a system message
ROLES = ("system", "developer", "user", "assistant")
#: longest run name a request may give (names are chosen at start-up; this only bounds the field)
MAX_MODEL_CHARS = 256
#: longest stop string, and most stop strings per request
MAX_STOP_CHARS = 64
MAX_STOPS = 4
#: most messages in one chat request
MAX_MESSAGES = 1024
#: longest message ``name`` (passed through, not used)
MAX_NAME_CHARS = 256


def not_unicode(text: str) -> str | None:
    """Why ``text`` is no valid Unicode, or None. JSON can carry lone surrogates
    (``"\\ud800"``), but they are no text: tokenizers and the UTF-8 answer would fail on them
    deep inside the server."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"is not valid Unicode text: it holds a lone surrogate ({text[exc.start]!r} at character "
                f"{exc.start}); send the text as UTF-8")
    return None


def _unicode(text: str) -> str:
    problem = not_unicode(text)
    if problem:
        raise ValueError(problem)
    return text


def Text(max_length: int | None = None, min_length: int | None = None):
    """A string field: valid Unicode, optionally bounded in length."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Text()


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text() | list[TextPart]
    name: Text(MAX_NAME_CHARS) | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = Text(MAX_STOP_CHARS) | Annotated[list[Text(MAX_STOP_CHARS)], Field(max_length=MAX_STOPS)] | None


class _Sampling(_Request):
    model: Text(MAX_MODEL_CHARS, min_length=1)
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
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(_Sampling):
    prompt: Text(min_length=1)
    echo: Literal[False] = False
    suffix: None = None


class PairInput(_Request):
    text: Text(min_length=1)
    text_pair: Text() | None = None


class PredictRequest(_Request):
    model: Text(MAX_MODEL_CHARS, min_length=1)
    inputs: list[Text(min_length=1) | PairInput] = Field(min_length=1)
