"""Named-entity recognition: a tag per word, from CoNLL or JSONL files.

Data
    CoNLL column files: one token per line, the token in the first column and its tag
    in the last (whitespace or tab separated; with tabs, tokens may contain spaces),
    a blank line between sentences, ``-DOCSTART-`` lines skipped. JSONL: one sentence
    per line, ``{"tokens": [...], "tags": [...]}`` (also "words" / "ner_tags" /
    "labels"; integer tags need ``tag_names``); ``format = "jsonl"`` takes these records from
    any file the shared reader takes (JSON, CSV/TSV, Parquet, Arrow). ``format = "auto"``
    picks by the name: JSON(L), Parquet and Arrow are records (also ``.jsonl.gz``),
    anything else is CoNLL (also compressed). Without a validation file,
    ``validation_split`` (default 0.1; 0: none) of the training sentences is held out.

Tag schemes
    IOB1, IOB2 and BIOES (BILOU's L/U read as E/S) are accepted and normalised to IOB2
    for training. ``scheme = "auto"`` detects the scheme per file (E-/S- tags: BIOES; an
    I- tag that starts an entity: IOB1; else IOB2) and repairs what it converts. A
    declared scheme is strict: a sequence it does not allow is a DataError at the
    token's file:line.

Words, sub-tokens, windows
    The first sub-token of a word carries the word's label, the others -100
    (``label_all_subtokens = true`` labels them too, B-X continued as I-X). A sentence
    longer than ``max_length`` tokens (default min(256, the model's limit)) is never
    truncated: it is cut at word boundaries into windows that share up to ``stride``
    words (at most half a window) with the next. Every window is trained on. Each word
    is predicted and scored exactly once, from the window where it is most central
    (the most words on its shorter side; the first such window on ties). Words the
    tokenizer turns into nothing (e.g. zero-width characters) are fed as the unknown
    token so they still get a tag.

Metrics
    Entity-level precision, recall and F1 from seqeval in strict mode with IOB2
    (micro over entities; per type in the report) and token_accuracy (words whose tag is
    right, O included). Reports: ``reports/ner_report_<split>.{json,txt}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from petune import hookimpl
from petune.api import ModelInfo, TaskData
from petune.errors import DataError, Refusal
from petune_plugins.tasks import datafiles, reports
from petune_plugins.tasks._common import (
    TOKEN_CLASSIFICATION,
    EncoderTask,
    PadCollator,
    SplitOptions,
    accepted_inputs,
    build_trainer,
    ensure_pad_token,
    held_out_splits,
    hold_out,
    length_within_limit,
    model_device,
    read_held_out,
)
from petune_plugins.tasks.encoding import encode_split

if TYPE_CHECKING:
    from transformers import Trainer

DEFAULT_MAX_LENGTH = 256
TOKEN_FIELDS = ("tokens", "words")
TAG_FIELDS = ("tags", "ner_tags", "labels")
_PREFIX = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}  # BILOU's Last/Unit are BIOES's End/Single
_TAG = re.compile(r"O|[BIESLU]-\S.*")
_SCORED_COLUMNS = ("sentence_index", "word_index")  # per-window metadata, not model inputs


class NerOptions(SplitOptions):
    default_validation_split: ClassVar[float] = 0.1
    default_max_length: ClassVar[int] = DEFAULT_MAX_LENGTH

    format: Literal["auto", "conll", "jsonl"] = Field("auto", description="file format: CoNLL columns, or records "
                                                      "(jsonl: any records file); auto: by the name")
    scheme: Literal["auto", "IOB1", "IOB2", "BIOES"] = Field("auto", description="tag scheme of the files; "
                                                             "a declared one is checked strictly")
    tokens_field: str | None = Field(None, description="JSONL field with the tokens (default tokens/words)")
    tags_field: str | None = Field(None, description="JSONL field with the tags (default tags/ner_tags/labels)")
    tag_names: list[str] | None = Field(None, description="names of integer tags in JSONL, by index")
    max_length: int | None = Field(None, ge=8, description=f"tokens per window (default min({DEFAULT_MAX_LENGTH}, "
                                   "the model's limit))")
    stride: int = Field(16, ge=0, description="words shared by consecutive windows of a long sentence")
    label_all_subtokens: bool = Field(False, description="label every sub-token, not only a word's first")
    max_sentences: int | None = Field(None, ge=1, description="read at most this many sentences per file")


# -- sentences ------------------------------------------------------------------------------
@dataclass
class Sentence:
    """Tokens and (when known) tags, with where each token came from."""

    tokens: list[str]
    tags: list[str] | None
    source: str
    lines: list[int] | None = None  # CoNLL: the line of each token
    line: int | None = None  # JSONL: the line of the record
    text: str | None = None  # raw text the tokens were cut from (predict input)
    offsets: list[tuple[int, int]] | None = None  # character span of each token in `text`

    def where(self, index: int | None = None) -> str:
        if self.lines is not None:
            return datafiles.where(self.source, self.lines[index if index is not None else 0])
        place = datafiles.where(self.source, self.line)
        return f"{place} (token {index + 1})" if index is not None else place


def parse_conll(lines, source: str, *, need_tags: bool = True, max_sentences: int | None = None) -> list[Sentence]:
    """CoNLL column format: token first, tag last, blank line between sentences,
    ``-DOCSTART-`` lines skipped. With ``need_tags=False`` a single column (tokens only)
    is allowed."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str | None] = []
    numbers: list[int] = []
    seen_line = False

    def flush():
        if tokens:
            has_tags = all(t is not None for t in tags)
            sentences.append(Sentence(list(tokens), list(tags) if has_tags else None, source, lines=list(numbers)))
            tokens.clear(), tags.clear(), numbers.clear()

    for number, line in lines:
        seen_line = True
        text = line.rstrip("\r\n")
        if not text.strip():
            flush()
            if max_sentences is not None and len(sentences) >= max_sentences:
                break
            continue
        fields = [f.strip() for f in text.split("\t") if f.strip()] if "\t" in text else text.split()
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if len(fields) < 2 and need_tags:
            raise DataError(f"expected a token and its tag, found one column: {datafiles.shorten(text)!r}",
                            where=datafiles.where(source, number),
                            hint="CoNLL format: one token per line, its tag in the last column (e.g. \"Paris "
                                 "B-LOC\"), a blank line between sentences")
        tokens.append(fields[0])
        tags.append(fields[-1] if len(fields) >= 2 else None)
        numbers.append(number)
    flush()
    if max_sentences is not None:
        sentences = sentences[:max_sentences]
    if not sentences:
        raise DataError("the file is empty" if not seen_line else "the file has no sentences", where=source)
    return sentences


def read_conll(path: str | Path, max_sentences: int | None = None) -> list[Sentence]:
    return parse_conll(datafiles.iter_lines(path), str(path), max_sentences=max_sentences)


def _pick_field(record: dict, chosen: str | None, defaults: tuple[str, ...]) -> str | None:
    if chosen is not None:
        return chosen
    return next((name for name in defaults if name in record), None)


def sentences_from_records(records: list[datafiles.Record], options: NerOptions, *, need_tags: bool = True) -> list[Sentence]:
    """JSONL sentences: a list of tokens and one of tags (strings, or integers named by
    ``tag_names``). For predict input, ``{"text": "..."}`` is split at whitespace."""
    sentences = []
    for record in records:
        source, _, line = record.where.rpartition(":")
        tokens_key = _pick_field(record, options.tokens_field, TOKEN_FIELDS)
        if tokens_key is None and not need_tags and isinstance(record.get("text"), str):
            sentence = sentence_from_text(record["text"], source, int(line))
            if sentence.tokens:
                sentences.append(sentence)
            continue
        if tokens_key is None or tokens_key not in record:
            raise DataError(f"no {options.tokens_field or 'tokens'!r} field", where=record.where,
                            hint="each line needs {\"tokens\": [...], \"tags\": [...]}; set task.tokens_field for "
                                 "another name; fields here: " + ", ".join(record))
        tokens = record[tokens_key]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"field {tokens_key!r} must be a list of strings", where=record.where)
        tags_key = _pick_field(record, options.tags_field, TAG_FIELDS)
        tags = None
        if tags_key is not None and tags_key in record:
            tags = _tag_names(record[tags_key], tags_key, record, options)
            if len(tags) != len(tokens):
                raise DataError(f"{len(tokens)} tokens but {len(tags)} tags", where=record.where,
                                hint="give exactly one tag per token")
        elif need_tags:
            raise DataError(f"no {options.tags_field or 'tags'!r} field", where=record.where,
                            hint="set task.tags_field for another name; fields here: " + ", ".join(record))
        if tokens:
            sentences.append(Sentence(tokens, tags, source, line=int(line)))
    return sentences


def _tag_names(values, key: str, record: datafiles.Record, options: NerOptions) -> list[str]:
    if not isinstance(values, list):
        raise DataError(f"field {key!r} must be a list of tags", where=record.where)
    names = []
    for value in values:
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            if options.tag_names is None:
                raise DataError(f"integer tags in {key!r} need their names", where=record.where,
                                hint="set task.tag_names = [\"O\", \"B-PER\", ...] (index = integer tag)")
            if not 0 <= value < len(options.tag_names):
                raise DataError(f"tag {value} is outside tag_names (0 to {len(options.tag_names) - 1})",
                                where=record.where)
            names.append(options.tag_names[value])
        else:
            raise DataError(f"field {key!r} holds {datafiles.json_type(value)}, expected tag names", where=record.where)
    return names


def sentence_from_text(text: str, source: str, line: int | None = None) -> Sentence:
    """Whitespace tokens of ``text`` with their character offsets."""
    matches = list(re.finditer(r"\S+", text))
    return Sentence([m.group() for m in matches], None, source, line=line, text=text,
                    offsets=[(m.start(), m.end()) for m in matches])


def read_sentences(path: Path, options: NerOptions) -> list[Sentence]:
    """Sentences of a CoNLL or records file (``options.format``; auto: records when the shared
    reader names the file JSON(L), Parquet or Arrow, also compressed, else CoNLL)."""
    kind = options.format
    if kind == "auto":
        kind = "jsonl" if datafiles.data_format(path) in ("jsonl", "json", "parquet", "arrow") else "conll"
    if kind == "conll":
        return read_conll(path, options.max_sentences)
    sentences = sentences_from_records(datafiles.read_records(path, max_rows=options.max_sentences), options)
    if not sentences:
        raise DataError("no sentences with tokens", where=str(path))
    return sentences


# -- tag schemes ----------------------------------------------------------------------------
def split_tag(tag: str) -> tuple[str, str | None]:
    """("O", None) or (prefix, type) with BILOU's L/U read as E/S."""
    if tag == "O":
        return "O", None
    prefix, _, kind = tag.partition("-")
    if prefix not in _PREFIX or not kind:
        raise ValueError(tag)
    return _PREFIX[prefix], kind


def parse_tags(sentence: Sentence) -> list[tuple[str, str | None]]:
    parsed = []
    for i, tag in enumerate(sentence.tags):
        try:
            parsed.append(split_tag(tag))
        except ValueError:
            raise DataError(f"tag {tag!r} of token {sentence.tokens[i]!r} is not O or B-/I-/E-/S-<type>",
                            where=sentence.where(i),
                            hint="use IOB2 (B-PER, I-PER, O), IOB1 or BIOES tags") from None
    return parsed


def detect_scheme(tag_sequences: list[list[tuple[str, str | None]]]) -> str:
    """BIOES if any E-/S- tag; IOB1 if an I- tag starts an entity; else IOB2."""
    iob1 = False
    for tags in tag_sequences:
        previous = ("O", None)
        for prefix, kind in tags:
            if prefix in ("E", "S"):
                return "BIOES"
            if prefix == "I" and not (previous[0] in ("B", "I") and previous[1] == kind):
                iob1 = True
            previous = (prefix, kind)
    return "IOB1" if iob1 else "IOB2"


def validate_scheme(sentence: Sentence, tags: list[tuple[str, str | None]], scheme: str) -> None:
    """Raise a DataError at the first tag ``scheme`` does not allow."""
    def fail(i: int, why: str):
        raise DataError(f"invalid {scheme} tags: {why}", where=sentence.where(i),
                        hint="fix the tag, or set task.scheme = \"auto\" to read the file leniently")

    inside = None  # the type of the entity the previous tag leaves open
    for i, (prefix, kind) in enumerate(tags):
        tag = sentence.tags[i]
        previous = sentence.tags[i - 1] if i else "the sentence start"
        if scheme in ("IOB1", "IOB2") and prefix in ("E", "S"):
            fail(i, f"{tag!r} is a BIOES tag")
        if scheme == "IOB2" and prefix == "I" and inside != kind:
            fail(i, f"{tag!r} after {previous!r} (in IOB2 an entity starts with B-)")
        if scheme == "IOB1" and prefix == "B" and inside != kind:
            fail(i, f"{tag!r} after {previous!r} (in IOB1, B- only separates two adjacent {kind} entities)")
        if scheme == "BIOES":
            if prefix in ("O", "B", "S") and inside is not None:
                fail(i, f"{tag!r} after {previous!r}: the {inside} entity is not closed with E-{inside}")
            if prefix in ("I", "E") and inside != kind:
                fail(i, f"{tag!r} after {previous!r} (in BIOES an entity starts with B- or is S-)")
        inside = kind if prefix in ("B", "I") else None
    if scheme == "BIOES" and inside is not None:
        fail(len(tags) - 1, f"the sentence ends inside a {inside} entity (close it with E-{inside})")


def to_iob2(tags: list[tuple[str, str | None]]) -> list[str]:
    """IOB2 tags from any scheme: S- becomes B-, E- becomes I-, and an I- tag that does not
    continue an entity of its type starts one (B-). This converts IOB1 and BIOES, and
    repairs stray I- tags."""
    result = []
    previous_kind = None
    for prefix, kind in tags:
        if prefix == "O":
            result.append("O")
        elif prefix in ("B", "S") or previous_kind != kind:
            result.append(f"B-{kind}")
        else:
            result.append(f"I-{kind}")
        previous_kind = None if prefix in ("O", "E", "S") else kind
    return result


def normalise(sentences: list[Sentence], scheme: str) -> str:
    """Convert every sentence's tags to IOB2 in place; returns the (detected) scheme."""
    parsed = [parse_tags(s) for s in sentences]
    detected = detect_scheme(parsed) if scheme == "auto" else scheme
    for sentence, tags in zip(sentences, parsed):
        if scheme != "auto":
            validate_scheme(sentence, tags, scheme)
        sentence.tags = to_iob2(tags)
    return detected


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) word spans of IOB2 tags, end exclusive; an I- tag that does not
    continue its type's entity starts a new one."""
    found: list[list] = []
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        prefix, kind = split_tag(tag)
        if prefix == "I" and found and found[-1][0] == kind and found[-1][2] == i:
            found[-1][2] = i + 1
        else:
            found.append([kind, i, i + 1])
    return [tuple(e) for e in found]


# -- windows --------------------------------------------------------------------------------
def plan_windows(token_counts: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word spans ``[start, end)`` of at most ``budget`` sub-tokens (a single longer word
    gets a window of its own), each sharing up to ``stride`` words — at most half a
    window — with the next."""
    windows = []
    start, n = 0, len(token_counts)
    while True:
        end, used = start, 0
        while end < n and (end == start or used + token_counts[end] <= budget):
            used += token_counts[end]
            end += 1
        windows.append((start, end))
        if end >= n:
            return windows
        start = max(start + 1, end - min(stride, (end - start) // 2))


def centrality(word: int, window: tuple[int, int]) -> int:
    """Words of context on the shorter side of ``word`` within ``window``."""
    return min(word - window[0], window[1] - 1 - word)


@dataclass
class Encoded:
    """Windows ready for a model, with the per-window metadata to map predictions back:
    ``sentence_index`` and, per token, ``word_index`` (the word this token scores, or -1)."""

    columns: dict[str, list]
    stats: dict = field(default_factory=dict)


def encode_sentences(tokenizer, sentences: list[list[str]], max_length: int, stride: int, *,
                     tag_ids: list[list[int]] | None = None, continue_id: dict[int, int] | None = None,
                     label_all_subtokens: bool = False) -> Encoded:
    """Tokenize word lists into windows of at most ``max_length`` tokens.

    ``labels``: the word's tag id on its first sub-token, -100 elsewhere (with
    ``label_all_subtokens``, later sub-tokens get ``continue_id[tag]``: B-X -> I-X).
    ``word_index``: each word is scored once, on its first sub-token in the window
    where it is most central."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise Refusal(f"max_length = {max_length} leaves no room for words after the special tokens",
                      where="task.max_length")
    unknown = tokenizer.unk_token or "?"
    try:
        counted = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False, verbose=False)
    except (ValueError, AssertionError) as exc:
        if "add_prefix_space" in str(exc):
            raise Refusal("this tokenizer cannot take words split in advance",
                          hint="load the tokenizer with add_prefix_space=True (byte-level BPE models such as RoBERTa)"
                          ) from exc
        raise

    words_in_windows, window_of = [], []  # window k covers words_in_windows[k]; window_of[k] = (sentence, start)
    stats = {"sentences": len(sentences), "windows": 0, "split_sentences": 0, "unknown_words": 0, "long_words_cut": 0}
    for i, words in enumerate(sentences):
        counts = [0] * len(words)
        for w in counted.word_ids(i):
            if w is not None:
                counts[w] += 1
        if 0 in counts:  # the tokenizer drops these words; feed them as the unknown token
            words = [word if count else unknown for word, count in zip(words, counts)]
            stats["unknown_words"] += counts.count(0)
            counts = [count or 1 for count in counts]
        windows = plan_windows(counts, budget, stride)
        stats["split_sentences"] += len(windows) > 1
        stats["long_words_cut"] += sum(1 for s, e in windows if e - s == 1 and counts[s] > budget)
        for start, end in windows:
            words_in_windows.append(words[start:end])
            window_of.append((i, start, end))
    stats["windows"] = len(window_of)

    encoded = tokenizer(words_in_windows, is_split_into_words=True, truncation=True, max_length=max_length,
                        verbose=False)
    # the window that scores each word: where it is present and most central
    owner: dict[tuple[int, int], tuple[int, int]] = {}
    firsts: list[dict[int, int]] = []  # per window: word (in sentence) -> position of its first sub-token
    for k, (i, start, end) in enumerate(window_of):
        first: dict[int, int] = {}
        for position, w in enumerate(encoded.word_ids(k)):
            if w is not None and start + w not in first:
                first[start + w] = position
        firsts.append(first)
        for word in first:
            score = centrality(word, (start, end))
            if (i, word) not in owner or score > owner[(i, word)][1]:
                owner[(i, word)] = (k, score)
    stats["words_lost"] = sum(len(words) for words in sentences) - len(owner)  # 0 unless a tokenizer misbehaves

    columns = {key: [list(v) for v in values] for key, values in encoded.items()}
    columns["sentence_index"] = [i for i, _, _ in window_of]
    columns["word_index"] = []
    if tag_ids is not None:
        columns["labels"] = []
    for k, (i, start, end) in enumerate(window_of):
        word_ids = encoded.word_ids(k)
        scored = {position: word for word, position in firsts[k].items() if owner[(i, word)][0] == k}
        columns["word_index"].append([scored.get(position, -1) for position in range(len(word_ids))])
        if tag_ids is not None:
            labels = []
            for position, w in enumerate(word_ids):
                if w is None:
                    labels.append(-100)
                elif firsts[k][start + w] == position:
                    labels.append(tag_ids[i][start + w])
                else:
                    labels.append(continue_id[tag_ids[i][start + w]] if label_all_subtokens else -100)
            columns["labels"].append(labels)
    return Encoded(columns, stats)


def encode_batch(tokenizer, numbered: list[tuple[int, Sentence]], *, max_length: int, stride: int,
                 label_ids: dict[str, int], label_all_subtokens: bool) -> tuple[dict[str, list], dict[str, int]]:
    """Windows of a batch of (index in the split, sentence), for :func:`encode_split`: the
    columns of :func:`encode_sentences`, ``sentence_index`` counted in the whole split."""
    continue_id = {i: label_ids["I-" + x[2:] if x.startswith("B-") else x] for x, i in label_ids.items()}
    sentences = [sentence for _, sentence in numbered]
    encoded = encode_sentences(tokenizer, [s.tokens for s in sentences], max_length, stride,
                               tag_ids=[[label_ids[t] for t in s.tags] for s in sentences],
                               continue_id=continue_id, label_all_subtokens=label_all_subtokens)
    first = numbered[0][0]  # a batch is a run of consecutive sentences
    encoded.columns["sentence_index"] = [first + i for i in encoded.columns["sentence_index"]]
    return encoded.columns, encoded.stats


def words_from_windows(predicted, sentence_index, word_index, gold=None, lengths=None, fill=0):
    """Per sentence (in index order), the predicted ids of its words (and the gold ids
    from ``gold``, the windows' labels), read at the positions ``word_index`` marks.
    With ``lengths`` (words per sentence), every sentence and word is present: one the
    windows lost (never expected) gets ``fill``."""
    predicted_words: dict[int, dict[int, int]] = {}
    gold_words: dict[int, dict[int, int]] = {}
    for k, (sentence, positions) in enumerate(zip(sentence_index, word_index)):
        into = predicted_words.setdefault(int(sentence), {})
        gold_into = gold_words.setdefault(int(sentence), {})
        for position, word in enumerate(positions):
            if word >= 0:
                into[word] = int(predicted[k][position])
                if gold is not None:
                    gold_into[word] = int(gold[k][position])
    if lengths is not None:
        return [[predicted_words.get(s, {}).get(w, fill) for w in range(n)] for s, n in enumerate(lengths)], None
    order = sorted(predicted_words)
    predictions = [[predicted_words[s][w] for w in sorted(predicted_words[s])] for s in order]
    golds = [[gold_words[s][w] for w in sorted(gold_words[s])] for s in order] if gold is not None else None
    return predictions, golds


# -- metrics --------------------------------------------------------------------------------
def ner_report(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """seqeval strict-mode IOB2 entity scores (micro, macro, per type) and token accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    words = sum(len(s) for s in gold)
    correct = sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
    report = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "macro_f1": 0.0,
              "token_accuracy": correct / words if words else 0.0, "sentences": len(gold), "words": words,
              "entities": 0, "per_type": {}, "mode": "seqeval strict, IOB2"}
    has_entities = any(t != "O" for s in gold + predicted for t in s)
    if not has_entities:
        return report
    table = classification_report(gold, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro, macro = table.pop("micro avg"), table.pop("macro avg")
    table.pop("weighted avg", None)
    report.update(precision=float(micro["precision"]), recall=float(micro["recall"]), f1=float(micro["f1-score"]),
                  macro_f1=float(macro["f1-score"]), entities=int(micro["support"]))
    report["per_type"] = {kind: {"precision": float(m["precision"]), "recall": float(m["recall"]),
                                 "f1": float(m["f1-score"]), "support": int(m["support"])}
                          for kind, m in sorted(table.items())}
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    return {key: float(report[key]) for key in ("precision", "recall", "f1", "token_accuracy")}


def format_ner_report(report: dict) -> str:
    rows = [[kind, m["precision"], m["recall"], m["f1"], m["support"]] for kind, m in report["per_type"].items()]
    rows.append(["", None, None, None, None])
    rows.append(["micro avg", report["precision"], report["recall"], report["f1"], report["entities"]])
    rows.append(["macro avg", None, None, report["macro_f1"], report["entities"]])
    table = reports.format_table(["entity type", "precision", "recall", "f1", "support"], rows)
    return (f"{table}\ntoken accuracy: {report['token_accuracy']:.4f} ({report['words']} words, "
            f"{report['sentences']} sentences)\nentity scores: {report['mode']}\n")


def _argmax(logits, labels):
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(-1)


# -- the task -------------------------------------------------------------------------------
class NerTask(EncoderTask):
    name = "ner"
    description = "named-entity recognition from CoNLL/JSONL (IOB1/IOB2/BIOES); seqeval strict entity F1"
    Options = NerOptions
    head = TOKEN_CLASSIFICATION
    primary_metric = "f1"
    explained_output = "token_labels"  # petune explain: attributions for each predicted entity

    def word_spans(self, text: str) -> list[tuple[int, int]]:
        """The words of plain text as this task tags them (``petune explain``)."""
        return sentence_from_text(text, "--text").offsets

    def max_length(self, options: NerOptions, tokenizer) -> int:
        """``max_length``, or the default, within the model's limit."""
        return length_within_limit(options.max_length, DEFAULT_MAX_LENGTH, tokenizer)

    # -- data -------------------------------------------------------------------------------
    def load_data(self, options: NerOptions, tokenizer) -> TaskData:
        train = read_sentences(options.train, options)
        schemes = {"train": normalise(train, options.scheme)}
        labels = labels_of(train, str(options.train))
        held_out = self._read_held_out(options, labels, schemes)
        train = hold_out(train, held_out, options, str(options.train))

        padded = ensure_pad_token(tokenizer)
        state = {"labels": labels, "max_length": self.max_length(options, tokenizer), "stride": options.stride,
                 "schemes": schemes}
        data = self._encode({"train": train, **held_out}, options, tokenizer, state)
        if padded:
            data.notes["pad_token_set_to"] = tokenizer.pad_token
        return data

    def load_eval_data(self, options: NerOptions, tokenizer, state: dict) -> TaskData:
        schemes: dict[str, str] = {}
        held_out = self._read_held_out(options, state["labels"], schemes)
        return self._encode(held_out, options, tokenizer, {**state, "schemes": {**state.get("schemes", {}), **schemes}})

    @staticmethod
    def _read_held_out(options: NerOptions, labels: list[str], schemes: dict[str, str]) -> dict[str, list]:
        """The validation and test files (where given), in IOB2; every entity type must be a training one.
        Records each file's tag scheme in ``schemes``."""
        def read(split: str, path) -> list[Sentence]:
            sentences = read_sentences(path, options)
            schemes[split] = normalise(sentences, options.scheme)
            check_known_types(sentences, labels, str(path))
            return sentences

        return read_held_out(options, read)

    @staticmethod
    def _encode(splits: dict[str, list], options: NerOptions, tokenizer, state: dict) -> TaskData:
        labels = state["labels"]
        batch = partial(encode_batch, tokenizer, max_length=state["max_length"],
                        stride=state.get("stride", options.stride), label_ids={x: i for i, x in enumerate(labels)},
                        label_all_subtokens=options.label_all_subtokens)
        datasets, notes = {}, {}
        for split in ("train", "validation", "test"):
            sentences = splits.get(split)
            if not sentences:
                continue
            datasets[split], stats = encode_split(list(enumerate(sentences)), batch, desc=split)  # in batches, to Arrow
            notes[f"{split}_sentences"] = len(sentences)
            for key in ("split_sentences", "unknown_words", "long_words_cut", "words_lost"):
                if stats[key]:
                    notes[f"{split}_{key}"] = stats[key]
        schemes = {split: scheme for split, scheme in state["schemes"].items() if split in splits}
        distinct = set(schemes.values())
        notes["tag_scheme"] = distinct.pop() if len(distinct) == 1 else ", ".join(f"{k} {v}" for k, v in schemes.items())
        notes["entity_types"] = len(labels) // 2
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"), test=datasets.get("test"),
                        state=state, notes=notes)

    # -- model ------------------------------------------------------------------------------
    def build_model(self, model_info: ModelInfo, options: NerOptions, state: dict, **load_kwargs):
        labels = state["labels"]
        return self.head.load(
            model_info, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **load_kwargs)

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self, *, model, tokenizer, data: TaskData, options, args: dict, callbacks: list) -> Trainer:
        labels = data.state["labels"]
        validation = data.validation

        def compute_metrics(prediction) -> dict:
            # predictions come in the eval dataset's order: its metadata maps them to words
            if validation is not None and len(validation) == len(prediction.predictions):
                meta = validation["sentence_index"], validation["word_index"]
            else:  # another dataset: score each window alone, on its labelled positions
                meta = (range(len(prediction.label_ids)),
                        [[p if l != -100 else -1 for p, l in enumerate(row)] for row in prediction.label_ids])
            return flat_metrics(self._report(prediction.predictions, prediction.label_ids, *meta, labels))

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        keep = accepted_inputs(model)
        return build_trainer(model=model, tokenizer=tokenizer, data=data, args=args, callbacks=callbacks,
                             collator=PadCollator(pad_id, keep | {"labels"} if keep else None, drop=_SCORED_COLUMNS),
                             compute_metrics=compute_metrics, preprocess_logits=_argmax)

    @staticmethod
    def _report(predicted, gold, sentence_index, word_index, labels) -> dict:
        predicted_ids, gold_ids = words_from_windows(predicted, sentence_index, word_index, gold)
        return ner_report([[labels[i] for i in s] for s in gold_ids], [[labels[i] for i in s] for s in predicted_ids])

    def evaluate(self, trainer: Trainer, data: TaskData, options, run_dir: Path) -> dict[str, dict]:
        labels = data.state["labels"]
        results = {}
        for split, dataset in held_out_splits(data):
            # compute_metrics is for evaluation during training (it reads the validation
            # windows' metadata); here each split is scored below with its own metadata.
            compute_metrics, trainer.compute_metrics = trainer.compute_metrics, None
            try:
                output = trainer.predict(dataset, metric_key_prefix=split)
            finally:
                trainer.compute_metrics = compute_metrics
            report = self._report(output.predictions, output.label_ids, dataset["sentence_index"],
                                  dataset["word_index"], labels)
            results[split] = flat_metrics(report)
            if f"{split}_loss" in output.metrics:
                results[split]["loss"] = float(output.metrics[f"{split}_loss"])
            if trainer.is_world_process_zero():
                report_dir = Path(run_dir) / "reports"
                reports.write_json(report_dir / f"ner_report_{split}.json", {"split": split, **report})
                reports.write_text(report_dir / f"ner_report_{split}.txt",
                                   f"NER report ({split})\n\n" + format_ner_report(report))
        return results

    # -- predict ----------------------------------------------------------------------------
    def parse_inputs(self, options: NerOptions, text: str, source: str) -> list[Sentence]:
        """Sentences to tag: JSONL ({"tokens": [...]} or {"text": "..."}), CoNLL (a token
        per line, optional tag columns, blank line between sentences), or plain text with
        one sentence per line, split at whitespace (entities then get character offsets)."""
        suffix = datafiles.data_suffix(source)
        if datafiles.data_format(source) in ("jsonl", "json"):
            records = (datafiles.parse_json_records(text, source) if text.lstrip().startswith("[")
                       else datafiles.parse_jsonl(datafiles.text_lines(text), source))
            sentences = sentences_from_records(records, options, need_tags=False)
        elif suffix == ".conll" or looks_like_conll(text):
            sentences = parse_conll(datafiles.text_lines(text), source, need_tags=False)
        else:
            sentences = [sentence_from_text(line.rstrip("\r\n"), source, number)
                         for number, line in datafiles.text_lines(text) if line.strip()]
        if not sentences:
            raise DataError("no sentences to tag", where=source, hint="give one sentence per line, or CoNLL")
        return sentences

    def predict(self, model, tokenizer, options, state: dict, rows: list[Sentence], batch_size: int = 32) -> list[dict]:
        import torch

        labels = state.get("labels") or [model.config.id2label[i] for i in range(model.config.num_labels)]
        max_length = state.get("max_length") or self.max_length(options, tokenizer)
        stride = state.get("stride", options.stride)
        encoded = encode_sentences(tokenizer, [s.tokens for s in rows], max_length, stride)
        keep = accepted_inputs(model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        collate = PadCollator(pad_id, keep, drop=_SCORED_COLUMNS)
        device = model_device(model)
        model.eval()
        columns = encoded.columns
        window_predictions = []
        for start in range(0, len(columns["input_ids"]), batch_size):
            features = [{key: columns[key][k] for key in columns}
                        for k in range(start, min(start + batch_size, len(columns["input_ids"])))]
            batch = {key: value.to(device) for key, value in collate(features).items()}
            with torch.no_grad():
                window_predictions.extend(model(**batch).logits.argmax(-1).cpu().tolist())
        predicted_ids, _ = words_from_windows(window_predictions, columns["sentence_index"], columns["word_index"],
                                              lengths=[len(s.tokens) for s in rows], fill=labels.index("O"))
        results = []
        for sentence, ids in zip(rows, predicted_ids):
            tags = to_iob2([split_tag(labels[i]) for i in ids])  # repaired: what is shown is what is counted
            found = []
            for kind, start_word, end_word in entities(tags):
                entity = {"type": kind, "start": start_word, "end": end_word,
                          "text": " ".join(sentence.tokens[start_word:end_word])}
                if sentence.offsets is not None:
                    entity["char_start"] = sentence.offsets[start_word][0]
                    entity["char_end"] = sentence.offsets[end_word - 1][1]
                    entity["text"] = sentence.text[entity["char_start"]:entity["char_end"]]
                found.append(entity)
            results.append({"tokens": sentence.tokens, "tags": tags, "entities": found})
        return results

    def format_predictions(self, rows: list[Sentence], predictions: list[dict]) -> str:
        """CoNLL: ``token<TAB>tag`` per line, a blank line after each sentence."""
        blocks = ["".join(f"{token}\t{tag}\n" for token, tag in zip(p["tokens"], p["tags"])) for p in predictions]
        return "\n".join(blocks)


def looks_like_conll(text: str) -> bool:
    """CoNLL rather than one sentence per line: a -DOCSTART- line; or every line ends in a
    tag (O, B-X, ...) after a token; or one token per line with blank lines between."""
    lines = text.splitlines()
    nonblank = [line for line in lines if line.strip()]
    if not nonblank:
        return False
    if any(line.startswith("-DOCSTART-") for line in nonblank):
        return True
    fields = [line.split("\t") if "\t" in line else line.split() for line in nonblank]
    if all(len(f) >= 2 and _TAG.fullmatch(f[-1].strip()) for f in fields):
        return True
    inner_blank = any(not line.strip() for line in lines[lines.index(nonblank[0]):len(lines) - 1])
    return all(len(f) == 1 for f in fields) and inner_blank


def labels_of(sentences: list[Sentence], source: str) -> list[str]:
    """"O", then B-/I- for each entity type in the training data (sorted)."""
    kinds = sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})
    if not kinds:
        raise DataError("the training data has no entity tags (only O)", where=source,
                        hint="check that the tag is the last column, or that max_sentences keeps some entities")
    return ["O"] + [f"{prefix}-{kind}" for kind in kinds for prefix in ("B", "I")]


def check_known_types(sentences: list[Sentence], labels: list[str], source: str) -> None:
    known = {label[2:] for label in labels if label != "O"}
    unknown: dict[str, str] = {}
    for sentence in sentences:
        for i, tag in enumerate(sentence.tags):
            if tag != "O" and tag[2:] not in known:
                unknown.setdefault(tag[2:], sentence.where(i))
    if unknown:
        listed = "; ".join(f"{kind!r} (first at {place})" for kind, place in sorted(unknown.items()))
        raise DataError(f"entity type(s) not in the training data: {listed}", where=source,
                        hint=f"training types are: {', '.join(sorted(known))}")


@hookimpl
def register_tasks(register):
    register(NerTask)
