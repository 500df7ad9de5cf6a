"""Faults of the served model are noticed and nothing outlives `serve` (issue 22, items 6 and 8):
`grok-deploy serve` in a subprocess, long streams in flight, then a SIGKILL of `serve` itself
(its watchdog stops tritonserver and every stub) or of the `tensorrt_llm` python stub (serve
fails the streams, says `error:` and exits non-zero)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import gone, make_repo

from grok_deploy.serving.client import ServerError, stream_request, tensor
from grok_deploy.serving.deploy import free_port, shm_regions
from grok_deploy.serving.guard import python_stubs

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
LONG = 150


def serve(folder: Path, ckpt: Path) -> tuple[subprocess.Popen, int, str]:
    """`grok-deploy serve` on free ports: (its process, tritonserver's pid, gRPC url)."""
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    make_repo(folder, ckpt, extra=f"server:\n  grpc_port: {ports[0]}\n  http_port: {ports[1]}\n"
                                  f"  metrics_port: {ports[2]}\n  startup_timeout_s: 120\n")
    cli = Path(sys.executable).parent / "grok-deploy"
    proc = subprocess.Popen([str(cli), "serve", str(folder / "pipeline.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert f"gRPC 127.0.0.1:{ports[0]}" in line, line + proc.stderr.read()
    assert f"admin key in {folder / f'tritonserver-{ports[0]}.admin-key'}" in line
    return proc, int(line.split("(pid ")[1].split(")")[0]), f"127.0.0.1:{ports[0]}"


class Streams:
    """Long streams on the ensemble and straight to tensorrt_llm, each on its own thread:
    `tokens[i]` counts its responses, `ended[i]` is (seconds after `mark`, error or None)."""

    def __init__(self, url: str, n: int = 4):
        self.tokens, self.ended, self.mark = [0] * n, [None] * n, None
        llm = [tensor("input_ids", [[5, 6, 7]], np.int32), tensor("input_lengths", [[3]], np.int32),
               tensor("request_output_len", [[LONG]], np.int32), tensor("streaming", [[True]], np.bool_)]
        text = [tensor("text_input", [[b"Hello"]], object), tensor("max_tokens", [[LONG]], np.int32),
                tensor("stream", [[True]], np.bool_), tensor("end_id", [[-1]], np.int32)]
        self.threads = [threading.Thread(target=self._run, args=(i, url, *(("ensemble", text) if i % 2 else
                                                                        ("tensorrt_llm", llm)))) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i, url, model, inputs):
        try:
            for _ in stream_request(url, model, inputs, timeout=60):
                self.tokens[i] += 1
            self.ended[i] = (time.monotonic() - (self.mark or 0), None)
        except ServerError as e:
            self.ended[i] = (time.monotonic() - (self.mark or 0), e)

    def wait_tokens(self, n: int = 2) -> None:
        deadline = time.monotonic() + 60
        while min(self.tokens) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert min(self.tokens) >= n, self.tokens

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def test_sigkill_of_serve_mid_stream_leaves_no_server_and_fails_the_streams(tiny_ckpt, tmp_path):
    proc, server_pid, url = serve(tmp_path / "p", tiny_ckpt)
    try:
        stubs = python_stubs(server_pid)
        assert {n.rsplit("_", 2)[0] for n in stubs.values()} == {"preprocessing", "tensorrt_llm", "postprocessing",
                                                                 "tensorrt_llm_bls"}
        prefix = next(Path("/dev/shm").glob(f"grokdeploy{proc.pid}_*")).name.split("_")[0] + "_"
        streams = Streams(url)
        streams.wait_tokens()
        streams.mark = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert gone(server_pid, 10)  # tritonserver and every stub
        assert not [p for p in stubs if Path(f"/proc/{p}").exists()]
        streams.join(15)
        assert all(e is not None and e[1] is not None and e[0] < 10 for e in streams.ended), streams.ended
        assert all(n < LONG for n in streams.tokens)
        deadline = time.monotonic() + 5  # the watchdog removes the regions and the key after the kill
        while (shm_regions(prefix) or list((tmp_path / "p").glob("*.admin-key"))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm_regions(prefix) == [] and not list((tmp_path / "p").glob("*.admin-key"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_dead_engine_stub_fails_its_streams_and_serve_says_error(tiny_ckpt, tmp_path):
    proc, server_pid, url = serve(tmp_path / "p", tiny_ckpt)
    try:
        stub = next(p for p, n in python_stubs(server_pid).items() if n.startswith("tensorrt_llm_0"))
        streams = Streams(url)
        streams.wait_tokens()
        streams.mark = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        streams.join(20)
        assert all(e is not None and e[1] is not None and e[0] < 15 for e in streams.ended), streams.ended
        assert proc.wait(20) == 2
        err = proc.stderr.read().strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: the python stub of model instance tensorrt_llm_0_0 "
                                                   f"(pid {stub}) died; the server is stopped"), err
        assert "Traceback" not in proc.stderr.read() and gone(server_pid, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


OWNER = """
import subprocess, sys, time
from pathlib import Path
from grok_deploy.serving.guard import start_watchdog, stop_watchdog
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('up', flush=True); time.sleep(600)"], start_new_session=True, stdout=subprocess.PIPE)
child.stdout.readline()
dog = start_watchdog(child.pid, sys.argv[1], Path(sys.argv[2]))
print(child.pid, dog.pid, flush=True)
if sys.argv[3] == "stop":
    stop_watchdog(dog)
    print("stopped", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("owner_ends", ["killed", "stops"])
def test_the_watchdog_kills_the_group_only_when_its_owner_dies(tmp_path, owner_ends):
    from grok_deploy.serving.guard import KILL_GRACE_S

    prefix = f"grokdeploy{os.getpid()}test_"
    region, key = Path("/dev/shm") / f"{prefix}region", tmp_path / "server.admin-key"
    region.write_bytes(b"x")
    key.write_text("k")
    how = "kill" if owner_ends == "killed" else "stop"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, prefix, str(key), how], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        child, dog = map(int, owner.stdout.readline().split())
        if owner_ends == "killed":
            t0 = time.monotonic()
            os.kill(owner.pid, signal.SIGKILL)
            assert gone(child, KILL_GRACE_S + 5)
            took = time.monotonic() - t0
            assert KILL_GRACE_S - 0.5 < took < KILL_GRACE_S + 5  # SIGTERM ignored: SIGKILL after the grace
            assert not region.exists() and not key.exists()
        else:
            assert owner.stdout.readline().strip() == "stopped"
            assert gone(dog, 5)  # the watchdog left ...
            os.kill(owner.pid, signal.SIGKILL)
            time.sleep(1.0)
            os.killpg(child, 0)  # ... and the group it guarded is untouched
            assert region.exists() and key.exists()
    finally:
        region.unlink(missing_ok=True)
        owner.kill()
        owner.wait()
        try:
            os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass


LOADING_OWNER = """
import sys, time
from grok_deploy.pipeline.schema import load_pipeline
from grok_deploy.serving.deploy import TritonServer
cfg = load_pipeline(sys.argv[1])
server = TritonServer(cfg, sys.argv[2], grpc_port=0, http_port=0, metrics_port=0)
server.start()  # no wait: the models are loading
print(server.pid, flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_owner_while_the_models_load_leaves_nothing(tiny_ckpt, tmp_path):
    """As `run` killed during the deploy stage's start-up: tritonserver and every stub it has
    started so far are gone within 10 s."""
    cfg, repo = make_repo(tmp_path / "p", tiny_ckpt)
    owner = subprocess.Popen([sys.executable, "-c", LOADING_OWNER, str(tmp_path / "p" / "pipeline.yaml"), str(repo)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    server_pid = int(owner.stdout.readline())
    try:
        deadline = time.monotonic() + 60  # kill once the first python stubs are up (loading)
        while not python_stubs(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        stubs = python_stubs(server_pid)
        assert stubs
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        assert gone(server_pid, 10) and not [p for p in stubs if Path(f"/proc/{p}").exists()]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
