"""Text classification: one label per text (or text pair), from tables or records files.

Data
    ``train`` (required), ``validation`` and ``test`` are files in any format of the shared
    reader (CSV/TSV, JSON Lines, JSON, each also .gz/.zst; Parquet, Arrow). Without a
    validation file, ``validation_split`` (default 0.1; 0: none) of the training file is held
    out with ``split_seed``; the label set then comes from the whole training file.
    Columns are named (header / JSON field) or given as 0-based positions (tables only):
    ``text_column`` (a list joins several columns with ``text_separator``, e.g. AG News
    title + description), ``text_pair_column`` (a second segment, e.g. NLI hypothesis),
    ``label_column``. Unset columns are found by name (text/sentence/content/..,
    label/class/category/..), or, in a 2-column file without header, are text then label.
    ``header = "auto"`` is true when any column is given by name, else detected
    (see :func:`datafiles.looks_like_header`).
    Each split can be a table of its own settings, for files of different layouts::

        train = "ag_news/train_subset10k_alps.tsv"          # text<TAB>class name, no header
        test = { path = "ag_news/test.csv", header = false, text_column = [1, 2], label_column = 0,
                 label_map = { 1 = "World", 2 = "Sports", 3 = "Business", 4 = "Sci/Tech" } }

    ``label_map`` renames label values as read (values not in it are kept), so the
    integer classes of one file can match the names of another.

Labels
    The label list is the sorted set of training labels (numerically when all are
    integers), saved in ``state["labels"]`` (index = class id) and in the model config's
    id2label. A validation/test label not in it is a DataError naming the file and lines.

Metrics
    accuracy, macro_f1, macro_precision, macro_recall (flat, per split); per-class
    precision/recall/F1 in ``reports/classification_report_<split>.{json,txt}``, the
    confusion matrix in ``reports/confusion_matrix_<split>.json`` and
    ``plots/confusion_matrix_<split>.png``.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from petune import hookimpl
from petune.api import DataPath, ModelInfo, TaskData
from petune.errors import DataError
from petune_plugins.tasks import _common as common
from petune_plugins.tasks import datafiles, reports
from petune_plugins.tasks.encoding import Spool, encode_split

if TYPE_CHECKING:
    from transformers import Trainer

#: a column: its header name / JSON field, or its 0-based position in a table (-1 = last)
Column = int | str
TEXT_NAMES = ("text", "sentence", "content", "review", "document", "body", "utterance")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "intent")
DEFAULT_MAX_LENGTH = 128
_INTEGER = re.compile(r"[-+]?\d+")


# -- options --------------------------------------------------------------------------------
def _delimiter(value: str | None) -> str | None:
    if value is None:
        return None
    value = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}.get(value.lower(), value)
    if len(value) != 1:
        raise ValueError("expected one character, \"tab\" or \"comma\"")
    return value


class DataFile(common.DataFileTable):
    """A data file with settings of its own; unset ones come from [task]."""

    path: DataPath
    text_column: Column | list[Column] | None = None
    text_pair_column: Column | list[Column] | None = None
    label_column: Column | None = None
    header: bool | Literal["auto"] | None = None
    delimiter: str | None = None
    quoting: datafiles.Quoting | None = None
    label_map: dict[str, str] | None = None

    _check_delimiter = field_validator("delimiter")(_delimiter)


#: a split's file: a path, or a table with ``path`` and per-file settings
SplitFile = common.split_file(DataFile, '{ path = "...", label_column = 0 }')


class ClassificationOptions(common.SplitOptions):
    default_validation_split: ClassVar[float] = 0.1
    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH

    train: SplitFile = Field(description="training file (.csv, .tsv, .jsonl, .json, .parquet ...)")
    validation: SplitFile | None = Field(None, description="validation file (else validation_split of train)")
    test: SplitFile | None = Field(None, description="test file, evaluated after training")
    text_column: Column | list[Column] | None = Field(None, description="text column: name or 0-based position; "
                                                      "a list joins columns")
    text_pair_column: Column | list[Column] | None = Field(None, description="optional second text segment")
    label_column: Column | None = Field(None, description="label column: name or 0-based position")
    header: bool | Literal["auto"] = Field("auto", description="tables: first row is a header (auto: detect)")
    delimiter: str | None = Field(None, description="table delimiter (default: from the extension)")
    quoting: datafiles.Quoting = Field("auto", description=datafiles.QUOTING_HELP)
    label_map: dict[str, str] = Field(default_factory=dict, description="rename label values as read, "
                                      "e.g. { 1 = \"World\" }")
    text_separator: str = Field(" ", description="joins the columns of a list-valued text_column")
    max_length: int | None = Field(None, ge=8, description=f"tokens per example (default {DEFAULT_MAX_LENGTH}); "
                                   "longer texts are truncated and counted")
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows per file (quick runs)")

    _check_delimiter = field_validator("delimiter")(_delimiter)


# -- reading examples -----------------------------------------------------------------------
@dataclass
class Example:
    text: str
    pair: str | None
    label: str | None
    where: str


@dataclass
class FileSettings:
    """A split's settings: the file's own, else the [task] ones."""

    path: Path | None
    text_column: Column | list[Column] | None
    text_pair_column: Column | list[Column] | None
    label_column: Column | None
    header: bool | str
    delimiter: str | None
    label_map: dict[str, str]
    separator: str
    quoting: str = "auto"

    @classmethod
    def of(cls, options: ClassificationOptions, data_file: DataFile | str | Path | None = None) -> FileSettings:
        if isinstance(data_file, (str, Path)):  # e.g. `petune eval --data` swaps in a plain path
            data_file = DataFile(path=Path(data_file))

        def pick(name):
            own = getattr(data_file, name, None) if data_file is not None else None
            return own if own is not None else getattr(options, name)

        return cls(path=data_file.path if data_file else None, text_column=pick("text_column"),
                   text_pair_column=pick("text_pair_column"), label_column=pick("label_column"),
                   header=pick("header"), delimiter=pick("delimiter"), label_map=pick("label_map") or {},
                   separator=options.text_separator, quoting=pick("quoting"))

    def named_columns(self) -> bool:
        columns = [self.label_column, *_as_list(self.text_column), *_as_list(self.text_pair_column)]
        return any(isinstance(c, str) for c in columns)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _is_records(source: str) -> bool:
    """Records (JSON Lines, JSON, Parquet, Arrow) rather than a table, by the shared reader's
    reading of the name (``train.jsonl.gz`` is JSON Lines)."""
    return datafiles.data_format(source) in ("jsonl", "json", "parquet", "arrow")


def read_examples(settings: FileSettings, *, need_label: bool = True, max_rows: int | None = None,
                  text: str | None = None, source: str | None = None,
                  known_labels: Collection[str] = ()) -> list[Example]:
    """Examples from ``settings.path`` (or from ``text`` already read, named ``source``), as a
    list (:func:`iter_examples`). ``known_labels`` (the training labels) settle
    ``header = "auto"`` for evaluation files: a first row holding a training label is data,
    not a header."""
    return list(iter_examples(settings, need_label=need_label, max_rows=max_rows, text=text, source=source,
                              known_labels=known_labels))


def spool_examples(settings: FileSettings, *, max_rows: int | None = None, known_labels: Collection[str] = (),
                   labels: set[str] | None = None) -> Spool:
    """The examples of ``settings.path``, spooled to disk as they are read
    (:class:`~petune_plugins.tasks.encoding.Spool`): a records file is never all in memory
    (a table is parsed whole first). ``labels``: a set that collects the labels seen."""
    examples = iter_examples(settings, max_rows=max_rows, known_labels=known_labels)
    if labels is not None:
        examples = _collecting_labels(examples, labels)
    return Spool.write(examples, desc=Path(settings.path).name)


def _collecting_labels(examples: Iterable[Example], labels: set[str]) -> Iterator[Example]:
    for example in examples:
        labels.add(example.label)
        yield example


def iter_examples(settings: FileSettings, *, need_label: bool = True, max_rows: int | None = None,
                  text: str | None = None, source: str | None = None,
                  known_labels: Collection[str] = ()) -> Iterator[Example]:
    """:func:`read_examples` one example at a time: a records file read from its path is
    streamed (a record in memory at a time); a table (CSV/TSV) is parsed whole first."""
    source = source or str(settings.path)
    if _is_records(source):
        if text is None:
            records = datafiles.iter_records(settings.path, max_rows=max_rows)
        elif datafiles.data_format(source) == "jsonl" or text.lstrip().startswith("{"):
            records = datafiles.iter_jsonl(datafiles.text_lines(text), source, max_rows=max_rows)
        else:
            records = iter(datafiles.parse_json_records(text, source, max_rows=max_rows))
        yield from _examples_from_records(records, settings, source, need_label)
        return
    header = settings.header
    if header == "auto" and settings.named_columns():
        header = True  # a column name needs a header row

    def parse(header):
        lines = datafiles.iter_lines(settings.path) if text is None else datafiles.text_lines(text)
        return datafiles.parse_table(lines, source, delimiter=settings.delimiter, header=header, max_rows=max_rows,
                                     quoting=settings.quoting)

    table = parse(header)
    if header == "auto" and table.columns is not None and any(
            settings.label_map.get(cell, cell) in known_labels for cell in table.columns):
        table = parse(False)
    yield from _examples_from_table(table, settings, need_label)


def _default_by_name(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {n.strip().lower(): n for n in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _examples_from_table(table: datafiles.Table, settings: FileSettings, need_label: bool) -> Iterator[Example]:
    text_cols = [table.index(c, "text_column") for c in _as_list(settings.text_column)]
    pair_cols = [table.index(c, "text_pair_column") for c in _as_list(settings.text_pair_column)]
    label_col = None
    if settings.label_column is not None:
        try:
            label_col = table.index(settings.label_column, "label_column")
        except DataError:
            if need_label:
                raise  # input to predict may come without its label column

    if table.columns is not None:  # unset columns: found by their usual names
        if not text_cols:
            name = _default_by_name(table.columns, TEXT_NAMES)
            text_cols = [table.index(name)] if name else []
        if label_col is None:
            name = _default_by_name(table.columns, LABEL_NAMES)
            label_col = table.index(name) if name else None
    elif table.width == 2:  # no header, two columns: text then label unless told otherwise
        if not text_cols:
            text_cols = [1 if label_col == 0 else 0]
        if label_col is None and text_cols[0] in (0, 1) and 1 - text_cols[0] not in pair_cols:
            label_col = 1 - text_cols[0]
    elif table.width == 1 and not text_cols and not need_label:
        text_cols = [0]

    if not text_cols:
        raise DataError("cannot tell which column holds the text", where=table.source,
                        hint="set task.text_column (a header name or a 0-based position); " + table._columns_hint())
    if need_label and label_col is None:
        raise DataError("cannot tell which column holds the label", where=table.source,
                        hint="set task.label_column (a header name or a 0-based position); " + table._columns_hint())
    if label_col is not None and (label_col in text_cols or label_col in pair_cols):
        raise DataError(f"the label column ({label_col}) is also a text column", where=table.source,
                        hint=table._columns_hint())

    for row in table.rows:
        text = settings.separator.join(row[i].strip() for i in text_cols if row[i].strip())
        pair = settings.separator.join(row[i].strip() for i in pair_cols if row[i].strip()) if pair_cols else None
        label = _label_value(row[label_col], row.where, settings.label_map) if label_col is not None else None
        yield Example(text, pair, label, row.where)


def _examples_from_records(records: Iterator[datafiles.Record], settings: FileSettings, source: str,
                           need_label: bool) -> Iterator[Example]:
    """Examples of records read one at a time; the fields are chosen from the first record."""
    first = next(records, None)  # the readers raise on a file without records
    if first is None:
        return
    for option in ("text_column", "text_pair_column", "label_column"):
        for column in _as_list(getattr(settings, option)):
            if isinstance(column, int):
                raise DataError(f"{option} = {column}: JSON records have field names, not positions", where=source,
                                hint=f"use the field name, e.g. {option} = \"text\"; fields of the first record: "
                                     + ", ".join(first))
    fields = list(first)
    text_cols = _as_list(settings.text_column) or [c for c in [_default_by_name(fields, TEXT_NAMES)] if c]
    pair_cols = _as_list(settings.text_pair_column)
    label_col = settings.label_column or _default_by_name(fields, LABEL_NAMES)
    if not text_cols:
        raise DataError("cannot tell which field holds the text", where=first.where,
                        hint="set task.text_column; fields: " + ", ".join(fields))
    if need_label and label_col is None:
        raise DataError("cannot tell which field holds the label", where=first.where,
                        hint="set task.label_column; fields: " + ", ".join(fields))

    def field(record, name, option):
        if name not in record:
            raise DataError(f"no field {name!r} ({option})", where=record.where,
                            hint="fields of this record: " + (", ".join(record) or "none"))
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"field {name!r} is {datafiles.json_type(value)}, expected text", where=record.where)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # label 1.0 and label 1 are the same class
        return str(value).strip()

    for record in itertools.chain([first], records):
        text = settings.separator.join(t for t in (field(record, c, "text_column") for c in text_cols) if t.strip())
        pair = settings.separator.join(field(record, c, "text_pair_column") for c in pair_cols) if pair_cols else None
        label = None
        if label_col is not None and (need_label or label_col in record):
            label = _label_value(field(record, label_col, "label_column"), record.where, settings.label_map)
        yield Example(text, pair, label, record.where)


def _label_value(value: str, where: str, label_map: dict[str, str]) -> str:
    label = value.strip()
    if not label:
        raise DataError("empty label", where=where, hint="every training/evaluation row needs a label")
    return label_map.get(label, label)


def sort_labels(labels) -> list[str]:
    """Sorted label names: numerically when all are integers ("2" before "10")."""
    labels = set(labels)
    if all(_INTEGER.fullmatch(x) for x in labels):
        return sorted(labels, key=lambda x: (int(x), x))
    return sorted(labels)


def check_known_labels(examples: Iterable[Example], known: Sequence[str], source: str) -> None:
    known = set(known)
    unknown: dict[str, list[str]] = {}
    for example in examples:
        if example.label not in known:
            unknown.setdefault(example.label, []).append(example.where.rpartition(":")[2])
    if unknown:
        listed = "; ".join(f"{label!r} (line {', '.join(lines[:3])}{', ...' if len(lines) > 3 else ''})"
                           for label, lines in sorted(unknown.items())[:10])
        raise DataError(f"label(s) not in the training data: {listed}", where=source,
                        hint=f"training labels are: {', '.join(sorted(known))}; fix the file or rename "
                             f"its labels with label_map (e.g. label_map = {{ 1 = \"World\" }})")


# -- encoding -------------------------------------------------------------------------------
def encode(tokenizer, examples: list[Example], *, max_length: int, label_ids: dict[str, int] | None,
           paired: bool) -> tuple[dict[str, list], dict[str, int]]:
    """Columns (input_ids, attention_mask, labels ...) of a batch of examples, and the number
    truncated; ``paired``: whether the split has text pairs (decided over the whole split)."""
    texts = [e.text for e in examples]
    pairs = [e.pair or "" for e in examples] if paired else None
    encoded = dict(tokenizer(texts, pairs, truncation=False, verbose=False))
    too_long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if too_long:  # only these are tokenized again, with truncation
        again = tokenizer([texts[i] for i in too_long], [pairs[i] for i in too_long] if pairs else None,
                          truncation=True, max_length=max_length)
        for key, values in encoded.items():
            for j, i in enumerate(too_long):
                values[i] = again[key][j]
    columns = {key: list(values) for key, values in encoded.items()}
    if label_ids is not None:
        columns["labels"] = [label_ids[e.label] for e in examples]
    return columns, {"truncated": len(too_long)}


# -- the task -------------------------------------------------------------------------------
class ClassificationTask(common.EncoderTask):
    name = "classification"
    description = "text (or text-pair) classification from tables or records files; accuracy, macro-F1, confusion matrix"
    Options = ClassificationOptions
    head = common.SEQUENCE_CLASSIFICATION
    primary_metric = "accuracy"
    explained_output = "label"  # petune explain: attributions for the predicted label

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: ClassificationOptions, tokenizer) -> TaskData:
        train_settings = FileSettings.of(options, options.train)
        seen: set[str] = set()
        train = spool_examples(train_settings, max_rows=options.max_rows, labels=seen)  # to disk as read
        labels = sort_labels(seen)
        _check_label_column(train, labels, train_settings)
        held_out = self._read_held_out(options, labels)
        train = common.hold_out(train, held_out, options, str(train_settings.path))

        padded = common.ensure_pad_token(tokenizer)
        requested = options.max_length or DEFAULT_MAX_LENGTH
        max_length = common.length_within_limit(options.max_length, DEFAULT_MAX_LENGTH, tokenizer)
        state = {"labels": labels, "max_length": max_length, "pad_token_id": tokenizer.pad_token_id,
                 "text_pair": _paired(train)}
        data = self._encode({"train": train, **held_out}, tokenizer, state)
        if max_length < requested:
            data.notes["max_length_lowered_to"] = max_length
        if padded:
            data.notes["pad_token_set_to"] = tokenizer.pad_token
        return data

    def load_eval_data(self, options: ClassificationOptions, tokenizer, state: dict) -> TaskData:
        return self._encode(self._read_held_out(options, state["labels"]), tokenizer, state)

    @staticmethod
    def _read_held_out(options: ClassificationOptions, labels: list[str]) -> dict[str, Spool]:
        """The validation and test files (where given), spooled as read; every label must be a
        training label."""
        def read(split: str, value) -> Spool:
            seen: set[str] = set()
            examples = spool_examples(FileSettings.of(options, value), max_rows=options.max_rows, known_labels=labels,
                                      labels=seen)
            if not seen <= set(labels):  # a pass over the spool only to name the unknown labels' lines
                check_known_labels(examples, labels, str(getattr(value, "path", value)))
            return examples

        return common.read_held_out(options, read)

    @staticmethod
    def _encode(splits: dict[str, Spool | list[Example]], tokenizer, state: dict) -> TaskData:
        label_ids = {label: i for i, label in enumerate(state["labels"])}
        notes: dict = {"labels": len(label_ids)}
        datasets = {}
        truncated = 0
        for split in ("train", "validation", "test"):
            if splits.get(split):
                batch = partial(encode, tokenizer, max_length=state["max_length"], label_ids=label_ids,
                                paired=_paired(splits[split]))
                datasets[split], counts = encode_split(splits[split], batch, desc=split)  # in batches, to Arrow
                truncated += counts["truncated"]
                notes[f"{split}_rows"] = len(splits[split])
        notes["truncated"] = truncated
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: ClassificationOptions, state: dict, **load_kwargs):
        labels = state["labels"]
        if state.get("pad_token_id") is not None:
            load_kwargs.setdefault("pad_token_id", state["pad_token_id"])  # decoder heads need it to find the last token
        return self.head.load(
            model_info, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, problem_type="single_label_classification",
            **load_kwargs)

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options, args: dict, callbacks: list) -> Trainer:
        labels = data.state["labels"]

        def compute_metrics(prediction) -> dict:
            logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
            report = reports.classification_report(prediction.label_ids, logits.argmax(-1), labels)
            return flat_metrics(report)

        return common.build_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                             collator=common.PadCollator(tokenizer.pad_token_id, common.accepted_inputs(model)),
                             compute_metrics=compute_metrics)

    def evaluate(self, trainer: Trainer, data: TaskData, options, run_dir: Path) -> dict[str, dict]:
        labels = data.state["labels"]
        results = {}
        for split, dataset in common.held_out_splits(data):
            output = trainer.predict(dataset, metric_key_prefix=split)
            logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
            report = reports.classification_report(output.label_ids, logits.argmax(-1), labels)
            results[split] = flat_metrics(report)
            if f"{split}_loss" in output.metrics:
                results[split]["loss"] = float(output.metrics[f"{split}_loss"])
            if trainer.is_world_process_zero():
                write_classification_reports(report, split, Path(run_dir))
        return results

    # -- predict ----------------------------------------------------------------------------
    def parse_inputs(self, options: ClassificationOptions, text: str, source: str) -> list[dict]:
        """Rows to classify: a CSV/TSV/JSONL/JSON file read with the recipe's columns (a
        label column, if present, is kept as "label"; with ``header = "auto"`` and columns
        by position, a table has a header only if its first row holds a usual column name
        such as text/sentence/label), or plain text — one text per line,
        ``text<TAB>text_pair`` when the model was trained on pairs."""
        table = datafiles.data_format(source) == "table"
        settings = FileSettings.of(options)
        if table and settings.header == "auto" and not settings.named_columns():
            # a header guessed wrong would drop a row without a word: here only usual names count
            settings.header = _has_usual_names(text, settings.delimiter or datafiles.guess_delimiter(source, text))
        if table or _is_records(source):
            examples = read_examples(settings, need_label=False, text=text, source=source)
            return [{"text": e.text, "text_pair": e.pair, "label": e.label, "where": e.where} for e in examples]
        rows = []
        paired = options.text_pair_column is not None
        for number, line in datafiles.text_lines(text):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            first, _, second = line.partition("\t") if paired else (line, "", "")
            rows.append({"text": first, "text_pair": second if paired else None, "label": None,
                         "where": datafiles.where(source, number)})
        if not rows:
            raise DataError("no text to classify", where=source, hint="give one text per line")
        return rows

    def predict(self, model, tokenizer, options, state: dict, rows: list[dict], batch_size: int = 32) -> list[dict]:
        import torch

        labels = state.get("labels") or [model.config.id2label[i] for i in range(model.config.num_labels)]
        max_length = state.get("max_length") or options.max_length or DEFAULT_MAX_LENGTH
        common.ensure_pad_token(tokenizer)
        keep = common.accepted_inputs(model)
        device = common.model_device(model)
        model.eval()
        predictions = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            pairs = [r.get("text_pair") or "" for r in batch] if any(r.get("text_pair") is not None for r in batch) else None
            encoded = tokenizer([r["text"] for r in batch], pairs, truncation=True, max_length=max_length,
                                padding=True, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in encoded.items() if keep is None or k in keep}
            with torch.no_grad():
                probabilities = model(**inputs).logits.float().softmax(-1).cpu()
            for row_probabilities in probabilities.tolist():
                best = max(range(len(labels)), key=row_probabilities.__getitem__)
                predictions.append({"label": labels[best], "probability": row_probabilities[best],
                                    "probabilities": dict(zip(labels, row_probabilities))})
        return predictions

    def format_predictions(self, rows: list[dict], predictions: list[dict]) -> str:
        """TSV with a header: text, [text_pair,] label, probability."""
        paired = any(r.get("text_pair") is not None for r in rows)
        header = ["text", "text_pair", "label", "probability"] if paired else ["text", "label", "probability"]
        lines = ["\t".join(header)]
        for row, prediction in zip(rows, predictions):
            cells = [row["text"], row.get("text_pair") or ""] if paired else [row["text"]]
            cells += [prediction["label"], f"{prediction['probability']:.4f}"]
            lines.append("\t".join(_one_line(c) for c in cells))
        return "\n".join(lines) + "\n"


def _has_usual_names(text: str, delimiter: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    cells = next(csv.reader([first], delimiter=delimiter), [])
    return any(cell.strip().lower() in TEXT_NAMES + LABEL_NAMES + ("text_pair", "id") for cell in cells)


def _one_line(text: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", str(text))


def _paired(examples: Sequence[Example] | Spool) -> bool:
    """Whether any example of a split has a text pair. The examples of one file have a pair all
    or none (whether the file has pair columns), so a spool's first example says it, with no
    pass over the spool (a split-off part's ``first`` is its file's)."""
    if isinstance(examples, Spool):
        return examples.first is not None and examples.first.pair is not None
    return any(e.pair is not None for e in examples)


def _check_label_column(train: Sequence[Example] | Spool, labels: list[str], settings: FileSettings) -> None:
    """Catch a label column that is really text, and a training set with one class."""
    source = str(settings.path)
    if len(labels) < 2:
        raise DataError(f"the training data has a single label ({labels[0]!r}); a classifier needs at least two",
                        where=source, hint="check task.label_column, or that max_rows does not cut off the other classes")
    if len(train) >= 20 and len(labels) > 0.5 * len(train):
        examples = ", ".join(repr(datafiles.shorten(x, 30)) for x in labels[:3])
        raise DataError(f"the label column has {len(labels)} different values in {len(train)} rows ({examples}, ...): "
                        "it looks like text, not labels", where=source,
                        hint="set task.label_column (and task.text_column) to the right columns")


def flat_metrics(report: dict) -> dict[str, float]:
    return {key: float(report[key]) for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall")}


def write_classification_reports(report: dict, split: str, run_dir: Path) -> None:
    """reports/classification_report_<split>.{json,txt}, reports/confusion_matrix_<split>.json,
    plots/confusion_matrix_<split>.png."""
    report_dir = run_dir / "reports"
    labels, matrix = report["labels"], report["confusion_matrix"]
    per_class = {k: v for k, v in report.items() if k not in ("labels", "confusion_matrix")}
    reports.write_json(report_dir / f"classification_report_{split}.json", {"split": split, **per_class})
    reports.write_text(report_dir / f"classification_report_{split}.txt",
                       f"classification report ({split})\n\n" + reports.format_classification_report(report)
                       + "\nconfusion matrix (rows: true, columns: predicted)\n\n"
                       + reports.format_confusion_matrix(labels, matrix))
    reports.write_json(report_dir / f"confusion_matrix_{split}.json",
                       {"split": split, "labels": labels, "rows": "true", "columns": "predicted", "matrix": matrix})
    reports.plot_confusion_matrix(labels, matrix, run_dir / "plots" / f"confusion_matrix_{split}.png",
                                  title=f"Confusion matrix ({split})")


@hookimpl
def register_tasks(register):
    register(ClassificationTask)
