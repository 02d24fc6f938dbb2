"""``python -m benchmarks [options]`` (from the repository root): the same as ``petune bench [options]``."""

import argparse
import os
import sys

from rich.markup import escape

from petune.console import err
from petune.errors import UserError

from . import suite

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
parser = argparse.ArgumentParser(prog="python -m benchmarks")
suite.add_to(parser.add_subparsers(dest="command"))
args = parser.parse_args(["bench", *sys.argv[1:]])
try:
    sys.exit(args.func(args))
except UserError as exc:
    err.print(f"[bold red]error[/]: {escape(str(exc))}", soft_wrap=True)
    sys.exit(exc.exit_code)
