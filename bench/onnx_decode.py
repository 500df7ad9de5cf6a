"""ONNX Runtime decode speed against the PyTorch reference, and weight bandwidth, in one run.

On `grok-1-bench` (made with make-tiny into a temp folder unless --ckpt is given), prints
decode tokens/s at batch 1 and batch 8 for ORT float32, ORT int8 and the reference with its KV
cache (the median decode step, best of --rounds measurements after a discarded one; prefill
excluded; each sequence its own prompt), the achieved weight bandwidth at batch 1
(bytes of active weights read per token x tokens/s) against a numpy copy measured in the same
run, and the targets: ORT >= 1.5x the reference at batch 1; batch 8 >= 4x batch 1 (aggregate);
batch-1 float32 bandwidth >= 50% of the copy bandwidth.

    .venv/bin/python bench/onnx_decode.py [--ckpt DIR] [--tokens 32] [--prompt-len 32] [--json] [--enforce]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes copied per second by numpy (best of `repeats`); the traffic is twice that (read + write)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def active_weight_bytes(cfg, quant: str, block: int = 64) -> int:
    """Bytes of weights read per token at batch 1: attention, router, norms, 2 experts, unembedding."""
    d, f, k = cfg.emb_size, cfg.ffn_size, cfg.num_selected_experts
    matrices = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + k * 3 * d * f
    per_matrix_byte = 4 if quant == "none" else 1 + 4 / block  # int8 codes + one f32 scale per block
    floats = d * cfg.num_experts + 4 * d
    return int(cfg.num_layers * (matrices * per_matrix_byte + floats * 4) + (cfg.vocab_size * d + d) * 4)


def expected_batch_bytes_ratio(cfg, batch: int) -> float:
    """Weight bytes of one decode step at `batch` / at batch 1, routing uniform and independent."""
    e, k = cfg.num_experts, cfg.num_selected_experts
    experts_hit = e * (1 - ((e - k) / e) ** batch)
    d, f = cfg.emb_size, cfg.ffn_size
    other = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d
    return (other + experts_hit * 3 * d * f) / (other + k * 3 * d * f)


def prompts_for(cfg, batch: int, length: int) -> list[list[int]]:
    return [[(7 * i + 131 * b) % (cfg.vocab_size - 400) + 300 for i in range(length)] for b in range(batch)]


def median_step_s(step, n: int) -> float:
    step()  # warm-up
    return float(np.median([_timed(step) for _ in range(n)]))


def ort_step_s(eng, cfg, batch: int, prompt_len: int, n: int) -> float:
    """Median seconds of one decode step of `batch` fresh sequences on an OrtEngine."""
    ids = list(range(batch))
    last = [int(eng.add(i, p).argmax()) for i, p in zip(ids, prompts_for(cfg, batch, prompt_len))]

    def step():
        last[:] = eng.step(ids, last).argmax(-1).tolist()

    try:
        return median_step_s(step, n)
    finally:
        for i in ids:
            eng.remove(i)


def reference_step_s(model, batch: int, prompt_len: int, n: int) -> float:
    """The decode loop of generate.generate: one forward of [B, 1] per token over the KV cache."""
    import torch

    cache = model.new_cache(batch, prompt_len + n + 2)
    x = torch.tensor(prompts_for(model.cfg, batch, prompt_len))
    with torch.no_grad():
        state = {"next": model(x, cache=cache, start=torch.zeros(batch, dtype=torch.long))[:, -1].argmax(-1),
                 "pos": torch.full((batch,), prompt_len)}

        def step():
            state["next"] = model(state["next"][:, None], cache=cache, start=state["pos"])[:, 0].argmax(-1)
            state["pos"] += 1

        return median_step_s(step, n)


def best_tokens_per_s(measures: dict, rounds: int) -> dict[str, dict[int, float]]:
    """Every (name, batch 1 | 8) measured in turn, `rounds` times after one discarded round; the
    best of each. On this shared 2-core VM the minutes after writing and loading gigabytes run
    slower and neighbours come and go; the best median is the machine's steady state."""
    best = {name: {1: float("inf"), 8: float("inf")} for name in measures}
    for r in range(rounds + 1):
        for name, measure in measures.items():
            for b in (1, 8):
                t = measure(b)
                if r:
                    best[name][b] = min(best[name][b], t)
    return {name: {b: b / t for b, t in row.items()} for name, row in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ref-tokens", type=int, default=16, help="decode steps of the (slow) reference")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="measurements per setting; the best is kept")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()

    import torch

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.tiny import make_tiny
    from grok_deploy.model.generate import load_model
    from grok_deploy.onnx.export import export_onnx
    from grok_deploy.onnx.ort_engine import OrtEngine, build_engine, default_threads

    res: dict = {"threads": default_threads(), "tokens/s": {}, "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="grok-onnx-bench-") as tmp:
        tmp = Path(tmp)
        ckpt_dir = args.ckpt or make_tiny(tmp / "bench", "grok-1-bench", seed=0, progress=False)
        cfg = open_checkpoint(ckpt_dir).config
        res["preset"], res["params"] = cfg.name, cfg.param_count()
        res["copy_bytes_per_s"] = copy_bandwidth()
        engines = {}
        for quant, name in (("none", "ort-float32"), ("int8", "ort-int8")):
            t0 = time.perf_counter()
            export_onnx(ckpt_dir, tmp / f"onnx-{quant}", quant, progress=False)
            build_engine(tmp / f"onnx-{quant}", tmp / f"engine-{quant}", max_batch_size=8,
                         max_seq_len=args.prompt_len + args.tokens + 2)
            res[f"export_build_s_{quant}"] = round(time.perf_counter() - t0, 1)
            shutil.rmtree(tmp / f"onnx-{quant}")  # the engine folder is self-contained
            engines[name] = OrtEngine(tmp / f"engine-{quant}")
        os.sync()  # let the written gigabytes reach the disk before timing
        res["tokens/s"] = best_tokens_per_s(
            {name: lambda b, eng=eng: ort_step_s(eng, cfg, b, args.prompt_len, args.tokens)
             for name, eng in engines.items()}, args.rounds)
        del engines
        gc.collect()
        model = load_model(open_checkpoint(ckpt_dir))
        res["tokens/s"].update(best_tokens_per_s(
            {"reference": lambda b: reference_step_s(model, b, args.prompt_len, args.ref_tokens)}, args.rounds))
        res["torch_threads"] = torch.get_num_threads()
        del model

    res["loadavg_end"] = os.getloadavg()[0]
    tps = res["tokens/s"]
    copy = res["copy_bytes_per_s"]
    bw = {n: active_weight_bytes(cfg, q) * tps[n][1] for n, q in (("ort-float32", "none"), ("ort-int8", "int8"))}
    bw["reference"] = active_weight_bytes(cfg, "none") * tps["reference"][1]
    res["weight_bytes_per_s_batch1"] = bw
    res["batch8_bound"] = 8 / expected_batch_bytes_ratio(cfg, 8)
    targets = {
        "ort-float32 >= 1.5x reference (batch 1)": tps["ort-float32"][1] >= 1.5 * tps["reference"][1],
        "ort-int8 >= 1.5x reference (batch 1)": tps["ort-int8"][1] >= 1.5 * tps["reference"][1],
        "ort-float32 batch 8 >= 4x batch 1": tps["ort-float32"][8] >= 4 * tps["ort-float32"][1],
        "ort-int8 batch 8 >= 4x batch 1": tps["ort-int8"][8] >= 4 * tps["ort-int8"][1],
        "ort-float32 batch-1 bandwidth >= 50% of copy": bw["ort-float32"] >= 0.5 * copy,
    }
    res["targets"] = targets
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        gb = 1e9
        print(f"preset {cfg.name}: {cfg.param_count() / 1e9:.2f} B params; {res['threads']} ORT threads, "
              f"{res['torch_threads']} torch threads; prompt {args.prompt_len}, {args.tokens} decode steps "
              f"({args.ref_tokens} for the reference); load average {res['loadavg_start']:.1f} at start, "
              f"{res['loadavg_end']:.1f} at end")
        print(f"{'':14}{'batch 1':>10}{'batch 8':>10}{'b8/b1':>8}   tokens/s (decode, aggregate)")
        for n, row in tps.items():
            print(f"{n:14}{row[1]:10.2f}{row[8]:10.2f}{row[8] / row[1]:8.2f}")
        print(f"speed-up at batch 1 vs reference: float32 {tps['ort-float32'][1] / tps['reference'][1]:.2f}x, "
              f"int8 {tps['ort-int8'][1] / tps['reference'][1]:.2f}x")
        print(f"numpy copy: {copy / gb:.1f} GB/s copied ({2 * copy / gb:.1f} GB/s read + write)")
        for n, v in bw.items():
            q = "int8" if n == "ort-int8" else "none"
            print(f"  {n:12} batch 1: {active_weight_bytes(cfg, q) / gb:.3f} GB/token x {tps[n][1]:.2f} tokens/s = "
                  f"{v / gb:.1f} GB/s = {100 * v / copy:.0f}% of the copy rate")
        print(f"batch 8 bound from routing (uniform top-2 of 8: {8 * (1 - 0.75 ** 8):.1f} experts per layer "
              f"read per step): at most {res['batch8_bound']:.2f}x batch 1 when weight-bandwidth bound")
        for t, ok in targets.items():
            print(f"target {t}: {'met' if ok else 'MISSED'}")
    return 1 if args.enforce and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
