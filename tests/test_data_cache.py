"""The data cache (petune/datacache.py): a task's prepared data is built once and read back,
keyed by its files' contents, the tokenizer, the options and the code; a hit gives what a miss
gives (rows, state, notes, tokenizer); ``--resume`` and ``eval`` use it; ``petune cache``."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import datasets  # noqa: F401
import pytest
from helpers import recipe_data, validated_recipe

from petune import datacache
from petune.api import TaskData
from petune.recipe import DataSection, validate

ROWS = [{"instruction": f"what is {a} plus {b} ?", "output": f"{a + b}"} for a in range(4) for b in range(3)]


def write_jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(datacache.ENV, str(root))
    return root


@pytest.fixture
def sft(host):
    return host.task("sft")


def tokenizer_of(path):
    from petune.models import load_tokenizer

    return load_tokenizer(path)  # fresh: load_data changes it


def sft_options(host, folder: Path, **task):
    return validated_recipe(host, folder, task={"name": "sft", "train": "train.jsonl", "max_length": 96, **task},
                            strategy={"name": "lora", "r": 4}).task


def prepare(task, options, tokenizer_path, **settings):
    tokenizer = tokenizer_of(tokenizer_path)
    return datacache.prepare(task, "load_data", options, tokenizer, lambda tok: task.load_data(options, tok),
                             settings=DataSection(**settings))


def rows_of(data: TaskData) -> dict:
    return {split: getattr(data, split).to_list() for split in ("train", "validation", "test")
            if getattr(data, split) is not None}


def saved_tokenizer(tokenizer, folder: Path) -> dict:
    tokenizer.save_pretrained(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_hit_gives_what_the_miss_built(host, sft, tmp_path, cache, tiny_llama_path):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path, validation_split=0.25)
    miss = prepare(sft, options, tiny_llama_path)
    assert miss.note.startswith("built")
    hit = prepare(sft, options, tiny_llama_path)
    assert hit.note.startswith("hit")
    uncached = prepare(sft, options, tiny_llama_path, cache=False)
    assert uncached.note == "off"
    assert rows_of(hit.data) == rows_of(miss.data) == rows_of(uncached.data)
    assert hit.data.state == miss.data.state == uncached.data.state
    assert hit.data.notes == miss.data.notes == uncached.data.notes
    # the tokenizer as the task left it (chat template, pad token) comes back with the hit
    assert hit.tokenizer.chat_template == uncached.tokenizer.chat_template
    assert hit.tokenizer.pad_token_id == uncached.tokenizer.pad_token_id
    assert saved_tokenizer(hit.tokenizer, tmp_path / "t1") == saved_tokenizer(uncached.tokenizer, tmp_path / "t2")
    assert hit.tokenizer.name_or_path == uncached.tokenizer.name_or_path  # tasks find the model's config there
    # memory-mapped from the cache folder, not held in memory; the tokenized file was moved
    # there as it was written (never read back through memory to be copied)
    assert all(f["filename"].startswith(str(cache)) for f in hit.data.train.cache_files)
    entry = Path(miss.note.rsplit(" ", 1)[-1])
    assert sorted(p.name for p in entry.glob("*.arrow")) == ["train.arrow", "validation.arrow"]
    # written in the cache's own scratch folder (same disk: a rename, and never a RAM-backed /tmp)
    import os

    assert list((cache / datacache.SCRATCH).glob(f"petune-tokens-{os.getpid()}-*"))
    assert [e["complete"] for e in datacache.entries(cache)] == [True]


def test_changes_that_change_tokens_miss(host, sft, tmp_path, cache, tiny_llama_path):
    write_jsonl(tmp_path / "train.jsonl")
    base = sft_options(host, tmp_path)
    assert prepare(sft, base, tiny_llama_path).note.startswith("built")
    assert prepare(sft, base, tiny_llama_path).note.startswith("hit")

    for changed in ({"max_length": 64}, {"chat_template": "alpaca"}, {"format": "alpaca"}):
        assert prepare(sft, sft_options(host, tmp_path, **changed), tiny_llama_path).note.startswith("built"), changed

    write_jsonl(tmp_path / "train.jsonl", ROWS[:-1] + [{"instruction": "what is 3 plus 2 ?", "output": "6"}])
    changed_file = prepare(sft, base, tiny_llama_path)
    assert changed_file.note.startswith("built")
    assert changed_file.data.train[-1]["conversation"][-1]["content"] == "6"

    # the same rows in another format are another file: read again, to the same tokens
    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((tmp_path / "train.jsonl").read_text(encoding="utf-8"))
    gz = prepare(sft, sft_options(host, tmp_path, train="train.jsonl.gz"), tiny_llama_path)
    assert gz.note.startswith("built")
    assert gz.data.train["input_ids"] == changed_file.data.train["input_ids"]

    other_tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_llama_path, other_tokenizer)
    config = json.loads((other_tokenizer / "tokenizer_config.json").read_text())
    config["model_max_length"] = 80
    (other_tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    assert prepare(sft, base, other_tokenizer).note.startswith("built")
    assert prepare(sft, base, other_tokenizer).note.startswith("hit")


def test_a_killed_write_is_never_trusted(host, sft, tmp_path, cache, tiny_llama_path):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    built = prepare(sft, options, tiny_llama_path)
    entry = Path(built.note.rsplit(" ", 1)[-1])
    (entry / "meta.json").unlink()  # as if the run died before the entry was whole
    assert prepare(sft, options, tiny_llama_path).note.startswith("built")
    (entry / "train.arrow").write_bytes(b"not arrow")  # a damaged entry: rebuilt, not trusted
    again = prepare(sft, options, tiny_llama_path)
    assert again.note.startswith("built") and len(again.data.train) == len(ROWS)


def test_resume_and_eval_use_the_cache(host, tmp_path, cache):
    from petune import runner

    write_jsonl(tmp_path / "train.jsonl")
    write_jsonl(tmp_path / "test.jsonl", ROWS[:3])
    data = recipe_data(task={"name": "sft", "train": "train.jsonl", "test": "test.jsonl", "max_length": 64,
                             "num_sample_generations": 0},
                       strategy={"name": "lora", "r": 4}, train={"batch_size": 4, "save_steps": 1},
                       output=tmp_path / "run")
    recipe = validate(data, host, path=tmp_path / "recipe.toml")
    calls = []
    task = host.task("sft")
    original = type(task).load_data

    def counting(self, options, tokenizer):
        calls.append(1)
        return original(self, options, tokenizer)

    type(task).load_data = counting
    try:
        assert runner.run(recipe, host, dry_run=True).status == "planned"
        assert runner.run(recipe, host).status == "completed"
        (tmp_path / "run" / "manifest.json").write_text(json.dumps({"status": "failed"}))
        result = runner.run(validate({**data, "train": {**data["train"], "max_steps": 3}}, host,
                                     path=tmp_path / "recipe.toml"), host, resume=True)
    finally:
        type(task).load_data = original
    assert result.status == "completed"
    assert calls == [1]  # built once; the real run and the --resume read the cache
    assert len([e for e in datacache.entries(cache) if e["complete"]]) == 1

    from petune.cli import main

    assert main(["eval", str(tmp_path / "run")]) == 0
    assert len(datacache.entries(cache)) == 2  # eval's held-out data: its own entry
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["test"]["examples"] == 3
    assert len(datacache.entries(cache)) == 2


def test_the_cache_can_be_turned_off(host, sft, tmp_path, cache, tiny_llama_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    assert prepare(sft, options, tiny_llama_path, cache=False).note == "off"
    monkeypatch.setenv(datacache.ENV, "off")
    assert prepare(sft, options, tiny_llama_path).note == "off"
    other = tmp_path / "elsewhere"
    assert prepare(sft, options, tiny_llama_path, cache_dir=str(other)).note.startswith("built")
    assert not cache.exists() and len(datacache.entries(other)) == 1


def test_petune_cache_lists_and_clears(host, sft, tmp_path, cache, tiny_llama_path):
    from helpers import petune

    write_jsonl(tmp_path / "train.jsonl")
    prepare(sft, sft_options(host, tmp_path), tiny_llama_path)
    prepare(sft, sft_options(host, tmp_path, max_length=64), tiny_llama_path)
    (cache / f".tmp-sft-{'a' * 20}-123-0badcafe").mkdir()  # a killed write (write_entry's name)
    listed = petune("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert sorted(e["complete"] for e in entries) == [False, True, True]
    assert all(e["bytes"] >= 0 for e in entries) and sum(e["bytes"] for e in entries) > 0
    table = petune("cache", "list")
    assert "incomplete" in table.stdout and "train.jsonl" in table.stdout
    one = next(e["name"] for e in entries if e["complete"])
    assert petune("cache", "clear", one).returncode == 0
    assert len(datacache.entries(cache)) == 2
    missing = petune("cache", "clear", "no-such-entry")
    assert missing.returncode != 0 and "no such cache entry" in missing.stderr
    cleared = petune("cache", "clear")
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stderr
    assert datacache.entries(cache) == []


def test_data_files_default_is_every_path_among_the_options(host, sft, tmp_path):
    write_jsonl(tmp_path / "train.jsonl")
    write_jsonl(tmp_path / "val.jsonl")
    options = sft_options(host, tmp_path, validation="val.jsonl")
    assert sorted(p.name for p in sft.data_files(options)) == ["train.jsonl", "val.jsonl"]


def test_several_processes_tokenize_to_the_same_rows(host, sft, tmp_path, tiny_llama_path):
    rows = [{"instruction": f"say {i} twice", "output": f"{i} {i}"} for i in range(2500)]  # three batches
    write_jsonl(tmp_path / "train.jsonl", rows)
    options = sft_options(host, tmp_path, validation_split=0.1)
    one = prepare(sft, options, tiny_llama_path, cache=False)
    two = prepare(sft, options, tiny_llama_path, cache=False, num_proc=2)
    assert rows_of(two.data) == rows_of(one.data)
    assert two.data.notes == one.data.notes and len(one.data.train) == 2250
    # written to Arrow batch by batch, and read back memory-mapped
    assert one.data.train.cache_files and two.data.validation.cache_files


def test_held_out_data_alone_is_cached_and_read_back(host, sft, tmp_path, cache, tiny_llama_path):
    """petune eval prepares held-out splits only (no train split): a miss and a hit both give them back."""
    from datasets import Dataset

    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    held_out = TaskData(train=None, test=Dataset.from_list([{"input_ids": [1, 2, 3]}]), state={"k": 1})

    def load(tokenizer):
        return held_out

    for _ in range(2):  # built, then read from the cache
        tokenizer = tokenizer_of(tiny_llama_path)
        data = datacache.prepare(sft, "held_out_data", options, tokenizer, load, settings=DataSection()).data
        assert data.train is None and data.test.to_list() == [{"input_ids": [1, 2, 3]}] and data.state == {"k": 1}
    assert len(datacache.entries(cache)) == 1


# -- issue 33: the cache never deletes what is not its own, never serves stale or damaged data ----
def entry_of(prepared) -> Path:
    return Path(prepared.note.split(" stored in ", 1)[1])


def test_cache_clear_removes_only_cache_entries(host, sft, tmp_path, tiny_llama_path, capsys):
    from petune.cli import main

    victim = tmp_path / "victim"
    (victim / "important_project" / "src").mkdir(parents=True)
    (victim / "important_project" / "src" / "main.py").write_text("print('years of work')")
    write_jsonl(tmp_path / "train.jsonl")
    entry = entry_of(prepare(sft, sft_options(host, tmp_path), tiny_llama_path, cache_dir=str(victim)))
    assert main(["cache", "clear", "--dir", str(victim)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "important_project" in message and "not petune cache entries" in message and "nothing was deleted" in message
    assert (victim / "important_project" / "src" / "main.py").exists() and entry.exists()
    # by name, the entry goes and the project stays
    assert main(["cache", "clear", entry.name, "--dir", str(victim)]) == 0
    assert not entry.exists() and (victim / "important_project" / "src" / "main.py").exists()
    assert main(["cache", "clear", "important_project", "--dir", str(victim)]) == 2
    assert (victim / "important_project" / "src" / "main.py").exists()


def test_cache_clear_refuses_a_run_folder_as_the_cache(tmp_path, capsys):
    from petune.cli import main

    run = tmp_path / "run"
    for part in ("adapter", "checkpoints/checkpoint-2", "plots"):
        (run / part).mkdir(parents=True)
        (run / part / "file").write_text("x")
    assert main(["cache", "clear", "--dir", str(run)]) == 2
    assert "adapter" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "plots"]


def test_a_symlinked_entry_is_refused_not_reported_removed(host, sft, tmp_path, cache, tiny_llama_path, capsys):
    from petune.cli import main

    write_jsonl(tmp_path / "train.jsonl")
    entry = entry_of(prepare(sft, sft_options(host, tmp_path), tiny_llama_path))
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    assert main(["cache", "clear"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert entry.is_symlink() and elsewhere.is_dir()


def test_scratch_of_a_dead_run_is_listed_and_cleared(tmp_path, cache, capsys):
    import os

    from petune import artifacts
    from petune.cli import main

    dead = cache / datacache.SCRATCH / "petune-tokens-999999-abc"
    alive = cache / datacache.SCRATCH / f"petune-tokens-{os.getpid()}-def"
    for folder, pid in ((dead, 999999), (alive, os.getpid())):
        folder.mkdir(parents=True)
        (folder / "spool.arrow").write_bytes(b"x" * 1000)
        me = artifacts.process_identity()
        (folder / artifacts.OWNER_FILE).write_text(json.dumps({**me, "pid": pid, "start": me["start"] if
                                                               pid == os.getpid() else "1"}))
    assert main(["cache", "list", "--json"]) == 0
    scratch = {Path(r["path"]).name: r["running"] for r in json.loads(capsys.readouterr().out)["scratch"]}
    assert scratch == {dead.name: False, alive.name: True}
    assert main(["cache", "clear"]) == 0
    assert "1 scratch folder" in capsys.readouterr().err
    assert not dead.exists() and alive.exists()


def test_an_entry_refused_for_its_key_is_replaced_never_used(host, sft, tmp_path, cache, tiny_llama_path):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    entry = entry_of(prepare(sft, options, tiny_llama_path))
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["files"] = {"/elsewhere/other.jsonl": "0" * 64}  # as if stored for another file
    (entry / "meta.json").write_text(json.dumps(meta))
    again = prepare(sft, options, tiny_llama_path)
    assert again.note.startswith("built")
    assert json.loads((entry / "meta.json").read_text())["key"]["files"] != meta["key"]["files"]
    assert prepare(sft, options, tiny_llama_path).note.startswith("hit")


def test_a_changed_byte_in_an_entry_is_caught_and_rebuilt(host, sft, tmp_path, cache, tiny_llama_path):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    built = prepare(sft, options, tiny_llama_path)
    rows = rows_of(built.data)  # before the change: the built data is read from the entry's file
    entry = entry_of(built)
    arrow = entry / "train.arrow"
    data = bytearray(arrow.read_bytes())
    data[-200] ^= 0xFF  # same size, other content
    arrow.write_bytes(bytes(data))
    again = prepare(sft, options, tiny_llama_path)
    assert again.note.startswith("built")
    assert rows_of(again.data) == rows
    assert prepare(sft, options, tiny_llama_path).note.startswith("hit")


def test_a_truncated_meta_json_is_reported_and_rebuilt(host, sft, tmp_path, cache, tiny_llama_path, capsys):
    write_jsonl(tmp_path / "train.jsonl")
    options = sft_options(host, tmp_path)
    entry = entry_of(prepare(sft, options, tiny_llama_path))
    text = (entry / "meta.json").read_text()
    (entry / "meta.json").write_text(text[: len(text) // 2])
    capsys.readouterr()
    again = prepare(sft, options, tiny_llama_path)
    assert again.note.startswith("built") and len(again.data.train) == len(ROWS)
    assert "meta.json is damaged" in " ".join(capsys.readouterr().err.split())
    assert prepare(sft, options, tiny_llama_path).note.startswith("hit")


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unusable_cache_dir_means_no_cache_with_a_warning(host, sft, tmp_path, tiny_llama_path, capsys, kind):
    import os

    write_jsonl(tmp_path / "train.jsonl")
    place = tmp_path / "cache"
    if kind == "file":
        place.write_text("not a folder")
    else:
        place.mkdir()
        place.chmod(0o500)
        if os.access(place, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
    options = sft_options(host, tmp_path)
    settings = DataSection.model_construct(cache=True, cache_dir=str(place), num_proc=1)  # as if it changed after validate
    try:
        prepared = datacache.prepare(sft, "load_data", options, tokenizer_of(tiny_llama_path),
                                     lambda tok: sft.load_data(options, tok), settings=settings)
    finally:
        place.chmod(0o700)
    assert prepared.note == "off" and len(prepared.data.train) == len(ROWS)
    assert "cannot be used" in " ".join(capsys.readouterr().err.split())


def test_validate_refuses_a_cache_dir_that_is_a_file_and_resolves_relative_ones(host, tmp_path):
    from petune.errors import RecipeError

    (tmp_path / "cachefile").write_text("x")
    base = recipe_data(task={"name": "sft", "train": "train.jsonl"}, strategy={"name": "lora"})
    write_jsonl(tmp_path / "train.jsonl")
    with pytest.raises(RecipeError, match="is a file, not a folder"):
        validate({**base, "data": {"cache_dir": "cachefile"}}, host, path=tmp_path / "recipe.toml")
    recipe = validate({**base, "data": {"cache_dir": "tokens"}}, host, path=tmp_path / "recipe.toml")
    assert recipe.data.cache_dir == str(tmp_path / "tokens")  # beside the recipe, like data paths


def test_store_split_moves_only_a_split_that_is_exactly_one_file(tmp_path):
    """_store_split reads datasets' private ``_indices`` and ``table.replays`` (no public API
    says "this split is one file as it is"): a datasets release that changes them fails here."""
    from datasets import Dataset

    source = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]], "n": [2, 1, 3]})
    source.save_to_disk(str(tmp_path / "src"))
    arrow = next((tmp_path / "src").glob("*.arrow"))

    def stored(split, name):
        folder = tmp_path / name
        folder.mkdir()
        datacache._store_split(split, folder, "train")
        return sorted(p.name for p in folder.iterdir())

    for name, split in {"selected": Dataset.from_file(str(arrow)).select([2, 0]),
                        "renamed": Dataset.from_file(str(arrow)).rename_column("n", "length"),
                        "formatted": Dataset.from_file(str(arrow)).with_format("torch"),
                        "in memory": Dataset.from_dict({"n": [1]})}.items():
        assert stored(split, name) == ["train"], name  # save_to_disk: the file is not the split
        assert arrow.exists()
    # map() writes a file of its own beside the source: that file is the split, and moves
    mapped = Dataset.from_file(str(arrow)).map(lambda r: {"n": r["n"] + 1})
    assert stored(mapped, "mapped") == ["train.arrow"] and arrow.exists()
    whole = Dataset.from_file(str(arrow))
    assert stored(whole, "whole") == ["train.arrow"] and not arrow.exists()  # moved, never read through memory


def test_a_failed_store_says_so_in_the_plan(host, sft, tmp_path, cache, tiny_llama_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datacache, "_store_split", full_disk)
    prepared = prepare(sft, sft_options(host, tmp_path), tiny_llama_path)
    assert "not stored (OSError: No space left on device)" in prepared.note and "stored in" not in prepared.note
    assert len(prepared.data.train) + len(prepared.data.validation or []) == len(ROWS)
