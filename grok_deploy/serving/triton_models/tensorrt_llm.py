"""`tensorrt_llm` as a python-backend model: a decoder engine with in-flight batching behind the
TensorRT-LLM backend's I/O contract (triton-serving.md §3, §8). Copied to tensorrt_llm/1/model.py.

`execute` only checks and queues requests; the decode loop (inflight.Scheduler) runs on its own
thread and answers through each request's response sender: decoupled streaming sends one
response per token, then FINAL; otherwise one response with the whole sequence. Every request
gets exactly one FINAL, also after an error or a cancellation. Decode-step batch sizes are
counted in the metric `grok_decode_steps_total{batch_size="N"}` (Triton's metrics port).
"""
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from grok_deploy.serving.triton_models.inflight import Scheduler, Seq, load_engine
from grok_deploy.serving.triton_models.params import BadRequest, parse_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(message: str, code: str = "INTERNAL"):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


class Sink:
    """One Triton request (one or more batch rows) and its response sender; sends one FINAL."""

    def __init__(self, request, rows: int):
        self.request, self.sender = request, request.get_response_sender()
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
        if p.return_log_probs:
            out += [pb_utils.Tensor("cum_log_probs", np.array([[sum(seq.log_probs)]], np.float32)),
                    pb_utils.Tensor("output_log_probs", np.array(log_probs, np.float32).reshape(1, 1, -1))]
        if p.return_generation_logits:
            rows = np.stack(logits) if logits else np.zeros((0, 0), np.float32)
            out.append(pb_utils.Tensor("generation_logits", rows.reshape(1, 1, *rows.shape).astype(np.float32)))
        return pb_utils.InferenceResponse(output_tensors=out)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_input_len = int(params["max_input_len"])
        self.exclude_default = params.get("exclude_input_in_output", "false").lower() in ("1", "true", "yes")
        self.engine = load_engine(params["engine_kind"], params["engine_dir"],
                                  int(params["engine_max_batch_size"]), int(params["max_seq_len"]))
        family = pb_utils.MetricFamily(name="grok_decode_steps_total", kind=pb_utils.MetricFamily.COUNTER,
                                       description="decode steps run by the in-flight batcher, by batch size")
        self.metrics = {n: family.Metric(labels={"model": args["model_name"], "batch_size": str(n)})
                        for n in range(1, self.engine.max_batch_size + 1)}
        self.family = family  # it must outlive its metrics (cleared in finalize)
        self.scheduler = Scheduler(self.engine, on_step=lambda n: self.metrics[n].increment(1),
                                   log=pb_utils.Logger.log_warn).start()
        pb_utils.Logger.log_info(f"tensorrt_llm: {params['engine_kind']} engine from {params['engine_dir']}, "
                                 f"max_batch_size {self.engine.max_batch_size}, max_seq_len {self.engine.max_seq_len}")

    def execute(self, requests):
        for request in requests:
            try:
                self._accept(request)
            except BadRequest as e:
                request.get_response_sender().send(error_response(str(e), e.code), flags=FINAL)
            except Exception as e:  # noqa: BLE001 - the request fails, the model keeps serving
                request.get_response_sender().send(error_response(f"{type(e).__name__}: {e}"), flags=FINAL)
        return None

    def _accept(self, request) -> None:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        stop = inputs.get("stop")
        if stop is not None and stop.any():
            if not request.request_id():
                raise BadRequest("A request id must be provided for request cancellation")
            self.scheduler.cancel(request.request_id())
            request.get_response_sender().send(flags=FINAL)
            return
        rows = parse_request(inputs, self.max_input_len, self.engine.vocab_size, self.decoupled,
                             self.exclude_default)
        sink = Sink(request, len(rows))
        for b, p in enumerate(rows):
            self.scheduler.submit(Seq(p, sink, b, request.request_id()))

    def finalize(self):
        self.scheduler.close()
        self.metrics.clear()  # metrics before their family
