"""Readers for the data files tasks take — CSV/TSV, JSON Lines, JSON, Parquet, Arrow, each
plain or gzip/zstd-compressed — with errors for people.

Every problem is a :class:`petune.errors.DataError` whose ``where`` is ``file:line``
(or the file alone when no line applies) and whose hint says what to do: a file that
is missing, empty or not UTF-8 (the line and column of the first bad byte are named),
invalid JSON, a row with the wrong number of fields, a column that does not exist.
Columnar files (Parquet, Arrow) have no lines: their records say ``file:N`` for row N
counted from 1, the line the row would be on in a JSON Lines copy (``dataset[N - 1]``);
tasks read every ``where`` as ``file:number``.

The API, for any task::

    read_table(path, delimiter=None, header="auto", max_rows=None, quoting="auto") -> Table
        columns, rows = read_table(path)   # columns: list[str] | None; rows: list[Row]
        table.index("label") / table.index(0)   # a column by name or position -> position
    read_jsonl(path, max_rows=None) -> list[Record]           # one JSON object per line
    read_json_records(path, max_rows=None) -> list[Record]    # a JSON array of objects
    read_records(path, max_rows=None, quoting="auto") -> list[Record]
        # any format: .jsonl/.json/.csv/.tsv (+ .gz/.zst), .parquet, .arrow, a save_to_disk folder
    iter_records(path, max_rows=None, quoting="auto") -> Iterator[Record]   # the same, streamed
    data_format(path) -> "jsonl" | "json" | "table" | "parquet" | "arrow" | None
    data_suffix(path) -> the format's suffix without compression (".jsonl" for x.jsonl.gz)
    iter_lines(path) -> (line number, line) pairs, UTF-8 checked line by line (decompressed)
    text_lines(text) -> the same pairs for text already read (stdin)
    parse_table(lines, source, ...) / parse_jsonl(lines, source, ...)  # readers over such pairs
    parse_json_records(text, source, ...)
    iter_json_text(text, source, objects=False) / iter_json_lines / iter_json_array
        # any JSON values (not only objects) as JsonValue(value, where, index): the one JSON parser
    json_type(value) -> "an object" | "a list" | ...   # for messages

``Record`` is a ``dict`` and ``Row`` a ``list`` of strings; both carry ``.where``
(``"file:line"``, or ``"file:row"``) so a later check can point at the exact record.

``quoting`` (tables): ``"csv"`` reads standard CSV quoting (``"a ""quoted"" text"``);
``"none"`` reads every character literally (PTB-tokenised text whose sentences start with
a ``"`` token); ``"auto"`` is ``"csv"`` for comma-separated files, and for tab-separated
ones ``"csv"`` only when the file's first lines really hold quoted fields (see
:func:`sniff_quoting`), saying so in one line when quotes are found.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from petune.errors import DataError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
ARROW_SUFFIXES = {".arrow", ".feather"}
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
#: every format read_records takes, for hints
FORMATS_HINT = (".jsonl, .json, .csv, .tsv (each also .gz or .zst), .parquet, .arrow, "
                "or a folder written by datasets' save_to_disk")

Quoting = Literal["auto", "csv", "none"]
QUOTING_HELP = ("tables: \"csv\" reads quoted fields (\"a \"\"b\"\"\"), \"none\" keeps every quote as text "
                "(PTB-tokenised text); auto: csv for .csv, and for .tsv only when the file uses quoted fields")

_UTF8_HINT = "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8 old.csv > new.csv)"
_NAME = re.compile(r"[^\W\d][\w\-./#]*")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


class Record(dict):
    """A JSON object (or a table row keyed by column name) that knows where it came from."""

    where: str = ""

    @classmethod
    def at(cls, data: dict, where: str) -> Record:
        record = cls(data)
        record.where = where
        return record


class Row(list):
    """The fields of one table row (strings) plus ``.where`` (``file:line``)."""

    where: str = ""

    @classmethod
    def at(cls, fields: list[str], where: str) -> Row:
        row = cls(fields)
        row.where = where
        return row


@dataclass
class Table:
    """A CSV/TSV file: ``columns`` (the header, or None), ``rows`` and the ``source`` they
    came from. Unpacks as ``columns, rows = table``."""

    columns: list[str] | None
    rows: list[Row]
    source: str = ""
    quoting: str = "csv"  # how quotes were read: "csv" or "none"

    def __iter__(self):
        return iter((self.columns, self.rows))

    @property
    def width(self) -> int:
        return len(self.columns) if self.columns is not None else (len(self.rows[0]) if self.rows else 0)

    def index(self, column: int | str, option: str = "column") -> int:
        """Position of ``column`` — a header name or a 0-based position (negative counts
        from the end). ``option`` names the setting it came from, for the error."""
        if isinstance(column, int):
            position = column if column >= 0 else self.width + column
            if not 0 <= position < self.width:
                raise DataError(
                    f"{option} = {column}: the file has {self.width} column(s) (positions 0 to {self.width - 1})",
                    where=self.source, hint=self._columns_hint())
            return position
        if self.columns is None:
            raise DataError(f"{option} = {column!r} names a column, but the file has no header row",
                            where=self.source, hint=f"use a 0-based position instead, e.g. {option} = 0, "
                                                    "or add a header line; " + self._columns_hint())
        matches = [i for i, name in enumerate(self.columns) if name == column]
        if not matches:  # be lenient about case and surrounding spaces, never about spelling
            matches = [i for i, name in enumerate(self.columns) if name.strip().lower() == column.strip().lower()]
        if len(matches) > 1:
            raise DataError(f"{option} = {column!r}: the header has {len(matches)} columns of that name",
                            where=f"{self.source}:1", hint="rename one of them or give the position instead")
        if not matches:
            raise DataError(f"{option} = {column!r}: no such column", where=f"{self.source}:1", hint=self._columns_hint())
        return matches[0]

    def _columns_hint(self) -> str:
        if self.columns is not None:
            return "columns are: " + ", ".join(f"{i}={name!r}" for i, name in enumerate(self.columns))
        first = self.rows[0] if self.rows else []
        preview = ", ".join(f"{i}={shorten(v)!r}" for i, v in enumerate(first))
        return f"no header; the first row is: {preview}"


def where(source: str | Path, line: int | None = None) -> str:
    """``file:line`` as errors show it."""
    return f"{source}:{line}" if line else str(source)


def shorten(text: str, limit: int = 40) -> str:
    """``text``, cut to ``limit`` characters with "..." when longer (for messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- files and formats ----------------------------------------------------------------------
def compression_of(path: str | Path) -> str | None:
    """"gzip" or "zstd" when the name ends in .gz / .zst, else None."""
    return COMPRESSION_SUFFIXES.get(Path(str(path)).suffix.lower())


def data_suffix(path: str | Path) -> str:
    """The suffix that names the format, past any compression suffix: ".jsonl" for
    ``train.jsonl.gz``, ".csv" for ``train.csv``."""
    path = Path(str(path))
    return (Path(path.stem).suffix if compression_of(path) else path.suffix).lower()


def data_format(path: str | Path) -> str | None:
    """"jsonl", "json", "table", "parquet" or "arrow" (a file or a save_to_disk / parquet
    shard folder); None for anything else (e.g. a CoNLL or plain text file)."""
    path = Path(path)
    if path.is_dir():
        return "parquet" if not (path / "state.json").exists() and any(path.glob("*.parquet")) else "arrow"
    suffix = data_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    return None


def _open_binary(path: Path):
    try:
        return open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        raise DataError("file not found", where=str(path),
                        hint="relative paths in a recipe are relative to the recipe's folder") from None
    except IsADirectoryError:
        raise DataError("is a folder, expected a data file", where=str(path),
                        hint="a folder is read only when datasets' save_to_disk wrote it (or it holds .parquet "
                             "files), and only where a task takes records") from None
    except PermissionError:
        raise DataError("cannot read the file: permission denied", where=str(path)) from None


_CHUNK = 1 << 18  # compressed bytes per read: text inflates ~5-10x, so a few MB at a time


_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def _decompressed(handle, kind: str, path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a gzip or zstd stream, a chunk at a time (never the whole
    file in memory). Several members / frames one after another are read as one stream, as
    gzip -d and zstd -d do; a stream that stops inside a member is an EOFError."""
    if kind == "gzip":
        def new_decoder():
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    else:
        try:
            import zstandard
        except ImportError:  # a dependency of petune; only a broken install lacks it
            raise DataError("reading .zst files needs the zstandard package", where=None,
                            hint="pip install zstandard") from None
        context = zstandard.ZstdDecompressor()
        new_decoder = context.decompressobj
    decoder, fed = new_decoder(), False
    first = handle.read(_CHUNK)
    if first and not first.startswith(_MAGIC[kind]):
        raise DataError(f"not {kind} data, though the name ends in {path.suffix}", where=str(path),
                        hint=f"rename the file without {path.suffix} if it is not compressed, or recompress it")
    for chunk in itertools.chain([first], iter(lambda: handle.read(_CHUNK), b"")):
        while chunk:
            fed = True
            if out := decoder.decompress(chunk):
                yield out
            chunk = b""
            if decoder.eof:  # this member ended; what follows is the next one
                chunk, decoder, fed = decoder.unused_data, new_decoder(), False
    if fed and not decoder.eof:
        raise EOFError("the compressed data ends early")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a chunk stream, each with its newline, as iterating a binary file gives them."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _damaged(path: Path, kind: str, exc: BaseException, last_line: int) -> DataError:
    """The error for compressed data that cannot be read past ``last_line``."""
    what = "ends early (the file is truncated)" if isinstance(exc, EOFError) else f"is damaged ({exc})"
    return DataError(f"the {kind} data {what}; {last_line} complete line(s) read before it", where=where(path, last_line + 1),
                     hint=f"download or copy the file again; `{kind} -t {path.name}` checks it")


@contextlib.contextmanager
def _raw_lines(path: Path) -> Iterator[Iterator[bytes]]:
    """The file's lines as bytes, decompressed as its name says."""
    kind = compression_of(path)
    with _open_binary(path) as handle:
        yield _split_lines(_decompressed(handle, kind, path)) if kind else iter(handle)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line of a UTF-8 file (decompressed when its name
    ends in .gz or .zst), line endings kept and a leading BOM dropped. Decoding goes line
    by line, so a bad byte is reported with its line and column, and damaged compressed
    data with the line where reading stopped."""
    path = Path(path)
    kind = compression_of(path)
    with _raw_lines(path) as raw_lines:
        number = 0
        while True:
            try:
                raw = next(raw_lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as exc:
                if kind is None:
                    raise
                raise _damaged(path, kind, exc, number) from None
            except Exception as exc:  # zstandard.ZstdError, named so plain files never import zstandard
                if kind == "zstd" and type(exc).__name__ == "ZstdError":
                    raise _damaged(path, kind, exc, number) from None
                raise
            number += 1
            if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError("the file is UTF-16 text, expected UTF-8", where=where(path, 1), hint=_UTF8_HINT)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                raise DataError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {number}, column {column} "
                                "cannot be decoded", where=where(path, number), hint=_UTF8_HINT) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for text already in memory (line endings kept)."""
    return enumerate(text.removeprefix("\ufeff").splitlines(keepends=True), 1)


def read_text(path: str | Path) -> str:
    """The whole file as text (UTF-8 checked line by line, like :func:`iter_lines`)."""
    return "".join(line for _, line in iter_lines(path))


# -- tables ---------------------------------------------------------------------------------
_DELIMITER_LINES = 20  # lines after the first one that guess_delimiter looks at


def guess_delimiter(source: str | Path, sample: str = "") -> str:
    """The delimiter from the extension (.tsv/.tab tab, .csv comma); otherwise a tab if the
    first line of ``sample`` (the file's text, of which its first lines are read) has one,
    else a comma. A comma file whose sample does not split into the same number of fields on
    every row with commas, but does with semicolons, is read with ``;``: what spreadsheets
    save as "CSV" where the decimal mark is a comma."""
    suffix = data_suffix(source)
    if suffix in TABLE_SUFFIXES and TABLE_SUFFIXES[suffix] != ",":
        return TABLE_SUFFIXES[suffix]
    sample = "".join(itertools.islice(io.StringIO(sample), _DELIMITER_LINES + 1))
    first = next((line for line in sample.splitlines() if line.strip()), "")
    if suffix not in TABLE_SUFFIXES and "\t" in first:
        return "\t"
    return ";" if _splits_evenly(sample, ";") and not _splits_evenly(sample, ",") else ","


def _splits_evenly(sample: str, delimiter: str) -> bool:
    """Whether ``sample``'s rows, two at least, have the same number of fields, two at least,
    read with ``delimiter`` and CSV quoting (a shorter last row may be cut off by the sample)."""
    widths = []
    with contextlib.suppress(csv.Error):  # a quote that CSV cannot read: not this delimiter's table
        widths = [len(row) for row in csv.reader(sample.splitlines(keepends=True), delimiter=delimiter) if row]
    if len(widths) > 2 and widths[-1] < widths[0]:
        widths.pop()
    return len(widths) >= 2 and len(set(widths)) == 1 and widths[0] >= 2


def looks_like_header(first: list[str], rows: list[list[str]]) -> bool:
    """``header = "auto"``: the first row is a header when its cells are distinct,
    non-numeric, short names that do not reappear in the same column below, and
    either some column below is numeric or every cell looks like a column name (one
    word starting with a letter: ``text``, ``class_index``, ``Sci/Tech``)."""
    cells = [c.strip() for c in first]
    if not cells or any(not c or _NUMBER.fullmatch(c) for c in cells) or len(set(cells)) != len(cells):
        return False
    sample = [r for r in rows[:50] if len(r) == len(first)]
    for j, name in enumerate(cells):
        if any(r[j].strip() == name for r in sample):
            return False
    numeric_below = any(sample and all(_NUMBER.fullmatch(r[j].strip() or "x") for r in sample) for j in range(len(cells)))
    name_like = all(len(c) <= 40 and _NAME.fullmatch(c) for c in cells)
    return numeric_below or name_like


_SNIFF_LINES = 2000  # lines of a TSV file that quoting = "auto" looks at
_announced: set[str] = set()


def sniff_quoting(lines: list[tuple[int, str]], delimiter: str, *, complete: bool = True) -> tuple[str, str]:
    """``quoting = "auto"`` for a tab-separated file: ("csv" or "none", why), from its first
    ``lines`` (``complete``: they are the whole file). Quoted fields are taken as CSV
    quoting only when something needs it — a doubled quote, a tab or line break inside
    quotes — or when a column is quoted in every row; a quote that CSV cannot read (a
    sentence starting with a ``"`` token), or one that would swallow a tab and a line break,
    means quotes are text. ``why`` is empty when no field starts with a quote: then both
    readings give the same rows."""
    if not any(field.startswith('"') for _, line in lines for field in line.split(delimiter)):
        return "none", ""
    numbers: list[int] = []

    def feed():
        for number, line in lines:
            numbers.append(number)
            yield line

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    consumed, needed = 0, ""
    quoted_in: dict[int, list[bool]] = {}  # column -> for each row: is the field quoted
    try:
        for fields in reader:
            raw = "".join(line for _, line in lines[consumed:reader.line_num])
            start, consumed = numbers[consumed], reader.line_num
            plain = raw.rstrip("\r\n").split(delimiter)
            if not raw.strip() or plain == fields:
                if raw.strip():
                    for j in range(len(plain)):
                        quoted_in.setdefault(j, []).append(False)
                continue
            inside = [f for f in fields if delimiter in f or "\n" in f]
            if any(delimiter in f and "\n" in f for f in inside):
                return "none", f"line {start}: a quote would join lines into one field, so quotes are text"
            if inside and not needed:
                needed = f"line {start} has a quoted field holding a tab or a line break"
            elif len(plain) == len(fields):
                for j, (cell, value) in enumerate(zip(plain, fields)):
                    quoted = cell.startswith('"') and cell.endswith('"') and len(cell) > 1
                    quoted_in.setdefault(j, []).append(quoted)
                    if quoted and '"' in value and not needed:
                        needed = f'line {start} has a quoted field with a doubled quote ("")'
    except csv.Error as exc:
        cut_off = not complete and "unexpected end of data" in str(exc) and len(lines) - consumed <= 50
        if not cut_off:  # (cut off: a quoted field that goes on past the lines looked at)
            start = numbers[min(consumed, len(numbers) - 1)]
            return "none", f'line {start}: a field starts with a " that does not close it, so quotes are text'
    if needed:
        return "csv", needed
    for j, flags in quoted_in.items():
        if len(flags) >= 2 and all(flags):
            return "csv", f"column {j} is quoted on every line"
    return "none", "quoted fields that need no quoting are read as text"


def _announce(source: str, quoting: str, why: str) -> None:
    """One line per file saying how quotes were read, where it changes the rows."""
    if why:
        other = "none" if quoting == "csv" else "csv"
        reading = "as CSV quoting" if quoting == "csv" else "as part of the text"
        _say(f'{source}: quotes read {reading} (quoting = "auto" chose "{quoting}": {why}); '
             f'set quoting = "{other}" for the other reading')


def _say(message: str) -> None:
    """A dim line on stderr, once per message (a file is read by several splits and commands)."""
    if message in _announced:
        return
    _announced.add(message)
    from rich.markup import escape

    from petune.console import err, is_main_process

    if is_main_process():
        err.print(escape(message), style="dim", soft_wrap=True)


def _quote_error(source: str, line: int, exc: csv.Error) -> DataError:
    if "new-line character seen in unquoted field" in str(exc):  # a lone CR (old Mac line ends, or a stray one)
        return DataError("this line holds a carriage return (\\r) that is not part of a line ending, inside a "
                         "field that is not quoted", where=where(source, line),
                         hint="convert the file's line endings (e.g. dos2unix / mac2unix), or remove the stray \\r "
                              "characters: sed -i 's/\\r$//; s/\\r/ /g' FILE")
    return DataError(f"cannot parse this row: {exc}", where=where(source, line),
                     hint='a field that starts with " is read as a quoted field, which must end with " '
                          'right before the delimiter; if the quotes are part of the text (e.g. PTB-tokenised '
                          'sentences), set quoting = "none" (in [task], or on this file)')


def parse_table(lines: Iterable[tuple[int, str]], source: str, *, delimiter: str | None = None,
                header: bool | str = "auto", max_rows: int | None = None, quoting: str = "auto") -> Table:
    """Parse CSV/TSV ``lines`` (as from :func:`iter_lines` or :func:`text_lines`).

    ``quoting``: "csv" (``"a ""quoted"" text"``), "none" (quotes are text) or "auto" (see
    the module's docstring); the choice is kept in ``table.quoting``. Blank lines are
    skipped; every row must have as many fields as the header (or, without a header, as
    the first row)."""
    lines = iter(lines)
    peeked = []  # lines up to the first non-blank one, to guess the delimiter from
    for item in lines:
        peeked.append(item)
        if item[1].strip():
            break
    if not any(line.strip() for _, line in peeked):
        raise DataError("the file is empty" if not peeked else "the file has only blank lines", where=source,
                        hint="check the path, or that the file was fully written")
    if delimiter is None:
        peeked += itertools.islice(lines, _DELIMITER_LINES)
        delimiter = guess_delimiter(source, "".join(line for _, line in peeked))
        if delimiter == ";":
            _say(f'{source}: read with ";" as the delimiter (its first rows split evenly on ";", not on ","); '
                 'set delimiter = "," in [task], where the task has that option, to read commas')
    if quoting not in ("auto", "csv", "none"):
        raise ValueError(f"quoting must be auto, csv or none, not {quoting!r}")
    if quoting == "auto" and delimiter != "\t":
        quoting = "csv"  # the CSV standard
    elif quoting == "auto":
        more = list(itertools.islice(lines, _SNIFF_LINES))
        complete = len(more) < _SNIFF_LINES
        peeked += more
        quoting, why = sniff_quoting(peeked, delimiter, complete=complete)
        _announce(source, quoting, why)

    parsed: list[tuple[int, list[str]]] = []
    wanted = None if max_rows is None else max_rows + 1  # + a possible header
    if quoting == "none":
        for number, line in itertools.chain(peeked, lines):
            if line.strip():
                parsed.append((number, line.rstrip("\r\n").split(delimiter)))
                if wanted is not None and len(parsed) >= wanted:
                    break
    else:
        numbers: list[int] = []  # line number of every line the csv reader has taken

        def feed():
            for number, line in itertools.chain(peeked, lines):
                numbers.append(number)
                yield line

        reader = csv.reader(feed(), delimiter=delimiter, strict=True)
        consumed = 0  # lines read before this row: a quoted field may span lines
        try:
            for fields in reader:
                start = numbers[consumed]
                consumed = reader.line_num
                if fields and any(f.strip() for f in fields):
                    parsed.append((start, fields))
                    if wanted is not None and len(parsed) >= wanted:
                        break
        except csv.Error as exc:
            raise _quote_error(source, numbers[min(consumed, len(numbers) - 1)], exc) from None

    if header == "auto":
        header = looks_like_header(parsed[0][1], [f for _, f in parsed[1:]])
    columns = None
    if header:
        columns = [c.strip() for c in parsed[0][1]]
        parsed = parsed[1:]
        if not parsed:
            raise DataError("the file has a header row but no data rows", where=source)
    width = len(columns) if columns is not None else len(parsed[0][1])
    rows = []
    for start, fields in parsed:
        if len(fields) != width:
            what = f"the header has {width}" if columns is not None else f"the first row has {width}"
            name = "tabs" if delimiter == "\t" else repr(delimiter)
            hint = f"a field that contains {name} must be quoted (\"...\")"
            hint += ' and read with quoting = "csv"' if quoting == "none" else ""
            raise DataError(f"this row has {len(fields)} field(s), {what}", where=where(source, start),
                            hint=f"{hint}; row: {shorten(delimiter.join(fields), 80)!r}")
        rows.append(Row.at(fields, where(source, start)))
        if max_rows is not None and len(rows) >= max_rows:
            break
    return Table(columns, rows, str(source), quoting)


def read_table(path: str | Path, delimiter: str | None = None, header: bool | str = "auto",
               max_rows: int | None = None, quoting: str = "auto") -> Table:
    """Read a CSV/TSV file (plain, .gz or .zst). ``delimiter=None`` picks it from the
    extension; ``header`` is True, False or "auto" (see :func:`looks_like_header`);
    ``quoting`` is "auto", "csv" or "none" (see the module's docstring)."""
    return parse_table(iter_lines(path), str(path), delimiter=delimiter, header=header, max_rows=max_rows,
                       quoting=quoting)


# -- JSON -----------------------------------------------------------------------------------
# The one JSON reader of the tasks: JSON Lines and JSON arrays, a value at a time, each knowing
# the line it starts on. ``objects=True`` (records) refuses any other value; the chat tasks
# read strings and lists too and say themselves what they expected.
class JsonValue(NamedTuple):
    """One value of a JSON Lines text or of a JSON array: where it starts (``file:line``) and,
    for an item of an array, its index (from 0; None for a line of JSON Lines)."""

    value: object
    where: str
    index: int | None = None


def json_type(value) -> str:
    """What a JSON value is, for messages: "an object", "a list", "a string" ..."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            bytes: "binary data"}.get(type(value), f"a {type(value).__name__} value")


def iter_json_lines(lines: Iterable[tuple[int, str]], source: str, *, max_rows: int | None = None,
                    objects: bool = True) -> Iterator[JsonValue]:
    """The value of each non-blank line (``objects``: each must be a JSON object)."""
    count = 0
    seen_any = False
    for number, line in lines:
        text = line.strip()
        if not text:
            continue
        seen_any = True
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = "each line must be one complete JSON object, e.g. {\"text\": \"...\", \"label\": \"...\"}"
            if number == 1 and text in ("[", "{"):
                hint = "this looks like a JSON document spread over lines; name the file .json"
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", where=where(source, number),
                            hint=hint) from None
        if objects and not isinstance(value, dict):
            raise DataError(f"expected a JSON object on each line, found {json_type(value)}",
                            where=where(source, number))
        yield JsonValue(value, where(source, number))
        count += 1
        if max_rows is not None and count >= max_rows:
            break
    if not seen_any:
        raise DataError("the file is empty", where=source)


_SPACE = re.compile(r"\s*")


def iter_json_array(text: str, source: str, *, max_rows: int | None = None,
                    objects: bool = True) -> Iterator[JsonValue]:
    """The items of a JSON array, parsed one at a time (an item is checked when it is reached,
    so ``max_rows`` items are read without parsing the rest), each with the line it starts on."""
    start = _SPACE.match(text, 0).end()
    if start == len(text):
        raise DataError("the file is empty", where=source)
    if text[start] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = None
            if exc.msg == "Extra data" and text[start] == "{":
                hint = "this looks like JSON Lines (one object per line); name the file .jsonl"
            raise DataError(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                            where=where(source, exc.lineno), hint=hint) from None
        raise DataError(f"expected a JSON array of objects at the top level, found {json_type(value)}",
                        where=source, hint="write the records as [{...}, {...}], or one object per line in a .jsonl file")
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _SPACE.match(text, start + 1).end()
    if text.startswith("]", pos):
        raise DataError("the JSON array is empty", where=source)
    index = -1
    while True:
        index, item_line = index + 1, line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON in item {index + 1} of the array: {exc.msg} (line {exc.lineno}, "
                            f"column {exc.colno})", where=where(source, exc.lineno)) from None
        if objects and not isinstance(value, dict):
            raise DataError(f"item {index + 1} of the array is {json_type(value)}, expected an object",
                            where=where(source, item_line))
        yield JsonValue(value, where(source, item_line), index)
        if max_rows is not None and index + 1 >= max_rows:
            return
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            break
        raise DataError(f"invalid JSON after item {index + 1} of the array: expected ',' or ']'",
                        where=where(source, line_at(pos)))
    if text[pos + 1:].strip():
        raise DataError("invalid JSON: extra data after the closing ']'", where=where(source, line_at(pos + 1)))


def iter_json_text(text: str, source: str, *, max_rows: int | None = None, objects: bool = True,
                   jsonl: bool | None = None) -> Iterator[JsonValue]:
    """The values of a JSON array or of JSON Lines text (``jsonl=None``: an array when the text
    starts with ``[``)."""
    if jsonl is None:
        jsonl = not text.lstrip().startswith("[")
    if jsonl:
        return iter_json_lines(text_lines(text), source, max_rows=max_rows, objects=objects)
    return iter_json_array(text, source, max_rows=max_rows, objects=objects)


def parse_jsonl(lines: Iterable[tuple[int, str]], source: str, *, max_rows: int | None = None) -> list[Record]:
    """One JSON object per non-blank line."""
    return list(iter_jsonl(lines, source, max_rows=max_rows))


def iter_jsonl(lines: Iterable[tuple[int, str]], source: str, *, max_rows: int | None = None) -> Iterator[Record]:
    """:func:`parse_jsonl` one record at a time."""
    return (Record.at(v.value, v.where) for v in iter_json_lines(lines, source, max_rows=max_rows))


def read_jsonl(path: str | Path, max_rows: int | None = None) -> list[Record]:
    """Read a JSON Lines file: a list of dicts, each with ``.where`` = ``file:line``."""
    return parse_jsonl(iter_lines(path), str(path), max_rows=max_rows)


def parse_json_records(text: str, source: str, *, max_rows: int | None = None) -> list[Record]:
    """A JSON array of objects; each record's ``.where`` is the line where it starts."""
    return [Record.at(v.value, v.where) for v in iter_json_array(text, source, max_rows=max_rows)]


def read_json_records(path: str | Path, max_rows: int | None = None) -> list[Record]:
    """Read a .json file holding an array of objects (e.g. Alpaca data)."""
    return parse_json_records(read_text(path), str(path), max_rows=max_rows)


def read_records(path: str | Path, max_rows: int | None = None, quoting: str = "auto") -> list[Record]:
    """Read records from any supported file, by its name (see :func:`data_format`):
    .jsonl/.ndjson (JSON Lines), .json (an array of objects; JSON Lines content is accepted
    too), .csv/.tsv (header row required; values are strings), each of these also gzip
    (.gz) or zstd (.zst) compressed and read as a stream; .parquet and .arrow/.feather
    files, a folder written by ``datasets``' ``save_to_disk`` or a folder of .parquet
    shards (values keep their types; ``where`` is ``file:row``, rows counted from 1)."""
    return list(iter_records(path, max_rows, quoting))


def iter_records(path: str | Path, max_rows: int | None = None, quoting: str = "auto") -> Iterator[Record]:
    """:func:`read_records` one record at a time. JSON Lines and columnar files are read as
    streams (a line, or a batch of rows, in memory at a time); a .json array is read whole and
    parsed an item at a time; a table is parsed whole first."""
    path = Path(path)
    kind = data_format(path)
    if kind in ("parquet", "arrow"):
        return iter_columnar(path, max_rows)
    if kind == "jsonl":
        return iter_jsonl(iter_lines(path), str(path), max_rows=max_rows)
    if kind == "json":
        text = read_text(path)
        stripped = text.lstrip()
        if stripped.startswith("{"):  # JSON Lines saved as .json: common, and unambiguous
            return iter_jsonl(text_lines(text), str(path), max_rows=max_rows)
        return (Record.at(v.value, v.where) for v in iter_json_array(text, str(path), max_rows=max_rows))
    if kind == "table":
        table = read_table(path, header=True, max_rows=max_rows, quoting=quoting)
        return (Record.at(dict(zip(table.columns, row)), row.where) for row in table.rows)
    suffix = "".join(Path(path).suffixes[-2:]) if compression_of(path) else path.suffix
    raise DataError(f"unsupported file type {suffix or '(no extension)'!r}", where=str(path), hint=f"use {FORMATS_HINT}")


# -- columnar: Parquet, Arrow ----------------------------------------------------------------
def row_where(source: str | Path, index: int) -> str:
    """``file:N`` for the row ``dataset[index]`` of a columnar file: rows count from 1, as
    the lines of the same records in a JSON Lines file would."""
    return f"{source}:{index + 1}"


def check_folder(folder: Path) -> None:
    """A DataError saying why a folder cannot be read as one split (nothing when it can)."""
    if not any(folder.glob("*.parquet")):
        _arrow_files(folder)


def _arrow_files(folder: Path) -> list[Path]:
    """The .arrow files of a ``save_to_disk`` folder, in the order of its rows."""
    if (folder / "dataset_dict.json").exists():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").exists())
        raise DataError(f"this folder holds a DatasetDict with the splits {', '.join(splits) or '(none readable)'}, "
                        "expected one split", where=str(folder), hint="point at one split's folder: "
                        + ", ".join(str(folder / name) for name in splits))
    state_file = folder / "state.json"
    if not state_file.exists():
        if any(folder.glob("*.arrow")):  # what save_to_disk writes, with its list of files missing
            raise DataError("this folder holds .arrow files but no state.json, which datasets' save_to_disk "
                            "writes beside them (it lists the files in order): it is incomplete or was copied "
                            "in part", where=str(folder), hint="save the dataset again with save_to_disk, or "
                                                               "give one .arrow file as the data file")
        raise DataError("is a folder, expected a data file", where=str(folder),
                        hint=f"a folder is read when datasets' save_to_disk wrote it (state.json) or it holds "
                             f".parquet files; else use {FORMATS_HINT}")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = [folder / item["filename"] for item in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"state.json is not one datasets' save_to_disk writes ({exc})", where=str(state_file),
                        hint="save the dataset again with dataset.save_to_disk(folder)") from None
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise DataError(f"state.json lists {', '.join(missing)}, which the folder lacks", where=str(folder),
                        hint="copy the whole folder that save_to_disk wrote")
    return files


def _batches(path: Path, kind: str) -> Iterator:
    """The record batches of one Parquet or Arrow (IPC file or stream) file."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
        return
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    except pa.ArrowInvalid:  # datasets writes the stream format
        yield from pa.ipc.open_stream(pa.memory_map(str(path)))


def iter_columnar(path: str | Path, max_rows: int | None = None) -> Iterator[Record]:
    """Records of a .parquet or .arrow/.feather file, a ``save_to_disk`` folder or a folder
    of .parquet shards, read a batch at a time (one batch of rows in memory, never more than
    ``max_rows``). Rows count through all of a save_to_disk folder's files, and per file for
    parquet shards."""
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", where=str(path),
                        hint="relative paths in a recipe are relative to the recipe's folder")
    kind = data_format(path)
    if compression_of(path):
        raise DataError(f"{kind} files are compressed inside; a {path.suffix} around them is not read",
                        where=str(path), hint=f"decompress it (the {data_suffix(path)} file itself is read)")
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) if kind == "parquet" else _arrow_files(path)
        sources = [p if kind == "parquet" else path for p in files]
    else:
        files, sources = [path], [path]
    count = 0
    index, source = 0, None
    for file, shown in zip(files, sources):
        if shown != source:
            index, source = 0, shown
        try:
            for batch in _batches(file, kind):
                for row in batch.to_pylist():
                    yield Record.at(row, row_where(source, index))
                    index += 1
                    count += 1
                    if max_rows is not None and count >= max_rows:
                        return
        except (pa.ArrowException, OSError) as exc:
            what = "Parquet" if kind == "parquet" else "Arrow"
            after = f" after row {index}" if index else ""
            raise DataError(f"cannot read this {what} file{after}: {exc}", where=str(file),
                            hint=f"check that it is a complete {what} file (copy or download it again)") from None
    if not count:
        raise DataError("the file has no rows" if not path.is_dir() else "the folder has no rows", where=str(path))
