"""Supervised fine-tuning (SFT) of causal language models on instructions and chats.

Data: JSON (a list of records) or JSON Lines (also .gz/.zst), or any other records file the
shared reader takes (CSV/TSV, Parquet, Arrow), or plain text (.txt: text records, see
:mod:`~petune_plugins.tasks.chat_records`), in one of five formats; ``format = "auto"``
tells them apart by their keys (from the first record of each file)::

    alpaca             {"instruction", "input" (optional), "output"}
    prompt-completion  {"prompt", "completion"}           strings, or lists of messages
    messages           {"messages": [{"role": "system" | "user" | "assistant", "content"}]}
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value"}]}
    text               {"text"}                            plain text (none of the keys above)

Every row becomes a conversation (role/content messages); an optional top-level
``"system"`` string becomes its system message (:mod:`~petune_plugins.tasks.chat_records`).
Text records (continued pre-training, or chats already written out as text, like the QLoRA
paper's Guanaco data) are trained as they are, every token and an EOS after each text, with
the ``plain`` template: no chat markup is added, and generation continues the prompt as written.
A text longer than ``max_length`` is split into pieces rather than cut (:class:`Encoder`).

Chat template: the model's own when it has one (``chat_template = "auto"`` or ``"model"``);
otherwise a built-in from ``templates/``: ``gemma`` for tokenizers that have Gemma's turn
tokens, ``chatml`` for the rest; ``alpaca`` and ``plain`` (text as is, for prompts that are
already formatted) on request. Built-ins end every turn with one stop token: the format's own
(``<end_of_turn>``, ``<|im_end|>``) when the tokenizer has it as a single token, else EOS. No
token is added, so no embedding is resized. The template is set on the tokenizer, which the
runner saves with the run (:mod:`~petune_plugins.tasks.chat_templates`). The model, generation
and the held-out loss are the causal-LM base's (:mod:`~petune_plugins.tasks.causal_lm`).

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

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import Field, model_validator

from petune import hookimpl
from petune.api import DataPath, TaskData
from petune.errors import DataError, Refusal, UserError
from petune_plugins.tasks._common import SplitOptions, evaluating, hold_out, model_device, read_held_out
from petune_plugins.tasks.causal_lm import CausalLmTask, checkpointing_args, held_out_loss, is_prompt_learning
from petune_plugins.tasks.chat_records import (
    TEXT_FORMAT_HINT,
    BadRow,
    Example,
    detect_format,
    parse_records,
    read_examples,
    record_keys,
    to_conversation,
)
from petune_plugins.tasks.chat_templates import TEMPLATE_ERRORS, TemplateMismatch, prepare_chat_tokenizer, render
from petune_plugins.tasks.datafiles import json_type
from petune_plugins.tasks.encoding import Spool, encode_split

__all__ = [
    "SAMPLE_MAX_NEW_TOKENS", "Batching", "Encoder", "SftOptions", "SftTask", "cast_trainable_to_bf16",
    "check_packing_keeps_examples_apart", "choose_batching", "examples_kept_apart", "loss_memory", "make_sft_trainer",
]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: new tokens generated for each sample written to samples.jsonl after training
SAMPLE_MAX_NEW_TOKENS = 128


class SftOptions(SplitOptions):
    train: DataPath = Field(description="training data: JSON Lines, a JSON list of records, any records file, or "
                                        "plain text (.txt: a text per block of lines between blank lines)")
    validation: DataPath | None = Field(None, description="held-out data: loss, perplexity and sample generations")
    format: Literal["auto", "alpaca", "prompt-completion", "messages", "sharegpt", "text"] = Field(
        "auto", description="data format; auto: by the keys of each file's first record (text: plain text records, "
                            "trained as they are)")
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
                            "full: plain cross-entropy on the logits (faster on a CPU); auto: chunked on a GPU, "
                            "full on a CPU unless the logits would pass a quarter of the free memory")

    @model_validator(mode="after")
    def _packing_is_padding_free(self):
        if self.packing and self.padding_free is False:
            raise ValueError("packing = true needs padding-free rows: leave padding_free at 'auto' (or true)")
        return self


# -- tokenization and the loss mask ---------------------------------------------------------
class Encoder:
    """Conversations → input_ids and labels (-100 outside assistant answers). ``split_long``:
    an example longer than ``max_length`` becomes several, each starting on the token the one
    before it ends with (so every token is trained once), instead of being cut."""

    def __init__(self, tokenizer, template: str, end_of_turn: str, *, loss_on: str, max_length: int,
                 split_long: bool = False):
        self.tokenizer, self.template, self.end_of_turn = tokenizer, template, end_of_turn
        self.loss_on, self.max_length, self.split_long = loss_on, max_length, split_long
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
        except TEMPLATE_ERRORS as exc:  # the template itself raised (e.g. "roles must alternate")
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
        truncated = dropped = long_texts = 0
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
            if len(ids) > self.max_length and self.split_long:
                long_texts += 1
                step = self.max_length - 1  # a piece starts on its predecessor's last token: its context
                for start in range(0, len(ids) - 1, step):
                    columns["input_ids"].append(list(ids[start: start + self.max_length]))
                    columns["labels"].append(labels[start: start + self.max_length])
                    # the text once (for sample generations), not once per piece: a long text would be
                    # stored (length / max_length) times
                    columns["conversation"].append(example.messages if start == 0 else _NO_TEXT)
                    columns["where"].append(example.place)
                continue
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
        if self.split_long:
            counts.update(split=long_texts, texts=len(examples))
        if shortest_prompt is not None:
            counts["shortest_dropped_prompt"] = shortest_prompt
        return columns, counts


_NO_TEXT = [{"role": "assistant", "content": ""}]  # a long text's later pieces (see Encoder.encode)


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

    if is_prompt_learning(model):
        return ("cannot be combined with prompt or prefix tuning: the virtual tokens are added once per packed row, "
                "so only its first example would see them")
    if any(p.is_meta for p in model.parameters()):
        return ("cannot be checked in this process: the model's weights are not loaded here (e.g. FSDP's "
                "CPU-RAM-efficient loading)")
    ids = tokenizer("the quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)["input_ids"]
    first, second = ids[:6], ids[6:12]
    device = model_device(model)
    joined = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    with evaluating(model), torch.no_grad():  # use_cache=False as in training: a cache disables the packed-sequence mask
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
        packed = model(input_ids=joined, position_ids=positions, use_cache=False).logits[0, len(first):].float()
        shared = model(input_ids=joined, use_cache=False).logits[0, len(first):].float()
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


# -- the task ---------------------------------------------------------------------------------
class SftTask(CausalLmTask):
    name = "sft"
    description = "supervised fine-tuning of a causal LM on instructions or chats (TRL SFTTrainer)"
    Options = SftOptions
    primary_metric = "loss"
    token_level_loss = True

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: SftOptions, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        examples: dict[str, Spool] = {}
        examples["train"], fmt = read_examples(options.train, options.format, options.max_rows, text=True)
        examples.update(self._read_held_out(options))
        examples["train"] = hold_out(examples["train"], examples, options, str(options.train))
        return self._encode(examples, options, tokenizer, fmt)

    def load_eval_data(self, options: SftOptions, tokenizer: PreTrainedTokenizerBase, state: dict) -> TaskData:
        data = self._encode(self._read_held_out(options), options, tokenizer, state.get("format"))
        data.state = state  # the run's own: its tokenizer was set up (pad token added ...) when it trained
        return data

    @staticmethod
    def _read_held_out(options: SftOptions) -> dict[str, Spool]:
        return read_held_out(options, lambda split, path: read_examples(path, options.format, options.max_rows,
                                                                        text=True)[0])

    @staticmethod
    def _encode(examples: dict[str, Spool], options: SftOptions, tokenizer, fmt) -> TaskData:
        chat = prepare_chat_tokenizer(tokenizer, _chat_template(options, fmt))  # a saved run's tokenizer keeps its own
        encoder = Encoder(tokenizer, chat.template, chat.end_of_turn, loss_on=options.loss_on,
                          max_length=options.max_length, split_long=fmt == "text")
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
            if "split" in counts:  # text records: nothing is cut or dropped
                notes[f"{split}_long_texts"] = (
                    f"{counts['split']} of {counts['texts']} longer than max_length = {options.max_length}"
                    + (f", split into pieces: {counts['examples']} examples" if counts["split"] else ""))
            else:
                notes[f"{split}_truncated"] = counts["truncated"]
                notes[f"{split}_dropped"] = counts["dropped"]

        state = {"format": fmt, **chat.state, "loss_on": options.loss_on, "max_length": options.max_length}
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
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
        samples, seen = [], set()
        for row in dataset:
            if len(samples) == count:
                break
            if row["where"] in seen:  # another piece of a long text
                continue
            seen.add(row["where"])
            if data.state.get("format") == "text":  # continue the first half of a text's first piece (a whole
                # text may be longer than the model's context)
                prompt, expected = _continuation_prompt(tokenizer.decode(row["input_ids"], skip_special_tokens=True))
            else:
                messages = row["conversation"]
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
                expected = messages[last]["content"]
            generated = self.generate(model, tokenizer, options, data.state, prompt,
                                      max_new_tokens=SAMPLE_MAX_NEW_TOKENS)
            samples.append({"split": split, "where": row["where"], "messages": prompt,
                            "expected": expected, "generated": generated})
        return samples

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
                    fmt = options.format if options.format != "auto" else detect_format(record, text=True)
                    if fmt is None:
                        raise BadRow(f"cannot tell the format of this record (keys {record_keys(record)})"
                                     if isinstance(record, dict) else f"expected a string or an object, got "
                                                                         f"{json_type(record)}",
                                     hint=TEXT_FORMAT_HINT)
                    messages = to_conversation(record, fmt, need_answer=False)
            except BadRow as exc:
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
def _chat_template(options: SftOptions, fmt: str | None) -> str:
    """Text records are trained as they are: the plain template (BOS, the text, EOS)."""
    if fmt != "text":
        return options.chat_template
    if options.chat_template in ("auto", "plain"):
        return "plain"
    raise DataError(f"text records are trained as they are, with no chat markup, and task.chat_template = "
                    f"{options.chat_template!r} would wrap each text in it", where=str(options.train),
                    hint="leave task.chat_template at 'auto' (or 'plain'), or give the data as chats (e.g. "
                         "{\"messages\": [...]}) to train with a template")


def _continuation_prompt(text: str) -> tuple[list[dict], str]:
    """A text as a sample generation: its first half (in words) as the prompt, the rest expected."""
    words = text.split(" ")
    half = max(1, len(words) // 2)
    return [{"role": "user", "content": " ".join(words[:half])}], " ".join(words[half:])


def loss_memory(loss: str, batch_size: int, max_length: int, config, device: str | None = None) -> str:
    """"chunked" (TRL's fused LM head: no full-vocabulary logits) or "logits" (plain cross-entropy).
    auto: chunked on a GPU; on a CPU only when fp32 logits + softmax + gradient would pass a
    quarter of the free memory (at least 1 GiB). The chunked loss computes the LM head again
    in the backward pass: on a CPU that doubled the Quickstart's step time (13.5 s against
    6.4 s, benchmarks/RESULTS.md) to save memory a CPU machine usually has."""
    if loss != "auto":
        return "chunked" if loss == "chunked" else "logits"
    import psutil
    import torch

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    logits = 12 * batch_size * max_length * vocab
    return "chunked" if on_gpu or logits > max(2**30, psutil.virtual_memory().available // 4) else "logits"


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
        **checkpointing_args(args, SFTConfig),
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
