"""TOML recipe → validated Recipe. Nothing in a recipe is executed: it is data.

Every problem is reported with where it is (file:line and the dotted key) and what
was expected; all problems of a recipe are reported at once.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from petune.api import DataPath, Options
from petune.errors import RecipeError, UserError

SECTIONS = ("model", "task", "strategy", "train", "eval", "output", "distributed", "data")


class ModelSection(Options):
    name: str = Field(description="packaged model, Hub id, local folder or .gguf file")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("name")
    @classmethod
    def _relative_to_recipe(cls, name: str, info: ValidationInfo) -> str:
        """./ and ../ model paths resolve against the recipe's folder, like data paths."""
        base = (info.context or {}).get("base_dir")
        if base is not None and name.startswith(("./", "../")):
            return str((Path(base) / name).resolve())
        return name


class TrainSection(Options):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor"] = "adamw_torch"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    kernels: Literal["auto", "liger", "off"] = Field(
        "auto", description="fused Triton kernels for RMSNorm, RoPE and SwiGLU (Liger) on a CUDA GPU; auto: where "
                            "liger-kernel is installed and a GPU is used, else off; liger: refused without them")
    compile: bool = Field(False, description="torch.compile the model (inductor): faster steps after a slower start")
    activation_offloading: bool = Field(
        False, description="keep the activations saved for the backward pass (with gradient_checkpointing: the "
                           "layer inputs) in CPU memory instead of the GPU's; no effect on a CPU")
    seed: int = 42
    shuffle: bool = Field(True, description="shuffle the training examples (seeded by seed)")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1, description="write a checkpoint every N steps")
    save_total_limit: int = Field(2, ge=1, description="keep the last K checkpoints")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)


class EvalSection(Options):
    strategy: Literal["epoch", "steps", "no"] = "epoch"
    steps: int | None = Field(None, ge=1, description="evaluate every N steps when strategy = 'steps'")
    batch_size: int | None = Field(None, ge=1)
    metric: str | None = Field(None, description="metric that picks the best checkpoint (default: the task's)")
    early_stopping_patience: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _steps_needed(self):
        if self.strategy == "steps" and self.steps is None:
            raise ValueError("strategy = 'steps' needs eval.steps")
        if self.early_stopping_patience is not None and self.strategy == "no":
            raise ValueError("early_stopping_patience needs evaluation (eval.strategy = 'epoch' or 'steps')")
        return self


class OutputSection(Options):
    dir: str = Field(description="run folder, relative to the current directory")


class DataSection(Options):
    """How the task's data is prepared: the data cache (petune/datacache.py) and tokenization."""

    cache: bool = Field(True, description="keep the tokenized splits in the data cache and reuse them")
    cache_dir: str | None = Field(None, description="the data cache's folder (default: $PETUNE_DATA_CACHE, "
                                                    "else $XDG_CACHE_HOME/petune/data)")
    num_proc: int = Field(1, ge=1, description="processes that tokenize (tasks that tokenize in batches)")

    @field_validator("cache_dir")
    @classmethod
    def _a_folder_beside_the_recipe(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A relative folder resolves against the recipe's folder, like data paths; a file there
        is refused now rather than when the run prepares its data."""
        if value is None or value.strip().lower() in ("off", "0", "false", "no", "none"):
            return value
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder")
        return str(path)


class FsdpSection(Options):
    """Passed to the HF Trainer's FSDP integration (accelerate underneath)."""

    sharding_strategy: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = "full_shard"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    use_orig_params: bool = True  # needed when only some parameters train (LoRA, adapters)


class DeepSpeedSection(Options):
    """A DeepSpeed ZeRO configuration, or a full DeepSpeed JSON passed through as is."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    config_file: DataPath | None = Field(None, description="a complete DeepSpeed JSON config (other keys ignored)")


class DistributedSection(Options):
    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_processes: int | None = Field(None, ge=1, description="processes to start (petune run --num-processes wins)")
    fsdp: FsdpSection | None = None
    deepspeed: DeepSpeedSection | None = None

    @model_validator(mode="after")
    def _matching_tables(self):
        if self.fsdp is not None and self.backend != "fsdp":
            raise ValueError("[distributed.fsdp] needs backend = 'fsdp'")
        if self.deepspeed is not None and self.backend != "deepspeed":
            raise ValueError("[distributed.deepspeed] needs backend = 'deepspeed'")
        if self.backend == "fsdp" and self.fsdp is None:
            self.fsdp = FsdpSection()
        if self.backend == "deepspeed" and self.deepspeed is None:
            self.deepspeed = DeepSpeedSection()
        return self


_CORE = {"model": ModelSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection,
         "distributed": DistributedSection, "data": DataSection}


@dataclass
class Recipe:
    path: Path | None
    model: ModelSection
    task_name: str
    task: Options
    strategy_name: str
    strategy: Options
    train: TrainSection
    eval: EvalSection
    output: OutputSection
    distributed: DistributedSection = field(default_factory=DistributedSection)
    overrides: list[str] = field(default_factory=list)
    data: DataSection = field(default_factory=DataSection)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir)

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain TOML-able data."""
        def dump(model: Options) -> dict:
            return {k: v for k, v in model.model_dump(mode="json").items() if v is not None}

        return {
            "model": dump(self.model),
            "task": {"name": self.task_name, **dump(self.task)},
            "strategy": {"name": self.strategy_name, **dump(self.strategy)},
            "train": dump(self.train),
            "eval": dump(self.eval),
            "output": dump(self.output),
            "distributed": dump(self.distributed),
            "data": dump(self.data),
        }


# -- reading --------------------------------------------------------------------------------
def read_toml(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe file not found", where=str(path)) from None
    except IsADirectoryError:
        raise RecipeError("is a folder, expected a .toml recipe file", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start})", where=str(path), hint="save the recipe as UTF-8") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        line, column = (int(m.group(1)), int(m.group(2))) if m else (_repeated_key_line(text), None)
        where = f"{path}:{line}" + (f":{column}" if column else "") if line else str(path)
        lines = text.splitlines()
        shown = lines[line - 1].strip() if line and line <= len(lines) else ""
        detail = f" (line {line}" + (f", column {column})" if column else ")") if line else ""
        hint = next((h for start, h in _TOML_HINTS if msg.startswith(start)), None)
        raise RecipeError(f"invalid TOML{detail}: {msg}" + (f": {shown}" if shown else ""), where=where,
                          hint=hint) from None


_TOML_HINTS = [  # tomllib's message → what to do about it
    ("Invalid value", 'text needs quotes (name = "lora"), true and false are lowercase, numbers are plain (1e-4)'),
    ("Cannot overwrite a value", "a key is set twice in the same [section] (or a key and a [section] share a name): "
                                 "keep one"),
    ("Cannot declare", "a [section] appears twice: put its keys under one header"),
    ("Unterminated string", "a string is missing its closing quote"),
    ("Unclosed", "a [list] or {table} is missing its closing bracket"),
]


def _repeated_key_line(text: str) -> int | None:
    """The line of the first plain ``key =`` set a second time in its [section]: tomllib says
    "at end of document" for a repeated last key."""
    seen, section = set(), ""
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[+\s*([^\]]+?)\s*\]", line)
        key = re.match(r"\s*([A-Za-z0-9_.\-\"']+)\s*=", line)
        if header:
            section = header.group(1)
        elif key:
            if (section, key.group(1)) in seen:
                return number
            seen.add((section, key.group(1)))
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` → (["train", "learning_rate"], 1e-4). Values are typed
    like TOML values; anything that is not a TOML value is taken as a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+", key):
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. train.learning_rate=1e-4")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    if isinstance(parsed, str) and parsed and Path(parsed).expanduser().exists():
        parsed = str(Path(parsed).expanduser().resolve())  # paths given on the command line are relative to the cwd
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


# -- validating -----------------------------------------------------------------------------
def _line_of(text: str | None, section: str, key: str | None) -> int | None:
    """Best-effort line number of ``[section] key`` (or of the section header)."""
    if not text:
        return None
    current = None
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?", stripped)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return no
            continue
        if key is not None and current == section and re.match(rf'["\']?{re.escape(key)}["\']?\s*=', stripped):
            return no
    return None


_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "missing": "required key is missing",
}


class _Problems:
    def __init__(self, path: Path | None, text: str | None, overridden: set[str]):
        self.path, self.text, self.overridden, self.items = path, text, overridden, []
        self.fields: list[tuple[str, str]] = []  # (dotted key, message): for tools that show each beside its field

    def add(self, dotted: str, message: str) -> None:
        where = str(self.path) if self.path else "recipe"
        line = None
        if dotted not in self.overridden:
            table, _, key = dotted.rpartition(".")
            section, _, first = dotted.partition(".")
            line = (_line_of(self.text, table, key) if table else None) or \
                _line_of(self.text, section, first.split(".")[0] if first else None)
        if line:
            where += f":{line}"
        elif dotted in self.overridden:
            where += " (--set)"
        self.items.append(f"{where}: {dotted}: {message}")
        self.fields.append((dotted, message))

    def unknown(self, prefix: str, key: str, valid: list[str]) -> None:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        dotted = f"{prefix}.{key}" if prefix else key
        hint = f" — did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else f" (valid: {', '.join(valid)})"
        self.add(dotted, f"unknown key{hint}")

    def from_validation(self, prefix: str, schema: type[Options], exc: ValidationError) -> None:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            dotted = ".".join([prefix, *loc])
            if err["type"] == "extra_forbidden":
                inner = _schema_at(schema, loc[:-1])
                if inner is not None:
                    self.unknown(".".join([prefix, *loc[:-1]]), loc[-1], list(inner.model_fields))
                    continue
            msg = _EXPECTED.get(err["type"])
            if msg is None:
                msg = err["msg"]
                msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
                msg = msg[0].lower() + msg[1:] if msg else msg
            if err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
                msg += f", got {err['input']!r}"
            self.add(dotted, msg)

    def raise_if_any(self) -> None:
        if self.items:
            head = "recipe is not valid" if len(self.items) > 1 else self.items[0]
            body = "\n".join(f"  {line}" for line in self.items) if len(self.items) > 1 else ""
            error = RecipeError(head + ("\n" + body if body else ""))
            error.problems = list(self.fields)
            raise error


def _schema_at(schema: type[Options], path: list[str]) -> type[Options] | None:
    """The options schema of a nested table, e.g. DistributedSection → ["fsdp"] → FsdpSection."""
    import typing

    for key in path:
        field_info = schema.model_fields.get(key)
        if field_info is None:
            return None
        candidates = [a for a in (typing.get_args(field_info.annotation) or (field_info.annotation,))
                      if isinstance(a, type) and issubclass(a, Options)]
        if not candidates:
            return None
        schema = candidates[0]
    return schema


def _check_section(problems: _Problems, data: dict, section: str, schema: type[Options], context: dict) -> Options | None:
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        problems.from_validation(section, schema, exc)
        return None


def validate(data: dict, host, *, path: Path | None = None, text: str | None = None,
             overrides: list[str] = (), check_paths: bool = True) -> Recipe:
    """Check every section against its schema (plugins own [task] and [strategy])."""
    overridden = {o.partition("=")[0].strip() for o in overrides}
    problems = _Problems(path, text, overridden)
    # the host: plugin options that name other plugins (a task's rewards) validate theirs too
    context = {"base_dir": path.parent.resolve() if path else Path.cwd(), "check_paths": check_paths, "host": host}

    for key in data:
        if key not in SECTIONS:
            problems.unknown("", key, list(SECTIONS))
    sections = {}
    for name in SECTIONS:
        value = data.get(name, {})
        if not isinstance(value, dict):
            problems.add(name, f"expected a [{name}] table, got {value!r}")
            value = {}
        sections[name] = dict(value)
    if "output" not in data and path is not None:
        sections["output"].setdefault("dir", f"runs/{path.stem}")  # default run folder: runs/<recipe name>

    parsed: dict[str, Any] = {}
    for name, schema in _CORE.items():
        parsed[name] = _check_section(problems, sections[name], name, schema, context)

    plugins: dict[str, tuple[str | None, Options | None]] = {}
    for name, kind in (("task", "task"), ("strategy", "strategy")):
        options = sections[name]
        plugin_name = options.pop("name", None)
        if plugin_name is None:
            problems.add(f"{name}.name", f"missing: which {name} to use (see `petune plugins`)")
            plugins[name] = (None, None)
            continue
        if not isinstance(plugin_name, str):
            problems.add(f"{name}.name", f"expected a string, got {plugin_name!r}")
            plugins[name] = (None, None)
            continue
        try:
            cls = host.get(kind, plugin_name, f"{name}.name").cls
        except UserError as exc:  # unknown or clashing plugin name
            problems.add(f"{name}.name", exc.message + (f" — {exc.hint}" if exc.hint else ""))
            plugins[name] = (plugin_name, None)
            continue
        plugins[name] = (plugin_name, _check_section(problems, options, name, cls.Options, context))

    problems.raise_if_any()
    return Recipe(
        path=path, model=parsed["model"], task_name=plugins["task"][0], task=plugins["task"][1],
        strategy_name=plugins["strategy"][0], strategy=plugins["strategy"][1], train=parsed["train"],
        eval=parsed["eval"], output=parsed["output"], distributed=parsed["distributed"], overrides=list(overrides),
        data=parsed["data"],
    )


def load_recipe(path: str | Path, host, overrides: list[str] = (), *, check_paths: bool = True) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data, text = read_toml(path)
    apply_overrides(data, list(overrides))
    return validate(data, host, path=path, text=text, overrides=list(overrides), check_paths=check_paths)
