"""Teacher-forced, layer-streamed scoring against the golden (in-RAM, KV-cache) reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grok_deploy.model.config import GrokConfig
from grok_deploy.verify.report import Tolerances, judge, judge_scored

PROMPTS = ["The answer to life the universe and everything is of course",
           "Hello",
           "Once upon a time, in a small city near the river, there lived a child who wanted to build a car."]
N = 10


def golden_and_scored(ckpt_dir, tmp_path, prompts=PROMPTS, n=N, preset=None):
    """Golden outputs of the reference stage, and the streamed scoring of those same tokens."""
    from grok_deploy.verify.reference import load_golden, run_reference
    from grok_deploy.verify.score import score

    run_reference(ckpt_dir, tmp_path / "ref", prompts, max_tokens=n, preset=preset)
    golden, _ = load_golden(tmp_path / "ref")
    recs = golden["prompts"]
    scored = score(ckpt_dir, [r["prompt_ids"] for r in recs], [r["output_ids"] for r in recs], preset=preset)
    return recs, scored


def assert_same_as_golden(recs, scored):
    tol = Tolerances()
    for rec, sc in zip(recs, scored["prompts"]):
        assert sc["output_ids"] == rec["output_ids"]             # argmax under teacher forcing
        assert sc["top_ids"] == rec["top_ids"]
        np.testing.assert_allclose(sc["top_logits"], rec["top_logits"], atol=1e-4)
        assert sc["served_rank"] == [0] * len(rec["output_ids"])
        assert judge(rec, rec["output_ids"], None, False, tol)[0]
        assert judge_scored(sc, rec["output_ids"], None, False, tol)[0]


@pytest.mark.timeout(120)
def test_scored_logits_equal_golden_on_tiny(tiny_ckpt, tmp_path):
    recs, scored = golden_and_scored(tiny_ckpt, tmp_path)
    assert_same_as_golden(recs, scored)
    st = scored["stats"]
    assert len(st["layer_seconds"]) == 12 and st["tokens"] == sum(len(r["prompt_ids"]) + N - 1 for r in recs)
    assert all(b == st["layer_bytes"][0] > 0 for b in st["layer_bytes"])


@pytest.mark.timeout(300)
def test_scored_logits_equal_golden_on_bench_width(tmp_path):
    from grok_deploy.checkpoint.tiny import make_tiny

    cfg = GrokConfig.from_name("grok-1-bench", num_layers=2)
    ckpt = make_tiny(tmp_path / "bench", cfg, seed=1, progress=False)
    recs, scored = golden_and_scored(ckpt, tmp_path, PROMPTS[:2], n=6, preset=cfg)
    assert_same_as_golden(recs, scored)


@pytest.mark.timeout(120)
def test_hf_port_scores_like_the_official_format(tiny_ckpt, tmp_path):
    import shutil

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.hf import write_hf_checkpoint
    from grok_deploy.verify.score import score

    ckpt = open_checkpoint(tiny_ckpt)
    hf = write_hf_checkpoint(tmp_path / "hf", ckpt.config, dict(ckpt.params()), dtype="float32")
    shutil.copy(tiny_ckpt / "tokenizer.model", hf / "tokenizer.model")
    ids, served = [[5, 9, 300, 17]], [[40, 41, 42]]
    a = score(tiny_ckpt, ids, served)["prompts"][0]
    b = score(hf, ids, served)["prompts"][0]
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)


def test_bfloat16_scoring_follows_the_in_ram_bf16_model(tiny_ckpt, tiny_tokenizer):
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.model.generate import generate, load_model
    from grok_deploy.verify.score import score

    ids = tiny_tokenizer.encode(PROMPTS[0])
    ref = generate(load_model(open_checkpoint(tiny_ckpt), "bfloat16"), [ids], 6, return_logits=True)
    sc = score(tiny_ckpt, [ids], ref.output_ids, dtype="bfloat16")["prompts"][0]
    assert sc["output_ids"] == ref.output_ids[0]
    np.testing.assert_allclose(sc["logits"], ref.logits[0], atol=0.15)  # bf16 logits: a few ulps of ~20


def continue_greedy(model, prompt, prefix, n):
    """prefix + the reference's greedy continuation to n tokens (what a real engine would emit
    after producing `prefix`)."""
    from grok_deploy.model.generate import generate

    rest = generate(model, [prompt + prefix], n - len(prefix)).output_ids[0] if len(prefix) < n else []
    return prefix + rest


@pytest.mark.timeout(120)
def test_planted_wrong_token_is_caught_at_exactly_its_position(tiny_ckpt, tiny_model, tiny_tokenizer):
    from grok_deploy.verify.score import score

    prompt = tiny_tokenizer.encode(PROMPTS[0])
    good = continue_greedy(tiny_model, prompt, [], N)
    wrong = next(t for t in range(10, 1000) if t != good[4])
    served = continue_greedy(tiny_model, prompt, good[:4] + [wrong], N)
    rec = score(tiny_ckpt, [prompt], [served])["prompts"][0]
    ok, reason, div, _, ties, bad = judge_scored(rec, served, None, False, Tolerances())
    assert not ok and div == 4 and bad == [4] and reason == "token 4 differs"
    assert rec["served_rank"][4] > 0 and rec["served_rank"][:4] == [0] * 4 and rec["served_rank"][5:] == [0] * (N - 5)


@pytest.mark.timeout(120)
def test_near_tie_divergence_passes_and_later_positions_are_still_checked(tiny_ckpt, tiny_model, tiny_tokenizer):
    from grok_deploy.verify.score import score

    prompt = tiny_tokenizer.encode(PROMPTS[2])
    good = continue_greedy(tiny_model, prompt, [], N)
    rec = score(tiny_ckpt, [prompt], [good])["prompts"][0]
    j = int(np.argmin(rec["margin"][:N - 3]))  # the reference's nearest tie: a quantised engine may flip it
    tol = Tolerances(int8_tie_margin=rec["margin"][j] + 1e-3)
    flipped = continue_greedy(tiny_model, prompt, good[:j] + [rec["top_ids"][j][1]], N)
    k = N - 1  # and the same output with a second, clear mistake after the tie
    planted = flipped[:k] + [next(t for t in range(10, 1000) if t != flipped[k])]
    rec_f, rec_p = score(tiny_ckpt, [prompt, prompt], [flipped, planted])["prompts"]
    ok, reason, div, _, ties, bad = judge_scored(rec_f, flipped, None, True, tol)
    assert ok and div == j and ties == [j] and bad == [] and f"near-ties at [{j}]" in reason
    assert rec_f["margin"][k] >= tol.int8_tie_margin, "the last position is a near-tie too; pick another prompt"
    ok, reason, div, _, ties, bad = judge_scored(rec_p, planted, None, True, tol)
    assert not ok and ties == [j] and bad == [k] and reason.startswith(f"token {k} differs where the reference margin is")
    # the float rule refuses the near-tie flip itself
    assert judge_scored(rec_f, flipped, None, False, tol)[5] == [j]


def test_scored_logits_are_compared_at_every_position():
    rec = {"output_ids": [5, 6, 7], "top_ids": [[5, 6], [6, 7], [7, 8]], "top_logits": [[3.0, 1.0]] * 3,
           "margin": [2.0, 2.0, 2.0]}
    served = np.zeros((3, 10), np.float32)
    for i, (a, b) in enumerate(rec["top_ids"]):
        served[i, [a, b]] = [3.0, 1.0]
    served[2, 7] = 3.5  # the last position only
    ok, reason, _, diffs, _, _ = judge_scored(rec, [5, 6, 7], served, False, Tolerances(logit_tol=1e-3))
    assert not ok and reason == "max logit diff 0.5 > 0.001" and diffs == [0.0, 0.0, 0.5]
    ok, reason, *_ = judge_scored(rec, [5, 6], None, False, Tolerances())
    assert not ok and reason == "served 2 tokens, scored 3"


def test_float32_multipliers_are_exact_and_bf16_rounds_them(tiny_ckpt):
    from grok_deploy.model.grok import Grok, multipliers

    cfg = GrokConfig.from_name("grok-1")
    assert multipliers(cfg, torch.float32) == (78.38367176906169, 0.5773502691896257)
    assert multipliers(cfg, torch.bfloat16) == (78.5, 0.578125)
    assert Grok(GrokConfig.from_name("grok-1-tiny", num_layers=1)).emb_mult == 78.38367176906169


def test_long_prompt_is_left_truncated_with_a_warning(capsys):
    from grok_deploy.model.tokenizer import fit_context

    assert fit_context(list(range(10)), 4, "verify.prompts.0") == [6, 7, 8, 9]
    assert "verify.prompts.0 is 10 tokens, longer than the context of 4; keeping its last 4" in capsys.readouterr().err
    assert fit_context([1, 2], 4, "x") == [1, 2] and capsys.readouterr().err == ""


@pytest.mark.timeout(120)
def test_reference_truncates_a_prompt_longer_than_the_context(tiny_ckpt, tmp_path, tiny_tokenizer, capsys):
    from grok_deploy.verify.reference import load_golden, run_reference

    short_context = GrokConfig.from_name("grok-1-tiny", sequence_len=24)
    long = "The answer to life the universe and everything is of course " * 4
    ids = tiny_tokenizer.encode(long)
    assert len(ids) > 24
    run_reference(tiny_ckpt, tmp_path / "ref", [long], max_tokens=2, preset=short_context)
    assert f"is {len(ids)} tokens, longer than the context of 24; keeping its last 24 tokens" in capsys.readouterr().err
    assert load_golden(tmp_path / "ref")[0]["prompts"][0]["prompt_ids"] == ids[-24:]


def test_auto_mode_scores_when_the_in_ram_reference_does_not_fit():
    from grok_deploy.verify.score import resolve_mode

    big, tiny = GrokConfig.from_name("grok-1"), GrokConfig.from_name("grok-1-tiny")
    assert resolve_mode("auto", big, "bfloat16", host_bytes=128 * 2 ** 30)[0] == "score"
    assert resolve_mode("auto", tiny, "float32", host_bytes=8 * 2 ** 30)[0] == "golden"
    assert resolve_mode("golden", big, "float32", host_bytes=1)[0] == "golden"
    mode, why = resolve_mode("auto", big, "bfloat16", host_bytes=2000 * 10 ** 9)
    assert mode == "golden" and "<= host 2000.0 GB" in why
