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
SHORT = ["--set", "train.max_steps=2", "--set", "train.logging_steps=1"]


def short_run_args(recipe: Path, out: Path) -> list:
    args = ["run", recipe, *SHORT, "--set", f"output.dir={out}"]
    text = recipe.read_text()
    if 'name = "sft"' in text:
        args += ["--set", "task.num_sample_generations=1"]
    if 'name = "preference"' in text:  # before/after generations are the slow part of a smoke run
        args += ["--set", "task.num_sample_generations=1", "--set", "task.sample_max_new_tokens=4"]
    if 'name = "seq2seq"' in text:  # metrics come from generating: keep the smoke run's eval small
        args += ["--set", "task.max_rows=16", "--set", "task.max_new_tokens=8"]
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


def _logits(model, tokenizer, text="What is the capital of France?"):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.slow
def test_qlora_adapter_loads_with_plain_transformers_and_peft(qlora_run, host):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from petune import precision
    from petune.models import resolve_model
    from petune.run_folders import load_run

    loaded = load_run(qlora_run, host)
    base_path = resolve_model("gemma-3-270m", host.model_sources()).path
    compute = precision.resolve(loaded.recipe.strategy.compute_dtype).torch_dtype  # what "auto" chose here
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute,
                             llm_int8_skip_modules=["lm_head", "embed_out", "score", "classifier", "qa_outputs", "pooler.dense"])
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=bnb, dtype=torch.float32, device_map={"": "cpu"})
    plain = PeftModel.from_pretrained(base, qlora_run / "adapter").eval()
    for module in plain.modules():  # on AVX512-BF16 CPUs bitsandbytes would repack for bf16 inference,
        if hasattr(module, "support_avx512bf16_for_cpu"):  # not the compute dtype the run trained in
            module.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(qlora_run / "tokenizer")
    torch.testing.assert_close(_logits(plain, tokenizer), _logits(loaded.model, loaded.tokenizer), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_generate_answers_with_the_adapter(qlora_run):
    result = petune("generate", qlora_run, "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.slow
def test_exported_gguf_computes_what_the_run_computes(qlora_run, tmp_path, host):
    """The packaged Gemma's QLoRA run written as an f16 GGUF file and read by transformers'
    GGUF loader computes what the 4-bit run (petune generate) computes: the adapter is folded
    into the 4-bit base as trained, dequantised. Folded into the original checkpoint, the
    model would differ by far more (measured: max |Δ| 1.5 vs 27.6 of 102, argmax 100% vs 75%).
    After two steps the answers are near-ties, so logits are compared, not greedy text."""
    from transformers import AutoModelForCausalLM

    from petune.merge import logits_of
    from petune.run_folders import load_run

    out = tmp_path / "run.gguf"
    result = petune("export", qlora_run, "--format", "gguf", "--quant", "f16", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    run = load_run(qlora_run, host)  # as petune generate loads it
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    original = load_run(qlora_run, host, quantized=False)  # the adapter on the original checkpoint
    text = run.tokenizer.apply_chat_template([{"role": "user", "content": "Give three tips for staying focused."}],
                                             tokenize=False, add_generation_prompt=True)
    batch = dict(run.tokenizer(text, return_tensors="pt", add_special_tokens=False))
    want = logits_of(run.model, batch)["logits"]
    got, other = logits_of(exported, batch)["logits"], logits_of(original.model, batch)["logits"]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 compute of the 4-bit run vs f32
    assert (got - want).abs().max() < (other - want).abs().max() / 5
