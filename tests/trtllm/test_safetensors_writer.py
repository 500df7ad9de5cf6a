"""The rank writer hashes on its own thread: the sha256 it returns is the file's, in order, for
chunks far larger than the pieces and the queue of the hashing thread."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from grok_deploy.trtllm import safetensors_writer as sw
from grok_deploy.trtllm.safetensors_writer import RankWriter, Spec, read_header


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
