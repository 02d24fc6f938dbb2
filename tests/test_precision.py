"""The dtype petune computes in is chosen for the hardware (petune/precision.py): never one
the device would emulate, unless the recipe asks for it, and then the plan says so."""

from __future__ import annotations

import pytest
import torch
from helpers import write_recipe

from petune import precision


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine: ``machine(cuda=..., cuda_bf16=..., cpu_bf16=...)``."""

    def pretend(*, cuda: bool = False, cuda_bf16: bool = False, cpu_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: cpu_bf16)

    return pretend


def test_cpu_without_native_bf16_computes_in_float32(machine):
    machine(cpu_bf16=False)
    choice = precision.auto()
    assert (choice.dtype, choice.reason) == ("float32", "auto: CPU without native bf16")
    assert precision.resolve("auto", weights=True).dtype == "float32"


def test_cpu_with_native_bf16_computes_in_bfloat16(machine):
    machine(cpu_bf16=True)
    assert precision.auto("cpu").dtype == "bfloat16"


def test_cuda_choices(machine):
    machine(cuda=True, cuda_bf16=True)
    assert precision.auto().dtype == "bfloat16"
    assert precision.auto("cuda:0").reason == "auto: CUDA GPU with bf16"
    machine(cuda=True, cuda_bf16=False)
    assert precision.auto("cuda").dtype == "float16"
    # weights never train in float16 without a loss scaler: float32, with fp16 autocast
    assert precision.resolve("auto", "cuda", weights=True).dtype == "float32"


def test_explicit_setting_is_honoured_and_emulation_named(machine, monkeypatch):
    machine(cpu_bf16=False)
    monkeypatch.setattr(precision, "slowdown", lambda dtype: 200.0)
    assert precision.resolve("bfloat16") == precision.Choice("bfloat16", "set in the recipe")
    warning = precision.emulation_warning("bfloat16", "strategy.compute_dtype", "cpu")
    assert "strategy.compute_dtype = bfloat16 is emulated" in warning and "200× slower" in warning
    assert precision.emulation_warning("float32", "model.dtype", "cpu") is None
    machine(cpu_bf16=True)
    assert precision.emulation_warning("bfloat16", "model.dtype", "cpu") is None


def test_environment_overrides_detection(monkeypatch):
    precision.cpu_native_bf16.cache_clear()
    try:
        monkeypatch.setenv("PETUNE_CPU_BF16", "1")
        assert precision.cpu_native_bf16()
        precision.cpu_native_bf16.cache_clear()
        monkeypatch.setenv("PETUNE_CPU_BF16", "0")
        assert not precision.cpu_native_bf16()
    finally:
        precision.cpu_native_bf16.cache_clear()


def test_slowdown_is_measured():
    ratio = precision.slowdown("bfloat16")
    assert 0 < ratio < float("inf")
    precision.cpu_native_bf16.cache_clear()
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert ratio > 5 or native  # emulated bf16 is far slower than float32


def test_training_flags_follow_the_device(machine):
    from petune.trainer_setup import model_dtype, precision_flags

    machine(cpu_bf16=False)
    assert precision_flags("auto") == {"bf16": False, "fp16": False}
    assert model_dtype("auto") == torch.float32
    machine(cuda=True, cuda_bf16=True)
    assert precision_flags("auto") == {"bf16": True, "fp16": False}
    assert model_dtype("auto") == torch.bfloat16
    machine(cuda=True, cuda_bf16=False)
    assert precision_flags("auto") == {"bf16": False, "fp16": True}
    assert precision_flags("fp32") == {"bf16": False, "fp16": False}


def test_qlora_auto_compute_dtype(machine, host):
    strategy = host.strategy("qlora")
    options = strategy.Options()
    assert options.compute_dtype == "auto"
    machine(cpu_bf16=False)
    assert strategy.load_kwargs(options)["quantization_config"].bnb_4bit_compute_dtype == torch.float32
    assert strategy.resolved_options(options) == {"compute_dtype": "float32 (auto: CPU without native bf16)"}
    assert "warning" not in strategy.training_plan(options)
    machine(cpu_bf16=True)
    assert strategy.load_kwargs(options)["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    explicit = strategy.Options(compute_dtype="bfloat16")
    assert strategy.resolved_options(explicit) == {}
    machine(cpu_bf16=False)
    assert "emulated" in strategy.training_plan(explicit)["warning"]


def test_plan_shows_what_auto_chose(machine, tmp_path, host, tiny_llama_path, capsys):
    """A dry run's plan names the resolved compute dtype and the training precision."""
    from petune.recipe import load_recipe
    from petune.runner import run

    machine(cpu_bf16=False)
    (tmp_path / "train.jsonl").write_text("".join(
        f'{{"instruction": "say {i}", "output": "{i}"}}\n' for i in range(12)))
    recipe = write_recipe(tmp_path / "recipe.toml", model=tiny_llama_path,
                          task={"name": "sft", "train": "train.jsonl", "format": "alpaca", "max_length": 128},
                          strategy={"name": "qlora", "r": 4}, train={"max_steps": 1})
    result = run(load_recipe(recipe, host), host, dry_run=True)
    assert result.status == "planned"
    text = " ".join(capsys.readouterr().err.split())
    assert "compute_dtype=float32 (auto: CPU without native bf16)" in text
    assert "weights float32 (auto: CPU without native bf16), training fp32 (auto)" in text


def test_env_reports_the_cpu(capsys):
    from petune.cli import main

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "cpu native bf16" in text and precision.cpu_capability() in text
