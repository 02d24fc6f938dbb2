"""Preference tuning of causal language models: DPO (and its loss variants: IPO, robust, hinge,
APO ...), SimPO, ORPO and KTO, through TRL.

Methods (``method``), each on the TRL 1.16 trainer named here (pinned: TRL's experimental
trainers may move or change)::

    dpo     trl.DPOTrainer                      loss_type: sigmoid (DPO), ipo, robust, hinge, apo_zero ...
    simpo   trl.experimental.cpo.CPOTrainer     loss_type "simpo", cpo_alpha 0 (SimPO); no reference model
    orpo    trl.experimental.orpo.ORPOTrainer   odds-ratio term on top of the answers' NLL; no reference model
    kto     trl.KTOTrainer                      unpaired good/bad answers (paired data is split into both)

Data: JSON Lines, JSON or CSV, read with :mod:`datafiles` (each record knows its file:line), in
one of four formats; ``format = "auto"`` tells them apart by the keys of each file's first record::

    pairs     {"prompt", "chosen", "rejected"}: strings, or lists of role/content messages
    hh-rlhf   {"chosen", "rejected"}: whole dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...", or message
              lists) split into the shared prompt and the two answers
    openai    {"input": {"messages"}, "preferred_output", "non_preferred_output"} (OpenAI's DPO files)
    kto       {"prompt", "completion", "label": true/false}: unpaired, for method = "kto" only

Whole dialogues are split at the last assistant turn at or before the first message where they
differ; a pair with no such turn (they differ from the first message on) is dropped and counted.
Pairs whose two answers are identical, or whose answer ``max_length`` cuts to nothing, are dropped
and counted too (the plan's notes), never trained on silently.

Tokenization is done here, with the chat template chosen as the ``sft`` task chooses it: the
prompt is rendered with the generation prompt, each answer is the text the template writes after
it, through the end-of-turn token (the token generation stops on). Prompt and answers are
tokenized apart, as generation sees them. ``max_prompt_length`` keeps the end of long prompts (and
their BOS token); ``max_length`` then cuts answers at the end. TRL receives token ids only.

Reference model (dpo, kto): with a peft adapter (lora, qlora) the base with the adapter disabled
(the new adapter starts as the identity, so no copy is kept); with full fine-tuning a frozen copy
made before training. Prompt tuning and bottleneck adapters are refused (see ``make_trainer``).

Metrics on held-out pairs, before training and after, as ``validation_before`` / ``validation``
(and test) in metrics.json: ``accuracy`` (share of pairs whose chosen answer gets the higher
implicit reward, ties counted half), ``margin`` (mean reward of chosen minus rejected), the
rewards, and ``chosen_logp`` / ``rejected_logp`` (summed log-probabilities of the answers) with
``logp_accuracy`` (share where the model itself gives the chosen answer the higher log-probability).
The implicit reward is TRL's: β·(log π − log π_ref) summed over the answer for dpo and kto,
β·(mean token log π) for the reference-free simpo and orpo. Before training a reference-based
model equals its reference, so accuracy is 0.5 and margin 0 there by definition.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from petune import hookimpl
from petune.api import DataPath, TaskData
from petune.errors import DataError, Refusal
from petune_plugins.tasks import datafiles
from petune_plugins.tasks._common import (
    SplitOptions,
    StartingPoint,
    before_training,
    evaluating,
    held_out_splits,
    measure_before_training,
    model_device,
    seeded_split,
)
from petune_plugins.tasks.causal_lm import CausalLmTask, checkpointing_args, is_prompt_learning
from petune_plugins.tasks.chat_records import BadRow, as_text, message_list, record_keys
from petune_plugins.tasks.chat_templates import TEMPLATE_ERRORS, TemplateMismatch, prepare_chat_tokenizer, render
from petune_plugins.tasks.datafiles import json_type
from petune_plugins.tasks.encoding import Spool, encode_split

__all__ = [
    "DEFAULT_BETA", "DPO_LOSS_TYPES", "KTO_LOSS_TYPES", "METHODS", "REFERENCE_METHODS", "Pair", "PairEncoder",
    "PreferenceOptions", "PreferenceTask", "Single", "answer_logps", "answer_messages", "detect_format",
    "drop_reference_adapter", "frozen_copy", "hh_messages", "is_paired", "no_pairs_left", "note_encoded",
    "pair_metrics", "pairwise_accuracy", "prompt_messages", "read_preferences", "read_splits", "score_pairs",
    "score_singles", "split_dialogues", "to_examples", "unpair",
]

METHODS = ("dpo", "simpo", "orpo", "kto")
#: loss types of trl.DPOConfig / trl.KTOConfig in TRL 1.16
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
#: methods whose implicit reward is measured against a reference model
REFERENCE_METHODS = ("dpo", "kto")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


class PreferenceOptions(SplitOptions):
    train: DataPath = Field(description="training pairs: JSON Lines, a JSON list or CSV")
    validation: DataPath | None = Field(None, description="held-out pairs: accuracy, margin, log-probs before/after")
    test: DataPath | None = Field(None, description="test pairs, scored after training")
    format: Literal["auto", "pairs", "hh-rlhf", "openai", "kto"] = Field(
        "auto", description="data format; auto: by the keys of each file's first record")
    method: Literal["dpo", "simpo", "orpo", "kto"] = Field("dpo", description="dpo | simpo | orpo | kto")
    loss_type: str | list[str] | None = Field(
        None, description="dpo: sigmoid (default), ipo, robust, hinge, apo_zero ... or a list to combine; "
                          "kto: kto (default) or apo_zero_unpaired")
    loss_weights: list[float] | None = Field(None, description="dpo: weight of each loss in a loss_type list")
    beta: float | None = Field(None, gt=0, description="strength of the reference/reward term; default 0.1 "
                                                       "(simpo: 2.0)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo robust/exo_pair and simpo: "
                                                                  "share of labels assumed flipped")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    cpo_alpha: float = Field(0.0, ge=0, description="simpo: weight of the chosen answers' NLL (0 = pure SimPO)")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the good answers' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the bad answers' loss")
    chat_template: Literal["auto", "model", "chatml", "gemma", "alpaca", "plain"] = Field(
        "auto", description="as the sft task: auto = the model's own, else a built-in")
    max_length: int = Field(512, ge=8, description="tokens of prompt + answer; answers are cut at the end")
    max_prompt_length: int | None = Field(None, ge=1, description="tokens of a prompt; longer ones keep their end")
    max_rows: int | None = Field(None, ge=1, description="read at most this many records of each file")
    num_sample_generations: int = Field(3, ge=0, description="held-out prompts answered before and after "
                                                             "training (samples.jsonl)")
    sample_max_new_tokens: int = Field(64, ge=1, description="new tokens of each sample generation")

    @model_validator(mode="after")
    def _consistent(self):
        if self.format == "kto" and self.method != "kto":
            raise ValueError(f"format 'kto' holds unpaired answers, which method {self.method!r} cannot train on: "
                             "use method = 'kto', or paired data")
        losses = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if losses is not None:
            allowed = {"dpo": DPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES}.get(self.method)
            if allowed is None:
                raise ValueError(f"loss_type is for methods dpo and kto; {self.method} has its own loss "
                                 f"(remove loss_type)")
            unknown = [x for x in losses if x not in allowed]
            if unknown:
                raise ValueError(f"unknown {self.method} loss_type {unknown[0]!r}; known: {', '.join(allowed)}")
            if self.method == "kto" and len(losses) != 1:
                raise ValueError("kto takes one loss_type")
            if self.loss_weights is not None and len(self.loss_weights) != len(losses):
                raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss types")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}), or no answer token fits")
        return self

    @property
    def losses(self) -> list[str]:
        if self.loss_type is None:
            return ["kto"] if self.method == "kto" else ["sigmoid"]
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.method]


# -- records → pairs --------------------------------------------------------------------------
class Pair(NamedTuple):
    prompt: list[dict]
    chosen: list[dict]  # the answer turns (an assistant message first)
    rejected: list[dict]
    where: str


class Single(NamedTuple):
    """An unpaired (KTO) example: one answer, good (True) or bad (False)."""

    prompt: list[dict]
    completion: list[dict]
    label: bool
    where: str


_FORMAT_HINT = ("expected one of: pairs {prompt, chosen, rejected}; hh-rlhf {chosen, rejected} (whole dialogues); "
                "openai {input: {messages}, preferred_output, non_preferred_output}; kto {prompt, completion, label}")


def detect_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "preferred_output" in record or "non_preferred_output" in record:
        return "openai"
    if "completion" in record and "label" in record:
        return "kto"
    if "chosen" in record and "prompt" in record:
        return "pairs"
    if "chosen" in record and "rejected" in record:
        return "hh-rlhf"
    return None


def prompt_messages(value, field: str) -> list[dict]:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "type" not in m for m in value):
        return message_list(value, field, need_answer=False)
    text = as_text(value, repr(field))
    if not text.strip():
        raise BadRow(f"{field!r} is empty: there is no prompt")
    return [{"role": "user", "content": text}]


def answer_messages(value, field: str) -> list[dict]:
    """An answer: a string, or messages starting with the assistant's."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "type" not in m for m in value):
        messages = message_list(value, field, need_answer=True)
        if messages[0]["role"] != "assistant":
            raise BadRow(f"{field!r} must start with an assistant message, it starts with a {messages[0]['role']} "
                         f"one", hint="put the conversation before the answer in 'prompt'")
        return messages
    text = as_text(value, repr(field))
    if not text.strip():
        raise BadRow(f"{field!r} is empty: nothing to compare", hint="remove the record or fill in the answer")
    return [{"role": "assistant", "content": text}]


def _need(record: dict, *keys: str) -> None:
    for key in keys:
        if key not in record:
            raise BadRow(f"missing {key!r}; the record has {record_keys(record)}")


#: HH-RLHF turn markers: "\n\nHuman: ..." and "\n\nAssistant: ..."
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def hh_messages(text: str, field: str) -> list[dict]:
    """A whole HH-RLHF dialogue as role/content messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(f"{field!r} is not a dialogue of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns",
                     hint="or give the prompt apart: {prompt, chosen, rejected} (format 'pairs')")
    return [{"role": "user" if who == "Human" else "assistant", "content": content.strip()}
            for who, content in zip(parts[1::2], parts[2::2])]


def split_dialogues(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list] | str:
    """(prompt, chosen answer, rejected answer) of two whole dialogues, split at the last assistant
    turn at or before the first message where they differ; else why not: "identical" or
    "no_shared_prefix"."""
    if chosen == rejected:
        return "identical"
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for cut in range(shared, 0, -1):  # a prompt of at least one message
        if cut < len(chosen) and cut < len(rejected) and \
                chosen[cut]["role"] == rejected[cut]["role"] == "assistant":
            return chosen[:cut], chosen[cut:], rejected[cut:]
    return "no_shared_prefix"


def to_examples(record, fmt: str) -> list[Pair | Single] | str:
    """One record's pair (or unpaired example), or the reason it is dropped."""
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {json_type(record)}")
    where = getattr(record, "where", "")
    if fmt == "pairs":
        _need(record, "prompt", "chosen", "rejected")
        prompt = prompt_messages(record["prompt"], "prompt")
        chosen, rejected = answer_messages(record["chosen"], "chosen"), answer_messages(record["rejected"], "rejected")
    elif fmt == "openai":
        _need(record, "input", "preferred_output", "non_preferred_output")
        given = record["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise BadRow(f"'input' must be an object with 'messages', got {json_type(given)}")
        prompt = message_list(given["messages"], "input.messages", need_answer=False)
        chosen = answer_messages(record["preferred_output"], "preferred_output")
        rejected = answer_messages(record["non_preferred_output"], "non_preferred_output")
    elif fmt == "hh-rlhf":
        _need(record, "chosen", "rejected")
        sides = []
        for key in ("chosen", "rejected"):
            value = record[key]
            sides.append(hh_messages(value, key) if isinstance(value, str)
                         else message_list(value, key, need_answer=False))
        split = split_dialogues(*sides)
        if isinstance(split, str):
            return split
        prompt, chosen, rejected = split
        if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
            return "empty_answer"
    elif fmt == "kto":
        _need(record, "prompt", "completion", "label")
        label = record["label"]
        if not isinstance(label, bool):
            raise BadRow(f"'label' must be true (a good answer) or false (a bad one), got {label!r}")
        return [Single(prompt_messages(record["prompt"], "prompt"), answer_messages(record["completion"], "completion"), label,
                       where)]
    else:  # pragma: no cover - Options restrict the names
        raise ValueError(fmt)
    if chosen == rejected:
        return "identical"
    return [Pair(prompt, chosen, rejected, where)]


def _format_of(first, fmt: str) -> str:
    """``fmt``, or for "auto" the format of a file's first record."""
    if fmt != "auto":
        return fmt
    found = detect_format(first)
    if found is None:
        raise DataError(f"cannot tell the preference data format: its first record has keys {record_keys(first)}",
                        where=first.where, hint=f"{_FORMAT_HINT}; or set task.format")
    return found


def read_preferences(path: Path, fmt: str, max_rows: int | None) -> tuple[Spool, str, dict]:
    """The pairs (or unpaired examples) of a file, the format it was read as, and the counts of
    records dropped by reason. The examples are spooled to disk as they are read
    (:class:`~petune_plugins.tasks.encoding.Spool`): one pass over the file, never all of its
    records in memory (a JSON array or a CSV file is parsed whole first)."""
    records = datafiles.iter_records(path, max_rows=max_rows)
    first = next(records, None)
    if first is None:  # the shared reader raises first
        raise DataError("the file holds no records", where=str(path))
    fmt = _format_of(first, fmt)
    dropped: dict[str, int] = {}
    examples = Spool.write(_examples(itertools.chain([first], records), fmt, path, dropped), desc=Path(path).name)
    return examples, fmt, dropped


def _examples(records: Iterable, fmt: str, path: Path, dropped: dict[str, int]) -> Iterator[Pair | Single]:
    """The examples of records in format ``fmt``; records dropped are counted in ``dropped`` by reason."""
    for record in records:
        try:
            made = to_examples(record, fmt)
        except BadRow as exc:
            hint = exc.hint
            looks_like = detect_format(record)
            if hint is None and looks_like not in (None, fmt):
                hint = f"this record looks like {looks_like} data; all records of a file must be in one format"
            raise DataError(f"{exc} ({fmt} format)", where=getattr(record, "where", str(path)),
                            hint=hint or _FORMAT_HINT) from None
        if isinstance(made, str):
            dropped[made] = dropped.get(made, 0) + 1
        else:
            yield from made


def read_splits(options, *, held_out_only: bool = False, check_train=None) -> tuple[dict, str | None, dict]:
    """The examples of each split that a pair task's options name (``train``, unless
    ``held_out_only``; ``validation``, ``test``; ``validation_split`` of train), the train file's
    format, and notes counting the records dropped per split and reason. ``check_train(format)``
    may refuse the train file before the held-out files are read. Shared with the reward task."""
    examples, notes, fmt = {}, {}, None

    def read(split: str, path) -> str:
        examples[split], found, dropped = read_preferences(path, options.format, options.max_rows)
        for reason, count in dropped.items():
            notes[f"{split}_dropped_{reason}"] = count
        return found

    if not held_out_only:
        fmt = read("train", options.train)
        if check_train is not None:
            check_train(fmt)
    for split in ("validation", "test"):
        if getattr(options, split) is not None:
            read(split, getattr(options, split))
    if not held_out_only and options.split_ratio:
        if len(examples["train"]) < 2:  # say what was dropped, not only that nothing is left to split
            raise no_pairs_left(options, "train", notes, to_split=True)

        examples["train"], examples["validation"] = seeded_split(examples["train"], options.split_ratio,
                                                                 options.split_seed, str(options.train))
    return examples, fmt, notes


def note_encoded(notes: dict, split: str, counts: dict) -> None:
    """Add an encoder's counts to the notes: pairs dropped (cut to nothing, identical once cut)
    as ``<split>_dropped_<reason>``, prompts and answers cut as ``<split>_<what>``."""
    for reason, count in counts.items():
        if count:
            key = f"{split}_dropped_{reason}" if reason in ("cut_to_nothing", "identical") else f"{split}_{reason}"
            notes[key] = notes.get(key, 0) + count


def no_pairs_left(options, split: str, notes: dict, *, to_split: bool = False) -> DataError:
    """The error for a split with no pair left to train or score on (``to_split``: too few to
    hold out validation pairs from), naming its file, what was dropped and why."""
    where = str(options.train if split == "train" or split == "validation" and options.validation is None
                else getattr(options, split))
    dropped = {k.removeprefix(f"{split}_dropped_"): v for k, v in notes.items() if k.startswith(f"{split}_dropped_")}
    reasons = ", ".join(f"{count} dropped as {reason.replace('_', ' ')}" for reason, count in dropped.items())
    hints = []
    if "identical" in dropped:
        hints.append("a pair whose chosen and rejected answers are the same text (as read, or once cut to "
                     "task.max_length) teaches nothing: check the data and task.format, which says which fields "
                     "are the answers")
    if "cut_to_nothing" in dropped:
        hints.append("raise task.max_length (or lower task.max_prompt_length): answers were cut to nothing")
    if not hints:
        hints.append("check the data")
    what = (f"too few {split} pairs to hold out validation_split = {options.split_ratio:g} of them"
            if to_split else f"no {split} pairs left to train or score on")
    return DataError(f"{what} ({reasons or 'no records'})", where=where, hint="; ".join(hints))


def unpair(examples: Iterable[Pair | Single]) -> list[Single]:
    """KTO's view of pairs: the chosen answer good, the rejected one bad."""
    out = []
    for e in examples:
        if isinstance(e, Single):
            out.append(e)
        else:
            out += [Single(e.prompt, e.chosen, True, e.where), Single(e.prompt, e.rejected, False, e.where)]
    return out


def _all_pairs(examples: Spool | list) -> bool:
    """Whether every example is a pair. A file's examples are all pairs or all unpaired (its
    format decides), so a spool's first example says it, with no pass over the spool (a
    split-off part's ``first`` is its file's); no example at all counts as pairs."""
    if isinstance(examples, Spool):
        return examples.first is None or isinstance(examples.first, Pair)
    return all(isinstance(e, Pair) for e in examples)


def _encode_unpaired(encoder: PairEncoder, examples: list[Pair | Single]) -> tuple[dict[str, list], dict[str, int]]:
    return encoder.encode_singles(unpair(examples))


# -- tokenization -------------------------------------------------------------------------------
class PairEncoder:
    """Prompts and answers → token ids, cut to max_prompt_length / max_length."""

    def __init__(self, tokenizer, template: str, end_of_turn: str, *, max_length: int, max_prompt_length: int | None):
        self.tokenizer, self.template, self.end_of_turn = tokenizer, template, end_of_turn
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def token_ids(self, text: str) -> list[int]:
        """The token ids of a rendered text (no special tokens added: the template writes them)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def prompt_text(self, prompt: list[dict], where: str) -> str:
        try:
            return render(self.tokenizer, self.template, prompt, add_generation_prompt=True)
        except TEMPLATE_ERRORS as exc:
            raise DataError(f"the chat template cannot render this prompt: {exc}", where=where,
                            hint="fix the record, or use a built-in template: task.chat_template = 'chatml'") from None

    def answer_text(self, prompt: list[dict], before: str, answer: list[dict], where: str) -> str:
        """What the template writes after the prompt for this answer, through its end-of-turn token."""
        try:
            full = render(self.tokenizer, self.template, prompt + answer)
        except TEMPLATE_ERRORS as exc:
            raise DataError(f"the chat template cannot render this conversation: {exc}", where=where,
                            hint="fix the record, or use a built-in template: task.chat_template = 'chatml'") from None
        if not full.startswith(before):
            raise TemplateMismatch("the chat template renders the prompt differently alone than followed by the "
                                   "answer, so the answer cannot be located", where=where,
                                   hint="use a built-in template: task.chat_template = 'chatml'")
        tail = full[len(before):]
        end = tail.rfind(self.end_of_turn)
        if end < 0:
            raise TemplateMismatch(f"the chat template wrote no {self.end_of_turn!r} after the answer", where=where,
                                   hint="use a built-in template: task.chat_template = 'chatml'")
        return tail[: end + len(self.end_of_turn)]

    def prompt_ids(self, text: str, counts: dict) -> list[int]:
        ids = self.token_ids(text)
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            counts["prompts_cut"] += 1
            bos = self.tokenizer.bos_token_id
            keep_bos = bos is not None and ids[0] == bos
            ids = ([bos] + ids[len(ids) - limit + 1:]) if keep_bos else ids[len(ids) - limit:]
        return ids

    def cut_answer(self, prompt_ids: list[int], ids: list[int], counts: dict) -> list[int]:
        room = self.max_length - len(prompt_ids)
        if len(ids) > room:
            counts["answers_cut"] += 1
            ids = ids[: max(room, 0)]
        return ids

    def encode_pairs(self, pairs: list[Pair]) -> tuple[dict[str, list], dict[str, int]]:
        columns = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected",
                                   "where")}
        counts = {"prompts_cut": 0, "answers_cut": 0, "cut_to_nothing": 0, "identical": 0}
        for pair in pairs:
            before = self.prompt_text(pair.prompt, pair.where)
            prompt_ids = self.prompt_ids(before, counts)
            answers = [self.cut_answer(prompt_ids, self.token_ids(self.answer_text(pair.prompt, before, a, pair.where)),
                                       counts) for a in (pair.chosen, pair.rejected)]
            if not answers[0] or not answers[1]:
                counts["cut_to_nothing"] += 1
                continue
            if answers[0] == answers[1]:  # identical once cut to max_length
                counts["identical"] += 1
                continue
            for key, value in (("prompt_ids", prompt_ids), ("chosen_ids", answers[0]), ("rejected_ids", answers[1]),
                              ("prompt", json.dumps(pair.prompt, ensure_ascii=False)),
                              ("chosen", json.dumps(pair.chosen, ensure_ascii=False)),
                              ("rejected", json.dumps(pair.rejected, ensure_ascii=False)), ("where", pair.where)):
                columns[key].append(value)
        return columns, counts

    def encode_singles(self, singles: list[Single]) -> tuple[dict[str, list], dict[str, int]]:
        columns = {k: [] for k in ("prompt_ids", "completion_ids", "label", "prompt", "completion", "where")}
        counts = {"prompts_cut": 0, "answers_cut": 0, "cut_to_nothing": 0}
        for single in singles:
            before = self.prompt_text(single.prompt, single.where)
            prompt_ids = self.prompt_ids(before, counts)
            answer = self.cut_answer(prompt_ids, self.token_ids(self.answer_text(single.prompt, before, single.completion,
                                                                             single.where)), counts)
            if not answer:
                counts["cut_to_nothing"] += 1
                continue
            for key, value in (("prompt_ids", prompt_ids), ("completion_ids", answer), ("label", single.label),
                               ("prompt", json.dumps(single.prompt, ensure_ascii=False)),
                               ("completion", json.dumps(single.completion, ensure_ascii=False)),
                               ("where", single.where)):
                columns[key].append(value)
        return columns, counts


def is_paired(dataset) -> bool:
    return dataset is not None and "chosen_ids" in dataset.column_names


# -- scoring ----------------------------------------------------------------------------------
def answer_logps(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed log-probability of ``answer_ids`` after ``prompt_ids`` (one sequence, no padding;
    only the answer positions' logits are computed)."""
    import torch

    device = model_device(model)
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    n = len(answer_ids)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n].float()
    targets = torch.tensor(answer_ids, device=device)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()


def _reference(trainer, model):
    """A context in which ``model`` is the reference: the peft adapter disabled, or the frozen copy."""
    from contextlib import nullcontext

    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        return ref, nullcontext()
    if hasattr(model, "disable_adapter"):
        return model, model.disable_adapter()
    raise RuntimeError("no reference model: neither a frozen copy nor a peft adapter to disable")


def score_pairs(trainer, dataset, method: str, beta: float) -> dict:
    """Accuracy, margin, rewards and log-probabilities of held-out pairs (see the module doc)."""
    import torch

    model = trainer.model
    policy, reference = [], []
    with evaluating(model), torch.no_grad():
        for row in dataset:
            policy.append([answer_logps(model, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")])
        if method in REFERENCE_METHODS:
            ref_model, context = _reference(trainer, model)
            with evaluating(ref_model), context:
                for row in dataset:
                    reference.append([answer_logps(ref_model, row["prompt_ids"], row[k])
                                      for k in ("chosen_ids", "rejected_ids")])
    lengths = [(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in dataset]
    return pair_metrics(policy, reference or None, lengths, method, beta)


def pair_metrics(policy: list[list[float]], reference: list[list[float]] | None, lengths: list[tuple[int, int]],
                 method: str, beta: float) -> dict:
    """Metrics from per-pair summed log-probs [chosen, rejected] of the policy (and the reference)."""
    rewards = []
    for i, (c, r) in enumerate(policy):
        if reference is not None:
            rewards.append((beta * (c - reference[i][0]), beta * (r - reference[i][1])))
        else:
            rewards.append((beta * c / lengths[i][0], beta * r / lengths[i][1]))
    n = len(policy)
    return {"accuracy": pairwise_accuracy(rewards), "margin": sum(a - b for a, b in rewards) / n,
            "chosen_reward": sum(a for a, _ in rewards) / n, "rejected_reward": sum(b for _, b in rewards) / n,
            "chosen_logp": sum(c for c, _ in policy) / n, "rejected_logp": sum(r for _, r in policy) / n,
            "logp_accuracy": pairwise_accuracy(policy), "pairs": n}


def pairwise_accuracy(pairs) -> float:
    """The share of (chosen, rejected) scores where the chosen one is higher, ties counted half.
    Shared with the reward task."""
    pairs = list(pairs)
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def score_singles(trainer, dataset, method: str, beta: float) -> dict:
    """Held-out unpaired (KTO) examples: mean reward and log-probability of good and bad answers."""
    import torch

    model = trainer.model
    with evaluating(model), torch.no_grad():
        logps = [answer_logps(model, row["prompt_ids"], row["completion_ids"]) for row in dataset]
        ref_model, context = _reference(trainer, model)
        with context:
            refs = [answer_logps(ref_model, row["prompt_ids"], row["completion_ids"]) for row in dataset]
    metrics = {"examples": len(logps)}
    for name, wanted in (("desirable", True), ("undesirable", False)):
        picked = [i for i, row in enumerate(dataset) if row["label"] == wanted]
        if picked:
            metrics[f"{name}_reward"] = sum(beta * (logps[i] - refs[i]) for i in picked) / len(picked)
            metrics[f"{name}_logp"] = sum(logps[i] for i in picked) / len(picked)
    if "desirable_reward" in metrics and "undesirable_reward" in metrics:
        metrics["margin"] = metrics["desirable_reward"] - metrics["undesirable_reward"]
    return metrics


# -- TRL trainers on data tokenized here --------------------------------------------------------
def _alias_accuracy(store: dict, prefix: str) -> None:
    """TRL logs ``rewards/accuracies`` and ``rewards/margins``; the recipe's eval.metric (and early
    stopping, which reads the metrics as they are logged) finds them as ``accuracy`` and ``margin``."""
    for ours, theirs in (("accuracy", "rewards/accuracies"), ("margin", "rewards/margins")):
        if store.get(prefix + theirs):
            store[prefix + ours] = list(store[prefix + theirs])


def _trainer_classes(method: str):
    """(trainer class, config class) for a method, with dataset preparation replaced: the data
    arrives tokenized."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PetuneDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # prompt_ids / chosen_ids / rejected_ids, cut and checked in load_data

            def log(self, logs, start_time=None):
                if not self.model.training:
                    _alias_accuracy(self._metrics["eval"], "")
                super().log(logs, start_time)

        return PetuneDPOTrainer, DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        class PetuneKTOTrainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if not self.calculate_KL:
                    return dataset
                size = args.per_device_train_batch_size

                def mismatched(batch):  # KTO's KL term: each prompt with its batch neighbour's answer
                    answers = batch["completion_ids"]
                    return {"KL_completion_ids": answers[-1:] + answers[:-1]}

                return dataset.map(mismatched, batched=True, batch_size=size)

        return PetuneKTOTrainer, KTOConfig
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        class PetuneCPOTrainer(CPOTrainer):
            def tokenize_row(self, feature, model=None):
                return {}  # already in CPO's columns (see _cpo_columns)

            def log(self, logs, start_time=None):
                _alias_accuracy(self._stored_metrics["eval"], "eval_")
                super().log(logs, start_time)

        return PetuneCPOTrainer, CPOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class PetuneORPOTrainer(ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                return {}

            def log(self, logs, start_time=None):
                _alias_accuracy(self._stored_metrics["eval"], "eval_")
                super().log(logs, start_time)

        return PetuneORPOTrainer, ORPOConfig
    raise ValueError(method)  # pragma: no cover - Options restrict the names


def _cpo_columns(dataset):
    """Pairs in the columns TRL's CPO/ORPO trainers collate: prompt, and prompt + answer with
    labels (-100 on the prompt) for each side."""
    if dataset is None:
        return None

    def convert(row):
        out = {"prompt_input_ids": row["prompt_ids"], "prompt_attention_mask": [1] * len(row["prompt_ids"])}
        for side in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            out[f"{side}_input_ids"] = ids
            out[f"{side}_attention_mask"] = [1] * len(ids)
            out[f"{side}_labels"] = [-100] * len(row["prompt_ids"]) + row[f"{side}_ids"]
        return out

    return dataset.map(convert, remove_columns=dataset.column_names)


def _trl_singles(dataset, seed: int):
    """KTO's training rows: unpaired, shuffled once here (KTO reads them in order, so that its KL
    term pairs each prompt with another prompt's answer)."""
    if dataset is None:
        return None
    if is_paired(dataset):
        paired = dataset

        def unpaired(positions: list[int]) -> tuple[dict[str, list], dict[str, int]]:
            pairs = paired[positions[0]:positions[-1] + 1]  # a batch is a run of consecutive rows
            rows = {"prompt_ids": [], "completion_ids": [], "label": []}
            for prompt, chosen, rejected in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]):
                rows["prompt_ids"] += [prompt, prompt]
                rows["completion_ids"] += [chosen, rejected]
                rows["label"] += [True, False]
            return rows, {}

        dataset, _ = encode_split(range(len(dataset)), unpaired, desc="kto-singles")  # in batches, to Arrow
    else:
        dataset = dataset.select_columns(["prompt_ids", "completion_ids", "label"])
    return dataset.shuffle(seed=seed).flatten_indices()


# -- the task ---------------------------------------------------------------------------------
class PreferenceTask(CausalLmTask):
    name = "preference"
    description = "preference tuning of a causal LM: DPO (IPO, robust ...), SimPO, ORPO, KTO (TRL)"
    Options = PreferenceOptions
    primary_metric = "accuracy"
    token_level_loss = False  # one loss per pair

    def primary_metric_for(self, options: PreferenceOptions) -> str:
        # unpaired KTO data has no pairs to score: the trainer's own KTO loss is the metric then
        return "loss" if options.method == "kto" else "accuracy"

    def sequences_per_example(self, options: PreferenceOptions) -> int:
        return 2  # chosen and rejected (KTO: the answer and a mismatched one for its KL term)

    def frozen_reference(self, options: PreferenceOptions, strategy) -> bool:
        # with an adapter the reference is the base with the adapter off: no copy
        return options.method in REFERENCE_METHODS and strategy.artifact == "model"

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: PreferenceOptions, tokenizer) -> TaskData:
        def refuse_unpaired(fmt: str) -> None:
            if fmt == "kto" and options.method != "kto":
                raise Refusal(f"{options.train} holds unpaired (kto format) answers, which method "
                              f"{options.method!r} cannot train on", where="task.method",
                              hint="use method = 'kto', or paired data")

        examples, fmt, notes = read_splits(options, check_train=refuse_unpaired)
        return self._encode(examples, options, tokenizer, fmt, notes)

    def load_eval_data(self, options: PreferenceOptions, tokenizer, state: dict) -> TaskData:
        examples, _, notes = read_splits(options, held_out_only=True)
        data = self._encode(examples, options, tokenizer, state.get("format"), notes)
        data.state = state
        return data

    @staticmethod
    def _encode(examples: dict, options: PreferenceOptions, tokenizer, fmt, notes: dict) -> TaskData:
        chat = prepare_chat_tokenizer(tokenizer, options.chat_template)
        encoder = PairEncoder(tokenizer, chat.template, chat.end_of_turn, max_length=options.max_length,
                              max_prompt_length=options.max_prompt_length)
        notes = {"chat_template": chat.note, **notes}
        datasets = {}
        for split, found in examples.items():
            if options.method == "kto" and split == "train" or not _all_pairs(found):
                # each batch unpaired as it is encoded: the same rows, in the same order, as unpairing the split
                dataset, counts = encode_split(found, partial(_encode_unpaired, encoder), desc=split)  # to Arrow
            else:
                dataset, counts = encode_split(found, encoder.encode_pairs, desc=split)
            note_encoded(notes, split, counts)
            if not len(dataset):
                raise no_pairs_left(options, split, notes)
            datasets[split] = dataset
        state = {"format": fmt, **chat.state, "method": options.method, "max_length": options.max_length}
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options: PreferenceOptions, args: dict,
                     callbacks: list):
        self._refuse_unsupported(model, options)
        trainer_class, config_class = _trainer_classes(options.method)
        config = {"bf16": False, **checkpointing_args(args, config_class), "max_length": options.max_length,
                  "beta": options.beta_value}
        train, validation = data.train, data.validation
        ref_model = None
        if options.method == "dpo":
            config.update(loss_type=options.losses, loss_weights=options.loss_weights,
                          label_smoothing=options.label_smoothing)
        elif options.method == "kto":
            if args.get("per_device_train_batch_size", 1) < 2 and options.losses == ["kto"]:
                raise Refusal("KTO estimates its KL term from each batch's other answers, so it needs "
                              "train.batch_size of 2 or more", where="train.batch_size",
                              hint="set train.batch_size = 2 (or more)")
            config.update(loss_type=options.losses[0], desirable_weight=options.desirable_weight,
                          undesirable_weight=options.undesirable_weight, train_sampling_strategy="sequential")
            train, validation = _trl_singles(train, args.get("seed", 42)), _trl_singles(validation, args.get("seed", 42))
        elif options.method == "simpo":
            config.update(loss_type="simpo", simpo_gamma=options.simpo_gamma, cpo_alpha=options.cpo_alpha,
                          label_smoothing=options.label_smoothing)
            train, validation = _cpo_columns(train), _cpo_columns(validation)
        elif options.method == "orpo":
            train, validation = _cpo_columns(train), _cpo_columns(validation)
        if options.method in REFERENCE_METHODS and not hasattr(model, "peft_config"):
            ref_model = frozen_copy(model)
        if validation is None:
            config["eval_strategy"] = "no"
        kwargs = {"ref_model": ref_model} if options.method in REFERENCE_METHODS else {}
        trainer = trainer_class(model=model, args=config_class(**config), train_dataset=train,
                                eval_dataset=validation, processing_class=tokenizer, callbacks=callbacks, **kwargs)
        if options.method in REFERENCE_METHODS:
            drop_reference_adapter(trainer.model)
        measure_before_training(trainer, partial(self._starting_point, trainer, data, options))
        return trainer

    @staticmethod
    def _refuse_unsupported(model, options: PreferenceOptions) -> None:
        if is_prompt_learning(model):
            raise Refusal("prompt and prefix tuning do not mix with preference tuning here: the reference model would "
                          "be the base without the virtual tokens, whose answers the virtual tokens were never part "
                          "of, and TRL reads the answer log-probabilities from positions the virtual tokens shift",
                          where="strategy.name", hint="use lora, qlora or full")

    # -- evaluation -------------------------------------------------------------------------
    def score(self, trainer, dataset, options: PreferenceOptions) -> dict:
        if is_paired(dataset):
            return score_pairs(trainer, dataset, options.method, options.beta_value)
        return score_singles(trainer, dataset, options.method, options.beta_value)

    def evaluate(self, trainer, data: TaskData, options: PreferenceOptions, run_dir: Path) -> dict[str, dict]:
        metrics = {}
        before = before_training(trainer)
        for split, dataset in held_out_splits(data):
            if split in before.metrics:
                metrics[f"{split}_before"] = before.metrics[split]
            metrics[split] = self.score(trainer, dataset, options)
        if options.num_sample_generations and trainer.is_world_process_zero():
            after = self.sample_generations(trainer.model, trainer.processing_class, options, data)
            if after:
                from petune import artifacts

                earlier = before.samples or [None] * len(after)
                for sample, old in zip(after, earlier):
                    sample["after"] = sample.pop("generated")
                    if old is not None:
                        sample["before"] = old["generated"]
                artifacts.write_text(Path(run_dir) / "samples.jsonl",
                                     "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in after))
        return metrics

    def _starting_point(self, trainer, data: TaskData, options: PreferenceOptions, main_process: bool) -> StartingPoint:
        """The held-out scores and sample answers of the model as it starts (``evaluate`` compares)."""
        start = StartingPoint({split: self.score(trainer, dataset, options) for split, dataset in held_out_splits(data)})
        if options.num_sample_generations and main_process:
            start.samples = self.sample_generations(trainer.model, trainer.processing_class, options, data)
        return start

    def sample_generations(self, model, tokenizer, options: PreferenceOptions, data: TaskData) -> list[dict]:
        """Greedy answers to the first held-out prompts (validation, else test, else train)."""
        splits = (("validation", data.validation), ("test", data.test), ("train", data.train))
        split, dataset = next(((n, d) for n, d in splits if d is not None and len(d)), (None, None))
        if dataset is None:
            return []
        samples, seen = [], set()
        for row in dataset:
            if len(samples) >= options.num_sample_generations:
                break
            if row["prompt"] in seen:  # KTO rows repeat a prompt for each answer
                continue
            seen.add(row["prompt"])
            prompt = json.loads(row["prompt"])
            sample = {"split": split, "where": row["where"], "messages": prompt}
            if "chosen" in row:
                sample["chosen"] = _content(json.loads(row["chosen"]))
                sample["rejected"] = _content(json.loads(row["rejected"]))
            sample["generated"] = self.generate(model, tokenizer, options, data.state, prompt,
                                                max_new_tokens=options.sample_max_new_tokens)
            samples.append(sample)
        return samples


def _content(messages: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def frozen_copy(model):
    """The reference model of full fine-tuning: a copy of the starting weights, never trained.
    (TRL would reload it from the model's folder, which misses embeddings resized for a pad token.)"""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def drop_reference_adapter(model) -> None:
    """TRL 1.16 copies a peft model's adapter as a frozen "ref" adapter. Ours is new and starts
    as the identity (LoRA's B = 0), so the base with the adapter disabled is the same reference
    without the copy; TRL falls back to disabling the adapter when there is no "ref"."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and "ref" in configs:
        model.delete_adapter("ref")


@hookimpl
def register_tasks(register):
    register(PreferenceTask)
