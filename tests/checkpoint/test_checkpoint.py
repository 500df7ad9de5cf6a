"""Checkpoint readers and writer: round trips, flatten order, dequantisation, refusing bad pickles."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import pickletools
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from grok_deploy.checkpoint import (
    QuantizedWeight8bit,
    dequantize,
    open_checkpoint,
    pickle_io,
    quantize_blocks,
    write_checkpoint,
)
from grok_deploy.checkpoint.hf import write_hf_checkpoint
from grok_deploy.checkpoint.xai import XaiCheckpoint, tensor_file
from grok_deploy.errors import UserError
from grok_deploy.model import names
from grok_deploy.model.config import GrokConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = GrokConfig.from_name("grok-1-tiny")


def random_leaves(cfg: GrokConfig, seed: int = 0) -> dict:
    """Random leaves as the release stores them; the 8 K-blocks get different magnitudes."""
    rng = np.random.default_rng(seed)
    out = {}
    for path in names.flatten_order(cfg.num_layers):
        shape, sshape = names.leaf_shape(cfg, path), names.scale_shape(cfg, path)
        w = rng.standard_normal(shape, dtype=np.float32)
        if sshape is None:
            out[path] = w
            continue
        b = sshape[-2]
        mag = np.exp(rng.standard_normal(shape[:-2] + (b, 1, 1))).astype(np.float32)
        w = (w.reshape(shape[:-2] + (b, shape[-2] // b, shape[-1])) * mag).reshape(shape)
        out[path] = quantize_blocks(w, b)
    return out


def save(folder, cfg, leaves):
    write_checkpoint(folder, cfg, leaves)
    (folder / "tokenizer.model").write_bytes(b"not read by the checkpoint reader")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    leaves = random_leaves(TINY)
    return save(tmp_path_factory.mktemp("ckpt") / "tiny", TINY, leaves), leaves


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == BF16 else a


# --- flatten order -------------------------------------------------------------------------------

def test_flatten_order_of_the_release():
    ckpt = XaiCheckpoint(Path("."), Path("ckpt-0"), GrokConfig.from_name("grok-1"), Path("tokenizer.model"))
    assert len(ckpt.names()) == 770
    assert ckpt.file(names.EMBEDDING).name == "tensor00000_000"
    assert ckpt.file(names.FINAL_NORM).name == "tensor00001_000"
    assert ckpt.file(names.layer_path(10, "moe/linear/w")).name == "tensor00026_000"
    assert ckpt.file(names.layer_path(2, "moe/linear/w")).name == "tensor00146_000"
    assert ckpt.file(names.layer_path(9, "router/w")).name == "tensor00769_000"
    assert ckpt.file(names.layer_path(63, "multi_head_attention/linear/w")).name == f"tensor{722 + 4:05d}_000"
    with pytest.raises(KeyError):
        ckpt.file("transformer/decoder_layer_64/router/w")


def test_files_hold_layers_in_string_order(tiny):
    folder, leaves = tiny
    # 12 layers sort 0, 1, 10, 11, 2, ...: layer 10 starts at file 26, layer 2 at file 50
    for layer, first in ((0, 2), (1, 14), (10, 26), (11, 38), (2, 50), (9, 134)):
        ref = pickle_io.scan(folder / "ckpt-0" / tensor_file(first + 11))  # router/w
        want = leaves[names.layer_path(layer, "router/w")]
        assert np.array_equal(ref.load(), want)
    assert np.array_equal(pickle_io.scan(folder / "ckpt-0" / tensor_file(1)).load(), leaves[names.FINAL_NORM])


# --- round trip --------------------------------------------------------------------------------------

def test_round_trip_every_file(tiny):
    folder, leaves = tiny
    ckpt = open_checkpoint(folder)
    assert (ckpt.format, ckpt.config, ckpt.tokenizer_path) == ("xai", TINY, folder / "tokenizer.model")
    infos = ckpt.infos()
    assert [i.name for i in infos] == names.flatten_order(12) == list(leaves)
    for i, info in enumerate(infos):
        want = leaves[info.name]
        raw = ckpt.read_raw(info.name)
        assert info.file == f"ckpt-0/{tensor_file(i)}"
        if isinstance(want, QuantizedWeight8bit):
            assert info.quantized and info.dtype == "int8" and info.scale_shape == want.scales.shape
            assert raw.weight.dtype == np.int8 and raw.scales.dtype == BF16
            assert np.array_equal(raw.weight, want.weight) and np.array_equal(bits(raw.scales), bits(want.scales))
            assert np.array_equal(ckpt.read(info.name), dequantize(want))
        else:
            assert not info.quantized and info.dtype == "float32" and info.scale_shape is None
            assert raw.dtype == np.float32 and np.array_equal(raw, want)
            assert np.array_equal(ckpt.read(info.name), want)
        assert info.shape == names.leaf_shape(TINY, info.name)


def test_read_expert_equals_slice_and_maps_only_its_bytes(tiny):
    folder, leaves = tiny
    ckpt = open_checkpoint(folder)
    for leaf in ("moe/linear/w", "moe/linear_1/w", "moe/linear_v/w"):
        name = names.layer_path(10, leaf)
        full = ckpt.read(name)
        for e in range(8):
            part = ckpt.read_expert(name, e)
            assert part.dtype == np.float32 and np.array_equal(part, full[e])
        ref = ckpt.ref(name).weight
        m = ref.load_index(5)
        k, n = ref.shape[1:]
        assert (m.offset, m.nbytes) == (ref.offset + 5 * k * n, k * n)
    with pytest.raises(ValueError):
        ckpt.read_expert(names.layer_path(0, "router/w"), 0)
    with pytest.raises(ValueError):
        ckpt.read_expert(names.layer_path(0, "moe/linear/w"), 8)


def test_params_streams_every_leaf_in_order(tiny):
    folder, leaves = tiny
    seen = []
    for name, arr in open_checkpoint(folder).params():
        want = leaves[name]
        want = dequantize(want) if isinstance(want, QuantizedWeight8bit) else want
        assert arr.dtype == np.float32 and np.array_equal(arr, want)
        seen.append(name)
    assert seen == names.flatten_order(12)


def test_writer_is_deterministic(tmp_path, tiny):
    folder, leaves = tiny
    other = save(tmp_path / "again", TINY, dict(reversed(list(leaves.items()))))  # any order in
    for i in range(len(leaves)):
        name = tensor_file(i)
        assert (other / "ckpt-0" / name).read_bytes() == (folder / "ckpt-0" / name).read_bytes()
    assert not [p for p in (other / "ckpt-0").iterdir() if p.name.startswith(".")]  # no temp files left


def test_writer_checks_leaves(tmp_path):
    leaves = random_leaves(TINY, seed=1)
    bad = dict(leaves)
    bad[names.FINAL_NORM] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="expected float32"):
        write_checkpoint(tmp_path / "a", TINY, bad)
    bad = dict(leaves)
    bad[names.layer_path(0, "router/w")] = quantize_blocks(np.ones((256, 8), np.float32), 1)
    with pytest.raises(ValueError, match="must be a float32 array"):
        write_checkpoint(tmp_path / "b", TINY, bad)
    bad = dict(leaves)
    del bad[names.layer_path(3, "rms_norm/scale")]
    with pytest.raises(ValueError, match="not given"):
        write_checkpoint(tmp_path / "c", TINY, bad)


# --- dequantisation ------------------------------------------------------------------------------

def test_dequantize_uses_the_k_block_of_each_row():
    rng = np.random.default_rng(3)
    e, k, n, b = 2, 16, 3, 8
    q = rng.integers(-127, 128, (e, k, n)).astype(np.int8)
    s = rng.uniform(0.01, 2, (e, b, n)).astype(BF16)
    want = np.empty((e, k, n), np.float32)
    for x in range(e):
        for i in range(k):
            for j in range(n):
                want[x, i, j] = np.float32(q[x, i, j]) * np.float32(s[x, i // (k // b), j])
    got = dequantize(QuantizedWeight8bit(q, s))
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(dequantize(QuantizedWeight8bit(q[1], s[1])), want[1])  # one expert's slice
    s1 = s[:, :1]  # one scale per column broadcasts over all rows
    assert np.array_equal(dequantize(QuantizedWeight8bit(q, s1)), q.astype(np.float32) * s1.astype(np.float32))
    with pytest.raises(ValueError):
        dequantize(QuantizedWeight8bit(q, s[:, :3]))


def test_quantize_blocks_rounds_scales_to_bf16_first():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 64, 5)).astype(np.float32)
    w[0, :, 2] = 0.0
    qw = quantize_blocks(w, 8)
    assert qw.weight.dtype == np.int8 and qw.scales.dtype == BF16 and qw.scales.shape == (2, 8, 5)
    blocks = w.reshape(2, 8, 8, 5)
    assert np.array_equal(bits(qw.scales), bits((np.abs(blocks).max(axis=2) / np.float32(127)).astype(BF16)))
    assert np.abs(qw.weight).max() <= 127 and not qw.weight[0, :, 2].any()
    s = qw.scales.astype(np.float32)
    err = np.abs(dequantize(qw) - w).reshape(2, 8, 8, 5)
    assert (err <= 0.5 * s[:, :, None, :] * (1 + 1e-6) + 1e-12).all()


# --- refusing pickles ----------------------------------------------------------------------------

class _Shell:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_refuses_os_system_without_running_it(tmp_path, tiny):
    folder = copy_ckpt(tiny[0], tmp_path / "ck")
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Shell(f"touch {marker}"), protocol=4)
    target = folder / "ckpt-0" / tensor_file(10)
    target.write_bytes(evil)
    ckpt = open_checkpoint(folder)  # file 10 is not among the probed ones
    with pytest.raises(UserError, match=r"refused pickle global '(posix|os)\.system'") as err:
        ckpt.infos()
    assert str(target) in str(err.value)
    with pytest.raises(UserError, match="refused pickle global"):
        ckpt.read(ckpt.names()[10])
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: the standard loader runs it
    assert marker.exists()


def _raw_pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


@pytest.mark.parametrize("body, message", [
    (b"cbuiltins\neval\n)R", "refused pickle global 'builtins.eval'"),
    (b"\x8c\x08builtins\x8c\x0a__import__\x93", "refused pickle global 'builtins.__import__'"),
    (b"\x8c\x08__main__\x8c\x13QuantizedWeight8bit\x93)R", "unexpected call"),
    (b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02O8\x89\x88\x87R", "object dtype refused"),
    (b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f4\x89\x88\x87R", "unexpected BUILD|exactly one|incomplete"),
    (b"]", "unsupported pickle opcode"),
])
def test_refuses_other_pickles(tmp_path, body, message):
    f = tmp_path / "tensor00000_000"
    f.write_bytes(_raw_pickle(body))
    with pytest.raises(UserError, match=message) as err:
        pickle_io.scan(f)
    assert str(f) in str(err.value)


def test_refuses_a_forbidden_global_hidden_in_the_scales(tmp_path, tiny):
    folder, _ = tiny
    data = (folder / "ckpt-0" / tensor_file(5)).read_bytes()  # layer 0 attention key: a QW8
    # replace the scales array by getattr(...): the walk refuses at the global, before any call
    cut = data.index(b"\x8c\x06scales") + 8
    evil = data[:cut] + b"\x8c\x08builtins\x8c\x07getattr\x93)Rub."
    f = tmp_path / "x"
    f.write_bytes(evil)
    with pytest.raises(UserError, match="refused pickle global 'builtins.getattr'"):
        pickle_io.scan(f)


def test_wrong_shape_names_the_file(tmp_path, tiny):
    folder = copy_ckpt(tiny[0], tmp_path / "ck")
    target = folder / "ckpt-0" / tensor_file(9)  # layer 0 rms_norm/scale
    with open(target, "wb") as f:
        pickle_io.dump(f, np.zeros(7, np.float32))
    ckpt = open_checkpoint(folder)
    with pytest.raises(UserError, match=r"rms_norm/scale array is float32 \[7\], expected float32 \[256\]") as err:
        ckpt.read(ckpt.names()[9])
    assert str(target) in str(err.value)


# --- truncated and missing files -----------------------------------------------------------------

def test_truncated_files_name_the_file(tmp_path, tiny):
    folder = copy_ckpt(tiny[0], tmp_path / "ck")
    ckpt = open_checkpoint(folder)
    for i, keep in ((2, 100_000), (3, 150), (9, 0)):  # inside a payload, inside the header, empty
        target = folder / "ckpt-0" / tensor_file(i)
        data = target.read_bytes()
        target.write_bytes(data[:keep])
        with pytest.raises(UserError, match="truncated") as err:
            ckpt.read(ckpt.names()[i])
        assert str(target) in str(err.value)


def test_missing_files_are_reported_by_number(tmp_path, tiny):
    folder = copy_ckpt(tiny[0], tmp_path / "ck")
    for i in (5, 6, 7, 40):
        (folder / "ckpt-0" / tensor_file(i)).unlink()
    with pytest.raises(UserError, match=r"4 of 146 tensor files missing, indices 00005-00007, 00040"):
        open_checkpoint(folder)
    with pytest.raises(UserError, match="00005-00007, 00040"):
        open_checkpoint(folder, preset="grok-1-tiny")
    (folder / "ckpt-0" / tensor_file(145)).unlink()  # the last file too: still found with the preset
    with pytest.raises(UserError, match="00040, 00145"):
        open_checkpoint(folder, preset="grok-1-tiny")


def test_infos_reads_headers_only(tiny, monkeypatch):
    folder, _ = tiny
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = pickle_io._open_raw
    monkeypatch.setattr(pickle_io, "_open_raw", lambda p: Counting(real_open(p)))
    infos = open_checkpoint(folder).infos()
    total = sum(p.stat().st_size for p in (folder / "ckpt-0").iterdir())
    assert len(infos) == 146
    assert sum(read) < 0.05 * total
    assert max(read) <= pickle_io._CHUNK


# --- config matching and folder layout ----------------------------------------------------------

def test_config_from_shapes_or_preset(tmp_path, tiny):
    folder, _ = tiny
    assert open_checkpoint(folder, preset="grok-1-tiny").config is TINY
    with pytest.raises(UserError, match="grok-1-bench"):
        open_checkpoint(folder, preset="grok-1-bench")
    custom = dataclasses.replace(TINY, name="custom", num_layers=11, emb_size=128, num_q_heads=8)
    save(tmp_path / "custom", custom, random_leaves(custom))
    with pytest.raises(UserError, match=r"match no preset \(grok-1, grok-1-bench, grok-1-smoke, grok-1-tiny\); pass the preset") as err:
        open_checkpoint(tmp_path / "custom")
    assert str(tmp_path / "custom") in str(err.value)
    assert open_checkpoint(tmp_path / "custom", preset=custom).config == custom


def test_folder_layout_errors(tmp_path, tiny):
    folder = copy_ckpt(tiny[0], tmp_path / "ck")
    assert open_checkpoint(folder / "ckpt-0").path == folder  # pointing at ckpt-0/ itself
    (folder / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="tokenizer.model: missing"):
        open_checkpoint(folder)
    (tmp_path / "old" / "ckpt").mkdir(parents=True)
    with pytest.raises(UserError, match="ckpt-0/, not ckpt/"):
        open_checkpoint(tmp_path / "old")
    with pytest.raises(UserError, match="no such checkpoint folder"):
        open_checkpoint(tmp_path / "nowhere")
    (folder / "tokenizer.model").write_bytes(b"x")
    shutil.copy(folder / "ckpt-0" / tensor_file(3), folder / "ckpt-0" / "tensor00003_001")
    with pytest.raises(UserError, match="host-shard"):
        open_checkpoint(folder)


# --- compatibility with the original loader and with other writers -----------------------------

# What model.py's class looks like to pickle: a dataclass of two arrays, found as __main__.QuantizedWeight8bit
_OriginalQW8 = dataclasses.make_dataclass("QuantizedWeight8bit", [("weight", np.ndarray), ("scales", np.ndarray)])
_OriginalQW8.__module__ = "__main__"


def test_standard_pickle_load_reads_our_files(tiny, monkeypatch):
    """checkpoint.py plants its class as __main__.QuantizedWeight8bit, then calls pickle.load."""
    folder, leaves = tiny
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", _OriginalQW8, raising=False)
    for i, (name, want) in enumerate(leaves.items()):
        data = (folder / "ckpt-0" / tensor_file(i)).read_bytes()
        assert data[:2] == b"\x80\x04"
        globals_ = {a for op, a, _ in pickletools.genops(data) if op.name == "SHORT_BINUNICODE"}
        assert "numpy.core.multiarray" in globals_
        obj = pickle.loads(data)
        if isinstance(want, QuantizedWeight8bit):
            assert type(obj) is _OriginalQW8
            assert obj.weight.dtype == np.int8 and obj.scales.dtype == BF16
            assert np.array_equal(obj.weight, want.weight) and np.array_equal(bits(obj.scales), bits(want.scales))
        else:
            assert type(obj) is np.ndarray and obj.dtype == np.float32 and np.array_equal(obj, want)


def test_reads_files_written_by_the_standard_pickler(tmp_path, tiny, monkeypatch):
    """Framed, memoised pickles as pickle.dump writes them; numpy 2 and ml_dtypes module names."""
    folder, leaves = tiny
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", _OriginalQW8, raising=False)
    name = names.layer_path(10, "moe/linear_1/w")
    want = leaves[name]
    data = pickle.dumps(_OriginalQW8(want.weight, want.scales), protocol=4)
    assert b"\x95" in data[:3] and b"\x94" in data  # FRAME and MEMOIZE present
    f = tmp_path / "std"
    f.write_bytes(data)
    ref = pickle_io.scan(f)
    assert np.array_equal(ref.weight.load(), want.weight) and np.array_equal(bits(ref.scales.load()), bits(want.scales))
    ours = (folder / "ckpt-0" / tensor_file(3)).read_bytes()  # layer 0 moe/linear_1/w
    for old, new in ((b"\x8c\x15numpy.core.multiarray", b"\x8c\x16numpy._core.multiarray"),
                     (b"\x8c\x09ml_dtypes", b"\x8c\x18ml_dtypes._ml_dtypes_ext")):
        assert old in ours
        ours = ours.replace(old, new)
    f.write_bytes(ours)
    ref = pickle_io.scan(f)
    assert np.array_equal(ref.weight.load(), leaves[names.layer_path(0, "moe/linear_1/w")].weight)


# --- Hugging Face port -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_equals_xai_dequantised(tmp_path, tiny, dtype):
    from safetensors import safe_open

    xai = open_checkpoint(tiny[0])
    params = dict(xai.params())
    out = write_hf_checkpoint(tmp_path / "hf", TINY, params, shard_bytes=4 << 20, dtype=dtype)
    (out / "tokenizer.model").write_bytes(b"x")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in shards}
    for hf_name, leaf, part in (("model.layers.10.moe_block.experts.3.linear_1.weight", "moe/linear_1/w", 3),
                                ("model.layers.2.moe_block.gate.weight", "router/w", None),
                                ("model.layers.0.attn.o_proj.weight", "multi_head_attention/linear/w", None)):
        want = params[names.layer_path(int(hf_name.split(".")[2]), leaf)]
        want = want if part is None else want[part]
        with safe_open(str(out / index[hf_name]), framework="np") as f:  # torch layout [out, in]
            got = f.get_tensor(hf_name)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, want.T.astype(dtype))

    hf = open_checkpoint(out)
    assert (hf.format, hf.config) == ("hf", TINY)
    assert [i.shape for i in hf.infos()] == [i.shape for i in xai.infos()]
    assert {i.dtype for i in hf.infos()} == {dtype}
    for name, want in params.items():
        want = want if dtype == "float32" else want.astype(BF16).astype(np.float32)
        got = hf.read(name)
        assert got.dtype == np.float32 and np.array_equal(got, want), name
        if got.ndim == 3:
            assert np.array_equal(hf.read_expert(name, 6), want[6])


def test_hf_missing_tensor_is_named(tmp_path, tiny):
    from safetensors.numpy import save_file

    (tmp_path / "tokenizer.model").write_bytes(b"x")
    save_file({"model.embed_tokens.weight": np.zeros((1024, 256), np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="model.layers.0.attn.q_proj.weight"):
        open_checkpoint(tmp_path)
