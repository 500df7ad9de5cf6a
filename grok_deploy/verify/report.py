"""Comparison of served outputs with the golden reference, and the verify report files.

Rules (documented in the report):
- float engines: every greedy token equals the reference's, and where the server returns
  generation logits, max |served - reference| <= `logit_tol` at every step;
- int8 engines: tokens agree up to the end, or up to a position where the reference's top-2
  margin is below `int8_tie_margin` (a near-tie that weight quantisation may legitimately flip);
  logits on the agreed prefix within `int8_logit_tol`;
- TensorRT-LLM engines (any quantization) follow the int8 rule: their expert GELU is erf where
  Grok-1 uses the tanh approximation (up to 4.7e-4 per activation) and they compute in bf16, so a
  token may flip only where the reference nearly ties (`verify.compare.rule_for` says so in the
  report).
With teacher-forced scoring (`judge_scored`, verify.mode: score) the reference is conditioned on
the served tokens, so the same rule is applied at every position, also after a divergence.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Tolerances:
    logit_tol: float = 1e-3
    int8_logit_tol: float = 0.5
    int8_tie_margin: float = 0.5


@dataclass
class PromptResult:
    index: int
    prompt: str
    expected_ids: list[int]
    served_ids: list[int]
    first_divergence: int | None  # position of the first differing token, None if identical
    expected_text: str
    served_text: str
    texts: dict[str, str] = field(default_factory=dict)  # check name -> served text
    text_ok: dict[str, bool] = field(default_factory=dict)
    logit_diff: list[float] = field(default_factory=list)  # per position, when logits came back
    passed: bool = False
    reason: str = ""
    # teacher-forced scoring only: every position checked
    tie_positions: list[int] = field(default_factory=list)   # differs, allowed (reference near-tie)
    bad_positions: list[int] = field(default_factory=list)   # differs, not allowed
    served_rank: list[int] = field(default_factory=list)     # 0 = the reference's argmax


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(record: dict, pos: int) -> float:
    top = record["top_logits"][pos]
    return float(top[0] - top[1])


def judge(record: dict, served_ids: list[int], served_logits: np.ndarray | None, int8: bool,
          tol: Tolerances) -> tuple[bool, str, int | None, list[float]]:
    """Token and logit verdict for one prompt: (passed, reason, first divergence, diffs)."""
    expected = record["output_ids"]
    div = first_divergence(expected, served_ids)
    diffs = _logit_diffs(record, served_logits)  # on the reference's top-k entries of each step
    if not int8:
        if div is not None:
            return False, f"token {div} differs", div, diffs
        worst = max(diffs, default=0.0)
        if worst > tol.logit_tol:
            return False, f"max logit diff {worst:.2e} > {tol.logit_tol:g}", div, diffs
        return True, "exact tokens", div, diffs
    if div is not None and div < len(expected) and top2_margin(record, div) >= tol.int8_tie_margin:
        return False, f"token {div} differs where the reference margin is {top2_margin(record, div):.3f}", div, diffs
    prefix = diffs[:div] if div is not None else diffs
    worst = max(prefix, default=0.0)
    if worst > tol.int8_logit_tol:
        return False, f"max logit diff {worst:.3f} > {tol.int8_logit_tol:g} on the agreed prefix", div, diffs
    return True, "agrees" + (f" up to a near-tie at {div}" if div is not None else " on every token"), div, diffs


def _logit_diffs(record: dict, served_logits) -> list[float]:
    """max |served - reference| on the reference's top-k entries, per position."""
    if served_logits is None:
        return []
    top_ids, top_vals = np.asarray(record["top_ids"]), np.asarray(record["top_logits"])
    n = min(len(served_logits), len(top_vals))
    return [float(np.abs(np.asarray(served_logits[i])[top_ids[i]] - top_vals[i]).max()) for i in range(n)]


def judge_scored(record: dict, served_ids: list[int], served_logits: np.ndarray | None, ties: bool,
                 tol: Tolerances) -> tuple[bool, str, int | None, list[float], list[int], list[int]]:
    """The verdict rule at every served position of a teacher-forced record (verify/score.py).

    Position j passes when the served token is the reference's argmax there, or (`ties`: int8 /
    TensorRT-LLM rule) when the reference's top-2 margin there is under `int8_tie_margin`.
    Logits (when served) are compared at every position. Returns (passed, reason, first
    divergence, diffs, allowed tie positions, failing positions)."""
    expected, margin = record["output_ids"], record["margin"]
    div = first_divergence(expected, served_ids)
    diffs = _logit_diffs(record, served_logits)
    differs = [j for j, (a, b) in enumerate(zip(expected, served_ids)) if a != b]
    allowed = [j for j in differs if ties and margin[j] < tol.int8_tie_margin]
    bad = [j for j in differs if j not in allowed]
    if len(served_ids) != len(expected):
        return False, f"served {len(served_ids)} tokens, scored {len(expected)}", div, diffs, allowed, bad
    if bad:
        j = bad[0]
        more = f" (and {len(bad) - 1} more positions)" if len(bad) > 1 else ""
        why = f" where the reference margin is {margin[j]:.3f}" if ties else ""
        return False, f"token {j} differs{why}{more}", div, diffs, allowed, bad
    limit = tol.int8_logit_tol if ties else tol.logit_tol
    worst = max(diffs, default=0.0)
    if worst > limit:
        return False, f"max logit diff {worst:.3g} > {limit:g}", div, diffs, allowed, bad
    if allowed:
        return True, f"agrees at every position but near-ties at {allowed}", div, diffs, allowed, bad
    return True, "exact tokens" if not ties else "agrees on every token", div, diffs, allowed, bad


def write_reports(out: Path, results: list[PromptResult], meta: dict) -> dict:
    """verify.json, verify.md and verify.png in `out`; returns the JSON document."""
    out.mkdir(parents=True, exist_ok=True)
    passed = all(r.passed for r in results)
    doc = {"passed": passed, **meta, "prompts": [asdict(r) for r in results]}
    (out / "verify.json").write_text(json.dumps(doc, indent=1))
    (out / "verify.md").write_text(markdown(results, meta, passed))
    plot(out / "verify.png", results, meta)
    return doc


def markdown(results: list[PromptResult], meta: dict, passed: bool) -> str:
    lines = [f"# Verification: {'PASSED' if passed else 'FAILED'}", "",
             f"Engine `{meta.get('engine')}`, server `{meta.get('url')}`, reference `{meta.get('reference')}`.",
             f"Mode: {meta.get('mode', 'golden')}. Rule: {meta.get('rule')}", "",
             "| # | prompt tokens | tokens agree | first divergence | max logit diff | text checks | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        agree = sum(a == b for a, b in zip(r.expected_ids, r.served_ids))
        texts = ", ".join(f"{k} {'ok' if v else 'DIFF'}" for k, v in r.text_ok.items())
        lines.append(f"| {r.index} | {len(r.prompt)} chars | {agree}/{len(r.expected_ids)} | "
                     f"{'-' if r.first_divergence is None else r.first_divergence} | "
                     f"{max(r.logit_diff, default=float('nan')):.2e} | {texts} | "
                     f"{'pass' if r.passed else 'FAIL'}: {r.reason} |")
    for r in results:
        if r.tie_positions or r.bad_positions:
            lines += ["", f"Prompt {r.index}, every position checked: differs at a reference near-tie (allowed) "
                          f"{r.tie_positions or '-'}; differs (not allowed) {r.bad_positions or '-'}; "
                          f"served token's rank under the reference {r.served_rank}"]
    for r in results:
        if r.first_divergence is not None or not all(r.text_ok.values()):
            lines += ["", f"## Prompt {r.index}: {r.reason}", "", f"prompt: `{r.prompt}`", "",
                      f"expected: `{r.expected_text}`", "", f"served:   `{r.served_text}`"]
            for k, v in r.texts.items():
                if not r.text_ok.get(k, True):
                    lines += ["", f"{k}: `{v}`"]
    return "\n".join(lines) + "\n"


def plot(path: Path, results: list[PromptResult], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in results:
        agree = np.cumsum([a == b for a, b in zip(r.expected_ids, r.served_ids)]) / np.arange(1, len(r.expected_ids) + 1)
        ax1.plot(np.arange(len(agree)), agree, marker=".", label=f"prompt {r.index}")
        if r.logit_diff:
            ax2.plot(np.arange(len(r.logit_diff)), np.maximum(r.logit_diff, 1e-9), marker=".", label=f"prompt {r.index}")
    ax1.set_ylabel("token agreement (cumulative fraction)")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title(f"served ({meta.get('engine')}) vs reference: {'PASSED' if all(r.passed for r in results) else 'FAILED'}")
    ax1.legend(fontsize=7, ncol=4, loc="lower left")
    ax2.set_yscale("log")
    ax2.set_xlabel("generated token position")
    ax2.set_ylabel("max |logit diff| (reference top-k)")
    tol = meta.get("logit_tol")
    if tol:
        ax2.axhline(tol, color="red", linestyle="--", linewidth=1, label="tolerance")
    if not any(r.logit_diff for r in results):
        ax2.text(0.5, 0.5, "the server returned no generation logits", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
