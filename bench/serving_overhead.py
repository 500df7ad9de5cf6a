"""What serving costs: the same prompts through the in-process ONNX Runtime engine and through
Triton (the python `tensorrt_llm` model on the same engine, gRPC streaming), in one run.

Builds a checkpoint of --preset (make-tiny, in a temp folder unless --ckpt is given), exports and
builds the float32 ORT engine, then for each concurrency c in 1, 4, 8 generates --tokens tokens for
c prompts of --prompt-len tokens at once: in process with `OrtEngine.generate` (one batch), and
through Triton with c streaming clients straight to `tensorrt_llm` (ignore-EOS, token ids counted
as they stream back). Aggregate output tokens/s per setting is the best of --rounds after a
discarded warm-up round. Prints Triton tokens/s as a fraction of in-process at concurrency 1, the
aggregate scaling at 4 and 8 for both, and the expert-union bound: c sequences routed top-2 of 8
touch 8 * (1 - 0.75^c) experts per layer (about 7.2 at c = 8), so a decode step that is bound by
weight reads can be at most c / (its weights read at c / at 1) times faster in aggregate (about
2.4x at c = 8 on grok-1-bench, by bench/onnx_decode.expected_batch_bytes_ratio).

    .venv/bin/python bench/serving_overhead.py [--preset grok-1-tiny] [--ckpt DIR] [--tokens 32]
        [--prompt-len 32] [--rounds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_decode import expected_batch_bytes_ratio, prompts_for  # noqa: E402

LEVELS = (1, 4, 8)
PIPELINE = """\
engine:
  max_batch_size: 8
  max_input_len: {max_input_len}
  max_seq_len: {max_seq_len}
verify:
  check_shards: false
"""


def in_process_tokens_per_s(eng, cfg, c: int, prompt_len: int, tokens: int) -> float:
    prompts = prompts_for(cfg, c, prompt_len)
    t0 = time.perf_counter()
    out = eng.generate(prompts, tokens)
    seconds = time.perf_counter() - t0
    return sum(len(o) for o in out.output_ids) / seconds


def triton_tokens_per_s(url: str, cfg, c: int, prompt_len: int, tokens: int) -> float:
    from grok_deploy.serving.bench import Session, one_request

    prompts = prompts_for(cfg, c, prompt_len)
    session = Session(url)  # the stream is open before the clock starts
    sessions = [session] * len(prompts)
    counts, errors = [], []

    def client(p, session):
        try:
            counts.append(one_request(session, "tensorrt_llm", p, tokens)["tokens"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p, s)) for p, s in zip(prompts, sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    session.close()
    if errors:
        raise errors[0]
    return sum(counts) / seconds


def best(measure, rounds: int) -> dict[int, float]:
    """{c: best tokens/s over `rounds`} after one discarded round; levels interleaved per round."""
    out = {c: 0.0 for c in LEVELS}
    for r in range(rounds + 1):
        for c in LEVELS:
            v = measure(c)
            if r:
                out[c] = max(out[c], v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="grok-1-tiny")
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.tiny import make_tiny
    from grok_deploy.onnx.export import export_onnx
    from grok_deploy.onnx.ort_engine import OrtEngine, build_engine
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving.deploy import TritonServer
    from grok_deploy.serving.package import package

    res: dict = {"loadavg_start": os.getloadavg()[0], "tokens": args.tokens, "prompt_len": args.prompt_len}
    max_seq = args.prompt_len + args.tokens + 2
    with tempfile.TemporaryDirectory(prefix="grok-serving-overhead-") as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt or make_tiny(tmp / "ckpt", args.preset, seed=0, progress=False)
        cfg = open_checkpoint(ckpt).config
        res["preset"] = cfg.name
        export_onnx(ckpt, tmp / "onnx", "none", progress=False)
        build_engine(tmp / "onnx", tmp / "engine", max_batch_size=8, max_seq_len=max_seq)
        eng = OrtEngine(tmp / "engine", spinning=False)  # as served: no spinning beside Triton
        res["in_process"] = best(lambda c: in_process_tokens_per_s(eng, cfg, c, args.prompt_len, args.tokens),
                                 args.rounds)
        del eng
        (tmp / "p").mkdir()
        (tmp / "p" / "pipeline.yaml").write_text(PIPELINE.format(max_input_len=args.prompt_len, max_seq_len=max_seq))
        pcfg = load_pipeline(tmp / "p" / "pipeline.yaml")
        repo = tmp / "p" / "triton_repo"
        package(pcfg, repo, tokenizer=Path(ckpt) / "tokenizer.model", engine_dir=tmp / "engine",
                engine_kind="onnxruntime")
        with TritonServer(pcfg, repo, grpc_port=0, http_port=0, metrics_port=0) as server:
            res["triton"] = best(lambda c: triton_tokens_per_s(server.grpc_url, cfg, c, args.prompt_len,
                                                               args.tokens), args.rounds)
    res["loadavg_end"] = os.getloadavg()[0]
    res["bound"] = {c: round(c / expected_batch_bytes_ratio(cfg, c), 2) for c in LEVELS}
    res["experts_touched"] = {c: round(cfg.num_experts * (1 - (1 - cfg.num_selected_experts / cfg.num_experts) ** c), 2)
                              for c in LEVELS}
    ip, tr = res["in_process"], res["triton"]
    res["triton_fraction_c1"] = round(tr[1] / ip[1], 3)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"preset {res['preset']}: prompt {args.prompt_len} tokens, {args.tokens} generated per sequence, "
          f"best of {args.rounds} rounds; load average {res['loadavg_start']:.1f} at start, {res['loadavg_end']:.1f} at end")
    print(f"{'concurrency':>11} {'in-process tok/s':>17} {'Triton tok/s':>13} {'Triton/in-proc':>15} "
          f"{'scaling in-proc':>16} {'scaling Triton':>15} {'experts/layer':>14} {'weight-bound cap':>17}")
    for c in LEVELS:
        print(f"{c:>11} {ip[c]:>17.1f} {tr[c]:>13.1f} {tr[c] / ip[c]:>15.2f} {ip[c] / ip[1]:>15.2f}x "
              f"{tr[c] / tr[1]:>14.2f}x {res['experts_touched'][c]:>14.2f} {res['bound'][c]:>16.2f}x")
    print(f"Triton gRPC streaming at concurrency 1: {100 * res['triton_fraction_c1']:.0f}% of in-process tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
