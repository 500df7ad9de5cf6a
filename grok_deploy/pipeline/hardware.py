"""The hardware `plan` estimates for: the GPU (nvidia-smi's answer, else `hardware.gpu` from the
table in trtllm/gpus.py, else `hardware.gpu_memory_gb` / `hbm_bandwidth_gbps`), whether TensorRT-LLM
can build W8A16 on it, and the host the verify and check-shards times are for (host.py).
A memory or bandwidth key written in the pipeline wins over `hardware.gpu`'s table values (a GPU
variant the table does not list); what nvidia-smi reports wins over both.
"""
from __future__ import annotations

from grok_deploy import host as host_mod
from grok_deploy.trtllm import gpus

GB = 1e9


def resolve_gpu(cfg, detected: gpus.Detected | None) -> dict:
    """{"name", "key", "compute_capability", "memory_bytes", "bandwidth_bytes_per_s", "how",
    "memory_source", "warnings"} of the GPU the engine runs on (`detected`: gpus.detect())."""
    hw = cfg.hardware
    written = hw.model_fields_set
    entry = gpus.GPUS[hw.gpu] if hw.gpu else None
    mem_key, bw_key = "gpu_memory_gb" in written or entry is None, "hbm_bandwidth_gbps" in written or entry is None
    mem = hw.gpu_memory_gb * GB if mem_key else entry.memory_gb * GB
    bw = hw.hbm_bandwidth_gbps * GB if bw_key else entry.bandwidth_gbps * GB
    name, cap = (entry.name, entry.compute_cap) if entry else (None, None)
    how = (f"hardware.gpu: {hw.gpu} ({cfg.at('hardware.gpu')})" if entry
           else "hardware.gpu_memory_gb and hbm_bandwidth_gbps")
    source = (f"hardware.gpu_memory_gb {hw.gpu_memory_gb:g} GB ({cfg.at('hardware.gpu_memory_gb')})" if mem_key
              else f"the {entry.memory_gb:g} GB of {entry.name} (hardware.gpu: {hw.gpu}, {cfg.at('hardware.gpu')})")
    warnings, key = [], hw.gpu
    if detected is not None:
        if entry is not None and detected.entry is not None and detected.entry.key != entry.key:
            warnings.append(f"{cfg.where('hardware.gpu')}: {hw.gpu}, but nvidia-smi reports {detected.name} on this "
                            f"host; the estimates use the GPU found here")
        name, cap, mem = detected.name, detected.compute_cap, detected.memory_bytes
        bw = detected.entry.bandwidth_gbps * GB if detected.entry else bw
        how = f"nvidia-smi on this host: {detected.count} x {detected.name}"
        source = f"the {mem / GB:.1f} GB nvidia-smi reports for {detected.name}"
        key = detected.entry.key if detected.entry else None
    return {"name": name, "key": key,
            "compute_capability": f"{cap[0]}.{cap[1]}" if cap else None, "memory_bytes": int(mem),
            "bandwidth_bytes_per_s": bw, "how": how, "memory_source": source, "warnings": warnings}


def int8_refusal(cfg, gpu: dict, alternative: dict | None) -> str | None:
    """Why the TensorRT-LLM build would refuse this pipeline's W8A16 on `gpu`, and what fits
    instead (`alternative`: plan's memory estimate of the same pipeline unquantised), or None."""
    if cfg.engine.backend != "trtllm" or not gpu["compute_capability"]:
        return None
    major, minor = map(int, gpu["compute_capability"].split("."))
    fit = None
    if alternative is not None:
        w = alternative["weights_bytes"] / GB
        fit = (f"unquantised it {'fits' if alternative['fits'] else 'does not fit either'} on {cfg.world_size} x "
               f"{gpu['name']} at {w:.1f} GB of weights per GPU, {alternative['total_bytes'] / GB:.1f} GB with the KV "
               f"cache and headroom of {alternative['gpu_memory_bytes'] / GB:.0f} GB")
    problem = gpus.int8_problem(cfg.quantization, gpu["name"], major * 10 + minor, cfg.dtype, fit)
    return f"{cfg.where('quantization')}: {problem}" if problem else None


def resolve_host(cfg) -> host_mod.Host:
    """This host, with the disk rate of the checkpoint's folder (or hardware.disk_read_gbps)."""
    src = cfg.model.source
    folder = cfg.output("source") if src.format == "synthetic" else cfg.resolve(src.path)
    return host_mod.current(folder, cfg.hardware.disk_read_gbps)
