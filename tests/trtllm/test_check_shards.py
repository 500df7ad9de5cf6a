"""check-shards, layer-streamed: rank files audited against the source, the sharded run (one gloo
process per rank) against the reference on the same effective weights, quantisation reported."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from grok_deploy.cli import main
from grok_deploy.model.config import GrokConfig
from grok_deploy.trtllm.check_shards import check_shards
from grok_deploy.trtllm.convert import convert

PROMPT = "The answer to life the universe and everything is of course"
CASES = {  # id: convert arguments
    "tp1": dict(tp=1, dtype="float32"),               # requantised dense and proj
    "tp2": dict(tp=2),                                # bfloat16, requantised
    "tp8": dict(tp=8, dtype="float32"),               # the release's int8 kept: exact weights
    "moe_ep2": dict(tp=2, moe_ep=2, dtype="float32"),
    "pp2": dict(tp=2, pp=2),
    "none": dict(tp=2, quant="none", dtype="float32"),  # dequantised float32: exact weights
}
EIGHT_LAYERS = GrokConfig.from_name("grok-1-tiny", num_layers=8)


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory):
    """grok-1-tiny with 8 layers (layer 7 exists; the check stays quick)."""
    from grok_deploy.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt8") / "tiny8", EIGHT_LAYERS, seed=0, progress=False)


@pytest.fixture(scope="module")
def converted(ckpt8, tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = tmp_path_factory.mktemp("trt") / case
            convert(ckpt8, cache[case], progress=False, workers=1, preset=EIGHT_LAYERS, **CASES[case])
        return cache[case]
    return get


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_check_shards_passes(ckpt8, converted, case):
    res = check_shards(converted(case), ckpt8, PROMPT, timeout=150, preset=EIGHT_LAYERS)
    args = CASES[case]
    assert res["world_size"] == args["tp"] * args.get("pp", 1)
    assert res["ok"] and res["tokens_match"] and res["tensor_mismatches"] == [] and res["first_mismatch"] is None
    assert len(res["layer_diffs"]) == 8 and res["sharded_ids"] == res["effective_ids"]
    assert res["max_abs_logit_diff"] <= res["tolerance"] < 1e-2  # float32 rounding, not a quantisation allowance
    q = res["quantization"]
    if case in ("tp8", "none"):  # the release's codes kept, or dequantised in float32: nothing changed
        assert q["max_rel_weight_error"] == 0.0 and q["logit_change"] < 1e-3 and q["argmax_same_as_source"]
    else:
        assert 0 < q["max_rel_weight_error"] < 0.02 and q["worst_tensors"]
    assert len(res["stats"]["rank_peak_rss_bytes"]) == res["world_size"]


@pytest.mark.timeout(180)
def test_swapped_experts_in_layer_7_of_rank_1_are_named(ckpt8, converted, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(converted("moe_ep2"), bad)
    path = bad / "rank1.safetensors"  # moe_ep rank 1: experts 4..7
    tensors = load_file(str(path))
    for name in ("transformer.layers.7.mlp.fc.weight", "transformer.layers.7.mlp.fc.per_channel_scale"):
        t = tensors[name].clone()
        t[[0, 1]] = t[[1, 0]]
        tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})

    res = check_shards(bad, ckpt8, PROMPT, timeout=150, preset=EIGHT_LAYERS)
    assert res["ok"] is False
    assert [(p["file"], p["tensor"], p.get("experts")) for p in res["tensor_mismatches"]] == [
        ("rank1.safetensors", "transformer.layers.7.mlp.fc.weight", [4, 5])]
    # the sharding itself is still exact: the rank processes agree with the swapped effective weights
    assert res["first_mismatch"] is None and res["max_abs_logit_diff"] <= res["tolerance"]


@pytest.mark.timeout(180)
def test_wrong_slice_in_one_rank_is_named_by_layer_and_branch(ckpt8, converted, tmp_path):
    """A rank process that computes its share wrongly (here: a router that disagrees with the
    other ranks' copy) shows up as the first layer whose branch output differs."""
    bad = tmp_path / "bad"
    shutil.copytree(converted("none"), bad)
    path = bad / "rank1.safetensors"
    tensors = load_file(str(path))
    name = "transformer.layers.5.mlp.router.weight"
    tensors[name] = tensors[name].flip(0).contiguous()  # experts' rows reversed on rank 1 only
    save_file(tensors, str(path), metadata={"format": "pt"})
    res = check_shards(bad, ckpt8, PROMPT, timeout=150, preset=EIGHT_LAYERS)
    assert not res["ok"]
    assert [(p["file"], p["tensor"]) for p in res["tensor_mismatches"]] == [("rank1.safetensors", name)]
    f = res["first_mismatch"]
    assert (f["layer"], f["branch"], f["files"]) == (5, "moe", ["rank0.safetensors", "rank1.safetensors"])
    assert "transformer.layers.5.mlp.router.weight" in f["tensors"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [2, 4])
def test_every_seed_passes_w8a16(tmp_path, tp):
    """Seeds 0-9: the verdict does not depend on luck (it used to fail at seed 3, tp 2)."""
    from grok_deploy.checkpoint.tiny import make_tiny

    cfg = GrokConfig.from_name("grok-1-tiny", num_layers=2)
    for seed in range(10):
        ck = make_tiny(tmp_path / f"s{seed}", cfg, seed=seed, progress=False)
        out = tmp_path / f"t{seed}"
        convert(ck, out, tp=tp, quant="w8a16", progress=False, workers=1, preset=cfg)
        res = check_shards(out, ck, PROMPT, timeout=100, preset=cfg)
        assert res["ok"], (seed, res["tensor_mismatches"], res["first_mismatch"], res["max_abs_logit_diff"])
        shutil.rmtree(ck)
        shutil.rmtree(out)


@pytest.mark.timeout(120)
def test_missing_or_truncated_rank_file_names_it(tiny_ckpt, tmp_path, capsys):
    good = tmp_path / "good"
    convert(tiny_ckpt, good, tp=2, progress=False, workers=1)
    capsys.readouterr()
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
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
    assert main(["check-shards", str(good), "--source", str(tiny_ckpt), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["world_size"] == 2 and "quantization" in res


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


@pytest.mark.timeout(180)
def test_prompt_longer_than_the_context_is_left_truncated_with_a_warning(tmp_path, capsys):
    from grok_deploy.checkpoint.tiny import make_tiny

    short = GrokConfig.from_name("grok-1-tiny", num_layers=2, sequence_len=24)
    ckpt = make_tiny(tmp_path / "ckpt", short, seed=5, progress=False)
    out = tmp_path / "trt"
    convert(ckpt, out, tp=2, quant="none", dtype="float32", progress=False, workers=1, preset=short)
    res = check_shards(out, ckpt, " ".join([PROMPT] * 4), timeout=150, preset=short)
    err = capsys.readouterr().err
    assert "warning: --prompt is" in err and "longer than the context of 24; keeping its last 24 tokens" in err
    assert res["ok"] and len(res["prompt_ids"]) == 24


@pytest.mark.timeout(180)
def test_one_changed_code_and_one_changed_replica_are_named(ckpt8, converted, tmp_path):
    """tp 8 keeps the release's codes: they are compared as codes (and the embedding copies of
    ranks 1-7 bytewise with rank 0's); one changed int8 code, or one changed bf16 value in a
    replica, is still found, named with its expert, and measured in value units."""
    import torch

    bad = tmp_path / "bad"
    shutil.copytree(converted("tp8"), bad)
    path = bad / "rank3.safetensors"
    tensors = load_file(str(path))
    fc = "transformer.layers.2.mlp.fc.weight"
    scale = float(tensors["transformer.layers.2.mlp.fc.per_channel_scale"][6, 5])
    t = tensors[fc].clone()
    t[6, 4, 5] = int(t[6, 4, 5]) + (1 if int(t[6, 4, 5]) < 127 else -1)  # expert 6, one code off by one step
    tensors[fc] = t
    save_file(tensors, str(path), metadata={"format": "pt"})
    path = bad / "rank5.safetensors"
    tensors = load_file(str(path))
    emb = "transformer.vocab_embedding.weight"
    t = tensors[emb].clone()
    t[3, 7] = t[3, 7].float() * 2 + 1
    tensors[emb] = t.to(torch.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})

    res = check_shards(bad, ckpt8, PROMPT, timeout=150, preset=EIGHT_LAYERS)
    assert res["ok"] is False
    found = {(p["file"], p["tensor"]): p for p in res["tensor_mismatches"]}
    assert set(found) == {("rank3.safetensors", fc), ("rank5.safetensors", emb)}
    assert found[("rank3.safetensors", fc)]["experts"] == [6]
    assert found[("rank3.safetensors", fc)]["max_abs_diff"] == pytest.approx(scale, rel=1e-6)  # one step of its scale
    assert found[("rank5.safetensors", emb)]["max_abs_diff"] > 0.5
