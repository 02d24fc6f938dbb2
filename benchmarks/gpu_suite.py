"""The GPU suite: what issue 22 measures, in one call of at most 10 minutes on a GPU machine
that has torch, transformers and accelerate but not the rest of petune's needs, and cannot
download anything.

``benchmarks/gpu/prepare`` (on the CPU machine, with the project's venv) downloads the
cp312 manylinux wheels that machine lacks, at the versions installed here, with a copy of
the Alpaca file of the real-length cases, into ``benchmarks/gpu/carry/`` (git-ignored), and
checks that the tree that travels stays under the 64 MiB limit.

``benchmarks/gpu/run`` (on the GPU machine) installs those wheels into a temporary target,
makes petune importable from the checkout (links and an entry-point record in that target,
nothing installed), builds the random-weight shapes and runs the cases in order of
importance until its time budget (540 s by default, counted from its start) is spent:
the case running then is stopped, and the cases after it are listed as not run. After
every case it rewrites ``results.json`` and ``results.md`` in ``--out`` (default ``$OUT``),
so a call cut short still brings back what was measured; at the end it adds ``bench.png``
and ``logs.tar.gz`` (each case's output). ``--dry-run`` runs the same path on the CPU with
the tiny shapes (``make test`` does).

Only the standard library is imported at the top: ``run`` imports this module before the
wheels it installs are there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "benchmarks" / "gpu" / "carry"
#: the device tool's limit on the working tree that travels (tracked and untracked files not
#: ignored, shared/, carried folders)
TRAVEL_LIMIT = 64 * 2**20
#: what the GPU machine's image lacks (it has torch, transformers, accelerate, safetensors,
#: tokenizers, numpy, pyarrow, pandas, pluggy, rich, ...); peft too, for the version petune
#: pins. typing-extensions: pydantic needs a recent one.
WHEELS = ("trl", "bitsandbytes", "peft", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "typing-extensions", "zstandard", "tomli-w", "gguf")
#: wheels carried at a fixed version because they cannot be installed here: Liger's fused
#: kernels (``train.kernels``) are Triton GPU code (0.9 MiB, pure Python; the GPU machine's
#: torch brings Triton)
PINNED = {"liger-kernel": "0.8.5"}
#: pip matches manylinux tags exactly: every tag a cp312 x86-64 wheel here may carry
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
DEFAULT_BUDGET_S = 540
#: kept back from the budget to write the results, the chart and the logs
RESERVE_S = 20
#: a case is not started with less time than this left (a load alone takes longer)
MIN_CASE_S = {"cuda": 45, "cpu": 5}


class SuiteError(Exception):
    """A problem for the person running the script: printed as one message, exit 2."""


# -- prepare (CPU machine) --------------------------------------------------------------------
def requirements(names=WHEELS, pinned=PINNED) -> list[str]:
    """``name==version`` for each wheel to carry, at the version installed in this interpreter
    (what the tests here ran against), then the ``pinned`` ones."""
    from importlib import metadata

    pins, missing = [], []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SuiteError(f"{', '.join(missing)} not installed in {sys.executable}: the wheels are taken at the "
                         "versions installed here; run this with the project's venv: .venv/bin/python "
                         "benchmarks/gpu/prepare")
    return pins + [f"{name}=={version}" for name, version in pinned.items()]


def download_command(pins: list[str], dest: Path, python_version: str = "3.12") -> list[str]:
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", *platforms, "--dest", str(dest), *pins]


def download(pins: list[str], wheels: Path, python_version: str = "3.12") -> list[Path]:
    """The wheels of ``pins`` in ``wheels`` (replacing what was there: one version of each)."""
    fresh = Path(tempfile.mkdtemp(prefix="petune-wheels-"))
    try:
        done = subprocess.run(download_command(pins, fresh, python_version), capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
            raise SuiteError(f"pip download failed (exit {done.returncode}); it needs PyPI, which this machine "
                             f"must reach:\n{tail}")
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        for wheel in fresh.glob("*.whl"):
            shutil.move(str(wheel), wheels / wheel.name)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return sorted(wheels.glob("*.whl"))


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def travel_size(repo: Path, carried: list[Path]) -> dict[str, int]:
    """Bytes of what the device tool sends: the working tree as git sees it (tracked files and
    untracked ones that are not ignored), ``shared/`` in the checkout, and the carried folders."""
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SuiteError(f"cannot list the working tree of {repo} with git: {exc}") from None
    tree = 0
    for name in filter(None, listed):
        path = repo / name
        if path.is_file() and not path.is_symlink():
            tree += path.stat().st_size
    shared = repo / "shared"
    sizes = {"working tree": tree, "shared/": _tree_bytes(shared) if shared.is_dir() else 0}
    for folder in carried:
        sizes[str(folder.relative_to(repo)) if folder.is_relative_to(repo) else str(folder)] = (
            _tree_bytes(folder) if folder.exists() else 0)
    return sizes


def check_travel_size(sizes: dict[str, int], limit: int = TRAVEL_LIMIT) -> int:
    total = sum(sizes.values())
    if total > limit:
        parts = ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        raise SuiteError(f"what travels to the GPU machine is {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB "
                         f"limit ({parts})", ) from None
    return total


def prepare_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/prepare", description=(
        "Download the wheels the GPU machine lacks (cp312 manylinux, the versions installed here) and the "
        "real-length data into a git-ignored folder that travels with `run`, and check the 64 MiB limit."))
    parser.add_argument("--dest", type=Path, default=CARRY, help="the folder to carry (default benchmarks/gpu/carry)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--no-download", action="store_true", help="keep the wheels there are; only copy the data "
                                                                    "and check the size")
    args = parser.parse_args(argv)
    try:
        dest = args.dest.resolve()
        wheels = dest / "wheels"
        if not args.no_download:
            pins = requirements()
            print(f"downloading {len(pins)} wheels for Python {args.python_version}: {' '.join(pins)}", flush=True)
            download(pins, wheels, args.python_version)
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        check_one_version_each(found)
        data = _real_data_source()
        (dest / "data").mkdir(parents=True, exist_ok=True)
        if data.resolve() != (dest / "data" / data.name).resolve():
            shutil.copy2(data, dest / "data" / data.name)
        sizes = travel_size(REPO, [dest])
        total = check_travel_size(sizes)
        (dest / "manifest.json").write_text(json.dumps({
            "python": args.python_version, "wheels": {w.name: w.stat().st_size for w in found},
            "data": f"data/{data.name}", "travel_bytes": sizes}, indent=2) + "\n")
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in found:
        print(f"  {w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    print(f"travels: {total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB ("
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()) + ")")
    carry = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
    print(f"on the GPU machine: command 'python3 benchmarks/gpu/run', carry ['{carry}'], timeout_s 600")
    return 0


def _real_data_source() -> Path:
    """The Alpaca file of the real-length cases, found as ``petune bench`` finds it."""
    for candidate in (os.environ.get("PETUNE_BENCH_DATA"), REPO.parent / "shared" / "data" / "alpaca" /
                      "alpaca_data_random1k.json", REPO / "shared" / "data" / "alpaca" / "alpaca_data_random1k.json",
                      CARRY / "data" / "alpaca_data_random1k.json"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SuiteError("the real-length cases need ../shared/data/alpaca/alpaca_data_random1k.json (or "
                     "$PETUNE_BENCH_DATA); it is not there")


def _project_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def check_one_version_each(wheels: list[Path]) -> None:
    """Two versions of one project stop pip's whole install: refuse them here, by name."""
    seen: dict[str, list[str]] = {}
    for wheel in wheels:
        seen.setdefault(_project_name(wheel), []).append(wheel.name)
    twice = {name: files for name, files in seen.items() if len(files) > 1}
    if twice:
        raise SuiteError("more than one wheel of " + "; ".join(f"{n}: {', '.join(f)}" for n, f in twice.items())
                         + " — run benchmarks/gpu/prepare again (it replaces the folder)")


# -- run (GPU machine) ---------------------------------------------------------------------------
def make_site(site: Path, wheels: Path | None) -> None:
    """A folder for PYTHONPATH: the carried wheels installed into it, and petune from the
    checkout (links to its packages and an entry-point record from pyproject.toml, so the
    plugins load as they do from an install)."""
    import tomllib

    site.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("*.whl")) if wheels and wheels.is_dir() else []
    if found:
        check_one_version_each(found)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--find-links",
                               str(wheels), "--target", str(site), *map(str, found)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SuiteError("installing the carried wheels failed:\n" + (done.stdout + done.stderr)[-3000:])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        link = site / package
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(REPO / folder, target_is_directory=True)
    meta = project["project"]
    dist = site / f"{meta['name']}-{meta['version']}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = {"console_scripts": meta.get("scripts", {}), **meta.get("entry-points", {})}
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items()) + "\n"
        for group, eps in groups.items()))
    (dist / "INSTALLER").write_text("benchmarks/gpu/run\n")


def run_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/run", description=(
        "On the GPU machine: install the carried wheels, run the GPU suite within a time budget, and write "
        "results.md, results.json, bench.png and logs.tar.gz to --out."))
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else benchmarks/gpu/out)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for everything, the install included (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="the same path on the CPU with the tiny shapes "
                                                               "(what make test runs)")
    parser.add_argument("--carry", type=Path, default=CARRY, help="what benchmarks/gpu/prepare made")
    parser.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated job names (see the plan printed at the start)")
    args = parser.parse_args(argv)
    start = time.time()
    deadline = start + args.budget
    device = "cpu" if args.dry_run else args.device
    out = (args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "gpu" / "out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="petune-gpu-"))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    wheels = args.carry / "wheels"
    try:
        if device == "cuda" and not any(wheels.glob("*.whl")):
            raise SuiteError(f"no wheels in {wheels}: run benchmarks/gpu/prepare on the CPU machine first, and "
                             f"carry {args.carry.relative_to(REPO) if args.carry.is_relative_to(REPO) else args.carry}")
        site = scratch / "site"
        # the dry run keeps this interpreter's packages: the wheels are cp312 builds for the GPU machine
        make_site(site, None if args.dry_run else wheels)
    except SuiteError as exc:
        (out / "results.md").write_text(f"benchmarks/gpu/run stopped before measuring: {exc}\n")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(REPO), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    data = args.carry / "data" / "alpaca_data_random1k.json"
    if data.is_file() and "PETUNE_BENCH_DATA" not in env:
        env["PETUNE_BENCH_DATA"] = str(data.resolve())
    print(f"installed into {site} in {time.time() - start:.0f} s; measuring until {args.budget:.0f} s", flush=True)
    command = [sys.executable, "-m", "benchmarks.gpu_suite", "--deadline", str(deadline), "--out", str(out),
               "--scratch", str(scratch), "--device", device, *(["--dry-run"] if args.dry_run else []),
               *(["--only", args.only] if args.only else [])]
    inner = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        code = inner.wait(timeout=max(1.0, deadline - time.time()) + RESERVE_S)
    except subprocess.TimeoutExpired:  # past the budget and its reserve: stop it, keep what it wrote
        os.killpg(inner.pid, signal.SIGTERM)
        try:
            code = inner.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(inner.pid, signal.SIGKILL)
            code = inner.wait()
    if not (out / "results.md").exists():
        (out / "results.md").write_text(f"the GPU suite stopped (exit {code}) before any case finished; see "
                                        "logs.tar.gz\n")
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done in {time.time() - start:.0f} s; results in {out}", flush=True)
    return code


# -- the plan and its loop (run inside, with petune importable) ----------------------------------
@dataclass
class Job:
    name: str
    kind: str  # "fixed" (a petune/baseline pair) | "real-length" (petune, petune[packing], baseline)
    cases: tuple


def gpu_plan(device: str, dry_run: bool, work: Path) -> list[Job]:
    """The cases in order of importance: the issue's 8B targets first, then the real-length
    case, then the rest of the strategies."""
    from . import suite

    def fixed(shape, strategy, **kw):
        pairs = suite.plan(device=device, shapes=[shape], strategies=[strategy], work_dir=work, **kw)
        extra = "".join(f"-{k}{v}" for k, v in kw.items() if k in ("batch", "seq"))
        extra += f"-{kw['variant']}" if kw.get("variant") else ""
        return Job(f"{shape}-{strategy}{extra}", "fixed", pairs[0])

    def real(shape, strategy, **kw):
        group = suite.plan_real_length(device=device, shapes=[shape], strategies=[strategy], work_dir=work, **kw)[0]
        return Job(f"real-{shape}-{strategy}", "real-length", group)

    gguf = {"strategy_options": {"quant_type": "gguf"}}  # QLoRA on a GGUF file's own blocks (issue 35)
    if dry_run:
        return [fixed("tiny-llama", "lora", steps=1, warmup=1), real("tiny-llama", "lora", steps=2, warmup=1),
                fixed("tiny-llama-q4_k_m", "qlora", steps=1, warmup=1, **gguf)]
    steps = {"steps": 5, "warmup": 2}
    return [
        fixed("llama-3-8b", "qlora", **steps),
        fixed("llama-3-8b", "lora", **steps),
        real("llama-3.2-1b", "lora", steps=8, warmup=2),
        fixed("llama-3-8b", "qlora", batch=1, seq=4096, steps=3, warmup=1),
        fixed("llama-3-8b", "qlora", variant="no-kernels", **steps),  # the first job without the fused kernels
        fixed("llama-3-8b-q4_k_m", "qlora", **steps, **gguf),  # an 8B Q4_K_M file kept as its blocks
        *(fixed("llama-3.2-1b", s, **steps) for s in ("qlora", "lora", "full", "adapters", "prompt_tuning")),
        real("llama-3-8b", "qlora", steps=6, warmup=2),
        *(fixed("llama-3-8b", s, **steps) for s in ("adapters", "prompt_tuning")),
    ]


def new_results(jobs: list[Job]) -> dict:
    return {"rows": [], "real_length": [], "planned": [j.name for j in jobs], "started": []}


def run_jobs(jobs: list[Job], runner, results: dict, *, deadline: float, device: str, build=None, predict=None,
             write=None, clock=time.time) -> dict:
    """Run the jobs in order until ``deadline``, filling ``results`` as it goes (so that an
    interrupted run still has every case it measured): a case is started only with
    ``MIN_CASE_S`` left and runs at most until the deadline; a started job has a row for each
    of its cases (those not run say why); ``write`` gets the results after every case."""
    from dataclasses import asdict

    built: dict[str, str | None] = {}
    for job in jobs:
        if deadline - clock() < MIN_CASE_S[device]:
            break
        results["started"].append(job.name)
        rows = results["rows"] if job.kind == "fixed" else results["real_length"]
        first = len(rows)
        rows += [{"case": asdict(case), "ok": False, "skipped": True, "error": "not run: stopped before it"}
                 for case in job.cases]
        shape = job.cases[0].shape
        if build is not None and shape not in built:
            built[shape] = build(shape, deadline - clock())
        for i, case in enumerate(job.cases):
            left = deadline - clock()
            if built.get(shape):
                row = {"case": asdict(case), "ok": False, "error": f"building the shape failed: {built[shape]}"}
            elif left < MIN_CASE_S[device]:
                row = {"case": asdict(case), "ok": False, "skipped": True,
                       "error": "not run: the time budget was spent"}
            else:
                began = clock()
                row = runner.run(case, timeout=left)
                if not row.get("ok") and row.get("error") == "worker timed out":
                    row["error"] = f"stopped at the time budget after {clock() - began:.0f} s"
                if row.get("ok") and predict is not None and job.kind == "fixed":
                    row["predicted"] = predict(case)
            rows[first + i] = row
            if write is not None:
                write(results)
    return results


def _build_shape(name: str, timeout: float, log: Path) -> str | None:
    """Build a shape's random-weight folder in a process of its own (a GPU shape initialises
    on the GPU, which this process should not hold on to); the error, or None."""
    from .shapes import SHAPES, model_path

    source = SHAPES[name].source
    if source is not None and not source.startswith("gguf-of:"):  # petune's own small models: built here
        model_path(name)
        return None
    with open(log, "ab") as f:
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.shapes", name], cwd=REPO, stdout=f, stderr=f,
                                  timeout=max(1.0, timeout), check=False)
        except subprocess.TimeoutExpired:
            return "stopped at the time budget"
    return None if done.returncode == 0 else f"exit {done.returncode} (see logs.tar.gz: build.log)"


def _write(out: Path, results: dict, environment: dict, final: bool, logs: Path | None = None) -> None:
    from . import suite

    full = {"environment": environment, "smoke": False, **results,
            "not_run": [name for name in results["planned"] if name not in results["started"]]}
    full["summary"] = suite.summary(results["rows"])
    text = suite.results_markdown(full)
    if full["not_run"]:
        text += f"\nNot run (time budget): {', '.join(full['not_run'])}.\n"
    for name, content in (("results.json", json.dumps(full, indent=2, default=str) + "\n"), ("results.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out / name)
    if final:
        if any(r.get("ok") for r in results["rows"]):
            suite.write_chart(results["rows"], out / "bench.png",
                              f"petune vs plain transformers+peft — {environment.get('device')}")
        if logs is not None and logs.is_dir():
            with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
                for path in sorted(logs.rglob("*")):
                    if path.is_file() and path.stat().st_size < 4 * 2**20:
                        tar.add(path, arcname=str(path.relative_to(logs)))


def inner_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite")
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only")
    args = parser.parse_args(argv)

    def stop(signum, frame):  # the outer script's last word: write what there is, then go
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    from . import suite

    deadline = args.deadline - RESERVE_S
    logs = args.scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    from petune.errors import UserError

    try:
        jobs = gpu_plan(args.device, args.dry_run, args.scratch / "work")
    except UserError as exc:  # e.g. no Alpaca file: say so where the results are read
        (args.out / "results.md").write_text(f"benchmarks/gpu/run could not plan the cases: {exc}\n")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {j.name for j in jobs}]
        if unknown:
            print(f"error: unknown job(s) {unknown}; the plan: {', '.join(j.name for j in jobs)}", file=sys.stderr)
            return 2
        jobs = [j for j in jobs if j.name in wanted]
    print("plan: " + ", ".join(j.name for j in jobs), flush=True)
    environment = suite.environment()
    environment["command"] = "benchmarks/gpu/run" + (" --dry-run" if args.dry_run else "")
    results = new_results(jobs)
    with suite.CaseRunner(logs, args.device) as runner:
        try:
            run_jobs(jobs, runner, results, deadline=deadline, device=args.device,
                               build=lambda shape, left: _build_shape(shape, left, logs / "build.log"),
                               predict=suite.predict,
                               write=lambda r: _write(args.out, r, environment, final=False))
        except KeyboardInterrupt:
            print("stopped: writing what was measured", file=sys.stderr, flush=True)
    _write(args.out, results, environment, final=True, logs=logs)
    failed = [r for r in results["rows"] + results["real_length"] if not r.get("ok") and not r.get("skipped")]
    not_run = [name for name in results["planned"] if name not in results["started"]]
    print(f"{len(results['rows']) + len(results['real_length'])} cases, {len(failed)} failed, "
          f"not run: {', '.join(not_run) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(inner_main(sys.argv[1:]))
