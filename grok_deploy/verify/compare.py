"""verify stage: query the served model over tritonclient gRPC and compare with the golden run.

verify.mode golden compares with the reference stage's golden outputs; score lets the server
generate first and scores its tokens with the streamed reference (verify/score.py). Per prompt:
- `tensorrt_llm` with the reference's prompt ids, not streaming (with generation logits) and
  streaming: token-level comparison by the rule of `verify_report`;
- `ensemble` with the prompt text, streaming and not, and `tensorrt_llm_bls` streaming (it
  accumulates tokens, so streamed text is exact): text equal to the reference's decoded output
  (see `text_equal` for the streamed ensemble).
"""
from __future__ import annotations

import time
from pathlib import Path

from grok_deploy.safe_files import copy_generated
from grok_deploy.verify.report import PromptResult, Tolerances, first_divergence, judge, judge_scored, write_reports

REPORT_FILES = ("verify.json", "verify.md", "verify.png")


def is_int8_engine(cfg) -> bool:
    """TensorRT-LLM engines follow `quantization`; the ONNX Runtime engine `engine.onnx_quant`."""
    if cfg.engine.backend == "trtllm":
        return cfg.quantization == "w8a16"
    return cfg.engine.onnx_quant == "int8"


def rule_for(cfg, tol: Tolerances) -> tuple[bool, float, str]:
    """(near-ties allowed, logit tolerance, the rule as the report states it, with its reason)."""
    tie = f"tokens agree except at a reference near-tie (top-2 margin < {tol.int8_tie_margin})"
    if cfg.engine.backend == "trtllm":
        why = ("TensorRT-LLM computes the expert GELU with erf where Grok-1 uses the tanh approximation "
               "(up to 4.7e-4 per activation), in bf16" + (", with int8 weights" if is_int8_engine(cfg) else ""))
        return True, tol.int8_logit_tol, f"trtllm engine: {tie}, logits within {tol.int8_logit_tol} (because {why})"
    if is_int8_engine(cfg):
        return True, tol.int8_logit_tol, (f"int8 engine: {tie}, logits within {tol.int8_logit_tol} "
                                          "(weight quantisation may flip a near-tie)")
    return False, tol.logit_tol, f"float engine: identical greedy tokens, logits within {tol.logit_tol}"


def query_served(url: str, prompt_ids: list[int], text: str, n: int, decoupled: bool = True) -> dict:
    """Everything the server returns for one prompt: ids and generation logits (not streaming),
    streamed ids, and the texts of the ensemble (streaming and not) and the BLS. A non-decoupled
    deployment cannot stream (the backend refuses `streaming` there), so only the non-streamed
    requests are sent."""
    from grok_deploy.serving.client import query, query_ids

    plain = query_ids(url, prompt_ids, n, stream=False, return_generation_logits=True)
    texts = {"ensemble": query(url, text, n, stream=False, model="ensemble")["text"]}
    if decoupled:
        streamed = query_ids(url, prompt_ids, n, stream=True)["output_ids"]
        texts["ensemble-stream"] = query(url, text, n, stream=True, model="ensemble")["text"]
        texts["bls-stream"] = query(url, text, n, stream=True, model="tensorrt_llm_bls")["text"]
    else:
        streamed = plain["output_ids"]
        texts["bls"] = query(url, text, n, stream=False, model="tensorrt_llm_bls")["text"]
    return {"ids": plain["output_ids"], "logits": plain.get("generation_logits"), "streamed": streamed,
            "texts": texts}


def judge_prompt(i: int, rec: dict, got: dict, ties: bool, tol: Tolerances, scored: bool) -> PromptResult:
    """The verdict of one prompt: tokens and logits by the rule, streamed ids, texts."""
    served = got["ids"]
    extra = {}
    if scored:
        ok, reason, div, diffs, allowed, bad = judge_scored(rec, served, got["logits"], ties, tol)
        extra = {"tie_positions": allowed, "bad_positions": bad, "served_rank": rec["served_rank"]}
        if len(served) != rec["asked"]:
            ok, reason = False, f"served {len(served)} tokens, asked for {rec['asked']}"
    else:
        ok, reason, div, diffs = judge(rec, served, got["logits"], ties, tol)
    if got["streamed"] != served:
        ok, reason = False, f"streamed ids differ from non-streamed at {first_divergence(got['streamed'], served)}"
    texts, expected_text = got["texts"], rec["output_text"]
    # the text must equal the decoded reference wherever the tokens agree
    text_ok = {k: (text_equal(k, v, expected_text)) if div is None else True for k, v in texts.items()}
    if div is None and not all(text_ok.values()):
        bad_texts = [k for k, v in text_ok.items() if not v]
        ok, reason = False, f"text from {', '.join(bad_texts)} differs from the reference text"
    return PromptResult(index=i, prompt=rec["text"], expected_ids=rec["output_ids"], served_ids=served,
                        first_divergence=div, expected_text=expected_text, served_text=texts["ensemble"],
                        texts=texts, text_ok=text_ok, logit_diff=diffs, passed=ok, reason=reason, **extra)


def verify_prompts(url: str, golden: dict, int8: bool, tol: Tolerances, echo=None,
                   decoupled: bool = True) -> list[PromptResult]:
    """Query every golden prompt and judge it; `echo` gets one line per prompt."""
    results = []
    for i, rec in enumerate(golden["prompts"]):
        r = judge_prompt(i, rec, query_served(url, rec["prompt_ids"], rec["text"], golden["max_tokens"], decoupled),
                         int8, tol, scored=False)
        results.append(r)
        if echo:
            echo(f"  prompt {i}: {'pass' if r.passed else 'FAIL'} ({r.reason})")
    return results


def score_prompts(cfg, url: str, source, tol: Tolerances, ties: bool, echo=None) -> tuple[list[PromptResult], dict]:
    """verify.mode score: the server generates first, then the streamed reference scores prompt +
    served tokens of all prompts in one pass; the rule is applied at every position."""
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.model.tokenizer import fit_context, load_tokenizer
    from grok_deploy.verify.score import score

    ckpt = open_checkpoint(source, preset=cfg.model.preset)
    tok = load_tokenizer(ckpt.tokenizer_path)
    n = cfg.verify.max_tokens
    ids = [fit_context(tok.encode(p), ckpt.config.sequence_len, f"verify.prompts.{i}", echo)
           for i, p in enumerate(cfg.verify.prompts)]
    got = [query_served(url, p, text, n, cfg.triton.decoupled) for p, text in zip(ids, cfg.verify.prompts)]
    scored = score(source, ids, [g["ids"] for g in got], dtype=cfg.verify.reference_dtype,
                   preset=cfg.model.preset)
    results = []
    for i, (rec, g) in enumerate(zip(scored["prompts"], got)):
        rec = {**rec, "text": cfg.verify.prompts[i], "output_text": tok.decode(rec["output_ids"]), "asked": n}
        r = judge_prompt(i, rec, g, ties, tol, scored=True)
        results.append(r)
        if echo:
            echo(f"  prompt {i}: {'pass' if r.passed else 'FAIL'} ({r.reason})")
    return results, scored["stats"]


def text_equal(check: str, served: str, expected: str) -> bool:
    """Exact, except for the ensemble's streamed text: the contract's stateless postprocessing
    decodes each chunk alone, which drops leading spaces and splits multi-byte characters, so
    that check ignores whitespace and replacement characters (the BLS streams exact text)."""
    if check != "ensemble-stream":
        return served == expected

    def strip(t: str) -> str:
        return "".join(ch for ch in t if not ch.isspace() and ch != "\ufffd")
    return strip(served) == strip(expected)


def verify(cfg, url: str, reference_dir, out, echo=print, source=None, mode: str = "golden") -> dict:
    """Run the checks, write verify.json/.md/.png into `out` (and beside it, in the reports
    folder), print a summary table; returns a manifest with "passed". `mode` "golden" compares
    with the reference stage's folder; "score" scores the served tokens with the streamed
    reference on the checkpoint `source` (verify/score.py)."""
    t = cfg.verify.tolerances
    tol = Tolerances(logit_tol=t.logit_tol, int8_logit_tol=t.int8_logit_tol, int8_tie_margin=t.int8_tie_margin)
    ties, logit_tol, rule = rule_for(cfg, tol)
    t0 = time.perf_counter()
    from grok_deploy.errors import UserError
    from grok_deploy.serving.client import ServerError

    stats = None
    try:
        if mode == "score":
            results, stats = score_prompts(cfg, url, source, tol, ties, echo=echo)
            rule += "; teacher-forced: checked at every position"
        else:
            from grok_deploy.verify.reference import load_golden

            golden, _ = load_golden(reference_dir)
            results = verify_prompts(url, golden, ties, tol, echo=echo, decoupled=cfg.triton.decoupled)
    except ServerError as e:
        raise UserError(f"verify: the server at {url} failed a request: {e}") from None
    meta = {"engine": f"{cfg.engine.backend}{' int8' if is_int8_engine(cfg) else ''}", "url": url,
            "reference": str(reference_dir if mode != "score" else source), "mode": mode,
            "rule": rule, "logit_tol": logit_tol, "seconds": round(time.perf_counter() - t0, 2)}
    if stats:
        meta["scoring"] = {k: v for k, v in stats.items() if k != "layer_bytes"}
    out = Path(out)
    doc = write_reports(out, results, meta)
    for name in REPORT_FILES:  # the documented place: export/reports/verify.*, never over a user's file
        copy_generated(out / name, out.parent / name)
    echo_summary(results, doc["passed"], rule, echo)
    return {"passed": doc["passed"], "prompts": len(results), "failed": [r.index for r in results if not r.passed],
            "mode": mode, "rule": rule, "report": str(out.parent / "verify.md")}


def echo_summary(results: list[PromptResult], passed: bool, rule: str, echo=print) -> None:
    echo(f"{'#':>2}  {'tokens':>7}  {'diverges':>8}  {'max dlogit':>10}  verdict")
    for r in results:
        agree = sum(a == b for a, b in zip(r.expected_ids, r.served_ids))
        div = "-" if r.first_divergence is None else str(r.first_divergence)
        echo(f"{r.index:>2}  {agree:>3}/{len(r.expected_ids):<3}  {div:>8}  "
             f"{max(r.logit_diff, default=float('nan')):>10.2e}  {'pass' if r.passed else 'FAIL: ' + r.reason}")
        if r.first_divergence is not None:
            echo(f"      expected: {r.expected_text!r}")
            echo(f"      served:   {r.served_text!r}")
    echo(f"verification {'PASSED' if passed else 'FAILED'} ({rule})")
