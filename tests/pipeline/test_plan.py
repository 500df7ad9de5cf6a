"""`plan`: stages, exact external commands, per-GPU memory against trtllm-checkpoint.md §9, the
fit verdict and the decode roofline."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grok_deploy.cli import main
from grok_deploy.manifest import commit, new_tmp
from grok_deploy.pipeline.plan import kv_bytes_per_token, memory_estimate, weights_per_gpu
from grok_deploy.pipeline.runner import schedule
from grok_deploy.pipeline.schema import load_pipeline

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "pipelines" / "grok-1-h100x8.yaml"


def h100_copy(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The real deployment file, outputs under tmp_path (not ../ of it), with some edits."""
    text = H100.read_text().replace(": ../", ": ")
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    f = tmp_path / "grok-1-h100x8.yaml"
    f.write_text(text)
    return f


def plan_json(f: Path, capsys) -> tuple[int, dict, str]:
    code = main(["plan", str(f), "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_h100_plan_weights_match_the_checkpoint_arithmetic_and_fit(tmp_path, capsys):
    code, doc, err = plan_json(h100_copy(tmp_path), capsys)
    assert code == 0 and err == ""
    mem = doc["memory"]
    assert abs(mem["weights_bytes"] - 41.2e9) / 41.2e9 < 0.02
    assert mem["weights"]["per_layer"] == 615_479_296  # §9 table, exactly
    assert mem["weights"]["vocab_embedding"] == 131072 * 6144 * 2
    assert mem["kv_bytes_per_token"] == 32 * 1024  # one KV head per rank: 32 KiB per token
    assert mem["kv_bytes"] == 64 * 8192 * 32 * 1024
    assert doc["memory_per_gpu_bytes"] == mem["weights_bytes"] + mem["kv_bytes"] + mem["headroom_bytes"]
    assert doc["fits"] is True and doc["verdict"].startswith("w8a16 fits") and doc["memory_per_gpu_bytes"] < 80e9
    roof = doc["roofline"]
    assert roof["tokens_per_s_upper_bound"] == pytest.approx(3350e9 / roof["active_weight_bytes_per_token"])
    # attention + 2 of 8 expert slices + router/norms per layer, x64, + lm_head shard: about 10.6 GB
    assert 10.0e9 < roof["active_weight_bytes_per_token"] < 11.0e9
    assert {s["name"]: s["status"] for s in doc["stages"]} == {
        "source": "would run", "reference": "not applicable", "convert": "would run", "check-shards": "would run",
        "export-onnx": "not applicable", "build": "would run", "package": "would run", "deploy": "would run",
        "verify": "would run", "bench": "not selected"}
    # verify.mode auto: the 314B in-RAM reference does not fit a host, so the streamed scorer runs
    v = doc["verify"]
    assert v["mode"] == "score" and v["why"].startswith("auto: the in-RAM reference needs ~")
    assert v["prompts"] == 8 and v["max_tokens"] == 32 and v["peak_bytes"] < 4e9
    assert v["bytes_per_layer"] == 8 * 3 * 6144 * 32768 + 2 * 6144 * 6144 + 2 * 6144 * 1024 + 8 * 6144 * 4
    assert v["seconds"] == pytest.approx(64 * v["seconds_per_layer"], rel=0.05)
    # check-shards streamed too: 8 gloo ranks + the parent, within an ordinary host's memory
    c = doc["check_shards"]
    assert c["processes"] == 9 and 4e9 < c["peak_bytes"] < 12e9
    assert 30 * 60 < c["seconds"] < 3 * 3600 and c["ranks_seconds"] < c["seconds"]
    layer = 8 * 3 * 6144 * 32768 + 2 * 6144 * 6144 + 2 * 6144 * 1024
    assert c["bytes_read"] > 64 * layer * 5  # audit (source + rank files), two reference passes, the ranks


def test_h100_plan_commands(tmp_path, capsys):
    _, doc, _ = plan_json(h100_copy(tmp_path), capsys)
    cmds = {c["stage"]: c["argv"] for c in doc["commands"]}
    assert cmds["convert"][:4] == ["grok-deploy", "convert", "/models/grok-1", str(tmp_path / "export/trtllm_ckpt")]
    assert " --tp 8 --moe-tp 8 --moe-ep 1 --pp 1 --quant w8a16 --dtype bfloat16" in " ".join(cmds["convert"])
    # w8a16: the int8 weights are laid out for the GPU first, and trtllm-build reads that copy
    assert cmds["preprocess"] == ["grok-deploy", "preprocess", str(tmp_path / "export/trtllm_ckpt"),
                                  str(tmp_path / "export/trtllm_ckpt_preprocessed")]
    assert [c["stage"] for c in doc["commands"]] == ["convert", "check-shards", "preprocess", "build", "deploy"]
    build = " ".join(cmds["build"])
    assert cmds["build"][0] == "trtllm-build"
    assert "--use_paged_context_fmha" not in build  # flags for 1.2.1 (pinned): the default, which keeps KV reuse
    assert "--paged_kv_cache" not in build  # deprecated since 0.17; 1.2.1 spells it --kv_cache_type
    for flag in ("--checkpoint_dir " + str(tmp_path / "export/trtllm_ckpt_preprocessed"), "--output_dir " + str(tmp_path / "engines/trtllm"),
                 "--gpt_attention_plugin bfloat16", "--gemm_plugin bfloat16", "--moe_plugin bfloat16",
                 "--kv_cache_type paged", "--remove_input_padding enable",
                 "--max_batch_size 64", "--max_input_len 4096", "--max_seq_len 8192", "--max_num_tokens 8192",
                 "--max_beam_width 1", "--workers 8"):
        assert flag in build, flag
    serve = cmds["deploy"]
    assert serve[:2] == ["mpirun", "--allow-run-as-root"]
    contexts = " ".join(serve[2:]).split(" : ")
    assert len(contexts) == 8
    for rank, ctx in enumerate(contexts):
        assert ctx.startswith("-n 1 tritonserver --model-repository=" + str(tmp_path / "triton_repo"))
        assert f"shm-region-prefix-name=prefix{rank}_" in ctx and "--disable-auto-complete-config" in ctx
        for addr in ("--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1",
                     "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002"):
            assert addr in ctx
        assert ("--load-model=tensorrt_llm" in ctx) == (rank > 0) == ("--model-control-mode=explicit" in ctx)
    assert not any(c["stage"] == "export-onnx" for c in doc["commands"])


def test_h100_in_bfloat16_does_not_fit(tmp_path, capsys):
    f = h100_copy(tmp_path, ("quantization: w8a16", "quantization: none"))
    code, doc, err = plan_json(f, capsys)
    assert code == 2
    assert doc["fits"] is False and doc["memory"]["weights_bytes"] > 78e9
    assert doc["verdict"].startswith("bfloat16 (no quantization) does not fit with the KV cache asked for")
    assert err.count("\n") == 1 and err.startswith("error: bfloat16 (no quantization) does not fit")
    for words in ("weights 80.5 GB", "KV cache 17.2 GB (64 x 8192 tokens x 32.0 KiB)", "headroom 4.3 GB",
                  "= 102.0 GB per GPU",
                  "the 80 GB of NVIDIA H100 80GB HBM3 (hardware.gpu: h100, grok-1-h100x8.yaml line ",
                  "use quantization: w8a16"):
        assert words in err, words


def test_kv_cache_alone_can_break_the_fit(tmp_path, capsys):
    f = h100_copy(tmp_path, ("max_batch_size: 64", "max_batch_size: 256"))
    code, doc, err = plan_json(f, capsys)
    assert code == 2 and doc["memory"]["kv_bytes"] == 4 * 64 * 8192 * 32 * 1024
    assert "lower engine.max_batch_size or engine.max_seq_len (room for" in err


def test_memory_scales_with_layout(tmp_path):
    tp4 = load_pipeline(h100_copy(tmp_path, ("  tp: 8\n  pp: 1\n  moe_tp: 8", "  tp: 4\n  pp: 2\n  moe_tp: 4")))
    tp8 = load_pipeline(h100_copy(tmp_path))
    assert kv_bytes_per_token(tp4) == kv_bytes_per_token(tp8)  # 2 KV heads x 32 layers = 1 x 64
    w4, w8 = weights_per_gpu(tp4), weights_per_gpu(tp8)
    assert w4["layers"] == pytest.approx(w8["layers"], rel=0.02)  # half the layers, twice the width
    assert w4["total"] == max(w4["layers"] + w4["vocab_embedding"], w4["layers"] + w4["lm_head_ln_f"])
    # float32 only without w8a16 (TensorRT-LLM's weight-only kernels have no float32 path)
    f32 = load_pipeline(h100_copy(tmp_path, ("dtype: bfloat16", "dtype: float32"), ("quantization: w8a16", "quantization: none")))
    assert kv_bytes_per_token(f32) == 2 * kv_bytes_per_token(tp8)
    assert memory_estimate(f32)["weights"]["vocab_embedding"] == 2 * w8["vocab_embedding"]


def test_h100_plan_warns_about_the_missing_checkpoint(tmp_path, capsys):
    if Path("/models/grok-1").exists():
        pytest.skip("/models/grok-1 exists here")
    assert main(["plan", str(h100_copy(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "warning: grok-1-h100x8.yaml line 10: model.source.path: /models/grok-1 does not exist" in out
    assert "w8a16 fits" in out and "decode roofline:" in out and "tokens/s per sequence" in out


def test_tiny_plan_text_and_cached_stages(tmp_path, capsys):
    f = tmp_path / "pipeline.yaml"
    f.write_text((ROOT / "pipeline.yaml").read_text())
    cfg = load_pipeline(f)
    source = schedule(cfg)[0][0]
    tmp = new_tmp(source.out, "source")  # a finished source stage, as the runner leaves it
    commit(tmp, source.out, {"checkpoint": str(source.out), "runner": {"fingerprint": source.fingerprint, "complete": True}})
    assert main(["plan", str(f)]) == 0
    out = capsys.readouterr().out
    assert "source        cached" in out and "reference     would run" in out
    assert f"grok-deploy make-tiny {tmp_path / 'export/source'} --preset grok-1-tiny --seed 0" in out
    assert "--tp 2 --moe-tp 2 --moe-ep 1 --pp 1 --quant w8a16" in out
    assert f"check-shards {tmp_path / 'export/trtllm_ckpt'} --source {tmp_path / 'export/source'}" in out
    assert "export-onnx" in out and f"export-onnx {tmp_path / 'export/source'} {tmp_path / 'export/onnx'} --quant none" in out and "mpirun" not in out
    assert f"tritonserver --model-repository={tmp_path / 'triton_repo'}" in out
    assert "verify: mode golden (auto: the in-RAM reference needs ~" in out
    assert "check-shards: 3 processes, peak ~0.8 GB host memory together, ~" in out  # tp 2: 2 ranks + parent


def test_verify_mode_score_drops_the_reference_stage(tmp_path, capsys):
    f = tmp_path / "pipeline.yaml"
    f.write_text((ROOT / "pipeline.yaml").read_text().replace("  max_tokens: 16\n", "  max_tokens: 16\n  mode: score\n"))
    cfg = load_pipeline(f)
    assert cfg.verify_mode() == ("score", "verify.mode: score")
    assert main(["plan", str(f)]) == 0
    out = capsys.readouterr().out
    assert "reference     not applicable" in out and "verify: mode score (verify.mode: score)" in out
    assert "GB read per layer" in out


@pytest.mark.timeout(120)
def test_plan_json_does_not_import_torch(tmp_path):
    code = ("import sys, io, contextlib\nfrom grok_deploy.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    rc = main(['plan', sys.argv[1], '--json'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules\nprint(buf.getvalue())\n")
    res = subprocess.run([sys.executable, "-c", code, str(h100_copy(tmp_path))], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"stages", "memory_per_gpu_bytes", "commands", "fits", "verdict", "memory", "roofline"} <= set(doc)
