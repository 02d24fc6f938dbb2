"""Recipe validation: unknown keys, wrong types, TOML errors, --set overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_plugins import demo_host

from petune.errors import RecipeError
from petune.recipe import apply_overrides, load_recipe, parse_override

GOOD = """\
[model]
name = "random:tiny-bert"

[task]
name = "demo_task"
train = "data/train.csv"
max_length = 64

[strategy]
name = "demo_strategy"
r = 4

[train]
epochs = 2
learning_rate = 1e-4

[output]
dir = "runs/demo"
"""


@pytest.fixture
def host():
    return demo_host()


def write_recipe(tmp_path: Path, text: str = GOOD) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "train.csv").write_text("text,label\nhi,1\n")
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def error_of(path, host, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, host, list(overrides))
    return str(info.value)


def test_good_recipe_fills_defaults_and_resolves_paths(tmp_path, host):
    recipe = load_recipe(write_recipe(tmp_path), host)
    assert recipe.strategy.r == 4 and recipe.strategy.alpha == 16.0
    assert recipe.train.epochs == 2.0 and recipe.train.batch_size == 8
    # relative data paths resolve against the recipe's folder, not the cwd
    assert recipe.task.train == tmp_path / "data" / "train.csv"
    resolved = recipe.resolved()
    assert resolved["strategy"] == {"name": "demo_strategy", "r": 4, "alpha": 16.0, "target_modules": "all-linear"}
    assert resolved["task"]["train"] == str(tmp_path / "data" / "train.csv")


def test_unknown_key_names_dotted_path_suggestion_and_line(tmp_path, host):
    path = write_recipe(tmp_path, GOOD.replace("r = 4", "rr = 4"))
    message = error_of(path, host)
    assert "strategy.rr: unknown key — did you mean strategy.r?" in message
    assert f"{path}:11" in message  # the line of `rr = 4`


def test_unknown_section_is_an_error(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD + "\n[trian]\nepochs = 1\n"), host)
    assert "trian: unknown key — did you mean train?" in message


def test_wrong_type_names_key_value_and_expectation(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace("epochs = 2", 'epochs = "two"')), host)
    assert "train.epochs: expected a number, got 'two'" in message


def test_strings_are_not_coerced_to_numbers(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace("r = 4", 'r = "4"')), host)
    assert "strategy.r: expected an integer, got '4'" in message


def test_bad_values_name_the_constraint(tmp_path, host):
    text = GOOD.replace("learning_rate = 1e-4", "learning_rate = -1e-4\nmax_steps = 0")
    message = error_of(write_recipe(tmp_path, text), host)
    assert "train.learning_rate: input should be greater than 0, got -0.0001" in message
    assert "train.max_steps: input should be greater than 0, got 0" in message


def test_literal_choices_are_listed(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace("epochs = 2", 'epochs = 2\nlr_scheduler = "cosin"')), host)
    assert "train.lr_scheduler" in message and "'cosine'" in message and "got 'cosin'" in message


def test_all_problems_are_reported_at_once(tmp_path, host):
    text = GOOD.replace("r = 4", "rr = 4").replace("epochs = 2", "epochs = -1")
    message = error_of(write_recipe(tmp_path, text), host)
    assert "strategy.rr" in message and "train.epochs" in message


def test_toml_syntax_error_gives_line_and_column(tmp_path, host):
    path = write_recipe(tmp_path, GOOD.replace('r = 4', 'r = = 4'))
    message = error_of(path, host)
    assert "invalid TOML (line 11, column 5)" in message
    assert f"{path}:11:5" in message


@pytest.mark.parametrize("edit, expect", [
    (("r = 4", "r = 4\nr = 5"), ["(line 12, column 6): Cannot overwrite a value: r = 5", "a key is set twice"]),
    (("r = 4", 'r = 4\n[strategy]\nalpha = 8'), ["Cannot declare ('strategy',) twice: [strategy]",
                                                 "a [section] appears twice"]),
    (('name = "demo_strategy"', "name = demo_strategy"), ["Invalid value: name = demo_strategy", "text needs quotes"]),
])
def test_toml_mistakes_get_the_line_and_a_hint(tmp_path, host, edit, expect):
    message = error_of(write_recipe(tmp_path, GOOD.replace(*edit)), host)
    assert all(part in message for part in expect), message


def test_repeated_last_key_is_found_at_the_end_of_the_document(tmp_path, host):
    # tomllib says "at end of document" when the repeated key is the recipe's last line
    path = write_recipe(tmp_path, GOOD.rstrip("\n") + "\n" + GOOD.rstrip("\n").splitlines()[-1])
    last = len(path.read_text().splitlines())
    message = error_of(path, host)
    assert f"{path}:{last}" in message and "Cannot overwrite a value" in message, message


def test_unknown_plugin_names_are_errors_with_suggestions(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace('name = "demo_strategy"', 'name = "demo_stratgy"')), host)
    assert "strategy.name: unknown strategy 'demo_stratgy'" in message and "did you mean 'demo_strategy'" in message


def test_missing_required_keys(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace('train = "data/train.csv"\n', "")), host)
    assert "task.train: required key is missing" in message


def test_missing_data_file_is_named(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD.replace("data/train.csv", "data/nope.csv")), host)
    assert "task.train: file not found" in message and "nope.csv" in message


def test_cross_field_rule(tmp_path, host):
    message = error_of(write_recipe(tmp_path, GOOD + '\n[eval]\nstrategy = "steps"\n'), host)
    assert "eval: strategy = 'steps' needs eval.steps" in message


def test_non_utf8_recipe(tmp_path, host):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[model]\nname = \"\xff\xfe\"\n")
    assert "not UTF-8" in error_of(path, host)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.learning_rate=1e-4", (["train", "learning_rate"], 1e-4)),
        ("train.epochs=3", (["train", "epochs"], 3)),
        ("train.gradient_checkpointing=true", (["train", "gradient_checkpointing"], True)),
        ('model.name="gemma-3-270m"', (["model", "name"], "gemma-3-270m")),
        ("model.name=gemma-3-270m", (["model", "name"], "gemma-3-270m")),  # bare strings are fine
        ('strategy.target_modules=["q_proj", "v_proj"]', (["strategy", "target_modules"], ["q_proj", "v_proj"])),
        ("train.report_to=[]", (["train", "report_to"], [])),
    ],
)
def test_parse_override_types_values_like_toml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["train", "=3", "train=3", "train.=3", "no_equals_sign.here"])
def test_malformed_overrides_are_errors(bad):
    with pytest.raises(RecipeError, match="expected section.key=value"):
        parse_override(bad)


def test_overrides_apply_and_are_validated(tmp_path, host):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, host, ["strategy.r=16", "train.learning_rate=3e-4"])
    assert recipe.strategy.r == 16 and recipe.train.learning_rate == 3e-4
    message = error_of(path, host, ["strategy.rr=16"])
    assert "strategy.rr: unknown key — did you mean strategy.r?" in message and "(--set)" in message
    assert "strategy.r: expected an integer" in error_of(path, host, ['strategy.r="x"'])


def test_override_into_a_value_is_an_error():
    with pytest.raises(RecipeError, match="train.epochs is a value"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])


def test_override_paths_are_relative_to_cwd(tmp_path, host, monkeypatch):
    path = write_recipe(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.csv").write_text("text,label\nx,0\n")
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path, host, ["task.train=mine.csv"])
    assert recipe.task.train == elsewhere / "mine.csv"


def test_default_output_dir_is_runs_recipe_name(tmp_path, host):
    path = write_recipe(tmp_path, GOOD.replace('[output]\ndir = "runs/demo"\n', ""))
    assert load_recipe(path, host).output.dir == "runs/recipe"


def test_recipes_are_data_not_code(tmp_path, host):
    # a string that looks like code is just a string
    path = write_recipe(tmp_path, GOOD.replace('dir = "runs/demo"', 'dir = "__import__(\'os\').system(\'false\')"'))
    assert load_recipe(path, host).output.dir == "__import__('os').system('false')"
