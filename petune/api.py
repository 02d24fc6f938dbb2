"""What a plugin implements: a Strategy, a Task or a ModelSource.

Each is a small class with a ``name``, an ``Options`` schema (a pydantic model whose
unknown keys are errors) and a handful of methods. The runner (``petune/runner.py``)
calls them in this order::

    path   = source.resolve(name)                    # ModelSource
    info   = ModelInfo.from_path(name, path)
    task.check(info, task_opts)                      # refuse a model the task cannot use
    strategy.check(task, info, strategy_opts)        # refuse impossible mixes, with a reason
    data   = task.load_data(task_opts, tokenizer)    # datasets + state (e.g. the label map)
    model  = task.build_model(info, task_opts, data.state, **strategy.load_kwargs(strategy_opts))
    model  = strategy.apply(model, task, strategy_opts)
    trainer = task.make_trainer(model=..., tokenizer=..., data=..., options=..., args=..., callbacks=...)
    trainer.train()
    strategy.save(model, run_dir / strategy.artifact)
    metrics = task.evaluate(trainer, data, task_opts, run_dir)

and, on a finished run, ``strategy.restore(task.build_model(...), run_dir / strategy.artifact, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, ValidationInfo

from petune.errors import Refusal

if TYPE_CHECKING:  # heavy imports stay out of start-up
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer


class Options(BaseModel):
    """Base of every options schema: unknown keys are errors, types are not coerced
    (``epochs = "3"`` is refused, not read as 3), defaults are validated too."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def _resolve_against_recipe(value: Path, info: ValidationInfo) -> Path:
    context = info.context or {}
    value = value.expanduser()
    if context.get("base_dir") is not None and not value.is_absolute():
        value = Path(context["base_dir"]) / value
    if context.get("check_paths") and not value.exists():
        raise ValueError(f"file not found: {value}")
    return value


#: A data path in an options schema: relative paths resolve against the recipe's folder,
#: and must exist when a recipe is validated for a run.
DataPath = Annotated[Path, Strict(False), AfterValidator(_resolve_against_recipe)]


# Architectures whose name says "decoder-only language model".
_CAUSAL_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


@dataclass
class ModelInfo:
    """What is known about a model before its weights load (from its config)."""

    name: str
    path: Path
    config: "PretrainedConfig"

    @classmethod
    def from_path(cls, name: str, path: Path) -> "ModelInfo":
        from transformers import AutoConfig

        return cls(name=name, path=Path(path), config=AutoConfig.from_pretrained(path, trust_remote_code=False))

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def text_config(self) -> "PretrainedConfig":
        """The language-model part of multimodal configs (e.g. Gemma 3), else the config."""
        get = getattr(self.config, "get_text_config", None)
        return get() if get else self.config

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def is_decoder_only(self) -> bool:
        """True for causal LMs (Llama, Gemma, GPT-2 ...), False for encoders like BERT."""
        if self.is_encoder_decoder:
            return False
        archs = self.config.architectures or []
        if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            return True
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return self.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs

    @property
    def num_layers(self) -> int:
        return int(getattr(self.text_config, "num_hidden_layers", 0) or 0)

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.text_config, "hidden_size", 0) or 0)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)


@dataclass
class TaskData:
    """A task's prepared data: tokenized splits plus the state needed to rebuild its
    model later without the data (e.g. ``{"labels": [...]}``), saved as task_state.json."""

    train: Any
    validation: Any = None
    test: Any = None
    state: dict = field(default_factory=dict)
    #: counts worth telling the user (e.g. {"truncated": 3, "dropped": 1}); shown in the plan.
    notes: dict = field(default_factory=dict)


class _Plugin:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options


class Task(_Plugin):
    """A kind of supervised job: data, head, collator, metrics, trainer."""

    #: peft's TaskType name: "SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "QUESTION_ANS".
    peft_task_type: ClassVar[str]
    #: the metric the runner reports as "best" (key in the validation metrics), e.g. "accuracy".
    primary_metric: ClassVar[str] = "loss"
    #: True for language-modelling losses averaged over tokens: under several processes the
    #: trainer then normalises by the token count across all of them. False for per-example
    #: losses (classification), where that normalisation would scale the loss by the process count.
    token_level_loss: ClassVar[bool] = False

    def check(self, model_info: ModelInfo, options: Options) -> None:
        """Raise :class:`petune.errors.Refusal` if this model cannot do this task."""

    def load_data(self, options: Options, tokenizer: "PreTrainedTokenizerBase") -> TaskData:
        """Read and tokenize the data. May adapt the tokenizer (pad token, chat template);
        the runner saves the tokenizer after this call."""
        raise NotImplementedError

    def load_eval_data(self, options: Options, tokenizer: "PreTrainedTokenizerBase", state: dict) -> TaskData:
        """Read and tokenize only the held-out files (``validation`` where it is a file, and
        ``test``) for ``petune eval``, with the finished run's ``state``: a trained run must stay
        scorable after its training file moves. This default re-reads everything."""
        return self.load_data(options, tokenizer)

    def build_model(self, model_info: ModelInfo, options: Options, state: dict, **load_kwargs) -> "PreTrainedModel":
        """Load the base model with this task's head (``load_kwargs`` come from the strategy)."""
        raise NotImplementedError

    def head_modules(self, model: "PreTrainedModel") -> list[str]:
        """Names of modules that must stay trainable and be saved with an adapter
        (peft ``modules_to_save``), e.g. ``["classifier"]``. Empty for LM tasks."""
        return []

    def make_trainer(self, *, model, tokenizer, data: TaskData, options: Options, args: dict, callbacks: list) -> "Trainer":
        """Return a ready ``transformers.Trainer`` (or TRL trainer). ``args`` are keyword
        arguments for ``TrainingArguments`` (or ``trl.SFTConfig``) built from the recipe's
        [train]/[eval] sections; add task-specific ones (metric_for_best_model, ...)."""
        raise NotImplementedError

    def evaluate(self, trainer: "Trainer", data: TaskData, options: Options, run_dir: Path) -> dict[str, dict]:
        """Final metrics per split (``{"validation": {...}, "test": {...}}``); write the
        task's reports into ``run_dir`` with :mod:`petune.artifacts`."""
        raise NotImplementedError


class Strategy(_Plugin):
    """Decides which parameters train and how the result is saved."""

    #: folder of the run that holds the trained weights: "adapter" or "model".
    artifact: ClassVar[str] = "adapter"

    def check(self, task: Task, model_info: ModelInfo | None, options: Options) -> None:
        """Raise :class:`petune.errors.Refusal` for mixes that cannot work. ``model_info``
        is None when only the recipe is being validated (nothing loaded)."""

    def check_recipe(self, recipe) -> None:
        """Refuse settings elsewhere in the recipe this strategy cannot work with (e.g.
        [train] gradient checkpointing, [distributed] backend), before anything loads."""

    def load_kwargs(self, options: Options) -> dict:
        """Extra ``from_pretrained`` keyword arguments (e.g. ``quantization_config``)."""
        return {}

    def apply(self, model: "PreTrainedModel", task: Task, options: Options) -> "torch.nn.Module":
        """Return the model ready to train (frozen / wrapped as the strategy wants)."""
        raise NotImplementedError

    def save(self, model: "torch.nn.Module", path: Path) -> None:
        """Write the trained weights to ``path`` in a format other tools load."""
        model.save_pretrained(path)

    def restore(self, base: "PreTrainedModel", path: Path, task: Task, options: Options) -> "torch.nn.Module":
        """Put the weights saved by :meth:`save` onto a freshly built base model."""
        raise NotImplementedError

    def merge(self, model: "torch.nn.Module") -> "PreTrainedModel":
        """Return a plain transformers model with the trained weights folded in."""
        raise Refusal(f"strategy {self.name!r} has nothing to merge")


class ModelSource(_Plugin):
    """Turns a recipe's ``[model] name`` into a local folder in transformers format."""

    #: sources are asked in ascending priority; the first that claims a name resolves it.
    priority: ClassVar[int] = 100

    def names(self) -> list[str]:
        """Fixed names this source offers (e.g. packaged models), for listings."""
        return []

    def claims(self, name: str) -> bool:
        """Cheap: is this name for this source? No loading, no network."""
        raise NotImplementedError

    def resolve(self, name: str) -> Path:
        """Return a local folder with config, weights and tokenizer (may convert and cache).
        Raise :class:`petune.errors.UserError` with what to do when it cannot."""
        raise NotImplementedError


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit packed weights at their real number."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit packs 2 per byte
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
