"""The reward task: pairs to one scored sequence per answer (decoder and encoder), metrics by
hand, a few steps with full / lora / qlora, save → reload gives the same scores, and the
scalar score through ``petune predict`` and ``/v1/predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import petune, tiny_strategy, validated_recipe

from petune.errors import DataError
from petune_plugins.tasks.reward import RewardOptions, RewardTask, reward_metrics, score_pairs

PROMPT, GOOD, BAD = "what is the capital of france ?", "the capital of france is paris .", "i hated it ."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"{PROMPT} {i}", "chosen": f"{GOOD} {i}", "rejected": f"{BAD} {i}"} for i in range(n)]


def options(**values) -> RewardOptions:
    values.setdefault("max_length", 64)
    return RewardOptions.model_validate(values)


def test_metrics_by_hand_on_two_pairs():
    m = reward_metrics([1.0, -0.5], [0.0, 0.5])  # pair 1 right by 1.0, pair 2 wrong by 1.0
    assert m == {"accuracy": 0.5, "margin": 0.0, "chosen_reward": 0.25, "rejected_reward": 0.25, "pairs": 2}
    assert reward_metrics([2.0, 1.0], [1.0, 1.0])["accuracy"] == 0.75  # a tie counts half


def test_decoder_sequences_are_the_chat_prompt_and_answer(tiny_llama_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    hh = {"chosen": f"\n\nHuman: {PROMPT}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {PROMPT}\n\nAssistant: {BAD}"}
    rows = {}
    for name, record in (("pairs", {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}), ("hh-rlhf", hh)):
        data = RewardTask().load_data(options(train=write_jsonl(tmp_path / f"{name}.jsonl", [record])), tokenizer)
        assert data.state["encoding"] == "chat" and data.state["format"] == name
        rows[name] = (data.train[0]["chosen_ids"], data.train[0]["rejected_ids"])
    assert rows["pairs"] == rows["hh-rlhf"]
    chosen, rejected = rows["pairs"]
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id  # chatml here: the turn ends with EOS, read by the head
    shared = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
    assert GOOD in tokenizer.decode(chosen[shared:]) and PROMPT in tokenizer.decode(chosen[:shared])


def test_encoder_sequences_are_a_text_pair_and_long_prompts_keep_their_end(tiny_bert_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    long_prompt = " ".join(["words"] * 50) + " " + PROMPT
    data = RewardTask().load_data(options(train=write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": long_prompt, "chosen": GOOD, "rejected": BAD}]), max_length=32, max_prompt_length=12), tokenizer)
    assert data.state["encoding"] == "pair" and data.notes["train_prompts_cut"] == 1
    chosen = data.train[0]["chosen_ids"]
    assert len(chosen) <= 32 and chosen[0] == tokenizer.cls_token_id and chosen.count(tokenizer.sep_token_id) == 2
    text = tokenizer.decode(chosen)
    assert "of france?" in text.split("[SEP]")[0] and "paris" in text.split("[SEP]")[1]  # the prompt's end, the answer


def test_pairs_cut_to_nothing_or_identical_are_counted(tiny_bert_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    rows = [*_pairs(2), {"prompt": PROMPT, "chosen": GOOD + " a b c", "rejected": GOOD + " x y z"}]
    data = RewardTask().load_data(options(train=write_jsonl(tmp_path / "t.jsonl", rows), max_length=16,
                                          max_prompt_length=8), tokenizer)
    assert data.notes["train_dropped_identical"] == 1 and len(data.train) == 2  # cut to "the capital of" on both
    with pytest.raises(DataError, match="no train pairs left"):
        RewardTask().load_data(options(train=write_jsonl(tmp_path / "u.jsonl", _pairs(2)), max_length=12,
                                       max_prompt_length=11), tokenizer)  # no room left for the answers


def _recipe(host, tmp_path, strategy: str, model: str):
    return validated_recipe(host, tmp_path, model=model,
                            task={"name": "reward", "train": "train.jsonl", "validation": "validation.jsonl",
                                  "max_length": 48},
                            strategy=tiny_strategy(strategy),
                            train={"max_steps": 3, "logging_steps": 1, "learning_rate": 1e-3})


@pytest.mark.parametrize("strategy, model", [("full", "random:tiny-llama"), ("lora", "random:tiny-llama"),
                                             ("qlora", "random:tiny-llama"), ("lora", "random:tiny-bert")])
def test_reward_by_strategy_trains_saves_and_reloads(host, tmp_path, strategy, model):
    from petune import run_folders, runner

    write_jsonl(tmp_path / "train.jsonl", _pairs(6))
    write_jsonl(tmp_path / "validation.jsonl", _pairs(2))
    result = runner.run(_recipe(host, tmp_path, strategy, model), host)
    assert result.status == "completed"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved) == {"validation", "validation_before"}
    after, before = saved["validation"], saved["validation_before"]
    assert after["pairs"] == before["pairs"] == 2 and after["margin"] != before["margin"]
    if strategy != "full":  # the new head trains and is saved with the adapter
        from safetensors.torch import load_file

        names = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
        assert any(("score" in n or "classifier" in n) and "lora" not in n for n in names), sorted(names)
    loaded = run_folders.load_run(tmp_path / "run", host)
    data = loaded.task.load_eval_data(loaded.recipe.task, loaded.tokenizer, loaded.state)
    # a reloaded 4-bit model computes in bf16 (see petune_plugins/strategies/qlora.py): scores agree to bf16 rounding
    tolerance = {"rel": 2e-2} if strategy == "qlora" else {"abs": 1e-4}
    assert score_pairs(loaded.model, data.validation) == pytest.approx(after, **tolerance)


def test_predict_and_serve_return_a_scalar_score(host, tmp_path):
    from petune import run_folders, runner

    write_jsonl(tmp_path / "train.jsonl", _pairs(6))
    write_jsonl(tmp_path / "validation.jsonl", _pairs(2))
    assert runner.run(_recipe(host, tmp_path, "lora", "random:tiny-llama"), host).status == "completed"
    run_dir = tmp_path / "run"
    loaded = run_folders.load_run(run_dir, host)
    task = loaded.task
    rows = task.parse_inputs(loaded.recipe.task, f"{PROMPT}\t{GOOD}\n{BAD}\n", "stdin")
    assert rows[1]["prompt"] == []
    direct = task.predict(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state, rows)
    assert [set(p) for p in direct] == [{"score"}] * 2 and all(isinstance(p["score"], float) for p in direct)
    # the pair's own score: the chosen sequence of the validation data, scored as an input
    records = task.parse_inputs(loaded.recipe.task, json.dumps({"prompt": f"{PROMPT} 0", "completion": f"{GOOD} 0"}),
                                "in.jsonl")
    data = task.load_eval_data(loaded.recipe.task, loaded.tokenizer, loaded.state)
    from petune_plugins.tasks.reward import sequence_scores

    expected = sequence_scores(loaded.model, [data.validation[0]["chosen_ids"]])[0]
    got = task.predict(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state, records)[0]["score"]
    assert got == pytest.approx(expected, abs=1e-5)

    (tmp_path / "in.txt").write_text(f"{PROMPT}\t{GOOD}\n")
    cli = petune("predict", run_dir, "--input", tmp_path / "in.txt")
    assert cli.returncode == 0, cli.stderr
    header, line = cli.stdout.splitlines()[:2]
    assert header == "prompt\tanswer\tscore" and float(line.split("\t")[-1]) == pytest.approx(direct[0]["score"], abs=1e-3)

    from fastapi.testclient import TestClient

    from petune.serve.app import create_app
    from petune.serve.registry import Registry

    registry = Registry([("rm", run_dir)], host)
    registry.load()
    with TestClient(create_app(registry)) as client:
        response = client.post("/v1/predict", json={"model": "rm", "inputs": [{"text": PROMPT, "text_pair": GOOD}, BAD]})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data[0]["score"] == pytest.approx(direct[0]["score"], abs=1e-4)
    assert data[1]["score"] == pytest.approx(direct[1]["score"], abs=1e-4)


def test_bad_prediction_input_names_file_and_line(host, tmp_path):
    task = RewardTask()
    opts = options(train=tmp_path / "t.jsonl")
    with pytest.raises(DataError) as exc:
        task.parse_inputs(opts, '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "in.jsonl")
    assert exc.value.where == "in.jsonl:2" and "completion" in str(exc.value)
