"""``petune estimate``: a recipe's predicted peak training memory (:mod:`petune.memory`),
from the model's config alone — no weights load."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from petune import hookimpl
from petune.console import err, out


def cmd_estimate(args) -> int:
    from petune import memory
    from petune.plugins import get_host
    from petune.recipe import load_recipe

    host = get_host()
    recipe = load_recipe(args.recipe, host, args.set or [])
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, None, recipe.strategy)
    device = None if args.device == "auto" else args.device
    with err.status("estimating (no weights load) ..."):
        est = memory.estimate_recipe(recipe, host, device=device)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        out.print(memory.estimate_table(est, f"Peak training memory — {args.recipe} "
                                             f"({recipe.strategy_name}, batch {est.batch} × {est.seq})"))
    if est.warning:
        err.print(f"[yellow]warning[/]: {escape(est.warning)}")
    return 0


@hookimpl
def register_commands(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="predict a recipe's peak training memory (nothing loads)")
    p.add_argument("recipe", type=Path, help="recipe .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to predict for (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_estimate)
