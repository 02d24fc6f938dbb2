"""Per-token generation time of ``petune generate`` on a 4-bit QLoRA run of the Quickstart,
against llama.cpp on the same run (issue 32, item 6)::

    .venv/bin/python benchmarks/llamacpp_generate.py --llama-python /work/llama/venv/bin/python

1. **train** (skipped with ``--run``, or when ``WORK/run`` is finished): ``petune run
   recipes/qlora_sft.toml --set train.max_steps=4 --set task.num_sample_generations=0 --set
   output.dir=WORK/run`` — the Quickstart, 4 steps, petune's defaults (compute_dtype auto).
2. **export** (skipped when the file exists): ``petune export RUN --format gguf --quant f16
   --out WORK/run-f16.gguf``.
3. **petune**: a child process loads the run with ``load_run`` (what every command
   does, the strategy's ``for_inference`` included) and answers the run's first held-out
   prompts with the sft task's ``generate`` (what ``petune generate`` calls), greedy; a
   streamer timestamps every new token. On a CPU with native bf16 a second child runs with
   ``PETUNE_CPU_BF16=0``: what "auto" computes in where bf16 is emulated (float32). With
   ``--patched`` a third child tries two inference changes on the loaded model (see
   :data:`PATCHES`) before petune makes them, answers checked against the unpatched ones.
4. **llama.cpp**: a child process of ``--llama-python`` (llama-cpp-python lives in a venv of
   its own, never in petune's requirements) loads the GGUF and generates greedily from the
   *same prompt token ids*, stopping at the same stop tokens.

Per token: ``decode`` is the time between the first and the last new token over the tokens
in between (the steady cost of one more token), ``call`` the whole generate call (prompt
included) over the new tokens. Both sides use the same number of threads (``--threads``, 1 by
default: steadier on a shared machine) and run one untimed warm-up generation first. The
greedy answers are compared token by token. Writes ``WORK/results.json`` and a table; this
file runs under both venvs, so it imports only the standard library at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qlora_sft.toml"
DEFAULT_WORK = REPO / "benchmarks" / "out" / "llamacpp"  # git-ignored
TARGET_RATIO = 3.0  # the target: petune within 3× of llama.cpp per token


# -- both sides: per-token clock ---------------------------------------------------------------
def token_stats(marks: list[float], started: float, ended: float, cpu_s: float) -> dict:
    """Timings of one answer from the arrival time of each new token."""
    n = len(marks)
    return {"tokens": n, "first_token_s": marks[0] - started if n else None,
            "decode_ms_per_token": 1000 * (marks[-1] - marks[0]) / (n - 1) if n > 1 else None,
            "call_ms_per_token": 1000 * (ended - started) / n if n else None,
            "cpu_ms_per_token": 1000 * cpu_s / n if n else None, "call_s": ended - started}


# -- petune side (petune's venv) -----------------------------------------------------------------
def petune_side(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from petune import precision
    from petune.plugins import get_host

    try:
        from petune.run_folders import load_run  # where it is moving
    except ImportError:
        from petune.runner import load_run

    started = time.perf_counter()
    run = load_run(job["run"], get_host())
    for name in job.get("patches", ()):
        PATCHES[name](run.model)
    load_s = time.perf_counter() - started
    prompts = job.get("prompts") or held_out_prompts(run, job["prompts_count"])

    class Clock:  # a transformers streamer: put() gets the prompt once, then every new token
        def __init__(self):
            self.marks, self.seen_prompt = [], False

        def put(self, value):
            if self.seen_prompt:
                self.marks.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    calls = []
    inner = run.model.generate

    def generate(*args, **kwargs):  # what the task's generate asks of the model, timestamped
        clock = Clock()
        output = inner(*args, **kwargs, streamer=clock)
        calls.append({"input_ids": kwargs["input_ids"][0].tolist(), "clock": clock,
                      "stop_ids": list(kwargs["generation_config"].eos_token_id),
                      "new_ids": output[0, kwargs["input_ids"].shape[1]:].tolist()})
        return output

    run.model.generate = generate
    answers = []
    for i, messages in enumerate([prompts[0], *prompts]):  # the first one again, untimed: warm-up
        begin, cpu = time.perf_counter(), time.process_time()
        text = run.task.generate(run.model, run.tokenizer, run.recipe.task, run.state, messages,
                                 max_new_tokens=job["max_new_tokens"] if i else 4, temperature=0.0)
        end, cpu = time.perf_counter(), time.process_time() - cpu
        call = calls[-1]
        if i:
            answers.append({"messages": messages, "text": text, "prompt_ids": call["input_ids"],
                            "stop_ids": call["stop_ids"], "ids": _cut(call["new_ids"], call["stop_ids"]),
                            **token_stats(call["clock"].marks, begin, end, cpu)})
    return {"side": "petune", "load_s": load_s, "threads": torch.get_num_threads(), "answers": answers,
            "patches": job.get("patches", []),
            "setting": {"PETUNE_CPU_BF16": os.environ.get("PETUNE_CPU_BF16", "")},
            "computes_in": _computes_in(run.model), "auto_dtype": str(precision.auto("cpu"))}


def _lm_head_2d(model) -> None:
    """The output layer gets its input as rows: torch's bfloat16 linear on transformers'
    last-position view (``hidden[:, -1:, :]``, the prompt's stride) copies the whole weight."""
    head = model.get_output_embeddings()
    inner = head.forward
    head.forward = lambda x: inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _merge_lora(model) -> None:
    """Each 4-bit layer with its LoRA computes with one weight: dequantised + scale × B A,
    summed in float32, kept in the compute dtype."""
    import bitsandbytes as bnb
    import torch

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit) and hasattr(module, "lora_A"):
            weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            for name in module.active_adapters:
                weight += module.scaling[name] * (module.lora_B[name].weight.float() @ module.lora_A[name].weight.float())
            weight = weight.to(base.compute_dtype or torch.float32)
            bias = None if base.bias is None else base.bias.detach().to(weight.dtype)
            module.forward = _plain_linear(weight, bias)


def _plain_linear(weight, bias):
    import torch

    def forward(x, *args, **kwargs):
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward


#: inference changes tried with --patched, on the model load_run returned
PATCHES = {"lm-head-2d": _lm_head_2d, "merge-lora": _merge_lora}


def held_out_prompts(run, count: int) -> list[list[dict]]:
    """The run's first held-out prompts (validation, else test), as its sample generations
    pick them: each conversation up to its last answer."""
    data = run.task.load_data(run.recipe.task, run.tokenizer)
    dataset = data.validation if data.validation is not None and len(data.validation) else data.test
    if dataset is None or not len(dataset):
        raise SystemExit(f"{run.dir} has no held-out rows; pass --prompt")
    prompts = []
    for row in dataset.select(range(min(count, len(dataset)))):
        messages = row["conversation"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:last]])
    return prompts


def _cut(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The answer's tokens up to (without) the first stop token, as the task cuts its text."""
    return ids[:next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))]


def _computes_in(model) -> str:
    """What the reloaded model's linear layers compute in, by the kind of layer."""
    import bitsandbytes as bnb

    kinds = {}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # peft's LoRA wrapper around one is not
            kept = "forward" in vars(module)  # QloraStrategy.for_inference's dequantised copy
            key = f"4-bit → {'dequantised once' if kept else 'bitsandbytes'} ({module.compute_dtype})"
            kinds[key] = kinds.get(key, 0) + 1
    weights = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return ", ".join(f"{n}× {k}" for k, n in kinds.items()) + f"; other weights {weights}"


# -- llama.cpp side (its own venv) ------------------------------------------------------------------
def llama_side(job: dict) -> dict:
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False)
    load_s = time.perf_counter() - started

    def answer(prompt_ids: list[int], stop_ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
        ids, marks = [], []
        llm.reset()  # no KV cache reused from the previous prompt (they share the Alpaca preamble)
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            marks.append(time.perf_counter())
            if token in stop_ids:
                break
            ids.append(token)
            if len(ids) == max_new:
                break
        return ids, marks

    first = job["answers"][0]
    answer(first["prompt_ids"], first["stop_ids"], 4)  # warm-up, untimed
    answers = []
    for a in job["answers"]:
        begin, cpu = time.perf_counter(), time.process_time()
        ids, marks = answer(a["prompt_ids"], a["stop_ids"], job["max_new_tokens"])
        end, cpu = time.perf_counter(), time.process_time() - cpu
        # petune's clock marks every generated token, a stop token included: the same here
        answers.append({"ids": ids, **token_stats(marks, begin, end, cpu)})
    return {"side": "llama.cpp", "load_s": load_s, "threads": job["threads"], "answers": answers,
            "version": getattr(llama_cpp, "__version__", "?")}


# -- the driver (petune's venv) ---------------------------------------------------------------------
def _child(python: str, side: str, job: dict, work: Path, name: str, env: dict | None = None) -> dict:
    """Run one side in a process of its own; its result comes back as a JSON file."""
    job_file, result_file = work / f"{name}.job.json", work / f"{name}.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    log = work / f"{name}.log"
    with open(log, "w") as f:
        done = subprocess.run([python, __file__, "--side", side, "--job",
                               str(job_file), "--result", str(result_file)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, check=False)
    if done.returncode or not result_file.exists():
        raise SystemExit(f"{name} failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads(result_file.read_text())


def _petune(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("petune")), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def prepare(args) -> tuple[Path, Path]:
    """The run and its f16 GGUF, made when missing."""
    work = Path(args.work)
    run = Path(args.run) if args.run else work / "run"
    if not (run / "task_state.json").exists() or not (run / "adapter").exists():
        if args.run:
            raise SystemExit(f"{run} is not a finished run")
        _petune("run", str(RECIPE), "--set", f"train.max_steps={args.steps}", "--set", "task.num_sample_generations=0",
                "--set", f"output.dir={run}")
    gguf = work / "run-f16.gguf"
    if not gguf.exists():
        _petune("export", str(run), "--format", "gguf", "--quant", "f16", "--out", str(gguf))
    return run, gguf


TIMES = ("first_token_s", "decode_ms_per_token", "call_ms_per_token", "cpu_ms_per_token")


def medians(side: dict) -> dict:
    """A side's per-token times, medians over its answers."""
    import statistics

    values = {key: [a[key] for a in side["answers"] if a.get(key) is not None] for key in TIMES}
    return {key: statistics.median(v) if v else None for key, v in values.items()}


def compare(petune: dict, llama: dict) -> dict:
    """Per-answer agreement and the median per-token times of two sides."""
    same = []
    for p, q in zip(petune["answers"], llama["answers"], strict=True):
        common = next((i for i, (x, y) in enumerate(zip(p["ids"], q["ids"], strict=False)) if x != y),
                      min(len(p["ids"]), len(q["ids"])))
        same.append({"identical": p["ids"] == q["ids"], "common_prefix_tokens": common})
    out = {"answers": same}
    mine, theirs = medians(petune), medians(llama)
    for key in TIMES:
        a, b = mine[key], theirs[key]
        out[key] = {"petune": a, "llama.cpp": b, "ratio": a / b if a and b else None}
    return out


def cpu_line() -> str:
    import torch

    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 "
            f"{torch.cpu._is_avx512_bf16_supported()}, {os.cpu_count()} cores")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/llamacpp_generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default="/work/llama/venv/bin/python",
                        help="a Python with llama-cpp-python installed (default /work/llama/venv/bin/python)")
    parser.add_argument("--run", help="an existing 4-bit QLoRA run of the Quickstart (default: train WORK/run)")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help=f"scratch folder (default {DEFAULT_WORK})")
    parser.add_argument("--steps", type=int, default=4, help="training steps of the run it trains (default 4)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts answered (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads of both sides (default 1)")
    parser.add_argument("--patched", action="store_true",
                        help=f"also petune with inference changes not yet in it: {', '.join(PATCHES)}")
    parser.add_argument("--side", choices=["petune", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child: one side, result to a file
        job = json.loads(Path(args.job).read_text())
        result = (petune_side if args.side == "petune" else llama_side)(job)
        Path(args.result).write_text(json.dumps(result))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run, gguf = prepare(args)
    from petune import precision

    job = {"run": str(run), "prompts_count": args.prompts, "max_new_tokens": args.max_new_tokens,
           "threads": args.threads}
    sides = {"petune": _child(sys.executable, "petune", job, work, "petune")}
    if precision.cpu_native_bf16():  # also what a CPU without native bf16 computes in
        sides["petune PETUNE_CPU_BF16=0"] = _child(sys.executable, "petune", {**job, "prompts": [
            a["messages"] for a in sides["petune"]["answers"]]}, work, "petune-fp32", {"PETUNE_CPU_BF16": "0"})
    if args.patched:
        sides["petune patched"] = _child(sys.executable, "petune", {**job, "patches": list(PATCHES), "prompts": [
            a["messages"] for a in sides["petune"]["answers"]]}, work, "petune-patched")
    first = sides["petune"]
    n_ctx = max(len(a["prompt_ids"]) for a in first["answers"]) + args.max_new_tokens + 16
    sides["llama.cpp"] = _child(args.llama_python, "llama", {"gguf": str(gguf), "n_ctx": n_ctx, "threads": args.threads,
                                                    "max_new_tokens": args.max_new_tokens,
                                                    "answers": [{k: a[k] for k in ("prompt_ids", "stop_ids")}
                                                                for a in first["answers"]]}, work, "llama")
    report(sides, run, gguf, work, args)
    return 0


def report(sides: dict, run: Path, gguf: Path, work: Path, args) -> None:
    from rich.table import Table
    from transformers import AutoTokenizer

    from petune.artifacts import now
    from petune.console import out

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    llama = sides["llama.cpp"]
    for a in llama["answers"]:
        a["text"] = tokenizer.decode(a["ids"], skip_special_tokens=True)
    comparisons = {name: compare(side, llama) for name, side in sides.items() if name != "llama.cpp"}
    for name, side in sides.items():  # petune's own answers: the same with a change or a setting?
        if name not in ("petune", "llama.cpp"):
            comparisons[name]["same_as_petune"] = [a["ids"] == b["ids"] for a, b in
                                                   zip(side["answers"], sides["petune"]["answers"], strict=True)]
    results = {"date": now(), "cpu": cpu_line(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "run": str(run), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "threads": args.threads,
               "max_new_tokens": args.max_new_tokens, "sides": sides, "comparisons": comparisons}
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    table = Table(title=f"petune generate vs llama.cpp — {results['date'][:10]}, {results['cpu']}, "
                        f"{args.threads} thread(s)", title_justify="left", caption_justify="left",
                  caption="first token: the prompt and one token; decode: time per new token after the first; "
                          "call: the generate call per new token; CPU: the process's CPU time per new token; medians "
                          "over the prompts; ×: petune / llama.cpp; same answers: identical greedy tokens")
    for col in ("side", "computes in", "load", "first token", "decode ms/token", "call ms/token", "CPU ms/token",
                "×decode", "×call", "same answers"):
        table.add_column(col, justify="left" if col in ("side", "computes in") else "right")
    for name, side in sides.items():
        c = comparisons.get(name)
        own = medians(side)
        same = f"{sum(a['identical'] for a in c['answers'])}/{len(c['answers'])}" if c else ""
        table.add_row(name, side.get("computes_in", f"f16 GGUF ({gguf.stat().st_size / 2**20:.0f} MiB)"),
                      f"{side['load_s']:.1f} s", f"{own['first_token_s']:.2f} s", f"{own['decode_ms_per_token']:.1f}",
                      f"{own['call_ms_per_token']:.1f}", f"{own['cpu_ms_per_token']:.1f}",
                      f"{c['decode_ms_per_token']['ratio']:.2f}" if c else "",
                      f"{c['call_ms_per_token']['ratio']:.2f}" if c else "", same)
    out.print(table)
    for i, a in enumerate(sides["petune"]["answers"]):
        out.print(f"[bold]prompt {i + 1}[/] ({len(a['prompt_ids'])} tokens): {a['messages'][-1]['content']!r}")
        for name, side in sides.items():
            b = side["answers"][i]
            out.print(f"  {name:>26}: {b['tokens']} tokens, {b['text']!r}")
    out.print(f"wrote {work / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
