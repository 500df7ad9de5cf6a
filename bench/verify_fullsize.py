"""Verification at Grok-1's real width: the streamed scorer and the streamed shard check.

Writes, in the official format, a checkpoint of Grok-1's real width (D 6144, F 32768, 48 q and 8
kv heads of 128, 8 experts, the full 131072 vocabulary) with 2 layers (about 13 GB: random int8
codes with bf16 scales sized so activations stay sane), then, each in its own process:
1. scores 8 prompts x 32 served tokens with the layer-streamed reference (verify/score.py), in
   the dtype of pipelines/grok-1-h100x8.yaml (float32), prompts as long as that file's
   (plan's 4-bytes-a-token guess);
2. converts it at tp 8 W8A16 and runs the streamed check-shards (8 gloo ranks);
and prints, in one run: peak RSS of each (the scorer's own; the shard check's whole process tree,
sampled), seconds per layer, bytes read per layer, the extrapolation to 64 layers, and plan's
64-layer estimate beside it, for this host (its usable cores, the speed of one, the disk rate measured on the
written checkpoint: host.py), with the load average before and after (the estimates are for a
quiet host). Targets: scoring <= 4 GB, shard check <= 12 GB in all, plan within 30%.

    .venv/bin/python bench/verify_fullsize.py [--dir /tmp] [--dtype bfloat16] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proc_rss import tree_rss  # bench/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(name="grok-1-2layers", vocab_size=131072, emb_size=6144, key_size=128, num_q_heads=48,
           num_kv_heads=8, num_layers=2, widening_factor=8)
SERVED = 32
GB = 1e9


def make_checkpoint(root: Path) -> int:
    """The 2-layer full-width checkpoint, one expert's codes generated at a time; returns its bytes."""
    import ml_dtypes
    import numpy as np

    from grok_deploy.checkpoint import QuantizedWeight8bit, write_checkpoint
    from grok_deploy.model import names
    from grok_deploy.model.config import GrokConfig
    from grok_deploy.model.tokenizer import train_tiny_tokenizer

    cfg = GrokConfig(**CFG)
    rng = np.random.default_rng(0)
    std = {"multi_head_attention/query/w": 2 / cfg.emb_size ** 0.5, "multi_head_attention/key/w": 2 / cfg.emb_size ** 0.5,
           "multi_head_attention/value/w": 1 / cfg.emb_size ** 0.5, "multi_head_attention/linear/w": 1 / cfg.q_size ** 0.5,
           "moe/linear/w": 1 / cfg.emb_size ** 0.5, "moe/linear_v/w": 1 / cfg.emb_size ** 0.5,
           "moe/linear_1/w": 1 / cfg.ffn_size ** 0.5}

    def leaf(path):
        shape, sshape = names.leaf_shape(cfg, path), names.scale_shape(cfg, path)
        if path == names.EMBEDDING:
            out = np.empty(shape, np.float32)
            for lo in range(0, shape[0], 8192):
                out[lo:lo + 8192] = rng.standard_normal((min(8192, shape[0] - lo), shape[1]), dtype=np.float32) * 0.05
            return out
        if sshape is None:  # norms, router
            _, name = names.split_layer_path(path) or (None, path)
            if name == "router/w":
                return rng.standard_normal(shape, dtype=np.float32) * np.float32(1.5 / cfg.emb_size ** 0.5)
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        _, name = names.split_layer_path(path)
        w = np.empty(shape, np.int8)
        for i in range(shape[0]):  # one expert (or row) of uniform int8 codes at a time: std 73
            w[i] = rng.integers(-127, 128, shape[1:], dtype=np.int8)
        s = np.exp(0.1 * rng.standard_normal(sshape, dtype=np.float32)) * np.float32(std[name] / 73.3)
        return QuantizedWeight8bit(w, s.astype(ml_dtypes.bfloat16))

    write_checkpoint(root, cfg, ((p, leaf(p)) for p in names.flatten_order(cfg.num_layers)), progress=True)
    (root / "tokenizer.model").write_bytes(train_tiny_tokenizer(1024, 0))  # ids < 1024: enough here
    return sum(p.stat().st_size for p in (root / "ckpt-0").iterdir())


SCORE = r"""
import json, sys
import numpy as np
from grok_deploy.model.config import GrokConfig
from grok_deploy.verify.score import score
a = json.loads(sys.argv[1])
rng = np.random.default_rng(1)
prompts = [rng.integers(4, 1024, n).tolist() for n in a["tokens"]]
served = [rng.integers(4, 1024, a["served"]).tolist() for _ in a["tokens"]]
res = score(a["ckpt"], prompts, served, dtype=a["dtype"], preset=GrokConfig(**a["cfg"]), echo=lambda m: print(m, file=sys.stderr))
assert all(np.isfinite(r["logits"]).all() for r in res["prompts"]), "non-finite logits"
print(json.dumps(res["stats"]))
"""

CHECK = r"""
import json, sys
from grok_deploy.model.config import GrokConfig
from grok_deploy.trtllm.check_shards import check_shards
from grok_deploy.trtllm.convert import convert
a = json.loads(sys.argv[1])
cfg = GrokConfig(**a["cfg"])
if a["convert"]:
    print(json.dumps(convert(a["ckpt"], a["out"], tp=8, quant="w8a16", dtype="bfloat16", preset=cfg, progress=False, workers=1)), file=sys.stderr)
else:
    res = check_shards(a["out"], a["ckpt"], a["prompt"], timeout=3000, preset=cfg)
    print(json.dumps({k: res[k] for k in ("ok", "max_abs_logit_diff", "tolerance", "tensor_mismatches", "first_mismatch",
                                           "quantization", "stats", "seconds", "tokens_match")}))
"""


def drop_caches() -> str:
    """Empty the page cache (root on Linux), so the passes read the files from disk as they must at
    full size, where 330 GB of rank files cannot stay cached; else say that the figures are warm."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold page cache"
    except OSError:
        return "warm page cache (cannot drop it here: figures are optimistic)"


def run_child(code: str, arg: dict) -> tuple[dict, int, float]:
    """Run a child python; returns (its JSON line, peak tree RSS sampled every 0.2 s, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(arg)], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    peak = [0]

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss(p.pid)[0])
            time.sleep(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    if p.returncode:
        raise SystemExit(f"child failed with exit code {p.returncode}")
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), peak[0], time.perf_counter() - t0


def against_plan(what: str, bench64: float, plan: dict, extra: str = "") -> None:
    """The bench's 64-layer extrapolation beside plan's estimate (target: within 30%)."""
    print(f"{what}, 64 layers: bench extrapolation {bench64 / 60:.1f} min{extra}; plan's estimate "
          f"{plan['seconds'] / 60:.1f} min (ratio {plan['seconds'] / bench64:.2f}), plan's peak "
          f"{plan['peak_bytes'] / GB:.2f} GB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a small width, to try the script itself")
    ap.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # the checkpoint only (a child of the bench)
    args = ap.parse_args()
    if args.smoke:
        CFG.update(vocab_size=4096, emb_size=512, num_q_heads=8, num_kv_heads=8, key_size=64)
    sys.path.insert(0, str(ROOT))
    if args.make:
        make_checkpoint(Path(args.make))
        return 0
    from grok_deploy import host as host_mod
    from grok_deploy.model.config import PRESETS
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.trtllm.check_shards import check_estimate
    from grok_deploy.trtllm.shard import Mapping
    from grok_deploy.verify.score import prompt_tokens_guess, score_estimate

    pipe = load_pipeline(ROOT / "pipelines" / "grok-1-h100x8.yaml")
    tokens = prompt_tokens_guess(list(pipe.verify.prompts))
    work = Path(tempfile.mkdtemp(prefix="verify-fullsize-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        # in a child: this process stays small, and the children's ru_maxrss (which Linux carries
        # over from the forking process's resident set) measures only them
        subprocess.run([sys.executable, __file__, "--make", str(work / "src")] + (["--smoke"] if args.smoke else []),
                       check=True)
        size = sum(p.stat().st_size for p in (work / "src" / "ckpt-0").iterdir())
        print(f"checkpoint: {size / GB:.2f} GB in {time.perf_counter() - t0:.0f} s ({work / 'src'})", flush=True)
        os.sync()
        got = host_mod.measure_disk(work / "src")
        flops, flops_how = host_mod.core_rate(os.getloadavg()[0])
        host = host_mod.Host(host_mod.usable_cores(), got["bytes_per_s"] if got else host_mod.REF_DISK_BPS,
                             disk_how=f"measured on the checkpoint: {got}" if got else "reference",
                             core_flops=flops, core_how=flops_how)
        print(f"host: {host.describe()}; load average {os.getloadavg()}", flush=True)
        print(f"score: {drop_caches()}", flush=True)
        sc, sc_peak, sc_wall = run_child(SCORE, {"ckpt": str(work / "src"), "cfg": CFG, "tokens": tokens,
                                                 "served": SERVED, "dtype": args.dtype})
        per_layer = sum(sc["layer_seconds"]) / len(sc["layer_seconds"])
        rest = sc["seconds"] - sum(sc["layer_seconds"])  # embedding + unembedding
        est = score_estimate(PRESETS["grok-1"], args.dtype, tokens, SERVED, host=host)
        bench64 = 64 * per_layer + rest
        print(f"score ({args.dtype}, {len(tokens)} prompts x {SERVED} served tokens, {sc['tokens']} tokens a layer): "
              f"peak RSS {sc['peak_rss_bytes'] / GB:.2f} GB (sampled {sc_peak / GB:.2f} GB), "
              f"{per_layer:.1f} s and {sc['layer_bytes'][0] / GB:.2f} GB read per layer, "
              f"embedding+unembedding {rest:.1f} s, wall {sc_wall:.0f} s", flush=True)
        against_plan("score", bench64, est, f", {64 * sc['layer_bytes'][0] / GB:.0f} GB read")
        print(f"score: plan's estimate per layer {est['seconds_per_layer']:.1f} s vs bench {per_layer:.1f} s "
              f"(ratio {est['seconds_per_layer'] / per_layer:.2f}); load average now {os.getloadavg()}", flush=True)
        if args.skip_check:
            return 0
        _, conv_peak, conv_wall = run_child(CHECK, {"ckpt": str(work / "src"), "out": str(work / "trt"), "cfg": CFG,
                                                    "convert": True, "prompt": ""})
        print(f"convert tp 8 w8a16: {conv_wall:.0f} s, peak RSS {conv_peak / GB:.2f} GB", flush=True)
        shutil.rmtree(work / "src" / "unused", ignore_errors=True)
        print(f"check-shards: {drop_caches()}", flush=True)
        ck, ck_peak, _ = run_child(CHECK, {"ckpt": str(work / "src"), "out": str(work / "trt"), "cfg": CFG,
                                                 "convert": False, "prompt": pipe.verify.shards_prompt})
        st = ck["stats"]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        parts = {"audit": mean(st["audit_layer_seconds"]), "source": mean(st["source_layer_seconds"]),
                 "effective": mean(st["effective_layer_seconds"]), "ranks": mean(st["rank_layer_seconds"])}
        layer_ck = sum(parts.values())
        fixed = ck["seconds"] - CFG["num_layers"] * layer_ck  # embedding, lm_head, process starts
        ck64 = fixed + 64 * layer_ck
        plan_ck = check_estimate(PRESETS["grok-1"], Mapping(8), "w8a16", host)
        print(f"check-shards tp 8: ok {ck['ok']}, max |logit diff| {ck['max_abs_logit_diff']:.2e} (tolerance "
              f"{ck['tolerance']:.1e}), quantisation logit change {ck['quantization']['logit_change']:.3e}, "
              f"max rel weight error {ck['quantization']['max_rel_weight_error']:.2e}", flush=True)
        print(f"check-shards: peak RSS of all processes together {ck_peak / GB:.2f} GB (sampled); ranks "
              f"{max(st['rank_peak_rss_bytes']) / GB:.2f} GB each at most, sum {sum(st['rank_peak_rss_bytes']) / GB:.2f} GB; "
              f"per layer: {', '.join(f'{k} {v:.1f} s' for k, v in parts.items())} = {layer_ck:.1f} s, "
              f"{sum(st['rank_bytes_read']) / CFG['num_layers'] / GB:.2f} GB read by the ranks; "
              f"embedding, lm_head and starts {fixed:.0f} s; total {ck['seconds']:.0f} s", flush=True)
        against_plan("check-shards", ck64, plan_ck)
        print(json.dumps({"score": sc, "score_sampled_peak": sc_peak, "plan": est, "check": ck, "check_peak": ck_peak,
                          "plan_check": plan_ck, "check_64_layers_seconds": ck64,
                          "convert_seconds": conv_wall, "convert_peak": conv_peak}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
