"""`plan` on GPU generations: `hardware.gpu` (trtllm/gpus.py's table) sets the memory and bandwidth,
nvidia-smi's answer wins where it runs (a stand-in on PATH here), W8A16 is refused on compute
capability 10.x-11.x with the unquantised fit beside it; and the TensorRT-LLM version plan writes
flags for when none is installed or pinned (1.2.1, with the container it ships in)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grok_deploy.cli import main
from grok_deploy.trtllm import compat, gpus

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "pipelines" / "grok-1-h100x8.yaml"
GPU_LINE = next(i for i, line in enumerate(H100.read_text().splitlines(), 1) if line.startswith("  gpu: "))


def pipeline(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """pipelines/grok-1-h100x8.yaml in tmp_path/pipelines (so its ../ outputs stay in tmp_path), edited."""
    text = H100.read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    f = tmp_path / "pipelines" / "grok-1.yaml"
    f.parent.mkdir(exist_ok=True)
    f.write_text(text)
    return f


def gpu_line(key: str) -> tuple[str, str]:
    return "  gpu: h100 ", f"  gpu: {key} "


def plan(f: Path, capsys, json_out: bool = True) -> tuple[int, dict | str, str]:
    code = main(["plan", str(f)] + (["--json"] if json_out else []))
    out = capsys.readouterr()
    return code, json.loads(out.out) if json_out else out.out, out.err


def fake_smi(tmp_path: Path, monkeypatch, line: str, count: int = 8) -> None:
    """An nvidia-smi on PATH answering the query plan sends with `line` per GPU (any other
    arguments: exit 9, as a wrong query would fail)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "nvidia-smi"
    exe.write_text('#!/bin/sh\n[ "$1 $2" = "--query-gpu=name,compute_cap,memory.total --format=csv,noheader" ] '
                   f'|| exit 9\nfor i in $(seq {count}); do echo "{line}"; done\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("GROK_DEPLOY_NVIDIA_SMI", "nvidia-smi")  # conftest hides this host's own GPU


REFUSAL = ("grok-1.yaml line 20: quantization: w8a16 on NVIDIA B200 (compute capability 10.0): TensorRT-LLM 1.2.1's "
           "builder refuses INT8/INT4 weight-only on SM 100-119 (\"INT8/INT4 quantization is not supported on "
           "SM>=100\"), after convert and preprocess; use quantization: none with dtype: bfloat16 (unquantised it "
           "fits on 8 x NVIDIA B200 at 80.5 GB of weights per GPU, 102.0 GB with the KV cache and headroom of 192 GB)")


def test_w8a16_on_b200_is_refused_with_the_unquantised_fit(tmp_path, capsys):
    code, doc, err = plan(pipeline(tmp_path, gpu_line("b200")), capsys)
    assert code == 2 and err == f"error: {REFUSAL}\n"
    g = doc["gpu"]
    assert (g["name"], g["compute_capability"], g["memory_bytes"], g["bandwidth_bytes_per_s"]) == \
        ("NVIDIA B200", "10.0", 192_000_000_000, 8000e9)
    assert g["w8a16_refused"] == REFUSAL
    alt = doc["memory_unquantised"]
    assert alt["fits"] is True and alt["gpu_memory_bytes"] == 192e9
    assert alt["weights_bytes"] == pytest.approx(80.5e9, abs=0.1e9)  # 2 x the int8 matrices, same KV cache
    assert alt["kv_bytes"] == doc["memory"]["kv_bytes"] == 64 * 8192 * 32 * 1024
    assert doc["roofline"]["hbm_bandwidth_bytes_per_s"] == 8000e9


def test_the_memory_table_shows_the_unquantised_alternative(tmp_path, capsys):
    code, out, err = plan(pipeline(tmp_path, gpu_line("b200")), capsys, json_out=False)
    assert code == 2 and err.startswith("error: grok-1.yaml line 20: quantization: w8a16 on NVIDIA B200")
    assert "  total               62.68 GB  of 192 GB;" in out
    assert ("  unquantised bfloat16: weights 80.55 GB, total 102.03 GB of 192 GB: fits (W8A16 cannot be built on "
            "this GPU)") in out
    assert f"GPU: NVIDIA B200 (hardware.gpu: b200 (grok-1.yaml line {GPU_LINE})), compute capability 10.0" in out


@pytest.mark.parametrize("key,name", [("gb200", "NVIDIA GB200"), ("b300", "NVIDIA B300"), ("gb300", "NVIDIA GB300")])
def test_every_sm_10x_generation_is_refused(tmp_path, capsys, key, name):
    code, doc, err = plan(pipeline(tmp_path, gpu_line(key)), capsys)
    assert code == 2
    assert err.startswith(f"error: grok-1.yaml line 20: quantization: w8a16 on {name} (compute capability 10.")


@pytest.mark.parametrize("key,memory,bandwidth", [("h100", 80e9, 3350e9), ("h200", 141e9, 4800e9),
                                                  ("rtx-pro-6000", 96e9, 1792e9)])
def test_w8a16_is_accepted_below_sm_100_and_from_sm_120(tmp_path, capsys, key, memory, bandwidth):
    code, doc, err = plan(pipeline(tmp_path, gpu_line(key)), capsys)
    assert code == 0 and err == ""
    assert doc["gpu"]["w8a16_refused"] is None and doc["memory_unquantised"] is None
    assert doc["memory"]["gpu_memory_bytes"] == memory and doc["roofline"]["hbm_bandwidth_bytes_per_s"] == bandwidth
    assert doc["verdict"].startswith("w8a16 fits")


def test_unquantised_on_b200_is_planned_without_a_refusal(tmp_path, capsys):
    code, doc, err = plan(pipeline(tmp_path, gpu_line("b200"), ("quantization: w8a16", "quantization: none")), capsys)
    assert code == 0 and doc["fits"] is True
    assert doc["memory"]["weights_bytes"] == pytest.approx(80.5e9, abs=0.1e9)
    assert doc["memory"]["gpu_memory_bytes"] == 192e9


def test_a_written_memory_key_wins_over_the_table(tmp_path, capsys):
    f = pipeline(tmp_path, gpu_line("a100"), ("  gpus_per_node: 8\n", "  gpus_per_node: 8\n  gpu_memory_gb: 70\n"))
    code, doc, err = plan(f, capsys)
    assert code == 0 and doc["memory"]["gpu_memory_bytes"] == 70e9
    assert doc["roofline"]["hbm_bandwidth_bytes_per_s"] == 2039e9  # the a100's, not written


def test_nvidia_smi_wins_over_hardware_gpu(tmp_path, capsys, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "NVIDIA B200, 10.0, 183359 MiB")
    code, doc, err = plan(pipeline(tmp_path), capsys)  # the file says h100
    assert code == 2 and "quantization: w8a16 on NVIDIA B200 (compute capability 10.0)" in err
    g = doc["gpu"]
    assert g["how"] == "nvidia-smi on this host: 8 x NVIDIA B200" and g["key"] == "b200"
    assert g["memory_bytes"] == 183359 * 2 ** 20 and g["bandwidth_bytes_per_s"] == 8000e9
    want = f"grok-1.yaml line {GPU_LINE}: hardware.gpu: h100, but nvidia-smi reports NVIDIA B200 on this host"
    assert any(w.startswith(want) for w in doc["warnings"])


def test_nvidia_smi_memory_of_an_h100(tmp_path, capsys, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB")
    code, doc, err = plan(pipeline(tmp_path), capsys)
    assert code == 0 and doc["gpu"]["compute_capability"] == "9.0" and doc["gpu"]["key"] == "h100"
    assert doc["memory"]["gpu_memory_bytes"] == 81559 * 2 ** 20  # 85.5 GB: what the card has, not the label
    assert not any("nvidia-smi reports" in w for w in doc["warnings"])


def test_an_unknown_gpu_from_nvidia_smi_keeps_the_written_bandwidth(tmp_path, capsys, monkeypatch):
    fake_smi(tmp_path, monkeypatch, "NVIDIA Future GPU, 13.0, 300000 MiB", count=1)
    code, doc, err = plan(pipeline(tmp_path), capsys)
    assert code == 0 and doc["gpu"]["key"] is None and doc["gpu"]["name"] == "NVIDIA Future GPU"
    assert doc["roofline"]["hbm_bandwidth_bytes_per_s"] == 3350e9  # hardware.gpu h100's, nothing better known


@pytest.mark.parametrize("text,expected", [
    ("NVIDIA A100-SXM4-40GB, 8.0, 40960 MiB\n", ("NVIDIA A100-SXM4-40GB", (8, 0), 40960 << 20, 1, "a100-40gb")),
    ("NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB\n" * 2, ("NVIDIA A100-SXM4-80GB", (8, 0), 81920 << 20, 2, "a100")),
    ("NVIDIA GB200, 10.0, 189471 MiB\n", ("NVIDIA GB200", (10, 0), 189471 << 20, 1, "gb200")),
    ("NVIDIA H200, 9.0, 143771 MiB\n", ("NVIDIA H200", (9, 0), 143771 << 20, 1, "h200")),
])
def test_parse_nvidia_smi(text, expected):
    d = gpus.parse_query(text)
    assert (d.name, d.compute_cap, d.memory_bytes, d.count, d.entry.key) == expected


@pytest.mark.parametrize("text", ["", "No devices were found\n", "NVIDIA H100, [N/A], 81559 MiB\n"])
def test_unparseable_nvidia_smi_answers_are_ignored(text):
    assert gpus.parse_query(text) is None


def test_an_unknown_hardware_gpu_is_refused_at_load(tmp_path, capsys):
    code = main(["plan", str(pipeline(tmp_path, gpu_line("h300")))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: grok-1.yaml line {GPU_LINE}: hardware.gpu: Input should be 'a100-40gb', 'a100',")
    assert "'b200', 'gb200'" in err and "(got 'h300')" in err


# --- the TensorRT-LLM version plan assumes ----------------------------------------------------------

def test_with_no_tensorrt_llm_plan_writes_1_2_1_flags_and_names_the_container(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: None)  # as on this CPU host
    for f in (H100, pipeline(tmp_path, ("  trtllm_version: 1.2.1 ", "  trtllm_version: auto  "))):
        code, doc, err = plan(f, capsys)
        assert code == 0
        build = next(c for c in doc["commands"] if c["stage"] == "build")
        assert "--kv_cache_type paged" in build["command"] and "--paged_kv_cache" not in build["command"]
        how = "engine.trtllm_version" if f == H100 else "assumed: no TensorRT-LLM installed here"
        assert build["note"].startswith(f"flags for TensorRT-LLM 1.2.1 ({how}); the build refuses versions outside "
                                        ">=0.12.0,<0.14.0.dev0 or >=0.15.0.dev2024101500,<1.3.0rc21")
        assert build["note"].endswith("no TensorRT-LLM here: on the GPU host use TensorRT-LLM 1.2.1, the last release "
                                      "that builds Grok engines (pip install tensorrt-llm==1.2.1, or run in the "
                                      "container nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 "
                                      "(docs/deploy-grok-1.md))")
        assert doc["trtllm"] == {"flags_version": "1.2.1", "installed": None,
                                 "container": "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"}


def test_every_shipped_trtllm_pipeline_pins_1_2_1():
    from grok_deploy.pipeline.schema import load_pipeline

    shipped = sorted((ROOT / "pipelines").glob("*.yaml"))
    assert len(shipped) >= 3
    for f in shipped:
        cfg = load_pipeline(f)
        assert cfg.engine.backend == "trtllm" and cfg.engine.trtllm_version == "1.2.1", f.name


@pytest.mark.timeout(300)
def test_run_refuses_w8a16_on_b200_before_converting(tmp_path, capsys):
    f = tmp_path / "pipeline.yaml"
    f.write_text("model:\n  preset: grok-1-tiny\nparallel:\n  tp: 2\nquantization: w8a16\nengine:\n  backend: trtllm\n"
                 "hardware:\n  gpu: b200\nverify:\n  check_shards: false\n")
    assert main(["run", str(f), "--stages", "source,convert"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: pipeline.yaml line 5: quantization: w8a16 on NVIDIA B200 (compute capability 10.0): "
                          "TensorRT-LLM 1.2.1's builder refuses INT8/INT4 weight-only")
    assert err.endswith("use quantization: none with dtype: bfloat16 (`grok-deploy plan` shows whether it fits)")
    assert (tmp_path / "export" / "source" / "manifest.json").is_file()  # the stage before ran
    assert not (tmp_path / "export" / "trtllm_ckpt").exists() and not list((tmp_path / "export").glob("trtllm_ckpt*"))
