"""The seq2seq task: data layouts, prompts, the decoder-only loss mask, metrics on hand-checked
pairs, the model kinds (tiny T5-like encoder-decoder, tiny Llama-like decoder), every strategy
through the runner, generate/predict on finished runs, real Multi30k and SciTLDR rows. (The bundled
recipes run in test_bundled_recipes.py, with every other bundled recipe.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import TINY_STRATEGY_OPTIONS, petune, tiny_strategy, write_recipe

from petune.errors import DataError, Refusal, UserError
from petune_plugins.tasks import text_metrics
from petune_plugins.tasks.seq2seq import (
    DataFile,
    Seq2SeqOptions,
    Seq2SeqTask,
    as_data_file,
    read_pairs,
)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_t5_path() -> Path:
    """A 2+2-layer T5-like encoder-decoder with random weights (cached)."""
    from petune_plugins.sources.random_init import RandomInitSource

    return RandomInitSource().resolve("random:tiny-t5")


def info_of(path: Path, name: str):
    from petune.api import ModelInfo

    return ModelInfo.from_path(name, path)


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # fresh: load_data may change it


PAIRS = [("the quick brown fox", "der schnelle braune fuchs"), ("a good movie", "ein guter film"),
         ("i loved it", "ich liebte es"), ("the capital of france is paris", "die hauptstadt ist paris")]


def write_pair_files(folder: Path, stem: str = "train", pairs=PAIRS, repeat: int = 2) -> tuple[Path, Path]:
    src, tgt = folder / f"{stem}.en", folder / f"{stem}.de"
    src.write_text("".join(a + "\n" for a, _ in pairs * repeat), encoding="utf-8")
    tgt.write_text("".join(b + "\n" for _, b in pairs * repeat), encoding="utf-8")
    return src, tgt


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def options(**values) -> Seq2SeqOptions:
    return Seq2SeqOptions.model_validate(values)


# -- metrics on hand-checked pairs ----------------------------------------------------------
def test_bleu_and_rouge_on_a_hand_checked_pair():
    hyp, ref = "the cat sat on the red mat", "the cat sat on the mat"
    scores, details = text_metrics.bleu_chrf([hyp], [[ref]])
    # n-gram precisions 6/7, 4/6, 3/5, 2/4; hypothesis longer than the reference: no brevity penalty
    expected = 100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert scores["bleu"] == pytest.approx(expected, abs=1e-6)
    assert details["bleu"]["precisions"] == pytest.approx([100 * 6 / 7, 100 * 4 / 6, 100 * 3 / 5, 100 * 2 / 4])
    assert details["bleu"]["bp"] == 1.0
    assert "nrefs:1" in details["bleu"]["signature"] and "tok:13a" in details["bleu"]["signature"]
    assert "nrefs:1" in details["chrf"]["signature"]
    assert 0 < scores["chrf"] < 100
    rouge, _ = text_metrics.rouge([hyp], [[ref]])
    assert rouge["rouge1"] == pytest.approx(100 * 12 / 13)  # 6 shared words: P 6/7, R 6/6
    assert rouge["rouge2"] == pytest.approx(100 * 16 / 22)  # 4 shared bigrams: P 4/6, R 4/5
    assert rouge["rougeL"] == pytest.approx(100 * 12 / 13)  # LCS of 6 words
    assert rouge["rougeLsum"] == pytest.approx(100 * 12 / 13)


def test_identical_outputs_score_100_and_multi_reference_takes_the_best():
    scores, details = text_metrics.bleu_chrf(["a b c d e"], [["a b c d e"]])
    assert scores == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}
    # the second reference matches: multi-reference scores as well as the matching one alone
    outputs = ["the cat sat on the red mat", "hello there my friend"]
    refs = [["a dog ran", "the cat sat on the red mat"], ["hello there my friend"]]
    scores, details = text_metrics.bleu_chrf(outputs, refs)
    assert scores["bleu"] == pytest.approx(100) and "nrefs:var" in details["bleu"]["signature"]
    rouge, _ = text_metrics.rouge(outputs, refs)
    assert all(v == pytest.approx(100) for v in rouge.values())


def test_rouge_stems_and_lsum_splits_sentences():
    rouge, details = text_metrics.rouge(["the cats were running"], [["the cat was running"]])
    assert rouge["rouge1"] == pytest.approx(100 * 3 / 4)  # cats→cat, running→run (stemmed); were≠was
    assert details["rouge"]["stemming"] is True
    assert text_metrics.sentences_per_line("One here. Two there! Three?") == "One here.\nTwo there!\nThree?"
    swapped, _ = text_metrics.rouge(["c d. a b."], [["a b. c d."]])
    assert swapped["rougeL"] == pytest.approx(50)  # one sequence: LCS 2 of 4
    assert swapped["rougeLsum"] == pytest.approx(100)  # sentence by sentence: both found whole


# -- options --------------------------------------------------------------------------------
def test_options_are_checked(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown placeholder"):
        options(train="x.jsonl", prompt="Translate {text}")
    with pytest.raises(ValidationError, match="needs a \\{source\\} placeholder"):
        options(train="x.jsonl", prompt="Translate this")
    with pytest.raises(ValidationError, match="both source_lang and target_lang"):
        options(train="x.jsonl", source_lang="English")
    with pytest.raises(ValidationError, match="so set source_lang"):
        options(train="x.jsonl", prompt="{source_lang}: {source}")
    with pytest.raises(ValidationError, match="either path"):
        options(train={"path": "x.jsonl", "source": "a.en"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        options(train="x.jsonl", beams=4)
    assert options(train={"source": "a.en", "target": "a.de"}).train.source == Path("a.en")


# -- reading data -----------------------------------------------------------------------------
def test_line_aligned_files(tmp_path):
    src, tgt = write_pair_files(tmp_path)
    tgt.write_text(tgt.read_text() + "\n\n")  # trailing blank lines on both sides are fine ...
    src.write_text(src.read_text() + "\n\n")
    pairs, blank = read_pairs(DataFile(source=src, target=tgt), options(train=str(src)))
    assert len(pairs) == 8 and blank == 0
    assert pairs[1].source == "a good movie" and pairs[1].references == ["ein guter film"]
    assert pairs[1].where == f"{src}:2"


def test_line_aligned_files_out_of_step_are_errors(tmp_path):
    src, tgt = write_pair_files(tmp_path)
    tgt.write_text("".join(b + "\n" for _, b in PAIRS))  # 4 lines against 8
    with pytest.raises(DataError, match="different lengths: train.en has 8 lines, train.de has 4"):
        read_pairs(DataFile(source=src, target=tgt), options(train=str(src)))
    lines = src.read_text().splitlines()
    lines[2] = ""
    src.write_text("\n".join(lines) + "\n")
    write_pair_files(tmp_path, stem="x")
    with pytest.raises(DataError, match="line 3 is blank in train.en but not in x.de") as info:
        read_pairs(DataFile(source=src, target=tmp_path / "x.de"), options(train=str(src)))
    assert info.value.where == f"{src}:3"


def test_records_lists_multi_reference_and_dotted_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"document": ["First sentence.", "Second one."], "summary": ["ref one", "ref two"]},
        {"document": "Plain text.", "summary": "only ref", "extra": {"more": ["x", "y"]}},
    ])
    pairs, _ = read_pairs(DataFile(path=path), options(train=str(path)))
    assert pairs[0].source == "First sentence. Second one." and pairs[0].references == ["ref one", "ref two"]
    assert pairs[1].references == ["only ref"]
    joined, _ = read_pairs(DataFile(path=path), options(train=str(path), target_list="sentences"))
    assert joined[0].references == ["ref one ref two"]
    wmt = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"en": "a good movie", "de": "ein guter film"},
                                                "alt": ["ein gutes kino"]}])
    pairs, _ = read_pairs(DataFile(path=wmt), options(train=str(wmt), source_field="translation.en",
                                                      target_field="translation.de", references_field="alt"))
    assert pairs[0].source == "a good movie" and pairs[0].references == ["ein guter film", "ein gutes kino"]


def test_csv_and_missing_fields_name_the_record(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('src,tgt\n"hello, world",hallo welt\n')
    pairs, _ = read_pairs(DataFile(path=csv), options(train=str(csv)))
    assert pairs[0].source == "hello, world" and pairs[0].references == ["hallo welt"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell which field holds the source.*'question'") as info:
        read_pairs(DataFile(path=bad), options(train=str(bad)))
    assert info.value.where == f"{bad}:1"
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"source": "a", "target": "b"}, {"source": "c", "target": " "}])
    with pytest.raises(DataError, match="target is empty") as info:
        read_pairs(DataFile(path=empty), options(train=str(empty)))
    assert info.value.where == f"{empty}:2"


def test_eval_data_path_finds_its_target_file(tmp_path):
    write_pair_files(tmp_path)
    test_src, test_tgt = write_pair_files(tmp_path, stem="test")
    opts = options(train={"source": str(tmp_path / "train.en"), "target": str(tmp_path / "train.de")})
    assert as_data_file(test_src, opts) == DataFile(source=test_src, target=test_tgt)
    assert as_data_file(tmp_path / "x.jsonl", opts) == DataFile(path=tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="cannot be told"):
        as_data_file(tmp_path / "test.txt", opts)


# -- model kinds, prompts and masks -----------------------------------------------------------
def test_peft_task_type_follows_the_model_kind(tiny_t5_path, tiny_llama_path, tiny_bert_path, tmp_path):
    src, tgt = write_pair_files(tmp_path)
    opts = options(train={"source": str(src), "target": str(tgt)}, max_source_length=64, max_target_length=32)
    task = Seq2SeqTask()
    t5, llama = info_of(tiny_t5_path, "t5"), info_of(tiny_llama_path, "llama")
    task.check(t5, opts)
    task.check(llama, opts)
    assert (task.peft_task_type_for(t5.config), task.peft_task_type_for(llama.config)) == ("SEQ_2_SEQ_LM", "CAUSAL_LM")
    assert vars(task) == {} and Seq2SeqTask.peft_task_type == "SEQ_2_SEQ_LM"  # checking changes nothing
    with pytest.raises(Refusal, match="cannot generate text"):
        Seq2SeqTask().check(info_of(tiny_bert_path, "bert"), opts)
    with pytest.raises(Refusal, match="more than the model takes"):
        Seq2SeqTask().check(info_of(tiny_llama_path, "llama"), options(train=str(src), max_source_length=200))
    with pytest.raises(DataError, match="file not found"):
        Seq2SeqTask().check(info_of(tiny_t5_path, "t5"), options(train={"source": str(src), "target": "nope.de"}))


def test_encoder_decoder_inputs_and_labels(tiny_t5_path, tmp_path):
    src, tgt = write_pair_files(tmp_path)
    task, tokenizer = Seq2SeqTask(), tokenizer_of(tiny_t5_path)
    opts = options(train={"source": str(src), "target": str(tgt)}, source_lang="English", target_lang="German")
    task.check(info_of(tiny_t5_path, "t5"), opts)
    data = task.load_data(opts, tokenizer)
    row = data.train[0]
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True).strip() == \
        "translate English to German: the quick brown fox"
    assert row["labels"] == tokenizer("der schnelle braune fuchs")["input_ids"]  # target + </s>
    assert row["labels"][-1] == tokenizer.eos_token_id
    assert data.state["model_kind"] == "encoder-decoder" and data.state["prompt"].startswith("translate")


def test_decoder_only_loss_is_on_the_target_and_its_stop_token(tiny_llama_path, tmp_path):
    src, tgt = write_pair_files(tmp_path)
    task, tokenizer = Seq2SeqTask(), tokenizer_of(tiny_llama_path)
    opts = options(train={"source": str(src), "target": str(tgt)}, source_lang="English", target_lang="German",
                   prompt="translate the sentence into german .\n{source}", max_source_length=64, max_target_length=32)
    task.check(info_of(tiny_llama_path, "llama"), opts)
    data = task.load_data(opts, tokenizer)
    assert data.notes["chat_template"] == "chatml (built-in)"  # the sft task's choice for this tokenizer
    for row, (source, target) in zip(data.train, PAIRS):
        ids, labels = row["input_ids"], row["labels"]
        labelled = [i for i, label in enumerate(labels) if label != -100]
        assert labelled == list(range(labelled[0], labelled[-1] + 1))  # one run ...
        assert not tokenizer.decode(ids[labelled[-1] + 1:]).strip()  # ... followed by template whitespace only
        assert all(labels[i] == ids[i] for i in labelled)  # unshifted: the trainer shifts
        assert tokenizer.decode([ids[i] for i in labelled]) == target + tokenizer.eos_token  # chatml ends with EOS
        prompt = tokenizer.decode(ids[: labelled[0]])
        assert f"translate the sentence into german .\n{source}" in prompt and target not in prompt
        assert row["source"] == source and row["references"] == [target]


def test_lengths_are_cut_and_counted(tiny_t5_path, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"source": "the quick brown fox jumps over the lazy dog",
                                               "target": "a good movie with a great story"}] * 3)
    task, tokenizer = Seq2SeqTask(), tokenizer_of(tiny_t5_path)
    opts = options(train=str(path), max_source_length=3, max_target_length=2)
    task.check(info_of(tiny_t5_path, "t5"), opts)
    data = task.load_data(opts, tokenizer)
    assert data.notes["train_source_truncated"] == 3 and data.notes["train_target_truncated"] == 3
    assert data.train[0]["source"] == "the quick brown"
    assert data.train[0]["references"] == ["a good movie with a great story"]  # scored on the full reference
    assert len(data.train[0]["labels"]) == 3  # 2 tokens + </s>


# -- training, evaluation, generation through the runner --------------------------------------
STRATEGIES = TINY_STRATEGY_OPTIONS
MODELS = {"t5": "random:tiny-t5", "llama": "random:tiny-llama"}
METRICS = {"loss", "perplexity", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_words"}


def recipe(tmp_path: Path, model: str, strategy: str, **task) -> Path:
    write_pair_files(tmp_path)
    write_pair_files(tmp_path, stem="test", repeat=1)
    return write_recipe(tmp_path / "recipe.toml", model=MODELS[model],
                        task={"name": "seq2seq", "train": {"source": "train.en", "target": "train.de"},
                              "validation_split": 0.25, "test": {"source": "test.en", "target": "test.de"},
                              "source_lang": "English", "target_lang": "German", "max_source_length": 16,
                              "max_target_length": 8, "max_new_tokens": 4, "num_beams": 2, **task},
                        strategy=tiny_strategy(strategy), train={"learning_rate": 1e-3}, eval={"strategy": "epoch"})


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model", ["llama"])  # t5 with every strategy: tests/test_matrix.py
def test_every_strategy_trains_and_scores(model, strategy, tmp_path, host):
    from petune.recipe import load_recipe
    from petune.run_folders import load_run
    from petune.runner import run

    result = run(load_recipe(recipe(tmp_path, model, strategy), host), host)
    assert result.status == "completed"
    if strategy != "full":
        assert 0 < result.trainable_parameters < result.total_parameters / 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert METRICS <= set(metrics["test"]) and METRICS <= set(metrics["validation"])
    assert all(math.isfinite(metrics["test"][k]) for k in METRICS - {"perplexity"})
    predictions = (tmp_path / "run" / "reports" / "predictions_test.jsonl").read_text().splitlines()
    assert [json.loads(p)["source"] for p in predictions] == [a for a, _ in PAIRS]
    report = json.loads((tmp_path / "run" / "reports" / "seq2seq_test.json").read_text())
    assert report["bleu"]["signature"].startswith("nrefs:1|") and "signature" in report["chrf"]
    assert (tmp_path / "run" / "reports" / "predictions_test.tsv").read_text().startswith(
        "where\tsource\treference\toutput\n")
    loaded = load_run(tmp_path / "run", host)  # the run folder alone: base + trained weights
    assert loaded.task.peft_task_type_for(loaded.model.config) == ("SEQ_2_SEQ_LM" if model == "t5" else "CAUSAL_LM")
    assert isinstance(loaded.task.generate(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state,
                                           [{"role": "user", "content": "a good movie"}], max_new_tokens=3), str)


def test_a_trained_model_learns_and_generate_predict_work_on_the_run(tmp_path, host):
    """The tiny Llama learns a 1-pair 'translation'; then the run folder alone serves generate
    (the CLI path too), predict and parse_inputs."""
    from petune import run_folders, runner
    from petune.recipe import load_recipe

    source, target = "a good movie today", "ein guter film heute"
    write_pair_files(tmp_path, pairs=[(source, target)], repeat=8)
    pair = {"source": "train.en", "target": "train.de"}
    path = write_recipe(tmp_path / "recipe.toml",
                        task={"name": "seq2seq", "train": pair, "test": pair, "source_lang": "English",
                              "target_lang": "German", "max_new_tokens": 24, "max_source_length": 32,
                              "max_target_length": 24},
                        strategy={"name": "full"}, train={"max_steps": 60, "batch_size": 4, "learning_rate": 3e-3},
                        eval={"strategy": "epoch"})
    result = runner.run(load_recipe(path, host), host)
    assert result.metrics["test"]["bleu"] == pytest.approx(100)
    assert result.metrics["test"]["chrf"] == pytest.approx(100)
    assert result.metrics["test"]["gen_words"] == len(target.split())
    loaded = run_folders.load_run(tmp_path / "run", host)
    task = loaded.task
    text = task.generate(loaded.model, loaded.tokenizer, loaded.recipe.task, loaded.state,
                         [{"role": "user", "content": source}], max_new_tokens=24)
    assert text == target
    rows = task.parse_inputs(loaded.recipe.task, f"{source}\n\n", "in.txt")
    out = task.format_predictions(rows, task.predict(loaded.model, loaded.tokenizer, loaded.recipe.task,
                                                     loaded.state, rows))
    assert json.loads(out) == {"where": "in.txt:1", "source": source, "output": target}
    rows = task.parse_inputs(loaded.recipe.task, json.dumps({"source": source, "target": target}) + "\n", "in.jsonl")
    assert rows[0].references == [target]
    result = petune("generate", tmp_path / "run", "--prompt", source, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == target


def test_eval_command_with_a_line_aligned_test_file(tmp_path, host):
    from petune import runner
    from petune.recipe import load_recipe

    runner.run(load_recipe(recipe(tmp_path, "t5", "lora", generate_on=["test"]), host), host)
    result = petune("eval", tmp_path / "run", "--data", tmp_path / "test.en", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"]["examples"] == len(PAIRS) and "bleu" in metrics["test"]
    assert "bleu" not in metrics["validation"]  # generate_on = ["test"]: loss only


def test_generate_needs_a_source(tiny_t5_path, tmp_path):
    task = Seq2SeqTask()
    with pytest.raises(UserError, match="nothing to translate"):
        task.generate(None, None, options(train="x.jsonl"), {}, [{"role": "system", "content": "hi"}])


# -- real data ----------------------------------------------------------------------------------
def test_real_multi30k_rows(shared_data, tiny_t5_path):
    folder = shared_data / "multi30k"
    if not folder.is_dir():
        pytest.skip("multi30k not in shared data")
    task, tokenizer = Seq2SeqTask(), tokenizer_of(tiny_t5_path)
    opts = options(train={"source": str(folder / "train.en"), "target": str(folder / "train.de")},
                   test={"source": str(folder / "test_2016_flickr.en"), "target": str(folder / "test_2016_flickr.de")},
                   source_lang="English", target_lang="German", max_rows=300)
    task.check(info_of(tiny_t5_path, "t5"), opts)
    data = task.load_data(opts, tokenizer)
    assert len(data.train) == 300 and len(data.test) == 300
    first_en = (folder / "train.en").read_text(encoding="utf-8").splitlines()[0]
    first_de = (folder / "train.de").read_text(encoding="utf-8").splitlines()[0]
    assert data.train[0]["source"] == first_en and data.train[0]["references"] == [first_de]


def test_real_scitldr_rows(shared_data, tiny_llama_path):
    folder = shared_data / "summarization"
    if not folder.is_dir():
        pytest.skip("summarization (SciTLDR) not in shared data")
    task, tokenizer = Seq2SeqTask(), tokenizer_of(tiny_llama_path)
    opts = options(train=str(folder / "scitldr_a_train.jsonl"), test=str(folder / "scitldr_a_test.jsonl"),
                   max_rows=200, max_source_length=100, max_target_length=40)
    task.check(info_of(tiny_llama_path, "llama"), opts)
    data = task.load_data(opts, tokenizer)
    raw = [json.loads(line) for line in (folder / "scitldr_a_test.jsonl").read_text().splitlines()[:200]]
    assert len(data.test) == 200
    assert data.test["references"] == [r["target"] for r in raw]  # every TLDR is a reference
    assert max(len(r) for r in data.test["references"]) > 1
    assert data.notes["train_source_truncated"] > 0  # abstracts are longer than 100 tokens
    joined = " ".join(raw[0]["source"])
    assert joined.startswith(data.test[0]["source"])
