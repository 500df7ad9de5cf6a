"""The host the estimates are for (grok_deploy/host.py): usable cores from the affinity mask, the
speed of one core (measured once per CPU model and cached), the disk rate (pipeline key, or
measured once with O_DIRECT and cached), and plan's verify and check-shards times scaling with
all three."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from grok_deploy import host
from grok_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def h100_plan(tmp_path: Path, capsys, extra: str = "") -> dict:
    text = (ROOT / "pipelines" / "grok-1-h100x8.yaml").read_text().replace(": ../", ": ")
    text = text.replace("  gpus_per_node: 8\n", "  gpus_per_node: 8\n" + extra)
    f = tmp_path / "grok-1-h100x8.yaml"
    f.write_text(text)
    assert main(["plan", str(f), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_core_estimates_are_longer_than_two(tmp_path, capsys, monkeypatch):
    """What `taskset -c 0 grok-deploy plan` sees, against two cores."""
    docs = {}
    for cores in ({0}, {0, 1}):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores)
        docs[len(cores)] = h100_plan(tmp_path, capsys)
    one, two = docs[1], docs[2]
    assert (one["host"]["cores"], two["host"]["cores"]) == (1, 2)
    assert one["host_assumed"].startswith("1 usable core (os.sched_getaffinity) of 90 GFLOP/s each (measured, cached "
                                          f"in {host.cache_file('compute-rate.json')}), disk reads at 0.70 GB/s "
                                          "(assumed: "
                                          "the reference host's; no checkpoint to measure yet "
                                          "(set hardware.disk_read_gbps)), "
                                          "a quiet host")
    # the disk part is the same on both; everything else takes twice as long on one core
    assert one["verify"]["seconds"] > 1.8 * two["verify"]["seconds"]  # scoring is mostly matmuls
    assert one["check_shards"]["seconds"] > 1.05 * two["check_shards"]["seconds"]  # the check mostly reads
    v1, v2 = one["verify"], two["verify"]
    disk = v2["bytes_per_layer"] / host.REF_DISK_BPS
    assert v1["seconds_per_layer"] - disk == pytest.approx(2 * (v2["seconds_per_layer"] - disk), rel=1e-9)
    # two cores of the reference's speed: the constants as measured (bench/verify_fullsize.py: 32.1 s a
    # layer with the disk at 1.58 GB/s), here with the reference disk's 0.7 GB/s
    assert v2["seconds_per_layer"] == pytest.approx(32.1 - 4.92 / 1.58 + 4.92 / 0.7, rel=0.05)


def test_a_large_host_is_faster_up_to_the_core_cap(tmp_path, capsys, monkeypatch):
    docs = {}
    for n in (16, 32, 128):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=n: set(range(n)))
        docs[n] = h100_plan(tmp_path, capsys, "  disk_read_gbps: 7\n")
    assert {k: v for k, v in docs[128]["host"].items() if k != "load_average"} == {
        "cores": 128, "cores_how": "os.sched_getaffinity", "disk_read_bytes_per_s": 7e9,
        "disk_how": "hardware.disk_read_gbps", "core_flops": host.REF_CORE_FLOPS,
        "core_how": f"measured, cached in {host.cache_file('compute-rate.json')}"}
    assert docs[128]["host"]["load_average"] == pytest.approx(os.getloadavg()[0], abs=20)
    for key in ("verify", "check_shards"):
        assert docs[128][key]["seconds"] == docs[32][key]["seconds"] < docs[16][key]["seconds"], key  # the cap
        assert docs[128][key]["seconds"] < 10 * 60, key  # ~1 h each on the 2-core reference host
    v = docs[128]["verify"]
    assert v["seconds_per_layer"] > v["bytes_per_layer"] / 7e9  # never faster than the disk


def test_scale():
    two = host.Host(2, host.REF_DISK_BPS)
    assert two.scale(10.0, 1.4e9) == pytest.approx(10.0)  # the reference host's own time
    one_fast_disk = host.Host(1, 2 * host.REF_DISK_BPS)
    # 2 s of the 10 were reading 1.4 GB: 1 s at twice the rate; the other 8 s on half the cores
    assert one_fast_disk.scale(10.0, 1.4e9) == pytest.approx(1.0 + 16.0)
    assert host.Host(64, host.REF_DISK_BPS).scale(32.0) == pytest.approx(32.0 * 2 / host.MAX_CORES)
    # cores twice as fast: the compute part in half the time, the disk part as before
    fast = host.Host(2, host.REF_DISK_BPS, core_flops=2 * host.REF_CORE_FLOPS)
    assert fast.scale(10.0, 1.4e9) == pytest.approx(2.0 + 4.0)


def test_the_core_speed_is_measured_once_per_cpu_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = host.cache_file("compute-rate.json")
    flops, how = host.core_rate(load=0.1)
    assert 1e9 < flops < 1e13  # a real float32 matmul on one core
    assert how == f"measured now, cached in {cache}"
    entry = json.loads(cache.read_text())[host.cpu_model()]
    assert entry["flops"] == flops and "numpy " in host.cpu_model()
    assert host.core_rate(load=0.1) == (flops, f"measured, cached in {cache}")
    # what `plan` then says and uses
    here = host.current(None)
    assert (here.core_flops, here.core_how) == (flops, f"measured, cached in {cache}")
    assert f"of {flops / 1e9:.0f} GFLOP/s each (measured, cached in {cache})" in here.describe()


def test_a_busy_or_failed_measurement_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    flops, how = host.core_rate(load=9.5)
    assert flops > 1e9 and how == "measured now on a busy machine (load 9.5), not cached"
    assert not host.cache_file("compute-rate.json").exists()
    monkeypatch.setattr(host, "COMPUTE_PROBE", "raise SystemExit(3)")
    assert host.core_rate(load=0.1) == (host.REF_CORE_FLOPS, "assumed: the reference host's; the measurement failed")
    assert not host.cache_file("compute-rate.json").exists()


def test_the_disk_rate_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt" / "ckpt-0"
    ckpt.mkdir(parents=True)
    (ckpt / "tensor00000_000").write_bytes(os.urandom(1 << 20) * 80)  # 80 MB
    (ckpt / "tensor00001_000").write_bytes(b"x" * 100)
    bps, how = host.disk_rate(tmp_path / "ckpt")
    assert bps > 10e6
    assert how.startswith(f"measured now on {ckpt / 'tensor00000_000'}, 84 MB read with O_DIRECT, cached in ")
    cached = json.loads(host.cache_file().read_text())
    entry = cached[str(os.stat(tmp_path / "ckpt").st_dev)]
    assert entry["bytes_per_s"] == bps and entry["bytes"] == (80 << 20) + 100
    assert entry["file"] == str(ckpt / "tensor00000_000")
    (ckpt / "tensor00000_000").unlink()  # a second look reads nothing: the cached figure
    assert host.disk_rate(tmp_path / "ckpt") == (
        bps, f"measured on {ckpt / 'tensor00000_000'}, cached in {host.cache_file()}")
    assert host.disk_rate(tmp_path / "ckpt", 3.5) == (3.5e9, "hardware.disk_read_gbps")


def test_nothing_to_measure_is_the_reference_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "tokenizer.model").write_bytes(b"x" * 1000)
    bps, how = host.disk_rate(tmp_path / "small")
    assert bps == host.REF_DISK_BPS and how.startswith("assumed: the reference host's;") and "too small" in how
    assert host.disk_rate(tmp_path / "absent")[1].startswith("assumed: the reference host's; no checkpoint")
    assert not host.cache_file().exists()


def test_plan_says_when_the_host_is_loaded(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    quiet, busy = host.Host(2, 0.7e9, load=1.5), host.Host(1, 0.7e9, load=13.0)
    assert quiet.describe() == ("2 usable cores (os.sched_getaffinity) of 90 GFLOP/s each (reference host), disk "
                                "reads at 0.70 GB/s (reference host), a quiet host")
    assert busy.describe().endswith("a quiet host; the load average is 13.0 on this machine's 2 cores now: while it "
                                    "lasts the compute takes ~6.5x as long")


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    assert host.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert host.usable_cores() == 1
