"""The TensorRT-LLM guard: the known-good range ends before 1.3.0rc21 (the TensorRT-engine path and
Grok removed), and the capability probe finds trtllm-build and tensorrt_llm.models.grok without
importing tensorrt_llm (whose import loads CUDA)."""
from __future__ import annotations

import os
import sys

import pytest

from grok_deploy.trtllm import compat

REMOVED = ("TensorRT-LLM removed the TensorRT-engine path (trtllm-build, tensorrt_llm.models.grok and the C++ "
           "Triton backend) and Grok in 1.3.0rc21; use 1.2.1, the last release that builds it: pip install "
           "tensorrt-llm==1.2.1, or run in the container nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 "
           "(docs/deploy-grok-1.md)")


@pytest.mark.parametrize("version", ["1.3.0rc21", "1.3.0rc22", "1.4.0rc1", "2.0.0", "1.3.0"])
def test_versions_past_the_engine_path_are_refused_with_the_removal(version):
    assert compat.version_problem(version) == f"TensorRT-LLM {version} cannot build Grok: {REMOVED}"
    with pytest.raises(compat.UserError, match="removed the TensorRT-engine path"):
        compat.check_version(version)


@pytest.mark.parametrize("version", ["1.2.1", "1.2.0", "0.15.0", "1.3.0rc20", "1.3.0rc15", "1.0.0rc3"])
def test_versions_with_the_engine_path_are_accepted(version):
    assert compat.version_problem(version) is None


def test_older_versions_still_name_their_own_reason_and_the_version_to_install():
    msg = compat.version_problem("0.14.0.dev2024100800")
    assert msg.startswith("TensorRT-LLM 0.14.0.dev2024100800 is outside the known-good range for Grok "
                          "(>=0.12.0,<0.14.0.dev0 or >=0.15.0.dev2024101500,<1.3.0rc21): MoeConfig arguments")
    assert msg.endswith("install 1.2.1: pip install tensorrt-llm==1.2.1, or run in the container "
                        "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 (docs/deploy-grok-1.md)")


def test_flags_for_the_assumed_version():
    assert compat.ASSUMED == "1.2.1"
    assert compat.build_flags(compat.ASSUMED, True, None) == ["--kv_cache_type", "paged"]


# --- the capability probe ---------------------------------------------------------------------------

PROOF = "raise RuntimeError('tensorrt_llm was imported: the probe must only locate it')\n"


def _fake_install(root, grok: bool, build: bool, monkeypatch):
    """A tensorrt_llm package on sys.path whose import fails loudly, with or without models/grok;
    a trtllm-build script on PATH (or none: PATH holds only an empty folder)."""
    pkg = root / "site" / "tensorrt_llm"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text(PROOF)
    (pkg / "models" / "__init__.py").write_text(PROOF)
    if grok:
        (pkg / "models" / "grok").mkdir()
        (pkg / "models" / "grok" / "__init__.py").write_text(PROOF)
        (pkg / "models" / "grok" / "model.py").write_text(PROOF)
    bindir = root / "bin"
    bindir.mkdir()
    if build:
        exe = bindir / "trtllm-build"
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    monkeypatch.syspath_prepend(str(root / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt_llm", raising=False)
    monkeypatch.setenv("PATH", str(bindir))


def test_probe_finds_a_complete_install_without_importing_it(tmp_path, monkeypatch):
    _fake_install(tmp_path, grok=True, build=True, monkeypatch=monkeypatch)
    assert compat.capability_problems() == []
    assert "tensorrt_llm" not in sys.modules and "tensorrt_llm.models" not in sys.modules


def test_probe_names_the_missing_grok_model(tmp_path, monkeypatch):
    _fake_install(tmp_path, grok=False, build=True, monkeypatch=monkeypatch)
    problems = compat.capability_problems()
    assert len(problems) == 1
    init = tmp_path / "site" / "tensorrt_llm" / "__init__.py"
    assert problems[0].startswith(f"tensorrt_llm.models.grok is not found in {init}: "
                                  "this TensorRT-LLM has no Grok model (removed with the TensorRT-engine path in "
                                  "1.3.0rc21); pip install tensorrt-llm==1.2.1, or run in the container "
                                  "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3")
    assert "tensorrt_llm" not in sys.modules


def test_probe_names_the_missing_trtllm_build(tmp_path, monkeypatch):
    _fake_install(tmp_path, grok=True, build=False, monkeypatch=monkeypatch)
    problems = compat.capability_problems()
    assert problems == ["trtllm-build is not on PATH: the installed TensorRT-LLM has no engine builder (removed in "
                        "1.3.0rc21) or its scripts folder is not on PATH; pip install tensorrt-llm==1.2.1, or run in "
                        "the container nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 (docs/deploy-grok-1.md)"]


def test_probe_with_both_missing_gives_two_messages(tmp_path, monkeypatch):
    _fake_install(tmp_path, grok=False, build=False, monkeypatch=monkeypatch)
    problems = compat.capability_problems()
    init = tmp_path / "site" / "tensorrt_llm" / "__init__.py"
    assert [p.split(":")[0] for p in problems] == ["trtllm-build is not on PATH",
                                                   f"tensorrt_llm.models.grok is not found in {init}"]


def test_probe_is_silent_where_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # as if not installed: find_spec answers None
    assert compat.capability_problems() == []
