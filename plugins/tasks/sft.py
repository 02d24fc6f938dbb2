"""Supervised fine-tuning (SFT) of causal language models on instructions and chats.

Data: JSON (a list of records) or JSON Lines (also .gz/.zst), or any other records file the
shared reader takes (CSV/TSV, Parquet, Arrow), in one of four formats; ``format = "auto"``
tells them apart by their keys (from the first record of each file)::

    alpaca             {"instruction", "input" (optional), "output"}
    prompt-completion  {"prompt", "completion"}           strings, or lists of messages
    messages           {"messages": [{"role": "system" | "user" | "assistant", "content"}]}
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value"}]}

Every row becomes a conversation (role/content messages); an optional top-level
``"system"`` string becomes its system message.

Chat template: the model's own when it has one (``chat_template = "auto"`` or ``"model"``);
otherwise a built-in from ``templates/``: ``gemma`` for tokenizers that have Gemma's turn
tokens, ``chatml`` for the rest; ``alpaca`` and ``plain`` (text as is, for prompts that are
already formatted) on request. Built-ins end every turn with one stop token: the format's own
(``<end_of_turn>``, ``<|im_end|>``) when the tokenizer has it as a single token, else EOS. No
token is added, so no embedding is resized. The template is set on the tokenizer, which the
runner saves with the run.

Tokenization and the loss mask are done here, not by TRL: each conversation is rendered
with the template and tokenized once; an assistant turn's characters are located by
rendering the conversation up to that turn with and without the generation prompt (checked
to be a prefix of the whole; a template for which that fails is refused with a reason).
Labels are the token ids on every assistant answer and on its end-of-turn token (the token
generation stops on), -100 everywhere else (system and user turns, template markup, text
after the stop token). SFTTrainer receives ``input_ids`` + ``labels`` and uses them as they
are. This works for any template (no ``{% generation %}`` markers needed) and the mask is
the same for every data format.

Padding-free batches (``padding_free = "auto"``, the default): the examples of a batch are
concatenated into one row with ``position_ids`` restarting at 0 and no attention mask, from
which transformers builds a block-diagonal mask (sdpa, eager, also Gemma 3's sliding-window
layers) or sequence lengths (flash attention). No padding is computed, and the loss is the
same as with padded batches: the mean over the batch's answer tokens (TRL's collator masks
the first label of each example, so no example is trained to predict the next one's start).
Whether examples really cannot see each other depends on the model's attention code, so it is
checked on the model itself (logits of an example packed after another vs. alone,
:func:`choose_batching`); where it does not hold, and for prompt/prefix tuning (whose
virtual tokens would reach only the first example of a row), ``auto`` falls back to padded
batches and the plan says why (``padding_free = true`` is refused there instead).

Packing (``packing = true``): TRL's best-fit packing, several examples per row up to
``max_length``, padding-free as above; fewer, fuller rows, so a step sees more examples and an
epoch has fewer steps. Refused where examples would not be kept apart.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from jinja2 import TemplateError
from petune_plugins.tasks import datafiles
from petune_plugins.tasks._common import SplitOptions, check_data_paths, hold_out, read_held_out, seeded_split
from petune_plugins.tasks.encoding import Spool, encode_split
from pydantic import Field, model_validator

from petune import hookimpl
from petune.api import DataPath, ModelInfo, ModelShape, Task, TaskData
from petune.errors import DataError, Refusal, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_TEMPLATES = ("chatml", "gemma", "alpaca", "plain")
TEMPLATE_DIR = Path(__file__).with_name("templates")
#: new tokens generated for each sample written to samples.jsonl after training
SAMPLE_MAX_NEW_TOKENS = 128


class SftOptions(SplitOptions):
    train: DataPath = Field(description="training data: JSON Lines, a JSON list of records, or any records file")
    validation: DataPath | None = Field(None, description="held-out data: loss, perplexity and sample generations")
    format: Literal["auto", "alpaca", "prompt-completion", "messages", "sharegpt"] = Field(
        "auto", description="data format; auto: by the keys of each file's first record")
    chat_template: Literal["auto", "model", "chatml", "gemma", "alpaca", "plain"] = Field(
        "auto", description="auto: the model's own, else a built-in (gemma for Gemma tokenizers, else chatml)")
    loss_on: Literal["completion", "all"] = Field(
        "completion", description="completion: assistant answers and their stop token only; all: every token")
    max_length: int = Field(512, ge=8, description="tokens per example; longer ones are cut at the end")
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows of each file")
    packing: bool = Field(False, description="pack several examples per row (padding-free, examples kept apart); "
                                             "fewer, fuller rows: changes the examples per step")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="each batch's examples in one row without padding (same examples per step, same loss); "
                            "auto: where the model's attention keeps them apart, else padded batches (the plan says "
                            "which and why)")
    num_sample_generations: int = Field(5, ge=0, description="held-out prompts answered after training (samples.jsonl)")
    loss: Literal["auto", "chunked", "full"] = Field(
        "auto", description="chunked: TRL's fused LM head, never the full-vocabulary logits (less memory); "
                            "full: plain cross-entropy on the logits (faster on a CPU); auto: chunked on a GPU "
                            "or when the logits would pass 1 GiB, else full")

    @model_validator(mode="after")
    def _packing_is_padding_free(self):
        if self.packing and self.padding_free is False:
            raise ValueError("packing = true needs padding-free rows: leave padding_free at 'auto' (or true)")
        return self


# -- reading records ------------------------------------------------------------------------
class Row(NamedTuple):
    """One JSON record and where it is: ``where`` = "file:line"; ``record`` names a record of
    a JSON list ("record [3]", as a one-line list has one line for all) and is empty for
    JSON Lines, whose line says it all."""

    data: Any
    where: str
    record: str = ""

    @property
    def prefix(self) -> str:
        """What starts an error message about this row."""
        return f"{self.record}: " if self.record else ""


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def iter_rows(path: Path, max_rows: int | None = None) -> Iterator[Row]:
    """Records of a data file, through the shared reader, one at a time: JSON Lines and JSON
    lists (also compressed) are parsed here, so a record of a JSON list is named by its index
    too; every other records format (CSV/TSV, Parquet, Arrow) comes from
    :func:`datafiles.iter_records`. JSON Lines and columnar files are streamed; a JSON list's
    text is read whole (a record at a time is parsed from it)."""
    kind = datafiles.data_format(path)
    if kind == "jsonl":  # line by line: the whole text is never held, nor a list of its lines
        empty = True
        for row in _parse_jsonl(datafiles.iter_lines(path), str(path), max_rows):
            empty = False
            yield row
        if empty:
            raise DataError("the data file is empty", where=str(path))
    elif kind in ("json", None):
        yield from _iter_records(datafiles.read_text(path), str(path), max_rows=max_rows)
    else:
        for record in datafiles.iter_records(path, max_rows):
            yield Row(dict(record), record.where)


def parse_records(text: str, source: str, *, jsonl: bool | None = None, max_rows: int | None = None) -> list[Row]:
    """Records of a JSON list or of JSON Lines (``jsonl=None``: by the first character)."""
    return list(_iter_records(text, source, jsonl=jsonl, max_rows=max_rows))


def _iter_records(text: str, source: str, *, jsonl: bool | None = None, max_rows: int | None = None) -> Iterator[Row]:
    start = len(text) - len(text.lstrip())
    if start == len(text):
        raise DataError("the data file is empty", where=source)
    if jsonl is None:
        jsonl = text[start] != "["
    if not jsonl and text[start] != "[":
        raise DataError(f"expected a JSON list of records ([{{...}}, ...]), found {text[start]!r}", where=source,
                        hint="or write one record per line and name the file .jsonl")
    rows = (_parse_jsonl(enumerate(text.split("\n"), 1), source, max_rows) if jsonl
            else _parse_json_list(text, source, start, max_rows))
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError("the data file holds no records", where=source)


def _parse_jsonl(lines: Iterable[tuple[int, str]], source: str, max_rows: int | None) -> Iterator[Row]:
    count = 0
    for number, line in lines:
        if not line.strip():
            continue  # blank lines are allowed
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", where=f"{source}:{number}",
                            hint="JSON Lines: one complete JSON object per line") from None
        yield Row(data, f"{source}:{number}")
        count += 1
        if max_rows is not None and count >= max_rows:
            break


_SPACE = re.compile(r"\s*")


def _parse_json_list(text: str, source: str, start: int, max_rows: int | None) -> Iterator[Row]:
    """A JSON list parsed record by record, so each record knows its line."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    index = -1
    pos = _SPACE.match(text, start + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        index, record_line = index + 1, line_at(pos)
        try:
            data, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON in record [{index}]: {exc.msg} (column {exc.colno})",
                            where=f"{source}:{exc.lineno}") from None
        yield Row(data, f"{source}:{record_line}", f"record [{index}]")
        if max_rows is not None and index + 1 >= max_rows:
            return
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            break
        raise DataError(f"invalid JSON after record [{index}]: expected ',' or ']'", where=f"{source}:{line_at(pos)}")
    rest = text[pos + 1:].strip()
    if rest:
        raise DataError("invalid JSON: extra data after the closing ']'", where=f"{source}:{line_at(pos + 1)}")


# -- records → conversations ----------------------------------------------------------------
class Example(NamedTuple):
    messages: list[dict]
    where: str  # "file:line"
    record: str = ""  # "record [i]" for a record of a JSON list

    prefix = Row.prefix

    @property
    def place(self) -> str:
        """Where, for people: "file:line", with the record index for a JSON list."""
        return f"{self.where} {self.record}".rstrip()


ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant"}
_FORMAT_BY_KEY = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                  ("prompt", "prompt-completion"))
_FORMAT_HINT = ("expected one of: alpaca {instruction, input, output}; prompt-completion {prompt, completion}; "
                "messages {messages: [{role, content}]}; sharegpt {conversations: [{from, value}]}")


class _BadRow(Exception):
    """A row problem; becomes a DataError at the row's place."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def detect_format(record) -> str | None:
    if isinstance(record, dict):
        for key, name in _FORMAT_BY_KEY:
            if key in record:
                return name
    return None


def _keys(record: dict) -> str:
    return ", ".join(map(repr, record)) or "none"


def _text(value, field: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: [{"type": "text", "text": "..."}]
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise _BadRow(f"{field} must be a string, got {_json_type(value)}")


def _field(record: dict, key: str, *, answer: bool = False) -> str:
    if key not in record:
        what = " (the answer to train on)" if answer else ""
        raise _BadRow(f"missing {key!r}{what}; the record has {_keys(record)}")
    text = _text(record[key], repr(key))
    if answer and not text.strip():
        raise _BadRow(f"{key!r} is empty: nothing to train on", hint="remove the row or fill in the answer")
    return text


def _message_list(value, field: str, *, need_answer: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _BadRow(f"{field!r} must be a non-empty list of messages, got {_json_type(value)}")
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise _BadRow(f"{where} must be an object with 'role' and 'content', got {_json_type(item)}")
        role_key = "role" if "role" in item else "from" if "from" in item else None
        content_key = "content" if "content" in item else "value" if "value" in item else None
        if role_key is None or content_key is None:
            raise _BadRow(f"{where} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                          f"it has {_keys(item)}")
        role = ROLES.get(str(item[role_key]).strip().lower())
        if role is None:
            raise _BadRow(f"{where}: unknown role {item[role_key]!r}",
                          hint=f"known: {', '.join(ROLES)} (tool turns are not supported)")
        content = _text(item[content_key], f"{where}.{content_key}")
        if role == "assistant" and not content.strip() and need_answer:
            raise _BadRow(f"{where} is an empty assistant turn: nothing to train on",
                          hint="remove the turn (and its question) or the row")
        messages.append({"role": role, "content": content})
    return messages


def to_conversation(record, fmt: str, *, need_answer: bool = True) -> list[dict]:
    """The conversation of one record in format ``fmt``; with ``need_answer=False`` (prompts
    for generation) the answer may be missing."""
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {_json_type(record)}")
    if fmt == "alpaca":
        instruction = _field(record, "instruction")
        extra = _text(record.get("input") or "", "'input'")
        user = "\n\n".join(part for part in (instruction, extra) if part.strip())
        if not user.strip():
            raise _BadRow("'instruction' and 'input' are both empty: there is no prompt")
        messages = [{"role": "user", "content": user}]
        if need_answer or "output" in record:
            messages.append({"role": "assistant", "content": _field(record, "output", answer=need_answer)})
    elif fmt == "prompt-completion":
        if "prompt" not in record:
            raise _BadRow(f"missing 'prompt'; the record has {_keys(record)}")
        prompt = record["prompt"]
        messages = (_message_list(prompt, "prompt", need_answer=need_answer) if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(prompt, "'prompt'")}])
        if need_answer or "completion" in record:
            completion = record.get("completion")
            if isinstance(completion, list):
                messages += _message_list(completion, "completion", need_answer=need_answer)
            else:
                messages.append({"role": "assistant", "content": _field(record, "completion", answer=need_answer)})
    elif fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        if key not in record:
            raise _BadRow(f"missing {key!r}; the record has {_keys(record)}")
        messages = _message_list(record[key], key, need_answer=need_answer)
    else:  # pragma: no cover - Options restrict the names
        raise ValueError(fmt)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("the conversation has no assistant turn: nothing to train on")
    return messages


def _format_of(row: Row, fmt: str) -> str:
    """``fmt``, or for "auto" the format the file's first record is in."""
    if fmt != "auto":
        return fmt
    found = detect_format(row.data)
    if found is None:
        first = row.data
        has = f"its first record has keys {_keys(first)}" if isinstance(first, dict) else \
            f"its first record is {_json_type(first)}"
        raise DataError(f"cannot tell the data format: {has}", where=row.where,
                        hint=f"{_FORMAT_HINT}; or set task.format")
    return found


def read_examples(path: Path, fmt: str, max_rows: int | None) -> tuple[Spool, str]:
    """Conversations of a data file and the format it was read as. They are spooled to disk
    as they are read (:class:`~petune_plugins.tasks.encoding.Spool`): one pass over the file,
    never all of its records in memory."""
    rows = iter_rows(Path(path), max_rows)
    first = next(rows, None)
    if first is None:
        raise DataError("the data file holds no records", where=str(path))
    fmt = _format_of(first, fmt)
    return Spool.write(_examples(itertools.chain([first], rows), fmt), desc=Path(path).name), fmt


def _examples(rows: Iterable[Row], fmt: str) -> Iterator[Example]:
    for row in rows:
        try:
            yield Example(to_conversation(row.data, fmt), row.where, row.record)
        except _BadRow as exc:
            hint = exc.hint
            looks_like = detect_format(row.data)
            if hint is None and looks_like not in (None, fmt):
                hint = f"this record looks like {looks_like} data; all records of a file must be in one format"
            raise DataError(f"{row.prefix}{exc} ({fmt} format)", where=row.where, hint=hint) from None


# -- chat templates -------------------------------------------------------------------------
_END_OF_TURN = re.compile(r"\{%- set end_of_turn = '([^']*)' -%\}")


def _single_token(tokenizer, text: str) -> bool:
    """Whether ``text`` is one token of this tokenizer (as written inside a template)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def builtin_template(name: str, tokenizer) -> str:
    """The built-in template ``name`` for this tokenizer: its end-of-turn marker is the
    format's own token when the tokenizer has it, else the EOS token."""
    text = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    marker = _END_OF_TURN.search(text)
    if marker and not _single_token(tokenizer, marker.group(1)):
        text = text[: marker.start()] + "{%- set end_of_turn = eos_token -%}" + text[marker.end():]
    return text


def _own_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = template.get("default")
    return template or None


def choose_template(option: str, tokenizer) -> tuple[str, str]:
    """(name, template text): a built-in's name, or "model" for the model's own."""
    own = _own_template(tokenizer)
    if option in BUILTIN_TEMPLATES:
        return option, builtin_template(option, tokenizer)
    if own:
        for name in BUILTIN_TEMPLATES:  # a tokenizer petune saved with a run carries a built-in
            if own == builtin_template(name, tokenizer):
                return name, own
        return "model", own
    if option == "model":
        raise UserError("the model has no chat template of its own", where="task.chat_template",
                        hint="use a built-in: chat_template = 'chatml', 'gemma', 'alpaca' or 'plain' (or 'auto')")
    gemma_tokens = _single_token(tokenizer, "<start_of_turn>") and _single_token(tokenizer, "<end_of_turn>")
    name = "gemma" if gemma_tokens else "chatml"
    return name, builtin_template(name, tokenizer)


#: what rendering a chat template raises: its own raise_exception(), undefined names, bad values
_TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, LookupError)


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not messages:  # apply_chat_template refuses an empty conversation (an answer with no prompt)
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[[]], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
        return rendered[0]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _special_strings(tokenizer) -> set[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    return {s for s in specials if s}


def end_of_turn_token(tokenizer, template: str, name: str) -> str:
    """The token that closes an assistant turn in this template: the one to train and to stop on."""
    if name in BUILTIN_TEMPLATES:
        marker = _END_OF_TURN.search(template)
        token = marker.group(1) if marker else tokenizer.eos_token
        if token is None:
            raise UserError("the tokenizer has no EOS token to end the answers with", where="task.chat_template",
                            hint="use a model whose tokenizer defines eos_token")
        return token
    # the model's own template: render a probe turn and take the first special token after the answer
    answer = "Petune probe answer."
    try:
        question = [{"role": "user", "content": "Hi"}]
        before = render(tokenizer, template, question, add_generation_prompt=True)
        after = render(tokenizer, template, [*question, {"role": "assistant", "content": answer}])
    except _TEMPLATE_ERRORS as exc:
        raise UserError(f"the model's chat template cannot render a user/assistant exchange: {exc}",
                        where="task.chat_template", hint="use a built-in: chat_template = 'chatml'") from None
    at = after.find(answer, len(before) if after.startswith(before) else 0)
    tail = after[at + len(answer):] if at >= 0 else ""
    found = [(tail.find(s), s) for s in _special_strings(tokenizer) if s in tail]
    if not found:
        raise UserError(f"the model's chat template ends an assistant turn with {tail!r}, which holds no special "
                        f"token, so the model could not learn where to stop", where="task.chat_template",
                        hint="use a built-in: chat_template = 'chatml' (ends answers with the EOS token)")
    return min(found)[1]


def ensure_pad_token(tokenizer, stop_tokens: list[str]) -> list[str]:
    """Give the tokenizer a pad token distinct from EOS and the stop tokens, reusing one it
    has when it can; returns the tokens added (they need embedding rows)."""
    avoid = set(stop_tokens) | {tokenizer.eos_token, tokenizer.bos_token}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in avoid:
        return []
    vocab = tokenizer.get_vocab()
    for candidate in ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<|vision_pad|>",
                      "<|fim_pad|>", tokenizer.unk_token):
        if candidate and candidate in vocab and candidate not in avoid:
            tokenizer.pad_token = candidate
            return []
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return ["<pad>"]


class ChatSetup(NamedTuple):
    name: str  # a built-in's name, or "model"
    template: str
    end_of_turn: str  # the token an answer ends with: trained, and generation stops on it
    state: dict  # what a run saves to generate later: template name, stop tokens, pad token (and added tokens)

    @property
    def note(self) -> str:
        return "the model's own" if self.name == "model" else f"{self.name} (built-in)"


def prepare_chat_tokenizer(tokenizer, chat_template: str) -> ChatSetup:
    """Choose the chat template (set on the tokenizer, which the runner saves with the run),
    find its end-of-turn token and give the tokenizer a pad token apart from the stop tokens.
    Shared with the seq2seq task's decoder-only models."""
    name, template = choose_template(chat_template, tokenizer)
    if name != "model":
        tokenizer.chat_template = template  # saved with the run's tokenizer
    end_of_turn = end_of_turn_token(tokenizer, template, name)
    stop_tokens = list(dict.fromkeys(t for t in (end_of_turn, tokenizer.eos_token) if t))
    added = ensure_pad_token(tokenizer, stop_tokens)
    vocab = tokenizer.get_vocab()
    state = {"chat_template": name, "stop_tokens": stop_tokens,
             "stop_token_ids": [vocab[t] for t in stop_tokens if t in vocab],
             "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id}
    if added:
        state.update(added_tokens=added, vocab_size=len(tokenizer))
    return ChatSetup(name, template, end_of_turn, state)


# -- tokenization and the loss mask ---------------------------------------------------------
class TemplateMismatch(UserError):
    """The chat template does not let the answers be located in its output."""


class Encoder:
    """Conversations → input_ids and labels (-100 outside assistant answers)."""

    def __init__(self, tokenizer, template: str, end_of_turn: str, *, loss_on: str, max_length: int):
        self.tokenizer, self.template, self.end_of_turn = tokenizer, template, end_of_turn
        self.loss_on, self.max_length = loss_on, max_length
        end_ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        self.end_of_turn_id = end_ids[0] if len(end_ids) == 1 else None

    def answer_spans(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans to train on: each assistant
        answer through its end-of-turn token."""
        messages = example.messages
        try:
            full = render(self.tokenizer, self.template, messages)
            spans = []
            for k, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = render(self.tokenizer, self.template, messages[:k], add_generation_prompt=True)
                upto = full if k == len(messages) - 1 else render(self.tokenizer, self.template, messages[: k + 1])
                if not (upto.startswith(before) and full.startswith(upto)):
                    raise TemplateMismatch(
                        f"{example.prefix}the chat template renders the first {k} messages of this conversation "
                        f"differently alone than within the whole, so the answer of message [{k}] cannot be located",
                        where=example.where, hint="use a built-in template: task.chat_template = 'chatml'")
                turn = upto[len(before):]
                end = turn.rfind(self.end_of_turn)
                if end < 0:
                    raise TemplateMismatch(
                        f"{example.prefix}the chat template wrote no {self.end_of_turn!r} after the answer of "
                        f"message [{k}]", where=example.where,
                        hint="use a built-in template: task.chat_template = 'chatml'")
                spans.append((len(before), len(before) + end + len(self.end_of_turn)))
        except UserError:
            raise
        except _TEMPLATE_ERRORS as exc:  # the template itself raised (e.g. "roles must alternate")
            raise DataError(f"{example.prefix}the chat template cannot render this conversation: {exc}",
                            where=example.where,
                            hint="fix the row, or use a built-in template: task.chat_template = 'chatml'") from None
        return full, spans

    def encode(self, examples: list[Example]) -> tuple[dict[str, list], dict[str, int]]:
        """Columns for a datasets.Dataset, and counts: examples, truncated, dropped."""
        rendered = [self.answer_spans(e) for e in examples]
        encoded = self.tokenizer([text for text, _ in rendered], add_special_tokens=False,
                                 return_offsets_mapping=True, verbose=False)  # cut below, not here: to count
        columns: dict[str, list] = {"input_ids": [], "labels": [], "conversation": [], "where": []}
        truncated = dropped = 0
        shortest_prompt = None
        for example, (_, spans), ids, offsets in zip(examples, rendered, encoded["input_ids"],
                                                     encoded["offset_mapping"]):
            labels = list(ids) if self.loss_on == "all" else _labels_in_spans(ids, offsets, spans)
            if self.loss_on == "completion" and self.end_of_turn_id is not None:
                ends = sum(1 for token, label in zip(ids, labels) if label == token == self.end_of_turn_id)
                if ends < len(spans):  # every answer must train its stop token
                    raise UserError(f"{example.prefix}cannot build the loss mask: the tokenizer's character offsets "
                                    f"do not line up with the rendered text ({self.end_of_turn!r} of an answer was "
                                    f"not found)", where=example.where,
                                    hint="report it with the model's name; loss_on = 'all' trains without a mask")
            if len(ids) > self.max_length:
                truncated += 1
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == -100 for label in labels):  # truncation cut every answer token
                dropped += 1
                prompt = next((i for i, (start, _) in enumerate(offsets) if spans and start >= spans[0][0]),
                              len(offsets))
                shortest_prompt = prompt if shortest_prompt is None else min(shortest_prompt, prompt)
                continue
            columns["input_ids"].append(list(ids))
            columns["labels"].append(labels)
            columns["conversation"].append(example.messages)
            columns["where"].append(example.place)
        counts = {"examples": len(columns["input_ids"]), "truncated": truncated, "dropped": dropped}
        if shortest_prompt is not None:
            counts["shortest_dropped_prompt"] = shortest_prompt
        return columns, counts


def _labels_in_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token ids whose first character lies in a span, -100 for the others (a token that
    straddles the start of an answer belongs to the prompt)."""
    labels, span = [], 0
    for token, (start, _) in zip(ids, offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        labels.append(token if span < len(spans) and spans[span][0] <= start else -100)
    return labels


# -- packing safety ---------------------------------------------------------------------------
def _is_prompt_learning(model) -> bool:
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def _device_of(model):
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def check_packing_keeps_examples_apart(model, tokenizer, where: str = "task.packing") -> None:
    """Refuse packing unless an example packed after another gives the same logits as alone."""
    why_not = examples_kept_apart(model, tokenizer)
    if why_not is not None:
        raise Refusal(f"packing {why_not}", where=where, hint=f"set {where} = false")


def examples_kept_apart(model, tokenizer) -> str | None:
    """None when an example packed after another in one row (``position_ids`` restarting at 0,
    no attention mask) gives the same logits as alone; else why examples in one row would not
    be kept apart, as words that follow "packing"."""
    import torch

    if _is_prompt_learning(model):
        return ("cannot be combined with prompt or prefix tuning: the virtual tokens are added once per packed row, "
                "so only its first example would see them")
    if any(p.is_meta for p in model.parameters()):
        return ("cannot be checked in this process: the model's weights are not loaded here (e.g. FSDP's "
                "CPU-RAM-efficient loading)")
    ids = tokenizer("the quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)["input_ids"]
    first, second = ids[:6], ids[6:12]
    device = _device_of(model)
    joined = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # use_cache=False as in training: a cache disables the packed-sequence mask
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
            packed = model(input_ids=joined, position_ids=positions, use_cache=False).logits[0, len(first):].float()
            shared = model(input_ids=joined, use_cache=False).logits[0, len(first):].float()
    finally:
        model.train(was_training)
    isolated = (packed - alone).abs().max().item()
    leaked = (shared - alone).abs().max().item()  # what attending across examples looks like
    if not isolated <= max(1e-3, 0.05 * leaked):
        return (f"would let examples attend to each other with this model (attention implementation "
                f"{_attention_of(model)!r}): an example packed after another gives logits that differ from the "
                f"example alone by {isolated:.3g}")
    return None


def _attention_of(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "unknown"


class Batching(NamedTuple):
    """How an SFT trainer batches its examples, and the words the plan shows for it."""

    padding_free: bool
    plan: str


def choose_batching(model, tokenizer, packing: bool, padding_free: bool | str) -> Batching:
    """Padding-free rows where this model's attention keeps the examples of a row apart
    (checked on the model itself: transformers builds a block-diagonal mask from restarting
    ``position_ids`` for sdpa/eager, flash attention uses the sequence lengths), else padded
    batches. ``packing`` and ``padding_free = true`` are refused where they cannot hold."""
    if packing:
        check_packing_keeps_examples_apart(model, tokenizer)
        return Batching(True, "packed: several examples per row (best-fit), no padding, kept apart by position ids")
    if padding_free is False:
        return Batching(False, "padded batches (task.padding_free = false)")
    why_not = examples_kept_apart(model, tokenizer)
    if why_not is None:
        return Batching(True, f"padding-free: a batch's examples in one row, no padding; the model's "
                              f"{_attention_of(model)} attention keeps them apart (checked)")
    if padding_free is True:
        raise Refusal(f"padding-free batches {why_not}", where="task.padding_free",
                      hint="set task.padding_free = 'auto' (padded batches where they cannot be kept apart)")
    return Batching(False, f"padded batches: padding-free rows {why_not}")



#: a causal LM trained on next-token labels over the whole vocabulary (memory estimate)
CAUSAL_LM_SHAPE = ModelShape("AutoModelForCausalLM", labels="tokens", causal_lm_loss=True)

# -- the task ---------------------------------------------------------------------------------
class CausalLmTask(Task):
    """What the tasks that train a causal LM on text share: the model they accept, the
    estimate's model shape and sequence length, what explain reads."""

    peft_task_type = "CAUSAL_LM"
    explained_output = "next_token"  # petune explain: attributions for the next token

    def model_shape(self, config) -> ModelShape:
        return CAUSAL_LM_SHAPE

    def sequence_length(self, options) -> int:
        return options.max_length

    def check(self, model_info: ModelInfo, options) -> None:
        if not _is_decoder_only(model_info):
            raise Refusal(f"the {self.name} task trains a causal (decoder-only) language model, and {model_info.name} "
                          f"is a {model_info.model_type} model that does not generate text", where="task.name",
                          hint="use a causal LM (e.g. gemma-3-270m), or a task for encoders: classification, ner")
        limit = model_info.max_positions
        if limit and options.max_length > limit:
            raise Refusal(f"task.max_length = {options.max_length} is longer than the model's context "
                          f"({limit} positions)", where="task.max_length",
                          hint=f"set task.max_length to {limit} or less")
        check_data_paths(options)  # before any model loads, as in every task


class SftTask(CausalLmTask):
    name = "sft"
    description = "supervised fine-tuning of a causal LM on instructions or chats (TRL SFTTrainer)"
    Options = SftOptions
    primary_metric = "loss"
    token_level_loss = True

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: SftOptions, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        examples: dict[str, Spool] = {}
        examples["train"], fmt = read_examples(options.train, options.format, options.max_rows)
        examples.update(self._read_held_out(options))
        examples["train"] = hold_out(examples["train"], examples, options, str(options.train))
        return self._encode(examples, options, tokenizer, fmt)

    def load_eval_data(self, options: SftOptions, tokenizer: PreTrainedTokenizerBase, state: dict) -> TaskData:
        data = self._encode(self._read_held_out(options), options, tokenizer, state.get("format"))
        data.state = state  # the run's own: its tokenizer was set up (pad token added ...) when it trained
        return data

    @staticmethod
    def _read_held_out(options: SftOptions) -> dict[str, Spool]:
        return read_held_out(options, lambda split, path: read_examples(path, options.format, options.max_rows)[0])

    @staticmethod
    def _encode(examples: dict[str, Spool], options: SftOptions, tokenizer, fmt) -> TaskData:
        chat = prepare_chat_tokenizer(tokenizer, options.chat_template)  # a saved run's tokenizer keeps its own
        encoder = Encoder(tokenizer, chat.template, chat.end_of_turn, loss_on=options.loss_on,
                          max_length=options.max_length)
        datasets, notes = {}, {}
        notes["chat_template"] = chat.note
        for split, split_examples in examples.items():
            dataset, counts = encode_split(split_examples, encoder.encode, desc=split,  # in batches, to Arrow
                                           combine={"shortest_dropped_prompt": min})
            if counts["examples"] == 0:
                where = str(options.train if split == "train" or split == "validation" and options.validation is None
                            else getattr(options, split))
                raise DataError(f"all {counts['dropped']} {split} examples lose every answer token at "
                                f"max_length = {options.max_length}: the prompts alone are that long "
                                f"(the shortest takes {counts.get('shortest_dropped_prompt')} tokens)", where=where,
                                hint="raise task.max_length, or shorten the prompts")
            datasets[split] = dataset
            notes[f"{split}_truncated"] = counts["truncated"]
            notes[f"{split}_dropped"] = counts["dropped"]

        state = {"format": fmt, **chat.state, "loss_on": options.loss_on, "max_length": options.max_length}
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: SftOptions, state: dict, **load_kwargs):
        return build_causal_lm(model_info, state, **load_kwargs)

    def head_modules(self, model) -> list[str]:
        return []

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options: SftOptions, args: dict, callbacks: list):
        chunked = loss_memory(options.loss, args.get("per_device_train_batch_size", 1), options.max_length,
                              model.config) == "chunked"
        batching = choose_batching(model, tokenizer, options.packing, options.padding_free)
        return make_sft_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                                max_length=options.max_length, packing=options.packing,
                                padding_free=batching.padding_free, chunked_loss=chunked)

    def training_plan(self, model, tokenizer, options: SftOptions) -> dict[str, str]:
        return {"batching": choose_batching(model, tokenizer, options.packing, options.padding_free).plan}

    def loss_memory(self, options: SftOptions, batch_size: int, config, device: str | None = None) -> str:
        """How this run computes its loss, for the memory estimate."""
        return loss_memory(options.loss, batch_size, options.max_length, config, device)

    def prepare_skeleton(self, model, quantized: bool) -> None:
        cast_trainable_to_bf16(model, quantized)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, trainer, data: TaskData, options: SftOptions, run_dir: Path) -> dict[str, dict]:
        metrics = {}
        for split in ("validation", "test"):
            dataset = getattr(data, split)
            if dataset is not None and len(dataset):
                metrics[split] = held_out_loss(trainer, dataset)
        if options.num_sample_generations and trainer.is_world_process_zero():
            samples = self.sample_generations(trainer.model, trainer.processing_class, options, data,
                                              options.num_sample_generations)
            if samples:
                from petune import artifacts

                artifacts.write_text(Path(run_dir) / "samples.jsonl",
                                     "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        return metrics

    def sample_generations(self, model, tokenizer, options, data: TaskData, count: int) -> list[dict]:
        """Answers to the first held-out prompts (validation, else test, else train)."""
        splits = (("validation", data.validation), ("test", data.test), ("train", data.train))
        split, dataset = next(((name, d) for name, d in splits if d is not None and len(d)), (None, None))
        if dataset is None:
            return []
        samples = []
        for row in dataset.select(range(min(count, len(dataset)))):
            messages = row["conversation"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
            generated = self.generate(model, tokenizer, options, data.state, prompt,
                                      max_new_tokens=SAMPLE_MAX_NEW_TOKENS)
            samples.append({"split": split, "where": row["where"], "messages": prompt,
                            "expected": messages[last]["content"], "generated": generated})
        return samples

    # -- generation -------------------------------------------------------------------------
    def generate(self, model, tokenizer, options, state: dict, messages: list[dict], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | str | None = None,
                 seed: int | None = None) -> str:
        """The model's answer to ``messages`` (role/content dicts), rendered with the run's chat
        template and its generation prompt. Greedy when ``temperature == 0``; stops at the
        end-of-turn/EOS token or at any ``stop`` string (not included); returns only new text."""
        import copy

        import torch

        messages = [_chat_message(m, i) for i, m in enumerate(messages)]
        prompt = render(tokenizer, _template_for(tokenizer, state), messages, add_generation_prompt=True)
        device = _device_of(model)
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
        prompt_length = inputs["input_ids"].shape[1]
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if context:
            if prompt_length >= context:
                raise UserError(f"the prompt takes {prompt_length} tokens, and the model's context is {context}",
                                hint="shorten the prompt or the conversation (chat: /reset)")
            max_new_tokens = min(max_new_tokens, context - prompt_length)
        stop_ids = _stop_token_ids(tokenizer, state, model)
        config = copy.deepcopy(model.generation_config)
        sampling = temperature > 0
        config.update(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=stop_ids,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
                      temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                      top_k=None, min_new_tokens=None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        extra = {"stop_strings": stop, "tokenizer": tokenizer} if stop else {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _seeded(seed if sampling else None, device):
                output = model.generate(**inputs, generation_config=config, **extra)
        finally:
            model.train(was_training)
        new = output[0, prompt_length:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    # -- batch prediction (petune predict) --------------------------------------------------
    def parse_inputs(self, options: SftOptions, text: str, source: str) -> list[dict]:
        """Prompts from JSON Lines or a JSON list: strings, or records in any training format
        (answers optional; a conversation's final assistant turn is kept as ``expected``)."""
        inputs = []
        for row in parse_records(text, source):
            record = row.data
            try:
                if isinstance(record, str):
                    messages = [{"role": "user", "content": record}]
                else:
                    fmt = options.format if options.format != "auto" else detect_format(record)
                    if fmt is None:
                        raise _BadRow(f"cannot tell the format of this record (keys {_keys(record)})"
                                      if isinstance(record, dict) else f"expected a string or an object, got "
                                                                         f"{_json_type(record)}", hint=_FORMAT_HINT)
                    messages = to_conversation(record, fmt, need_answer=False)
            except _BadRow as exc:
                raise DataError(f"{row.prefix}{exc}", where=row.where, hint=exc.hint) from None
            expected = None
            if messages[-1]["role"] == "assistant":
                expected = messages.pop()["content"]
            if not messages:
                raise DataError(f"{row.prefix}no prompt before the answer", where=row.where)
            inputs.append({"messages": messages, "expected": expected, "where": row.where})
        return inputs

    def predict(self, model, tokenizer, options: SftOptions, state: dict, rows: list[dict]) -> list[dict]:
        return [{"generated": self.generate(model, tokenizer, options, state, row["messages"])} for row in rows]

    def format_predictions(self, rows: list[dict], predictions: list[dict]) -> str:
        lines = []
        for row, prediction in zip(rows, predictions):
            line = {"where": row["where"], "messages": row["messages"], "generated": prediction["generated"]}
            if row.get("expected") is not None:
                line["expected"] = row["expected"]
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        return "".join(lines)


# -- helpers ----------------------------------------------------------------------------------
def build_causal_lm(model_info: ModelInfo, state: dict, **load_kwargs):
    """The causal LM for a run whose tokenizer was prepared here: embeddings resized for an
    added pad token, pad id set, generation stopping on the trained end-of-turn token.
    Shared with the seq2seq task's decoder-only models."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_info.path, **load_kwargs)
    vocab_size = state.get("vocab_size")
    if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)  # a pad token was added (the tokenizer had none to reuse)
    if state.get("pad_token_id") is not None:
        model.config.get_text_config().pad_token_id = state["pad_token_id"]
        model.generation_config.pad_token_id = state["pad_token_id"]
    # generation stops on the trained end-of-turn token, here and in a merged export
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos += [i for i in state.get("stop_token_ids", []) if i not in eos]
    if eos:
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    return model


def loss_memory(loss: str, batch_size: int, max_length: int, config, device: str | None = None) -> str:
    """"chunked" (TRL's fused LM head: no full-vocabulary logits) or "logits" (plain cross-entropy).
    auto: chunked on a GPU, or when fp32 logits + softmax + gradient would pass 1 GiB."""
    if loss != "auto":
        return "chunked" if loss == "chunked" else "logits"
    import torch

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    return "chunked" if on_gpu or 12 * batch_size * max_length * vocab > 2**30 else "logits"


def make_sft_trainer(*, model, tokenizer, data: TaskData, args: dict, callbacks: list, max_length: int,
                     packing: bool = False, padding_free: bool = False, chunked_loss: bool = True):
    """TRL's SFTTrainer on datasets already tokenized here (``input_ids`` + ``labels``, cut to
    ``max_length``). Shared with the seq2seq task's decoder-only models. ``padding_free``: the
    examples of a batch in one row (the caller has checked that the model keeps them apart);
    the loss stays the mean over the batch's answer tokens, as with padded batches."""
    from trl import SFTConfig, SFTTrainer

    if packing:
        check_packing_keeps_examples_apart(model, tokenizer)
    padding_free = padding_free or packing
    config = {
        "bf16": False,  # TrainingArguments' default; SFTConfig's is True
        **_checkpointing_args(args, SFTConfig),
        # examples are already cut to max_length; TRL refuses it for padding-free rows without packing
        "max_length": max_length if packing or not padding_free else None,
        "packing": packing,
        "packing_strategy": "bfd",  # whole examples, padding-free: position_ids restart per example
        "padding_free": padding_free,
        "assistant_only_loss": False,  # labels come with the data
        "completion_only_loss": None,
    }
    if data.validation is None:
        config["eval_strategy"] = "no"
    trainer = SFTTrainer(model=model, args=SFTConfig(**config), train_dataset=data.train,
                         eval_dataset=data.validation, processing_class=tokenizer, callbacks=callbacks)
    if not chunked_loss:
        # TRL's fused LM head has no fast kernel on a CPU (1.4–1.8× slower steps, measured in
        # benchmarks/); when the logits are small, transformers' own loss is the better trade.
        import types

        from transformers import Trainer

        trainer.compute_loss = types.MethodType(Trainer.compute_loss, trainer)
    return trainer


def _checkpointing_args(args: dict, config_class) -> dict:
    """``args`` with activation (gradient) checkpointing off unless asked for: SFTConfig turns it
    on by default. transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*
    (the old names still work, with a warning); pass whichever name this version has."""
    args = dict(args)
    fields = getattr(config_class, "__dataclass_fields__", {})
    for old, new, default in (("gradient_checkpointing", "activation_checkpointing", False),
                              ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", None)):
        value = args.pop(new, None)
        old_value = args.pop(old, None)
        value = old_value if value is None else value
        args[new if new in fields else old] = default if value is None else value
    return args


def _is_decoder_only(model_info: ModelInfo) -> bool:
    try:
        return model_info.is_decoder_only
    except ImportError:  # petune.api imports MODEL_FOR_CAUSAL_LM_MAPPING_NAMES from where transformers 5 lacks it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return (not model_info.is_encoder_decoder and not model_info.config.architectures
                and model_info.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def split_off(examples: list, fraction: float, seed: int, *, where: str) -> tuple[list, list]:
    """(train, validation): the tasks' one seeded split (kept under this name for the preference task)."""
    return seeded_split(examples, fraction, seed, where)


def held_out_loss(trainer, dataset) -> dict:
    """Mean loss per answer token over a dataset (summed over tokens, not averaged per batch)
    and its perplexity, exp(loss)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(dataset):
                batch = trainer._prepare_inputs(batch)
                with trainer.compute_loss_context_manager():
                    # TRL's fused LM head: per-token log-probabilities without the full logits
                    out = model(**batch, use_cache=False, fused_lm_head=True)
                nll -= out.log_probs.double().sum().item()
                tokens += int(out.label_mask.sum().item())
    finally:
        model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
            "examples": len(dataset)}


def _chat_message(message, index: int) -> dict:
    if not isinstance(message, dict) or "content" not in message or "role" not in message:
        raise UserError(f"message [{index}] must be a dict with 'role' and 'content', got {message!r}")
    role = ROLES.get(str(message["role"]).lower())
    if role is None:
        raise UserError(f"message [{index}] has unknown role {message['role']!r}", hint=f"known: {', '.join(ROLES)}")
    if not isinstance(message["content"], str):
        raise UserError(f"message [{index}] content must be text")
    return {"role": role, "content": message["content"]}


def _template_for(tokenizer, state: dict) -> str:
    template = _own_template(tokenizer)
    if template:
        return template  # the template saved with the run's tokenizer: exactly the one trained with
    name = state.get("chat_template")
    if name in BUILTIN_TEMPLATES:
        return builtin_template(name, tokenizer)
    raise UserError("the run's tokenizer has no chat template", hint="re-run training, or check RUN_DIR/tokenizer")


def _stop_token_ids(tokenizer, state: dict, model) -> list[int]:
    vocab_ids = [tokenizer.convert_tokens_to_ids(t) for t in state.get("stop_tokens", [])]
    ids = [i for i in vocab_ids if i is not None and i != tokenizer.unk_token_id]
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


@contextmanager
def _seeded(seed: int | None, device):
    """Seed sampling without touching the caller's random state."""
    if seed is None:
        with nullcontext():
            yield
        return
    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@hookimpl
def register_tasks(register):
    register(SftTask)


def cast_trainable_to_bf16(model, quantized: bool) -> None:
    """What TRL's trainers do to a 4-bit model before training, mirrored for the memory
    estimate: the trainable (LoRA) weights become bf16, as in the QLoRA paper, which halves
    their gradients and optimizer states; DoRA's magnitude vectors stay in fp32."""
    import torch

    if not quantized:
        return
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_magnitude_vector" not in name and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
