"""``petune serve``'s limits: a request cannot hold the server for long or make it do
unbounded work, a client that leaves stops its generation, and a keyless server on loopback
answers only requests addressed to it (DNS rebinding).

One keyless server with small limits, on run ``a`` of test_serve (same session cache);
generation is made slow on purpose by a message holding "__slow__" (see test_serve.LAUNCHER).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from helpers import petune
from test_serve import Server, chat_body, make_runs, post

TIMEOUT = 4.0  # --request-timeout
STEP = 0.25  # seconds per token of a "__slow__" request: 64 tokens take 16 s unless stopped
MAX_PROMPT_TOKENS = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = make_runs(tmp_path_factory.getbasetemp())
    srv = Server([runs["a"]], tmp_path_factory.mktemp("serve-limits") / "server.log",
                 "--max-tokens", "64", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
                 "--request-timeout", str(TIMEOUT), env={"PETUNE_TEST_SLOW_STEP": str(STEP)})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def slow_body(**extra) -> dict:
    return chat_body("a", content="__slow__", max_tokens=64, **extra)


def quick_answer(server) -> float:
    """Seconds a normal request takes (it waits for the base while another request holds it)."""
    started = time.monotonic()
    response = post(server, "/v1/chat/completions", chat_body("a"), headers=None, timeout=60)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_prompt_over_the_token_limit_is_refused_before_generating(server):
    response = post(server, "/v1/chat/completions", chat_body("a", content="hello " * 60), headers=None)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "prompt_too_long")
    assert f"limit of {MAX_PROMPT_TOKENS}" in error["message"] and "--max-prompt-tokens" in error["message"]
    response = post(server, "/v1/completions", {"model": "a", "prompt": "hello " * 60, "max_tokens": 4}, headers=None)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    assert post(server, "/v1/completions", {"model": "a", "prompt": "hello", "max_tokens": 4},
                headers=None).status_code == 200


def test_too_many_messages_are_refused(server):
    body = {"model": "a", "messages": [{"role": "user", "content": "a"}] * 1025, "max_tokens": 4}
    response = post(server, "/v1/chat/completions", body, headers=None)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "at most 1024" in error["message"]


def test_stop_string_at_the_length_limit_works(server):
    response = post(server, "/v1/chat/completions", chat_body("a", stop=["x" * 64, "y"]), headers=None)
    assert response.status_code == 200, response.text


def test_requests_over_the_time_limit_get_503_and_free_the_model(server):
    """Two slow requests at once, one streamed: the first is stopped mid-generation, the
    second while it still waits for the model (waiting counts); both within the limit."""

    def plain():
        response = post(server, "/v1/chat/completions", slow_body(), headers=None, timeout=60)
        assert response.status_code == 503, response.text
        return [response.json()]

    def streamed():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=slow_body(stream=True),
                          timeout=60) as reply:
            if reply.status_code == 200:  # text came before the limit: the stream ends with an error event
                return [json.loads(line[6:]) for line in reply.iter_lines()
                        if line.startswith("data: ") and line != "data: [DONE]"]
            reply.read()  # no text yet: a plain error
            assert reply.status_code == 503, reply.text
            return [reply.json()]

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        answers = [f.result() for f in [pool.submit(plain), pool.submit(streamed)]]
    assert TIMEOUT - 0.5 < time.monotonic() - started < TIMEOUT + 3
    for events in answers:
        error = events[-1]["error"]
        assert error["code"] == "timeout" and "--request-timeout" in error["message"], events
    assert quick_answer(server) < 2, "the stopped generations should have let go of the model"


def test_client_that_goes_away_stops_its_generation(server):
    """A non-streaming request whose client gives up after 0.5 s: the next request is answered
    at once, not after the 16 s the abandoned generation would take (nor at the time limit)."""
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", slow_body(), headers=None, timeout=0.5)
    quick_answer(server)
    assert time.monotonic() - started < TIMEOUT - 0.5


HOSTS = [("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("localhost", 200),
         ("LocalHost:1234", 200),  # another port: an ssh tunnel, say
         ("evil.example:{port}", 421), ("evil.example", 421), ("localhost.evil.example:{port}", 421),
         ("127.0.0.1.nip.io:{port}", 421), ("localhost:x", 421)]


def test_keyless_loopback_server_answers_only_loopback_host_names(server):
    port = server.url.rsplit(":", 1)[1]
    for template, status in HOSTS:
        host = template.format(port=port)
        response = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30)
        assert response.status_code == status, (host, response.text)
    evil = {"Host": f"evil.example:{port}"}
    for path in ("/", "/health", "/v1/chat/completions"):  # the check comes before anything else
        response = httpx.request("POST" if path.startswith("/v1") else "GET", server.url + path, headers=evil,
                                 json=chat_body("a") if path.startswith("/v1") else None, timeout=30)
        assert response.status_code == 421, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_host"
        assert "--api-key" in response.json()["error"]["message"]


@pytest.mark.parametrize("key", ["clé", "two words", "", "\tkey"])
def test_api_key_a_client_cannot_send_is_refused(key):
    from petune.errors import UserError
    from petune.serve import _api_key

    with pytest.raises(UserError) as caught:
        _api_key(SimpleNamespace(api_key=key))
    assert caught.value.where == "--api-key" and "API key" in caught.value.message
    assert not key or key not in str(caught.value), "the key itself is not printed"
    assert _api_key(SimpleNamespace(api_key="sk-Abc_123.~!")) == "sk-Abc_123.~!"


def test_non_ascii_api_key_stops_the_command_before_it_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("PETUNE_API_KEY", "κλειδί")
    result = petune("serve", tmp_path, "--port", "0", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "PETUNE_API_KEY" in result.stderr and "ASCII" in result.stderr
    assert "not a finished petune run" not in result.stderr, "the key is checked first"


def test_stop_strings_end_generation_where_transformers_would(tiny_llama_path):
    """The server matches stop strings itself (transformers' matcher builds a table of
    vocabulary × stop length per new set of stop strings); it stops at the same token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petune.serve.registry import _Tap

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    inputs = tokenizer("the quick brown fox", return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(free[0, start:], skip_special_tokens=True)
    assert len(text) > 15
    for stop in (text[5:8], text[-3:], [text[12:14], text[3:5]]):  # early, at the very end, the first of two
        theirs = model.generate(**inputs, max_new_tokens=20, do_sample=False, stop_strings=stop, tokenizer=tokenizer)
        ours = _Tap(model).generate(**inputs, max_new_tokens=20, do_sample=False, stop_strings=stop,
                                    tokenizer=tokenizer)
        assert torch.equal(theirs, ours), stop
        assert ours.shape[1] < free.shape[1] or stop == text[-3:], "the stop string ends it early"
