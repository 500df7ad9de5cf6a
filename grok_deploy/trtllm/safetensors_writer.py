"""A safetensors file written front to back in bounded memory, and the check that one is whole.

The header comes first, its offsets computed from the specs (names, shapes, dtypes known up
front); then each tensor's bytes in spec order, in chunks of any size (one expert slice, a block
of rows), hashed on the way so that the file's sha256 is known when it is closed, and written
with O_DIRECT where the file system allows (_Output). convert writes every rank file with it;
preprocess writes the preprocessed copies with it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
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


ALIGN = 4096            # O_DIRECT offset, length and buffer alignment that common devices accept
STAGE_BYTES = 8 << 20   # bytes per write() call: one block is filled while another is written
STAGES = 3              # blocks per file: one filling, up to two waiting for or in write()
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: buffered writes


class _Output:
    """A new file written front to back in page-aligned blocks of STAGE_BYTES.

    Each block is hashed when full (its bytes still in the CPU cache) and handed to a thread that
    writes it, so the next block is filled during the write. The file is opened with O_DIRECT
    where the file system takes it: a rank file is written once, hundreds of GB in all, and read
    later by another process, so a page-cache copy of every byte (the largest CPU cost of a
    buffered convert, bench/convert_throughput.py) and gigabytes of dirty pages would buy nothing.
    Where O_DIRECT is refused, at open or at a write, the same blocks are written buffered. The
    last block is padded to ALIGN for the device and the file truncated to its size."""

    def __init__(self, path: Path):
        self.path, self.direct = path, bool(_DIRECT)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | _DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self.direct, self._fd = False, os.open(path, flags, 0o644)  # e.g. tmpfs before Linux 6.6
        self._maps = [mmap.mmap(-1, STAGE_BYTES) for _ in range(STAGES)]  # anonymous: page-aligned
        self._blocks = [memoryview(m) for m in self._maps]
        self._free: queue.Queue = queue.Queue()
        for i in range(1, STAGES):
            self._free.put(i)
        self._full: queue.Queue = queue.Queue()
        self._cur, self._pos, self.size, self._written = 0, 0, 0, 0
        self._sha = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rank-file-writer", daemon=True)
        self._thread.start()

    def append(self, buf) -> None:
        view = memoryview(buf).cast("B")
        while len(view):
            n = min(len(view), STAGE_BYTES - self._pos)
            self._blocks[self._cur][self._pos:self._pos + n] = view[:n]
            self._pos += n
            view = view[n:]
            if self._pos == STAGE_BYTES:
                self._hand_over(STAGE_BYTES)

    def _hand_over(self, length: int) -> None:
        """Hash the current block's bytes and queue `length` of them (padded) for writing."""
        block = self._blocks[self._cur]
        self._sha.update(block[:self._pos])  # hashlib releases the GIL: the writer runs meanwhile
        self.size += self._pos
        self._full.put((self._cur, length))
        self._cur, self._pos = self._free.get(), 0
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            i, length = item
            try:
                if self._error is None:
                    self._write(self._blocks[i][:length])
            except BaseException as e:  # noqa: BLE001 - re-raised in the filling thread
                self._error = self._user_error(e)
            finally:
                self._free.put(i)  # refilled only now: the device reads it during write()

    def _write(self, view) -> None:
        while len(view):
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # the file system opened the file O_DIRECT but refuses such writes: write buffered
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
                self.direct = False
                continue
            view = view[n:]
            self._written += n

    def _user_error(self, e: BaseException) -> BaseException:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"{self.path}: no space left on the device (or quota exceeded) with "
                             f"{self._written / 1e9:.2f} GB of this file written; "
                             "free space there and run again")
        return e

    def close(self) -> str:
        """Write what is left, truncate the padding away, close; return the file's sha256."""
        n = self._pos
        padded = -(-n // ALIGN) * ALIGN
        self._blocks[self._cur][n:padded] = bytes(padded - n)
        if padded:
            self._hand_over(padded)
        self._stop()
        if self._error is not None:
            raise self._error
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as e:
            raise self._user_error(e) from e
        finally:
            self.abort()
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Stop the writing thread and close the file (what was written stays; the caller removes it)."""
        self._stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        for block, m in zip(self._blocks, self._maps):  # the blocks' memory back now, not at GC
            block.release()
            try:
                m.close()
            except BufferError:  # a slice still held (by an error's traceback): freed with it
                pass


class RankWriter:
    """A safetensors file written incrementally: the header (offsets from the known specs) first,
    then each tensor's bytes in spec order, through _Output (sha256 computed on the way)."""

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
        self._out = _Output(path)
        self._out.append(struct.pack("<Q", len(h)) + h)

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
        self._out.append(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)

    def close(self) -> str:
        """Check that every tensor was written in full; return the file's sha256."""
        if self._left or self._i != len(self._specs) - 1:
            self._out.abort()
            raise RuntimeError(f"{self.path.name}: incomplete, stopped in tensor {self._i}")
        sha = self._out.close()
        return sha

    def abort(self) -> None:
        self._out.abort()


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
