"""The tensor table of a GGUF file, read without building its metadata values.

gguf-py's ``GGUFReader`` turns every metadata value into numpy views: for Gemma 3's
262k-token vocabulary that takes about 10 s and 0.7 GB, while building a model from the file
needs only the architecture's name and where each tensor's bytes are. This reader walks the
same layout (llama.cpp's ``docs/gguf.md``: header, key/value pairs, tensor infos, aligned
data), skipping the values, and maps each tensor's bytes from the file read-only, as ``uint8``
rows in the shape gguf-py gives quantised tensors (``[..., bytes per row]``). It is small
on purpose; everything else (metadata for the config and tokenizer) is left to gguf-py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: value type id -> size in bytes of fixed-size GGUF metadata values
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType: .name is the type's name ("Q4_K")
    data: np.ndarray  # uint8, [..., bytes per row], a read-only view of the file


@dataclass
class TensorTable:
    architecture: str
    alignment: int
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buffer, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        length = self.take("Q")
        value = bytes(self.buffer[self.at:self.at + length])
        self.at += length
        return value

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.at += _FIXED[kind]
        elif kind == _STRING:
            length = self.take("Q")  # (not `self.at += self.take(...)`: that adds to the old position)
            self.at += length
        elif kind == _ARRAY:
            item, count = self.take("IQ")
            if item in _FIXED:
                self.at += _FIXED[item] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.at}")


def read_table(path: Path) -> TensorTable:
    """The tensor table of the GGUF file at ``path`` (ValueError when it is not one this reads)."""
    import gguf

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    if len(mapped) < 24 or cursor.take("4s") != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    version = cursor.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian or too old) is not read here; versions 2 and 3 are")
    n_tensors, n_kv = cursor.take("QQ")
    architecture, alignment = "", 32
    for _ in range(n_kv):
        key, kind = cursor.string(), cursor.take("I")
        if key == b"general.architecture" and kind == _STRING:
            architecture = cursor.string().decode()
        elif key == b"general.alignment" and kind == 4:
            alignment = cursor.take("I")
        else:
            cursor.skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name = cursor.string().decode()
        dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
        infos.append((name, dims, cursor.take("I"), cursor.take("Q")))
    start = -(-cursor.at // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in infos:
        tensor_type = gguf.GGMLQuantizationType(type_id)
        block, size = gguf.GGML_QUANT_SIZES[tensor_type]
        if dims[0] % block:
            raise ValueError(f"{name}: a row of {dims[0]} is not a whole number of {tensor_type.name} blocks")
        row_bytes = dims[0] // block * size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin = start + offset
        if begin + rows * row_bytes > len(mapped):
            raise ValueError(f"{name} runs past the end of the file (is it complete?)")
        data = mapped[begin:begin + rows * row_bytes]
        shape = [*reversed(dims[1:]), row_bytes] if len(dims) > 1 else [row_bytes]
        tensors.append(TensorInfo(name, tensor_type, data.reshape(shape)))
    return TensorTable(architecture, alignment, tensors)
