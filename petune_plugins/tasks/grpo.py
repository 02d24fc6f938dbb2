"""Reinforcement learning from rewards: GRPO and its variants (DAPO, Dr. GRPO, BNPO, CISPO, SAPO;
GSPO through sequence-level importance sampling) on TRL's ``GRPOTrainer``.

Each training prompt is answered ``num_generations`` times by the model being trained; the
completions are scored by the recipe's rewards (plugins, :class:`petune.api.Reward`), and the
model learns to make the better-than-its-group completions likelier::

    [task]
    name = "grpo"
    train = "problems_train.jsonl"            # prompts, with the fields the rewards read
    validation = "problems_validation.jsonl"  # held-out prompts: rewards before and after
    num_generations = 4
    max_completion_length = 96

    [[task.rewards]]
    name = "math_answer"                      # `petune plugins` lists the rewards
    weight = 1.0
    field = "answer"                          # the rest of the table: the reward's options

Data: prompt rows in any format the ``sft`` task reads (JSON Lines, JSON, CSV, Parquet ...;
alpaca, prompt-completion, messages, sharegpt), the answer optional: a final assistant turn is
not part of the prompt. Every other field of a record (``answer``, ``output``, ``completion``,
``tests`` ...) reaches the rewards unchanged. Prompts are rendered with the chat template as
``sft`` chooses it; prompts longer than ``max_prompt_length`` tokens are dropped and counted.

Batches: ``train.batch_size`` prompts per device step, each answered ``num_generations`` times
(TRL's batch counts completions: ``batch_size × num_generations``).

Reference model (``beta`` > 0, a KL penalty toward the starting model): with a peft adapter the
base with the adapter disabled (no copy); with full fine-tuning a frozen copy. ``beta = 0`` (the
default, as DAPO and Dr. GRPO recommend) loads no reference at all.

Evaluation on held-out prompts, before training and after (``validation_before`` /
``validation``, and test): one greedy completion per prompt, each reward's mean (with a 95%
confidence interval half-width, ``<reward>_ci95``), the weighted total ``reward``, the mean
completion length in tokens and the share cut off at ``max_completion_length`` (``clipped``).
``petune eval`` on an adapter run scores the base with the adapter disabled as "before".
The run folder keeps ``samples.jsonl`` (held-out completions with their rewards, before and
after) and ``plots/rewards.png`` (mean reward and its spread per step, each reward's mean).
"""

from __future__ import annotations

import itertools
import json
import math
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from petune import hookimpl
from petune.api import DataPath, Options, TaskData, contiguous_head_input
from petune.errors import DataError, PluginError, Refusal
from petune_plugins.tasks._common import (
    SplitOptions,
    StartingPoint,
    before_training,
    evaluating,
    held_out_splits,
    hold_out,
    measure_before_training,
    model_device,
    read_held_out,
)
from petune_plugins.tasks.causal_lm import CausalLmTask, checkpointing_args, is_prompt_learning
from petune_plugins.tasks.chat_records import (
    FORMAT_HINT,
    BadRow,
    detect_format,
    iter_rows,
    record_keys,
    to_conversation,
)
from petune_plugins.tasks.chat_templates import (
    TEMPLATE_ERRORS,
    prepare_chat_tokenizer,
    render,
    stop_token_ids,
    template_for,
)
from petune_plugins.tasks.encoding import Spool, encode_split
from petune_plugins.tasks.preference import drop_reference_adapter, frozen_copy
from petune_plugins.tasks.sft import loss_memory

__all__ = ["GrpoOptions", "GrpoTask", "PromptRow", "RewardSpec", "RunRewards", "read_prompts", "summarise"]

#: TRL 1.16's GRPO loss types
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo")
#: record keys that make up the prompt in each format (the others are fields for the rewards)
_PROMPT_KEYS = {"alpaca": {"instruction", "input", "system"}, "prompt-completion": {"prompt", "system"},
                "messages": {"messages", "system"}, "sharegpt": {"conversations", "system"}}
_Z95 = 1.959964


# -- options -------------------------------------------------------------------------------
class RewardSpec(Options):
    """One ``[[task.rewards]]`` table: the reward's name, its weight, and its own options."""

    model_config = ConfigDict(extra="allow", strict=True, validate_default=True)

    name: str = Field(description="a reward plugin's name (`petune plugins`)")
    weight: float = Field(1.0, description="its weight in the total reward (0 logs it without training on it)")
    _options: Options | None = PrivateAttr(None)
    _registration: object = PrivateAttr(None)  # the reward plugin's class and package (petune.plugins.Registration)

    @model_validator(mode="after")
    def _reward_options(self, info: ValidationInfo):
        from petune.errors import UserError
        from petune.plugins import get_host

        host = (info.context or {}).get("host") or get_host()
        try:
            self._registration = host.get("reward", self.name)
        except UserError as exc:
            raise ValueError(f"{exc.message} — {exc.hint}" if exc.hint else exc.message) from None
        cls = self._registration.cls
        given = dict(self.__pydantic_extra__ or {})
        try:
            self._options = cls.Options.model_validate(given, context=info.context)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            known = ", ".join(cls.Options.model_fields) or "none"
            raise ValueError(f"reward {self.name!r}: {problems} (its options: {known})") from None
        # the saved recipe holds the options as validated (paths resolved against the recipe)
        self.__pydantic_extra__ = self._options.model_dump(exclude_none=True)  # TOML has no null
        return self

    @property
    def options(self) -> Options:
        return self._options

    def blamed(self, what: str):
        """A context in which a crash of this reward's code is reported naming its package."""
        from petune.plugins import blamed

        return blamed(self._registration.origin, f"reward {self.name!r} in {what}")

    def instance(self):
        return self._registration.cls()


class GrpoOptions(SplitOptions):
    train: DataPath = Field(description="training prompts (with the fields the rewards read)")
    validation: DataPath | None = Field(None, description="held-out prompts: rewards before and after training")
    test: DataPath | None = Field(None, description="test prompts, scored after training")
    format: Literal["auto", "alpaca", "prompt-completion", "messages", "sharegpt"] = Field(
        "auto", description="data format; auto: by the keys of each file's first record")
    rewards: list[RewardSpec] = Field(min_length=1, description="[[task.rewards]] tables: name, weight, options")
    system_prompt: str | None = Field(None, description="a system message for prompts that have none "
                                                        "(e.g. the answer format the rewards expect)")
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group rewards are compared in)")
    max_prompt_length: int = Field(256, ge=1, description="tokens of a rendered prompt; longer prompts are dropped")
    max_completion_length: int = Field(128, ge=1, description="tokens of a completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature while training")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling while training")
    loss_type: Literal[LOSS_TYPES] = Field(
        "dapo", description="grpo | dapo | dr_grpo | bnpo | cispo | sapo | luspo (TRL's loss normalisations)")
    importance_sampling: Literal["token", "sequence"] = Field(
        "token", description="sequence: one importance ratio per completion (GSPO)")
    beta: float = Field(0.0, ge=0, description="KL penalty toward the starting model (0: no reference model)")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the importance ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clipping range (DAPO's clip-higher); "
                                                               "default: epsilon")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the reward spread of the group, the batch, or not (Dr. GRPO)")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max_completion_length "
                                                                "out of the loss (DAPO)")
    loss: Literal["auto", "chunked", "full"] = Field(
        "auto", description="how the completions' log-probabilities are computed: chunked (TRL's fused LM head: no "
                            "full-vocabulary logits, every position scored off CUDA) or full (logits at the "
                            "completion positions only); auto: chunked on a GPU, full on a CPU unless those logits "
                            "would pass a quarter of the free memory")
    generation: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: transformers; vllm: colocated vLLM (CUDA, vllm installed)")
    chat_template: Literal["auto", "model", "chatml", "gemma", "alpaca", "plain"] = Field(
        "auto", description="as the sft task: auto = the model's own, else a built-in")
    max_rows: int | None = Field(None, ge=1, description="read at most this many records of each file")
    eval_batch_size: int = Field(16, ge=1, description="held-out prompts answered at once in evaluation")
    num_sample_generations: int = Field(4, ge=0, description="held-out completions kept with their rewards "
                                                             "before and after training (samples.jsonl)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.loss_type == "luspo" and self.importance_sampling != "sequence":
            raise ValueError("loss_type 'luspo' needs importance_sampling = 'sequence'")
        labels = reward_labels(self.rewards)
        if all(spec.weight == 0 for spec in self.rewards):
            raise ValueError(f"every reward has weight 0 ({', '.join(labels)}): nothing to learn from")
        return self

    @property
    def max_length(self) -> int:
        """Prompt and completion: the longest sequence trained on."""
        return self.max_prompt_length + self.max_completion_length


def reward_labels(specs: list[RewardSpec]) -> list[str]:
    """A name per reward for logs and metrics: its plugin name, numbered when used twice."""
    names = [spec.name for spec in specs]
    return [f"{n}_{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# -- data -------------------------------------------------------------------------------------
class PromptRow(NamedTuple):
    messages: list[dict]  # the conversation to answer, ending with a user turn
    fields: dict  # the record's other fields, for the rewards
    where: str  # "file:line" (and the record of a JSON list)


def to_prompt(record, fmt: str, system_prompt: str | None) -> tuple[list[dict], dict]:
    """The prompt (a final assistant turn left out) and the other fields of one record."""
    messages = to_conversation(record, fmt, need_answer=False)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise BadRow("the conversation has no user turn to answer")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, {k: v for k, v in record.items() if k not in _PROMPT_KEYS[fmt]}


def read_prompts(path: Path, fmt: str, max_rows: int | None, system_prompt: str | None) -> tuple[Spool, str]:
    """The prompts of a data file (spooled to disk as read) and the format it was read as."""
    rows = iter_rows(Path(path), max_rows)
    first = next(rows, None)
    if first is None:
        raise DataError("the data file holds no records", where=str(path))
    if fmt == "auto":
        fmt = detect_format(first.data)
        if fmt is None:
            has = f"keys {record_keys(first.data)}" if isinstance(first.data, dict) else "no object"
            plain = detect_format(first.data, text=True) == "text"  # sft's plain text (a .txt file, {"text"})
            raise DataError(f"cannot tell the data format: its first record has {has}"
                            + (": plain text, which sft trains on, while GRPO answers prompts" if plain else ""),
                            where=first.where,
                            hint=f"{FORMAT_HINT} (the answer may be left out); or set task.format")

    def prompts():
        for row in itertools.chain([first], rows):
            try:
                messages, fields = to_prompt(row.data, fmt, system_prompt)
            except BadRow as exc:
                raise DataError(f"{row.prefix}{exc} ({fmt} format)", where=row.where, hint=exc.hint) from None
            yield PromptRow(messages, fields, f"{row.where} {row.record}".rstrip())

    return Spool.write(prompts(), desc=Path(path).name), fmt


def read_splits(options: GrpoOptions, *, held_out_only: bool = False) -> tuple[dict, str | None]:
    fmt = None

    def read(split: str, path) -> Spool:
        nonlocal fmt
        found, fmt = read_prompts(path, options.format, options.max_rows, options.system_prompt)
        return found

    held_out = read_held_out(options, read)
    if held_out_only:
        return held_out, fmt
    train = hold_out(read("train", options.train), held_out, options, str(options.train))
    return {"train": train, **held_out}, fmt


class PromptEncoder:
    """Prompt rows → dataset columns: the messages (TRL renders them with the tokenizer's chat
    template, which petune set), the fields as JSON, where each row is, its length in tokens."""

    def __init__(self, tokenizer, template: str, max_prompt_length: int, needed: dict[str, str]):
        self.tokenizer, self.template, self.max_prompt_length = tokenizer, template, max_prompt_length
        self.needed = needed  # field → the reward that reads it

    def __call__(self, rows: list[PromptRow]) -> tuple[dict[str, list], dict[str, int]]:
        columns = {"prompt": [], "fields": [], "where": [], "prompt_tokens": []}
        counts = {"too_long": 0}
        for row in rows:
            for field, reward in self.needed.items():
                if field not in row.fields:
                    raise DataError(f"the reward {reward!r} reads the field {field!r}, which this record lacks "
                                    f"(it has {record_keys(row.fields)})", where=row.where,
                                    hint=f"add {field!r} to every record, or change the reward's options")
            try:
                text = render(self.tokenizer, self.template, row.messages, add_generation_prompt=True)
            except TEMPLATE_ERRORS as exc:
                raise DataError(f"the chat template cannot render this prompt: {exc}", where=row.where) from None
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > self.max_prompt_length:
                counts["too_long"] += 1
                continue
            columns["prompt"].append(row.messages)
            columns["fields"].append(json.dumps(row.fields, ensure_ascii=False))
            columns["where"].append(row.where)
            columns["prompt_tokens"].append(n)
        return columns, counts


# -- rewards ------------------------------------------------------------------------------------
class RunRewards:
    """The recipe's rewards for one run: each plugin instance with its options, weight and label,
    prepared once; scoring is blamed on the reward's package when it fails."""

    def __init__(self, specs: list[RewardSpec]):
        self.specs = specs
        self.labels = reward_labels(specs)
        self.rewards = [spec.instance() for spec in specs]
        self.weights = [spec.weight for spec in specs]

    def needed_fields(self) -> dict[str, str]:
        needed = {}
        for reward, spec in zip(self.rewards, self.specs):
            with spec.blamed("fields"):
                for field in reward.fields(spec.options):
                    needed.setdefault(field, spec.name)
        return needed

    def prepare(self, device) -> RunRewards:
        for reward, spec in zip(self.rewards, self.specs):
            with spec.blamed("prepare"):
                reward.prepare(spec.options, device)
        return self

    def score(self, index: int, prompts: list[list[dict]], completions: list[str], fields: list[dict]) -> list:
        """One reward's scores (float or None) of these completions, checked."""
        spec, reward = self.specs[index], self.rewards[index]
        columns = {key: [f.get(key) for f in fields] for key in dict.fromkeys(k for f in fields for k in f)}
        with spec.blamed("score"):
            scores = reward.score(prompts, completions, columns, spec.options)
        return self._checked(spec, scores, len(completions))

    @staticmethod
    def _checked(spec: RewardSpec, scores, n: int) -> list:
        origin = spec._registration.origin
        problem = None
        if not isinstance(scores, (list, tuple)) or len(scores) != n:
            got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else type(scores).__name__
            problem = f"returned {got} for {n} completions (one float or None per completion expected)"
        else:
            checked = []
            for s in scores:
                if s is None or (isinstance(s, float) and math.isnan(s)):
                    checked.append(None)
                elif isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
                    checked.append(float(s))
                else:
                    problem = f"returned {s!r} (a finite float or None expected)"
                    break
            else:
                return checked
        raise PluginError(f"reward {spec.name!r} from package {origin.package} {origin.version} {problem}",
                          hint=f"report it to the maintainers of {origin.package}")

    def functions(self) -> list:
        """TRL reward functions, one per reward, named by its label."""
        return [_TrlReward(self, i) for i in range(len(self.specs))]

    def score_all(self, prompts, completions, fields) -> dict[str, list]:
        return {label: self.score(i, prompts, completions, fields) for i, label in enumerate(self.labels)}

    def total(self, per_reward: dict[str, list]) -> list[float]:
        """The weighted sum per completion, rewards that do not apply counting 0 (as TRL sums them)."""
        columns = list(per_reward.values())
        return [sum(w * v for w, v in zip(self.weights, values) if v is not None) for values in zip(*columns)]


class _TrlReward:
    """A reward as TRL calls it: completions as messages or text, the dataset's other columns."""

    def __init__(self, rewards: RunRewards, index: int):
        self.rewards, self.index = rewards, index
        self.__name__ = rewards.labels[index]

    def __call__(self, prompts, completions, fields=None, **_):
        prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        decoded = [json.loads(f) for f in fields] if fields is not None else [{} for _ in texts]
        return self.rewards.score(self.index, prompts, texts, decoded)


def summarise(per_reward: dict[str, list], totals: list[float]) -> dict:
    """Mean and 95% confidence half-width of each reward (over completions where it applies) and
    of the weighted total."""
    metrics = {}
    for label, values in {"reward": totals, **per_reward}.items():
        kept = [v for v in values if v is not None]
        n = len(kept)
        mean = sum(kept) / n if n else float("nan")
        sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1)) if n > 1 else 0.0
        metrics[label] = mean
        metrics[f"{label}_ci95"] = _Z95 * sd / math.sqrt(n) if n else float("nan")
    return metrics


# -- held-out scoring ------------------------------------------------------------------------
def greedy_completions(model, tokenizer, prompts: list[list[dict]], state: dict, max_new_tokens: int,
                       batch_size: int) -> list[tuple[str, int, bool]]:
    """(text, tokens, clipped) of a greedy completion per prompt, a batch of prompts at a time."""
    import torch

    contiguous_head_input(model)
    template = template_for(tokenizer, state)
    stop_ids = stop_token_ids(tokenizer, state, model)
    device = model_device(model)
    results = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    try:
        with evaluating(model), torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                texts = [render(tokenizer, template, p, add_generation_prompt=True)
                         for p in prompts[start:start + batch_size]]
                inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, eos_token_id=stop_ids,
                                        pad_token_id=tokenizer.pad_token_id)
                for row in output[:, inputs["input_ids"].shape[1]:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
                    ids = row if cut is None else row[:cut]
                    results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids), cut is None))
    finally:
        tokenizer.padding_side = side
    return results


def score_held_out(model, tokenizer, dataset, rewards: RunRewards, options: GrpoOptions, state: dict,
                   samples: int = 0) -> tuple[dict, list[dict]]:
    """Held-out metrics of greedy completions, and the first ``samples`` of them with their rewards."""
    prompts = [list(p) for p in dataset["prompt"]]
    fields = [json.loads(f) for f in dataset["fields"]]
    done = greedy_completions(model, tokenizer, prompts, state, options.max_completion_length,
                              options.eval_batch_size)
    texts = [text for text, _, _ in done]
    per_reward = rewards.score_all(prompts, texts, fields)
    totals = rewards.total(per_reward)
    metrics = summarise(per_reward, totals)
    metrics.update(completion_length=sum(n for _, n, _ in done) / len(done),
                   clipped=sum(c for _, _, c in done) / len(done), prompts=len(done))
    kept = [{"where": dataset[i]["where"], "messages": prompts[i], "completion": texts[i], "reward": totals[i],
             "rewards": {label: values[i] for label, values in per_reward.items()}}
            for i in range(min(samples, len(done)))]
    return metrics, kept


def plot_rewards(log_history: list[dict], labels: list[str], path: Path) -> None:
    """Mean reward per step with its spread (± the std over completions), and each reward's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from petune import artifacts

    logged = [h for h in log_history if "reward" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if logged:
        steps = [h["step"] for h in logged]
        mean = [h["reward"] for h in logged]
        spread = [h.get("reward_std", 0.0) for h in logged]
        window = max(1, len(steps) // 10)  # a step's mean is over a few completions: show the trend too
        ax.plot(steps, mean, label="reward (weighted total)", color="tab:blue", alpha=0.45, linewidth=1)
        ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                        color="tab:blue", alpha=0.1, label="± spread over completions")
        if window > 1:
            ax.plot(steps, _running_mean(mean, window), color="tab:blue", linewidth=2.2,
                    label=f"reward, mean of the last {window} steps")
        for label in labels:
            key = f"rewards/{label}/mean"
            points = [(h["step"], h[key]) for h in logged if key in h]
            if points and len(labels) > 1:
                xs, ys = zip(*points)
                ax.plot(xs, _running_mean(list(ys), window), "--", label=f"{label} (mean of the last {window})")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no reward logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's completions")
    ax.grid(alpha=0.3)
    artifacts.save_figure(fig, path)
    plt.close(fig)


def completion_logps(model, input_ids, attention_mask, logits_to_keep: int, temperature: float,
                     compute_entropy: bool = False):
    """Per-token log-probabilities (and entropies) of the last ``logits_to_keep`` tokens of each row
    from the model's own logits at those positions only, divided by ``temperature`` as TRL does."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=logits_to_keep + 1).logits[:, :-1].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, -logits_to_keep:]
    per_token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if compute_entropy else None
    return per_token, entropy


def grpo_trainer_class():
    """TRL's GRPOTrainer reading log-probabilities from the completions' logits alone. Why: off
    CUDA, TRL's fused LM head scores every position of prompt and completion (its compact path
    needs Triton), computing and back-propagating the full-vocabulary projection for prompt tokens
    it then masks out — about 40% of a CPU step for the packaged Gemma. Multimodal and MoE
    batches keep TRL's own path."""
    from trl import GRPOTrainer

    class PetuneGRPOTrainer(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **extra):
            import torch

            if compute_aux_loss or any(value is not None for value in extra.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                with self.accelerator.autocast():
                    found = completion_logps(model, input_ids[start:start + batch_size],
                                             attention_mask[start:start + batch_size], logits_to_keep,
                                             self.temperature, compute_entropy)
                logps.append(found[0])
                entropies.append(found[1])
            return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    return PetuneGRPOTrainer


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


# -- the task -------------------------------------------------------------------------------------
class GrpoTask(CausalLmTask):
    name = "grpo"
    description = "reinforcement learning from reward plugins: GRPO, DAPO, Dr. GRPO, GSPO ... (TRL)"
    Options = GrpoOptions
    primary_metric = "reward"
    token_level_loss = False  # TRL normalises the GRPO loss itself

    def primary_metric_for(self, options: GrpoOptions) -> str:
        return "reward"

    def check(self, model_info, options: GrpoOptions) -> None:
        limit = model_info.max_positions
        if limit and options.max_length > limit:
            raise Refusal(f"a prompt of max_prompt_length = {options.max_prompt_length} tokens and a completion of "
                          f"max_completion_length = {options.max_completion_length} do not fit the model's context "
                          f"({limit} positions)", where="task.max_prompt_length",
                          hint=f"lower task.max_prompt_length or task.max_completion_length (together ≤ {limit})")
        super().check(model_info, options.model_copy(update={"max_prompt_length": 1, "max_completion_length": 1}))

    def sequences_per_example(self, options: GrpoOptions) -> int:
        return options.num_generations  # each prompt trains on its group of completions

    def frozen_reference(self, options: GrpoOptions, strategy) -> bool:
        return options.beta > 0 and strategy.artifact == "model"

    def generation_cache(self, options: GrpoOptions, batch_size: int) -> tuple[int, int]:
        return batch_size * options.num_generations, options.max_length

    def loss_memory(self, options: GrpoOptions, batch_size: int, config, device: str | None = None) -> str:
        # "logits" counts every position's logits: the full path keeps only the completions', so the
        # estimate errs on the safe side there
        return loss_memory(options.loss, batch_size * options.num_generations, options.max_completion_length + 1,
                           config, device)

    def progress_metrics(self, options: GrpoOptions) -> dict[str, str]:
        return {"reward": "reward", "reward_std": "±", "completions/mean_length": "len",
                "completions/clipped_ratio": "clipped"}

    # -- data -----------------------------------------------------------------------------------
    def load_data(self, options: GrpoOptions, tokenizer) -> TaskData:
        found, fmt = read_splits(options)
        return self._encode(found, options, tokenizer, fmt)

    def load_eval_data(self, options: GrpoOptions, tokenizer, state: dict) -> TaskData:
        found, fmt = read_splits(options, held_out_only=True)
        data = self._encode(found, options, tokenizer, fmt)
        data.state = state
        return data

    @staticmethod
    def _encode(found: dict, options: GrpoOptions, tokenizer, fmt) -> TaskData:
        chat = prepare_chat_tokenizer(tokenizer, options.chat_template)
        encoder = PromptEncoder(tokenizer, chat.template, options.max_prompt_length,
                                RunRewards(options.rewards).needed_fields())
        notes = {"chat_template": chat.note}
        datasets = {}
        for split, rows in found.items():
            dataset, counts = encode_split(rows, encoder, desc=split)
            if counts.get("too_long"):
                notes[f"{split}_too_long"] = (f"{counts['too_long']} prompt(s) longer than max_prompt_length = "
                                              f"{options.max_prompt_length} tokens dropped")
            if not len(dataset):
                raise DataError(f"no {split} prompts left: all {len(rows)} are longer than max_prompt_length = "
                                f"{options.max_prompt_length} tokens", where=f"task.{split}",
                                hint="raise task.max_prompt_length")
            datasets[split] = dataset
        state = {"format": fmt, **chat.state, "max_length": options.max_length}
        return TaskData(train=datasets.get("train"), validation=datasets.get("validation"),
                        test=datasets.get("test"), state=state, notes=notes)

    # -- training ---------------------------------------------------------------------------
    def training_plan(self, model, tokenizer, options: GrpoOptions) -> dict[str, str]:
        rewards = ", ".join(f"{label} ×{spec.weight:g}" for label, spec in zip(reward_labels(options.rewards),
                                                                            options.rewards))
        reference = ("none (beta = 0)" if options.beta == 0 else
                     "the base with the adapter disabled" if hasattr(model, "peft_config") else "a frozen copy")
        sampling = "sequence-level (GSPO)" if options.importance_sampling == "sequence" else "token-level"
        return {"rewards": rewards,
                "generation": (f"{options.num_generations} completions per prompt, ≤ {options.max_completion_length} "
                               f"tokens, temperature {options.temperature:g}, top_p {options.top_p:g} "
                               f"({self._generator(options)})"),
                "loss": f"{options.loss_type}, {sampling} importance sampling, rewards scaled by {options.scale_rewards}",
                "reference": f"{reference}; KL β = {options.beta:g}"}

    @staticmethod
    def _generator(options: GrpoOptions) -> str:
        if options.generation != "vllm":
            return "transformers"
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise Refusal("vLLM generates on CUDA GPUs only, and this machine has none", where="task.generation",
                          hint="set task.generation = 'transformers' (or 'auto')")
        if importlib.util.find_spec("vllm") is None:
            raise Refusal("vLLM is not installed", where="task.generation",
                          hint="pip install vllm, or set task.generation = 'transformers'")
        return "vllm (colocated)"

    def make_trainer(self, *, model, tokenizer, data: TaskData, options: GrpoOptions, args: dict, callbacks: list):
        from trl import GRPOConfig, GRPOTrainer

        if is_prompt_learning(model):
            raise Refusal("prompt and prefix tuning do not mix with GRPO here: TRL reads the completions' "
                          "log-probabilities from positions the virtual tokens shift", where="strategy.name",
                          hint="use lora, qlora or full")
        vllm = self._generator(options) != "transformers"
        rewards = RunRewards(options.rewards).prepare(model_device(model))
        full_reference = options.beta > 0 and not hasattr(model, "peft_config")
        config = {"bf16": False, **checkpointing_args(args, GRPOConfig)}
        batch = config.get("per_device_train_batch_size", 1)
        config.update(
            per_device_train_batch_size=batch * options.num_generations,  # TRL's batch counts completions
            per_device_eval_batch_size=batch * options.num_generations,
            eval_strategy="no", load_best_model_at_end=False,  # held-out prompts are scored by evaluate()
            include_num_input_tokens_seen="no",  # batches are prompts; TRL counts the tokens itself (num_tokens)
            num_generations=options.num_generations, max_completion_length=options.max_completion_length,
            temperature=options.temperature, top_p=options.top_p, loss_type=options.loss_type,
            importance_sampling_level=options.importance_sampling,
            beta=0.0 if full_reference else options.beta,  # a frozen copy is set below (TRL would reload the model)
            epsilon=options.epsilon, epsilon_high=options.epsilon_high, scale_rewards=options.scale_rewards,
            mask_truncated_completions=options.mask_truncated_completions,
            reward_weights=[spec.weight for spec in options.rewards], log_completions=False,
            use_vllm=vllm, **({"vllm_mode": "colocate"} if vllm else {}))
        config.pop("metric_for_best_model", None)
        config.pop("greater_is_better", None)
        full_logits = loss_memory(options.loss, config["per_device_train_batch_size"], options.max_completion_length + 1,
                                  model.config, model_device(model).type) == "logits"
        trainer_class = grpo_trainer_class() if full_logits else GRPOTrainer
        trainer = trainer_class(model=model, reward_funcs=rewards.functions(), args=GRPOConfig(**config),
                                train_dataset=data.train, processing_class=tokenizer, callbacks=callbacks)
        trainer._petune_rewards = rewards
        contiguous_head_input(trainer.model)  # training generates: 4× faster rollouts on a CPU (see there)
        if full_reference:
            trainer.beta = options.beta
            trainer.ref_model = trainer.accelerator.prepare_model(frozen_copy(model), evaluation_mode=True)
        drop_reference_adapter(trainer.model)  # a new adapter starts as the identity: disabling it is the reference
        measure_before_training(trainer, partial(self._starting_point, trainer, data, options))
        return trainer

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, trainer, data: TaskData, options: GrpoOptions, run_dir: Path) -> dict[str, dict]:
        from petune import artifacts

        rewards = getattr(trainer, "_petune_rewards", None) or RunRewards(options.rewards).prepare(
            model_device(trainer.model))
        model, tokenizer = trainer.model, trainer.processing_class
        before = before_training(trainer)
        if not before.metrics and trainer.state.global_step == 0 and hasattr(model, "disable_adapter"):
            with model.disable_adapter():  # petune eval of a finished adapter run: its base is "before"
                before = self._measure(model, tokenizer, data, options, rewards, True)
        metrics, after = {}, []
        for split, dataset in held_out_splits(data):
            if split in before.metrics:
                metrics[f"{split}_before"] = before.metrics[split]
            keep = options.num_sample_generations if not after else 0
            metrics[split], kept = score_held_out(model, tokenizer, dataset, rewards, options, data.state, keep)
            after += [{"split": split, **row} for row in kept]
        if after and trainer.is_world_process_zero():
            earlier = {(s["split"], s["where"]): s for s in before.samples}
            for sample in after:
                old = earlier.get((sample["split"], sample["where"]))
                sample["after"] = {"completion": sample.pop("completion"), "reward": sample.pop("reward"),
                                   "rewards": sample.pop("rewards")}
                if old is not None:
                    sample["before"] = {k: old[k] for k in ("completion", "reward", "rewards")}
            artifacts.write_text(Path(run_dir) / "samples.jsonl",
                                 "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in after))
        if trainer.state.log_history and trainer.is_world_process_zero():
            plot_rewards(trainer.state.log_history, rewards.labels, Path(run_dir) / "plots" / "rewards.png")
        return metrics

    def _starting_point(self, trainer, data: TaskData, options: GrpoOptions, main_process: bool) -> StartingPoint:
        return self._measure(trainer.model, trainer.processing_class, data, options, trainer._petune_rewards,
                             main_process)

    @staticmethod
    def _measure(model, tokenizer, data: TaskData, options: GrpoOptions, rewards: RunRewards,
                 main_process: bool) -> StartingPoint:
        start = StartingPoint()
        for split, dataset in held_out_splits(data):
            keep = options.num_sample_generations if main_process and not start.samples else 0
            start.metrics[split], kept = score_held_out(model, tokenizer, dataset, rewards, options, data.state, keep)
            start.samples += [{"split": split, **row} for row in kept]
        return start


@hookimpl
def register_tasks(register):
    register(GrpoTask)
