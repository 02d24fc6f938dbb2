"""``petune studio``: a web page that composes recipes, launches and watches runs, and
compares them.

One FastAPI app on uvicorn (:mod:`petune.studio.app`), like ``petune serve``. Runs start as
separate ``petune run`` processes from a queue (:mod:`petune.studio.jobs`), never inside the
server; their progress reaches the page through this plugin's ``trainer_callbacks`` hook
(:mod:`petune.studio.progress`), active only in processes the studio starts. Forms come from
the installed plugins' option schemas, so a third-party plugin appears with its options.
Imported at every CLI start (it is a plugin): web libraries load only when the command runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.markup import escape

from petune import hookimpl
from petune.console import err
from petune.errors import UserError

DEFAULT_PORT = 7860
#: set by the studio on the runs it starts: the file their progress events go to
EVENTS_ENV = "PETUNE_STUDIO_EVENTS"


def cmd_studio(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"petune studio needs fastapi and uvicorn ({exc})",
                        hint="pip install fastapi uvicorn (petune depends on them: reinstall petune)") from None
    from petune.serve import _api_key, _is_loopback, _wait_for_url
    from petune.studio.app import create_app, with_guard
    from petune.studio.jobs import JobQueue

    workspace = Path(args.workspace).expanduser()
    if not workspace.is_dir():
        raise UserError("not a folder", where=str(args.workspace),
                        hint="give the folder that holds (or will hold) your recipes, data and runs")
    workspace = workspace.resolve()
    api_key = _api_key(args)
    if not _is_loopback(args.host) and not api_key:
        raise UserError(f"the studio starts runs and writes files: on {args.host} anyone who can reach it could, "
                        "so it needs an API key off this machine", where="--host",
                        hint="add --api-key KEY (or set PETUNE_API_KEY), or leave --host at 127.0.0.1")
    jobs = JobQueue(workspace)
    app = create_app(workspace, jobs=jobs, api_key=api_key)
    config = uvicorn.Config(with_guard(app, api_key=api_key, check_host=_is_loopback(args.host) and not api_key),
                            host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    def announce():
        url = _wait_for_url(server, args.host)
        if url:
            err.print(f"[green]petune studio[/] on [bold]{url}/[/] — workspace {escape(str(workspace))}"
                      + (" (API key required)" if api_key else ""), soft_wrap=True)

    import threading

    threading.Thread(target=announce, name="petune-announce", daemon=True).start()
    jobs.start()
    try:
        server.run()
    finally:
        jobs.close()
        for proc, _ in app.state.servers.values():  # the chat servers it started end with it
            proc.terminate()
    if not server.started:
        raise UserError(f"could not listen on {args.host}:{args.port}", where="--port",
                        hint="pick another port (--port 0 takes any free one)")
    running = [j for j in jobs.list() if j.active]
    if running:
        err.print(f"{len(running)} run(s) keep going; `petune studio` again shows them, `petune runs` lists them")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other needs --api-key)")
    p.add_argument("--workspace", default=".", metavar="DIR",
                   help="the folder the studio may read and write: recipes, data and runs (default: here)")
    p.add_argument("--api-key", help="require this key from the page and every API request (default: "
                                     "$PETUNE_API_KEY, else none); needed with a --host other than 127.0.0.1")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=cmd_studio)
    return p


@hookimpl
def register_commands(subparsers) -> None:
    add_arguments(subparsers.add_parser("studio", help="a web page to compose recipes, launch, watch and compare "
                                                       "runs"))


@hookimpl
def trainer_callbacks(run):
    """Progress events for the studio page, in runs the studio started (None otherwise: pluggy
    leaves a None out of the hook's results, as the other first-party hooks do)."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return None
    from petune.console import is_main_process

    if not is_main_process():
        return None
    from petune.studio.progress import progress_events

    return [progress_events(Path(path))]
