"""pipeline.yaml schema: the shipped pipelines load; malformed ones give exit 2 and one `error:`
line naming the key and its YAML line, through the real CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grok_deploy.cli import main
from grok_deploy.errors import UserError
from grok_deploy.model.config import GrokConfig
from grok_deploy.pipeline.schema import load_pipeline, parallel_problem

ROOT = Path(__file__).resolve().parents[2]

# (yaml, key in the message, its line, other words the message must contain)
BAD = {
    "unknown top-level key": ("model:\n  preset: grok-1-tiny\nenigne:\n  backend: onnxruntime\n",
                              "enigne", 3, ["unknown key", "did you mean 'engine'"]),
    "unknown nested key": ("engine:\n  backend: onnxruntime\n  max_batch: 4\n",
                           "engine.max_batch", 3, ["unknown key", "max_batch_size"]),
    "string for int": ("parallel:\n  tp: two\n", "parallel.tp", 2, ["valid integer", "'two'"]),
    "bool for int": ("parallel:\n  pp: 1\n  tp: true\n", "parallel.tp", 3, ["valid integer"]),
    "string for bool": ("triton:\n  decoupled: maybe\n", "triton.decoupled", 2, ["valid boolean"]),
    "unknown quantization": ("dtype: bfloat16\nquantization: int4\n", "quantization", 2, ["'w8a16' or 'none'"]),
    "unknown source format": ("model:\n  source:\n    format: gguf\n", "model.source.format", 3, ["'synthetic'"]),
    "section not a mapping": ("engine: 5\n", "engine", 1, ["should be a mapping", "got 5"]),
    "prompts not a list": ("verify:\n  max_tokens: 4\n  prompts: hello\n", "verify.prompts", 3, ["valid list"]),
    "zero batch": ("engine:\n  max_batch_size: 0\n", "engine.max_batch_size", 2, ["greater than 0"]),
    "kv fraction over 1": ("triton:\n  kv_cache_free_gpu_mem_fraction: 1.5\n",
                           "triton.kv_cache_free_gpu_mem_fraction", 2, ["less than or equal to 1"]),
    "tp not dividing kv heads": ("parallel:\n  tp: 3\n", "parallel.tp", 2, ["8 KV heads"]),
    "tp 16 on grok-1": ("model:\n  preset: grok-1\nparallel:\n  tp: 16\n", "parallel.tp", 4, ["tp 16", "8 KV heads"]),
    "moe_tp x moe_ep != tp": ("parallel:\n  tp: 2\n  moe_tp: 2\n  moe_ep: 2\n", "parallel.moe_tp", 3,
                              ["moe_tp 2 x moe_ep 2 = 4 must equal tp 2"]),
    "pp not dividing layers": ("parallel:\n  pp: 5\n", "parallel.pp", 2, ["12 layers"]),
    "input longer than sequence": ("engine:\n  max_seq_len: 512\n  max_input_len: 600\n",
                                   "engine.max_input_len", 3, ["600", "max_seq_len 512"]),
    "sequence over the preset": ("engine:\n  max_seq_len: 4096\n", "engine.max_seq_len", 2, ["1024 positions"]),
    "max_tokens fills the sequence": ("engine:\n  max_seq_len: 64\n  max_input_len: 32\nverify:\n  max_tokens: 64\n",
                                      "verify.max_tokens", 5, ["no room"]),
    "xai source without path": ("model:\n  preset: grok-1\n  source:\n    format: xai\n", "model.source", 3, ["needs `path:`"]),
    "unknown preset": ("model:\n  preset: grok-2\n", "model.preset", 2, ["unknown preset 'grok-2'", "grok-1-tiny"]),
    "ports clash": ("server:\n  grpc_port: 9001\n  http_port: 9001\n", "server.http_port", 3, ["port 9001 is used twice"]),
    "empty prompt": ("verify:\n  prompts:\n    - fine\n    - '  '\n", "verify.prompts.1", 4, ["empty prompt"]),
    "duplicate key": ("engine:\n  max_seq_len: 512\n  max_seq_len: 256\n", "engine.max_seq_len", 3, ["duplicate key"]),
    "moe plugin off with w8a16": ("engine:\n  backend: trtllm\n  moe_plugin: disable\n", "engine.moe_plugin", 3,
                                  ["needs the MoE plugin"]),
    "more ranks than GPUs": ("model:\n  preset: grok-1\nparallel:\n  tp: 8\n  pp: 2\nengine:\n  backend: trtllm\n",
                             "parallel.tp", 4, ["16 ranks", "hardware.nodes 1 x gpus_per_node 8", "hardware.hostfile"]),
    "two nodes without a hostfile": ("model:\n  preset: grok-1\nparallel:\n  tp: 8\n  pp: 2\nengine:\n  backend: trtllm\n"
                                     "hardware:\n  nodes: 2\n", "hardware.nodes", 9, ["2 nodes need hardware.hostfile", "slots=8"]),
    "float32 with w8a16 on trtllm": ("dtype: float32\nengine:\n  backend: trtllm\n", "dtype", 1,
                                     ["no float32 path for int8 weights", "use bfloat16"]),
    "trtllm version out of range": ("engine:\n  backend: trtllm\n  trtllm_version: 0.14.0.dev2024100800\n",
                                    "engine.trtllm_version", 3, ["TensorRT-LLM 0.14.0.dev2024100800 is outside the known-good range",
                                                                 ">=0.12.0,<0.14.0.dev0 or >=0.15.0.dev2024101500", "top_k"]),
    "trtllm version not a version": ("engine:\n  backend: trtllm\n  trtllm_version: latest\n", "engine.trtllm_version", 3,
                                     ["not a version number"]),
}


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_config_exit_2_names_key_and_line(case, tmp_path, capsys):
    text, key, line, words = BAD[case]
    assert main(["plan", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bad.yaml line {line}: {key}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    f = write(tmp_path, "engine:\n  backend: onnxruntime\n  max_seq_len: [512\n")
    assert main(["plan", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad.yaml line ") and "YAML syntax" in err and err.count("\n") == 1


def test_top_level_must_be_a_mapping(tmp_path, capsys):
    assert main(["plan", str(write(tmp_path, "- model\n- engine\n"))]) == 2
    assert capsys.readouterr().err.startswith("error: bad.yaml line 1: the pipeline must be a mapping")


def test_missing_pipeline_file(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the pipeline file" in capsys.readouterr().err


def test_missing_source_path_is_an_error_for_run_and_a_warning_for_plan(tmp_path, capsys):
    text = "model:\n  preset: grok-1-tiny\n  source:\n    format: xai\n    path: no/such/ckpt\n"
    f = write(tmp_path, text)
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad.yaml line 5: model.source.path: ") and "no/such/ckpt does not exist" in err
    assert main(["plan", str(f)]) == 0
    assert "warning: bad.yaml line 5: model.source.path" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_real_cli_subprocess_prints_one_error_line(tmp_path):
    f = write(tmp_path, BAD["tp not dividing kv heads"][0])
    res = subprocess.run([sys.executable, "-m", "grok_deploy.cli", "plan", str(f)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.startswith("error: bad.yaml line 2: parallel.tp: tp 3 does not divide the 8 KV heads")
    assert "Traceback" not in res.stderr


def test_shipped_pipelines_load_with_their_settings():
    tiny = load_pipeline(ROOT / "pipeline.yaml")
    assert (tiny.model.preset, tiny.model.source.format, tiny.model.source.seed) == ("grok-1-tiny", "synthetic", 0)
    assert (tiny.parallel.tp, tiny.parallel.moe_tp, tiny.parallel.moe_ep, tiny.quantization) == (2, 2, 1, "w8a16")
    assert tiny.engine.backend == "onnxruntime" and tiny.server.address == "127.0.0.1"
    assert tiny.verify.check_shards and len(tiny.verify.prompts) >= 8
    assert sum(len(p.split()) >= 40 for p in tiny.verify.prompts) >= 2  # some prompts over 64 tokens
    assert len({len(p) for p in tiny.verify.prompts}) == len(tiny.verify.prompts)
    real = load_pipeline(ROOT / "pipelines" / "grok-1-h100x8.yaml")
    assert (real.model.preset, real.model.source.format, real.parallel.tp, real.quantization) == ("grok-1", "xai", 8, "w8a16")
    assert real.engine.backend == "trtllm" and real.engine.moe_plugin == "bfloat16"
    assert (real.hardware.gpu_memory_gb, real.hardware.gpus_per_node, real.hardware.hbm_bandwidth_gbps) == (80, 8, 3350)
    assert real.output("engines") == ROOT / "engines" / "trtllm"  # ../ relative to pipelines/


def test_defaults_relative_paths_and_line_lookup(tmp_path):
    sub = tmp_path / "deploy"
    sub.mkdir()
    f = write(sub, "# comment\nparallel:\n  tp: 4\n  moe_ep: 2\noutputs:\n  source: out/src\n", "p.yaml")
    cfg = load_pipeline(f)
    assert (cfg.parallel.moe_tp, cfg.parallel.moe_ep, cfg.parallel.pp) == (2, 2, 1)  # moe_tp = tp // moe_ep
    assert cfg.output("source") == sub / "out" / "src"
    assert cfg.output("engines") == sub / "engines" / "onnxruntime"
    assert cfg.output("triton_repo") == sub / "triton_repo"
    assert (cfg.server.grpc_port, cfg.server.http_port, cfg.server.metrics_port) == (8001, 8000, 8002)
    assert cfg.where("parallel.moe_ep") == "p.yaml line 4: parallel.moe_ep"
    assert cfg.where("engine.max_seq_len") == "p.yaml line 1: engine.max_seq_len"  # not written: the document
    assert cfg.get("parallel") == {"tp": 4, "pp": 1, "moe_tp": 2, "moe_ep": 2}
    empty = load_pipeline(write(tmp_path, "# only a comment\n", "empty.yaml"))
    assert empty.model.preset == "grok-1-tiny" and empty.parallel.moe_tp == 1


def test_parallel_rules_each_named():
    # made-up models where each rule is the first one broken (q heads are a multiple of kv heads,
    # so a tp dividing the kv heads always divides the q heads)
    m = GrokConfig("odd", vocab_size=1001, emb_size=60, key_size=8, num_q_heads=16, num_kv_heads=16,
                   num_layers=6, widening_factor=1)
    assert m.ffn_size == 40
    assert parallel_problem(m, 1, 1, 1, 1) is None
    assert parallel_problem(m, 3, 1, 3, 1) == ("parallel.tp", "tp 3 does not divide the 16 KV heads "
                                               "(each rank holds whole KV heads; duplication is unsupported)")
    assert parallel_problem(m, 2, 1, 2, 1) == ("parallel.tp", "tp 2 does not divide the vocabulary 1001 (lm_head shards)")
    even = GrokConfig("even", vocab_size=1024, emb_size=60, key_size=8, num_q_heads=16, num_kv_heads=16,
                      num_layers=6, widening_factor=1)
    assert parallel_problem(even, 2, 1, 1, 1) == ("parallel.moe_tp", "moe_tp 1 x moe_ep 1 = 1 must equal tp 2")
    assert parallel_problem(even, 16, 1, 16, 1) == ("parallel.moe_tp", "moe_tp 16 does not divide the expert FFN width 40")
    assert parallel_problem(even, 16, 1, 1, 16) == ("parallel.moe_ep", "moe_ep 16 does not divide the 8 experts")
    assert parallel_problem(even, 8, 1, 8, 1) is None and parallel_problem(even, 8, 1, 1, 8) is None
    assert parallel_problem(even, 2, 4, 2, 1) == ("parallel.pp", "pp 4 does not divide the 6 layers")


def test_user_error_is_raised_not_printed(tmp_path):
    with pytest.raises(UserError, match=r"bad.yaml line 2: parallel.tp"):
        load_pipeline(write(tmp_path, "parallel:\n  tp: 5\n"))
