"""A small GGUF reader: metadata and tensor index parsed once, tensor bytes read on demand.

gguf-py's GGUFReader keeps a numpy view per metadata item (~100k of them for a 49k-token vocabulary: ~160 MB
of Python objects) and maps the whole file, whose pages then count against the process while it loads. This
reader keeps plain Python values and reads each tensor's bytes with pread when asked, so loading a model costs
about the memory of what is kept. Its interface is the part of GGUFReader the engine uses: `fields[key]
.contents()`, `tensors` with `name`, `tensor_type`, `shape` (GGUF's order, fastest dimension first) and `data`
(gguf-py's array shapes), and `path`. Format: GGUF v2/v3 (little-endian).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

# value types of GGUF metadata
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


@dataclass
class Field:
    value: object

    def contents(self):
        return self.value


class _Cursor:
    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.base, self.pos = b"", 0, 0     # buf holds file bytes [base, base + len(buf))

    def _need(self, n: int):
        if self.pos + n > self.base + len(self.buf):
            if self.pos + n > self.size:
                raise GGUFError(f"truncated at byte {self.pos} (needs {n} more, file has {self.size})")
            self.f.seek(self.pos)
            self.buf, self.base = self.f.read(max(n, 1 << 20)), self.pos

    def take(self, n: int) -> memoryview:
        self._need(n)
        i = self.pos - self.base
        self.pos += n
        return memoryview(self.buf)[i:i + n]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise GGUFError(f"string length {n} at byte {self.pos - 8} exceeds the file")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > self.size:
                raise GGUFError(f"array length {count} at byte {self.pos - 8} exceeds the file")
            if etype in _NP:
                width = np.dtype(_NP[etype]).itemsize
                return np.frombuffer(bytes(self.take(width * count)), dtype=_NP[etype]).tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")


@dataclass
class Tensor:
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: np.ndarray            # GGUF order: fastest-varying dimension first
    offset: int                  # absolute file offset of the data
    nbytes: int
    path: str

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as gguf-py shapes them: float types [.., ne1, ne0]; block types uint8 [.., row bytes]."""
        import gguf
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, self.nbytes, self.offset)
        finally:
            os.close(fd)
        if len(raw) != self.nbytes:
            raise GGUFError(f"tensor {self.name!r}: file ends inside its data")
        dims = [int(d) for d in reversed(self.shape)]
        Q = gguf.GGMLQuantizationType
        floats = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                  Q.I32: np.int32, Q.I64: np.int64}
        if self.tensor_type in floats:
            return np.frombuffer(raw, dtype=floats[self.tensor_type]).reshape(dims)
        return np.frombuffer(raw, dtype=np.uint8).reshape(*dims[:-1], -1)


class GGUFFile:
    def __init__(self, path):
        import gguf
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            c = _Cursor(f, size)
            if bytes(c.take(4)) != b"GGUF":
                raise GGUFError("no GGUF magic")
            version = c.unpack("<I")
            if version not in (2, 3):
                raise GGUFError(f"GGUF version {version} (only 2 and 3 are read)")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            if n_tensors > size or n_kv > size:
                raise GGUFError("tensor or metadata count exceeds the file")
            self.fields: dict[str, Field] = {}
            for _ in range(n_kv):
                key = c.string()
                self.fields[key] = Field(c.value(c.unpack("<I")))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.unpack("<I")
                if n_dims > 8:
                    raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
                dims = [c.unpack("<Q") for _ in range(n_dims)]
                ttype, off = c.unpack("<I"), c.unpack("<Q")
                infos.append((name, dims, ttype, off))
            align = int(self.fields.get("general.alignment", Field(32)).value) or 32
            start = (c.pos + align - 1) // align * align
        self.tensors: list[Tensor] = []
        for name, dims, ttype, off in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, size_b = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFError(f"tensor {name!r} has unknown type {ttype}") from None
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFError(f"tensor {name!r}: {dims[0]} is not a multiple of its block of {block}")
            nbytes = count // block * size_b
            if start + off + nbytes > size:
                raise GGUFError(f"tensor {name!r} lies beyond the end of the file")
            self.tensors.append(Tensor(name, qtype, np.array(dims, dtype=np.uint64), start + off, nbytes, self.path))
