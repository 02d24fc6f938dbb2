"""Data preparation at scale (issue 27): time and peak memory of ``petune run --dry-run``'s data
step on a generated Alpaca-like instruction file, as JSONL, Parquet and .jsonl.gz; each format
with the data cache off (the path without a cache), on a first run (cache miss: prepared and
stored) and on a second run (cache hit).

    python -m benchmarks.data_prep --rows 1000000 --formats jsonl --num-proc 2 --cases first,second
    python -m benchmarks.data_prep --rows 200000 --num-proc 2   # every format, cache off / first / second
    python -m benchmarks.data_prep --rows 20000 --formats jsonl   # a quick look

Rows: ``instruction`` / ``input`` (empty in 60% of rows, as in Alpaca) / ``output``, each of a
word count drawn from the real Alpaca subset's own counts (``../shared/data/alpaca``; a fixed
spread without it), words drawn from that file's vocabulary; seeded, so every run writes the
same file. The recipe: the ``sft`` task on the packaged Gemma 3 270M tokenizer (``--model``),
``format = "alpaca"``, the built-in ``alpaca`` chat template, ``max_length`` 512.

Each measurement is a fresh process that runs ``petune run RECIPE --dry-run`` in-process and
stops once the data is prepared (the model is not loaded: its weights would dwarf the data's
memory). It reports the seconds spent preparing (``petune.datacache.prepare``: reading,
tokenizing, storing or loading the cache), the process's peak RSS when preparation ends, its
RSS before preparation began (the imported libraries) and the largest tokenizing worker's peak
(``--num-proc`` above 1).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_data_subset2000_longoutputs.json"
ALPACA_RANDOM = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_data_random1k.json"
FORMATS = ("jsonl", "parquet", "jsonl.gz")

RECIPE = """\
[model]
name = "{model}"

[task]
name = "sft"
train = "{train}"
format = "alpaca"
chat_template = "alpaca"
max_length = 512

[strategy]
name = "lora"

{data}[output]
dir = "{out}"
"""


# -- the data -------------------------------------------------------------------------------------
def _shape_source() -> tuple[list[str], list[tuple[int, int, int]]]:
    """Vocabulary and (instruction, input, output) word counts of the real Alpaca rows."""
    records = []
    for path in (ALPACA_RANDOM, ALPACA):  # random1k: Alpaca's own length mix; the other: long outputs
        if path.is_file():
            records += json.loads(path.read_text(encoding="utf-8"))
    if not records:
        words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
        return words, [(12, 0, 40), (10, 8, 60), (15, 0, 120), (8, 20, 30), (20, 0, 200)]
    vocabulary = sorted({w for r in records for key in ("instruction", "input", "output") for w in r[key].split()})
    counts = [(len(r["instruction"].split()), len(r["input"].split()), len(r["output"].split())) for r in records]
    return vocabulary, counts


def generate(rows: int, folder: Path, formats=FORMATS) -> dict[str, Path]:
    """Write the rows as JSONL (always), and as Parquet and .jsonl.gz when asked; streamed, in
    batches, so writing needs little memory."""
    vocabulary, counts = _shape_source()
    rng = random.Random(27)
    paths = {"jsonl": folder / "alpaca_like.jsonl"}

    def text(n: int) -> str:
        return " ".join(rng.choices(vocabulary, k=n))

    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for _ in range(rows):
            instruction, given, output = rng.choice(counts)
            f.write(json.dumps({"instruction": text(max(instruction, 1)), "input": text(given),
                                "output": text(max(output, 1))}, ensure_ascii=False) + "\n")
    if "parquet" in formats:
        import pyarrow.json as pj
        import pyarrow.parquet as pq

        paths["parquet"] = folder / "alpaca_like.parquet"
        reader = pj.open_json(paths["jsonl"], read_options=pj.ReadOptions(block_size=16 << 20))
        with pq.ParquetWriter(paths["parquet"], reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    if "jsonl.gz" in formats:
        paths["jsonl.gz"] = folder / "alpaca_like.jsonl.gz"
        with open(paths["jsonl"], "rb") as src, gzip.open(paths["jsonl.gz"], "wb", compresslevel=6) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
    return {k: v for k, v in paths.items() if k in formats}


# -- one measurement (in its own process) ----------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(recipe: Path) -> dict:
    """Run ``petune run RECIPE --dry-run`` here and stop when the data is prepared: timed around
    ``petune.datacache.prepare``, or around the task's ``load_data`` (with the tokenizer's
    loading) for a petune from before the cache (``--before``)."""
    from petune.cli import main

    seen = {}

    def timed(original, note):
        def run(*args, **kwargs):
            seen["rss_before"] = _rss()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            data = getattr(result, "data", result)
            seen.update(seconds=time.perf_counter() - started, note=getattr(result, "note", note),
                        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        # tokenizing workers ([data] num_proc): the largest one's peak
                        worker_peak_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                        rows=len(data.train), notes=data.notes)
            print(json.dumps(seen, default=str), flush=True)
            os._exit(0)  # the data is prepared: what follows (loading the model) is not measured
        return run

    try:
        from petune import datacache
    except ImportError:  # before the cache: the runner loads the tokenizer, then calls load_data
        from petune import runner
        from petune_plugins.tasks.sft import SftTask

        load_tokenizer, load_data = runner.load_tokenizer, SftTask.load_data

        def tokenizer_then_data(path):
            seen["started"] = time.perf_counter()
            seen["rss_before"] = _rss()
            return load_tokenizer(path)

        def data(self, options, tokenizer):
            result = load_data(self, options, tokenizer)
            seen.update(seconds=time.perf_counter() - seen.pop("started"), note="petune before the cache",
                        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        rows=len(result.train), notes=result.notes)
            print(json.dumps(seen, default=str), flush=True)
            os._exit(0)

        runner.load_tokenizer, SftTask.load_data = tokenizer_then_data, data
    else:
        datacache.prepare = timed(datacache.prepare, "")
    main(["run", str(recipe), "--dry-run"])
    raise SystemExit("the run stopped before its data was prepared (see above)")


def run_case(recipe: Path, before: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    # an older checkout: started in its folder, whose petune and petune_plugins come first on the path
    done = subprocess.run([sys.executable, "-m", "benchmarks.data_prep", "--measure", str(recipe)],
                          cwd=before or REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {recipe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _checkout(commit: str, folder: Path) -> Path:
    """``commit``'s petune as importable packages (petune, petune_plugins) under ``folder``."""
    tree = folder / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree / "checkout"), commit], cwd=REPO, check=True,
                   capture_output=True)
    (tree / "petune").symlink_to(tree / "checkout" / "petune")
    (tree / "petune_plugins").symlink_to(tree / "checkout" / "plugins")
    (tree / "benchmarks").symlink_to(REPO / "benchmarks")  # this measuring code
    return tree


def _remove_checkout(folder: Path) -> None:
    if (folder / "before" / "checkout").exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(folder / "before" / "checkout")], cwd=REPO,
                       check=False, capture_output=True)


# -- the table --------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: " + ", ".join(FORMATS))
    parser.add_argument("--model", default="gemma-3-270m", help="whose tokenizer prepares the data")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder, deleted)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--before", help="also measure this git commit's petune (e.g. the one before the data "
                                         "cache) on the first format, checked out into a temporary worktree")
    parser.add_argument("--num-proc", type=int, default=1, help="[data] num_proc: processes that tokenize")
    parser.add_argument("--cases", default="off,first,second",
                        help="comma-separated: off (cache off), first (builds the cache), second (cache hit)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure)  # prints its numbers and exits

    formats = [f for f in args.formats.split(",") if f]
    with tempfile.TemporaryDirectory(prefix="petune-data-prep-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = generate(args.rows, folder, formats)
        plain_size = (folder / "alpaca_like.jsonl").stat().st_size
        print(f"generated {args.rows:,} rows in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{k} {_mib(p.stat().st_size)}" for k, p in paths.items()), file=sys.stderr)
        before = _checkout(args.before, folder) if args.before else None
        cases = [(f"petune {args.before} (before the cache)", None)] if before else []
        wanted = set(args.cases.split(","))
        cases += [(name, cache) for key, name, cache in (("off", "cache off", "false"),
                                                          ("first", "first (builds the cache)", "true"),
                                                          ("second", "second (cache hit)", "true")) if key in wanted]
        results = []
        for n, (fmt, path) in enumerate(paths.items()):
            cache_dir = folder / f"cache-{fmt.replace('.', '-')}"
            for case, cache in cases[1:] if n and before else cases:  # the older petune: on the first format
                recipe = folder / f"recipe-{fmt.replace('.', '-')}.toml"
                data = "" if cache is None else (f'[data]\ncache = {cache}\ncache_dir = "{cache_dir}"\n'
                                                 f'num_proc = {args.num_proc}\n\n')
                recipe.write_text(RECIPE.format(model=args.model, train=path, data=data, out=folder / "run"),
                                  encoding="utf-8")
                result = run_case(recipe, before if cache is None else None)
                result.update(format=fmt, case=case, file_bytes=path.stat().st_size, plain_bytes=plain_size)
                results.append(result)
                print(f"{fmt:9} {case:26} {result['seconds']:8.1f} s  peak {_mib(result['peak_rss'])}  "
                      f"worker peak {_mib(result.get('worker_peak_rss', 0))}  "
                      f"before {_mib(result['rss_before'])}  ({result['note']})", file=sys.stderr)
        _remove_checkout(folder)
        if args.json:
            args.json.write_text(json.dumps({"rows": args.rows, "results": results}, indent=2))
    print(table(args.rows, results))
    return 0


def table(rows: int, results: list[dict]) -> str:
    lines = [f"{rows:,} rows; uncompressed JSONL {_mib(results[0]['plain_bytes'])}",
             "",
             "| format | file | run | prepare (s) | rows/s | peak RSS | RSS before preparing | peak growth "
             "| peak ÷ uncompressed size | largest worker's peak RSS |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        growth = r["peak_rss"] - r["rss_before"]
        worker = _mib(r["worker_peak_rss"]) if r.get("worker_peak_rss") else "—"
        lines.append(f"| {r['format']} | {_mib(r['file_bytes'])} | {r['case']} | {r['seconds']:.1f} | "
                     f"{rows / r['seconds']:,.0f} | {_mib(r['peak_rss'])} | {_mib(r['rss_before'])} | "
                     f"{_mib(growth)} | {r['peak_rss'] / r['plain_bytes']:.2f} | {worker} |")
    firsts = {r["format"]: r for r in results if r["case"].startswith("first")}
    seconds = {r["format"]: r for r in results if r["case"].startswith("second")}
    lines.append("")
    for fmt, first in firsts.items():
        line = f"- {fmt}: peak RSS of the first run {first['peak_rss'] / first['plain_bytes']:.2f}× the file"
        line += " (target ≤ 2×)"
        if fmt in seconds:
            line += f"; cached second run {100 * seconds[fmt]['seconds'] / first['seconds']:.1f}% of the first "
            line += "(target ≤ 5%)"
        if fmt != "jsonl" and "jsonl" in firsts:
            line += f"; first run {first['seconds'] / firsts['jsonl']['seconds']:.2f}× JSONL's (target ≤ 1.5×)"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
