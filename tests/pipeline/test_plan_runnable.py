"""The printed plan can be run verbatim: its commands, in order, with stand-ins for TensorRT-LLM
(the preprocessing op, recording what it is given, and a package version the plan detects) and
for trtllm-build (recording its argv and what it reads), up to the launch. The build must read
the preprocessed checkpoint, never the raw int8 one."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

from grok_deploy.trtllm import names as tn

PIPELINE = """\
model:
  preset: grok-1-smoke
  source:
    format: synthetic
parallel:
  tp: 2
quantization: w8a16
dtype: bfloat16
engine:
  backend: trtllm
  workers: 2
verify:
  check_shards: false
"""
VERSION = "0.17.0"  # from 0.17 the paged KV switch is spelled --kv_cache_type
FAKE_TRTLLM = f'''
"""Stand-in tensorrt_llm: registers the preprocessing op, which records every call."""
import json, os
import torch
__version__ = "{VERSION}"

def _op(w, qt, at):
    with open(os.environ["FAKE_OP_LOG"], "a") as f:
        f.write(json.dumps({{"shape": list(w.shape), "dtype": str(w.dtype), "act": str(at)}}) + "\\n")
    return (w.flip(-1) ^ 1).contiguous()

_lib = torch.library.Library("trtllm", "DEF")
_lib.define("preprocess_weights_for_mixed_gemm(Tensor w, ScalarType qt, ScalarType at) -> Tensor")
_lib.impl("preprocess_weights_for_mixed_gemm", _op, "CPU")
'''
FAKE_BUILD = '''#!{python}
"""Stand-in trtllm-build: records its argv, the manifest of the checkpoint it reads and one weight."""
import json, os, sys
from pathlib import Path
from safetensors import safe_open
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
ckpt = Path(args["--checkpoint_dir"])
with safe_open(str(ckpt / "rank0.safetensors"), framework="np") as f:
    w = f.get_tensor("transformer.layers.0.attention.qkv.weight")
record = {{"argv": sys.argv[1:], "manifest": json.loads((ckpt / "manifest.json").read_text()),
          "qkv_first_row": w[0, :8].tolist()}}
Path(os.environ["FAKE_BUILD_LOG"]).write_text(json.dumps(record))
Path(args["--output_dir"]).mkdir(parents=True)
'''


@pytest.mark.timeout(300)
def test_plan_commands_run_in_order_and_the_build_reads_the_preprocessed_checkpoint(tmp_path):
    site, bindir = tmp_path / "site", tmp_path / "bin"
    (site / "tensorrt_llm").mkdir(parents=True)
    (site / "tensorrt_llm" / "__init__.py").write_text(textwrap.dedent(FAKE_TRTLLM))
    (site / "tensorrt_llm" / "models" / "grok").mkdir(parents=True)  # the build looks for the Grok model
    (site / "tensorrt_llm" / "models" / "__init__.py").write_text("")
    (site / "tensorrt_llm" / "models" / "grok" / "__init__.py").write_text("")
    dist = site / f"tensorrt_llm-{VERSION}.dist-info"  # what `plan` reads, without importing it
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {VERSION}\n")
    bindir.mkdir()
    exe = bindir / "trtllm-build"
    exe.write_text(FAKE_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FAKE_OP_LOG": str(tmp_path / "op.log"), "FAKE_BUILD_LOG": str(tmp_path / "build.json")}
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)

    plan = subprocess.run([sys.executable, "-m", "grok_deploy.cli", "plan", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    commands = json.loads(plan.stdout)["commands"]
    assert [c["stage"] for c in commands] == ["source", "convert", "preprocess", "build", "deploy"]
    assert f"TensorRT-LLM {VERSION} (installed here)" in commands[3]["note"]
    for c in commands[:-1]:  # the launch needs GPUs
        res = subprocess.run(c["command"], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=200)
        assert res.returncode == 0, (c["command"], res.stderr[-2000:])

    raw, pre = tmp_path / "export/trtllm_ckpt", tmp_path / "export/trtllm_ckpt_preprocessed"
    build = json.loads((tmp_path / "build.json").read_text())
    argv = dict(zip(build["argv"][::2], build["argv"][1::2]))
    assert argv["--checkpoint_dir"] == str(pre) and argv["--output_dir"] == str(tmp_path / "engines/trtllm")
    assert argv["--kv_cache_type"] == "paged" and "--paged_kv_cache" not in argv  # the detected version's flags
    assert build["manifest"]["preprocessed"] is True and build["manifest"]["tensorrt_llm_version"] == VERSION
    with safe_open(str(raw / "rank0.safetensors"), framework="np") as f:
        raw_row = f.get_tensor("transformer.layers.0.attention.qkv.weight")[0]
    assert build["qkv_first_row"] == (raw_row[::-1][:8] ^ 1).tolist()  # what the op made, not the raw codes
    calls = [json.loads(line) for line in (tmp_path / "op.log").read_text().splitlines()]
    int8_weights = 2 * 4 * len(tn.MATRICES)  # 2 ranks x 4 layers x (qkv, dense, fc, proj)
    assert len(calls) == int8_weights and {c["dtype"] for c in calls} == {"torch.int8"}
    assert {c["act"] for c in calls} == {"torch.bfloat16"}
    assert sorted({tuple(c["shape"]) for c in calls}) == sorted({(512, 2048), (1024, 512), (8, 512, 1024), (8, 512, 512)})
