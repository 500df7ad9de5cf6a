"""check-shards: the rank files run by one gloo process per rank, against the reference."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from grok_deploy.cli import main
from grok_deploy.trtllm.check_shards import EXACT_ATOL, check_shards
from grok_deploy.trtllm.convert import convert

PROMPT = "The answer to life the universe and everything is of course"
CASES = {  # id: convert arguments
    "tp1": dict(tp=1, dtype="float32"),               # requantised dense and proj
    "tp2": dict(tp=2),                                # bfloat16, requantised
    "tp4": dict(tp=4),
    "tp8": dict(tp=8, dtype="float32"),               # the release's int8 kept: exact weights
    "moe_ep2": dict(tp=2, moe_ep=2, dtype="float32"),
    "pp2": dict(tp=2, pp=2),
    "none": dict(tp=2, quant="none", dtype="float32"),  # dequantised float32: exact weights
}


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = tmp_path_factory.mktemp("trt") / case
            convert(tiny_ckpt, cache[case], progress=False, workers=1, **CASES[case])
        return cache[case]
    return get


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_check_shards_passes(tiny_ckpt, converted, case):
    res = check_shards(converted(case), tiny_ckpt, PROMPT, max_tokens=4, timeout=100)
    args = CASES[case]
    assert res["world_size"] == args["tp"] * args.get("pp", 1)
    assert res["ok"] and res["tokens_match"] and res["tensor_mismatches"] == []
    assert res["sharded_ids"] == res["reference_ids"] and len(res["sharded_ids"]) == 4
    assert res["max_abs_logit_diff"] <= res["tolerance"]
    if case in ("tp8", "none"):
        assert res["exact_weights"] and res["tolerance"] == EXACT_ATOL
        assert res["max_abs_logit_diff"] < 1e-3


@pytest.mark.timeout(120)
def test_swapped_experts_fail_naming_the_tensor(tiny_ckpt, converted, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(converted("moe_ep2"), bad)
    path = bad / "rank1.safetensors"  # moe_ep rank 1: experts 4..7
    tensors = load_file(str(path))
    for name in ("transformer.layers.3.mlp.fc.weight", "transformer.layers.3.mlp.fc.per_channel_scale"):
        t = tensors[name].clone()
        t[[0, 1]] = t[[1, 0]]
        tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})

    assert main(["check-shards", str(bad), "--source", str(tiny_ckpt), "--max-tokens", "2", "--json"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] is False
    assert [(p["file"], p["tensor"], p.get("experts")) for p in res["tensor_mismatches"]] == [
        ("rank1.safetensors", "transformer.layers.3.mlp.fc.weight", [4, 5])]


@pytest.mark.timeout(120)
def test_missing_or_truncated_rank_file_names_it(tiny_ckpt, converted, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(converted("tp2"), bad)
    path = bad / "rank1.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert main(["check-shards", str(bad), "--source", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rank1.safetensors: truncated" in err
    path.unlink()
    assert main(["check-shards", str(bad), "--source", str(tiny_ckpt)]) == 2
    assert "rank1.safetensors: rank file is missing" in capsys.readouterr().err
    assert main(["check-shards", str(tmp_path), "--source", str(tiny_ckpt)]) == 2
    assert "config.json: missing or not a TensorRT-LLM checkpoint config" in capsys.readouterr().err


def test_layout_audit_names_each_tensor():
    from grok_deploy.trtllm.check_shards import audit_layout
    from grok_deploy.trtllm.safetensors_writer import Spec

    specs = [Spec("w", (2, 3), "int8"), Spec("s", (3,), "bfloat16")]
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "x": {"dtype": "I8", "shape": [1], "data_offsets": [24, 25]}}
    assert audit_layout(header, specs, "rank0.safetensors") == [
        {"file": "rank0.safetensors", "tensor": "s", "problem": "missing"},
        {"file": "rank0.safetensors", "tensor": "w", "problem": "F32 [2, 3], expected I8 [2, 3]"},
        {"file": "rank0.safetensors", "tensor": "x", "problem": "unexpected tensor"}]
