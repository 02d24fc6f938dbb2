"""`petune export`: a causal-LM run as a GGUF file, read back by gguf's own reader and by
transformers' independent GGUF loader; an Ollama Modelfile; refusals with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_recipe

from petune.cli import main
from petune.errors import UserError
from petune.recipe import load_recipe
from petune.runner import run

SFT = "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}) + "\n"
              for i in range(12))
CSV = "text,label\n" + "".join(f"a good movie {i},pos\na bad film {i},neg\n" for i in range(8))


def train(folder: Path, host, model: str, task: str, data: str, suffix: str, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"train.{suffix}").write_text(data)
    recipe = write_recipe(folder / "recipe.toml", model=model, task={"name": task, "train": f"train.{suffix}", **options},
                          strategy={"name": "lora", "r": 4}, train={"learning_rate": 5e-2})
    assert run(load_recipe(recipe, host), host).status == "completed"
    return folder / "run"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, host) -> Path:
    return train(tmp_path_factory.mktemp("sft"), host, "random:tiny-llama", "sft", SFT, "jsonl", max_length=64)


def merged_model(run_dir: Path, host):
    from petune.run_folders import load_run

    loaded = load_run(run_dir, host, quantized=False)
    return loaded.model.merge_and_unload(), loaded.tokenizer


def test_gguf_round_trip(sft_run, tmp_path, host, capsys):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny.gguf"
    assert main(["export", str(sft_run), "--format", "gguf", "--out", str(out)]) == 0
    assert "read back" in capsys.readouterr().out
    merged, tokenizer = merged_model(sft_run, host)
    config = merged.config

    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.merges",)}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template  # the run's template (chatml here)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(config.num_hidden_layers) for part in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # vectors stay float32, as llama.cpp keeps them
    assert list(reversed(tensors["token_embd.weight"].shape.tolist())) == list(merged.model.embed_tokens.weight.shape)
    # the merged weights, not the base's: the adapter's update is in the file
    down = merged.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    stored = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, tensors["blk.1.ffn_down.weight"].tensor_type)
    assert abs(stored.reshape(down.shape) - down).max() < 1e-3 * abs(down).max()

    # an independent loader: transformers' own GGUF reader gives the same greedy answer
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = tokenizer("What is the capital of France? The capital of france is", return_tensors="pt")
    with torch.no_grad():
        want, got = merged(**ids).logits, loaded(**ids).logits
        assert (want - got).abs().max() < 5e-3 * max(1.0, want.abs().max().item())
        assert torch.equal(merged.generate(**ids, max_new_tokens=8, do_sample=False),
                           loaded.generate(**ids, max_new_tokens=8, do_sample=False))


def test_q8_0_and_ollama_modelfile(sft_run, tmp_path, capsys):
    import gguf

    out = tmp_path / "ollama" / "tiny-q8.gguf"
    assert main(["export", str(sft_run), "--format", "ollama", "--quant", "q8_0", "--out", str(out)]) == 0
    assert "ollama create" in " ".join(capsys.readouterr().out.split())
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./tiny-q8.gguf" in modelfile
    # the run's chatml layout, ending answers with EOS (no <|im_end|> token in this vocabulary)
    assert 'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}</s>\n' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    # nothing is overwritten without --overwrite
    assert main(["export", str(sft_run), "--format", "ollama", "--out", str(out)]) == 2


def test_ollama_layouts_render_like_the_run_templates():
    """Each Go template's Python twin renders exactly what petune's own Jinja template does."""
    from jinja2 import Template

    from petune.ollama import LAYOUTS, PROBES

    templates = Path(__file__).resolve().parents[1] / "petune_plugins" / "tasks" / "templates"
    ends = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "alpaca": "</s>"}  # as each template sets end_of_turn
    layouts = {layout.name: layout for layout in LAYOUTS}
    for name, end in ends.items():
        template = Template((templates / f"{name}.jinja").read_text())
        for probe in PROBES:
            rendered = template.render(messages=probe, add_generation_prompt=True, eos_token="</s>", bos_token="")
            assert layouts[name].render(list(probe), end) == rendered, name


def test_refusals(tmp_path, host, sft_run, capsys):
    from transformers import GPT2Config

    from petune.export import architecture_of

    classification = train(tmp_path / "cls", host, "random:tiny-bert", "classification", CSV, "csv")
    assert main(["export", str(classification), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "causal language models" in capsys.readouterr().err
    assert main(["export", str(sft_run), "--quant", "q4_k", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "q4_k" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not support model type 'gpt2'"):
        architecture_of(GPT2Config())
    assert not (tmp_path / "x.gguf").exists()


def test_tiny_gemma3_round_trip(tmp_path, tiny_llama_path):
    """Gemma 3's layout: norms stored as 1 + w, q/k norms, no output.weight (tied), sliding
    window and both rope bases; transformers' GGUF loader gets back the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from petune.export import read_back, write_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 0 so the +1 offset matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    out = tmp_path / "gemma.gguf"
    written = write_gguf(model, tokenizer, out, quant="f32", name="tiny-gemma", base_gguf=None,
                         base_folder=tiny_llama_path, stop_tokens=[])
    assert read_back(written, "f32", tokenizer) == []
    assert "output.weight" not in written.tensors and "blk.0.attn_q_norm.weight" in written.tensors
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert loaded.config.sliding_window == 16 and loaded.config.head_dim == 32
    ids = tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, atol=1e-4, rtol=1e-4)
