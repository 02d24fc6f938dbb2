"""The HTTP API: OpenAI-compatible chat and text completions for generating runs,
``/v1/predict`` for the others, health, metrics, run details and the playground page.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
``param`` naming the request field at fault. Model work runs on worker threads; the registry
serialises it per base model.
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
from petune.serve.schemas import ChatCompletionRequest, CompletionRequest, PredictRequest

STATIC = Path(__file__).with_name("static")
#: paths anyone may fetch when an API key is set: the playground's code and the API description, no data
PUBLIC_PATHS = ("/", "/favicon.ico", "/docs", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)


class Limits:
    def __init__(self, *, max_tokens: int = 2048, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
                 max_inputs: int = 256):
        self.max_tokens, self.default_max_tokens = max_tokens, min(default_max_tokens, max_tokens)
        self.max_body_bytes, self.max_inputs = max_body_bytes, max_inputs


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
    error = errors[0]
    path = _field_path(error.get("loc", ()))
    if error.get("type") in ("json_invalid", "json_type"):
        return ApiError(400, f"the request body is not valid JSON: {error.get('msg')}", None, code="invalid_json")
    if not path and error.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object", None, code="invalid_body")
    message = error.get("msg", "invalid value")
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
    return ApiError(400, f"{param}: {text}" if param else text, param)


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
    """API key (when set) and request body size, before anything is parsed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
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
                        top_p=body.top_p, stop=stop, seed=body.seed)

    async def work(request: Request, fn, default_param: str | None):
        """Run ``fn`` on a worker thread; user errors → 400, anything else → 500."""
        try:
            return await run_in_threadpool(fn)
        except Exception as exc:  # noqa: BLE001 — the server keeps serving whatever one request did
            raise _as_api_error(exc, default_param, log) from None

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
        if registry.error is not None:
            return JSONResponse({"status": "failed", "error": registry.error}, status_code=503)
        if not registry.ready:
            return JSONResponse({"status": "loading", "runs": list(registry.runs)}, status_code=503)
        return {"status": "ok", "runs": list(registry.runs), "bases": len(registry.bases),
                "uptime_seconds": round(time.time() - metrics.started, 3)}

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
                                first=chunk({"role": "assistant", "content": ""}),
                                piece=lambda text: chunk({"content": text}),
                                last=lambda g: chunk({}, g.finish_reason), include_usage=include_usage,
                                usage_chunk=lambda g: {"id": ident, "object": "chat.completion.chunk",
                                                       "created": created, "model": run.name, "choices": [],
                                                       "usage": _usage(g)})
        result: Generated = await work(request, lambda: registry.chat(run, messages, params), "messages")
        _count(request, result)
        return {"id": ident, "object": "chat.completion", "created": created, "model": run.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = sampling(body, request)
        run = find(body.model, "chat", completions=True)
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str, finish: str | None = None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": run.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, lambda send, cancel: registry.complete(run, body.prompt, params, send, cancel),
                                first=None, piece=chunk, last=lambda g: chunk("", g.finish_reason),
                                include_usage=include_usage,
                                usage_chunk=lambda g: {"id": ident, "object": "text_completion", "created": created,
                                                       "model": run.name, "choices": [], "usage": _usage(g)},
                                default_param="prompt")
        result: Generated = await work(request, lambda: registry.complete(run, body.prompt, params), "prompt")
        _count(request, result)
        return {"id": ident, "object": "text_completion", "created": created, "model": run.name,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    async def stream(request: Request, job, *, first, piece, last, include_usage: bool, usage_chunk,
                     default_param: str = "messages"):
        """Server-sent events. Generation runs on its own thread and hands text over as it
        comes; the response starts only with the first piece, so an error before any text
        still gets its proper status. A client that goes away stops the generation."""
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
        try:
            kind, value = await queue.get()
        except BaseException:
            cancel.set()
            raise
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
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- encoders ---------------------------------------------------------------------------
    @app.post("/v1/predict")
    async def predict(body: PredictRequest, request: Request):
        request.state.model = body.model
        if len(body.inputs) > limits.max_inputs:
            raise ApiError(400, f"inputs: {len(body.inputs)} inputs is above this server's limit of "
                                f"{limits.max_inputs} per request", "inputs", code="too_many_inputs")
        run = find(body.model, "predict")
        predictions = await work(request, lambda: registry.predict(run, body.inputs), "inputs")
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


def with_middleware(app: FastAPI, *, api_key: str | None) -> Any:
    """The ASGI app to serve: metrics outermost, then the key and size guard, then the API."""
    limits: Limits = app.state.limits
    return _Observe(_Guard(app, api_key, limits.max_body_bytes), app.state.metrics)
