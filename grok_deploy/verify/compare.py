"""verify stage: query the served model over tritonclient gRPC and compare with the golden run.

Per prompt:
- `tensorrt_llm` with the reference's prompt ids, not streaming (with generation logits) and
  streaming: token-level comparison by the rule of `verify_report`;
- `ensemble` with the prompt text, streaming and not, and `tensorrt_llm_bls` streaming (it
  accumulates tokens, so streamed text is exact): text equal to the reference's decoded output
  (see `text_equal` for the streamed ensemble).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from grok_deploy.verify.report import PromptResult, Tolerances, first_divergence, judge, write_reports

REPORT_FILES = ("verify.json", "verify.md", "verify.png")


def is_int8_engine(cfg) -> bool:
    """TensorRT-LLM engines follow `quantization`; the ONNX Runtime engine `engine.onnx_quant`."""
    if cfg.engine.backend == "trtllm":
        return cfg.quantization == "w8a16"
    return cfg.engine.onnx_quant == "int8"


def verify_prompts(url: str, golden: dict, int8: bool, tol: Tolerances, echo=None,
                   decoupled: bool = True) -> list[PromptResult]:
    """Query every golden prompt and judge it; `echo` gets one line per prompt. A non-decoupled
    deployment cannot stream (the backend refuses `streaming` there), so only the non-streamed
    checks run."""
    from grok_deploy.serving.client import query, query_ids

    results = []
    n = golden["max_tokens"]
    for i, rec in enumerate(golden["prompts"]):
        plain = query_ids(url, rec["prompt_ids"], n, stream=False, return_generation_logits=True)
        served = plain["output_ids"]
        ok, reason, div, diffs = judge(rec, served, plain.get("generation_logits"), int8, tol)
        streamed = query_ids(url, rec["prompt_ids"], n, stream=True)["output_ids"] if decoupled else served
        if streamed != served:
            ok, reason = False, f"streamed ids differ from non-streamed at {first_divergence(streamed, served)}"
        texts = {"ensemble": query(url, rec["text"], n, stream=False, model="ensemble")["text"]}
        if decoupled:
            texts["ensemble-stream"] = query(url, rec["text"], n, stream=True, model="ensemble")["text"]
            texts["bls-stream"] = query(url, rec["text"], n, stream=True, model="tensorrt_llm_bls")["text"]
        else:
            texts["bls"] = query(url, rec["text"], n, stream=False, model="tensorrt_llm_bls")["text"]
        # the text must equal the decoded reference wherever the tokens agree
        expected_text = rec["output_text"]
        text_ok = {k: (text_equal(k, v, expected_text)) if div is None else True for k, v in texts.items()}
        if div is None and not all(text_ok.values()):
            bad = [k for k, v in text_ok.items() if not v]
            ok, reason = False, f"text from {', '.join(bad)} differs from the reference text"
        r = PromptResult(index=i, prompt=rec["text"], expected_ids=rec["output_ids"], served_ids=served,
                         first_divergence=div, expected_text=expected_text, served_text=texts["ensemble"],
                         texts=texts, text_ok=text_ok, logit_diff=diffs, passed=ok, reason=reason)
        results.append(r)
        if echo:
            echo(f"  prompt {i}: {'pass' if ok else 'FAIL'} ({reason})")
    return results


def text_equal(check: str, served: str, expected: str) -> bool:
    """Exact, except for the ensemble's streamed text: the contract's stateless postprocessing
    decodes each chunk alone, which drops leading spaces and splits multi-byte characters, so
    that check ignores whitespace and replacement characters (the BLS streams exact text)."""
    if check != "ensemble-stream":
        return served == expected

    def strip(t: str) -> str:
        return "".join(ch for ch in t if not ch.isspace() and ch != "\ufffd")
    return strip(served) == strip(expected)


def verify(cfg, url: str, reference_dir, out, echo=print) -> dict:
    """Run the checks, write verify.json/.md/.png into `out` (and beside it, in the reports
    folder), print a summary table; returns a manifest with "passed"."""
    from grok_deploy.verify.reference import load_golden

    golden, _ = load_golden(reference_dir)
    int8 = is_int8_engine(cfg)
    t = cfg.verify.tolerances
    tol = Tolerances(logit_tol=t.logit_tol, int8_logit_tol=t.int8_logit_tol, int8_tie_margin=t.int8_tie_margin)
    t0 = time.perf_counter()
    from grok_deploy.errors import UserError
    from grok_deploy.serving.client import ServerError

    try:
        results = verify_prompts(url, golden, int8, tol, echo=echo, decoupled=cfg.triton.decoupled)
    except ServerError as e:
        raise UserError(f"verify: the server at {url} failed a request: {e}") from None
    rule = (f"int8 engine: tokens agree except at a reference near-tie (top-2 margin < {tol.int8_tie_margin}), "
            f"logits within {tol.int8_logit_tol} on the agreed prefix" if int8 else
            f"float engine: identical greedy tokens, logits within {tol.logit_tol}")
    meta = {"engine": f"{cfg.engine.backend}{' int8' if int8 else ''}", "url": url, "reference": str(reference_dir),
            "rule": rule, "logit_tol": tol.int8_logit_tol if int8 else tol.logit_tol,
            "seconds": round(time.perf_counter() - t0, 2)}
    out = Path(out)
    doc = write_reports(out, results, meta)
    for name in REPORT_FILES:  # the documented place: export/reports/verify.*
        target = out.parent / name
        shutil.copyfile(out / name, target.with_suffix(target.suffix + ".tmp"))
        target.with_suffix(target.suffix + ".tmp").replace(target)
    echo_summary(results, doc["passed"], rule, echo)
    return {"passed": doc["passed"], "prompts": len(results), "failed": [r.index for r in results if not r.passed],
            "rule": rule, "report": str(out.parent / "verify.md")}


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
