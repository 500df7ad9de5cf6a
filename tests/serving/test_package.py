"""package: strict template rendering and the model repository, parsed with Triton's ModelConfig."""
from __future__ import annotations

import hashlib
import json
import re
from importlib import resources

import pytest
from serving_fixtures import write_pipeline

from grok_deploy.errors import UserError
from grok_deploy.serving.package import MODELS, package, parse_config, render, template

# TYPE_INT64: the return_perf_metrics *_time_ns outputs; TYPE_UINT8: context_phase_params (1.x)
TYPES = {"TYPE_INT32", "TYPE_INT64", "TYPE_FP32", "TYPE_BOOL", "TYPE_UINT64", "TYPE_STRING", "TYPE_FP16", "TYPE_UINT8"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from grok_deploy.pipeline.schema import load_pipeline

    return load_pipeline(write_pipeline(tmp_path_factory.mktemp("pkg")))


@pytest.fixture(scope="module")
def repo(cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "triton_repo"
    package(cfg, out, tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=tiny_ckpt, engine_kind="torch")
    return out


def configs(repo) -> dict:
    return {m: parse_config((repo / m / "config.pbtxt").read_text(), m) for m in MODELS}


def io(config, kind="input") -> dict:
    from tritonclient.grpc import model_config_pb2 as pb

    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional if kind == "input" else None,
                     t.HasField("reshape"), getattr(t, "allow_ragged_batch", False))
            for t in getattr(config, kind)}


def test_render_is_strict():
    assert render("a: ${x} b: ${y}", {"x": 1, "y": "two"}) == "a: 1 b: two"
    with pytest.raises(UserError, match="unfilled template variable.*y"):
        render("a: ${x} b: ${y}", {"x": 1})
    with pytest.raises(UserError, match="unknown template variable.*z"):
        render("a: ${x}", {"x": 1, "z": 2})
    with pytest.raises(UserError, match=r"contains '\$\{'"):
        render("a: ${x}", {"x": "${y}"})


def test_every_template_is_package_data_and_fully_rendered(repo):
    names = sorted(p.name for p in resources.files("grok_deploy.serving").joinpath("templates").iterdir())
    assert {f"{m}.pbtxt" for m in MODELS} <= set(names) and "tensorrt_llm_python.pbtxt" in names
    for m in MODELS:
        text = (repo / m / "config.pbtxt").read_text()
        assert "${" not in text and "$" not in text, m
        assert re.findall(r"\$\{(\w+)\}", template(f"{m}.pbtxt"))  # they are templates


def test_repository_layout_tokenizer_and_manifest(repo, tiny_ckpt):
    man = json.loads((repo / "manifest.json").read_text())
    sha = hashlib.sha256((tiny_ckpt / "tokenizer.model").read_bytes()).hexdigest()
    assert man["tokenizer"]["sha256"] == sha and man["engine"] == {"kind": "torch", "dir": str(tiny_ckpt.resolve())}
    for m in MODELS:
        assert (repo / m / "1").is_dir() and man["models"][m]["config_sha256"]
    for m in ("preprocessing", "postprocessing"):
        assert hashlib.sha256((repo / m / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest() == sha
        names = sorted(p.name for p in (repo / m / "tokenizer").iterdir())  # and the Hugging Face folder
        assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert man["hf_tokenizer"] == "preprocessing/tokenizer"
    for m, code in (("preprocessing", "preprocessing.py"), ("tensorrt_llm", "tensorrt_llm.py"),
                    ("postprocessing", "postprocessing.py"), ("tensorrt_llm_bls", "tensorrt_llm_bls.py")):
        src = resources.files("grok_deploy.serving").joinpath("triton_models", code).read_text()
        assert (repo / m / "1" / "model.py").read_text() == src
    assert not (repo / "ensemble" / "1" / "model.py").exists()


def test_tensorrt_llm_contract(repo):
    c = configs(repo)["tensorrt_llm"]
    assert c.backend == "python" and not c.platform and c.max_batch_size == 8
    assert c.model_transaction_policy.decoupled and c.instance_group[0].count == 1
    assert c.dynamic_batching.preferred_batch_size == [8]
    ins = io(c)
    assert ins["input_ids"] == ("TYPE_INT32", [-1], True, False, True)
    assert ins["input_lengths"] == ("TYPE_INT32", [1], False, True, False)       # required, reshape []
    assert ins["request_output_len"] == ("TYPE_INT32", [1], False, True, False)
    # TensorRT-LLM 1.x names only (the C++ backend reads no min_length / random_seed)
    assert ins["seed"][:4] == ("TYPE_UINT64", [1], True, True) and ins["min_tokens"][:4] == ("TYPE_INT32", [1], True, True)
    assert "random_seed" not in ins and "min_length" not in ins
    assert ins["return_num_input_tokens"][:4] == ins["return_num_output_tokens"][:4] == ("TYPE_BOOL", [1], True, True)
    assert ins["return_perf_metrics"][:4] == ("TYPE_BOOL", [1], True, True)
    assert ins["guided_decoding_guide_type"][:2] == ins["guided_decoding_guide"][:2] == ("TYPE_STRING", [1])
    assert ins["lookahead_window_size"][:4] == ("TYPE_INT32", [1], True, True)
    assert ins["stop_words_list"] == ("TYPE_INT32", [2, -1], True, False, True)
    for name in ("temperature", "runtime_top_p", "len_penalty"):
        assert ins[name][:4] == ("TYPE_FP32", [1], True, True)
    for name in ("streaming", "stop", "exclude_input_in_output", "return_log_probs"):
        assert ins[name][:4] == ("TYPE_BOOL", [1], True, True)
    outs = io(c, "output")
    assert outs["output_ids"][:2] == ("TYPE_INT32", [-1, -1]) and outs["sequence_length"][:2] == ("TYPE_INT32", [-1])
    assert outs["generation_logits"][:2] == ("TYPE_FP32", [-1, -1, -1]) and outs["batch_index"][:2] == ("TYPE_INT32", [1])
    assert outs["num_input_tokens"][:2] == outs["num_output_tokens"][:2] == ("TYPE_INT32", [1])
    params = {k: v.string_value for k, v in c.parameters.items()}
    assert params["engine_kind"] == "torch" and params["max_input_len"] == "64" and params["max_seq_len"] == "160"


def test_ensemble_steps_and_renames(repo):
    c = configs(repo)["ensemble"]
    assert c.platform == "ensemble" and c.max_batch_size == 8
    ins = io(c)
    assert ins["text_input"][:3] == ("TYPE_STRING", [1], False) and ins["max_tokens"][:3] == ("TYPE_INT32", [1], False)
    assert all(v[2] for k, v in ins.items() if k not in ("text_input", "max_tokens"))  # the rest optional
    assert io(c, "output")["text_output"][:2] == ("TYPE_STRING", [-1])
    steps = {s.model_name: s for s in c.ensemble_scheduling.step}
    assert list(steps) == ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert all(s.model_version == -1 for s in steps.values())
    pre, llm, post = (dict(steps[m].input_map) for m in steps)
    assert pre["QUERY"] == "text_input" and pre["REQUEST_OUTPUT_LEN"] == "max_tokens"
    assert (llm["runtime_top_k"], llm["runtime_top_p"], llm["len_penalty"], llm["streaming"]) == \
        ("top_k", "top_p", "length_penalty", "stream")
    assert llm["input_ids"] == "_INPUT_ID" and llm["end_id"] == "_PREPROCESSOR_END_ID"
    # either spelling of min_tokens / seed goes through preprocessing (one value, the 1.x name)
    assert (pre["MIN_TOKENS"], pre["MIN_LENGTH"], pre["SEED"], pre["RANDOM_SEED"]) == \
        ("min_tokens", "min_length", "seed", "random_seed")
    assert (llm["min_tokens"], llm["seed"]) == ("_MIN_TOKENS", "_SEED") and "min_length" not in llm
    assert llm["return_perf_metrics"] == "return_perf_metrics" and llm["lookahead_ngram_size"] == "lookahead_ngram_size"
    assert dict(steps["tensorrt_llm"].output_map)["output_ids"] == "_TOKENS_BATCH"
    assert dict(steps["tensorrt_llm"].output_map)["first_token_time_ns"] == "first_token_time_ns"
    assert io(c, "output")["arrival_time_ns"][:2] == ("TYPE_INT64", [1])
    assert post == {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH", "SEQUENCE_KEY": "_SEQUENCE_KEY"}
    assert dict(steps["tensorrt_llm"].output_map)["grok_sequence_key"] == "_SEQUENCE_KEY"
    assert dict(steps["postprocessing"].output_map) == {"OUTPUT": "text_output"}
    # every name the ensemble maps exists in the step model's config, with the same dtype
    cfgs = configs(repo)
    for s in steps.values():
        model_in = io(cfgs[s.model_name])
        assert set(s.input_map) <= set(model_in), s.model_name
        assert set(s.output_map) <= set(io(cfgs[s.model_name], "output")), s.model_name


def test_python_models_and_bls(repo):
    c = configs(repo)
    pre = c["preprocessing"]
    params = {k: v.string_value for k, v in pre.parameters.items()}
    assert params == {"tokenizer_dir": "tokenizer", "add_special_tokens": "false"}  # no BOS for Grok
    assert io(pre)["QUERY"][:3] == ("TYPE_STRING", [1], False) and io(pre, "output")["STOP_WORDS_IDS"][1] == [2, -1]
    assert io(c["postprocessing"])["TOKENS_BATCH"][:2] == ("TYPE_INT32", [-1, -1])
    bls = c["tensorrt_llm_bls"]
    assert bls.backend == "python" and bls.model_transaction_policy.decoupled
    assert {k: v.string_value for k, v in bls.parameters.items()}["accumulate_tokens"] == "false"  # as upstream
    drafts = {"num_draft_tokens": ("TYPE_INT32", [1], True, False, False),
              "use_draft_logits": ("TYPE_BOOL", [1], True, False, False)}
    assert io(bls) == {**io(c["ensemble"]), **drafts} and io(bls, "output") == io(c["ensemble"], "output")
    for model in c.values():
        for kind in ("input", "output"):
            assert {v[0] for v in io(model, kind).values()} <= TYPES


def test_trtllm_variant(cfg, repo, tiny_ckpt, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text("{}")
    out = tmp_path / "repo"
    package(cfg, out, tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=engine, engine_kind="trtllm")
    c = parse_config((out / "tensorrt_llm" / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in c.parameters.items()}
    assert c.backend == "tensorrtllm" and params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(engine.resolve()) and params["kv_cache_free_gpu_mem_fraction"] == "0.9"
    assert not (out / "tensorrt_llm" / "1" / "model.py").exists()
    assert c.model_transaction_policy.decoupled and c.instance_group[0].kind == 2  # KIND_CPU
    py = configs(repo)["tensorrt_llm"]  # both variants keep the same I/O contract, plus the python
    # model's own grok_sequence_key (the ensemble's cancellation names its sequence with it)
    own = lambda ts: [t for t in ts if t.name != "grok_sequence_key"]  # noqa: E731
    assert list(c.input) == own(py.input) and list(c.output) == own(py.output)
    assert [t.name for t in py.output if t not in c.output] == ["grok_sequence_key"]
    ens = parse_config((out / "ensemble" / "config.pbtxt").read_text())  # the C++ backend: no key routed
    assert "_SEQUENCE_KEY" not in str(ens) and "_SEQUENCE_KEY" in str(configs(repo)["ensemble"])


def test_decoupled_off_and_bad_inputs(cfg, tiny_ckpt, tmp_path):
    cfg2 = cfg.model_copy(deep=True)
    cfg2.triton.decoupled = False
    package(cfg2, tmp_path / "r", tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=tiny_ckpt, engine_kind="torch")
    assert not parse_config((tmp_path / "r" / "tensorrt_llm" / "config.pbtxt").read_text()).model_transaction_policy.decoupled
    with pytest.raises(UserError, match="no manifest.json"):
        package(cfg, tmp_path / "x", tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=tmp_path, engine_kind="onnxruntime")
    with pytest.raises(UserError, match="tokenizer.model not found"):
        package(cfg, tmp_path / "x", tokenizer=tmp_path / "nope.model", engine_dir=tiny_ckpt, engine_kind="torch")
    with pytest.raises(UserError, match="engine kind"):
        package(cfg, tmp_path / "x", tokenizer=tiny_ckpt / "tokenizer.model", engine_dir=tiny_ckpt, engine_kind="tf")
    assert not (tmp_path / "x").exists()


def test_parse_config_rejects_an_unfilled_integer():
    with pytest.raises(UserError, match="not a valid Triton model config"):
        parse_config('name: "m" max_batch_size: ${triton_max_batch_size}')
