"""``petune studio``'s API, in-process (FastAPI's TestClient) on a workspace in tmp_path: the
schema with a third-party plugin's options, validation errors per field, path and cross-site
refusals, recipes, and a tiny run (random tiny Llama, LoRA) launched as a process, streamed,
stopped with a checkpoint, resumed and finished, then listed, shown and compared."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fastapi  # noqa: F401
import httpx  # noqa: F401
import pytest
from fastapi.testclient import TestClient
from helpers import REPO, recipe_data

PROMPTS = ["what is the capital of france ?", "hello", "write a short poem about the sea .",
           "answer the question below .", "i loved it ."]

RECIPE = recipe_data(task={"name": "sft", "train": "data/train.jsonl", "max_length": 48, "num_sample_generations": 0},
                     strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                     train={"max_steps": 400, "batch_size": 5, "learning_rate": 0.05, "logging_steps": 1,
                            "save_steps": 1000},
                     output="runs/tiny")


def make_workspace(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"instruction": p, "output": "paris is the capital ."}) + "\n" for p in PROMPTS)
    (folder / "data" / "train.jsonl").write_text(rows * 2)
    return folder


def studio(workspace: Path, *, host=None, api_key=None, check_host=False):
    from petune.studio.app import create_app, with_guard
    from petune.studio.jobs import JobQueue

    jobs = JobQueue(workspace)
    app = create_app(workspace, jobs=jobs, host=host, api_key=api_key)
    return jobs, TestClient(with_guard(app, api_key=api_key, check_host=check_host), base_url="http://127.0.0.1:7860")


@pytest.fixture
def client(tmp_path):
    jobs, client = studio(make_workspace(tmp_path / "ws"))
    jobs.start()
    try:
        yield client
    finally:
        jobs.close(kill=True)


def errors_by_field(answer: dict) -> dict:
    return {e["field"]: e["message"] for e in answer["errors"]}


# -- schema -----------------------------------------------------------------------------------
def test_schema_shows_every_plugin_and_a_third_party_ones_options(tmp_path, monkeypatch):
    """The example third-party packages (examples/), loaded as plugins: their options are in
    the schema the forms are made from, and the validator checks them."""
    import importlib

    from petune.plugins import PluginHost, PluginOrigin

    for example in ("petune-plugin-example", "petune-task-example"):
        monkeypatch.syspath_prepend(str(REPO / "examples" / example / "src"))
    extra = [(PluginOrigin("petune-plugin-example", "0.1.0", "bitfit"), importlib.import_module("petune_bitfit")),
             (PluginOrigin("petune-task-example", "0.1.0", "text_regression"),
              importlib.import_module("petune_text_regression"))]
    host = PluginHost(autoload=False, extra=extra)  # first-party plugins and these two
    assert not [f for f in host.failures if f.origin in dict(extra)]
    _, client = studio(make_workspace(tmp_path / "ws"), host=host)
    schema = client.get("/api/schema").json()
    assert {"sft", "classification", "text_regression"} <= set(schema["tasks"])
    assert {"lora", "qlora", "bitfit"} <= set(schema["strategies"])
    assert {"math_answer", "regex", "reward_model"} <= set(schema["rewards"])  # for the grpo task's [[task.rewards]]
    bitfit = schema["strategies"]["bitfit"]
    assert bitfit["package"] == "petune-plugin-example" and "bias" in bitfit["description"]
    assert bitfit["schema"]["properties"]["train_layer_norm"] == {"default": False, "title": "Train Layer Norm",
                                                                  "type": "boolean"}
    regression = schema["tasks"]["text_regression"]["schema"]["properties"]
    assert regression["max_length"] == {"default": 64, "minimum": 8, "title": "Max Length", "type": "integer"}
    assert regression["train"]["format"] == "path"
    assert schema["core"]["train"]["properties"]["lr_scheduler"]["enum"][0] == "linear"
    assert "random:tiny-llama" in schema["models"] and "gemma-3-270m" in schema["models"]
    # the plugins' options are validated by the same validator, each error beside its field
    answer = client.post("/api/validate", json={"path": "r.toml", "data": {
        **RECIPE, "task": {"name": "text_regression", "train": "data/train.jsonl", "max_length": 4},
        "strategy": {"name": "bitfit", "train_layer_norm": "yes"}}}).json()
    fields = errors_by_field(answer)
    assert "greater than or equal to 8" in fields["task.max_length"]
    assert fields["strategy.train_layer_norm"] == "expected true or false, got 'yes'"


# -- validation -------------------------------------------------------------------------------
def test_validation_errors_beside_their_fields(client):
    ok = client.post("/api/validate", json={"path": "tiny.toml", "data": RECIPE}).json()
    assert ok["ok"] and ok["errors"] == [] and ok["output"] == "runs/tiny" and not ok["output_exists"]
    assert 'name = "random:tiny-llama"' in ok["toml"]
    # the TOML view gives the same data back (both ways in sync)
    again = client.post("/api/validate", json={"path": "tiny.toml", "toml": ok["toml"]}).json()
    assert again["ok"] and again["data"] == RECIPE

    bad = {**RECIPE, "train": {**RECIPE["train"], "batch_size": 0, "learning_rat": 1e-3},
           "strategy": {"name": "lorra"}, "task": {**RECIPE["task"], "train": "data/missing.jsonl"}}
    answer = client.post("/api/validate", json={"path": "tiny.toml", "data": bad}).json()
    fields = errors_by_field(answer)
    assert not answer["ok"]
    assert "greater than or equal to 1" in fields["train.batch_size"]
    assert "did you mean train.learning_rate?" in fields["train.learning_rat"]
    assert "did you mean 'lora'?" in fields["strategy.name"]
    assert "file not found" in fields["task.train"]
    assert client.post("/api/validate", json={"path": "r.toml", "data": {**RECIPE, "train": {"batch_size": "8"}}}
                       ).json()["errors"] == [{"field": "train.batch_size", "message": "expected an integer, got '8'"}]

    broken = client.post("/api/validate", json={"path": "r.toml", "toml": "[model\nname = 1"}).json()
    assert not broken["ok"] and broken["errors"][0]["field"] is None and "invalid TOML" in broken["errors"][0]["message"]
    # a strategy × task mix the strategy refuses (before anything loads)
    refused = client.post("/api/validate", json={"path": "r.toml", "data": {
        **RECIPE, "strategy": {"name": "adapters"}, "task": {**RECIPE["task"]}}}).json()
    assert refused["ok"] or refused["errors"][0]["field"] == "strategy.name"
    assert client.post("/api/validate", content=b"not json").status_code == 400


# -- paths and requests that are refused ------------------------------------------------------
def test_paths_outside_the_workspace_are_refused(client, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    workspace = tmp_path / "ws"
    (workspace / "link").symlink_to(outside)
    for path in ("../outside/secret.txt", str(outside / "secret.txt"), "link/secret.txt", "/etc/hostname"):
        answer = client.get("/api/file", params={"path": path})
        assert answer.status_code == 403, path
        assert "outside the workspace" in answer.json()["error"]["message"]
    for url, params in (("/api/recipe", {"path": "../x.toml"}), ("/api/run", {"path": "../outside"}),
                        ("/api/compare", {"run": ["runs/../../outside"]})):
        assert client.get(url, params=params).status_code == 403, url
    assert client.post("/api/recipe", json={"path": "../evil.toml", "toml": ""}).status_code == 403
    assert client.post("/api/recipe", json={"path": "link/evil.toml", "toml": ""}).status_code == 403
    assert not (outside / "evil.toml").exists()
    assert client.post("/api/recipe", json={"path": "notes.txt", "toml": ""}).json()["error"]["field"] == "path"
    assert client.get("/api/file", params={"path": ".petune-studio/jobs"}).status_code == 403
    assert client.get("/api/run", params={"path": "data"}).status_code == 404  # not a run folder
    # a recipe whose data or output lies outside
    answer = client.post("/api/validate", json={"path": "r.toml", "data": {
        **RECIPE, "task": {**RECIPE["task"], "train": str(outside / "secret.txt")}, "output": {"dir": "../out"}}}
    ).json()
    fields = errors_by_field(answer)
    assert "outside the workspace" in fields["task.train"] and "inside the workspace" in fields["output.dir"]
    launch = client.post("/api/jobs", json={"path": "r.toml", "data": {**RECIPE, "output": {"dir": "../out"}}})
    assert launch.status_code == 400 and launch.json()["errors"][0]["field"] == "output.dir"
    assert not (workspace / "r.toml").exists()


def test_cross_site_requests_host_names_and_api_key(tmp_path):
    workspace = make_workspace(tmp_path / "ws")
    _, client = studio(workspace, check_host=True)
    body = {"path": "r.toml", "toml": "[model]\n"}
    assert client.post("/api/recipe", json=body, headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    refused = client.post("/api/recipe", json=body, headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and "cross-site" in refused.json()["error"]["message"]
    assert client.post("/api/recipe", json=body, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get("/api/info", headers={"Host": "evil.example:7860"}).status_code == 421
    assert client.get("/").status_code == 200 and "petune studio" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200

    _, keyed = studio(workspace, api_key="k-123")
    assert keyed.get("/").status_code == 200  # the page asks for the key
    assert keyed.get("/api/info").status_code == 401
    assert keyed.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/api/info", headers={"Authorization": "Bearer k-123"}).json()["api_key"] is True
    (workspace / "note.txt").write_text("hello")
    assert keyed.get("/api/file", params={"path": "note.txt"}).status_code == 401
    assert keyed.get("/api/file", params={"path": "note.txt", "key": "k-123"}).text == "hello"  # for <img src>


def test_studio_refuses_another_address_without_a_key(tmp_path):
    from helpers import petune

    done = petune("studio", "--host", "0.0.0.0", "--workspace", tmp_path, "--port", "0", timeout=120)
    assert done.returncode == 2 and "--api-key" in done.stderr
    done = petune("studio", "--workspace", tmp_path / "nowhere", timeout=120)
    assert done.returncode == 2 and "not a folder" in done.stderr


# -- recipes ----------------------------------------------------------------------------------
def test_recipes_listed_opened_saved_and_bundled_ones_copied(client, tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "recipes").mkdir()
    (workspace / "recipes" / "mine.toml").write_text("# my recipe\n[model]\nname = 'random:tiny-llama'\n")
    (workspace / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # not a recipe
    listing = client.get("/api/recipes").json()
    assert listing["workspace"] == [{"path": "recipes/mine.toml", "summary": "my recipe"}]
    assert "qlora_sft.toml" in [r["name"] for r in listing["bundled"]]
    opened = client.get("/api/recipe", params={"path": "recipes/mine.toml"}).json()
    assert opened["data"]["model"]["name"] == "random:tiny-llama" and "task.name" in errors_by_field(opened)
    saved = client.post("/api/recipe", json={"path": "recipes/new/tiny.toml", "data": RECIPE}).json()
    assert saved == {"path": "recipes/new/tiny.toml", "saved": True}
    assert (workspace / "recipes/new/tiny.toml").read_text().startswith("[model]")

    copied = client.post("/api/recipes/bundled", json={"name": "lora_sft.toml"}).json()
    assert copied == {"path": "recipes/lora_sft.toml"}
    assert (workspace / "recipes/data/instructions.jsonl").is_file()
    assert client.get("/api/recipe", params={"path": "recipes/lora_sft.toml"}).json()["ok"]
    assert client.post("/api/recipes/bundled", json={"name": "../pyproject.toml"}).status_code == 404


# -- a run, from launch to compare ------------------------------------------------------------
def read_events(client, job_id: str, until=None, timeout: float = 240) -> list[tuple[str, dict]]:
    """The job's server-sent events, to the end (or until ``until(events)`` holds)."""
    seen: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/api/jobs/{job_id}/events") as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[6:])))
                if kind == "end" or (until is not None and until(seen)):
                    return seen
            assert time.monotonic() < deadline, f"no end after {timeout}s: {seen[-5:]}"
    return seen


def steps(events) -> list[int]:
    return [e["step"] for kind, e in events if kind == "progress" and e["event"] == "step"]


def log_text(events) -> str:
    return "".join(e["text"] for kind, e in events if kind == "log")


def test_a_run_launched_streamed_stopped_resumed_and_compared(client, tmp_path):
    workspace = tmp_path / "ws"
    launched = client.post("/api/jobs", json={"path": "tiny.toml", "data": RECIPE})
    assert launched.status_code == 201, launched.text
    job = launched.json()
    assert job["status"] in ("queued", "running") and job["command"] == "petune run tiny.toml"
    assert (workspace / "tiny.toml").is_file()
    # a second launch into the folder of an active job is refused, 'replace' or not
    again = client.post("/api/jobs", json={"path": "tiny.toml", "data": RECIPE, "overwrite": True})
    assert again.status_code == 409 and again.json()["error"]["field"] == "output.dir"

    events = read_events(client, job["id"], until=lambda seen: any(s >= 1 for s in steps(seen)))
    assert "Plan" in log_text(events)  # the run's plan, streamed from its log
    stopped = client.post(f"/api/jobs/{job['id']}/stop").json()
    assert stopped["status"] in ("stopping", "interrupted")
    events = read_events(client, job["id"])
    status = [e for kind, e in events if kind == "status"][-1]
    assert status["status"] == "interrupted" and status["returncode"] == 130, log_text(events)[-3000:]
    assert "saving a checkpoint" in log_text(events)
    reached = max(steps(events))
    assert 1 <= reached < 400
    listed = {r["dir"]: r for r in client.get("/api/runs").json()["runs"]}
    assert listed["runs/tiny"]["status"] == "interrupted"
    assert client.post(f"/api/jobs/{job['id']}/stop").status_code == 409  # already ended

    # resume, with a closer end: it continues from the checkpoint and finishes
    resumed = client.post(f"/api/jobs/{job['id']}/resume", json={"set": [f"train.max_steps={reached + 2}"]})
    assert resumed.status_code == 201, resumed.text
    assert resumed.json()["args"][-3:] == ["--resume", "--set", f"train.max_steps={reached + 2}"]
    events = read_events(client, resumed.json()["id"])
    assert [e for kind, e in events if kind == "status"][-1]["status"] == "completed", log_text(events)[-3000:]
    progress = [e for kind, e in events if kind == "progress"]
    assert progress[0]["event"] == "begin" and progress[0]["step"] == reached
    assert progress[-1] == {**progress[-1], "event": "end", "step": reached + 2, "max_steps": reached + 2}
    assert any(e["event"] == "log" and "loss" in e for e in progress)
    assert "resuming from" in log_text(events)

    run = client.get("/api/run", params={"path": "runs/tiny"}).json()
    assert run["status"] == "completed" and run["steps"] == reached + 2
    assert "runs/tiny/plots/loss.png" in run["plots"] and "[strategy]" in run["recipe"]
    assert any("loss" in h for h in run["log_history"]) and run["plan"].startswith("Plan")
    assert len(run["jobs"]) == 2
    png = client.get("/api/file", params={"path": run["plots"][0]})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    compared = client.get("/api/compare", params={"run": ["runs/tiny", "runs/tiny"]}).json()
    assert [r["dir"] for r in compared["runs"]] == ["runs/tiny", "runs/tiny"]
    assert compared["runs"][0]["log_history"]
    assert client.get("/api/compare").status_code == 400
    assert client.post("/api/run/serve", json={"path": "data"}).status_code == 404  # not a run folder
    assert client.post("/api/run/command", json={"path": "runs/tiny", "command": "rm"}).status_code == 400
    jobs = client.get("/api/jobs").json()["jobs"]
    assert [j["status"] for j in jobs] == ["interrupted", "completed"][: len(jobs)] or len(jobs) == 3
    assert client.get(f"/api/jobs/{job['id']}").json()["log"]


def test_a_failing_job_and_the_plan(client, tmp_path):
    """A run that fails ends as failed with its error in the log, and the server goes on; the
    plan endpoint shows the dry-run's plan and the memory estimate."""
    planned = client.post("/api/plan", json={"path": "tiny.toml", "data": RECIPE})
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    assert plan["ok"], plan["plan"]
    assert "trainable of" in plan["plan"] and "memory" in plan["plan"]
    assert plan["estimate"]["peak"] > 0 and plan["estimate"]["device"] in ("cpu", "cuda")
    assert plan["warning"] is None and plan["estimate_error"] is None
    assert not list((tmp_path / "ws").glob(".*studio-plan*"))  # the copy is removed
    assert client.post("/api/plan", json={"path": "r.toml", "data": {**RECIPE, "train": {"batch_size": 0}}}
                       ).json()["errors"][0]["field"] == "train.batch_size"

    bad = {**RECIPE, "train": {**RECIPE["train"], "batch_size": 50}}  # more than the 10 examples: fails at load
    job = client.post("/api/jobs", json={"path": "big.toml", "data": bad}).json()
    events = read_events(client, job["id"])
    status = [e for kind, e in events if kind == "status"][-1]
    assert status["status"] == "failed" and status["returncode"] == 2
    assert "train.batch_size" in log_text(events)
    assert client.get("/api/info").status_code == 200
