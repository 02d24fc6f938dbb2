"""The bundled recipes, end to end on the packaged models (short runs), and what their runs leave behind."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import REPO, petune

RECIPES = sorted((REPO / "recipes").glob("*.toml"))
# Real-model smoke runs (Gemma 3 270M in 4-bit, DPO's four passes per pair) take 3-5 minutes on
# 2 idle cores and over 10 on a busy machine: a generous limit, so a slow CI host is not a failure.
SMOKE_TIMEOUT = 1500
pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)
# two steps of two rows: a smoke run checks the recipe runs end to end, not what its batch size
# costs (Gemma's 262k-token vocabulary makes every row of a batch expensive on a CPU)
SHORT = ["--set", "train.max_steps=2", "--set", "train.logging_steps=1", "--set", "train.batch_size=2"]


def short_run_args(recipe: Path, out: Path) -> list:
    args = ["run", recipe, *SHORT, "--set", f"output.dir={out}"]
    text = recipe.read_text()
    if 'name = "sft"' in text:
        args += ["--set", "task.num_sample_generations=1"]
    if 'name = "preference"' in text:  # before/after generations are the slow part of a smoke run
        args += ["--set", "task.num_sample_generations=1", "--set", "task.sample_max_new_tokens=4"]
    if 'name = "seq2seq"' in text:  # metrics come from generating: keep the smoke run's eval small
        args += ["--set", "task.max_rows=8", "--set", "task.max_new_tokens=8"]
    if 'name = "grpo"' in text:  # generating is the slow part: few prompts, short completions
        args += ["--set", "task.max_rows=8", "--set", "task.num_generations=2", "--set",
                 "task.max_completion_length=8", "--set", "task.num_sample_generations=1"]
    if 'name = "qa"' in text:
        args += ["--set", "task.max_rows=32"]
    if "early_stopping_patience" not in text:
        args += ["--set", "eval.strategy=no"]
    return args


def test_every_bundled_recipe_is_listed_and_valid(host):
    from petune.recipe import load_recipe

    listed = petune("recipes")
    for recipe in RECIPES:
        assert recipe.name in listed.stdout
        load_recipe(recipe, host)  # what `petune validate` checks, in this process: a process per recipe took a minute
    assert petune("validate", RECIPES[0]).returncode == 0
    expected = {"qlora_sft", "lora_sft", "full_classification", "lora_classification", "adapters_classification",
                "prompt_tuning_classification", "lora_ner", "adapters_ner"}
    assert expected <= {r.stem for r in RECIPES}


def run_end_to_end(recipe: Path, tmp_path: Path) -> None:
    """A bundled recipe's short run completes (tests/test_bundled_runs_*.py, one module per packaged
    model so that parallel workers take them apart)."""
    result = petune(*short_run_args(recipe, tmp_path / "run"), timeout=SMOKE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "completed"
    assert (tmp_path / "run" / "metrics.json").exists()


def recipes_on(model: str) -> list[Path]:
    """The bundled recipes (but the Quickstart's, run by the fixture below) on this packaged model."""
    return [r for r in RECIPES if r.stem != "qlora_sft" and tomllib.loads(r.read_text())["model"]["name"] == model]


def test_every_bundled_recipe_has_a_smoke_run():
    assert set(recipes_on("gemma-3-270m")) | set(recipes_on("minilm-l6")) == {r for r in RECIPES if r.stem != "qlora_sft"}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "run"
    result = petune(*short_run_args(REPO / "recipes" / "qlora_sft.toml", out), timeout=SMOKE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "console.txt").write_text(result.stdout + result.stderr)
    return out


@pytest.mark.slow
def test_qlora_run_folder_holds_everything(qlora_run):
    for name in ("recipe.toml", "manifest.json", "metrics.json", "task_state.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "tokenizer/tokenizer_config.json", "plots/loss.png",
                 "samples.jsonl", "log_history.json"):
        assert (qlora_run / name).exists(), name
    manifest = json.loads((qlora_run / "manifest.json").read_text())
    assert {"versions", "seed", "device", "started", "ended", "git_commit", "plugins", "command"} <= set(manifest)
    assert {"loss", "perplexity"} <= set(json.loads((qlora_run / "metrics.json").read_text())["validation"])
    # trained on the packaged Q4_K_M file's own blocks: the plan lists them by type, and no weights were converted
    plan = " ".join((qlora_run.parent / "console.txt").read_text().split())
    for kept in ("Q4_K: 27 layers", "Q5_0: 81 layers", "Q6_K: 9 layers", "Q8_0: 9 layers"):
        assert kept in plan, plan
    from petune.models import cache_dir

    assert not list(cache_dir("models", "gguf").rglob("*.safetensors"))


def _logits(model, tokenizer, text="What is the capital of France?"):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def _close(got, want):
    """Same greedy tokens, and logits within bf16 compute's rounding of each other."""
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.slow
def test_qlora_adapter_loads_with_plain_transformers_and_peft(qlora_run, host):
    """The Quickstart trains on the GGUF file's own blocks; its adapter is a plain peft folder
    that transformers' own GGUF loader (dequantising the same file) and peft load to the same
    model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from petune.models import resolve_model
    from petune.run_folders import load_run
    from petune_plugins.sources.gguf_file import gguf_for_folder

    loaded = load_run(qlora_run, host)
    gguf = gguf_for_folder(resolve_model("gemma-3-270m", host.model_sources()).path)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, qlora_run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(qlora_run / "tokenizer")
    _close(_logits(plain, tokenizer), _logits(loaded.model, loaded.tokenizer))


@pytest.mark.slow
def test_generate_answers_with_the_adapter(qlora_run):
    result = petune("generate", qlora_run, "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.slow
def test_exported_gguf_computes_what_the_run_computes(qlora_run, tmp_path, host):
    """The packaged Gemma's QLoRA run (on the GGUF file's own blocks) merged and written as an
    f16 GGUF file, read by transformers' GGUF loader, computes what the run (petune generate)
    computes: the adapter is folded into the blocks as trained, dequantised. After two steps
    the answers are near-ties, so logits are compared, not greedy text."""
    from transformers import AutoModelForCausalLM

    from petune.merge import logits_of
    from petune.run_folders import load_run

    out = tmp_path / "run.gguf"
    result = petune("export", qlora_run, "--format", "gguf", "--quant", "f16", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    run = load_run(qlora_run, host)  # as petune generate loads it
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    text = run.tokenizer.apply_chat_template([{"role": "user", "content": "Give three tips for staying focused."}],
                                             tokenize=False, add_generation_prompt=True)
    batch = dict(run.tokenizer(text, return_tensors="pt", add_special_tokens=False))
    _close(logits_of(exported, batch)["logits"], logits_of(run.model, batch)["logits"])
