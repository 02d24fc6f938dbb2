"""Reward models: a sequence-classification head with one output (a scalar score) trained on
preference pairs with TRL's ``RewardTrainer`` (loss −log σ(r(chosen) − r(rejected))).

A task of its own rather than a ``method`` of the ``preference`` task: its model is a
sequence classifier (peft ``SEQ_CLS``, the head trained and saved with an adapter), it scores
texts (``petune predict``, ``/v1/predict``) instead of writing them, and its data are the same
pair files, read by the same code (:func:`petune_plugins.tasks.preference.read_preferences`:
formats ``pairs``, ``hh-rlhf``, ``openai``; dropped pairs counted in the plan's notes)::

    [task]
    name = "reward"
    train = "pairs_train.jsonl"
    validation = "pairs_validation.jsonl"
    max_length = 256
    max_prompt_length = 192

What the model reads, per answer:

* a decoder (Gemma, Llama ...): the prompt and the answer in the chat template, as the
  ``preference`` task tokenizes them (the answer through its end-of-turn token, whose
  position the head reads);
* an encoder (BERT, MiniLM ...): ``[CLS] prompt [SEP] answer [SEP]``, the prompt's turns
  written as ``user: ...`` / ``assistant: ...`` lines.

``max_prompt_length`` keeps the end of long prompts; ``max_length`` then cuts answers at the
end; a pair whose answer is cut to nothing, or whose two answers become identical, is dropped
and counted.

Metrics on held-out pairs, before training and after (``validation_before`` / ``validation``,
and test), in metrics.json: ``accuracy`` (share of pairs whose chosen answer scores higher,
ties counted half), ``margin`` (mean score of chosen minus rejected), ``chosen_reward`` and
``rejected_reward`` (mean scores). Predictions: one ``{"score": float}`` per input, an input
being ``prompt<TAB>answer`` (a line without a tab: an answer to an empty prompt), or a
JSON Lines record ``{"prompt", "completion"}`` (strings or messages).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from petune import hookimpl
from petune.api import DataPath, ModelInfo, TaskData
from petune.errors import DataError
from petune_plugins.tasks import _common as common
from petune_plugins.tasks import datafiles
from petune_plugins.tasks.causal_lm import checkpointing_args
from petune_plugins.tasks.chat_records import BadRow, parse_records, record_keys
from petune_plugins.tasks.chat_templates import prepare_chat_tokenizer
from petune_plugins.tasks.datafiles import json_type
from petune_plugins.tasks.encoding import encode_split
from petune_plugins.tasks.preference import (
    Pair,
    PairEncoder,
    answer_messages,
    no_pairs_left,
    note_encoded,
    pairwise_accuracy,
    prompt_messages,
    read_splits,
)

__all__ = [
    "DEFAULT_MAX_LENGTH", "RewardEncoder", "RewardOptions", "RewardTask", "encode_pairs", "plain_turns",
    "reward_metrics", "score_pairs", "sequence_scores", "special_frame",
]

DEFAULT_MAX_LENGTH = 512


class RewardOptions(common.SplitOptions):
    train: DataPath = Field(description="training pairs: JSON Lines, a JSON list or CSV")
    validation: DataPath | None = Field(None, description="held-out pairs: pairwise accuracy and margin before/after")
    test: DataPath | None = Field(None, description="test pairs, scored after training")
    format: Literal["auto", "pairs", "hh-rlhf", "openai"] = Field(
        "auto", description="data format (as the preference task's); auto: by the keys of each file's first record")
    chat_template: Literal["auto", "model", "chatml", "gemma", "alpaca", "plain"] = Field(
        "auto", description="decoder models: as the sft task (auto = the model's own, else a built-in); "
                            "encoders read '[CLS] prompt [SEP] answer [SEP]'")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=8, description="tokens of prompt + answer; answers are cut at "
                                                                  "the end")
    max_prompt_length: int | None = Field(None, ge=1, description="tokens of a prompt; longer ones keep their end")
    max_rows: int | None = Field(None, ge=1, description="read at most this many records of each file")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="TRL's auxiliary loss pulling scores towards 0 (e.g. 0.01); none by default")

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}), or no answer token fits")
        return self


# -- texts → token ids ------------------------------------------------------------------------
def plain_turns(messages: list[dict], first_role: bool = True) -> str:
    """Messages as ``role: content`` lines (the first without its role when ``first_role`` is False)."""
    return "\n".join(m["content"] if i == 0 and not first_role else f"{m['role']}: {m['content']}"
                     for i, m in enumerate(messages))


class RewardEncoder:
    """(prompt, answer) → the token ids the reward model scores; see the module doc."""

    def __init__(self, tokenizer, state: dict):
        self.tokenizer = tokenizer
        self.chat = state["encoding"] == "chat"
        self.max_length, self.max_prompt_length = state["max_length"], state.get("max_prompt_length")
        if self.chat:
            self.pairs = PairEncoder(tokenizer, tokenizer.chat_template, state["end_of_turn"],
                                     max_length=self.max_length, max_prompt_length=self.max_prompt_length)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def encode(self, prompt: list[dict], answers: list[list[dict]], where: str, counts: dict) -> list[list[int]]:
        """One sequence per answer (an empty list: the answer was cut to nothing)."""
        if self.chat:
            if not prompt:  # the answer's text as it is, ended by the end-of-turn token
                return [self.pairs.cut_answer([], self._ids(plain_turns(a, first_role=False) + self.pairs.end_of_turn),
                                              counts) for a in answers]
            before = self.pairs.prompt_text(prompt, where)
            prompt_ids = self.pairs.prompt_ids(before, counts)
            out = []
            for answer in answers:
                text = self.pairs.answer_text(prompt, before, answer, where)
                ids = self.pairs.cut_answer(prompt_ids, self.pairs.token_ids(text), counts)
                out.append(prompt_ids + ids if ids else [])
            return out
        prefix, middle, suffix = special_frame(self.tokenizer, pair=bool(prompt))
        specials = len(prefix) + len(middle) + len(suffix)
        prompt_ids = self._ids(plain_turns(prompt))
        limit = self.max_prompt_length
        if limit is not None and len(prompt_ids) > limit:
            counts["prompts_cut"] += 1
            prompt_ids = prompt_ids[len(prompt_ids) - limit:]
        room = max(self.max_length - specials - len(prompt_ids), 0)
        out = []
        for answer in answers:
            ids = self._ids(plain_turns(answer, first_role=False))
            if len(ids) > room:
                counts["answers_cut"] += 1
                ids = ids[:room]
            if not ids:
                out.append([])
                continue
            out.append(prefix + prompt_ids + middle + ids + suffix if prompt else prefix + ids + suffix)
        return out


def special_frame(tokenizer, pair: bool) -> tuple[list[int], list[int], list[int]]:
    """The special tokens a tokenizer puts around one text (prefix, [], suffix) or a text pair
    (prefix, middle, suffix): BERT's [CLS] a [SEP] b [SEP], RoBERTa's <s> a </s></s> b </s>.
    Found by tokenizing two probe words, since transformers 5's fast tokenizers no longer
    build inputs from ids."""
    a = tokenizer("alpha", add_special_tokens=False)["input_ids"]
    b = tokenizer("omega", add_special_tokens=False)["input_ids"]
    full = tokenizer("alpha", "omega")["input_ids"] if pair else tokenizer("alpha")["input_ids"]

    def find(part, start=0):
        return next((i for i in range(start, len(full) - len(part) + 1) if full[i:i + len(part)] == part), None)

    i = find(a)
    if i is None:
        return [], [], []
    if not pair:
        return full[:i], [], full[i + len(a):]
    j = find(b, i + len(a))
    if j is None:
        return [], [], []
    return full[:i], full[i + len(a):j], full[j + len(b):]


def encode_pairs(encoder: RewardEncoder, pairs: list[Pair]) -> tuple[dict[str, list], dict[str, int]]:
    columns = {k: [] for k in ("chosen_ids", "rejected_ids", "where")}
    counts = {"prompts_cut": 0, "answers_cut": 0, "cut_to_nothing": 0, "identical": 0}
    for pair in pairs:
        chosen, rejected = encoder.encode(pair.prompt, [pair.chosen, pair.rejected], pair.where, counts)
        if not chosen or not rejected:
            counts["cut_to_nothing"] += 1
            continue
        if chosen == rejected:  # identical once cut to max_length
            counts["identical"] += 1
            continue
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
        columns["where"].append(pair.where)
    return columns, counts


# -- scoring ------------------------------------------------------------------------------------
def sequence_scores(model, sequences: list[list[int]], batch_size: int = 16) -> list[float]:
    """The reward model's score of each token sequence (padded on the right in batches)."""
    import torch

    pad = model.config.get_text_config().pad_token_id
    pad = 0 if pad is None else pad
    device = common.model_device(model)
    scores = []
    with common.evaluating(model), torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            longest = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (longest - len(s)) for s in batch], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            scores += logits[:, 0].float().cpu().tolist()
    return scores


def reward_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Pairwise accuracy (ties half), mean margin and mean scores of scored pairs."""
    n = len(chosen)
    return {"accuracy": pairwise_accuracy(zip(chosen, rejected)),
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n, "chosen_reward": sum(chosen) / n, "rejected_reward": sum(rejected) / n, "pairs": n}


def score_pairs(model, dataset) -> dict:
    n = len(dataset)
    scores = sequence_scores(model, list(dataset["chosen_ids"]) + list(dataset["rejected_ids"]))
    return reward_metrics(scores[:n], scores[n:])


# -- the task ---------------------------------------------------------------------------------
class RewardTask(common.EncoderTask):
    """A one-output sequence-classification head scoring (prompt, answer): trained so that the
    chosen answer of a pair scores above the rejected one, as a reward model for RLHF."""

    name = "reward"
    description = "reward model: a scalar score head trained on preference pairs (TRL RewardTrainer); pairwise accuracy"
    Options = RewardOptions
    head = common.SEQUENCE_CLASSIFICATION
    primary_metric = "accuracy"

    def sequence_length(self, options: RewardOptions) -> int:
        return options.max_length

    def sequences_per_example(self, options: RewardOptions) -> int:
        return 2  # chosen and rejected

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: RewardOptions, tokenizer) -> TaskData:
        examples, fmt, notes = read_splits(options)
        return self._encode(examples, options, self.prepare_tokenizer(options, tokenizer, fmt), tokenizer, notes)

    def load_eval_data(self, options: RewardOptions, tokenizer, state: dict) -> TaskData:
        examples, _, notes = read_splits(options, held_out_only=True)
        return self._encode(examples, options, state, tokenizer, notes)

    @staticmethod
    def prepare_tokenizer(options: RewardOptions, tokenizer, fmt: str | None) -> dict:
        """The run's state: how answers are encoded (chat template for decoders, text pairs for
        encoders), the lengths, the pad token."""
        info = common.model_info_of(tokenizer)
        decoder = info.is_decoder_only if info is not None else tokenizer.cls_token is None
        state = {"format": fmt, "max_length": options.max_length, "max_prompt_length": options.max_prompt_length}
        if decoder:
            chat = prepare_chat_tokenizer(tokenizer, options.chat_template)
            state.update(encoding="chat", end_of_turn=chat.end_of_turn, **chat.state)
            state["chat_template_note"] = chat.note
        else:
            padded = common.ensure_pad_token(tokenizer)  # EOS pads an encoder's pairs
            state.update(encoding="pair", pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id)
            if padded:
                state["pad_token_set"] = True
        return state

    @staticmethod
    def _encode(examples: dict, options: RewardOptions, state: dict, tokenizer, notes: dict) -> TaskData:
        encoder = RewardEncoder(tokenizer, state)
        if state.get("chat_template_note"):
            notes = {"chat_template": state["chat_template_note"], **notes}
        datasets = {}
        for split, found in examples.items():
            dataset, counts = encode_split(found, partial(encode_pairs, encoder), desc=split)  # in batches, to Arrow
            note_encoded(notes, split, counts)
            if not len(dataset):
                raise no_pairs_left(options, split, notes)
            datasets[split] = dataset
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: RewardOptions, state: dict, **load_kwargs):
        if state.get("pad_token_id") is not None:
            load_kwargs.setdefault("pad_token_id", state["pad_token_id"])  # decoders read the last non-pad token
        model = self.head.load(model_info, num_labels=1, id2label={0: "score"}, label2id={"score": 0},
                               problem_type="regression", **load_kwargs)
        vocab_size = state.get("vocab_size")
        if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)  # a pad token was added (the tokenizer had none to reuse)
        if state.get("pad_token_id") is not None:
            model.config.get_text_config().pad_token_id = state["pad_token_id"]
        return model

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options: RewardOptions, args: dict, callbacks: list):
        from trl import RewardConfig, RewardTrainer

        config = {"bf16": False, **checkpointing_args(args, RewardConfig),
                  "max_length": None,  # cut (and counted) in load_data; TRL would drop longer pairs silently
                  "center_rewards_coefficient": options.center_rewards_coefficient,
                  "disable_dropout": True}
        if data.validation is None:
            config["eval_strategy"] = "no"
        # TRL casts a quantized model's trainable weights to bf16 (QLoRA's recipe): right for LoRA's
        # matrices, which cast their input, but the head would then meet hidden states of another dtype
        heads = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        trainer = RewardTrainer(model=model, args=RewardConfig(**config), train_dataset=data.train,
                                eval_dataset=data.validation, processing_class=tokenizer, callbacks=callbacks)
        for name, param in trainer.model.named_parameters():
            if name in heads and param.dtype != heads[name]:
                param.data = param.data.to(heads[name])
        def starting_point(main_process: bool) -> common.StartingPoint:  # the new head is random then
            return common.StartingPoint({split: score_pairs(trainer.model, dataset)
                                         for split, dataset in common.held_out_splits(data)})

        common.measure_before_training(trainer, starting_point)
        return trainer

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, trainer, data: TaskData, options: RewardOptions, run_dir: Path) -> dict[str, dict]:
        metrics = {}
        before = common.before_training(trainer)
        for split, dataset in common.held_out_splits(data):
            if split in before.metrics:
                metrics[f"{split}_before"] = before.metrics[split]
            metrics[split] = score_pairs(trainer.model, dataset)
        return metrics

    # -- predict (petune predict, /v1/predict) ----------------------------------------------
    def parse_inputs(self, options: RewardOptions, text: str, source: str) -> list[dict]:
        """Rows to score: JSON Lines / JSON records ``{"prompt", "completion"}`` (strings or
        messages), or plain text, one ``prompt<TAB>answer`` per line (no tab: an answer with an
        empty prompt)."""
        rows = []
        kind = datafiles.data_format(source)
        if kind in ("jsonl", "json"):
            for row in parse_records(text, source, jsonl=True if kind == "jsonl" else None):
                record, where = row.data, row.where
                try:
                    if not isinstance(record, dict) or "completion" not in record:
                        raise BadRow("expected a {prompt, completion} record, got "
                                     + (f"keys {record_keys(record)}" if isinstance(record, dict) else json_type(record)))
                    prompt = prompt_messages(record["prompt"], "prompt") if record.get("prompt") else []
                    rows.append({"prompt": prompt, "answer": answer_messages(record["completion"], "completion"),
                                 "where": where})
                except BadRow as exc:
                    raise DataError(f"{row.prefix}{exc}", where=where,
                                    hint=exc.hint or 'one {"prompt", "completion"} per record') from None
        else:
            for number, line in datafiles.text_lines(text):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                prompt, tab, answer = line.partition("\t")
                if not tab:
                    prompt, answer = "", line
                where = datafiles.where(source, number)
                if not answer.strip():
                    raise DataError("the answer after the tab is empty", where=where, hint="give prompt<TAB>answer")
                rows.append({"prompt": [{"role": "user", "content": prompt}] if prompt.strip() else [],
                             "answer": [{"role": "assistant", "content": answer}], "where": where})
        if not rows:
            raise DataError("no answer to score", where=source, hint="give one prompt<TAB>answer per line")
        return rows

    def predict(self, model, tokenizer, options: RewardOptions, state: dict, rows: list[dict]) -> list[dict]:
        encoder = RewardEncoder(tokenizer, state)
        counts = {"prompts_cut": 0, "answers_cut": 0}
        sequences = [encoder.encode(row["prompt"], [row["answer"]], row.get("where", ""), counts)[0] for row in rows]
        scored = [i for i, s in enumerate(sequences) if s]
        scores = dict(zip(scored, sequence_scores(model, [sequences[i] for i in scored])))
        return [{"score": scores.get(i)} for i in range(len(rows))]

    def format_predictions(self, rows: list[dict], predictions: list[dict]) -> str:
        """TSV with a header: prompt, answer, score."""
        lines = ["prompt\tanswer\tscore"]
        for row, prediction in zip(rows, predictions):
            score = prediction["score"]
            cells = [plain_turns(row["prompt"]), plain_turns(row["answer"], first_role=False),
                     "" if score is None else f"{score:.4f}"]
            lines.append("\t".join(" ".join(c.split()) for c in cells))
        return "\n".join(lines) + "\n"


@hookimpl
def register_tasks(register):
    register(RewardTask)
