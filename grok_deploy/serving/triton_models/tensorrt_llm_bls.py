"""`tensorrt_llm_bls`: the ensemble's chain as BLS calls (triton-serving.md §6), with the
ensemble's I/O. Copied to tensorrt_llm_bls/1/model.py; needs only numpy.

preprocessing -> tensorrt_llm (exec(decoupled=True), `streaming` from the client's `stream`)
-> postprocessing per response. A stream re-decodes every id so far, so spaces and multi-byte
characters survive, and holds a response back while the text ends in an incomplete UTF-8
sequence. With accumulate_tokens (the backend's parameter, default false) each response carries
the WHOLE text so far, as the backend's BLS does, else only the new text (what Triton's OpenAI
frontend appends). num_output_tokens counts the tokens a sent response covers, held-back ones
included, so a stream's values add up to the tokens generated; num_input_tokens passes through.
The <= v0.19 spellings min_length / random_seed reach tensorrt_llm as min_tokens / seed.
Each request runs on its own thread, so one instance serves many streams; decoupled, it sends
each data response and then a flags-only FINAL (exactly one, also after errors). A cancelled
request (client gone) stops its tensorrt_llm sequence with the backend's `stop` input and the
child request's own id: Triton does not pass the cancellation on to a running BLS call.
"""
import json
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PRE = {"text_input": "QUERY", "decoder_text_input": "DECODER_QUERY", "max_tokens": "REQUEST_OUTPUT_LEN",
       "bad_words": "BAD_WORDS_DICT", "stop_words": "STOP_WORDS_DICT",
       "embedding_bias_words": "EMBEDDING_BIAS_WORDS", "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS",
       "end_id": "END_ID", "pad_id": "PAD_ID", "prompt_table_extra_id": "PROMPT_TABLE_EXTRA_ID"}
PRE_TO_LLM = {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths", "REQUEST_OUTPUT_LEN": "request_output_len",
              "BAD_WORDS_IDS": "bad_words_list", "STOP_WORDS_IDS": "stop_words_list", "EMBEDDING_BIAS": "embedding_bias",
              "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id", "OUT_PROMPT_TABLE_EXTRA_IDS": "prompt_table_extra_ids"}
TO_LLM = {"top_k": "runtime_top_k", "top_p": "runtime_top_p", "length_penalty": "len_penalty", "stream": "streaming",
          **{n: n for n in ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty",
                            "min_tokens", "seed", "beam_width", "num_return_sequences", "exclude_input_in_output",
                            "return_log_probs", "return_context_logits", "return_generation_logits",
                            "prompt_embedding_table", "prompt_vocab_size", "lora_task_id", "lora_weights",
                            "lora_config", "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens",
                            "guided_decoding_guide_type", "guided_decoding_guide", "lookahead_window_size",
                            "lookahead_ngram_size", "lookahead_verification_set_size")}}
PERF_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
                "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                "total_accepted_draft_tokens", "total_draft_tokens")
PASS_THROUGH = ("cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index",
                "sequence_index", *PERF_OUTPUTS, "num_input_tokens")
ALIASES = (("min_tokens", "min_length"), ("seed", "random_seed"))  # (1.x name, <= v0.19 name)


class Failed(Exception):
    def __init__(self, error):
        super().__init__(error.message())
        self.error = error


def text_delta(text: str, sent: int, final: bool) -> tuple[str, int]:
    """The part of `text` after its first `sent` characters that is safe to send now: a trailing
    U+FFFD may be the start of a multi-byte character whose other bytes are still to come."""
    end = len(text)
    while not final and end > sent and text[end - 1] == "\ufffd":
        end -= 1
    return text[sent:end], max(end, sent)


def call(model: str, tensors: dict, outputs: list) -> dict:
    req = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                    inputs=[pb_utils.Tensor(k, v) for k, v in tensors.items()])
    resp = req.exec()
    if resp.has_error():
        raise Failed(resp.error())
    return {t.name(): t.as_numpy() for t in resp.output_tensors()}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # unset or unfilled (`${accumulate_tokens}`): false, as the backend's BLS
        self.accumulate = params.get("accumulate_tokens", "false").strip().lower() in ("1", "true", "yes", "t")
        self.llm = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            if self.decoupled:
                for response in self._generate(request):
                    sender.send(response)
                sender.send(flags=FINAL)
            else:  # one response, carrying FINAL
                sender.send([*self._generate(request)][-1], flags=FINAL)
        except Failed as e:
            sender.send(pb_utils.InferenceResponse(error=e.error), flags=FINAL)
        except Exception as e:  # noqa: BLE001 - the request fails, the model keeps serving
            err = pb_utils.TritonError(f"tensorrt_llm_bls: {type(e).__name__}: {e}")
            sender.send(pb_utils.InferenceResponse(error=err), flags=FINAL)

    def _generate(self, request):
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        if inputs["text_input"].shape[0] != 1:
            raise Failed(pb_utils.TritonError("tensorrt_llm_bls takes one prompt per request (batch 1)",
                                              pb_utils.TritonError.INVALID_ARG))
        for new, old in ALIASES:  # the ensemble refuses the same (in preprocessing)
            if old in inputs:
                if new in inputs and not np.array_equal(inputs[new], inputs[old]):
                    raise Failed(pb_utils.TritonError(f"inputs '{old}' and '{new}' are two spellings of one input "
                                                      "and differ; send one", pb_utils.TritonError.INVALID_ARG))
                inputs[new] = inputs.pop(old)
        drafts = inputs.pop("num_draft_tokens", None)
        inputs.pop("use_draft_logits", None)  # only read with draft tokens
        if drafts is not None and (drafts > 0).any():
            raise Failed(pb_utils.TritonError("num_draft_tokens > 0 asks for speculative decoding, which needs a draft "
                                              "model (tensorrt_llm_draft_model_name); this repository has none",
                                              pb_utils.TritonError.INVALID_ARG))
        pre = call("preprocessing", {PRE[k]: v for k, v in inputs.items() if k in PRE},
                   list(PRE_TO_LLM))
        llm = {PRE_TO_LLM[k]: v for k, v in pre.items() if k in PRE_TO_LLM}
        llm.update({TO_LLM[k]: v for k, v in inputs.items() if k in TO_LLM})
        stream = bool(inputs["stream"].any()) if "stream" in inputs else False
        child = uuid.uuid4().hex  # the id a cancellation names
        req = pb_utils.InferenceRequest(model_name=self.llm, inputs=[pb_utils.Tensor(k, v) for k, v in llm.items()],
                                        requested_output_names=["output_ids", "sequence_length", *PASS_THROUGH,
                                                                "num_output_tokens"],
                                        request_id=child)
        responses = req.exec(decoupled=True) if self.decoupled else [req.exec()]
        tokens, sent, text, out, pending = [], 0, "", {}, 0  # pending: tokens not yet covered by a response
        for resp in responses:
            if request.is_cancelled():
                if self.decoupled:
                    self.stop(child)
                return
            if resp.has_error():
                raise Failed(resp.error())
            out = {t.name(): t.as_numpy() for t in resp.output_tensors()}
            if "output_ids" not in out:
                continue  # the flags-only FINAL
            ids = out["output_ids"][0, 0, :int(out["sequence_length"].reshape(-1)[0])]
            if stream:
                tokens += ids.tolist()
                pending += len(ids)
                text = self.detokenize(tokens)
                _, ready = text_delta(text, sent, False)
                if ready == sent:
                    continue  # nothing new, or only the start of a multi-byte character
                piece, sent = (text[:ready] if self.accumulate else text[sent:ready]), ready
                yield self.response(piece, out, pending)
                pending = 0
            else:
                yield self.response(self.detokenize(ids), out)
        if stream and (sent < len(text) or pending):
            yield self.response(text if self.accumulate else text[sent:], out, pending)

    def stop(self, request_id: str) -> None:
        """Cancel the running tensorrt_llm sequence `request_id` (its FINAL still arrives)."""
        zero = np.zeros((1, 1), np.int32)
        stop = pb_utils.InferenceRequest(
            model_name=self.llm, request_id=request_id, requested_output_names=["output_ids"],
            inputs=[pb_utils.Tensor("input_ids", zero), pb_utils.Tensor("input_lengths", zero),
                    pb_utils.Tensor("request_output_len", zero), pb_utils.Tensor("stop", np.ones((1, 1), np.bool_))])
        try:
            for _ in stop.exec(decoupled=True):
                pass
        except Exception as e:  # noqa: BLE001 - best effort: the client is gone either way
            pb_utils.Logger.log_warn(f"tensorrt_llm_bls: stop {request_id!r} failed: {e}")

    @staticmethod
    def detokenize(ids) -> str:
        ids = np.asarray(ids, np.int32).reshape(1, 1, -1)
        out = call("postprocessing", {"TOKENS_BATCH": ids, "SEQUENCE_LENGTH": np.array([[ids.shape[-1]]], np.int32)},
                   ["OUTPUT"])
        return out["OUTPUT"].reshape(-1)[0].decode("utf-8")

    @staticmethod
    def response(text: str, llm_out: dict, covered: int | None = None):
        """covered: the streamed tokens this response stands for (its num_output_tokens)."""
        # [1]: one string per batch row and beam, as the backend's postprocessing returns it
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))]
        tensors += [pb_utils.Tensor(k, llm_out[k]) for k in PASS_THROUGH if k in llm_out]
        if "num_output_tokens" in llm_out:  # asked for (return_num_output_tokens)
            n = llm_out["num_output_tokens"] if covered is None else np.array([[covered]], np.int32)
            tensors.append(pb_utils.Tensor("num_output_tokens", n))
        return pb_utils.InferenceResponse(output_tensors=tensors)
