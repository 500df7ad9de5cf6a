"""TensorRT-LLM 1.2.1's serving contract (issue 20 items 1, 2, 4, 6; issue 19 item 3).

The upstream side is written down here as read (NVIDIA/TensorRT-LLM `triton_backend/`, the newest
stored 1.x files): the config templates of tensorrt_llm (@0c8de69a), ensemble (@2a9abd95) and
tensorrt_llm_bls (@0193dbd4), the C++ backend's InputFieldsNames (src/utils.h @89fd9b74), and
Triton's OpenAI frontend request (triton-inference-server/server python/openai/openai_frontend/
engine/utils/triton.py `_create_trtllm_generate_request` and `_get_usage_from_response`).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_PROMPT
from serving_fixtures import served, write_pipeline  # noqa: F401 (fixture)

from grok_deploy.model.generate import generate
from grok_deploy.serving.client import ServerError, query, stream_request, tensor
from grok_deploy.serving.package import MODELS, package, parse_config


def table(text: str) -> dict:
    """"name TYPE dims; ..." -> {name: (TYPE_x, [dims])}."""
    out = {}
    for row in filter(None, (r.strip() for r in text.split(";"))):
        name, dtype, *dims = row.split()
        out[name] = (f"TYPE_{dtype}", [int(d) for d in dims] or [1])
    return out


# tensorrt_llm/config.pbtxt @0c8de69a (FP16 prompt table: its ${prompt_embedding_table_data_type});
# multimodal inputs left out: cross_attention_mask, mrope_rotary_cos_sin, mrope_position_deltas,
# skip_cross_attn_blocks
UP_LLM_IN = table("""input_ids INT32 -1; encoder_input_features FP16 -1 -1; encoder_output_lengths INT32;
input_lengths INT32; request_output_len INT32; num_return_sequences INT32; draft_input_ids INT32 -1;
decoder_input_ids INT32 -1; decoder_input_lengths INT32; draft_logits FP32 -1 -1; draft_acceptance_threshold FP32;
end_id INT32; pad_id INT32; stop_words_list INT32 2 -1; bad_words_list INT32 2 -1; embedding_bias FP32 -1;
beam_width INT32; temperature FP32; runtime_top_k INT32; runtime_top_p FP32; runtime_top_p_min FP32;
runtime_top_p_decay FP32; runtime_top_p_reset_ids INT32; len_penalty FP32; early_stopping BOOL;
repetition_penalty FP32; min_tokens INT32; beam_search_diversity_rate FP32; presence_penalty FP32;
frequency_penalty FP32; seed UINT64; return_log_probs BOOL; return_context_logits BOOL;
return_generation_logits BOOL; return_perf_metrics BOOL; return_num_input_tokens BOOL;
return_num_output_tokens BOOL; exclude_input_in_output BOOL; stop BOOL; streaming BOOL;
prompt_embedding_table FP16 -1 -1; prompt_table_extra_ids UINT64 -1; prompt_vocab_size INT32;
lora_task_id UINT64; lora_weights FP16 -1 -1; lora_config INT32 -1 3; context_phase_params UINT8 -1;
retention_token_range_starts INT32 -1; retention_token_range_ends INT32 -1;
retention_token_range_priorities INT32 -1; retention_token_range_durations_ms INT32 -1;
retention_decode_priority INT32; retention_decode_duration_ms INT32; guided_decoding_guide_type STRING;
guided_decoding_guide STRING; lookahead_window_size INT32; lookahead_ngram_size INT32;
lookahead_verification_set_size INT32""")
PERF = """kv_cache_alloc_new_blocks INT32; kv_cache_reused_blocks INT32; kv_cache_alloc_total_blocks INT32;
arrival_time_ns INT64; first_scheduled_time_ns INT64; first_token_time_ns INT64; last_token_time_ns INT64;
acceptance_rate FP32; total_accepted_draft_tokens INT32; total_draft_tokens INT32; num_input_tokens INT32;
num_output_tokens INT32"""
UP_LLM_OUT = table(f"""output_ids INT32 -1 -1; sequence_length INT32 -1; cum_log_probs FP32 -1;
output_log_probs FP32 -1 -1; context_logits FP32 -1 -1; generation_logits FP32 -1 -1 -1; batch_index INT32;
sequence_index INT32; context_phase_params UINT8 -1; {PERF}""")
# ensemble/config.pbtxt @2a9abd95 and tensorrt_llm_bls/config.pbtxt @0193dbd4 (whose image/video
# inputs are multimodal: left out)
UP_ENSEMBLE_IN = table("""text_input STRING; decoder_text_input STRING; max_tokens INT32; num_return_sequences INT32;
bad_words STRING -1; stop_words STRING -1; exclude_input_in_output BOOL; end_id INT32; pad_id INT32; top_k INT32;
top_p FP32; temperature FP32; length_penalty FP32; repetition_penalty FP32; min_tokens INT32; presence_penalty FP32;
frequency_penalty FP32; seed UINT64; return_log_probs BOOL; return_context_logits BOOL;
return_generation_logits BOOL; return_perf_metrics BOOL; return_num_input_tokens BOOL;
return_num_output_tokens BOOL; beam_width INT32; stream BOOL; prompt_embedding_table FP16 -1 -1;
prompt_table_extra_id UINT64; prompt_vocab_size INT32; embedding_bias_words STRING -1;
embedding_bias_weights FP32 -1; lora_task_id UINT64; lora_weights FP16 -1 -1; lora_config INT32 -1 3;
guided_decoding_guide_type STRING; guided_decoding_guide STRING""")
UP_BLS_IN = {**UP_ENSEMBLE_IN, **table("num_draft_tokens INT32; use_draft_logits BOOL")}
UP_TEXT_OUT = table(f"""text_output STRING -1; cum_log_probs FP32 -1; output_log_probs FP32 -1 -1;
context_logits FP32 -1 -1; generation_logits FP32 -1 -1 -1; batch_index INT32; sequence_index INT32; {PERF}""")
# preprocessing/config.pbtxt @08dc37e3 (IMAGE_*, IMAGES, VIDEO_BYTES and the PIXEL_VALUES... outputs
# are multimodal: left out) and postprocessing/config.pbtxt @89fd9b74
UP_PRE_IN = table("""QUERY STRING; DECODER_QUERY STRING; REQUEST_OUTPUT_LEN INT32; BAD_WORDS_DICT STRING -1;
STOP_WORDS_DICT STRING -1; EMBEDDING_BIAS_WORDS STRING -1; EMBEDDING_BIAS_WEIGHTS FP32 -1; END_ID INT32;
PAD_ID INT32; PROMPT_TABLE_EXTRA_ID UINT64""")
UP_PRE_OUT = table("""INPUT_ID INT32 -1; REQUEST_INPUT_LEN INT32; DECODER_INPUT_ID INT32 -1;
REQUEST_DECODER_INPUT_LEN INT32; BAD_WORDS_IDS INT32 2 -1; STOP_WORDS_IDS INT32 2 -1; EMBEDDING_BIAS FP32 -1;
REQUEST_OUTPUT_LEN INT32 -1; OUT_END_ID INT32; OUT_PAD_ID INT32; OUT_PROMPT_TABLE_EXTRA_IDS UINT64 -1""")
# preprocessing's own additions: either spelling of min_tokens / seed in, the 1.x one out
EXTRA_PRE = (table("MIN_TOKENS INT32; MIN_LENGTH INT32; SEED UINT64; RANDOM_SEED UINT64"),
             table("OUT_MIN_TOKENS INT32; OUT_SEED UINT64"))
UP_POST = (table("TOKENS_BATCH INT32 -1 -1; SEQUENCE_LENGTH INT32 -1"), table("OUTPUT STRING -1"))
# inputs this project declares beyond 1.2.1's ensemble/BLS: the <= v0.19 spellings (mapped) and the
# lookahead inputs (refused unless the engine has lookahead decoding, as the backend does)
EXTRA_TEXT_IN = {"min_length", "random_seed", "lookahead_window_size", "lookahead_ngram_size",
                 "lookahead_verification_set_size"}

# The C++ backend's InputFieldsNames (src/utils.h @89fd9b74; runtime_top_k_min [sic] is its name for
# topPMin) plus kStopInputTensorName and kStreamingInputTensorName: every input it reads.
CPP_READS = set("""input_ids encoder_input_features encoder_output_lengths input_lengths decoder_input_ids
request_output_len no_repeat_ngram_size num_return_sequences end_id pad_id bad_words_list stop_words_list
embedding_bias context_phase_params cross_attention_mask skip_cross_attn_blocks multimodal_embedding
return_log_probs return_generation_logits return_context_logits exclude_input_in_output return_perf_metrics
return_num_input_tokens return_num_output_tokens return_kv_cache_reuse_stats beam_width runtime_top_k
runtime_top_p runtime_top_k_min runtime_top_p_decay runtime_top_p_reset_ids temperature len_penalty
early_stopping repetition_penalty min_tokens beam_search_diversity_rate presence_penalty frequency_penalty seed
prompt_embedding_table prompt_table_extra_ids mrope_rotary_cos_sin mrope_position_deltas multimodal_hashes
multimodal_positions multimodal_lengths lora_task_id lora_weights lora_config draft_input_ids draft_logits
draft_acceptance_threshold retention_token_range_starts retention_token_range_ends
retention_token_range_priorities retention_token_range_durations_ms retention_decode_priority
retention_decode_duration_ms guided_decoding_guide_type guided_decoding_guide lookahead_window_size
lookahead_ngram_size lookahead_verification_set_size stop streaming""".split())
# declared by 1.2.1's own tensorrt_llm template yet read by none of its code: the ensemble always sends
# decoder_input_lengths (a decoder-only engine has none) and prompt_vocab_size (the executor takes it
# from the table's shape); runtime_top_p_min is read under the misspelt runtime_top_k_min
UPSTREAM_UNREAD = {"decoder_input_lengths", "prompt_vocab_size", "runtime_top_p_min"}


@pytest.fixture(scope="module")
def repos(tiny_ckpt, tmp_path_factory):
    """{variant: {model: ModelConfig}}: the python stand-in (CPU) and the C++ backend's (GPU) repos."""
    from grok_deploy.pipeline.schema import load_pipeline

    folder = tmp_path_factory.mktemp("r121")
    cfg = load_pipeline(write_pipeline(folder))
    engine = folder / "engine"
    engine.mkdir()
    (engine / "config.json").write_text("{}")
    out = {}
    for variant, kind, edir in (("cpu", "torch", tiny_ckpt), ("gpu", "trtllm", engine)):
        package(cfg, folder / variant, tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=edir, engine_kind=kind)
        out[variant] = {m: parse_config((folder / variant / m / "config.pbtxt").read_text(), m) for m in MODELS}
    return out


def io(config, kind: str = "input") -> dict:
    from tritonclient.grpc import model_config_pb2 as pb

    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, kind)}


# the python tensorrt_llm's own sequence key (issue 22.4): an extra output the ensemble routes to
# postprocessing's optional SEQUENCE_KEY, and an optional input of `stop`, so an ensemble's cancellation
# ends its own sequence only; the C++ backend has neither
PYTHON_ONLY = {"grok_sequence_key": ("TYPE_UINT64", [1])}
SEQUENCE_KEY_IN = {"SEQUENCE_KEY": ("TYPE_UINT64", [1])}


def llm_io(config, kind: str = "input") -> dict:
    """io() without the python-only sequence key."""
    return {k: v for k, v in io(config, kind).items() if k not in PYTHON_ONLY}


def test_every_model_declares_the_121_templates_io(repos):
    assert PYTHON_ONLY.items() <= io(repos["cpu"]["tensorrt_llm"], "output").items()
    assert PYTHON_ONLY.items() <= io(repos["cpu"]["tensorrt_llm"]).items()
    gpu = repos["gpu"]["tensorrt_llm"]
    assert not set(PYTHON_ONLY) & (set(io(gpu)) | set(io(gpu, "output")))
    for variant in ("cpu", "gpu"):
        c = repos[variant]
        assert llm_io(c["tensorrt_llm"]) == UP_LLM_IN and llm_io(c["tensorrt_llm"], "output") == UP_LLM_OUT
        for model, upstream in (("ensemble", UP_ENSEMBLE_IN), ("tensorrt_llm_bls", UP_BLS_IN)):
            ins = io(c[model])
            assert {k: ins[k] for k in upstream} == upstream, model
            assert set(ins) - set(upstream) == EXTRA_TEXT_IN, model
            assert io(c[model], "output") == UP_TEXT_OUT, model
        assert (io(c["preprocessing"]), io(c["preprocessing"], "output")) == \
            ({**UP_PRE_IN, **EXTRA_PRE[0]}, {**UP_PRE_OUT, **EXTRA_PRE[1]})
        assert (io(c["postprocessing"]), io(c["postprocessing"], "output")) == ({**UP_POST[0], **SEQUENCE_KEY_IN},
                                                                                 UP_POST[1])
    # the CPU stand-in and the C++ backend's config: the same names, dtypes and dims
    assert llm_io(repos["cpu"]["tensorrt_llm"]) == io(repos["gpu"]["tensorrt_llm"])


def test_gpu_variant_declares_only_what_the_cpp_backend_reads(repos):
    declared = set(io(repos["gpu"]["tensorrt_llm"]))
    assert declared - CPP_READS == UPSTREAM_UNREAD
    assert not {"min_length", "random_seed"} & declared  # they would be dropped unread: mapped instead


def test_old_spellings_reach_the_engine_under_its_names(repos):
    """Follow min_length and random_seed through the GPU ensemble's maps: ensemble input ->
    preprocessing input -> (one_spelling) preprocessing output -> ensemble tensor -> tensorrt_llm."""
    import sys
    import types

    # the model file imports triton_python_backend_utils at the top (the server provides it): stub it
    sys.modules.setdefault("triton_python_backend_utils", types.SimpleNamespace(TRITONSERVER_RESPONSE_COMPLETE_FINAL=1))
    from grok_deploy.serving.triton_models import preprocessing

    steps = {s.model_name: s for s in repos["gpu"]["ensemble"].ensemble_scheduling.step}
    pre_in = {v: k for k, v in steps["preprocessing"].input_map.items()}      # ensemble tensor -> its input
    pre_out = dict(steps["preprocessing"].output_map)                          # its output -> ensemble tensor
    llm_in = {v: k for k, v in steps["tensorrt_llm"].input_map.items()}      # ensemble tensor -> engine input
    produced = {"MIN_LENGTH": "OUT_MIN_TOKENS", "MIN_TOKENS": "OUT_MIN_TOKENS", "RANDOM_SEED": "OUT_SEED",
                "SEED": "OUT_SEED"}  # preprocessing.py's _one: each pair becomes one output
    for sent, engine_name in (("min_length", "min_tokens"), ("min_tokens", "min_tokens"),
                              ("random_seed", "seed"), ("seed", "seed")):
        assert llm_in[pre_out[produced[pre_in[sent]]]] == engine_name, sent
    assert "min_length" not in llm_in and "random_seed" not in llm_in
    # the rule preprocessing applies, and its refusal
    a = np.array([[4]], np.int32)
    assert preprocessing.one_spelling(None, a, "min_tokens", "min_length") is a
    assert preprocessing.one_spelling(a, a.copy(), "min_tokens", "min_length") is a
    with pytest.raises(ValueError, match="'min_length' and 'min_tokens' are two spellings of one input"):
        preprocessing.one_spelling(a, a + 1, "min_tokens", "min_length")


def test_bls_accumulate_tokens_follows_the_pipeline(tiny_ckpt, tmp_path):
    from grok_deploy.pipeline.schema import load_pipeline

    for extra, want, echo in (("", "false", "false"),
                              ("triton:\n  bls_accumulate_tokens: true\nserver:\n  openai_port: 9000\n", "true", "true")):
        cfg = load_pipeline(write_pipeline(tmp_path / want, extra))
        package(cfg, tmp_path / want / "r", tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=tiny_ckpt,
                engine_kind="torch")
        bls = parse_config((tmp_path / want / "r" / "tensorrt_llm_bls" / "config.pbtxt").read_text())
        llm = parse_config((tmp_path / want / "r" / "tensorrt_llm" / "config.pbtxt").read_text())
        assert bls.parameters["accumulate_tokens"].string_value == want
        # with the OpenAI frontend a chat (no `echo`, so no exclude_input_in_output) must not echo the prompt
        assert llm.parameters["exclude_input_in_output"].string_value == echo


# --- the real server ----------------------------------------------------------------------------

def openai_request(prompt: str, stream: bool, max_tokens: int, **optional) -> list:
    """`_create_trtllm_generate_request`'s inputs, names, dtypes and [1, 1] shapes as it builds
    them (text_input [[prompt]], stream, max_tokens int32, stop_words [request.stop], top_p /
    penalties / temperature float32, seed uint64, exclude_input_in_output from `echo`, and
    return_num_input_tokens / return_num_output_tokens [[True]])."""
    inputs = [tensor("text_input", [[prompt.encode()]], object), tensor("stream", [[stream]], np.bool_),
              tensor("max_tokens", [[max_tokens]], np.int32)]
    dtypes = {"top_p": np.float32, "frequency_penalty": np.float32, "presence_penalty": np.float32,
              "seed": np.uint64, "temperature": np.float32, "exclude_input_in_output": np.bool_}
    if "stop" in optional:
        inputs.append(tensor("stop_words", [[w.encode() for w in optional.pop("stop")]], object))
    for name in ("guided_decoding_guide_type", "guided_decoding_guide"):
        if name in optional:
            inputs.append(tensor(name, [[optional.pop(name).encode()]], object))
    inputs += [tensor(k, [[v]], dtypes[k]) for k, v in optional.items()]
    return inputs + [tensor("return_num_input_tokens", [[True]], np.bool_),
                     tensor("return_num_output_tokens", [[True]], np.bool_)]


def usage(responses) -> tuple[int, int]:
    """The frontend's usage: prompt tokens from the first response that has both counts (INT32
    or UINT32), completion tokens summed over the responses (_StreamingUsageAccumulator)."""
    prompt, completion, seen = None, 0, False
    for r in responses:
        n_in, n_out = r.as_numpy("num_input_tokens"), r.as_numpy("num_output_tokens")
        if n_in is None or n_out is None:
            continue
        assert n_in.dtype == n_out.dtype == np.int32 and n_in.shape == n_out.shape == (1, 1)
        prompt = int(n_in[0, 0]) if not seen else prompt
        completion, seen = completion + int(n_out[0, 0]), True
    return prompt, completion


@pytest.mark.server
@pytest.mark.timeout(240)
def test_openai_frontend_request_on_ensemble_and_bls(served, tiny_model, tiny_tokenizer):
    prompt = "The quick brown fox"
    ids = tiny_tokenizer.encode(prompt)
    want = generate(tiny_model, [ids], 10).output_ids[0]  # temperature 0: greedy
    stop = "zqxj vwpk"  # a stop word the output does not contain
    assert stop not in tiny_tokenizer.decode(want)
    completion = dict(stop=[stop], top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=3,
                      temperature=0.0, exclude_input_in_output=True)  # /v1/completions with echo=false
    for model in ("ensemble", "tensorrt_llm_bls"):
        whole = list(stream_request(served.grpc_url, model, openai_request(prompt, False, 10, **completion)))
        assert len(whole) == 1  # _validate_triton_responses_non_streaming: one data response
        assert whole[0].as_numpy("text_output").shape == (1,)  # _to_string: exactly one string
        assert whole[0].as_numpy("text_output")[0].decode() == tiny_tokenizer.decode(want)
        assert usage(whole) == (len(ids), len(want))
        chunks = list(stream_request(served.grpc_url, model, openai_request(prompt, True, 10, **completion)))
        text = "".join(r.as_numpy("text_output")[0].decode() for r in chunks)  # the frontend appends deltas
        if model == "tensorrt_llm_bls":  # decoded from all ids so far: the exact text
            assert text == tiny_tokenizer.decode(want)
        else:  # the stateless postprocessing decodes each token alone (as TensorRT-LLM's)
            assert text == "".join(tiny_tokenizer.decode([t]) for t in want)
        assert usage(chunks) == (len(ids), len(want))
        # a chat request: no exclude_input_in_output (no `echo`); this repo's default echoes the prompt
        chat = list(stream_request(served.grpc_url, model, openai_request(prompt, False, 4, temperature=0.0)))
        assert usage(chat) == (len(ids), 4)
    # guided decoding (a chat with a named tool): refused, one clean line
    for model in ("ensemble", "tensorrt_llm_bls"):
        with pytest.raises(ServerError) as e:
            list(stream_request(served.grpc_url, model, openai_request(
                prompt, False, 4, guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "object"}')))
        assert "guided decoding needs a guided_decoding_backend" in str(e.value)
        assert ".py(" not in str(e.value) and "_0_0" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.server
def test_bls_counts_tokens_when_responses_are_held_back(served):
    """Byte-fallback pieces (中文: three byte pieces each) make responses that end inside a UTF-8
    character; the BLS holds them back, and num_output_tokens still adds up to max_tokens."""
    inputs = openai_request("x", True, 9, temperature=1.0, top_p=1.0, seed=1, exclude_input_in_output=True)
    inputs += [tensor("embedding_bias_words", [["中文".encode()]], object),
               tensor("embedding_bias_weights", [[1e4]], np.float32), tensor("end_id", [[-1]], np.int32)]
    chunks = list(stream_request(served.grpc_url, "tensorrt_llm_bls", inputs))
    assert len(chunks) < 9 and usage(chunks)[1] == 9  # fewer responses than tokens, every token counted


@pytest.mark.server
def test_min_length_reaches_the_engine_through_ensemble_and_bls(served, tiny_model, tiny_tokenizer):
    first = generate(tiny_model, [tiny_tokenizer.encode(TEST_PROMPT)], 1).output_ids[0][0]
    for model in ("ensemble", "tensorrt_llm_bls"):
        kw = dict(end_id=first, model=model, stream=True)
        assert query(served.grpc_url, TEST_PROMPT, 4, **kw)["text"] == ""  # stops at once on end_id
        # tensorrt_llm declares no min_length: honoured only because it arrived as min_tokens
        assert len(query(served.grpc_url, TEST_PROMPT, 4, min_length=4, **kw)["text"]) > 0
        with pytest.raises(ServerError, match="'min_length' and 'min_tokens' are two spellings of one input"):
            query(served.grpc_url, TEST_PROMPT, 4, min_length=4, min_tokens=3, **kw)


@pytest.mark.server
def test_refusals_name_the_model_in_one_line(served):
    base = [tensor("input_ids", [[5, 6, 7]], np.int32), tensor("input_lengths", [[3]], np.int32),
            tensor("request_output_len", [[2]], np.int32)]
    for extra, why in (([tensor("draft_input_ids", [[1, 2]], np.int32)], "input 'draft_input_ids' is not supported"),
                       ([tensor("context_phase_params", [[1, 2]], np.uint8)], "input 'context_phase_params'"),
                       ([tensor("input_lengths", [[0]], np.int32)], "empty prompt")):
        inputs = [t for t in base if t.name() not in {x.name() for x in extra}] + extra
        with pytest.raises(ServerError) as e:
            list(stream_request(served.grpc_url, "tensorrt_llm", inputs))
        msg = str(e.value)
        assert msg.startswith("tensorrt_llm: ") and why in msg, msg
        assert ".py(" not in msg and "_0_0" not in msg and "Traceback" not in msg and "\n" not in msg


@pytest.mark.server
@pytest.mark.timeout(300)
def test_bench_on_the_bls_counts_tokens(served, tiny_ckpt, tmp_path, capsys):
    from grok_deploy.cli import main

    pipeline = str(write_pipeline(tmp_path))
    assert main(["bench", pipeline, "--url", served.grpc_url, "--tokenizer", str(tiny_ckpt / "tokenizer.model"),
                 "--model", "tensorrt_llm_bls", "--concurrency", "1,4", "--requests", "8", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert [r["output_tokens"] for r in doc["results"]] == [8 * doc["output_tokens"]] * 2
    assert doc["token_count"] == "num_output_tokens of the streamed responses"


@pytest.mark.server
@pytest.mark.timeout(300)
def test_bls_with_accumulate_tokens(tiny_ckpt, tiny_model, tiny_tokenizer, tmp_path):
    """triton.bls_accumulate_tokens: true: every streamed response is the whole text so far; the
    token counts still add up, and client.query reads the parameter from the model's config."""
    from serving_fixtures import make_repo, start_server

    cfg, repo = make_repo(tmp_path, tiny_ckpt, extra="triton:\n  bls_accumulate_tokens: true\n")
    server = start_server(cfg, repo)
    try:
        ids = tiny_tokenizer.encode(TEST_PROMPT)
        want = generate(tiny_model, [ids], 10).output_ids[0]
        chunks = list(stream_request(server.grpc_url, "tensorrt_llm_bls", openai_request(
            TEST_PROMPT, True, 10, temperature=0.0, exclude_input_in_output=True)))
        texts = [r.as_numpy("text_output")[0].decode() for r in chunks]
        assert texts[-1] == tiny_tokenizer.decode(want) and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert usage(chunks) == (len(ids), len(want))
        got = query(server.grpc_url, TEST_PROMPT, 10, stream=True, model="tensorrt_llm_bls", end_id=-1)
        assert got["text"] == tiny_tokenizer.decode(want)
    finally:
        server.stop()
