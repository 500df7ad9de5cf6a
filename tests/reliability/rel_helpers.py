"""Helpers of the reliability tests: run the CLI in a subprocess, digest folders, check leftovers."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KILLER = HERE / "killer.py"
VOLATILE = {"seconds", "created", "tokens_per_s", "workers"}  # timings in manifests, nothing else
MARK_VOLATILE = {"pid", "start", "host", "boot", "folder", "path"}  # a mark's writer and place


def cli(*args, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grok_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def killed_at(point: int, count_file: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command of `args`, SIGKILLed at its `point`-th write point (0: run to the end)."""
    return subprocess.run([sys.executable, str(KILLER), str(point), str(count_file), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a user error prints (progress lines aside); fails otherwise."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (manifests without their timings, our marks without
    their writer and place)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == ".grok-deploy.lock":
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
        elif p.name == ".grok-deploy":  # our mark: without its writer; a forged one byte for byte
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("mark") == 2:
                data = json.dumps({k: v for k, v in doc.items() if k not in MARK_VOLATILE}, sort_keys=True).encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary and old folders of interrupted writes under `parent` (recursively)."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def trusted_or_absent(out: Path) -> None:
    """After a kill: `out` is absent, or has no manifest (not done), or every file its manifest
    lists has the bytes and hash it says: never a half-written folder that looks done."""
    man = out / "manifest.json"
    if not man.is_file():
        return
    files = json.loads(man.read_text()).get("files", {})
    for name, meta in files.items():
        f = out / name
        assert f.is_file() and f.stat().st_size == meta["bytes"], name
        if "sha256" in meta:
            assert hashlib.sha256(f.read_bytes()).hexdigest() == meta["sha256"], name


# Runs the CLI and, at its exit, writes its peak resident memory (VmHWM, kB) to argv[1]. Not
# ru_maxrss: Linux counts into it the memory of the process that forked it (a pytest of 300 MB).
_PEAK = """
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


def cli_peak(*args, timeout: float = 120, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a subprocess, and that process's own peak resident memory in MB (its VmHWM,
    read as it exits)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        res = subprocess.run([sys.executable, "-c", _PEAK, str(peak_file), *map(str, args)], capture_output=True,
                             text=True, timeout=timeout, cwd=cwd)
        assert peak_file.exists(), f"the command did not report its peak: {res.stderr[-2000:]}"
        return res, int(peak_file.read_text()) / 1024


_SMALL_FS = r'''
mnt="$1"; size="$2"; fill="$3"; listing="$4"; shift 4
mount -t tmpfs -o size="$size" tmpfs "$mnt" || exit 99
if [ "$fill" = fill ]; then dd if=/dev/zero of="$mnt/.fill" bs=4k 2>/dev/null; fi
"$@"; rc=$?
rm -f "$mnt/.fill"
(cd "$mnt" && find . -mindepth 1 \( -type d -printf '%p/\n' \) -o -printf '%p %s\n' | sort) > "$listing"
exit $rc
'''


def cli_on_small_fs(mnt: Path, size: str, *args, fill: bool = False, timeout: float = 180,
                    cwd=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CLI in a private mount namespace where `mnt` is a new tmpfs of `size` bytes (`fill`:
    filled to the last block first); (its result, what is left on that file system afterwards).
    What is left is listed as `./dir/` and `./file SIZE`. The mount dies with the namespace: nothing
    to unmount, even after a timeout."""
    import os

    mnt.mkdir(parents=True, exist_ok=True)
    listing = mnt.parent / f"{mnt.name}.listing"
    cmd = ["unshare", "-m", *(["-r"] if os.geteuid() else []), "sh", "-c", _SMALL_FS, "sh", str(mnt), size,
           "fill" if fill else "-", str(listing), sys.executable, "-m", "grok_deploy.cli", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert res.returncode != 99, f"cannot mount a tmpfs here: {res.stderr}"
    left = listing.read_text().splitlines()
    listing.unlink()
    return res, left
