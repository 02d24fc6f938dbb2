"""The shared data-file readers: formats, line numbers, and errors that name file and line."""

from __future__ import annotations

import json

import pytest

from petune.errors import DataError
from petune_plugins.tasks import datafiles


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# -- tables ---------------------------------------------------------------------------------
def test_csv_with_header_by_name(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\n\"a, quoted\"\"text\"\"\",pos\nplain,neg\n")
    table = datafiles.read_table(path)
    columns, rows = table  # unpacks like a (columns, rows) pair
    assert columns == ["text", "label"]
    assert rows == [['a, quoted"text"', "pos"], ["plain", "neg"]]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3"]
    assert table.index("label") == 1 and table.index(" LABEL ") == 1 and table.index(-1) == 1


def test_tsv_without_header_by_position(tmp_path):
    path = write(tmp_path, "d.tsv", "a long text about sports\tSports\nanother one\tSports\nnews\tWorld\n")
    columns, rows = datafiles.read_table(path)
    assert columns is None
    assert rows[0] == ["a long text about sports", "Sports"]
    assert datafiles.read_table(path).index(0) == 0


def test_header_auto_detection():
    sst2 = [["sentence", "label"], ["a fine film", "1"], ["dull", "0"]]
    ag_news = [["p2pnet.net News:- The US Federal Trade Commission has filed", "Sci/Tech"],
               ["It #39;s over.", "Sci/Tech"]]
    ag_test = [["3", "Fears for T N pension", "Unions representing workers"], ["4", "The Race", "SPACE.com"]]
    assert datafiles.looks_like_header(sst2[0], sst2[1:])
    assert not datafiles.looks_like_header(ag_news[0], ag_news[1:])
    assert not datafiles.looks_like_header(ag_test[0], ag_test[1:])


def test_header_forced_either_way(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nx,y\n")
    assert datafiles.read_table(path, header=False).rows[0] == ["text", "label"]
    assert datafiles.read_table(path, header=True).columns == ["text", "label"]


def test_multiline_quoted_field_keeps_line_numbers(tmp_path):
    path = write(tmp_path, "d.tsv", "text\tlabel\n\"two\nlines\"\ta\n\nnext\tb\n")
    _, rows = datafiles.read_table(path)
    assert rows[0] == ["two\nlines", "a"]
    assert rows[0].where.endswith(":2") and rows[1].where.endswith(":5")


def test_bom_crlf_and_max_rows(tmp_path):
    path = write(tmp_path, "d.csv", b"\xef\xbb\xbftext,label\r\na,1\r\nb,2\r\nc,3\r\n")
    table = datafiles.read_table(path, max_rows=2)
    assert table.columns == ["text", "label"] and table.rows == [["a", "1"], ["b", "2"]]


def test_delimiter_from_content_and_text_input():
    table = datafiles.parse_table(datafiles.text_lines("x\ty\nz\tw\n"), "<stdin>", header=False)
    assert table.rows == [["x", "y"], ["z", "w"]]
    assert table.rows[1].where == "<stdin>:2"


def test_semicolon_csv_is_read_with_semicolons(tmp_path, capsys):
    # what spreadsheets save as "CSV" where the decimal mark is a comma; quoted fields may hold either
    text = '\ufefftext;label;score\n"great; film";pos;0,9\n"ok, then";pos;0,5\nbad;neg;0,1\n"two\nlines";neg;0,2\n'
    path = write(tmp_path, "d.csv", text)
    table = datafiles.read_table(path)
    assert table.columns == ["text", "label", "score"]
    assert table.rows == [["great; film", "pos", "0,9"], ["ok, then", "pos", "0,5"], ["bad", "neg", "0,1"],
                          ["two\nlines", "neg", "0,2"]]
    assert 'read with ";" as the delimiter' in capsys.readouterr().err
    assert datafiles.read_records(path)[2] == {"text": "bad", "label": "neg", "score": "0,1"}
    with pytest.raises(DataError, match="cannot parse this row"):  # a delimiter set is kept
        datafiles.read_table(path, delimiter=",")


@pytest.mark.parametrize("text, first_row", [
    ("text,label\na; b,pos\nc,neg\n", ["text", "label"]),  # commas split evenly: semicolons are text
    ("text\nwhat; then\nand; so\n", ["text"]),             # one column: the semicolons are text
    ("a;b\n", ["a;b"]),                                      # one row: nothing to compare, the standard comma
])
def test_comma_csv_stays_comma(tmp_path, text, first_row):
    assert datafiles.read_table(write(tmp_path, "d.csv", text), header=False).rows[0] == first_row


# -- JSON -----------------------------------------------------------------------------------
def test_jsonl_records_know_their_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    records = datafiles.read_jsonl(path)
    assert records == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    assert records[1].where == f"{path}:3"
    assert json.dumps(records[0])  # still a plain dict for everything else


def test_json_array_records_and_lines(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"instruction": "a"},\n  {"instruction": "b",\n   "input": ""}\n]\n')
    records = datafiles.read_json_records(path)
    assert [r["instruction"] for r in records] == ["a", "b"]
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3"]


def test_read_records_by_extension(tmp_path):
    as_jsonl_in_json = write(tmp_path, "lines.json", '{"a": 1}\n{"a": 2}\n')
    assert [r["a"] for r in datafiles.read_records(as_jsonl_in_json)] == [1, 2]
    table = write(tmp_path, "t.tsv", "a\tb\n1\t2\n")
    assert datafiles.read_records(table) == [{"a": "1", "b": "2"}]
    with pytest.raises(DataError, match="unsupported file type '.xlsx'") as err:
        datafiles.read_records(write(tmp_path, "x.xlsx", "PK"))
    assert ".parquet" in err.value.hint
    with pytest.raises(DataError, match="unsupported file type '.txt.gz'"):
        datafiles.read_records(write(tmp_path, "x.txt.gz", b""))


# -- errors ---------------------------------------------------------------------------------
def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        datafiles.read_table(tmp_path / "nope.csv")
    assert err.value.where == str(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="is a folder"):
        datafiles.read_jsonl(tmp_path)


def test_non_utf8_names_line_and_column(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nok,1\ncaf\xe9,2\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        datafiles.read_table(path)
    assert err.value.where == f"{path}:3"
    assert "column 4" in err.value.message and "UTF-8" in err.value.hint


def test_utf16_is_named(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nx,1\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        datafiles.read_table(path)


@pytest.mark.parametrize("content, message", [("", "empty"), ("\n  \n", "only blank lines")])
def test_empty_files(tmp_path, content, message):
    path = write(tmp_path, "d.csv", content)
    with pytest.raises(DataError, match=message) as err:
        datafiles.read_table(path)
    assert err.value.where == str(path)
    with pytest.raises(DataError, match="empty"):
        datafiles.read_jsonl(write(tmp_path, "e.jsonl", content))
    with pytest.raises(DataError, match="empty"):
        datafiles.read_json_records(write(tmp_path, "e.json", content))


def test_header_without_rows(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        datafiles.read_table(write(tmp_path, "d.csv", "text,label\n"), header=True)


def test_row_with_wrong_field_count_names_line(tmp_path):
    path = write(tmp_path, "d.tsv", "text\tlabel\nfine\t1\nan extra\ttab\t0\n")
    with pytest.raises(DataError, match="3 field") as err:
        datafiles.read_table(path)
    assert err.value.where == f"{path}:3" and "quoted" in err.value.hint


def test_unbalanced_quote_names_row(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\nok,1\n"broken" here,2\n')
    with pytest.raises(DataError, match="cannot parse") as err:
        datafiles.read_table(path)
    assert err.value.where == f"{path}:3"


def test_missing_column_lists_the_columns(tmp_path):
    table = datafiles.read_table(write(tmp_path, "d.csv", "sentence,label\nx,1\n"))
    with pytest.raises(DataError, match="'text': no such column") as err:
        table.index("text", "text_column")
    assert "0='sentence'" in err.value.hint and err.value.where.endswith("d.csv:1")
    with pytest.raises(DataError, match="has 2 column"):
        table.index(5, "label_column")
    headerless = datafiles.read_table(write(tmp_path, "n.csv", "x,1\ny,2\n"), header=False)
    with pytest.raises(DataError, match="no header row"):
        headerless.index("label", "label_column")


def test_invalid_jsonl_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        datafiles.read_jsonl(path)
    assert err.value.where == f"{path}:2"
    with pytest.raises(DataError, match="expected a JSON object") as err:
        datafiles.read_jsonl(write(tmp_path, "l.jsonl", '{"a": 1}\n[1, 2]\n'))
    assert err.value.where.endswith(":2")


def test_invalid_json_document(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"a": 1},\n {"a": 2\n]\n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        datafiles.read_json_records(path)
    assert err.value.where == f"{path}:4"
    with pytest.raises(DataError, match="item 2 of the array is a string") as err:
        datafiles.read_json_records(write(tmp_path, "s.json", '[{"a": 1},\n"x"]'))
    assert err.value.where.endswith(":2")
    with pytest.raises(DataError, match="JSON Lines") as err:
        datafiles.parse_json_records('{"a": 1}\n{"a": 2}\n', "x.json")
    assert "JSON Lines" in err.value.hint


# -- quoting --------------------------------------------------------------------------------
PTB = 'sentence\tlabel\n" Hello , " he said .\t1\nit \'s " fine " .\t0\n" Great . "\t1\n'


def test_tsv_with_literal_quotes_reads_as_text_and_says_so(tmp_path, capsys):
    path = write(tmp_path, "ptb.tsv", PTB)
    table = datafiles.read_table(path)
    assert table.quoting == "none"
    assert [row[0] for row in table.rows] == ['" Hello , " he said .', 'it \'s " fine " .', '" Great . "']
    said = capsys.readouterr().err
    assert "ptb.tsv" in said and 'chose "none"' in said and 'quoting = "csv"' in said
    assert datafiles.read_records(path)[0]["sentence"] == '" Hello , " he said .'


def test_forced_csv_quoting_error_names_the_option(tmp_path):
    path = write(tmp_path, "ptb.tsv", PTB)
    with pytest.raises(DataError, match="cannot parse this row") as err:
        datafiles.read_table(path, quoting="csv")
    assert err.value.where == f"{path}:2" and 'quoting = "none"' in err.value.hint
    with pytest.raises(DataError) as err:  # a CSV file is read with CSV quoting unless told otherwise
        datafiles.read_table(write(tmp_path, "ptb.csv", 'text,label\n" Hello " he said .,1\n'))
    assert 'quoting = "none"' in err.value.hint
    assert datafiles.read_table(tmp_path / "ptb.csv", quoting="none").rows == [['" Hello " he said .', "1"]]


@pytest.mark.parametrize("content, first", [
    ('text\tlabel\n"he said ""hi"""\t1\nplain\t0\n', 'he said "hi"'),  # pandas: a doubled quote
    ('text\tlabel\n"a\ttab"\t1\nplain\t0\n', "a\ttab"),  # a tab inside quotes
    ('"text"\t"label"\n"a film"\t"pos"\n"dull"\t"neg"\n', "a film"),  # every field quoted (R, QUOTE_ALL)
])
def test_tsv_with_real_quoted_fields_reads_csv_quoting(tmp_path, content, first):
    table = datafiles.read_table(write(tmp_path, "q.tsv", content))
    assert table.quoting == "csv" and table.rows[0][0] == first and table.columns == ["text", "label"]


def test_quote_that_would_swallow_a_row_is_text(tmp_path):
    # PTB: an opening quote on one line, the closing one on the next, right before a tab
    path = write(tmp_path, "s.tsv", '" Hello , he said .\t1\nHe left . "\t0\n')
    table = datafiles.read_table(path, header=False)
    assert table.quoting == "none" and table.rows == [['" Hello , he said .', "1"], ['He left . "', "0"]]


def test_no_quotes_says_nothing(tmp_path, capsys):
    table = datafiles.read_table(write(tmp_path, "n.tsv", 'text\tlabel\nsay "no" twice\t1\n'))
    assert table.rows == [['say "no" twice', "1"]]
    assert capsys.readouterr().err == ""


def test_quoted_field_past_the_sniffed_lines_still_reads_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "_SNIFF_LINES", 4)
    path = write(tmp_path, "m.tsv", 'text\tlabel\nfine\t0\n"three\nline\nfield"\t1\nlast\t0\n')
    table = datafiles.read_table(path)
    assert table.quoting == "csv" and table.rows[1] == ["three\nline\nfield", "1"]
    assert table.rows[2].where == f"{path}:6"


def test_wrong_field_count_without_quoting_points_to_csv(tmp_path):
    path = write(tmp_path, "d.tsv", "text\tlabel\nan extra\ttab\t0\n")
    with pytest.raises(DataError, match="3 field") as err:
        datafiles.read_table(path, quoting="none")
    assert 'quoting = "csv"' in err.value.hint


# -- tasks take quoting from the recipe ------------------------------------------------------
def test_classification_quoting_option_task_wide_and_per_file(tmp_path):
    from pydantic import ValidationError

    from petune_plugins.tasks.classification import ClassificationOptions, FileSettings, read_examples

    (tmp_path / "ptb.tsv").write_text('" Hello " he said .\t1\n" Great . "\tgood\n', encoding="utf-8")
    (tmp_path / "q.tsv").write_text('sentence\tlabel\n"quoted"\t1\n', encoding="utf-8")

    def examples(**values):
        options = ClassificationOptions.model_validate(values, context={"base_dir": tmp_path})
        return read_examples(FileSettings.of(options, options.train))

    assert [e.text for e in examples(train="ptb.tsv")] == ['" Hello " he said .', '" Great . "']
    with pytest.raises(DataError) as err:
        examples(train="ptb.tsv", quoting="csv")
    assert 'quoting = "none"' in err.value.hint
    assert examples(train="q.tsv", quoting="csv")[0].text == "quoted"
    assert examples(train={"path": "q.tsv", "quoting": "csv"}, quoting="none")[0].text == "quoted"  # the file's own wins
    with pytest.raises(ValidationError, match="quoting"):
        ClassificationOptions.model_validate({"train": "q.tsv", "quoting": "literal"}, context={"base_dir": tmp_path})


def test_seq2seq_quoting_option(tmp_path):
    from petune_plugins.tasks.seq2seq import DataFile, Seq2SeqOptions, read_pairs

    path = tmp_path / "ptb.tsv"
    path.write_text('source\ttarget\n" Hi , " she said .\t" Hallo , " sagte sie .\n', encoding="utf-8")
    options = Seq2SeqOptions.model_validate({"train": str(path)})
    pairs, _ = read_pairs(DataFile(path=path), options)
    assert pairs[0].source == '" Hi , " she said .' and pairs[0].references == ['" Hallo , " sagte sie .']
    with pytest.raises(DataError, match="cannot parse"):
        read_pairs(DataFile(path=path), Seq2SeqOptions.model_validate({"train": str(path), "quoting": "csv"}))


def test_one_json_parser_for_records_and_any_values():
    """datafiles reads JSON for every task: objects for records, any value for the chat tasks
    (prompts given as strings), each with the line it starts on and its index in an array."""
    text = '[\n  "a prompt",\n  {"prompt": "x",\n   "completion": "y"}\n]\n'
    values = list(datafiles.iter_json_text(text, "p.json", objects=False))
    assert values == [datafiles.JsonValue("a prompt", "p.json:2", 0),
                      datafiles.JsonValue({"prompt": "x", "completion": "y"}, "p.json:3", 1)]
    assert [v.where for v in datafiles.iter_json_text('"a"\n\n{"b": 1}\n', "p.jsonl", objects=False)] == [
        "p.jsonl:1", "p.jsonl:3"]
    with pytest.raises(DataError, match="item 1 of the array is a string"):
        datafiles.parse_json_records(text, "p.json")
    assert [r.where for r in datafiles.parse_json_records(text.replace('"a prompt"', "{}"), "p.json")] == [
        "p.json:2", "p.json:3"]
    with pytest.raises(DataError, match="invalid JSON after item 1") as err:
        list(datafiles.iter_json_array('[{"a": 1}\n {"a": 2}]', "q.json"))
    assert err.value.where == "q.json:2"
    assert datafiles.json_type(1.5) == "a number" and datafiles.json_type(True) == "true/false"
