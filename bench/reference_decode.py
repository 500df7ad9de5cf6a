"""Reference model speed and checkpoint-reading memory, measured in one run.

Prints, on `grok-1-bench` (made with make-tiny into a temp folder unless --ckpt is given):
- tokens/s of the PyTorch reference with the KV cache and without it (full re-forward per token);
- peak RSS above the interpreter baseline of `inspect` and of a streaming read of every tensor,
  against the largest single tensor (target: reading stays under 1.5x it).

    .venv/bin/python bench/reference_decode.py [--ckpt DIR] [--tokens 32] [--prompt-len 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys
def rss():  # VmHWM: ru_maxrss would carry the parent's peak across fork + exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from grok_deploy.checkpoint import open_checkpoint
import numpy as np
base = rss()
ckpt = open_checkpoint(sys.argv[2])
if sys.argv[1] == "inspect":
    from grok_deploy.checkpoint.info import describe
    n = len(describe(ckpt)["tensors"])
else:
    n = 0
    for name, arr in ckpt.params():
        n += int(arr.size > 0)
        del arr
print(json.dumps({"baseline": base, "peak": rss(), "tensors": n}))
"""


def peak_rss(mode: str, ckpt: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tokens_per_s(model, prompt: list[int], n: int, use_cache: bool) -> float:
    import torch

    from grok_deploy.model.generate import generate

    if use_cache:
        t0 = time.perf_counter()
        generate(model, [prompt], n)
        return n / (time.perf_counter() - t0)
    seq = list(prompt)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import torch

    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.tiny import make_tiny
    from grok_deploy.model.generate import load_model

    with tempfile.TemporaryDirectory(prefix="grok-bench-") as tmp:
        ckpt_dir = args.ckpt
        if ckpt_dir is None:
            t0 = time.perf_counter()
            ckpt_dir = make_tiny(Path(tmp) / "bench", "grok-1-bench", seed=0)
            print(f"make-tiny grok-1-bench: {time.perf_counter() - t0:.1f} s")
        ckpt = open_checkpoint(ckpt_dir)
        largest = max(int(np.prod(i.shape)) * 4 for i in ckpt.infos())  # as float32 after dequantisation
        disk = sum(p.stat().st_size for p in (Path(ckpt_dir) / "ckpt-0").iterdir())

        torch.set_num_threads(torch.get_num_threads())
        model = load_model(ckpt)
        prompt = [(7 * i) % (ckpt.config.vocab_size - 400) + 300 for i in range(args.prompt_len)]
        tokens_per_s(model, prompt, 2, True)  # warm-up
        with_cache = tokens_per_s(model, prompt, args.tokens, True)
        without = tokens_per_s(model, prompt, args.tokens, False)
        del model

        insp = peak_rss("inspect", Path(ckpt_dir))
        stream = peak_rss("stream", Path(ckpt_dir))

    mib = 1 << 20
    print(f"preset {ckpt.config.name}: {ckpt.config.param_count() / 1e9:.2f} B params, checkpoint {disk / mib:.0f} MiB on disk")
    print(f"reference decode, prompt {args.prompt_len}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"  with KV cache:    {with_cache:8.2f} tokens/s")
    print(f"  without KV cache: {without:8.2f} tokens/s   (cache speed-up {with_cache / without:.2f}x)")
    print(f"largest tensor (f32): {largest / mib:.0f} MiB")
    for label, r in (("inspect", insp), ("streaming read", stream)):
        above = r["peak"] - r["baseline"]
        print(f"  {label:<15} peak RSS {r['peak'] / mib:7.0f} MiB, {above / mib:6.0f} MiB above baseline "
              f"= {above / largest:.2f}x the largest tensor ({r['tensors']} tensors)")
    ratio = (stream["peak"] - stream["baseline"]) / largest
    print(f"target streaming read <= 1.5x largest tensor: {'met' if ratio <= 1.5 else 'MISSED'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
