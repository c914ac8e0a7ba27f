"""A GGUF file's metadata and tensor table, read in about a second.

Written by hand because the `gguf` package's GGUFReader builds numpy views of every item of
every array field, one by one: a gpt-oss GGUF's 201,088 tokens, their types and 446,000 merges
take it 37 s on a 2-core Zen 1 before a single tensor is read (this module: 0.8 s).
Here arrays of numbers are one `np.frombuffer` each and arrays of strings one loop of
`struct.unpack_from`; the format's constants (value types, ggml tensor types, block sizes) and
all dequantizing stay the `gguf` package's. The layout read (GGUF versions 2 and 3, either byte
order): magic, version, tensor and field counts; the fields (key, type, value); the tensor
infos (name, dims, ggml type, offset); the data, from the next multiple of `general.alignment`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import OssgptError

V = gguf.GGUFValueType
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
# tensor types numpy holds element by element; the rest are blocks of bytes (as GGUFReader)
_ELEMENTS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
             gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
             gguf.GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]      # ggml's order, innermost first (as GGUFReader's `shape`)
    data: np.ndarray            # read-only view of the file: elements, or (..., bytes a row)


class GGUFFile:
    """`fields`: key -> value (int, float, bool, str, or a list / numpy array for arrays);
    `tensors`: in the file's order, their data mapped, not read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except (OSError, ValueError, struct.error, KeyError) as e:
            raise OssgptError(f"{self.path}: not a readable GGUF file ({e})") from None

    def _parse(self) -> None:
        buf = self._buf
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version = struct.unpack_from("<I", buf, 4)[0]
        self._order = "<" if version & 0xFFFF else ">"   # a big-endian file's version reads swapped
        version = struct.unpack_from(self._order + "I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_fields = self._unpack("QQ", 8)
        self._offs = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"field {key} appears twice")
            self.fields[key] = self._value(V(self._next("I")))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = self._unpack(f"{self._next('I')}Q", self._offs)
            self._offs += 8 * len(dims)
            infos.append((name, dims, gguf.GGMLQuantizationType(self._next("I")), self._next("Q")))
        align = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self._offs // align) * align
        data = np.frombuffer(buf, np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in infos:
            count = int(np.prod(dims))
            block, size = gguf.GGML_QUANT_SIZES[kind]
            np_shape = tuple(reversed(dims))
            item = _ELEMENTS.get(kind)
            if item is None:
                item, np_shape, count = np.uint8, gguf.quant_shape_to_byte_shape(np_shape, kind), count * size // block
            item = np.dtype(item).newbyteorder(self._order)
            begin = start + offset
            if begin + count * item.itemsize > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors.append(GGUFTensor(name, kind, dims, data[begin:begin + count * item.itemsize]
                                           .view(item).reshape(np_shape)))
        if len({t.name for t in self.tensors}) < len(self.tensors):
            raise ValueError("a tensor name appears twice")

    def _unpack(self, fmt: str, offs: int) -> tuple:
        return struct.unpack_from(self._order + fmt, self._buf, offs)

    def _next(self, fmt: str) -> Any:
        (value,) = self._unpack(fmt, self._offs)
        self._offs += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._next("Q")
        self._offs += n
        return str(self._buf[self._offs - n:self._offs], "utf-8", "replace")

    def _value(self, kind: V) -> Any:
        if kind == V.STRING:
            return self._string()
        if kind in _SCALARS:
            return self._next(_SCALARS[kind])
        if kind != V.ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = V(self._next("I")), self._next("Q")
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item]).newbyteorder(self._order)
            values = np.frombuffer(self._buf, dtype, count, self._offs)
            self._offs += count * dtype.itemsize
            return values
        if item == V.STRING:     # the vocabulary: the hot loop, kept to two calls a string
            out, buf, offs = [], self._buf, self._offs
            length = struct.Struct(self._order + "Q").unpack_from
            for _ in range(count):
                n = length(buf, offs)[0]
                out.append(str(buf[offs + 8:offs + 8 + n], "utf-8", "replace"))
                offs += 8 + n
            self._offs = offs
            return out
        values = [self._value(item) for _ in range(count)]     # arrays of arrays, as lists
        return [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
