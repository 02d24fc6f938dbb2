"""``json``: rewards completions that are (or contain) valid JSON, optionally valid against a JSON
Schema (checked with the ``jsonschema`` package).

Where the JSON is (``extract``): ``whole`` — the completion without surrounding whitespace;
``fenced`` — the first fenced code block labelled ``json`` or unlabelled (```json ... ```);
``first_value`` — the first ``{...}`` or ``[...]`` that parses; ``auto`` — each of these in
turn. Any JSON value counts (a schema with ``type = "object"`` asks for an object); ``NaN`` and
``Infinity``, which Python would read, do not.

``schema``: an inline table in the recipe, or the path of a ``.json`` file (relative to the
recipe). A schema that is not a valid JSON Schema is refused when the recipe is validated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from petune.api import DataPath, Options, Reward
from petune.errors import UserError

_FENCE = re.compile(r"```[ \t]*(json|JSON)?[ \t]*\r?\n(.*?)```", re.DOTALL)
#: at most this many "{" or "[" are tried as the start of a value (``first_value``)
_STARTS_TRIED = 64


class JsonOptions(Options):
    # `schema` is written `schema_` here (BaseModel has a `schema` method), and dumped by its alias
    model_config = ConfigDict(serialize_by_alias=True)

    extract: Literal["auto", "whole", "fenced", "first_value"] = Field(
        "auto", description="where the JSON is: whole (the completion), fenced (the first ```json block), "
                            "first_value (the first {...} or [...] that parses), auto (each in turn)")
    schema_: dict[str, Any] | DataPath | None = Field(
        None, alias="schema", description="a JSON Schema the value must satisfy: an inline table, or a .json file "
                                          "(relative to the recipe); none: any JSON")
    valid: float = Field(1.0, description="the reward of JSON that satisfies the schema (or any JSON, without one)")
    valid_but_schema_fails: float = Field(0.5, description="the reward of JSON that does not satisfy the schema")
    invalid: float = Field(0.0, description="the reward of a completion with no JSON that parses")

    @model_validator(mode="after")
    def _schema_is_valid(self):
        if isinstance(self.schema_, Path) and not self.schema_.exists():
            return self  # a finished run's recipe read back (paths unchecked): refused by prepare() if needed
        if self.schema_ is not None:
            try:
                check_schema(load_schema(self.schema_))
            except UserError as exc:
                raise ValueError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
        return self


def load_schema(schema: dict | Path) -> dict:
    if isinstance(schema, dict):
        return schema
    try:
        loaded = json.loads(Path(schema).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"the schema file {schema} does not exist", where=str(schema)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the schema file {schema}: {exc}", where=str(schema)) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"the schema file {schema} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                        where=str(schema)) from None
    if not isinstance(loaded, (dict, bool)):
        raise UserError(f"the schema file {schema} holds a {type(loaded).__name__}, not a JSON Schema (an object)",
                        where=str(schema))
    return loaded


def check_schema(schema: dict):
    """A validator for ``schema``, or a UserError saying where the schema itself is wrong."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        at = exc.json_path if exc.path else "the top level"
        raise UserError(f"the schema is not a valid JSON Schema: {exc.message} (at {at})",
                        hint="see https://json-schema.org/understanding-json-schema") from None
    return cls(schema)


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def loads(text: str):
    """(True, value) when ``text`` is one JSON value, else (False, None)."""
    try:
        return True, json.loads(text, parse_constant=_strict)
    except (ValueError, RecursionError):
        return False, None


def first_value(text: str):
    decoder = json.JSONDecoder(parse_constant=_strict)
    starts = [m.start() for m in re.finditer(r"[{\[]", text)][:_STARTS_TRIED]
    for start in starts:
        try:
            return True, decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):
            continue
    return False, None


def extract_json(text: str, how: str):
    """(found, value): the JSON in a completion, looked for as ``how`` says (see the module doc)."""
    if how in ("whole", "auto"):
        found, value = loads(text.strip())
        if found or how == "whole":
            return found, value
    if how in ("fenced", "auto"):
        fence = next((m for m in _FENCE.finditer(text)), None)
        if fence is not None:
            found, value = loads(fence.group(2).strip())
            if found or how == "fenced":
                return found, value
        elif how == "fenced":
            return False, None
    return first_value(text)


class JsonReward(Reward):
    name = "json"
    description = "format: `valid` when the completion is (or holds) JSON, optionally satisfying a JSON Schema"
    Options = JsonOptions

    def prepare(self, options: JsonOptions, device) -> None:
        self._validator(options)

    def _validator(self, options: JsonOptions):
        if options.schema_ is None:
            return None
        key = str(options.schema_) if isinstance(options.schema_, Path) else json.dumps(options.schema_, sort_keys=True)
        cache = self.__dict__.setdefault("_validators", {})
        if key not in cache:
            cache[key] = check_schema(load_schema(options.schema_))
        return cache[key]

    def score(self, prompts, completions, fields, options: JsonOptions) -> list[float | None]:
        validator = self._validator(options)
        scores = []
        for completion in completions:
            found, value = extract_json(completion if isinstance(completion, str) else "", options.extract)
            if not found:
                scores.append(options.invalid)
                continue
            try:
                ok = validator is None or validator.is_valid(value)
            except Exception:  # noqa: BLE001 - the schema failed on this value (e.g. a "pattern" re cannot compile)
                ok = False
            scores.append(options.valid if ok else options.valid_but_schema_fails)
        return scores
