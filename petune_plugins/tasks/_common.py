"""What the task plugins share, written once: the split options and how validation rows come
about, reading the held-out files, refusing missing data files, what a task may learn of the
model from its tokenizer, encoder-model helpers (heads, padding, the Trainer) and text cutting.

Split options (:class:`SplitOptions`), the same meaning in every task:

* ``validation``: a file of validation rows;
* ``validation_split``: the share of ``train`` held out as validation when there is no
  validation file. Unset: the task's ``default_validation_split`` (0.1 for classification
  and NER, 0 for the others). ``0``: no split, whatever else is given. A share above 0 and
  a validation file together are an error;
* ``split_seed``: the seed of that split.

A task object keeps no state between calls: what ``check`` learns of the model, ``load_data``
learns again from the tokenizer's folder (:func:`model_info_of`), where the runner loaded both.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import BeforeValidator, Field, model_serializer, model_validator

from petune.api import DataPath, ModelInfo, ModelShape, Options, Task, TaskData, load_pretrained, model_device  # noqa: F401 - model_device: the tasks' import of it
from petune.errors import DataError, Refusal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

HELD_OUT = ("validation", "test")


# -- split options --------------------------------------------------------------------------
class SplitOptions(Options):
    """``train`` / ``validation`` / ``test`` and how validation rows come about. A task whose
    files are tables of settings redeclares ``train``, ``validation`` and ``test`` with its type."""

    #: the share held out when ``validation_split`` is unset and there is no validation file
    default_validation_split: ClassVar[float] = 0.0

    train: DataPath = Field(description="training file")
    validation: DataPath | None = Field(None, description="validation file (else validation_split of train)")
    test: DataPath | None = Field(None, description="test file, evaluated after training")
    validation_split: float | None = Field(None, ge=0, lt=1, description="share of train held out as validation "
                                           "when there is no validation file (0: none; unset: the task's default)")
    split_seed: int = Field(42, description="seed of the validation split")

    @model_validator(mode="after")
    def _one_way_to_validate(self):
        if self.validation is not None and self.validation_split:
            raise ValueError("give either a validation file or validation_split, not both "
                             "(validation_split = 0 means no split)")
        return self

    @property
    def split_ratio(self) -> float:
        """The share of train to hold out: 0 with a validation file or ``validation_split = 0``."""
        if self.validation is not None:
            return 0.0
        return self.default_validation_split if self.validation_split is None else self.validation_split


class DataFileTable(Options):
    """A split given as a table of settings (``{ path = "...", ... }``) as well as a plain path;
    the resolved recipe shows a plain path again when nothing else is set (and never a None)."""

    def paths(self) -> list[Path]:
        """The files this split reads."""
        return [value for value in self.__dict__.values() if isinstance(value, Path)]

    @model_serializer(mode="wrap")
    def _compact(self, handler):
        data = {k: v for k, v in handler(self).items() if v is not None}
        return data["path"] if list(data) == ["path"] else data


def split_file(table: type[DataFileTable], example: str):
    """The option type of a split: ``table``, or a plain path read as ``{ path = ... }``."""
    def as_table(value):
        if isinstance(value, (str, Path)):
            return {"path": value}
        if isinstance(value, dict):
            return value
        raise ValueError(f"expected a file path, or a table like {example}")

    return Annotated[table, BeforeValidator(as_table)]


def seeded_split(items: list, ratio: float, seed: int, source: str) -> tuple[list, list]:
    """Hold out ``round(ratio * n)`` (at least 1) items chosen with ``seed``; both parts
    keep file order. ``items``: a list, or a :class:`~petune_plugins.tasks.encoding.Spool`."""
    if not ratio:
        return items, []
    if len(items) < 2:
        raise DataError(f"{len(items)} example(s) cannot be split into train and validation", where=source,
                        hint="add data, give a validation file, or set validation_split = 0")
    held_count = min(len(items) - 1, max(1, round(ratio * len(items))))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_count])
    if hasattr(items, "subset"):  # a Spool (items on disk): views of the same file
        return items.subset(held, inside=False), items.subset(held, inside=True)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def hold_out(train: list, held_out: dict[str, list], options: SplitOptions, source: str,
             split: Callable[[list, float, int, str], tuple[list, list]] = seeded_split) -> list:
    """The training rows left once ``options.split_ratio`` of them become ``held_out["validation"]``
    (nothing moves when a validation file was read or the ratio is 0). ``split`` may keep groups
    together (qa: the questions of one context)."""
    if "validation" in held_out or not options.split_ratio:
        return train
    train, held_out["validation"] = split(train, options.split_ratio, options.split_seed, source)
    return train


def read_held_out(options: Options, read: Callable[[str, object], list]) -> dict[str, list]:
    """``{split: read(split, value)}`` for the validation and test files the options give."""
    return {split: read(split, value) for split in HELD_OUT if (value := getattr(options, split, None)) is not None}


def held_out_splits(data: TaskData):
    """(split name, dataset) for each held-out split that has rows, for a task's evaluate."""
    for split in HELD_OUT:
        dataset = getattr(data, split)
        if dataset is not None and len(dataset):
            yield split, dataset


def data_paths(value) -> list[Path]:
    """The files of a split's value: a path, or a settings table with ``paths()``."""
    if value is None:
        return []
    paths = getattr(value, "paths", None)
    return [Path(p) for p in paths()] if callable(paths) else [Path(value)]


def check_data_paths(options: Options, names: Sequence[str] = ("train", *HELD_OUT)) -> None:
    """Refuse missing data files before any model loads. A folder passes only when the shared
    reader takes it (a ``save_to_disk`` folder or a folder of .parquet shards)."""
    for name in names:
        for path in data_paths(getattr(options, name, None)):
            if not path.exists():
                raise DataError("file not found", where=str(path), hint=f"check task.{name}; relative paths are "
                                                                         "relative to the recipe's folder")
            if path.is_dir():
                from petune_plugins.tasks.datafiles import check_folder

                check_folder(path)  # the reader's own reason (a DatasetDict, a missing state.json)


# -- what a task may learn of the model ------------------------------------------------------
def model_info_of(tokenizer: PreTrainedTokenizerBase) -> ModelInfo | None:
    """The model whose folder the tokenizer was loaded from (the runner loads both from one
    folder), or None when that folder has no config: ``load_data`` learns here what ``check``
    saw, so no task keeps it between calls."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if not str(folder) or not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    return ModelInfo(name=folder.name, path=folder, config=AutoConfig.from_pretrained(folder, trust_remote_code=False))


def model_positions(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The position embeddings of the tokenizer's model (None: unknown or unbounded)."""
    info = model_info_of(tokenizer)
    return info.max_positions if info is not None else None


def model_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens the model takes: the tokenizer's model_max_length (when set) and the
    model's position embeddings (when known)."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), model_positions(tokenizer))
              if n and n < 1_000_000]
    return min(limits) if limits else None


def length_within_limit(requested: int | None, default: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """``requested`` (or ``default``) tokens, lowered to what the model takes."""
    length = requested or default
    limit = model_limit(tokenizer)
    return min(length, limit) if limit else length


def check_max_length(model_info: ModelInfo, max_length: int | None) -> None:
    limit = model_info.max_positions
    if max_length is not None and limit and max_length > limit:
        raise Refusal(f"max_length = {max_length} is more than the model takes ({limit} positions)",
                      where="task.max_length", hint=f"set task.max_length to at most {limit}")


def refuse_unless_head(model_info: ModelInfo, mapping_name: str, what: str) -> None:
    from transformers.models.auto import modeling_auto

    supported = getattr(modeling_auto, mapping_name)
    if model_info.model_type not in supported:
        raise Refusal(f"model {model_info.name!r} (type {model_info.model_type!r}) has no {what} head in transformers",
                      where="model.name", hint=f"use an encoder such as BERT/RoBERTa/DeBERTa or a decoder such as "
                                               f"Llama/Qwen/Mistral that has a {what} class")


# -- tokens -----------------------------------------------------------------------------------
#: tokens a tokenizer may hold for padding, tried in this order before UNK
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<|vision_pad|>",
                  "<|fim_pad|>")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, avoid: Iterable[str] = (), *, may_add: bool = False) -> bool:
    """Give the tokenizer a pad token that is none of ``avoid``, reusing one it has when it
    can: its own pad token, its EOS token, a pad-like token of its vocabulary
    (:data:`PAD_CANDIDATES`), its UNK token; else a new ``<pad>`` token when ``may_add`` (the
    caller then gives it an embedding row), else a Refusal. True when the pad token changed.

    Encoder tasks avoid nothing (EOS pads; attention masks and -100 labels keep padding out of
    the loss); causal LMs avoid their stop tokens, which must train and must not be masked as
    padding."""
    avoid = {t for t in avoid if t}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in avoid:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.eos_token, *PAD_CANDIDATES, tokenizer.unk_token):
        if candidate and candidate not in avoid and (candidate in vocab or candidate == tokenizer.eos_token):
            tokenizer.pad_token = candidate
            return True
    if not may_add:
        raise Refusal("the tokenizer has no pad, EOS or UNK token to pad batches with",
                      hint="use a model whose tokenizer defines a pad token")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def cut_to_tokens(tokenizer, texts: list[str], limit: int) -> tuple[list[str], int]:
    """Texts cut to at most ``limit`` tokens (at a token boundary, by character offsets), and how many were cut."""
    if not texts:
        return [], 0
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    cut, count = [], 0
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        if len(offsets) > limit:
            count += 1
            text = text[: offsets[limit - 1][1]]
        cut.append(text)
    return cut, count


# -- models with a task head -------------------------------------------------------------------
def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def accepted_inputs(model) -> set[str] | None:
    """The keyword arguments the model's forward names (None when it names none and takes
    only ``**kwargs``). Batches keep only these, so tokenizer outputs a model does not
    know (token_type_ids for Llama) never reach it; the Trainer's own column removal
    cannot see through peft wrappers."""
    params = inspect.signature(base_model(model).forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named or None


def load_with_head(auto_class, model_info: ModelInfo, **kwargs):
    """``auto_class.from_pretrained`` that remembers which modules the checkpoint did not
    have (new head, or e.g. a BERT pooler missing from an MLM checkpoint): they start
    random, so they must train and be saved with an adapter (see find_head_modules)."""
    if replaces_head(auto_class, model_info, kwargs.get("num_labels")):
        kwargs["ignore_mismatched_sizes"] = True
    model, loading = load_pretrained(auto_class, model_info.path, output_loading_info=True, **kwargs)
    new = {key for key in loading.get("missing_keys", ())} | {row[0] for row in loading.get("mismatched_keys", ())}
    model.petune_new_modules = sorted({key.rpartition(".")[0] for key in new if "." in key})
    return model


def replaces_head(auto_class, model_info: ModelInfo, num_labels: int | None) -> bool:
    """True (with a note) when the checkpoint already has this kind of head with another number
    of outputs, e.g. a reward model (one score) started from a classification run (two
    labels): that head cannot be loaded, so a new one is drawn and trained, on purpose."""
    config = model_info.config
    architectures = getattr(config, "architectures", None) or []
    mapping = getattr(getattr(auto_class, "_model_mapping", None), "_model_mapping", {})
    has_head = any(arch in set(mapping.values()) for arch in architectures)
    if num_labels is None or not has_head or getattr(config, "num_labels", num_labels) == num_labels:
        return False
    from petune.console import err, is_main_process

    if is_main_process():
        labels = ", ".join(str(v) for v in (getattr(config, "id2label", None) or {}).values())
        err.print(f"[yellow]note[/]: {model_info.name} has a {architectures[0]} head with {config.num_labels} "
                  f"output(s) ({labels}); this task needs {num_labels}: a new head is drawn and trained in its place",
                  soft_wrap=True)
    return True


def find_head_modules(model, known: Sequence[str] = ("classifier", "score", "classification_head", "qa_outputs")) -> list[str]:
    """Modules that must train and be saved with an adapter: the task head — top-level
    children with weights other than the base model (BERT: ["classifier"], Llama:
    ["score"], DistilBERT: ["pre_classifier", "classifier"]), else well-known names —
    plus any other module the checkpoint lacked (tiny BERT: "bert.pooler.dense"), which
    would otherwise stay random and be re-drawn differently when the run is loaded."""
    model = base_model(model)
    prefix = getattr(model, "base_model_prefix", None)
    heads = [name for name, child in model.named_children()
             if name != prefix and any(True for _ in child.parameters())]
    if not heads:
        heads = [name for name in known if hasattr(model, name)]
    new = [m for m in getattr(model, "petune_new_modules", []) if not any(m == h or m.startswith(h + ".") for h in heads)]
    return heads + new


@contextmanager
def evaluating(model):
    """The model in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- the model as training starts ---------------------------------------------------------------
@dataclass
class StartingPoint:
    """What a task measured on the model as it started, before the first optimizer step:
    metrics per held-out split, and sample answers (``evaluate`` shows them beside the results
    as ``<split>_before`` and ``before``)."""

    metrics: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def measure_before_training(trainer, measure: Callable[[bool], StartingPoint]) -> None:
    """Have ``measure(is_world_process_zero)`` called once, before the first step, and keep what
    it returns for :func:`before_training`. Not on a resumed run: its starting model is gone."""
    from transformers import TrainerCallback

    trainer._petune_before = StartingPoint()

    class MeasureBeforeTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step > 0:
                return
            trainer._petune_before = measure(state.is_world_process_zero)

    trainer.add_callback(MeasureBeforeTraining())


def before_training(trainer) -> StartingPoint:
    """What :func:`measure_before_training` measured (empty when nothing was)."""
    return getattr(trainer, "_petune_before", None) or StartingPoint()


class PadCollator:
    """Pads a batch on the right: input_ids with the pad id, attention_mask and
    token_type_ids with 0, labels with -100 (sequence labels are scalars and stay).
    Keeps only the model's inputs (metadata columns such as word indices are dropped)."""

    def __init__(self, pad_token_id: int, keep: set[str] | None = None, drop: Sequence[str] = ()):
        self.pad_token_id = pad_token_id
        self.keep = keep
        self.drop = set(drop)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        names = [k for k in features[0] if k not in self.drop and (self.keep is None or k in self.keep)]
        longest = max(len(f["input_ids"]) for f in features)
        batch = {}
        for name in names:
            values = [f[name] for f in features]
            if name == "labels" and not isinstance(values[0], (list, tuple)):
                batch[name] = torch.tensor(values, dtype=torch.long)
                continue
            fill = {"input_ids": self.pad_token_id, "labels": -100}.get(name, 0)
            batch[name] = torch.tensor([list(v) + [fill] * (longest - len(v)) for v in values], dtype=torch.long)
        return batch


def build_trainer(*, model, tokenizer, data: TaskData, args: dict, callbacks: list, collator, compute_metrics,
                  preprocess_logits=None) -> Trainer:
    """A transformers Trainer over the task's splits; our collator picks the model
    inputs, so the Trainer must not drop columns itself."""
    from transformers import Trainer, TrainingArguments

    args = dict(args)
    args["remove_unused_columns"] = False
    args.setdefault("label_names", ["labels"])  # peft wrappers hide `labels` from the Trainer's signature check
    if data.validation is None:  # nothing to evaluate on: evaluation and best-model tracking cannot run
        args["eval_strategy"] = "no"
        args["load_best_model_at_end"] = False
        args.pop("metric_for_best_model", None)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=data.train,
                   eval_dataset=data.validation, processing_class=tokenizer, data_collator=collator,
                   compute_metrics=compute_metrics, callbacks=list(callbacks or []),
                   preprocess_logits_for_metrics=preprocess_logits)


@dataclass(frozen=True)
class Head:
    """The head an encoder task puts on a model, declared once: peft's task type, the
    transformers class that loads it, transformers' mapping of the architectures that
    have it, and what a training batch's labels are (see :class:`petune.api.ModelShape`)."""

    peft_task_type: str
    auto_class: str
    mapping: str
    labels: str

    @property
    def described(self) -> str:
        """e.g. "sequence-classification", for people."""
        return self.mapping.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES").lower().replace("_", "-")

    def load(self, model_info: ModelInfo, **kwargs):
        import transformers

        return load_with_head(getattr(transformers, self.auto_class), model_info, **kwargs)


SEQUENCE_CLASSIFICATION = Head("SEQ_CLS", "AutoModelForSequenceClassification",
                               "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", labels="class")
TOKEN_CLASSIFICATION = Head("TOKEN_CLS", "AutoModelForTokenClassification",
                            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", labels="tokens")
QUESTION_ANSWERING = Head("QUESTION_ANS", "AutoModelForQuestionAnswering",
                          "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", labels="span")


class EncoderTask(Task):
    """A task that puts a head on a model (classification, NER, QA): refuses a model without
    that head, a ``max_length`` beyond its positions and missing files; the head trains and
    is saved with an adapter. A subclass declares its :class:`Head` as ``head``."""

    head: ClassVar[Head]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "head" in cls.__dict__:
            cls.peft_task_type = cls.head.peft_task_type

    def model_shape(self, config) -> ModelShape:
        return ModelShape(self.head.auto_class, labels=self.head.labels)

    def sequence_length(self, options) -> int:
        """``max_length``, else the options' ``default_max_length`` (lowered in load_data to what the model takes)."""
        return options.max_length or options.default_max_length

    def check(self, model_info: ModelInfo, options) -> None:
        refuse_unless_head(model_info, self.head.mapping, self.head.described)
        check_max_length(model_info, options.max_length)
        check_data_paths(options)

    def head_modules(self, model) -> list[str]:
        return find_head_modules(model)
