"""Input files and generate's inputs as an adversary gives them (issue 13, items 7 and 8): a
folder, a symlink loop, a FIFO or a device as a tensor file; a 2^70 shape; one extra file; NaN and
inf weights (named by inspect and convert); a safetensors header padded with junk; generate's
non-finite, tiny, negative or huge numbers. Each is one `error:` line and exit 2, nothing left."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from grok_deploy.checkpoint.pickle_io import QW8Ref, scan
from grok_deploy.cli import main
from rel_helpers import cli, leftovers, one_error_line

VICTIM = "tensor00005_000"  # layer 0 attention key: int8 weight + bf16 scales


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_ckpt):
    """One private copy per module; each test restores what it breaks."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("inputs") / "ckpt"))


@pytest.fixture
def victim(ckpt):
    path = ckpt / "ckpt-0" / VICTIM
    saved = path.read_bytes()
    path.unlink()
    yield path
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.write_bytes(saved)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,message", [
    ("folder", "is a folder, not a tensor file"),
    ("loop", "symlink loop"),
    ("device", "not a regular file"),
    ("huge shape", "not a Grok-1 checkpoint tensor pickle"),
])
def test_bad_tensor_files(ckpt, victim, capsys, tmp_path, kind, message):
    if kind == "folder":
        victim.mkdir()
    elif kind == "loop":
        victim.symlink_to(victim)
    elif kind == "device":
        victim.symlink_to("/dev/zero")
    else:
        small = ckpt / "ckpt-0" / "tensor00001_000"  # final norm, float32 (256,): BININT2 256 in its header
        data = small.read_bytes()
        assert data.count(b"M\x00\x01") == 1
        victim.write_bytes(data.replace(b"M\x00\x01", b"\x8a\x09" + (1 << 70).to_bytes(9, "little")))
    for args in (("inspect", ckpt), ("convert", ckpt, tmp_path / "trt", "--tp", "2", "--workers", "1"),
                 ("export-onnx", ckpt, tmp_path / "onnx"), ("generate", ckpt, "--prompt", "hi", "--max-tokens", "2")):
        code, _, err = run(capsys, *args)
        assert code == 2, (args, err)
        line = one_error_line(err)
        assert VICTIM in line and message in line, line
    assert leftovers(tmp_path) == [] and not (tmp_path / "trt").exists() and not (tmp_path / "onnx").exists()


@pytest.mark.timeout(120)
def test_a_fifo_hangs_no_command(ckpt, victim, tmp_path):
    os.mkfifo(victim)
    for args in (("inspect", ckpt), ("convert", ckpt, tmp_path / "trt", "--tp", "2"),
                 ("export-onnx", ckpt, tmp_path / "onnx"), ("generate", ckpt, "--prompt", "hi")):
        res = cli(*args, timeout=60)  # a hang fails here
        assert res.returncode == 2, res.stderr
        assert "not a regular file (a FIFO" in one_error_line(res.stderr)


def test_an_extra_tensor_file_is_named_as_extra(ckpt, capsys):
    extra = ckpt / "ckpt-0" / "tensor00146_000"
    shutil.copy(ckpt / "ckpt-0" / "tensor00001_000", extra)
    try:
        code, _, err = run(capsys, "inspect", ckpt)
        line = one_error_line(err)
        assert code == 2 and "a 12-layer checkpoint has 146 (then 00146 would be extra: remove them)" in line
        assert "missing" in line and "pass --preset" in line  # the other reading, for a truncated 13-layer one
        code, _, err = run(capsys, "inspect", ckpt, "--preset", "grok-1-tiny")
        assert code == 2 and "unexpected indices 00146; remove those files" in one_error_line(err)
    finally:
        extra.unlink()
    (ckpt / "ckpt-0" / "tensor00140_000").rename(ckpt / "ckpt-0" / "x")
    try:
        code, _, err = run(capsys, "inspect", ckpt)
        assert code == 2 and "1 of 146 tensor files missing, indices 00140" in one_error_line(err)
    finally:
        (ckpt / "ckpt-0" / "x").rename(ckpt / "ckpt-0" / "tensor00140_000")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named_by_inspect_and_convert(ckpt, tmp_path, capsys, value):
    path = ckpt / "ckpt-0" / VICTIM
    saved = path.read_bytes()
    ref = scan(path)
    assert isinstance(ref, QW8Ref)
    data = bytearray(saved)
    bad = np.array([value, value], ref.scales.dtype).tobytes()  # two scales of the bf16 table
    data[ref.scales.offset:ref.scales.offset + len(bad)] = bad
    path.write_bytes(bytes(data))
    try:
        code, out, err = run(capsys, "inspect", ckpt, "--json")
        assert code == 2
        name = "transformer/decoder_layer_0/multi_head_attention/key/w"
        assert json.loads(out)["non_finite"] == [{"name": name, "count": 2}]
        assert f"{name} (2 values)" in one_error_line(err)
        code, _, err = run(capsys, "convert", ckpt, tmp_path / "trt", "--tp", "2", "--workers", "2")
        line = one_error_line(err)
        assert code == 2 and "non-finite values (NaN or inf) going into transformer.layers.0.attention.qkv" in line
        assert leftovers(tmp_path) == [] and not (tmp_path / "trt").exists()
    finally:
        path.write_bytes(saved)
    code, _, _ = run(capsys, "inspect", ckpt, "--json")
    assert code == 0


def _safetensors(path: Path, entries: int, pad: int = 0) -> None:
    header = {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(entries)}
    blob = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,message", [
    ("300k junk entries", "a header of"),
    ("25k entries", "25000 tensors in one shard"),
    ("fifo", "not a regular file"),
    ("folder", "is a folder"),
    ("truncated", "truncated"),
])
def test_bad_safetensors_shards(ckpt, tmp_path, capsys, kind, message):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(ckpt / "tokenizer.model", hf / "tokenizer.model")
    shard = hf / "model-00001-of-00001.safetensors"
    if kind == "300k junk entries":
        _safetensors(shard, 300_000)
    elif kind == "25k entries":
        _safetensors(shard, 25_000)
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "folder":
        shard.mkdir()
    else:
        shard.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    code, _, err = run(capsys, "inspect", hf)
    assert code == 2
    line = one_error_line(err)
    assert shard.name in line and message in line, line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
    (["--temperature", "1e-40"], "use 0 for greedy"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--seed", str(1 << 70)], "--seed"),
    (["--seed", "-1"], "--seed -1"),
    (["--max-tokens", "1000000000"], "leave room for"),
    (["--max-tokens", "0"], "must be positive"),
    (["--max-tokens", "1e9"], "invalid int value"),
    (["--prompt", "\udcff"], "--prompt: not valid text"),
])
def test_generate_refuses_bad_numbers(ckpt, capsys, flags, message):
    args = ["generate", str(ckpt), *(["--prompt", "hello"] if "--prompt" not in flags else []), *flags]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors exit 2 after one error line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in one_error_line(err), err


@pytest.mark.timeout(120)
def test_generate_edge_values_that_are_fine(ckpt, capsys):
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "hello", "--max-tokens", "3", "--temperature", "1e-4",
                       "--top-p", "1e-9", "--seed", str((1 << 64) - 1), "--json")
    assert code == 0 and len(json.loads(out)["output_ids"]) == 3
