"""Split the HH-RLHF harmless-base pairs for the preference rows (issue 24).

    .venv/bin/python benchmarks/quality/prep_hh_rlhf.py

Reads ``../shared/data/preference/hh_rlhf_harmless_base_test.jsonl.gz`` (2,312 records, see
shared/data/SOURCES.md) and writes, unchanged and in file order, the first 2,000 records to
``benchmarks/out/hh_rlhf/train.jsonl`` and the other 312 to ``held_out.jsonl`` (benchmarks/out/
is git-ignored: the data are never committed). The preference recipes in this folder read them.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO.parent / "shared" / "data" / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
OUT = REPO / "benchmarks" / "out" / "hh_rlhf"
TRAIN = 2000


def main() -> int:
    if not SOURCE.is_file():
        print(f"error: {SOURCE} is missing; it should hold the 2,312 HH-RLHF harmless-base test pairs "
              f"(see shared/data/SOURCES.md)", file=sys.stderr)
        return 2
    with gzip.open(SOURCE, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train.jsonl").write_text("".join(lines[:TRAIN]), encoding="utf-8")
    (OUT / "held_out.jsonl").write_text("".join(lines[TRAIN:]), encoding="utf-8")
    print(f"{OUT}: train.jsonl {TRAIN} pairs, held_out.jsonl {len(lines) - TRAIN} pairs (of {SOURCE.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
