"""QLoRA on a GGUF file's own quantisation (strategy qlora, quant_type "gguf"), on a tiny
Llama written as a Q8_0 GGUF (q/k rows permuted as llama.cpp lays them out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

import transformers  # noqa: E402
from helpers import petune, write_recipe  # noqa: E402

from petune.api import Task  # noqa: E402
from petune.errors import Refusal  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_model_sources import write_tiny_gguf  # noqa: E402

transformers.logging.set_verbosity_error()


class CausalLM(Task):
    name = "stub"
    peft_task_type = "CAUSAL_LM"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tiny_llama_path, tmp_path, cache) -> tuple[Path, Path]:
    """(the .gguf file, the folder the gguf source resolves it to)."""
    from petune_plugins.sources.gguf_file import GgufFileSource

    path = write_tiny_gguf(tiny_llama_path, tmp_path / "tiny-q8_0.gguf")
    return path, GgufFileSource().resolve(str(path))


def qlora(**options):
    from petune.plugins import PluginHost

    s = PluginHost(autoload=False).strategy("qlora")
    return s, s.Options(quant_type="gguf", **options)


def batch():
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def load(folder, s=None, opts=None):
    from petune.api import load_pretrained

    kwargs = s.load_kwargs(opts) if s is not None else {}
    return load_pretrained(transformers.AutoModelForCausalLM, folder, dtype=torch.float32, **kwargs)


def test_blocks_compute_what_transformers_gguf_loader_computes(tiny_gguf):
    from petune_plugins.strategies import gguf_backend

    path, folder = tiny_gguf
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = load(folder)  # dense, then the blocks swapped in
    swapped = gguf_backend.swap_in_blocks(model, path, torch.float32)
    layers = gguf_backend.gguf_layers(model)
    assert len(layers) == 2 * 7 and {layer.gguf_type for layer in layers} == {"Q8_0"}
    assert all(layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad for layer in layers)
    assert type(model.lm_head) is torch.nn.Linear  # the output layer stays dense (fused losses read it)
    assert "Q8_0: 14 layers" in swapped.rows()["gguf base"]
    torch.testing.assert_close(logits(model, batch()), logits(reference, batch()), atol=0, rtol=0)

    # loaded with the strategy's load_kwargs: the blocks go straight into a weightless skeleton
    s, opts = qlora(compute_dtype="float32")
    direct = load(folder, s, opts)
    assert len(gguf_backend.gguf_layers(direct)) == 14 and not any(p.is_meta for p in direct.parameters())
    assert direct._petune_gguf_swapped.quantised == swapped.quantised
    torch.testing.assert_close(logits(direct, batch()), logits(reference, batch()), atol=0, rtol=0)


def test_lora_trains_on_the_blocks_and_restores_merges_and_infers_alike(tiny_gguf, tmp_path):
    from petune_plugins.strategies import gguf_backend

    _, folder = tiny_gguf
    s, opts = qlora(r=4, compute_dtype="float32")
    s.check(CausalLM(), None, opts)
    model = s.apply(load(folder, s, opts), CausalLM(), opts)
    assert "gguf base" in s.training_plan(opts)
    blocks = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert blocks and all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model.train()
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, blocks[n]) for n, p in model.named_parameters() if p.dtype == torch.uint8)
    expected = logits(model, batch())
    s.save(model, tmp_path / "adapter")

    restored = s.restore(load(folder, s, opts), tmp_path / "adapter", CausalLM(), opts)
    torch.testing.assert_close(logits(restored, batch()), expected, atol=1e-5, rtol=1e-4)
    fast = s.for_inference(restored, opts)
    assert all(layer._dense is not None for layer in gguf_backend.gguf_layers(fast))
    torch.testing.assert_close(logits(fast, batch()), expected, atol=1e-5, rtol=1e-4)
    lora_calls = []  # folded: one matmul per layer, LoRA's own two are not run
    for name, module in fast.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *args: lora_calls.append(1))
    logits(fast, batch())
    assert not lora_calls
    # the adapter is folded into the kept weights for the one active adapter: switching to
    # another (petune serve) or disabling it (the base alone) folds again
    s.save(s.apply(load(folder, s, opts), CausalLM(), opts), tmp_path / "untrained")  # B = 0: the base
    fast.load_adapter(str(tmp_path / "untrained"), adapter_name="untrained")
    base_alone = logits(load(folder, s, opts), batch())
    fast.set_adapter("untrained")
    torch.testing.assert_close(logits(fast, batch()), base_alone, atol=1e-5, rtol=1e-4)
    fast.set_adapter("default")
    torch.testing.assert_close(logits(fast, batch()), expected, atol=1e-5, rtol=1e-4)
    with fast.disable_adapter():
        torch.testing.assert_close(logits(fast, batch()), base_alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(fast, batch()), expected, atol=1e-5, rtol=1e-4)
    assert (base_alone - expected).abs().max() > 1e-3

    # merge path: the base as trained, dequantised to plain Linear layers, adapter folded in
    plain = s.dequantize(load(folder, s, opts), opts)
    assert not gguf_backend.gguf_layers(plain)
    merged = s.merge(s.restore(plain, tmp_path / "adapter", CausalLM(), opts))
    torch.testing.assert_close(logits(merged, batch()), expected, atol=1e-4, rtol=1e-4)


def test_gguf_quant_type_needs_a_gguf_base(tiny_llama_path):
    from petune.api import ModelInfo

    s, opts = qlora()
    with pytest.raises(Refusal, match="not a GGUF file"):
        s.check(CausalLM(), ModelInfo.from_path("random:tiny-llama", tiny_llama_path), opts)


def _with_unsupported_tensor(source: Path, target: Path) -> Path:
    """``source`` with its first quantised matrix stored as IQ4_NL instead (same bytes per block)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    swapped = False
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype == gguf.GGMLQuantizationType.Q8_0 and not swapped and tensor.name.startswith("blk."):
            qtype, swapped = gguf.GGMLQuantizationType.IQ4_NL, True
            data = tensor.data[:, : tensor.data.shape[1] // 34 * 18]  # IQ4_NL: 18 bytes per 32 weights
        else:
            data = tensor.data
        writer.add_tensor(tensor.name, data, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_a_file_with_an_unsupported_type_is_refused_naming_it(tiny_gguf, tmp_path, cache):
    path, _ = tiny_gguf
    bad = _with_unsupported_tensor(path, tmp_path / "iq4.gguf")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}"}) + "\n"
                            for i in range(8)))
    recipe = write_recipe(tmp_path / "recipe.toml", model=bad,
                          task={"name": "sft", "train": data, "format": "alpaca", "max_length": 64},
                          strategy={"name": "qlora", "quant_type": "gguf"}, train={"max_steps": 1})
    result = petune("run", recipe, "--dry-run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "IQ4_NL" in result.stderr


def test_memory_estimate_counts_the_blocks_at_their_bits_per_weight(tiny_gguf):
    from petune import memory
    from petune.api import ModelInfo, ModelShape
    from petune_plugins.strategies import gguf_backend, gguf_quants

    _, folder = tiny_gguf
    s, opts = qlora(r=4, compute_dtype="float32")
    skeleton = memory.build_skeleton(ModelInfo.from_path("tiny", folder).config, ModelShape("AutoModelForCausalLM"),
                                     torch.float32)
    model = memory.apply_strategy(s, skeleton, CausalLM(), opts)
    layers = gguf_backend.gguf_layers(model)
    assert len(layers) == 14 and all(layer.weight.is_meta for layer in layers)  # nothing read for a skeleton
    inventory = memory.parameter_inventory(model)
    block_weights = sum(layer.in_features * layer.out_features for layer in layers)
    assert inventory["quantised"] == block_weights
    dense = sum(p.numel() * 4 for n, p in model.named_parameters() if p.dtype == torch.float32)
    assert inventory["weights"] == dense + block_weights * gguf_quants.bits_per_weight("Q8_0") / 8


@pytest.mark.parametrize("quantize", [True, False])
def test_tensor_table_matches_gguf_py_and_refuses_a_cut_file(tiny_llama_path, tmp_path, quantize):
    """The light tensor table (no metadata values built) finds every tensor gguf-py's reader
    finds, with the same type and bytes; a file cut short is refused, not read past its end."""
    import numpy as np

    from petune.gguf_tensors import read_table

    path = write_tiny_gguf(tiny_llama_path, tmp_path / "tiny.gguf", quantize=quantize)
    ours, theirs = read_table(path), gguf.GGUFReader(path)
    assert ours.architecture == "llama" and len(ours.tensors) == len(theirs.tensors) == 21
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type) == (reference.name, reference.tensor_type)
        assert mine.data.dtype == np.uint8 and mine.data.shape[:-1] == reference.data.shape[:-1]
        assert np.array_equal(np.asarray(mine.data).reshape(-1), np.asarray(reference.data).view(np.uint8).reshape(-1))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="runs past the end"):
        read_table(cut)
    (tmp_path / "other.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_table(tmp_path / "other.gguf")
