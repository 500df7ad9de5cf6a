"""`plan`: validate a pipeline, list the stages that would run, print the external commands, and
estimate per-GPU memory and the decode roofline of the TensorRT-LLM engine.

Weights per rank follow the checkpoint the converter writes (trtllm-checkpoint.md §3, §9): int8
matrices with per-channel scales in the activation dtype (w8a16) or 16/32-bit matrices (none), an
fp32 router and norms per layer, a full vocab_embedding copy on the first PP stage, ln_f and the
lm_head shard [V/T, H] on the last.
"""
from __future__ import annotations

import json
import shlex

from grok_deploy.errors import UserError
from grok_deploy.model.config import GrokConfig
from grok_deploy.pipeline.hardware import int8_refusal, resolve_gpu, resolve_host
from grok_deploy.pipeline.schema import PipelineConfig, load_pipeline
from grok_deploy.serving.deploy import exposed
from grok_deploy.trtllm import compat, gpus
from grok_deploy.trtllm.build import trtllm_build_args
from grok_deploy.trtllm.mpi import mpirun_argv

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GB = 1e9


def layer_bytes(m: GrokConfig, tp: int, moe_tp: int, moe_ep: int, quant: str, dtype: str) -> dict[str, int]:
    """Bytes of one layer on one rank, by part; `expert` is one local expert's fc + proj slice."""
    a = DTYPE_BYTES[dtype]
    w, s = (1, a) if quant == "w8a16" else (a, 0)  # matrix element bytes, per-channel scale bytes
    h, f_r = m.emb_size, m.ffn_size // moe_tp
    qkv = (m.num_q_heads + 2 * m.num_kv_heads) * m.key_size // tp
    return {
        "qkv": h * qkv * w + qkv * s,
        "dense": (m.q_size // tp) * h * w + h * s,
        "expert": h * 2 * f_r * w + 2 * f_r * s + f_r * h * w + h * s,  # fc [H, 2I/Tm] + proj [I/Tm, H]
        "local_experts": m.num_experts // moe_ep,
        "router_norms": m.num_experts * h * 4 + 4 * h * a,             # fp32 router, 4 norms
    }


def weights_per_gpu(cfg: PipelineConfig) -> dict[str, int]:
    """Weight bytes of the fullest rank, with its parts."""
    m, p = cfg.grok, cfg.parallel
    a = DTYPE_BYTES[cfg.dtype]
    lb = layer_bytes(m, p.tp, p.moe_tp, p.moe_ep, cfg.quantization, cfg.dtype)
    per_layer = lb["qkv"] + lb["dense"] + lb["local_experts"] * lb["expert"] + lb["router_norms"]
    layers = per_layer * (m.num_layers // p.pp)
    emb = m.vocab_size * m.emb_size * a                       # full copy (no parallel embedding)
    head = (m.vocab_size // p.tp) * m.emb_size * a + m.emb_size * a  # lm_head shard + ln_f
    first, last = layers + emb, layers + head
    total = layers + emb + head if p.pp == 1 else max(first, last)
    return {"per_layer": per_layer, "layers": layers, "vocab_embedding": emb, "lm_head_ln_f": head, "total": total}


def kv_bytes_per_token(cfg: PipelineConfig) -> int:
    """K and V of one token on one rank: local layers x 2 x local KV heads x head size x dtype."""
    m, p = cfg.grok, cfg.parallel
    return (m.num_layers // p.pp) * 2 * (m.num_kv_heads // p.tp) * m.key_size * DTYPE_BYTES[cfg.dtype]


def active_bytes_per_token(cfg: PipelineConfig) -> int:
    """Weight bytes one rank reads per decoded token, summed over the PP stages it passes through:
    attention, router and norms, the top-k experts' slices it holds, one embedding row, lm_head."""
    m, p = cfg.grok, cfg.parallel
    lb = layer_bytes(m, p.tp, p.moe_tp, p.moe_ep, cfg.quantization, cfg.dtype)
    experts = min(m.num_selected_experts, lb["local_experts"])  # worst rank holds all selected ones
    per_layer = lb["qkv"] + lb["dense"] + lb["router_norms"] + experts * lb["expert"]
    a = DTYPE_BYTES[cfg.dtype]
    return m.num_layers * per_layer + m.emb_size * a + (m.vocab_size // p.tp) * m.emb_size * a


def memory_estimate(cfg: PipelineConfig, gpu_info: dict | None = None) -> dict:
    """Per-GPU memory for max_batch_size x max_seq_len tokens of KV cache, and the fit verdict, on
    the GPU `gpu_info` (hardware.resolve_gpu; default: the pipeline's, nvidia-smi not asked)."""
    e, hw = cfg.engine, cfg.hardware
    gpu_info = gpu_info or resolve_gpu(cfg, None)
    w = weights_per_gpu(cfg)
    kv_tok = kv_bytes_per_token(cfg)
    tokens = e.max_batch_size * e.max_seq_len
    kv, headroom, gpu = kv_tok * tokens, int(hw.headroom_gb * GB), gpu_info["memory_bytes"]
    total = w["total"] + kv + headroom
    fits = total <= gpu
    label = "w8a16" if cfg.quantization == "w8a16" else f"{cfg.dtype} (no quantization)"
    if hw.nodes > 1:
        label += f" on {hw.nodes} nodes x {cfg.world_size // hw.nodes} GPUs"
    detail = (f"weights {w['total'] / GB:.1f} GB + KV cache {kv / GB:.1f} GB ({e.max_batch_size} x {e.max_seq_len} "
              f"tokens x {kv_tok / 1024:.1f} KiB) + headroom {headroom / GB:.1f} GB = {total / GB:.1f} GB")
    room = max(gpu - w["total"] - headroom, 0)
    if fits:
        verdict = f"{label} fits: {detail} <= {gpu / GB:.0f} GB per GPU"
    else:
        more = (f"more ranks: parallel.pp {2 * cfg.parallel.pp} halves the layers per GPU (over hardware.nodes "
                f"{-(-2 * cfg.world_size // hw.gpus_per_node)} x {hw.gpus_per_node} GPUs, with hardware.hostfile)")
        hint = (f"lower engine.max_batch_size or engine.max_seq_len (room for {room // kv_tok} tokens of KV cache)"
                if room else f"the weights alone do not fit: use {'quantization: w8a16 or ' if cfg.quantization != 'w8a16' else ''}{more}")
        verdict = (f"{label} does not fit with the KV cache asked for at tp {cfg.parallel.tp} x pp {cfg.parallel.pp}: "
                   f"{detail} per GPU, more than {gpu_info['memory_source']}; {hint}")
    free = room * cfg.triton.kv_cache_free_gpu_mem_fraction
    return {"weights_bytes": w["total"], "weights": w, "kv_bytes_per_token": kv_tok, "kv_tokens": tokens,
            "kv_bytes": kv, "headroom_bytes": headroom, "total_bytes": total, "gpu_memory_bytes": gpu,
            "kv_capacity_tokens": int(free // kv_tok) if kv_tok else None, "fits": fits, "verdict": verdict}


def roofline(cfg: PipelineConfig, gpu_info: dict | None = None) -> dict:
    active = active_bytes_per_token(cfg)
    bw = (gpu_info or resolve_gpu(cfg, None))["bandwidth_bytes_per_s"]
    return {"active_weight_bytes_per_token": active, "hbm_bandwidth_bytes_per_s": bw,
            "tokens_per_s_upper_bound": bw / active}


# --- external commands ----------------------------------------------------------------------

def flags_version(cfg: PipelineConfig) -> tuple[str, str]:
    """(TensorRT-LLM version the printed trtllm-build flags are written for, where it comes from)."""
    if cfg.engine.trtllm_version != "auto":
        return cfg.engine.trtllm_version, "engine.trtllm_version"
    found = compat.installed_version()
    return (found, "installed here") if found else (compat.ASSUMED, "assumed: no TensorRT-LLM installed here")


def tritonserver_argv(cfg: PipelineConfig) -> list[str]:
    """The server launch; TensorRT-LLM: one mpirun app context per rank, leader mode (triton-serving.md §9);
    over several nodes with hardware.hostfile, the followers open no endpoints."""
    s, hw = cfg.server, cfg.hardware
    binary = "tritonserver" if s.binary == "auto" else str(cfg.resolve(s.binary))
    common = [f"--model-repository={cfg.output('triton_repo')}", f"--grpc-port={s.grpc_port}",
              f"--http-port={s.http_port}", f"--metrics-port={s.metrics_port}", f"--grpc-address={s.address}",
              f"--http-address={s.address}", f"--metrics-address={s.address}", "--disable-auto-complete-config"]
    if cfg.engine.backend != "trtllm":
        return [binary, *common]
    multi = hw.nodes > 1
    contexts = []
    for rank in range(cfg.world_size):
        ctx = [binary, *common, f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank:
            ctx += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
            ctx += ["--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"] if multi else []
        contexts.append(ctx)
    return mpirun_argv(contexts, cfg.resolve(hw.hostfile) if multi else None)


def commands(cfg: PipelineConfig) -> list[dict]:
    """The commands each stage amounts to, runnable by hand in this order: {"stage", "argv", "command"}."""
    src, p, m = cfg.model.source, cfg.parallel, cfg.model.preset
    ckpt = cfg.output("source") if src.format == "synthetic" else cfg.resolve(src.path)
    trt = cfg.output("trtllm_ckpt")
    out = []
    if src.format == "synthetic":
        out.append(("source", ["grok-deploy", "make-tiny", str(ckpt), "--preset", m, "--seed", str(src.seed)]))
    out.append(("convert", ["grok-deploy", "convert", str(ckpt), str(trt), "--tp", str(p.tp), "--moe-tp", str(p.moe_tp),
                            "--moe-ep", str(p.moe_ep), "--pp", str(p.pp), "--quant", cfg.quantization,
                            "--dtype", cfg.dtype, "--preset", m]))
    if cfg.verify.check_shards:
        out.append(("check-shards", ["grok-deploy", "check-shards", str(trt), "--source", str(ckpt),
                                     "--prompt", cfg.verify.shards_prompt, "--json"]))
    notes = {}
    if cfg.engine.backend == "onnxruntime":
        out.append(("export-onnx", ["grok-deploy", "export-onnx", str(ckpt), str(cfg.output("onnx")),
                                    "--quant", cfg.engine.onnx_quant, "--preset", m]))
    else:
        build_from = trt
        if cfg.quantization == "w8a16":  # trtllm-build passes int8 weights through untouched (§5)
            build_from = cfg.output("trtllm_preprocessed")
            out.append(("preprocess", ["grok-deploy", "preprocess", str(trt), str(build_from)]))
            notes["preprocess"] = ("on the GPU host: TensorRT-LLM's torch.ops.trtllm.preprocess_weights_for_mixed_gemm "
                                   "lays out every int8 weight for this GPU; trtllm-build reads its output")
        version, how = flags_version(cfg)
        out.append(("build", ["trtllm-build", *trtllm_build_args(cfg.engine, cfg.dtype, build_from,
                                                                 cfg.output("engines"), version)]))
        notes["build"] = (f"flags for TensorRT-LLM {version} ({how}); the build refuses versions outside "
                          f"{compat.known_good_text()}")
        if compat.installed_version() is None:
            notes["build"] += (f"; no TensorRT-LLM here: on the GPU host use TensorRT-LLM {compat.ASSUMED}, "
                               f"the last release that builds Grok engines ({compat.USE})")
    out.append(("deploy", tritonserver_argv(cfg)))
    if cfg.engine.backend == "trtllm" and cfg.hardware.nodes > 1:
        notes["deploy"] = (f"run on the first host of {cfg.resolve(cfg.hardware.hostfile)} (the leader, rank 0, serves); "
                           f"every node needs the same paths (a shared volume) and passwordless ssh for mpirun")
    if cfg.server.openai_port is not None:  # rank 0: Triton's OpenAI frontend (serving/openai_frontend.py)
        from grok_deploy.serving.openai_frontend import planned

        binary = "tritonserver" if cfg.server.binary == "auto" else str(cfg.resolve(cfg.server.binary))
        argv, note = planned(out[-1][1], binary, cfg.output("triton_repo"), cfg.server)
        out[-1] = ("deploy", argv)
        notes["deploy"] = "; ".join(n for n in (notes.get("deploy"), note) if n)
    docs = [{"stage": s, "argv": argv, "command": shlex.join(argv)} for s, argv in out]
    for d in docs:
        if d["stage"] in notes:
            d["note"] = notes[d["stage"]]
    return docs


def trtllm_warnings(cfg: PipelineConfig) -> list[str]:
    """What the build or the launch would refuse, found now: sizes TensorRT-LLM cannot build, a
    missing hostfile."""
    if cfg.engine.backend != "trtllm":
        return []
    version, _ = flags_version(cfg)
    out = [f"{cfg.where('model.preset')}: {cfg.model.preset} at tp {cfg.parallel.tp}: {problem}; the build stage "
           f"will refuse it (a GPU smoke test: preset grok-1-smoke, pipelines/grok-1-smoke-gpu.yaml)"
           for problem in compat.size_problems(cfg.grok, cfg.parallel.tp, cfg.quantization, version)]
    problem = compat.version_problem(version)
    if problem:
        out.append(problem)
    out += compat.capability_problems()  # where TensorRT-LLM is installed: trtllm-build, models.grok
    hostfile = cfg.hardware.hostfile
    if cfg.hardware.nodes > 1 and hostfile and not cfg.resolve(hostfile).is_file():
        out.append(f"{cfg.where('hardware.hostfile')}: {cfg.resolve(hostfile)} does not exist; deploy needs it")
    return out


# --- the command ----------------------------------------------------------------------------

STATUS = {"run": "would run", "skip": "cached", "n/a": "not applicable"}


def verify_estimate(cfg: PipelineConfig, host=None) -> dict:
    """verify.mode resolved, with the peak host memory and time of the reference side on `host`."""
    from grok_deploy.verify.score import golden_estimate, prompt_tokens_guess, score_estimate

    mode, why = cfg.verify_mode()
    v = cfg.verify
    tokens = prompt_tokens_guess(list(v.prompts))
    est = (score_estimate if mode == "score" else golden_estimate)(cfg.grok, v.reference_dtype, tokens, v.max_tokens,
                                                                   host=host)
    return {"mode": mode, "why": why, "prompts": len(tokens), "max_tokens": v.max_tokens, **est}


def check_shards_estimate(cfg: PipelineConfig, host=None) -> dict | None:
    """Peak host memory and time of the streamed check-shards stage; None when it is off."""
    from grok_deploy.trtllm.check_shards import check_estimate
    from grok_deploy.trtllm.shard import Mapping

    if not cfg.verify.check_shards:
        return None
    p = cfg.parallel
    return check_estimate(cfg.grok, Mapping(p.tp, p.pp, p.moe_tp, p.moe_ep), cfg.quantization, host)


def plan_doc(cfg: PipelineConfig) -> dict:
    from grok_deploy.pipeline.runner import schedule, write_problem

    decisions, problems = schedule(cfg)
    problem = write_problem(cfg, decisions, running_only=False)  # what `run` would refuse, refused here already
    if problem:
        raise UserError(problem)
    gpu = resolve_gpu(cfg, gpus.detect())
    mem, roof, host = memory_estimate(cfg, gpu), roofline(cfg, gpu), resolve_host(cfg)
    alt = None
    if cfg.quantization == "w8a16" and cfg.engine.backend == "trtllm":  # what fits where int8 cannot be built
        alt = memory_estimate(cfg.model_copy(update={"quantization": "none", "dtype": "bfloat16"
                                                     if cfg.dtype == "float32" else cfg.dtype}), gpu)
    refusal = int8_refusal(cfg, gpu, alt)
    gpu = {**gpu, "w8a16_refused": refusal}
    warnings = [f"{cfg.where(k)}: {path} does not exist; `run` needs it for the stages that read the source"
                for k, path in cfg.missing_paths()] + trtllm_warnings(cfg) + problems + gpu.pop("warnings")
    if cfg.server.openai_port is not None:
        from grok_deploy.serving.openai_frontend import UNGUARDED

        warnings.append(f"{cfg.where('server.openai_port')}: {UNGUARDED}")
    if exposed(cfg.server.address):
        warnings.append(f"{cfg.where('server.address')}: {cfg.server.address} makes the server listen on every "
                        "network interface, reachable from other machines without authentication; use 127.0.0.1 "
                        "to keep it local")
    return {
        "pipeline": str(cfg.file), "preset": cfg.model.preset, "backend": cfg.engine.backend,
        "stages": [{"name": d.stage.name, "status": STATUS.get(d.action, d.action), "reason": d.reason,
                    "output": str(d.out) if d.out else None, "fingerprint": d.fingerprint} for d in decisions],
        "commands": commands(cfg),
        "memory_per_gpu_bytes": mem["total_bytes"], "memory": mem, "fits": mem["fits"], "verdict": mem["verdict"],
        "roofline": roof, "verify": verify_estimate(cfg, host), "check_shards": check_shards_estimate(cfg, host),
        "warnings": warnings, "gpu": gpu, "memory_unquantised": alt if refusal else None, "host": host.to_dict(),
        "host_assumed": host.describe(),
        **({"trtllm": {"flags_version": flags_version(cfg)[0], "installed": compat.installed_version(),
                       "container": compat.CONTAINER}} if cfg.engine.backend == "trtllm" else {}),
    }


def render(doc: dict, cfg: PipelineConfig) -> str:
    p, mem, roof = cfg.parallel, doc["memory"], doc["roofline"]
    lines = [f"pipeline {doc['pipeline']}: {cfg.model.preset}, {cfg.model.source.format} source, tp {p.tp} "
             f"(moe_tp {p.moe_tp} x moe_ep {p.moe_ep}) x pp {p.pp}, {cfg.quantization}, {cfg.dtype}, {cfg.engine.backend}"
             + (f", {cfg.hardware.nodes} nodes x {cfg.world_size // cfg.hardware.nodes} GPUs" if cfg.hardware.nodes > 1 else ""),
             "", "stages:"]
    lines += [f"  {s['name']:<13} {s['status']:<15} {s['output'] or '-'}" for s in doc["stages"]]
    lines += ["", "commands:"]
    for c in doc["commands"]:
        lines += ([f"  ({c['note']})"] if "note" in c else []) + [f"  [{c['stage']}] {c['command']}"]
    w = mem["weights"]
    lines += ["", f"memory per GPU ({'TensorRT-LLM engine' if cfg.engine.backend == 'trtllm' else 'if built with TensorRT-LLM'}):",
              f"  weights          {w['total'] / 1e9:8.2f} GB  (layers {w['layers'] / 1e9:.2f}, "
              f"embedding {w['vocab_embedding'] / 1e9:.2f}, lm_head + ln_f {w['lm_head_ln_f'] / 1e9:.2f})",
              f"  KV cache         {mem['kv_bytes'] / 1e9:8.2f} GB  ({mem['kv_bytes_per_token']} B/token x {mem['kv_tokens']} tokens)",
              f"  headroom         {mem['headroom_bytes'] / 1e9:8.2f} GB",
              f"  total            {mem['total_bytes'] / 1e9:8.2f} GB  of {mem['gpu_memory_bytes'] / 1e9:.0f} GB; "
              f"KV capacity ~{mem['kv_capacity_tokens']} tokens",
              f"  {mem['verdict']}"]
    alt = doc.get("memory_unquantised")
    if alt:
        lines.append(f"  unquantised {cfg.dtype if cfg.dtype != 'float32' else 'bfloat16'}: weights "
                     f"{alt['weights_bytes'] / 1e9:.2f} GB, total {alt['total_bytes'] / 1e9:.2f} GB of "
                     f"{alt['gpu_memory_bytes'] / 1e9:.0f} GB: {'fits' if alt['fits'] else 'does not fit'} "
                     f"(W8A16 cannot be built on this GPU)")
    g = doc["gpu"]
    lines += [f"GPU: {g['name']} ({g['how']}), compute capability {g['compute_capability'] or 'unknown'}" if g["name"]
              else f"GPU: not named (memory and bandwidth from {g['how']}; hardware.gpu names one)",
              f"decode roofline: {roof['active_weight_bytes_per_token'] / 1e9:.3f} GB active weights per token per rank "
              f"/ {roof['hbm_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s -> <= {roof['tokens_per_s_upper_bound']:.0f} tokens/s per sequence"]
    v = doc["verify"]
    lines.append(f"estimates for this host: {doc['host_assumed']}")
    lines += [f"verify: mode {v['mode']} ({v['why']}); {cfg.verify.reference_dtype} reference peak ~{v['peak_bytes'] / 1e9:.1f} GB "
              f"host memory, ~{_duration(v['seconds'])} for {v['prompts']} prompts x {v['max_tokens']} tokens"
              + (f" ({v['seconds_per_layer']:.1f} s and {v['bytes_per_layer'] / 1e9:.2f} GB read per layer)"
                 if v["mode"] == "score" else "")]
    c = doc["check_shards"]
    if c:
        lines.append(f"check-shards: {c['processes']} processes, peak ~{c['peak_bytes'] / 1e9:.1f} GB host memory "
                     f"together, ~{_duration(c['seconds'])} ({c['bytes_read'] / 1e9:.1f} GB read)")
    lines += [f"warning: {w}" for w in doc["warnings"]]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def cli_plan(args) -> int:
    cfg = load_pipeline(args.pipeline)
    doc = plan_doc(cfg)
    if getattr(args, "k8s", None):
        if cfg.engine.backend != "trtllm":
            raise UserError(f"--k8s: {cfg.where('engine.backend')} is {cfg.engine.backend}; the multi-node manifest is for trtllm")
        from grok_deploy.serving.k8s import DEFAULT_IMAGE, write_manifests

        write_manifests(cfg, args.k8s, image=DEFAULT_IMAGE if args.image is None else args.image)
        doc["kubernetes_manifest"] = str(args.k8s)
    print(json.dumps(doc, indent=1) if args.json else render(doc, cfg))
    if doc.get("kubernetes_manifest") and not args.json:
        print(f"wrote {doc['kubernetes_manifest']}: LeaderWorkerSet of {cfg.hardware.nodes} pods x "
              f"{cfg.world_size // cfg.hardware.nodes} GPUs and a Service on the leader")
    if doc["gpu"]["w8a16_refused"]:
        raise UserError(doc["gpu"]["w8a16_refused"])
    if cfg.engine.backend == "trtllm" and not doc["fits"]:
        raise UserError(doc["verdict"])
    return 0
