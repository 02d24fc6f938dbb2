"""Extractive question answering: find the answer span in a context (SQuAD v1.1 / v2.0).

Data
    SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers":
    [{"text", "answer_start"}], "is_impossible"}]}]}]}``, v1.1 or v2.0), or records — JSON
    Lines / a JSON list — ``{"question", "context", "answers", "id"}`` where answers is SQuAD's
    list of ``{text, answer_start}``, the Hugging Face layout ``{"text": [...],
    "answer_start": [...]}``, or a list of strings (found in the context). An empty answer
    list is an unanswerable question (SQuAD v2). Records may come in any format the shared
    reader takes (also ``.jsonl.gz``, Parquet, Arrow). ``validation_split`` (default 0) holds
    out whole contexts. Every answer is checked against its context:
    a start that is off but whose text occurs in the context is repaired (to the nearest
    occurrence) and counted; an answer not in its context is an error naming the question.

Windows
    A context longer than fits is split into overlapping windows of ``max_length`` tokens
    (question + context) sharing ``doc_stride`` tokens, using the tokenizer's offset mapping.
    In each window the answer's character span is mapped to token positions, or, when the
    window does not hold the whole answer, the window is labelled "no answer here" (the first
    token, as in BERT's SQuAD recipe). Nothing is dropped: every window trains, answers that
    no window holds whole (longer than a window) are counted in the plan's notes. Questions
    longer than ``max_question_length`` tokens are cut (counted).

Post-processing
    For each question, the ``n_best`` start and end logits of every window are combined into
    candidate spans (inside the context, end >= start, at most ``max_answer_length`` tokens),
    scored start + end logit, and mapped back to the original context characters; the best
    span over all windows wins. With unanswerable questions (SQuAD v2; ``no_answer = "auto"``
    turns this on when the training data has any), the answer is empty when the no-answer
    score (first token, lowest over the windows) beats the best span by more than
    ``null_score_diff_threshold``. ``score`` is the winner's softmax probability among the
    candidates.

Metrics
    exact_match and f1 with the official SQuAD normalisation (``text_metrics``), max over the
    gold answers, on a 0-100 scale; with unanswerable questions also has_answer_* and
    no_answer_*. Per-question predictions: ``reports/qa_predictions_<split>.jsonl`` (question,
    gold answers, prediction, offsets, score, EM, F1) and ``reports/predictions_<split>.json``
    (``{id: answer}``, the input of the official evaluation script).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from petune import hookimpl
from petune.api import ModelInfo, TaskData, load_pretrained
from petune.errors import DataError, Refusal
from petune_plugins.tasks import datafiles, reports, text_metrics
from petune_plugins.tasks._common import (
    QUESTION_ANSWERING,
    EncoderTask,
    SplitOptions,
    accepted_inputs,
    build_trainer,
    cut_to_tokens,
    ensure_pad_token,
    held_out_splits,
    hold_out,
    model_device,
    model_limit,
    read_held_out,
    seeded_split,
)
from petune_plugins.tasks.encoding import encode_split

if TYPE_CHECKING:
    from transformers import Trainer

DEFAULT_MAX_LENGTH = 384
#: per-window columns that are not model inputs
META_COLUMNS = ("example_index", "offset_mapping", "cls_index", "example_id", "question", "context", "answers",
                "where")


class QaOptions(SplitOptions):
    """``validation_split`` holds out whole contexts: the questions of one context stay together."""

    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH
    max_length: int | None = Field(None, ge=32, description=f"tokens per window, question included (default "
                                   f"min({DEFAULT_MAX_LENGTH}, the model's limit))")
    doc_stride: int = Field(128, ge=0, description="context tokens shared by consecutive windows")
    max_question_length: int = Field(64, ge=1, description="question tokens kept (longer questions are cut)")
    max_answer_length: int = Field(30, ge=1, description="longest answer predicted, in tokens")
    n_best: int = Field(20, ge=1, description="start and end positions considered per window")
    no_answer: bool | Literal["auto"] = Field("auto", description="allow 'no answer' (SQuAD v2); auto: when the "
                                                                  "training data has unanswerable questions")
    null_score_diff_threshold: float = Field(0.0, description="answer empty when the no-answer score beats the "
                                                              "best span by more than this")
    max_rows: int | None = Field(None, ge=1, description="read at most this many questions of each file")


# -- reading --------------------------------------------------------------------------------
@dataclass
class QaExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, character start); [] = no answer
    where: str = ""

    @property
    def answer_texts(self) -> list[str]:
        return [text for text, _ in self.answers]


@dataclass
class ReadStats:
    repaired: int = 0


def _answers_of(value, where: str) -> list[tuple[str, int | None]]:
    """(text, start or None) from SQuAD's list of {text, answer_start}, HF's {text: [], answer_start: []},
    or a list of strings."""
    if value is None:
        return []
    if isinstance(value, dict) and "text" in value:
        texts, starts = value.get("text") or [], value.get("answer_start") or []
        if not isinstance(texts, list):
            texts, starts = [texts], [starts] if not isinstance(starts, list) else starts
        starts = list(starts) + [None] * (len(texts) - len(starts))
        return [(t, s) for t, s in zip(texts, starts)]
    if isinstance(value, str):
        return [(value, None)]
    if not isinstance(value, list):
        raise DataError(f"answers must be a list, found {datafiles.json_type(value)}", where=where,
                        hint='e.g. "answers": [{"text": "Paris", "answer_start": 17}]')
    out = []
    for item in value:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict) and "text" in item:
            out.append((item["text"], item.get("answer_start")))
        else:
            raise DataError(f"each answer must be {{text, answer_start}} or a string, found {datafiles.json_type(item)}",
                            where=where)
    return out


def check_answers(question_id: str, context: str, answers: list[tuple[str, int | None]], where: str,
                  stats: ReadStats) -> list[tuple[str, int]]:
    """Answers whose character span is checked against the context (repairing a start that is off)."""
    checked = []
    for text, start in answers:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"question {question_id!r}: an answer text is empty or not text", where=where)
        if isinstance(start, bool) or not (start is None or isinstance(start, int)):
            raise DataError(f"question {question_id!r}: answer_start must be a whole number", where=where)
        if start is not None and context[start:start + len(text)] == text:
            checked.append((text, start))
            continue
        found = [i for i in _occurrences(context, text)]
        if not found:
            raise DataError(f"question {question_id!r}: the answer {text!r} does not occur in its context",
                            where=where, hint="fix the answer text (it must be copied from the context)")
        best = min(found, key=lambda i: abs(i - start)) if start is not None else found[0]
        if start is not None:
            stats.repaired += 1
        checked.append((text, best))
    return checked


def _occurrences(text: str, part: str):
    i = text.find(part)
    while i >= 0:
        yield i
        i = text.find(part, i + 1)


def _is_squad(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("data"), list)


def examples_from_squad(data: dict, source: str, text: str, stats: ReadStats, max_rows: int | None = None) -> list[QaExample]:
    examples = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            place = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise DataError(f"{place} has no 'context' text", where=source)
            context = paragraph["context"]
            for q, qa in enumerate(paragraph.get("qas", [])):
                qid = str(qa.get("id", f"{a}-{p}-{q}")) if isinstance(qa, dict) else f"{a}-{p}-{q}"
                where = _where_in_json(text, source, qid)
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise DataError(f"{place}.qas[{q}] has no 'question' text", where=where)
                answers = [] if qa.get("is_impossible") else _answers_of(qa.get("answers"), where)
                examples.append(QaExample(qid, qa["question"], context,
                                          check_answers(qid, context, answers, where, stats), where))
                if max_rows is not None and len(examples) >= max_rows:
                    return examples
    return examples


def _where_in_json(text: str, source: str, qid: str) -> str:
    at = text.find(json.dumps(qid))
    return f"{source}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else source


def examples_from_records(records: list[datafiles.Record], stats: ReadStats, *, need_answers: bool = True) -> list[QaExample]:
    examples = []
    for i, record in enumerate(records):
        for key in ("question", "context"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"missing {key!r} text; the record has {', '.join(map(repr, record)) or 'none'}",
                                where=record.where)
        qid = str(record.get("id", i))
        if "answers" not in record and need_answers:
            raise DataError("missing 'answers' (an empty list marks an unanswerable question)", where=record.where,
                            hint='e.g. "answers": [{"text": "Paris", "answer_start": 17}]')
        answers = _answers_of(record.get("answers"), record.where)
        examples.append(QaExample(qid, record["question"], record["context"],
                                  check_answers(qid, record["context"], answers, record.where, stats), record.where))
    return examples


def parse_examples(text: str, source: str, stats: ReadStats, *, max_rows: int | None = None,
                   need_answers: bool = True) -> list[QaExample]:
    stripped = text.lstrip()
    if not stripped:
        raise DataError("the file is empty", where=source)
    if stripped.startswith("{") and datafiles.data_format(source) != "jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines
        if _is_squad(data):
            return examples_from_squad(data, source, text, stats, max_rows)
    if stripped.startswith("["):
        records = datafiles.parse_json_records(text, source, max_rows=max_rows)
    else:
        records = datafiles.parse_jsonl(datafiles.text_lines(text), source, max_rows=max_rows)
    return examples_from_records(records, stats, need_answers=need_answers)


def read_examples(path: Path, max_rows: int | None = None) -> tuple[list[QaExample], ReadStats]:
    """Questions of a SQuAD JSON file, or of records in any format the shared reader takes."""
    stats = ReadStats()
    if datafiles.data_format(path) in ("jsonl", "json", None):  # SQuAD JSON is one document, not records
        examples = parse_examples(datafiles.read_text(path), str(path), stats, max_rows=max_rows)
    else:
        examples = examples_from_records(datafiles.read_records(path, max_rows), stats)
    if not examples:
        raise DataError("no questions in the file", where=str(path))
    return examples, stats


# -- windows ----------------------------------------------------------------------------------
@dataclass
class Windows:
    columns: dict
    stats: dict


def make_windows(tokenizer, examples: list[QaExample], *, max_length: int, doc_stride: int,
                 max_question_length: int, max_answer_length: int | None = None) -> Windows:
    """Overlapping windows of question + context with start/end token labels (the first token
    where the window does not hold the whole first answer) and per-window metadata."""
    questions, questions_cut = cut_to_tokens(tokenizer, [e.question for e in examples], max_question_length)
    encoded = tokenizer(questions, [e.context for e in examples], truncation="only_second", max_length=max_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding=False, verbose=False)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    columns: dict[str, list] = {k: [] for k in (*keep, "start_positions", "end_positions", *META_COLUMNS)}
    held_whole = [False] * len(examples)
    too_long_answers = 0
    for i, ids in enumerate(encoded["input_ids"]):
        e_index = encoded["overflow_to_sample_mapping"][i]
        example = examples[e_index]
        sequence_ids = encoded.sequence_ids(i)
        offsets = [list(o) if s == 1 else [-1, -1] for o, s in zip(encoded["offset_mapping"][i], sequence_ids)]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        start_token = end_token = cls
        if example.answers:
            text, start_char = example.answers[0]
            end_char = start_char + len(text)
            context_tokens = [k for k, s in enumerate(sequence_ids) if s == 1]
            if context_tokens:
                first, last = context_tokens[0], context_tokens[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start_token = first
                    while start_token <= last and offsets[start_token][1] <= start_char:
                        start_token += 1
                    end_token = last
                    while end_token >= first and offsets[end_token][0] >= end_char:
                        end_token -= 1
                    if not held_whole[e_index] and max_answer_length and end_token - start_token + 1 > max_answer_length:
                        too_long_answers += 1
                    held_whole[e_index] = True
        for k in keep:
            columns[k].append(list(encoded[k][i]))
        columns["start_positions"].append(start_token)
        columns["end_positions"].append(end_token)
        columns["example_index"].append(e_index)
        columns["offset_mapping"].append(offsets)
        columns["cls_index"].append(cls)
        columns["example_id"].append(example.id)
        columns["question"].append(example.question)
        columns["context"].append(example.context)
        columns["answers"].append(example.answer_texts)
        columns["where"].append(example.where)
    answered = [e.answers != [] for e in examples]
    stats = {"questions": len(examples), "windows": len(encoded["input_ids"]),
             "questions_cut": questions_cut,
             "answers_in_no_window": sum(1 for a, h in zip(answered, held_whole) if a and not h),
             "answers_longer_than_max_answer_length": too_long_answers,
             "unanswerable": sum(1 for a in answered if not a)}
    return Windows(columns, stats)


def encode_batch(tokenizer, numbered: list[tuple[int, QaExample]], *, answered: bool,
                 **settings) -> tuple[dict[str, list], dict[str, int]]:
    """Windows of a batch of (index in the split, question), for :func:`encode_split`:
    ``example_index`` counted in the whole split; ``answered``: the split has an answer."""
    windows = make_windows(tokenizer, [example for _, example in numbered], **settings)
    columns = windows.columns
    first = numbered[0][0]  # a batch is a run of consecutive questions
    columns["example_index"] = [first + i for i in columns["example_index"]]
    if answered:  # typed: a first batch of unanswerable questions alone would make the column's type null
        import pyarrow as pa

        columns["answers"] = pa.array(columns["answers"], pa.list_(pa.string()))
    return columns, windows.stats


# -- post-processing --------------------------------------------------------------------------
def postprocess(windows: dict, start_logits, end_logits, *, n_best: int = 20, max_answer_length: int = 30,
                no_answer: bool = False, null_score_diff_threshold: float = 0.0) -> list[dict]:
    """One prediction per question (in order of first appearance): the best span over all of
    its windows, {"id", "answer", "start", "end", "score", "span_score", "null_score"}."""
    import numpy as np

    by_example: dict[int, list[int]] = defaultdict(list)
    for w, e in enumerate(windows["example_index"]):
        by_example[e].append(w)
    predictions = []
    for e, window_ids in by_example.items():
        context = windows["context"][window_ids[0]]
        candidates: dict[tuple[int, int], float] = {}
        null_score = None
        for w in window_ids:
            offsets = windows["offset_mapping"][w]
            n = len(offsets)
            starts = np.asarray(start_logits[w][:n], dtype=np.float64)
            ends = np.asarray(end_logits[w][:n], dtype=np.float64)
            cls = windows["cls_index"][w] if "cls_index" in windows else 0
            window_null = float(starts[cls] + ends[cls])
            null_score = window_null if null_score is None else min(null_score, window_null)
            for s in np.argsort(starts)[::-1][:n_best]:
                if offsets[s][0] < 0:
                    continue
                for t in np.argsort(ends)[::-1][:n_best]:
                    if offsets[t][0] < 0 or t < s or t - s + 1 > max_answer_length:
                        continue
                    span = (offsets[s][0], offsets[t][1])
                    score = float(starts[s] + ends[t])
                    if score > candidates.get(span, -math.inf):
                        candidates[span] = score
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1])[:n_best]
        scores = [score for _, score in ranked] + ([null_score] if no_answer else [])
        top = max(scores) if scores else 0.0
        total = sum(math.exp(s - top) for s in scores) if scores else 1.0
        prediction = {"id": windows["example_id"][window_ids[0]], "answer": "", "start": None, "end": None,
                      "score": 0.0, "span_score": None, "null_score": null_score}
        if ranked:
            (start, end), best = ranked[0]
            prediction.update(answer=context[start:end], start=start, end=end, score=math.exp(best - top) / total,
                              span_score=best)
            if no_answer and null_score - best > null_score_diff_threshold:
                prediction.update(answer="", start=None, end=None, score=math.exp(null_score - top) / total)
        elif no_answer:
            prediction["score"] = 1.0
        prediction["example_index"] = e
        predictions.append(prediction)
    return predictions


class QaCollator:
    """Pads token columns on the right (input_ids with the pad id, the others with 0), stacks
    start/end positions, and keeps only what the model takes."""

    def __init__(self, pad_token_id: int, keep: set[str] | None):
        self.pad_token_id, self.keep = pad_token_id, keep

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = {}
        longest = max(len(f["input_ids"]) for f in features)
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            if name not in features[0] or (self.keep is not None and name not in self.keep):
                continue
            fill = self.pad_token_id if name == "input_ids" else 0
            batch[name] = torch.tensor([list(f[name]) + [fill] * (longest - len(f[name])) for f in features])
        for name in ("start_positions", "end_positions"):
            if name in features[0]:
                batch[name] = torch.tensor([f[name] for f in features], dtype=torch.long)
        return batch


def _need_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise Refusal("the qa task needs a fast tokenizer (character offsets of every token)",
                      hint="use a model with a tokenizer.json")


# -- the task ---------------------------------------------------------------------------------
class QaTask(EncoderTask):
    name = "qa"
    description = "extractive question answering (SQuAD v1.1/v2.0, JSONL); overlapping windows; EM/F1"
    Options = QaOptions
    head = QUESTION_ANSWERING
    primary_metric = "f1"

    def settings(self, options: QaOptions, tokenizer) -> dict:
        limit = model_limit(tokenizer)
        max_length = options.max_length or (min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH)
        if limit:
            max_length = min(max_length, limit)
        room = max_length - options.max_question_length - tokenizer.num_special_tokens_to_add(pair=True)
        if room <= options.doc_stride:
            raise Refusal(f"windows of {max_length} tokens leave {room} for the context after a question of up to "
                          f"{options.max_question_length} tokens, not more than doc_stride = {options.doc_stride}: "
                          "the windows would not advance", where="task.doc_stride",
                          hint="lower task.doc_stride or task.max_question_length, or raise task.max_length")
        return {"max_length": max_length, "doc_stride": options.doc_stride,
                "max_question_length": options.max_question_length}

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: QaOptions, tokenizer) -> TaskData:
        _need_fast(tokenizer)
        train, stats = read_examples(options.train, options.max_rows)
        held_out, repaired = self._read_held_out(options)
        repaired += stats.repaired
        train = hold_out(train, held_out, options, str(options.train), split=split_by_context)
        padded = ensure_pad_token(tokenizer)
        settings = self.settings(options, tokenizer)
        no_answer = options.no_answer if options.no_answer != "auto" else any(not e.answers for e in train)
        state = {**settings, "max_answer_length": options.max_answer_length, "n_best": options.n_best,
                 "no_answer": no_answer, "null_score_diff_threshold": options.null_score_diff_threshold,
                 "pad_token_id": tokenizer.pad_token_id}
        data = self._encode({"train": train, **held_out}, tokenizer, state, repaired)
        if padded:
            data.notes["pad_token_set_to"] = tokenizer.pad_token
        return data

    def load_eval_data(self, options: QaOptions, tokenizer, state: dict) -> TaskData:
        _need_fast(tokenizer)
        held_out, repaired = self._read_held_out(options)
        return self._encode(held_out, tokenizer, state, repaired)

    @staticmethod
    def _read_held_out(options: QaOptions) -> tuple[dict[str, list], int]:
        """The validation and test files (where given), and how many answer starts were repaired."""
        stats = ReadStats()

        def read(split: str, path) -> list[QaExample]:
            examples, file_stats = read_examples(path, options.max_rows)
            stats.repaired += file_stats.repaired
            return examples

        return read_held_out(options, read), stats.repaired

    @staticmethod
    def _encode(splits: dict[str, list], tokenizer, state: dict, repaired: int) -> TaskData:
        notes = {"answer_starts_repaired": repaired} if repaired else {}
        settings = {key: state[key] for key in ("max_length", "doc_stride", "max_question_length", "max_answer_length")}
        datasets = {}
        for split in ("train", "validation", "test"):
            if split not in splits:
                continue
            batch = partial(encode_batch, tokenizer, answered=any(e.answers for e in splits[split]), **settings)
            datasets[split], stats = encode_split(list(enumerate(splits[split])), batch, desc=split)  # to Arrow
            for key, value in stats.items():
                if value or key in ("questions", "windows"):
                    notes[f"{split}_{key}"] = value
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: QaOptions, state: dict, **load_kwargs):
        if state.get("pad_token_id") is not None:
            load_kwargs.setdefault("pad_token_id", state["pad_token_id"])
        model = self.head.load(model_info, **load_kwargs)
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and any(m == prefix or m.startswith(prefix + ".") for m in model.petune_new_modules):
            # e.g. LlamaForQuestionAnswering keeps its body under "transformer", while a causal LM
            # checkpoint stores it under "model": transformers then leaves the whole body random.
            from transformers import AutoModel

            load_kwargs.pop("pad_token_id", None)
            body = load_pretrained(AutoModel, model_info.path, **load_kwargs)
            if type(body) is not type(getattr(model, prefix)):
                raise Refusal(f"the {type(model).__name__} head cannot take the weights of {model_info.name}",
                              where="model.name", hint="use an encoder such as minilm-l6 for the qa task")
            setattr(model, prefix, body)
            model.petune_new_modules = [m for m in model.petune_new_modules
                                        if not (m == prefix or m.startswith(prefix + "."))]
        return model

    # -- training ---------------------------------------------------------------------------
    def _post(self, state: dict, options: QaOptions) -> dict:
        return dict(n_best=state.get("n_best", options.n_best),
                    max_answer_length=state.get("max_answer_length", options.max_answer_length),
                    no_answer=state.get("no_answer", False),
                    null_score_diff_threshold=state.get("null_score_diff_threshold", options.null_score_diff_threshold))

    def make_trainer(self, *, model, tokenizer, data: TaskData, options, args: dict, callbacks: list) -> Trainer:
        validation = data.validation
        post = self._post(data.state, options)

        def compute_metrics(prediction) -> dict:
            start_logits, end_logits = prediction.predictions[:2]
            if validation is None or len(validation) != len(start_logits):
                return {}
            _, metrics = score_windows(validation, start_logits, end_logits, post)
            return {k: v for k, v in metrics.items() if k in ("exact_match", "f1")}

        args = dict(args, label_names=["start_positions", "end_positions"])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return build_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                             collator=QaCollator(pad_id, accepted_inputs(model)), compute_metrics=compute_metrics)

    def evaluate(self, trainer: Trainer, data: TaskData, options, run_dir: Path) -> dict[str, dict]:
        post = self._post(data.state, options)
        results = {}
        for split, dataset in held_out_splits(data):
            output = trainer.predict(dataset, metric_key_prefix=split)
            start_logits, end_logits = output.predictions[:2]
            rows, metrics = score_windows(dataset, start_logits, end_logits, post)
            if f"{split}_loss" in output.metrics:
                metrics["loss"] = float(output.metrics[f"{split}_loss"])
            metrics["windows"] = len(dataset)
            results[split] = metrics
            if trainer.is_world_process_zero():
                report_dir = Path(run_dir) / "reports"
                reports.write_json(report_dir / f"qa_{split}.json", {"split": split, "metrics": metrics,
                                                                     "post_processing": post})
                reports.write_text(report_dir / f"qa_predictions_{split}.jsonl",
                                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                reports.write_json(report_dir / f"predictions_{split}.json", {r["id"]: r["prediction"] for r in rows})
        return results

    # -- predict ----------------------------------------------------------------------------
    def parse_inputs(self, options: QaOptions, text: str, source: str) -> list[QaExample]:
        """Questions to answer: JSONL / a JSON list of {question, context} (answers, if given, are
        kept), or a SQuAD JSON file."""
        examples = parse_examples(text, source, ReadStats(), need_answers=False)
        if not examples:
            raise DataError("no questions to answer", where=source,
                            hint='give JSON Lines like {"question": "...", "context": "..."}')
        return examples

    def predict(self, model, tokenizer, options, state: dict, rows: list[QaExample], batch_size: int = 32) -> list[dict]:
        import torch

        settings = {k: state.get(k) for k in ("max_length", "doc_stride", "max_question_length")}
        if None in settings.values():
            settings = self.settings(options, tokenizer)
        windows = make_windows(tokenizer, rows, **settings).columns
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        collate = QaCollator(pad_id, accepted_inputs(model))
        device = model_device(model)
        model.eval()
        starts, ends = [], []
        count = len(windows["input_ids"])
        for begin in range(0, count, batch_size):
            features = [{k: windows[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in windows}
                        for i in range(begin, min(begin + batch_size, count))]
            batch = {k: v.to(device) for k, v in collate(features).items()}
            with torch.no_grad():
                out = model(**batch)
            starts.extend(out.start_logits.float().cpu().tolist())
            ends.extend(out.end_logits.float().cpu().tolist())
        predicted = postprocess(windows, starts, ends, **self._post(state, options))
        return [{"answer": p["answer"], "score": p["score"], "start": p["start"], "end": p["end"]} for p in predicted]

    def format_predictions(self, rows: list[QaExample], predictions: list[dict]) -> str:
        """JSON Lines: where, id, question, answer, score, start, end (character offsets in the context)."""
        lines = []
        for row, p in zip(rows, predictions):
            line = {"where": row.where, "id": row.id, "question": row.question, **p}
            if row.answers:
                line["gold"] = row.answer_texts
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        return "".join(lines)


def score_windows(dataset, start_logits, end_logits, post: dict) -> tuple[list[dict], dict]:
    """Per-question rows (prediction, gold answers, EM, F1) and the metrics over them."""
    windows = dataset.select_columns([c for c in META_COLUMNS if c in dataset.column_names]).to_dict()
    predicted = postprocess(windows, start_logits, end_logits, **post)
    first_window: dict[int, int] = {}
    for w, e in enumerate(windows["example_index"]):
        first_window.setdefault(e, w)
    rows = []
    for p in predicted:
        w = first_window[p["example_index"]]
        gold = windows["answers"][w]
        em, f1 = text_metrics.squad_scores(p["answer"], gold)
        rows.append({"id": p["id"], "where": windows["where"][w], "question": windows["question"][w],
                     "answers": gold, "prediction": p["answer"], "start": p["start"], "end": p["end"],
                     "score": p["score"], "exact_match": 100.0 * em, "f1": 100.0 * f1})
    metrics = text_metrics.squad_metrics([r["prediction"] for r in rows], [r["answers"] for r in rows])
    return rows, metrics


def split_by_context(examples: list[QaExample], ratio: float, seed: int, source: str) -> tuple[list, list]:
    """Hold out whole contexts (all their questions), so no validation context is trained on."""
    groups: dict[str, list[QaExample]] = {}
    for e in examples:
        groups.setdefault(e.context, []).append(e)
    train_groups, held_groups = seeded_split(list(groups.values()), ratio, seed, source)
    return [e for g in train_groups for e in g], [e for g in held_groups for e in g]


@hookimpl
def register_tasks(register):
    register(QaTask)
