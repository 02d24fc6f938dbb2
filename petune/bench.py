"""``petune bench`` (the benchmark suite in ``benchmarks/``) and ``petune estimate`` (the
memory estimate of a recipe, :mod:`petune.memory`).

The suite pairs every configuration (shape × strategy) with a plain transformers + peft
loop measured in the same run, each side in a process of its own (see
``benchmarks/worker.py``), and writes a rich table, ``results.json`` and ``bench.png`` to
the output folder. The measurement code lives in the repository's ``benchmarks/`` folder,
like the bundled recipes: ``petune bench`` runs from a checkout.
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

from petune.console import err, human_bytes, human_count, out
from petune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
DEFAULT_OUT = BENCH_DIR / "out"
CASE_TIMEOUT_S = 1800


def _benchmarks():
    """The ``benchmarks`` package of this checkout."""
    if not (BENCH_DIR / "harness.py").is_file():
        raise UserError(f"the benchmark suite is not here ({BENCH_DIR})",
                        hint="run `petune bench` from a petune source checkout")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import benchmarks.harness
    import benchmarks.shapes

    return benchmarks.harness, benchmarks.shapes


# -- planning ----------------------------------------------------------------------------------
def plan(*, smoke: bool = False, device: str = "auto", shapes: list[str] | None = None,
         strategies: list[str] | None = None, steps: int | None = None, warmup: int | None = None,
         threads: int | None = None, batch: int | None = None, seq: int | None = None,
         gradient_checkpointing: bool | None = None, work_dir: Path = DEFAULT_OUT / "work",
         baseline_kbit_prep: bool = False, variant: str = "") -> list[tuple]:
    """(petune case, baseline case) pairs."""
    harness, shape_mod = _benchmarks()
    if device == "auto":
        device = "cuda" if _has_cuda() and not smoke else "cpu"
    if shapes is None:
        shapes = list(shape_mod.SMOKE_SHAPES if smoke else shape_mod.GPU_SHAPES if device == "cuda"
                      else shape_mod.CPU_SHAPES)
    unknown = [s for s in shapes if s not in shape_mod.SHAPES]
    if unknown:
        raise UserError(f"unknown shape(s) {unknown}", hint=f"choose from {', '.join(shape_mod.SHAPES)}")
    strategies = list(strategies or harness.STRATEGIES)
    bad = [s for s in strategies if s not in harness.STRATEGIES]
    if bad:
        raise UserError(f"unknown strategy(ies) {bad}", hint=f"choose from {', '.join(harness.STRATEGIES)}")
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
            common = dict(shape=shape_name, strategy=strategy, batch=batch or shape.batch, seq=seq or shape.seq,
                          steps=steps, warmup=warmup, gradient_checkpointing=gc, device=device, threads=threads,
                          baseline_kbit_prep=baseline_kbit_prep)
            pair = tuple(harness.Case(side=side, work_dir=str(Path(work_dir) / f"{shape_name}-{strategy}-{side}"),
                                      variant=variant if side == "petune" else "", **common)
                         for side in ("petune", "baseline"))
            pairs.append(pair)
    return pairs


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- running, one process per case -------------------------------------------------------------
class CaseRunner:
    """Runs cases in processes of their own: forked from ``python -m benchmarks.worker
    --serve``, a server that imported torch & co once (see benchmarks/worker.py), or, where
    there is no fork, one fresh interpreter per case."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server = None
        self.lines = None
        if hasattr(os, "fork"):
            self._start_server()

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _start_server(self) -> None:
        import queue
        import subprocess
        import threading

        log = open(self.log_dir / "server.log", "ab")
        self.server = subprocess.Popen([sys.executable, "-u", "-m", "benchmarks.worker", "--serve"], cwd=REPO,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                       env=self._env())
        log.close()
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
        name = f"{case.shape}-{case.strategy}-{case.side}-b{case.batch}-s{case.seq}"
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

            os.kill(started["pid"], signal.SIGKILL)
            self._next(60)
            return None
        return done.get("status")

    def _run_spawned(self, case, log: Path, result_file: Path, timeout: float):
        import subprocess

        try:
            return subprocess.run([sys.executable, "-m", "benchmarks.worker", "--case", json.dumps(asdict(case)),
                                   "--result", str(result_file), "--log", str(log)], cwd=REPO, env=self._env(),
                                  timeout=timeout).returncode
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


def run_pairs(pairs, runner: CaseRunner, *, repeat: int = 1, progress=True) -> list[dict]:
    """Run every pair (alternating which side goes first) and return one row per side."""
    rows = []
    for index, (a, b) in enumerate(pairs):
        runs = {"petune": [], "baseline": []}
        for r in range(repeat):
            order = (a, b) if (index + r) % 2 == 0 else (b, a)
            for case in order:
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
    merged["median_step_s"] = statistics.median(r["median_step_s"] for r in ok)
    merged["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in ok)
    merged["repeats"] = [{"median_step_s": r["median_step_s"], "peak_bytes": r["peak_bytes"]} for r in ok]
    return merged


# -- predicted memory -----------------------------------------------------------------------------
def predict(case) -> dict | None:
    """petune.memory's prediction for a case (the baseline's with plain full-logit loss)."""
    try:
        from benchmarks import petune_side
        from benchmarks.shapes import model_path

        from petune import memory
        from petune.plugins import PluginHost
        from petune.recipe import validate

        host = PluginHost()
        data = petune_side.recipe_data(case, str(model_path(case.shape)), Path(case.work_dir) / "synthetic.jsonl")
        recipe = validate(data, host, check_paths=False)
        task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
        from petune.api import ModelInfo

        info = ModelInfo.from_path(str(model_path(case.shape)), model_path(case.shape))
        dtype, autocast = memory._dtypes(recipe, case.device)
        quant = strategy.load_kwargs(recipe.strategy).get("quantization_config")
        model = memory.build_skeleton(info.config, task.peft_task_type, dtype)
        model = memory.apply_strategy(strategy, model, task, recipe.strategy)
        loss = memory.loss_memory_of(task) if case.side == "petune" else "logits"
        est = memory.estimate(model, batch=case.batch, seq=case.seq,
                              gradient_checkpointing=case.gradient_checkpointing, task_type=task.peft_task_type,
                              device=case.device, optimizer=case.optimizer, autocast_dtype=autocast, quant=quant,
                              loss_memory=loss, capacity=None)
        return est.as_dict()
    except Exception as exc:  # noqa: BLE001 — a failed estimate is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- max context --------------------------------------------------------------------------------
def max_context_search(base_case, runner: CaseRunner, *, start: int = 4096, limit: int = 131072, granularity: int = 1024,
                       progress: bool = True) -> dict:
    """Longest sequence that trains at batch 1 (doubling, then bisecting between the last
    length that fit and the first that ran out of memory)."""
    tried = []

    def fits(seq: int) -> bool:
        case = replace(base_case, seq=seq, batch=1, steps=1, warmup=1,
                       work_dir=str(Path(base_case.work_dir).with_name(f"maxctx-{base_case.side}-{seq}")))
        if progress:
            err.print(f"[dim]max-context[/] {escape(case.label)} ...", end=" ")
        result = runner.run(case)
        ok = bool(result.get("ok"))
        tried.append({"seq": seq, "ok": ok, "peak_bytes": result.get("peak_bytes"),
                      "error": None if ok else result.get("error")})
        if progress:
            err.print(human_bytes(result["peak_bytes"]) if ok else "[red]does not fit[/]")
        return ok

    low, high = 0, None
    seq = start
    while seq <= limit:
        if fits(seq):
            low, seq = seq, seq * 2
        else:
            high = seq
            break
    if high is not None and low:
        while high - low > granularity:
            mid = (low + high) // 2 // granularity * granularity
            if mid in (low, high):
                break
            if fits(mid):
                low = mid
            else:
                high = mid
    return {"shape": base_case.shape, "strategy": base_case.strategy, "side": base_case.side, "batch": 1,
            "max_seq": low, "first_failing_seq": high, "tried": tried}


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
    """Two panels per shape: peak memory and tokens/s per strategy, petune vs baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["case"]["shape"] for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 3.6 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        pairs = [(p, b) for p, b in pair_rows(rows) if p["case"]["shape"] == shape]
        names = [p["case"]["strategy"] for p, _ in pairs]
        x = range(len(names))
        for j, (key, label, scale) in enumerate((("peak_bytes", "peak memory (MiB)", 2**20),
                                                 ("tokens_per_s", "tokens / s", 1))):
            ax = axes[i][j]
            for k, (side, color) in enumerate((("petune", "#2a7ab0"), ("baseline", "#b0b0b0"))):
                values = [(pair[k].get(key) or 0) / scale if pair[k].get("ok") else 0 for pair in pairs]
                ax.bar([v + (k - 0.5) * 0.38 for v in x], values, width=0.38, label=side, color=color)
            if key == "peak_bytes":
                predicted = [(p.get("predicted") or {}).get("peak", 0) / scale for p, _ in pairs]
                ax.scatter([v - 0.19 for v in x], predicted, marker="_", s=400, color="black", zorder=3,
                           label="petune predicted")
            ax.set_xticks(list(x), names)
            ax.set_title(f"{shape}: {label}")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment() -> dict:
    from petune.artifacts import device_description, now, package_versions

    return {"date": now(), "device": device_description(), "versions": package_versions(),
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
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"median_step_time_ratio": med(time_ratios), "median_peak_memory_ratio": med(mem_ratios),
            "median_abs_estimate_error": med(errors), "max_abs_estimate_error": max(errors) if errors else None,
            "median_abs_estimate_error_vs_rss": med(rss_errors),
            "pairs": len(pair_rows(rows)), "failed": sum(1 for r in rows if not r.get("ok"))}


def run_suite(*, out_dir: Path = DEFAULT_OUT, smoke: bool = False, device: str = "auto", shapes=None,
              strategies=None, steps=None, warmup=None, threads=None, batch=None, seq=None,
              gradient_checkpointing=None, repeat: int = 1, max_context: bool | None = None,
              baseline_kbit_prep: bool = False, variant: str = "", chart: bool = True, progress: bool = True) -> dict:
    """Plan, run, predict, and write results.json (+ bench.png). Returns the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = plan(smoke=smoke, device=device, shapes=shapes, strategies=strategies, steps=steps, warmup=warmup,
                 threads=threads, batch=batch, seq=seq, gradient_checkpointing=gradient_checkpointing,
                 work_dir=out_dir / "work", baseline_kbit_prep=baseline_kbit_prep, variant=variant)
    from benchmarks.shapes import ensure_built

    ensure_built(dict.fromkeys(a.shape for a, _ in pairs))  # random-weight folders, built once, before timing
    with CaseRunner(out_dir / "logs") as runner:  # the worker imports torch & co. while we predict
        from benchmarks.harness import Case

        predictions = {id(case): predict(case) for pair in pairs for case in pair}
        rows = run_pairs(pairs, runner, repeat=repeat, progress=progress)
        results = {"environment": environment(), "smoke": smoke, "rows": rows}
        device_used = pairs[0][0].device if pairs else "cpu"
        if max_context is None:
            max_context = device_used == "cuda" and not smoke and (shapes is None or "llama-3-8b" in shapes)
        if max_context:
            from benchmarks.harness import Case

            base = Case(shape="llama-3-8b" if device_used == "cuda" else (shapes or ["tiny-llama"])[0],
                        strategy="qlora", side="petune", batch=1, seq=4096, gradient_checkpointing=True,
                        device=device_used, threads=threads, work_dir=str(out_dir / "work" / "maxctx"))
            results["max_context"] = max_context_search(base, runner, progress=progress)
    by_case = {json.dumps(asdict(case), sort_keys=True): predictions[id(case)] for pair in pairs for case in pair}
    for row in rows:
        row["predicted"] = by_case.get(json.dumps(row["case"], sort_keys=True)) or predict(Case(**row["case"]))
    results["summary"] = summary(rows)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if chart:
        results["chart"] = str(write_chart(rows, out_dir / "bench.png",
                                           f"petune vs plain transformers+peft — {results['environment']['device']}"))
    return results


# -- commands ---------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    results = run_suite(out_dir=args.out, smoke=args.smoke, device=args.device, shapes=args.shapes,
                        strategies=args.strategies, steps=args.steps, warmup=args.warmup, threads=args.threads,
                        batch=args.batch, seq=args.seq, gradient_checkpointing=args.gradient_checkpointing,
                        repeat=args.repeat, max_context=args.max_context, baseline_kbit_prep=args.baseline_kbit_prep,
                        variant=args.variant)
    env = results["environment"]
    table = results_table(results["rows"], f"petune bench — {env['device']}, {env['date']}")
    if out.is_terminal:
        out.print(table)
    else:  # a file or CI log: no wrapping at 80 columns
        from rich.console import Console

        Console(width=180, file=sys.stdout, color_system=None).print(table)
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
    failed = [r for r in results["rows"] if not r.get("ok")]
    return 1 if failed and args.smoke else 0


def cmd_estimate(args) -> int:
    from petune import memory
    from petune.cli import _host
    from petune.recipe import load_recipe

    host = _host()
    recipe = load_recipe(args.recipe, host, args.set or [])
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    with host.blame("strategy", strategy.name, "check"):
        strategy.check(task, None, recipe.strategy)
    device = None if args.device == "auto" else args.device
    with err.status("estimating (no weights load) ..."):
        est = memory.estimate_recipe(recipe, host, device=device)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        out.print(memory.estimate_table(est, f"Peak training memory — {args.recipe} "
                                             f"({recipe.strategy_name}, batch {est.batch} × {est.seq})"))
    if est.warning:
        err.print(f"[yellow]warning[/]: {escape(est.warning)}")
    return 0


def add_to(sub) -> None:
    """Add ``bench`` and ``estimate`` to the ``petune`` command's subparsers."""
    from argparse import BooleanOptionalAction

    p = sub.add_parser("bench", help="benchmark every strategy against a plain transformers+peft loop")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 steps: a quick check (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", type=lambda s: s.split(","), help="comma-separated: tiny-llama,tiny-bert,small-llama,"
                                                                 "small-bert,llama-3.2-1b,llama-3-8b")
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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("estimate", help="predict a recipe's peak training memory (nothing loads)")
    p.add_argument("recipe", type=Path, help="recipe .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to predict for (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_estimate)
