"""The grpo task: prompt rows in every chat format (fields kept for the rewards), rewards validated
as plugins, a 2-step run on a tiny model (rewards in the log, samples, held-out metrics before and
after), beta = 0 loading no reference, the full-fine-tuning reference, starting from an SFT run,
and a failing third-party reward blamed on its package."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from pydantic import Field

from petune import hookimpl
from petune.api import Options, Reward
from petune.errors import DataError, PluginError, RecipeError
from petune.plugins import PluginHost, PluginOrigin
from petune_plugins.tasks.grpo import GrpoOptions, GrpoTask, read_prompts, summarise


class ShortOptions(Options):
    limit: int = Field(8, ge=1, description="characters")


class ShortReward(Reward):
    """1 for a completion of at most ``limit`` characters, else 0; None where the row says skip."""

    name = "short"
    Options = ShortOptions
    calls: list = []

    def fields(self, options):
        return ["answer"]

    def score(self, prompts, completions, fields, options):
        ShortReward.calls.append((prompts, completions, fields))
        return [None if a == "skip" else float(len(c) <= options.limit) for c, a in zip(completions, fields["answer"])]


class BrokenReward(Reward):
    name = "broken"

    def score(self, prompts, completions, fields, options):
        raise ZeroDivisionError("the reward divided by zero")


def _module(*classes):
    module = types.ModuleType("rewards_for_tests")
    module.register_rewards = hookimpl(lambda register: [register(c) for c in classes])
    return module


@pytest.fixture(scope="module")
def grpo_host():
    return PluginHost(autoload=False, extra=[(PluginOrigin("test-rewards", "0.3", "rewards"),
                                              _module(ShortReward, BrokenReward))])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _problems(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"what is {a} plus {a} ?", "answer": str(2 * a), "level": a % 3} for a in range(start, start + n)]


def _recipe(host, tmp_path, strategy="lora", task=None, model="random:tiny-llama", out="run", rewards=None):
    from petune.recipe import validate

    strategies = {"full": {}, "lora": {"r": 4}, "qlora": {"r": 4, "compute_dtype": "float32"}}
    return validate({"model": {"name": model},
                     "task": {"name": "grpo", "train": "train.jsonl", "validation": "validation.jsonl",
                              "num_generations": 2, "max_completion_length": 6, "max_prompt_length": 48,
                              "num_sample_generations": 2, "chat_template": "chatml",
                              "rewards": rewards or [{"name": "short", "weight": 1.0, "limit": 12}], **(task or {})},
                     "strategy": {"name": strategy, **strategies[strategy]},
                     "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3},
                     "eval": {"strategy": "no"}, "output": {"dir": str(tmp_path / out)}},
                    host, path=tmp_path / "recipe.toml")


# -- data -------------------------------------------------------------------------------------
RECORDS = {
    "prompt-completion": {"prompt": "what is 2 plus 2 ?", "answer": 4},
    "alpaca": {"instruction": "what is 2 plus 2 ?", "output": "4", "answer": 4},
    "messages": {"messages": [{"role": "user", "content": "what is 2 plus 2 ?"},
                              {"role": "assistant", "content": "4"}], "answer": 4},
    "sharegpt": {"conversations": [{"from": "human", "value": "what is 2 plus 2 ?"}], "answer": 4},
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_gives_the_prompt_and_keeps_the_other_fields(tmp_path, fmt):
    spool, found = read_prompts(write_jsonl(tmp_path / "p.jsonl", [RECORDS[fmt]]), "auto", None, "be brief")
    (row,) = list(spool)
    assert found == fmt
    assert row.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 2 ?"}]
    assert row.fields["answer"] == 4 and row.where.endswith("p.jsonl:1")
    if fmt == "alpaca":
        assert row.fields["output"] == "4"  # the reference answer reaches the rewards too


def test_plain_text_prompts_are_refused_saying_what_they_are(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("what is 2 plus 2 ?\n\nwhat is 3 plus 3 ?\n")
    with pytest.raises(DataError, match="plain text, which sft trains on, while GRPO answers prompts") as caught:
        read_prompts(path, "auto", None, None)
    assert caught.value.where == f"{path}:1" and "prompt-completion {prompt, completion}" in caught.value.hint


def test_a_row_without_a_user_turn_is_refused_at_its_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS["messages"], {"messages": [{"role": "system", "content": "x"}]}])
    with pytest.raises(DataError, match="no user turn") as caught:
        list(read_prompts(path, "auto", None, None)[0])
    assert caught.value.where.endswith("p.jsonl:2")


def test_data_lacking_a_field_a_reward_reads_is_refused_naming_both(grpo_host, tiny_llama_path, tmp_path):
    from transformers import AutoTokenizer

    write_jsonl(tmp_path / "train.jsonl", [*_problems(2), {"prompt": "no answer here"}])
    write_jsonl(tmp_path / "validation.jsonl", _problems(1))
    recipe = _recipe(grpo_host, tmp_path)
    with pytest.raises(DataError, match="reward 'short' reads the field 'answer'") as caught:
        GrpoTask().load_data(recipe.task, AutoTokenizer.from_pretrained(tiny_llama_path))
    assert caught.value.where.endswith("train.jsonl:3")


# -- options ----------------------------------------------------------------------------------
def test_reward_options_are_validated_by_the_reward_naming_the_key(grpo_host, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _problems(2))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1))
    with pytest.raises(RecipeError, match=r"reward 'short': limitt: .*its options: limit"):
        _recipe(grpo_host, tmp_path, rewards=[{"name": "short", "limitt": 3}])
    with pytest.raises(RecipeError, match="unknown reward 'shrot'.*did you mean 'short'"):
        _recipe(grpo_host, tmp_path, rewards=[{"name": "shrot"}])
    with pytest.raises(RecipeError, match="weight 0"):
        _recipe(grpo_host, tmp_path, rewards=[{"name": "short", "weight": 0.0}])
    recipe = _recipe(grpo_host, tmp_path, rewards=[{"name": "short", "limit": 3}, {"name": "short", "weight": 0.5}])
    assert [spec.options.limit for spec in recipe.task.rewards] == [3, 8]
    assert recipe.task.rewards[1].model_dump() == {"name": "short", "weight": 0.5, "limit": 8}


def test_summary_means_skip_rewards_that_do_not_apply():
    metrics = summarise({"a": [1.0, None, 0.0], "b": [1.0, 1.0, 1.0]}, [2.0, 1.0, 1.0])
    assert metrics["a"] == 0.5 and metrics["b"] == 1.0 and metrics["b_ci95"] == 0.0
    assert metrics["reward"] == pytest.approx(4 / 3) and metrics["reward_ci95"] > 0


# -- runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, beta", [("lora", 0.0), ("lora", 0.05), ("full", 0.05), ("qlora", 0.0)])
def test_a_two_step_run_logs_rewards_and_scores_held_out_prompts(grpo_host, tmp_path, monkeypatch, strategy, beta):
    from petune import runner

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", _problems(6))
    write_jsonl(tmp_path / "validation.jsonl", [*_problems(2, start=10), {"prompt": "skip me", "answer": "skip"}])
    ShortReward.calls.clear()
    created = []
    import trl

    original = trl.GRPOTrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", spy)
    result = runner.run(_recipe(grpo_host, tmp_path, strategy, task={"beta": beta}), grpo_host)
    assert result.status == "completed", result.error
    (trainer,) = created
    if beta == 0:
        assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    elif strategy == "lora":  # the base with the adapter disabled: no copy
        assert trainer.ref_model is None and "ref" not in trainer.model.peft_config and trainer.beta == beta
    else:
        assert trainer.ref_model is not None and trainer.beta == beta

    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    steps = [h for h in history if "reward" in h]
    assert len(steps) == 2 and all({"reward_std", "rewards/short/mean", "completions/clipped_ratio"} <= set(h)
                                   for h in steps)
    # the reward saw every completion of a group with its row's fields
    prompts, completions, fields = ShortReward.calls[0]
    assert len(completions) == len(prompts) == len(fields["answer"]) and fields["level"][0] in (0, 1, 2)
    assert prompts[0][-1]["role"] == "user"

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for split in ("validation", "validation_before"):
        m = metrics[split]
        assert m["prompts"] == 3 and 0 <= m["short"] <= 1 and 0 <= m["clipped"] <= 1
        assert m["reward"] == pytest.approx(m["short"] * 2 / 3)  # the skipped row counts 0 in the total
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"before", "after", "messages", "where"} <= set(samples[0])
    assert set(samples[0]["after"]["rewards"]) == {"short"}
    assert (tmp_path / "run" / "plots" / "rewards.png").stat().st_size > 1000


def test_eval_of_a_finished_run_scores_its_base_as_before(grpo_host, tmp_path, monkeypatch):
    from petune import runner
    from petune.cli import main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", _problems(4))
    write_jsonl(tmp_path / "validation.jsonl", _problems(2, start=10))
    assert runner.run(_recipe(grpo_host, tmp_path, task={"num_sample_generations": 0}), grpo_host).status == "completed"
    monkeypatch.setattr("petune.plugins._HOST", grpo_host)
    assert main(["eval", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["validation"]["prompts"] == metrics["validation_before"]["prompts"] == 2


def test_a_failing_reward_is_blamed_on_its_package(grpo_host, tmp_path, monkeypatch):
    from petune import runner

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", _problems(4))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1))
    recipe = _recipe(grpo_host, tmp_path, task={"num_sample_generations": 0},
                     rewards=[{"name": "short"}, {"name": "broken", "weight": 0.5}])
    with pytest.raises(PluginError, match=r"test-rewards 0.3 .*reward 'broken' in score.*divided by zero"):
        runner.run(recipe, grpo_host)


def test_start_from_a_finished_sft_run(grpo_host, tmp_path, monkeypatch):
    from petune import runner
    from petune.recipe import validate

    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["answer"]} for p in _problems(6)])
    sft = validate({"model": {"name": "random:tiny-llama"},
                    "task": {"name": "sft", "train": "sft.jsonl", "max_length": 48, "num_sample_generations": 0,
                             "chat_template": "chatml"},
                    "strategy": {"name": "lora", "r": 4}, "train": {"max_steps": 1, "batch_size": 4},
                    "eval": {"strategy": "no"}, "output": {"dir": "runs/sft"}}, grpo_host, path=tmp_path / "sft.toml")
    assert runner.run(sft, grpo_host).status == "completed"
    write_jsonl(tmp_path / "train.jsonl", _problems(4))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1, start=10))
    result = runner.run(_recipe(grpo_host, tmp_path, model="runs/sft", out="runs/grpo",
                                task={"chat_template": "auto", "num_sample_generations": 0}), grpo_host)
    assert result.status == "completed"
    # the SFT run's template (saved with its tokenizer) is the one the prompts are rendered with
    assert json.loads((tmp_path / "runs/grpo/task_state.json").read_text())["chat_template"] == "chatml"


def test_the_estimate_counts_the_generated_completions(grpo_host, tmp_path):
    from petune.memory import estimate_recipe

    write_jsonl(tmp_path / "train.jsonl", _problems(2))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1))
    one = estimate_recipe(_recipe(grpo_host, tmp_path, task={"num_generations": 2}), grpo_host, device="cpu")
    four = estimate_recipe(_recipe(grpo_host, tmp_path, task={"num_generations": 4}), grpo_host, device="cpu")
    assert four.batch == 2 * one.batch  # each prompt trains on its group of completions
    assert four.parts["generation"] > one.parts["generation"] > 0
    assert GrpoOptions.model_fields["num_generations"].default >= 2


def test_prompt_and_completion_must_fit_the_context(grpo_host, tmp_path):
    from petune.api import ModelInfo
    from petune.errors import Refusal
    from petune_plugins.sources.random_init import RandomInitSource

    write_jsonl(tmp_path / "train.jsonl", _problems(2))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1))
    recipe = _recipe(grpo_host, tmp_path, task={"max_prompt_length": 250, "max_completion_length": 16})
    info = ModelInfo.from_path("tiny", RandomInitSource().resolve("random:tiny-llama"))
    with pytest.raises(Refusal, match="do not fit the model's context") as caught:
        GrpoTask().check(info, recipe.task)
    assert caught.value.where == "task.max_prompt_length"


def test_full_logit_log_probs_equal_trls_fused_head(tiny_llama_path):
    """The CPU path (logits at the completion positions only) computes what TRL's fused LM head does."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from petune_plugins.tasks.grpo import completion_logps

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    add_fused_lm_head(model, temperature=0.7)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, -2:] = 0  # a completion that stopped early
    keep = 5
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, -keep:]
        ours, entropy = completion_logps(model, ids, mask, keep, 0.7, compute_entropy=True)
    valid = mask[:, -keep:].bool()
    torch.testing.assert_close(ours[valid], fused[valid], rtol=1e-4, atol=1e-4)
    assert entropy.shape == ours.shape and (entropy > 0).all()


@pytest.mark.parametrize("loss", ["chunked", "full"])
def test_both_log_prob_paths_train(grpo_host, tmp_path, monkeypatch, loss):
    from petune import runner

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", _problems(4))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1, start=10))
    result = runner.run(_recipe(grpo_host, tmp_path, task={"loss": loss, "num_sample_generations": 0}), grpo_host)
    assert result.status == "completed"
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert all(isinstance(h["loss"], float) for h in history if "loss" in h and "step" in h)


def test_grpo_on_a_gguf_file_kept_quantised(grpo_host, tiny_llama_path, tmp_path, monkeypatch):
    """The GGUF backend (qlora, quant_type "gguf"): GRPO trains LoRA on the file's own Q8_0 blocks."""
    from test_model_sources import write_tiny_gguf

    from petune import runner
    from petune.recipe import validate

    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    gguf_file = write_tiny_gguf(tiny_llama_path, tmp_path / "tiny-q8_0.gguf")
    write_jsonl(tmp_path / "train.jsonl", _problems(4))
    write_jsonl(tmp_path / "validation.jsonl", _problems(1, start=10))
    recipe = validate({"model": {"name": str(gguf_file)},
                       "task": {"name": "grpo", "train": "train.jsonl", "validation": "validation.jsonl",
                                "num_generations": 2, "max_completion_length": 4, "max_prompt_length": 48,
                                "num_sample_generations": 0, "chat_template": "chatml",
                                "rewards": [{"name": "short", "limit": 12}]},
                       "strategy": {"name": "qlora", "quant_type": "gguf", "r": 4},
                       "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1},
                       "eval": {"strategy": "no"}, "output": {"dir": "run"}}, grpo_host, path=tmp_path / "r.toml")
    assert runner.run(recipe, grpo_host).status == "completed"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]["prompts"] == 1


def test_prompts_from_csv_and_parquet_keep_their_columns_as_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.csv").write_text("prompt,answer\nwhat is 2 plus 2 ?,4\nwhat is 3 plus 3 ?,6\n")
    pq.write_table(pa.table({"prompt": ["what is 2 plus 2 ?"], "answer": [4]}), tmp_path / "p.parquet")
    rows = list(read_prompts(tmp_path / "p.csv", "auto", None, None)[0])
    assert [r.fields["answer"] for r in rows] == ["4", "6"] and rows[1].where.endswith("p.csv:3")
    (row,) = list(read_prompts(tmp_path / "p.parquet", "auto", None, None)[0])
    assert row.messages == [{"role": "user", "content": "what is 2 plus 2 ?"}] and row.fields == {"answer": 4}
