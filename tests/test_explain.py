"""petune explain: attention maps, rollout, attributions, pictures, and the command on saved runs."""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_recipe
from PIL import Image
from rich.console import Console

from petune import explain
from petune.errors import UserError

DATA_ROWS = "".join(f"the movie was good {i},positive\nthe film was bad {i},negative\n" for i in range(12))


# -- helpers ------------------------------------------------------------------------------------
def make_run(host, folder: Path, name: str, *, model: str = "random:tiny-bert", task: dict, strategy: dict,
             train: dict | None = None) -> Path:
    """Train a tiny run (two steps of batch 8 unless ``train`` says) through the real runner and return its folder."""
    from petune import runner
    from petune.recipe import load_recipe

    run_dir = folder / "runs" / name
    recipe = write_recipe(folder / f"{name}.toml", model=model, task=task, strategy=strategy,
                          train={"batch_size": 8, **(train or {})}, output=run_dir)
    result = runner.run(load_recipe(recipe, host), host)
    assert result.status == "completed", result.error
    return run_dir


def classification_task(folder: Path) -> dict:
    (folder / "train.csv").write_text("text,label\n" + DATA_ROWS)
    return {"name": "classification", "train": "train.csv", "validation_split": 0.0, "max_length": 32}


def parse(argv: list[str]):
    from petune import inspect_commands

    parser = argparse.ArgumentParser(prog="petune")
    inspect_commands.add_to(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.fixture
def terminal(monkeypatch):
    """What the commands print on stdout, with colours."""
    from petune import inspect_commands

    buffer = io.StringIO()
    monkeypatch.setattr(inspect_commands, "out", Console(file=buffer, force_terminal=True, color_system="truecolor",
                                                         width=200))
    return buffer


@pytest.fixture(scope="module")
def tiny_classifier(tiny_bert_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_path, num_labels=2)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_bert_path)


# -- rollout ----------------------------------------------------------------------------------------
def test_rollout_matches_hand_computed_two_layer_case():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    # A' = 0.5 I + 0.5 A:  A1' = [[1, 0], [.25, .75]],  A2' = [[.75, .25], [0, 1]]
    # rollout = A2' @ A1' = [[.75 + .25 * .25, .25 * .75], [.25, .75]]
    expected = torch.tensor([[0.8125, 0.1875], [0.25, 0.75]])
    assert torch.allclose(explain.attention_rollout(torch.stack([a1, a2])), expected)
    # the same maps as the mean of two heads per layer give the same rollout
    shift = 0.25 * torch.tensor([[-1.0, 1.0], [0.0, 0.0]])
    heads = torch.stack([torch.stack([a1 + shift, a1 - shift]), torch.stack([a2, a2])])
    assert torch.allclose(explain.attention_rollout(heads), expected)


def test_rollout_drops_prefix_key_columns_and_renormalises():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    prefixed = torch.stack([torch.cat([torch.full((2, 1), 1.0), a], dim=1) / 2 for a in (a1, a2)])  # rows sum to 1
    expected = explain.attention_rollout(torch.stack([a1, a2]))
    assert torch.allclose(explain.attention_rollout(prefixed, prefix=1), expected)
    with pytest.raises(ValueError):
        explain.attention_rollout(prefixed)  # not square without dropping the prefix


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(3, 2, 5, 5)
    assert torch.allclose(explain.attention_rollout(eye), torch.eye(5))


# -- attention maps and pictures --------------------------------------------------------------------
def test_attention_maps_shape_rows_and_png_size(tiny_classifier, tmp_path):
    model, tokenizer = tiny_classifier
    assert model.config._attn_implementation == "sdpa"  # loaded as trained: no attention weights
    text = "the quick brown fox jumps over the lazy dog"
    e = explain.explain(model, tokenizer, "label", text, labels=["neg", "pos"], steps=4)
    assert model.config._attn_implementation == "eager"
    tokens = len(tokenizer(text)["input_ids"])
    config = model.config
    assert tuple(e.attentions.shape) == (config.num_hidden_layers, config.num_attention_heads, tokens, tokens)
    assert torch.allclose(e.attentions.sum(-1), torch.ones(e.attentions.shape[:-1]), atol=1e-5)
    assert (e.virtual, e.prefix) == (0, 0)
    assert e.encoded.labels[0] == "[CLS]" and e.encoded.labels[1:4] == ["the", "quick", "brown"]
    rollout = e.rollout()
    assert rollout.shape == (tokens, tokens) and torch.allclose(rollout.sum(-1), torch.ones(tokens), atol=1e-5)

    png = explain.plot_attention(e, tmp_path / "attention.png", layer=1, head=3)
    width, height = explain.ATTENTION_FIGSIZE
    assert Image.open(png).size == (int(width * explain.DPI), int(height * explain.DPI))
    many = explain.explain(model, tokenizer, "label", " ".join(["fox"] * 90), labels=["neg", "pos"], steps=2)
    assert Image.open(explain.plot_attention(many, tmp_path / "long.png")).size == Image.open(png).size
    attributions = explain.plot_attributions(e, tmp_path / "attributions.png")
    assert Image.open(attributions).format == "PNG"


def test_causal_attention_is_lower_triangular_and_explains_the_next_token(tiny_llama_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    e = explain.explain(model, tokenizer, "next_token", "the capital of france is", steps=4)
    layers, heads, queries, keys = e.attentions.shape
    assert (layers, heads) == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert queries == keys == len(tokenizer("the capital of france is")["input_ids"])
    assert torch.all(e.attentions.triu(1) == 0)  # nothing attends to later tokens
    assert torch.allclose(e.attentions.sum(-1), torch.ones(layers, heads, queries), atol=1e-5)
    assert len(e.targets) == 1 and e.targets[0].title.startswith("next token")
    assert e.encoded.special[0] and e.targets[0].scores[0] == 0.0  # BOS is never attributed
    explain.plot_attention(e, tmp_path / "a.png")


def test_integrated_gradients_add_up_to_the_change_in_log_probability(tiny_classifier):
    """Completeness: attributions sum to f(input) - f(baseline), f = log p(predicted label)."""
    model, tokenizer = tiny_classifier
    e = explain.explain(model, tokenizer, "label", "a good movie with a great story", labels=["a", "b"], steps=200)
    inputs = e.encoded.inputs
    label = 0 if e.prediction.startswith("a ") else 1
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    pad = model.get_input_embeddings()(torch.full_like(inputs["input_ids"], tokenizer.pad_token_id))
    special = torch.tensor(e.encoded.special).view(1, -1, 1)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        score = model(inputs_embeds=embeds, **rest).logits.log_softmax(-1)[0, label]
        base = model(inputs_embeds=torch.where(special, embeds, pad), **rest).logits.log_softmax(-1)[0, label]
    total = sum(e.targets[0].scores)
    assert total == pytest.approx(float(score - base), abs=2e-3 + 0.02 * abs(float(score - base)))
    assert all(s == 0.0 for s, sp in zip(e.targets[0].scores, e.encoded.special) if sp)


def test_gradient_times_input(tiny_classifier):
    model, tokenizer = tiny_classifier
    e = explain.explain(model, tokenizer, "label", "a bad film", labels=["a", "b"], method="gradxinput")
    scores = e.targets[0].scores
    assert len(scores) == e.encoded.length and any(s != 0 for s in scores)


def test_token_classification_explains_each_predicted_entity(tiny_bert_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    labels = ["O", "B-PER", "I-PER"]
    model = AutoModelForTokenClassification.from_pretrained(tiny_bert_path, num_labels=3).eval()
    with torch.no_grad():  # every token predicts B-PER: each word is an entity of its own
        model.classifier.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    text = "john smith lives in london"
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]  # as the task would say
    e = explain.explain(model, tokenizer, "token_labels", text, labels=labels, steps=4, word_spans=spans)
    assert [t.title for t in e.targets] == [f"PER: {w}" for w in ["john", "smith", "lives", "in", "london"]]
    assert e.encoded.words == ["john", "smith", "lives", "in", "london"]


def test_entities_from_tags():
    assert explain._entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]
    assert explain._entities(["S-PER", "B-LOC", "E-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]
    assert explain._entities(["O", "O"]) == []


def test_refuses_what_it_cannot_explain(tiny_classifier):
    model, tokenizer = tiny_classifier
    with pytest.raises(UserError, match="cannot explain a model whose output is 'answer_span'"):
        explain.explain(model, tokenizer, "answer_span", "text")
    qa_run = SimpleNamespace(task=SimpleNamespace(name="qa"), dir=Path("runs/qa"),
                             state={}, model=model, tokenizer=tokenizer)
    with pytest.raises(UserError, match="task 'qa' cannot be explained .it does not implement Explains"):
        explain.explain_run(qa_run, "text")
    with pytest.raises(UserError, match="unknown attribution method"):
        explain.explain(model, tokenizer, "label", "text", method="shap")
    e = explain.explain(model, tokenizer, "label", "text", labels=["a", "b"], steps=2)
    with pytest.raises(UserError, match="layer 2 does not exist: the model has 2 layers"):
        explain.check_layer_head(e, 2, 0)
    with pytest.raises(UserError, match="head 4 does not exist"):
        explain.check_layer_head(e, -1, 4)
    assert explain.check_layer_head(e, -1, 3) == (1, 3)


def test_terminal_rendering_colours_tokens_and_keeps_the_text(tiny_classifier):
    model, tokenizer = tiny_classifier
    text = "the plot was thin, but the cast was strong"
    e = explain.explain(model, tokenizer, "label", text, labels=["a", "b"], steps=4)
    scores = [0.0] * e.encoded.length
    scores[e.encoded.labels.index("thin")] = 1.0
    scores[e.encoded.labels.index("strong")] = -0.5
    rendered = explain.render_attributions(e.encoded, scores)
    assert rendered.plain == text
    styled = {rendered.plain[span.start:span.end]: str(span.style) for span in rendered.spans}
    assert styled["thin"].startswith("black on rgb(38,255,38)")  # strongest green
    assert "on rgb(255," in styled["strong"]  # red: opposes
    assert "cast" not in styled  # no attribution, no colour


# -- the sanity check: a keyword classifier -----------------------------------------------------------
FILLERS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "movie", "story", "film", "plot", "cast",
           "acting", "long", "boring", "thin", "strong", "paris", "london", "june", "sea", "poem"]
KEYWORD = "great"


def keyword_sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """Half the sentences hold the keyword (label yes) at a random place among random fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLERS, rng.randint(4, 8))
        if i % 2 == 0:
            words.insert(rng.randint(0, len(words)), KEYWORD)
        rows.append((" ".join(words), "yes" if i % 2 == 0 else "no"))
    return rows


def test_keyword_classifier_attributes_its_prediction_to_the_keyword(host, tmp_path):
    from petune.run_folders import load_run

    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in keyword_sentences(200, 1)))
    (tmp_path / "validation.csv").write_text("text,label\n"
                                             + "".join(f"{t},{y}\n" for t, y in keyword_sentences(40, 2)))
    run_dir = make_run(host, tmp_path, "keyword", strategy={"name": "full"},
                       task={"name": "classification", "train": "train.csv", "validation": "validation.csv",
                             "max_length": 32},
                       train={"max_steps": 100, "learning_rate": 1e-3, "warmup_ratio": 0.0, "seed": 0,
                              "logging_steps": 50})
    accuracy = json.loads((run_dir / "metrics.json").read_text())["validation"]["accuracy"]
    assert accuracy >= 0.9, "the classifier did not learn the keyword rule; the attribution check would mean nothing"

    run = load_run(run_dir, host)
    held_out = [text for text, label in keyword_sentences(40, 3) if label == "yes"]
    firsts = 0
    for text in held_out:
        e = explain.explain_run(run, text, steps=16)
        assert e.prediction.startswith("yes")
        firsts += explain.top_tokens(e.encoded, e.targets[0].scores, 1)[0][0] == KEYWORD
    assert firsts >= 0.9 * len(held_out), f"keyword ranked first in {firsts} of {len(held_out)} sentences"


# -- the command, on every strategy's saved run --------------------------------------------------------
NER_TRAIN = "".join(f"{name} B-PER\n{last} I-PER\nlives O\nin O\n{city} B-LOC\n\n"
                    for name, last, city in [("john", "smith", "london"), ("mary", "jones", "paris")] * 6)

CASES = {
    "lora": ("classification", {"name": "lora", "r": 4}),
    "adapters": ("classification", {"name": "adapters", "config": "houlsby"}),
    "prompt": ("classification", {"name": "prompt_tuning", "num_virtual_tokens": 3, "init": "random"}),
    "prefix": ("classification", {"name": "prompt_tuning", "method": "prefix", "num_virtual_tokens": 3}),
    "ner": ("ner", {"name": "lora", "r": 4}),
    "sft": ("sft", {"name": "lora", "r": 4}),
}


def _task(kind: str, folder: Path) -> tuple[str, dict]:
    if kind == "classification":
        return "random:tiny-bert", classification_task(folder)
    if kind == "ner":
        (folder / "train.conll").write_text(NER_TRAIN)
        return "random:tiny-bert", {"name": "ner", "train": "train.conll", "validation_split": 0.0}
    (folder / "train.jsonl").write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                                                for w in ("hello", "paris", "london", "sea") * 3))
    return "random:tiny-llama", {"name": "sft", "train": "train.jsonl", "max_length": 64, "num_sample_generations": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_explain_command_on_saved_runs(host, tmp_path, terminal, case):
    kind, strategy = CASES[case]
    model, task = _task(kind, tmp_path)
    run_dir = make_run(host, tmp_path, case, model=model, task=task, strategy=strategy)
    text = {"classification": "the movie was good", "ner": "john smith lives in paris",
            "sft": "say hello"}[kind]
    args = parse(["explain", str(run_dir), "--text", text, "--steps", "4"] + (["--chat"] if kind == "sft" else []))
    assert args.func(args) == 0
    for name in ("attention.png", "attributions.png", "attention.json"):
        assert (run_dir / "explain" / name).is_file(), name
    shown = terminal.getvalue()
    assert "prediction" in shown and "\x1b[" in shown  # coloured
    numbers = json.loads((run_dir / "explain" / "attention.json").read_text())
    if case == "prompt":
        assert numbers["virtual_tokens"] == 3 and numbers["prefix_tokens"] == 0
    if case == "prefix":
        assert numbers["prefix_tokens"] == 3 and numbers["virtual_tokens"] == 0
    for target in numbers["targets"]:
        assert len(target["attributions"]) == len(numbers["tokens"])  # real tokens only, never virtual ones


def test_explain_command_on_a_4bit_base(host, tmp_path, terminal):
    """qlora saves a plain LoRA adapter; explained on the 4-bit base it was trained on."""
    import bitsandbytes  # noqa: F401
    run_dir = make_run(host, tmp_path, "lora", task=classification_task(tmp_path), strategy={"name": "lora", "r": 4})
    qlora = tmp_path / "runs" / "qlora"
    shutil.copytree(run_dir, qlora)
    recipe = (qlora / "recipe.toml").read_text()
    (qlora / "recipe.toml").write_text(recipe.replace('name = "lora"', 'name = "qlora"\ncompute_dtype = "float32"', 1))
    out_png = tmp_path / "pictures" / "q.png"
    args = parse(["explain", str(qlora), "--text", "the film was bad", "--steps", "4", "--out", str(out_png)])
    assert args.func(args) == 0
    assert out_png.is_file() and (tmp_path / "pictures" / "q-attributions.png").is_file()


def test_explain_command_options_and_refusals(host, tmp_path, terminal, capsys):
    run_dir = make_run(host, tmp_path, "full", task=classification_task(tmp_path), strategy={"name": "full"})
    args = parse(["explain", str(run_dir), "--text", "the film was bad", "--layer", "0", "--head", "1",
                  "--method", "gradxinput", "--json", "--out", str(tmp_path / "e.png")])
    capsys.readouterr()  # the training run's own output
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["layer"], printed["head"], printed["method"]) == (0, 1, "gradxinput")
    with pytest.raises(UserError, match="layer 7 does not exist"):
        args = parse(["explain", str(run_dir), "--text", "x", "--layer", "7", "--steps", "2"])
        args.func(args)
    with pytest.raises(UserError, match="--chat is for causal"):
        args = parse(["explain", str(run_dir), "--text", "x", "--chat"])
        args.func(args)
    with pytest.raises(UserError, match="not a finished petune run"):
        args = parse(["explain", str(tmp_path), "--text", "x"])
        args.func(args)
    with pytest.raises(SystemExit):  # argparse: unknown method
        parse(["explain", str(run_dir), "--text", "x", "--method", "lime"])


def test_explain_command_refuses_other_tasks_before_loading(host, tmp_path, monkeypatch):
    """A run of a task type explain cannot read is refused with a reason, without loading a model."""
    from petune import run_folders

    task_class = type(host.task("classification"))
    monkeypatch.setattr(task_class, "explained_output", "answer_span")
    monkeypatch.setattr(run_folders, "load_run", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = tmp_path / "qa_run"
    folder.mkdir()
    (folder / "recipe.toml").write_text('[task]\nname = "classification"\n')
    args = parse(["explain", str(folder), "--text", "what is it?"])
    with pytest.raises(UserError, match="task 'classification' says its model outputs 'answer_span'"):
        args.func(args)
