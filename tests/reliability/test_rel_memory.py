"""Bounded memory and time for hostile inputs (issue 22, item 7): YAML anchors that expand
without end, a pickle of millions of opcodes, a safetensors header of 300k metadata entries, an
8 GB sparse tokenizer.model, a benchmark of 10^8 requests, NaN and inf weights. Each is one
`error:` line and exit 2; the memory cases are measured on a real `grok-deploy` process (its own
peak RSS, from wait4)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from grok_deploy.checkpoint.pickle_io import MAX_OPCODE_BYTES, QW8Ref, _glob, scan
from grok_deploy.cli import main
from grok_deploy.errors import UserError
from grok_deploy.pipeline.yaml_lines import MAX_DEPTH, MAX_EXPANDED_BYTES
from rel_helpers import cli, cli_peak, leftovers, one_error_line

PEAK_MB = 200
VICTIM = "tensor00005_000"  # layer 0 attention key: int8 weight + bf16 scales
KEY_W = "transformer/decoder_layer_0/multi_head_attention/key/w"
BIG = "x" * 700_000  # one scalar under the 1 MB file cap; aliased 3 times it is over MAX_EXPANDED_BYTES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_ckpt):
    """One private copy per module; each test restores what it breaks."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("memory") / "ckpt"))


@pytest.fixture
def victim(ckpt):
    path = ckpt / "ckpt-0" / VICTIM
    saved = path.read_bytes()
    yield path
    path.write_bytes(saved)


YAMLS = {  # name -> (text, what the error says)
    "recursive mapping": ("a: &a\n  b: *a\n", f"nested more than {MAX_DEPTH} levels deep once aliases are expanded"),
    "recursive list": ("a: &a [*a, *a]\n", f"nested more than {MAX_DEPTH} levels deep"),
    "recursive merge key": ("a: &a\n  <<: *a\n  b: 1\n", f"nested more than {MAX_DEPTH} levels deep"),
    "billion laughs": ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
        "more than 100000 YAML values"),
    "aliased big scalar": (f"a: &a {BIG}\nb: [*a, *a, *a]\n",
                           f"more than {MAX_EXPANDED_BYTES} bytes of keys and values"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(YAMLS))
def test_yaml_alias_expansion_is_refused_in_bounded_memory(tmp_path, name):
    text, message = YAMLS[name]
    (tmp_path / "pipeline.yaml").write_text(text)
    t0 = time.monotonic()
    res, peak = cli_peak("plan", tmp_path / "pipeline.yaml", timeout=60)
    assert res.returncode == 2 and message in one_error_line(res.stderr), res.stderr
    assert peak < PEAK_MB, f"plan peaked at {peak:.0f} MB"  # the recursive anchor reached 7 GB in 15 s
    assert time.monotonic() - t0 < 30


def _hostile_pickles() -> dict[str, bytes]:
    mb20 = 20 << 20
    return {
        "20 MB of empty dicts": b"\x80\x04" + b"}" * mb20 + b".",            # was 1.37 GB of dicts
        "20 MB of marks": b"\x80\x04" + b"(" * mb20 + b".",                  # a list per byte
        "20 MB of memo entries": b"\x80\x04N" + b"\x94" * mb20 + b".",       # a memo entry per byte
        "20 MB of short strings": b"\x80\x04" + b"\x8c\x02ab\x94" * (mb20 // 5) + b".",
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(_hostile_pickles()))
def test_a_hostile_pickle_is_scanned_in_bounded_memory(ckpt, victim, name):
    victim.write_bytes(_hostile_pickles()[name])
    assert victim.stat().st_size > 20 << 20
    res, peak = cli_peak("inspect", ckpt, timeout=120)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert VICTIM in line and f"more than {MAX_OPCODE_BYTES} bytes of pickle opcodes" in line, line
    assert peak < PEAK_MB, f"inspect peaked at {peak:.0f} MB on a {victim.stat().st_size >> 20} MB pickle"


def test_a_deep_dtype_descriptor_is_refused_not_hashed(tmp_path):
    path = tmp_path / "deep"  # numpy.dtype(((((...60000 levels...)))), False, True)
    path.write_bytes(b"\x80\x04" + _glob("numpy", "dtype") + b")" + b"\x85" * 60_000 + b"\x89\x88\x87R.")
    with pytest.raises(UserError, match=r"\(unexpected dtype descriptor\); refusing to load it"):
        scan(path)


def test_real_tensor_pickles_are_far_below_the_opcode_cap(ckpt):
    """The cap leaves a real file 200x room: the largest header of the release format is ~324 bytes."""
    from grok_deploy.checkpoint import pickle_io

    sizes = []
    for f in sorted((ckpt / "ckpt-0").iterdir()):
        with open(f, "rb") as fh:
            s = pickle_io._Stream(fh, f.stat().st_size)
            pickle_io._walk(s, f)
        sizes.append(s.pos - s.skipped)
    assert 100 < max(sizes) < MAX_OPCODE_BYTES // 100, max(sizes)


def _hf_with_metadata(tmp_path, ckpt, entries: int) -> Path:
    """The tiny model as a Hugging Face port whose one shard carries `entries` metadata entries."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.hf import MAX_HEADER_BYTES, write_hf_checkpoint

    src = open_checkpoint(ckpt)
    hf = write_hf_checkpoint(tmp_path / "hf", src.config, dict(src.params()), dtype="float32")
    shutil.copy(ckpt / "tokenizer.model", hf / "tokenizer.model")
    shard = next(hf.glob("*.safetensors"))
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {**header.get("__metadata__", {}), **{f"k{i}": "" for i in range(entries)}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) < MAX_HEADER_BYTES  # under the header cap: only the entry count refuses it
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    return hf


@pytest.mark.timeout(240)
def test_safetensors_metadata_is_bounded_by_entry_count(ckpt, tmp_path):
    hf = _hf_with_metadata(tmp_path, ckpt, 300_000)
    shard = next(hf.glob("*.safetensors")).name
    for args in (("inspect", hf), ("convert", hf, tmp_path / "trt", "--tp", "2", "--workers", "1")):
        t0 = time.monotonic()
        res = cli(*args, timeout=60)  # was 25-31 s (over 120 s on a loaded host)
        seconds = time.monotonic() - t0
        assert res.returncode == 2, res.stderr
        line = one_error_line(res.stderr)
        assert shard in line and "300001 metadata entries in its header" in line and "at most 1024" in line, line
        assert seconds < 20, seconds
    assert not (tmp_path / "trt").exists() and leftovers(tmp_path) == []
    hf2 = _hf_with_metadata(tmp_path / "ok", ckpt, 1000)  # a few hundred entries are still a shard
    assert cli("inspect", hf2, timeout=60).returncode == 0


@pytest.mark.timeout(240)
def test_an_8gb_sparse_tokenizer_is_refused_before_reading(ckpt, tmp_path):
    sparse = tmp_path / "ckpt"
    shutil.copytree(ckpt, sparse)
    os.truncate(sparse / "tokenizer.model", 8 << 30)  # sparse: no disk used
    message = f"{sparse / 'tokenizer.model'}: 8589934592 bytes, larger than any SentencePiece model"
    res, peak = cli_peak("generate", sparse, "--prompt", "hi", "--max-tokens", "2", timeout=120)
    assert res.returncode == 2 and message in one_error_line(res.stderr), res.stderr
    assert peak < 1000, peak  # was a MemoryError after trying to hold 8 GB
    for args in (("inspect", sparse), ("export-onnx", sparse, tmp_path / "onnx"),
                 ("convert", sparse, tmp_path / "trt", "--tp", "2")):
        res = cli(*args, timeout=60)
        assert res.returncode == 2 and message in one_error_line(res.stderr), (args, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_package_refuses_a_huge_tokenizer_before_copying_it(tmp_path, tiny_ckpt):
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving.package import package
    from serving_fixtures import write_pipeline

    cfg = load_pipeline(write_pipeline(tmp_path / "p"))
    tok = tmp_path / "tokenizer.model"
    with open(tok, "wb") as f:
        f.truncate(8 << 30)
    with pytest.raises(UserError, match="8589934592 bytes, larger than any SentencePiece model"):
        package(cfg, tmp_path / "repo", tokenizer=tok, engine_dir=tiny_ckpt, engine_kind="torch")
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("flags,message", [
    (["--requests", "100000000"], "--requests 100000000 is more than the 10000 one level may send"),
    (["--warmup", "100000000"], "--warmup 100000000 is more than the 10000 one level may send"),
    (["--concurrency", "1,1000000"], "concurrency 1000000 is more than 1024 client threads"),
])
def test_bench_counts_are_bounded(tmp_path, capsys, flags, message):
    from serving_fixtures import write_pipeline

    pipeline = write_pipeline(tmp_path)
    t0 = time.monotonic()
    assert main(["bench", str(pipeline), "--url", "127.0.0.1:1", *flags]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert time.monotonic() - t0 < 5  # refused before a prompt is made or a server is reached


def test_bench_requests_in_float_notation_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path / "pipeline.yaml"), "--requests", "1e8"])
    assert e.value.code == 2 and "argument --requests: invalid int value: '1e8'" in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_generate_and_export(ckpt, victim, tmp_path, capsys, value):
    saved = victim.read_bytes()
    ref = scan(victim)
    assert isinstance(ref, QW8Ref)
    data = bytearray(saved)
    bad = np.array([value, value], ref.scales.dtype).tobytes()  # two scales of the bf16 table
    data[ref.scales.offset:ref.scales.offset + len(bad)] = bad
    victim.write_bytes(bytes(data))
    for args in (("generate", ckpt, "--prompt", "hello", "--max-tokens", "2"),
                 ("export-onnx", ckpt, tmp_path / "onnx")):
        code = main([str(a) for a in args])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and f"{ckpt}: 1 tensors hold NaN or inf values: {KEY_W} (" in line, (args, line)
        assert "the checkpoint is corrupt, download those files again" in line
    assert not (tmp_path / "onnx").exists() and leftovers(tmp_path) == []
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.stream import CheckpointSource

    streamed = CheckpointSource(open_checkpoint(ckpt))  # verify's score mode, check-shards' reference
    with pytest.raises(UserError, match=f"1 tensors hold NaN or inf values: {KEY_W}"):
        streamed.read(KEY_W)
    victim.write_bytes(saved)
    assert main(["generate", str(ckpt), "--prompt", "hello", "--max-tokens", "2"]) == 0
