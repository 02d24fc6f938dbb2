"""What a plugin implements: a Strategy, a Task, a ModelSource or a Reward.

Each is a small class with a ``name``, an ``Options`` schema (a pydantic model whose
unknown keys are errors) and a handful of methods. The runner (``petune/runner.py``)
calls them in this order::

    path   = source.resolve(name)                    # ModelSource
    info   = ModelInfo.from_path(name, path)
    task.check(info, task_opts)                      # refuse a model the task cannot use
    strategy.check(task, info, strategy_opts)        # refuse impossible mixes, with a reason
    data   = task.load_data(task_opts, tokenizer)    # datasets + state (e.g. the label map); cached by
                                                     # petune.datacache, keyed by task.data_files(...)
    model  = task.build_model(info, task_opts, data.state, **strategy.load_kwargs(strategy_opts))
    model  = strategy.apply(model, task, strategy_opts)
    trainer = task.make_trainer(model=..., tokenizer=..., data=..., options=..., args=..., callbacks=...)
    trainer.train()
    # (strategy.prepare(model, task, strategy_opts, batches, total_steps) just before trainer.train())
    strategy.save(model, run_dir / strategy.artifact)
    metrics = task.evaluate(trainer, data, task_opts, run_dir)

and, on a finished run, ``strategy.restore(task.build_model(...), run_dir / strategy.artifact, ...)``.

The whole contract is in this module, each class in sections by phase (data, model,
training, finished runs, estimates); :func:`required` marks what a plugin must implement,
and registering one that does not is refused:

* **Task** — required: ``load_data``, ``build_model``, ``make_trainer``, ``evaluate`` (and
  ``name``, ``Options``, ``peft_task_type``); optional, with a default: ``data_files``,
  ``load_eval_data``, ``held_out_data``, ``with_test_file``, ``check``, ``head_modules``,
  ``peft_task_type_for``, ``model_state``, ``training_plan``, ``primary_metric_for``,
  ``verification_texts``, ``stop_tokens``, ``word_spans``, ``model_shape``,
  ``sequence_length``, ``sequences_per_example``, ``frozen_reference``, ``loss_memory``,
  ``prepare_skeleton``, ``progress_metrics``, ``generation_cache``;
* **Strategy** — required: ``apply``, ``restore``; optional: ``check``, ``check_recipe``,
  ``load_kwargs``, ``resolved_options``, ``prepare``, ``make_optimizer``, ``trainer_callbacks``, ``training_plan``,
  ``save``, ``for_inference``, ``dequantize``, ``merge``, ``base_is_gguf_file``, ``skeleton_options``;
* **ModelSource** — required: ``claims``, ``resolve``; optional: ``names``, ``gguf_file``;
* **Reward** — required: ``score``; optional: ``fields``, ``prepare``; scores completions for a
  task that learns from rewards (``grpo``), which names its rewards and their weights in the
  recipe (``[[task.rewards]] name = ..., weight = ...``, the rest of the table being the reward's
  ``Options``);
* **optional capabilities** a task declares by implementing a protocol, each unlocking
  commands: :class:`Predicts` (``petune predict``, the server's ``/v1/predict``) and
  :class:`Generates` (``petune generate``, ``chat``, the server's chat and completions),
  :class:`Explains` (``petune explain``).
  A command that needs one the task lacks refuses with exit 2 (:func:`require`).
* **loading a base**: a task builds its model with :func:`load_pretrained` (``from_pretrained``
  for any folder a source gives, including one whose weights stay in a GGUF file; a
  strategy's ``load_kwargs`` may address that file's loader, e.g. to keep its blocks).
* **read while preparing data** (set by the core around ``load_data`` / ``held_out_data``):
  :func:`data_workers` (processes to tokenize with) and :func:`data_scratch` (where to write
  scratch files).

The hooks that register plugins and follow a run are in :mod:`petune.hookspecs`.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, TypeAdapter, ValidationError, ValidationInfo

from petune.errors import Refusal, UserError

if TYPE_CHECKING:  # heavy imports stay out of start-up
    from collections.abc import Iterator

    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer


class Options(BaseModel):
    """Base of every options schema: unknown keys are errors, types are not coerced
    (``epochs = "3"`` is refused, not read as 3), defaults are validated too."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# Architectures whose name says "decoder-only language model".
_CAUSAL_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


@dataclass
class ModelInfo:
    """What is known about a model before its weights load (from its config)."""

    name: str
    path: Path
    config: PretrainedConfig

    @classmethod
    def from_path(cls, name: str, path: Path) -> ModelInfo:
        from transformers import AutoConfig

        return cls(name=name, path=Path(path), config=AutoConfig.from_pretrained(path, trust_remote_code=False))

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def text_config(self) -> PretrainedConfig:
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


@dataclass(frozen=True)
class ModelShape:
    """How a task's model looks to the memory estimate (:mod:`petune.memory`), beyond its
    config: which transformers class it is, which labels a training batch carries, and
    whether the loss is a language model's (logits over the vocabulary at every position)."""

    #: the transformers auto class ``build_model`` loads, e.g. "AutoModelForCausalLM"
    auto_class: str = "AutoModel"
    #: a training batch's labels: "tokens" (one per position), "class" (one per row),
    #: "span" (start and end positions per row), or None
    labels: str | None = None
    #: the loss is a causal language model's, over full-vocabulary logits
    causal_lm_loss: bool = False


@dataclass
class TaskData:
    """A task's prepared data: tokenized splits plus the state needed to rebuild its
    model later without the data (e.g. ``{"labels": [...]}``), saved as task_state.json.
    Splits that are ``datasets.Dataset`` objects, with JSON-able state and notes, are kept in
    the data cache (:mod:`petune.datacache`) and come back memory-mapped; other data is
    prepared again on every run."""

    train: Any
    validation: Any = None
    test: Any = None
    state: dict = field(default_factory=dict)
    #: counts worth telling the user (e.g. {"truncated": 3, "dropped": 1}); shown in the plan.
    notes: dict = field(default_factory=dict)


def required(method):
    """Marks a method every plugin of the class must implement: registering a plugin that
    does not is refused, naming it and the method (petune.plugins), instead of failing mid-run."""
    method.__petune_required__ = True
    return method


def missing_methods(cls: type) -> list[str]:
    """The :func:`required` methods ``cls`` inherits without implementing them."""
    return sorted(name for base in cls.__mro__[1:] for name, value in vars(base).items()
                  if getattr(value, "__petune_required__", False) and getattr(cls, name) is value)


class _Plugin:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options


#: Fixed inputs for :meth:`Task.verification_texts`: a sentence, a question, a list and an
#: instruction, so the compared positions cover several kinds of next token.
VERIFICATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is",
    "John Smith works for Acme Corporation in London and visited Paris in June.",
    "Write a short poem about the sea:",
)


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

    # -- data: read and tokenize (a run's first step; petune eval's held-out data) -------------
    @required
    def load_data(self, options: Options, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """Read and tokenize the data. May adapt the tokenizer (pad token, chat template);
        the runner saves the tokenizer after this call."""
        raise NotImplementedError

    def data_files(self, options: Options) -> list[Path]:
        """The files and folders ``load_data`` reads: their contents key the data cache
        (:mod:`petune.datacache`), which stores what ``load_data`` returns — its splits, state,
        notes and the tokenizer as it left it — and hands it back while these files, the
        options, the tokenizer and the task's code are unchanged. Default: every Path among
        the options. A task that reads other files too names them here."""
        return paths_in(options)

    def load_eval_data(self, options: Options, tokenizer: PreTrainedTokenizerBase, state: dict) -> TaskData:
        """Read and tokenize only the held-out files (``validation`` where it is a file, and
        ``test``) for ``petune eval``, with the finished run's ``state``: a trained run must stay
        scorable after its training file moves. This default re-reads everything."""
        return self.load_data(options, tokenizer)

    def held_out_data(self, options: Options, tokenizer: PreTrainedTokenizerBase, state: dict) -> TaskData:
        """What ``petune eval`` scores. The default follows the split options' convention
        (``validation``, ``test``): validation rows that were split off the training file need
        that file; where it cannot be read any more, the test file alone is scored
        (``notes[HELD_OUT_NOTE]`` says so)."""
        if getattr(options, "validation", None) is not None:
            return self.load_eval_data(options, tokenizer, state)
        try:
            return self.load_data(options, tokenizer)
        except UserError as exc:
            data = self.load_eval_data(options, tokenizer, state)
            if data.test is None:
                raise
            why = f"{exc.where}: {exc.message}" if exc.where else exc.message
            data.notes[HELD_OUT_NOTE] = (f"the validation rows were split off the training data, which cannot "
                                         f"be read now ({why}); scoring the test data only")
            return data

    def with_test_file(self, options: Options, path: Path) -> Options:
        """``options`` with ``path`` as the test data (``petune eval --data``). The default
        replaces a ``test`` option; a task without one refuses."""
        if "test" not in type(options).model_fields:
            raise UserError(f"task {self.name!r} has no 'test' data option to replace", where="--data")
        field = type(options).model_fields["test"]
        # validated as the recipe's value is: a task whose files are tables gets a table, never a bare
        # path where the options promise one (the data cache dumps them into its key)
        try:
            kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
            value = TypeAdapter(kind).validate_python(path)
        except ValidationError as exc:
            raise UserError(f"cannot be this task's test data: {exc.errors()[0]['msg']}", where=str(path)) from None
        return options.model_copy(update={"test": value})

    # -- model: refuse, build, say which modules train -----------------------------------------
    def check(self, model_info: ModelInfo, options: Options) -> None:
        """Raise :class:`petune.errors.Refusal` if this model cannot do this task."""

    @required
    def build_model(self, model_info: ModelInfo, options: Options, state: dict, **load_kwargs) -> PreTrainedModel:
        """Load the base model with this task's head (``load_kwargs`` come from the strategy),
        through :func:`load_pretrained` so every source's folders load."""
        raise NotImplementedError

    def head_modules(self, model: PreTrainedModel) -> list[str]:
        """Names of modules that must stay trainable and be saved with an adapter
        (peft ``modules_to_save``), e.g. ``["classifier"]``. Empty for LM tasks."""
        return []

    def peft_task_type_for(self, config: PretrainedConfig | None) -> str:
        """peft's task type for a model with this ``config`` (None: not known yet). The
        default is the class's ``peft_task_type``; a task whose model kind depends on the
        base (seq2seq: encoder-decoder or causal LM) decides here, without storing it."""
        return self.peft_task_type

    def model_state(self, state: dict) -> dict:
        """The part of ``task_state.json`` that shapes the model (e.g. the label set): runs
        whose model states match share one loaded base in ``petune serve``. Default: all of
        it (the safe side: no sharing)."""
        return state

    # -- training ------------------------------------------------------------------------------
    @required
    def make_trainer(self, *, model, tokenizer, data: TaskData, options: Options, args: dict, callbacks: list) -> Trainer:
        """Return a ready ``transformers.Trainer`` (or TRL trainer). ``args`` are keyword
        arguments for ``TrainingArguments`` (or ``trl.SFTConfig``) built from the recipe's
        [train]/[eval] sections; add task-specific ones (metric_for_best_model, ...)."""
        raise NotImplementedError

    def training_plan(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: Options) -> dict[str, str]:
        """Rows for the plan about how this task will train this (built) model, decided on the
        model as ``make_trainer`` decides it, e.g. ``{"batching": "padding-free: ..."}`` or why
        padded batches were chosen instead. Default: none."""
        return {}

    def progress_metrics(self, options: Options) -> dict[str, str]:
        """Logged values the progress bar shows beside the loss, ``{log key: label}``, e.g.
        ``{"reward": "reward", "reward_std": "±"}``. Default: none (loss, throughput, memory)."""
        return {}

    def primary_metric_for(self, options: Options) -> str:
        """The metric reported as "best" (and early stopping's, unless [eval] metric says)
        for these options. Default: the class's ``primary_metric``."""
        return self.primary_metric

    # -- finished runs: evaluate, merge, export ------------------------------------------------
    @required
    def evaluate(self, trainer: Trainer, data: TaskData, options: Options, run_dir: Path) -> dict[str, dict]:
        """Final metrics per split (``{"validation": {...}, "test": {...}}``); write the
        task's reports into ``run_dir`` with :mod:`petune.artifacts`."""
        raise NotImplementedError

    def verification_texts(self, options: Options, state: dict) -> list[str]:
        """A few short inputs, as plain text, that ``petune merge`` runs through the model
        before and after merging to check the merged folder computes the same outputs. The
        default, :data:`VERIFICATION_TEXTS`, works for any head (every output whose name ends
        in ``logits`` is compared); a task may return a few of its held-out rows instead,
        where reading them is cheap."""
        return list(VERIFICATION_TEXTS)

    def stop_tokens(self, state: dict) -> list[str]:
        """Tokens that end an answer besides EOS (e.g. ``<end_of_turn>``), which exports write
        as stop tokens (a GGUF's end-of-turn id, an Ollama Modelfile's ``stop``). Default: the
        ``stop_tokens`` list in the run's state, if the task saved one."""
        tokens = state.get("stop_tokens") or []
        return [t for t in tokens if isinstance(t, str)]

    def word_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the words the task labels in plain ``text``, for
        ``petune explain`` on "token_labels" tasks (see :class:`Explains`). Default: none."""
        return []

    # -- estimates: memory before anything loads -----------------------------------------------
    def model_shape(self, config: PretrainedConfig) -> ModelShape | None:
        """What the memory estimate needs to build this task's model without weights. None
        (the default): the bare base model is estimated, without head or labels, and the plan
        says so."""
        return None

    def sequence_length(self, options: Options) -> int | None:
        """The longest training sequence, in tokens, that ``options`` allow (for memory
        estimates). None: the estimate assumes 128 tokens and says so in the plan."""
        return None

    def sequences_per_example(self, options: Options) -> int:
        """How many sequences one training example feeds the model (preference pairs: the
        chosen and the rejected answer), for memory estimates. Default: 1."""
        return 1

    def frozen_reference(self, options: Options, strategy: Strategy) -> bool:
        """Whether this task's trainer keeps a frozen copy of the model's weights beside it
        (e.g. DPO's reference model when every weight trains), for memory estimates."""
        return False

    def loss_memory(self, options: Options, batch_size: int, config: PretrainedConfig, device: str | None = None) -> str:
        """How this task's trainer computes the loss, for memory estimates: ``"chunked"``
        when full-vocabulary logits are never held at once (e.g. a fused LM-head loss),
        else ``"logits"``."""
        return "logits"

    def generation_cache(self, options: Options, batch_size: int) -> tuple[int, int] | None:
        """(sequences, tokens per sequence) this task's trainer generates at once while training,
        for the memory estimate's key/value cache (e.g. GRPO: a batch of prompts times
        ``num_generations``, each prompt plus completion long). None (the default): no generation."""
        return None

    def prepare_skeleton(self, model: torch.nn.Module, quantized: bool) -> None:
        """Mirror on a meta-device model what this task's trainer changes before training
        (e.g. casting the trainable weights of a 4-bit model to bf16), so memory estimates
        count it. Default: the trainer changes nothing."""


@runtime_checkable
class Predicts(Protocol):
    """A task that labels plain inputs: unlocks ``petune predict`` and ``/v1/predict``."""

    def parse_inputs(self, options: Options, text: str, source: str) -> list:
        """Rows from the text of an input file or stdin (``source`` names it in errors)."""

    def predict(self, model, tokenizer, options: Options, state: dict, rows: list) -> list[dict]:
        """One JSON-able prediction per row."""

    def format_predictions(self, rows: list, predictions: list[dict]) -> str:
        """Predictions as the text ``petune predict`` prints."""


@runtime_checkable
class Generates(Protocol):
    """A task whose model writes text: unlocks ``petune generate``, ``chat`` and the
    server's chat and completion endpoints."""

    def generate(self, model, tokenizer, options: Options, state: dict, messages: list[dict], **kwargs) -> str:
        """The reply to ``messages`` (chat format); ``kwargs`` are generation settings
        (``max_new_tokens``, ``temperature``, ``top_p``, ``stop`` ...)."""


@runtime_checkable
class Explains(Protocol):
    """A task whose model ``petune explain`` can attribute: unlocks ``petune explain``."""

    #: what the model outputs: "label" (one per input), "token_labels" (one per word, placed
    #: by ``Task.word_spans``) or "next_token" (a language model)
    explained_output: str


def require(task: Task, capability: type, where: str | None = None) -> Task:
    """``task`` if it implements ``capability`` (a protocol above), else a UserError saying so."""
    if not isinstance(task, capability):
        verbs = {Predicts: "predict", Generates: "generate text", Explains: "be explained"}
        raise UserError(f"task {task.name!r} cannot {verbs.get(capability, 'do this')} "
                        f"(it does not implement {capability.__name__})", where=where,
                        hint=f"see petune/api.py: {capability.__name__}")
    return task


class Strategy(_Plugin):
    """Decides which parameters train and how the result is saved."""

    #: folder of the run that holds the trained weights: "adapter" or "model".
    artifact: ClassVar[str] = "adapter"

    # -- model: refuse, load, make trainable ---------------------------------------------------
    def check(self, task: Task, model_info: ModelInfo | None, options: Options) -> None:
        """Raise :class:`petune.errors.Refusal` for mixes that cannot work. ``model_info``
        is None when only the recipe is being validated (nothing loaded)."""

    def check_recipe(self, recipe) -> None:
        """Refuse settings elsewhere in the recipe this strategy cannot work with (e.g.
        [train] gradient checkpointing, [distributed] backend), before anything loads."""

    def load_kwargs(self, options: Options) -> dict:
        """Extra ``from_pretrained`` keyword arguments (e.g. ``quantization_config``)."""
        return {}

    @required
    def apply(self, model: PreTrainedModel, task: Task, options: Options) -> torch.nn.Module:
        """Return the model ready to train (frozen / wrapped as the strategy wants)."""
        raise NotImplementedError

    def resolved_options(self, options: Options) -> dict[str, str]:
        """What options left to be chosen on this machine (``"auto"``) resolve to, and why,
        shown in the plan in place of their setting: ``{"compute_dtype": "float32 (auto: CPU
        without native bf16)"}`` — or that a setting does nothing with the others
        (``{"double_quant": "n/a (gguf)"}``). Default: none."""
        return {}

    # -- training ------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, task: Task, options: Options, batches: Iterator[dict],
                total_steps: int | None) -> None:
        """Last changes to the model :meth:`apply` returned, in place, once the run's trainer
        exists and before its optimizer does: e.g. an initialisation computed from activations.
        ``batches`` is a lazy iterator over the task's own training batches, collated as the
        trainer feeds them and on the model's device (one epoch at most; nothing is read until
        it is advanced: take only what you need, e.g. ``itertools.islice(batches, 8)``).
        ``total_steps`` is the number of optimizer steps the run will take (``max_steps``, or
        epochs × steps per epoch), None when the trainer cannot tell. Called on every run,
        resumed ones included (before the checkpoint's weights are loaded). Default: nothing."""

    def make_optimizer(self, model: torch.nn.Module, options: Options, optimizer_cls: type,
                       optimizer_kwargs: dict) -> torch.optim.Optimizer | None:
        """An optimizer of the recipe's class and settings (``optimizer_kwargs``: ``lr``,
        ``weight_decay``, betas ...) with this strategy's own parameter groups, e.g. LoRA+'s
        higher learning rate for LoRA's B matrices. None (the default): the trainer's own."""
        return None

    def trainer_callbacks(self, options: Options) -> list:
        """``transformers.TrainerCallback`` objects this strategy needs while training (e.g.
        AdaLoRA's rank reallocation after every optimizer step). Default: none."""
        return []

    def training_plan(self, options: Options) -> dict[str, str]:
        """Rows for the plan about what these settings cost beyond training itself (e.g. an
        SVD of every target weight, a pass over training batches before step 1). Default: none."""
        return {}

    # -- finished runs: save, restore, use, merge ----------------------------------------------
    def save(self, model: torch.nn.Module, path: Path) -> None:
        """Write the trained weights to ``path`` in a format other tools load."""
        model.save_pretrained(path)

    @required
    def restore(self, base: PreTrainedModel, path: Path, task: Task, options: Options) -> torch.nn.Module:
        """Put the weights saved by :meth:`save` onto a freshly built base model."""
        raise NotImplementedError

    def for_inference(self, model: torch.nn.Module, options: Options) -> torch.nn.Module:
        """The trained or restored model made fast to run forward only on its device while
        computing what it computed in training (e.g. 4-bit weights dequantised once on a CPU
        instead of at every generated token). May change ``model`` in place; nothing trains
        it afterwards. Called once training is saved, and on every finished run a command
        loads. Default: ``model`` unchanged."""
        return model

    def dequantize(self, base: PreTrainedModel, options: Options) -> PreTrainedModel:
        """The base as loaded with :meth:`load_kwargs`, turned into plain 16/32-bit weights
        that compute what it computed (for merging and export: the trained weights are
        folded into the very base they were trained against). Default: ``base`` unchanged."""
        return base

    def merge(self, model: torch.nn.Module) -> PreTrainedModel:
        """Return a plain transformers model with the trained weights folded in."""
        raise Refusal(f"strategy {self.name!r} has nothing to merge")

    def base_is_gguf_file(self, options: Options) -> bool:
        """True when the frozen base computed exactly what the model's GGUF file computes (its
        own quantisation kept): exports then ship the adapter beside that file (``petune export
        --format ollama``: ``FROM`` the file, ``ADAPTER`` the run's) instead of a merged copy.
        Default: False."""
        return False

    # -- estimates -----------------------------------------------------------------------------
    def skeleton_options(self, options: Options) -> Options:
        """The options to apply on a meta-device skeleton (no real weights) for memory
        estimates: an initialisation that reads real weights must be swapped for one with
        the same parameters. Default: ``options`` unchanged."""
        return options


class ModelSource(_Plugin):
    """Turns a recipe's ``[model] name`` into a local folder in transformers format."""

    #: sources are asked in ascending priority; the first that claims a name resolves it.
    priority: ClassVar[int] = 100

    # -- resolving a name ----------------------------------------------------------------------
    @required
    def claims(self, name: str) -> bool:
        """Cheap: is this name for this source? No loading, no network."""
        raise NotImplementedError

    @required
    def resolve(self, name: str) -> Path:
        """Return a local folder with config and tokenizer (may convert and cache), and the
        weights — or a loader for folders whose weights stay elsewhere, registered with
        :func:`register_weights_loader` (a GGUF file's own blocks); tasks load bases with
        :func:`load_pretrained`, which asks it. Raise :class:`petune.errors.UserError` with
        what to do when it cannot."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Fixed names this source offers (e.g. packaged models), for listings."""
        return []

    def gguf_file(self, name: str, workdir: Path) -> Path | None:
        """The GGUF file the model ``name`` comes from, for exports that reuse its
        tokenizer metadata (``petune export --format gguf``); a source that has to assemble
        it writes it into ``workdir`` (deleted afterwards). Default: None, not from a GGUF."""
        return None


class Reward(_Plugin):
    """Scores completions for a task that learns from rewards (``grpo``). One instance serves one
    run (or one ``petune eval``): :meth:`prepare` may load what :meth:`score` needs onto it.
    Its ``Options`` are the rest of the recipe's ``[[task.rewards]]`` table (after ``name`` and
    ``weight``). An exception in a third-party reward is reported naming its package (exit 2)."""

    # -- data ----------------------------------------------------------------------------------
    def fields(self, options: Options) -> list[str]:
        """The data fields besides the prompt that :meth:`score` reads (e.g. ``["answer"]``):
        training data whose rows lack one is refused before the model loads, naming the reward,
        the field and the file. Default: none."""
        return []

    # -- a run ---------------------------------------------------------------------------------
    def prepare(self, options: Options, device: torch.device) -> None:
        """Load what scoring needs (e.g. a reward model) once, onto ``device``. Default: nothing."""

    @required
    def score(self, prompts: list[list[dict]], completions: list[str], fields: dict[str, list],
              options: Options) -> list[float | None]:
        """One reward per completion: ``prompts[i]`` (the conversation as role/content messages)
        was answered with ``completions[i]`` (plain text); ``fields[name][i]`` is that row's value
        of each other data field. None where the reward does not apply to a completion (it then
        counts for neither mean nor spread)."""
        raise NotImplementedError


# == helpers for plugins (not part of the contract) ==========================================
#: the note ``Task.held_out_data`` leaves when it could not score everything
HELD_OUT_NOTE = "held_out"


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


def paths_in(value) -> list[Path]:
    """Every Path inside plugin options, however nested (files with their own options, lists)."""
    if isinstance(value, Path):
        return [value]
    if isinstance(value, BaseModel):
        value = vars(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in paths_in(v)]
    return []


#: processes a task may tokenize with: the recipe's ``[data] num_proc``, set by the core around
#: ``load_data`` and ``held_out_data`` (read it with :func:`data_workers`)
DATA_WORKERS: ContextVar[int] = ContextVar("petune_data_workers", default=1)


def data_workers() -> int:
    """How many processes this task may tokenize with (the recipe's ``[data] num_proc``)."""
    return DATA_WORKERS.get()


#: where a task may write scratch files while it prepares data: set by the core to a folder
#: inside the data cache (on the same disk, so a finished file moves into its entry by a rename,
#: and never in a RAM-backed /tmp); None: the system's temporary folder
DATA_SCRATCH: ContextVar[Path | None] = ContextVar("petune_data_scratch", default=None)


def data_scratch() -> Path | None:
    """The folder for scratch files of data preparation (:data:`DATA_SCRATCH`), or None."""
    return DATA_SCRATCH.get()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit packed weights at their real number."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit packs 2 per byte
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def model_device(model) -> torch.device:
    """The device a model's inputs go to: its ``device`` (transformers and peft models have
    one), else its first parameter's, else the CPU."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def seeded(seed: int | None, device):
    """Seed sampling for the block without touching the caller's random state (None: unseeded)."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def contiguous_head_input(model) -> None:
    """Give the output layer its input as plain 2-D rows. When generating, transformers hands
    it a strided 3-D slice (each row's last position), and torch's bf16 linear on a CPU then
    takes a batched-matmul path that copies the whole weight first: 1.4-2.3 s per answer for
    Gemma's 262k-row head (benchmarks/RESULTS.md), more than the rest of a 32-token answer."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None or getattr(head, "_petune_row_input", False):
        return
    layer_forward = head.forward

    def forward(x, *args, **kwargs):
        out = layer_forward(x.reshape(-1, x.shape[-1]).contiguous(), *args, **kwargs)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    head.forward = forward
    head._petune_row_input = True


#: loaders for model folders whose weights a source keeps elsewhere (see :func:`load_pretrained`)
_WEIGHTS_LOADERS: list = []


def register_weights_loader(loader) -> None:
    """Register ``loader(auto_class, folder, kwargs) -> model | None``: it builds the model of a
    folder whose weights its source keeps outside it (e.g. in a GGUF file, read as stored) and
    returns None for every other folder. Sources register one when their module is imported."""
    if loader not in _WEIGHTS_LOADERS:
        _WEIGHTS_LOADERS.append(loader)


def load_pretrained(auto_class, path: Path, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` for any folder a model source gives: tasks
    build their base with it. Keys a strategy's ``load_kwargs`` addresses to a weights loader
    (``petune_...``) reach only that loader."""
    for loader in _WEIGHTS_LOADERS:
        model = loader(auto_class, Path(path), kwargs)
        if model is not None:
            return model
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("petune_")}
    return auto_class.from_pretrained(path, **kwargs)
