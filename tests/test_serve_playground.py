"""The playground page of ``petune serve`` in headless Chromium: it loads, asks for the API
key, sends a chat prompt and shows the run's answer (the one ``petune generate`` gives),
classifies texts, and shows the run's metrics and loss curve.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``):
no driver, no extra Python package. Skipped where Debian's ``chromium`` is not installed
(``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import fastapi  # noqa: F401
import httpx  # noqa: F401
import pytest
import uvicorn  # noqa: F401
from test_serve import API_KEY, MAX_TOKENS, PREDICT_ROWS, PROMPT, Server, expected_outputs, make_runs

CHROMIUM = os.environ.get("PETUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found: apt-get install chromium "
                                                         "(or set PETUNE_CHROMIUM) to run the playground test")


_TRAMPOLINE = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"


def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium and one page, over the DevTools protocol on fds 3/4 (NUL-separated JSON)."""

    def __init__(self, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the ends Chromium gets move above fd 9 first, so that putting them on 3 and 4 cannot clash
        to_chrome_r, from_chrome_w = (_high_fd(fd) for fd in (to_chrome_r, from_chrome_w))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"]
        # a tiny trampoline puts our pipe ends on the fds Chromium expects, then becomes Chromium
        self.proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w),
                                      CHROMIUM, *flags], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next, self._replies, self._cond = 0, {}, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._replies["closed"] = True
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        with self._cond:
            self._next += 1
            ident = self._next
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies or "closed" in self._replies, timeout):
                raise TimeoutError(f"no answer from Chromium to {method}")
            if ident not in self._replies:
                raise RuntimeError("Chromium closed the DevTools pipe")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def go(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)
        self.wait("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def wait(self, condition: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(condition)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout}s for: {condition}\npage: {self.js('document.body.innerText')}")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    runs = make_runs(base)
    server = Server([runs["a"], runs["cls"]], tmp_path_factory.mktemp("playground") / "server.log",
                    "--api-key", API_KEY, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        expected = expected_outputs(base, runs)
        server.wait_ready()
        browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield server, browser, expected
        finally:
            browser.close()
    finally:
        server.stop()


def test_playground_chats_and_predicts(setup, tmp_path):
    server, page, expected = setup
    page.go(server.url + "/")
    page.wait("document.getElementById('status').textContent === 'API key needed'")  # the key is asked for
    page.js(f"localStorage.setItem('petune-api-key', {json.dumps(API_KEY)})")
    page.go(server.url + "/?run=a")
    page.wait("document.querySelectorAll('#run-list li').length === 2")
    page.wait("document.getElementById('run-name').textContent === 'a' && !document.getElementById('chat').hidden")
    page.wait("document.querySelector('#loss-plot svg polyline') !== null")  # the loss curve
    page.wait("document.querySelector('#metrics') !== null && document.querySelector('#metrics').textContent !== ''")

    # chat: type a prompt, send it, read the streamed answer
    page.js(f"""(() => {{
        document.getElementById('max-tokens').value = '{MAX_TOKENS}';
        document.getElementById('prompt').value = {json.dumps(PROMPT)};
        document.getElementById('send').click();
    }})()""")
    page.wait("document.querySelector('.msg.assistant[data-state=\"done\"]') !== null")
    answer = page.js("document.querySelector('.msg.assistant').firstChild.textContent")
    assert answer == expected["a"]
    assert page.js("document.querySelector('.msg.user').textContent") == PROMPT
    assert "tokens" in page.js("document.querySelector('.msg.assistant .meta').textContent")
    assert page.js("document.getElementById('error').hidden")

    # classification: the labels petune predict gives
    page.js("document.querySelector('[data-run=\"cls\"]').click()")
    page.wait("!document.getElementById('predict').hidden")
    page.js(f"""(() => {{
        document.getElementById('predict-input').value = {json.dumps(chr(10).join(PREDICT_ROWS))};
        document.getElementById('predict-send').click();
    }})()""")
    page.wait("document.getElementById('predict-results').dataset.state === 'done'")
    labels = page.js("[...document.querySelectorAll('.prediction .bar.best')].map(b => b.dataset.label)")
    assert labels == [row["label"] for row in expected["cls"]]
    page.wait("document.getElementById('server-metrics').textContent.includes('requests')")
    page.screenshot(tmp_path / "playground.png")
    assert (tmp_path / "playground.png").stat().st_size > 1000
