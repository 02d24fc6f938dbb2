"""Every data format the shared reader takes gives the same records as plain JSON Lines, and
damaged files give exit-2 errors naming the file and the line (or the row)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from petune.errors import DataError
from petune_plugins.tasks import datafiles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

RECORDS = [{"text": f"sentence {i} with a, comma and \"quotes\"", "label": ["neg", "pos"][i % 2], "n": i}
           for i in range(30)]
TEXT_RECORDS = [{k: str(v) for k, v in r.items()} for r in RECORDS]  # as a table reads them


def jsonl_bytes(records=RECORDS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def csv_bytes(delimiter=",") -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(RECORDS[0]), delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    writer.writerows(RECORDS)
    return out.getvalue().encode()


def compress(data: bytes, kind: str) -> bytes:
    return gzip.compress(data) if kind == "gz" else zstandard.ZstdCompressor().compress(data)


def plain(records):
    return [dict(r) for r in records]


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("name, content, expected", [
    ("d.jsonl", jsonl_bytes, RECORDS),
    ("d.json", lambda: json.dumps(RECORDS, indent=1).encode(), RECORDS),
    ("d.csv", csv_bytes, TEXT_RECORDS),
    ("d.tsv", lambda: csv_bytes("\t"), TEXT_RECORDS),
])
def test_compressed_files_read_like_the_plain_ones(tmp_path, kind, name, content, expected):
    (tmp_path / name).write_bytes(content())
    packed = tmp_path / f"{name}.{kind}"
    packed.write_bytes(compress(content(), kind))
    records = datafiles.read_records(packed)
    assert plain(records) == plain(datafiles.read_records(tmp_path / name)) == expected
    assert records[0].where.startswith(f"{packed}:")
    assert datafiles.data_suffix(packed) == Path(name).suffix
    assert len(datafiles.read_records(packed, max_rows=3)) == 3


def test_several_gzip_members_and_zstd_frames_are_one_stream(tmp_path):
    data = jsonl_bytes()
    half = data.index(b"\n", len(data) // 2) + 1
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    zc = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(zc.compress(data[:half]) + zc.compress(data[half:]))
    for name in ("m.jsonl.gz", "m.jsonl.zst"):
        assert plain(datafiles.read_records(tmp_path / name)) == RECORDS


def test_columnar_files_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pa.Table.from_pylist(RECORDS)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 10), tmp_path / "shards" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(10), tmp_path / "shards" / "train-00001-of-00002.parquet")
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"), num_shards=3)

    for name in ("d.parquet", "d.arrow", "shards", "saved"):
        path = tmp_path / name
        assert datafiles.data_format(path) in ("parquet", "arrow")
        records = datafiles.read_records(path)
        assert plain(records) == RECORDS, name
        assert len(datafiles.read_records(path, max_rows=4)) == 4
    saved = datafiles.read_records(tmp_path / "saved")
    assert saved[25].where == f"{tmp_path / 'saved'}:26"  # rows from 1, counted through the folder's files
    shards = datafiles.read_records(tmp_path / "shards")
    assert shards[12].where == f"{tmp_path / 'shards' / 'train-00001-of-00002.parquet'}:3"  # per shard


def test_dataset_dict_folder_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(RECORDS[:5]), "test": Dataset.from_list(RECORDS[5:])}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict") as err:
        datafiles.read_records(tmp_path / "dd")
    assert str(tmp_path / "dd" / "train") in err.value.hint and str(tmp_path / "dd" / "test") in err.value.hint


# -- errors ---------------------------------------------------------------------------------
def test_bad_record_in_jsonl_gz_names_its_line(tmp_path):
    lines = jsonl_bytes().splitlines(keepends=True)
    lines[16] = b'{"text": "cut off", \n'
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(lines)))
    with pytest.raises(DataError, match="invalid JSON") as err:
        datafiles.read_records(path)
    assert err.value.where == f"{path}:17" and err.value.exit_code == 2


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_file_names_where_it_stops(tmp_path, kind):
    data = b"".join(json.dumps({"text": f"row {i} " + "x" * 200}).encode() + b"\n" for i in range(3000))
    blob = compress(data, kind)
    path = tmp_path / f"d.jsonl.{kind}"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="ends early") as err:
        datafiles.read_records(path)
    line = int(err.value.where.rpartition(":")[2])
    assert err.value.where.startswith(f"{path}:") and 1 < line < 3000 and err.value.exit_code == 2
    assert len(datafiles.read_records(path, max_rows=5)) == 5  # streamed: rows before the damage still read


def test_corrupt_gzip_and_not_gzip(tmp_path):
    blob = bytearray(gzip.compress(jsonl_bytes()))
    blob[-6] ^= 0xFF  # the CRC no longer matches
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="gzip data is damaged") as err:
        datafiles.read_records(path)
    assert err.value.where.startswith(f"{path}:")
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(jsonl_bytes())
    with pytest.raises(DataError, match="not gzip data") as err:
        datafiles.read_records(fake)
    assert err.value.where == str(fake) and "rename" in err.value.hint


def test_damaged_and_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataError, match="cannot read this Parquet file") as err:
        datafiles.read_records(bad)
    assert err.value.where == str(bad) and err.value.exit_code == 2
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS).slice(0, 0), empty)
    with pytest.raises(DataError, match="no rows"):
        datafiles.read_records(empty)


def test_parquet_missing_column_and_bad_value_name_the_row(tmp_path):
    """Through a task that takes records of any format: seq2seq."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from petune_plugins.tasks.seq2seq import DataFile, Seq2SeqOptions, read_pairs

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"source": "a", "summary_text": "b"}] * 3), path)
    options = Seq2SeqOptions.model_validate({"train": str(path), "target_field": "target"})
    with pytest.raises(DataError, match="no 'target' field") as err:
        read_pairs(DataFile(path=path), options)
    assert err.value.where == f"{path}:1" and "summary_text" in err.value.message
    rows = [{"source": "a", "target": "b"}] * 5 + [{"source": "c", "target": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match="target is empty") as err:
        read_pairs(DataFile(path=path), Seq2SeqOptions.model_validate({"train": str(path)}))
    assert err.value.where == f"{path}:6"


def test_compressed_columnar_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "d.parquet.gz"
    path.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(DataError, match="compressed inside"):
        datafiles.read_records(path)


@pytest.mark.skipif(not (SHARED / "preference").exists(), reason="../shared/data/preference is not here")
def test_real_preference_data_reads_without_unpacking():
    path = SHARED / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
    records = datafiles.read_records(path)
    assert len(records) == 2312 and set(records[0]) == {"chosen", "rejected"}
    assert records[-1].where == f"{path}:2312"
    assert all(r["chosen"] != r["rejected"] for r in records)


def test_ner_reads_a_parquet_file_as_records(tmp_path):
    """Tasks read a record's ``where`` as file:number; a parquet row's must parse too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from petune_plugins.tasks import ner

    path = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                         {"tokens": ["Peter"], "tags": ["B-PER", "O"]}]), path)
    options = ner.NerOptions.model_validate({"train": str(path), "format": "jsonl"})
    with pytest.raises(DataError, match="1 tokens but 2 tags") as err:
        ner.read_sentences(path, options)
    assert err.value.where == f"{path}:2"
    pq.write_table(pa.Table.from_pylist([{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}]), path)
    assert [s.tokens for s in ner.read_sentences(path, options)] == [["EU", "rejects"]]


def test_predict_reads_compressed_inputs_and_refuses_columnar_ones(tmp_path):
    from petune.commands import read_input
    from petune.errors import UserError

    text = jsonl_bytes().decode()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    zc = zstandard.ZstdCompressor()
    half = len(text) // 2
    (tmp_path / "in.jsonl.zst").write_bytes(zc.compress(text[:half].encode()) + zc.compress(text[half:].encode()))
    assert read_input(tmp_path / "in.jsonl.gz") == read_input(tmp_path / "in.jsonl.zst") == text
    for name, data in (("cut.jsonl.gz", gzip.compress(text.encode())[:-20]),
                       ("cut.jsonl.zst", zc.compress(text.encode())[:-20])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="cannot unpack") as err:
            read_input(tmp_path / name)
        assert err.value.where == str(tmp_path / name)
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="not Parquet or Arrow") as err:
        read_input(tmp_path / "in.parquet")
    assert "to_json" in err.value.hint
    with pytest.raises(UserError, match="not found"):
        read_input(tmp_path / "missing.jsonl")
