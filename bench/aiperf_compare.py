"""AIPerf 0.13 beside `grok-deploy bench`, on the same server, with AIPerf's tokens recounted.

AIPerf (genai-perf's successor) has no KServe gRPC endpoint: it drives Triton's HTTP
`/v2/models/<model>/generate_stream` with its `template` endpoint (a Jinja2 payload template and a
JMESPath response field, src/aiperf/endpoints/template_endpoint.py). Like genai-perf it counts
output tokens by re-tokenizing the text chunks it received, which overstates output length on
this model (about 51 for 32: the ensemble's stateless postprocessing decodes each token alone). So
this script reads AIPerf's raw export (`profile_export_raw.jsonl`, `--export-level raw`) and
recomputes its figures with ONE TOKEN PER STREAMED RESPONSE (exact here: one engine step, one
token, one server-sent event), with bench/genai_perf_compare.py's `figures` and `compare`.

For each concurrency it runs `grok-deploy bench` (gRPC, in process) and AIPerf (HTTP, a
subprocess) against one running server, with the same prompt and output lengths (end_id -1 and
min_tokens = max_tokens, so every request makes exactly --output-tokens tokens), --rounds times in
ABBA order (bench then AIPerf, then AIPerf then bench, ...) so that a drifting machine load weighs
on both alike, and prints the mean over the rounds of AIPerf's own figures, of its raw export
recomputed and of bench's, with bench / recomputed; the load average before and after (the
machine may be shared). The verdict is paired: per round the ratio of the two runs that ran back
to back, and the median over the rounds (`paired`); exit 1 when the median of TTFT p50, request
latency p50 or output tokens/s differs by more than --tolerance.

AIPerf is not a dependency: without --aiperf it is pip-installed (aiperf==0.13.0) into a
throwaway venv under a temporary folder, removed at the end.

    .venv/bin/python bench/aiperf_compare.py [pipeline.yaml] [--concurrency 1,4] [--requests 16]
        [--warmup 4] [--rounds 6] [--input-tokens 64] [--output-tokens 32]
        [--model ensemble|tensorrt_llm_bls] [--aiperf PATH/bin/aiperf] [--out DIR]

The pipeline's package stage must have run (its server is started, on its ports; its packaged
tokenizer folder is AIPerf's --tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genai_perf_compare import KEYS, compare, figures  # noqa: E402

AIPERF_VERSION = "0.13.0"
# the ensemble's (and the BLS's) text inputs, as Triton's generate extension maps JSON keys to inputs
PAYLOAD = ('{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true, "end_id": -1, '
           '"min_tokens": {{ max_tokens }}, "exclude_input_in_output": true}\n')


def install_aiperf(folder: Path) -> Path:
    """aiperf==AIPERF_VERSION in a fresh venv under `folder`; returns its `aiperf` executable."""
    venv = folder / "aiperf-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing aiperf=={AIPERF_VERSION} into {venv} (a few minutes) ...", flush=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"aiperf=={AIPERF_VERSION}"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise SystemExit(f"pip install aiperf=={AIPERF_VERSION} failed:\n{pip.stderr[-3000:]}")
    return venv / "bin" / "aiperf"


def aiperf_command(aiperf: Path, http_url: str, model: str, tokenizer: Path, template: Path, c: int,
                   requests: int, warmup: int, input_tokens: int, output_tokens: int, out: Path) -> list[str]:
    """The AIPerf command line for one level (docs/serving.md shows the same command)."""
    return [str(aiperf), "profile", "-m", model, "--endpoint-type", "template",
            "--custom-endpoint", f"/v2/models/{model}/generate_stream", "--url", http_url, "--streaming",
            "--tokenizer", str(tokenizer),
            # a file: AIPerf splits an inline --extra-inputs value at its commas
            "--extra-inputs", f"payload_template:{template}", "--extra-inputs", "response_field:text_output",
            "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
            "--concurrency", str(c), "--request-count", str(requests), "--warmup-request-count", str(warmup),
            "--random-seed", "0", "--export-level", "raw", "--artifact-dir", str(out), "--ui-type", "none",
            "--no-server-metrics", "--no-gpu-telemetry"]


def recount(raw: Path, output_tokens: int) -> dict:
    """genai_perf_compare.figures from AIPerf's raw export: the profiling phase's requests, one
    token per server-sent event that carries `text_output` (perf_counter ns: start_perf_ns and each
    response's perf_ns are on one clock)."""
    reqs = []
    for line in raw.read_text().splitlines():
        rec = json.loads(line)
        if rec["metadata"].get("benchmark_phase") != "profiling":
            continue
        if rec.get("error") or rec.get("status") != 200:
            raise SystemExit(f"{raw}: a request failed: {rec.get('error') or rec.get('status')}")
        times = [r["perf_ns"] for r in rec["responses"]
                 if any(p.get("name") == "data" and "text_output" in json.loads(p["value"]) for p in r["packets"])]
        if len(times) != output_tokens:
            raise SystemExit(f"{raw}: a request streamed {len(times)} tokens, not {output_tokens}")
        reqs.append((rec["start_perf_ns"], times))
    return figures(reqs)


def aiperf_own(doc: dict) -> dict:
    """AIPerf's own figures from profile_export_aiperf.json (its re-tokenized token counts)."""
    return {"ttft_ms": doc["time_to_first_token"], "itl_ms": doc["inter_token_latency"],
            "request_latency_ms": doc["request_latency"], "output_tokens_per_s": doc["output_token_throughput"]["avg"],
            "requests_per_s": doc["request_throughput"]["avg"], "osl": doc["output_sequence_length"]["avg"]}


def mean_figures(runs: list[dict]) -> dict:
    """The mean of several rounds' figures (percentiles and rates averaged, counts summed)."""
    out = {k: {q: sum(r[k][q] for r in runs) / len(runs) for q in ("p50", "p90", "p99", "mean") if q in runs[0][k]}
           for k in KEYS}
    out |= {k: sum(r[k] for r in runs) / len(runs) for k in ("output_tokens_per_s", "requests_per_s", "osl")
            if k in runs[0]}
    return out | {k: sum(r[k] for r in runs) for k in ("requests", "output_tokens") if k in runs[0]}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", nargs="?", default="pipeline.yaml")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--model", default="ensemble", choices=("ensemble", "tensorrt_llm_bls"))
    ap.add_argument("--aiperf", type=Path, help="an installed aiperf executable (default: install into a temp venv)")
    ap.add_argument("--out", type=Path, help="keep AIPerf's artifacts here (default: a temp folder, removed)")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--split-cores", action=argparse.BooleanOptionalAction, default=True,
                    help="server on half the usable cores, both clients on the other half (default on)")
    args = ap.parse_args()

    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving.bench import bench
    from grok_deploy.serving.deploy import TritonServer

    cfg = load_pipeline(args.pipeline)
    levels = [int(x) for x in args.concurrency.split(",")]
    tokenizer = cfg.output("triton_repo") / "preprocessing" / "tokenizer"
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aiperf-compare-") as tmp:
        tmp = Path(tmp)
        aiperf = args.aiperf or install_aiperf(tmp)
        out = args.out or tmp / "artifacts"
        template = tmp / "generate_stream.jinja"
        template.write_text(PAYLOAD)
        rows, pairs = [], []
        cores = sorted(os.sched_getaffinity(0))
        split = args.split_cores and len(cores) >= 2
        if split:  # the server's processes inherit the second half; this process then takes the first
            os.sched_setaffinity(0, cores[len(cores) // 2:])
        with TritonServer(cfg) as server:
            if split:
                os.sched_setaffinity(0, cores[:len(cores) // 2])
                print(f"cores: server {cores[len(cores) // 2:]}, clients (bench and AIPerf) {cores[:len(cores) // 2]}")
            http = f"http://{server.address}:{server.ports['http']}"
            for c in levels:
                ours, own, recounted = [], [], []
                for r in range(args.rounds):
                    for tool in ("bench", "aiperf") if r % 2 == 0 else ("aiperf", "bench"):
                        if tool == "bench":
                            ours.append(bench(cfg, url=server.grpc_url, concurrency=(c,), requests=args.requests,
                                              warmup=args.warmup, input_tokens=args.input_tokens,
                                              output_tokens=args.output_tokens, model=args.model)["results"][0])
                            continue
                        folder = out / f"c{c}-r{r}"
                        cmd = aiperf_command(aiperf, http, args.model, tokenizer, template, c, args.requests,
                                             args.warmup, args.input_tokens, args.output_tokens, folder)
                        note = " ".join(cmd) if (c, r) == (levels[0], 0) else f"concurrency {c}, round {r}"
                        t0 = time.monotonic()
                        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                        if run.returncode != 0:
                            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
                            raise SystemExit(f"aiperf failed at concurrency {c} (exit {run.returncode})")
                        print(f"aiperf ({time.monotonic() - t0:.0f} s): {note}", flush=True)
                        own.append(aiperf_own(json.loads((folder / "profile_export_aiperf.json").read_text())))
                        recounted.append(recount(folder / "profile_export_raw.jsonl", args.output_tokens))
                rows.append((c, mean_figures(own), mean_figures(recounted), mean_figures(ours)))
                pairs.append((c, recounted, ours))
    print(f"after: {load()}\n")
    print(f"server {server.grpc_url} (bench, gRPC) / {http} (AIPerf {AIPERF_VERSION}, HTTP generate_stream), "
          f"model {args.model}, {args.input_tokens} input and {args.output_tokens} output tokens, "
          f"{args.requests} requests per level after {args.warmup} warm-up, mean of {args.rounds} rounds (ABBA)")
    compare(rows, "AIPerf", args.tolerance, judge=False)  # the means, shown; the verdict is paired's
    return paired(pairs, args.tolerance)


PAIRED = (("TTFT p50", "ttft_ms"), ("request latency p50", "request_latency_ms"), ("ITL p50", "itl_ms"),
          ("output tok/s", "output_tokens_per_s"))


def paired(pairs: list[tuple], tolerance: float) -> int:
    """The verdict: per round, bench / AIPerf recounted of the two runs that ran back to back (ABBA
    neighbours, so the machine's drift, which moved whole rounds by up to 25% on the shared 2-core
    host, weighs on both), and the median of those ratios over the rounds. Exit 1 when a median of
    TTFT p50, request latency p50 or output tokens/s is off by more than `tolerance`."""
    import statistics

    print("\nbench / AIPerf recounted, round by round (the two runs of a round ran back to back), and the median:")
    print("| conc | figure | per round | median |")
    print("|---|---|---|---|")
    worst = 0.0
    for c, recounted, ours in pairs:
        for name, key in PAIRED:
            def fig(d: dict, key: str = key) -> float:
                return d[key] if key.endswith("_s") else d[key]["p50"]
            ratios = [fig(b) / fig(a) for a, b in zip(recounted, ours)]
            mid = statistics.median(ratios)
            if key != "itl_ms":  # the three figures; ITL is shown, not judged
                worst = max(worst, abs(mid - 1))
            print(f"| {c} | {name} | {' '.join(f'{r:.3f}' for r in ratios)} | {mid:.3f} ({100 * (mid - 1):+.1f}%) |")
    ok = worst <= tolerance
    print(f"\nlargest median difference (TTFT p50, request latency p50, output tokens/s): {100 * worst:.1f}% "
          f"({'within' if ok else 'OUTSIDE'} {100 * tolerance:.0f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
