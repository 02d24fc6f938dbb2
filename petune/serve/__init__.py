"""``petune serve``: finished runs as an HTTP service.

OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions`` for generating runs,
``/v1/predict`` for classification / NER runs, ``/health``, ``/metrics`` and a playground
page at ``/``. Runs that share a base model load it once, each adding its peft adapter
(see :mod:`petune.serve.registry`). FastAPI + uvicorn; imported only by this command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import threading

from rich.markup import escape

from petune import hookimpl
from petune.console import err
from petune.errors import UserError

DEFAULT_PORT = 8000
#: default --max-prompt-tokens: a long prompt's first forward pass cannot be interrupted, and on
#: a CPU 30,000 tokens held a small model for minutes
DEFAULT_MAX_PROMPT_TOKENS = {"cpu": 2048, "gpu": 8192}
DEFAULT_REQUEST_TIMEOUT = 300.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(args) -> str | None:
    """The key from --api-key or PETUNE_API_KEY; refused unless an HTTP header can carry it."""
    given, where = (args.api_key, "--api-key") if args.api_key is not None else (
        os.environ.get("PETUNE_API_KEY") or None, "PETUNE_API_KEY")
    if given is None:
        return None
    hint = "use letters, digits and punctuation, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not given:
        raise UserError("the API key is empty", where=where, hint="give a key, or leave --api-key out to serve "
                                                                  "without one")
    bad = next((i for i, c in enumerate(given) if not "!" <= c <= "~"), None)
    if bad is not None:  # clients send headers as ASCII: such a key could never match
        raise UserError(f"the API key may hold only printable ASCII characters without spaces; character "
                        f"{bad + 1} of {len(given)} is not one", where=where, hint=hint)
    return given


def _default_max_prompt_tokens() -> int:
    import torch

    return DEFAULT_MAX_PROMPT_TOKENS["gpu" if torch.cuda.is_available() else "cpu"]


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"petune serve needs fastapi and uvicorn ({exc})",
                        hint="pip install fastapi uvicorn (petune depends on them: reinstall petune)") from None
    from petune.serve.app import Limits, create_app, with_middleware
    from petune.serve.registry import Registry, parse_run_args

    if args.max_tokens < 1 or args.default_max_tokens < 1 or args.max_body_bytes < 1 or args.max_inputs < 1:
        raise UserError("the limits must be positive numbers", where="--max-tokens/--max-body-bytes/--max-inputs")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UserError(f"must be a positive number of tokens, not {args.max_prompt_tokens}",
                        where="--max-prompt-tokens")
    if not args.request_timeout > 0:  # also refuses nan
        raise UserError(f"must be a positive number of seconds, not {args.request_timeout}", where="--request-timeout")
    api_key = _api_key(args)
    host = _plugin_host()
    # every folder is checked before anything binds
    registry = Registry(parse_run_args(args.runs), host, quantized=not args.unquantized)
    if not _is_loopback(args.host) and not api_key:
        err.print(f"[yellow]warning[/]: serving on {escape(args.host)} without an API key: anyone who can reach "
                  "this address can use the models (set --api-key or PETUNE_API_KEY)")

    def log(message: str) -> None:
        err.print(escape(message), soft_wrap=True)

    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                    max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                    max_prompt_tokens=args.max_prompt_tokens or _default_max_prompt_tokens(),
                    request_timeout=args.request_timeout)
    app = create_app(registry, api_key=api_key, limits=limits, log=log)
    # keyless on loopback: answer only requests addressed to a loopback name (DNS rebinding)
    check_host = _is_loopback(args.host) and not api_key
    config = uvicorn.Config(with_middleware(app, api_key=api_key, check_host=check_host), host=args.host,
                            port=args.port, log_level=args.log_level, access_log=args.access_log, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def load():
        try:
            registry.load(log)
        except BaseException as exc:  # noqa: BLE001 — reported, and the server stops
            registry.error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            failure.append(exc)
            server.should_exit = True
            return
        url = _wait_for_url(server, args.host)
        err.print(f"[green]ready[/]: {len(registry.runs)} run(s) on {len(registry.bases)} base model(s) at "
                  f"[bold]{url}[/] (OpenAI base_url {url}/v1; playground {url}/); limits per request: "
                  f"{limits.max_prompt_tokens} prompt tokens, {limits.max_tokens} new tokens, "
                  f"{limits.request_timeout:g} s", soft_wrap=True)

    def announce():
        url = _wait_for_url(server, args.host)
        if url:
            err.print(f"listening on {url} — loading {len(registry.runs)} run(s) ...", soft_wrap=True)

    threading.Thread(target=announce, name="petune-announce", daemon=True).start()
    threading.Thread(target=load, name="petune-load", daemon=True).start()
    server.run()
    if failure:
        exc = failure[0]
        if isinstance(exc, UserError):
            raise exc
        raise RuntimeError(f"loading the runs failed: {registry.error}") from exc
    if not server.started:  # e.g. the port is taken (uvicorn has said why)
        raise UserError(f"could not listen on {args.host}:{args.port}", where="--port",
                        hint="pick another port (--port 0 takes any free one)")
    return 0


def _wait_for_url(server, host: str, timeout: float = 120.0) -> str | None:
    import time

    deadline = time.monotonic() + timeout
    while not server.started:
        if server.should_exit or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    for s in getattr(server, "servers", []):
        for sock in s.sockets:
            address = sock.getsockname()
            shown = f"[{address[0]}]" if ":" in address[0] else address[0]
            return f"http://{shown}:{address[1]}"
    return f"http://{host}:?"


def _plugin_host():
    from petune.plugins import get_host

    return get_host()


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="finished run folders (NAME=RUN_DIR names a run; default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but the playground page "
                                     "and /health; printable ASCII (default: $PETUNE_API_KEY, else no key)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                   help="largest max_tokens a request may ask for (default 2048)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens when a request gives none (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body (default 1 MiB)")
    p.add_argument("--max-inputs", type=int, default=256, metavar="N", help="most inputs per /v1/predict request")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longest prompt a generation request may have, in tokens (default "
                        f"{DEFAULT_MAX_PROMPT_TOKENS['cpu']} on a CPU, {DEFAULT_MAX_PROMPT_TOKENS['gpu']} with a GPU; "
                        "the model's context bounds it too)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="stop a request that has not finished after this long, waiting for its turn included, "
                        f"and answer 503 (default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--unquantized", action="store_true",
                   help="load the base of 4-bit (QLoRA) runs in 16/32-bit: much faster on CPUs, more memory, "
                        "answers differ slightly from the 4-bit model")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.set_defaults(func=cmd_serve)
    return p


@hookimpl
def register_commands(subparsers) -> None:
    add_to(subparsers)


def add_to(sub) -> None:
    """Add the ``serve`` subcommand to petune's argument parser."""
    add_arguments(sub.add_parser("serve", help="serve finished runs over HTTP: an OpenAI-compatible API, "
                                               "many adapters on one base, and a playground page"))
