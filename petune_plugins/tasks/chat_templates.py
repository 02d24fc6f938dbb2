"""Chat templates for causal LMs: which template a run uses, how a conversation is rendered,
the token an answer ends with (trained, and generation stops on it), and the tokenizer set-up a
run saves (template, stop tokens, a pad token apart from them). Shared by every task that
trains a causal LM on chats (``sft``, ``preference``, ``reward`` on decoders, ``seq2seq`` on
decoder-only models; a new causal-LM task sets its tokenizer up with
:func:`prepare_chat_tokenizer` and renders with :func:`render`).

Templates: the model's own when it has one (``chat_template = "auto"`` or ``"model"``);
otherwise a built-in from ``templates/``: ``gemma`` for tokenizers that have Gemma's turn
tokens, ``chatml`` for the rest; ``alpaca`` and ``plain`` (text as is, for prompts that are
already formatted) on request. Built-ins end every turn with one stop token: the format's own
(``<end_of_turn>``, ``<|im_end|>``) when the tokenizer has it as a single token, else EOS. The
template is set on the tokenizer, which the runner saves with the run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from jinja2 import TemplateError

from petune.errors import UserError
from petune_plugins.tasks._common import ensure_pad_token

__all__ = [
    "BUILTIN_TEMPLATES", "TEMPLATE_DIR", "TEMPLATE_ERRORS", "ChatSetup", "TemplateMismatch", "builtin_template",
    "choose_template", "end_of_turn_token", "prepare_chat_tokenizer", "render", "stop_token_ids", "template_for",
]

BUILTIN_TEMPLATES = ("chatml", "gemma", "alpaca", "plain")
TEMPLATE_DIR = Path(__file__).with_name("templates")


class TemplateMismatch(UserError):
    """The chat template does not let the answers be located in its output."""


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
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, LookupError)


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
    except TEMPLATE_ERRORS as exc:
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
    vocab_size = len(tokenizer)
    # a pad token apart from the stop tokens (and BOS): padding is masked out of the loss, the stop token is not
    ensure_pad_token(tokenizer, [*stop_tokens, tokenizer.eos_token, tokenizer.bos_token], may_add=True)
    added = [tokenizer.pad_token] if len(tokenizer) > vocab_size else []
    vocab = tokenizer.get_vocab()
    state = {"chat_template": name, "stop_tokens": stop_tokens,
             "stop_token_ids": [vocab[t] for t in stop_tokens if t in vocab],
             "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id}
    if added:
        state.update(added_tokens=added, vocab_size=len(tokenizer))
    return ChatSetup(name, template, end_of_turn, state)


def template_for(tokenizer, state: dict) -> str:
    """The template a run trained with: the one saved with its tokenizer, else the built-in its
    state names."""
    template = _own_template(tokenizer)
    if template:
        return template  # the template saved with the run's tokenizer: exactly the one trained with
    name = state.get("chat_template")
    if name in BUILTIN_TEMPLATES:
        return builtin_template(name, tokenizer)
    raise UserError("the run's tokenizer has no chat template", hint="re-run training, or check RUN_DIR/tokenizer")


def stop_token_ids(tokenizer, state: dict, model) -> list[int]:
    """The token ids generation stops on: the run's stop tokens, the model's EOS ids, the
    tokenizer's EOS."""
    vocab_ids = [tokenizer.convert_tokens_to_ids(t) for t in state.get("stop_tokens", [])]
    ids = [i for i in vocab_ids if i is not None and i != tokenizer.unk_token_id]
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))

