"""The stage table: what each stage depends on, where it writes, and its adapter to the stage core.

Adapters are the only place that knows the cores' signatures; each imports its core lazily (so
`plan` never imports torch) and returns the dict that becomes the stage's manifest. A stage core
writes into `ctx.out` (a temporary folder the runner renames to `ctx.final` afterwards), so a core
must not store `ctx.out` itself in its files; it may store `ctx.final`.
A returned `"passed": False` marks a failed check: the folder is kept for reading, without a
manifest, and the run stops with exit 1.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grok_deploy.pipeline.schema import PipelineConfig


@dataclass
class StageContext:
    cfg: PipelineConfig
    out: Path | None                  # temporary folder to write into
    final: Path | None                # where `out` will live once done
    upstream: dict[str, dict]         # manifests of the upstream stages
    dirs: dict[str, Path]             # final folders of the upstream stages
    stack: ExitStack                  # closed at the end of the run (servers)
    services: dict = field(default_factory=dict)  # shared live objects: "server", "url"
    log: logging.Logger = logging.getLogger("grok_deploy.stage")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict | None]
    keys: Any = ()                    # dotted config keys (or cfg -> keys) fingerprinted
    upstream: Any = ()                # stage names (or cfg -> names)
    out: Callable[[PipelineConfig], Path] | None = None  # None: no folder, never cached
    cached: bool = True               # False: runs whenever a later running stage needs it
    optional: bool = False            # runs only when named in --stages
    applies: Callable[[PipelineConfig], bool] = lambda cfg: True
    reads_source: bool = False        # needs model.source.path to exist when it runs
    extra: Callable[[PipelineConfig], Any] | None = None  # more fingerprint input

    def keys_for(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return tuple(self.keys(cfg) if callable(self.keys) else self.keys)

    def upstream_for(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return tuple(self.upstream(cfg) if callable(self.upstream) else self.upstream)


# --- adapters to the stage cores (fix signatures here, and only here) --------------------

def _checkpoint(ctx: StageContext) -> str:
    return ctx.upstream["source"]["checkpoint"]


def run_source(ctx: StageContext) -> dict:
    from grok_deploy import progress
    from grok_deploy.checkpoint import open_checkpoint

    cfg, src = ctx.cfg, ctx.cfg.model.source
    if src.format == "synthetic":
        from grok_deploy.checkpoint.tiny import write_tiny

        write_tiny(ctx.out, cfg.model.preset, src.seed, progress=progress.enabled())
        where, final = ctx.out, ctx.final
    else:
        where = final = cfg.resolve(src.path)
    ckpt = open_checkpoint(where, preset=cfg.model.preset)
    if src.format != "synthetic" and ckpt.format != src.format:
        raise cfg.fail("model.source.format", f"{where} holds a {ckpt.format} checkpoint, not {src.format}")
    tok = Path(ckpt.tokenizer_path)
    if src.tokenizer:
        tok = cfg.resolve(src.tokenizer)
    elif tok.is_relative_to(where):  # synthetic: inside the tmp folder, which becomes `final`
        tok = final / tok.relative_to(where)
    infos = ckpt.infos()
    return {"format": ckpt.format, "checkpoint": str(final), "tokenizer": str(tok), "preset": cfg.model.preset,
            "config": ckpt.config.to_dict(), "tensors": len(infos)}


def run_reference(ctx: StageContext) -> dict:
    from grok_deploy.verify.reference import run_reference as core

    v = ctx.cfg.verify
    return core(_checkpoint(ctx), ctx.out, list(v.prompts), v.max_tokens, dtype=v.reference_dtype,
                preset=ctx.cfg.model.preset)


def run_convert(ctx: StageContext) -> dict:
    from grok_deploy import progress
    from grok_deploy.errors import UserError
    from grok_deploy.pipeline.hardware import int8_refusal, resolve_gpu
    from grok_deploy.trtllm import gpus
    from grok_deploy.trtllm.convert import convert

    # an int8 checkpoint the GPU's TensorRT-LLM builder refuses: stop before it is written (plan: the fit)
    refusal = int8_refusal(ctx.cfg, resolve_gpu(ctx.cfg, gpus.detect()), None)
    if refusal:
        raise UserError(f"{refusal} (`grok-deploy plan` shows whether it fits)")
    p = ctx.cfg.parallel
    return convert(_checkpoint(ctx), ctx.out, tp=p.tp, moe_tp=p.moe_tp, moe_ep=p.moe_ep, pp=p.pp,
                   quant=ctx.cfg.quantization, dtype=ctx.cfg.dtype, progress=progress.enabled(),
                   preset=ctx.cfg.model.preset)


def run_check_shards(ctx: StageContext) -> dict:
    from grok_deploy.trtllm.check_shards import check_shards

    res = check_shards(ctx.dirs["convert"], _checkpoint(ctx), ctx.cfg.verify.shards_prompt,
                       preset=ctx.cfg.model.preset)
    (ctx.out / "check_shards.json").write_text(json.dumps(res, indent=1, default=str))
    return {**res, "passed": bool(res.get("ok", res.get("tokens_match")))}


def run_export_onnx(ctx: StageContext) -> dict:
    from grok_deploy import progress
    from grok_deploy.onnx.export import export_onnx

    return export_onnx(_checkpoint(ctx), ctx.out, quant=ctx.cfg.engine.onnx_quant,
                       preset=ctx.cfg.model.preset, progress=progress.enabled())


def run_build(ctx: StageContext) -> dict:
    e = ctx.cfg.engine
    if e.backend == "onnxruntime":
        from grok_deploy.onnx.ort_engine import build_engine

        return build_engine(ctx.dirs["export-onnx"], ctx.out, max_batch_size=e.max_batch_size, max_seq_len=e.max_seq_len)
    from grok_deploy.trtllm.build import build_trtllm, trtllm_build_args

    return build_trtllm(ctx.dirs["convert"], ctx.out, args=trtllm_build_args(e, ctx.cfg.dtype, ctx.dirs["convert"], ctx.out))


def run_package(ctx: StageContext) -> dict:
    from grok_deploy.serving.package import package

    return package(ctx.cfg, ctx.out)


def run_deploy(ctx: StageContext) -> dict:
    from grok_deploy.serving.deploy import TritonServer

    server = ctx.stack.enter_context(TritonServer(ctx.cfg, ctx.dirs["package"]))
    url = server.grpc_url  # the resolved host and the port actually bound (0.0.0.0 is reached on 127.0.0.1)
    ctx.services.update(server=server, url=url)
    return {"url": url}


def run_verify(ctx: StageContext) -> dict:
    from grok_deploy.verify.compare import verify

    mode, _ = ctx.cfg.verify_mode()
    if mode == "score":
        return verify(ctx.cfg, url=ctx.services["url"], reference_dir=None, out=ctx.out,
                      source=_checkpoint(ctx), mode="score")
    return verify(ctx.cfg, url=ctx.services["url"], reference_dir=ctx.dirs["reference"], out=ctx.out)


def run_bench(ctx: StageContext) -> dict:
    from grok_deploy.serving.bench import bench

    doc = bench(ctx.cfg, url=ctx.services["url"], out=ctx.out)
    return {**doc, "results": [{k: v for k, v in r.items() if k != "raw"} for r in doc["results"]]}


# --- the table ------------------------------------------------------------------------------

def source_signature(cfg: PipelineConfig) -> list:
    """Names, sizes and mtimes of the files of an xai/hf source (not their bytes: 300 GB)."""
    src = cfg.model.source
    if src.format == "synthetic":
        return []
    root = cfg.resolve(src.path)
    if not root.exists():
        return ["missing"]
    sig = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(files):
            st = _source_stat(os.path.join(dirpath, name))
            sig.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
            if len(sig) > 20000:
                return sig
    return sig


def _source_stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        from grok_deploy.errors import UserError

        if os.path.islink(path):
            raise UserError(f"{path}: a symlink in the source folder that leads nowhere ({os.readlink(path)}: "
                            f"{e.strerror}); fix or remove it") from None
        raise UserError(f"{path}: cannot be read in the source folder ({e.strerror}); fix or remove it") from None


def _golden(cfg: PipelineConfig) -> bool:
    return cfg.verify_mode()[0] == "golden"


def _ort(cfg: PipelineConfig) -> bool:
    return cfg.engine.backend == "onnxruntime"


ORT_ENGINE_KEYS = ("engine.backend", "engine.max_batch_size", "engine.max_input_len", "engine.max_seq_len", "engine.max_num_tokens")

STAGES: list[Stage] = [
    Stage("source", run_source, keys=("model",), out=lambda c: c.output("source"), reads_source=True,
          extra=source_signature),
    Stage("reference", run_reference, keys=("verify.prompts", "verify.max_tokens", "verify.reference_dtype"),
          upstream=("source",), out=lambda c: c.output("reference"), reads_source=True, applies=_golden),
    Stage("convert", run_convert, keys=("parallel", "quantization", "dtype"), upstream=("source",),
          out=lambda c: c.output("trtllm_ckpt"), reads_source=True),
    Stage("check-shards", run_check_shards, keys=("verify.shards_prompt",), upstream=("source", "convert"),
          out=lambda c: c.output("reports") / "check_shards", applies=lambda c: c.verify.check_shards,
          reads_source=True),
    Stage("export-onnx", run_export_onnx, keys=("engine.onnx_quant",), upstream=("source",),
          out=lambda c: c.output("onnx"), applies=_ort, reads_source=True),
    Stage("build", run_build, keys=lambda c: ORT_ENGINE_KEYS if _ort(c) else ("engine",),
          upstream=lambda c: ("export-onnx",) if _ort(c) else ("convert",), out=lambda c: c.output("engines")),
    Stage("package", run_package, keys=("triton",), upstream=("source", "build"), out=lambda c: c.output("triton_repo")),
    Stage("deploy", run_deploy, keys=("server",), upstream=("package",), cached=False),
    Stage("verify", run_verify, keys=lambda c: ("verify.prompts", "verify.max_tokens", "verify.tolerances")
          + (() if _golden(c) else ("verify.mode", "verify.reference_dtype")),
          upstream=lambda c: ("reference", "deploy") if _golden(c) else ("source", "deploy"),
          out=lambda c: c.output("reports") / "verify", extra=lambda c: c.verify_mode()[0]),
    Stage("bench", run_bench, upstream=("deploy",), out=lambda c: c.output("reports") / "bench", optional=True),
]
