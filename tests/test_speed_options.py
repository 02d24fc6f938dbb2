"""The speed and memory options: padding-free SFT batches (the default where the model's
attention keeps a row's examples apart), fused kernels, torch.compile and activation
offloading. Each gives the loss of the plain path on a tiny model, and each refuses, with a
reason, where it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import validated_recipe

from petune import speed
from petune.errors import Refusal, UserError
from petune.recipe import TrainSection
from petune_plugins.tasks.sft import SftOptions, SftTask, choose_batching

REPO = Path(__file__).resolve().parents[1]

ROWS = [  # different lengths, so padded batches carry padding; answers only are trained (prompt masking)
    {"instruction": "what is the capital of france ?", "output": "paris"},
    {"instruction": "write a short poem about the sea .", "output": "the sea is blue . the sea is far too long ."},
    {"instruction": "summarize the text in one sentence .", "input": "a good movie with a great story .",
     "output": "a good movie ."},
    {"instruction": "translate the sentence into german .", "input": "i loved it .", "output": "ich habe es ."},
    {"instruction": "answer the question below .", "input": "what is 1 + 2 ?", "output": "3"},
    {"instruction": "hello , how can i help you today ?", "output": "john smith lives in new york and works "
                                                                     "for acme corporation in london ."},
]


@pytest.fixture
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


@pytest.fixture
def train_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def options(path: Path, **values) -> SftOptions:
    return SftOptions.model_validate({"train": path, "max_length": 128, "num_sample_generations": 0, **values})


def args(tmp_path, **extra) -> dict:
    """What the runner passes, for two CPU steps of two examples in a fixed order."""
    return {"output_dir": str(tmp_path / "checkpoints"), "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "num_train_epochs": 1, "max_steps": 2,
            "seed": 0, "data_seed": 0, "train_sampling_strategy": "sequential", "logging_steps": 1,
            "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "dataloader_num_workers": 0, "bf16": False, "fp16": False, "use_cpu": True,
            "average_tokens_across_devices": True, **extra}


def tiny_llama(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path)


def tiny_gemma3(tokenizer):
    """A 2-layer Gemma 3 text model, one sliding-window layer (window 4) and one global one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config)


def train_losses(model_factory, tokenizer, opts, tmp_path, **extra) -> tuple[list[float], dict]:
    """The logged losses of two steps, and the first training batch."""
    task = SftTask()
    data = task.load_data(opts, tokenizer)
    model = model_factory()
    trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=opts,
                                args=args(tmp_path, **extra), callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], batch


# -- padding-free batches ------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, loss", [("llama", "full"), ("llama", "chunked"), ("gemma3", "full")])
def test_padding_free_batches_train_with_the_loss_of_padded_batches(model_name, loss, tiny_llama_path, tokenizer,
                                                                    train_file, tmp_path):
    def factory():
        return tiny_llama(tiny_llama_path) if model_name == "llama" else tiny_gemma3(tokenizer)

    free, free_batch = train_losses(factory, tokenizer, options(train_file, loss=loss), tmp_path / "free")
    padded, padded_batch = train_losses(factory, tokenizer, options(train_file, loss=loss, padding_free=False),
                                        tmp_path / "padded")
    # the default is padding-free here: both examples in one row, positions restarting, no padding, no mask
    assert "attention_mask" not in free_batch and free_batch["input_ids"].shape[0] == 1
    assert (free_batch["position_ids"][0] == 0).sum() == 2
    assert "attention_mask" in padded_batch and padded_batch["input_ids"].shape[0] == 2
    assert (padded_batch["attention_mask"] == 0).any()  # the padded batch did carry padding
    # prompt masking holds: the same answer tokens carry labels (shifted: the token each position predicts)
    free_labels = free_batch["labels"][0]
    padded_labels = padded_batch["labels"][padded_batch["labels"] != -100]
    assert free_labels[free_labels != -100].tolist() == padded_labels.tolist()
    assert 0 < len(padded_labels) < padded_batch["attention_mask"].sum()
    # the loss is the mean over the batch's answer tokens either way, step after step
    assert len(free) == len(padded) == 2
    assert free == pytest.approx(padded, rel=1e-4)


def test_padding_free_falls_back_to_padded_batches_where_examples_would_see_each_other(tiny_llama_path, tokenizer,
                                                                                       train_file):
    model = tiny_llama(tiny_llama_path)

    class IgnoresPositions(torch.nn.Module):  # an attention that treats the row as one sequence
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    leaky = IgnoresPositions(model)
    chosen = choose_batching(leaky, tokenizer, packing=False, padding_free="auto")
    assert not chosen.padding_free and chosen.plan.startswith("padded batches: padding-free rows would let examples "
                                                              "attend to each other")
    assert SftTask().training_plan(leaky, tokenizer, options(train_file)) == {"batching": chosen.plan}
    plan = SftTask().training_plan(model, tokenizer, options(train_file))["batching"]
    assert plan.startswith("padding-free") and "sdpa" in plan
    with pytest.raises(Refusal, match="padding-free batches would let examples attend") as info:
        choose_batching(leaky, tokenizer, packing=False, padding_free=True)
    assert info.value.where == "task.padding_free"
    assert choose_batching(model, tokenizer, packing=False, padding_free=False).plan == \
        "padded batches (task.padding_free = false)"

    from peft import PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(tiny_llama(tiny_llama_path),
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    chosen = choose_batching(prompt_tuned, tokenizer, packing=False, padding_free="auto")
    assert not chosen.padding_free and "prompt or prefix tuning" in chosen.plan

    with torch.device("meta"):  # a process that holds no weights (FSDP's CPU-RAM-efficient loading)
        from transformers import AutoConfig, AutoModelForCausalLM

        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_path))
    chosen = choose_batching(empty, tokenizer, packing=False, padding_free="auto")
    assert not chosen.padding_free and "weights are not loaded here" in chosen.plan


def test_packing_needs_padding_free_rows(train_file):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="packing = true needs padding-free rows"):
        options(train_file, packing=True, padding_free=False)
    assert options(train_file, packing=True).padding_free == "auto"


# -- fused kernels ---------------------------------------------------------------------------------
def test_liger_kernels_are_refused_on_a_cpu_or_without_the_package(monkeypatch):
    liger = TrainSection(kernels="liger")
    with pytest.raises(UserError, match="needs a CUDA GPU") as info:
        speed.check(liger, cuda=False)
    assert info.value.where == "train.kernels"
    monkeypatch.setattr(speed, "liger_installed", lambda: False)
    with pytest.raises(UserError, match="needs the liger-kernel package"):
        speed.check(liger, cuda=True)
    speed.check(TrainSection(), cuda=False)  # auto: silently off
    assert speed.kernels(TrainSection(), cuda=False) == (False, "off (auto: no CUDA GPU)")
    assert speed.kernels(TrainSection(), cuda=True) == (False, "off (auto: liger-kernel is not installed)")
    assert "use_liger_kernel" not in speed.training_arguments(TrainSection(), cuda=True)


def test_liger_kernels_where_installed_on_a_gpu(monkeypatch):
    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"llama", "gemma3"})
    args = speed.training_arguments(TrainSection(), cuda=True, model_type="llama")
    assert args["use_liger_kernel"] is True
    # TRL's fused LM head computes the loss; Liger's fused linear cross-entropy would replace it
    assert args["liger_kernel_config"] == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                           "fused_linear_cross_entropy": False}
    assert speed.plan(TrainSection(), cuda=True, model_type="llama").startswith("kernels liger (RMSNorm, RoPE, SwiGLU)")
    assert speed.kernels(TrainSection(), cuda=True, model_type="bert") == \
        (False, "off (auto: Liger has no kernels for bert)")
    with pytest.raises(UserError, match="no kernels for model type 'bert'"):
        speed.kernels(TrainSection(kernels="liger"), cuda=True, model_type="bert")
    assert "use_liger_kernel" not in speed.training_arguments(TrainSection(kernels="off"), cuda=True,
                                                              model_type="llama")


def test_liger_on_a_model_type_without_kernels_is_refused_before_data_and_weights_load(monkeypatch, host, tmp_path):
    """The model type is known once its config is read: the refusal comes there, not after
    data preparation and model loading (the plan used to be where it was found)."""
    from petune import precision, runner

    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"gemma3"})
    monkeypatch.setattr(precision, "cuda_device", lambda device=None: True)
    monkeypatch.setattr(runner, "prepare_data", lambda *a: pytest.fail("data prepared before the refusal"))
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = validated_recipe(host, tmp_path, task={"name": "sft", "train": "train.jsonl", "max_length": 64},
                              strategy={"name": "lora"}, train={"kernels": "liger"})
    with pytest.raises(UserError, match="no kernels for model type 'llama'"):
        runner.run(recipe, host, dry_run=True)


def test_petune_refuses_liger_kernels_on_a_cpu_before_loading_anything():
    done = subprocess.run([sys.executable, "-m", "petune", "validate", str(REPO / "recipes" / "lora_sft.toml"),
                           "--set", "train.kernels=liger"], capture_output=True, text=True, cwd=REPO, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "train.kernels = 'liger' needs a CUDA GPU" in done.stderr + done.stdout


# -- torch.compile -----------------------------------------------------------------------------------
def test_compile_trains_with_the_loss_of_the_eager_model(tiny_llama_path, tokenizer, train_file, tmp_path,
                                                         monkeypatch):
    """``compile = true`` becomes TrainingArguments' ``torch_compile``. Inductor needs minutes of
    C++ compilation on a small CPU, so the run here compiles with the ``aot_eager`` backend: the
    same graph capture (dynamo, AOT autograd) without generating code."""
    assert speed.training_arguments(TrainSection(compile=True), cuda=False)["torch_compile"] is True
    assert speed.training_arguments(TrainSection(), cuda=False)["torch_compile"] is False
    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):  # TrainingArguments sets them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    torch._dynamo.reset()
    opts = options(train_file, padding_free=False)
    eager, _ = train_losses(lambda: tiny_llama(tiny_llama_path), tokenizer, opts, tmp_path / "eager", max_steps=1)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, _ = train_losses(lambda: tiny_llama(tiny_llama_path), tokenizer, opts, tmp_path / "compiled",
                               max_steps=1, torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] > 0  # the model did go through torch.compile
    torch._dynamo.reset()
    assert len(compiled) == 1 and compiled == pytest.approx(eager, rel=1e-4)


# -- activation offloading -------------------------------------------------------------------------------
def test_activation_offloading_gives_the_same_loss_and_gradients(tiny_llama_path, tokenizer, train_file, tmp_path):
    """On a GPU each training step runs inside TRL's offloading context (tensors saved for the
    backward pass go to CPU memory and come back). Here the context is made to take the CPU for
    the accelerator, so it really moves every saved tensor out and back: the loss and the
    gradients stay the same. With gradient checkpointing what it moves is the layers' inputs."""
    opts = options(train_file, padding_free=False)
    task = SftTask()
    data = task.load_data(opts, tokenizer)

    def step(offload: bool, checkpointing: bool):
        model = tiny_llama(tiny_llama_path)
        trainer = task.make_trainer(model=model, tokenizer=tokenizer, data=data, options=opts,
                                    args=args(tmp_path, gradient_checkpointing=checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False},
                                              max_grad_norm=0.0), callbacks=[])
        saved = []
        if offload:
            with mock.patch.object(torch.accelerator, "current_accelerator", return_value=torch.device("cpu")):
                context = speed.offloading_context(trainer.model, use_pin_memory=False, use_streams=False)
            pack = context.pack_hook
            context.pack_hook = lambda tensor: (saved.append(tensor.numel()), pack(tensor))[1]
            speed.wrap_training_step(trainer, context)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model.train()
        with mock.patch.object(torch.cpu, "empty_cache", lambda: None, create=True):  # called once bnb is imported
            loss = trainer.training_step(model, batch, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()))
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved

    for checkpointing in (False, True):
        plain_loss, plain_grads, _ = step(False, checkpointing)
        loss, grads, saved = step(True, checkpointing)
        assert saved, "nothing went through the offloading hooks"
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_offloading_is_a_no_op_on_a_cpu_and_the_plan_says_so():
    class Trainer:
        def training_step(self):
            return "plain"

    trainer = Trainer()
    step = trainer.training_step
    speed.offload_activations(trainer, TrainSection(activation_offloading=True), cuda=False)
    assert trainer.training_step == step
    plan = speed.plan(TrainSection(activation_offloading=True), cuda=False)
    assert "activation offloading on, no effect on a CPU" in plan
    assert "layer inputs only" in speed.plan(TrainSection(activation_offloading=True, gradient_checkpointing=True),
                                             cuda=True)
    speed.offload_activations(trainer, TrainSection(), cuda=True)  # off: nothing changes on a GPU either
    assert trainer.training_step == step


def test_the_memory_estimate_counts_offloaded_activations_on_a_gpu_only():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    from petune import memory
    from petune.api import ModelShape

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    shape = ModelShape("AutoModelForCausalLM", labels="tokens", causal_lm_loss=True)
    model = get_peft_model(memory.build_skeleton(config, shape, torch.float32),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for checkpointing in (False, True):
        kwargs = {"batch": 2, "seq": 128, "gradient_checkpointing": checkpointing, "shape": shape, "capacity": None}
        plain = memory.estimate(model, device="cuda", **kwargs)
        offloaded = memory.estimate(model, device="cuda", activation_offloading=True, **kwargs)
        moved = offloaded.details["offloaded_to_cpu"]
        # of eight layers' kept activations (all of a layer's, or its input under checkpointing), two layers'
        # worth stay on the GPU
        if not checkpointing:
            assert moved == pytest.approx(6 * plain.details["activations_per_layer"], rel=0.1)
        assert 0 < moved < plain.parts["activations"]
        assert offloaded.parts["activations"] == plain.parts["activations"] - moved
        assert offloaded.peak < plain.peak
        on_cpu = memory.estimate(model, device="cpu", activation_offloading=True, **kwargs)
        assert on_cpu.details["offloaded_to_cpu"] == 0
