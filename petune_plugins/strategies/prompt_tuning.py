"""Prompt tuning and prefix tuning through peft: the model stays frozen, a few virtual
tokens train (plus the task head, saved with them via ``modules_to_save``).

* ``method = "prompt"``: trainable embeddings prepended to the input (Lester et al. 2021),
  initialised from the embeddings of ``init_text`` (default) or at random.
* ``method = "prefix"``: trainable key/value prefixes in every attention layer (Li & Liang
  2021); always random init. Costs num_virtual_tokens × layers × 2 × kv-width parameters.

Refused mixes (see ``check``):

* prompt × token classification: the virtual tokens are prepended to the sequence, so the
  model returns num_virtual_tokens more token logits than there are labels; peft does not
  realign them. Prefix tuning leaves the sequence alone and is supported.
* prompt × extractive question answering: the same shift, of the start/end logits away from
  the answer positions. Prefix tuning is supported.
* prompt × sequence classification on a decoder: the classifier reads the last non-pad
  token, which it finds from input_ids; prompt tuning passes embeddings instead, so with
  right padding it would read a pad position. Prefix tuning keeps input_ids.
* prompt × a model with learned absolute positions (BERT) whose position table cannot hold
  num_virtual_tokens + the longest input: refused in ``check`` when the virtual tokens alone
  do not fit, else stopped with a clear error on the first batch that does not fit.
* prefix × gradient checkpointing: transformers drops ``past_key_values`` — the prefix — in
  checkpointed layers: ``check_recipe`` refuses the mix before anything loads, and a guard on
  the first training forward pass catches checkpointing switched on some other way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from petune import hookimpl
from petune.api import Options, Strategy
from petune.errors import Refusal, UserError
from petune_plugins.strategies._common import find_layers, head_modules, restore_peft

DEFAULT_INIT_TEXT = "Read the following text and do the task it calls for."


class PromptTuningOptions(Options):
    method: Literal["prompt", "prefix"] = Field("prompt", description="prompt: input virtual tokens; prefix: per-layer key/value prefixes")
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["text", "random"] | None = Field(
        None, description="prompt init: 'text' (default for method = 'prompt') or 'random' (the only one for prefix)")
    init_text: str | None = Field(None, min_length=1, description=f"text whose embeddings start the prompt (default: {DEFAULT_INIT_TEXT!r})")

    @model_validator(mode="after")
    def _init_fits_method(self):
        if self.method == "prefix" and self.init == "text":
            raise ValueError("prefix tuning has no text init; use init = 'random' or method = 'prompt'")
        if self.init_text is not None and self.resolved_init != "text":
            raise ValueError("init_text is only used with init = 'text' and method = 'prompt'")
        return self

    @property
    def resolved_init(self) -> str:
        return self.init or ("text" if self.method == "prompt" else "random")


class PromptTuningStrategy(Strategy):
    name = "prompt_tuning"
    description = "prompt tuning or prefix tuning (peft): only virtual tokens and the task head train"
    Options = PromptTuningOptions
    artifact = "adapter"

    def check(self, task, model_info, options):
        if options.method != "prompt":
            return
        task_type = task.peft_task_type_for(model_info.config if model_info is not None else None)
        limit = _absolute_position_limit(model_info.config) if model_info is not None else None
        if limit is not None and options.num_virtual_tokens >= limit:
            raise Refusal(f"{model_info.name} has {limit} learned positions; {options.num_virtual_tokens} virtual "
                          "tokens leave no room for the input", where="strategy.num_virtual_tokens",
                          hint=f"use fewer virtual tokens (e.g. 20) and task.max_length ≤ {limit} − num_virtual_tokens")
        if task_type == "TOKEN_CLS":
            raise Refusal("prompt tuning prepends virtual tokens, which shifts token logits away from the "
                          "per-token labels of token classification",
                          where="strategy.method", hint="use method = 'prefix' (keeps the sequence as it is) or strategy 'lora'")
        if task_type == "QUESTION_ANS":
            raise Refusal("prompt tuning prepends virtual tokens, which shifts the start/end logits of extractive "
                          "question answering away from the answer positions it is trained on",
                          where="strategy.method", hint="use method = 'prefix' (keeps the sequence as it is) or strategy 'lora'")
        if task_type == "SEQ_CLS" and model_info is not None and model_info.is_decoder_only:
            raise Refusal("prompt tuning feeds embeddings instead of input_ids, so a decoder's classifier cannot "
                          "find the last real token of padded inputs",
                          where="strategy.method", hint="use method = 'prefix' or strategy 'lora'")

    def skeleton_options(self, options):
        """A text initialisation reads real embeddings: a meta skeleton has none, and a random
        initialisation has the same parameters."""
        if options.resolved_init == "text":
            return options.model_copy(update={"init": "random", "init_text": None})
        return options

    def check_recipe(self, recipe):
        if recipe.strategy.method == "prefix" and recipe.train.gradient_checkpointing:
            raise Refusal("prefix tuning does not work with gradient checkpointing: transformers drops the "
                          "prefix (past_key_values) in checkpointed layers",
                          where="train.gradient_checkpointing", hint="set it to false, or use method = 'prompt'")

    def apply(self, model, task, options):
        from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

        heads = head_modules(task, model) or None
        task_type = task.peft_task_type_for(model.config)
        if options.method == "prefix":
            _refuse_checkpointing(model)
            config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens,
                                        modules_to_save=heads)
        elif options.resolved_init == "text":
            tokenizer = model.name_or_path or getattr(model.config, "_name_or_path", "")
            if not (Path(tokenizer) / "tokenizer_config.json").is_file():
                raise UserError(f"init = 'text' needs the model's tokenizer, not found in {tokenizer!r}",
                                where="strategy.init", hint="set init = 'random'")
            config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens,
                                        prompt_tuning_init="TEXT", prompt_tuning_init_text=options.init_text or DEFAULT_INIT_TEXT,
                                        tokenizer_name_or_path=str(tokenizer), modules_to_save=heads)
        else:
            config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens,
                                        prompt_tuning_init="RANDOM", modules_to_save=heads)
        peft_model = get_peft_model(model, config)
        if options.method == "prompt":
            _guard_positions(peft_model, options.num_virtual_tokens)
        return peft_model

    def restore(self, base, path, task, options):
        return restore_peft(base, path)

    def merge(self, model):
        raise Refusal("virtual tokens are inputs, not weights: prompt/prefix tuning cannot be merged into the base",
                      hint="load the adapter with peft, or train with 'lora' to get a mergeable result")


# model types whose positions are a learned table of max_position_embeddings rows
_ABSOLUTE_POSITIONS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "gpt2", "opt"}


def _absolute_position_limit(config) -> int | None:
    """Size of a learned absolute position table (BERT-style), or None (rotary, relative, T5)."""
    if config.model_type not in _ABSOLUTE_POSITIONS:
        return None
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _guard_positions(model, num_virtual_tokens: int) -> None:
    """Stop with a clear error (not an index error deep in the model) when an input plus
    the virtual tokens is longer than the model's position table."""
    limit = _absolute_position_limit(model.base_model.config)
    if limit is None:
        return

    def guard(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] + num_virtual_tokens > limit:
            raise UserError(f"an input of {ids.shape[-1]} tokens plus {num_virtual_tokens} virtual tokens is longer "
                            f"than the model's {limit} learned positions", where="task.max_length",
                            hint=f"set task.max_length ≤ {limit - num_virtual_tokens}, or lower strategy.num_virtual_tokens")

    model.register_forward_pre_hook(guard, with_kwargs=True)


def _refuse_checkpointing(model) -> None:
    """Stop the first training forward pass if gradient checkpointing is on (see module doc)."""
    _, layers = find_layers(model)

    def guard(module, args):
        if module.training and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            raise UserError("prefix tuning does not work with gradient checkpointing: transformers drops the "
                            "prefix (past_key_values) in checkpointed layers",
                            where="train.gradient_checkpointing", hint="set it to false, or use method = 'prompt'")

    model.register_forward_pre_hook(guard)


@hookimpl
def register_strategies(register):
    register(PromptTuningStrategy)
