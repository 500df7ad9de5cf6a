"""`tensorrt_llm` as a python-backend model: a decoder engine with in-flight batching behind the
TensorRT-LLM backend's I/O contract (triton-serving.md §3, §8). Copied to tensorrt_llm/1/model.py.

`execute` only checks and queues requests; the decode loop (inflight.Scheduler) runs on its own
thread and answers through each request's response sender: decoupled streaming sends one
response per token, then FINAL; otherwise one response with the whole sequence. Every request
gets exactly one FINAL, also after an error or a cancellation. Decode-step batch sizes are
counted in the metric `grok_decode_steps_total{batch_size="N"}` (Triton's metrics port), beside
the backend's nv_trt_llm_* gauges (GAUGES) that this engine can fill honestly and its per-request
token histograms (HISTOGRAMS).
"""
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from grok_deploy.serving.triton_models.inflight import Scheduler, Seq, load_engine
from grok_deploy.serving.triton_models.params import BadRequest, parse_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
STATS_PERIOD_S = 0.1
# (family, label, label values, help): the TensorRT-LLM backend's names and labels
GAUGES = (("nv_trt_llm_request_metrics", "request_type", ("waiting", "context", "scheduled", "max", "active"),
           "TRT LLM request metrics"),
          ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type",
           ("fraction", "tokens_per", "used", "free", "max", "reused"), "TRT LLM KV cache block metrics"),
          ("nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric",
           ("micro_batch_id", "generation_requests", "total_context_tokens", "paused_requests"),
           "TRT LLM inflight_batcher-specific metrics"),
          ("nv_trt_llm_general_metrics", "general_type", ("iteration_counter", "timestamp"), "General TRT LLM metrics"))
# (family, response_metric_type): the backend's per-request token histograms, observed as each
# request ends (input tokens, output tokens generated), with its buckets
HISTOGRAMS = (("nv_llm_input_token_len", "total_input_tokens"), ("nv_llm_output_token_len", "total_output_tokens"))
TOKEN_BUCKETS = [10.0, 50.0, 100.0, 500.0, 1000.0]


def error_response(message: str, code: str = "INTERNAL"):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


class Sink:
    """One Triton request (one or more batch rows) and its response sender; sends one FINAL."""

    def __init__(self, request, rows: int):
        self.request, self.sender = request, request.get_response_sender()
        self.send_key = "grok_sequence_key" in request.requested_output_names()  # asked by the ensemble
        self.left, self.batched = rows, rows > 1
        self.closed = False
        self.lock = threading.Lock()

    def cancelled(self) -> bool:
        return self.closed or self.request.is_cancelled()

    def tokens(self, seq: Seq, new: list, final: bool) -> None:
        p = seq.params
        with self.lock:
            if self.closed:
                return
            self.left -= final
            last = self.left == 0
            if p.streaming:
                ids, lp, lg = new, seq.log_probs[len(seq.out) - len(new):], seq.logits[len(seq.out) - len(new):]
            elif final:  # the whole sequence (so far, when cancelled)
                ids = seq.out if p.exclude_input else p.prompt + seq.out
                lp, lg = seq.log_probs, seq.logits
            else:
                ids = None
            try:
                if ids is not None and (ids or not p.streaming):
                    self.sender.send(self._response(seq, ids, lp, lg), flags=FINAL if last else 0)
                elif last:
                    self.sender.send(flags=FINAL)
            finally:
                if last:
                    self._close()

    def error(self, seq: Seq, message: str, code: str) -> None:
        with self.lock:
            if not self.closed:
                try:
                    self.sender.send(error_response(message, code), flags=FINAL)
                finally:
                    self._close()

    def _close(self) -> None:
        # Triton releases a decoupled request when its python object dies: drop ours at FINAL
        self.closed, self.request, self.sender = True, None, None

    def _response(self, seq: Seq, ids: list, log_probs: list, logits: list):
        p = seq.params
        out = [pb_utils.Tensor("output_ids", np.array(ids, np.int32).reshape(1, 1, -1)),
               pb_utils.Tensor("sequence_length", np.array([[len(ids)]], np.int32))]
        if self.batched:
            out.append(pb_utils.Tensor("batch_index", np.array([[seq.row]], np.int32)))
        if self.send_key:
            out.append(pb_utils.Tensor("grok_sequence_key", np.array([[seq.secret]], np.uint64)))
        if p.return_log_probs:
            out += [pb_utils.Tensor("cum_log_probs", np.array([[sum(seq.log_probs)]], np.float32)),
                    pb_utils.Tensor("output_log_probs", np.array(log_probs, np.float32).reshape(1, 1, -1))]
        if p.return_generation_logits:
            rows = np.stack(logits) if logits else np.zeros((0, 0), np.float32)
            out.append(pb_utils.Tensor("generation_logits", rows.reshape(1, 1, *rows.shape).astype(np.float32)))
        if p.return_perf_metrics:
            out += [pb_utils.Tensor(name, np.array([[value]], dtype)) for name, value, dtype in perf_metrics(seq)]
        out += [pb_utils.Tensor(name, np.array([[n]], np.int32)) for name, n in token_counts(p, ids)]
        return pb_utils.InferenceResponse(output_tensors=out)


def token_counts(p, ids: list) -> list:
    """TensorRT-LLM 1.x's num_input_tokens / num_output_tokens, as asked: the prompt's length on
    every response, and the generated tokens this response carries (streamed: the new ones; whole:
    all of them, an echoed prompt not counted), so the streamed values add up to the total."""
    generated = len(ids) if p.streaming or p.exclude_input else len(ids) - len(p.prompt)
    return [(name, n) for name, n, asked in (("num_input_tokens", len(p.prompt), p.return_num_input_tokens),
                                             ("num_output_tokens", generated, p.return_num_output_tokens)) if asked]


def perf_metrics(seq: Seq) -> list:
    """The backend's `return_perf_metrics` outputs: (name, value, dtype). The KV cache is one
    preallocated slot of max_seq_len tokens per sequence (one "block", never shared: nothing is
    reused), and there is no speculative decoding (acceptance 0)."""
    return [("kv_cache_alloc_new_blocks", 1, np.int32), ("kv_cache_reused_blocks", 0, np.int32),
            ("kv_cache_alloc_total_blocks", 1, np.int32), ("arrival_time_ns", seq.arrival_ns, np.int64),
            ("first_scheduled_time_ns", seq.scheduled_ns, np.int64), ("first_token_time_ns", seq.first_token_ns, np.int64),
            ("last_token_time_ns", seq.last_token_ns, np.int64), ("acceptance_rate", 0.0, np.float32),
            ("total_accepted_draft_tokens", 0, np.int32), ("total_draft_tokens", 0, np.int32)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.name = args["model_name"]  # the model, as clients name it (not the instance)
        self.max_input_len = int(params["max_input_len"])
        self.exclude_default = params.get("exclude_input_in_output", "false").lower() in ("1", "true", "yes")
        self.engine = load_engine(params["engine_kind"], params["engine_dir"],
                                  int(params["engine_max_batch_size"]), int(params["max_seq_len"]))
        family = pb_utils.MetricFamily(name="grok_decode_steps_total", kind=pb_utils.MetricFamily.COUNTER,
                                       description="decode steps run by the in-flight batcher, by batch size")
        self.metrics = {n: family.Metric(labels={"model": args["model_name"], "batch_size": str(n)})
                        for n in range(1, self.engine.max_batch_size + 1)}
        self.families = [family]  # they must outlive their metrics (cleared in finalize)
        self.published, self.published_at = {}, 0.0  # gauge values last sent (see _publish)
        self.gauges = self._backend_gauges(args["model_name"], args["model_version"])
        self.histograms = self._token_histograms(args["model_name"], args["model_version"])
        self.scheduler = Scheduler(self.engine, on_step=lambda n: self.metrics[n].increment(1),
                                   log=pb_utils.Logger.log_warn, on_turn=self._publish,
                                   on_end=self._observe_tokens).start()
        pb_utils.Logger.log_info(f"tensorrt_llm: {params['engine_kind']} engine from {params['engine_dir']}, "
                                 f"max_batch_size {self.engine.max_batch_size}, max_seq_len {self.engine.max_seq_len}")

    def execute(self, requests):
        # A refusal is one error response through the request's sender: "tensorrt_llm: <what and
        # why>". Raising instead would count it in nv_inference_request_failure, but the python
        # backend then wraps the message with the instance name (tensorrt_llm_0_0) and this file's
        # traceback line: the client would read server internals.
        for request in requests:
            try:
                self._accept(request)
            except BadRequest as e:
                request.get_response_sender().send(error_response(f"{self.name}: {e}", e.code), flags=FINAL)
            except Exception as e:  # noqa: BLE001 - the request fails, the model keeps serving
                message = f"{self.name}: {type(e).__name__}: {e}".splitlines()[0]
                request.get_response_sender().send(error_response(message), flags=FINAL)
        return None

    def _accept(self, request) -> None:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        stop = inputs.get("stop")
        if stop is not None and stop.any():
            if not request.request_id():
                raise BadRequest("A request id must be provided for request cancellation")
            key = inputs.get("grok_sequence_key")  # the ensemble's postprocessing names its own sequence
            secret = None if key is None or not key.size else int(key.reshape(-1)[0])
            self.scheduler.cancel(request.request_id(), secret)
            # decoupled: a flags-only FINAL; otherwise Triton needs a response first: an empty one
            empty = None if self.decoupled else pb_utils.InferenceResponse(output_tensors=[])
            request.get_response_sender().send(empty, flags=FINAL)
            return
        rows = parse_request(inputs, self.max_input_len, self.engine.vocab_size, self.decoupled,
                             self.exclude_default)
        sink = Sink(request, len(rows))
        for b, p in enumerate(rows):
            self.scheduler.submit(Seq(p, sink, b, request.request_id()))

    def _backend_gauges(self, model: str, version: str) -> dict:
        """The TensorRT-LLM backend's nv_trt_llm_* gauges that this engine can fill honestly:
        {(family, label value): Metric}. The KV cache is one preallocated slot of max_seq_len
        tokens per sequence, so a "block" is a slot: tokens_per = max_seq_len, max = the slots."""
        out = {}
        for name, label, values, text in GAUGES:
            fam = pb_utils.MetricFamily(name=name, kind=pb_utils.MetricFamily.GAUGE, description=text)
            self.families.append(fam)
            for v in values:
                out[name, v] = fam.Metric(labels={"model": model, "version": version, label: v})
        out["nv_trt_llm_kv_cache_block_metrics", "tokens_per"].set(self.engine.max_seq_len)
        out["nv_trt_llm_kv_cache_block_metrics", "max"].set(self.engine.max_batch_size)
        out["nv_trt_llm_request_metrics", "max"].set(self.engine.max_batch_size)
        out["nv_trt_llm_kv_cache_block_metrics", "reused"].set(0)  # a slot is never shared between requests
        self._publish({"waiting": 0, "context": 0, "context_tokens": 0, "generation": 0, "paused": 0,
                       "scheduled": 0, "active": 0, "max": self.engine.max_batch_size, "iterations": 0}, out)
        return out

    def _token_histograms(self, model: str, version: str) -> dict:
        """The backend's nv_llm_input_token_len / nv_llm_output_token_len: {family: Metric}."""
        out = {}
        for name, kind in HISTOGRAMS:
            fam = pb_utils.MetricFamily(name=name, kind=pb_utils.MetricFamily.HISTOGRAM,
                                        description="TRT LLM response metrics")
            self.families.append(fam)
            out[name] = fam.Metric(labels={"model": model, "version": version, "response_metric_type": kind},
                                   buckets=TOKEN_BUCKETS)
        return out

    def _observe_tokens(self, seq: Seq) -> None:
        """One ended sequence (a batch row, as the backend's executor requests): its prompt tokens
        and the tokens it generated (the prompt is not counted when returned in the output)."""
        self.histograms["nv_llm_input_token_len"].observe(len(seq.params.prompt))
        self.histograms["nv_llm_output_token_len"].observe(len(seq.out))

    def _publish(self, st: dict, gauges: dict | None = None) -> None:
        """One turn of the in-flight batcher (inflight.Scheduler.turn_stats) onto the gauges. Each
        set() is an IPC call, so only changed values are sent, and a turn that changes no request
        count is published at most every STATS_PERIOD_S (the backend's stats_check_period_ms)."""
        g = gauges if gauges is not None else self.gauges
        req, kv, ib = "nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics", "nv_trt_llm_inflight_batcher_metrics"
        counts = {(req, k): st[k] for k in ("waiting", "context", "scheduled", "active")}
        counts[ib, "generation_requests"] = st["generation"]
        now = time.monotonic()
        if gauges is None and all(self.published.get(k) == v for k, v in counts.items()) \
                and now - self.published_at < STATS_PERIOD_S:
            return
        self.published_at = now
        values = {**counts, (kv, "used"): st["active"], (kv, "free"): st["max"] - st["active"],
                  (kv, "fraction"): st["active"] / st["max"], (ib, "micro_batch_id"): 0,
                  (ib, "total_context_tokens"): st["context_tokens"], (ib, "paused_requests"): st["paused"],
                  ("nv_trt_llm_general_metrics", "iteration_counter"): st["iterations"],
                  ("nv_trt_llm_general_metrics", "timestamp"): int(time.time())}
        for key, v in values.items():
            if self.published.get(key) != v:
                g[key].set(v)
                self.published[key] = v

    def finalize(self):
        self.scheduler.close()
        self.metrics.clear()  # metrics before their families
        self.gauges.clear()
        self.histograms.clear()
