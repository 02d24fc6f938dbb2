"""Sequence to sequence: translation and summarization, on encoder-decoder or decoder-only models.

Models
    Encoder-decoder (``AutoModelForSeq2SeqLM``: T5, BART, Marian ...): the prompt (source
    with its instruction, e.g. ``translate English to German: ...``) goes into the encoder,
    the target is the decoder's labels. peft task type SEQ_2_SEQ_LM.
    Decoder-only causal LMs (Gemma, Llama ...): the prompt is a user turn and the target the
    answer of a one-exchange conversation rendered with a chat template, exactly as the sft
    task does it (the same template choice, tokenizer preparation and loss mask: labels on the
    target and its end-of-turn token only, see ``sft.Encoder``), trained with TRL's SFTTrainer.
    peft task type CAUSAL_LM. The kind comes from the model's config each time it is needed
    (``peft_task_type_for``; ``load_data`` reads the config beside the tokenizer): the task
    object keeps nothing between calls.

Data
    Each split is a records file — JSON Lines, a JSON list, CSV or TSV (each also .gz/.zst),
    Parquet or Arrow — with a source and a
    target field, or a pair of line-aligned text files ``{ source = "train.en", target =
    "train.de" }`` (line *n* of one is the translation of line *n* of the other). Fields are
    found by usual names (source/src/input/text/document/article/abstract; target/tgt/output/
    summary/tldr/...) or set with ``source_field`` / ``target_field`` (a dotted path reaches
    into objects: ``translation.de``). A source that is a list of strings (sentences) is joined
    with ``join_separator``. A target that is a list holds several references: the first is
    trained on (``train_targets = "each"``: one training example per reference), all are used
    for the metrics; ``target_list = "sentences"`` joins it instead. ``references_field``
    names a separate field of references for the metrics.

Lengths
    ``max_source_length`` / ``max_target_length`` are tokens of the source and target text
    themselves (the instruction and template come on top): longer texts are cut at a token
    boundary and counted in the plan's notes. Metrics are always computed against the full
    references.

Metrics (``evaluate``, on validation and test)
    Loss (and perplexity) on the references, then the model generates for every source
    (greedy, or beam search with ``num_beams``, ``length_penalty``; ``max_new_tokens``) and is
    scored with sacreBLEU BLEU and chrF (signatures saved) and rouge-score ROUGE-1/2/L/Lsum
    with stemming, multi-reference where the data has several (see ``text_metrics``), plus the
    mean output length (``gen_len`` tokens, ``gen_words`` words). Reports:
    ``reports/seq2seq_<split>.json`` (scores, signatures, BLEU breakdown) and the predictions
    side by side, ``reports/predictions_<split>.jsonl`` and ``.tsv`` (source, reference,
    output). During training, evaluation is the loss only (generating is slow).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from petune import hookimpl
from petune.api import DataPath, ModelInfo, ModelShape, Task, TaskData, load_pretrained
from petune.errors import DataError, Refusal, UserError
from petune_plugins.tasks import datafiles, reports, sft, text_metrics
from petune_plugins.tasks._common import (
    DataFileTable,
    SplitOptions,
    build_trainer,
    check_data_paths,
    cut_to_tokens,
    evaluating,
    held_out_splits,
    hold_out,
    model_device,
    model_info_of,
    model_positions,
    read_held_out,
    split_file,
)
from petune_plugins.tasks.causal_lm import CAUSAL_LM_SHAPE, build_causal_lm, held_out_loss, seeded
from petune_plugins.tasks.chat_records import Example
from petune_plugins.tasks.chat_templates import prepare_chat_tokenizer, render, stop_token_ids, template_for
from petune_plugins.tasks.encoding import Spool, encode_split

if TYPE_CHECKING:
    from transformers import Trainer

SOURCE_NAMES = ("source", "src", "input", "text", "document", "article", "abstract", "dialogue")
TARGET_NAMES = ("target", "tgt", "output", "summary", "highlights", "tldr", "reference", "references")
ENCODER_DECODER, DECODER_ONLY = "encoder-decoder", "decoder-only"
PLACEHOLDERS = ("source", "source_lang", "target_lang")
#: the prompt when none is given: (model kind, with languages?) -> template
DEFAULT_PROMPTS = {
    (ENCODER_DECODER, True): "translate {source_lang} to {target_lang}: {source}",
    (ENCODER_DECODER, False): "summarize: {source}",
    (DECODER_ONLY, True): "Translate this {source_lang} text into {target_lang}.\n\n{source}",
    (DECODER_ONLY, False): "Summarize the following text.\n\n{source}",
}
#: the tokenizer_config.json key where a run's tokenizer records the model kind
_KIND_KEY = "petune_seq2seq_model_kind"
#: tokens allowed for the template and instruction of a decoder-only prompt, beyond source + target
_TEMPLATE_ROOM = 96


# -- options --------------------------------------------------------------------------------
class DataFile(DataFileTable):
    """A records file (``path``), or two line-aligned text files (``source`` and ``target``)."""

    path: DataPath | None = None
    source: DataPath | None = None
    target: DataPath | None = None

    @model_validator(mode="after")
    def _one_layout(self):
        if self.path is not None and (self.source is not None or self.target is not None):
            raise ValueError("give either path (a records file) or source + target (line-aligned text files)")
        if self.path is None and self.source is None:
            raise ValueError("give path (a .jsonl/.json/.csv/.tsv file) or source + target (line-aligned text files)")
        return self


SplitFile = split_file(DataFile, '{ source = "train.en", target = "train.de" }')


def prompt_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class Seq2SeqOptions(SplitOptions):
    train: SplitFile = Field(description="training data: a .jsonl/.json/.csv/.tsv file, or "
                                         "{ source = \"train.en\", target = \"train.de\" }")
    validation: SplitFile | None = Field(None, description="validation data (loss; generated and scored at the end)")
    test: SplitFile | None = Field(None, description="test data, generated and scored after training")
    source_field: str | None = Field(None, description="records: field of the source (default: source/src/input/"
                                                       "text/document/article/abstract); a.b reaches into objects")
    target_field: str | None = Field(None, description="records: field of the target (default: target/tgt/output/"
                                                       "summary/tldr/...); a list holds several references")
    references_field: str | None = Field(None, description="records: a field of references for the metrics "
                                                           "(default: the target)")
    target_list: Literal["references", "sentences"] = Field(
        "references", description="a list-valued target: several references, or sentences to join")
    train_targets: Literal["first", "each"] = Field("first", description="with several references: train on the "
                                                                         "first, or one example per reference")
    join_separator: str = Field(" ", description="joins a list-of-sentences source (or target_list = sentences)")
    source_lang: str | None = Field(None, description="source language name for the prompt, e.g. \"English\"")
    target_lang: str | None = Field(None, description="target language name for the prompt, e.g. \"German\"")
    prompt: str | None = Field(None, description="prompt template with {source} (and {source_lang}, {target_lang}); "
                                                 "default: a translation prompt when languages are set, else "
                                                 "a summarization prompt")
    chat_template: Literal["auto", "model", "chatml", "gemma", "alpaca", "plain"] = Field(
        "auto", description="decoder-only models: as in the sft task (auto: the model's own, else a built-in)")
    max_source_length: int = Field(256, ge=1, description="tokens of source text kept (longer ones are cut)")
    max_target_length: int = Field(128, ge=1, description="tokens of target text trained on (longer ones are cut)")
    num_beams: int = Field(1, ge=1, description="1: greedy decoding; more: beam search")
    max_new_tokens: int | None = Field(None, ge=1, description="generated tokens at most (default max_target_length)")
    length_penalty: float = Field(1.0, description="beam search: >1 favours longer outputs, <1 shorter")
    no_repeat_ngram_size: int = Field(0, ge=0, description="forbid repeating n-grams of this size (0: off)")
    generation_batch_size: int = Field(16, ge=1, description="sources generated for at once")
    generate_on: list[Literal["validation", "test"]] = Field(
        default_factory=lambda: ["validation", "test"], description="splits scored by generating after training")
    metrics: list[Literal["bleu", "chrf", "rouge"]] = Field(
        default_factory=lambda: list(text_metrics.SEQ2SEQ_METRICS), description="metrics computed on the outputs")
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows of each file")
    quoting: datafiles.Quoting = Field("auto", description=datafiles.QUOTING_HELP)

    @field_validator("prompt")
    @classmethod
    def _known_placeholders(cls, value):
        if value is None:
            return value
        try:
            names = prompt_fields(value)
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
        unknown = [n for n in names if n not in PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown placeholder(s) {unknown}; known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        if "source" not in names:
            raise ValueError("the prompt needs a {source} placeholder")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("give both source_lang and target_lang (translation), or neither")
        names = prompt_fields(self.prompt) if self.prompt else []
        for name in ("source_lang", "target_lang"):
            if name in names and getattr(self, name) is None:
                raise ValueError(f"the prompt uses {{{name}}}, so set {name}")
        return self


# -- reading --------------------------------------------------------------------------------
@dataclass
class Pair:
    source: str
    references: list[str]  # the first is the training target; empty when unknown (predict)
    where: str


def as_data_file(value, options: Seq2SeqOptions | None = None, option: str = "test") -> DataFile:
    """A split's DataFile; a plain path to a text file (``petune eval --data test.en``) is paired
    with its target file by the suffixes of the training pair (train.en/train.de: test.de)."""
    if isinstance(value, DataFile):
        return value
    path = Path(value)
    if datafiles.data_format(path) is not None:  # records, in any format the shared reader takes
        return DataFile(path=path)
    train = options.train if options is not None else None
    if train is not None and train.source is not None and train.target is not None \
            and train.source.suffix != train.target.suffix and path.suffix == train.source.suffix:
        return DataFile(source=path, target=path.with_suffix(train.target.suffix))
    raise DataError(f"{path.name}: not a records file ({datafiles.FORMATS_HINT}), and its target file cannot be "
                    "told from the training pair", where=str(path),
                    hint=f'for line-aligned text files give task.{option} = {{ source = "x.en", target = "x.de" }}')


def _lookup(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, False
        value = value[part]
    return value, True


def _pick_field(record: datafiles.Record, chosen: str | None, names: tuple[str, ...], what: str, option: str) -> str:
    if chosen is not None:
        _, found = _lookup(record, chosen)
        if not found:
            raise DataError(f"no {chosen!r} field ({what}); the record has {', '.join(map(repr, record)) or 'none'}",
                            where=record.where, hint=f"set task.{option} to the {what} field")
        return chosen
    lowered = {str(k).lower(): k for k in record}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(f"cannot tell which field holds the {what}; the record has {', '.join(map(repr, record)) or 'none'}",
                    where=record.where, hint=f"set task.{option}")


def _text_value(value, what: str, where: str, separator: str, *, list_means: str = "sentences") -> list[str]:
    """The texts a field holds: [text] for a string; for a list of strings, the list
    (references) or [joined] (sentences)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if list_means == "sentences":
            return [separator.join(v.strip() for v in value if v.strip())]
        return [v for v in value if v.strip()]
    kind = {dict: "an object", list: "a list with non-text items", type(None): "null"}.get(type(value), "a number")
    raise DataError(f"the {what} must be text or a list of texts, found {kind}", where=where)


def pairs_from_records(records: Iterable[datafiles.Record], options: Seq2SeqOptions, *,
                       need_target: bool = True) -> list[Pair]:
    return list(iter_pairs_from_records(records, options, need_target=need_target))


def iter_pairs_from_records(records: Iterable[datafiles.Record], options: Seq2SeqOptions, *,
                            need_target: bool = True) -> Iterator[Pair]:
    """:func:`pairs_from_records` one pair at a time, as the records come (the fields are
    chosen from the first record)."""
    records = iter(records)
    first = next(records, None)
    if first is None:
        return
    source_field = _pick_field(first, options.source_field, SOURCE_NAMES, "source", "source_field")
    target_field = None
    if need_target or options.target_field is not None or any(
            n in {str(k).lower() for k in first} for n in TARGET_NAMES):
        try:
            target_field = _pick_field(first, options.target_field, TARGET_NAMES, "target", "target_field")
        except DataError:
            if need_target:
                raise
    for record in itertools.chain([first], records):
        value, found = _lookup(record, source_field)
        if not found:
            raise DataError(f"missing the source field {source_field!r}", where=record.where)
        source = _text_value(value, "source", record.where, options.join_separator)[0]
        if not source.strip():
            raise DataError("the source is empty", where=record.where, hint="remove the row or fill in the source")
        references: list[str] = []
        if target_field is not None:
            value, found = _lookup(record, target_field)
            if not found and need_target:
                raise DataError(f"missing the target field {target_field!r}", where=record.where)
            if found and value is not None:
                references = _text_value(value, "target", record.where, options.join_separator,
                                         list_means=options.target_list)
        if options.references_field is not None:
            value, found = _lookup(record, options.references_field)
            if found and value is not None:
                extra = _text_value(value, "references", record.where, options.join_separator, list_means="references")
                references = references[:1] + [r for r in extra if r not in references[:1]]
        if need_target and not any(r.strip() for r in references):
            raise DataError("the target is empty: nothing to train or score on", where=record.where,
                            hint="remove the row or fill in the target")
        yield Pair(source, references, record.where)


def pairs_from_lines(source_path: Path, target_path: Path | None, max_rows: int | None) -> tuple[list[Pair], int]:
    """Line-aligned files; (pairs, blank lines skipped). A line blank on one side only, or
    files of different lengths, are errors (the files are out of step)."""
    sources = [(n, line.rstrip("\r\n")) for n, line in datafiles.iter_lines(source_path)]
    targets = [(n, line.rstrip("\r\n")) for n, line in datafiles.iter_lines(target_path)] if target_path else None
    if targets is not None:
        while sources and not sources[-1][1].strip() and targets and not targets[-1][1].strip():
            sources.pop(), targets.pop()
        if len(sources) != len(targets):
            raise DataError(f"line-aligned files of different lengths: {source_path.name} has {len(sources)} lines, "
                            f"{target_path.name} has {len(targets)}", where=str(source_path),
                            hint=f"line n of the source must translate line n of {target_path}")
    if not sources:
        raise DataError("the file is empty", where=str(source_path))
    pairs, blank = [], 0
    for i, (number, text) in enumerate(sources):
        target = targets[i][1] if targets is not None else None
        if not text.strip() and (target is None or not target.strip()):
            blank += 1
            continue
        if not text.strip() or (target is not None and not target.strip()):
            empty, full = ((source_path, target_path) if not text.strip() else (target_path, source_path))
            raise DataError(f"line {number} is blank in {empty.name} but not in {full.name}: the files are out of step",
                            where=datafiles.where(empty, number), hint="remove the line from both files, or fill it in")
        pairs.append(Pair(text, [target] if target is not None else [], datafiles.where(source_path, number)))
        if max_rows is not None and len(pairs) >= max_rows:
            break
    return pairs, blank


def read_pairs(data_file: DataFile, options: Seq2SeqOptions, *, need_target: bool = True) -> tuple[list[Pair], int]:
    """The pairs of a split, as a list, and the blank lines skipped (line-aligned files)."""
    if data_file.path is not None:
        return pairs_from_records(_records(data_file, options), options, need_target=need_target), 0
    if data_file.target is None and need_target:
        raise DataError("line-aligned source file without its target file", where=str(data_file.source),
                        hint='give { source = "x.en", target = "x.de" }')
    return pairs_from_lines(data_file.source, data_file.target, options.max_rows)


def read_split(data_file: DataFile, options: Seq2SeqOptions) -> tuple[Spool | list[Pair], int]:
    """:func:`read_pairs` for training and evaluation: a records file's pairs are spooled to disk
    as they are read (:class:`~petune_plugins.tasks.encoding.Spool`), so its records are never
    all in memory (a JSON array or a CSV/TSV table is parsed whole first). Two line-aligned text
    files stay a list: their lengths are compared and their trailing blank lines dropped before
    any pair is made, which holds both files' lines at once anyway."""
    if data_file.path is not None:
        return Spool.write(iter_pairs_from_records(_records(data_file, options), options),
                           desc=Path(data_file.path).name), 0
    return read_pairs(data_file, options)


def _records(data_file: DataFile, options: Seq2SeqOptions) -> Iterator[datafiles.Record]:
    return datafiles.iter_records(data_file.path, options.max_rows, quoting=options.quoting)


# -- prompts and tokens -----------------------------------------------------------------------
def prompt_template(options, kind: str) -> str:
    return options.prompt or DEFAULT_PROMPTS[kind, options.source_lang is not None]


def render_prompt(template: str, source: str, source_lang: str | None, target_lang: str | None) -> str:
    return template.format(source=source, source_lang=source_lang or "", target_lang=target_lang or "")


def model_kind(model_info: ModelInfo) -> str | None:
    if model_info.is_encoder_decoder:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

        return ENCODER_DECODER if model_info.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES else None
    return DECODER_ONLY if model_info.is_decoder_only else None


class Seq2SeqCollator:
    """Pads input_ids (pad id), attention_mask (0) and labels (-100), each to its own longest."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = {}
        for name, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100)):
            values = [list(f[name]) for f in features]
            longest = max(len(v) for v in values)
            batch[name] = torch.tensor([v + [fill] * (longest - len(v)) for v in values], dtype=torch.long)
        return batch


# -- generation ---------------------------------------------------------------------------------
def generate_texts(model, tokenizer, state: dict, sources: list[str], *, num_beams: int = 1,
                   max_new_tokens: int = 128, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                   batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   progress=None) -> list[tuple[str, int]]:
    """(output text, generated tokens) for each source (already cut to max_source_length),
    rendered with the run's prompt (and chat template for decoder-only models). Sources go in
    batches of similar length; outputs come back in the order given."""
    import copy

    import torch

    kind = state["model_kind"]
    template = state["prompt"]
    prompts = [render_prompt(template, s, state.get("source_lang"), state.get("target_lang")) for s in sources]
    device = model_device(model)
    config = copy.deepcopy(model.generation_config)
    sampling = temperature > 0
    pad_id = tokenizer.pad_token_id
    if kind == DECODER_ONLY:
        chat = template_for(tokenizer, state)
        texts = [render(tokenizer, chat, [{"role": "user", "content": p}], add_generation_prompt=True)
                 for p in prompts]
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        stop_ids = stop_token_ids(tokenizer, state, model)
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    else:
        encoded = tokenizer(prompts, verbose=False)["input_ids"]
        eos = config.eos_token_id
        stop_ids = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
        context = None
    if pad_id is None:
        pad_id = stop_ids[0]
    config.update(max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
                  length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size or None,
                  eos_token_id=stop_ids, pad_token_id=pad_id, early_stopping=True if num_beams > 1 else None,
                  temperature=temperature if sampling else None, top_p=top_p if sampling else None, top_k=None,
                  min_new_tokens=None, min_length=None, max_length=None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[tuple[str, int] | None] = [None] * len(encoded)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids = [encoded[i] for i in chunk]
            longest = max(len(x) for x in ids)
            new_tokens = max_new_tokens
            if context:
                if longest >= context:
                    raise UserError(f"a prompt takes {longest} tokens, and the model's context is {context}",
                                    hint="lower task.max_source_length")
                new_tokens = min(max_new_tokens, context - longest)
            if kind == DECODER_ONLY:  # left padding: generation continues every row from its last token
                input_ids = [[pad_id] * (longest - len(x)) + x for x in ids]
                mask = [[0] * (longest - len(x)) + [1] * len(x) for x in ids]
            else:
                input_ids = [x + [pad_id] * (longest - len(x)) for x in ids]
                mask = [[1] * len(x) + [0] * (longest - len(x)) for x in ids]
            inputs = {"input_ids": torch.tensor(input_ids, device=device),
                      "attention_mask": torch.tensor(mask, device=device)}
            config.max_new_tokens = new_tokens
            with torch.no_grad(), seeded(seed if sampling else None, device):
                output = model.generate(**inputs, generation_config=config)
            new = output[:, longest:] if kind == DECODER_ONLY else output
            for row, i in zip(new.tolist(), chunk):
                if kind == ENCODER_DECODER and row and row[0] == config.decoder_start_token_id:
                    row = row[1:]
                cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
                row = [t for t in row[:cut] if t != pad_id]
                results[i] = (tokenizer.decode(row, skip_special_tokens=True).strip(), len(row))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


# -- the task ---------------------------------------------------------------------------------
class Seq2SeqTask(Task):
    name = "seq2seq"
    description = ("translation and summarization on encoder-decoder or decoder-only models; "
                   "BLEU/chrF (sacreBLEU) and ROUGE by generating")
    Options = Seq2SeqOptions
    peft_task_type = "SEQ_2_SEQ_LM"  # CAUSAL_LM on decoder-only models: see peft_task_type_for
    primary_metric = "loss"  # evaluation during training is the loss; generated metrics come at the end
    token_level_loss = True

    def model_shape(self, config) -> ModelShape:
        if self.peft_task_type_for(config) == "CAUSAL_LM":
            return CAUSAL_LM_SHAPE
        return ModelShape("AutoModelForSeq2SeqLM", labels="tokens")  # its logits are measured, not modelled

    @staticmethod
    def kind_of(model_info: ModelInfo) -> str:
        """ENCODER_DECODER or DECODER_ONLY, or a Refusal for a model that cannot generate text."""
        kind = model_kind(model_info)
        if kind is None:
            raise Refusal(f"the seq2seq task needs an encoder-decoder model (T5, BART, Marian ...) or a causal "
                          f"language model, and {model_info.name} is a {model_info.model_type} model that cannot "
                          f"generate text", where="model.name",
                          hint="use e.g. gemma-3-270m or a T5 folder; encoders suit the classification, ner and qa tasks")
        return kind

    def kind_for(self, tokenizer) -> str:
        """The model kind, for ``load_data``: from the config beside the tokenizer (the runner
        loads both from the model's folder), else from a run's saved tokenizer, which records
        it (``petune eval`` re-reads split-off validation rows with that tokenizer)."""
        model_info = model_info_of(tokenizer)
        kind = self.kind_of(model_info) if model_info is not None else tokenizer.init_kwargs.get(_KIND_KEY)
        if kind is None:
            raise UserError(f"the seq2seq task cannot tell the model's kind: no config.json beside the tokenizer "
                            f"({tokenizer.name_or_path or 'loaded from memory'})",
                            hint="load the tokenizer from the model's folder")
        tokenizer.init_kwargs[_KIND_KEY] = kind  # saved with the run's tokenizer
        return kind

    def peft_task_type_for(self, config) -> str:
        if config is None:
            return type(self).peft_task_type
        info = ModelInfo(name=getattr(config, "name_or_path", "") or "model", path=Path("."), config=config)
        return "SEQ_2_SEQ_LM" if model_kind(info) == ENCODER_DECODER else "CAUSAL_LM"

    def sequence_length(self, options: Seq2SeqOptions) -> int:
        return options.max_source_length + options.max_target_length  # one sequence on a causal LM

    def check(self, model_info: ModelInfo, options: Seq2SeqOptions) -> None:
        kind = self.kind_of(model_info)
        limit = model_info.max_positions
        if limit:
            needed = options.max_source_length + (options.max_target_length + _TEMPLATE_ROOM if kind == DECODER_ONLY else 0)
            if needed > limit:
                raise Refusal(f"max_source_length {options.max_source_length}"
                              + (f" + max_target_length {options.max_target_length} + room for the prompt "
                                 f"({_TEMPLATE_ROOM})" if kind == DECODER_ONLY else "")
                              + f" is more than the model takes ({limit} positions)", where="task.max_source_length",
                              hint="lower task.max_source_length / task.max_target_length")
        check_data_paths(options)

    # -- data -------------------------------------------------------------------------------
    def with_test_file(self, options: Seq2SeqOptions, path: Path) -> Seq2SeqOptions:
        """A plain text file (``petune eval --data test.en``) is paired with its target file here,
        as a table: options hold tables, never bare paths (the data cache dumps them)."""
        return options.model_copy(update={"test": as_data_file(path, options)})

    def load_data(self, options: Seq2SeqOptions, tokenizer) -> TaskData:
        kind = self.kind_for(tokenizer)
        train_file = as_data_file(options.train, options, "train")
        train, blank = read_split(train_file, options)
        notes: dict = {"model_kind": kind}
        if blank:
            notes["train_blank_lines_skipped"] = blank
        held_out, held_out_notes = self._read_held_out(options)
        notes.update(held_out_notes)
        train = hold_out(train, held_out, options, str(train_file.path or train_file.source))
        template = prompt_template(options, kind)
        state = {"model_kind": kind, "prompt": template, "source_lang": options.source_lang,
                 "target_lang": options.target_lang, "max_source_length": options.max_source_length,
                 "max_target_length": options.max_target_length, "prompt_limit": model_positions(tokenizer)}
        if kind == DECODER_ONLY:  # the sft task's chat template, stop and pad tokens
            chat = prepare_chat_tokenizer(tokenizer, options.chat_template)
            notes["chat_template"] = chat.note
            state.update(chat.state, end_of_turn=chat.end_of_turn)
        elif tokenizer.pad_token is None:
            raise Refusal("the tokenizer has no pad token", hint="use a model whose tokenizer defines one")
        return self._encode({"train": train, **held_out}, options, tokenizer, state, notes)

    def load_eval_data(self, options: Seq2SeqOptions, tokenizer, state: dict) -> TaskData:
        held_out, notes = self._read_held_out(options)
        return self._encode(held_out, options, tokenizer, state, {"model_kind": state["model_kind"], **notes})

    @staticmethod
    def _read_held_out(options: Seq2SeqOptions) -> tuple[dict[str, Spool | list[Pair]], dict]:
        """The validation and test files (where given), and notes on blank lines skipped."""
        notes = {}

        def read(split: str, value) -> Spool | list[Pair]:
            pairs, blank = read_split(as_data_file(value, options, split), options)
            if blank:
                notes[f"{split}_blank_lines_skipped"] = blank
            return pairs

        return read_held_out(options, read), notes

    def _encode(self, splits: dict[str, Spool | list[Pair]], options: Seq2SeqOptions, tokenizer, state: dict,
                notes: dict) -> TaskData:
        datasets = {}
        for split in ("train", "validation", "test"):
            if not splits.get(split):
                continue
            batch = partial(self.encode, options=options, tokenizer=tokenizer, state=state, train=split == "train")
            datasets[split], counts = encode_split(splits[split], batch, desc=split)  # in batches, to Arrow
            for key, value in counts.items():
                if value:
                    notes[f"{split}_{key}"] = value
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    def encode(self, pairs: list[Pair], options: Seq2SeqOptions, tokenizer, state: dict, *, train: bool) -> tuple[dict, dict]:
        """Columns (input_ids, attention_mask, labels, source, references, where) and counts of a
        batch of pairs."""
        if train and options.train_targets == "each":
            pairs = [Pair(p.source, [r], p.where) for p in pairs for r in p.references]
        sources, source_cut = cut_to_tokens(tokenizer, [p.source for p in pairs], options.max_source_length)
        targets, target_cut = cut_to_tokens(tokenizer, [p.references[0] for p in pairs], options.max_target_length)
        prompts = [render_prompt(state["prompt"], s, options.source_lang, options.target_lang) for s in sources]
        counts = {"rows": len(pairs), "source_truncated": source_cut, "target_truncated": target_cut}
        if state["model_kind"] == DECODER_ONLY:
            examples = [Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": target}],
                                    p.where) for prompt, target, p in zip(prompts, targets, pairs)]
            template = template_for(tokenizer, state)
            max_length = options.max_source_length + options.max_target_length + _TEMPLATE_ROOM
            encoder = sft.Encoder(tokenizer, template, state["end_of_turn"], loss_on="completion", max_length=max_length)
            columns, sft_counts = encoder.encode(examples)
            if sft_counts["dropped"] or len(columns["input_ids"]) != len(pairs):
                raise DataError(f"{sft_counts['dropped']} example(s) lost every target token to the length limit "
                                f"({max_length} tokens): the prompt template is unusually long",
                                where=pairs[0].where.rsplit(":", 1)[0], hint="shorten task.prompt")
            counts["prompt_cut"] = sft_counts["truncated"]
            columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
            del columns["conversation"]
        else:
            limit = state.get("prompt_limit")  # the prompt's instruction comes on top of max_source_length
            encoded = tokenizer(prompts, verbose=False, truncation=limit is not None, max_length=limit)
            if limit is not None:
                counts["prompt_cut"] = sum(1 for ids in encoded["input_ids"] if len(ids) >= limit)
            labels = tokenizer(text_target=targets, verbose=False)["input_ids"]
            columns = {"input_ids": [list(x) for x in encoded["input_ids"]],
                       "attention_mask": [list(x) for x in encoded["attention_mask"]],
                       "labels": [list(x) for x in labels], "where": [p.where for p in pairs]}
        columns["source"] = sources
        columns["references"] = [p.references for p in pairs]
        return columns, counts

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: Seq2SeqOptions, state: dict, **load_kwargs):
        if self.kind_of(model_info) == DECODER_ONLY:
            return build_causal_lm(model_info, state, **load_kwargs)
        from transformers import AutoModelForSeq2SeqLM

        return load_pretrained(AutoModelForSeq2SeqLM, model_info.path, **load_kwargs)

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options, args: dict, callbacks: list) -> Trainer:
        if data.state["model_kind"] == DECODER_ONLY:
            max_length = options.max_source_length + options.max_target_length + _TEMPLATE_ROOM
            return sft.make_sft_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                                        max_length=max_length)
        args = dict(args, prediction_loss_only=True)  # no logits kept: evaluation during training is the loss
        return build_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                             collator=Seq2SeqCollator(tokenizer.pad_token_id), compute_metrics=None)

    # -- evaluation -------------------------------------------------------------------------
    def generation_settings(self, options: Seq2SeqOptions) -> dict:
        return dict(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens or options.max_target_length,
                    length_penalty=options.length_penalty, no_repeat_ngram_size=options.no_repeat_ngram_size,
                    batch_size=options.generation_batch_size)

    def held_out_loss(self, trainer, dataset, split: str) -> float:
        if self._kind_of(trainer) == DECODER_ONLY:
            return held_out_loss(trainer, dataset)["loss"]
        return float(trainer.evaluate(dataset, metric_key_prefix=split)[f"{split}_loss"])

    @staticmethod
    def _kind_of(trainer) -> str:
        from trl import SFTTrainer

        return DECODER_ONLY if isinstance(trainer, SFTTrainer) else ENCODER_DECODER

    def evaluate(self, trainer, data: TaskData, options: Seq2SeqOptions, run_dir: Path) -> dict[str, dict]:
        results = {}
        for split, dataset in held_out_splits(data):
            loss = self.held_out_loss(trainer, dataset, split)
            metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
            if split in options.generate_on and trainer.is_world_process_zero():
                scores, details, rows = self.score(trainer.model, trainer.processing_class, options, data.state, dataset)
                metrics.update(scores)
                report_dir = Path(run_dir) / "reports"
                reports.write_json(report_dir / f"seq2seq_{split}.json",
                                   {"split": split, "metrics": metrics, "generation": self.generation_settings(options),
                                    **details})
                write_predictions(report_dir, split, rows)
            metrics["examples"] = len(dataset)
            results[split] = metrics
        return results

    def score(self, model, tokenizer, options: Seq2SeqOptions, state: dict, dataset) -> tuple[dict, dict, list[dict]]:
        """Generate for every source of ``dataset`` and score the outputs against its references."""
        sources, references, places = dataset["source"], dataset["references"], dataset["where"]
        generated = generate_texts(model, tokenizer, state, sources, **self.generation_settings(options))
        outputs = [text for text, _ in generated]
        scores, details = compute_metrics(outputs, references, options.metrics)
        scores["gen_len"] = sum(n for _, n in generated) / max(len(generated), 1)
        scores["gen_words"] = sum(len(text.split()) for text in outputs) / max(len(outputs), 1)
        rows = [{"where": w, "source": s, "references": r, "output": o}
                for w, s, r, o in zip(places, sources, references, outputs)]
        return scores, details, rows

    # -- generate / predict -----------------------------------------------------------------
    def generate(self, model, tokenizer, options, state: dict, messages: list[dict], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, **_) -> str:
        """The output for the last user message taken as the source (the run's prompt is applied)."""
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise UserError("nothing to translate or summarize: give the source text as the prompt")
        source, _ = cut_to_tokens(tokenizer, [users[-1]], state.get("max_source_length") or options.max_source_length)
        settings = self.generation_settings(options)
        settings.update(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=1)
        return generate_texts(model, tokenizer, state, source, **settings)[0][0]

    def parse_inputs(self, options: Seq2SeqOptions, text: str, source: str) -> list[Pair]:
        """Sources to process: records (.jsonl/.json/.csv/.tsv, read with the recipe's fields; a
        target, if present, is kept as the reference), or plain text with one source per line."""
        kind = datafiles.data_format(source)
        stripped = text.lstrip()
        if kind == "table":
            table = datafiles.parse_table(datafiles.text_lines(text), source, header=True, quoting=options.quoting)
            records = [datafiles.Record.at(dict(zip(table.columns, row)), row.where) for row in table.rows]
        elif kind in ("jsonl", "json") or stripped.startswith(("{", "[")):
            records = (datafiles.parse_json_records(text, source) if stripped.startswith("[")
                       else datafiles.parse_jsonl(datafiles.text_lines(text), source))
        else:
            rows = [Pair(line.rstrip("\r\n"), [], datafiles.where(source, number))
                    for number, line in datafiles.text_lines(text) if line.strip()]
            if not rows:
                raise DataError("no text to process", where=source, hint="give one source text per line")
            return rows
        return pairs_from_records(records, options, need_target=False)

    def predict(self, model, tokenizer, options, state: dict, rows: list[Pair]) -> list[dict]:
        limit = state.get("max_source_length") or options.max_source_length
        sources, _ = cut_to_tokens(tokenizer, [r.source for r in rows], limit)
        generated = generate_texts(model, tokenizer, state, sources, **self.generation_settings(options))
        return [{"output": text} for text, _ in generated]

    def format_predictions(self, rows: list[Pair], predictions: list[dict]) -> str:
        """JSON Lines: where, source, output (and the references when the input had them)."""
        lines = []
        for row, prediction in zip(rows, predictions):
            line = {"where": row.where, "source": row.source, "output": prediction["output"]}
            if row.references:
                line["references"] = row.references
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        return "".join(lines)


def compute_metrics(outputs: list[str], references: list[list[str]], which) -> tuple[dict, dict]:
    scores, details = {}, {}
    wanted = tuple(w for w in ("bleu", "chrf") if w in which)
    if wanted:
        s, d = text_metrics.bleu_chrf(outputs, references, which=wanted)
        scores.update(s), details.update(d)
    if "rouge" in which:
        s, d = text_metrics.rouge(outputs, references)
        scores.update(s), details.update(d)
    return scores, details


_CELL = re.compile(r"[\t\r\n]+")


def write_predictions(report_dir: Path, split: str, rows: list[dict]) -> None:
    """reports/predictions_<split>.jsonl and a TSV (source, reference(s) joined with ' ||| ', output)."""
    reports.write_text(report_dir / f"predictions_{split}.jsonl",
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lines = ["where\tsource\treference\toutput"]
    for r in rows:
        cells = [r["where"], r["source"], " ||| ".join(r["references"]), r["output"]]
        lines.append("\t".join(_CELL.sub(" ", c) for c in cells))
    reports.write_text(report_dir / f"predictions_{split}.tsv", "\n".join(lines) + "\n")


@hookimpl
def register_tasks(register):
    register(Seq2SeqTask)
