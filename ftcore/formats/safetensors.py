"""Memory-mapped safetensors reading with one-line errors, and atomic writing (whole, or streamed tensor by tensor).

We parse the 8-byte header length and JSON header ourselves so that a truncated or malformed
file names the file and tensor, and so that tensors are zero-copy views of a private mmap
(pages are read lazily; copy-on-write if a parameter is later updated in place).
"""

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from ftcore.errors import FtcoreError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _check_entry(path: Path, name: str, e):
    """A header entry must be {"dtype": known, "shape": [ints >= 0], "data_offsets": [begin, end]}."""
    if not isinstance(e, dict):
        raise FtcoreError(f"{path}: tensor {name!r}: malformed header entry (expected an object)")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
        raise FtcoreError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(map(is_int, shape)):
        raise FtcoreError(f"{path}: tensor {name!r}: shape {shape!r}: expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets)):
        raise FtcoreError(f"{path}: tensor {name!r}: data_offsets {offsets!r}: expected [begin, end]")


class SafetensorsFile:
    """An open safetensors file: `names()`, `shape(name)`, `get(name)` -> mmap-backed tensor."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FtcoreError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise FtcoreError(f"{self.path}: truncated safetensors header ({n} header bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FtcoreError(f"{self.path}: malformed safetensors header ({e})") from None
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        if not isinstance(header, dict):
            raise FtcoreError(f"{self.path}: malformed safetensors header (a JSON {type(header).__name__}, "
                              "expected an object)")  # fmt: skip
        self.metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(self.metadata, dict):
            raise FtcoreError(f"{self.path}: malformed safetensors header (__metadata__ is not an object)")
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            _check_entry(self.path, name, e)
            begin, end = e["data_offsets"]
            want = math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
            if not 0 <= begin <= end or end - begin != want:
                raise FtcoreError(
                    f"{self.path}: tensor {name!r}: data_offsets {[begin, end]} hold {end - begin} bytes, "
                    f"its shape {e['shape']} and dtype {e['dtype']} need {want}"
                )
            if self.data_start + end > size:
                raise FtcoreError(
                    f"{self.path}: truncated: tensor {name!r} needs bytes up to {self.data_start + end}, file has {size}"
                )

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name) -> tuple:
        return tuple(self.entries[name]["shape"])

    def nbytes(self, name) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def get(self, name) -> torch.Tensor:
        e = self.entries[name]
        dtype, shape = DTYPES[e["dtype"]], e["shape"]
        begin, end = e["data_offsets"]
        count = end - begin
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self.mm, dtype=torch.uint8, count=count, offset=self.data_start + begin)
        return t.view(dtype).reshape(shape)

    def read_rows(self, name, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along dim 0), read with pread into new memory: only those bytes are
        touched, and no file pages stay mapped in this process (what each rank of a sharded load keeps)."""
        e = self.entries[name]
        dtype, shape = DTYPES[e["dtype"]], e["shape"]
        row = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start) * row, dtype=torch.uint8)
        if out.numel():
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + e["data_offsets"][0] + start * row)
                if f.readinto(memoryview(out.numpy())) != out.numel():
                    raise FtcoreError(f"{self.path}: tensor {name!r}: short read (the file changed?)")
        return out.view(dtype).reshape(stop - start, *shape[1:])

    def release(self, name):
        """Drop the pages of one tensor from memory after it was copied elsewhere (keeps peak RSS ~1x)."""
        begin, end = self.entries[name]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self.data_start + begin) // page * page
        stop = (self.data_start + end) // page * page  # whole pages only; neighbours may still be in use
        if stop > start and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Write tensors to `path` atomically (temporary name in the same directory, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


CODES = {dtype: code for code, dtype in DTYPES.items()}


class StreamedSafetensors:
    """A safetensors file written one tensor at a time, in the order of `specs` ({name: (shape, dtype)}), so that
    only the tensor being written need be in memory; atomic: the file appears at `path` on close() only.

        with StreamedSafetensors(path, {"w": ((2, 3), torch.float32)}) as out:
            out.write("w", w)
    """

    def __init__(self, path, specs: dict, metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.specs, self.order = specs, iter(specs)
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor):
        expected = next(self.order, None)
        shape, dtype = self.specs.get(expected, (None, None))
        if name != expected or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name!r} {list(t.shape)} {t.dtype}: expected {expected!r} "
                             f"{list(shape or [])} {dtype}")  # fmt: skip
        if t.numel():
            self.f.write(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))

    def close(self):
        missing = next(self.order, None)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if missing is not None:
            os.unlink(self.tmp)
            raise ValueError(f"{self.path}: tensor {missing!r} was never written")
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.f.close()
            self.tmp.unlink(missing_ok=True)
