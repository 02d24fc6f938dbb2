"""Messages that say what happened (issue 33, items 13-16): pairs dropped as identical are
counted in the error, a save_to_disk folder gets the reader's own reason, a lone carriage
return in a CSV is named, ``petune methods ""`` is an error."""

from __future__ import annotations

import json

import pytest

from petune.cli import main
from petune.errors import DataError


def test_all_identical_pairs_say_so_and_do_not_blame_max_length(tmp_path, tiny_llama_path):
    from petune.models import load_tokenizer
    from petune_plugins.tasks.preference import PreferenceOptions, PreferenceTask

    same = [{"prompt": f"q {i}", "chosen": f"a {i}", "rejected": f"a {i}"} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    for split, expected in ((0.1, "too few train pairs to hold out"), (0.0, "no train pairs left")):
        options = PreferenceOptions.model_validate({"train": tmp_path / "pairs.jsonl", "validation_split": split})
        with pytest.raises(DataError) as caught:
            PreferenceTask().load_data(options, load_tokenizer(tiny_llama_path))
        text = str(caught.value)
        assert expected in text and "20 dropped as identical" in text, text
        assert "raise task.max_length" not in text


def test_a_save_to_disk_folder_gets_the_readers_reason(tmp_path):
    from datasets import Dataset, DatasetDict

    from petune_plugins.tasks._common import check_data_paths
    from petune_plugins.tasks.sft import SftOptions

    rows = Dataset.from_list([{"instruction": "hi", "output": "hello"}])
    DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "dict"))
    rows.save_to_disk(str(tmp_path / "one"))
    (tmp_path / "one" / "state.json").unlink()
    for folder, expected in (("dict", "DatasetDict with the splits test, train"), ("one", "no state.json")):
        with pytest.raises(DataError, match=expected):
            check_data_paths(SftOptions.model_validate({"train": tmp_path / folder}))


def test_a_lone_carriage_return_in_a_csv_is_named(tmp_path):
    from petune_plugins.tasks import datafiles

    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\na good\rmovie,pos\nbad,neg\n")
    with pytest.raises(DataError) as caught:
        list(datafiles.iter_records(path))
    text = str(caught.value)
    assert "carriage return" in text and "universal-newline" not in text and "quoting" not in text


def test_methods_with_an_empty_name_is_an_error(capsys):
    assert main(["methods", ""]) == 2
    assert "no method ''" in capsys.readouterr().err
