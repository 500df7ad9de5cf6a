"""build, backend trtllm: TensorRT-LLM's mixed-GEMM preprocessing, then `trtllm-build`.

The converted checkpoint keeps raw [in, out] int8 codes ("preprocessed": false in its manifest).
On the GPU host, every int8 weight goes through TensorRT-LLM's own
`torch.ops.trtllm.preprocess_weights_for_mixed_gemm` (its layout depends on the GPU architecture
and the TensorRT-LLM version, so it is never reimplemented here), then `trtllm-build` builds the
engines with the plugin options of pipeline.yaml (trtllm-checkpoint.md §5, §8).
`grok-deploy preprocess` is the first step as its own command, so that the commands `plan` prints
can be run by hand (trtllm-build then reads its output, never the raw int8 checkpoint).
Before anything is built, the installed TensorRT-LLM is checked against the known-good range and
the checkpoint's sizes against what that version builds (compat.py); the version-dependent flags
follow the detected version. Without `tensorrt_llm`: a UserError with the exact command this
stage would run.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from grok_deploy.errors import UserError
from grok_deploy.manifest import MARK, check_replaceable, check_space, clean_stale, commit, mark, sha256_file
from grok_deploy.trtllm import compat
from grok_deploy.trtllm import names as tn

# engine options (pipeline.yaml `engine:`) and their defaults; each is the trtllm-build flag of
# the same name, written in this order
ENGINE_DEFAULTS = {
    "gpt_attention_plugin": "bfloat16",  # carries the 30*tanh soft-cap
    "gemm_plugin": "bfloat16",
    "moe_plugin": "bfloat16",            # required: the non-plugin MoE rejects weight-only
    "paged_kv_cache": "enable",          # in-flight batching
    "remove_input_padding": "enable",    # packed tokens, in-flight batching
    "max_batch_size": 8,
    "max_input_len": 1024,
    "max_seq_len": 2048,
    "max_num_tokens": 8192,
    "max_beam_width": 1,
    "tokens_per_block": None,            # None: TensorRT-LLM's default
    "use_paged_context_fmha": None,      # None: not passed; "disable" on versions whose paged
                                         # context FMHA rejects the soft-cap (§8)
    "workers": None,                     # None: one per rank
}
PLUGIN_VALUES = ("bfloat16", "float16", "float32", "auto", "disable")
SWITCH_VALUES = ("enable", "disable")
INT_OPTIONS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
               "tokens_per_block", "workers")


def trtllm_build_args(e, dtype: str, ckpt_dir, out_dir, version: str | None = None) -> list[str]:
    """trtllm-build flags for Grok (trtllm-checkpoint.md §8) from the pipeline's `engine` section `e`;
    plugins `auto` take the checkpoint dtype. `plan` prints these and the build stage runs them.
    `version`: write the version-dependent flags for that TensorRT-LLM (compat.build_flags); None:
    version-neutral (`--paged_kv_cache`, paged context FMHA only when set), mapped by the build."""
    plug = lambda v: dtype if v == "auto" else v  # noqa: E731
    onoff = lambda b: "enable" if b else "disable"  # noqa: E731
    if version is None:
        switches = ["--paged_kv_cache", onoff(e.paged_kv_cache)]
        if e.use_paged_context_fmha is not None:
            switches += ["--use_paged_context_fmha", onoff(e.use_paged_context_fmha)]
    else:
        switches = compat.build_flags(version, e.paged_kv_cache, e.use_paged_context_fmha)
    return ["--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
            "--gpt_attention_plugin", plug(e.gpt_attention_plugin), "--gemm_plugin", plug(e.gemm_plugin),
            "--moe_plugin", plug(e.moe_plugin), *switches,
            "--remove_input_padding", onoff(e.remove_input_padding), "--tokens_per_block", str(e.tokens_per_block),
            "--max_batch_size", str(e.max_batch_size), "--max_input_len", str(e.max_input_len),
            "--max_seq_len", str(e.max_seq_len), "--max_num_tokens", str(e.max_num_tokens),
            "--max_beam_width", "1", "--workers", str(e.workers)]


def flags_to_options(args: list[str]) -> dict:
    """A trtllm-build flag list (`--key value` pairs, as trtllm_build_args writes) as engine
    options; --checkpoint_dir and --output_dir are dropped (this stage chooses them)."""
    if len(args) % 2:
        raise UserError(f"trtllm-build arguments must be --flag value pairs: {args}")
    opts = {}
    for flag, value in zip(args[::2], args[1::2]):
        key = flag.removeprefix("--")
        if key in ("checkpoint_dir", "output_dir"):
            continue
        if key == "kv_cache_type":  # the 0.17+ spelling of --paged_kv_cache
            key, value = "paged_kv_cache", {"paged": "enable", "disabled": "disable"}.get(value, value)
        opts[key] = int(value) if key in INT_OPTIONS and str(value).isdigit() else value
    return opts


def engine_options(engine_opts: dict | None, config: dict) -> dict:
    """engine_opts over the defaults, checked against the checkpoint's config.json."""
    opts = dict(ENGINE_DEFAULTS)
    for key, value in (engine_opts or {}).items():
        if key not in opts:
            raise UserError(f"engine.{key}: unknown trtllm-build option; known: {', '.join(opts)}")
        opts[key] = value
    if opts["workers"] is None:
        opts["workers"] = config["mapping"]["world_size"]
    for key in INT_OPTIONS:
        if key == "tokens_per_block" and opts[key] is None:
            continue
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise UserError(f"engine.{key}: must be a positive integer, got {opts[key]!r}")
    for key in ("gpt_attention_plugin", "gemm_plugin", "moe_plugin"):
        if opts[key] not in PLUGIN_VALUES:
            raise UserError(f"engine.{key}: {opts[key]!r}, use one of {', '.join(PLUGIN_VALUES)}")
    for key in ("paged_kv_cache", "remove_input_padding", "use_paged_context_fmha"):
        if opts[key] is not None and opts[key] not in SWITCH_VALUES:
            raise UserError(f"engine.{key}: {opts[key]!r}, use enable or disable")
    if config["quantization"].get("quant_algo") and config["dtype"] == "float32":
        raise UserError("dtype float32 with W8A16: TensorRT-LLM's weight-only GEMM and MoE plugins have no "
                        "float32 path for int8 weights; convert with --dtype bfloat16 (or --quant none)")
    if opts["moe_plugin"] == "disable" and config["quantization"].get("quant_algo"):
        raise UserError("engine.moe_plugin: disable is impossible with W8A16; TensorRT-LLM's weight-only "
                        "MoE needs the MoE plugin")
    if opts["max_input_len"] > opts["max_seq_len"]:
        raise UserError(f"engine.max_input_len {opts['max_input_len']} exceeds engine.max_seq_len {opts['max_seq_len']}")
    if opts["max_seq_len"] > config["max_position_embeddings"]:
        raise UserError(f"engine.max_seq_len {opts['max_seq_len']} exceeds the model's "
                        f"max_position_embeddings {config['max_position_embeddings']}")
    return opts


def trtllm_build_command(ckpt_dir, engine_dir, opts: dict, exe: list[str] | None = None,
                         version: str | None = None) -> list[str]:
    """The trtllm-build command line, as a list (opts from engine_options); with `version`, the
    paged KV and paged context FMHA flags are spelled as that TensorRT-LLM wants them."""
    cmd = list(exe or ["trtllm-build"]) + ["--checkpoint_dir", str(ckpt_dir), "--output_dir", str(engine_dir)]
    switches = ("paged_kv_cache", "use_paged_context_fmha")
    for key in ENGINE_DEFAULTS:
        if version is not None and key in switches:
            if key == "paged_kv_cache":
                fmha = opts.get("use_paged_context_fmha")
                cmd += compat.build_flags(version, opts[key] == "enable", None if fmha is None else fmha == "enable")
        elif opts.get(key) is not None:
            cmd += [f"--{key}", str(opts[key])]
    return cmd


def model_sizes(config: dict) -> SimpleNamespace:
    """The sizes compat.size_problems reads, from a TensorRT-LLM checkpoint's config.json."""
    c = config
    return SimpleNamespace(emb_size=c["hidden_size"], key_size=c["head_size"], num_q_heads=c["num_attention_heads"],
                           num_kv_heads=c["num_key_value_heads"], q_size=c["num_attention_heads"] * c["head_size"],
                           ffn_size=c["intermediate_size"])


def check_buildable(config: dict, version: str) -> None:
    """Refuse, before anything is built: a TensorRT-LLM version outside the known-good range, one
    without trtllm-build or the Grok model (compat.capability_problems), W8A16 on a GPU whose
    builder refuses int8 weight-only (gpus.int8_problem, the GPU from nvidia-smi), and sizes that
    version cannot build (compat.size_problems)."""
    from grok_deploy.trtllm import gpus

    compat.check_version(version)
    missing = compat.capability_problems()
    if missing:
        raise UserError("; ".join(missing))
    quant = "w8a16" if config["quantization"].get("quant_algo") else "none"
    gpu = gpus.detect()
    problem = gpu and gpus.int8_problem(quant, gpu.name, gpu.sm, config["dtype"])
    if problem:
        raise UserError(f"quantization {problem} (then convert again; `grok-deploy plan` shows the memory it needs)")
    problems = compat.size_problems(model_sizes(config), config["mapping"]["tp_size"], quant, version)
    if problems:
        raise UserError(f"TensorRT-LLM {version} cannot build this checkpoint: {'; '.join(problems)}; "
                        "for a GPU smoke test use the grok-1-smoke preset (pipelines/grok-1-smoke-gpu.yaml)")


def _trtllm_exe() -> list[str]:
    found = shutil.which("trtllm-build")
    return [found] if found else [sys.executable, "-m", "tensorrt_llm.commands.build"]


def _import_trtllm():
    """tensorrt_llm (which registers torch.ops.trtllm), or the reason it cannot be imported."""
    try:
        import tensorrt_llm
        return tensorrt_llm, None
    except Exception as e:  # ImportError, or CUDA libraries missing on a CPU host
        return None, f"{type(e).__name__}: {e}"


def preprocess_checkpoint(src: Path, dst: Path, config: dict) -> tuple[int, dict[str, str]]:
    """Copy the checkpoint, passing every int8 weight through TensorRT-LLM's preprocessing op
    (as the official converter: activation type = the checkpoint dtype). Returns the tensor count
    and each rank file's sha256 (hashed as it was written)."""
    import ml_dtypes
    import torch
    from safetensors import safe_open

    from grok_deploy.trtllm.safetensors_writer import RankWriter, Spec, read_header

    op = torch.ops.trtllm.preprocess_weights_for_mixed_gemm
    act = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config["dtype"], torch.bfloat16)
    codes = {v: k for k, v in tn.ST_DTYPES.items()}
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    count, shas = 0, {}
    for r in range(config["mapping"]["world_size"]):
        header = read_header(src / tn.rank_file(r))
        items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
        specs = [Spec(k, tuple(v["shape"]), codes[v["dtype"]]) for k, v in items]
        writer = RankWriter(dst / tn.rank_file(r), specs, {"format": "pt", "preprocessed": "true"})
        try:
            with safe_open(str(src / tn.rank_file(r)), framework="pt") as f:
                for spec in specs:
                    t = f.get_tensor(spec.name)
                    if spec.dtype == "int8" and spec.name.endswith(tn.WEIGHT):
                        t = op(t.contiguous(), torch.int8, act)
                        if t.dtype != torch.int8 or tuple(t.shape) != spec.shape:
                            raise RuntimeError(f"{spec.name}: preprocessing returned {t.dtype} {tuple(t.shape)}")
                    if t.dtype == torch.bfloat16:  # numpy has no bf16: through int16, as ml_dtypes
                        arr = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                    else:
                        arr = t.contiguous().numpy()
                    writer.write(spec.name, arr)
                    count += 1
            shas[tn.rank_file(r)] = writer.close()
        except BaseException:
            writer.abort()  # stops its writing thread; the caller removes the folder
            raise
    return count, shas



def _read_checkpoint(ckpt_dir: Path) -> tuple[dict, dict]:
    try:
        return (json.loads((ckpt_dir / "config.json").read_text()),
                json.loads((ckpt_dir / "manifest.json").read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt_dir}: not a complete convert output (config.json and manifest.json "
                        f"needed: {e}); run convert first") from None


def preprocess(src, out) -> dict:
    """`grok-deploy preprocess`: the build's first step as its own command. Writes into `out` a
    copy of the converted checkpoint `src` whose int8 weights went through TensorRT-LLM's
    preprocessing op on this GPU host; `trtllm-build --checkpoint_dir OUT` then builds from it.
    The folder appears atomically with manifest.json (preprocessed: true) written last."""
    from grok_deploy.manifest import atomic_dir, write_json_atomic

    src, out = Path(src), Path(out)
    check_replaceable(out, "preprocess")  # a folder we may not replace is refused before any work
    config, manifest = _read_checkpoint(src)
    if not config["quantization"].get("quant_algo"):
        raise UserError(f"{src}: quantization none has no int8 weights to preprocess; run trtllm-build "
                        f"--checkpoint_dir {src} directly")
    if manifest.get("preprocessed") is not False:
        raise UserError(f"{src}: manifest.json says preprocessed: {manifest.get('preprocessed')!r}; preprocess "
                        "takes the raw output of convert (preprocessing twice scrambles the weights)")
    engine_options({}, config)  # the dtype and plugin refusals, before any work
    trtllm, why = _import_trtllm()
    if trtllm is None:
        raise UserError(f"preprocess needs a GPU host with TensorRT-LLM ({why}): the int8 layout of "
                        "torch.ops.trtllm.preprocess_weights_for_mixed_gemm depends on the GPU and the version; "
                        f"there use TensorRT-LLM {compat.ASSUMED}: {compat.USE}")
    version = str(getattr(trtllm, "__version__", None))
    check_buildable(config, version)
    check_space(out, sum(f["bytes"] for f in manifest.get("files", {}).values()),
                "the preprocessed copy of the checkpoint")
    t0 = time.perf_counter()
    with atomic_dir(out, "preprocess") as tmp:
        os.unlink(tmp / MARK)  # preprocess_checkpoint makes the folder (commit marks it again)
        tmp.rmdir()
        count, shas = preprocess_checkpoint(src, tmp, config)
        doc = {**manifest, "produced_by": "grok-deploy preprocess", "preprocessed": True,
               "preprocessed_from": str(src.resolve()), "tensors": count, "tensorrt_llm_version": version,
               "gpu": _gpu(), "seconds": round(time.perf_counter() - t0, 2),
               "files": {p.name: {"bytes": p.stat().st_size, "sha256": shas.get(p.name) or sha256_file(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file()}}
        write_json_atomic(tmp / "manifest.json", doc, indent=2)
    return doc


def cli_preprocess(args) -> int:
    doc = preprocess(args.trtllm_dir, args.out)
    print(f"wrote {args.out}: {doc['tensors']} tensors, int8 weights preprocessed by TensorRT-LLM "
          f"{doc['tensorrt_llm_version']} for {doc['gpu'] or 'this GPU'}; next: trtllm-build --checkpoint_dir "
          f"{args.out}")
    return 0


def build_trtllm(ckpt_dir, out, engine_opts: dict | None = None, args: list[str] | None = None) -> dict:
    """Build TensorRT-LLM engines from a converted checkpoint into `out`; returns the manifest.

    Options come as `engine_opts` (keys of ENGINE_DEFAULTS) or as a trtllm-build flag list `args`."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if args is not None:
        engine_opts = {**(engine_opts or {}), **flags_to_options(args)}
    config, ckpt_manifest = _read_checkpoint(ckpt_dir)
    opts = engine_options(engine_opts, config)
    check_replaceable(out, "build")
    # per process, so that two builds never share it; clean_stale removes it once the pid is gone
    work = out.parent / f"{out.name}.tmp-{os.getpid()}-build"
    needs_preprocessing = ckpt_manifest.get("preprocessed") is False and config["quantization"].get("quant_algo")
    build_ckpt = work / "checkpoint" if needs_preprocessing else ckpt_dir
    trtllm, why = _import_trtllm()
    version = getattr(trtllm, "__version__", None) if trtllm else None
    if trtllm is not None:
        check_buildable(config, str(version))
    cmd = trtllm_build_command(build_ckpt, work / "engine", opts, _trtllm_exe() if trtllm else None,
                               version if trtllm else compat.ASSUMED)  # without it: the flags for 1.2.1
    if trtllm is None:
        pre = (f"preprocesses the int8 weights of {ckpt_dir} with torch.ops.trtllm."
               f"preprocess_weights_for_mixed_gemm into {build_ckpt}, then " if needs_preprocessing else "")
        raise UserError(f"the trtllm backend needs a GPU host with TensorRT-LLM ({why}); there, with TensorRT-LLM "
                        f"{compat.ASSUMED} ({compat.USE}), this stage {pre}runs: {shlex.join(cmd)}")
    t0 = time.perf_counter()
    clean_stale(out)  # an earlier build's work folder whose process is gone (its mark says so)
    try:
        work.mkdir(parents=True)
    except FileExistsError:
        raise UserError(f"{work}: exists and is not a work folder of an exited grok-deploy build; move it "
                        "away yourself") from None
    mark(work, "build", out)
    try:
        if needs_preprocessing:
            preprocess_checkpoint(ckpt_dir, build_ckpt, config)
        log = work / "build.log"
        with open(log, "wb") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            raise UserError(f"trtllm-build failed with exit {rc}; last lines of {log}: {tail}")
        engine = work / "engine"
        shutil.move(str(log), engine / "build.log")
        manifest = _manifest(cmd, opts, ckpt_dir, needs_preprocessing, config, version, t0, engine)
        commit(engine, out, manifest, kind="build")  # replaces only an earlier build (or nothing); manifest last
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _manifest(cmd, opts, ckpt_dir: Path, needs_preprocessing, config, version, t0, engine: Path) -> dict:
    return {
        "produced_by": "grok-deploy build", "backend": "trtllm", "command": cmd, "engine_opts": opts,
        "checkpoint": str(ckpt_dir.resolve()), "checkpoint_manifest_sha256": sha256_file(ckpt_dir / "manifest.json"),
        "preprocessed_here": bool(needs_preprocessing), "mapping": config["mapping"],
        "tensorrt_llm_version": version, "gpu": _gpu(),
        "seconds": round(time.perf_counter() - t0, 2),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in sorted(engine.iterdir()) if p.is_file() and p.name not in (MARK, "manifest.json")},
    }


def _gpu() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    except Exception:
        pass
    return None
