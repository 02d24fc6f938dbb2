"""Commands that look inside runs: explain (attention and attributions), runs (listing) and
compare (metrics and curves side by side). ``add_to(sub)`` adds them to the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from rich.markup import escape

from petune import hookimpl
from petune.console import err, out
from petune.errors import UserError


def _host():
    from petune.plugins import get_host

    return get_host()


def _primary_metric(host):
    def lookup(task_name: str) -> str | None:
        try:
            return host.task(task_name).primary_metric
        except UserError:  # a task whose plugin is not installed here: fall back to what the run logged
            return None

    return lookup


# -- explain ----------------------------------------------------------------------------------
def _task_name(run_dir: Path) -> str | None:
    import tomllib

    try:
        name = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))["task"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_run says what is wrong with the folder
    return name if isinstance(name, str) else None


def cmd_explain(args) -> int:
    from transformers.utils import logging as hf_logging

    from petune import explain
    from petune.run_folders import load_run

    if not args.text.strip():
        raise UserError("give a non-empty text to explain", where="--text")
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise UserError("the output must be a .png file", where=str(args.out))
    hf_logging.set_verbosity_error()  # load reports and "inputs_embeds" notes are noise here
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)  # peft, on load
    host = _host()
    task_name = _task_name(Path(args.run_dir))
    if task_name is not None:  # refuse before loading a model that cannot be explained
        explain.check_explainable(host.task(task_name), str(args.run_dir))
    with err.status(f"loading {args.run_dir} ..."):
        run = load_run(args.run_dir, host)
    with err.status("explaining ..."):
        explanation = explain.explain_run(run, args.text, pair=args.pair, chat=args.chat, method=args.method,
                                          steps=args.steps)
    layer, head = explain.check_layer_head(explanation, args.layer, args.head)
    attention_png = args.out or Path(args.run_dir) / "explain" / "attention.png"
    attribution_png = attention_png.with_name(f"{attention_png.stem}-attributions.png") if args.out else \
        attention_png.with_name("attributions.png")
    explain.plot_attention(explanation, attention_png, layer, head)
    explain.plot_attributions(explanation, attribution_png)
    explain.write_json(explanation, attention_png.with_suffix(".json"), layer, head)

    if args.json:
        print(json.dumps(explanation.to_json(layer, head), ensure_ascii=False, indent=2))
    else:
        method = "integrated gradients" if explanation.method == "ig" else "gradient × input"
        out.print(f"[bold]prediction[/]: {escape(explanation.prediction)}")
        if not explanation.targets:
            out.print("[dim]nothing to attribute[/]")
        for target in explanation.targets:
            out.print(f"\n[bold]{escape(target.title)}[/]  [dim]({method}; green supports, red opposes)[/]")
            out.print(explain.render_attributions(explanation.encoded, target.scores), soft_wrap=True)
            top = explain.top_tokens(explanation.encoded, target.scores)
            out.print("[dim]top:[/] " + ",  ".join(f"{escape(t)} {s:+.3f}" for t, s in top))
        notes = []
        if explanation.virtual:
            notes.append(f"{explanation.virtual} virtual prompt tokens (⟨v…⟩) shown in the attention maps, "
                         "not attributed")
        if explanation.prefix:
            notes.append(f"{explanation.prefix} prefix key/values (⟨p…⟩) shown as key columns, "
                         "left out of rollout")
        for note in notes:
            err.print(f"[dim]note: {note}[/]")
    err.print(f"wrote [bold]{escape(str(attention_png))}[/] (layer {layer}, head {head}) and "
              f"[bold]{escape(str(attribution_png))}[/]")
    return 0


# -- runs / compare -----------------------------------------------------------------------------
def cmd_runs(args) -> int:
    from petune import runs

    root = Path(args.dir)
    listed = runs.list_runs(root, _primary_metric(_host()))
    if args.json:
        print(json.dumps([r.to_json() for r in listed], indent=2))
        return 0
    if not listed:
        err.print(f"no runs under {escape(str(root))} (a run folder holds manifest.json)")
        return 0
    out.print(runs.runs_table(listed, f"Runs in {root}"))
    return 0


def cmd_compare(args) -> int:
    import os

    from petune import runs

    lookup = _primary_metric(_host())
    loaded = []
    for path in args.runs:
        if not (Path(path) / "manifest.json").exists():
            raise UserError("not a run folder (no manifest.json)", where=str(path),
                            hint="give folders written by `petune run` (see `petune runs`)")
        loaded.append(runs.read_run(path, primary_metric=lookup))
    if args.out is not None:
        png = Path(args.out)
    else:
        folders = [Path(os.path.abspath(p)) for p in args.runs]
        common = Path(os.path.commonpath(folders))
        if common in folders:  # one run, or runs nested in another: beside it, not inside
            common = common.parent
        png = common / "compare.png"
        try:
            png = png.relative_to(Path.cwd())
        except ValueError:
            pass
    if png.suffix.lower() != ".png":
        raise UserError("the output must be a .png file", where=str(png))
    runs.plot_comparison(loaded, png)
    if args.json:
        print(json.dumps([r.to_json() for r in loaded], indent=2))
    else:
        out.print(runs.compare_table(loaded))
    err.print(f"wrote [bold]{escape(str(png))}[/]")
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    add_to(subparsers)


def add_to(sub) -> None:
    from petune.explain import METHODS

    p = sub.add_parser("explain", help="attention maps and token attributions for one input to a finished run")
    p.add_argument("run_dir", type=Path, help="a finished run folder")
    p.add_argument("--text", required=True, help="the input to explain")
    p.add_argument("--pair", help="second text, for classifiers trained on text pairs")
    p.add_argument("--chat", action="store_true",
                   help="causal LMs: wrap the text as a user turn in the run's chat template")
    p.add_argument("--layer", type=int, default=-1, help="layer of the single-head and head-average maps (0-based; "
                                                         "default -1, the last)")
    p.add_argument("--head", type=int, default=0, help="head of the single-head map (0-based, default 0)")
    p.add_argument("--method", choices=METHODS, default="ig",
                   help="ig: integrated gradients (Captum; default); gradxinput: gradient × input")
    p.add_argument("--steps", type=int, default=32, help="integration steps for ig (default 32)")
    p.add_argument("--out", type=Path, help="attention PNG (default RUN_DIR/explain/attention.png); the attribution "
                                            "PNG and a JSON of the numbers go beside it")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of coloured text")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("runs", help="list the runs under a folder: status, metric, time, parameters")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="folder to search (default runs/)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("compare", help="metrics of runs side by side, and one PNG of their curves")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders")
    p.add_argument("--out", type=Path, help="PNG of the overlaid curves (default: compare.png in the runs' common "
                                            "parent folder, e.g. runs/compare.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)
