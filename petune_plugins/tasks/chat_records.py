"""Chat data: records of a data file → conversations (role/content messages), for the tasks
that train a causal LM on chats (``sft``, ``preference``, ``reward``; a new causal-LM task reads
its data with the same functions).

Records come from any file the shared reader takes (:mod:`petune_plugins.tasks.datafiles`:
JSON Lines, a JSON list, also .gz/.zst, CSV/TSV, Parquet, Arrow), a record at a time, each
knowing where it is (``file:line``, and ``record [i]`` for an item of a JSON list). Formats
(``format = "auto"`` tells them apart by the keys of a file's first record)::

    alpaca             {"instruction", "input" (optional), "output"}
    prompt-completion  {"prompt", "completion"}           strings, or lists of messages
    messages           {"messages": [{"role": "system" | "user" | "assistant", "content"}]}
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value"}]}
    text               {"text"}   plain text, trained as it is (only where a task reads with text=True)

A ``.txt`` file (also .gz/.zst) holds text records as plain text: each block of lines between
blank lines is one ``{"text"}`` record, its line breaks kept (a file without blank lines is one
text, cut at a line past a million characters). Not lines: a book or an article wrapped at 80
columns would become a record per line.

Every record becomes a conversation; an optional top-level ``"system"`` string becomes its
system message. A text record is a conversation of one assistant turn (to train on) or, as a
prompt (``need_answer=False``), of one user turn (to continue). A problem with a record is a
:class:`BadRow` inside the readers, raised to the user as a DataError at the record's place.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from petune.errors import DataError, UserError
from petune_plugins.tasks import datafiles
from petune_plugins.tasks.datafiles import json_type
from petune_plugins.tasks.encoding import Spool

__all__ = [
    "FORMAT_HINT", "ROLES", "TEXT_FORMAT_HINT", "BadRow", "Example", "Row", "as_text", "chat_message",
    "detect_format", "iter_rows", "message_list", "parse_records", "read_examples", "record_keys", "to_conversation",
]


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


def _row(value: datafiles.JsonValue) -> Row:
    return Row(value.value, value.where, "" if value.index is None else f"record [{value.index}]")


def iter_rows(path: Path, max_rows: int | None = None) -> Iterator[Row]:
    """Records of a data file, one at a time, through the shared reader: JSON Lines and JSON
    lists (also compressed) may hold any JSON value per record (the format check says what was
    expected), every other records format (CSV/TSV, Parquet, Arrow) comes from
    :func:`datafiles.iter_records`. JSON Lines and columnar files are streamed; a JSON list's
    text is read whole (a record at a time is parsed from it)."""
    kind = datafiles.data_format(path)
    if datafiles.data_suffix(path) == ".txt":
        yield from itertools.islice(_text_blocks(path), max_rows)
    elif kind == "jsonl":  # line by line: the whole text is never held, nor a list of its lines
        values = datafiles.iter_json_lines(datafiles.iter_lines(path), str(path), max_rows=max_rows, objects=False)
        yield from map(_row, values)
    elif kind in ("json", None):
        text = datafiles.read_text(path)
        yield from map(_row, datafiles.iter_json_text(text, str(path), max_rows=max_rows, objects=False))
    else:
        for record in datafiles.iter_records(path, max_rows):
            yield Row(dict(record), record.where)


_BLOCK_CHARACTERS = 1_000_000  # a block without blank lines is cut (at a line) past this: never a whole file in memory


def _text_blocks(path: Path) -> Iterator[Row]:
    """The blank-line separated blocks of a plain text file as ``{"text"}`` records, each at its
    first line (line breaks as "\\n")."""
    block: list[str] = []
    size = start = 0
    for number, line in datafiles.iter_lines(path):
        if line.strip():
            block.append(line.rstrip("\r\n"))
            size, start = size + len(line), start or number
        if block and (not line.strip() or size > _BLOCK_CHARACTERS):
            yield Row({"text": "\n".join(block)}, datafiles.where(path, start))
            block, size, start = [], 0, 0
    if block:
        yield Row({"text": "\n".join(block)}, datafiles.where(path, start))


def parse_records(text: str, source: str, *, jsonl: bool | None = None, max_rows: int | None = None) -> list[Row]:
    """Records of a JSON list or of JSON Lines text (``jsonl=None``: by the first character)."""
    return list(map(_row, datafiles.iter_json_text(text, source, max_rows=max_rows, objects=False, jsonl=jsonl)))


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
FORMAT_HINT = ("expected one of: alpaca {instruction, input, output}; prompt-completion {prompt, completion}; "
               "messages {messages: [{role, content}]}; sharegpt {conversations: [{from, value}]}")
TEXT_FORMAT_HINT = FORMAT_HINT + "; text {text} (plain text, trained as it is)"


class BadRow(Exception):
    """A row problem; becomes a DataError at the row's place."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def detect_format(record, *, text: bool = False) -> str | None:
    """The format of a record by its keys; ``text``: a record with none of the chat formats'
    keys but a "text" is in the text format (for tasks that train on plain text)."""
    if isinstance(record, dict):
        for key, name in _FORMAT_BY_KEY:
            if key in record:
                return name
        if text and "text" in record:
            return "text"
    return None


def record_keys(record: dict) -> str:
    return ", ".join(map(repr, record)) or "none"


def as_text(value, field: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: [{"type": "text", "text": "..."}]
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise BadRow(f"{field} must be a string, got {json_type(value)}")


def _field(record: dict, key: str, *, answer: bool = False) -> str:
    if key not in record:
        what = " (the answer to train on)" if answer else ""
        raise BadRow(f"missing {key!r}{what}; the record has {record_keys(record)}")
    text = as_text(record[key], repr(key))
    if answer and not text.strip():
        raise BadRow(f"{key!r} is empty: nothing to train on", hint="remove the row or fill in the answer")
    return text


def message_list(value, field: str, *, need_answer: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow(f"{field!r} must be a non-empty list of messages, got {json_type(value)}")
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRow(f"{where} must be an object with 'role' and 'content', got {json_type(item)}")
        role_key = "role" if "role" in item else "from" if "from" in item else None
        content_key = "content" if "content" in item else "value" if "value" in item else None
        if role_key is None or content_key is None:
            raise BadRow(f"{where} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                         f"it has {record_keys(item)}")
        role = ROLES.get(str(item[role_key]).strip().lower())
        if role is None:
            raise BadRow(f"{where}: unknown role {item[role_key]!r}",
                         hint=f"known: {', '.join(ROLES)} (tool turns are not supported)")
        content = as_text(item[content_key], f"{where}.{content_key}")
        if role == "assistant" and not content.strip() and need_answer:
            raise BadRow(f"{where} is an empty assistant turn: nothing to train on",
                         hint="remove the turn (and its question) or the row")
        messages.append({"role": role, "content": content})
    return messages


def to_conversation(record, fmt: str, *, need_answer: bool = True) -> list[dict]:
    """The conversation of one record in format ``fmt``; with ``need_answer=False`` (prompts
    for generation) the answer may be missing."""
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {json_type(record)}")
    if fmt == "alpaca":
        instruction = _field(record, "instruction")
        extra = as_text(record.get("input") or "", "'input'")
        user = "\n\n".join(part for part in (instruction, extra) if part.strip())
        if not user.strip():
            raise BadRow("'instruction' and 'input' are both empty: there is no prompt")
        messages = [{"role": "user", "content": user}]
        if need_answer or "output" in record:
            messages.append({"role": "assistant", "content": _field(record, "output", answer=need_answer)})
    elif fmt == "prompt-completion":
        if "prompt" not in record:
            raise BadRow(f"missing 'prompt'; the record has {record_keys(record)}")
        prompt = record["prompt"]
        messages = (message_list(prompt, "prompt", need_answer=need_answer) if isinstance(prompt, list)
                    else [{"role": "user", "content": as_text(prompt, "'prompt'")}])
        if need_answer or "completion" in record:
            completion = record.get("completion")
            if isinstance(completion, list):
                messages += message_list(completion, "completion", need_answer=need_answer)
            else:
                messages.append({"role": "assistant", "content": _field(record, "completion", answer=need_answer)})
    elif fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        if key not in record:
            raise BadRow(f"missing {key!r}; the record has {record_keys(record)}")
        messages = message_list(record[key], key, need_answer=need_answer)
    elif fmt == "text":
        text = _field(record, "text", answer=need_answer)
        if not text.strip():
            raise BadRow("'text' is empty: there is no prompt to continue")
        return [{"role": "assistant" if need_answer else "user", "content": text}]
    else:  # pragma: no cover - Options restrict the names
        raise ValueError(fmt)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise BadRow("the conversation has no assistant turn: nothing to train on")
    return messages


def _format_of(row: Row, fmt: str, text: bool) -> str:
    """``fmt``, or for "auto" the format the file's first record is in."""
    if fmt != "auto":
        return fmt
    found = detect_format(row.data, text=text)
    if found is None:
        first = row.data
        has = f"its first record has keys {record_keys(first)}" if isinstance(first, dict) else \
            f"its first record is {json_type(first)}"
        raise DataError(f"cannot tell the data format: {has}", where=row.where,
                        hint=f"{TEXT_FORMAT_HINT if text else FORMAT_HINT}; or set task.format")
    return found


def read_examples(path: Path, fmt: str, max_rows: int | None, *, text: bool = False) -> tuple[Spool, str]:
    """Conversations of a data file and the format it was read as (``text``: the text format
    is one of those "auto" tells apart). They are spooled to disk as they are read
    (:class:`~petune_plugins.tasks.encoding.Spool`): one pass over the file, never all of its
    records in memory."""
    rows = iter_rows(Path(path), max_rows)
    first = next(rows, None)
    if first is None:
        raise DataError("the data file holds no records", where=str(path))
    fmt = _format_of(first, fmt, text)
    return Spool.write(_examples(itertools.chain([first], rows), fmt, text), desc=Path(path).name), fmt


def _examples(rows: Iterable[Row], fmt: str, text: bool) -> Iterator[Example]:
    for row in rows:
        try:
            yield Example(to_conversation(row.data, fmt), row.where, row.record)
        except BadRow as exc:
            hint = exc.hint
            looks_like = detect_format(row.data, text=text)
            if hint is None and looks_like not in (None, fmt):
                hint = f"this record looks like {looks_like} data; all records of a file must be in one format"
            raise DataError(f"{row.prefix}{exc} ({fmt} format)", where=row.where, hint=hint) from None



def chat_message(message, index: int) -> dict:
    if not isinstance(message, dict) or "content" not in message or "role" not in message:
        raise UserError(f"message [{index}] must be a dict with 'role' and 'content', got {message!r}")
    role = ROLES.get(str(message["role"]).lower())
    if role is None:
        raise UserError(f"message [{index}] has unknown role {message['role']!r}", hint=f"known: {', '.join(ROLES)}")
    if not isinstance(message["content"], str):
        raise UserError(f"message [{index}] content must be text")
    return {"role": role, "content": message["content"]}
