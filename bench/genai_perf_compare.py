"""genai-perf's figures recomputed from its raw export, side by side with `grok-deploy bench`.

genai-perf counts output tokens by re-tokenizing the text chunks it received. The ensemble's
stateless postprocessing decodes each streamed token alone (spaces and multi-byte characters are
lost), so the re-tokenized count overstates the real output (about 1.5x on this model), and with it
the inter-token latency divisor and the output token throughput. This script reads each
`profile_export.json` under the given genai-perf artifact folders and recomputes, per request,
with ONE TOKEN PER STREAMED RESPONSE (exact here: the engine streams one token per step):
TTFT (first response - send), ITL ((last - first response) / (responses - 1)), request latency
(last response - send); and, per run, output tokens/s and requests/s over the span from the first
send to the last response. It prints genai-perf's own figures, the recomputed ones, and
`grok-deploy bench`'s from its bench.json, with the differences.

    python bench/genai_perf_compare.py ARTIFACT_DIR [ARTIFACT_DIR ...] --bench export/reports/bench/bench.json

Needs only numpy; run it with the project's venv (genai-perf lives in its own throwaway venv).
`figures` and `compare` serve bench/aiperf_compare.py too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("ttft_ms", "itl_ms", "request_latency_ms")


def figures(requests: list[tuple[int, list[int]]]) -> dict:
    """The figures of one level from (send ns, [response ns, ...]) per request, on one clock, with
    ONE TOKEN PER STREAMED RESPONSE: TTFT, ITL, request latency (to the last response), and output
    tokens/s and requests/s over the span from the first send to the last response."""
    reqs = [(t0, r) for t0, r in requests if r]
    ttft, itl, lat, tokens = [], [], [], 0
    for t0, r in reqs:
        t = [(x - t0) / 1e6 for x in r]  # ms after the send
        tokens += len(t)
        ttft.append(t[0])
        lat.append(t[-1])
        if len(t) > 1:
            itl.append((t[-1] - t[0]) / (len(t) - 1))
    span = (max(x for _, r in reqs for x in r) - min(t0 for t0, _ in reqs)) / 1e9
    return {"requests": len(reqs), "output_tokens": tokens, "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
            "request_latency_ms": percentiles(lat), "output_tokens_per_s": tokens / span,
            "requests_per_s": len(reqs) / span}


def recompute(export: dict) -> dict[int, dict]:
    """{concurrency: figures} from perf_analyzer's profile_export.json (nanosecond timestamps)."""
    return {int(exp["experiment"]["value"]): figures([(r["timestamp"], r["response_timestamps"])
                                                      for r in exp["requests"]])
            for exp in export["experiments"]}


def percentiles(v: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(v, q)) for q in (50, 90, 99)} | {"mean": float(np.mean(v))}


def genai_perf_own(doc: dict) -> dict:
    return {"ttft_ms": doc["time_to_first_token"], "itl_ms": doc["inter_token_latency"],
            "request_latency_ms": doc["request_latency"], "output_tokens_per_s": doc["output_token_throughput"]["avg"],
            "requests_per_s": doc["request_throughput"]["avg"], "osl": doc["output_sequence_length"]["avg"]}


def compare(rows: list[tuple], tool: str, tolerance: float, judge: bool = True) -> int:
    """Print `tool`'s own figures, its raw export recomputed, and grok-deploy bench's, per
    (concurrency, own, recomputed, bench or None) row, with bench / recomputed as a ratio; then the
    largest difference of the p50s and throughputs. Returns 0 when within `tolerance` (or no bench).
    `judge` False: the table only (the caller gives its own verdict)."""
    worst, any_bench = 0.0, False
    print(f"| conc | figure | {tool} (its own) | {tool} raw, recomputed | grok-deploy bench | bench / recomputed |")
    print("|---|---|---|---|---|---|")
    for c, own, r, b in sorted(rows, key=lambda x: x[0]):
        figs = [(f"{k[:-3]} p50 ms", own[k]["p50"], r[k]["p50"], b and b[k]["p50"]) for k in KEYS]
        figs += [(f"{k[:-3]} p99 ms", own[k]["p99"], r[k]["p99"], b and b[k]["p99"]) for k in KEYS]
        figs += [("output tok/s", own["output_tokens_per_s"], r["output_tokens_per_s"], b and b["output_tokens_per_s"]),
                 ("requests/s", own["requests_per_s"], r["requests_per_s"], b and b["requests_per_s"]),
                 ("output tokens/request", own["osl"], r["output_tokens"] / r["requests"],
                  b and b["output_tokens"] / b["requests"])]
        for name, g, x, y in figs:
            ratio = "" if y is None else f"{y / x:.3f} ({100 * (y - x) / x:+.1f}%)"
            if y is not None and "p99" not in name:
                worst, any_bench = max(worst, abs(y - x) / x), True
            print(f"| {c} | {name} | {g:.2f} | {x:.2f} | {'-' if y is None else f'{y:.2f}'} | {ratio} |")
    if not any_bench or not judge:
        return 0
    ok = worst <= tolerance
    print(f"\nlargest difference (p50s and throughputs) between recomputed {tool} and grok-deploy bench: "
          f"{100 * worst:.1f}% ({'within' if ok else 'OUTSIDE'} {100 * tolerance:.0f}%)")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--bench", type=Path, action="append", default=[], help="grok-deploy bench's bench.json (repeatable)")
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    ours = {r["concurrency"]: r for b in args.bench for r in json.loads(b.read_text())["results"]}
    rows = []
    for folder in args.artifacts:
        for export in sorted(folder.rglob("profile_export.json")):
            re = recompute(json.loads(export.read_text()))
            own = genai_perf_own(json.loads(export.with_name("profile_export_genai_perf.json").read_text()))
            for c, r in re.items():
                rows.append((c, own, r, ours.get(c)))
    return compare(rows, "genai-perf", args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
