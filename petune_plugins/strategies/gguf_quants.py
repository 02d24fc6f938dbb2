"""llama.cpp's GGUF block formats, dequantised with torch ops (CPU and CUDA alike).

A quantised GGUF tensor is a run of fixed-size blocks, each holding the scales and the
packed integers of ``block_size`` consecutive weights of one row. :func:`dequantize` turns
a ``uint8`` tensor of such blocks (``[..., bytes_per_row]``, as the file stores them) into
float32 weights ``[..., row_length]`` equal, bit for bit, to ``gguf.quants.dequantize``
(llama.cpp's numpy reference): every product and sum is taken in float32 in the same order,
one rounding each, so the values the adapter trains against are exactly the file's.

Layouts per type (bytes per block of 32 or 256 weights; ``d``/``dmin`` are float16):

* ``Q4_0`` d + 16 B of nibbles (low nibbles: weights 0-15, high: 16-31), w = d·(q-8)
* ``Q4_1`` d, m + nibbles, w = d·q + m
* ``Q5_0``/``Q5_1`` as Q4 plus a 32-bit mask holding each weight's 5th bit (q-16 / d·q + m)
* ``Q8_0`` d + 32 int8, w = d·q
* ``Q2_K`` 16 bytes of 4-bit (scale, min) pairs, 64 B of 2-bit values, d, dmin
* ``Q3_K`` 32 B high-bit mask, 64 B of 2-bit values, 12 B of 6-bit signed scales, d
* ``Q4_K``/``Q5_K`` d, dmin, 12 B of eight 6-bit (scale, min) pairs, (Q5: 32 B of 5th bits), nibbles
* ``Q6_K`` 128 B low nibbles, 64 B high 2 bits, 16 int8 scales, d; w = d·scale·(q-32)

Anything else is refused with the type's name (:func:`check_supported`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petune.errors import Refusal

if TYPE_CHECKING:
    import torch

QK_K = 256
#: name -> (weights per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
SUPPORTED = tuple(BLOCKS)
FLOAT_TYPES = ("F32", "F16", "BF16")


def bits_per_weight(type_name: str) -> float:
    """Storage cost of one weight of this type, scales included (Q4_K: 4.5 bits)."""
    size, nbytes = BLOCKS[type_name]
    return nbytes * 8 / size


def check_supported(type_name: str, where: str = "") -> None:
    if type_name not in BLOCKS:
        raise Refusal(f"GGUF tensor type {type_name}{f' ({where})' if where else ''} is not supported by petune's "
                      "GGUF backend", where="model.name",
                      hint=f"supported: {', '.join(SUPPORTED)}; re-quantise the file with llama.cpp's "
                           "llama-quantize to one of them (e.g. Q4_K_M), or use strategy 'qlora' with quant_type 'nf4'")


def row_bytes(type_name: str, row_length: int) -> int:
    size, nbytes = BLOCKS[type_name]
    if row_length % size:
        raise ValueError(f"a {type_name} row must hold a multiple of {size} weights, not {row_length}")
    return row_length // size * nbytes


def dequantize(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """float32 weights ``[..., row_length]`` from the raw blocks ``[..., bytes_per_row]``
    (uint8). Equal to ``gguf.quants.dequantize`` bit for bit."""
    import torch

    check_supported(type_name)
    size, nbytes = BLOCKS[type_name]
    if data.dtype != torch.uint8:
        raise TypeError(f"GGUF blocks are uint8 bytes, not {data.dtype}")
    lead = data.shape[:-1]
    if data.shape[-1] % nbytes:
        raise ValueError(f"{data.shape[-1]} bytes per row is not a whole number of {type_name} blocks ({nbytes} B)")
    blocks = data.reshape(-1, nbytes)
    out = _DEQUANT[type_name](blocks)
    return out.reshape(*lead, data.shape[-1] // nbytes * size)


# -- helpers ---------------------------------------------------------------------------------
def _f16(raw: torch.Tensor) -> torch.Tensor:
    """float16 numbers stored in consecutive byte pairs, as float32 ``[n, count]``."""
    import torch

    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each run of ``group`` bytes, then their high nibbles: ``[n, 2·bytes]``."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, 1, group)
    import torch

    both = torch.cat([runs & 0x0F, runs >> 4], dim=2)
    return both.reshape(n, -1)


# -- float types -----------------------------------------------------------------------------
def _f32(blocks):
    import torch

    return blocks.contiguous().view(torch.float32)


def _f16_type(blocks):
    return _f16(blocks)


def _bf16(blocks):
    import torch

    return blocks.contiguous().view(torch.bfloat16).float()


# -- 32-weight blocks ------------------------------------------------------------------------
def _q4_0(blocks):
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).float() - 8.0
    return d * q


def _q4_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).float()
    return d * q + m


def _fifth_bits(blocks, start):
    """The 32 fifth bits of a Q5_0/Q5_1 block, weight i at bit i of a little-endian uint32."""
    import torch

    mask = blocks[:, start:start + 4]
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 8)
    return ((mask.reshape(-1, 4, 1) >> shifts) & 1).reshape(-1, 32)


def _q5_0(blocks):
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 6:], 16) | (_fifth_bits(blocks, 2) << 4)
    return d * (q.float() - 16.0)


def _q5_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:], 16) | (_fifth_bits(blocks, 4) << 4)
    return d * q.float() + m


def _q8_0(blocks):
    import torch

    d = _f16(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


# -- 256-weight k-quants ---------------------------------------------------------------------
def _q2_k(blocks):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    # two halves of 32 bytes; in each, shifts 0, 2, 4, 6 give 4 runs of 32 weights
    q = _crumbs(qs).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _crumbs(qs):
    """2-bit fields of runs of 32 bytes: for each run, shift 0 of all 32 bytes, then 2, 4, 6."""
    import torch

    n = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, -1)


def _q3_k(blocks):
    import torch

    n = blocks.shape[0]
    hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    low = _nibbles(packed[:, :8], 8)  # 16 low 4-bit parts: byte j's low nibble, then its high nibble
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 4, 1)
    high = ((packed[:, 8:12].reshape(n, 1, 4) >> shifts) & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _crumbs(qs).reshape(n, 16, 16)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 8, 1)
    qh = ((hmask.reshape(n, 1, 1, 32) >> bit_shifts) & 1).reshape(n, 16, 16)
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()  # a set mask bit means no offset
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(packed):
    """Eight 6-bit scales and eight 6-bit mins from a k-quant's 12 bytes."""
    import torch

    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    d, m, md = p[:, 0], p[:, 1], p[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    ds = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
    return (ds * q - dm).reshape(n, QK_K)


def _q5_k(blocks):
    import torch

    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    ds = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    qh = ((blocks[:, 16:48].reshape(n, 1, 32) >> bit_shifts) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (ds * q - dm).reshape(n, QK_K)


def _q6_k(blocks):
    import torch

    n = blocks.shape[0]
    ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
    ds = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _crumbs(qh).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (ds * q).reshape(n, QK_K)


_DEQUANT = {
    "F32": _f32, "F16": _f16_type, "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
