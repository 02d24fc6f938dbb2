"""The runs a server holds: one base model per group of runs that share it, each run's peft
adapter loaded into that base under its own name.

Runs share a base when they name the same ``[model]`` (and dtype), the same task with the
same model-shaping task state (labels, added tokens ...), the same strategy load kwargs
(e.g. the same 4-bit config) and saved peft adapters of one peft type. The first run of a
group loads as ``petune generate`` loads it (:func:`petune.run_folders.load_run`); the others
only add their adapter (peft ``load_adapter``). Runs that are not peft adapters (full
fine-tuning, bottleneck adapters) load on their own.

All use of a base — activating a run's adapter, then generating or predicting — happens
under that base's lock, so requests to different runs of one base take turns and the
adapter one request chose is never the one another request runs with. A request whose
``cancel`` event is set (its client left, or its time ran out) stops waiting for the lock,
and a generation stops at its next token.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from petune.api import Generates, ModelInfo, Predicts, require, seeded
from petune.errors import UserError

#: line breaks as str.splitlines() sees them: each becomes a space in /v1/predict inputs
#: (one input is one line for the task's parser; offsets stay the same)
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\t]")


# -- what was asked for ---------------------------------------------------------------------
def parse_run_args(values: list[str]) -> list[tuple[str, Path]]:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` → (name, folder); the name defaults to the folder's name."""
    runs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or "/" in name or Path(value).exists():
            name, path = "", value
        folder = Path(path).expanduser()
        name = name or folder.resolve().name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
            raise UserError(f"run name {name!r} may hold only letters, digits and . _ : -", where=value,
                            hint="name it explicitly: NAME=RUN_DIR")
        if any(n == name for n, _ in runs):
            raise UserError(f"two runs are named {name!r}", where=value,
                            hint="name them apart: petune serve a=runs/x/run b=runs/y/run")
        runs.append((name, folder))
    return runs


class Cancelled(Exception):
    """The request was cancelled while it waited for its base (nobody waits for its answer)."""


class PromptTooLong(UserError):
    """The prompt has more tokens than the server's ``--max-prompt-tokens``."""

    code = "prompt_too_long"


# -- what is loaded -------------------------------------------------------------------------
@dataclass
class Base:
    """One loaded model and the runs that use it (several adapters, or one run)."""

    index: int
    key: tuple | None  # None: a run that shares nothing
    model_name: str
    model: object = None
    runs: list[ServedRun] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0

    @property
    def shared(self) -> bool:
        return self.key is not None


@dataclass
class ServedRun:
    name: str
    dir: Path
    recipe: object
    task: object
    strategy: object
    state: dict
    tokenizer: object = None
    base: Base | None = None
    adapter: str | None = None  # the peft adapter's name inside the base
    created: int = 0

    @property
    def kind(self) -> str:
        """"chat" for runs that generate text, "predict" for the others (classification, NER ...)."""
        return "chat" if isinstance(self.task, Generates) else "predict"

    @property
    def causal(self) -> bool:
        """Plain-text completions need a task that generates and a decoder-only model."""
        config = getattr(self.base.model if self.base else None, "config", None)
        return (isinstance(self.task, Generates) and config is not None
                and ModelInfo(self.name, self.dir, config).is_decoder_only)

    def describe(self) -> dict:
        """Listing entry (OpenAI's model object plus petune's fields)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "petune",
                "task": self.task.name, "kind": self.kind, "strategy": self.strategy.name,
                "base_model": self.recipe.model.name, "base": self.base.index if self.base else None,
                "shared_base": bool(self.base and self.base.shared and len(self.base.runs) > 1),
                "completions": self.kind == "chat" and self.causal}

    def details(self) -> dict:
        """What the playground shows: the recipe, final metrics and the loss curve."""
        from petune import artifacts

        def read(name, default):
            path = self.dir / name
            try:
                return artifacts.read_json(path) if path.exists() else default
            except (OSError, ValueError):
                return default

        history = [{k: row[k] for k in ("step", "loss", "eval_loss", "epoch") if k in row}
                   for row in read("log_history.json", []) if "loss" in row or "eval_loss" in row]
        manifest = read("manifest.json", {})
        return {**self.describe(), "dir": str(self.dir), "metrics": read("metrics.json", {}),
                "loss_history": history, "labels": self.state.get("labels"),
                "recipe": self.recipe.resolved() if hasattr(self.recipe, "resolved") else {},
                "trainable_parameters": manifest.get("trainable_parameters"),
                "total_parameters": manifest.get("total_parameters"), "status": manifest.get("status")}


def _canonical(value) -> str:
    """A stable text for load kwargs (configs with ``to_dict``, dtypes, devices ...)."""
    def convert(v):
        if hasattr(v, "to_dict"):
            return convert(v.to_dict())
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return repr(v)

    return json.dumps(convert(value), sort_keys=True)


def model_state(task, state: dict) -> dict:
    """The part of a run's task state that shapes its model (``Task.model_state``)."""
    return task.model_state(state)


def share_key(run: ServedRun, quantized: bool = True) -> tuple | None:
    """Runs with equal keys can share one base; None for runs that are no peft adapter."""
    config_path = run.dir / run.strategy.artifact / "adapter_config.json"
    if run.strategy.artifact != "adapter" or not config_path.exists():
        return None
    try:
        peft_type = json.loads(config_path.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError):
        return None
    load_kwargs = run.strategy.load_kwargs(run.recipe.strategy) if quantized else {}
    return (run.recipe.model.name, run.recipe.model.dtype, run.task.name, peft_type, _canonical(load_kwargs),
            _canonical(model_state(run.task, run.state)))


def plan(runs: list[ServedRun], quantized: bool = True) -> list[Base]:
    """Group runs into bases (first run of a group first), without loading anything."""
    bases: list[Base] = []
    by_key: dict[tuple, Base] = {}
    for run in runs:
        key = share_key(run, quantized)
        base = by_key.get(key) if key is not None else None
        if base is None:
            base = Base(index=len(bases), key=key, model_name=run.recipe.model.name)
            bases.append(base)
            if key is not None:
                by_key[key] = base
        base.runs.append(run)
        run.base = base
    return bases


class Registry:
    """The served runs by name, their bases, and the calls that use them."""

    def __init__(self, specs: list[tuple[str, Path]], host, *, quantized: bool = True):
        """``quantized=False`` loads the bases of 4-bit (QLoRA) runs in 16/32-bit, as
        ``petune merge`` does: faster on CPUs, more memory, slightly different answers."""
        from petune.run_folders import read_finished_run

        self.host, self.quantized = host, quantized
        self.runs: dict[str, ServedRun] = {}
        for name, folder in specs:
            recipe, task, strategy, state = read_finished_run(folder, host)
            run = ServedRun(name, folder, recipe, task, strategy, state)
            if not isinstance(task, Generates):  # a run is served for chat, or else for predictions
                require(task, Predicts, where=str(folder))
            run.created = int((folder / "recipe.toml").stat().st_mtime)
            self.runs[name] = run
        self.bases = plan(list(self.runs.values()), quantized)
        self.ready = False
        self.error: str | None = None

    # -- loading ----------------------------------------------------------------------------
    def load(self, log: Callable[[str], None] = lambda _: None) -> None:
        from transformers import AutoTokenizer

        from petune.run_folders import load_run

        for base in self.bases:  # a run split off below is appended, and loaded in its turn
            first, *others = base.runs
            started = time.perf_counter()
            loaded = load_run(first.dir, self.host, quantized=self.quantized)
            base.model, first.tokenizer = loaded.model, loaded.tokenizer
            configs = getattr(base.model, "peft_config", None)
            if base.shared and not (isinstance(configs, dict) and configs and hasattr(base.model, "load_adapter")):
                base.key = None  # the strategy restored something else than a peft model: serve the run alone
            if base.shared:
                first.adapter = getattr(base.model, "active_adapter", None) or next(iter(configs))
            for run in others:
                if not base.shared:  # cannot add to it: this run gets a base of its own
                    alone = Base(index=len(self.bases), key=None, model_name=run.recipe.model.name, runs=[run])
                    base.runs.remove(run)
                    run.base = alone
                    self.bases.append(alone)
                    continue
                run.adapter = run.name if run.name not in base.model.peft_config else f"{run.name}#{len(configs)}"
                base.model.load_adapter(str(run.dir / run.strategy.artifact), adapter_name=run.adapter)
                run.tokenizer = AutoTokenizer.from_pretrained(run.dir / "tokenizer")
            base.model.eval()
            names = ", ".join(r.name for r in base.runs)
            log(f"loaded {base.model_name} with {len(base.runs)} run(s): {names} ({time.perf_counter() - started:.1f}s)")
        self.ready = True

    # -- using a run ------------------------------------------------------------------------
    @contextmanager
    def use(self, run: ServedRun, cancel: threading.Event | None = None):
        """The run's model with its adapter active, held for this caller alone. Waiting for it
        ends with :class:`Cancelled` once ``cancel`` is set."""
        base = run.base
        with _counted(base):
            while not base.lock.acquire(timeout=0.1):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
            try:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if run.adapter is not None:
                    base.model.set_adapter(run.adapter, inference_mode=True)
                yield base.model
            finally:
                base.lock.release()

    def memory(self) -> dict:
        """Bytes of parameters per base (shared tensors counted once) and of each adapter,
        and the process's resident memory."""
        import psutil

        bases = []
        for base in self.bases:
            if base.model is None:
                continue
            total, adapters, seen = 0, {r.name: 0 for r in base.runs if r.adapter}, set()
            for name, p in base.model.named_parameters(remove_duplicate=False):
                if p.data_ptr() in seen:
                    continue
                seen.add(p.data_ptr())
                size = p.numel() * p.element_size()
                total += size
                for run in base.runs:
                    if run.adapter and f".{run.adapter}." in f".{name}.":
                        adapters[run.name] += size
            bases.append({"base": base.index, "model": base.model_name, "runs": [r.name for r in base.runs],
                          "parameter_bytes": total, "adapter_bytes": adapters,
                          "base_bytes": total - sum(adapters.values())})
        return {"rss_bytes": psutil.Process().memory_info().rss, "bases": bases}

    # -- the work ---------------------------------------------------------------------------
    def chat(self, run: ServedRun, messages: list[dict], params: Sampling, on_text=None, cancel=None) -> Generated:
        def call(model):
            return run.task.generate(model, run.tokenizer, run.recipe.task, run.state, messages,
                                     max_new_tokens=params.max_tokens, temperature=params.temperature,
                                     top_p=params.top_p, stop=params.stop or None, seed=params.seed)

        return self._generate(run, call, params, on_text, cancel)

    def complete(self, run: ServedRun, prompt: str, params: Sampling, on_text=None, cancel=None) -> Generated:
        def call(model):
            return raw_generate(model, run.tokenizer, prompt, params)

        return self._generate(run, call, params, on_text, cancel)

    def _generate(self, run, call, params: Sampling, on_text, cancel) -> Generated:
        with self.use(run, cancel) as model:
            deltas = TextDeltas(run.tokenizer, params.stop, on_text) if on_text else None
            tap = _Tap(model, deltas.update if deltas else None, cancel, params.max_prompt_tokens)
            text = call(tap)
            if deltas:
                deltas.finish(text)
            return Generated(text, tap.prompt_tokens, len(tap.new_ids), tap.finish_reason(text, params.stop, run.tokenizer))

    def predict(self, run: ServedRun, inputs: list, cancel: threading.Event | None = None) -> list[dict]:
        lines = []
        for item in inputs:
            if isinstance(item, str):
                lines.append(_one_line(item))
            else:
                lines.append(_one_line(item.text) + ("\t" + _one_line(item.text_pair) if item.text_pair is not None else ""))
        with self.use(run, cancel) as model:
            rows = run.task.parse_inputs(run.recipe.task, "".join(line + "\n" for line in lines), "request.txt")
            if len(rows) != len(lines):
                raise UserError(f"the {len(lines)} inputs were read as {len(rows)} rows", where="inputs",
                                hint="give one text per input, each with some non-space character")
            predictions = run.task.predict(model, run.tokenizer, run.recipe.task, run.state, rows)
        return [_jsonable(p) for p in predictions]


@contextmanager
def _counted(base: Base):
    base.waiting += 1  # requests queued or running on this base (a gauge; races only blur it)
    try:
        yield
    finally:
        base.waiting -= 1


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text.replace("\ufeff", " "))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


# -- generation -----------------------------------------------------------------------------
@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    max_prompt_tokens: int | None = None  # the server's limit (None: the model's context only)


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class _Tap:
    """Stands in for the model during one generate call of a task: passes everything
    through, and around ``generate`` refuses a prompt over the server's token limit, adds a
    streamer (new tokens as they come), a stop on cancellation (the client went away, the time
    ran out), its own stop-string matcher, and records the token counts for ``usage``."""

    def __init__(self, model, on_ids=None, cancel: threading.Event | None = None,
                 max_prompt_tokens: int | None = None):
        self.__dict__.update(_model=model, _on_ids=on_ids, _cancel=cancel, _max_prompt_tokens=max_prompt_tokens,
                             prompt_tokens=0, new_ids=[], eos_ids=[], max_new_tokens=None)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        from transformers import StoppingCriteriaList

        config = kwargs.get("generation_config") or self._model.generation_config
        eos = config.eos_token_id
        self.__dict__["eos_ids"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.__dict__["max_new_tokens"] = config.max_new_tokens
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.__dict__["prompt_tokens"] = int(input_ids.shape[-1])
        limit = self._max_prompt_tokens
        if limit is not None and self.prompt_tokens > limit:
            raise PromptTooLong(f"the prompt takes {self.prompt_tokens} tokens, above this server's limit of {limit} "
                                "(--max-prompt-tokens)", hint="shorten the prompt or the conversation")
        criteria = list(kwargs.pop("stopping_criteria", None) or [])
        if self._cancel is not None:
            criteria.append(_Cancelled(self._cancel))
        stop = kwargs.get("stop_strings")
        if stop and kwargs.get("tokenizer") is not None:
            # transformers' matcher builds (and caches) a table of vocabulary size × stop length
            # for each new set of stop strings: about 1 MB and 45 ms per character on a large
            # vocabulary. This one decodes the last few tokens at each step instead.
            del kwargs["stop_strings"]
            criteria.append(_StopStrings(kwargs["tokenizer"], [stop] if isinstance(stop, str) else list(stop),
                                         self.prompt_tokens))
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        if self._on_ids is not None:
            kwargs["streamer"] = _Streamer(self._on_ids, self.eos_ids)
        output = self._model.generate(*args, **kwargs)
        self.__dict__["new_ids"] = output[0, self.prompt_tokens:].tolist()
        return output

    def finish_reason(self, text: str, stop: list[str], tokenizer) -> str:
        ids = self.new_ids
        if any(i in self.eos_ids for i in ids):
            return "stop"
        if stop and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop):
            return "stop"
        return "length" if self.max_new_tokens is not None and len(ids) >= self.max_new_tokens else "stop"


class _Streamer:
    """transformers streamer protocol (put/end): the first put is the prompt; then the new ids."""

    def __init__(self, on_ids, eos_ids):
        self.on_ids, self.eos_ids, self.ids, self.prompt_seen = on_ids, eos_ids, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        cut = next((k for k, t in enumerate(self.ids) if t in self.eos_ids), len(self.ids))
        self.on_ids(self.ids[:cut])

    def end(self):
        pass


def _Cancelled(event: threading.Event):
    """A stopping criterion that ends generation once ``event`` is set."""
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


def _StopStrings(tokenizer, stop: list[str], start: int):
    """A stopping criterion: the text generated since position ``start`` holds a stop string.
    Checked at every step, so a stop string can only be new in the last tokens: it is enough to
    decode a window of them (4 per character: a token carries at least one UTF-8 byte)."""
    from transformers import StoppingCriteria

    window = 4 * max(len(s) for s in stop) + 4

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            done = []
            for row in input_ids:
                text = tokenizer.decode(row[start:][-window:].tolist(), skip_special_tokens=True)
                done.append(any(s in text for s in stop))
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


class TextDeltas:
    """New text as tokens arrive, never text that a later token or a stop string could take
    back: a trailing partial character, trailing spaces (decoders may join them to the next
    token), and a tail that could begin a stop string are held until they are sure. At the
    end the final answer's remainder is sent, so the pieces add up to the plain answer."""

    def __init__(self, tokenizer, stop: list[str] | None, send: Callable[[str], None]):
        self.tokenizer, self.stop, self.send, self.sent = tokenizer, list(stop or []), send, ""
        self.stopped = False

    def update(self, ids: list[int]) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            if s in text:
                text = text[: text.index(s)]
                self.stopped = True
        if not self.stopped:
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        text = text.rstrip("\ufffd").rstrip()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            delta, self.sent = text[len(self.sent):], text
            self.send(delta)

    def finish(self, final: str) -> None:
        if final.startswith(self.sent):
            if len(final) > len(self.sent):
                self.send(final[len(self.sent):])
            self.sent = final


def raw_generate(model, tokenizer, prompt: str, params: Sampling) -> str:
    """A causal LM's continuation of ``prompt`` as it is (no chat template): /v1/completions.
    Stops at the model's EOS / end-of-turn tokens or at a stop string (not included)."""
    import torch

    device = getattr(model, "device", None)
    if not isinstance(device, torch.device):
        device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    inputs.pop("token_type_ids", None)
    prompt_length = inputs["input_ids"].shape[1]
    max_new_tokens = params.max_tokens
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context:
        if prompt_length >= context:
            raise UserError(f"the prompt takes {prompt_length} tokens, and the model's context is {context}",
                            where="prompt", hint="shorten the prompt")
        max_new_tokens = min(max_new_tokens, context - prompt_length)
    eos = model.generation_config.eos_token_id
    stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    config = copy.deepcopy(model.generation_config)
    sampling = params.temperature > 0
    config.update(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=stop_ids or None,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                  (stop_ids[0] if stop_ids else None),
                  temperature=params.temperature if sampling else None, top_p=params.top_p if sampling else None,
                  top_k=None, min_new_tokens=None)
    extra = {"stop_strings": list(params.stop), "tokenizer": tokenizer} if params.stop else {}
    with torch.no_grad(), seeded(params.seed if sampling else None, device):
        output = model.generate(**inputs, generation_config=config, **extra)
    new = output[0, prompt_length:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
    text = tokenizer.decode(new[:cut], skip_special_tokens=True)
    for s in params.stop:
        if s in text:
            text = text[: text.index(s)]
    return text


