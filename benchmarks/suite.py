"""``petune bench``: the benchmark suite, a plugin of its own (it registers the command
through petune's ``register_commands`` hook; the core does not import it).

The suite pairs every configuration (shape × strategy) with a plain transformers + peft
loop measured in the same run, each side in a process of its own (see ``worker.py``),
and writes a rich table, ``results.json`` and ``bench.png`` to the output folder. It is
installed with petune (as ``benchmarks``) and also runs from a checkout as
``python -m benchmarks``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from petune import hookimpl
from petune.console import err, human_bytes, human_count, out
from petune.errors import UserError

#: this package's name (``benchmarks``)
PACKAGE = __package__ or "benchmarks"
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # on PYTHONPATH for the worker processes
DEFAULT_OUT = Path("benchmarks") / "out"
CASE_TIMEOUT_S = 1800


def _benchmarks():
    from . import harness, shapes

    return harness, shapes


# -- planning ----------------------------------------------------------------------------------
def _choose(smoke: bool, device: str, shapes: list[str] | None, strategies) -> tuple[str, list[str], list[str]]:
    """The device, shapes and strategies a plan runs, checked against what the suite knows."""
    harness, shape_mod = _benchmarks()
    if device == "auto":
        device = "cuda" if _has_cuda() and not smoke else "cpu"
    if shapes is None:
        shapes = list(shape_mod.SMOKE_SHAPES if smoke else shape_mod.GPU_SHAPES if device == "cuda"
                      else shape_mod.CPU_SHAPES)
    unknown = [s for s in shapes if s not in shape_mod.SHAPES]
    if unknown:
        raise UserError(f"unknown shape(s) {unknown}", hint=f"choose from {', '.join(shape_mod.SHAPES)}")
    strategies = list(strategies)
    bad = [s for s in strategies if s not in harness.STRATEGIES]
    if bad:
        raise UserError(f"unknown strategy(ies) {bad}", hint=f"choose from {', '.join(harness.STRATEGIES)}")
    return device, list(shapes), strategies


def plan(*, smoke: bool = False, device: str = "auto", shapes: list[str] | None = None,
         strategies: list[str] | None = None, steps: int | None = None, warmup: int | None = None,
         threads: int | None = None, batch: int | None = None, seq: int | None = None,
         gradient_checkpointing: bool | None = None, work_dir: Path = DEFAULT_OUT / "work",
         baseline_kbit_prep: bool = False, variant: str = "", strategy_options: dict | None = None) -> list[tuple]:
    """(petune case, baseline case) pairs; ``strategy_options`` change the suite's shared ones
    (e.g. ``quant_type = "gguf"`` for a GGUF shape: the plain loop then takes NF4)."""
    harness, shape_mod = _benchmarks()
    device, shapes, strategies = _choose(smoke, device, shapes, strategies or harness.STRATEGIES)
    if steps is None:
        steps = 2 if smoke else 6
    if warmup is None:
        warmup = 1 if smoke else 2
    if threads is None and device == "cpu":
        threads = 1  # one intra-op thread: shared CPUs give far steadier step times
    pairs = []
    for shape_name in shapes:
        shape = shape_mod.SHAPES[shape_name]
        gc = gradient_checkpointing if gradient_checkpointing is not None else (
            shape.family == "llama")  # the GPU setting; BERT rows show the no-checkpointing path
        for strategy in strategies:
            common = {"shape": shape_name, "strategy": strategy, "batch": batch or shape.batch,
                      "seq": seq or shape.seq, "steps": steps, "warmup": warmup, "gradient_checkpointing": gc,
                      "device": device, "threads": threads, "baseline_kbit_prep": baseline_kbit_prep,
                      "strategy_options": dict(strategy_options or {})}
            pair = tuple(harness.Case(side=side, work_dir=str(Path(work_dir) / f"{shape_name}-{strategy}-{side}"),
                                      variant=variant if side == "petune" else "", **common)
                         for side in ("petune", "baseline"))
            pairs.append(pair)
    return pairs


#: the real instruction set whose token lengths the real-length cases train on
REAL_DATA = Path("alpaca") / "alpaca_data_random1k.json"
CASE_KINDS = ("fixed", "real-length", "quickstart")
#: the petune variants of a real-length group, each against the same baseline
REAL_LENGTH_VARIANTS = ("", "packing")


def find_real_data(path: str | Path | None = None) -> Path:
    """The Alpaca file of the real-length cases: ``path``, else ``$PETUNE_BENCH_DATA``, else
    ``shared/data`` beside or inside the checkout, else the copy ``benchmarks/gpu/prepare``
    puts in the folder that travels to the GPU machine."""
    if path:
        candidates = [Path(path)]
    else:
        env = os.environ.get("PETUNE_BENCH_DATA")
        candidates = [Path(env)] if env else []
        candidates += [PACKAGE_PARENT.parent / "shared" / "data" / REAL_DATA, PACKAGE_PARENT / "shared" / "data" / REAL_DATA,
                       Path(__file__).resolve().parent / "gpu" / "carry" / "data" / REAL_DATA.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"the real-length cases need Alpaca data ({REAL_DATA.name}); looked at "
                    + ", ".join(str(c) for c in candidates),
                    hint="pass --data FILE (a JSON list of {instruction, input, output}) or set PETUNE_BENCH_DATA")


def plan_real_length(*, smoke: bool = False, device: str = "cpu", shapes: list[str] | None = None,
                     strategies: list[str] | None = None, steps: int | None = None, warmup: int | None = None,
                     threads: int | None = None, batch: int | None = None, seq: int | None = None,
                     gradient_checkpointing: bool | None = None, work_dir: Path = DEFAULT_OUT / "work",
                     data: str | Path | None = None) -> list[tuple]:
    """Real-length groups: (petune with its defaults, petune with packing, baseline) on the
    token lengths of a real instruction set, one group per causal-LM shape × strategy (LoRA
    unless ``strategies`` says otherwise)."""
    harness, shape_mod = _benchmarks()
    device, shapes, strategies = _choose(smoke, device, shapes, strategies or ["lora"])
    shapes = [s for s in shapes if shape_mod.SHAPES[s].family == "llama"]  # instruction data: causal LMs only
    data_file = str(find_real_data(data)) if shapes else ""
    if threads is None and device == "cpu":
        threads = 1
    groups = []
    for shape_name in shapes:
        shape = shape_mod.SHAPES[shape_name]
        for strategy in strategies:
            common = {"shape": shape_name, "strategy": strategy, "batch": batch or shape.real_batch,
                      "seq": seq or shape.real_seq, "steps": steps or (2 if smoke else 10),
                      "warmup": warmup if warmup is not None else (1 if smoke else 2),
                      "gradient_checkpointing": True if gradient_checkpointing is None else gradient_checkpointing,
                      "device": device, "threads": threads, "data": data_file}
            cases = [harness.Case(side="petune", variant=v, work_dir=str(
                Path(work_dir) / f"real-{shape_name}-{strategy}-petune{'-' + v if v else ''}"), **common)
                for v in REAL_LENGTH_VARIANTS]
            cases.append(harness.Case(side="baseline", work_dir=str(Path(work_dir) / f"real-{shape_name}-{strategy}-baseline"),
                                      **common))
            groups.append(tuple(cases))
    return groups


#: the Quickstart job (recipes/qlora_sft.toml, which a test keeps this in step with): its model
#: (whose shape holds the recipe's batch_size and max_length) and its [strategy] table
QUICKSTART_SHAPE = "gemma-3-270m"
QUICKSTART_STRATEGY = {"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                       "quant_type": "gguf"}


def plan_quickstart(*, steps: int | None = None, warmup: int | None = None, threads: int | None = None,
                    batch: int | None = None, seq: int | None = None, work_dir: Path = DEFAULT_OUT / "work") -> list[tuple]:
    """One group, the Quickstart's QLoRA shape on CPU, each side with its own defaults: petune
    (compute_dtype auto); petune with the loss from full logits (variant ``plain-loss``: the
    sft task's "auto" loss is TRL's chunked one for Gemma's 262k-token vocabulary); on a CPU
    with native bf16 also petune as "auto" runs where bf16 is emulated (float32, variant
    ``no-cpu-bf16``); and the plain loop as bitsandbytes' documentation writes it (NF4 with
    double quantisation, compute dtype float32: bitsandbytes cannot keep a GGUF file's own
    quantisation, see baseline.load_kwargs). No gradient checkpointing: the recipe leaves
    petune's default (off)."""
    harness, shape_mod = _benchmarks()
    from petune import precision

    shape = shape_mod.SHAPES[QUICKSTART_SHAPE]
    options = {k: v for k, v in QUICKSTART_STRATEGY.items() if k != "name"}
    common = {"shape": shape.name, "strategy": QUICKSTART_STRATEGY["name"], "batch": batch or shape.batch,
              "seq": seq or shape.seq, "steps": steps or 4, "warmup": 1 if warmup is None else warmup,
              "gradient_checkpointing": False, "device": "cpu", "threads": threads or 1,
              "strategy_options": options, "own_defaults": True}
    variants = ["", "plain-loss", *(["no-cpu-bf16"] if precision.cpu_native_bf16() else [])]  # else: float32 already
    cases = [harness.Case(side="petune", variant=v, work_dir=str(Path(work_dir) / f"quickstart-petune{'-' + v if v else ''}"),
                          **common) for v in variants]
    cases.append(harness.Case(side="baseline", work_dir=str(Path(work_dir) / "quickstart-baseline"), **common))
    return [tuple(cases)]


def run_groups(groups, runner, *, progress: bool = True) -> list[dict]:
    """Run every case of every group (alternating whether the baseline goes first); rows in
    plan order."""
    rows = []
    for index, group in enumerate(groups):
        order = list(group) if index % 2 == 0 else [group[-1], *group[:-1]]
        results = {}
        for case in order:
            if progress:
                err.print(f"[dim]bench[/] {escape(case.label)} ...", end=" ")
            result = runner.run(case)
            if progress:
                err.print(f"[red]failed[/]: {escape(result.get('error', '?'))[:200]}" if not result.get("ok")
                          else f"{result['useful_tokens_per_s']:,.0f} useful tok/s" if "useful_tokens_per_s" in result
                          else f"{result['median_step_cpu_s']:.2f} CPU s/step, peak RSS {_fmt_mem(result['peak_bytes'])}")
            results[id(case)] = result
        rows += [results[id(case)] for case in group]
    return rows


def _cuda_capacity() -> int | None:
    """Total memory of GPU 0, asked of nvidia-smi: a CUDA context in this process would take
    memory from the cases for the whole run."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                              check=False, capture_output=True, text=True, timeout=30)
        return int(float(done.stdout.strip().splitlines()[0])) * 2**20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- running, one process per case -------------------------------------------------------------
class CaseRunner:
    """Runs cases in processes of their own: on CPU forked from ``python -m benchmarks.worker
    --serve``, a server that imported torch & co once (see benchmarks/worker.py); on CUDA (and
    where there is no fork) one fresh interpreter per case, since nothing may fork once an
    import (bitsandbytes) can have initialised CUDA."""

    def __init__(self, log_dir: Path, device: str = "cpu"):
        from .worker import start_method

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server = None
        self.lines = None
        self.method = start_method(device)
        if self.method == "fork":
            self._start_server()

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _start_server(self) -> None:
        import queue
        import subprocess
        import threading

        with open(self.log_dir / "server.log", "ab") as log:
            self.server = subprocess.Popen([sys.executable, "-u", "-m", f"{PACKAGE}.worker", "--serve"], cwd=PACKAGE_PARENT,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                           env=self._env())
        self.lines = queue.Queue()

        def read(stream, sink):
            for line in stream:
                sink.put(line)
            sink.put(None)

        threading.Thread(target=read, args=(self.server.stdout, self.lines), daemon=True).start()
        self.ready = False  # waited for at the first case: the caller can work meanwhile

    def _wait_ready(self) -> None:
        if self.ready:
            return
        ready = self._next(600)
        if not ready or not ready.get("ready"):
            self.close()
            raise UserError("the benchmark worker did not start", where=str(self.log_dir / "server.log"))
        self.ready = True

    def _next(self, timeout: float) -> dict | None:
        import queue

        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(line) if line else None

    def run(self, case, timeout: float = CASE_TIMEOUT_S) -> dict:
        """Run one case; never raises for the case's own failures."""
        name = (f"{case.shape}-{case.strategy}-{case.side}{'-' + case.variant if case.variant else ''}"
                f"{'-real' if case.data else ''}-b{case.batch}-s{case.seq}")  # one log per case of a run
        log, result_file = self.log_dir / f"{name}.log", self.log_dir / f"{name}.json"
        log.write_text("")
        result_file.unlink(missing_ok=True)
        start = time.perf_counter()
        status = self._run_forked(case, log, result_file, timeout) if self.server else \
            self._run_spawned(case, log, result_file, timeout)
        if result_file.exists():
            result = json.loads(result_file.read_text())
        else:
            killed = status in (-9, 137)
            reason = "timed out" if status is None else f"exited with code {status}"
            result = {"case": asdict(case), "ok": False, "oom": killed,
                      "error": f"worker {reason}" + (" (killed: out of memory?)" if killed else "")}
        result["wall_s"] = time.perf_counter() - start
        result["log"] = str(log)
        return result

    def _run_forked(self, case, log: Path, result_file: Path, timeout: float):
        self._wait_ready()
        job = {"case": asdict(case), "log": str(log), "result": str(result_file)}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        started = self._next(60)
        if not started or "pid" not in started:
            raise UserError("the benchmark worker stopped", where=str(self.log_dir / "server.log"))
        done = self._next(timeout)
        if done is None:  # too slow: stop the case, the server carries on
            import signal

            if started["pid"] > 0:
                os.kill(started["pid"], signal.SIGKILL)
            self._next(60)
            return None
        return done.get("status")

    def _run_spawned(self, case, log: Path, result_file: Path, timeout: float):
        import subprocess

        try:
            return subprocess.run([sys.executable, "-m", f"{PACKAGE}.worker", "--case", json.dumps(asdict(case)),
                                   "--result", str(result_file), "--log", str(log)], cwd=PACKAGE_PARENT, env=self._env(),
                                  check=False, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.stdin.close()
                self.server.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.server.kill()
            self.server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_pairs(pairs, runner: CaseRunner, *, repeat: int = 1, progress=True, predictions: dict | None = None,
              capacity: int | None = None) -> list[dict]:
    """Run every pair (alternating which side goes first) and return one row per side. A
    case the estimate says cannot fit ``capacity`` (by more than 10%) is skipped, not run."""
    rows = []
    for index, (a, b) in enumerate(pairs):
        runs = {"petune": [], "baseline": []}
        for r in range(repeat):
            order = (a, b) if (index + r) % 2 == 0 else (b, a)
            for case in order:
                predicted = ((predictions or {}).get(id(case)) or {}).get("peak")
                if capacity and predicted and predicted > 1.1 * capacity:
                    runs[case.side].append({"case": asdict(case), "ok": False, "skipped": True,
                                            "error": f"skipped: predicted {human_bytes(predicted)} > "
                                                     f"{human_bytes(capacity)} of the device"})
                    continue
                if progress:
                    err.print(f"[dim]bench[/] {escape(case.label)} ...", end=" ")
                result = runner.run(case)
                if progress:
                    err.print(f"{result['median_step_s'] * 1000:.1f} ms/step" if result.get("ok")
                              else f"[red]failed[/]: {escape(result.get('error', '?'))[:200]}")
                runs[case.side].append(result)
        rows += [_merge_repeats(runs["petune"]), _merge_repeats(runs["baseline"])]
    return rows


def _merge_repeats(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return results[0]
    if len(ok) == 1:
        return ok[0]
    merged = dict(ok[0])
    for key in ("median_step_s", "median_step_cpu_s", "tokens_per_s", "peak_bytes", "tensor_peak"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            merged[key] = statistics.median(values)
    merged["repeats"] = [{k: r.get(k) for k in ("median_step_s", "median_step_cpu_s", "peak_bytes", "tensor_peak")}
                         for r in ok]
    return merged


# -- predicted memory -----------------------------------------------------------------------------
def predict(case) -> dict:
    """petune.memory's prediction for a case, from the shape's config alone (no weights are
    built or read). The baseline computes its loss from full logits, so its prediction
    counts those; the petune side uses what its task does."""
    try:
        from benchmarks import petune_side
        from petune import memory
        from petune.api import ModelInfo
        from petune.recipe import validate

        from .shapes import SHAPES, build_config, model_name

        host = _plugin_host()
        shape = SHAPES[case.shape]
        config = build_config(shape) if shape.source is None else _source_config(model_name(shape, own_defaults=True))
        data = petune_side.recipe_data(case, shape.name, Path(case.work_dir) / "synthetic.jsonl")
        recipe = validate(data, host, check_paths=False)
        task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
        info = ModelInfo(name=shape.name, path=Path(shape.name), config=config)
        dtype, autocast = memory._dtypes(recipe, case.device)
        quant = strategy.load_kwargs(recipe.strategy).get("quantization_config")
        shape = memory.model_shape_of(task, info.config)
        model = memory.build_skeleton(info.config, shape, dtype)
        model = memory.apply_strategy(strategy, model, task, recipe.strategy)
        if case.side == "petune":
            task.prepare_skeleton(model, memory._is_4bit(quant))
        loss = (memory.loss_memory_of(task, recipe.task, case.batch, config, case.device)
                if case.side == "petune" and case.variant != "plain-loss" else "logits")
        est = memory.estimate(model, batch=case.batch, seq=case.seq,
                              gradient_checkpointing=case.gradient_checkpointing, shape=shape,
                              device=case.device, optimizer=case.optimizer, autocast_dtype=autocast, quant=quant,
                              loss_memory=loss, capacity=None)
        return est.as_dict()
    except Exception as exc:  # noqa: BLE001 — a failed estimate is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}


def _plugin_host():
    from petune.plugins import get_host

    return get_host()


def _source_config(name: str):

    from petune.models import resolve_model

    return resolve_model(name, _plugin_host().model_sources()).config


# -- max context --------------------------------------------------------------------------------
def max_context_search(base_case, runner: CaseRunner, *, check_seq: int = 4096, granularity: int = 2048,
                       limit: int = 131072, max_tries: int = 6, capacity: int | None = None,
                       progress: bool = True) -> dict:
    """Longest sequence that trains at batch 1. Each try loads the model afresh (a minute for
    8B), so the estimate picks the first guess: ``check_seq`` (the issue's 4096 check), then
    the longest length the estimate says fits ``capacity``, then ×1.25 while it fits, else
    bisection — at most ``max_tries`` loads."""
    tried = []

    def fits(seq: int) -> bool:
        case = replace(base_case, seq=seq, batch=1, steps=1, warmup=1,
                       work_dir=str(Path(base_case.work_dir).with_name(f"maxctx-{base_case.side}-{seq}")))
        if progress:
            err.print(f"[dim]max-context[/] {escape(case.label)} ...", end=" ")
        result = runner.run(case)
        ok = bool(result.get("ok"))
        tried.append({"seq": seq, "ok": ok, "peak_bytes": result.get("peak_bytes"),
                      "reserved_bytes": result.get("cuda_max_reserved"),
                      "predicted_peak": (predict(case) or {}).get("peak"), "error": None if ok else result.get("error")})
        if progress:
            err.print(human_bytes(result["peak_bytes"]) if ok else "[red]does not fit[/]")
        return ok

    def round_down(n: float) -> int:
        return max(granularity, int(n) // granularity * granularity)

    guess = predicted_max_seq(base_case, capacity, granularity=granularity, limit=limit) if capacity else None
    low, high = (check_seq, None) if fits(check_seq) else (0, check_seq)
    while len(tried) < max_tries:
        if high is None:
            seq = guess if guess and guess > low and len(tried) == 1 else round_down(low * 1.25)
            if seq <= low:
                seq = low + granularity
        else:
            seq = round_down((low + high) / 2)
            if seq <= low or high - low <= granularity:
                break
        if seq > limit:
            break
        if fits(seq):
            low = seq
        else:
            high = seq
    return {"shape": base_case.shape, "strategy": base_case.strategy, "side": base_case.side, "batch": 1,
            "check_seq": check_seq, "check": tried[0], "max_seq": low, "first_failing_seq": high,
            "predicted_max_seq": guess, "granularity": granularity, "tried": tried}


def predicted_max_seq(case, capacity: int, *, granularity: int = 2048, limit: int = 131072) -> int | None:
    """The longest sequence (a multiple of ``granularity``) whose estimated peak fits ``capacity``."""
    def peak(seq: int) -> int | None:
        return (predict(replace(case, seq=seq, batch=1)) or {}).get("peak")

    low, high = 0, limit // granularity
    while low < high:  # largest k with peak(k × granularity) <= capacity
        mid = (low + high + 1) // 2
        p = peak(mid * granularity)
        if p is not None and p <= capacity:
            low = mid
        else:
            high = mid - 1
    return low * granularity or None


# -- reporting ------------------------------------------------------------------------------------
def _fmt_mem(n) -> str:
    return human_bytes(n) if isinstance(n, (int, float)) and n > 0 else "—"


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def pair_rows(rows: list[dict]) -> list[tuple[dict, dict]]:
    return [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]


def _step_key(row: dict) -> str:
    """What the time ratio compares: process CPU time on CPU (other processes on a shared
    machine stretch wall-clock steps at random), wall-clock time on GPU."""
    return "median_step_cpu_s" if row["case"]["device"] == "cpu" and row.get("median_step_cpu_s") else "median_step_s"


def measured_for_estimate(row: dict) -> tuple[int | None, int | None]:
    """(measured, predicted) bytes the estimate is judged on: CUDA max_memory_allocated
    against the full prediction on GPU; on CPU the tensor peak of the probe step against the
    prediction without the CPU process overhead (which is in RSS, not in tensors)."""
    pred = row.get("predicted") or {}
    if not pred.get("peak") or not row.get("ok"):
        return None, None
    if row["case"]["device"] == "cpu":
        if not row.get("tensor_peak"):
            return None, None
        return row["tensor_peak"], pred["details"].get("tensor_peak", pred["peak"] - pred["parts"]["runtime"])
    return row["peak_bytes"], pred["peak"]


def _error(measured, predicted) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%" if measured and predicted else ""


def results_table(rows: list[dict], title: str) -> Table:
    cpu = any(r["case"]["device"] == "cpu" for r in rows)
    caption = ("peak: growth of the process's resident memory (RSS) over the run; tensors: peak of live torch "
               "tensors in one profiled step; pred.: petune.memory's estimate (error); cpu/step: the process's CPU "
               "time per step; ×: petune / baseline (×time compares CPU time per step)") if cpu else (
               "peak: torch.cuda.max_memory_allocated; reserved: max_memory_reserved; pred.: petune.memory's "
               "estimate (error); ×: petune / baseline")
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ["shape / strategy", "side", "b×seq", "peak", "pred.", "tensors" if cpu else "reserved"]
    columns += ["pred."] if cpu else []
    columns += ["step", *(["cpu/step"] if cpu else []), "tok/s", "trainable", "saved", "×time", "×mem"]
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < 2 else "right")
    for p, b in pair_rows(rows):
        for row, other in ((p, b), (b, p)):
            case = row["case"]
            first = row is p
            name = f"{case['shape']} / {case['strategy']}" if first else ""
            side = f"{case['side']}[{case['variant']}]" if case.get("variant") else case["side"]
            if not row.get("ok"):
                table.add_row(name, side, f"{case['batch']}×{case['seq']}",
                              f"[red]failed[/]: {escape(str(row.get('error')))[:100]}", *[""] * (len(columns) - 4))
                continue
            pred = row.get("predicted") or {}
            cells = [name, side, f"{case['batch']}×{case['seq']}", _fmt_mem(row["peak_bytes"])]
            if cpu:
                cells.append(f"{_fmt_mem(pred.get('peak'))} {_error(row['peak_bytes'], pred.get('peak'))}")
                measured, predicted = measured_for_estimate(row)
                cells += [_fmt_mem(row.get("tensor_peak")), f"{_fmt_mem(predicted)} {_error(measured, predicted)}"]
            else:
                cells += [f"{_fmt_mem(pred.get('peak'))} {_error(row['peak_bytes'], pred.get('peak'))}",
                          _fmt_mem(row.get("cuda_max_reserved"))]
            time_ratio = _ratio(row[_step_key(row)], other.get(_step_key(other))) if first and other.get("ok") else None
            mem_ratio = _ratio(row["peak_bytes"], other.get("peak_bytes")) if first and other.get("ok") else None
            cells += [f"{row['median_step_s'] * 1000:.1f} ms"]
            cells += [f"{row['median_step_cpu_s'] * 1000:.1f} ms"] if cpu else []
            cells += [f"{row['tokens_per_s']:,.0f}", human_count(row["trainable_params"]), _fmt_mem(row["artifact_bytes"]),
                      f"{time_ratio:.2f}" if time_ratio else "", f"{mem_ratio:.2f}" if mem_ratio else ""]
            table.add_row(*cells)
    return table


def write_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    """Per shape: peak memory and throughput per strategy, petune vs baseline. On CPU the
    memory bars are the RSS peak with the live-tensor peak inside them (what the estimate's
    marks predict), and throughput is tokens per CPU-second (wall-clock time on a shared
    machine is noise); on GPU, max_memory_allocated and tokens per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["case"]["shape"] for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.8 * len(shapes)), squeeze=False)
    colors = {"petune": "#2a7ab0", "baseline": "#9a9a9a"}
    for i, shape in enumerate(shapes):
        pairs = [(p, b) for p, b in pair_rows(rows) if p["case"]["shape"] == shape]
        cpu = pairs and pairs[0][0]["case"]["device"] == "cpu"
        names = [p["case"]["strategy"] for p, _ in pairs]
        x = list(range(len(names)))
        ax_mem, ax_tps = axes[i]
        for k, side in enumerate(("petune", "baseline")):
            offset = (k - 0.5) * 0.38
            sides = [pair[k] for pair in pairs]
            peak = [r.get("peak_bytes", 0) / 2**20 if r.get("ok") else 0 for r in sides]
            ax_mem.bar([v + offset for v in x], peak, width=0.38, color=colors[side], alpha=0.45 if cpu else 1,
                       label=f"{side} RSS peak" if cpu else side)
            if cpu:
                tensors = [r.get("tensor_peak", 0) / 2**20 if r.get("ok") else 0 for r in sides]
                ax_mem.bar([v + offset for v in x], tensors, width=0.22, color=colors[side],
                           label=f"{side} tensors")
            predicted = []
            for r in sides:
                _, pred = measured_for_estimate(r)
                predicted.append((pred or 0) / 2**20)
            ax_mem.scatter([v + offset for v in x], predicted, marker="_", s=500, color="black", zorder=3,
                           label="predicted" if k == 0 else None)
            if cpu:
                tps = [r["case"]["batch"] * r["case"]["seq"] / r["median_step_cpu_s"] if r.get("ok") else 0
                       for r in sides]
            else:
                tps = [r.get("tokens_per_s", 0) if r.get("ok") else 0 for r in sides]
            ax_tps.bar([v + offset for v in x], tps, width=0.38, color=colors[side], label=side)
        for ax, label in ((ax_mem, "peak memory (MiB)"), (ax_tps, "tokens / CPU-second" if cpu else "tokens / s")):
            ax.set_xticks(x, names)
            ax.set_title(f"{shape}: {label}")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment_line(env: dict) -> str:
    versions = env.get("versions", {})
    return (f"{env.get('device')}, {env.get('date', '')[:10]}; torch {versions.get('torch')}, transformers "
            f"{versions.get('transformers')}, peft {versions.get('peft')}, trl {versions.get('trl')}, bitsandbytes "
            f"{versions.get('bitsandbytes')}")


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (what benchmarks/RESULTS.md holds), with the
    environment line above it."""
    rows = results["rows"]
    env = results["environment"]
    cpu = any(r["case"]["device"] == "cpu" for r in rows)
    head = environment_line(env)
    if cpu:
        cols = ["shape / strategy", "side", "b×seq", "peak RSS (pred.)", "tensors (pred.)", "CPU s/step",
                "tok/CPU-s", "trainable", "saved", "×time", "×mem"]
    else:
        cols = ["shape / strategy", "side", "b×seq", "peak alloc (pred.)", "reserved", "s/step", "tok/s",
                "trainable", "saved", "×time", "×mem"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for p, b in pair_rows(rows):
        for row, other in ((p, b), (b, p)):
            case = row["case"]
            first = row is p
            name = f"{case['shape']} / {case['strategy']}" if first else ""
            side = f"{case['side']}[{case['variant']}]" if case.get("variant") else case["side"]
            if not row.get("ok"):
                lines.append(f"| {name} | {side} | {case['batch']}×{case['seq']} | {row.get('error', 'failed')[:80]} |"
                             + " |" * (len(cols) - 4))
                continue
            pred = row.get("predicted") or {}
            measured, predicted = measured_for_estimate(row)
            time_ratio = _ratio(row[_step_key(row)], other.get(_step_key(other))) if first and other.get("ok") else None
            mem_ratio = _ratio(row["peak_bytes"], other.get("peak_bytes")) if first and other.get("ok") else None
            if cpu:
                cells = [f"{_fmt_mem(row['peak_bytes'])} ({_error(row['peak_bytes'], pred.get('peak'))})",
                         f"{_fmt_mem(row.get('tensor_peak'))} ({_error(measured, predicted)})",
                         f"{row['median_step_cpu_s']:.3f}", f"{case['batch'] * case['seq'] / row['median_step_cpu_s']:,.0f}"]
            else:
                cells = [f"{_fmt_mem(row['peak_bytes'])} ({_error(measured, predicted)})",
                         _fmt_mem(row.get("cuda_max_reserved")), f"{row['median_step_s']:.3f}",
                         f"{row['tokens_per_s']:,.0f}"]
            cells = [name, side, f"{case['batch']}×{case['seq']}", *cells, human_count(row["trainable_params"]),
                     _fmt_mem(row["artifact_bytes"]), f"{time_ratio:.2f}" if time_ratio else "",
                     f"{mem_ratio:.2f}" if mem_ratio else ""]
            lines.append("| " + " | ".join(cells) + " |")
    s = results.get("summary") or summary(rows)
    if s.get("median_step_time_ratio"):
        lines += ["", f"Median petune/baseline: step time ×{s['median_step_time_ratio']:.3f}, peak memory "
                      f"×{s['median_peak_memory_ratio']:.3f}. Estimate error: median "
                      f"{100 * (s['median_abs_estimate_error'] or 0):.0f}%, max {100 * (s['max_abs_estimate_error'] or 0):.0f}%"
                      + (" (tensors)" if cpu else "") + "."]
    mc = results.get("max_context")
    if mc:
        check = mc.get("check") or {}
        lines += ["", (f"Max context, {mc['shape']} {mc['strategy']} (petune), batch 1: **{mc['max_seq']} tokens** "
                       f"(first failing: {mc.get('first_failing_seq')}; estimate said {mc.get('predicted_max_seq')}); "
                       f"at {mc.get('check_seq')} tokens: {_fmt_mem(check.get('peak_bytes'))} peak.")]
    return "\n".join(lines) + "\n"


def real_length_groups(rows: list[dict]) -> list[list[dict]]:
    """Rows of real-length cases, grouped by configuration (shape, strategy, batch, max_length)
    in plan order; the baseline is each group's last row."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        c = row["case"]
        groups.setdefault((c["shape"], c["strategy"], c["batch"], c["seq"]), []).append(row)
    return [sorted(g, key=lambda r: r["case"]["side"] == "baseline") for g in groups.values()]


def _useful_rate(row: dict) -> float | None:
    """What real-length rows compare: useful tokens per CPU-second on CPU (wall-clock time on a
    shared machine is noise), per second on GPU."""
    if not row.get("ok"):
        return None
    return row["useful_tokens_per_cpu_s"] if row["case"]["device"] == "cpu" else row["useful_tokens_per_s"]


def real_length_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Columns and cells of the real-length table (one line per side)."""
    cpu = any(r["case"]["device"] == "cpu" for r in rows)
    cols = ["shape / strategy", "side", "batch × max_len", "useful tok/CPU-s" if cpu else "useful tok/s",
            *(["useful tok/s (wall)"] if cpu else []), "loss-bearing", "padding", "tokens/step", "peak", "×useful"]
    lines = []
    for group in real_length_groups(rows):
        base = group[-1]
        for i, row in enumerate(group):
            case = row["case"]
            name = f"{case['shape']} / {case['strategy']}" if i == 0 else ""
            side = f"{case['side']} ({case.get('variant') or 'defaults'})" if case["side"] == "petune" else "baseline"
            head = [name, side, f"{case['batch']} × ≤{case['seq']}"]
            if not row.get("ok"):
                lines.append(head + [f"failed: {str(row.get('error', '?'))[:80]}"] + [""] * (len(cols) - 4))
                continue
            ratio = _ratio(_useful_rate(row), _useful_rate(base)) if row is not base else None
            lines.append(head + [f"{_useful_rate(row):,.0f}", *([f"{row['useful_tokens_per_s']:,.0f}"] if cpu else []),
                                 f"{100 * row['useful_share']:.0f}%", f"{100 * row['pad_share']:.0f}%",
                                 f"{row['computed_tokens_per_step']:,.0f}", _fmt_mem(row.get("peak_bytes")),
                                 f"{ratio:.2f}" if ratio else ""])
    return cols, lines


def real_length_markdown(rows: list[dict], environment: dict | None = None) -> str:
    cols, lines = real_length_rows(rows)
    out_lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    out_lines += ["| " + " | ".join(cells) + " |" for cells in lines]
    out_lines += ["", ("useful: loss-bearing tokens (answers and their stop token) trained per second; loss-bearing / "
                       "padding: shares of the positions the model computed; tokens/step: positions per step; "
                       "×useful: petune / baseline.")]
    return "\n".join(out_lines) + "\n"


def real_length_table(rows: list[dict], title: str) -> Table:
    cols, lines = real_length_rows(rows)
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption="useful: loss-bearing tokens per second (per CPU-second on CPU); loss-bearing, padding: "
                          "shares of the computed positions; ×useful: petune / baseline")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for cells in lines:
        table.add_row(*(escape(c) for c in cells))
    return table


def cpu_capability_line() -> str:
    """What decides the CPU's dtypes, as torch reports it (beside every CPU figure)."""
    import torch

    from petune import precision

    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)()
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 {bf16}; petune's auto dtype "
            f"on this CPU: {precision.auto('cpu').dtype}")


def quickstart_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Columns and cells of the Quickstart table (one line per side; the baseline last)."""
    cols = ["shape / strategy", "side", "computes in", "b×seq", "step (wall)", "CPU s/step", "peak RSS", "tensors",
            "×CPU time", "×peak RSS"]
    base = rows[-1] if rows and rows[-1].get("ok") else None
    lines = []
    for i, row in enumerate(rows):
        case = row["case"]
        name = f"{case['shape']} / {case['strategy']}" if i == 0 else ""
        side = ("petune (defaults)" if not case.get("variant") else f"petune ({case['variant']})") \
            if case["side"] == "petune" else "baseline (bitsandbytes' docs)"
        head = [name, side]
        if not row.get("ok"):
            lines.append(head + [f"failed: {str(row.get('error', '?'))[:80]}"] + [""] * (len(cols) - 3))
            continue
        computes = f"{row.get('quantised_as') or '4-bit'} → {row.get('compute_dtype')}, weights {row.get('weights_dtype')}"
        if row.get("precision"):
            computes += f", {row['precision']} autocast" if row["precision"] != "fp32" else ", no autocast"
        ratios = ["", ""] if row is base or base is None else [
            f"{row['median_step_cpu_s'] / base['median_step_cpu_s']:.2f}", f"{row['peak_bytes'] / base['peak_bytes']:.2f}"]
        lines.append(head + [computes, f"{case['batch']}×{case['seq']}", f"{row['median_step_s']:.2f} s",
                             f"{row['median_step_cpu_s']:.2f}", _fmt_mem(row["peak_bytes"]),
                             _fmt_mem(row.get("tensor_peak")), *ratios])
    return cols, lines


QUICKSTART_NOTE = ("step: median over the measured steps (one torch thread); CPU s/step: the process's CPU time per "
                   "step; peak RSS: growth of the resident set over the process's RSS before the model loaded "
                   "(load + training); tensors: peak of live tensors in one profiled step; ×: this row / the "
                   "baseline.")


def quickstart_markdown(rows: list[dict]) -> str:
    cols, lines = quickstart_rows(rows)
    out_lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    out_lines += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join([*out_lines, "", QUICKSTART_NOTE]) + "\n"


def quickstart_table(rows: list[dict], title: str) -> Table:
    cols, lines = quickstart_rows(rows)
    table = Table(title=title, title_justify="left", caption=QUICKSTART_NOTE, caption_justify="left")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 3 else "right")
    for cells in lines:
        table.add_row(*(escape(c) for c in cells))
    return table


def environment() -> dict:
    from petune.artifacts import device_description, now, package_versions

    return {"date": now(), "device": device_description(), "versions": package_versions(),
            "cpu_capability": cpu_capability_line(),
            "command": "petune " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("petune") else " ".join(sys.argv)}


def summary(rows: list[dict]) -> dict:
    """Median petune/baseline ratios and the estimate's errors."""
    time_ratios, mem_ratios, errors, rss_errors = [], [], [], []
    for p, b in pair_rows(rows):
        if p.get("ok") and b.get("ok"):
            time_ratios.append(p[_step_key(p)] / b[_step_key(b)])
            mem_ratios.append(p["peak_bytes"] / b["peak_bytes"])
        for r in (p, b):
            measured, predicted = measured_for_estimate(r)
            if measured and predicted:
                errors.append(abs(predicted - measured) / measured)
            if r.get("ok") and r["case"]["device"] == "cpu" and (r.get("predicted") or {}).get("peak"):
                rss_errors.append(abs(r["predicted"]["peak"] - r["peak_bytes"]) / r["peak_bytes"])
    med = lambda xs: statistics.median(xs) if xs else None
    return {"median_step_time_ratio": med(time_ratios), "median_peak_memory_ratio": med(mem_ratios),
            "median_abs_estimate_error": med(errors), "max_abs_estimate_error": max(errors) if errors else None,
            "median_abs_estimate_error_vs_rss": med(rss_errors),
            "pairs": len(pair_rows(rows)), "failed": sum(1 for r in rows if not r.get("ok"))}


def run_suite(*, out_dir: Path = DEFAULT_OUT, smoke: bool = False, device: str = "auto", shapes=None,
              strategies=None, steps=None, warmup=None, threads=None, batch=None, seq=None,
              gradient_checkpointing=None, repeat: int = 1, max_context: bool | None = None,
              baseline_kbit_prep: bool = False, variant: str = "", chart: bool = True, progress: bool = True,
              cases=("fixed",), data=None) -> dict:
    """Plan, run, predict, and write results.json (+ bench.png). Returns the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = [c for c in cases if c not in CASE_KINDS]
    if bad or not cases:
        raise UserError(f"unknown case kind(s) {bad}", hint=f"choose from {', '.join(CASE_KINDS)}")
    pairs = plan(smoke=smoke, device=device, shapes=shapes, strategies=strategies, steps=steps, warmup=warmup,
                 threads=threads, batch=batch, seq=seq, gradient_checkpointing=gradient_checkpointing,
                 work_dir=out_dir / "work", baseline_kbit_prep=baseline_kbit_prep,
                 variant=variant) if "fixed" in cases else []
    groups = plan_real_length(smoke=smoke, device=device, shapes=shapes, strategies=strategies, steps=steps,
                              warmup=warmup, threads=threads, batch=batch, seq=seq,
                              gradient_checkpointing=gradient_checkpointing, work_dir=out_dir / "work",
                              data=data) if "real-length" in cases else []
    quickstart = plan_quickstart(steps=steps, warmup=warmup, threads=threads, batch=batch, seq=seq,
                                 work_dir=out_dir / "work") if "quickstart" in cases else []
    from .shapes import ensure_built

    # random-weight folders, built once, before timing (and the packaged Gemma, converted once)
    ensure_built(dict.fromkeys([a.shape for a, _ in pairs] + [g[0].shape for g in groups + quickstart]))
    first = pairs[0][0] if pairs else (groups + quickstart)[0][0] if groups or quickstart else None
    device_used = first.device if first else "cpu"
    with CaseRunner(out_dir / "logs", device_used) as runner:  # a CPU worker imports torch & co. while we predict
        from .harness import Case

        predictions = {id(case): predict(case) for pair in pairs for case in pair}
        capacity = _cuda_capacity() if device_used == "cuda" else None
        rows = run_pairs(pairs, runner, repeat=repeat, progress=progress, predictions=predictions, capacity=capacity)
        results = {"environment": environment(), "smoke": smoke, "rows": rows}
        if groups:
            results["real_length"] = run_groups(groups, runner, progress=progress)
        if quickstart:
            results["quickstart"] = run_groups(quickstart, runner, progress=progress)
        if max_context is None:
            max_context = (device_used == "cuda" and not smoke and "fixed" in cases
                           and (shapes is None or "llama-3-8b" in shapes))
        if max_context:
            from .harness import Case

            base = Case(shape="llama-3-8b" if device_used == "cuda" else (shapes or ["tiny-llama"])[0],
                        strategy="qlora", side="petune", batch=1, seq=4096, gradient_checkpointing=True,
                        device=device_used, threads=threads, work_dir=str(out_dir / "work" / "maxctx"))
            results["max_context"] = max_context_search(base, runner, capacity=capacity, progress=progress)
    by_case = {json.dumps(asdict(case), sort_keys=True): predictions[id(case)] for pair in pairs for case in pair}
    for row in rows:
        row["predicted"] = by_case.get(json.dumps(row["case"], sort_keys=True)) or predict(Case(**row["case"]))
    results["summary"] = summary(rows)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    if chart and rows:
        results["chart"] = str(write_chart(rows, out_dir / "bench.png",
                                           f"petune vs plain transformers+peft — {results['environment']['device']}"))
    return results


def results_markdown(results: dict) -> str:
    """results.md: the fixed-length table and, when there are real-length rows, theirs."""
    env = results.get("environment") or {}
    parts = [markdown_table(results)] if results.get("rows") else [environment_line(env) + "\n"]
    if results.get("real_length"):
        parts.append("Real lengths (Alpaca examples, loss on the answers):\n\n" + real_length_markdown(results["real_length"]))
    if results.get("quickstart"):
        parts.append(f"{env.get('cpu_capability', '')}\n\n" + quickstart_markdown(results["quickstart"]))
    if not (results.get("rows") or results.get("real_length") or results.get("quickstart")):
        parts.append("No case ran.\n")
    return "\n".join(parts)


def prediction_table(pairs, title: str) -> tuple[Table, list[dict]]:
    """The estimate for every case of a plan, without running anything (``--predict-only``)."""
    table = Table(title=title, title_justify="left", caption="petune.memory's prediction; nothing was run. The petune "
                  "side counts the SFT task's chunked loss, the baseline plain cross-entropy over full logits.",
                  caption_justify="left")
    for col in ("shape / strategy", "b×seq", "petune", "baseline", "weights", "grads+optim", "activations",
                "logits (petune / baseline)"):
        table.add_column(col, justify="left" if col == "shape / strategy" else "right")
    rows = []
    for p, b in pairs:
        pp, pb = predict(p), predict(b)
        rows.append({"case": asdict(p), "petune": pp, "baseline": pb})
        if "error" in pp or "error" in pb:
            table.add_row(f"{p.shape} / {p.strategy}", f"{p.batch}×{p.seq}", pp.get("error", ""), pb.get("error", ""))
            continue
        parts = pp["parts"]
        table.add_row(f"{p.shape} / {p.strategy}", f"{p.batch}×{p.seq}", human_bytes(pp["peak"]), human_bytes(pb["peak"]),
                      human_bytes(parts["weights"]), human_bytes(parts["gradients"] + parts["optimizer"]),
                      human_bytes(parts["activations"]),
                      f"{human_bytes(parts['logits'])} / {human_bytes(pb['parts']['logits'])}")
    return table, rows


def _print_wide(renderable) -> None:
    if out.is_terminal:
        out.print(renderable)
    else:  # a file or CI log: no wrapping at 80 columns
        from rich.console import Console

        Console(width=180, file=sys.stdout, color_system=None).print(renderable)


# -- commands ---------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    if args.predict_only:
        pairs = plan(smoke=args.smoke, device=args.device, shapes=args.shapes, strategies=args.strategies,
                     batch=args.batch, seq=args.seq, gradient_checkpointing=args.gradient_checkpointing,
                     variant=args.variant)
        device = pairs[0][0].device if pairs else "cpu"
        table, rows = prediction_table(pairs, f"Predicted peak memory on {device} (nothing run)")
        _print_wide(table)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "predictions.json").write_text(json.dumps({"environment": environment(), "rows": rows},
                                                                    indent=2, default=str) + "\n")
        return 0
    results = run_suite(out_dir=args.out, smoke=args.smoke, device=args.device, shapes=args.shapes,
                        strategies=args.strategies, steps=args.steps, warmup=args.warmup, threads=args.threads,
                        batch=args.batch, seq=args.seq, gradient_checkpointing=args.gradient_checkpointing,
                        repeat=args.repeat, max_context=args.max_context, baseline_kbit_prep=args.baseline_kbit_prep,
                        variant=args.variant, cases=args.cases, data=args.data)
    env = results["environment"]
    if results["rows"]:
        _print_wide(results_table(results["rows"], f"petune bench — {env['device']}, {env['date']}"))
    if results.get("real_length"):
        _print_wide(real_length_table(results["real_length"], f"petune bench, real lengths — {env['device']}"))
    if results.get("quickstart"):
        _print_wide(quickstart_table(results["quickstart"], f"petune bench, Quickstart QLoRA — {env['device']}, "
                                                            f"{env['cpu_capability']}"))
    s = results["summary"]
    if s["median_step_time_ratio"]:
        out.print(f"median petune/baseline step time ×{s['median_step_time_ratio']:.3f}, "
                  f"peak memory ×{s['median_peak_memory_ratio']:.3f}; estimate error median "
                  f"{100 * (s['median_abs_estimate_error'] or 0):.0f}%, max {100 * (s['max_abs_estimate_error'] or 0):.0f}%")
    if "max_context" in results:
        mc = results["max_context"]
        out.print(f"max context ({mc['shape']} {mc['strategy']}, batch 1): {mc['max_seq']} tokens"
                  + (f" (fails at {mc['first_failing_seq']})" if mc["first_failing_seq"] else ""))
    err.print(f"wrote {escape(str(Path(args.out) / 'results.json'))}"
              + (f" and {escape(results['chart'])}" if results.get("chart") else ""))
    failed = [r for r in results["rows"] + results.get("real_length", []) + results.get("quickstart", [])
              if not r.get("ok")]
    return 1 if failed and args.smoke else 0


@hookimpl
def register_commands(subparsers) -> None:
    add_to(subparsers)


def add_to(sub) -> None:
    """Add ``bench`` to the ``petune`` command's subparsers."""
    from argparse import BooleanOptionalAction

    p = sub.add_parser("bench", help="benchmark every strategy against a plain transformers+peft loop")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 steps: a quick check (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", type=lambda s: s.split(","), help="comma-separated: tiny-llama,tiny-bert,small-llama,"
                                                                 "small-bert,llama-3.2-1b,llama-3-8b,gemma-3-270m")
    p.add_argument("--strategies", type=lambda s: s.split(","), help="comma-separated (default: all five)")
    p.add_argument("--steps", type=int, help="measured steps per case (default 6; smoke 2)")
    p.add_argument("--warmup", type=int, help="steps dropped before measuring (default 2; smoke 1)")
    p.add_argument("--threads", type=int, help="torch threads on CPU (default 1: steadier on shared machines)")
    p.add_argument("--batch", type=int, help="override every shape's batch size")
    p.add_argument("--seq", type=int, help="override every shape's sequence length")
    p.add_argument("--gradient-checkpointing", action=BooleanOptionalAction, default=None,
                   help="default: on for Llama shapes, off for BERT shapes")
    p.add_argument("--repeat", type=int, default=1, help="run each pair N times (median of medians)")
    p.add_argument("--max-context", action=BooleanOptionalAction, default=None,
                   help="search the longest sequence 8B QLoRA trains at batch 1 (default: on with a GPU)")
    p.add_argument("--baseline-kbit-prep", action="store_true",
                   help="baseline QLoRA uses peft's prepare_model_for_kbit_training (fp32 upcasts)")
    p.add_argument("--variant", default="", choices=["", "plain-loss"],
                   help="petune-side experiment: plain-loss = SFT loss from full logits instead of TRL's fused head")
    p.add_argument("--cases", type=lambda s: s.split(","), default=["fixed"],
                   help="comma-separated: fixed (synthetic fixed-length rows, every strategy; the default), "
                        "real-length (Alpaca's token lengths: useful tokens/s, petune's defaults and packing vs "
                        "padded batches; LoRA unless --strategies), quickstart (the Quickstart's QLoRA on the "
                        "packaged Gemma 3 270M, each side with its own defaults: petune's compute_dtype auto "
                        "against bitsandbytes' documented float32)")
    p.add_argument("--data", type=Path, help="Alpaca JSON for the real-length cases (default: shared/data's "
                                             "alpaca_data_random1k.json, or $PETUNE_BENCH_DATA)")
    p.add_argument("--predict-only", action="store_true",
                   help="print the memory estimate of every case and run nothing (e.g. --device cuda without a GPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")
    p.set_defaults(func=cmd_bench)
