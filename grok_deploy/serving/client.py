"""gRPC clients of the served model: `query` (text, ensemble), `query_ids` (token ids, straight to
tensorrt_llm) and the stream they share (the benchmark is bench.py). triton-serving.md §10.

The models are decoupled, so every request goes over the gRPC stream (start_stream /
async_stream_infer), streaming or not, with enable_empty_final_response=True so the flags-only
FINAL arrives and ends the wait.
"""
from __future__ import annotations

import json
import queue
import uuid
from typing import Callable, Iterator

import numpy as np

from grok_deploy.errors import UserError

# ensemble inputs the client may set: name -> numpy dtype
ENSEMBLE_INPUTS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "seed": np.uint64,
                   "end_id": np.int32, "pad_id": np.int32, "min_tokens": np.int32, "min_length": np.int32,
                   "random_seed": np.uint64,
                   "exclude_input_in_output": np.bool_, "return_log_probs": np.bool_,
                   "return_num_input_tokens": np.bool_, "return_num_output_tokens": np.bool_}
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
        try:
            client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        except InferenceServerException as e:  # the stream broke already (no server): its callback has why
            finished = True
            try:
                _, error = results.get(timeout=5)
            except queue.Empty:
                error = e
            raise ServerError(f"cannot reach the server at {url}: {error.message()}") from None
        while not finished:
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise ServerError(f"no response from {model} at {url} within {timeout:.0f} s") from None
            if error is not None:
                finished = True  # an error response is final
                where = f"cannot reach the server at {url}: " if "UNAVAILABLE" in str(error.status()) else ""
                raise ServerError(where + error.message(), error.status())
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
          on_text: Callable[[str], None] | None = None, timeout: float = 120.0, cumulative: bool | None = None,
          **sampling) -> dict:
    """One prompt to the ensemble (or tensorrt_llm_bls: same I/O). Returns {"text": str, "responses": n}:
    the generated text (exclude_input_in_output defaults to true). With stream, `on_text` gets each
    new piece as it arrives. `cumulative`: each streamed response holds the whole text so far (a
    BLS whose accumulate_tokens parameter is true: triton.bls_accumulate_tokens), else one delta
    each (the ensemble, and the BLS by default); None: read from the model's config. sampling:
    temperature, top_k, top_p, seed, end_id, ... (ENSEMBLE_INPUTS)."""
    unknown = set(sampling) - set(ENSEMBLE_INPUTS)
    if unknown:
        raise TypeError(f"unknown ensemble inputs {sorted(unknown)}; known: {sorted(ENSEMBLE_INPUTS)}")
    if cumulative is None:  # the ensemble's postprocessing is stateless: deltas
        cumulative = stream and model != "ensemble" and accumulates(url, model)
    sampling.setdefault("exclude_input_in_output", True)
    inputs = [tensor("text_input", [[utf8(text)]], object), tensor("max_tokens", [[max_tokens]], np.int32),
              tensor("stream", [[stream]], np.bool_)]
    inputs += [tensor(k, [[v]], ENSEMBLE_INPUTS[k]) for k, v in sampling.items() if v is not None]
    whole, n = "", 0
    for result in stream_request(url, model, inputs, timeout):
        out = result.as_numpy("text_output")
        if out is None:
            continue
        piece = out.reshape(-1)[0].decode("utf-8", errors="replace")  # text_output is [1]
        n += 1
        if stream and cumulative:
            piece, whole = (piece[len(whole):], piece) if piece.startswith(whole) else (piece, piece)
        else:
            whole += piece
        if on_text:
            on_text(piece)
    return {"text": whole, "responses": n}


def accumulates(url: str, model: str) -> bool:
    """True when `model` has the BLS parameter accumulate_tokens set true (whole text per response)."""
    from tritonclient.grpc import InferenceServerClient, InferenceServerException

    client = InferenceServerClient(url)
    try:
        params = client.get_model_config(model).config.parameters
    except InferenceServerException as e:
        if "UNAVAILABLE" in str(e.status()) or "failed to connect" in e.message():
            raise ServerError(f"cannot reach the server at {url}: {e.message()}") from None
        raise ServerError(f"{model}: cannot read its config ({e.message()})") from None
    finally:
        client.close()
    value = params["accumulate_tokens"].string_value if "accumulate_tokens" in params else ""
    return value.strip().lower() in ("1", "true", "yes", "t")


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
