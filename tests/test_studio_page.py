"""``petune studio`` in headless Chromium: the real command on a free port, a workspace in
tmp_path. The page's recipe form is filled with a tiny model (random tiny Llama, LoRA, a few
steps), a validation error appears beside its field and goes away when fixed, the run is
launched and watched to its last step with its loss curve drawn, and compared with another
run. Screenshots are kept in the test's tmp_path (PETUNE_UPDATE_SCREENSHOTS=1 also writes
docs/studio.png, the README's).

Chromium is driven over the DevTools protocol as in the playground test (the same Browser).
Skipped where Debian's ``chromium`` is not installed (``apt-get install chromium``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import fastapi  # noqa: F401
import pytest
import uvicorn  # noqa: F401
from helpers import REPO
from test_serve_playground import CHROMIUM, Browser
from test_studio_api import make_workspace

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found: apt-get install chromium "
                                                         "(or set PETUNE_CHROMIUM) to run the studio page test")

FIELDS = [  # (field, value as typed; selects take their option's JSON)
    ("model.name", "random:tiny-llama"), ("task.name", '"sft"'), ("task.train", "data/train.jsonl"),
    ("task.max_length", "48"), ("task.num_sample_generations", "0"), ("strategy.name", '"lora"'),
    ("strategy.r", "4"), ("strategy.dropout", "0"), ("train.max_steps", "6"), ("train.batch_size", "5"),
    ("train.learning_rate", "0.05"), ("train.logging_steps", "1"), ("train.save_steps", "1000"),
    ("eval.strategy", '"no"'), ("output.dir", "runs/tiny"),
]


def earlier_run(workspace: Path) -> None:
    """A finished run's files (all `petune runs`/`compare` read), to compare the new run with."""
    run = workspace / "runs" / "earlier"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "status": "completed", "task": "sft", "strategy": "lora", "model": "random:tiny-llama",
        "started": "2025-01-01T10:00:00+00:00", "ended": "2025-01-01T10:00:30+00:00"}))
    (run / "log_history.json").write_text(json.dumps([{"step": s, "loss": 6.3 - 0.1 * s} for s in range(1, 7)]))
    (run / "metrics.json").write_text(json.dumps({"train": {"loss": 6.0}}))


class Studio:
    """``petune studio --port 0`` in a process of its own; its URL read from what it prints."""

    def __init__(self, workspace: Path, log: Path):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="300")
        self.proc = subprocess.Popen([sys.executable, "-m", "petune", "studio", "--port", "0", "--workspace",
                                      str(workspace)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url, self.lines, self.log = None, [], log
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
                if found and self.url is None:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.stop()
            raise RuntimeError("the studio did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.write_text("".join(self.lines))


def set_field(page: Browser, field: str, value: str) -> None:
    page.js(f"""(() => {{
        const input = document.querySelector('#form [data-field="{field}"]');
        if (!input) throw new Error('no field {field}');
        input.value = {json.dumps(value)};
        input.dispatchEvent(new Event(input.tagName === 'SELECT' ? 'change' : 'input'));
    }})()""")


def small_png(source: Path, target: Path) -> None:
    """The README's copy: a 256-colour palette PNG."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=256).save(target, optimize=True)


def test_compose_launch_watch_and_compare_in_a_browser(tmp_path):
    workspace = make_workspace(tmp_path / "ws")
    earlier_run(workspace)
    studio = Studio(workspace, tmp_path / "studio.log")
    page = Browser(tmp_path / "chromium-profile")
    try:
        page.go(studio.url + "/")
        page.wait("document.body.dataset.ready === 'true'")
        page.js("document.getElementById('recipe-path').value = 'tiny.toml'")
        for field, value in FIELDS:
            if field == "task.train":  # the task's options appear once a task is chosen
                page.wait("document.querySelector('#form [data-field=\"task.train\"]') !== null")
            set_field(page, field, value)
        page.wait("document.getElementById('valid').dataset.state === 'valid'")

        # a wrong value: its error appears beside the field, and goes when it is fixed
        set_field(page, "train.batch_size", "0")
        error = "document.querySelector('[data-error-for=\"train.batch_size\"]')"
        page.wait(f"!{error}.hidden && {error}.textContent.includes('greater than or equal to 1')")
        assert page.js("document.querySelector('#form [data-field=\"train.batch_size\"]').classList.contains('invalid')")
        assert page.js("document.getElementById('valid').dataset.state") == "invalid"
        page.screenshot(tmp_path / "studio-compose-error.png")
        set_field(page, "train.batch_size", "5")
        page.wait(f"{error}.hidden && document.getElementById('valid').dataset.state === 'valid'")
        toml = page.js("document.getElementById('toml').value")
        assert 'name = "random:tiny-llama"' in toml and "batch_size = 5" in toml  # the TOML view follows the form
        page.screenshot(tmp_path / "studio-compose.png")

        # launch and watch: progress to the last step, the loss curve drawn
        page.js("document.getElementById('launch').click()")
        page.wait("!document.getElementById('watch').hidden")
        page.wait("document.getElementById('job-status').dataset.status === 'completed'"
                  " || document.getElementById('job-status').dataset.status === 'failed'", timeout=300)
        assert page.js("document.getElementById('job-status').dataset.status") == "completed", \
            page.js("document.getElementById('log').textContent")[-3000:]
        page.wait("document.getElementById('bar').dataset.step === '6' && document.getElementById('bar').dataset.max === '6'")
        assert page.js("document.getElementById('bar').style.width") == "100%"
        assert page.js("document.querySelector('#loss-curve svg polyline').getAttribute('points').split(' ').length") >= 6
        assert "Plan" in page.js("document.getElementById('log').textContent")
        page.screenshot(tmp_path / "studio-watch.png")
        if os.environ.get("PETUNE_UPDATE_SCREENSHOTS"):
            small_png(tmp_path / "studio-watch.png", REPO / "docs" / "studio.png")
        assert (workspace / "tiny.toml").is_file() and (workspace / "runs/tiny/adapter").is_dir()

        # runs, a run's page, and compare
        page.js("document.querySelector('[data-tab=\"runs\"]').click()")
        page.wait("document.querySelectorAll('#runs-table tbody tr').length === 2")
        page.js("document.querySelector('#runs-table tr[data-run=\"runs/tiny\"]').click()")
        page.wait("document.getElementById('run-name').textContent === 'runs/tiny'"
                  " && document.querySelector('#run-plots img') !== null")
        assert "Plan" in page.js("document.getElementById('run-plan').textContent")
        page.js("document.querySelectorAll('#runs-table input[type=checkbox]').forEach(c => c.checked = true)")
        page.js("document.getElementById('compare-btn').click()")
        page.wait("!document.getElementById('compare').hidden"
                  " && document.querySelectorAll('#compare-curve svg polyline').length === 2")
        heads = page.js("[...document.querySelectorAll('#compare-table th')].map(th => th.textContent)")
        assert sorted(heads[1:]) == ["earlier", "tiny"]
        page.screenshot(tmp_path / "studio-compare.png")
        for name in ("studio-compose.png", "studio-watch.png", "studio-compare.png"):
            assert (tmp_path / name).stat().st_size > 5000
    finally:
        page.close()
        studio.stop()
        end_runs(workspace)


def end_runs(workspace: Path) -> None:
    """Runs outlive the studio on purpose; a test that failed halfway ends its own."""
    import signal

    for path in (workspace / ".petune-studio" / "jobs").glob("*/job.json"):
        job = json.loads(path.read_text())
        if job["status"] in ("running", "stopping") and job["pid"]:
            try:
                os.killpg(job["pid"], signal.SIGKILL)  # the run's own session (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
