"""Fixtures and helpers for tests that run the real Triton server (import them into a test module).

`served` (session): the tiny checkpoint packaged with the torch engine (the reference model behind
the python `tensorrt_llm`, exact) and a running server on free 127.0.0.1 ports. The server is
stopped by the fixture finalizer; TritonServer also registers an atexit hook and the children
get the parent-death signal, so no server outlives the test process even when a test fails.
"""
from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_PROMPT

SERVER_TIMEOUT_S = 120
PROMPTS = [TEST_PROMPT, "Hello", "Grok-1 is a mixture of 8 experts.", "Naïve café résumé 🙂",
           "1 2 3 4 5 6 7 8 9 10", "Once upon a time", "The cat sat on the mat", "Write a short story"]
PIPELINE = """\
engine:
  max_batch_size: 8
  max_input_len: 64
  max_seq_len: 160
verify:
  max_tokens: 8
  check_shards: false
"""


def write_pipeline(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(PIPELINE + extra)
    return folder / "pipeline.yaml"


def make_repo(folder: Path, ckpt: Path, engine_kind: str = "torch", engine_dir=None, extra: str = ""):
    """(cfg, repo) for the tiny checkpoint under `folder`."""
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving.package import package

    cfg = load_pipeline(write_pipeline(folder, extra))
    repo = folder / "triton_repo"
    package(cfg, repo, tokenizer=ckpt / "tokenizer.model", engine_dir=engine_dir or ckpt, engine_kind=engine_kind)
    return cfg, repo


def start_server(cfg, repo):
    from grok_deploy.serving.deploy import TritonServer

    server = TritonServer(cfg, repo, grpc_port=0, http_port=0, metrics_port=0,
                          startup_timeout_s=SERVER_TIMEOUT_S)
    return server.__enter__()


def decode_steps(server) -> dict[int, float]:
    """{batch size: decode steps} from the engine model's counter on Triton's metrics port."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^grok_decode_steps_total\{([^}]*)\} (\S+)$', text, re.M):
        size = int(re.search(r'batch_size="(\d+)"', m.group(1)).group(1))
        out[size] = out.get(size, 0.0) + float(m.group(2))
    return out


@pytest.fixture(scope="session")
def served(tiny_ckpt, tmp_path_factory):
    """A running server (torch engine) for the tiny checkpoint: yields the TritonServer."""
    cfg, repo = make_repo(tmp_path_factory.mktemp("served"), tiny_ckpt)
    server = start_server(cfg, repo)
    yield server
    server.stop()


def run_sequences(engine, params: list, sinks: list, join_after: int = 0):
    """Submit one inflight Seq per (params, sink) to a Scheduler over `engine` (the later ones once
    the first sink has `join_after` chunks) and wait up to 60 s for every sink's final; returns the
    closed scheduler."""
    from grok_deploy.serving.triton_models.inflight import Scheduler, Seq

    sched = Scheduler(engine).start()
    try:
        for i, (p, s) in enumerate(zip(params, sinks)):
            while join_after and i and len(sinks[0].chunks) < join_after:
                time.sleep(0.001)
            sched.submit(Seq(p, s, request_id=f"r{i}"))
        deadline = time.monotonic() + 60
        while any(s.finals == 0 for s in sinks) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.close()
    return sched


def ref(model, ids, n, **kw):
    """The reference model's output ids for one prompt (generate's sampling when kw asks)."""
    from grok_deploy.model.generate import generate

    return generate(model, [ids], n, **kw).output_ids[0]


def gone(pgid: int, timeout: float = 10.0) -> bool:
    """True once no process of group `pgid` is left (killed ones take a moment to be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
