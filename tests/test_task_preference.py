"""The preference task: data formats to one tokenized pair, the HH-RLHF prompt split, drops,
the reference model, the method × strategy matrix, metrics by hand, starting from a finished
SFT run, and bad inputs (exit 2 with file and line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_strategy, validated_recipe, write_recipe

from petune.errors import DataError, Refusal
from petune_plugins.tasks.preference import (
    PreferenceOptions,
    PreferenceTask,
    pair_metrics,
    score_pairs,
    split_dialogues,
)

PROMPT, GOOD, BAD = "what is the capital of france ?", "the capital of france is paris .", "i hated it ."


@pytest.fixture
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)  # fresh: load_data sets its template and pad token


@pytest.fixture
def task():
    return PreferenceTask()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def options(**values) -> PreferenceOptions:
    values.setdefault("max_length", 128)
    return PreferenceOptions.model_validate(values)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- formats --------------------------------------------------------------------------------
FORMATS = {
    "pairs": {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
    "pairs-messages": {"prompt": [user(PROMPT)], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "hh-rlhf": {"chosen": f"\n\nHuman: {PROMPT}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {PROMPT}\n\nAssistant: {BAD}"},
    "hh-rlhf-messages": {"chosen": [user(PROMPT), assistant(GOOD)], "rejected": [user(PROMPT), assistant(BAD)]},
    "openai": {"input": {"messages": [user(PROMPT)]}, "preferred_output": [assistant(GOOD)],
               "non_preferred_output": [assistant(BAD)]},
}


def test_every_format_gives_the_same_tokenized_pair(task, tiny_llama_path, tmp_path):
    from transformers import AutoTokenizer

    rows = {}
    for name, record in FORMATS.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
        data = task.load_data(options(train=write_jsonl(tmp_path / f"{name}.jsonl", [record])), tokenizer)
        assert data.state["format"] == name.removesuffix("-messages")
        rows[name] = {k: data.train[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    first = rows["pairs"]
    assert all(row == first for row in rows.values()), rows
    eos = tokenizer.eos_token_id  # chatml on this vocabulary ends turns with EOS
    assert first["chosen_ids"][-1] == eos and first["rejected_ids"][-1] == eos
    assert tokenizer.decode(first["chosen_ids"][:-1]).strip() == GOOD
    assert tokenizer.decode(first["rejected_ids"][:-1]).strip() == BAD
    prompt = tokenizer.decode(first["prompt_ids"])
    assert PROMPT in prompt and GOOD not in prompt and prompt.endswith("<|im_start|>assistant\n")
    # KTO's unpaired rows: the same prompt, each answer with its label
    kto = [{"prompt": PROMPT, "completion": GOOD, "label": True}, {"prompt": PROMPT, "completion": BAD, "label": False}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    data = task.load_data(options(train=write_jsonl(tmp_path / "kto.jsonl", kto), method="kto"), tokenizer)
    assert data.train["prompt_ids"] == [first["prompt_ids"]] * 2
    assert data.train["completion_ids"] == [first["chosen_ids"], first["rejected_ids"]]
    assert data.train["label"] == [True, False]


def test_hh_dialogues_split_at_the_last_shared_assistant_turn():
    h1, a1, h2 = user("hello"), assistant("hello , how can i help ?"), user(PROMPT)
    # shared dialogue, different last answers
    assert split_dialogues([h1, a1, h2, assistant(GOOD)], [h1, a1, h2, assistant(BAD)]) == \
        ([h1, a1, h2], [assistant(GOOD)], [assistant(BAD)])
    # they differ in a user turn: back to the assistant turn before it, answers of several turns
    chosen, rejected = [h1, a1, h2, assistant(GOOD)], [h1, a1, user("bye"), assistant(BAD)]
    assert split_dialogues(chosen, rejected) == ([h1], chosen[1:], rejected[1:])
    # differing from the first message: no shared prompt
    assert split_dialogues([h2, assistant(GOOD)], [h1, assistant(BAD)]) == "no_shared_prefix"
    assert split_dialogues([h1, a1], [h1, a1]) == "identical"


def test_dropped_pairs_are_counted(task, tokenizer, tmp_path):
    rows = [FORMATS["hh-rlhf"],
            {"chosen": f"\n\nHuman: hi\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: bye\n\nAssistant: {BAD}"},
            {"chosen": f"\n\nHuman: hi\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: hi\n\nAssistant: {GOOD}"},
            {"chosen": f"\n\nHuman: {'the plot was thin . ' * 30}\n\nAssistant: {GOOD}",
             "rejected": f"\n\nHuman: {'the plot was thin . ' * 30}\n\nAssistant: {BAD}"}]
    data = task.load_data(options(train=write_jsonl(tmp_path / "hh.jsonl", rows), max_length=64), tokenizer)
    assert len(data.train) == 1
    assert data.notes["train_dropped_no_shared_prefix"] == 1
    assert data.notes["train_dropped_identical"] == 1
    assert data.notes["train_dropped_cut_to_nothing"] == 1
    # max_prompt_length keeps the end of a long prompt (and its BOS): the pair survives, answer whole
    data = task.load_data(options(train=write_jsonl(tmp_path / "hh.jsonl", rows[3:]), max_length=64,
                                  max_prompt_length=32), tokenizer)
    assert len(data.train[0]["prompt_ids"]) == 32 and data.notes["train_prompts_cut"] == 1
    assert data.train[0]["chosen_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="no train pairs left"):
        task.load_data(options(train=write_jsonl(tmp_path / "long.jsonl", rows[3:]), max_length=64), tokenizer)


@pytest.mark.parametrize("rows, line, message", [
    ([FORMATS["pairs"], {"prompt": PROMPT, "chosen": GOOD}], 2, "missing 'rejected'"),
    ([FORMATS["pairs"], FORMATS["pairs"], '{"prompt": "broken'], 3, "invalid JSON"),
    ([FORMATS["openai"], {"input": {"messages": []}, "preferred_output": GOOD, "non_preferred_output": BAD}], 2,
     "non-empty list"),
    ([{"prompt": PROMPT, "completion": GOOD, "label": "yes"}], 1, "'label' must be true"),
])
def test_bad_records_name_file_and_line(task, tokenizer, tmp_path, rows, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    kto = "label" in json.dumps(rows)
    with pytest.raises(DataError, match=message) as info:
        task.load_data(options(train=path, method="kto" if kto else "dpo"), tokenizer)
    assert info.value.where == f"{path}:{line}"


def test_bad_input_exits_2_naming_file_and_line(tmp_path, capsys):
    from petune.cli import main

    write_jsonl(tmp_path / "train.jsonl", [FORMATS["pairs"], {"prompt": PROMPT, "chosen": GOOD}])
    (tmp_path / "empty.jsonl").write_text("")
    recipe = write_recipe(tmp_path / "recipe.toml",
                          task={"name": "preference", "train": "train.jsonl", "max_length": 64},
                          strategy={"name": "lora"}, train={"max_steps": 1, "batch_size": 1}, eval={"strategy": "epoch"})
    assert main(["run", str(recipe)]) == 2
    assert f"{tmp_path / 'train.jsonl'}:2" in capsys.readouterr().err.replace("\n", "")
    assert main(["run", str(recipe), "--set", "task.train=empty.jsonl", "--overwrite"]) == 2
    assert "empty" in capsys.readouterr().err


def test_option_mixes_are_refused():
    with pytest.raises(ValueError, match="unpaired"):
        options(train="x.jsonl", format="kto", method="dpo")
    with pytest.raises(ValueError, match="unknown dpo loss_type 'ipo2'"):
        options(train="x.jsonl", loss_type="ipo2")
    with pytest.raises(ValueError, match="has its own loss"):
        options(train="x.jsonl", method="orpo", loss_type="sigmoid")
    assert options(train="x.jsonl", loss_type=["sigmoid", "sft"]).losses == ["sigmoid", "sft"]


# -- training ---------------------------------------------------------------------------------
def _args(tmp_path, **extra) -> dict:
    """What the runner passes (petune.trainer_setup.training_arguments), for two CPU steps."""
    args = {"output_dir": str(tmp_path / "checkpoints"), "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
            "num_train_epochs": 1, "max_steps": 2, "seed": 0, "data_seed": 0, "gradient_checkpointing": False,
            "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "dataloader_num_workers": 0, "bf16": False, "fp16": False, "use_cpu": True}
    return {**args, **extra}


def _pairs(n=6):
    return [{"prompt": f"{PROMPT} {i}", "chosen": GOOD, "rejected": BAD} for i in range(n)]


def _lora_model(host, task, tiny_llama_path, state):
    from petune.api import ModelInfo

    torch.manual_seed(0)
    model = task.build_model(ModelInfo.from_path("tiny", tiny_llama_path), None, state)
    strategy = host.strategy("lora")
    return strategy.apply(model, task, strategy.Options.model_validate({"r": 4, "dropout": 0.0}))


def test_reference_is_the_base_with_the_adapter_disabled(host, task, tokenizer, tiny_llama_path, tmp_path):
    opts = options(train=write_jsonl(tmp_path / "t.jsonl", _pairs(2)), num_sample_generations=0)
    data = task.load_data(opts, tokenizer)
    model = _lora_model(host, task, tiny_llama_path, data.state)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    count = sum(p.numel() for p in model.parameters())
    trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=opts, args=_args(tmp_path),
                                callbacks=[])
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # no "ref" copy
    assert sum(p.numel() for p in trainer.model.parameters()) == count
    assert {p.untyped_storage().data_ptr() for p in trainer.model.parameters()} == storages
    # a trained adapter moves the policy, not the reference: reference log-probs are the base model's
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    base = task.build_model(__import__("petune.api").api.ModelInfo.from_path("tiny", tiny_llama_path), None,
                            data.state).eval()
    metrics = score_pairs(trainer, data.train, "dpo", beta=0.1)
    from petune_plugins.tasks.preference import answer_logps

    rows = list(data.train)
    by_hand = pair_metrics(
        [[answer_logps(model.eval(), r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids")] for r in rows],
        [[answer_logps(base, r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids")] for r in rows],
        [(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows], "dpo", 0.1)
    assert metrics == pytest.approx(by_hand)
    assert metrics["margin"] != 0


def test_metrics_by_hand_on_two_pairs():
    policy, reference = [[-10.0, -14.0], [-8.0, -6.0]], [[-11.0, -13.0], [-8.0, -8.0]]
    m = pair_metrics(policy, reference, [(5, 4), (2, 3)], "dpo", beta=0.5)
    # rewards: pair 1 (0.5, -0.5), pair 2 (0.0, 1.0)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx((1.0 - 1.0) / 2)
    assert m["chosen_reward"] == pytest.approx(0.25) and m["rejected_reward"] == pytest.approx(0.25)
    assert m["chosen_logp"] == -9.0 and m["rejected_logp"] == -10.0 and m["logp_accuracy"] == 0.5
    # reference-free (simpo/orpo): β × mean token log-prob; a tie counts half
    m = pair_metrics([[-10.0, -8.0], [-4.0, -9.0]], None, [(5, 4), (2, 3)], "simpo", beta=2.0)
    assert m["chosen_reward"] == pytest.approx((-4.0 - 4.0) / 2) and m["accuracy"] == 0.75


def test_prompt_tuning_is_refused(host, task, tokenizer, tiny_llama_path, tmp_path):
    from petune.api import ModelInfo

    opts = options(train=write_jsonl(tmp_path / "t.jsonl", _pairs(2)))
    data = task.load_data(opts, tokenizer)
    model = task.build_model(ModelInfo.from_path("tiny", tiny_llama_path), opts, data.state)
    strategy = host.strategy("prompt_tuning")
    model = strategy.apply(model, task, strategy.Options.model_validate({"num_virtual_tokens": 2, "init": "random"}))
    with pytest.raises(Refusal, match="prompt and prefix tuning"):
        task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=opts, args=_args(tmp_path), callbacks=[])


def _recipe(host, tmp_path, task_opts, strategy, model="random:tiny-llama", out="run", eval_opts=None):
    return validated_recipe(host, tmp_path, model=model,
                            task={"name": "preference", "train": "train.jsonl", "validation": "validation.jsonl",
                                  "max_length": 64, "num_sample_generations": 1, "sample_max_new_tokens": 4,
                                  **task_opts},
                            strategy=tiny_strategy(strategy), train={"logging_steps": 1, "learning_rate": 1e-3},
                            eval=eval_opts, output=tmp_path / out)


@pytest.mark.parametrize("strategy, method", [("full", "dpo"), ("lora", "dpo"), ("qlora", "dpo"), ("lora", "simpo"),
                                              ("lora", "orpo"), ("full", "kto")])
def test_method_by_strategy(host, tmp_path, strategy, method):
    from petune import runner

    write_jsonl(tmp_path / "train.jsonl", _pairs(6))
    write_jsonl(tmp_path / "validation.jsonl", _pairs(2))
    # LoRA DPO also evaluates every step, keeping the best checkpoint by the default metric (accuracy)
    eval_opts = {"strategy": "steps", "steps": 1, "early_stopping_patience": 3} if strategy == "lora" else None
    result = runner.run(_recipe(host, tmp_path, {"method": method}, strategy, eval_opts=eval_opts), host)
    assert result.status == "completed"
    if eval_opts:
        history = json.loads((tmp_path / "run" / "log_history.json").read_text())
        assert any("eval_accuracy" in entry and "eval_margin" in entry for entry in history)
    after, before = result.metrics["validation"], result.metrics["validation_before"]
    assert after["pairs"] == before["pairs"] == 2
    if method in ("dpo", "kto"):  # the starting model is its own reference
        assert before["accuracy"] == 0.5 and before["margin"] == 0
    assert after["margin"] != before["margin"]
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert {"before", "after", "chosen", "rejected", "messages"} <= set(sample)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved) == {"validation", "validation_before"}


def test_start_from_a_finished_sft_run(host, tmp_path, monkeypatch):
    """SFT (LoRA) → DPO: the SFT run's adapter merged into its base, with its tokenizer and template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petune import run_folders, runner
    from petune.models import resolve_model

    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"what is {a} plus 1 ?", "output": f"{a + 1}"}
                                         for a in range(8)])
    sft = validated_recipe(host, tmp_path, task={"name": "sft", "train": "sft.jsonl", "max_length": 64,
                                                 "num_sample_generations": 0, "chat_template": "chatml"},
                           strategy={"name": "lora", "r": 4}, train={"batch_size": 4}, output="runs/my_sft")
    assert runner.run(sft, host).status == "completed"

    info = resolve_model("runs/my_sft", host.model_sources())
    assert info.path.parent == tmp_path / "cache" / "runs"
    merged = AutoModelForCausalLM.from_pretrained(info.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tmp_path / "runs/my_sft/tokenizer").chat_template
    loaded = run_folders.load_run(tmp_path / "runs/my_sft", host)
    ids = tokenizer("what is 1 plus 1 ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert resolve_model("runs/my_sft", host.model_sources()).path == info.path  # cached: merged once

    write_jsonl(tmp_path / "train.jsonl", _pairs(4))
    write_jsonl(tmp_path / "validation.jsonl", _pairs(2))
    result = runner.run(_recipe(host, tmp_path, {}, "lora", model="runs/my_sft", out="runs/dpo"), host)
    assert result.status == "completed"
    assert json.loads((tmp_path / "runs/dpo/task_state.json").read_text())["chat_template"] == "chatml"
    # a preference run is a causal-LM run for the commands on finished runs
    from petune.cli import main

    assert main(["eval", "runs/dpo"]) == 0
    assert json.loads((tmp_path / "runs/dpo/eval/metrics.json").read_text())["validation"]["pairs"] == 2
    assert main(["generate", "runs/dpo", "--prompt", "what is 1 plus 1 ?", "--max-new-tokens", "3"]) == 0


def test_a_run_that_did_not_complete_is_refused_as_a_start(host, tmp_path):
    from petune.errors import UserError
    from petune.models import resolve_model

    run = tmp_path / "half"
    run.mkdir()
    for name in ("recipe.toml", "task_state.json"):
        (run / name).write_text("")
    (run / "manifest.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(UserError, match="interrupted, not completed"):
        resolve_model(str(run), host.model_sources())


def test_start_from_a_full_fine_tuning_run(host, tmp_path, monkeypatch):
    """A full run is its own model: the cached folder holds its trained weights and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from petune import runner
    from petune.models import resolve_model

    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"what is {a} plus 1 ?", "completion": f"{a + 1}"}
                                         for a in range(4)])
    sft = validated_recipe(host, tmp_path, task={"name": "sft", "train": "sft.jsonl", "max_length": 64,
                                                 "num_sample_generations": 0},
                           strategy={"name": "full"}, train={"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2},
                           output=tmp_path / "full_sft")
    assert runner.run(sft, host).status == "completed"
    info = resolve_model(str(tmp_path / "full_sft"), host.model_sources())
    started = AutoModelForCausalLM.from_pretrained(info.path).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "full_sft" / "model").state_dict()
    assert started.keys() == trained.keys() and all(torch.equal(started[k], trained[k]) for k in started)
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(info.path).chat_template
    assert template and template == AutoTokenizer.from_pretrained(tmp_path / "full_sft" / "tokenizer").chat_template
