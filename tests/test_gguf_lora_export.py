"""`petune export RUN --format gguf-lora|ollama` for a run trained on a GGUF file's own
quantisation: llama.cpp's LoRA adapter GGUF, read back (names as the base file names them,
shapes, alpha) and applied by petune's own reader on the base, reproducing the run's logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from petune.api import load_pretrained  # noqa: E402
from petune.cli import main  # noqa: E402
from petune.recipe import load_recipe  # noqa: E402
from petune.runner import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from helpers import write_recipe  # noqa: E402
from test_model_sources import write_tiny_gguf  # noqa: E402

SFT = "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}) + "\n"
              for i in range(12))


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_llama_path, host):
    folder = tmp_path_factory.mktemp("gguf-run")
    mp = pytest.MonkeyPatch()
    mp.setenv("PETUNE_CACHE", str(folder / "cache"))
    base = write_tiny_gguf(tiny_llama_path, folder / "tiny-q8_0.gguf")
    (folder / "train.jsonl").write_text(SFT)
    recipe = write_recipe(folder / "recipe.toml", model={"name": base, "dtype": "float32"},
                          task={"name": "sft", "train": "train.jsonl", "max_length": 64},
                          strategy={"name": "qlora", "quant_type": "gguf", "compute_dtype": "float32", "r": 4,
                                    "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]},
                          train={"max_steps": 3, "learning_rate": 5e-2})
    try:
        assert run(load_recipe(recipe, host), host).status == "completed"
        yield folder / "run", base
    finally:
        mp.undo()


def test_adapter_gguf_reads_back_and_reproduces_the_runs_logits(gguf_run, tmp_path, host, monkeypatch):
    import transformers

    from petune.export import read_lora_gguf
    from petune.run_folders import load_run
    from petune_plugins.sources.gguf_file import GgufFileSource
    from petune_plugins.strategies import gguf_backend

    run_dir, base = gguf_run
    monkeypatch.setenv("PETUNE_CACHE", str(base.parent / "cache"))
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(run_dir), "--format", "gguf-lora", "--out", str(out)]) == 0

    reader = gguf.GGUFReader(out)
    field = reader.fields
    assert bytes(field["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(field["adapter.type"].parts[-1]).decode() == "lora"
    assert float(field["adapter.lora.alpha"].parts[-1][0]) == 8.0
    base_names = {t.name for t in gguf.GGUFReader(base).tensors}
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert len(shapes) == 2 * 2 * 4  # 2 layers × 4 targets × (a, b)
    for name, shape in shapes.items():
        weight = name.rsplit(".", 1)[0]
        assert weight in base_names and name.endswith((".lora_a", ".lora_b"))
    # GGUF lists dimensions innermost first: lora_a is A [r, in] → [in, r]; lora_b is B [out, r] → [r, out]
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 64]
    assert shapes["blk.1.attn_k.weight.lora_b"] == [4, 32] and shapes["blk.1.ffn_down.weight.lora_a"] == [128, 4]
    alpha, pairs = read_lora_gguf(out)
    assert alpha == 8.0 and pairs["blk.0.attn_v.weight"][0].shape == (4, 64)

    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = load_run(run_dir, host).model(input_ids=ids).logits
        folder = GgufFileSource().resolve(str(base))
        model = load_pretrained(transformers.AutoModelForCausalLM, folder, dtype=torch.float32).eval()
        gguf_backend.swap_in_blocks(model, base, torch.float32)
        without = model(input_ids=ids).logits
        assert gguf_backend.add_gguf_lora(model, out, "llama") == 8
        got = model(input_ids=ids).logits
    assert (without - expected).abs().max() > 1e-3  # the adapter matters ...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # ... and the file carries it exactly


def test_ollama_for_such_a_run_names_the_base_file_and_the_adapter(gguf_run, tmp_path, monkeypatch):
    run_dir, base = gguf_run
    monkeypatch.setenv("PETUNE_CACHE", str(base.parent / "cache"))
    out = tmp_path / "ollama" / "adapter.gguf"
    assert main(["export", str(run_dir), "--format", "ollama", "--out", str(out)]) == 0
    modelfile = (out.parent / "Modelfile").read_text()
    assert f"FROM {base}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert bytes(gguf.GGUFReader(out).fields["general.type"].parts[-1]).decode() == "adapter"
    # nothing is overwritten without --overwrite; with it, petune's own files are replaced
    assert main(["export", str(run_dir), "--format", "ollama", "--out", str(out)]) == 2
    assert main(["export", str(run_dir), "--format", "ollama", "--out", str(out), "--overwrite"]) == 0


def test_gguf_lora_needs_a_gguf_base(tmp_path, host):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "train.jsonl").write_text(SFT)
    recipe = write_recipe(folder / "recipe.toml", task={"name": "sft", "train": "train.jsonl", "max_length": 64},
                          strategy={"name": "lora", "r": 4}, train={"max_steps": 1})
    assert run(load_recipe(recipe, host), host).status == "completed"
    assert main(["export", str(folder / "run"), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")]) == 2
    assert not (tmp_path / "a.gguf").exists()
