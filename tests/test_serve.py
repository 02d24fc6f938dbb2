"""``petune serve``: a real server on 127.0.0.1 in a subprocess, serving tiny finished runs
(two LoRA SFT runs on one random tiny Llama, a LoRA classification run on a tiny BERT).

Answers are checked against ``petune generate`` / ``petune predict`` on the same runs; the
official ``openai`` client talks to it. Every server is bounded: it stops when the test
process goes away or after a lifetime, and the fixtures stop it at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import fastapi  # noqa: F401
import httpx
import pytest
import uvicorn  # noqa: F401
from helpers import REPO, petune, write_classification_data, write_recipe

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "what is the capital of france ?"
MAX_TOKENS = 16
PREDICT_ROWS = ["a good movie number 3", "a bad film number 3", "i loved it", "boring and far too long"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200", TOKENIZERS_PARALLELISM="false")


def sft_recipe(path: Path, data: Path, seed: int, out: Path) -> Path:
    return write_recipe(path, task={"name": "sft", "train": data, "max_length": 64, "num_sample_generations": 0},
                        strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train={"max_steps": 15, "batch_size": 5, "learning_rate": 0.05, "logging_steps": 5,
                               "save_steps": 1000, "seed": seed},
                        eval={"strategy": "epoch"}, output=out)


def classification_recipe(path: Path, out: Path) -> Path:
    return write_recipe(path, model="random:tiny-bert",
                        task={"name": "classification", "train": "train.csv", "validation": "validation.csv",
                              "max_length": 32},
                        strategy={"name": "lora", "r": 4, "alpha": 8},
                        # 5e-3 left this seed's tiny classifier at chance with the current library versions
                        train={"batch_size": 8, "learning_rate": 2e-2, "max_steps": 30, "logging_steps": 5,
                               "save_steps": 1000, "seed": 7},
                        output=out)


#: a test server: the real `petune serve` code, plus injected faults (a message holding
#: "__boom__" makes generation raise; one holding "__slow__" makes each token take
#: PETUNE_TEST_SLOW_STEP seconds) and a watchdog that ends it with its parent
LAUNCHER = r"""
import os, sys, threading, time
parent, deadline = os.getppid(), time.monotonic() + float(os.environ.get("PETUNE_TEST_SERVER_LIFETIME", "900"))
def watchdog():
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.5)
    os._exit(3)
threading.Thread(target=watchdog, daemon=True).start()
from petune_plugins.tasks import sft
original = sft.SftTask.generate
def generate(self, model, tokenizer, options, state, messages, *args, **kwargs):
    if any("__boom__" in m["content"] for m in messages):
        raise RuntimeError("injected failure for the test")
    if any("__slow__" in m["content"] for m in messages):
        step = float(os.environ.get("PETUNE_TEST_SLOW_STEP", "0.5"))
        # on the embeddings: generate runs the inner model, not the peft wrapper's forward
        hook = model.get_input_embeddings().register_forward_pre_hook(lambda *_: time.sleep(step))
        try:
            return original(self, model, tokenizer, options, state, messages, *args, **kwargs)
        finally:
            hook.remove()
    return original(self, model, tokenizer, options, state, messages, *args, **kwargs)
sft.SftTask.generate = generate
from petune.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


# -- tiny finished runs, made once per test session ------------------------------------------
def make_runs(base: Path) -> dict[str, Path]:
    """Three finished runs under ``base`` (trained in parallel the first time, then reused):
    ``a`` and ``b`` (SFT, LoRA on one base, different answers), ``cls`` (classification)."""
    folder = base / "serve-runs"
    runs = {name: folder / name for name in ("a", "b", "cls")}
    if (folder / "done").exists():
        return runs
    folder.mkdir(parents=True, exist_ok=True)
    answers = {"a": "paris is the capital .", "b": "i hated it , boring ."}
    prompts = ["what is the capital of france ?", "hello", "write a short poem about the sea .",
               "answer the question below .", "i loved it ."]
    recipes = []
    for seed, (name, answer) in enumerate(answers.items(), 1):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"instruction": p, "output": answer}) + "\n" for p in prompts))
        recipes.append(sft_recipe(folder / f"{name}.toml", data, seed, runs[name]))
    cls_folder = folder / "cls-data"
    cls_folder.mkdir(exist_ok=True)
    write_classification_data(cls_folder)
    recipes.append(classification_recipe(cls_folder / "recipe.toml", runs["cls"]))
    procs = [subprocess.Popen([sys.executable, "-m", "petune", "run", str(r), "--overwrite"], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in recipes]
    for recipe, proc in zip(recipes, procs):
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"petune run {recipe} failed:\n{output[-3000:]}"
    (folder / "done").write_text("ok")
    return runs


def expected_outputs(base: Path, runs: dict[str, Path]) -> dict:
    """What the CLI answers on the same runs: ``petune generate`` (greedy) for a and b,
    ``petune predict`` for cls; computed once per session (in parallel) and kept."""
    cache = base / "serve-runs" / "expected.json"
    if cache.exists():
        return json.loads(cache.read_text())
    rows = base / "serve-runs" / "rows.txt"
    rows.write_text("".join(r + "\n" for r in PREDICT_ROWS))
    commands = {name: ["generate", runs[name], "--prompt", PROMPT, "--max-new-tokens", str(MAX_TOKENS)]
                for name in ("a", "b")}
    commands["cls"] = ["predict", runs["cls"], "--input", rows]
    procs = {name: subprocess.Popen([sys.executable, "-m", "petune", *map(str, args)], cwd=REPO, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"petune {commands[name][0]} failed:\n{err[-3000:]}"
        outputs[name] = out
    expected = {name: outputs[name].removesuffix("\n") for name in ("a", "b")}  # rich adds one newline
    lines = outputs["cls"].splitlines()
    assert lines[0] == "text\tlabel\tprobability"
    expected["cls"] = [{"text": t, "label": label, "probability": float(p)}
                       for t, label, p in (line.split("\t") for line in lines[1:])]
    cache.write_text(json.dumps(expected))
    return expected


class Server:
    """``petune serve`` in a subprocess on a free port of 127.0.0.1, its output in a log file.
    A thread watches ``/health`` from the moment the server listens (what it answered is in
    ``health_seen``) until it is ready."""

    def __init__(self, runs: list, log: Path, *args, env: dict | None = None, headers: dict | None = None,
                 timeout: float = 300):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *map(str, runs), "--port", "0", *args],
                                     cwd=REPO, env={**ENV, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = None
        self.health_seen: list[int] = []
        self.ready = threading.Event()
        self.timeout = timeout
        threading.Thread(target=self._watch, args=(headers,), daemon=True).start()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _watch(self, headers: dict | None) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url is None:
                found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.output())
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    status = httpx.get(self.url + "/health", headers=headers, timeout=5).status_code
                except httpx.HTTPError:
                    status = None
                if status is not None:
                    self.health_seen.append(status)
                if status == 200:
                    self.ready.set()
                    return
            time.sleep(0.05)

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + self.timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server was not ready within {self.timeout}s:\n{self.output()[-4000:]}")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def stack(runs, tmp_path_factory):
    """One server for the module — a and b (one base) and cls, an API key from the environment,
    small limits for the bad-request tests — and the CLI's answers, computed while it loads."""
    srv = Server([runs["a"], runs["b"], runs["cls"]], tmp_path_factory.mktemp("serve") / "server.log",
                 "--max-tokens", "64", "--max-body-bytes", "20000", "--max-inputs", "8",
                 env={"PETUNE_API_KEY": API_KEY}, headers=AUTH)
    try:
        want = expected_outputs(tmp_path_factory.getbasetemp(), runs)
        yield srv.wait_ready(), want
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(stack):
    return stack[0]


@pytest.fixture(scope="module")
def expected(stack) -> dict:
    return stack[1]


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path: str, body=None, *, headers=AUTH, content: bytes | None = None, timeout: float = 120):
    return httpx.post(server.url + path, json=body if content is None else None, content=content,
                      headers={**(headers or {}), **({"Content-Type": "application/json"} if content else {})},
                      timeout=timeout)


def chat_body(model: str, content: str = PROMPT, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


def metrics_json(server) -> dict:
    response = httpx.get(server.url + "/metrics", params={"format": "json"}, headers=AUTH, timeout=30)
    assert response.status_code == 200
    return response.json()


# -- OpenAI-compatible generation -------------------------------------------------------------
def test_openai_client_chat_equals_petune_generate(client, expected):
    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected["a"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.model == "a" and reply.object == "chat.completion"
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_client_streamed_chat_equals_petune_generate(client, expected):
    chunks = list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer should come in several pieces"
    assert "".join(pieces) == expected["a"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= MAX_TOKENS


def test_two_runs_on_one_base_answer_as_their_own_petune_generate(client, server, expected):
    assert expected["a"] != expected["b"], "the two tiny runs should answer differently"
    for name in ("a", "b", "a"):  # back and forth: switching adapters must not stick
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == expected[name]
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"a", "b", "cls"}
    a, b, cls = (listed[n].model_dump() for n in ("a", "b", "cls"))
    assert a["base"] == b["base"] != cls["base"] and a["shared_base"] and b["shared_base"]
    assert (a["kind"], cls["kind"]) == ("chat", "predict")


def test_memory_is_one_base_plus_small_adapters(server, runs, tiny_llama_path):
    """Two adapters on one base hold the base's weights once: the base model's parameters
    plus two adapters, well under two copies of the base."""
    memory = metrics_json(server)["memory"]
    assert memory["rss_bytes"] > 0
    (llama,) = [b for b in memory["bases"] if b["model"] == "random:tiny-llama"]
    assert llama["runs"] == ["a", "b"]
    base_file = sum(p.stat().st_size for p in Path(tiny_llama_path).glob("*.safetensors"))
    adapter_files = {n: (runs[n] / "adapter" / "adapter_model.safetensors").stat().st_size for n in ("a", "b")}
    for name in ("a", "b"):  # each adapter is there, and is a small part of the base
        assert 0 < llama["adapter_bytes"][name] <= adapter_files[name]
        assert llama["adapter_bytes"][name] < 0.1 * base_file
    assert 0.9 * base_file <= llama["base_bytes"] <= base_file  # the base's weights, once
    assert llama["parameter_bytes"] == llama["base_bytes"] + sum(llama["adapter_bytes"].values())
    assert llama["parameter_bytes"] < 1.25 * base_file  # two separate loads would be 2 × base_file


def test_concurrent_requests_each_get_their_own_adapter(server, expected):
    """16 requests in flight at once, alternating runs and streaming: each answer is its run's."""
    start = threading.Barrier(16)

    def ask(i: int):
        name = "ab"[i % 2]
        stream = i % 4 >= 2
        start.wait(timeout=60)
        body = chat_body(name, stream=stream)
        if not stream:
            response = post(server, "/v1/chat/completions", body, timeout=300)
            assert response.status_code == 200, response.text
            return name, response.json()["choices"][0]["message"]["content"]
        text = ""
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        return name, text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16
    for name, text in answers:
        assert text == expected[name], f"request to {name!r} got another run's answer"


def test_text_completions_plain_and_streamed(client):
    plain = client.completions.create(model="a", prompt="the quick brown fox", max_tokens=8, temperature=0)
    text = plain.choices[0].text
    assert plain.usage.prompt_tokens >= 4 and 0 < plain.usage.completion_tokens <= 8
    assert plain.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt="the quick brown fox", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == text
    other = client.completions.create(model="b", prompt="the quick brown fox", max_tokens=8, temperature=0)
    assert other.choices[0].text != text  # the adapter counts here too


def test_sampling_with_a_seed_repeats(server):
    body = chat_body("a", temperature=1.0, seed=5, top_p=0.9)
    first, second = (post(server, "/v1/chat/completions", body).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_stop_strings_cut_the_answer(server, expected):
    answer = expected["a"]
    stop = answer.strip()[:3]
    assert stop and stop in answer
    response = post(server, "/v1/chat/completions", chat_body("a", stop=[stop]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer[: answer.index(stop)]
    assert response.json()["choices"][0]["finish_reason"] == "stop"


# -- encoders ---------------------------------------------------------------------------------
def test_predict_equals_petune_predict(server, expected):
    response = post(server, "/v1/predict", {"model": "cls", "inputs": PREDICT_ROWS})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["input"] for d in data] == PREDICT_ROWS
    for got, want in zip(data, expected["cls"]):
        assert got["label"] == want["label"]
        assert round(got["probability"], 4) == pytest.approx(want["probability"], abs=1e-4)
        assert set(got["probabilities"]) == {"neg", "pos"}
        assert sum(got["probabilities"].values()) == pytest.approx(1.0)
    assert len({d["label"] for d in data}) == 2, "the tiny classifier should tell the two kinds apart"


# -- auth, bad requests, failures -------------------------------------------------------------
def test_api_key_is_required(server):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/a"), ("GET", "/v1/runs/a"), ("GET", "/metrics"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/predict")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, server.url + path, headers=headers, json={}, timeout=30)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    assert post(server, "/v1/chat/completions", chat_body("a")).status_code == 200
    assert httpx.get(server.url + "/", timeout=30).status_code == 200  # the page's code is public, no data


def test_health_answers_load_balancers_without_the_key_and_tells_nothing_else(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):
        response = httpx.get(server.url + "/health", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok"}  # no run names, bases or uptime


def test_a_server_with_a_key_answers_any_host_name(server):
    """The Host check is for keyless servers: with a key, a proxy may forward any name."""
    response = httpx.get(server.url + "/v1/models", headers={**AUTH, "Host": "models.example.com"}, timeout=30)
    assert response.status_code == 200, response.text


BAD_REQUESTS = [
    # (path, body or raw bytes, status, param, words in the message)
    ("/v1/chat/completions", chat_body("nope"), 404, "model", "unknown model 'nope'"),
    ("/v1/chat/completions", {"model": "a", "messages": []}, 400, "messages", "at least one message"),
    ("/v1/chat/completions", chat_body("a", max_tokens=65), 400, "max_tokens", "limit of 64"),
    ("/v1/chat/completions", chat_body("a", max_completion_tokens=100), 400, "max_completion_tokens", "limit"),
    ("/v1/chat/completions", chat_body("a", content="x" * 30000), 413, None, "larger than"),
    ("/v1/chat/completions", chat_body("a", max_tokens="5"), 400, "max_tokens", "integer"),
    ("/v1/chat/completions", chat_body("a", temperature="hot"), 400, "temperature", "number"),
    ("/v1/chat/completions", chat_body("a", temperature=3), 400, "temperature", "less than or equal"),
    ("/v1/chat/completions", chat_body("a", stream="yes"), 400, "stream", "boolean"),
    ("/v1/chat/completions", chat_body("a", n=2), 400, "n", "less than or equal to 1"),
    ("/v1/chat/completions", chat_body("a", stop=[""]), 400, "stop", "empty"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", "'user'"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "required"),
    ("/v1/chat/completions", b'{"model": "a", "messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b'[1, 2]', 400, None, "JSON object"),
    ("/v1/chat/completions", chat_body("a", content="hello " * 300), 400, "messages", "context"),
    ("/v1/chat/completions", chat_body("cls"), 400, "model", "/v1/predict"),
    ("/v1/completions", {"model": "a", "max_tokens": 4}, 400, "prompt", "required"),
    ("/v1/predict", {"model": "a", "inputs": ["hi"]}, 400, "model", "/v1/chat/completions"),
    ("/v1/predict", {"model": "cls", "inputs": []}, 400, "inputs", "at least one input"),
    ("/v1/predict", {"model": "cls", "inputs": ["ok", ""]}, 400, "inputs[1]", "at least 1 character"),
    ("/v1/predict", {"model": "cls", "inputs": ["x"] * 9}, 400, "inputs", "limit of 8"),
    ("/v1/predict", {"model": "cls", "inputs": "a good movie"}, 400, "inputs", "list"),
    # lengths that drive work, and text that is no Unicode (JSON can carry lone surrogates)
    ("/v1/chat/completions", chat_body("a", stop=["x" * 65]), 400, "stop[0]", "at most 64 characters"),
    ("/v1/chat/completions", chat_body("a", stop="x" * 65), 400, "stop", "at most 64 characters"),
    ("/v1/chat/completions", chat_body("m" * 257), 400, "model", "at most 256 characters"),
    ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400,
     "messages[0].content", "lone surrogate"),
    ("/v1/chat/completions", (b'{"model": "a", "messages": [{"role": "user", "content": [{"type": "text", '
                              b'"text": "\\udfff"}]}]}'), 400, "messages[0].content[0].text", "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400,
     "model", "lone surrogate"),
    ("/v1/completions", b'{"model": "a", "prompt": "\\udc80"}', 400, "prompt", "lone surrogate"),
    ("/v1/predict", b'{"model": "cls", "inputs": ["ok", "\\ud800"]}', 400, "inputs[1]", "lone surrogate"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{c[3] or c[2]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_4xx_naming_the_field(server, path, body, status, param, words):
    response = post(server, path, content=body) if isinstance(body, bytes) else post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    if param:
        assert error["message"].startswith(param), "the message names the field first"


def test_still_healthy_after_bad_requests(server, expected):
    for _ in range(3):
        post(server, "/v1/chat/completions", {"model": "a", "messages": []})
    assert httpx.get(server.url + "/v1/nothing", headers=AUTH, timeout=30).status_code == 404
    health = httpx.get(server.url + "/health", headers=AUTH, timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    response = post(server, "/v1/chat/completions", chat_body("b"))
    assert response.json()["choices"][0]["message"]["content"] == expected["b"]


def test_generation_failure_is_a_500_and_the_server_keeps_serving(server, expected):
    before = metrics_json(server)["totals"]["server_errors"]
    response = post(server, "/v1/chat/completions", chat_body("a", content="__boom__"))
    assert response.status_code == 500
    assert "RuntimeError: injected failure" in response.json()["error"]["message"]
    streamed = post(server, "/v1/chat/completions", chat_body("a", content="__boom__", stream=True))
    assert streamed.status_code == 500 and streamed.json()["error"]["type"] == "server_error"
    assert metrics_json(server)["totals"]["server_errors"] == before + 2
    response = post(server, "/v1/chat/completions", chat_body("a"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected["a"]


# -- health, metrics, run details ---------------------------------------------------------------
def test_health_waits_for_the_models(server):
    assert server.health_seen[-1] == 200
    assert 503 in server.health_seen, "health should say 'loading' (503) before the models are in"
    log = server.output()
    assert log.index("listening on") < log.index("ready:")


def test_metrics_count_requests_tokens_and_latency(server):
    post(server, "/v1/chat/completions", chat_body("a"))
    post(server, "/v1/chat/completions", chat_body("nope"))
    data = metrics_json(server)
    series = {(s["endpoint"], s["model"]): s for s in data["series"]}
    chat = series[("/v1/chat/completions", "a")]
    assert chat["requests"] >= 1 and chat["completion_tokens"] > 0 and chat["prompt_tokens"] > 0
    assert chat["latency_seconds_sum"] > 0
    assert series[("/v1/chat/completions", "nope")]["client_errors"] >= 1
    assert data["totals"]["errors"] >= 1 and data["ready"] is True
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30)
    assert text.headers["content-type"].startswith("text/plain")
    body = text.text
    assert re.search(r'^petune_requests_total\{endpoint="/v1/chat/completions",model="a"\} \d+$', body, re.MULTILINE)
    assert re.search(r'^petune_completion_tokens_total\{endpoint="/v1/chat/completions",model="a"\} [1-9]\d*$',
                     body, re.MULTILINE)
    assert 'petune_request_latency_seconds_bucket{endpoint="/v1/chat/completions",model="a",le="+Inf"}' in body
    assert re.search(r'^petune_errors_total\{endpoint="/v1/chat/completions",model="nope",kind="client"\} [1-9]',
                     body, re.MULTILINE)
    assert re.search(r'^petune_parameter_bytes\{base="0",model="random:tiny-llama"\} \d+$', body, re.MULTILINE)
    assert re.search(r"^petune_ready 1$", body, re.MULTILINE)


def test_run_details_for_the_playground(server):
    details = httpx.get(server.url + "/v1/runs/a", headers=AUTH, timeout=30).json()
    assert details["task"] == "sft" and details["strategy"] == "lora"
    assert details["loss_history"] and all("loss" in h for h in details["loss_history"])
    cls = httpx.get(server.url + "/v1/runs/cls", headers=AUTH, timeout=30).json()
    assert cls["labels"] == ["neg", "pos"]
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js", timeout=30).status_code == 200


# -- without a server -------------------------------------------------------------------------
def _fake_run(tmp_path: Path, name: str, *, model="m", task="sft", artifact="adapter", peft_type="LORA",
              state=None, load_kwargs=None):
    from petune.serve.registry import ServedRun

    folder = tmp_path / name
    (folder / artifact).mkdir(parents=True)
    if peft_type:
        (folder / artifact / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    recipe = SimpleNamespace(model=SimpleNamespace(name=model, dtype="auto"), strategy=None)
    strategy = SimpleNamespace(name="x", artifact=artifact, load_kwargs=lambda options: dict(load_kwargs or {}))
    task = SimpleNamespace(name=task, model_state=lambda state: state)  # Task.model_state's default
    return ServedRun(name, folder, recipe, task, strategy, state or {})


def test_runs_share_a_base_only_when_they_can(tmp_path):
    from petune.serve.registry import plan

    runs = [_fake_run(tmp_path, "a"), _fake_run(tmp_path, "b"),
            _fake_run(tmp_path, "full", artifact="model", peft_type=None),  # full fine-tuning: alone
            _fake_run(tmp_path, "bottleneck", peft_type=None),  # not a peft adapter: alone
            _fake_run(tmp_path, "other-model", model="m2"),
            _fake_run(tmp_path, "4bit", load_kwargs={"quantization_config": {"load_in_4bit": True}}),
            _fake_run(tmp_path, "prompt", peft_type="PROMPT_TUNING"),  # peft cannot mix adapter types
            _fake_run(tmp_path, "cls-2", task="classification", state={"labels": ["neg", "pos"]}),
            _fake_run(tmp_path, "cls-3", task="classification", state={"labels": ["a", "b", "c"]}),
            _fake_run(tmp_path, "cls-2b", task="classification", state={"labels": ["neg", "pos"]})]
    bases = plan(runs)
    groups = sorted(sorted(r.name for r in b.runs) for b in bases)
    assert groups == sorted([["a", "b"], ["full"], ["bottleneck"], ["other-model"], ["4bit"], ["prompt"],
                             ["cls-2", "cls-2b"], ["cls-3"]])
    assert not next(b for b in bases if b.runs[0].name == "full").shared


def test_run_names(tmp_path):
    from petune.errors import UserError
    from petune.serve.registry import parse_run_args

    (tmp_path / "run1").mkdir()
    assert parse_run_args([str(tmp_path / "run1"), f"x={tmp_path / 'run1'}"]) == [
        ("run1", tmp_path / "run1"), ("x", tmp_path / "run1")]
    with pytest.raises(UserError, match="two runs are named 'run1'"):
        parse_run_args([str(tmp_path / "run1"), str(tmp_path / "run1")])
    with pytest.raises(UserError, match="may hold only"):
        parse_run_args([f"bad name={tmp_path / 'run1'}"])


def test_text_deltas_add_up_and_hold_back_stop_strings():
    from petune.serve.registry import TextDeltas

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    sent = []
    deltas = TextDeltas(Tok(), ["END"], sent.append)
    text = "hello wor EN"
    for k in range(1, len(text) + 1):
        deltas.update([ord(c) for c in text[:k]])
    assert "".join(sent) == "hello wor"  # " EN" could start "END": held back
    deltas.finish("hello wor EN")
    assert "".join(sent) == "hello wor EN"


# -- the command --------------------------------------------------------------------------------
def test_petune_serve_command(tmp_path):
    """`petune serve` is a petune command; a folder that is no run is refused before binding."""
    help_text = petune("serve", "--help", timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    assert "--api-key" in help_text.stdout and "RUN_DIR" in help_text.stdout
    result = petune("serve", tmp_path, "--port", "0", timeout=120)
    assert result.returncode == 2
    assert "not a finished petune run" in result.stderr
