"""The HTTP API: OpenAI-compatible chat and text completions for generating runs,
``/v1/predict`` for the others, health, metrics, run details and the playground page.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
``param`` naming the request field at fault. Model work runs on worker threads; the registry
serialises it per base model. While a request's work runs, the server checks every
``POLL_SECONDS`` whether its client is still there and whether its time limit has passed; either
stops the generation at its next token (and frees the base for the next request).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from petune.errors import UserError
from petune.serve.metrics import Metrics
from petune.serve.registry import Generated, Registry, Sampling, ServedRun
from petune.serve.schemas import ChatCompletionRequest, CompletionRequest, PredictRequest, not_unicode

STATIC = Path(__file__).with_name("static")
#: paths anyone may fetch when an API key is set: the playground's code, the API description and
#: a bare health status (for load balancers), no data
PUBLIC_PATHS = ("/", "/favicon.ico", "/docs", "/openapi.json", "/health")
PUBLIC_PREFIXES = ("/static/",)
#: the host names a keyless server bound to loopback answers to (see _Guard)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: how often a waiting request checks its client and its time limit, seconds
POLL_SECONDS = 0.2


class Limits:
    def __init__(self, *, max_tokens: int = 2048, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
                 max_inputs: int = 256, max_prompt_tokens: int | None = None, request_timeout: float | None = None):
        self.max_tokens, self.default_max_tokens = max_tokens, min(default_max_tokens, max_tokens)
        self.max_body_bytes, self.max_inputs = max_body_bytes, max_inputs
        self.max_prompt_tokens, self.request_timeout = max_prompt_tokens, request_timeout


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _field_path(loc) -> str:
    """pydantic's error location as a field path: ``messages[0].content``. Union member
    names (``str``, ``list[TextPart]``) and ``body`` are left out."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "body" and not parts:
            continue
        elif (isinstance(item, str) and item.isidentifier() and not item[0].isupper()
              and item not in ("str", "int", "float", "bool", "list", "dict", "none")):
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _validation_error(errors: list[dict]) -> ApiError:
    # for a union (``stop``: a string or a list) pydantic reports every member; the member of the
    # right type says what is wrong with the value, the others only that the type differs
    error = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    path = _field_path(error.get("loc", ()))
    if error.get("type") in ("json_invalid", "json_type"):
        return ApiError(400, f"the request body is not valid JSON: {error.get('msg')}", None, code="invalid_json")
    if not path and error.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object", None, code="invalid_body")
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if error.get("type") == "string_unicode" and isinstance(error.get("input"), str):  # pydantic's own check
        message = not_unicode(error["input"]) or message
    if error.get("type") in ("string_too_long", "too_long"):
        message += " (this server's limit)"
    if error.get("type") == "missing":
        message = "is required"
    elif error.get("type") == "too_short" and path == "messages":
        message = "must hold at least one message"
    elif error.get("type") == "too_short" and path == "inputs":
        message = "must hold at least one input"
    return ApiError(400, f"{path or 'body'}: {message}", path or None, code=error.get("type"))


def _user_error(exc: UserError, default_param: str | None) -> ApiError:
    where = exc.where if exc.where and " " not in exc.where and "/" not in exc.where else None
    text = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    param = where or default_param
    return ApiError(400, f"{param}: {text}" if param else text, param, code=getattr(exc, "code", None))


# -- middleware (plain ASGI: it also sees streamed answers to their end) -----------------------
class _Observe:
    """Times each API request (``/v1/...``, and unknown paths) to its last byte and counts it
    (status, model, tokens). The page, ``/health`` and ``/metrics`` are not counted."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        scope.setdefault("state", {})

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        endpoint = _endpoint(scope["path"])
        if not (endpoint.startswith("/v1/") or endpoint == "other"):  # the page, health checks, scrapes
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            state = scope["state"]
            self.metrics.record(endpoint, state.get("model"), state.get("status", status[0]),
                                time.perf_counter() - started, prompt_tokens=state.get("prompt_tokens", 0),
                                completion_tokens=state.get("completion_tokens", 0))


def _endpoint(path: str) -> str:
    for prefix in ("/v1/models/", "/v1/runs/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    if path.startswith("/static/"):
        return "/static"
    known = ("/", "/favicon.ico", "/docs", "/openapi.json", "/health", "/metrics", "/v1/models",
             "/v1/chat/completions", "/v1/completions", "/v1/predict")
    return path if path in known else "other"


class _Guard:
    """The Host header (keyless loopback servers), the API key (when set) and the request body
    size, before anything is parsed.

    A server on 127.0.0.1 without a key trusts whoever can connect to it: this machine. A web
    page can still make a browser connect to it under the page's own host name (DNS rebinding),
    so such a server answers only requests addressed to a loopback name."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, check_host: bool = False):
        self.app, self.api_key, self.max_body_bytes, self.check_host = app, api_key, max_body_bytes, check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        if self.check_host and "host" in headers and not _loopback_host(headers["host"]):
            error = ApiError(421, f"this server answers only requests addressed to {', '.join(LOOPBACK_NAMES)} "
                                  f"(the Host header was {headers['host'][:100]!r}): it is bound to this machine "
                                  "without an API key; to reach it under another name, give it an --api-key",
                             None, code="invalid_host")
            return await error.response()(scope, receive, send)
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 None, "authentication_error", "invalid_api_key")
                return await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                  f"bytes", None, code="body_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here (within the limit), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_large.response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), [False]

        async def replay():
            if not delivered[0]:
                delivered[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _loopback_host(value: str) -> bool:
    """Is a Host header a loopback name, with or without a port?"""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 address
        end = value.find("]") + 1  # 0 when unclosed: no name
    else:
        end = value.find(":") if ":" in value else len(value)
    name, port = value[:end], value[end:]
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return False
    return name in LOOPBACK_NAMES


# -- the app ----------------------------------------------------------------------------------
def create_app(registry: Registry, *, api_key: str | None = None, limits: Limits | None = None,
               log=print) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics()
    app = FastAPI(title="petune serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.registry, app.state.metrics, app.state.limits = registry, metrics, limits

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = (f"no such path: {request.method} {request.url.path}" if exc.status_code == 404 else
                   f"method {request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
                   str(exc.detail))
        return ApiError(exc.status_code, message).response(getattr(exc, "headers", None))

    def find(name: str, kind: str | None = None, *, completions: bool = False) -> ServedRun:
        if not registry.ready:
            raise ApiError(503, "the server is still loading its models; try again shortly"
                           if registry.error is None else f"loading failed: {registry.error}",
                           code="not_ready")
        run = registry.runs.get(name)
        if run is None:
            raise ApiError(404, f"model: unknown model {name!r}; this server has: {', '.join(registry.runs)}",
                           "model", code="model_not_found")
        if kind is not None and run.kind != kind:
            use = "/v1/chat/completions" if run.kind == "chat" else "/v1/predict"
            raise ApiError(400, f"model: {name!r} is a {run.task.name} run, which this endpoint does not serve; "
                                f"use {use}", "model", code="wrong_endpoint")
        if completions and not run.causal:
            raise ApiError(400, f"model: {name!r} is not a causal language model; use /v1/chat/completions",
                           "model", code="wrong_endpoint")
        return run

    def sampling(body, request: Request) -> Sampling:
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        field_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if requested is not None and requested > limits.max_tokens:
            raise ApiError(400, f"{field_name}: {requested} is above this server's limit of {limits.max_tokens}",
                           field_name, code="max_tokens_above_limit")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request.state.model = body.model
        return Sampling(max_tokens=requested or limits.default_max_tokens, temperature=body.temperature,
                        top_p=body.top_p, stop=stop, seed=body.seed, max_prompt_tokens=limits.max_prompt_tokens)

    def deadline() -> float | None:
        return None if limits.request_timeout is None else time.monotonic() + limits.request_timeout

    async def watch(request: Request, waiting: asyncio.Future, cancel: threading.Event, until: float | None):
        """``waiting``'s result, checking meanwhile that the client is still there and the time
        limit has not passed; if either fails, ``cancel`` is set (the work stops at its next
        token, or before it starts) and this raises."""
        try:
            while True:
                timeout = POLL_SECONDS if until is None else max(0.0, min(POLL_SECONDS, until - time.monotonic()))
                done, _ = await asyncio.wait({waiting}, timeout=timeout)
                if done:
                    return waiting.result()
                if until is not None and time.monotonic() >= until:
                    raise timed_out()
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the connection before the answer was ready", None,
                                   code="client_closed_request")
        except BaseException:
            cancel.set()
            waiting.cancel()
            raise

    def timed_out() -> ApiError:
        return ApiError(503, f"the request was stopped at this server's time limit of {limits.request_timeout:g} s "
                             "(--request-timeout), waiting included; ask for fewer max_tokens or a shorter prompt, "
                             "or try again when the server is less busy", None, code="timeout")

    async def work(request: Request, fn, default_param: str | None, until: float | None):
        """``fn(cancel)`` on a thread of its own, watched (see ``watch``); user errors → 400,
        anything else → 500."""
        loop = asyncio.get_running_loop()
        waiting, cancel = loop.create_future(), threading.Event()

        def settle(outcome):
            if not waiting.done():
                waiting.set_result(outcome)

        def target():
            try:
                outcome = (True, fn(cancel))
            except Exception as exc:  # noqa: BLE001 — the server keeps serving whatever one request did
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        threading.Thread(target=target, name="petune-work", daemon=True).start()
        ok, value = await watch(request, waiting, cancel, until)
        if not ok:
            raise _as_api_error(value, default_param, log) from None
        return value

    # -- pages and status -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        # public (load balancers probe it without a key): the status alone; the runs are in /v1/models
        if registry.error is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        if not registry.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics(request: Request, format: str | None = None):
        wants_json = format == "json" or (format is None and "application/json" in request.headers.get("accept", ""))
        memory = await run_in_threadpool(registry.memory) if registry.ready else {"bases": []}
        bases = [{"base": b.index, "model": b.model_name, "runs": [r.name for r in b.runs], "waiting": b.waiting}
                 for b in registry.bases]
        if wants_json:
            return {**metrics.snapshot(), "ready": registry.ready, "memory": memory, "bases": bases}
        gauges = [("petune_ready", "1 once every model is loaded", {}, int(registry.ready))]
        if "rss_bytes" in memory:
            gauges.append(("petune_resident_memory_bytes", "resident memory of the server process", {},
                           memory["rss_bytes"]))
        for b in memory["bases"]:
            gauges.append(("petune_parameter_bytes", "bytes of parameters of a loaded base, adapters included",
                           {"base": str(b["base"]), "model": b["model"]}, b["parameter_bytes"]))
            for run, size in b["adapter_bytes"].items():
                gauges.append(("petune_adapter_bytes", "bytes of one run's adapter parameters", {"model": run}, size))
        for b in bases:
            gauges.append(("petune_requests_waiting", "requests running or queued on a base model",
                           {"base": str(b["base"]), "model": b["model"]}, b["waiting"]))
        return PlainTextResponse(metrics.prometheus(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [r.describe() for r in registry.runs.values()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        run = registry.runs.get(name)
        if run is None:
            raise ApiError(404, f"model: unknown model {name!r}", "model", code="model_not_found")
        return run.describe()

    @app.get("/v1/runs/{name}")
    async def run_details(name: str):
        run = registry.runs.get(name)
        if run is None:
            raise ApiError(404, f"model: unknown model {name!r}", "model", code="model_not_found")
        return await run_in_threadpool(run.details)

    # -- generation -------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        until = deadline()
        params = sampling(body, request)
        run = find(body.model, "chat")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": run.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, lambda send, cancel: registry.chat(run, messages, params, send, cancel),
                                until, first=chunk({"role": "assistant", "content": ""}),
                                piece=lambda text: chunk({"content": text}),
                                last=lambda g: chunk({}, g.finish_reason), include_usage=include_usage,
                                usage_chunk=lambda g: {"id": ident, "object": "chat.completion.chunk",
                                                       "created": created, "model": run.name, "choices": [],
                                                       "usage": _usage(g)})
        result: Generated = await work(request, lambda cancel: registry.chat(run, messages, params, cancel=cancel),
                                       "messages", until)
        _count(request, result)
        return {"id": ident, "object": "chat.completion", "created": created, "model": run.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        until = deadline()
        params = sampling(body, request)
        run = find(body.model, "chat", completions=True)
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str, finish: str | None = None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": run.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, lambda send, cancel: registry.complete(run, body.prompt, params, send, cancel),
                                until, first=None, piece=chunk, last=lambda g: chunk("", g.finish_reason),
                                include_usage=include_usage,
                                usage_chunk=lambda g: {"id": ident, "object": "text_completion", "created": created,
                                                       "model": run.name, "choices": [], "usage": _usage(g)},
                                default_param="prompt")
        result: Generated = await work(
            request, lambda cancel: registry.complete(run, body.prompt, params, cancel=cancel), "prompt", until)
        _count(request, result)
        return {"id": ident, "object": "text_completion", "created": created, "model": run.name,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    async def stream(request: Request, job, until: float | None, *, first, piece, last, include_usage: bool,
                     usage_chunk, default_param: str = "messages"):
        """Server-sent events. Generation runs on its own thread and hands text over as it
        comes; the response starts only with the first piece, so an error before any text
        (the time limit included) still gets its proper status. A client that goes away stops
        the generation; past the time limit, an error event ends the stream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutting down)
                cancel.set()

        def target():
            try:
                put(("done", job(lambda text: put(("text", text)), cancel)))
            except Exception as exc:  # noqa: BLE001 — sent to the client as an error event
                put(("error", exc))

        threading.Thread(target=target, name="petune-generate", daemon=True).start()
        kind, value = await watch(request, asyncio.ensure_future(queue.get()), cancel, until)
        if kind == "error":
            cancel.set()
            raise _as_api_error(value, default_param, log)

        async def events():
            item = (kind, value)
            try:
                if first is not None:
                    yield _sse(first)
                while True:
                    k, v = item
                    if k == "text":
                        yield _sse(piece(v))
                    elif k == "done":
                        _count(request, v)
                        yield _sse(last(v))
                        if include_usage:
                            yield _sse(usage_chunk(v))
                        break
                    else:
                        error = _as_api_error(v, default_param, log)
                        request.state.status = error.status
                        yield _sse(error.body())
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), None if until is None else until - time.monotonic())
                    except TimeoutError:
                        cancel.set()
                        item = ("error", timed_out())
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- encoders ---------------------------------------------------------------------------
    @app.post("/v1/predict")
    async def predict(body: PredictRequest, request: Request):
        until = deadline()
        request.state.model = body.model
        if len(body.inputs) > limits.max_inputs:
            raise ApiError(400, f"inputs: {len(body.inputs)} inputs is above this server's limit of "
                                f"{limits.max_inputs} per request", "inputs", code="too_many_inputs")
        run = find(body.model, "predict")
        predictions = await work(request, lambda cancel: registry.predict(run, body.inputs, cancel), "inputs", until)
        data = []
        for i, (item, prediction) in enumerate(zip(body.inputs, predictions)):
            entry = {"index": i, "input": item if isinstance(item, str) else item.model_dump()}
            entry.update(prediction)
            data.append(entry)
        return {"object": "list", "model": run.name, "task": run.task.name, "data": data}

    return app


def _as_api_error(exc: Exception, default_param: str | None, log) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserError):
        return _user_error(exc, default_param)
    from jinja2 import TemplateError

    if isinstance(exc, TemplateError):  # the run's chat template refused these messages
        return ApiError(400, f"messages: the run's chat template cannot render them: {exc}", "messages",
                        code="template_error")
    log(f"error while answering a request: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return ApiError(500, f"internal error while generating: {type(exc).__name__}: {exc}", None, "server_error",
                    "internal_error")


def _usage(result: Generated) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _count(request: Request, result: Generated) -> None:
    request.state.prompt_tokens = result.prompt_tokens
    request.state.completion_tokens = result.completion_tokens


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def with_middleware(app: FastAPI, *, api_key: str | None, check_host: bool = False) -> Any:
    """The ASGI app to serve: metrics outermost, then the host, key and size guard, then the API.
    ``check_host``: answer only requests addressed to a loopback name (for a keyless server
    bound to loopback)."""
    limits: Limits = app.state.limits
    return _Observe(_Guard(app, api_key, limits.max_body_bytes, check_host), app.state.metrics)
