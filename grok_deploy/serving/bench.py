"""The serving benchmark behind `grok-deploy bench`: streaming load over gRPC at a sweep of
concurrency levels, with figures defined as genai-perf defines them (triton-serving.md §11).

Each level sends `requests` measured requests (after `warmup` unmeasured ones) from `concurrency`
clients over one gRPC stream kept open for the level (`Session`, as perf_analyzer does). Prompts are synthetic with an exact token count
(`synthetic_prompts`), and every request generates exactly `output_tokens` tokens: end_id -1
(ignore-EOS) and min_tokens = max_tokens. Output tokens are counted from what the server streams
back, not by re-tokenizing text: `tensorrt_llm` sends token ids; the ensemble and the BLS send
`num_output_tokens` (asked with return_num_output_tokens, TensorRT-LLM 1.x): the tokens each
response carries, which is not one per response on the BLS (it holds back a response that ends
inside a UTF-8 character). A request with any other total is an error. genai-perf instead
re-tokenizes the decoded chunks with its own tokenizer, which overstates output lengths on this
model (see docs/serving.md).

Per level: TTFT (send -> first response), inter-token latency per request ((last - first
response) / (tokens - 1), genai-perf's formula), request latency (send -> final), each as
p50/p90/p99/mean in ms; output tokens/s (all tokens / wall time of the level) and requests/s.
"""
from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from grok_deploy.errors import UserError
from grok_deploy.serving.client import ServerError, tensor

MODELS = ("ensemble", "tensorrt_llm_bls", "tensorrt_llm")
REPORT_FILES = ("bench.json", "bench.md", "bench.png")
MAX_REQUESTS = 10_000     # per level (measured or warm-up): each keeps its prompt and timings in memory
MAX_CONCURRENCY = 1024    # client threads of one level


def single_token_words(tok) -> list[str]:
    """Words that the SentencePiece model encodes, after a space, as exactly one piece: any
    sequence of them separated by spaces encodes to one id per word (pieces never cross spaces)."""
    words = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if piece.startswith("\u2581") and len(piece) > 1 and piece[1:].isalpha():
            if tok.encode(" " + piece[1:]) == [i] and tok.encode(piece[1:]) == [i]:
                words.append(piece[1:])
    return words


def synthetic_prompts(tok, n_tokens: int, count: int, seed: int = 0) -> list[str]:
    """`count` different prompts of exactly `n_tokens` tokens each (checked by encoding them)."""
    words = single_token_words(tok)
    if len(words) < 8:
        raise UserError(f"the tokenizer has only {len(words)} single-piece words; cannot build synthetic prompts")
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(n_tokens))
        got = len(tok.encode(text))
        if got != n_tokens:
            raise UserError(f"synthetic prompt has {got} tokens, not {n_tokens}")  # a tokenizer we do not expect
        prompts.append(text)
    return prompts


def _inputs(model: str, prompt, max_tokens: int) -> list:
    # end_id -1: never stop on EOS; min_tokens: the backend's way to say the same
    common = [tensor("exclude_input_in_output", [[True]], np.bool_), tensor("end_id", [[-1]], np.int32),
              tensor("min_tokens", [[max_tokens]], np.int32)]
    if model == "tensorrt_llm":
        return [tensor("input_ids", [prompt], np.int32), tensor("input_lengths", [[len(prompt)]], np.int32),
                tensor("request_output_len", [[max_tokens]], np.int32), tensor("streaming", [[True]], np.bool_),
                *common]
    return [tensor("text_input", [[prompt.encode("utf-8")]], object), tensor("max_tokens", [[max_tokens]], np.int32),
            tensor("stream", [[True]], np.bool_), tensor("return_num_output_tokens", [[True]], np.bool_), *common]


class Session:
    """One gRPC stream shared by all clients of a level, as perf_analyzer shares its streams:
    connecting is no request's time, and one callback thread (not one per client) reads and
    time-stamps every response on arrival, then routes it by request id to its client."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.url, self.lock, self.waiting = url, threading.Lock(), {}
        self.client = grpcclient.InferenceServerClient(url=url)
        self.client.start_stream(callback=self._arrived)

    def _arrived(self, result, error) -> None:
        now = time.perf_counter()
        with self.lock:
            if error is not None:  # no request id on a stream error: every waiting request fails
                for q in self.waiting.values():
                    q.put((now, None, error))
                return
            q = self.waiting.get(result.get_response().id)
        if q is not None:
            q.put((now, result, None))

    def request(self, model: str, inputs: list, timeout: float):
        """Yield (arrival time, result) for each data response of one request until its final one;
        ServerError on an error."""
        from tritonclient.utils import InferenceServerException

        rid, q = uuid.uuid4().hex, queue.Queue()
        with self.lock:
            self.waiting[rid] = q
        try:
            try:
                self.client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=True)
            except InferenceServerException as e:  # the stream broke (no server): its callback has why
                try:
                    e = q.get(timeout=5)[2] or e
                except queue.Empty:
                    pass
                raise ServerError(f"cannot reach the server at {self.url}: {e.message()}") from None
            while True:
                try:
                    now, result, error = q.get(timeout=timeout)
                except queue.Empty:
                    raise ServerError(f"no response from {model} at {self.url} within {timeout:.0f} s") from None
                if error is not None:
                    where = f"cannot reach the server at {self.url}: " if "UNAVAILABLE" in str(error.status()) else ""
                    raise ServerError(where + error.message(), error.status())
                if result.get_response().outputs:
                    yield now, result
                p = result.get_response().parameters
                if "triton_final_response" in p and p["triton_final_response"].bool_param:
                    return
        finally:
            with self.lock:
                self.waiting.pop(rid, None)

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def one_request(session: Session, model: str, prompt, max_tokens: int, timeout: float = 300.0) -> dict:
    """One streaming request: {"ttft", "latency" (s), "times" (s after send, per response), "tokens"}."""
    inputs = _inputs(model, prompt, max_tokens)
    t0 = time.perf_counter()
    times, tokens = [], 0
    for now, result in session.request(model, inputs, timeout):
        times.append(now - t0)
        counted = result.as_numpy("sequence_length" if model == "tensorrt_llm" else "num_output_tokens")
        if counted is None:
            raise ServerError(f"{model} sent no num_output_tokens; its model repository predates TensorRT-LLM "
                              "1.x's contract: package it again")
        tokens += int(counted.reshape(-1)[0])
    if tokens != max_tokens:
        raise ServerError(f"{model} streamed {tokens} tokens for max_tokens {max_tokens}")
    end = t0 + times[-1] if times else time.perf_counter()
    return {"ttft": times[0] if times else None, "latency": end - t0, "times": times, "tokens": tokens, "end": end}


def stats(values: list[float]) -> dict:
    """p50/p90/p99/mean of `values` (ms), or Nones."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = np.asarray(values, np.float64)
    return {**{f"p{q}": round(float(np.percentile(v, q)), 3) for q in (50, 90, 99)}, "mean": round(float(v.mean()), 3)}


def run_level(url: str, model: str, prompts: list, concurrency: int, requests: int, warmup: int,
              max_tokens: int, timeout: float = 300.0) -> dict:
    """`warmup` unmeasured requests, then `requests` measured ones from `concurrency` clients."""
    def drain(count: int, keep: list, errors: list) -> float:
        lock, taken = threading.Lock(), [0]

        def worker() -> None:
            while True:
                with lock:
                    if taken[0] >= count or errors:
                        return
                    i = taken[0]
                    taken[0] += 1
                try:
                    keep.append(one_request(session, model, prompts[i % len(prompts)], max_tokens, timeout))
                except ServerError as e:
                    errors.append(str(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, count))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the level ends with its last response, not when the streams have been closed
        return max((r["end"] for r in keep), default=time.perf_counter()) - t0

    errors: list[str] = []
    try:
        session = Session(url)
    except Exception as e:  # noqa: BLE001 - tritonclient raises its own types here
        raise ServerError(f"cannot reach the server at {url}: {e}") from None
    try:
        drain(warmup, [], errors)
        runs: list[dict] = []
        seconds = drain(requests, runs, errors) if not errors else 0.0
    finally:
        session.close()
    if errors:
        raise ServerError(f"{len(errors)} request(s) failed at concurrency {concurrency}: {errors[0]}")
    tokens = sum(r["tokens"] for r in runs)
    itl = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) * 1e3 for r in runs if r["tokens"] > 1]
    return {"concurrency": concurrency, "requests": len(runs), "output_tokens": tokens, "seconds": round(seconds, 3),
            "ttft_ms": stats([r["ttft"] * 1e3 for r in runs]), "itl_ms": stats(itl),
            "request_latency_ms": stats([r["latency"] * 1e3 for r in runs]),
            "output_tokens_per_s": round(tokens / seconds, 3), "requests_per_s": round(len(runs) / seconds, 3),
            "raw": {"ttft_ms": [round(r["ttft"] * 1e3, 3) for r in runs], "itl_ms": [round(x, 3) for x in itl],
                    "request_latency_ms": [round(r["latency"] * 1e3, 3) for r in runs]}}


def bench(cfg, url: str | None = None, out=None, concurrency=(1, 4, 8), requests: int = 16, warmup: int = 2,
          input_tokens: int = 64, output_tokens: int = 32, model: str = "ensemble", tokenizer=None,
          echo=None) -> dict:
    """The sweep; starts the pipeline's server when no `url` is given. Writes bench.json/.md/.png
    into `out` when given; returns the document. `tokenizer`: a tokenizer.model path (default:
    the source stage's)."""
    from contextlib import nullcontext

    from grok_deploy.model.tokenizer import load_tokenizer
    from grok_deploy.serving.deploy import TritonServer

    if model not in MODELS:
        raise UserError(f"--model {model!r}: use one of {', '.join(MODELS)}")
    for name, v in (("requests", requests), ("input tokens", input_tokens), ("output tokens", output_tokens)):
        if v <= 0:
            raise UserError(f"bench: {name} must be positive, got {v}")
    if warmup < 0:
        raise UserError(f"bench: warm-up requests must be >= 0, got {warmup}")
    for flag, v in (("--requests", requests), ("--warmup", warmup)):
        if v > MAX_REQUESTS:  # 1e8 requests made 1e8 prompts before the first was sent
            raise UserError(f"bench: {flag} {v} is more than the {MAX_REQUESTS} one level may send (each request's "
                            "prompt and timings are kept); run bench several times for more")
    if max(concurrency, default=1) > MAX_CONCURRENCY:
        raise UserError(f"bench: concurrency {max(concurrency)} is more than {MAX_CONCURRENCY} client threads; "
                        "use fewer")
    if input_tokens > cfg.engine.max_input_len or input_tokens + output_tokens > cfg.engine.max_seq_len:
        raise UserError(f"bench: {input_tokens} input + {output_tokens} output tokens do not fit the engine "
                        f"(max_input_len {cfg.engine.max_input_len}, max_seq_len {cfg.engine.max_seq_len})")
    tok = load_tokenizer(tokenizer or _source_tokenizer(cfg))
    texts = synthetic_prompts(tok, input_tokens, max(requests, warmup, 1))
    prompts = [tok.encode(t) for t in texts] if model == "tensorrt_llm" else texts
    server = TritonServer(cfg) if url is None else nullcontext()
    results = []
    with server as s:
        url = url or s.grpc_url
        for c in concurrency:
            results.append(run_level(url, model, prompts, c, requests, warmup, output_tokens))
            if echo:
                echo(summary_line(results[-1]))
    doc = {"url": url, "model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
           "requests_per_level": requests, "warmup_per_level": warmup, "results": results,
           "token_count": "num_output_tokens of the streamed responses" if model != "tensorrt_llm"
                          else "streamed token ids"}
    if out is not None:
        write_reports(Path(out), doc)
    return doc


def _source_tokenizer(cfg) -> Path:
    from grok_deploy.manifest import read_manifest

    man = read_manifest(cfg.output("source"))
    if man is None or "tokenizer" not in man:
        raise UserError(f"{cfg.output('source')}: no complete source stage, so no tokenizer for the synthetic "
                        "prompts; run `grok-deploy run --stages source` or pass --tokenizer")
    return Path(man["tokenizer"])


HEADER = (f"{'conc':>4} {'reqs':>5} {'ttft ms p50/p99':>17} {'itl ms p50/p99':>15} {'latency ms p50/p99':>19} "
          f"{'out tok/s':>10} {'req/s':>7}")


def _pair(d: dict) -> str:
    return "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p99"))


def summary_line(r: dict) -> str:
    return (f"{r['concurrency']:>4} {r['requests']:>5} {_pair(r['ttft_ms']):>17} {_pair(r['itl_ms']):>15} "
            f"{_pair(r['request_latency_ms']):>19} {r['output_tokens_per_s']:>10.1f} {r['requests_per_s']:>7.2f}")


def markdown(doc: dict) -> str:
    lines = [f"# Serving benchmark: {doc['model']} at {doc['url']}", "",
             f"{doc['input_tokens']} input tokens (synthetic, exact), {doc['output_tokens']} output tokens "
             f"(ignore-EOS), {doc['requests_per_level']} measured requests per level after "
             f"{doc['warmup_per_level']} warm-up; output tokens counted from {doc['token_count']}.", "",
             "| concurrency | requests | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | latency ms p50/p90/p99 | "
             "output tok/s | req/s |", "|---|---|---|---|---|---|---|"]

    def three(d):
        return "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))
    for r in doc["results"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {three(r['ttft_ms'])} | {three(r['itl_ms'])} | "
                     f"{three(r['request_latency_ms'])} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.2f} |")
    return "\n".join(lines + ["", "![throughput and latency](bench.png)", ""])


def write_reports(out: Path, doc: dict) -> None:
    """bench.json, bench.md and bench.png (throughput against concurrency; latency distributions)."""
    from grok_deploy.manifest import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", doc)
    (out / "bench.md").write_text(markdown(doc), encoding="utf-8")
    plot(doc, out / "bench.png")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    levels = [r["concurrency"] for r in res]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    ax = axes[0]
    ax.plot(levels, [r["output_tokens_per_s"] for r in res], "o-", color="tab:blue", label="output tokens/s")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_xticks(levels)
    for r in res:  # fixed output lengths: requests/s is tokens/s / output_tokens, so label it
        ax.annotate(f"{r['requests_per_s']:.2f} req/s", (r["concurrency"], r["output_tokens_per_s"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_ylim(0, max(r["output_tokens_per_s"] for r in res) * 1.2)
    ax.set_title("throughput")
    for ax, key, title in zip(axes[1:], ("ttft_ms", "itl_ms", "request_latency_ms"),
                              ("time to first token (ms)", "inter-token latency (ms)", "request latency (ms)")):
        ax.boxplot([r["raw"][key] or [0.0] for r in res], whis=(1, 99))
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
    fig.suptitle(f"{doc['model']}: {doc['input_tokens']} in / {doc['output_tokens']} out tokens, "
                 f"{doc['requests_per_level']} requests per level (whiskers p1-p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
