"""Every other peft method through one strategy: ``[strategy] name = "peft"``, ``method = "ia3"``.

The options of a method are not copied here: they are read from the installed peft's config
class (its dataclass fields, their types, defaults and help texts) and turned into a strict
petune schema, so a new peft release brings its new methods and options with it. What this
module keeps by hand is only which methods it does not offer, and why (``_NOT_OFFERED``).

* Validation works like every petune schema: an unknown key is an error with the closest valid
  key of that method, a wrong type names the key and the expected type; peft's own cross-field
  rules (``__post_init__``) run in ``check`` — on the config alone, before any model loads.
* The task head is trained in full and saved with the adapter (peft ``modules_to_save``), so
  ``PeftModel.from_pretrained`` on a fresh base gives back the trained model.
* A base that is already quantised (bitsandbytes, GPTQ ...) is refused unless the installed
  peft has layers for that quantisation in the method's package (``peft/tuners/<method>/bnb.py``).
* AdaLoRA reallocates ranks during training: a trainer callback calls peft's
  ``update_and_allocate`` after every optimizer step, as peft requires.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import importlib.util
import types
import typing
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from petune import hookimpl
from petune.api import Options, Strategy
from petune.console import out
from petune.errors import Refusal, UserError
from petune_plugins.strategies._common import (
    check_target_names,
    head_modules,
    is_4bit,
    quantization_method,
    restore_peft,
)

# Methods the installed peft has that this strategy does not offer, with the reason and what
# to use instead. Every prompt-learning (virtual-token) method is refused as well, generically.
_NOT_OFFERED = {
    "lora": "LoRA has its own strategies, with petune's initialisations: use strategy 'lora' (or 'qlora' on a 4-bit base)",
    "xlora": "X-LoRA mixes LoRA adapters trained before; it needs a list of trained adapters, not a recipe line",
    "poly": "Poly routes each example by a task id, which petune's tasks do not produce",
    "trainable_tokens": "it trains the embeddings of listed token ids (tokens a tokenizer gained), and petune's "
                        "tasks add none",
    "adaption_prompt": "adaption prompts are virtual tokens for Llama-style causal attention only: use strategy "
                       "'prompt_tuning'",
}
_PROMPT_LEARNING = ("it trains virtual tokens, not weights: use strategy 'prompt_tuning' (method = 'prompt' or "
                    "'prefix')")

# Config fields petune fills in itself (the task's peft type, the head to save) or that only
# describe a saved adapter.
_SET_BY_PETUNE = {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision",
                  "inference_mode", "peft_version", "modules_to_save"}

# Config fields that, left unset, petune fills in from the run's schedule: the number of optimizer
# steps (AdaLoRA's rank budget runs over them). Until the trainer exists a placeholder stands in.
_FROM_SCHEDULE = ("total_step",)


# -- the methods of the installed peft -------------------------------------------------------------
@functools.cache
def _config_classes() -> dict[str, type]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)).lower(): cls for k, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def refusal_reason(method: str) -> str | None:
    """Why ``method`` is not offered, or None when it is."""
    if method in _NOT_OFFERED:
        return _NOT_OFFERED[method]
    from peft.config import PromptLearningConfig

    cls = _config_classes().get(method)
    if cls is not None and issubclass(cls, PromptLearningConfig):
        return _PROMPT_LEARNING
    return None


def offered_methods() -> list[str]:
    return sorted(m for m in _config_classes() if refusal_reason(m) is None)


def method_summary(method: str) -> str:
    """First sentence of the config class's docstring that says more than 'stores the configuration'."""
    doc = (_config_classes()[method].__doc__ or "").strip()
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        if text and not text.startswith(("Args", "This is the configuration class", "Configuration class of", "Paper")):
            return text.split(". ")[0].rstrip(".")[:160]
    return ""


def _supports_quantisation(method: str, quant: str) -> bool:
    """peft ships per-method layers for quantised bases as modules beside the method's config."""
    module = {"bitsandbytes": "bnb"}.get(quant, quant)
    package = _config_classes()[method].__module__.rpartition(".")[0]
    try:
        return importlib.util.find_spec(f"{package}.{module}") is not None
    except ModuleNotFoundError:
        return False


# -- options schema built from the peft dataclass -----------------------------------------------
_TOML_SCALARS = (bool, int, float, str)


def _toml_type(tp: Any) -> Any:
    """The peft annotation as a type a TOML value can have, or None (nested configs, enums ...)."""
    if tp is type(None) or tp in _TOML_SCALARS:
        return tp
    if tp is Any:
        return Any
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return tp
    if origin in (typing.Union, types.UnionType):
        kept = [t for t in (_toml_type(a) for a in args) if t is not None]
        if not kept or kept == [type(None)]:
            return None
        return functools.reduce(lambda a, b: a | b, kept) if len(kept) > 1 else kept[0]
    if tp in (list, tuple) or origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        items = [_toml_type(a) for a in inner]
        if any(i is None for i in items):
            return None
        if not items:
            return list[Any]
        item = items[0] if len(set(items)) == 1 else functools.reduce(lambda a, b: a | b, items)
        return list[item]  # TOML has arrays, not tuples
    if tp is dict or origin is dict:
        value = _toml_type(args[1]) if len(args) == 2 else Any
        return None if value is None else dict[str, value]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return None  # always paired with its str spelling in peft's annotations
    return None


def _describe(tp: Any) -> str:
    """A type as people read it: 'integer or list of integers or none'."""
    if tp is type(None):
        return "none"
    names = {bool: "true or false", int: "integer", float: "number", str: "string", Any: "any value"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        # typing caches unions without regard to order, so args come in whichever order an equal
        # union was first written: sort them (plain types, then containers, none last)
        ordered = sorted(args, key=lambda a: (a is type(None), typing.get_origin(a) is not None, _describe(a)))
        return " or ".join(_describe(a) for a in ordered)
    if origin is list:
        return f"list of ({_describe(args[0])})" if args else "list"
    if origin is dict:
        return f"table of ({_describe(args[1])})" if len(args) == 2 else "table"
    return getattr(tp, "__name__", str(tp))


def _help(field: dataclasses.Field) -> str:
    return " ".join(str(field.metadata.get("help", "")).split())


class PeftOptions(Options):
    """``method`` plus the options of that method's peft config class (see ``schema_for``).

    ``PeftOptions.model_validate`` picks the method's schema from ``method`` and returns an
    instance of it; every schema is a subclass of this class."""

    method: str = Field(description="the peft method: see `petune methods` (peft's own config class gives its options)")

    #: the peft config class of the method (set on each method's schema)
    peft_config_class: ClassVar[type | None] = None
    #: options of the peft config a recipe cannot set: name → why
    not_settable: ClassVar[dict[str, str]] = {}

    @classmethod
    def model_validate(cls, obj: Any, **kwargs):
        if cls is not PeftOptions or not isinstance(obj, dict):
            return super().model_validate(obj, **kwargs)
        method = obj.get("method")
        if method is None:
            _raise("method", PydanticCustomError("missing", "required: which peft method to train (see `petune methods`)"), obj)
        if not isinstance(method, str):
            _raise("method", PydanticCustomError("string_type", "expected a string"), method)
        schema = schema_for(method)  # raises a ValidationError for unknown or refused methods
        try:
            return schema.model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise _readable(schema, exc, obj) from None

    def peft_kwargs(self) -> dict:
        """The options as keyword arguments of the peft config class."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != "method"}


def _raise(key: str, error: PydanticCustomError, value: Any) -> typing.NoReturn:
    raise ValidationError.from_exception_data(
        "PeftOptions", [{"type": error, "loc": (key,), "input": value if not isinstance(value, dict) else {key: value}}])


class _MethodOptions(PeftOptions):
    # peft's defaults are peft's business (a few are tuples where a recipe writes a list)
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


@functools.cache
def _schema_cache(method: str) -> type[PeftOptions]:
    cls = _config_classes()[method]
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {"method": (Literal[method], Field(description=method_summary(method)))}
    not_settable: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in _SET_BY_PETUNE:
            continue
        tp = _toml_type(hints[f.name])
        if tp is None:
            not_settable[f.name] = f"its type ({hints[f.name]}) is not something a recipe can write"
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
            if isinstance(default, enum.Enum):
                default = default.value
            if isinstance(default, tuple):
                default = list(default)
            info = Field(default, description=_help(f))
        elif f.default_factory is not dataclasses.MISSING:
            info = Field(default_factory=f.default_factory, description=_help(f))
        else:
            info = Field(description=_help(f))
        if f.default is None and tp is not Any and type(None) not in typing.get_args(tp):
            tp = tp | None  # peft annotates some None defaults as plain int / str
        fields[f.name] = (tp, info)
    schema = create_model(f"{cls.__name__.removesuffix('Config')}Options", __base__=_MethodOptions, **fields)
    schema.peft_config_class = cls
    schema.not_settable = not_settable
    return schema


def schema_for(method: str) -> type[PeftOptions]:
    """The options schema of ``method``; a ValidationError at ``method`` when it is not offered."""
    known = _config_classes()
    if method not in known:
        close = difflib.get_close_matches(method.lower(), offered_methods(), n=1, cutoff=0.6)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        _raise("method", PydanticCustomError(
            "unknown_method", f"unknown peft method {method!r}{hint} (the installed peft offers: "
                              f"{', '.join(offered_methods())}; `petune methods` lists their options)"), method)
    reason = refusal_reason(method)
    if reason:
        _raise("method", PydanticCustomError("refused_method", f"method {method!r} is not offered by strategy 'peft': {reason}"),
               method)
    return _schema_cache(method)


def _readable(schema: type[PeftOptions], exc: ValidationError, data: dict) -> ValidationError:
    """The schema's errors, with unknown keys answered by the closest option of *this method* and
    one error per key for union types (not one per union member)."""
    method = data.get("method")
    valid = sorted(schema.model_fields)
    out, seen_union = [], set()
    for err in exc.errors():
        loc = err["loc"]
        key = str(loc[0]) if loc else ""
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            if key in schema.not_settable:
                msg = f"option of {method} that petune cannot pass from a recipe: {schema.not_settable[key]}"
            elif key in _SET_BY_PETUNE:
                msg = "set by petune (the task's peft task type, its head as modules_to_save), not by a recipe"
            else:
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                msg = (f"unknown key — did you mean strategy.{close[0]}?" if close
                       else f"unknown key for method {method!r} (its options: {', '.join(valid)})")
            out.append({"type": PydanticCustomError("unknown_key", msg), "loc": (key,), "input": {key: err["input"]}})
            continue
        field = schema.model_fields.get(key)
        if field is not None and len(loc) > 1 and typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
            if key in seen_union:
                continue
            seen_union.add(key)
            out.append({"type": PydanticCustomError("wrong_type", f"expected {_describe(field.annotation)}"),
                        "loc": (key,), "input": data.get(key)})
            continue
        line = {"type": err["type"], "loc": loc, "input": err["input"]}
        if "ctx" in err:
            line["ctx"] = err["ctx"]
        out.append(line)
    return ValidationError.from_exception_data(schema.__name__, out)


def _saves_modules(config_class: type) -> bool:
    return "modules_to_save" in {f.name for f in dataclasses.fields(config_class)}


# -- the strategy ----------------------------------------------------------------------------------
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}

# What peft raises when a method does not fit a model or its options (target modules it cannot
# wrap, shapes, block sizes, layers it has no implementation for): a user's choice, said in peft's
# words (exit 2). Anything else (AttributeError, KeyError ...) is a bug, petune's or peft's, and
# surfaces as an internal error with its traceback rather than as the user's mistake.
_PEFT_MISFITS = (ValueError, TypeError, RuntimeError, NotImplementedError)


class PeftMethodStrategy(Strategy):
    name = "peft"
    description = ("any other peft method — IA3, VeRA, LoHa, LoKr, OFT, BOFT, AdaLoRA, FourierFT, HRA ... "
                   "(method = '...'); options come from peft's own config class")
    Options = PeftOptions
    artifact = "adapter"

    @staticmethod
    def method_listing(method: str | None = None) -> list[dict]:
        """For ``petune methods``: every method of the installed peft, offered (with options) or why not."""
        return method_listing(method)

    def check(self, task, model_info, options):
        method = options.method
        model_config = model_info.config if model_info is not None else None
        if task.peft_task_type_for(model_config) in _HEAD_TASKS and not _saves_modules(options.peft_config_class):
            raise Refusal(f"method {method!r} cannot save a task head with the adapter, and task {task.name!r} has one "
                          "that trains", where="strategy.method", hint="use another method, or strategy 'lora'")
        quant = quantization_method(model_info)
        if quant is not None and not _supports_quantisation(method, quant):
            raise Refusal(f"model {model_info.name!r} is quantised ({quant}), and peft has no {quant} layers for "
                          f"method {method!r}", where="strategy.method",
                          hint="load an unquantised model, or use strategy 'lora' / 'qlora'")
        self.peft_config(options, task, model_config=model_config)  # peft's own rules on the options, before anything loads

    def check_recipe(self, recipe):
        steps = recipe.train.max_steps
        unset = _unset_schedule_fields(recipe.strategy)
        if unset and steps:  # peft's rules on the value the run will fill in, before anything loads
            try:
                self.peft_config(recipe.strategy.model_copy(update=dict.fromkeys(unset, steps)), _NoTask())
            except UserError as exc:
                raise UserError(f"{exc.message} (strategy.{unset[0]} is unset: it takes train.max_steps = {steps})",
                                where=exc.where, hint=exc.hint) from None

    def training_plan(self, options):
        return {f"strategy.{key}": "unset: the run's optimizer steps (max_steps, or epochs × steps per epoch), "
                                   "filled in when training starts" for key in _unset_schedule_fields(options)}

    def prepare(self, model, task, options, batches, total_steps):
        unset = _unset_schedule_fields(options)
        if not unset or not hasattr(model, "peft_config"):
            return
        if total_steps is None:
            raise UserError(f"strategy.{unset[0]} is not set, and the trainer cannot tell how many optimizer steps this "
                            "run takes (its data loader has no length)", where=f"strategy.{unset[0]}",
                            hint=f"set strategy.{unset[0]} (or train.max_steps)")
        config = model.peft_config["default"]
        for key in unset:
            setattr(config, key, total_steps)  # AdaLoRA's rank allocator reads this very config object
        try:
            copy.copy(config).__post_init__()  # peft's own rules, on the real value
        except (ValueError, TypeError) as exc:
            raise UserError(f"peft refuses these {options.method} options with {unset[0]} = {total_steps} (the run's "
                            f"optimizer steps): {exc}", where="strategy", hint=f"set strategy.{unset[0]}, or change "
                            "the schedule or the options peft names") from None

    def peft_config(self, options: PeftOptions, task, heads: list[str] | None = None, model_config=None):
        kwargs = options.peft_kwargs()
        for key in _unset_schedule_fields(options):  # a stand-in that passes peft's checks; prepare sets the real one
            kwargs[key] = 1 + sum(v for k, v in kwargs.items() if k in ("tinit", "tfinal") and isinstance(v, int))
        if heads:  # check() refuses head tasks for methods without modules_to_save
            kwargs["modules_to_save"] = list(heads)  # peft extends it in place
        try:
            return options.peft_config_class(task_type=task.peft_task_type_for(model_config), **kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"peft refuses these {options.method} options: {exc}", where="strategy",
                            hint=f"see `petune methods {options.method}` for its options and defaults") from None

    def apply(self, model, task, options):
        from peft import get_peft_model

        if isinstance(getattr(options, "target_modules", None), list):
            check_target_names(model, options.target_modules)
        heads = head_modules(task, model)
        config = self.peft_config(options, task, heads, model_config=model.config)
        # frozen embeddings give inputs that need no grad; with (reentrant) gradient
        # checkpointing nothing would then reach the adapter
        model.enable_input_require_grads()
        try:
            peft_model = get_peft_model(model, config)
        except _PEFT_MISFITS as exc:
            # peft's own words for a method that does not fit this model (shapes, block sizes, layer names)
            hint = None
            if "target_modules" in str(exc):
                import torch

                linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
                hint = f"set strategy.target_modules, e.g. \"all-linear\" or some of: {', '.join(linear)}"
            raise UserError(f"peft cannot apply {options.method} to {type(model).__name__}: {exc}",
                            where="strategy", hint=hint) from None
        if is_4bit(model):
            peft_model.train()
        return peft_model

    def trainer_callbacks(self, options: PeftOptions) -> list:
        return [adalora_allocation()] if options.method == "adalora" else []

    def restore(self, base, path, task, options):
        return restore_peft(base, path)

    def merge(self, model):
        peft_type = model.peft_config["default"].peft_type
        hint = "load the adapter with peft (PeftModel.from_pretrained), or train with 'lora'"
        if not callable(getattr(model.base_model, "merge_and_unload", None)):  # the method's tuner cannot merge
            raise Refusal(f"peft cannot merge a {peft_type} adapter into the base: the method has no merge", hint=hint)
        try:
            return model.merge_and_unload()
        except _PEFT_MISFITS as exc:
            raise Refusal(f"peft cannot merge a {peft_type} adapter into the base: {exc}", hint=hint) from None


def _unset_schedule_fields(options: PeftOptions) -> list[str]:
    fields = type(options).model_fields
    return [k for k in _FROM_SCHEDULE if k in fields and getattr(options, k) is None]


class _NoTask:
    """A stand-in task for checking options against peft's rules without a task at hand."""

    def peft_task_type_for(self, config):
        return None


def adalora_allocation():
    """A trainer callback for AdaLoRA, which moves rank between layers from gradient-based
    importance scores: peft needs ``update_and_allocate(step)`` after each optimizer step,
    before the gradients are zeroed. (A function, so that transformers loads only when a run
    needs the callback.)"""
    from transformers import TrainerCallback

    class AdaLoraAllocation(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is not None:
                getattr(model, "module", model).base_model.update_and_allocate(state.global_step)

    return AdaLoraAllocation()


@hookimpl
def register_strategies(register):
    register(PeftMethodStrategy)


# -- `petune methods`: this plugin's own command ---------------------------------------------------
def cmd_methods(args) -> int:
    """The peft methods the 'peft' strategy offers in this install, read from peft itself."""
    import json

    from rich.markup import escape
    from rich.table import Table

    rows = PeftMethodStrategy.method_listing(args.method)
    if args.method is not None and not rows:  # an empty name too: never an empty table and exit 0
        raise UserError(f"the installed peft has no method {args.method!r}", hint="`petune methods` lists them")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if args.method and rows[0]["offered"]:
        table = Table(title=f"peft method {args.method!r}: \\[strategy] options"
                      + (f" — {escape(rows[0]['summary'])}" if rows[0]["summary"] else ""), title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for o in rows[0]["options"]:
            table.add_row(o["name"], o["type"], escape(repr(o["default"])), escape(o["description"]))
        out.print(table)
        return 0
    table = Table(title='peft methods: \\[strategy] name = "peft", method = "..."', title_justify="left")
    for col in ("method", "4-bit base", "options / why not offered"):
        table.add_column(col, overflow="fold")
    for r in rows:
        text = ", ".join(o["name"] for o in r["options"]) if r["offered"] else f"[dim]not offered: {escape(r['refused'])}[/]"
        table.add_row(r["method"], ("yes" if r["bitsandbytes_4bit"] else "no") if r["offered"] else "", text)
    out.print(table)
    return 0


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("methods", help="peft methods of the 'peft' strategy and their options (from the installed peft)")
    p.add_argument("method", nargs="?", help="one method: its options with types, defaults and descriptions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)


# -- listing -----------------------------------------------------------------------------------
def method_listing(method: str | None = None) -> list[dict]:
    """Every method of the installed peft: offered or why not, and (offered) its options."""
    rows = []
    for m in sorted(_config_classes()):
        if method is not None and m != method:
            continue
        reason = refusal_reason(m)
        row: dict = {"method": m, "offered": reason is None, "summary": method_summary(m)}
        if reason:
            row["refused"] = reason
        else:
            schema = _schema_cache(m)
            row["options"] = [
                {"name": k, "type": _describe(f.annotation),
                 "default": None if f.default_factory is not None else f.default,
                 "description": f.description or ""}
                for k, f in schema.model_fields.items() if k != "method"]
            row["bitsandbytes_4bit"] = _supports_quantisation(m, "bitsandbytes")
        rows.append(row)
    return rows
