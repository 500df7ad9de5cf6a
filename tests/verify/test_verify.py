"""Reference stage, verify rules, and verify against a real server (good and corrupted engine)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from serving_fixtures import make_repo, start_server  # noqa: E402

from grok_deploy.model import names
from grok_deploy.verify.report import Tolerances, first_divergence, judge

PROMPTS = ["The answer to life the universe and everything is of course",
           "Hello",
           "Once upon a time, in a small city near the river, there lived a child who wanted to build a car."]


def record(ids, margins):
    """A golden record whose top-2 logits have the given margins per step."""
    return {"output_ids": ids, "top_ids": [[t, t + 1] for t in ids],
            "top_logits": [[1.0 + m, 1.0] for m in margins], "output_text": "x", "text": "p"}


def test_float_rule_needs_every_token():
    rec = record([5, 6, 7, 8], [2.0, 2.0, 2.0, 2.0])
    assert judge(rec, [5, 6, 7, 8], None, False, Tolerances())[0]
    ok, reason, div, _ = judge(rec, [5, 6, 9, 8], None, False, Tolerances())
    assert not ok and div == 2 and reason == "token 2 differs"
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_float_rule_checks_logits_on_reference_top_k():
    rec = record([5, 6], [2.0, 2.0])
    served = np.zeros((2, 10), np.float32)
    served[0, [5, 6]] = [3.0, 1.0]
    served[1, [6, 7]] = [3.0, 1.0 + 0.01]
    ok, reason, _, diffs = judge(rec, [5, 6], served, False, Tolerances(logit_tol=1e-3))
    assert not ok and "max logit diff 1.00e-02" in reason and diffs == pytest.approx([0.0, 0.01], abs=1e-6)


def test_int8_rule_allows_divergence_only_at_a_near_tie():
    tol = Tolerances(int8_tie_margin=0.5)
    near_tie = record([5, 6, 7], [2.0, 0.1, 2.0])
    ok, reason, div, _ = judge(near_tie, [5, 9, 9], None, True, tol)
    assert ok and div == 1 and "near-tie at 1" in reason
    clear = record([5, 6, 7], [2.0, 2.0, 2.0])
    ok, reason, div, _ = judge(clear, [5, 9, 9], None, True, tol)
    assert not ok and div == 1 and "margin is 2.000" in reason


@pytest.fixture(scope="module")
def golden(tiny_ckpt, tmp_path_factory):
    from grok_deploy.verify.reference import run_reference

    out = tmp_path_factory.mktemp("reference")
    summary = run_reference(tiny_ckpt, out, PROMPTS, max_tokens=8)
    assert summary["prompts"] == 3
    return out


def test_reference_stage_writes_golden_outputs(golden, tiny_model, tiny_tokenizer):
    from grok_deploy.model.generate import generate
    from grok_deploy.verify.reference import load_golden

    doc, full = load_golden(golden)
    assert [r["text"] for r in doc["prompts"]] == PROMPTS
    for i, rec in enumerate(doc["prompts"]):
        ids = tiny_tokenizer.encode(PROMPTS[i])
        ref = generate(tiny_model, [ids], 8, return_logits=True)
        assert rec["prompt_ids"] == ids and rec["output_ids"] == ref.output_ids[0]
        assert rec["output_text"] == tiny_tokenizer.decode(ref.output_ids[0])
        assert np.array(rec["top_ids"]).shape == (8, 8) and [t[0] for t in rec["top_ids"]] == rec["output_ids"]
        np.testing.assert_allclose(full[f"prompt{i}"], ref.logits[0][:4], atol=1e-5)


def swap_experts(src, dst, layer: int, a: int, b: int):
    """A copy of checkpoint `src` with experts a and b exchanged in one layer (router untouched)."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.pickle_io import dump
    from grok_deploy.checkpoint.xai import QuantizedWeight8bit

    shutil.copytree(src, dst)
    ckpt = open_checkpoint(src)
    order = names.flatten_order(ckpt.config.num_layers)
    perm = list(range(8))
    perm[a], perm[b] = b, a
    for leaf in ("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w"):
        path = names.layer_path(layer, leaf)
        qw = ckpt.read_raw(path)
        swapped = QuantizedWeight8bit(weight=np.ascontiguousarray(qw.weight[perm]),
                                      scales=np.ascontiguousarray(qw.scales[perm]))
        target = dst / "ckpt-0" / f"tensor{order.index(path):05d}_000"
        with open(target, "wb") as f:
            dump(f, swapped)
    return dst


def run_verify(tmp_path, ckpt, golden, engine_dir, mode="golden"):
    from grok_deploy.verify.compare import verify

    cfg, repo = make_repo(tmp_path / "served", ckpt, engine_kind="torch", engine_dir=engine_dir,
                          extra="quantization: none\n")
    if mode == "score":
        cfg.verify.prompts, cfg.verify.max_tokens = list(PROMPTS), 8
    server = start_server(cfg, repo)
    lines = []
    try:
        res = verify(cfg, server.grpc_url, golden, tmp_path / "reports" / "verify", echo=lines.append,
                     source=ckpt, mode=mode)
    finally:
        server.stop()
    return res, lines


@pytest.mark.server
@pytest.mark.timeout(240)
def test_verify_passes_on_the_true_engine(tmp_path, tiny_ckpt, golden):
    res, lines = run_verify(tmp_path, tiny_ckpt, golden, tiny_ckpt)
    assert res["passed"] and res["failed"] == []
    doc = json.loads((tmp_path / "reports" / "verify.json").read_text())
    assert all(p["first_divergence"] is None and max(p["logit_diff"]) < 1e-3 for p in doc["prompts"])
    assert all(all(p["text_ok"].values()) for p in doc["prompts"])
    assert (tmp_path / "reports" / "verify.png").stat().st_size > 10_000
    assert lines[-1].startswith("verification PASSED")


@pytest.mark.server
@pytest.mark.timeout(240)
def test_verify_fails_on_swapped_experts_naming_the_divergence(tmp_path, tiny_ckpt, golden):
    bad = swap_experts(tiny_ckpt, tmp_path / "bad", layer=0, a=0, b=1)
    res, lines = run_verify(tmp_path, tiny_ckpt, golden, bad)
    assert not res["passed"] and res["failed"]
    doc = json.loads((tmp_path / "reports" / "verify.json").read_text())
    diverged = [p for p in doc["prompts"] if p["first_divergence"] is not None]
    assert diverged, "swapped experts must change some greedy token"
    p = diverged[0]
    pos = p["first_divergence"]
    assert p["expected_ids"][:pos] == p["served_ids"][:pos] and p["expected_ids"][pos] != p["served_ids"][pos]
    assert p["reason"] == f"token {pos} differs"
    md = (tmp_path / "reports" / "verify.md").read_text()
    assert md.startswith("# Verification: FAILED") and f"token {pos} differs" in md and "expected:" in md
    assert lines[-1].startswith("verification FAILED")


@pytest.mark.server
@pytest.mark.timeout(240)
def test_verify_score_mode_passes_on_the_true_engine_and_agrees_with_golden(tmp_path, tiny_ckpt, golden):
    """verify.mode score: the server generates, the streamed reference scores; same verdict and
    the same reference logits as the golden run."""
    from grok_deploy.verify.reference import load_golden

    res, lines = run_verify(tmp_path, tiny_ckpt, None, tiny_ckpt, mode="score")
    assert res["passed"] and res["mode"] == "score" and "checked at every position" in res["rule"]
    doc = json.loads((tmp_path / "reports" / "verify.json").read_text())
    gold = load_golden(golden)[0]["prompts"]
    assert doc["mode"] == "score" and doc["scoring"]["tokens"] > 0
    for p, g in zip(doc["prompts"], gold):
        assert p["expected_ids"] == g["output_ids"] == p["served_ids"] and p["served_rank"] == [0] * 8
        assert p["bad_positions"] == [] and max(p["logit_diff"]) < 1e-3 and all(p["text_ok"].values())
    assert lines[-1].startswith("verification PASSED")


def test_trtllm_rule_allows_for_the_erf_gelu_and_says_why():
    from types import SimpleNamespace

    from grok_deploy.verify.compare import rule_for

    tol = Tolerances(logit_tol=1e-3, int8_logit_tol=0.5, int8_tie_margin=0.5)
    trt = SimpleNamespace(engine=SimpleNamespace(backend="trtllm", onnx_quant="none"), quantization="none")
    ties, limit, rule = rule_for(trt, tol)
    assert ties and limit == 0.5 and rule.startswith("trtllm engine: tokens agree except at a reference near-tie")
    assert "expert GELU with erf where Grok-1 uses the tanh approximation (up to 4.7e-4 per activation), in bf16" in rule
    ort = SimpleNamespace(engine=SimpleNamespace(backend="onnxruntime", onnx_quant="none"), quantization="w8a16")
    assert rule_for(ort, tol) == (False, 1e-3, "float engine: identical greedy tokens, logits within 0.001")


def test_streamed_ensemble_text_rule():
    from grok_deploy.verify.compare import text_equal

    assert text_equal("ensemble-stream", "poleyes\ufffdpol", "pol eyes pol")
    assert not text_equal("ensemble-stream", "poleyespol", "pol eyes pal")
    assert not text_equal("ensemble", "poleyes pol", "pol eyes pol")
