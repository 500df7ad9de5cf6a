"""The in-flight batcher, request parsing and the BLS text deltas, in-process (no Triton server):
the python-backend code of serving/triton_models run against the reference model."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_PROMPT
from serving_fixtures import PROMPTS, ref, run_sequences

from grok_deploy.serving.triton_models.params import BadRequest, Params, parse_request, word_lists

pytestmark = pytest.mark.timeout(180)


# --- the in-flight batcher without Triton -------------------------------------------------------

class ListSink:
    def __init__(self):
        self.chunks, self.finals, self.errors, self.cancel = [], 0, [], False

    def cancelled(self):
        return self.cancel

    def tokens(self, seq, new, final):
        self.chunks.append(list(new))
        self.finals += final

    def error(self, seq, message, code):
        self.errors.append((message, code))
        self.finals += 1


@pytest.fixture(scope="module")
def torch_engine(tiny_model):
    from grok_deploy.model.engine import TorchEngine

    return TorchEngine(tiny_model, max_batch_size=4, max_seq_len=96)


def run_all(engine, params: list[Params], sinks=None, join_after: int = 0):
    """Every sequence run to its end (serving_fixtures.run_sequences); returns (sinks, scheduler)."""
    sinks = sinks or [ListSink() for _ in params]
    return sinks, run_sequences(engine, params, sinks, join_after)


def test_scheduler_batches_more_than_max_and_matches_reference(torch_engine, tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS[:6]]  # 6 sequences, 4 slots
    params = [Params(p, 5 + i, temperature=1.0, top_p=1.0, seed=i) for i, p in enumerate(prompts)]
    sinks, sched = run_all(torch_engine, params)
    for i, (p, s) in enumerate(zip(prompts, sinks)):
        assert s.finals == 1 and not s.errors
        assert sum(s.chunks, []) == ref(tiny_model, p, 5 + i, temperature=1.0, seed=i)
    assert max(sched.batch_sizes) == 4  # shared decode steps, capped by the engine's slots
    assert not torch_engine.slots.slot  # every sequence removed


def test_scheduler_late_sequence_joins_the_running_batch(torch_engine, tiny_model):
    a, b = [5, 6, 7, 8, 9], [300, 301]
    sinks, sched = run_all(torch_engine, [Params(a, 40), Params(b, 5)], join_after=3)
    assert sum(sinks[0].chunks, []) == ref(tiny_model, a, 40) and sum(sinks[1].chunks, []) == ref(tiny_model, b, 5)
    assert sched.batch_sizes[2] == 4 and sched.batch_sizes[1] == 39 - 4  # B's 4 steps were shared with A


def test_scheduler_end_id_stop_words_min_tokens_cancel(torch_engine, tiny_model, tiny_tokenizer):
    p = tiny_tokenizer.encode(TEST_PROMPT)
    full = ref(tiny_model, p, 8, temperature=1.0, seed=3)
    cancelled = ListSink()
    cancelled.cancel = True
    params = [Params(p, 8, temperature=1.0, top_p=1.0, seed=3, end_id=full[4]),
              Params(p, 8, temperature=1.0, top_p=1.0, seed=3, stop_words=[full[2:4]]),
              Params(p, 8, temperature=1.0, top_p=1.0, seed=3, bad_words=[[full[0]]]),
              Params(p, 8),
              Params(p, 8, end_id=ref(tiny_model, p, 1)[0], min_tokens=3)]  # greedy would end at once
    sinks, _ = run_all(torch_engine, params, [ListSink(), ListSink(), ListSink(), cancelled, ListSink()])
    first_end = full.index(full[4])
    assert sum(sinks[0].chunks, []) == full[:first_end]          # end token not returned
    got = sum(sinks[1].chunks, [])
    assert got[-2:] == full[2:4] and len(got) <= 4               # stop word included, then stop
    assert sum(sinks[2].chunks, [])[0] != full[0]                # banned first token
    assert cancelled.finals == 1 and sum(cancelled.chunks, []) == []
    assert len(sum(sinks[4].chunks, [])) >= 3  # end_id masked for the first min_tokens tokens


def test_parse_request_refusals():
    ok = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([3], np.int32),
          "request_output_len": np.array([4], np.int32)}
    assert parse_request(ok, 8, 1024, True)[0].prompt == [5, 6, 7]
    bad = [({"input_lengths": None}, "input_lengths"), ({"input_lengths": np.array([0], np.int32)}, "empty"),
           ({"request_output_len": np.array([0], np.int32)}, "request_output_len"),
           ({"input_ids": np.zeros((1, 9), np.int32), "input_lengths": np.array([9], np.int32)}, "maximum input length"),
           ({"input_ids": np.array([[5, 6, 7]], np.int64)}, "int32"),
           ({"streaming": np.array([True])}, None), ({"beam_width": np.array([2], np.int32)}, "beam_width"),
           ({"input_ids": np.array([[5, 6, 7000]], np.int32)}, "input_ids")]
    for change, words in bad:
        inputs = {k: v for k, v in {**ok, **change}.items() if v is not None}
        with pytest.raises(BadRequest, match=words or "decoupled") as e:
            parse_request(inputs, 8, 1024, decoupled=words is not None)
        assert e.value.code == ("UNSUPPORTED" if words == "beam_width" else "INVALID_ARG")
    assert word_lists(np.array([[7, 8, 9, 0], [2, 3, -1, -1]], np.int32)) == [[7, 8], [9]]


def bls_text_delta():
    """The BLS model's text_delta (its module imports triton_python_backend_utils: stub it)."""
    import sys
    import types

    sys.modules.setdefault("triton_python_backend_utils", types.SimpleNamespace(TRITONSERVER_RESPONSE_COMPLETE_FINAL=1))
    from grok_deploy.serving.triton_models.tensorrt_llm_bls import text_delta

    return text_delta


def test_bls_text_delta_holds_back_partial_characters():
    text_delta = bls_text_delta()
    assert text_delta("a \ufffd\ufffd", 1, False) == (" ", 2)
    assert text_delta("a 中", 2, False) == ("中", 3)
    assert text_delta("a \ufffd", 2, True) == ("\ufffd", 3)


def test_accumulated_decoding_streams_exact_text(tiny_tokenizer):
    """What the BLS does when it streams, on the real SentencePiece model: spaces and
    byte-fallback characters (中文 is three byte pieces each) come out exactly."""
    text_delta = bls_text_delta()
    ids = tiny_tokenizer.encode("Naïve café 中文 and 🙂 ok")
    sent, chunks = 0, []
    for i in range(1, len(ids) + 1):
        delta, sent = text_delta(tiny_tokenizer.decode(ids[:i]), sent, i == len(ids))
        chunks.append(delta)
    assert "".join(chunks) == tiny_tokenizer.decode(ids) and "\ufffd" not in "".join(chunks)
    assert "".join(tiny_tokenizer.decode([t]) for t in ids) != tiny_tokenizer.decode(ids)  # chunk-wise loses text


# --- the real server (torch engine: the reference model, exact) --------------------------------
