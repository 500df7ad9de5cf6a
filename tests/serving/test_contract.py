"""The TensorRT-LLM backend's serving contract as its own clients send it (inflight_batcher_llm/client
end_to_end_grpc_client and inflight_batcher_llm_client, genai-perf's tensorrtllm requests): names,
dtypes, shapes, optional inputs present and absent, streaming and not, on the decoupled session
server, for all five models; the backend's metric families. Non-decoupled: test_serving.py."""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import TEST_PROMPT
from serving_fixtures import served  # noqa: F401 (fixture)

from grok_deploy.model.generate import generate
from grok_deploy.serving.client import ServerError, query, query_ids, stream_request, tensor

pytestmark = [pytest.mark.timeout(180), pytest.mark.server]
PERF = {"kv_cache_alloc_new_blocks": np.int32, "kv_cache_reused_blocks": np.int32,
        "kv_cache_alloc_total_blocks": np.int32, "arrival_time_ns": np.int64, "first_scheduled_time_ns": np.int64,
        "first_token_time_ns": np.int64, "last_token_time_ns": np.int64, "acceptance_rate": np.float32,
        "total_accepted_draft_tokens": np.int32, "total_draft_tokens": np.int32}


def greedy(model, ids, n):
    return generate(model, [ids], n).output_ids[0]


def e2e_inputs(text: str, n: int, stream: bool, **optional):
    """end_to_end_grpc_client's request: [1, 1] tensors, empty bad/stop word lists."""
    t = [tensor("text_input", [[text.encode()]], object), tensor("max_tokens", [[n]], np.int32),
         tensor("bad_words", [[b""]], object), tensor("stop_words", [[b""]], object),
         tensor("stream", [[stream]], np.bool_)]
    return t + [tensor(k, [[v]], dt) for k, (v, dt) in optional.items()]


def check_perf(result):
    got = {k: result.as_numpy(k) for k in PERF}
    for k, dt in PERF.items():
        assert got[k] is not None and got[k].dtype == dt and got[k].shape == (1, 1), k
    t = [int(got[k][0, 0]) for k in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns",
                                     "last_token_time_ns")]
    assert t == sorted(t) and abs(t[0] / 1e9 - time.time()) < 120  # ns since the epoch, in order
    assert [int(got[k][0, 0]) for k in ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks",
                                        "kv_cache_alloc_total_blocks")] == [1, 0, 1]
    assert float(got["acceptance_rate"][0, 0]) == 0.0 and int(got["total_draft_tokens"][0, 0]) == 0


def test_end_to_end_client_requests_to_ensemble_and_bls(served, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEST_PROMPT)
    want = greedy(tiny_model, ids, 6)  # no top_k/top_p: greedy, as TensorRT-LLM
    for model in ("ensemble", "tensorrt_llm_bls"):
        plain = list(stream_request(served.grpc_url, model, e2e_inputs(TEST_PROMPT, 6, False,
                                                                         temperature=(1.0, np.float32))))
        out = plain[0].as_numpy("text_output")
        assert len(plain) == 1 and out.shape == (1,) and isinstance(out[0], bytes)  # the client's output[0].decode()
        assert out[0].decode() == tiny_tokenizer.decode(ids + want)  # the prompt is echoed by default
        assert plain[0].as_numpy("kv_cache_reused_blocks") is None  # perf outputs only when asked
        streamed = list(stream_request(served.grpc_url, model, e2e_inputs(
            TEST_PROMPT, 6, True, exclude_input_in_output=(True, np.bool_), return_perf_metrics=(True, np.bool_))))
        texts = [r.as_numpy("text_output")[0].decode() for r in streamed]
        assert all(r.as_numpy("text_output").shape == (1,) for r in streamed)
        if model == "ensemble":  # stateless postprocessing: one token per response
            assert texts == [tiny_tokenizer.decode([t]) for t in want]
        else:  # accumulate_tokens false (upstream's default): the new text, decoded from all ids so far
            assert "".join(texts) == tiny_tokenizer.decode(want)
        check_perf(streamed[-1])


def test_inflight_batcher_client_requests_to_tensorrt_llm(served, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEST_PROMPT)
    want = greedy(tiny_model, ids, 5)
    for stream in (False, True):
        inputs = [tensor("input_ids", [ids], np.int32), tensor("input_lengths", [[len(ids)]], np.int32),
                  tensor("request_output_len", [[5]], np.int32), tensor("beam_width", [[1]], np.int32),
                  tensor("temperature", [[1.0]], np.float32), tensor("streaming", [[stream]], np.bool_),
                  tensor("end_id", [[2]], np.int32), tensor("pad_id", [[0]], np.int32),
                  tensor("seed", [[7]], np.uint64), tensor("return_perf_metrics", [[True]], np.bool_)]
        res = list(stream_request(served.grpc_url, "tensorrt_llm", inputs))
        shapes = {(r.as_numpy("output_ids").shape, r.as_numpy("sequence_length").shape) for r in res}
        got = [t for r in res for t in r.as_numpy("output_ids")[0, 0].tolist()]
        if stream:  # only the new token in each response
            assert shapes == {((1, 1, 1), (1, 1))} and got == want
        else:  # the whole sequence, prompt echoed (exclude_input_in_output absent)
            assert shapes == {((1, 1, len(ids) + 5), (1, 1))} and got == ids + want
        check_perf(res[-1])


def test_sampling_defaults_follow_tensorrt_llm(served, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("Once upon a time")
    want = greedy(tiny_model, ids, 8)
    url = served.grpc_url
    # neither runtime_top_k nor runtime_top_p (or top_p 0): greedy, whatever the temperature and seed
    assert query_ids(url, ids, 8, temperature=1.0, seed=3)["output_ids"] == want
    assert query_ids(url, ids, 8, temperature=1.0, runtime_top_p=0.0, seed=3)["output_ids"] == want
    # top_k > 0 with top_p 0: top-k sampling; each token among the reference's top k at its step
    runs = [query_ids(url, ids, 8, runtime_top_k=4, runtime_top_p=0.0, seed=s)["output_ids"] for s in range(4)]
    assert any(r != want for r in runs)
    assert runs[0] == query_ids(url, ids, 8, runtime_top_k=4, seed=0)["output_ids"]  # seeded: repeatable
    for r in runs[:2]:
        for i in range(len(r)):
            step = generate(tiny_model, [ids + r[:i]], 1, return_logits=True).logits[0][0]
            assert r[i] in np.argsort(-step)[:4], (i, r)

def test_old_and_new_input_names(served, tiny_model, tiny_tokenizer):
    url = served.grpc_url
    ids = tiny_tokenizer.encode(TEST_PROMPT)
    first = greedy(tiny_model, ids, 1)[0]
    # genai-perf --output-tokens-mean-deterministic: min_length = max_tokens through the ensemble
    kw = dict(end_id=first, exclude_input_in_output=True)
    assert query(url, TEST_PROMPT, 4, stream=True, **kw)["responses"] == 0  # ends at once on end_id
    assert query(url, TEST_PROMPT, 4, stream=True, min_length=4, **kw)["responses"] == 4
    assert query(url, TEST_PROMPT, 4, stream=True, min_tokens=4, **kw)["responses"] == 4
    for model in ("ensemble", "tensorrt_llm_bls"):  # random_seed reaches the engine as seed
        kw = dict(top_k=8, model=model)
        assert query(url, TEST_PROMPT, 6, random_seed=5, **kw) == query(url, TEST_PROMPT, 6, seed=5, **kw)
        assert query(url, TEST_PROMPT, 6, random_seed=5, seed=5, **kw) == query(url, TEST_PROMPT, 6, seed=5, **kw)
        with pytest.raises(ServerError, match="'random_seed' and 'seed' are two spellings of one input"):
            query(url, TEST_PROMPT, 6, random_seed=5, seed=6, **kw)
    # tensorrt_llm itself has the 1.x names only, as TensorRT-LLM 1.2.1's C++ backend
    inputs = [tensor("input_ids", [ids], np.int32), tensor("input_lengths", [[len(ids)]], np.int32),
              tensor("request_output_len", [[6]], np.int32), tensor("random_seed", [[5]], np.uint64)]
    with pytest.raises(ServerError, match="unexpected inference input 'random_seed'"):
        list(stream_request(url, "tensorrt_llm", inputs))


def test_unconfigured_features_are_refused_only_when_asked(served):
    url = served.grpc_url
    base = [tensor("input_ids", [[5, 6, 7]], np.int32), tensor("input_lengths", [[3]], np.int32),
            tensor("request_output_len", [[2]], np.int32)]
    ok = list(stream_request(url, "tensorrt_llm", base + [tensor("guided_decoding_guide_type", [[b""]], object),
                                                          tensor("guided_decoding_guide", [[b""]], object)]))
    assert ok[0].as_numpy("output_ids").shape == (1, 1, 5)
    with pytest.raises(ServerError, match="guided_decoding_guide_type.*guided_decoding_backend"):
        list(stream_request(url, "tensorrt_llm", base + [tensor("guided_decoding_guide_type", [[b"json"]], object)]))
    with pytest.raises(ServerError, match="lookahead decoding configuration"):
        list(stream_request(url, "tensorrt_llm", base + [tensor("lookahead_window_size", [[3]], np.int32)]))
    with pytest.raises(ServerError, match="lookahead decoding configuration"):  # through the ensemble's map
        list(stream_request(url, "ensemble", e2e_inputs("Hello", 2, True, lookahead_ngram_size=(3, np.int32))))
    assert query(url, "Hello", 2)["responses"] == 1  # still serving


def scrape(server) -> dict:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^(nv_\w+)\{([^}]*model="tensorrt_llm"[^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = next((labels[k] for k in ("request_type", "kv_cache_block_type", "inflight_batcher_specific_metric",
                                        "general_type", "reason") if k in labels), "")
        out[m.group(1), key] = float(m.group(3))
    return out


def scrape_idle(server, timeout: float = 10.0) -> dict:
    """The gauges once the batcher has published its last turn: the final response is sent during
    a turn and the gauges are set after it, so a scrape right after a stream ends may see the turn
    before (active still 1, the iteration counter one publish behind)."""
    deadline = time.monotonic() + timeout
    while (m := scrape(server))["nv_trt_llm_request_metrics", "active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return m


def test_backend_metric_families_and_failure_counts(served):
    before = scrape_idle(served)
    assert before["nv_trt_llm_request_metrics", "max"] == 8 and before["nv_trt_llm_kv_cache_block_metrics", "max"] == 8
    assert before["nv_trt_llm_kv_cache_block_metrics", "tokens_per"] == 160  # one slot of max_seq_len per sequence
    with pytest.raises(ServerError, match="empty prompt"):
        list(stream_request(served.grpc_url, "tensorrt_llm", [tensor("input_ids", [[5]], np.int32),
                                                               tensor("input_lengths", [[0]], np.int32),
                                                               tensor("request_output_len", [[2]], np.int32)]))
    mid, seen = {}, threading.Event()

    def watch():  # while a long stream decodes: one active sequence, one block in use
        for _ in range(200):
            m = scrape(served)
            if m["nv_trt_llm_request_metrics", "active"] >= 1:
                mid.update(m)
                seen.set()
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    query_ids(served.grpc_url, [5, 6, 7], 80, stream=True)
    t.join(30)
    after = scrape_idle(served)
    assert after["nv_trt_llm_request_metrics", "active"] == 0
    assert seen.is_set() and mid["nv_trt_llm_kv_cache_block_metrics", "used"] >= 1
    assert mid["nv_trt_llm_kv_cache_block_metrics", "free"] == 8 - mid["nv_trt_llm_kv_cache_block_metrics", "used"]
    # the refusal is an error response sent by the model (so that its message stays one clean line),
    # which Triton's python backend counts as a processed request, not a failure
    assert after["nv_inference_request_failure", "BACKEND"] == before["nv_inference_request_failure", "BACKEND"]
    assert after["nv_inference_request_success", ""] >= before["nv_inference_request_success", ""] + 1
    # 80 tokens: the prefill turn makes the first, 79 decode turns the rest
    assert after["nv_trt_llm_general_metrics", "iteration_counter"] >= before["nv_trt_llm_general_metrics",
                                                                              "iteration_counter"] + 79
    assert after["nv_trt_llm_request_metrics", "active"] == 0 and after["nv_trt_llm_kv_cache_block_metrics", "used"] == 0
