"""The streaming safetensors writer: files the safetensors library reads back exactly, written in
chunks of any size, hashed on the way (on its own thread: the sha256 it returns is the file's);
and read_header's checks that a rank file is whole."""
from __future__ import annotations

import hashlib
import json
import struct

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


def test_threaded_sha256_is_the_files(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(-127, 128, (40, 1 << 20), dtype=np.int8)  # 40 MiB: 40 pieces, queue of 16
    small = rng.standard_normal(7).astype(np.float32)
    specs = [Spec("a", big.shape, "int8"), Spec("b", small.shape, "float32")]
    w = RankWriter(tmp_path / "r.safetensors", specs)
    w.write("a", big[:3])      # a chunk of 3 MiB, then the rest in one 37 MiB chunk
    w.write("a", big[3:])
    w.write("b", small)
    sha = w.close()
    data = (tmp_path / "r.safetensors").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest() and len(data) == w.size
    assert read_header(tmp_path / "r.safetensors")["a"]["shape"] == [40, 1 << 20]
    assert sw.HASH_PIECE * sw.HASH_QUEUE < big.nbytes


def test_incomplete_file_is_refused_and_the_thread_ends(tmp_path):
    w = RankWriter(tmp_path / "r.safetensors", [Spec("a", (4,), "float32")])
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()
    assert not w._sha._thread.is_alive()
    w = RankWriter(tmp_path / "s.safetensors", [Spec("a", (4,), "float32")])
    w.abort()
    assert not w._sha._thread.is_alive()
