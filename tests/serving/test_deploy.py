"""deploy: finding tritonserver, the leader-mode command, start-up failures with the log tail,
the foreground `serve` command, and that no server process outlives its owner."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serving_fixtures import gone, make_repo

from grok_deploy.errors import UserError
from grok_deploy.serving import deploy
from grok_deploy.serving.deploy import TritonServer, find_tritonserver, free_port, mpirun_command

pytestmark = pytest.mark.timeout(180)  # servers are started: never hang the suite

def tracked(server: TritonServer) -> list[int]:
    """The pids the server starts (stop() forgets its process; the tests check it is gone)."""
    pids, start = [], server.start
    server.start = lambda: (start(), pids.append(server.proc.pid))
    return pids


@pytest.fixture(scope="module")
def good_repo(tiny_ckpt, tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("deploy"), tiny_ckpt)


def test_find_tritonserver_order(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not an executable"):
        find_tritonserver(str(tmp_path / "missing"))
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_tritonserver(str(fake)).source == "pipeline"
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    assert find_tritonserver("auto").path == fake
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = find_tritonserver("auto")  # the nvidia-pytriton wheel's binary
    assert found.source == "pytriton" and found.path.name == "tritonserver"
    assert (found.backend_dir / "python" / "triton_python_backend_stub").is_file()
    assert (found.backend_dir / "python" / "libtriton_python.so").is_file()
    assert "nvidia_pytriton.libs" in found.env["LD_LIBRARY_PATH"]
    assert found.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "site-packages" not in str(found.backend_dir)  # a private copy, the wheel is untouched


def test_mpirun_leader_mode_command():
    cmd = mpirun_command("/repo", 3, grpc_port=9001, http_port=9000, metrics_port=9002, binary="/bin/tritonserver")
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    ranks, cur = [], []
    for arg in cmd[2:] + [":"]:
        if arg == ":":
            ranks.append(cur)
            cur = []
        else:
            cur.append(arg)
    assert len(ranks) == 3
    for i, r in enumerate(ranks):
        assert r[:3] == ["-n", "1", "/bin/tritonserver"]
        assert "--model-repository=/repo" in r and "--disable-auto-complete-config" in r
        assert {"--grpc-port=9001", "--http-port=9000", "--metrics-port=9002"} <= set(r)  # same ports on every rank
        assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(r)
        assert f"--backend-config=python,shm-region-prefix-name=prefix{i}_" in r
        workers = {"--model-control-mode=explicit", "--load-model=tensorrt_llm"}
        assert (workers <= set(r)) == (i > 0)


def test_world_size_from_the_pipeline(good_repo):
    cfg, repo = good_repo
    trt = cfg.model_copy(deep=True)
    trt.engine.backend, trt.parallel.tp = "trtllm", 2
    assert TritonServer(trt, repo).world_size == 2 and TritonServer(cfg, repo).world_size == 1


def test_port_in_use_is_refused_before_starting(good_repo, tmp_path):
    cfg, repo = good_repo
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = TritonServer(cfg, repo, grpc_port=port, http_port=0, metrics_port=0, log_dir=tmp_path)
        with pytest.raises(UserError, match=f"grpc port {port} on 127.0.0.1 is in use"):
            server.__enter__()
        assert server.proc is None


@pytest.mark.server
def test_port_taken_after_the_check_fails_with_the_log_tail(good_repo, tmp_path, monkeypatch):
    cfg, repo = good_repo
    monkeypatch.setattr(deploy, "port_in_use", lambda *a: False)  # lose the race on purpose
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = TritonServer(cfg, repo, http_port=s.getsockname()[1], grpc_port=0, metrics_port=0,
                              log_dir=tmp_path, startup_timeout_s=60)
        pids = tracked(server)
        with pytest.raises(UserError, match="(?s)exited with code.*a port is in use.*log tail:\n"):
            with server:
                pass
    assert pids and gone(pids[0]) and server.proc is None


@pytest.mark.server
def test_model_that_fails_to_load_is_reported_and_nothing_is_left(tiny_ckpt, tmp_path):
    broken = tmp_path / "not-a-checkpoint"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes((tiny_ckpt / "tokenizer.model").read_bytes())
    cfg, repo = make_repo(tmp_path / "p", tiny_ckpt, engine_dir=broken)
    server = TritonServer(cfg, repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout_s=60)
    pids = tracked(server)
    with pytest.raises(UserError, match="(?s)model\\(s\\) failed to load: tensorrt_llm.*log tail:") as e:
        server.__enter__()
    assert str(broken) in str(e.value) or "ckpt-0" in str(e.value) or "tensorrt_llm" in str(e.value)
    assert server.log_path.parent == tmp_path / "p" / "export" / "logs"  # logs under export/logs/
    assert pids and gone(pids[0])


@pytest.mark.server
def test_startup_deadline_stops_the_server(good_repo, tmp_path):
    cfg, repo = good_repo
    server = TritonServer(cfg, repo, grpc_port=0, http_port=0, metrics_port=0, log_dir=tmp_path,
                          startup_timeout_s=0.2)
    pids = tracked(server)
    with pytest.raises(UserError, match=r"not ready after 0 s"):
        server.__enter__()
    assert pids and gone(pids[0]) and server.proc is None


@pytest.mark.server
def test_serve_in_the_foreground_until_sigterm(good_repo, tiny_ckpt, tmp_path):
    from grok_deploy.serving.client import query

    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    folder = tmp_path / "served"
    make_repo(folder, tiny_ckpt, extra=f"server:\n  grpc_port: {ports[0]}\n  http_port: {ports[1]}\n"
                                      f"  metrics_port: {ports[2]}\n  startup_timeout_s: 120\n")
    cli = Path(sys.executable).parent / "grok-deploy"
    proc = subprocess.Popen([str(cli), "serve", str(folder / "pipeline.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"gRPC 127.0.0.1:{ports[0]}" in line, line + proc.stderr.read()
        server_pid = int(line.split("(pid ")[1].split(")")[0])
        assert query(f"127.0.0.1:{ports[0]}", "Hello", 3)["responses"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert gone(server_pid)  # server and python stubs gone
        assert (folder / "export" / "logs" / f"tritonserver-{ports[0]}.log").is_file()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
