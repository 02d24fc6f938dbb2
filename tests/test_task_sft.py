"""The sft task: data formats, chat templates, loss masks, truncation, bad rows, packing,
training with SFTTrainer (plain and LoRA), evaluation, samples and generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import validated_recipe

from petune.errors import DataError, Refusal, UserError
from petune_plugins.tasks.sft import SftOptions, SftTask


# -- helpers --------------------------------------------------------------------------------
@pytest.fixture
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)  # fresh: load_data changes it


@pytest.fixture(scope="module")
def task():
    return SftTask()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def options(**values) -> SftOptions:
    values.setdefault("max_length", 256)
    return SftOptions.model_validate(values)


def labelled_spans(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive labelled tokens (labels != -100)."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token  # labels are the tokens themselves, unshifted
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france ?"},
    {"role": "assistant", "content": "paris"},
    {"role": "user", "content": "and of the uk ?"},
    {"role": "assistant", "content": "london"},
]


# -- masks per data format ------------------------------------------------------------------
@pytest.mark.parametrize("fmt, record, answers", [
    ("alpaca", {"instruction": "translate the sentence into german .", "input": "i loved it .",
                "output": "ich habe es geliebt ."}, ["ich habe es geliebt ."]),
    ("alpaca", {"instruction": "write a short poem about the sea .", "output": "the sea is blue ."},
     ["the sea is blue ."]),
    ("prompt-completion", {"prompt": "answer the question below .", "completion": "a good movie"}, ["a good movie"]),
    ("prompt-completion", {"prompt": [{"role": "user", "content": "hello"}],
                           "completion": [{"role": "assistant", "content": "how can i help you today ?"}]},
     ["how can i help you today ?"]),
    ("messages", {"messages": CHAT}, ["paris", "london"]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"},
                                    {"from": "gpt", "value": "hello , how can i help ?"},
                                    {"from": "human", "value": "summarize the text ."},
                                    {"from": "gpt", "value": "the plot was thin ."}]},
     ["hello , how can i help ?", "the plot was thin ."]),
])
@pytest.mark.parametrize("declared", ["auto", "exact"])
def test_only_answers_and_their_eos_are_labelled(task, tokenizer, tmp_path, fmt, record, answers, declared):
    path = write_jsonl(tmp_path / "train.jsonl", [record])
    data = task.load_data(options(train=path, format=fmt if declared == "exact" else "auto"), tokenizer)
    assert data.state["format"] == fmt
    row = data.train[0]
    eos = tokenizer.eos_token
    assert labelled_spans(tokenizer, row) == [a + eos for a in answers]
    # every prompt, system and user token is masked: the unlabelled text holds no answer
    masked = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
    for answer in answers:
        assert answer not in masked
    assert row["labels"].count(tokenizer.eos_token_id) == len(answers)  # EOS trained once per answer


def test_loss_on_all_labels_every_token(task, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    row = task.load_data(options(train=path, loss_on="all"), tokenizer).train[0]
    assert row["labels"] == row["input_ids"]


def test_answer_first_conversation_is_masked_right(task, tokenizer, tmp_path):
    messages = [{"role": "assistant", "content": "hello , how can i help ?"},
                {"role": "user", "content": "i loved it ."}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": messages}])
    row = task.load_data(options(train=path), tokenizer).train[0]
    assert labelled_spans(tokenizer, row) == ["hello , how can i help ?" + tokenizer.eos_token]


# -- plain text records --------------------------------------------------------------------
TEXTS = [{"text": "### Human: what is the capital of france ? ### Assistant: paris ."},
         {"text": "the quick brown fox jumps over the lazy dog .", "id": 7}]


@pytest.mark.parametrize("declared", ["auto", "text"])
def test_text_records_train_every_token_as_written(task, tokenizer, tmp_path, declared):
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    data = task.load_data(options(train=path, format=declared), tokenizer)
    assert data.state["format"] == "text" and data.state["chat_template"] == "plain"
    assert data.notes["chat_template"] == "plain (built-in)"
    assert data.notes["train_long_texts"] == "0 of 2 longer than max_length = 256"
    for record, row in zip(TEXTS, data.train):
        # BOS, the text with no chat markup, EOS; every token after BOS is trained (EOS too: where to stop)
        assert tokenizer.decode(row["input_ids"]) == f"<s>{record['text']}</s>"
        assert row["labels"] == [-100, *row["input_ids"][1:]]


def test_long_texts_are_split_so_every_token_is_trained_once(task, tokenizer, tmp_path):
    long = {"text": " ".join(["the quick brown fox jumps over the lazy dog ."] * 4)}
    path = write_jsonl(tmp_path / "t.jsonl", [long, TEXTS[1]])
    data = task.load_data(options(train=path, max_length=16), tokenizer)
    whole = tokenizer(long["text"])["input_ids"] + [tokenizer.eos_token_id]  # BOS, text, EOS
    pieces = [row for row in data.train if row["where"].endswith(":1")]
    assert len(pieces) == len(data.train) - 1 > 1 and all(len(p["input_ids"]) <= 16 for p in pieces)
    # each piece starts on the token its predecessor ends with: its context, predicted once, there
    assert all(a["input_ids"][-1] == b["input_ids"][0] for a, b in zip(pieces, pieces[1:]))
    assert pieces[0]["input_ids"] + [t for p in pieces[1:] for t in p["input_ids"][1:]] == whole
    targets = [label for p in pieces for label in p["labels"][1:]]  # what the loss predicts
    assert targets == whole[1:]
    assert data.notes["train_long_texts"] == f"1 of 2 longer than max_length = 16, split into pieces: " \
                                             f"{len(data.train)} examples"
    assert pieces[0]["conversation"] == [{"role": "assistant", "content": long["text"]}]
    assert all(p["conversation"][0]["content"] == "" for p in pieces[1:])  # the text is stored once
    assert "train_truncated" not in data.notes


def test_a_txt_file_is_text_records_one_per_block_of_lines(task, tokenizer, tmp_path, monkeypatch):
    import gzip

    from petune_plugins.tasks import chat_records

    book = ("Chapter one .\r\nthe quick brown fox\r\njumps over the lazy dog .\r\n  \r\n\r\n"
            "a good movie with a great story\r\nand fine acting .\r\n\r\nthe end .")
    path = tmp_path / "book.txt.gz"
    path.write_bytes(gzip.compress(book.encode()))
    data = task.load_data(options(train=path), tokenizer)
    assert data.state["format"] == "text"
    texts = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in data.train]
    assert texts == ["Chapter one .\nthe quick brown fox\njumps over the lazy dog .",
                     "a good movie with a great story\nand fine acting .", "the end ."]
    assert [row["where"] for row in data.train] == [f"{path}:1", f"{path}:6", f"{path}:9"]
    assert len(task.load_data(options(train=path, max_rows=2), tokenizer).train) == 2
    # a file without blank lines is not held whole: its block is cut at a line past the limit
    monkeypatch.setattr(chat_records, "_BLOCK_CHARACTERS", 30)
    rows = list(chat_records.iter_rows(write_jsonl(tmp_path / "lines.txt", [f"line number {i} ." for i in range(6)])))
    assert [r.data["text"] for r in rows] == ["line number 0 .\nline number 1 .", "line number 2 .\nline number 3 .",
                                              "line number 4 .\nline number 5 ."]


def test_text_records_refuse_a_chat_template(task, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    with pytest.raises(DataError, match="chat_template = 'chatml' would wrap each text") as info:
        task.load_data(options(train=path, chat_template="chatml"), tokenizer)
    assert info.value.where == str(path)


@pytest.mark.parametrize("rows, message, hint", [
    ([TEXTS[0], {"text": "  "}], "t.jsonl:2: 'text' is empty: nothing to train on", None),
    ([TEXTS[0], {"instruction": "hi", "output": "ho"}], "t.jsonl:2: missing 'text'", "looks like alpaca data"),
    ([{"body": "x"}], "t.jsonl:1: cannot tell the data format", "text {text} (plain text, trained as it is)"),
])
def test_bad_text_records_name_file_and_line(task, tokenizer, tmp_path, rows, message, hint):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        task.load_data(options(train=path), tokenizer)
    assert message in str(info.value) and (hint is None or hint in info.value.hint)


def test_text_runs_continue_prompts_as_written(task, tokenizer, tiny_llama_path, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS)
    opts = options(train=train, validation=train, num_sample_generations=1)
    data = task.load_data(opts, tokenizer)
    model = _tiny_model(tiny_llama_path)
    samples = task.sample_generations(model, tokenizer, opts, data, 1)
    words = TEXTS[0]["text"].split(" ")
    assert samples[0]["messages"] == [{"role": "user", "content": " ".join(words[:len(words) // 2])}]
    assert samples[0]["expected"] == " ".join(words[len(words) // 2:])
    # the prompt goes in as written after BOS, with nothing around it: the plain continuation
    prompt = tokenizer("the quick brown", return_tensors="pt")
    greedy = model.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = tokenizer.decode(greedy[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    model.generation_config.eos_token_id = None
    assert task.generate(model, tokenizer, opts, {**data.state, "stop_tokens": []},
                         [{"role": "user", "content": "the quick brown"}], max_new_tokens=6) == expected
    # a long text split into pieces gives one sample, not one per piece, from its first piece: the whole
    # text (here 40 times the model's context) could not be a prompt
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "the quick brown fox jumps over the lazy dog . " * 1000},
                                                 TEXTS[0]])
    split_opts = options(train=long, validation=long, max_length=12)
    split_data = task.load_data(split_opts, tokenizer)
    samples = task.sample_generations(model, tokenizer, split_opts, split_data, 2)
    assert [s["where"] for s in samples] == [f"{long}:1", f"{long}:2"]
    first_piece = tokenizer.decode(split_data.validation[0]["input_ids"], skip_special_tokens=True)
    assert samples[0]["messages"][0]["content"] + " " + samples[0]["expected"] == first_piece
    rows = task.parse_inputs(opts, '{"text": "the quick brown"}\n"fox"\n', "p.jsonl")
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": "the quick brown"}],
                                             [{"role": "user", "content": "fox"}]]


# -- chat templates -------------------------------------------------------------------------
def test_builtin_template_when_the_model_has_none(task, tokenizer, tmp_path):
    assert tokenizer.chat_template is None  # like the packaged Gemma 3 base model
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hello", "completion": "world"}])
    data = task.load_data(options(train=path), tokenizer)
    assert data.state["chat_template"] == "chatml"
    assert tokenizer.chat_template  # set on the tokenizer, which the runner saves with the run
    text = tokenizer.decode(data.train[0]["input_ids"])
    # <|im_end|> is no token of this vocabulary, so turns end with the EOS token
    assert text == "<s><|im_start|>user\nhello</s>\n<|im_start|>assistant\nworld</s>\n"
    assert data.state["stop_tokens"] == ["</s>"]
    assert data.state["pad_token"] == "<pad>" and data.state["pad_token"] != tokenizer.eos_token


@pytest.mark.parametrize("name, expected", [
    ("alpaca", ("<s>Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nhello\n\n### Response:\nworld</s>\n\n")),
    ("gemma", "<s><start_of_turn>user\nhello</s>\n<start_of_turn>model\nworld</s>\n"),
    ("plain", "<s>helloworld</s>"),
])
def test_named_builtin_templates(task, tokenizer, tmp_path, name, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hello", "completion": "world"}])
    data = task.load_data(options(train=path, chat_template=name), tokenizer)
    assert tokenizer.decode(data.train[0]["input_ids"]) == expected
    assert labelled_spans(tokenizer, data.train[0]) == ["world</s>"]


def test_gemma_tokens_pick_the_gemma_template_and_its_end_of_turn(task, tokenizer, tmp_path):
    # the packaged Gemma 3 base tokenizer has <start_of_turn>/<end_of_turn> tokens but no template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    data = task.load_data(options(train=path), tokenizer)
    assert data.state["chat_template"] == "gemma"
    assert data.state["stop_tokens"] == ["<end_of_turn>", "</s>"]  # generation stops on either
    row = data.train[0]
    assert tokenizer.decode(row["input_ids"]).startswith(
        "<s><start_of_turn>user\nbe brief\n\nwhat is the capital of france ?<end_of_turn>\n<start_of_turn>model\n")
    assert labelled_spans(tokenizer, row) == ["paris<end_of_turn>", "london<end_of_turn>"]


def test_pad_token_is_never_eos(task, tokenizer, tmp_path):
    tokenizer.pad_token = tokenizer.eos_token
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    data = task.load_data(options(train=path), tokenizer)
    assert tokenizer.pad_token == "<pad>" and data.state["pad_token_id"] == tokenizer.convert_tokens_to_ids("<pad>")
    assert "vocab_size" not in data.state  # reused, nothing added


ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_the_models_own_template_is_used_when_present(task, tokenizer, tmp_path):
    tokenizer.chat_template = ZEPHYR
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    data = task.load_data(options(train=path), tokenizer)
    assert data.state["chat_template"] == "model"
    assert tokenizer.chat_template == ZEPHYR
    row = data.train[0]
    assert tokenizer.decode(row["input_ids"]).startswith("<|system|>\nbe brief</s>\n<|user|>\n")
    assert labelled_spans(tokenizer, row) == ["paris</s>", "london</s>"]


def test_model_template_asked_for_but_missing(task, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match="no chat template of its own") as info:
        task.load_data(options(train=path, chat_template="model"), tokenizer)
    assert info.value.where == "task.chat_template"


def test_template_that_rewrites_earlier_turns_is_refused(task, tokenizer, tmp_path):
    # renders the last message differently from the others: a prefix is not a prefix of the whole
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}{{ 'LAST ' }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    with pytest.raises(UserError, match="cannot be located") as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:1"
    assert "chatml" in info.value.hint


# -- truncation and dropped examples ----------------------------------------------------------
def test_truncated_and_dropped_counts(task, tokenizer, tmp_path):
    long_prompt = "the quick brown fox jumps over the lazy dog . " * 20
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "hello", "completion": "world"},                       # fits
        {"prompt": "hello", "completion": "a good movie . " * 30},         # answer cut: kept, truncated
        {"prompt": long_prompt, "completion": "too late"},                 # prompt fills max_length: dropped
    ])
    data = task.load_data(options(train=path, max_length=64), tokenizer)
    assert data.notes["train_truncated"] == 2 and data.notes["train_dropped"] == 1
    assert len(data.train) == 2
    assert all(len(ids) <= 64 for ids in data.train["input_ids"])
    assert data.train["where"] == [f"{path}:1", f"{path}:2"]  # JSON Lines: the line alone


def test_every_example_dropped_is_an_error(task, tokenizer, tmp_path):
    long_prompt = "the quick brown fox jumps over the lazy dog . " * 20
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": long_prompt, "completion": "x"}] * 3)
    with pytest.raises(DataError, match="all 3 train examples lose every answer token") as info:
        task.load_data(options(train=path, max_length=32), tokenizer)
    assert info.value.where == str(path)
    assert "max_length" in info.value.hint


# -- bad rows ------------------------------------------------------------------------------------
def test_row_missing_output_names_file_and_line(task, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}])
    with pytest.raises(DataError, match="missing 'output'") as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:2"


def test_empty_assistant_turn_names_file_and_line(task, tokenizer, tmp_path):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}
    path = write_jsonl(tmp_path / "t.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                  {"from": "gpt", "value": "hello"}]}, bad])
    with pytest.raises(DataError, match=r"conversations\[1\] is an empty assistant turn") as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:2"


def test_invalid_json_line_names_file_and_line(task, tokenizer, tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, "", '{"prompt": "a", "completion": }']
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match="invalid JSON") as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:3"


def test_bad_record_in_a_json_list_names_record_and_line(task, tokenizer, tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match=r"record \[1\]: 'output' is empty") as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:6"  # the line where record [1] starts


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": "hello"}, "must be a non-empty list"),
    ({"prompt": "x", "completion": 3}, "'completion' must be a string"),
    ({"body": "x"}, "cannot tell the data format"),
    (["not", "an", "object"], "cannot tell the data format"),
])
def test_malformed_rows(task, tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    with pytest.raises(DataError, match=message) as info:
        task.load_data(options(train=path), tokenizer)
    assert info.value.where == f"{path}:1"


def test_options_refuse_two_validation_sources(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="either a validation file"):
        options(train="a.jsonl", validation="b.jsonl", validation_split=0.1)


def test_check_refuses_an_encoder_a_too_long_max_length_and_a_missing_file(task, tiny_bert_path, tiny_llama_path,
                                                                             tmp_path):
    from petune.api import ModelInfo

    train = tmp_path / "x.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(Refusal, match="causal"):
        task.check(ModelInfo.from_path("random:tiny-bert", tiny_bert_path), options(train=str(train)))
    llama = ModelInfo.from_path("random:tiny-llama", tiny_llama_path)
    task.check(llama, options(train=str(train), max_length=256))
    with pytest.raises(Refusal, match="longer than the model's context") as info:
        task.check(llama, options(train=str(train), max_length=512))
    assert info.value.where == "task.max_length"
    with pytest.raises(DataError, match="file not found"):  # before any model loads, as in every task
        task.check(llama, options(train=str(tmp_path / "missing.jsonl")))


# -- real data --------------------------------------------------------------------------------
def _record_index(where: str) -> int:
    return int(where.rsplit("[", 1)[1].rstrip("]"))


def test_real_alpaca_rows(task, tokenizer, shared_data):
    path = shared_data / "alpaca" / "alpaca_data_random1k.json"
    data = task.load_data(options(train=path, max_rows=300, validation_split=0.1), tokenizer)
    assert data.state["format"] == "alpaca"
    notes = data.notes
    assert len(data.train) + len(data.validation) + notes["train_dropped"] + notes["validation_dropped"] == 300
    assert len(data.validation) == 30 - notes["validation_dropped"]
    records = json.loads(path.read_text())
    eos = tokenizer.eos_token
    checked = 0
    for row in data.train:
        record = records[_record_index(row["where"])]
        answer = labelled_spans(tokenizer, row)
        assert len(answer) == 1
        if len(row["input_ids"]) < 256:  # not truncated: the whole output, then EOS
            assert answer[0] == record["output"] + eos
            checked += 1
        else:  # truncated: a prefix of the output
            assert record["output"].startswith(answer[0][:20])
    assert checked > 100


def test_real_sharegpt_conversations(task, tokenizer, shared_data):
    path = shared_data / "chat" / "fastchat_dummy_conversation.json"
    data = task.load_data(options(train=path, max_rows=200), tokenizer)
    assert data.state["format"] == "sharegpt"
    assert data.train[0]["where"] == f"{path}:2 record [0]"  # the line where the record starts
    records = json.loads(path.read_text())
    checked = 0
    for row in data.train:
        record = records[_record_index(row["where"])]
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        if len(row["input_ids"]) < 256:  # not truncated: every answer, each with its EOS
            assert labelled_spans(tokenizer, row) == [a + tokenizer.eos_token for a in answers]
            checked += 1
    assert checked > 150


# -- packing ------------------------------------------------------------------------------------
def _tiny_model(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_path)


def _args(tmp_path, **extra) -> dict:
    """What the runner passes (petune.trainer_setup.training_arguments), for three CPU steps."""
    args = {"output_dir": str(tmp_path / "checkpoints"), "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
            "num_train_epochs": 1, "max_steps": 3, "seed": 0, "data_seed": 0, "gradient_checkpointing": False,
            "logging_steps": 1, "logging_first_step": True, "eval_strategy": "no", "save_strategy": "no",
            "report_to": "none", "disable_tqdm": True, "include_num_input_tokens_seen": "non_padding",
            "dataloader_num_workers": 0, "bf16": False, "fp16": False}
    return {**args, **extra}


def test_packed_examples_do_not_attend_to_each_other(task, tokenizer, tiny_llama_path, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    data = task.load_data(options(train=path, packing=True), tokenizer)
    model = _tiny_model(tiny_llama_path)
    trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=options(train=path, packing=True),
                                args=_args(tmp_path), callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # both examples in one row
    assert (batch["position_ids"][0] == 0).sum() == 2  # positions restart for the second example
    model.eval()
    with torch.no_grad():  # the packed row's loss equals the loss of the examples run one by one
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       labels=batch["labels"], fused_lm_head=True)
        nll, count = 0.0, 0
        for row in data.train:
            alone = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]),
                          use_cache=False, fused_lm_head=True)
            nll, count = nll - alone.log_probs.sum().item(), count + int(alone.label_mask.sum())
    assert int(packed.label_mask.sum()) == count
    assert -packed.log_probs.sum().item() == pytest.approx(nll, rel=1e-5)


def test_packing_is_refused_when_examples_would_see_each_other(task, tokenizer, tiny_llama_path, tmp_path):
    from petune_plugins.tasks.sft import check_packing_keeps_examples_apart

    model = _tiny_model(tiny_llama_path)
    check_packing_keeps_examples_apart(model, tokenizer)  # sdpa + position_ids: fine

    class IgnoresPositions(torch.nn.Module):  # an attention that treats the packed row as one sequence
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    with pytest.raises(Refusal, match="attend to each other") as info:
        check_packing_keeps_examples_apart(IgnoresPositions(model), tokenizer)
    assert info.value.where == "task.packing"

    from peft import PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(_tiny_model(tiny_llama_path),
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(Refusal, match="prompt or prefix tuning"):
        check_packing_keeps_examples_apart(prompt_tuned, tokenizer)


# -- training, evaluation, samples, generation --------------------------------------------------
@pytest.fixture
def small_sets(tmp_path):
    rows = [{"instruction": f"what is {a} plus {b} ?", "output": f"{a} plus {b} is {a + b} ."}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (2, 3), (4, 5), (6, 7)]]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:6])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[6:])
    test = write_jsonl(tmp_path / "test.jsonl", [{"messages": CHAT}])
    return {"train": train, "validation": validation, "test": test, "num_sample_generations": 2}


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_train_evaluate_and_generate(task, tokenizer, tiny_llama_path, tmp_path, small_sets, wrap):
    from petune.api import ModelInfo

    opts = options(**small_sets)
    data = task.load_data(opts, tokenizer)
    info = ModelInfo.from_path("random:tiny-llama", tiny_llama_path)
    model = task.build_model(info, opts, data.state)
    if wrap == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=opts,
                                args=_args(tmp_path, eval_strategy="steps", eval_steps=3), callbacks=[])
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    assert any("eval_loss" in log for log in trainer.state.log_history)

    metrics = task.evaluate(trainer, data, opts, tmp_path)
    for split in ("validation", "test"):
        assert metrics[split]["loss"] > 0 and math.isfinite(metrics[split]["loss"])
        assert metrics[split]["perplexity"] == pytest.approx(math.exp(metrics[split]["loss"]))
    assert metrics["test"]["tokens"] == sum(l != -100 for l in data.test[0]["labels"][1:])

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {s["split"] for s in samples} == {"validation"}
    assert samples[0]["expected"] == "4 plus 5 is 9 ." and isinstance(samples[0]["generated"], str)
    assert samples[0]["messages"] == [{"role": "user", "content": "what is 4 plus 5 ?"}]

    reply = task.generate(trainer.model, tokenizer, opts, data.state, [{"role": "user", "content": "hello"}],
                          max_new_tokens=8)
    assert isinstance(reply, str) and "</s>" not in reply
    # greedy is deterministic; sampling with a seed is repeatable
    assert task.generate(trainer.model, tokenizer, opts, data.state, [{"role": "user", "content": "hello"}],
                         max_new_tokens=8) == reply
    sampled = [task.generate(trainer.model, tokenizer, opts, data.state, [{"role": "user", "content": "hello"}],
                             max_new_tokens=8, temperature=1.0, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_stops_at_the_stop_token_and_stop_strings(task, tokenizer, tiny_llama_path, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hello", "completion": "world"}])
    data = task.load_data(options(train=path), tokenizer)
    model = _tiny_model(tiny_llama_path)
    model.generation_config.eos_token_id = None  # only the run's stop tokens count
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False, return_tensors="pt")
    greedy = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    greedy = greedy[0, prompt["input_ids"].shape[1]:].tolist()
    stop_at = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    # the run says this token ends a turn: generation stops there and leaves it out
    state = {**data.state, "stop_tokens": [tokenizer.convert_ids_to_tokens(greedy[stop_at])]}
    reply = task.generate(model, tokenizer, None, state, messages, max_new_tokens=12)
    assert reply == tokenizer.decode(greedy[:stop_at], skip_special_tokens=True)
    full = task.generate(model, tokenizer, None, data.state, messages, max_new_tokens=12)
    assert full == tokenizer.decode(greedy, skip_special_tokens=True)
    stop = full.strip()[2:5]
    assert task.generate(model, tokenizer, None, data.state, messages, max_new_tokens=12, stop=[stop]) == \
        full[: full.index(stop)]
    with pytest.raises(UserError, match="the model's context is 256"):
        task.generate(model, tokenizer, None, data.state, [{"role": "user", "content": "hello " * 300}])


def test_predict_from_jsonl_prompts(task, tokenizer, tiny_llama_path, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hello", "completion": "world"}])
    opts = options(train=path)
    data = task.load_data(opts, tokenizer)
    model = _tiny_model(tiny_llama_path)
    text = "\n".join([json.dumps("what is the capital of france ?"), json.dumps({"instruction": "say hi"}),
                      json.dumps({"messages": CHAT})])
    rows = task.parse_inputs(opts, text, "prompts.jsonl")
    assert rows[1]["messages"] == [{"role": "user", "content": "say hi"}]
    assert rows[2]["expected"] == "london" and rows[2]["messages"][-1]["role"] == "user"
    task_predict = task.predict(model, tokenizer, opts, data.state, rows[:1])
    lines = task.format_predictions(rows[:1], task_predict).splitlines()
    assert json.loads(lines[0])["where"] == "prompts.jsonl:1" and "generated" in json.loads(lines[0])
    with pytest.raises(DataError, match="cannot tell the format") as info:
        task.parse_inputs(opts, '"ok"\n{"body": 1}\n', "p.jsonl")
    assert info.value.where == "p.jsonl:2" and "text {text}" in info.value.hint
    with pytest.raises(DataError, match="'text' must be a string, got a number"):
        task.parse_inputs(opts, '{"text": 1}\n', "p.jsonl")


def test_registered_through_the_entry_point(host):
    assert host.task("sft").name == "sft"


def test_a_recipe_runs_end_to_end(host, tmp_path):
    """Through the runner: plan, LoRA training, metrics, samples; then generate from the run folder."""
    from petune import run_folders, runner

    rows = [{"instruction": f"what is {a} plus {b} ?", "output": f"{a + b}"} for a in range(4) for b in range(3)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = validated_recipe(host, tmp_path,
                              task={"name": "sft", "train": "train.jsonl", "validation_split": 0.25, "max_length": 128,
                                    "num_sample_generations": 1},
                              strategy={"name": "lora", "r": 4}, train={"batch_size": 4, "logging_steps": 1},
                              eval={"strategy": "epoch"})
    result = runner.run(recipe, host)
    assert result.status == "completed"
    assert set(result.metrics) == {"validation"} and result.metrics["validation"]["examples"] == 3
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "task_state.json").read_text())["chat_template"] == "chatml"
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 1
    loaded = run_folders.load_run(run_dir, host)
    assert loaded.tokenizer.chat_template  # saved with the run
    reply = loaded.task.generate(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state,
                                 [{"role": "user", "content": "what is 1 plus 1 ?"}], max_new_tokens=4)
    assert isinstance(reply, str)
