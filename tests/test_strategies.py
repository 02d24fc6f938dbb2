"""The five first-party strategies on tiny random models (CPU, seconds each).

For every strategy: trainable counts match the formula, one optimiser run changes exactly
the intended tensors (frozen ones stay bit-identical, every trainable one gets a gradient),
save → restore onto a fresh base gives the same logits, merges match, refusals say why.
A stub task stands in for the real task plugins: it only names the peft task type and head.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from pydantic import ValidationError
from safetensors.torch import load_file

from petune.api import ModelInfo, Task, count_parameters
from petune.errors import Refusal, UserError

transformers.logging.set_verbosity_error()


class StubTask(Task):
    name = "stub"

    def __init__(self, peft_task_type: str, heads: list[str] = ()):
        self.peft_task_type = peft_task_type
        self.heads = list(heads)

    def head_modules(self, model):
        return list(self.heads)


KINDS = {  # kind → (fixture with the model folder, auto class, task)
    # The tiny BERT checkpoint has no pooler (saved from an MLM), so like the classifier it is
    # random at each load and must train and travel with the adapter: it is part of the head.
    "bert-seq": ("tiny_bert_path", "AutoModelForSequenceClassification", StubTask("SEQ_CLS", ["bert.pooler", "classifier"])),
    "bert-tok": ("tiny_bert_path", "AutoModelForTokenClassification", StubTask("TOKEN_CLS", ["classifier"])),
    "llama-lm": ("tiny_llama_path", "AutoModelForCausalLM", StubTask("CAUSAL_LM")),
    "llama-seq": ("tiny_llama_path", "AutoModelForSequenceClassification", StubTask("SEQ_CLS", ["score"])),
}
HIDDEN, LAYERS = 64, 2  # both tiny models


@pytest.fixture
def build(request):
    """build(kind, seed=0, **from_pretrained_kwargs) → (model, task, batch). Weights the
    checkpoint lacks (heads, BERT's pooler) are drawn from ``seed``: same seed, same model."""

    def _build(kind, seed=0, **kwargs):
        fixture, auto, task = KINDS[kind]
        path = request.getfixturevalue(fixture)
        if not kind.endswith("lm"):
            kwargs.setdefault("num_labels", 3)
        torch.manual_seed(seed)
        model = getattr(transformers, auto).from_pretrained(path, **kwargs)
        return model, task, make_batch(kind)

    return _build


def make_batch(kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0  # both tiny tokenizers pad with id 0
    if kind.endswith("seq"):
        labels = torch.tensor([0, 2])
    elif kind.endswith("tok"):
        labels = torch.randint(0, 3, (2, 7), generator=g).masked_fill(mask == 0, -100)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def strategy(name, **options):
    from petune.plugins import PluginHost

    s = PluginHost(autoload=False).strategy(name)
    return s, s.Options(**options)


def is_head(name, task):
    return any(name.startswith(h + ".") for h in task.heads)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def n_trainable(model):
    return count_parameters(model)[0]


def numel(module):
    return sum(p.numel() for p in module.parameters())


def train(model, batch, steps=2):
    """A few AdamW steps. Two, because LoRA's A and an adapter's down projection get no
    gradient on the first step (their partner starts at zero)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def check_training(model, batch, steps=2):
    """Train; frozen tensors stay bit-identical, trainable ones change and all get gradients."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, batch, steps)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.zero_grad()


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- registration and options --------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "lora", "qlora", "adapters", "prompt_tuning"])
def test_registered_with_strict_options(name):
    s, defaults = strategy(name)
    assert s.name == name and s.description
    with pytest.raises(ValidationError, match="extra"):
        s.Options(no_such_option=1)


def test_options_are_validated():
    s, _ = strategy("lora")
    with pytest.raises(ValidationError):
        s.Options(r="8")  # strict: no string → int coercion
    with pytest.raises(ValidationError):
        s.Options(r=0)
    with pytest.raises(ValidationError):
        s.Options(target_modules="q_proj")  # 'all-linear' or a list
    with pytest.raises(ValidationError):
        s.Options(target_modules=[])
    q, _ = strategy("qlora")
    with pytest.raises(ValidationError):
        q.Options(quant_type="int4")
    p, _ = strategy("prompt_tuning")
    with pytest.raises(ValidationError, match="prefix tuning has no text init"):
        p.Options(method="prefix", init="text")
    with pytest.raises(ValidationError, match="init_text is only used"):
        p.Options(init="random", init_text="hello")
    a, _ = strategy("adapters")
    with pytest.raises(ValidationError):
        a.Options(non_linearity="softmax")


# -- full ----------------------------------------------------------------------------------
def test_full_trains_everything_and_reloads_exactly(build, tmp_path):
    model, task, batch = build("bert-seq")
    s, opts = strategy("full")
    model = s.apply(model, task, opts)
    assert n_trainable(model) == count_parameters(model)[1]
    check_training(model, batch)
    expected = logits(model, batch)

    s.save(model, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    fresh, _, _ = build("bert-seq", seed=1)
    restored = s.restore(fresh, tmp_path / "model", task, opts)
    assert torch.equal(logits(restored, batch), expected)


def test_full_top_layers_without_embeddings(build):
    model, task, batch = build("llama-lm")
    s, opts = strategy("full", train_top_layers=1, train_embeddings=False)
    model = s.apply(model, task, opts)
    # top layer + what sits above it (final norm, untied lm_head); layer 0 and embeddings frozen
    assert n_trainable(model) == numel(model.model.layers[1]) + numel(model.model.norm) + numel(model.lm_head)
    assert not model.model.embed_tokens.weight.requires_grad
    check_training(model, batch)


def test_full_frozen_embeddings_freeze_a_tied_output_layer(tiny_bert_path):
    model = transformers.AutoModelForMaskedLM.from_pretrained(tiny_bert_path)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    s, opts = strategy("full", train_embeddings=False)
    model = s.apply(model, StubTask("CAUSAL_LM"), opts)
    assert not model.cls.predictions.decoder.weight.requires_grad
    frozen = numel(model.bert.embeddings)
    assert count_parameters(model) == (count_parameters(model)[1] - frozen, count_parameters(model)[1])


def test_full_zero_top_layers_is_a_probe_with_head(build):
    model, task, batch = build("bert-seq")
    s, opts = strategy("full", train_top_layers=0)
    model = s.apply(model, task, opts)
    expected = numel(model.bert.embeddings) + numel(model.bert.pooler) + numel(model.classifier)
    assert n_trainable(model) == expected  # embeddings (train_embeddings defaults to true) + what is above the layers
    assert trainable_names(model) >= {"classifier.weight", "classifier.bias"}


def test_full_refusals(tiny_llama_path, build):
    s, opts = strategy("full", train_top_layers=3)
    info = ModelInfo.from_path("tiny-llama", tiny_llama_path)
    with pytest.raises(Refusal, match="has only 2 layers"):
        s.check(KINDS["llama-lm"][2], info, opts)
    model, task, _ = build("llama-lm")
    with pytest.raises(Refusal, match="nothing to merge"):
        s.merge(model)
    info.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(Refusal, match="quantised"):
        s.check(task, info, strategy("full")[1])


# -- lora ----------------------------------------------------------------------------------
def lora_size(r, pairs):
    """r × (in + out) per targeted linear."""
    return sum(r * (i + o) for i, o in pairs)


BERT_LAYER_LINEARS = [(64, 64)] * 4 + [(64, 128), (128, 64)]  # q, k, v, attn out, intermediate, output
BERT_SEQ_HEAD = (64 * 64 + 64) + (64 * 3 + 3)  # pooler + classifier, trained in full (modules_to_save)
BERT_TOK_HEAD = 64 * 3 + 3
LLAMA_LAYER_LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down


@pytest.mark.parametrize("kind, options, expected", [
    # all-linear: every linear but the output layer and the head modules
    ("bert-seq", {"r": 4}, lora_size(4, BERT_LAYER_LINEARS * LAYERS) + BERT_SEQ_HEAD),
    ("bert-tok", {"r": 2}, lora_size(2, BERT_LAYER_LINEARS * LAYERS) + BERT_TOK_HEAD),
    # a plain linear outside the head is targeted too: BERT's pooler when it is not a head module
    ("bert-seq-no-pooler-head", {"r": 4}, lora_size(4, BERT_LAYER_LINEARS * LAYERS + [(64, 64)]) + BERT_TOK_HEAD),
    ("llama-lm", {"r": 4}, lora_size(4, LLAMA_LAYER_LINEARS * LAYERS)),  # lm_head excluded
    ("llama-lm", {"r": 8, "target_modules": ["q_proj", "v_proj"]}, lora_size(8, [(64, 64), (64, 32)] * LAYERS)),
    # DoRA adds a magnitude per output feature
    ("llama-lm", {"r": 4, "use_dora": True}, lora_size(4, LLAMA_LAYER_LINEARS * LAYERS) + sum(o for _, o in LLAMA_LAYER_LINEARS) * LAYERS),
    ("llama-seq", {"r": 4, "use_rslora": True}, lora_size(4, LLAMA_LAYER_LINEARS * LAYERS) + 64 * 3),
])
def test_lora_counts_and_training(build, kind, options, expected):
    if kind == "bert-seq-no-pooler-head":
        (model, _, batch), task = build("bert-seq"), StubTask("SEQ_CLS", ["classifier"])
    else:
        model, task, batch = build(kind)
    s, opts = strategy("lora", **options)
    peft_model = s.apply(model, task, opts)
    assert n_trainable(peft_model) == expected
    assert all("lora_" in n or "modules_to_save" in n for n in trainable_names(peft_model))
    check_training(peft_model, batch)


def test_lora_rslora_scaling(build):
    model, task, _ = build("llama-lm")
    s, opts = strategy("lora", r=4, alpha=8, use_rslora=True)
    peft_model = s.apply(model, task, opts)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


def test_lora_bias_all_trains_biases(build):
    model, task, batch = build("bert-seq")
    base_biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not is_head(n, task))
    s, opts = strategy("lora", r=4, bias="all")
    peft_model = s.apply(model, task, opts)
    assert n_trainable(peft_model) == lora_size(4, BERT_LAYER_LINEARS * LAYERS) + BERT_SEQ_HEAD + base_biases
    check_training(peft_model, batch)


@pytest.mark.parametrize("kind", ["llama-seq", "bert-tok", "bert-seq"])
def test_lora_reload_keeps_trained_head(build, tmp_path, kind):
    """The fresh base is built with another seed: its head is different random weights, so
    equal logits prove the trained head came back from the adapter folder."""
    from peft import PeftModel

    model, task, batch = build(kind)
    s, opts = strategy("lora", r=4)
    peft_model = s.apply(model, task, opts)
    train(peft_model, batch)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= set(task.heads)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(task.heads[-1] in k for k in saved)

    restored = s.restore(build(kind, seed=1)[0], tmp_path / "adapter", task, opts)
    torch.testing.assert_close(logits(restored, batch), expected)
    plain = PeftModel.from_pretrained(build(kind, seed=2)[0], str(tmp_path / "adapter"))  # no petune involved
    torch.testing.assert_close(logits(plain, batch), expected)


@pytest.mark.parametrize("kind", ["llama-lm", "bert-seq"])
def test_lora_merge_matches_adapter(build, kind):
    model, task, batch = build(kind)
    s, opts = strategy("lora", r=4)
    peft_model = s.apply(model, task, opts)
    train(peft_model, batch)
    expected = logits(peft_model, batch)
    merged = s.merge(peft_model)
    assert isinstance(merged, transformers.PreTrainedModel)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-4)


def test_lora_unknown_target_module_names_the_real_ones(build):
    model, task, _ = build("llama-lm")
    s, opts = strategy("lora", target_modules=["qproj"])
    with pytest.raises(UserError, match=r"\['qproj'\] match no module") as err:
        s.apply(model, task, opts)
    assert "q_proj" in str(err.value)


def test_unknown_head_module_is_an_error(build):
    model, _, _ = build("bert-seq")
    s, opts = strategy("lora", r=4)
    with pytest.raises(UserError, match="head module 'score'"):
        s.apply(model, StubTask("SEQ_CLS", ["score"]), opts)


# -- qlora ---------------------------------------------------------------------------------
def qlora_kwargs(**options):
    s, opts = strategy("qlora", **options)
    return s, opts, s.load_kwargs(opts)


def test_qlora_load_kwargs():
    _, _, kwargs = qlora_kwargs(quant_type="fp4", double_quant=False, compute_dtype="float16")
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert kwargs["device_map"] == {"": torch.device("cpu")}  # no GPU here; bnb models cannot be moved later


@pytest.mark.parametrize("kind, heads", [("llama-lm", 0), ("bert-tok", BERT_TOK_HEAD)])
def test_qlora_counts_and_training(build, kind, heads):
    s, opts, kwargs = qlora_kwargs(r=4, compute_dtype="float32")
    model, task, batch = build(kind, **kwargs)
    full_total = count_parameters(build(kind)[0])[1]
    peft_model = s.apply(model, task, opts)
    linears = LLAMA_LAYER_LINEARS if kind.startswith("llama") else BERT_LAYER_LINEARS
    lora = lora_size(4, linears * LAYERS)
    # 4-bit weights counted at their real number; peft keeps the original head beside its trained copy
    assert count_parameters(peft_model) == (lora + heads, full_total + lora + heads)
    assert peft_model.training
    check_training(peft_model, batch)  # includes: packed 4-bit weights bit-identical


def test_qlora_keeps_load_dtype_and_trains_with_checkpointing(build):
    """No prepare_model_for_kbit_training: norms and embeddings stay bf16 (no fp32 upcast);
    only the LoRA weights are fp32. Non-reentrant checkpointing, as the trainer sets it."""
    s, opts, kwargs = qlora_kwargs(r=4)  # default compute dtype: auto
    model, task, batch = build("llama-lm", dtype=torch.bfloat16, **kwargs)
    peft_model = s.apply(model, task, opts)
    dtypes = {n: p.dtype for n, p in peft_model.named_parameters() if p.is_floating_point()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_training(peft_model, batch)


def test_qlora_reload_and_merge_into_unquantised_base(build, tmp_path):
    s, opts, kwargs = qlora_kwargs(r=4, compute_dtype="float32")
    model, task, batch = build("llama-seq", **kwargs)
    peft_model = s.apply(model, task, opts)
    train(peft_model, batch)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")

    restored = s.restore(build("llama-seq", seed=1, **kwargs)[0], tmp_path / "adapter", task, opts)
    # the trained model's kernels: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights
    # for inference and computes in bf16, which would hide nothing but add rounding here
    for module in restored.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(logits(restored, batch), expected, atol=1e-4, rtol=1e-3)

    # the merge path: base loaded without load_kwargs (fp32 here), adapter restored, merged
    unquantised = s.restore(build("llama-seq", seed=1)[0], tmp_path / "adapter", task, opts)
    adapter_logits = logits(unquantised, batch)
    merged = s.merge(unquantised)
    assert isinstance(merged, transformers.PreTrainedModel) and count_parameters(merged)[1] == count_parameters(build("llama-seq")[0])[1]
    torch.testing.assert_close(logits(merged, batch), adapter_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_for_inference_keeps_outputs_and_dequantises_once(build, monkeypatch, compute_dtype):
    """On a CPU the 4-bit weights are dequantised once for inference, not at every forward
    (every generated token): the same outputs, no dequantisation per call."""
    import bitsandbytes as bnb

    s, opts, kwargs = qlora_kwargs(r=4, compute_dtype=compute_dtype)
    model, task, batch = build("llama-lm", **kwargs)
    peft_model = s.apply(model, task, opts)
    with torch.no_grad():
        base_alone = logits(peft_model, batch)  # LoRA's B starts at zero
    train(peft_model, batch)
    with torch.no_grad():
        expected = logits(peft_model, batch)
        assert s.for_inference(peft_model, opts) is peft_model
        logits(peft_model, batch)  # the first forward folds the adapter into the kept weights
        calls = []
        real = bnb.functional.dequantize_4bit
        monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(torch.ops.bitsandbytes, "gemm_4bit", None, raising=False)
        fast = logits(peft_model, batch)
        assert not calls
        with peft_model.disable_adapter():  # the base alone: the fold is taken out again ...
            without = logits(peft_model, batch)
        again = logits(peft_model, batch)  # ... and put back
    head = peft_model.get_output_embeddings()  # generation hands it a strided 3-D slice: it computes on 2-D rows
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, *args, **kw: seen.append((x.dim(), x.is_contiguous())) or real_linear(x, *args, **kw))
    with torch.no_grad():
        x = torch.randn(2, 5, head.in_features)[:, -1:, :]
        out = head(x)
    assert seen == [(2, True)] and out.shape == (2, 1, head.out_features)
    torch.testing.assert_close(out, real_linear(x, head.weight, head.bias))
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[compute_dtype]
    torch.testing.assert_close(fast, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(again, fast, atol=0, rtol=0)
    torch.testing.assert_close(without, base_alone, atol=tolerance, rtol=tolerance)
    assert (without - fast).abs().max() > 10 * tolerance  # the adapter matters
    folding = [m for m in peft_model.modules() if callable(getattr(m, "petune_fold", None))]
    assert len(folding) == (14 if compute_dtype == "float32" else 0)  # bf16 keeps peft's exact path


def test_qlora_merge_into_4bit_warns(build):
    s, opts, kwargs = qlora_kwargs(r=4, compute_dtype="float32")
    model, task, _ = build("llama-lm", **kwargs)
    with pytest.warns(UserWarning, match="loses accuracy"):
        s.merge(s.apply(model, task, opts))


def test_qlora_refusals(monkeypatch, tiny_llama_path):
    s, opts = strategy("qlora")
    task = KINDS["llama-lm"][2]
    info = ModelInfo.from_path("tiny-llama", tiny_llama_path)
    s.check(task, info, opts)
    s.check(task, None, opts)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    with pytest.raises(Refusal, match="qlora needs bitsandbytes") as err:
        s.check(task, None, opts)
    assert "strategy 'lora'" in err.value.hint
    monkeypatch.undo()
    info.config.quantization_config = {"quant_method": "awq"}
    with pytest.raises(Refusal, match=r"already quantised \(awq\)"):
        s.check(task, info, opts)
    info.config.quantization_config = {"quant_method": "gguf"}  # dequantised on load: plain weights
    s.check(task, info, opts)


# -- adapters ------------------------------------------------------------------------------
def bottleneck_size(h, b):
    return 2 * h * b + h + b  # down (h·b + b) + up (b·h + h)


@pytest.mark.parametrize("kind, options, per_layer, head", [
    ("bert-seq", {"config": "houlsby"}, 2 * bottleneck_size(64, 4), BERT_SEQ_HEAD),
    ("bert-tok", {"config": "pfeiffer", "reduction_factor": 8}, bottleneck_size(64, 8), BERT_TOK_HEAD),
    ("llama-lm", {"config": "houlsby", "bottleneck_size": 5, "non_linearity": "swish"}, 2 * bottleneck_size(64, 5), 0),
    ("llama-seq", {"config": "pfeiffer", "non_linearity": "tanh"}, bottleneck_size(64, 4), 64 * 3),
])
def test_adapter_counts_identity_and_training(build, kind, options, per_layer, head):
    model, task, batch = build(kind)
    before = logits(model, batch)
    s, opts = strategy("adapters", **options)
    model = s.apply(model, task, opts)
    assert n_trainable(model) == LAYERS * per_layer + head
    assert all(".petune_adapter." in n or is_head(n, task) for n in trainable_names(model))
    assert torch.equal(logits(model, batch), before)  # zero-initialised up projection: identity
    check_training(model, batch)


@pytest.mark.parametrize("kind", ["bert-seq", "llama-lm"])
def test_adapter_save_restore_exact(build, tmp_path, kind):
    model, task, batch = build(kind)
    s, opts = strategy("adapters", config="houlsby", residual=False)
    model = s.apply(model, task, opts)
    train(model, batch)
    expected = logits(model, batch)
    s.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["petune_adapter"] == "bottleneck" and config["config"] == "houlsby" and config["residual"] is False
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(".petune_adapter." in k or is_head(k, task) for k in saved)
    head_tensors = sum(len(model.get_submodule(h).state_dict()) for h in task.heads)
    assert len(saved) == 4 * 2 * LAYERS + head_tensors  # down/up weight/bias × 2 sites × layers

    # the saved config, not the options, decides the shape: restore with different options
    restored = s.restore(build(kind, seed=1)[0], tmp_path / "adapter", task, strategy("adapters")[1])
    assert torch.equal(logits(restored, batch), expected)


@pytest.mark.parametrize("kind, norms", [
    # BERT: two LayerNorms (weight + bias) per layer and the embeddings' one
    ("bert-seq", (2 * LAYERS + 1) * 2 * HIDDEN),
    # Llama: two RMSNorms (weight only) per layer and the final one
    ("llama-lm", (2 * LAYERS + 1) * HIDDEN),
])
def test_adapter_train_layer_norms(build, tmp_path, kind, norms):
    model, task, batch = build(kind)
    s, opts = strategy("adapters", config="houlsby")
    plain = n_trainable(s.apply(build(kind)[0], task, opts))
    s, opts = strategy("adapters", config="houlsby", train_layer_norms=True)
    model = s.apply(model, task, opts)
    assert n_trainable(model) == plain + norms
    assert {n for n in trainable_names(model) if ".petune_adapter." not in n and not is_head(n, task)} == {
        n for n, _ in model.named_parameters() if "norm" in n.lower()}
    check_training(model, batch)
    expected = logits(model, batch)
    s.save(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for k, t in saved.items() if "norm" in k.lower()) == norms
    restored = s.restore(build(kind, seed=1)[0], tmp_path / "adapter", task, strategy("adapters")[1])
    assert torch.equal(logits(restored, batch), expected)  # the trained norms came back, not the base's


def test_adapter_refusals(build, tmp_path, tiny_bert_path):
    s, opts = strategy("adapters")
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"])
    with pytest.raises(Refusal, match="do not know where to go in GPT2Block"):
        s.check(KINDS["llama-lm"][2], ModelInfo("gpt2", tmp_path, gpt2), opts)
    s.check(KINDS["bert-seq"][2], ModelInfo.from_path("tiny-bert", tiny_bert_path), opts)
    model, task, _ = build("bert-seq")
    with pytest.raises(Refusal, match="cannot be merged"):
        s.merge(s.apply(model, task, opts))
    with pytest.raises(UserError, match="no adapter_config.json"):
        s.restore(build("bert-seq")[0], tmp_path, task, opts)


# -- prompt tuning -------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options, expected", [
    ("llama-lm", {"num_virtual_tokens": 5}, 5 * HIDDEN),
    ("bert-seq", {"num_virtual_tokens": 4, "init": "random"}, 4 * HIDDEN + BERT_SEQ_HEAD),
    # prefix: a key and a value prefix per layer; Llama's 2 kv heads × 16 = 32 wide
    ("llama-lm", {"method": "prefix", "num_virtual_tokens": 3}, 3 * LAYERS * 2 * 32),
    ("llama-seq", {"method": "prefix", "num_virtual_tokens": 3}, 3 * LAYERS * 2 * 32 + 64 * 3),
    ("bert-tok", {"method": "prefix", "num_virtual_tokens": 4}, 4 * LAYERS * 2 * HIDDEN + BERT_TOK_HEAD),
])
def test_prompt_tuning_counts_and_training(build, kind, options, expected):
    model, task, batch = build(kind)
    s, opts = strategy("prompt_tuning", **options)
    s.check(task, None, opts)
    peft_model = s.apply(model, task, opts)
    assert n_trainable(peft_model) == expected
    assert all("prompt_encoder" in n or "modules_to_save" in n for n in trainable_names(peft_model))
    check_training(peft_model, batch, steps=1)


def test_prompt_tuning_text_init_uses_the_text_embeddings(build, tiny_llama_path):
    model, task, _ = build("llama-lm")
    embeddings = model.get_input_embeddings().weight.detach().clone()
    s, opts = strategy("prompt_tuning", num_virtual_tokens=6, init_text="the quick brown fox")
    peft_model = s.apply(model, task, opts)
    ids = transformers.AutoTokenizer.from_pretrained(tiny_llama_path)("the quick brown fox")["input_ids"]
    prompt = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt[: len(ids)], embeddings[ids])


def test_prompt_tuning_text_init_needs_a_tokenizer(build):
    model, task, _ = build("llama-lm")
    model.name_or_path = model.config._name_or_path = ""
    s, opts = strategy("prompt_tuning")
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        s.apply(model, task, opts)


@pytest.mark.parametrize("kind, options", [("bert-seq", {"num_virtual_tokens": 4}),
                                           ("llama-lm", {"num_virtual_tokens": 4}),
                                           ("bert-tok", {"method": "prefix", "num_virtual_tokens": 4})])
def test_prompt_tuning_reloads_with_plain_peft(build, tmp_path, kind, options):
    from peft import PeftModel

    model, task, batch = build(kind)
    s, opts = strategy("prompt_tuning", **options)
    peft_model = s.apply(model, task, opts)
    train(peft_model, batch, steps=1)
    expected = logits(peft_model, batch)
    s.save(peft_model, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(build(kind, seed=1)[0], str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(plain, batch), expected)
    restored = s.restore(build(kind, seed=2)[0], tmp_path / "adapter", task, opts)
    torch.testing.assert_close(logits(restored, batch), expected)


def test_prefix_tuning_stops_under_gradient_checkpointing(build):
    model, task, batch = build("llama-lm")
    s, opts = strategy("prompt_tuning", method="prefix", num_virtual_tokens=3)
    peft_model = s.apply(model, task, opts)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logits(peft_model, batch)  # inference is not affected
    peft_model.train()
    with pytest.raises(UserError, match="prefix tuning does not work with gradient checkpointing"):
        peft_model(**batch)


def test_prompt_tuning_refusals(tiny_llama_path, tiny_bert_path, build):
    s, opts = strategy("prompt_tuning")
    with pytest.raises(Refusal, match="shifts token logits away from the per-token labels") as err:
        s.check(KINDS["bert-tok"][2], None, opts)
    assert "method = 'prefix'" in err.value.hint
    llama = ModelInfo.from_path("tiny-llama", tiny_llama_path)
    with pytest.raises(Refusal, match="cannot find the last real token"):
        s.check(KINDS["llama-seq"][2], llama, opts)
    s.check(KINDS["bert-seq"][2], ModelInfo.from_path("tiny-bert", tiny_bert_path), opts)  # encoders are fine
    s.check(KINDS["llama-seq"][2], llama, strategy("prompt_tuning", method="prefix")[1])
    model, task, _ = build("llama-lm")
    with pytest.raises(Refusal, match="cannot be merged"):
        s.merge(s.apply(model, task, opts))


def test_prompt_tuning_inputs_must_fit_the_position_table(build, tiny_bert_path, tiny_llama_path):
    """tiny-bert has 128 learned positions: the virtual tokens take some of them."""
    s, opts = strategy("prompt_tuning", num_virtual_tokens=20, init="random")
    bert = ModelInfo.from_path("tiny-bert", tiny_bert_path)
    with pytest.raises(Refusal, match="128 learned positions") as err:
        s.check(KINDS["bert-seq"][2], bert, strategy("prompt_tuning", num_virtual_tokens=128)[1])
    assert err.value.where == "strategy.num_virtual_tokens"
    model, task, _ = build("bert-seq")
    peft_model = s.apply(model, task, opts)
    ids = torch.randint(5, 300, (2, 108))
    peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))  # 108 + 20 = 128 fits
    ids = torch.randint(5, 300, (2, 109))
    with pytest.raises(UserError, match="109 tokens plus 20 virtual tokens") as err:
        peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert err.value.where == "task.max_length" and "≤ 108" in err.value.hint
    # rotary positions have no table to overflow
    s.check(KINDS["llama-lm"][2], ModelInfo.from_path("tiny-llama", tiny_llama_path),
            strategy("prompt_tuning", num_virtual_tokens=4096)[1])


def test_loraplus_gives_lora_b_a_higher_learning_rate(host, tiny_bert_path, tmp_path, capsys):
    """LoRA+ through Strategy.make_optimizer: B matrices at ratio × lr, A at lr, and a run uses it."""
    import torch
    from helpers import tiny_classification_recipe

    from petune.api import ModelInfo
    from petune.cli import main

    strategy, task = host.strategy("lora"), host.task("classification")
    options = strategy.Options(r=4, loraplus_lr_ratio=16.0)
    info = ModelInfo.from_path("tiny-bert", tiny_bert_path)
    model = strategy.apply(task.build_model(info, task.Options(train=tmp_path / "x.csv"), {"labels": ["a", "b"]}),
                           task, options)
    optimizer = strategy.make_optimizer(model, options, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0})
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    rates = {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    assert {rates[n] for n in rates if "lora_B" in n} == {16e-3}
    assert {rates[n] for n in rates if "lora_A" in n} == {1e-3}
    assert strategy.make_optimizer(model, strategy.Options(r=4), torch.optim.AdamW, {"lr": 1e-3}) is None
    recipe = tiny_classification_recipe(tmp_path, tmp_path / "run", max_steps=2, save_steps=2)
    assert main(["run", str(recipe), "--set", "strategy.loraplus_lr_ratio=16.0"]) == 0, capsys.readouterr().err
