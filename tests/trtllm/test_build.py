"""Engine build for backend trtllm: the trtllm-build command as data, the no-TensorRT-LLM error,
and the whole flow against a stand-in tensorrt_llm (its preprocessing op registered in torch)."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from grok_deploy.errors import UserError
from grok_deploy.trtllm import build
from grok_deploy.trtllm.safetensors_writer import RankWriter, Spec

# trtllm-checkpoint.md §8: the flags a Grok build passes
DOCUMENTED_FLAGS = {
    "--checkpoint_dir", "--output_dir", "--gpt_attention_plugin", "--gemm_plugin", "--moe_plugin",
    "--paged_kv_cache", "--remove_input_padding", "--workers", "--max_batch_size", "--max_input_len",
    "--max_seq_len", "--max_num_tokens", "--max_beam_width", "--use_paged_context_fmha", "--tokens_per_block",
}
CONFIG = {"dtype": "bfloat16", "max_position_embeddings": 8192, "quantization": {"quant_algo": "W8A16"},
          "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 1},
          # grok-1-smoke's sizes: buildable at every tp up to 8
          "hidden_size": 512, "head_size": 128, "num_attention_heads": 8, "num_key_value_heads": 8,
          "intermediate_size": 1024}


def test_default_command_is_the_documented_one():
    opts = build.engine_options({}, CONFIG)
    cmd = build.trtllm_build_command("ck", "eng", opts)
    assert cmd[0] == "trtllm-build"
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs == {
        "--checkpoint_dir": "ck", "--output_dir": "eng", "--gpt_attention_plugin": "bfloat16",
        "--gemm_plugin": "bfloat16", "--moe_plugin": "bfloat16", "--paged_kv_cache": "enable",
        "--remove_input_padding": "enable", "--max_batch_size": "8", "--max_input_len": "1024",
        "--max_seq_len": "2048", "--max_num_tokens": "8192", "--max_beam_width": "1", "--workers": "2"}
    assert set(pairs) <= DOCUMENTED_FLAGS


def test_options_and_flag_lists_agree():
    args = ["--checkpoint_dir", "x", "--output_dir", "y", "--gpt_attention_plugin", "bfloat16",
            "--use_paged_context_fmha", "disable", "--tokens_per_block", "32", "--max_seq_len", "4096",
            "--max_input_len", "2048", "--workers", "8"]
    opts = build.engine_options(build.flags_to_options(args), CONFIG)
    assert opts["tokens_per_block"] == 32 and opts["workers"] == 8
    cmd = build.trtllm_build_command("ck", "eng", opts)
    assert set(cmd[1::2]) <= DOCUMENTED_FLAGS
    assert cmd[cmd.index("--use_paged_context_fmha") + 1] == "disable"
    assert cmd[cmd.index("--max_seq_len") + 1] == "4096"


@pytest.mark.parametrize("opts,message", [
    ({"max_batch": 4}, "engine.max_batch: unknown"),
    ({"max_input_len": 4096, "max_seq_len": 2048}, "exceeds engine.max_seq_len"),
    ({"max_seq_len": 16384, "max_input_len": 1024}, "max_position_embeddings 8192"),
    ({"moe_plugin": "disable"}, "needs the MoE plugin"),
    ({"gemm_plugin": "int8"}, "engine.gemm_plugin"),
    ({"max_batch_size": 0}, "engine.max_batch_size: must be a positive integer"),
    ({"paged_kv_cache": True}, "engine.paged_kv_cache"),
])
def test_bad_engine_options(opts, message):
    with pytest.raises(UserError, match=message):
        build.engine_options(opts, CONFIG)


def _checkpoint(folder: Path) -> dict:
    """A two-rank W8A16 checkpoint with one int8 matrix and one bf16 norm per rank."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    rng = np.random.default_rng(0)
    tensors = {}
    for r in range(2):
        w = rng.integers(-127, 128, (2, 4, 6), dtype=np.int8)
        s = rng.standard_normal(6).astype(ml_dtypes.bfloat16)
        specs = [Spec("transformer.layers.0.mlp.fc.weight", (2, 4, 6), "int8"),
                 Spec("transformer.layers.0.mlp.fc.per_channel_scale", (6,), "bfloat16")]
        writer = RankWriter(folder / f"rank{r}.safetensors", specs)
        writer.write(specs[0].name, w)
        writer.write(specs[1].name, s)
        writer.close()
        tensors[r] = (w, s)
    (folder / "manifest.json").write_text(json.dumps({"preprocessed": False}))
    return tensors


def test_without_tensorrt_llm_the_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails, as on a CPU host
    _checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError) as e:
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine", {"max_batch_size": 4})
    msg = str(e.value)
    assert msg.startswith("the trtllm backend needs a GPU host with TensorRT-LLM")
    assert "preprocess_weights_for_mixed_gemm" in msg and "\n" not in msg
    assert f"trtllm-build --checkpoint_dir {tmp_path}/engine.tmp-{os.getpid()}-build/checkpoint --output_dir " in msg
    assert "--moe_plugin bfloat16" in msg and "--max_batch_size 4" in msg
    assert "--kv_cache_type paged" in msg and "--paged_kv_cache" not in msg  # 1.2.1's flags
    assert "there, with TensorRT-LLM 1.2.1 (pip install tensorrt-llm==1.2.1, or run in the container " \
           "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 (docs/deploy-grok-1.md)), this stage" in msg
    assert not (tmp_path / "engine").exists()


def test_missing_convert_manifest(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="not a complete convert output"):
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine")


FAKE_TRTLLM = '''
"""Stand-in for tensorrt_llm: registers the preprocessing op the way the real package does."""
import torch
__version__ = "{version}"
try:  # once per process, as a torch library namespace can be defined only once
    torch.ops.trtllm.preprocess_weights_for_mixed_gemm
except (AttributeError, RuntimeError):
    _lib = torch.library.Library("trtllm", "DEF")
    _lib.define("preprocess_weights_for_mixed_gemm(Tensor w, ScalarType qt, ScalarType at) -> Tensor")
    _lib.impl("preprocess_weights_for_mixed_gemm", lambda w, qt, at: (w.flip(-1) ^ 1).contiguous(), "CPU")
'''
FAKE_BUILD = '''#!{python}
"""Stand-in trtllm-build: records its argv and copies each rank file to rank<r>.engine."""
import json, shutil, sys
from pathlib import Path
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = Path(args["--output_dir"]); out.mkdir(parents=True)
for f in Path(args["--checkpoint_dir"]).glob("rank*.safetensors"):
    shutil.copy(f, out / f.name.replace(".safetensors", ".engine"))
(out / "config.json").write_text(json.dumps({{"argv": sys.argv[1:]}}))
'''


def stand_in(tmp_path: Path, monkeypatch, version: str = "0.15.0", grok: bool = True) -> Path:
    """Install the stand-in tensorrt_llm (reporting `version`, with a models/grok package unless
    `grok` is False) and trtllm-build; returns the latter."""
    pkg = tmp_path / "site" / "tensorrt_llm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_TRTLLM).replace("{version}", version))
    (pkg / "models").mkdir()
    (pkg / "models" / "__init__.py").write_text("")
    if grok:
        (pkg / "models" / "grok").mkdir()
        (pkg / "models" / "grok" / "__init__.py").write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "trtllm-build"
    exe.write_text(FAKE_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    spec = importlib.util.spec_from_file_location("tensorrt_llm", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)  # gone again after the test
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return exe


def test_build_with_stand_in_tensorrt_llm(tmp_path, monkeypatch):
    exe = stand_in(tmp_path, monkeypatch)
    tensors = _checkpoint(tmp_path / "ckpt")

    man = build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine", {"max_batch_size": 4})
    out = tmp_path / "engine"
    assert sorted(p.name for p in out.iterdir()) == [".grok-deploy", "build.log", "config.json", "manifest.json",
                                                     "rank0.engine", "rank1.engine"]
    assert man["preprocessed_here"] and man["tensorrt_llm_version"] == "0.15.0"
    assert man["command"][0] == str(exe) and "--max_batch_size" in man["command"]
    assert json.loads((out / "manifest.json").read_text())["files"]["rank0.engine"]["sha256"] == man["files"]["rank0.engine"]["sha256"]
    for r, (w, s) in tensors.items():
        with safe_open(str(out / f"rank{r}.engine"), framework="np") as f:  # the preprocessed checkpoint
            got = f.get_tensor("transformer.layers.0.mlp.fc.weight")
            assert np.array_equal(got, np.flip(w, -1) ^ 1)  # the op ran on every int8 weight
        with safe_open(str(out / f"rank{r}.engine"), framework="pt") as f:
            got_s = f.get_tensor("transformer.layers.0.mlp.fc.per_channel_scale")
            assert np.array_equal(got_s.float().numpy(), s.astype(np.float32))  # scales untouched
    assert not list(tmp_path.glob("engine.tmp-*"))


@pytest.mark.parametrize("version,words", [
    ("0.14.0.dev2024100800", ["MoeConfig arguments are passed by position", "top_k"]),
    ("0.11.0.dev2024062500", ["reads config.moe"]),
    ("0.10.0", ["no Grok model before 0.11"]),
])
def test_version_outside_the_known_good_range_is_refused_before_anything_is_built(tmp_path, monkeypatch, version, words):
    stand_in(tmp_path, monkeypatch, version)
    _checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError) as e:
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine")
    msg = str(e.value)
    assert msg.startswith(f"TensorRT-LLM {version} is outside the known-good range for Grok "
                          "(>=0.12.0,<0.14.0.dev0 or >=0.15.0.dev2024101500,<1.3.0rc21): ")
    assert msg.endswith("install 1.2.1: pip install tensorrt-llm==1.2.1, or run in the container "
                        "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 (docs/deploy-grok-1.md)")
    assert all(w in msg for w in words) and "\n" not in msg
    assert not (tmp_path / "engine").exists() and not list(tmp_path.glob("engine.tmp-*"))
    with pytest.raises(UserError, match=f"TensorRT-LLM {version} is outside"):
        build.preprocess(tmp_path / "ckpt", tmp_path / "pre")
    assert not (tmp_path / "pre").exists() and not list(tmp_path.glob("pre.tmp-*"))


@pytest.mark.parametrize("version,paged,fmha", [
    ("0.12.0", ["--paged_kv_cache", "enable"], None),
    ("0.15.0.dev2024101500", ["--paged_kv_cache", "enable"], None),
    ("0.17.0", ["--kv_cache_type", "paged"], None),
    ("1.0.0rc3", ["--kv_cache_type", "paged"], None),
    ("0.11.0", ["--paged_kv_cache", "enable"], "disable"),  # 0.11-era FMHA rejects the soft-cap
])
def test_version_dependent_flags(version, paged, fmha):
    cmd = build.trtllm_build_command("ck", "eng", build.engine_options({}, CONFIG), version=version)
    pos = cmd.index(paged[0])
    assert cmd[pos:pos + 2] == paged
    assert {"--paged_kv_cache", "--kv_cache_type"} - {paged[0]} & set(cmd) == set()
    assert (cmd[cmd.index("--use_paged_context_fmha") + 1] if "--use_paged_context_fmha" in cmd else None) == fmha
    # an explicit choice is kept whatever the version
    opts = build.engine_options({"use_paged_context_fmha": "enable"}, CONFIG)
    cmd = build.trtllm_build_command("ck", "eng", opts, version=version)
    assert cmd[cmd.index("--use_paged_context_fmha") + 1] == "enable"


def test_kv_cache_type_flag_reads_back_as_paged_kv_cache():
    args = ["--checkpoint_dir", "x", "--output_dir", "y", "--kv_cache_type", "disabled"]
    assert build.flags_to_options(args) == {"paged_kv_cache": "disable"}


def test_float32_with_w8a16_is_refused():
    with pytest.raises(UserError) as e:
        build.engine_options({}, {**CONFIG, "dtype": "float32"})
    assert str(e.value).startswith("dtype float32 with W8A16: TensorRT-LLM's weight-only GEMM and MoE plugins "
                                   "have no float32 path for int8 weights")
    build.engine_options({}, {**CONFIG, "dtype": "float32", "quantization": {"quant_algo": None}})  # fine unquantised


def test_sizes_the_kernels_reject_are_refused(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, "0.15.0")
    _checkpoint(tmp_path / "ckpt")
    tiny = {**CONFIG, "hidden_size": 256, "head_size": 16, "num_attention_heads": 16, "intermediate_size": 344}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(tiny))  # grok-1-tiny's sizes
    with pytest.raises(UserError) as e:
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine")
    msg = str(e.value)
    assert msg.startswith("TensorRT-LLM 0.15.0 cannot build this checkpoint: head size 16: the soft-capped attention "
                          "kernels take 128 or 256; weight-only sizes not multiples of 64 x tp = 128")
    assert "hidden (qkv in, dense out, fc in, proj out) 256" not in msg  # 256 = 2 x 128 is fine at tp 2
    assert "expert ffn (fc out / 2, proj in) 344" in msg and "grok-1-smoke" in msg
    assert not (tmp_path / "engine").exists()


def test_preprocess_command_then_build_from_its_output(tmp_path, monkeypatch):
    exe = stand_in(tmp_path, monkeypatch)
    tensors = _checkpoint(tmp_path / "ckpt")
    doc = build.preprocess(tmp_path / "ckpt", tmp_path / "pre")
    on_disk = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert on_disk["preprocessed"] is True and doc["tensorrt_llm_version"] == "0.15.0" and doc["tensors"] == 4
    assert on_disk["files"]["rank1.safetensors"]["sha256"] == doc["files"]["rank1.safetensors"]["sha256"]
    with safe_open(str(tmp_path / "pre" / "rank0.safetensors"), framework="np") as f:
        assert np.array_equal(f.get_tensor("transformer.layers.0.mlp.fc.weight"), np.flip(tensors[0][0], -1) ^ 1)
    with pytest.raises(UserError, match="preprocessing twice scrambles the weights"):
        build.preprocess(tmp_path / "pre", tmp_path / "pre2")
    man = build.build_trtllm(tmp_path / "pre", tmp_path / "engine")
    assert not man["preprocessed_here"]  # built from the preprocessed copy as it is
    assert man["command"][:3] == [str(exe), "--checkpoint_dir", str(tmp_path / "pre")]


@pytest.mark.parametrize("version", ["1.3.0rc21", "2.1.0"])
def test_versions_without_the_engine_path_are_refused_before_anything_is_built(tmp_path, monkeypatch, version):
    stand_in(tmp_path, monkeypatch, version)
    _checkpoint(tmp_path / "ckpt")
    for run in (lambda: build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine"),
                lambda: build.preprocess(tmp_path / "ckpt", tmp_path / "pre")):
        with pytest.raises(UserError) as e:
            run()
        assert str(e.value).startswith(f"TensorRT-LLM {version} cannot build Grok: TensorRT-LLM removed the "
                                       "TensorRT-engine path (trtllm-build, tensorrt_llm.models.grok and the C++ "
                                       "Triton backend) and Grok in 1.3.0rc21; use 1.2.1")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "pre").exists()


def test_an_install_without_trtllm_build_or_the_grok_model_is_refused(tmp_path, monkeypatch):
    exe = stand_in(tmp_path, monkeypatch, "1.2.1", grok=False)
    exe.unlink()  # and no trtllm-build on PATH either (the test host has none)
    _checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError) as e:
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine")
    first, second = str(e.value).split("; or run in the container", 1)[0], str(e.value)
    assert first.startswith("trtllm-build is not on PATH: the installed TensorRT-LLM has no engine builder")
    assert "tensorrt_llm.models.grok is not found in " in second and "has no Grok model" in second
    assert not (tmp_path / "engine").exists() and not list(tmp_path.glob("engine.tmp-*"))


FAKE_SMI = """#!/bin/sh
[ "$1 $2" = "--query-gpu=name,compute_cap,memory.total --format=csv,noheader" ] || exit 9
for i in 1 2; do echo "NVIDIA B200, 10.0, 183359 MiB"; done
"""


def test_w8a16_on_a_b200_is_refused_before_preprocessing(tmp_path, monkeypatch):
    stand_in(tmp_path, monkeypatch, "1.2.1")
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("GROK_DEPLOY_NVIDIA_SMI", "nvidia-smi")  # this host's GPU counts here (conftest hides it)
    _checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError) as e:
        build.build_trtllm(tmp_path / "ckpt", tmp_path / "engine")
    msg = str(e.value)
    assert msg.startswith("quantization w8a16 on NVIDIA B200 (compute capability 10.0): TensorRT-LLM 1.2.1's "
                          "builder refuses INT8/INT4 weight-only on SM 100-119")
    assert "use quantization: none with dtype: bfloat16" in msg and "\n" not in msg
    assert not (tmp_path / "engine").exists() and not list(tmp_path.glob("engine.tmp-*"))
