"""A GGUF-native QLoRA run checked in llama.cpp itself (issue 35, item 3)::

    .venv/bin/python benchmarks/llamacpp_check.py RUN --llama-python /work/llama/venv/bin/python

RUN is a finished run of ``recipes/qlora_sft.toml`` (the Quickstart: strategy qlora, quant_type gguf:
the base kept in the GGUF file's own quantisation). The script

1. exports the adapter with ``petune export RUN --format gguf-lora`` (and, with ``--merged``,
   the full merge with ``--format gguf --quant f32``) into ``--work``;
2. **petune side** (a child process in petune's venv): loads the run as every command does
   (``load_run``: the strategy's ``for_inference`` included), formats the run's held-out
   prompts with its chat template, and decodes greedily, keeping every step's logits; also
   the base alone (the adapter disabled);
3. **llama.cpp side** (a child of ``--llama-python``: llama-cpp-python lives in its own venv,
   never in petune's requirements): loads the *user's base GGUF file* with the exported
   adapter (``lora_path``), feeds the *same prompt token ids* and decodes greedily, keeping
   every step's logits; also the base alone, and the merged file when asked.

Compared per prompt: the greedy continuations token for token, and the logits at each
decoded position (the largest |difference|, relative to the largest |logit|). Writes
``WORK/results.json`` and prints a table. This file runs under both venvs, so it imports only
the standard library at the top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "benchmarks" / "out" / "llamacpp_check"  # git-ignored
#: agreement asked for: the largest logit difference at every position both decoded alike, relative
#: to the largest |logit|. llama.cpp computes its quantised matmuls with its own kernels, rounding the
#: activations to 8 bits (Q8_K / Q8_0 dot products): on the 270M Gemma the *base alone* differs by
#: 0.06-0.09 this way, adapter or not. The adapter itself is checked more tightly through its effect
#: (adapted − base logits at the prompt's last position, both sides): ADAPTER_TOLERANCE.
LOGIT_TOLERANCE = 0.15
ADAPTER_TOLERANCE = 0.25


def _prompts(run_dir: Path, count: int) -> list[list[dict]]:
    """The run's held-out prompts (its validation rows are split off the training file the
    same way each time: the last rows of the recipe's data are used here, as chat messages)."""
    recipe_text = (run_dir / "recipe.toml").read_text()
    import tomllib

    recipe = tomllib.loads(recipe_text)
    train = Path(recipe["task"]["train"])
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    chosen = rows[-count:]
    return [[{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))}]
            for r in chosen]


# -- petune side ---------------------------------------------------------------------------
def petune_side(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from petune.plugins import get_host

    try:
        from petune.run_folders import load_run
    except ImportError:  # before run folders moved out of the runner
        from petune.runner import load_run

    loaded = load_run(Path(job["run"]), get_host())
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    out = {"prompts": [], "base": []}
    for messages in job["prompts"]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        out["prompts"].append({"ids": ids, **_greedy_torch(model, ids, job["max_new_tokens"], job["stop_ids"])})
        with model.disable_adapter():
            out["base"].append(_greedy_torch(model, ids, job["max_new_tokens"], job["stop_ids"]))
    return out


def _greedy_torch(model, ids: list[int], n: int, stop_ids: list[int]) -> dict:
    import torch

    tokens, logits = [], []
    current = list(ids)
    with torch.no_grad():
        for _ in range(n):
            row = model(input_ids=torch.tensor([current])).logits[0, -1].float()
            token = int(row.argmax())
            tokens.append(token)
            logits.append(row.tolist())
            current.append(token)
            if token in stop_ids:
                break
    return {"tokens": tokens, "logits": logits}


# -- llama.cpp side ------------------------------------------------------------------------
def llama_side(job: dict) -> dict:
    import llama_cpp
    import numpy as np

    out = {}
    for label, kwargs in job["models"].items():
        llm = llama_cpp.Llama(n_ctx=1024, n_threads=job["threads"], logits_all=True, verbose=False, **kwargs)
        runs = []
        for ids, prompt_len in job["inputs"]:
            llm.reset()
            llm.eval(ids)
            tokens, logits = [], []
            for _ in range(job["max_new_tokens"]):
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                token = int(row.argmax())
                tokens.append(token)
                logits.append(row.tolist())
                if token in job["stop_ids"]:
                    break
                llm.eval([token])
            runs.append({"tokens": tokens, "logits": logits})
        out[label] = runs
        del llm
    return out


def _child(python: str, role: str, job: dict, work: Path) -> dict:
    job_file, result_file = work / f"{role}-job.json", work / f"{role}-result.json"
    job_file.write_text(json.dumps(job))
    subprocess.run([python, __file__, "--child", role, str(job_file), str(result_file)], check=True)
    return json.loads(result_file.read_text())


def _compare(ours: dict, theirs: dict) -> dict:
    same = 0
    for a, b in zip(ours["tokens"], theirs["tokens"]):
        if a != b:
            break
        same += 1
    worst = 0.0
    for x, y in zip(ours["logits"][: same + 1], theirs["logits"][: same + 1]):  # positions both decoded alike
        scale = max(abs(v) for v in x) or 1.0
        worst = max(worst, max(abs(p - q) for p, q in zip(x, y)) / scale)
    return {"equal": ours["tokens"] == theirs["tokens"], "same_prefix": same, "ours": len(ours["tokens"]),
            "theirs": len(theirs["tokens"]), "max_rel_logit_diff": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("--llama-python", default="/work/llama/venv/bin/python")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merged", action="store_true", help="also check the full-merge f32 GGUF export")
    parser.add_argument("--child", nargs=3, metavar=("ROLE", "JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, job_file, result_file = args.child
        job = json.loads(Path(job_file).read_text())
        result = petune_side(job) if role == "petune" else llama_side(job)
        Path(result_file).write_text(json.dumps(result))
        return 0

    run_dir, work = args.run.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    petune_cli = [sys.executable, "-m", "petune"]
    adapter = work / "adapter.gguf"
    subprocess.run([*petune_cli, "export", str(run_dir), "--format", "gguf-lora", "--out", str(adapter),
                    "--overwrite"], check=True)
    merged = work / "merged-f32.gguf"
    if args.merged:
        subprocess.run([*petune_cli, "export", str(run_dir), "--format", "gguf", "--quant", "f32", "--out",
                        str(merged), "--overwrite"], check=True)
    base = _base_file(run_dir)
    tokenizer_info = json.loads((run_dir / "task_state.json").read_text())
    stop_ids = _stop_ids(run_dir, tokenizer_info)
    prompts = _prompts(run_dir, args.prompts)
    ours = _child(sys.executable, "petune", {"run": str(run_dir), "prompts": prompts, "threads": args.threads,
                                              "max_new_tokens": args.max_new_tokens, "stop_ids": stop_ids}, work)
    models = {"base + adapter": {"model_path": str(base), "lora_path": str(adapter)},
              "base": {"model_path": str(base)}}
    if args.merged:
        models["merged f32"] = {"model_path": str(merged)}
    inputs = [[p["ids"], len(p["ids"])] for p in ours["prompts"]]
    theirs = _child(args.llama_python, "llama", {"models": models, "inputs": inputs, "threads": args.threads,
                                                 "max_new_tokens": args.max_new_tokens, "stop_ids": stop_ids}, work)
    rows = []
    for i, prompt in enumerate(ours["prompts"]):
        effect = _adapter_effect(prompt, ours["base"][i], theirs["base + adapter"][i], theirs["base"][i])
        rows.append({"prompt": i, "check": "base + adapter", "adapter_effect_rel_diff": effect,
                     **_compare(prompt, theirs["base + adapter"][i])})
        rows.append({"prompt": i, "check": "base", **_compare(ours["base"][i], theirs["base"][i])})
        if args.merged:
            rows.append({"prompt": i, "check": "merged f32", **_compare(prompt, theirs["merged f32"][i])})
    summary = {"run": str(run_dir), "base": str(base), "adapter": str(adapter), "tolerance": LOGIT_TOLERANCE,
               "rows": rows}
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'prompt':>6}  {'check':<15} {'greedy equal':>12}  {'same prefix':>11}  {'max rel logit diff':>18}  "
          f"{'adapter effect diff':>19}")
    for r in rows:
        effect = r.get("adapter_effect_rel_diff")
        print(f"{r['prompt']:>6}  {r['check']:<15} {str(r['equal']):>12}  {r['same_prefix']:>5}/{r['ours']:<5}  "
              f"{r['max_rel_logit_diff']:>18.4f}  {'' if effect is None else f'{effect:.4f}':>19}")
    adapted = [r for r in rows if r["check"] == "base + adapter"]
    logits_ok = all(r["max_rel_logit_diff"] <= LOGIT_TOLERANCE for r in adapted)
    effect_ok = all(r["adapter_effect_rel_diff"] <= ADAPTER_TOLERANCE for r in adapted)
    print(f"{sum(r['equal'] for r in adapted)}/{len(adapted)} prompts: petune's greedy answer equals llama.cpp's "
          f"(base file + exported adapter); logits within {LOGIT_TOLERANCE:g}: {logits_ok}; adapter effect within "
          f"{ADAPTER_TOLERANCE:g}: {effect_ok}")
    return 0 if logits_ok and effect_ok and all(r["equal"] for r in adapted) else 1


def _adapter_effect(ours: dict, ours_base: dict, theirs: dict, theirs_base: dict) -> float:
    """|petune's (adapted − base) − llama.cpp's (adapted − base)| at the prompt's last position,
    relative to the largest |petune's adapted − base|: the adapter's own contribution, with the
    two runtimes' shared base arithmetic cancelled out."""
    mine = [a - b for a, b in zip(ours["logits"][0], ours_base["logits"][0])]
    other = [a - b for a, b in zip(theirs["logits"][0], theirs_base["logits"][0])]
    scale = max(abs(v) for v in mine) or 1.0
    return max(abs(p - q) for p, q in zip(mine, other)) / scale


def _base_file(run_dir: Path) -> Path:
    """The base GGUF the run trained on, as the export names it (Modelfile's FROM)."""
    out = subprocess.run([sys.executable, "-c", (
        "import sys, tempfile; from pathlib import Path; from petune.plugins import get_host\n"
        "from petune.models import find_source\ntry: from petune.run_folders import read_finished_run\n"
        "except ImportError: from petune.runner import read_finished_run\n"
        "recipe = read_finished_run(Path(sys.argv[1]), get_host())[0]; host = get_host()\n"
        "source = find_source(recipe.model.name, host.model_sources()); "
        "print(source.gguf_file(recipe.model.name, Path(tempfile.mkdtemp())))"), str(run_dir)],
        check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _stop_ids(run_dir: Path, state: dict) -> list[int]:
    tokenizer = json.loads((run_dir / "tokenizer" / "tokenizer_config.json").read_text())
    vocab_file = run_dir / "tokenizer" / "tokenizer.json"
    names = [*(state.get("stop_tokens") or []), tokenizer.get("eos_token")]
    names = [n if isinstance(n, str) else (n or {}).get("content") for n in names]
    vocab = json.loads(vocab_file.read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    return sorted({ids[n] for n in names if n in ids})


if __name__ == "__main__":
    sys.exit(main())
