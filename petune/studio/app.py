"""The studio's HTTP API and page.

``/api/schema`` (forms from the plugins' option schemas), ``/api/recipes`` and ``/api/recipe``
(open, save), ``/api/validate`` (the validator ``petune validate`` uses, errors per field),
``/api/plan`` (``petune run --dry-run`` and ``petune estimate``, as processes), ``/api/jobs``
(launch, stop, resume, stream), ``/api/runs``, ``/api/run``, ``/api/compare``, ``/api/file``.

Every path a request names is confined to the workspace (:func:`inside`); errors are JSON,
``{"error": {"message", "field"}}``, or ``{"errors": [{"field", "message"}]}`` for a recipe.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from petune.errors import RecipeError, UserError
from petune.studio.jobs import STATE_DIR, JobQueue

STATIC = Path(__file__).with_name("static")
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/", "/favicon.ico")
MAX_BODY_BYTES = 2 << 20
#: sections the form shows, in order; the plugin-owned ones come from the registry
FORM_SECTIONS = ("model", "task", "strategy", "train", "eval", "output", "data")
PLAN_TIMEOUT = 900
#: files of a run the run page links to (beside plots/*.png)
RUN_FILES = ("recipe.toml", "metrics.json", "samples.jsonl", "manifest.json", "run.log", "log_history.json")


class StudioError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, errors: list | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.errors = status, message, field, errors

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": {"message": self.message, "field": self.field}}
        if self.errors is not None:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status)


# -- paths ------------------------------------------------------------------------------------
def inside(workspace: Path, value: Any, field: str, *, suffix: str | None = None, must_exist: bool = False) -> Path:
    """``value`` (relative to the workspace, or absolute) as a resolved path inside the workspace;
    links are followed, so a link pointing out is refused like ``..``."""
    if not isinstance(value, str) or not value.strip():
        raise StudioError(400, "give a path inside the workspace", field)
    if "\0" in value:
        raise StudioError(400, "the path holds a NUL character", field)
    path = (workspace / Path(value).expanduser()).resolve()
    if not path.is_relative_to(workspace):
        raise StudioError(403, f"{value!r} is outside the workspace {workspace}: the studio reads and writes only "
                               "there (start it with --workspace to choose another folder)", field)
    if path.is_relative_to(workspace / STATE_DIR):
        raise StudioError(403, f"{value!r} is the studio's own folder", field)
    if suffix is not None and path.suffix != suffix:
        raise StudioError(400, f"{value!r} must be a {suffix} file", field)
    if must_exist and not path.exists():
        raise StudioError(404, f"{value!r} does not exist in the workspace", field)
    return path


def relative(workspace: Path, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(workspace))
    except ValueError:
        return str(path)


# -- schema -----------------------------------------------------------------------------------
def schema(host) -> dict:
    """Every section's JSON schema, with the task and strategy plugins' own (as registered)."""
    from petune.recipe import _CORE

    def plugins(kind: str) -> dict:
        return {name: {"description": reg.cls.description, "package": reg.origin.package,
                       "version": reg.origin.version, "schema": reg.cls.Options.model_json_schema()}
                for name, reg in sorted(host.registry[kind].items())}

    models = []
    for source in host.model_sources().values():
        try:
            models += source.names()
        except Exception:  # noqa: BLE001 — a listing is a convenience: a broken source lists nothing
            continue
    return {"sections": list(FORM_SECTIONS),
            "core": {name: _CORE[name].model_json_schema() for name in FORM_SECTIONS if name in _CORE},
            "tasks": plugins("task"), "strategies": plugins("strategy"), "rewards": plugins("reward"),
            "models": sorted(set(models)),
            "failures": [str(f) for f in host.failures]}


# -- recipes ----------------------------------------------------------------------------------
def bundled_dir() -> Path:
    from petune.cli import RECIPES_DIR

    return RECIPES_DIR


def list_recipes(workspace: Path) -> dict:
    from petune.cli import _recipe_summary

    found = []
    for current, dirs, files in os.walk(workspace):
        here = Path(current)
        depth = len(here.relative_to(workspace).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("node_modules", "site-packages")
                         and not (here / d / "manifest.json").exists()) if depth < 3 else []
        for name in sorted(files):
            path = here / name
            if name.endswith(".toml") and _looks_like_recipe(path):
                found.append({"path": relative(workspace, path), "summary": _recipe_summary(path)})
    bundled = [{"name": p.name, "summary": _recipe_summary(p)} for p in sorted(bundled_dir().glob("*.toml"))]
    return {"workspace": found, "bundled": bundled}


def _looks_like_recipe(path: Path) -> bool:
    try:
        if path.stat().st_size > 256 << 10:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(re.search(r"^\s*\[(task|model)\]", text, re.MULTILINE))


def copy_bundled(workspace: Path, name: str) -> str:
    """A bundled recipe into ``recipes/`` of the workspace, with the bundled data folder beside it
    (files already there are kept)."""
    source = bundled_dir() / name
    if "/" in name or "\\" in name or not name.endswith(".toml") or not source.is_file():
        raise StudioError(404, f"no bundled recipe {name!r} (see the list)", "name")
    target = inside(workspace, f"recipes/{name}", "name")
    if target.resolve() != source.resolve() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        data = bundled_dir() / "data"
        if data.is_dir():
            shutil.copytree(data, target.parent / "data", dirs_exist_ok=True,
                            copy_function=lambda s, d: None if Path(d).exists() else shutil.copy2(s, d))
    return relative(workspace, target)


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def recipe_text(body: dict) -> tuple[str, dict | None, list]:
    """The TOML text and its data from a request holding ``toml`` or ``data``; errors of a
    text that is not TOML."""
    import tomli_w

    if isinstance(body.get("data"), dict):
        data = _drop_none(body["data"])
        try:
            return tomli_w.dumps(data), data, []
        except (TypeError, ValueError) as exc:
            raise StudioError(400, f"the recipe cannot be written as TOML: {exc}", "data") from None
    text = body.get("toml")
    if not isinstance(text, str):
        raise StudioError(400, "send the recipe as 'toml' (text) or 'data' (an object)", "toml")
    try:
        return text, tomllib.loads(text), []
    except tomllib.TOMLDecodeError as exc:
        return text, None, [{"field": None, "message": f"invalid TOML: {exc}"}]


def check(workspace: Path, host, body: dict) -> dict:
    """Validate a recipe as ``petune validate`` does, then confine its paths to the workspace."""
    from petune.api import paths_in
    from petune.recipe import validate
    from petune.runner import check_recipe

    path = inside(workspace, body.get("path"), "path", suffix=".toml")
    text, data, errors = recipe_text(body)
    result = {"ok": False, "path": relative(workspace, path), "toml": text, "data": data, "errors": errors,
              "output": None, "output_exists": False}
    if data is None:
        return result
    try:
        recipe = validate(data, host, path=path, text=text)
    except RecipeError as exc:
        problems = getattr(exc, "problems", None) or [(None, str(exc))]
        result["errors"] = [{"field": f, "message": m} for f, m in problems]
        return result
    except UserError as exc:
        result["errors"] = [{"field": _field(exc.where), "message": exc.message + _hint(exc)}]
        return result
    try:
        check_recipe(recipe, host, host.task(recipe.task_name), host.strategy(recipe.strategy_name))
    except UserError as exc:
        result["errors"].append({"field": _field(exc.where) or "strategy.name", "message": exc.message + _hint(exc)})
    for section, options in (("task", recipe.task), ("strategy", recipe.strategy)):
        for key in type(options).model_fields:
            for p in paths_in(getattr(options, key)):
                if not Path(p).resolve().is_relative_to(workspace):
                    result["errors"].append({"field": f"{section}.{key}",
                                             "message": f"{p} is outside the workspace {workspace}"})
    model = recipe.model.name
    is_path = model.startswith(("/", "~", "./", "../")) or (workspace / model).exists()
    if is_path and not (workspace / Path(model).expanduser()).resolve().is_relative_to(workspace):
        result["errors"].append({"field": "model.name", "message": f"{model} is outside the workspace {workspace}"})
    output = (workspace / recipe.output.dir).resolve()
    if not output.is_relative_to(workspace) or output == workspace:
        result["errors"].append({"field": "output.dir", "message": f"{recipe.output.dir} is not a folder inside the "
                                                                   f"workspace {workspace}"})
    else:
        result["output"] = relative(workspace, output)
        result["output_exists"] = output.exists()
    result["ok"] = not result["errors"]
    result["summary"] = f"model {model}, task {recipe.task_name}, strategy {recipe.strategy_name}"
    return result


def _field(where: str | None) -> str | None:
    return where if where and re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_]+)+", where) else None


def _hint(exc: UserError) -> str:
    return f" — {exc.hint}" if exc.hint else ""


# -- runs -------------------------------------------------------------------------------------
def _primary_metric(host):
    def lookup(task_name: str) -> str | None:
        try:
            return host.task(task_name).primary_metric
        except UserError:
            return None

    return lookup


def run_json(workspace: Path, info, *, history: bool = False) -> dict:
    data = info.to_json() | {"dir": relative(workspace, info.dir)}
    data["steps"] = max((int(h.get("step", 0)) for h in info.log_history), default=None)
    if history:
        data["log_history"] = info.log_history
    return data


def run_details(workspace: Path, host, path: Path, jobs: JobQueue) -> dict:
    from petune import runs

    info = runs.read_run(path, primary_metric=_primary_metric(host))
    data = run_json(workspace, info, history=True)
    data["plots"] = [relative(workspace, p) for p in sorted((path / "plots").glob("*.png"))]
    data["files"] = [relative(workspace, path / f) for f in RUN_FILES if (path / f).is_file()]
    data["files"] += [relative(workspace, p) for p in sorted((path / "reports").glob("*")) if p.is_file()]
    try:
        data["recipe"] = (path / "recipe.toml").read_text(encoding="utf-8")
    except OSError:
        data["recipe"] = None
    samples = path / "samples.jsonl"
    data["samples"] = []
    if samples.is_file():
        for line in samples.read_text(encoding="utf-8", errors="replace").splitlines()[:20]:
            try:
                data["samples"].append(json.loads(line))
            except ValueError:
                pass
    rel = relative(workspace, path)
    mine = [j for j in jobs.list() if j.kind == "run" and j.output == rel]
    data["jobs"] = [j.id for j in mine]
    data["plan"] = _plan_of(jobs.log_path(mine[-1]).read_text(encoding="utf-8", errors="replace")) if mine and \
        jobs.log_path(mine[-1]).is_file() else None
    return data


def _plan_of(log: str) -> str | None:
    """The plan table out of a run's log (from its title to the first blank line after it)."""
    start = log.find("Plan")
    if start < 0:
        return None
    end = log.find("\ntrain ", start)
    return log[start: end if end > 0 else start + 6000].rstrip()


def compare(workspace: Path, host, paths: list[Path]) -> dict:
    from petune import runs

    lookup = _primary_metric(host)
    loaded = [runs.read_run(p, primary_metric=lookup) for p in paths]
    names = runs.short_names(loaded)
    rows: list[tuple[str, str]] = []
    for run in loaded:
        for split, values in run.metrics.items():
            if isinstance(values, dict):
                rows += [(split, k) for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and (split, k) not in rows]
    table = [{"split": s, "metric": m, "lower_is_better": runs.lower_is_better(m),
              "values": [r.metrics[s].get(m) if isinstance(r.metrics.get(s), dict) else None for r in loaded]}
             for s, m in rows]
    best = []
    for run in loaded:
        found = runs.best_in_history(run.log_history, run.metric) if run.metric else None
        best.append({"metric": run.metric, "value": found[0], "step": found[1]} if found else None)
    return {"runs": [run_json(workspace, r, history=True) | {"short_name": n} for r, n in zip(loaded, names)],
            "metrics": table, "best": best}


# -- processes --------------------------------------------------------------------------------
def _petune(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    from petune.studio import EVENTS_ENV

    env = {k: v for k, v in os.environ.items() if k != EVENTS_ENV} | {"COLUMNS": "110", "TERM": "dumb",
                                                                        "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "petune", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return 124, "", f"stopped after {timeout:g} s"
    return done.returncode, done.stdout, done.stderr


def plan(workspace: Path, path: Path, text: str, data: dict) -> dict:
    """``petune run --dry-run`` and ``petune estimate --json`` on the recipe, side by side, from a
    copy written beside it (so its relative paths mean the same); the copy is removed."""
    from concurrent.futures import ThreadPoolExecutor

    import tomli_w

    if "output" not in data:  # as validate defaults it for the real file's name
        data = {**data, "output": {"dir": f"runs/{path.stem}"}}
        text = tomli_w.dumps(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = path.with_name(f".{path.stem}.studio-plan-{uuid.uuid4().hex[:8]}.toml")
    copy.write_text(text, encoding="utf-8")
    try:
        with ThreadPoolExecutor(2) as pool:
            dry = pool.submit(_petune, ["run", str(copy), "--dry-run"], workspace, PLAN_TIMEOUT)
            est = pool.submit(_petune, ["estimate", str(copy), "--json"], workspace, PLAN_TIMEOUT)
            (dry_rc, dry_out, dry_err), (est_rc, est_out, est_err) = dry.result(), est.result()
    finally:
        copy.unlink(missing_ok=True)
    estimate = None
    if est_rc == 0:
        try:
            estimate = json.loads(est_out)
        except ValueError:
            estimate = None
    plan_text = (dry_err + dry_out).replace(str(copy), str(path))
    warning = re.search(r"warning: (.*)", est_err)
    return {"ok": dry_rc == 0, "plan": plan_text.strip(), "estimate": estimate,
            "estimate_error": None if est_rc == 0 else (est_err.strip() or est_out.strip()),
            "warning": warning.group(1).strip() if warning else None}


# -- the app ----------------------------------------------------------------------------------
def create_app(workspace: Path, *, jobs: JobQueue, host=None, api_key: str | None = None) -> FastAPI:
    if host is None:
        from petune.plugins import get_host

        host = get_host()
    workspace = Path(workspace).resolve()
    app = FastAPI(title="petune studio", version="1", docs_url="/docs", redoc_url=None)
    app.state.workspace, app.state.jobs, app.state.host = workspace, jobs, host

    @app.exception_handler(StudioError)
    async def _studio_error(request: Request, exc: StudioError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = (f"no such path: {request.method} {request.url.path}" if exc.status_code == 404 else
                   f"method {request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
                   str(exc.detail))
        return StudioError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # one request's bug never takes the server down
        return StudioError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise StudioError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise StudioError(400, "the request body must be a JSON object")
        return body

    def job_or_404(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise StudioError(404, f"no job {job_id!r}", "job")
        return job

    def run_dir(value, field: str = "path") -> Path:
        path = inside(workspace, value, field, must_exist=True)
        if not (path / "manifest.json").is_file():
            raise StudioError(404, f"{value!r} is not a run folder (no manifest.json)", field)
        return path

    # -- page ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return JSONResponse(None, status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- recipes ------------------------------------------------------------------------------
    @app.get("/api/schema")
    async def get_schema():
        return await run_in_threadpool(schema, host)

    @app.get("/api/info")
    async def info():
        return {"workspace": str(workspace), "api_key": api_key is not None}

    @app.get("/api/recipes")
    async def recipes():
        return await run_in_threadpool(list_recipes, workspace)

    @app.get("/api/recipe")
    async def get_recipe(path: str | None = None):
        file = inside(workspace, path, "path", suffix=".toml", must_exist=True)
        text = file.read_text(encoding="utf-8", errors="replace")
        result = await run_in_threadpool(check, workspace, host, {"path": path, "toml": text})
        return result

    @app.post("/api/recipe")
    async def save_recipe(request: Request):
        body = await body_of(request)
        file = inside(workspace, body.get("path"), "path", suffix=".toml")
        text, _, _ = recipe_text(body)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
        return {"path": relative(workspace, file), "saved": True}

    @app.post("/api/recipes/bundled")
    async def open_bundled(request: Request):
        body = await body_of(request)
        return {"path": await run_in_threadpool(copy_bundled, workspace, str(body.get("name", "")))}

    @app.post("/api/validate")
    async def validate_recipe(request: Request):
        body = await body_of(request)
        return await run_in_threadpool(check, workspace, host, body)

    @app.post("/api/plan")
    async def plan_recipe(request: Request):
        body = await body_of(request)
        checked = await run_in_threadpool(check, workspace, host, body)
        if not checked["ok"]:
            raise StudioError(400, "the recipe is not valid", None, checked["errors"])
        path = inside(workspace, body.get("path"), "path", suffix=".toml")
        return await run_in_threadpool(plan, workspace, path, checked["toml"], checked["data"])

    # -- jobs ---------------------------------------------------------------------------------
    @app.get("/api/jobs")
    async def list_jobs():
        return {"jobs": [j.to_json() for j in jobs.list()]}

    @app.post("/api/jobs")
    async def launch(request: Request):
        body = await body_of(request)
        checked = await run_in_threadpool(check, workspace, host, body)
        if not checked["ok"]:
            raise StudioError(400, "the recipe is not valid: see the fields", None, checked["errors"])
        overwrite = body.get("overwrite") is True
        busy = [j for j in jobs.list() if j.active and j.output == checked["output"]]
        if busy:
            raise StudioError(409, f"job {busy[0].id} is {busy[0].status} into {checked['output']}: stop it first, "
                                   "or choose another output.dir", "output.dir")
        if checked["output_exists"] and not overwrite:
            raise StudioError(409, f"{checked['output']} already exists: tick 'replace the run folder' to start "
                                   "over, or resume it from its job", "output.dir")
        path = inside(workspace, body.get("path"), "path", suffix=".toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(checked["toml"], encoding="utf-8")
        args = ["run", checked["path"], *(["--overwrite"] if overwrite else [])]
        job = jobs.submit(args, recipe=checked["path"], output=checked["output"])
        return JSONResponse(job.to_json(), status_code=201)

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        job = job_or_404(job_id)
        log = jobs.log_path(job)
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        return job.to_json() | {"log": text[-20000:]}

    @app.post("/api/jobs/{job_id}/stop")
    async def stop(job_id: str):
        job = job_or_404(job_id)
        if not job.active:
            raise StudioError(409, f"job {job_id} has already ended ({job.status})", "job")
        return jobs.stop(job).to_json()

    @app.post("/api/jobs/{job_id}/resume")
    async def resume(job_id: str, request: Request):
        from petune.recipe import parse_override

        body = await body_of(request)
        job = job_or_404(job_id)
        if job.kind != "run":
            raise StudioError(400, f"job {job_id} is a {job.kind}, not a run", "job")
        if job.active:
            raise StudioError(409, f"job {job_id} is still {job.status}: stop it first", "job")
        overrides = body.get("set") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise StudioError(400, "a list of KEY=VALUE strings, e.g. [\"train.max_steps=200\"]", "set")
        args = [a for a in job.args if a not in ("--overwrite", "--resume")] + ["--resume"]
        for text in overrides:
            try:
                keys, _ = parse_override(text)
            except RecipeError as exc:
                raise StudioError(400, exc.message, "set") from None
            if keys[0] == "output":
                raise StudioError(400, "a resumed run keeps its output folder", "set")
            args += ["--set", text]
        resumed = jobs.submit(args, recipe=job.recipe, output=job.output, resumes=job.id)
        return JSONResponse(resumed.to_json(), status_code=201)

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        job = job_or_404(job_id)
        return StreamingResponse(_stream(request, jobs, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- runs ---------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def list_runs():
        from petune import runs

        found = await run_in_threadpool(runs.list_runs, workspace, _primary_metric(host))
        return {"runs": [run_json(workspace, r) for r in found]}

    @app.get("/api/run")
    async def get_run(path: str | None = None):
        return await run_in_threadpool(run_details, workspace, host, run_dir(path), jobs)

    @app.get("/api/compare")
    async def get_compare(run: list[str] | None = Query(None)):  # noqa: B008 — FastAPI's way to take a list
        if not run:
            raise StudioError(400, "name one run or more: /api/compare?run=runs/a&run=runs/b", "run")
        return await run_in_threadpool(compare, workspace, host, [run_dir(r, "run") for r in run])

    @app.post("/api/run/command")
    async def run_command(request: Request):
        """merge or export a finished run, as a job; its log shows the verification lines."""
        body = await body_of(request)
        path = run_dir(body.get("path"))
        rel = relative(workspace, path)
        command = body.get("command")
        if command == "merge":
            out = rel + "-merged"
            args = ["merge", rel, "--out", out]
        elif command == "export":
            out = rel + ".gguf"
            args = ["export", rel, "--out", out]
        else:
            raise StudioError(400, "command must be 'merge' or 'export'", "command")
        if body.get("overwrite") is True:
            args.append("--overwrite")
        job = jobs.submit(args, kind=command, output=out)
        return JSONResponse(job.to_json(), status_code=201)

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    app.state.servers = servers

    @app.post("/api/run/serve")
    async def serve_run(request: Request):
        """``petune serve RUN`` on a free loopback port, as a process: its playground chats with
        (or predicts with) the run. One server per run, kept until the studio stops."""
        body = await body_of(request)
        path = run_dir(body.get("path"))
        rel = relative(workspace, path)
        if rel in servers and servers[rel][0].poll() is None:
            return {"url": servers[rel][1], "started": False}
        return await run_in_threadpool(start_server, path, rel)

    def start_server(path: Path, rel: str) -> dict:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = workspace / STATE_DIR / f"serve-{path.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "petune", "serve", rel, "--port", str(port)], cwd=workspace,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}/?run={path.name}"
        servers[rel] = (proc, url)
        return {"url": url, "started": True, "log": relative(workspace, log)}

    @app.get("/api/file")
    async def get_file(path: str | None = None):
        file = inside(workspace, path, "path", must_exist=True)
        if not file.is_file():
            raise StudioError(400, f"{path!r} is a folder", "path")
        return FileResponse(file, headers={"Cache-Control": "no-cache"},
                            media_type=None if file.suffix == ".png" else "text/plain; charset=utf-8")

    return app


async def _stream(request: Request, jobs: JobQueue, job):
    """Server-sent events of one job: ``status``, ``log`` (new text), ``progress`` (one event of
    the run), and ``end`` once it has ended and everything was sent. Starts from the beginning:
    a page that comes back gets the whole story."""
    log_at = events_at = 0
    last_status, quiet_since = None, time.monotonic()
    while True:
        sent = False
        status = json.dumps(job.to_json())
        if status != last_status:
            last_status, sent = status, True
            yield f"event: status\ndata: {status}\n\n"
        ended = not job.active
        chunk, log_at = _read_new(jobs.log_path(job), log_at, whole_lines=not ended)
        if chunk:
            sent = True
            yield f"event: log\ndata: {json.dumps({'text': chunk})}\n\n"
        lines, events_at = _read_new(jobs.events_path(job), events_at, whole_lines=True)
        for line in lines.splitlines():
            if line.strip():
                sent = True
                yield f"event: progress\ndata: {line}\n\n"
        if ended and not sent:
            yield "event: end\ndata: {}\n\n"
            return
        if sent:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 10:
            quiet_since = time.monotonic()
            yield ": still here\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.25)


def _read_new(path: Path, offset: int, *, whole_lines: bool) -> tuple[str, int]:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except OSError:
        return "", offset
    if whole_lines:
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
    return data.decode("utf-8", errors="replace"), offset + len(data)


# -- the guard --------------------------------------------------------------------------------
class _Guard:
    """Before the app: the Host header (a keyless server on loopback answers only loopback
    names: DNS rebinding), the API key on ``/api/`` (when set), cross-site requests (a request
    that changes something must come from the studio's own page: its Origin is this Host) and
    the body size."""

    def __init__(self, app, api_key: str | None, check_host: bool):
        self.app, self.api_key, self.check_host = app, api_key, check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from petune.serve.app import LOOPBACK_NAMES, _loopback_host

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.check_host and host and not _loopback_host(host):
            return await self._refuse(scope, receive, send, 421,
                                      f"this studio answers only requests addressed to {', '.join(LOOPBACK_NAMES)} "
                                      f"(the Host header was {host[:100]!r}); to reach it under another name, start "
                                      "it with --api-key")
        path = scope["path"]
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if path == "/api/file" and scheme == "":  # an <img> sends no header: its URL carries the key
                from urllib.parse import parse_qs

                scheme, token = "bearer", (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
                                           or [""])[0]
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await self._refuse(scope, receive, send, 401, "missing or wrong API key: the page asks for "
                                                                     "it; other clients send 'Authorization: Bearer "
                                                                     "KEY'")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.partition("://")[2].rstrip("/").lower() != host.lower():
                return await self._refuse(scope, receive, send, 403,
                                          f"cross-site request refused: it came from {origin[:100]!r}, not from the "
                                          "studio's own page")
            if origin is None and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                return await self._refuse(scope, receive, send, 403, "cross-site request refused")
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                return await self._refuse(scope, receive, send, 413,
                                          f"the request body is larger than {MAX_BODY_BYTES} bytes")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str):
        await StudioError(status, message).response()(scope, receive, send)


def with_guard(app: FastAPI, *, api_key: str | None, check_host: bool = False):
    return _Guard(app, api_key, check_host)
