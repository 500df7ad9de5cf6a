"""Interruptions (issue 13, items 4 and 5): convert's workers die with their parent, SIGTERM and
Ctrl-C are clean aborts, stale tmp folders go at the next start (a live writer's stay), two runs
in one folder: the second gets `error:` naming the first's pid; SIGKILL at 12 points of convert,
export-onnx and package, each followed by a rerun whose output is byte-identical."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grok_deploy.cli import main
from grok_deploy.manifest import clean_stale
from grok_deploy.safe_files import LOCK, lock
from rel_helpers import cli, digest, killed_at, leftovers, one_error_line, trusted_or_absent

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of `pid`, from /proc."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _start_convert(src: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """convert --tp 8 with 2 workers, returned once both workers are writing rank files."""
    proc = subprocess.Popen([sys.executable, "-m", "grok_deploy.cli", "convert", str(src), str(out), "--tp", "8",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tmp = [p for p in out.parent.glob(out.name + ".tmp-*") if list(p.glob("rank*.safetensors"))]
        workers = [k for k in _children(proc.pid) if "spawn_main" in _cmdline(k) and "resource_tracker" not in _cmdline(k)]
        if tmp and len(workers) == 2:
            return proc, workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("convert never started its workers")


@pytest.mark.timeout(180)
def test_sigkill_of_convert_takes_its_workers_and_the_rerun_cleans_up(tiny_ckpt, tmp_path):
    out = tmp_path / "trt"
    proc, workers = _start_convert(tiny_ckpt, out)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "workers outlived their SIGKILLed parent"
    assert leftovers(tmp_path) and not out.exists()  # the dead run's tmp folder is still there
    assert _main("convert", tiny_ckpt, out, "--tp", "2", "--workers", "1") == 0
    assert leftovers(tmp_path) == [] and sorted(p.name for p in out.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_abort_convert_cleanly(tiny_ckpt, tmp_path, sig, code, word):
    out = tmp_path / "trt"
    proc, workers = _start_convert(tiny_ckpt, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert one_error_line(err).startswith(f"error: {word}")
    assert not any(_alive(w) for w in workers)
    assert leftovers(tmp_path) == [] and not out.exists()


def test_stale_tmp_of_a_dead_writer_goes_a_live_ones_stays(tmp_path):
    """Only tmp/old folders whose mark (ours) names them, this output and an exited owner go
    (issue 22: the sweep goes by mark, not by name)."""
    import json

    from grok_deploy.manifest import MARK, new_tmp

    out = tmp_path / "trt"
    made = subprocess.run([sys.executable, "-c", f"from grok_deploy.manifest import new_tmp\n"
                           f"print(new_tmp(__import__('pathlib').Path({str(out)!r}), 'convert'))"],
                          capture_output=True, text=True, check=True)
    gone = Path(made.stdout.strip())                      # its writer has exited
    live = new_tmp(out, "convert")                        # ours, in progress
    reused = new_tmp(out, "convert")                      # its pid now names another process
    doc = json.loads((reused / MARK).read_text())
    (reused / MARK).write_text(json.dumps({**doc, "pid": os.getppid(), "start": 1}))
    dead_pid = gone.name.split("-")[1]
    users = [tmp_path / n for n in ("trt.tmp-q1w2e3r4", f"trt.tmp-{dead_pid}-abcd", "trt.old-backup", "trt.old-v1",
                                    "trt.tmp-keep")]      # a user's, or an older release's: no mark of ours
    copied = tmp_path / "trt.old-copy"                    # a copy of a dead tmp: its mark names another folder
    other = tmp_path / "trtx.tmp-1-zz"                    # another output's: not ours to touch
    for p in (gone, live, reused, *users, copied, other):
        p.mkdir(exist_ok=True)
        (p / "rank0.safetensors").write_bytes(b"x")
    shutil.copy(gone / MARK, copied / MARK)
    assert sorted(clean_stale(out)) == sorted([gone, reused])
    assert all(p.is_dir() for p in (live, *users, copied, other)) and not gone.exists() and not reused.exists()


@pytest.mark.timeout(120)
def test_second_run_in_a_folder_names_the_first_ones_pid(tmp_path):
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text((ROOT / "pipeline.yaml").read_text())
    live = tmp_path / "export" / f"source.tmp-{os.getpid()}-live"  # the first run's work in progress
    live.mkdir(parents=True)
    (live / "half.bin").write_bytes(b"x" * 100)
    with lock(tmp_path, "grok-deploy run pipeline.yaml"):
        res = cli("run", pipe, "--stages", "source")
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert f"another grok-deploy process (pid {os.getpid()}) is writing here" in line
        assert "grok-deploy run pipeline.yaml" in line and str(tmp_path) in line
        assert (live / "half.bin").read_bytes() == b"x" * 100  # nothing of the first run was touched
        res = cli("plan", pipe)  # reading is not writing: plan runs while a run holds the lock
        assert res.returncode == 0, res.stderr
    assert not (tmp_path / LOCK).exists()  # released and removed
    shutil.rmtree(live)
    res = cli("run", pipe, "--stages", "source")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "export" / "source" / "manifest.json").is_file()


@pytest.mark.timeout(60)
def test_lock_is_released_by_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"from grok_deploy.safe_files import lock\n"
                               f"import time\nwith lock({str(tmp_path)!r}, 'holder'):\n print('held', flush=True)\n"
                               " time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"pid {holder.pid}"):
        with lock(tmp_path):
            pass
    holder.kill()
    holder.wait(10)
    with lock(tmp_path, "second"):
        assert (tmp_path / LOCK).read_text().startswith(f"{os.getpid()} second")


def _points(total: int, n: int) -> list[int]:
    """n kill points spread over 1..total (first and last included)."""
    return sorted({max(1, min(total, round(1 + i * (total - 1) / (n - 1)))) for i in range(n)})


def _main(*args) -> int:
    """The command in this process (no interpreter start-up: the reruns stay fast)."""
    return main([str(a) for a in args])


def _kill_and_rerun(tmp_path: Path, out: Path, args: list, n: int) -> list[int]:
    """A clean run to count the points and record the bytes; then, per point, a run SIGKILLed
    there (what it leaves is never trusted half-done) and a rerun, in this process, with the same
    bytes."""
    count = tmp_path / "points"
    res = killed_at(0, count, *args)
    assert res.returncode == 0, res.stderr
    want = digest(out)
    points = _points(int(count.read_text()), n)
    for p in points:
        res = killed_at(p, count, *args)
        assert res.returncode == -signal.SIGKILL, (p, res.returncode, res.stderr)
        trusted_or_absent(out)
        assert _main(*args) == 0, p
        assert digest(out) == want, f"rerun after SIGKILL at point {p} differs"
        assert leftovers(out.parent) == [], p
    return points


@pytest.mark.timeout(300)
def test_sigkill_at_5_points_of_convert_then_identical_rerun(tiny_ckpt, tmp_path):
    out = tmp_path / "trt"
    points = _kill_and_rerun(tmp_path, out, ["convert", tiny_ckpt, out, "--tp", "4", "--workers", "1"], 5)
    assert len(points) == 5


@pytest.mark.timeout(300)
def test_sigkill_at_3_points_of_export_onnx_then_identical_rerun(tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    assert len(_kill_and_rerun(tmp_path, out, ["export-onnx", tiny_ckpt, out], 3)) == 3


@pytest.mark.timeout(400)
def test_sigkill_at_4_points_of_package_then_identical_rerun(tmp_path):
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text((ROOT / "pipeline.yaml").read_text())
    res = cli("run", pipe, "--stages", "source,export-onnx,build", timeout=300)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "triton_repo"
    points = _kill_and_rerun(tmp_path, out, ["run", pipe, "--stages", "package", "--force"], 4)
    assert len(points) == 4
