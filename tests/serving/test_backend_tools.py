"""What the TensorRT-LLM backend's own tools and CI read from a deployment, on the real server:
the packaged tokenizer folder (the clients' eos/pad idiom, the ids preprocessing serves, the rule
for special-token text) and the metrics as the backend's CI parses them."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from serving_fixtures import served  # noqa: F401 (fixture)

from grok_deploy.model.generate import generate
from grok_deploy.serving.client import query, tensor

pytestmark = pytest.mark.timeout(240)  # a server is started: never hang the suite
PIPELINE = Path(__file__).resolve().parents[2] / "pipeline.yaml"
VERIFY_PROMPTS = yaml.safe_load(PIPELINE.read_text())["verify"]["prompts"]
SPECIAL_PROMPTS = ["[EOS]", "Hello [EOS] world, [PAD][PAD]and more", "[BOS]The answer is[UNK] 42 [EOS"]
LE = ["10", "50", "100", "500", "1000", "+Inf"]  # the backend's buckets, as its CI lists them


def auto_tokenizer(folder: Path):
    """The packaged folder loaded as the official preprocessing model and clients load it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), legacy=False, padding_side="left", trust_remote_code=True)


@pytest.mark.server
def test_packaged_folder_gives_the_clients_end_and_pad_ids(served):
    for model in ("preprocessing", "postprocessing"):
        tok = auto_tokenizer(served.repo / model / "tokenizer")
        # inflight_batcher_llm_client.py, benchmark_core_model.py, the official preprocessing model
        assert tok.encode(tok.eos_token, add_special_tokens=False)[0] == 2
        assert tok.encode(tok.pad_token, add_special_tokens=False)[0] == 0
        assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False)  # no BOS added


@pytest.mark.server
def test_served_ids_equal_reference_ids_with_and_without_special_token_text(served, tiny_model, tiny_tokenizer):
    import tritonclient.grpc as grpcclient

    auto = auto_tokenizer(served.repo / "preprocessing" / "tokenizer")
    client = grpcclient.InferenceServerClient(served.grpc_url)  # preprocessing is not decoupled
    try:
        for prompt in VERIFY_PROMPTS + SPECIAL_PROMPTS:
            res = client.infer("preprocessing", [tensor("QUERY", [[prompt.encode()]], object),
                                                 tensor("REQUEST_OUTPUT_LEN", [[4]], np.int32)])
            want = tiny_tokenizer.encode(prompt)  # the reference's ids
            assert res.as_numpy("INPUT_ID").tolist() == [want], prompt
            assert res.as_numpy("REQUEST_INPUT_LEN").tolist() == [[len(want)]]
            assert auto.encode(prompt) == want, prompt  # and what the official preprocessing model would serve
    finally:
        client.close()
    assert len(VERIFY_PROMPTS) == 10
    # the rule: special-token text is the token; the text around it is encoded as usual
    assert tiny_tokenizer.encode(SPECIAL_PROMPTS[0]) == [2]
    assert tiny_tokenizer.encode(SPECIAL_PROMPTS[1]) == (tiny_tokenizer.encode("Hello") + [2]
                                                         + tiny_tokenizer.encode(" world, ") + [0, 0]
                                                         + tiny_tokenizer.encode("and more"))
    assert tiny_tokenizer.encode(SPECIAL_PROMPTS[2])[0] == 1 and 3 in tiny_tokenizer.encode(SPECIAL_PROMPTS[2])
    assert tiny_tokenizer.encode(SPECIAL_PROMPTS[2])[-1] != 2  # "[EOS" is not the token
    # the engine decodes from those ids: the served text is the reference's continuation of them
    for model in ("ensemble", "tensorrt_llm_bls"):
        for prompt in SPECIAL_PROMPTS:
            ids = tiny_tokenizer.encode(prompt)
            want = tiny_tokenizer.decode(generate(tiny_model, [ids], 6).output_ids[0])
            assert query(served.grpc_url, prompt, 6, model=model, end_id=-1)["text"] == want, (model, prompt)


# --- metrics, parsed as ci/L0_backend_trtllm/base_metrics_verification_tests.py does ------------------

def metrics_text(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def gauge(text: str, family: str, label: str, value: str) -> float:
    m = re.search(rf'^{family}{{[^}}]*{label}="{value}"[^}}]*model="tensorrt_llm"[^}}]*}} (\S+)$|'
                  rf'^{family}{{[^}}]*model="tensorrt_llm"[^}}]*{label}="{value}"[^}}]*}} (\S+)$', text, re.M)
    assert m, f"{family}{{{label}={value}}} not published"
    return float(m.group(1) or m.group(2))


def idle_text(server, timeout: float = 10.0) -> str:
    """The metrics once the batcher has published its last turn, nothing active or waiting (see
    test_contract.scrape_idle)."""
    deadline = time.monotonic() + timeout
    while any(gauge(text := metrics_text(server), "nv_trt_llm_request_metrics", "request_type", kind)
              for kind in ("active", "waiting")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text


def bucket_values(text: str) -> tuple[list[int], list[int]]:
    """The CI script's _find_metric_values: its exact patterns, one match per le value."""
    inputs, outputs = [], []
    for le in LE:
        le = r"\+Inf" if le == "+Inf" else le
        i = re.search(rf'nv_llm_input_token_len_bucket{{model="tensorrt_llm",'
                      rf'response_metric_type="total_input_tokens",version="1",le="{le}"}}\s+(\d+)', text)
        o = re.search(rf'nv_llm_output_token_len_bucket{{model="tensorrt_llm",'
                      rf'response_metric_type="total_output_tokens",version="1",le="{le}"}}\s+(\d+)', text)
        if i:
            inputs.append(int(i.group(1)))
        if o:
            outputs.append(int(o.group(1)))
    return inputs, outputs


def bucket_counts(lengths: list[int]) -> list[int]:
    """The CI script's _calculate_bucket_counts: cumulative counts per le boundary."""
    bounds = [float("inf") if x == "+Inf" else float(x) for x in LE]
    return [sum(1 for n in lengths if n <= b) for b in bounds]


@pytest.mark.server
def test_token_histograms_and_batcher_gauges_as_the_backend_ci_reads_them(served, tiny_tokenizer):
    before = idle_text(served)
    in_before, out_before = bucket_values(before)
    assert len(in_before) == len(out_before) == 6  # every bucket of both histograms is published
    # three requests at once through the ensemble, as the CI's _run_infer (empty bad/stop word lists)
    prompts = ["Hello", "Once upon a time, in a small city near the river, there lived a child",
               " ".join(["The answer to life the universe and everything is of course"] * 2) + ", and so on for ever"]
    lengths = [len(tiny_tokenizer.encode(p)) for p in prompts]
    outputs = [3, 12, 70]
    assert lengths[0] <= 10 < lengths[1] <= 50 < lengths[2] <= 64  # three buckets (max_input_len 64)
    mid, seen = [], threading.Event()

    def watch():  # while the long one decodes alone: one request in generation, none in context
        while not seen.is_set():
            text = metrics_text(served)
            mid.append((gauge(text, "nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric",
                              "generation_requests"),
                        gauge(text, "nv_trt_llm_request_metrics", "request_type", "context")))
            time.sleep(0.02)

    def send(i):
        from grok_deploy.serving.client import stream_request
        inputs = [tensor("text_input", [[prompts[i].encode()]], object), tensor("max_tokens", [[outputs[i]]], np.int32),
                  tensor("bad_words", [[b""]], object), tensor("stop_words", [[b""]], object),
                  tensor("end_id", [[-1]], np.int32), tensor("stream", [[True]], np.bool_)]
        results[i] = sum(1 for _ in stream_request(served.grpc_url, "ensemble", inputs))

    results = [0, 0, 0]
    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    seen.set()
    watcher.join(10)
    assert results == outputs  # one streamed response per token
    after = idle_text(served)
    in_after, out_after = bucket_values(after)
    assert [a - b for a, b in zip(in_after, in_before)] == bucket_counts(lengths) == [1, 2, 3, 3, 3, 3]
    assert [a - b for a, b in zip(out_after, out_before)] == bucket_counts(outputs) == [1, 2, 3, 3, 3, 3]

    def total(text, family):
        return float(re.search(rf'^{family}_sum{{model="tensorrt_llm",response_metric_type="\w+",version="1"}} (\S+)$',
                               text, re.M).group(1))
    assert total(after, "nv_llm_input_token_len") - total(before, "nv_llm_input_token_len") == sum(lengths)
    assert total(after, "nv_llm_output_token_len") - total(before, "nv_llm_output_token_len") == sum(outputs)
    # generation_requests counts requests past their context phase only: the long request seen
    # decoding alone (1, none in context), never more than the three; an iteration's stats stay
    # published until the next iteration, so idle shows the last one: the long request's last step
    assert (1.0, 0.0) in mid and max(g for g, _ in mid) <= 3
    assert gauge(after, "nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric",
                 "generation_requests") == 1
    assert gauge(after, "nv_trt_llm_request_metrics", "request_type", "context") == 0
    # the labels the backend publishes that this engine fills with its honest zeros
    assert gauge(after, "nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "reused") == 0
    assert gauge(after, "nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric",
                 "paused_requests") == 0
    assert '# TYPE nv_llm_input_token_len histogram' in after and '# TYPE nv_llm_output_token_len histogram' in after


@pytest.mark.server
def test_token_histograms_count_a_non_streamed_request_with_its_prompt_echoed(served):
    """Not streamed, prompt returned in the output: the output histogram still counts only the
    generated tokens (the backend subtracts the input there)."""
    from grok_deploy.serving.client import stream_request

    before = bucket_values(idle_text(served))
    prompt = list(range(5, 65))  # 60 tokens
    inputs = [tensor("input_ids", [prompt], np.int32), tensor("input_lengths", [[60]], np.int32),
              tensor("request_output_len", [[40]], np.int32), tensor("exclude_input_in_output", [[False]], np.bool_)]
    (result,) = list(stream_request(served.grpc_url, "tensorrt_llm", inputs))
    assert result.as_numpy("output_ids").shape == (1, 1, 100)  # the prompt and 40 new tokens
    after = bucket_values(idle_text(served))
    assert [a - b for a, b in zip(after[0], before[0])] == bucket_counts([60]) == [0, 0, 1, 1, 1, 1]
    assert [a - b for a, b in zip(after[1], before[1])] == bucket_counts([40]) == [0, 1, 1, 1, 1, 1]


def test_turn_stats_count_generation_only_after_the_context_phase(tiny_model):
    """The batcher's per-turn stats (the gauges' source): a request is in context in the turn that
    admits it and in generation from the next turn on; a late one joins in context."""
    from grok_deploy.model.engine import TorchEngine
    from grok_deploy.serving.triton_models.inflight import Scheduler, Seq
    from grok_deploy.serving.triton_models.params import Params

    class Sink:
        def __init__(self):
            self.n, self.done = 0, threading.Event()

        def cancelled(self):
            return False

        def tokens(self, seq, new, final):
            self.n += len(new)
            if final:
                self.done.set()

        def error(self, seq, message, code):
            self.done.set()

    turns, ended = [], []
    sched = Scheduler(TorchEngine(tiny_model, max_batch_size=4, max_seq_len=96), on_turn=turns.append,
                      on_end=lambda s: ended.append((len(s.params.prompt), len(s.out), s.reason))).start()
    try:
        a, b = Sink(), Sink()
        sched.submit(Seq(Params([5, 6, 7], 30), a, request_id="a"))
        while a.n < 5:
            time.sleep(0.001)
        sched.submit(Seq(Params([8, 9], 4), b, request_id="b"))
        assert a.done.wait(60) and b.done.wait(60)
    finally:
        sched.close()
    phases = [(t["context"], t["generation"]) for t in turns]
    assert phases[0] == (1, 0)                     # A admitted: prefill, not yet in generation
    assert (1, 1) in phases                        # B admitted while A decodes
    assert phases.index((1, 1)) > 0 and all(g <= 2 for _, g in phases)
    assert (0, 2) in phases and phases[-1] == (0, 1)  # both decoding, then A alone to its end
    assert all(t["paused"] == 0 for t in turns)
    assert sorted(ended) == [(2, 4, "length"), (3, 30, "length")]  # on_end once per sequence
