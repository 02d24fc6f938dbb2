"""The built-in rewards (petune_plugins/rewards/) by hand: math answers on the math-verify path and the
plain-number path, regex, length, JSON with and without a schema, a trained reward model (equal
to ``petune predict`` on its run), and the third-party reward example installed as a package."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import write_recipe
from pydantic import ValidationError

from petune.errors import Refusal, UserError
from petune_plugins.rewards import math_answer
from petune_plugins.rewards.json_output import JsonReward
from petune_plugins.rewards.length import LengthReward
from petune_plugins.rewards.math_answer import MathAnswer
from petune_plugins.rewards.pattern import RegexReward
from petune_plugins.rewards.reward_model import RewardModel

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = {"math_answer", "regex", "length", "json", "reward_model"}


def score(cls, completions, fields=None, context=None, /, **options):
    """The scores of ``completions`` by a fresh reward ``cls`` with these options (validated as a recipe's)."""
    validated = cls.Options.model_validate(options, context=context)
    return cls().score([[{"role": "user", "content": "q"}]] * len(completions), completions, fields or {},
                          validated)


def refused(cls, context=None, /, **options) -> str:
    with pytest.raises(ValidationError) as caught:
        cls.Options.model_validate(options, context=context)
    return str(caught.value)


# -- registration ---------------------------------------------------------------------------------
def test_every_built_in_reward_is_registered_with_described_options(host):
    assert BUILT_IN <= set(host.registry["reward"])
    for name in BUILT_IN:
        reward = host.reward(name)
        assert reward.description and host.registry["reward"][name].origin.package == "petune"
        undescribed = [key for key, f in reward.Options.model_fields.items() if not f.description]
        assert not undescribed, f"{name}: options without a description: {undescribed}"


@pytest.mark.parametrize("cls, options", [(MathAnswer, {}), (RegexReward, {"pattern": "x", "flags": ["dotall"]}),
                                          (LengthReward, {"max": 3}), (JsonReward, {"schema": {"type": "object"}}),
                                          (JsonReward, {})])
def test_options_read_back_from_a_saved_recipe_are_the_same(cls, options):
    """A run folder's recipe holds each reward's options as validated (None left out: TOML has no null)."""
    validated = cls.Options.model_validate(options)
    saved = {k: v for k, v in validated.model_dump(mode="json").items() if v is not None}
    assert cls.Options.model_validate(saved) == validated


@pytest.mark.parametrize("reward, options", [(MathAnswer, {}), (RegexReward, {"pattern": "x"}),
                                             (LengthReward, {"max": 3}), (JsonReward, {})])
def test_an_unknown_option_is_an_error_naming_it(reward, options):
    assert "colour" in refused(reward, **options, colour="red")


# -- math_answer ---------------------------------------------------------------------------------
THOUSAND = ["1000", "1,000", "1 000", "1000.0", "1000.", "$1000", "\\$1,000", "\\boxed{1000}", "\\boxed{1,000}",
            "The answer is 1,000 dollars.", "so 600 + 400 = 1000\n#### 1,000", "First 3, then 1000"]


@pytest.fixture(params=["math_verify", "numbers"])
def compare(request, monkeypatch):
    """Each math test on both paths: with math-verify, and as plain numbers ("auto" without it)."""
    if request.param == "numbers":
        monkeypatch.setattr(math_answer, "MATH_VERIFY", False)
        return "auto"
    assert math_answer.MATH_VERIFY, "math-verify is a dev dependency: pip install -e '.[dev]'"
    return "math_verify"


def test_numbers_are_normalised(compare):
    assert score(MathAnswer, THOUSAND, {"answer": [1000] * len(THOUSAND)}, compare=compare) == [1.0] * len(THOUSAND)
    assert score(MathAnswer, THOUSAND, {"answer": ["1,000"] * len(THOUSAND)}, compare=compare) == [1.0] * len(THOUSAND)
    wrong = ["999", "10000", "100", "1000 apples and 3 pears", "", "no idea"]
    assert score(MathAnswer, wrong, {"answer": [1000] * len(wrong)}, compare=compare) == [0.0] * len(wrong)


def test_signs_fractions_decimals_and_percentages(compare):
    pairs = [("-3", -3), ("x = -3", "-3"), ("3/4", "0.75"), ("0.75", "3/4"), ("\\frac{3}{4}", 0.75),
             ("\\boxed{\\dfrac{3}{4}}", "3/4"), ("50%", "50"), ("2.50", 2.5), ("72", 72.0)]
    completions, answers = zip(*pairs)
    assert score(MathAnswer, list(completions), {"answer": list(answers)}, compare=compare) == [1.0] * len(pairs)
    assert score(MathAnswer, ["-3", "3/5"], {"answer": [3, "0.75"]}, compare=compare) == [0.0, 0.0]


def test_a_worked_reference_is_read_after_its_marker_and_missing_ones_are_not_scored(compare):
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    got = score(MathAnswer, ["... so she sold 72 clips in all.", "24", "72", "72"],
                {"answer": [gsm8k, gsm8k, None, ""]}, compare=compare)
    assert got == [1.0, 0.0, None, None]
    assert score(MathAnswer, ["72"], {}, compare=compare) == [None]  # no such field
    assert MathAnswer().fields(MathAnswer.Options(field="solution")) == ["solution"]


def test_extraction_modes(compare):
    text = "I think 12. Answer: 7\nCheck: 3 + 4 = 7, and 2 more"
    assert score(MathAnswer, [text], {"answer": [7]}, compare=compare, extract="after_marker", marker="Answer:") == [1.0]
    assert score(MathAnswer, [text], {"answer": [2]}, compare=compare, extract="last_number") == [1.0]
    assert score(MathAnswer, [text], {"answer": [7]}, compare=compare, extract="boxed") == [0.0]  # no \boxed{}
    boxed = "\\boxed{5} at first, but no: \\boxed{8}. Answer: 5"
    assert score(MathAnswer, [boxed], {"answer": [8]}, compare=compare, extract="boxed") == [1.0]
    assert score(MathAnswer, [text], {"answer": [7]}, compare=compare, extract="after_marker") == [0.0]  # no ####


def test_rewards_for_right_and_wrong_are_options(compare):
    assert score(MathAnswer, ["4", "5"], {"answer": [4, 4]}, compare=compare, correct=2.0, wrong=-1.0) == [2.0, -1.0]


def test_unreadable_completions_score_wrong_and_never_raise(compare):
    junk = ["\\boxed{", "}}}{{{", "\\frac{1}{0}", "1/0", "\x00\uffff", "$$$$", "\\boxed{\\boxed{\\boxed{", "-" * 5000,
            "9" * 400, "NaN", "inf"]
    assert score(MathAnswer, junk, {"answer": [1] * len(junk)}, compare=compare) == [0.0] * len(junk)


def test_symbolic_answers_need_math_verify(monkeypatch):
    sym = ["\\boxed{2\\sqrt{2}}"]
    assert score(MathAnswer, sym, {"answer": ["\\sqrt{8}"]}) == [1.0]  # auto: math-verify, installed
    monkeypatch.setattr(math_answer, "MATH_VERIFY", False)
    assert score(MathAnswer, sym, {"answer": ["\\sqrt{8}"]}) == [0.0]  # auto: plain numbers
    assert score(MathAnswer, ["\\boxed{B}", "(B)"], {"answer": ["b", "B"]}) == [1.0, 0.0]  # words: as text
    message = refused(MathAnswer, compare="math_verify")
    assert "math-verify" in message and "pip install 'petune[math]'" in message


def test_math_verify_works_off_the_main_thread():
    results = []

    def work():
        try:
            results.append(score(MathAnswer, THOUSAND, {"answer": [1000] * len(THOUSAND)}, compare="math_verify"))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread's assert
            results.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    assert results == [[1.0] * len(THOUSAND)]


def test_a_completion_math_verify_would_take_for_ever_on_is_cut_off_and_wrong(monkeypatch):
    monkeypatch.setattr(math_answer, "TIME_LIMIT_S", 0.5)
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's, when it uses signals
    started = time.monotonic()
    assert score(MathAnswer, ["\\boxed{2^{2^{2^{100}}}}"], {"answer": [1000]}, compare="math_verify") == [0.0]
    assert time.monotonic() - started < 5
    if outer:
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= outer  # the other timer is set again


def test_the_time_limit_leaves_an_earlier_timer_running():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    saved = signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with pytest.raises(math_answer._TimedOut), math_answer._time_limit(0.2):
            time.sleep(2)
        assert 25 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30 and not fired
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # the earlier handler is back
        time.sleep(0.3)
        assert fired == [True]
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with math_answer._time_limit(5):  # no limit of ours: the earlier timer fires first
            time.sleep(0.3)
        assert fired == [True, True]
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *saved)


# -- regex ----------------------------------------------------------------------------------------
FORMAT = r"<think>.*</think>\s*<answer>.*</answer>"


def test_regex_search_and_full_match():
    good, chatty = "<think>a</think> <answer>4</answer>", "Sure! <think>a</think><answer>4</answer> Bye."
    multiline = "<think>step 1\nstep 2</think>\n<answer>4</answer>\n"
    assert score(RegexReward, [good, chatty, "4"], pattern=FORMAT) == [1.0, 1.0, 0.0]
    assert score(RegexReward, [good, chatty], pattern=FORMAT, match="full") == [1.0, 0.0]
    assert score(RegexReward, [multiline], pattern=FORMAT, match="full") == [0.0]  # '.' stops at a newline
    assert score(RegexReward, [multiline], pattern=FORMAT, match="full", flags=["dotall"]) == [1.0]
    assert score(RegexReward, [multiline], pattern=FORMAT, match="full", flags=["dotall"], strip=False) == [0.0]
    assert score(RegexReward, ["<THINK>x</THINK><answer>1</answer>"], pattern=FORMAT,
                 flags=["ignorecase"], reward=0.5, otherwise=-1.0) == [0.5]
    assert score(RegexReward, ["nothing"], pattern=FORMAT, reward=0.5, otherwise=-1.0) == [-1.0]


def test_a_pattern_that_does_not_compile_is_refused_saying_why():
    message = refused(RegexReward, pattern="<answer>(.*</answer>")
    assert "not a valid regular expression" in message and "missing ), unterminated subpattern" in message
    assert "position 8" in message
    assert "dotall" in refused(RegexReward, pattern="x", flags=["DOTALL"])  # the flags it knows are listed
    assert "pattern" in refused(RegexReward)  # required


# -- length -------------------------------------------------------------------------------------
def test_length_curve_in_words():
    words = [" ".join(["w"] * n) for n in (0, 5, 8, 10, 20, 25, 30, 40)]
    got = score(LengthReward, words, unit="words", min=10, max=20, falloff=10, outside=-1.0)
    assert got == pytest.approx([-1.0, -0.0, 0.6, 1.0, 1.0, 0.0, -1.0, -1.0])
    # a step, and one open end
    assert score(LengthReward, words[2:5], unit="words", min=10, max=20) == [0.0, 1.0, 1.0]
    assert score(LengthReward, words, unit="words", max=20, falloff=20) == pytest.approx(
        [1.0] * 5 + [0.75, 0.5, 0.0])


def test_length_in_characters_and_its_range_checked():
    assert score(LengthReward, ["abc", "abcdef", "ab cd"], unit="characters", min=4, max=5, falloff=2) == [
        0.5, 0.5, 1.0]
    assert "give min, max or both" in refused(LengthReward)
    assert "min (5) is above max (3)" in refused(LengthReward, min=5, max=3)
    assert "greater than or equal to 0" in refused(LengthReward, max=3, falloff=-1)


# -- json -----------------------------------------------------------------------------------------
PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}


def test_json_where_it_is_looked_for():
    fenced = 'Here you go:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?'
    inline = 'The record is {"name": "Ada", "age": 36} as asked.'
    texts = ['  {"name": "Ada"}\n', fenced, inline, "[1, 2, 3]", "42", "not json", "{'name': 'Ada'}", "NaN",
             '{"x": NaN}', ""]
    assert score(JsonReward, texts) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert score(JsonReward, texts[:3], extract="whole") == [1.0, 0.0, 0.0]
    assert score(JsonReward, texts[:3], extract="fenced") == [0.0, 1.0, 0.0]
    assert score(JsonReward, texts[:3], extract="first_value") == [1.0, 1.0, 1.0]


def test_json_against_a_schema_inline_or_in_a_file(tmp_path):
    texts = ['{"name": "Ada", "age": 36}', '{"name": "Ada", "age": -1}', '{"name": "Ada"}', "[]", "{oops"]
    assert score(JsonReward, texts, schema=PERSON) == [1.0, 0.5, 0.5, 0.5, 0.0]
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    context = {"base_dir": tmp_path, "check_paths": True}  # as a recipe in tmp_path is validated
    assert score(JsonReward, texts, None, context, schema="person.json", valid_but_schema_fails=0.0,
                 invalid=-1.0) == [1.0, 0.0, 0.0, 0.0, -1.0]
    options = JsonReward.Options.model_validate({"schema": "person.json"}, context=context)
    assert options.model_dump()["schema"] == tmp_path / "person.json"  # saved under its own name
    assert "file not found" in refused(JsonReward, context, schema="missing.json")


def test_a_schema_that_is_not_a_json_schema_is_refused(tmp_path):
    message = refused(JsonReward, schema={"type": "object", "properties": {"age": {"type": "integr"}}})
    assert "not a valid JSON Schema" in message and "$.properties.age.type" in message
    assert "not a valid JSON Schema" in refused(JsonReward, schema={"required": "name"})
    context = {"base_dir": tmp_path, "check_paths": True}
    (tmp_path / "broken.json").write_text('{"type": "object",')
    assert "broken.json is not JSON" in refused(JsonReward, context, schema="broken.json")
    (tmp_path / "list.json").write_text("[1]")
    assert "holds a list, not a JSON Schema" in refused(JsonReward, context, schema="list.json")


# -- reward_model ---------------------------------------------------------------------------------
PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of france ?"}]
ANSWERS = ["the capital of france is paris .", "i hated it .", "paris", "lyon , probably"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A finished `reward` run: a tiny random Llama with LoRA, 2 steps."""
    from petune import runner
    from petune.plugins import get_host
    from petune.recipe import validate

    folder = tmp_path_factory.mktemp("reward_run")
    rows = [{"prompt": f"question {i} ?", "chosen": f"a good answer {i} .", "rejected": f"bad {i}"} for i in range(4)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate({"model": {"name": "random:tiny-llama"},
                       "task": {"name": "reward", "train": "train.jsonl", "max_length": 128},
                       "strategy": {"name": "lora", "r": 4},
                       "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
                       "eval": {"strategy": "no"}, "output": {"dir": str(folder / "run")}},
                      get_host(), path=folder / "recipe.toml")
    assert runner.run(recipe, get_host()).status == "completed"
    return folder / "run"


def test_a_reward_model_scores_as_petune_predict_does_on_its_run(reward_run, tmp_path):
    from petune.cli import main

    options = RewardModel.Options.model_validate({"run": str(reward_run), "batch_size": 3})
    reward = RewardModel()
    reward.prepare(options, "cpu")
    prompts = [PROMPT] * len(ANSWERS)
    scores = reward.score(prompts, ANSWERS, {}, options)
    assert all(isinstance(s, float) for s in scores) and len(set(scores)) == len(scores)
    assert reward.score(prompts, ANSWERS, {}, options) == scores  # deterministic
    one_batch = RewardModel.Options.model_validate({"run": str(reward_run), "batch_size": 8})
    assert reward.score(prompts, ANSWERS, {}, one_batch) == pytest.approx(scores, abs=1e-5)

    records = tmp_path / "in.jsonl"
    records.write_text("".join(json.dumps({"prompt": PROMPT, "completion": a}) + "\n" for a in ANSWERS))
    assert main(["predict", str(reward_run), "--input", str(records), "--output", str(tmp_path / "out.tsv")]) == 0
    predicted = [float(line.split("\t")[-1]) for line in (tmp_path / "out.tsv").read_text().splitlines()[1:]]
    assert scores == pytest.approx(predicted, abs=1e-4)  # printed with 4 decimals

    scaled = RewardModel.Options.model_validate({"run": str(reward_run), "scale": -2.0, "unscorable": -5.0})
    got = reward.score([PROMPT, PROMPT, []], [ANSWERS[0], "   ", ANSWERS[1]], {}, scaled)
    assert got[0] == pytest.approx(-2.0 * scores[0], abs=1e-5) and got[1] == -5.0 and isinstance(got[2], float)
    assert reward.score([PROMPT], [""], {}, options) == [None]  # unscorable: not applicable by default


def test_a_folder_that_is_not_a_finished_reward_run_is_refused(reward_run, tmp_path):
    sft = tmp_path / "sft_run"
    for folder in ("tokenizer", "adapter"):
        (sft / folder).mkdir(parents=True)
    (sft / "task_state.json").write_text("{}")
    (sft / "recipe.toml").write_text('[model]\nname = "random:tiny-llama"\n\n[task]\nname = "sft"\n'
                                     'train = "t.jsonl"\n\n[strategy]\nname = "lora"\n')
    message = refused(RewardModel, run=str(sft))
    assert "a run of the 'sft' task, not of the 'reward' task" in message
    options = RewardModel.Options.model_construct(run=sft, scale=1.0, batch_size=8, unscorable=None)
    with pytest.raises(Refusal) as caught:  # e.g. the folder changed after the recipe was checked
        RewardModel().prepare(options, "cpu")
    assert caught.value.where == "reward_model.run" and '[task] name = "reward"' in caught.value.hint

    assert "is not a finished petune run (no recipe.toml)" in refused(RewardModel, run=str(tmp_path))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.toml").write_text((reward_run / "recipe.toml").read_text())
    options = RewardModel.Options.model_validate({"run": str(unfinished)})
    with pytest.raises(UserError, match="not a finished petune run \\(no task_state.json\\)") as caught:
        RewardModel().prepare(options, "cpu")
    assert caught.value.where == "reward_model.run"
    assert "file not found" in refused(RewardModel, {"check_paths": True}, run=str(tmp_path / "nowhere"))


# -- a third-party reward -------------------------------------------------------------------------
CHECK_EXAMPLE = """
import json
from pydantic import ValidationError
from petune.plugins import PluginHost

host = PluginHost()
reward = host.reward("keywords")
options = reward.Options.model_validate({"keywords": ["Paris", "capital"]})
out = {"scores": reward.score([[]] * 3, ["The capital is Paris.", "paris", "Lyon"], {}, options)}
for bad in ({"keywords": ["Paris"], "colour": "red"}, {"keywords": []}, {"keywords": ["x"], "case_sensitive": "no"}):
    try:
        reward.Options.model_validate(bad)
    except ValidationError as exc:
        out.setdefault("errors", []).append(str(exc))
print(json.dumps(out))
"""


def test_the_example_reward_package_is_listed_and_its_options_checked(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(REPO / "examples" / "petune-reward-example")],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")

    def python(*args):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout[done.stdout.index("["):] if args[0] == "-m" else done.stdout)

    listed = python("-m", "petune", "plugins", "--json")
    rewards = {row["name"]: row for row in listed if row["kind"] == "reward"}
    assert rewards["keywords"]["package"] == "petune-reward-example" and BUILT_IN <= set(rewards)
    checked = python("-c", CHECK_EXAMPLE)
    assert checked["scores"] == [1.0, 0.5, 0.0]
    unknown, empty, strict = checked["errors"]
    assert "colour" in unknown and "Extra inputs are not permitted" in unknown
    assert "keywords" in empty and "at least 1 item" in empty
    assert "case_sensitive" in strict


BROKEN_PACKAGE = {
    "pyproject.toml": """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "petune-broken-reward"
version = "0.0.1"

[project.entry-points.petune]
broken = "petune_broken_reward"
""",
    "petune_broken_reward.py": """from petune import hookimpl
from petune.api import Reward


class Broken(Reward):
    name = "broken"

    def score(self, prompts, completions, fields, options):
        raise KeyError("a field this reward expected")


@hookimpl
def register_rewards(register):
    register(Broken)
""",
}


def test_an_installed_reward_package_trains_a_grpo_run_and_a_raising_one_is_blamed(tmp_path):
    """The example package's reward in a 2-step GRPO run on a tiny model through the CLI; a reward
    from another installed package that raises stops the run with exit 2, naming that package."""
    site, broken = tmp_path / "site", tmp_path / "broken"
    broken.mkdir()
    for name, text in BROKEN_PACKAGE.items():
        (broken / name).write_text(text)
    for package in (REPO / "examples" / "petune-reward-example", broken):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(package)], check=True, capture_output=True)
    rows = [{"prompt": f"name an animal that starts with {c}", "answer": c} for c in "abcdefgh"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(reward: str, out: str) -> Path:
        options = {"keywords": ["cat", "dog"]} if reward == "keywords" else {}
        return write_recipe(tmp_path / f"{out}.toml", output=out, strategy={"name": "lora", "r": 4},
                            task={"name": "grpo", "train": "prompts.jsonl", "validation_split": 0.25,
                                  "num_generations": 2, "max_prompt_length": 64, "max_completion_length": 4,
                                  "chat_template": "chatml", "num_sample_generations": 1,
                                  "rewards": [{"name": reward, **options}]})

    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    trained = subprocess.run([sys.executable, "-m", "petune", "run", str(recipe("keywords", "run_ok"))],
                             check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((tmp_path / "run_ok" / "metrics.json").read_text())
    assert 0 <= metrics["validation"]["keywords"] <= 1
    failed = subprocess.run([sys.executable, "-m", "petune", "run", str(recipe("broken", "run_broken"))],
                            check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "petune-broken-reward" in failed.stderr and "a field this reward expected" in failed.stderr
