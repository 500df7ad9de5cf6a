"""What TensorRT-LLM can build for Grok, by version: the known-good range, the flags that change
between versions, and the sizes its kernels accept. Pure data and checks: no tensorrt_llm import
(the version comes from the package metadata), so `plan` can use it on a CPU host.

Facts (issue 14, tried against TensorRT-LLM's own `GrokForCausalLM` loading path):
- 0.11.0.dev2024062500 reads `config.moe`, which no Grok checkpoint sets: nothing builds;
- 0.14.0.dev2024100800 passes MoeConfig's arguments by position after a field was inserted, so
  `top_k` lands in the wrong field; fixed by 0.15.0.dev2024101500;
- 0.12 loads every layout the converter writes (tp 1/2/8, moe_ep 2, pp 2, tp 2 x pp 2);
- from 0.14, weight-only linears pad their full in and out features up to a multiple of 64 x tp,
  so a checkpoint whose sizes are not such multiples no longer matches the parameters it loads into;
- the soft-capped attention kernels take head sizes 128 and 256 only;
- from 0.17 `--paged_kv_cache` is deprecated for `--kv_cache_type paged|disabled` (1.x's
  tensorrt_llm/commands/build.py, stored commit 008b2b8d: `--kv_cache_type` continuous|paged|disabled,
  `--paged_kv_cache` "Deprecated", warned about when given);
- 0.11-era paged context FMHA rejects the soft-cap ("Paged KV FMHA doesn't support qk_tanh_scale");
  later kernels do not, and disabling it costs KV-cache reuse and chunked context;
- 1.3.0rc21 removed the TensorRT-engine path: no `trtllm-build`, no `tensorrt_llm.models.grok`, no
  C++ Triton backend (only the PyTorch backend, which has no Grok model). 1.2.1 is the last stable
  release that builds Grok engines; the Triton containers 26.04-26.07 ship it with the C++ backend,
  26.07 last (issue 19). Its builder refuses INT8/INT4 weight-only on SM 100-119 (gpus.py).
"""
from __future__ import annotations

import re

from grok_deploy.errors import UserError

# [low, high) ranges of versions that build and load Grok checkpoints; ".dev0" bounds exclude a
# whole release line including its dev builds.
KNOWN_GOOD = (("0.12.0", "0.14.0.dev0"), ("0.15.0.dev2024101500", "1.3.0rc21"))
REMOVED_IN = "1.3.0rc21"     # the first version without trtllm-build, models.grok and the C++ backend
# why a version outside the range fails, for the error message: (low, high, reason)
KNOWN_BAD = (
    ("0.0", "0.11.0.dev0", "no Grok model before 0.11"),
    ("0.11.0.dev0", "0.12.0", "0.11's Grok model reads config.moe, which Grok checkpoints never set"),
    ("0.14.0.dev0", "0.15.0.dev2024101500", "MoeConfig arguments are passed by position after a field "
     "was inserted, so top_k lands in the wrong field (fixed by 0.15.0.dev2024101500)"),
)
ASSUMED = "1.2.1"            # the version `plan` writes flags for when none is installed or pinned
CONTAINER = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"  # the last Triton image with 1.2.1
# the pipeline schema (dtype) and `grok-deploy convert` (--dtype) refuse this pair with these words
W8A16_FLOAT32 = ("float32 with quantization w8a16: TensorRT-LLM's weight-only GEMM and MoE plugins have no float32 "
                 "path for int8 weights; use bfloat16 (or quantization: none)")
INSTALL = f"pip install tensorrt-llm=={ASSUMED}"
USE = f"{INSTALL}, or run in the container {CONTAINER} (docs/deploy-grok-1.md)"
KV_CACHE_TYPE_FROM = "0.17.0.dev0"   # --paged_kv_cache deprecated, --kv_cache_type instead
SOFTCAP_PAGED_FMHA_FROM = "0.12.0"   # paged context FMHA accepts the soft-cap
WEIGHT_ONLY_PAD_FROM = "0.14.0.dev0"  # weight-only linears pad in/out features to 64 x tp
PAD_MULTIPLE = 64
SOFTCAP_HEAD_SIZES = (128, 256)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?(?:\+.*)?$")


def parse_version(text: str) -> tuple:
    """A sortable key of a PEP 440 version as TensorRT-LLM spells them (0.15.0.dev2024101500,
    0.12.0, 1.0.0rc3, 0.16.0.post1): dev builds sort before pre-releases, before the release."""
    m = _VERSION.match(str(text).strip())
    if not m:
        raise UserError(f"TensorRT-LLM version {text!r}: not a version number (like 0.15.0 or 0.15.0.dev2024101500)")
    major, minor, patch, pre, pre_n, post, dev = m.groups()
    stage = (0, int(dev)) if dev is not None and pre is None else \
            (1 + "a b rc".split().index(pre), int(pre_n)) if pre else (9, 0)
    return int(major), int(minor), int(patch or 0), stage, int(post or 0), -1 if dev is None else int(dev)


def in_range(version: str, low: str, high: str) -> bool:
    return parse_version(low) <= parse_version(version) < parse_version(high)


def at_least(version: str, low: str) -> bool:
    return parse_version(version) >= parse_version(low)


def known_good_text() -> str:
    return " or ".join(f">={lo},<{hi}" for lo, hi in KNOWN_GOOD)


def version_problem(version: str) -> str | None:
    """Why `version` cannot build Grok, or None when it lies in the known-good range."""
    if any(in_range(version, lo, hi) for lo, hi in KNOWN_GOOD):
        return None
    if at_least(version, REMOVED_IN):
        return (f"TensorRT-LLM {version} cannot build Grok: TensorRT-LLM removed the TensorRT-engine path "
                f"(trtllm-build, tensorrt_llm.models.grok and the C++ Triton backend) and Grok in {REMOVED_IN}; "
                f"use {ASSUMED}, the last release that builds it: {USE}")
    why = next((r for lo, hi, r in KNOWN_BAD if in_range(version, lo, hi)), "not a version checked")
    return (f"TensorRT-LLM {version} is outside the known-good range for Grok ({known_good_text()}): {why}; "
            f"install {ASSUMED}: {USE}")


def check_version(version: str) -> None:
    """Raise UserError naming the version and the range when `version` cannot build Grok."""
    problem = version_problem(version)
    if problem:
        raise UserError(problem)


def installed_version() -> str | None:
    """The installed tensorrt_llm's version from its package metadata (no import, no CUDA)."""
    from importlib import metadata

    for name in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def capability_problems() -> list[str]:
    """What the installed TensorRT-LLM lacks to build Grok engines, found without importing it (its
    import loads CUDA): `trtllm-build` on PATH, and the `tensorrt_llm.models.grok` module located
    by the import system's path finder, one package level at a time. Empty when nothing is
    installed (the version check and the build say so)."""
    import importlib.util
    import shutil
    from importlib.machinery import PathFinder

    try:
        top = importlib.util.find_spec("tensorrt_llm")  # the top level is located, never executed
    except (ImportError, ValueError):  # a module object without a spec
        return []
    if top is None:
        return []
    out = []
    if shutil.which("trtllm-build") is None:
        out.append(f"trtllm-build is not on PATH: the installed TensorRT-LLM has no engine builder (removed in "
                   f"{REMOVED_IN}) or its scripts folder is not on PATH; {USE}")
    spec = top
    for name in ("tensorrt_llm.models", "tensorrt_llm.models.grok"):
        spec = PathFinder.find_spec(name, spec.submodule_search_locations) if spec.submodule_search_locations else None
        if spec is None:
            break
    if spec is None:
        out.append(f"tensorrt_llm.models.grok is not found in {top.origin or 'the installed tensorrt_llm'}: this "
                   f"TensorRT-LLM has no Grok model (removed with the TensorRT-engine path in {REMOVED_IN}); {USE}")
    return out


def build_flags(version: str, paged_kv_cache: bool, use_paged_context_fmha: bool | None) -> list[str]:
    """The version-dependent trtllm-build flags: the paged KV switch, and paged context FMHA
    (None: "disable" where the kernels reject the soft-cap, else TensorRT-LLM's default)."""
    if at_least(version, KV_CACHE_TYPE_FROM):
        flags = ["--kv_cache_type", "paged" if paged_kv_cache else "disabled"]
    else:
        flags = ["--paged_kv_cache", "enable" if paged_kv_cache else "disable"]
    if use_paged_context_fmha is None and not at_least(version, SOFTCAP_PAGED_FMHA_FROM):
        use_paged_context_fmha = False
    if use_paged_context_fmha is not None:
        flags += ["--use_paged_context_fmha", "enable" if use_paged_context_fmha else "disable"]
    return flags


def weight_only_dims(m) -> dict[str, int]:
    """Full (unsharded) in and out features of every weight-only matrix of a GrokConfig `m`."""
    return {"hidden (qkv in, dense out, fc in, proj out)": m.emb_size,
            "qkv out (q + 2 kv heads x head size)": (m.num_q_heads + 2 * m.num_kv_heads) * m.key_size,
            "dense in (q heads x head size)": m.q_size,
            "expert ffn (fc out / 2, proj in)": m.ffn_size}


def size_problems(m, tp: int, quant: str, version: str | None = None) -> list[str]:
    """Sizes of preset `m` that TensorRT-LLM cannot build at tensor parallel `tp` (version None:
    under every padding rule): head size outside the soft-capped kernels', and weight-only
    dimensions that 0.14+ pads to a multiple of 64 x tp (the checkpoint would then not load)."""
    out = []
    if m.key_size not in SOFTCAP_HEAD_SIZES:
        out.append(f"head size {m.key_size}: the soft-capped attention kernels take "
                   f"{' or '.join(map(str, SOFTCAP_HEAD_SIZES))}")
    if quant == "w8a16" and (version is None or at_least(version, WEIGHT_ONLY_PAD_FROM)):
        multiple = PAD_MULTIPLE * tp
        bad = [f"{name} {n}" for name, n in weight_only_dims(m).items() if n % multiple]
        if bad:
            out.append(f"weight-only sizes not multiples of 64 x tp = {multiple} (padded from TensorRT-LLM 0.14, "
                       f"so the rank files no longer load): {', '.join(bad)}")
    return out
