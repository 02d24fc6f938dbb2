"""petune.memory: the peak-memory estimate (formulas on meta-device skeletons, no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_recipe

from petune import memory
from petune.api import ModelShape


def llama_config(**overrides):
    from transformers import LlamaConfig

    values = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
    values.update(overrides)
    return LlamaConfig(**values)


def lora(model, dropout=0.05):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


CAUSAL_LM = ModelShape("AutoModelForCausalLM", labels="tokens", causal_lm_loss=True)


def skeleton(dtype=torch.float32, **config):
    return memory.build_skeleton(llama_config(**config), CAUSAL_LM, dtype)


def test_skeleton_is_on_meta_and_costs_nothing():
    model = skeleton(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, num_hidden_layers=32)
    assert all(p.is_meta for p in model.parameters())
    assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9  # Llama-3-8B's count


def test_qlora_weights_are_about_half_a_byte_per_parameter():
    from transformers import BitsAndBytesConfig

    model = lora(skeleton(torch.bfloat16))
    for double_quant, expected in ((True, 0.5 + 1 / 64 + 4 / (64 * 256)), (False, 0.5 + 4 / 64)):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant,
                                   llm_int8_skip_modules=["lm_head"])
        inv = memory.parameter_inventory(model, quant)
        linear = sum(m.base_layer.weight.numel() for n, m in model.named_modules() if hasattr(m, "base_layer")
                     and isinstance(m.base_layer, torch.nn.Linear) and "lm_head" not in n)
        assert inv["quantised"] == linear
        others = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if not ("base_layer" in n and n.endswith("weight") and "lm_head" not in n))
        per_param = (inv["weights"] - others) / inv["quantised"]
        assert per_param == pytest.approx(expected, rel=1e-6)
        assert 0.5 <= per_param < 0.57


def test_lora_optimizer_states_are_eight_bytes_per_trainable_parameter():
    model = lora(skeleton(torch.bfloat16))
    est = memory.estimate(model, batch=1, seq=16, gradient_checkpointing=False, shape=CAUSAL_LM, device="cuda",
                          autocast_dtype=torch.bfloat16, capacity=None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == est.trainable > 0
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # peft keeps LoRA in fp32
    assert est.parts["optimizer"] == 8 * trainable
    assert est.parts["gradients"] == 4 * trainable


def test_optimizers_and_full_finetuning_in_bf16():
    model = skeleton(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    params = [(name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]
    assert memory.optimizer_bytes(params, "adamw_torch") == (4 * n, 0)  # torch AdamW states follow the param dtype
    assert memory.optimizer_bytes(params, "sgd") == (0, 0)
    counted, paged = memory.optimizer_bytes(params, "adamw_bnb_8bit")
    assert 2 * n <= counted < 2.1 * n and paged == 0
    counted, paged = memory.optimizer_bytes(params, "paged_adamw_8bit")
    assert counted == 0 and paged > 0  # unified memory: not in torch's allocator
    est = memory.estimate(model, batch=1, seq=16, gradient_checkpointing=False, shape=CAUSAL_LM, device="cuda",
                          capacity=None)
    assert est.parts["weights"] == est.parts["gradients"] == 2 * n


def test_full_logits_cost_twelve_bytes_per_token_and_vocabulary_entry():
    model = lora(skeleton())
    est = memory.estimate(model, batch=2, seq=64, gradient_checkpointing=True, shape=CAUSAL_LM, device="cpu",
                          loss_memory="logits", capacity=None)
    assert est.parts["logits"] == 12 * 2 * 64 * 1000
    chunked = memory.estimate(model, batch=2, seq=64, gradient_checkpointing=True, shape=CAUSAL_LM,
                              device="cuda", loss_memory="chunked", capacity=None)
    assert chunked.parts["logits"] > 0 and chunked.details["loss_memory"] == "chunked"


def test_checkpointing_keeps_less_and_activations_grow_with_tokens():
    model = lora(skeleton())
    kwargs = {"shape": CAUSAL_LM, "device": "cuda", "capacity": None}
    without = memory.estimate(model, batch=2, seq=128, gradient_checkpointing=False, **kwargs)
    with_gc = memory.estimate(model, batch=2, seq=128, gradient_checkpointing=True, **kwargs)
    longer = memory.estimate(model, batch=2, seq=256, gradient_checkpointing=False, **kwargs)
    assert with_gc.parts["activations"] < without.parts["activations"]
    assert longer.parts["activations"] == pytest.approx(2 * without.parts["activations"], rel=0.05)
    assert without.parts["weights"] == with_gc.parts["weights"]


def test_activations_count_what_autograd_saves():
    """A 1-layer model without dropout: per layer, the saved tensors are a handful of
    hidden-size and intermediate-size copies per token (nothing seq × seq: fused attention)."""
    model = skeleton(num_hidden_layers=1)
    model.requires_grad_(True)
    acts = memory.measure_activations(model, 2, 64, shape=CAUSAL_LM, vocab=1000)
    tokens, h, i = 2 * 64, 256, 512
    per_layer = acts["per_layer"][0]
    assert 6 * tokens * h * 4 < per_layer < 30 * tokens * (h + i) * 4
    assert acts["vocab_sized"] == tokens * 1000 * 4  # log-softmax output, fp32
    assert acts["tokens"] == tokens


def test_warns_when_the_device_is_too_small():
    model = lora(skeleton())
    est = memory.estimate(model, batch=2, seq=64, gradient_checkpointing=False, shape=CAUSAL_LM, device="cpu",
                          capacity=1024)
    assert not est.fits
    assert "more than the cpu has" in est.warning and "gradient_checkpointing" in est.warning
    roomy = memory.estimate(model, batch=2, seq=64, gradient_checkpointing=False, shape=CAUSAL_LM,
                            device="cpu", capacity=2**40)
    assert roomy.fits and roomy.warning is None


def sft_recipe(tmp_path, strategy: str = "qlora") -> Path:
    (tmp_path / "train.jsonl").write_text('{"instruction": "say hi", "output": "hi"}\n' * 4)
    return write_recipe(tmp_path / "r.toml", task={"name": "sft", "train": "train.jsonl", "max_length": 128},
                        strategy={"name": strategy}, train={"batch_size": 4, "gradient_checkpointing": True})


@pytest.mark.parametrize("strategy", ["full", "lora", "qlora", "adapters", "prompt_tuning"])
def test_estimate_recipe_for_every_strategy(host, tmp_path, strategy):
    from petune.recipe import load_recipe

    recipe = load_recipe(sft_recipe(tmp_path, strategy), host)
    est = memory.estimate_recipe(recipe, host, device="cpu")
    assert est.batch == 4 and est.seq == 128 and est.gradient_checkpointing
    assert est.peak > est.parts["weights"] > 0
    assert 0 < est.trainable <= est.total
    assert set(est.parts) == set(memory.PARTS)
    if strategy == "qlora":
        assert est.details["quantised_params"] > 0
    if strategy == "full":
        assert est.trainable == est.total


def test_estimate_command_prints_a_table(host, tmp_path, capsys):
    import argparse

    from petune import estimate

    parser = argparse.ArgumentParser()
    estimate.register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", str(sft_recipe(tmp_path)), "--device", "cpu",
                              "--set", "train.batch_size=2"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for word in ("Peak training memory", "weights", "gradients", "optimizer", "activations", "logits", "peak",
                 "batch 2 × 128"):
        assert word in text
    args = parser.parse_args(["estimate", str(sft_recipe(tmp_path)), "--device", "cpu", "--json"])
    assert args.func(args) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["peak"] > 0 and data["parts"]["weights"] > 0


def test_plan_row_for_dry_run(host, tmp_path):
    from petune.recipe import load_recipe

    key, text = memory.plan_row(load_recipe(sft_recipe(tmp_path), host), host, device="cpu")
    assert key == "memory" and "peak on cpu" in text


def test_petune_estimate_cli(tmp_path):
    """The installed command (registered through the register_commands hook)."""
    import subprocess
    import sys

    recipe = sft_recipe(tmp_path)
    done = subprocess.run([sys.executable, "-m", "petune", "estimate", str(recipe), "--device", "cpu"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "peak" in done.stdout and "weights" in done.stdout


@pytest.mark.parametrize("model, auto_class", [("random:tiny-llama", "AutoModelForCausalLM"),
                                               ("random:tiny-t5", "AutoModelForSeq2SeqLM")])
def test_estimate_follows_the_seq2seq_model_kind(host, tmp_path, monkeypatch, model, auto_class):
    """seq2seq picks its model class by the model's kind: the plan's estimate must build that class,
    not an encoder-decoder for a causal LM (it printed 'no estimate (ValueError ...)')."""
    from petune.recipe import load_recipe

    (tmp_path / "train.jsonl").write_text('{"source": "a b", "target": "c d"}\n' * 4)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", model=model,
                                      task={"name": "seq2seq", "train": "train.jsonl", "max_source_length": 48,
                                            "max_target_length": 16},
                                      strategy={"name": "lora"}), host)
    built = []
    skeleton_of = memory.build_skeleton
    monkeypatch.setattr(memory, "build_skeleton",
                        lambda config, shape, *a, **kw: built.append(shape.auto_class) or skeleton_of(config, shape, *a, **kw))
    est = memory.estimate_recipe(recipe, host, device="cpu")
    assert built == [auto_class]
    assert est.seq == 64 and est.peak > est.parts["weights"] > 0
    assert memory.plan_row(recipe, host)[1].startswith("≈")
