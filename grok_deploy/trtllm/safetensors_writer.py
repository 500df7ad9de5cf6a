"""A safetensors file written front to back in bounded memory, and the check that one is whole.

The header comes first, its offsets computed from the specs (names, shapes, dtypes known up
front); then each tensor's bytes in spec order, in chunks of any size (one expert slice, a block
of rows), hashed on the way so that the file's sha256 is known when it is closed. convert writes
every rank file with it; build writes the preprocessed copies with it.
"""
from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.trtllm import names as tn


def np_dtype(name: str):
    import ml_dtypes
    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32,
            "int8": np.int8}[name]


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # bfloat16 | float16 | float32 | int8

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(np_dtype(self.dtype)).itemsize


HASH_PIECE = 1 << 20  # bytes handed to the hashing thread at a time
HASH_QUEUE = 16       # pieces in flight: at most 16 MiB held for the hash beyond what is written


class _Hasher:
    """sha256 of a byte stream on its own thread, fed in order. hashlib releases the GIL on large
    buffers, so the hash of block i runs while block i+1 is gathered and written: the rank file's
    bytes are hashed once, as they are written, without adding to the writer's critical path
    (where a core is free; on a saturated host it costs what the inline hash did)."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(HASH_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._q.get()) is not None:
            try:
                self._sha.update(piece)
            except BaseException as e:  # noqa: BLE001 - re-raised by digest()
                self._error = e

    def update(self, buf) -> None:
        view = memoryview(buf).cast("B")
        for a in range(0, len(view), HASH_PIECE):
            self._q.put(view[a:a + HASH_PIECE])  # keeps the bytes alive until hashed

    def digest(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()


class RankWriter:
    """A safetensors file written incrementally: the header (offsets from the known specs) first,
    then each tensor's bytes in spec order; sha256 computed on the way (on a hashing thread)."""

    def __init__(self, path: Path, specs: list[Spec], metadata: dict | None = None):
        header, off = {}, 0
        for s in specs:
            header[s.name] = {"dtype": tn.ST_DTYPES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        if metadata:
            header["__metadata__"] = metadata
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self.path, self.size = path, 8 + len(h) + off
        self._specs, self._i, self._left = specs, -1, 0
        self._f = open(path, "wb")
        self._sha = _Hasher()
        self._emit(struct.pack("<Q", len(h)) + h)

    def _emit(self, buf) -> None:
        self._f.write(buf)
        self._sha.update(buf)

    def write(self, name: str, chunk: np.ndarray) -> None:
        if self._left == 0:
            self._i += 1
            if self._i >= len(self._specs):
                raise RuntimeError(f"{self.path.name}: unexpected tensor {name} after the last one")
            self._left = self._specs[self._i].nbytes
        spec = self._specs[self._i]
        if name != spec.name or chunk.dtype != np.dtype(np_dtype(spec.dtype)) or chunk.nbytes > self._left:
            raise RuntimeError(f"{self.path.name}: got {name} {chunk.dtype} {chunk.nbytes} B, expected "
                               f"{spec.name} {spec.dtype} with {self._left} B left")
        self._left -= chunk.nbytes
        self._emit(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)

    def close(self) -> str:
        """Check that every tensor was written in full; return the file's sha256."""
        self._f.close()
        sha = self._sha.digest()
        if self._left or self._i != len(self._specs) - 1:
            raise RuntimeError(f"{self.path.name}: incomplete, stopped in tensor {self._i}")
        return sha

    def abort(self) -> None:
        self._f.close()
        self._sha.digest()  # stop the thread


def read_header(path) -> dict:
    """The safetensors header of a rank file, after checking that the file is whole.
    Raises UserError naming the file when it is missing, not safetensors, or truncated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: rank file is missing; re-run convert")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= min(size, 16 << 20) else b""  # our headers are < 1 MB
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (unreadable header); re-run convert")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise UserError(f"{path}: truncated or padded: {size} bytes, its header needs {8 + n + end}; "
                        "re-run convert")
    return header
