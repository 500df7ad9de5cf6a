"""Peak memory of streaming an official-format checkpoint with the memory-mapping reader.

Writes a random grok-1-bench checkpoint (8 layers: 24 expert tensors [8, 1024, 5464] int8, about
1.1 GB) into a temp folder, then in a fresh process per mode measures peak RSS (VmHWM, or
ru_maxrss off Linux; both count mapped file pages) above the RSS after `open_checkpoint` + `infos()`:
- params:  every leaf via ckpt.params(), dequantised to float32, one at a time;
- experts: the stacked leaves one expert at a time via read_expert(), the rest via read().
Target: peak - baseline <= 1.5 x the largest single float32 tensor the mode produces.

    .venv/bin/python bench/checkpoint_read.py [--layers 8] [--keep DIR] [--enforce] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.5

CHILD = r"""
import json, resource, sys
import numpy as np
from grok_deploy.checkpoint import open_checkpoint
from grok_deploy.model.config import GrokConfig

def status(key):  # Linux: VmHWM is this program's peak (ru_maxrss also counts the forking parent)
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def rss():
    return status("VmHWM")

def current_rss():  # the high-water mark of start-up may sit above the RSS we start from
    return status("VmRSS")

mode, folder, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
ckpt = open_checkpoint(folder, preset=GrokConfig.from_name("grok-1-bench", num_layers=layers))
infos = ckpt.infos()
np.ones((64, 64), np.int8).astype(np.float32).sum()
base = current_rss()
largest, checksum = 0, 0.0
for info in infos:
    if mode == "experts" and len(info.shape) == 3:
        for e in range(info.shape[0]):
            a = ckpt.read_expert(info.name, e)
            largest, checksum = max(largest, a.nbytes), checksum + float(a[0, 0])
            del a
for name, a in ckpt.params() if mode == "params" else ():
    largest, checksum = max(largest, a.nbytes), checksum + float(a.reshape(-1)[0])
    del a  # the loop variable would otherwise keep the previous tensor alive
if mode == "experts":
    for info in infos:
        if len(info.shape) != 3:
            a = ckpt.read(info.name)
            largest = max(largest, a.nbytes)
            del a
print(json.dumps({"mode": mode, "baseline": base, "peak": rss(), "largest": largest}))
"""


def write_bench_checkpoint(folder: Path, layers: int) -> int:
    """Random grok-1-bench leaves as the release stores them; returns the bytes written."""
    import ml_dtypes
    import numpy as np

    from grok_deploy.checkpoint import QuantizedWeight8bit, write_checkpoint
    from grok_deploy.model import names
    from grok_deploy.model.config import GrokConfig

    cfg = GrokConfig.from_name("grok-1-bench", num_layers=layers)
    rng = np.random.default_rng(0)

    def leaves():
        for path in names.flatten_order(cfg.num_layers):
            shape, sshape = names.leaf_shape(cfg, path), names.scale_shape(cfg, path)
            if sshape is None:
                yield path, rng.standard_normal(shape, dtype=np.float32)
            else:
                q = rng.integers(-127, 128, shape, dtype=np.int8)
                s = rng.uniform(1e-3, 1e-2, sshape).astype(ml_dtypes.bfloat16)
                yield path, QuantizedWeight8bit(q, s)

    write_checkpoint(folder, cfg, leaves())
    (folder / "tokenizer.model").write_bytes(b"unused by this benchmark")
    return sum(p.stat().st_size for p in (folder / "ckpt-0").iterdir())


def measure(mode: str, folder: Path, layers: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(layers)], check=True,
                         capture_output=True, text=True, timeout=300, cwd=root)
    r = json.loads(out.stdout)
    r["above_baseline"] = r["peak"] - r["baseline"]
    r["ratio"] = r["above_baseline"] / r["largest"]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    ap.add_argument("--enforce", action="store_true", help=f"exit 1 when a ratio exceeds {TARGET}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        folder = args.keep or Path(tmp) / "bench"
        t0 = time.perf_counter()
        size = write_bench_checkpoint(folder, args.layers)
        write_s = time.perf_counter() - t0
        results = [measure(mode, folder, args.layers) for mode in ("params", "experts")]
    ok = all(r["ratio"] <= TARGET for r in results)
    if args.json:
        print(json.dumps({"checkpoint_bytes": size, "write_s": write_s, "target": TARGET, "ok": ok,
                          "results": results}))
    else:
        mib = 1 << 20
        print(f"checkpoint: {size / mib:.0f} MiB written in {write_s:.1f} s")
        for r in results:
            print(f"{r['mode']:<8} largest tensor {r['largest'] / mib:7.1f} MiB  peak above baseline "
                  f"{r['above_baseline'] / mib:7.1f} MiB  ratio {r['ratio']:.2f} (target <= {TARGET})")
    return 1 if args.enforce and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
