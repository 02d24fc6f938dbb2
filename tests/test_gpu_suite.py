"""The GPU suite's scripts (benchmarks/gpu/prepare, benchmarks/gpu/run): the dry run of the
same path on the CPU, the time budget, the wheel and size checks, and the site that makes
petune importable from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.harness import Case

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_of_the_gpu_script_writes_every_result(tmp_path):
    """benchmarks/gpu/run --dry-run: the GPU machine's path (site with petune linked from the
    checkout, plan, budget, results after each case, chart, logs) on the tiny shapes."""
    from benchmarks import suite
    from petune.errors import UserError

    try:
        suite.find_real_data()
    except UserError as exc:
        pytest.skip(f"no Alpaca data for the real-length case: {exc}")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "run"), "--dry-run", "--out", str(out),
                           "--budget", "240", "--scratch", str(tmp_path / "scratch")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400, check=False,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.png", "logs.tar.gz", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["not_run"] == [] and results["started"] == ["tiny-llama-lora", "real-tiny-llama-lora",
                                                                "tiny-llama-q4_k_m-qlora"]
    assert [(r["case"]["side"], r["ok"]) for r in results["rows"]] == [("petune", True), ("baseline", True)] * 2
    gguf = results["rows"][2:]  # petune on the GGUF file's own blocks, the plain loop on NF4 of its tensors
    assert gguf[0]["case"]["strategy_options"] == {"quant_type": "gguf"} and gguf[0]["quantised_as"] == "GGUF blocks"
    assert gguf[1]["quantised_as"] == "4-bit"
    real = results["real_length"]
    assert [(r["case"]["side"], r["case"]["variant"], r["ok"]) for r in real] == [
        ("petune", "", True), ("petune", "packing", True), ("baseline", "", True)]
    for row in real:
        assert row["useful_tokens"] > 0 and 0 < row["useful_share"] < 1, row
    # petune's defaults are padding-free on tiny-llama (its sdpa attention keeps a row's examples apart)
    assert real[0]["pad_share"] == 0 and real[1]["pad_share"] == 0 and real[2]["pad_share"] > 0
    text = (out / "results.md").read_text()
    assert "tiny-llama / lora" in text and "Real lengths" in text and "petune (packing)" in text
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert sum(name.endswith(".log") and "tiny-llama-lora" in name for name in names) == 5, names


class FakeRunner:
    """Each case takes ``cost`` seconds of a fake clock; one that would pass its timeout is stopped there."""

    def __init__(self, clock, cost):
        self.clock, self.cost, self.timeouts = clock, cost, []

    def run(self, case, timeout):
        self.timeouts.append(timeout)
        if self.cost > timeout:
            self.clock.now += timeout
            return {"case": {"side": case.side}, "ok": False, "error": "worker timed out"}
        self.clock.now += self.cost
        return {"case": {"side": case.side}, "ok": True}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _job(name, shape="tiny-llama"):
    cases = tuple(Case(shape=shape, strategy="lora", side=side, batch=1, seq=8) for side in ("petune", "baseline"))
    return gpu_suite.Job(name, "fixed", cases)


def test_budget_stops_a_case_at_the_deadline_and_lists_the_jobs_not_started():
    clock = FakeClock()
    jobs = [_job("a"), _job("b"), _job("c")]
    written = []
    results = gpu_suite.new_results(jobs)
    gpu_suite.run_jobs(jobs, FakeRunner(clock, cost=40), results, deadline=100, device="cpu", clock=clock,
                       write=lambda r: written.append(len(r["rows"])))
    # a: 40 + 40; b: its petune case stopped at the deadline (20 s left), its baseline not started
    assert results["started"] == ["a", "b"]
    assert [r["ok"] for r in results["rows"]] == [True, True, False, False]
    assert results["rows"][2]["error"] == "stopped at the time budget after 20 s"
    assert results["rows"][3]["skipped"] and "time budget" in results["rows"][3]["error"]
    assert written == [2, 2, 4, 4]  # after every case, with a row for each case of a started job


def test_budget_never_starts_a_case_with_too_little_time_left(tmp_path):
    clock = FakeClock()
    jobs = [_job("a", shape="llama-3-8b")]
    built = []
    results = gpu_suite.new_results(jobs)
    runner = FakeRunner(clock, cost=1)
    gpu_suite.run_jobs(jobs, runner, results, deadline=gpu_suite.MIN_CASE_S["cuda"] - 1, device="cuda", clock=clock,
                       build=lambda shape, left: built.append(shape))
    assert results["started"] == [] and results["rows"] == [] and built == [] and runner.timeouts == []
    results = gpu_suite.new_results(jobs)
    gpu_suite.run_jobs(jobs, runner, results, deadline=100, device="cuda", clock=clock,
                       build=lambda shape, left: "exit 1")
    assert [r["error"] for r in results["rows"]] == ["building the shape failed: exit 1"] * 2


def test_prepare_pins_the_installed_versions_and_says_why_a_download_failed(tmp_path, monkeypatch):
    pins = gpu_suite.requirements()
    assert f"trl=={metadata.version('trl')}" in pins and f"bitsandbytes=={metadata.version('bitsandbytes')}" in pins
    assert len(pins) == len(gpu_suite.WHEELS) + len(gpu_suite.PINNED) and "liger-kernel==0.8.5" in pins
    with pytest.raises(gpu_suite.SuiteError, match="not installed"):
        gpu_suite.requirements(["surely-not-a-package-here"])
    command = gpu_suite.download_command(pins, tmp_path)
    assert command[command.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in command
    assert "manylinux2014_x86_64" in command and "manylinux_2_24_x86_64" in command  # bitsandbytes' tag

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 1, stdout="", stderr="ERROR: Could not find a version that satisfies the requirement trl==9"))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "old-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(gpu_suite.SuiteError, match="(?s)pip download failed .exit 1.*PyPI.*trl==9"):
        gpu_suite.download(["trl==9"], tmp_path / "wheels")
    assert (tmp_path / "wheels" / "old-1.0-py3-none-any.whl").exists()  # a failed download keeps the old folder


def test_travel_size_counts_what_the_device_tool_sends(tmp_path):
    repo = tmp_path / "repo"
    (repo / "carry").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("carry/\nbuild/\n")
    (repo / "tracked.py").write_bytes(b"x" * 1000)
    (repo / "new.txt").write_bytes(b"y" * 500)  # untracked, not ignored: travels
    (repo / "build").mkdir()
    (repo / "build" / "big.bin").write_bytes(b"z" * 10_000)  # ignored: stays
    (repo / "carry" / "w.whl").write_bytes(b"w" * 3000)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.py"], check=True)
    sizes = gpu_suite.travel_size(repo, [repo / "carry"])
    assert sizes == {"working tree": 1000 + 500 + len("carry/\nbuild/\n"), "shared/": 0, "carry": 3000}
    assert gpu_suite.check_travel_size(sizes) == sum(sizes.values())
    with pytest.raises(gpu_suite.SuiteError, match=r"over the 0 MiB limit \(carry"):
        gpu_suite.check_travel_size(sizes, limit=4000)


def test_two_versions_of_one_wheel_are_refused_by_name(tmp_path):
    wheels = [tmp_path / "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl",
              tmp_path / "pydantic-2.14.4-py3-none-any.whl", tmp_path / "pydantic-2.13.0-py3-none-any.whl"]
    gpu_suite.check_one_version_each(wheels[:2])
    with pytest.raises(gpu_suite.SuiteError, match="more than one wheel of pydantic: "):
        gpu_suite.check_one_version_each(wheels)


def test_site_makes_petune_importable_from_the_checkout_with_its_entry_points(tmp_path):
    site = tmp_path / "site"
    gpu_suite.make_site(site, None)
    assert (site / "petune_plugins").resolve() == REPO / "petune_plugins"
    assert (site / "benchmarks").resolve() == REPO / "benchmarks"
    (dist,) = metadata.distributions(path=[str(site)])
    assert dist.metadata["Name"] == "petune"
    names = {ep.name: ep.value for ep in dist.entry_points if ep.group == "petune"}
    assert names["lora"] == "petune_plugins.strategies.lora" and names["bench_command"] == "benchmarks.suite"
    gpu_suite.make_site(site, None)  # again over the same folder: links replaced, not nested


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of a package ``name`` whose ``VERSION`` is ``version``."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_site_installs_the_carried_wheels_without_an_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carried_pkg", "1.2")
    site = tmp_path / "site"
    gpu_suite.make_site(site, wheels)
    assert (site / "carried_pkg" / "__init__.py").read_text() == "VERSION = '1.2'\n"
    assert {d.metadata["Name"] for d in metadata.distributions(path=[str(site)])} == {"carried_pkg", "petune"}
    _wheel(wheels, "carried_pkg", "1.3")
    with pytest.raises(gpu_suite.SuiteError, match="more than one wheel of carried-pkg"):
        gpu_suite.make_site(tmp_path / "site2", wheels)


def test_run_without_wheels_on_cuda_stops_before_measuring_and_says_so(tmp_path, capsys):
    code = gpu_suite.run_main(["--out", str(tmp_path / "out"), "--carry", str(tmp_path / "carry"),
                               "--scratch", str(tmp_path / "s")])
    assert code == 2
    assert "run benchmarks/gpu/prepare" in capsys.readouterr().err
    assert "stopped before measuring" in (tmp_path / "out" / "results.md").read_text()


def test_gpu_plan_puts_the_issue_targets_first_and_runs_everything_on_cuda(tmp_path, monkeypatch):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    monkeypatch.setenv("PETUNE_BENCH_DATA", str(data))
    jobs = gpu_suite.gpu_plan("cuda", False, tmp_path / "work")
    names = [j.name for j in jobs]
    assert names[:4] == ["llama-3-8b-qlora", "llama-3-8b-lora", "real-llama-3.2-1b-lora", "llama-3-8b-qlora-batch1-seq4096"]
    assert len(set(names)) == len(names)
    for job in jobs:
        assert all(c.device == "cuda" and c.threads is None for c in job.cases), job.name
        if job.kind == "real-length":
            assert [c.variant for c in job.cases] == ["", "packing", ""] and job.cases[0].data == str(data.resolve())
        else:
            assert [c.side for c in job.cases] == ["petune", "baseline"] and job.cases[0].gradient_checkpointing
    assert {(c.batch, c.seq) for c in jobs[3].cases} == {(1, 4096)}
    assert names[4] == "llama-3-8b-qlora-no-kernels" and jobs[4].cases[0].variant == "no-kernels"
    assert names[5] == "llama-3-8b-q4_k_m-qlora"  # QLoRA on an 8B GGUF file's own blocks (issue 35)
    assert jobs[5].cases[0].strategy_options == jobs[5].cases[1].strategy_options == {"quant_type": "gguf"}
