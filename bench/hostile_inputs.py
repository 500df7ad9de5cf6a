"""Time and peak memory of `grok-deploy` on hostile inputs (issue 22, item 7): each case runs the
real CLI in a fresh process that reports its own peak RSS (VmHWM at exit; ru_maxrss would also
count the forking parent). Every case should end in exit 2 with one `error:` line, in well under
a second or two, below 200 MB.

- yaml recursive anchor: `a: &a {b: *a}` through `plan` (was 7 GB in 15 s and growing);
- yaml billion laughs: 10^9 values after alias expansion through `plan`;
- pickle 20 MB of `}`: a tensor file of 20 M empty-dict opcodes through `inspect` (was 1.37 GB);
- safetensors 300k metadata: a shard of the tiny model's port whose header carries 300,000
  `__metadata__` entries (under the 8 MB header cap) through `inspect` (was 25-31 s);
- tokenizer 8 GB sparse: `generate` with an 8 GB sparse tokenizer.model (was a MemoryError).

    .venv/bin/python bench/hostile_inputs.py [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import atexit, runpy, sys
out = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(kb)
atexit.register(report)
sys.argv[0] = "grok-deploy"
runpy.run_module("grok_deploy.cli", run_name="__main__", alter_sys=True)
"""


def measure(*args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, str(peak), *map(str, args)], capture_output=True,
                             text=True, timeout=600, check=False)
        seconds = time.perf_counter() - t0
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        return {"exit": res.returncode, "seconds": round(seconds, 2),
                "peak_mb": round(int(peak.read_text()) / 1024, 1) if peak.exists() else None,
                "error": (errors[-1][:150] + "...") if errors else res.stderr[-300:]}


def cases(root: Path) -> dict:
    from grok_deploy.checkpoint import open_checkpoint
    from grok_deploy.checkpoint.hf import write_hf_checkpoint
    from grok_deploy.checkpoint.tiny import make_tiny

    tiny = make_tiny(root / "tiny", "grok-1-tiny", seed=0, progress=False)
    out = {}
    (root / "recursive.yaml").write_text("a: &a\n  b: *a\n")
    out["yaml recursive anchor (plan)"] = ("plan", root / "recursive.yaml")
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (root / "laughs.yaml").write_text(laughs)
    out["yaml billion laughs (plan)"] = ("plan", root / "laughs.yaml")

    hostile = Path(shutil.copytree(tiny, root / "hostile"))
    (hostile / "ckpt-0" / "tensor00005_000").write_bytes(b"\x80\x04" + b"}" * (20 << 20) + b".")
    out["pickle 20 MB of } (inspect)"] = ("inspect", hostile)

    src = open_checkpoint(tiny)
    hf = write_hf_checkpoint(root / "hf", src.config, dict(src.params()), dtype="float32")
    shutil.copy(tiny / "tokenizer.model", hf / "tokenizer.model")
    shard = next(hf.glob("*.safetensors"))
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {**header.get("__metadata__", {}), **{f"k{i}": "" for i in range(300_000)}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    out["safetensors 300k metadata (inspect)"] = ("inspect", hf)

    sparse = Path(shutil.copytree(tiny, root / "sparse"))
    os.truncate(sparse / "tokenizer.model", 8 << 30)
    out["tokenizer 8 GB sparse (generate)"] = ("generate", sparse, "--prompt", "hi")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(*argv) for name, argv in cases(Path(tmp)).items()}
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"load_average_1m": load, "cases": rows}, indent=1))
        return
    print(f"load average (1 min): {load:.2f}")
    print(f"{'case':<38} {'exit':>4} {'seconds':>8} {'peak MB':>8}  error")
    for name, r in rows.items():
        print(f"{name:<38} {r['exit']:>4} {r['seconds']:>8.2f} {r['peak_mb'] or 0:>8.1f}  {r['error']}")


if __name__ == "__main__":
    main()
