"""The ``petune`` command. Exit codes: 0 ok, 2 user error (recipe, data, arguments), 1 internal failure."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from petune import __version__, quiet
from petune.console import err, out
from petune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _host():
    from petune.plugins import get_host

    return get_host()  # its load failures were reported once, when the CLI started


def _recipe(args):
    from petune.recipe import load_recipe

    return load_recipe(args.recipe, _host(), args.set or [])


# -- commands -------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from petune import launch, runner

    recipe = _recipe(args)
    processes = args.num_processes or recipe.distributed.num_processes or 1
    if processes > 1 and not launch.inside_launcher():
        return launch.relaunch(processes, args.argv)
    if args.accept_changed_data and not args.resume:
        raise UserError("--accept-changed-data goes with --resume", where="--accept-changed-data")
    result = runner.run(recipe, _host(), dry_run=args.dry_run, resume=args.resume, overwrite=args.overwrite,
                        accept_changed_data=args.accept_changed_data)
    if result.status == "completed":
        err.print(f"[green]done[/]: run saved in [bold]{escape(str(recipe.output_dir))}[/]")
    return 130 if result.status == "interrupted" else 0


def cmd_validate(args) -> int:
    from petune.runner import check_recipe

    host = _host()
    recipe = _recipe(args)
    check_recipe(recipe, host, host.task(recipe.task_name), host.strategy(recipe.strategy_name))
    out.print(f"[green]ok[/]: {escape(str(args.recipe))} — model {escape(recipe.model.name)}, "
              f"task {recipe.task_name}, strategy {recipe.strategy_name}, output {escape(recipe.output.dir)}")
    return 0


def cmd_plugins(args) -> int:
    rows = _host().listing()  # load failures are reported on stderr, one line each
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "kind", "package", "version")} for r in rows], indent=2))
        return 0
    table = Table(title="Installed plugins", title_justify="left")
    for col in ("kind", "name", "package", "version", "description"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"])):
        table.add_row(r["kind"], r["name"], r["package"], r["version"], r["description"])
    out.print(table)
    return 0


def cmd_recipes(args) -> int:
    table = Table(title=f"Bundled recipes ({RECIPES_DIR})", title_justify="left")
    table.add_column("recipe", style="bold")
    table.add_column("what it shows")
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        table.add_row(f"recipes/{path.name}", _recipe_summary(path))
    out.print(table)
    return 0


def _recipe_summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip().lstrip("#").strip()
        if line.startswith("#") and text:
            return text
    return ""


def cmd_env(args) -> int:
    from petune import precision
    from petune.artifacts import device_description, package_versions
    from petune.console import key_value_table

    host = _host()
    rows = list(package_versions().items()) + [("device", device_description()), *precision.describe()]
    rows += [(f"plugin {r['kind']} {r['name']}", f"{r['package']} {r['version']}") for r in host.listing()]
    rows += [("plugin failure", str(f)) for f in host.failures]
    out.print(key_value_table(f"petune {__version__} environment", rows))
    return 0


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petune", description="Parameter-efficient fine-tuning from TOML recipes.")
    parser.add_argument("--version", action="version", version=f"petune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(p):
        p.add_argument("recipe", type=Path, help="recipe .toml file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe value, typed like TOML (repeatable): --set train.learning_rate=1e-4")
        return p

    p = with_recipe(sub.add_parser("run", help="train, save and evaluate a recipe"))
    p.add_argument("--dry-run", action="store_true", help="print the plan (with parameter counts) and exit")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: continue although the data, task options or tokenizer changed since the "
                        "run started (else refused)")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="train with N processes (DDP, or FSDP/DeepSpeed from [distributed]) via accelerate")
    p.set_defaults(func=cmd_run)

    p = with_recipe(sub.add_parser("validate", help="check a recipe without loading anything heavy"))
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list strategies, tasks and model sources, with their packages")
    p.add_argument("--json", action="store_true", help="print JSON: [{name, kind, package, version}]")
    p.set_defaults(func=cmd_plugins)

    sub.add_parser("recipes", help="list the bundled recipes").set_defaults(func=cmd_recipes)
    sub.add_parser("env", help="versions and device, for bug reports").set_defaults(func=cmd_env)

    # every other command (eval, predict, ..., serve, bench, and third-party ones) is a plugin
    _host().call("register_commands", subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    quiet.quiet_libraries()  # LOAD REPORTs, an optional bitsandbytes kernel, tqdm bars
    # Deprecation chatter from the libraries underneath is not for petune's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # the one place where errors become exit codes, for every command, plugins' too
        for failure in _host().failures:  # a broken plugin is one line, and the rest works
            err.print(f"[yellow]warning[/]: {escape(str(failure))}", soft_wrap=True)
        args = build_parser().parse_args(argv)  # argparse exits 2 on bad arguments
        args.argv = argv
        return args.func(args) or 0
    except UserError as exc:
        err.print(f"[bold red]error[/]: {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error()
        err.print(f"[bold red]error[/]: the disk is full ({escape(str(exc.filename or exc))}): free some space "
                  "and run the command again", soft_wrap=True)
        return 2
    except Exception:  # noqa: BLE001 - anything else is a bug: reported as one, exit 1
        return _internal_error()


def _internal_error() -> int:
    err.print_exception(max_frames=20)
    err.print("[bold red]internal error[/]: this is a bug in petune or a plugin; please report it with `petune env`")
    return 1

if __name__ == "__main__":
    sys.exit(main())
