"""One marked section of a Markdown file, rewritten in place: how the quality scripts publish their
tables into benchmarks/QUALITY.md without touching the other scripts' sections."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, begin: str, end: str, block: str, *, title: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the text between
    those markers in ``path``, or at its end when the markers are not there yet."""
    text = path.read_text() if path.exists() else title
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
