"""Token datasets: one flat id array per split in a safetensors file, read memory-mapped.

The writer streams ids to disk as they come (bounded memory) and then frames
them with a safetensors header, which is just 8 bytes of header length, a JSON
header, and the raw little-endian array.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from pathlib import Path

import torch
from safetensors import safe_open

_DTYPES = {"U16": ("H", 2), "I32": ("i", 4)}


def id_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else int32."""
    return "U16" if vocab_size <= 65536 else "I32"


class TokenWriter:
    """Append ids to a split; `close()` frames the file as safetensors with one tensor `ids`."""

    def __init__(self, path: Path, dtype: str):
        self.path = Path(path)
        self.dtype = dtype
        self.code, self.itemsize = _DTYPES[dtype]
        self.raw_path = self.path.with_suffix(".raw")
        self.raw = open(self.raw_path, "wb")
        self.count = 0

    def write(self, ids: list[int]) -> None:
        a = array(self.code, ids)
        if a.itemsize != self.itemsize:  # platforms where 'i' is not 4 bytes
            raise RuntimeError("unexpected array item size")
        if os.sys.byteorder != "little":
            a.byteswap()
        self.raw.write(a.tobytes())
        self.count += len(ids)

    def close(self, metadata: dict | None = None) -> None:
        self.raw.close()
        nbytes = self.count * self.itemsize
        header = {"ids": {"dtype": self.dtype, "shape": [self.count], "data_offsets": [0, nbytes]}}
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self.raw_path, "rb") as raw:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            while chunk := raw.read(1 << 22):
                out.write(chunk)
        self.raw_path.unlink()


class TokenArray:
    """A split's ids, memory-mapped: slicing reads only the slice (resident memory stays flat)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        self._slice = self._file.get_slice("ids")
        self.length = self._slice.get_shape()[0]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> torch.Tensor:
        """ids[start:stop] as int64."""
        return self._slice[s].to(torch.int64)


def read_all(path: Path) -> torch.Tensor:
    """A whole split as int64 (for small data and tests)."""
    arr = TokenArray(path)
    return arr[0 : len(arr)]
