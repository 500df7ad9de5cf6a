"""The streaming safetensors writer: files the safetensors library reads back exactly, written in
chunks of any size, hashed on the way (the sha256 it returns is the file's), with O_DIRECT where
the file system takes it and buffered where not; and read_header's checks that a rank file is whole."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from grok_deploy.errors import UserError
from grok_deploy.trtllm import safetensors_writer as sw
from grok_deploy.trtllm.safetensors_writer import RankWriter, Spec, np_dtype, read_header


def test_rank_writer_streams_a_valid_safetensors_file(tmp_path):
    specs = [Spec("a", (3, 4), "int8"), Spec("b", (5,), "bfloat16"), Spec("c", (2, 2, 2), "float32")]
    a = np.arange(12, dtype=np.int8).reshape(3, 4)
    b = np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16)
    c = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    w = RankWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    w.write("a", a[:1])
    w.write("a", a[1:])  # a tensor may come in several chunks
    w.write("b", b)
    w.write("c", c[0])
    w.write("c", c[1])
    sha = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0  # payload 8-byte aligned
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert np.array_equal(f.get_tensor("a").numpy(), a)
        assert np.array_equal(f.get_tensor("b").float().numpy(), b.astype(np.float32))
        assert np.array_equal(f.get_tensor("c").numpy(), c)
    assert set(read_header(tmp_path / "x.safetensors")) == {"a", "b", "c", "__metadata__"}

    w = RankWriter(tmp_path / "y.safetensors", specs)
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", b)  # out of order
    w = RankWriter(tmp_path / "z.safetensors", specs)
    w.write("a", a)
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()


def test_spec_sizes_follow_the_dtype():
    assert Spec("w", (4096, 6144), "int8").nbytes == 4096 * 6144
    assert Spec("w", (3, 5), "bfloat16").nbytes == 30
    assert Spec("w", (3, 5), "float16").nbytes == 30
    assert Spec("w", (7,), "float32").nbytes == 28
    assert np.dtype(np_dtype("bfloat16")) == np.dtype(ml_dtypes.bfloat16)


def test_byte_chunks_of_any_size_give_the_same_file(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 11)).astype(np.float32)
    q = rng.integers(-128, 128, (64, 9), dtype=np.int8)
    specs = [Spec("x", x.shape, "float32"), Spec("q", q.shape, "int8")]
    digests = set()
    for rows in (1, 3, 37):
        path = tmp_path / f"r{rows}.safetensors"
        w = RankWriter(path, specs)
        for lo in range(0, 37, rows):
            w.write("x", x[lo:lo + rows])
        for lo in range(0, 64, rows):
            w.write("q", q[lo:lo + rows])
        digests.add(w.close())
        assert hashlib.sha256(path.read_bytes()).hexdigest() in digests
    assert len(digests) == 1
    with safe_open(str(tmp_path / "r3.safetensors"), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("x"), x)
        assert np.array_equal(f.get_tensor("q"), q)


def test_wrong_dtype_too_many_bytes_and_extra_tensors_are_refused(tmp_path):
    specs = [Spec("a", (2, 2), "float32")]
    w = RankWriter(tmp_path / "a.safetensors", specs)
    with pytest.raises(RuntimeError, match="got a float64"):
        w.write("a", np.zeros((2, 2), np.float64))
    with pytest.raises(RuntimeError, match="with 16 B left"):
        w.write("a", np.zeros((3, 2), np.float32))
    w.write("a", np.ones((2, 2), np.float32))
    with pytest.raises(RuntimeError, match="unexpected tensor b after the last one"):
        w.write("b", np.ones(1, np.float32))
    w.abort()


def test_read_header_accepts_the_library_own_files(tmp_path):
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "lib.safetensors"))
    header = read_header(tmp_path / "lib.safetensors")
    assert header["w"]["shape"] == [2, 3] and header["w"]["dtype"] == "F32"


def test_read_header_names_the_file_that_is_not_whole(tmp_path):
    specs = [Spec("a", (4, 4), "float32")]
    path = tmp_path / "rank0.safetensors"
    w = RankWriter(path, specs)
    w.write("a", np.zeros((4, 4), np.float32))
    w.close()
    whole = path.read_bytes()
    with pytest.raises(UserError, match=r"rank1.safetensors: rank file is missing; re-run convert"):
        read_header(tmp_path / "rank1.safetensors")
    path.write_bytes(whole[:-5])
    with pytest.raises(UserError, match=r"rank0.safetensors: truncated or padded: \d+ bytes, its header needs \d+"):
        read_header(path)
    path.write_bytes(whole + b"\0" * 8)
    with pytest.raises(UserError, match="truncated or padded"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 12) + b"not json at all")
    with pytest.raises(UserError, match="rank0.safetensors: not a safetensors file"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(UserError, match="not a safetensors file"):
        read_header(path)
    h = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    assert read_header(path)["a"]["data_offsets"] == [0, 4]


def test_sha256_is_the_files_across_blocks_and_the_padding_is_cut(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(-127, 128, (40, 1 << 20), dtype=np.int8)  # 40 MiB: blocks reused, chunks span them
    small = rng.standard_normal(7).astype(np.float32)
    specs = [Spec("a", big.shape, "int8"), Spec("b", small.shape, "float32")]
    w = RankWriter(tmp_path / "r.safetensors", specs)
    w.write("a", big[:3])      # a chunk of 3 MiB, then the rest in one 37 MiB chunk
    w.write("a", big[3:])
    w.write("b", small)
    sha = w.close()
    data = (tmp_path / "r.safetensors").read_bytes()
    assert sw.STAGES * sw.STAGE_BYTES < big.nbytes and w.size % sw.ALIGN
    assert len(data) == w.size and sha == hashlib.sha256(data).hexdigest()
    with safe_open(str(tmp_path / "r.safetensors"), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("a"), big) and np.array_equal(f.get_tensor("b"), small)
    assert not w._out._thread.is_alive() and w._out._fd is None


def _resident_pages(path) -> int:
    """Pages of `path` in the page cache: mincore(2) on a fresh mapping, which touches none."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    try:
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(addr, size)


def test_rank_files_bypass_the_page_cache_where_the_file_system_allows(tmp_path):
    data = np.arange(16 << 20, dtype=np.uint32).view(np.int8)  # 64 MiB
    w = RankWriter(tmp_path / "direct.safetensors", [Spec("a", data.shape, "int8")])
    if not w._out.direct:
        w.abort()
        pytest.skip("this file system refuses O_DIRECT: the writer writes buffered (tested below)")
    w.write("a", data)
    w.close()
    (tmp_path / "buffered.bin").write_bytes(data.tobytes())
    direct, buffered = (_resident_pages(tmp_path / n) for n in ("direct.safetensors", "buffered.bin"))
    assert buffered > 0.9 * data.nbytes / 4096 and direct < 0.01 * data.nbytes / 4096


def test_o_direct_refused_at_open_or_at_a_write_falls_back_to_buffered(tmp_path, monkeypatch):
    import os

    rng = np.random.default_rng(1)
    x = rng.integers(-127, 128, 20_000_017, dtype=np.int8)  # 2.4 blocks, a length no device aligns
    specs = [Spec("x", x.shape, "int8")]
    real_open, real_write = os.open, os.write

    def refusing_open(path, flags, *a):
        if flags & sw._DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(sw.os, "open", refusing_open)
    w = RankWriter(tmp_path / "a.safetensors", specs)
    w.write("x", x)
    assert w._out.direct is False
    sha_a = w.close()
    monkeypatch.setattr(sw.os, "open", real_open)

    writes = []

    def refusing_write(fd, buf):  # a file system that opens O_DIRECT but refuses such writes
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & sw._DIRECT)
        writes.append(direct)
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)
    monkeypatch.setattr(sw.os, "write", refusing_write)
    w = RankWriter(tmp_path / "b.safetensors", specs)
    w.write("x", x)
    sha_b = w.close()
    assert writes[0] is True and not any(writes[1:]) and w._out.direct is False
    for name, sha in (("a", sha_a), ("b", sha_b)):
        data = (tmp_path / f"{name}.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == w.size
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="numpy") as f:
            assert np.array_equal(f.get_tensor("x"), x)


def test_a_full_disk_is_a_user_error_naming_the_file(tmp_path):
    big = np.zeros(sw.STAGES * sw.STAGE_BYTES * 2, np.int8)
    w = sw._Output(Path("/dev/full"))  # every write: ENOSPC
    with pytest.raises(UserError, match=r"^/dev/full: no space left on the device \(or quota exceeded\) "
                                        r"with 0.00 GB of this file written; free space there and run again"):
        w.append(big.data)  # raised while writing, not first at close
    w.abort()
    assert not w._thread.is_alive() and w._fd is None


def test_incomplete_file_is_refused_and_the_thread_ends(tmp_path):
    w = RankWriter(tmp_path / "r.safetensors", [Spec("a", (4,), "float32")])
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()
    assert not w._out._thread.is_alive() and w._out._fd is None
    w = RankWriter(tmp_path / "s.safetensors", [Spec("a", (4,), "float32")])
    w.abort()
    assert not w._out._thread.is_alive()
    w.abort()  # twice: harmless
