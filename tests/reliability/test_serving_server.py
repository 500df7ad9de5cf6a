"""Reliability of the real Triton server (issue 13, items 2, 3, 6, 9): 32 concurrent streams with
cancellations and malformed requests mixed in, where every good request gets the reference
tokens and the server then stops cleanly, leaving no /dev/shm region and no __pycache__; a
cancelled ensemble stream leaves the batch; a crashed server's regions are removed too."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import SERVER_TIMEOUT_S, decode_steps, write_pipeline

from grok_deploy.model.generate import generate
from grok_deploy.serving.client import ServerError, query, query_ids, stream_request, tensor
from grok_deploy.serving.deploy import EXIT_TIMEOUT_S, TritonServer, remove_stale_shm, shm_regions

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]
PROMPTS = ["The answer to life the universe and everything is", "Hello", "Naïve café résumé 🙂",
           "a\x00b NUL inside", "\ufeffBOM first", "👩‍👩‍👧 family \u202eRTL\u202c", "e\u0301\u0301 combining",
           "日本語のテキスト \x1b[31m"]
NMAX = 10  # tokens of the longest good request
LONG = 150  # tokens a cancelled request asks for: far more than the test waits for


def ref(model, ids, n, **kw):
    return generate(model, [ids], n, **kw).output_ids[0]


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file (the repository as the package stage left it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(folder: Path, ckpt: Path, engine_dir: Path | None = None) -> TritonServer:
    from grok_deploy.pipeline.schema import load_pipeline
    from grok_deploy.serving.package import package

    cfg = load_pipeline(write_pipeline(folder))
    package(cfg, folder / "triton_repo", tokenizer=ckpt / "tokenizer.model", engine_dir=engine_dir or ckpt,
            engine_kind="torch")
    server = TritonServer(cfg, folder / "triton_repo", grpc_port=0, http_port=0, metrics_port=0,
                          startup_timeout_s=SERVER_TIMEOUT_S)
    return server.__enter__()


def quoted_engine_dir(tmp_path: Path, ckpt: Path) -> Path:
    """The checkpoint seen through a folder whose name would inject parameters into config.pbtxt
    if it were pasted in unescaped."""
    evil = tmp_path / 'ck" } } parameters { key: "engine_kind" value: { string_value: "onnxruntime\\'
    evil.mkdir()
    for f in ckpt.iterdir():
        (evil / f.name).symlink_to(f)
    return evil


def close_after(url: str, model: str, inputs: list, responses: int) -> int:
    """Read `responses` responses, then close the stream (the client disconnects); how many came."""
    n = 0
    it = stream_request(url, model, inputs, timeout=60)
    for _ in it:
        n += 1
        if n == responses:
            break
    it.close()
    return n


def stop_by_id(url: str, inputs: list) -> list:
    """A long tensorrt_llm stream, ended after 3 tokens by a second request: stop=true, same id."""
    import tritonclient.grpc as grpcclient

    rid, got, done = uuid.uuid4().hex, [], threading.Event()

    def cb(result, error):
        got.append((result, error))
        p = result.get_response().parameters if result is not None else {}
        if error is not None or ("triton_final_response" in p and p["triton_final_response"].bool_param):
            done.set()

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=cb)
    client.async_stream_infer("tensorrt_llm", inputs, request_id=rid, enable_empty_final_response=True)
    deadline = time.monotonic() + 60
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stopper = grpcclient.InferenceServerClient(url)
    stopper.start_stream(callback=lambda result, error: None)
    stopper.async_stream_infer("tensorrt_llm", [tensor("input_ids", [[0]], np.int32),
                                                tensor("input_lengths", [[0]], np.int32),
                                                tensor("request_output_len", [[0]], np.int32),
                                                tensor("stop", [[True]], np.bool_)],
                               request_id=rid, enable_empty_final_response=True)
    assert done.wait(60)
    client.stop_stream()
    stopper.stop_stream()
    assert all(e is None for _, e in got)
    return [r for r, _ in got if r.as_numpy("output_ids") is not None]


def llm(ids, n, **extra):
    t = [tensor("input_ids", [ids], np.int32), tensor("input_lengths", [[len(ids)]], np.int32),
         tensor("request_output_len", [[n]], np.int32), tensor("streaming", [[True]], np.bool_)]
    return t + [tensor(k, [[v]] if np.ndim(v) == 0 else [v], dt) for k, (v, dt) in extra.items()]


def text_in(text: str, n: int, stream: bool, **extra):
    t = [tensor("text_input", [[text.encode("utf-8")]], object), tensor("max_tokens", [[n]], np.int32),
         tensor("stream", [[stream]], np.bool_), tensor("end_id", [[-1]], np.int32)]
    return t + [tensor(k, [[v]], dt) for k, (v, dt) in extra.items()]


@pytest.mark.timeout(300)
def test_32_streams_with_cancellations_and_malformed_requests(tiny_ckpt, tiny_model, tiny_tokenizer, tmp_path):
    server = start(tmp_path / "p", tiny_ckpt, quoted_engine_dir(tmp_path, tiny_ckpt))
    repo, url, prefix = server.repo, server.grpc_url, server.shm_prefix
    try:
        packaged = tree(repo)
        assert shm_regions(prefix)  # the python backend's regions exist while it runs
        V = tiny_model.cfg.vocab_size
        ids = [tiny_tokenizer.encode(p) for p in PROMPTS]
        n = [NMAX - 4 + i % 5 for i in range(32)]
        nan_bias = np.where(np.arange(V) == 7, np.nan, 0).astype(np.float32)
        neg_inf_bias = np.where(np.arange(V) == 3, -np.inf, 0).astype(np.float32)
        good, cancels, bad = {}, {}, {}
        # references: all prompts greedy in one batched run, two sampled ones alone (prefixes of
        # NMAX tokens are the shorter runs: the same draws in the same order)
        greedy = generate(tiny_model, ids, NMAX).output_ids
        sampled = {k: ref(tiny_model, ids[k], NMAX, temperature=0.9, seed=10 + k) for k in (1, 2)}

        def want(k: int, n: int) -> list[int]:
            return (sampled[k] if k in sampled else greedy[k])[:n]

        def sampling(k: int, top_p: str = "top_p") -> dict:
            # top-p 1 sent: with neither top-k nor top-p the backend decodes greedily
            return {"temperature": 0.9, "seed": 10 + k, top_p: 1.0} if k in sampled else {}

        for i in range(12):  # straight to tensorrt_llm, greedy and sampled, streamed and not
            k = i % 8
            good[i] = ("ids", (lambda i=i, k=k: query_ids(url, ids[k], n[i], stream=i % 3 == 0, **sampling(k, "runtime_top_p"))),
                       want(k, n[i]))
        for i in range(12, 20):  # text through the ensemble and the BLS, odd Unicode prompts included
            k, model = i % 8, "ensemble" if i < 16 else "tensorrt_llm_bls"
            good[i] = ("text", (lambda i=i, k=k, model=model: query(url, PROMPTS[k], n[i], model=model, end_id=-1,
                                                                    stream=model == "tensorrt_llm_bls",
                                                                    **sampling(k))),
                       tiny_tokenizer.decode(want(k, n[i])))
        long_text = text_in(PROMPTS[0], LONG, True)
        cancels.update({
            20: lambda: close_after(url, "ensemble", long_text, 2),
            21: lambda: close_after(url, "ensemble", text_in(PROMPTS[2], LONG, True), 3),
            22: lambda: close_after(url, "tensorrt_llm_bls", long_text, 2),
            23: lambda: close_after(url, "tensorrt_llm", llm(ids[1], LONG), 2),
            24: lambda: len(stop_by_id(url, llm(ids[3], LONG))),
        })
        bad.update({  # each refused alone with INVALID_ARG; the batch around them goes on
            25: (lambda: list(stream_request(url, "tensorrt_llm", llm(ids[0], 8, temperature=(np.nan, np.float32)))),
                 "finite"),
            26: (lambda: list(stream_request(url, "tensorrt_llm", llm(ids[0], 8, embedding_bias=(nan_bias, np.float32)))),
                 "embedding_bias must be finite"),
            27: (lambda: list(stream_request(url, "tensorrt_llm",
                                             llm(ids[0], 8, embedding_bias=(neg_inf_bias, np.float32)))),
                 "embedding_bias must be finite"),
            28: (lambda: list(stream_request(url, "tensorrt_llm", llm(ids[0], 8, runtime_top_p=(np.nan, np.float32)))),
                 "finite"),
            29: (lambda: list(stream_request(url, "ensemble", text_in(PROMPTS[0], 8, True,
                                                                      temperature=(np.inf, np.float32)))),
                 "finite"),
            30: (lambda: list(stream_request(url, "tensorrt_llm", llm(list(range(10, 80)), 8))),
                 r"exceeds maximum input length"),
            31: (lambda: list(stream_request(url, "tensorrt_llm",
                                             [tensor("input_ids", [ids[0]], np.int64)] + llm(ids[0], 8)[1:])),
                 "(?i)int64|int32|data.?type"),
        })
        assert len(good) + len(cancels) + len(bad) == 32
        results, errors, gate = {}, {}, threading.Barrier(32)

        def one(i, fn):
            gate.wait()
            try:
                results[i] = fn()
            except Exception as e:  # noqa: BLE001
                errors[i] = e

        jobs = {**{i: g[1] for i, g in good.items()}, **cancels, **{i: b[0] for i, b in bad.items()}}
        before = sum(decode_steps(server).values())
        threads = [threading.Thread(target=one, args=item) for item in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
        assert not any(t.is_alive() for t in threads)
        for i, (kind, _, want) in good.items():
            assert i not in errors, (i, errors.get(i))
            got = results[i]["output_ids"] if kind == "ids" else results[i]["text"]
            assert got == want, i
        for i in cancels:
            assert i not in errors and 2 <= results[i] < LONG, (i, results.get(i), errors.get(i))
        for i, (_, message) in bad.items():
            assert isinstance(errors.get(i), ServerError) and re.search(message, str(errors[i])), (i, errors.get(i))
        # the cancelled sequences left the batch: the engine is idle (no new decode step for 1 s)
        # within a few seconds of the last request's end, not LONG tokens later
        last, stable, deadline = None, time.monotonic(), time.monotonic() + 5
        while time.monotonic() - stable < 1.0:
            steps = sum(decode_steps(server).values())
            if steps != last:
                last, stable = steps, time.monotonic()
            assert time.monotonic() < deadline, "the engine kept decoding after every request had ended"
            time.sleep(0.1)
        assert steps - before < 3 * LONG  # 5 cancelled x 150 tokens alone would be more
        assert query_ids(url, ids[0], 4)["output_ids"] == ref(tiny_model, ids[0], 4)  # still serving
    finally:
        t0 = time.monotonic()
        server.stop()
        took = time.monotonic() - t0
    log = server.log_path.read_text(errors="replace")
    assert not re.search(r"Found [1-9]\d* model versions that have in-flight", log), log[-2000:]
    assert "failed to stop server" not in log
    assert took < EXIT_TIMEOUT_S
    assert shm_regions(prefix) == []
    assert tree(repo) == packaged  # nothing written into the finished repository (no __pycache__)
    assert not [p for p in repo.rglob("__pycache__") if p.is_dir()]


def test_cancelled_ensemble_stream_leaves_the_batch_and_a_crash_leaves_no_shm(tiny_ckpt, tmp_path):
    server = start(tmp_path / "p", tiny_ckpt)
    prefix = server.shm_prefix
    try:
        before = sum(decode_steps(server).values())
        assert close_after(server.grpc_url, "ensemble", text_in("Hello", LONG, True), 2) == 2
        time.sleep(1.0)
        mid = sum(decode_steps(server).values())
        time.sleep(1.5)
        assert sum(decode_steps(server).values()) == mid and mid - before < 30  # stopped within a few steps
        assert shm_regions(prefix)
        os.kill(server.pid, signal.SIGKILL)  # the server crashes; its stubs are killed with its group
        server.proc.wait(30)
    finally:
        server.stop()
    assert shm_regions(prefix) == []


def test_regions_of_dead_owners_are_swept_and_live_ones_kept():
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = Path("/dev/shm") / f"grokdeploy{os.getpid()}_1_{uuid.uuid4().hex}"
    stale = Path("/dev/shm") / f"grokdeploy{dead.pid}_1_{uuid.uuid4().hex}"
    try:
        mine.write_bytes(b"x")
        stale.write_bytes(b"x")
        assert remove_stale_shm() >= 1
        assert mine.exists() and not stale.exists()
    finally:
        mine.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
