"""gRPC clients of the served model: `query` (text, ensemble), `query_ids` (token ids, straight to
tensorrt_llm) and the streaming benchmark. triton-serving.md §10-11.

The models are decoupled, so every request goes over the gRPC stream (start_stream /
async_stream_infer), streaming or not, with enable_empty_final_response=True so the flags-only
FINAL arrives and ends the wait.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from grok_deploy.errors import UserError

# ensemble inputs the client may set: name -> numpy dtype
ENSEMBLE_INPUTS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "seed": np.uint64,
                   "end_id": np.int32, "pad_id": np.int32, "min_tokens": np.int32,
                   "exclude_input_in_output": np.bool_, "return_log_probs": np.bool_}
LLM_INPUTS = {"temperature": np.float32, "runtime_top_k": np.int32, "runtime_top_p": np.float32,
              "seed": np.uint64, "end_id": np.int32, "pad_id": np.int32, "min_tokens": np.int32,
              "return_log_probs": np.bool_, "return_generation_logits": np.bool_}


class ServerError(Exception):
    """An error response (or a broken stream); `status` is Triton's code, e.g. StatusCode.INVALID_ARGUMENT."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


def tensor(name: str, value, dtype):
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    arr = np.asarray(value, dtype=dtype)
    arr = arr.reshape(1, -1) if arr.ndim < 2 else arr  # leading batch dim (max_batch_size > 0)
    t = InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def stream_request(url: str, model: str, inputs: list, timeout: float = 120.0) -> Iterator:
    """Send one request over a fresh gRPC stream; yield each data response (InferResult) as it
    arrives, until the final one. Raises ServerError on an error response or a timeout."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    results: queue.Queue = queue.Queue()
    try:
        client = grpcclient.InferenceServerClient(url=url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
    except InferenceServerException as e:
        raise ServerError(f"cannot reach the server at {url}: {e.message()}") from None
    finished = False
    try:
        client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        while not finished:
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise ServerError(f"no response from {model} at {url} within {timeout:.0f} s") from None
            if error is not None:
                finished = True  # an error response is final
                raise ServerError(error.message(), error.status())
            params = result.get_response().parameters
            finished = "triton_final_response" in params and params["triton_final_response"].bool_param
            if result.get_response().outputs:
                yield result
    finally:
        client.stop_stream(cancel_requests=not finished)  # cancel only what is still running
        client.close()


def utf8(text: str, what: str = "prompt") -> bytes:
    """`text` as UTF-8; UserError naming the character when it cannot be (a lone surrogate, e.g.
    from a command-line argument that is not UTF-8)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what}: not valid Unicode text: {text[e.start]!r} at character {e.start} "
                        f"({e.reason}); pass UTF-8 text") from None


def query(url: str, text: str, max_tokens: int = 32, stream: bool = False, model: str = "ensemble",
          on_text: Callable[[str], None] | None = None, timeout: float = 120.0, **sampling) -> dict:
    """One prompt to the ensemble (or tensorrt_llm_bls: same I/O). Returns {"text": str}: the
    generated text (exclude_input_in_output defaults to true). With stream, `on_text` gets each
    delta as it arrives. sampling: temperature, top_k, top_p, seed, end_id, ... (ENSEMBLE_INPUTS)."""
    unknown = set(sampling) - set(ENSEMBLE_INPUTS)
    if unknown:
        raise TypeError(f"unknown ensemble inputs {sorted(unknown)}; known: {sorted(ENSEMBLE_INPUTS)}")
    sampling.setdefault("exclude_input_in_output", True)
    inputs = [tensor("text_input", [[utf8(text)]], object), tensor("max_tokens", [[max_tokens]], np.int32),
              tensor("stream", [[stream]], np.bool_)]
    inputs += [tensor(k, [[v]], ENSEMBLE_INPUTS[k]) for k, v in sampling.items() if v is not None]
    parts = []
    for result in stream_request(url, model, inputs, timeout):
        out = result.as_numpy("text_output")
        if out is not None:
            piece = out.reshape(-1)[0].decode("utf-8", errors="replace")
            parts.append(piece)
            if on_text:
                on_text(piece)
    return {"text": "".join(parts), "responses": len(parts)}


def query_ids(url: str, prompt_ids: list[int], max_tokens: int, stream: bool = False, model: str = "tensorrt_llm",
              timeout: float = 120.0, **sampling) -> dict:
    """Token ids straight to tensorrt_llm: {"output_ids": generated ids, "responses": n, and
    "generation_logits" (T, V) when asked}. Without end_id the engine does not stop on EOS."""
    unknown = set(sampling) - set(LLM_INPUTS)
    if unknown:
        raise TypeError(f"unknown tensorrt_llm inputs {sorted(unknown)}; known: {sorted(LLM_INPUTS)}")
    inputs = [tensor("input_ids", [prompt_ids], np.int32), tensor("input_lengths", [[len(prompt_ids)]], np.int32),
              tensor("request_output_len", [[max_tokens]], np.int32), tensor("streaming", [[stream]], np.bool_),
              tensor("exclude_input_in_output", [[True]], np.bool_)]
    inputs += [tensor(k, [[v]], LLM_INPUTS[k]) for k, v in sampling.items() if v is not None]
    ids, logits, n = [], [], 0
    for result in stream_request(url, model, inputs, timeout):
        out, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
        ids += out[0, 0, :int(lengths.reshape(-1)[0])].tolist()
        n += 1
        if result.as_numpy("generation_logits") is not None:
            logits.append(result.as_numpy("generation_logits")[0, 0])
    doc = {"output_ids": ids, "responses": n}
    if logits:
        doc["generation_logits"] = np.concatenate(logits)
    return doc


def server_errors(fn):
    def wrapped(*a, **k):
        try:
            return fn(*a, **k)
        except ServerError as e:
            raise UserError(f"server: {e}") from None
    return wrapped


@server_errors
def cli_query(args) -> int:
    model = getattr(args, "model", None) or "ensemble"
    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    echo = None if args.json or not args.stream else (lambda t: print(t, end="", flush=True))
    doc = query(args.url, args.text, args.max_tokens, stream=args.stream, model=model, on_text=echo)
    if args.json:
        print(json.dumps({"text": doc["text"]}, ensure_ascii=False))
    else:
        print("" if args.stream else doc["text"])
    return 0


# --- benchmark ------------------------------------------------------------------------------

def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}


def _one_stream(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    inputs = [tensor("text_input", [[prompt.encode("utf-8")]], object), tensor("max_tokens", [[max_tokens]], np.int32),
              tensor("stream", [[True]], np.bool_), tensor("exclude_input_in_output", [[True]], np.bool_),
              tensor("end_id", [[-1]], np.int32)]  # no stop on EOS: every request makes max_tokens tokens
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in stream_request(url, model, inputs, timeout)]
    end = time.perf_counter()
    return {"ttft": times[0] - t0 if times else None, "itl": list(np.diff(times)), "tokens": len(times),
            "latency": end - t0}


def bench_concurrency(url: str, concurrency: int, prompts: list[str], max_tokens: int, requests: int,
                      model: str = "ensemble", timeout: float = 300.0) -> dict:
    """`concurrency` clients, each with its own stream, send `requests` streaming requests in turn.
    TTFT: send -> first response; ITL: between responses (one token each); tokens/s per request
    and for the whole run."""
    runs, errors = [], []

    def worker(w: int) -> None:
        for r in range(requests):
            try:
                runs.append(_one_stream(url, model, prompts[(w * requests + r) % len(prompts)], max_tokens, timeout))
            except ServerError as e:
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise ServerError(f"{len(errors)} of {concurrency * requests} requests failed: {errors[0]}")
    tokens = sum(r["tokens"] for r in runs)
    per_request = [r["tokens"] / r["latency"] for r in runs if r["latency"] > 0]
    return {"concurrency": concurrency, "requests": len(runs), "output_tokens": tokens, "seconds": round(seconds, 3),
            "ttft_ms": _pct([r["ttft"] * 1e3 for r in runs if r["ttft"] is not None]),
            "itl_ms": _pct([x * 1e3 for r in runs for x in r["itl"]]),
            "request_latency_ms": _pct([r["latency"] * 1e3 for r in runs]),
            "tokens_per_s": {**_pct(per_request), "total": round(tokens / seconds, 3)}}


def bench(cfg, url: str | None = None, out=None, concurrency=(1, 4, 8), max_tokens: int = 32,
          requests: int = 2, model: str = "ensemble") -> dict:
    """Streaming load at each concurrency; starts the pipeline's server when no `url` is given.
    Writes `out/bench.json` when `out` is given; returns the same document."""
    from contextlib import nullcontext

    from grok_deploy.serving.deploy import TritonServer

    server = TritonServer(cfg) if url is None else nullcontext()
    with server as s:
        url = url or s.grpc_url
        prompts = list(cfg.verify.prompts)
        results = [bench_concurrency(url, c, prompts, max_tokens, requests, model) for c in concurrency]
    doc = {"url": url, "model": model, "max_tokens": max_tokens, "requests_per_client": requests, "results": results}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text(json.dumps(doc, indent=1))
    return doc
