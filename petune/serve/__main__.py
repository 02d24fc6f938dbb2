"""``python -m petune.serve ...``: the same as ``petune serve ...``."""

import sys

from petune.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
