"""The host the time estimates are for: its usable cores, the speed of one of them and the read
rate of the disk the checkpoint is on. Every measured time constant in the project
(verify/score.py, trtllm/check_shards.py) was measured on the reference host below; `Host.scale`
carries such a time over to this host: the disk part at this disk's rate, the rest (dequantising,
matmuls, comparing: torch and numpy use every core) in proportion to the usable cores and to the
speed of one core.

The speed of a core is a float32 matrix product (numpy, one BLAS thread, in a child process so the
thread count holds) measured once per CPU model and numpy version and cached in
$XDG_CACHE_HOME/grok-deploy/compute-rate.json; a measurement taken while the machine is busier
than its cores is used but not cached.

The disk rate is `hardware.disk_read_gbps` when set, else measured once per file system (O_DIRECT
reads of the checkpoint's largest files, so the page cache does not flatter it) and cached in
$XDG_CACHE_HOME/grok-deploy/disk-read.json; with nothing to measure yet, the reference rate.
"""
from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

# The reference host (this project's test host, where the constants were measured): 2 cores, a
# virtual disk read at 0.72-0.76 GB/s by `dd bs=8M iflag=direct` of 0.4-0.5 GB files not read
# since boot (1.7 GB/s on a second read: the hypervisor caches), in line with the bench's cold
# minus warm scoring time, 7.4 s a layer for 4.92 GB (0.66 GB/s).
REF_CORES = 2
REF_DISK_BPS = 0.7e9
# one core of the reference host (AMD EPYC with AVX-512): COMPUTE_PROBE's float32 product at
# 88-93 GFLOP/s, measured by core_rate() there
REF_CORE_FLOPS = 90e9
MAX_CORES = 32           # beyond this a streamed layer (a few hundred tokens) keeps no more busy
MEASURE_BYTES = 512 << 20
MEASURE_SECONDS = 3.0
MIN_BYTES = 64 << 20     # less than this to read (a tiny checkpoint) says nothing about the disk
BLOCK = 8 << 20


def usable_cores() -> int:
    """Cores this process may run on (taskset, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Host:
    cores: int
    disk_bps: float
    cores_how: str = "os.sched_getaffinity"
    disk_how: str = "reference host"
    load: float | None = None  # the 1-minute load average when measured (the estimates are for a quiet host)
    core_flops: float = REF_CORE_FLOPS
    core_how: str = "reference host"

    def scale(self, ref_seconds: float, read_bytes: float = 0.0) -> float:
        """Seconds here of work that took `ref_seconds` on the reference host, `read_bytes` of
        which were read from disk (the rest of the time is compute, shared over the cores and as
        fast as one core here is against one there)."""
        compute = max(ref_seconds - read_bytes / REF_DISK_BPS, 0.0)
        speed = REF_CORE_FLOPS / self.core_flops
        return read_bytes / self.disk_bps + compute * REF_CORES / min(self.cores, MAX_CORES) * speed

    def describe(self) -> str:
        text = (f"{self.cores} usable core{'s' if self.cores != 1 else ''} ({self.cores_how}) of "
                f"{self.core_flops / 1e9:.0f} GFLOP/s each ({self.core_how}), disk reads at "
                f"{self.disk_bps / 1e9:.2f} GB/s ({self.disk_how}), a quiet host")
        machine = os.cpu_count() or self.cores  # the load average counts the whole machine's run queue
        if self.load is not None and self.load > machine:  # measured: load ~12.6 on 2 cores, 6.3x the compute
            text += (f"; the load average is {self.load:.1f} on this machine's {machine} cores now: while it lasts "
                     f"the compute takes ~{self.load / machine:.1f}x as long")
        return text

    def to_dict(self) -> dict:
        return {"cores": self.cores, "cores_how": self.cores_how, "core_flops": self.core_flops,
                "core_how": self.core_how, "disk_read_bytes_per_s": self.disk_bps, "disk_how": self.disk_how,
                "load_average": self.load}


REFERENCE = Host(REF_CORES, REF_DISK_BPS, "reference host", "reference host")


def cache_file(name: str = "disk-read.json") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grok-deploy" / name


def _read_cache(cache: Path) -> dict:
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(cache: Path, known: dict) -> str:
    """Writes `known` to `cache` (temp file and rename); says where, or why not."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
        return f"cached in {cache}"
    except OSError:
        return "not cached: cannot write the cache"


# float32 (256 x 2048) @ (2048 x 2048), the shape class of a streamed layer's matmuls; best of 7
COMPUTE_PROBE = r"""
import time, numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 2048), dtype=np.float32)
b = rng.standard_normal((2048, 2048), dtype=np.float32)
a @ b
best = float("inf")
for _ in range(7):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(2 * 256 * 2048 * 2048 / best)
"""
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform elsewhere) and the numpy version (its BLAS)."""
    import platform

    import numpy

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} | numpy {numpy.__version__}"


def measure_core() -> float | None:
    """FLOP/s of one core on COMPUTE_PROBE, or None when the child fails."""
    import subprocess
    import sys

    try:
        run = subprocess.run([sys.executable, "-c", COMPUTE_PROBE], env={**os.environ, **ONE_THREAD},
                             capture_output=True, text=True, timeout=60)
        rate = float(run.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return rate if run.returncode == 0 and rate > 0 else None


def core_rate(load: float | None = None) -> tuple[float, str]:
    """(FLOP/s of one core, how it was found): cached per CPU model, else measured now."""
    cache, key = cache_file("compute-rate.json"), cpu_model()
    known = _read_cache(cache)
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"]), f"measured, cached in {cache}"
    got = measure_core()
    if got is None:
        return REF_CORE_FLOPS, "assumed: the reference host's; the measurement failed"
    if load is not None and load > (os.cpu_count() or 1):  # a busy machine would be remembered as a slow one
        return got, f"measured now on a busy machine (load {load:.1f}), not cached"
    known[key] = {"flops": got, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return got, f"measured now, {_write_cache(cache, known)}"


def _largest_files(folder: Path, limit: int = 8) -> list[Path]:
    """The largest regular files in `folder` and its subfolders, two levels down (a checkpoint's
    ckpt-0/tensor* or *.safetensors), largest first."""
    found = []
    for root, dirs, files in os.walk(folder):
        if len(Path(root).relative_to(folder).parts) >= 2:
            dirs[:] = []
        for name in files:
            p = Path(root) / name
            try:
                if p.is_file() and not p.is_symlink():
                    found.append((p.stat().st_size, p))
            except OSError:
                continue
    return [p for _, p in sorted(found, key=lambda t: -t[0])[:limit]]


def _read_direct(path: Path, budget: int, deadline: float) -> int:
    """Bytes read from `path` with O_DIRECT (aligned 8 MB blocks into a page-aligned buffer), or
    buffered after dropping its cached pages where the file system refuses O_DIRECT."""
    buf = mmap.mmap(-1, BLOCK)
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        done = 0
        try:
            while done < budget and time.perf_counter() < deadline:
                try:
                    n = os.readv(fd, [buf])
                except OSError:  # EINVAL: O_DIRECT refused (tmpfs, some FUSE)
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.lseek(fd, done, os.SEEK_SET)
                    n = os.readv(fd, [buf])
                if n <= 0:
                    break
                done += n
        finally:
            os.close(fd)
        return done
    finally:
        buf.close()


def measure_disk(folder: Path) -> dict | None:
    """Read rate of the largest files in `folder`: {"bytes_per_s", "file", "bytes", "seconds"},
    or None when they hold less than MIN_BYTES."""
    files = _largest_files(folder)
    if sum(p.stat().st_size for p in files) < MIN_BYTES:
        return None
    for p in files:  # pages still being written back would be timed as reads (a checkpoint just made)
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    t0 = time.perf_counter()
    deadline, done = t0 + MEASURE_SECONDS, 0
    for p in files:
        done += _read_direct(p, MEASURE_BYTES - done, deadline)
        if done >= MEASURE_BYTES or time.perf_counter() >= deadline:
            break
    seconds = time.perf_counter() - t0
    if done < MIN_BYTES or seconds <= 0:
        return None
    return {"bytes_per_s": done / seconds, "file": str(files[0]), "bytes": done, "seconds": round(seconds, 3)}


def disk_rate(folder: Path | None, configured_gbps: float | None = None) -> tuple[float, str]:
    """(bytes per second, how it was found) for reading the checkpoint in `folder`."""
    if configured_gbps:
        return configured_gbps * 1e9, "hardware.disk_read_gbps"
    if folder is None or not Path(folder).is_dir():
        return REF_DISK_BPS, "assumed: the reference host's; no checkpoint to measure yet (set hardware.disk_read_gbps)"
    cache = cache_file()
    key = str(os.stat(folder).st_dev)
    known = _read_cache(cache)
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bytes_per_s"), (int, float)) and entry["bytes_per_s"] > 0:
        return float(entry["bytes_per_s"]), f"measured on {entry.get('file')}, cached in {cache}"
    got = measure_disk(Path(folder))
    if got is None:
        return REF_DISK_BPS, (f"assumed: the reference host's; {folder} is too small to measure "
                              "(set hardware.disk_read_gbps)")
    known[key] = {**got, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    where = _write_cache(cache, known)
    return got["bytes_per_s"], f"measured now on {got['file']}, {got['bytes'] / 1e6:.0f} MB read with O_DIRECT, {where}"


def current(folder: Path | None = None, configured_gbps: float | None = None) -> Host:
    """This host: its usable cores, the speed of one (core_rate) and the disk rate of `folder`
    (disk_rate)."""
    bps, how = disk_rate(folder, configured_gbps)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    flops, flops_how = core_rate(load)
    return Host(usable_cores(), bps, "os.sched_getaffinity", how, load, flops, flops_how)
